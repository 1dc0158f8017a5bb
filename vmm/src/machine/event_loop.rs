//! The main thread's wait while the vCPUs run: one `event-manager` loop (epoll) with a
//! subscriber per source (the probe, stop requests, the i8042 reset, the vCPU threads'
//! reports, the deadline, terminal input), the priority that turns what they saw into the
//! run's [`VmExit`], and stopping the vCPU threads afterwards.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use luo_devices::ProbeEvent;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::machine::console_input::StdinToSerial;
use crate::machine::snapshot::state::{StateError, VcpuState};
use crate::machine::vcpu::control::{StopCause, VcpuControl};
use crate::machine::vcpu::kick::kick;
use crate::machine::vcpu::run::{DebugFate, FatalExit, VcpuNotice, VcpuStop};

/// A source the event loop could not watch.
#[derive(Debug, Error)]
#[error("{what}: {why}")]
pub struct EventLoopError {
    /// What was being done.
    pub what: &'static str,
    /// Why it failed.
    pub why: String,
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VmExit {
    /// The guest reset the machine through the i8042: a clean end.
    Reset,
    /// The deadline passed.
    Timeout {
        /// The deadline.
        after: Duration,
    },
    /// A vCPU met an exit it cannot go past.
    Fatal {
        /// Which vCPU.
        vcpu: u8,
        /// What.
        exit: FatalExit,
    },
    /// The observer ended the run (a scenario saw what it waited for).
    Ended,
}

impl VmExit {
    /// Whether the run ended the way a guest is meant to end.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset)
    }
}

/// What a vCPU thread tells the main thread.
pub(crate) enum VcpuReport {
    Stopped {
        vcpu: u8,
        stop: VcpuStop,
    },
    Notice(VcpuNotice),
    /// Parked for a pause, with its state (or why it could not be read).
    Parked {
        vcpu: u8,
        state: Box<Result<VcpuState, StateError>>,
    },
}

/// What wakes the main thread for good or for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The run ends.
    End(VmExit, StopCause),
    /// A pause is requested ([`VcpuControl::request_pause`]).
    Pause,
}

/// A vCPU thread's end of the reports: a channel, and an `EventFd` signalled after each
/// report so that the main thread's event loop wakes for it.
#[derive(Clone)]
pub(crate) struct ReportSender {
    pub tx: mpsc::Sender<VcpuReport>,
    pub ready: Arc<EventFd>,
}

impl ReportSender {
    pub fn send(&self, report: VcpuReport) {
        // The main thread is gone only once the run is over: nothing to tell then.
        if self.tx.send(report).is_ok() {
            if let Err(e) = self.ready.write(1) {
                log::warn!("cannot signal a vCPU report's eventfd: {e}");
            }
        }
    }
}

/// What the main thread waits on while the vCPUs run.
pub(crate) struct Sources<'a> {
    /// vCPUs in the run.
    pub vcpus: usize,
    /// Signalled by the probe for each message it queues.
    pub probe_ready: &'a EventFd,
    /// The probe's messages.
    pub probe: &'a mpsc::Receiver<ProbeEvent>,
    /// Hands each probe message on, in arrival order.
    pub deliver: &'a mut dyn FnMut(ProbeEvent),
    /// Signals stop requests (an observer's end).
    pub control: &'a VcpuControl,
    /// The i8042's reset line.
    pub reset: &'a EventFd,
    /// Signalled for each vCPU report.
    pub reports_ready: &'a EventFd,
    /// The vCPU threads' reports.
    pub reports: &'a mpsc::Receiver<VcpuReport>,
    /// The armed deadline timer and the timeout it stands for.
    pub deadline: Option<(TimerFd, Duration)>,
    /// Terminal input for the guest's console.
    pub input: Option<StdinToSerial>,
}

/// The main thread's event loop: one `event-manager` subscriber per source, each
/// recording what it saw in a shared [`Seen`].
pub(crate) struct MainLoop<'a> {
    events: EventManager<Box<dyn MutEventSubscriber + 'a>>,
    seen: Rc<RefCell<Seen>>,
}

impl<'a> MainLoop<'a> {
    /// Registers every source; fails (before any vCPU runs) if one cannot be watched.
    pub fn new(s: Sources<'a>) -> Result<Self, EventLoopError> {
        let host = |what, why: String| EventLoopError { what, why };
        let seen = Rc::new(RefCell::new(Seen::new(s.vcpus)));
        let mut events = EventManager::<Box<dyn MutEventSubscriber + 'a>>::new()
            .map_err(|e| host("creating the event loop (epoll)", e.to_string()))?;
        events.add_subscriber(Box::new(ProbeWatch {
            ready: s.probe_ready,
            events: s.probe,
            deliver: s.deliver,
            seen: seen.clone(),
        }));
        events.add_subscriber(Box::new(StopWatch {
            control: s.control,
            seen: seen.clone(),
        }));
        events.add_subscriber(Box::new(ResetWatch {
            reset: s.reset,
            seen: seen.clone(),
        }));
        events.add_subscriber(Box::new(ReportWatch {
            ready: s.reports_ready,
            reports: s.reports,
            seen: seen.clone(),
        }));
        if let Some((timer, after)) = s.deadline {
            events.add_subscriber(Box::new(DeadlineWatch {
                timer,
                after,
                seen: seen.clone(),
            }));
        }
        if let Some(input) = s.input {
            events.add_subscriber(Box::new(input));
        }
        if let Some(what) = seen.borrow_mut().broken.take() {
            return Err(host("registering with the event loop (epoll)", what));
        }
        Ok(MainLoop { events, seen })
    }

    /// Blocks until what the subscribers saw ends the run or asks for a pause.
    pub fn wait(&mut self) -> Result<Wake, event_manager::Error> {
        loop {
            let seen = self.seen.borrow();
            if let Some((exit, cause)) = seen.outcome() {
                return Ok(Wake::End(exit, cause));
            }
            if seen.pause {
                return Ok(Wake::Pause);
            }
            drop(seen);
            // Returns once it has dispatched what epoll reported, or at once (0) when a
            // signal interrupted the wait.
            self.events.run()?;
        }
    }

    /// During a pause: dispatches events until every vCPU whose loop still runs has
    /// parked, the run ends, or `limit` passes. Returns each vCPU's parked state (`None`:
    /// it did not park), and forgets the pause request and the states.
    pub fn wait_parked(
        &mut self,
        limit: Duration,
    ) -> Result<Vec<Option<Result<VcpuState, StateError>>>, event_manager::Error> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let seen = self.seen.borrow();
                let all = seen
                    .parked
                    .iter()
                    .zip(&seen.stopped)
                    .all(|(p, stopped)| p.is_some() || *stopped);
                if all || seen.outcome().is_some() || Instant::now() >= deadline {
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            self.events.run_with_timeout(ms)?;
        }
        let mut seen = self.seen.borrow_mut();
        seen.pause = false;
        let n = seen.parked.len();
        Ok(std::mem::replace(
            &mut seen.parked,
            (0..n).map(|_| None).collect(),
        ))
    }

    /// Per vCPU: whether its thread reported that its loop ended.
    pub fn stopped(&self) -> Vec<bool> {
        self.seen.borrow().stopped.clone()
    }
}

/// What the main thread's event loop has seen, kept by its subscribers.
#[derive(Debug)]
struct Seen {
    /// An observer requested [`StopCause::Ended`].
    ended: bool,
    /// The guest reset the machine.
    reset: bool,
    /// The first fatal vCPU exit.
    fatal: Option<(u8, FatalExit)>,
    /// The deadline passed: the run's timeout.
    timed_out: Option<Duration>,
    /// Per vCPU: its thread reported that its loop ended.
    stopped: Vec<bool>,
    /// A subscriber could not register its descriptor.
    broken: Option<String>,
    /// A pause is requested and not handled yet.
    pause: bool,
    /// Per vCPU, during a pause: its state once parked.
    parked: Vec<Option<Result<VcpuState, StateError>>>,
}

impl Seen {
    fn new(vcpus: usize) -> Self {
        Seen {
            ended: false,
            reset: false,
            fatal: None,
            timed_out: None,
            stopped: vec![false; vcpus],
            broken: None,
            pause: false,
            parked: (0..vcpus).map(|_| None).collect(),
        }
    }

    /// How the run ends, if it does: an observer's end first, then the guest's reset,
    /// then the first fatal vCPU exit, then the deadline (the order the checks have always
    /// had, for events that arrive together).
    fn outcome(&self) -> Option<(VmExit, StopCause)> {
        if self.ended {
            Some((VmExit::Ended, StopCause::Ended))
        } else if self.reset {
            Some((VmExit::Reset, StopCause::Reset))
        } else if let Some((vcpu, exit)) = &self.fatal {
            Some((
                VmExit::Fatal {
                    vcpu: *vcpu,
                    exit: exit.clone(),
                },
                StopCause::VcpuFailed,
            ))
        } else {
            self.timed_out
                .map(|after| (VmExit::Timeout { after }, StopCause::Timeout))
        }
    }

    fn mark_stopped(&mut self, vcpu: u8) {
        if let Some(s) = self.stopped.get_mut(usize::from(vcpu)) {
            *s = true;
        }
    }

    /// Registers `fd` for input with `ops`, or records why it could not.
    fn watch(&mut self, ops: &mut EventOps, fd: &impl std::os::fd::AsRawFd, what: &str) {
        if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
            self.broken.get_or_insert(format!("{what}: {e}"));
        }
    }
}

/// The probe's messages: delivered (to the observer, then the caller) in arrival order
/// each time the probe signals that it queued some.
struct ProbeWatch<'a> {
    ready: &'a EventFd,
    events: &'a mpsc::Receiver<ProbeEvent>,
    deliver: &'a mut dyn FnMut(ProbeEvent),
    seen: Rc<RefCell<Seen>>,
}

impl MutEventSubscriber for ProbeWatch<'_> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Read (reset) the counter first: a message queued after the drain signals again.
        let _ = self.ready.read();
        for ev in self.events.try_iter() {
            (self.deliver)(ev);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.seen.borrow_mut().watch(ops, self.ready, "probe");
    }
}

/// Stop requests ([`VcpuControl::stop_event`]): an observer ending the run, from any
/// thread.
struct StopWatch<'a> {
    control: &'a VcpuControl,
    seen: Rc<RefCell<Seen>>,
}

impl MutEventSubscriber for StopWatch<'_> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(event) = self.control.stop_event() {
            let _ = event.read();
        }
        let mut seen = self.seen.borrow_mut();
        if self.control.stop_requested() == Some(StopCause::Ended) {
            seen.ended = true;
        }
        if self.control.pause_requested() {
            seen.pause = true;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut seen = self.seen.borrow_mut();
        match self.control.stop_event() {
            Some(event) => seen.watch(ops, event, "stop requests"),
            None => {
                seen.broken
                    .get_or_insert_with(|| "stop requests: no eventfd".into());
            }
        }
    }
}

/// The i8042's reset line.
struct ResetWatch<'a> {
    reset: &'a EventFd,
    seen: Rc<RefCell<Seen>>,
}

impl MutEventSubscriber for ResetWatch<'_> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if self.reset.read().is_ok() {
            self.seen.borrow_mut().reset = true;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.seen.borrow_mut().watch(ops, self.reset, "i8042 reset");
    }
}

/// The vCPU threads' reports: a fatal exit ends the run, notices are logged.
struct ReportWatch<'a> {
    ready: &'a EventFd,
    reports: &'a mpsc::Receiver<VcpuReport>,
    seen: Rc<RefCell<Seen>>,
}

impl MutEventSubscriber for ReportWatch<'_> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.ready.read();
        let mut seen = self.seen.borrow_mut();
        for report in self.reports.try_iter() {
            match report {
                VcpuReport::Stopped {
                    vcpu,
                    stop: VcpuStop::Fatal(exit),
                } => {
                    seen.mark_stopped(vcpu);
                    seen.fatal.get_or_insert((vcpu, exit));
                }
                VcpuReport::Stopped {
                    vcpu,
                    stop: VcpuStop::Requested(cause),
                } => {
                    seen.mark_stopped(vcpu);
                    log::debug!("vCPU {vcpu} stopped early ({cause:?})");
                }
                VcpuReport::Notice(VcpuNotice::ForeignDebug {
                    vcpu,
                    pc,
                    dr6,
                    fate,
                }) => {
                    let what = format!(
                        "vCPU {vcpu}: the guest's own debug exception at {pc:#x} (DR6 {dr6:#x})"
                    );
                    match fate {
                        DebugFate::Reinjected => log::info!("{what}, given back to it"),
                        DebugFate::Dropped => log::warn!(
                            "{what} dropped: KVM cannot inject one (no KVM_GUESTDBG_INJECT_DB)"
                        ),
                        DebugFate::Failed(errno) => log::warn!(
                            "{what} dropped: KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_INJECT_DB: {}",
                            std::io::Error::from_raw_os_error(errno)
                        ),
                    }
                }
                VcpuReport::Notice(VcpuNotice::StepInterrupted { vcpu, slot }) => {
                    log::info!(
                        "vCPU {vcpu}: the step over breakpoint {slot} was cut short by an NMI \
                         or exception; stepped over again when the call comes back"
                    );
                }
                VcpuReport::Parked { vcpu, state } => {
                    if let Some(p) = seen.parked.get_mut(usize::from(vcpu)) {
                        *p = Some(*state);
                    }
                }
                VcpuReport::Notice(VcpuNotice::HoldTimedOut { vcpu, slot }) => {
                    // The schedule says in its timeline whether that was a failure.
                    log::info!("vCPU {vcpu}: hold at breakpoint {slot} timed out; released");
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.seen
            .borrow_mut()
            .watch(ops, self.ready, "vCPU reports");
    }
}

/// The run's deadline: a timerfd armed for the time left when the run started.
struct DeadlineWatch {
    timer: TimerFd,
    after: Duration,
    seen: Rc<RefCell<Seen>>,
}

impl MutEventSubscriber for DeadlineWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Readable: the timer expired, so this read does not block.
        if self.timer.wait().is_ok() {
            self.seen.borrow_mut().timed_out = Some(self.after);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.seen.borrow_mut().watch(ops, &self.timer, "deadline");
    }
}

/// How long the vCPU threads get to return once kicked.
pub(crate) const STOP_WAIT: Duration = Duration::from_secs(1);

/// Stops every vCPU thread (the stop request is already made): one kick each (not to
/// those whose loop already ended: `stopped`), then waits for their reports, at most
/// `limit` in all ([`STOP_WAIT`]), and joins them. Returns what each thread returned
/// (its vCPU), `None` for a thread still running then: it is named in a warning and ends
/// with the process.
pub(crate) fn stop_vcpus<T>(
    threads: Vec<thread::JoinHandle<T>>,
    reports: &mpsc::Receiver<VcpuReport>,
    mut stopped: Vec<bool>,
    limit: Duration,
) -> Vec<Option<T>> {
    stopped.resize(threads.len(), false);
    for (t, done) in threads.iter().zip(&stopped) {
        if !done {
            kick(t);
        }
    }
    let deadline = Instant::now() + limit;
    while stopped.contains(&false) {
        let left = deadline.saturating_duration_since(Instant::now());
        match reports.recv_timeout(left) {
            Ok(VcpuReport::Stopped { vcpu, .. }) => {
                if let Some(s) = stopped.get_mut(usize::from(vcpu)) {
                    *s = true;
                }
            }
            // The run is over: a late notice or parked state changes nothing.
            Ok(VcpuReport::Notice(_) | VcpuReport::Parked { .. }) => {}
            // The time is up, or every thread is gone (one that panicked reports nothing).
            Err(_) => break,
        }
    }
    let mut back = Vec::new();
    for (id, (t, done)) in threads.into_iter().zip(stopped).enumerate() {
        if done || t.is_finished() {
            back.push(t.join().ok());
        } else {
            log::warn!(
                "vCPU {id}: its thread did not return within {} ms of its stop kick; \
                 it is left to end with the process",
                limit.as_millis()
            );
            back.push(None);
        }
    }
    back
}

#[cfg(test)]
mod tests {
    use super::*;
    use luo_protocol::message::Message;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// The main loop's sources, faked: the test holds the other ends.
    struct Fakes {
        probe_ready: EventFd,
        probe_tx: mpsc::Sender<ProbeEvent>,
        probe_rx: mpsc::Receiver<ProbeEvent>,
        control: VcpuControl,
        reset: EventFd,
        report: ReportSender,
        reports: mpsc::Receiver<VcpuReport>,
        reports_ready: Arc<EventFd>,
    }

    fn fakes() -> Fakes {
        let fd = || EventFd::new(EFD_NONBLOCK).unwrap();
        let (probe_tx, probe_rx) = mpsc::channel();
        let (tx, reports) = mpsc::channel();
        let reports_ready = Arc::new(fd());
        Fakes {
            probe_ready: fd(),
            probe_tx,
            probe_rx,
            control: VcpuControl::with_stop_event(2, fd()),
            reset: fd(),
            report: ReportSender {
                tx,
                ready: reports_ready.clone(),
            },
            reports,
            reports_ready,
        }
    }

    /// The main loop over `f`'s sources for two vCPUs.
    fn main_loop<'a>(
        f: &'a Fakes,
        deliver: &'a mut dyn FnMut(ProbeEvent),
        deadline: Option<(TimerFd, Duration)>,
    ) -> MainLoop<'a> {
        MainLoop::new(Sources {
            vcpus: 2,
            probe_ready: &f.probe_ready,
            probe: &f.probe_rx,
            deliver,
            control: &f.control,
            reset: &f.reset,
            reports_ready: &f.reports_ready,
            reports: &f.reports,
            deadline,
            input: None,
        })
        .unwrap()
    }

    /// Runs the main loop over `f` until it ends, with `deadline` if given, while
    /// `meanwhile` acts from another thread; returns the end, the probe messages
    /// delivered, and which vCPUs reported they stopped.
    fn run_loop_with(
        f: &Fakes,
        deadline: Option<Duration>,
        meanwhile: impl FnOnce() + Send,
    ) -> ((VmExit, StopCause), Vec<ProbeEvent>, Vec<bool>) {
        let end = |w: Wake| match w {
            Wake::End(exit, cause) => (exit, cause),
            Wake::Pause => panic!("no pause was asked for"),
        };
        let mut got = Vec::new();
        let mut deliver = |ev: ProbeEvent| got.push(ev);
        let deadline = deadline.map(|after| {
            let mut t = TimerFd::new().unwrap();
            t.reset(after, None).unwrap();
            (t, after)
        });
        let mut main = main_loop(f, &mut deliver, deadline);
        let (end, stopped) = thread::scope(|s| {
            s.spawn(meanwhile);
            let end = end(main.wait().unwrap());
            (end, main.stopped())
        });
        drop(main);
        (end, got, stopped)
    }

    fn message(n: u16) -> ProbeEvent {
        ProbeEvent {
            item: Ok(Message::UserspaceUp { cpus_online: n }),
            at: Instant::now(),
        }
    }

    #[test]
    fn probe_messages_arrive_in_order_then_the_reset_ends_the_run() {
        let f = fakes();
        let (end, got, _) = run_loop_with(&f, None, || {
            for n in 0..3 {
                f.probe_tx.send(message(n)).unwrap();
                f.probe_ready.write(1).unwrap();
                thread::sleep(Duration::from_millis(5));
            }
            f.reset.write(1).unwrap();
        });
        assert_eq!(end, (VmExit::Reset, StopCause::Reset));
        let counts: Vec<_> = got
            .iter()
            .map(|e| match e.item {
                Ok(Message::UserspaceUp { cpus_online }) => cpus_online,
                _ => u16::MAX,
            })
            .collect();
        assert_eq!(counts, vec![0, 1, 2]);
    }

    #[test]
    fn an_observer_ending_the_run_wakes_the_loop() {
        let f = fakes();
        let t = Instant::now();
        let (end, _, _) = run_loop_with(&f, Some(Duration::from_secs(30)), || {
            thread::sleep(Duration::from_millis(20));
            f.control.request_stop(StopCause::Ended);
        });
        assert_eq!(end, (VmExit::Ended, StopCause::Ended));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_pause_wakes_the_loop_and_collects_what_the_vcpus_parked_with() {
        let f = fakes();
        let mut deliver = |_: ProbeEvent| {};
        let mut main = main_loop(&f, &mut deliver, None);
        f.control.request_pause();
        assert_eq!(main.wait().unwrap(), Wake::Pause);
        // vCPU 0 parks (its state could not be read, as a KVM lacking an ioctl would
        // say); vCPU 1 never does: the wait ends at its limit.
        f.report.send(VcpuReport::Parked {
            vcpu: 0,
            state: Box::new(Err(StateError::MsrRefused {
                vcpu: 0,
                index: 0x10,
            })),
        });
        let t = Instant::now();
        let parked = main.wait_parked(Duration::from_millis(50)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(matches!(
            parked[0],
            Some(Err(StateError::MsrRefused { .. }))
        ));
        assert!(parked[1].is_none());
        // The pause is handled: the loop waits for the end again.
        f.control.resume();
        f.reset.write(1).unwrap();
        assert_eq!(
            main.wait().unwrap(),
            Wake::End(VmExit::Reset, StopCause::Reset)
        );
    }

    #[test]
    fn the_deadline_ends_the_run() {
        let f = fakes();
        let after = Duration::from_millis(30);
        let t = Instant::now();
        let (end, _, _) = run_loop_with(&f, Some(after), || {});
        assert_eq!(end, (VmExit::Timeout { after }, StopCause::Timeout));
        assert!(t.elapsed() >= after);
    }

    #[test]
    fn a_fatal_vcpu_exit_ends_the_run_and_notices_do_not() {
        let f = fakes();
        let (end, _, stopped) = run_loop_with(&f, None, || {
            f.report.send(VcpuReport::Notice(VcpuNotice::ForeignDebug {
                vcpu: 0,
                pc: 1,
                dr6: crate::machine::debug::DR6_BS,
                fate: DebugFate::Reinjected,
            }));
            f.report.send(VcpuReport::Stopped {
                vcpu: 0,
                stop: VcpuStop::Requested(StopCause::Reset),
            });
            thread::sleep(Duration::from_millis(20));
            f.report.send(VcpuReport::Stopped {
                vcpu: 1,
                stop: VcpuStop::Fatal(FatalExit::FailEntry(7)),
            });
        });
        assert_eq!(
            end,
            (
                VmExit::Fatal {
                    vcpu: 1,
                    exit: FatalExit::FailEntry(7)
                },
                StopCause::VcpuFailed
            )
        );
        assert_eq!(stopped, vec![true, true]);
    }

    #[test]
    fn events_seen_together_end_the_run_in_the_old_order() {
        let mut seen = Seen::new(1);
        assert_eq!(seen.outcome(), None);
        seen.timed_out = Some(Duration::from_secs(1));
        assert_eq!(seen.outcome().unwrap().1, StopCause::Timeout);
        seen.fatal = Some((0, FatalExit::SystemEvent(1)));
        assert_eq!(seen.outcome().unwrap().1, StopCause::VcpuFailed);
        seen.reset = true;
        assert_eq!(seen.outcome().unwrap().1, StopCause::Reset);
        seen.ended = true;
        assert_eq!(seen.outcome(), Some((VmExit::Ended, StopCause::Ended)));
    }

    #[test]
    fn stopping_waits_for_reports_within_its_limit() {
        crate::machine::vcpu::kick::install_handler().unwrap();
        let f = fakes();
        let (release, wait) = mpsc::channel::<()>();
        // vCPU 0 reports at once; vCPU 1 does not return in time.
        let report = f.report.clone();
        let quick = thread::spawn(move || {
            report.send(VcpuReport::Stopped {
                vcpu: 0,
                stop: VcpuStop::Requested(StopCause::Reset),
            })
        });
        let slow = thread::spawn(move || {
            let _ = wait.recv_timeout(Duration::from_secs(30));
        });
        let t = Instant::now();
        stop_vcpus(
            vec![quick, slow],
            &f.reports,
            vec![false, false],
            Duration::from_millis(50),
        );
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(t.elapsed() < Duration::from_secs(10));
        drop(release);
    }
}
