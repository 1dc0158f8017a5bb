//! How the VMM steers running vCPU threads: a stop request with its cause, and holds (a
//! vCPU kept stopped at a hook until the VMM releases it, or a bounded time passes).
//! A stop request also signals an `EventFd`, so that the VMM's event loop wakes whoever
//! made it (an observer ending the run from a vCPU thread).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Why the VMM stops every vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopCause {
    /// The guest reset the machine (i8042).
    Reset,
    /// The run's deadline passed.
    Timeout,
    /// Another vCPU met a fatal exit.
    VcpuFailed,
    /// The observer ended the run (a scenario saw what it waited for).
    Ended,
    /// The VMM itself failed (a vCPU thread could not start, its event loop broke).
    Host,
}

impl StopCause {
    const fn code(self) -> u8 {
        match self {
            StopCause::Reset => 1,
            StopCause::Timeout => 2,
            StopCause::VcpuFailed => 3,
            StopCause::Ended => 4,
            StopCause::Host => 5,
        }
    }

    const fn from_code(code: u8) -> Option<StopCause> {
        match code {
            1 => Some(StopCause::Reset),
            2 => Some(StopCause::Timeout),
            3 => Some(StopCause::VcpuFailed),
            4 => Some(StopCause::Ended),
            5 => Some(StopCause::Host),
            _ => None,
        }
    }
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldEnd {
    /// The VMM released the vCPU.
    Released,
    /// Nobody released it within the hold's limit; it goes on.
    TimedOut,
    /// The VMM stops every vCPU.
    Stopped(StopCause),
}

/// Shared by the VMM and every vCPU thread.
#[derive(Debug)]
pub(crate) struct VcpuControl {
    /// 0 while running, else a [`StopCause`] code.
    stop: AtomicU8,
    /// Per vCPU: held at a hook.
    held: Mutex<Vec<bool>>,
    changed: Condvar,
    /// Incremented by [`VcpuControl::request_sample`]; each vCPU records its RIP once
    /// per new value (after the kick that follows).
    sample_generation: AtomicU32,
    /// Per vCPU: the RIPs recorded, in order.
    samples: Mutex<Vec<Vec<u64>>>,
    /// Signalled by every [`VcpuControl::request_stop`] and [`VcpuControl::request_pause`].
    stop_event: Option<EventFd>,
    /// A pause is requested: every vCPU parks at its next instruction boundary until
    /// [`VcpuControl::resume`] (a snapshot is taken meanwhile).
    pause: AtomicBool,
}

impl VcpuControl {
    /// Control of `vcpus` vCPUs, all running, none held; a stop request wakes nobody
    /// but held vCPUs.
    pub fn new(vcpus: usize) -> Self {
        VcpuControl {
            stop: AtomicU8::new(0),
            held: Mutex::new(vec![false; vcpus]),
            changed: Condvar::new(),
            sample_generation: AtomicU32::new(0),
            samples: Mutex::new(vec![Vec::new(); vcpus]),
            stop_event: None,
            pause: AtomicBool::new(false),
        }
    }

    /// The same, with `event` signalled by every stop request (the VMM's event loop
    /// watches it: see [`VcpuControl::stop_event`]).
    pub fn with_stop_event(vcpus: usize, event: EventFd) -> Self {
        VcpuControl {
            stop_event: Some(event),
            ..VcpuControl::new(vcpus)
        }
    }

    /// The `EventFd` every stop request signals, if any.
    pub fn stop_event(&self) -> Option<&EventFd> {
        self.stop_event.as_ref()
    }

    fn held(&self) -> MutexGuard<'_, Vec<bool>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to stop; the first cause given wins. Wakes held vCPUs and the
    /// [`VcpuControl::stop_event`] watcher (vCPUs in `KVM_RUN` need a kick besides,
    /// `super::kick`).
    pub fn request_stop(&self, cause: StopCause) {
        let _ = self
            .stop
            .compare_exchange(0, cause.code(), Ordering::SeqCst, Ordering::SeqCst);
        {
            let _guard = self.held();
            self.changed.notify_all();
        }
        if let Some(event) = &self.stop_event {
            if let Err(e) = event.write(1) {
                log::warn!("cannot signal the stop request's eventfd: {e}");
            }
        }
    }

    /// The stop request, if any.
    pub fn stop_requested(&self) -> Option<StopCause> {
        StopCause::from_code(self.stop.load(Ordering::SeqCst))
    }

    /// Asks every vCPU to park at its next instruction boundary (the VMM's event loop,
    /// woken through the [`VcpuControl::stop_event`], then kicks them and takes a
    /// snapshot). A second request before [`VcpuControl::resume`] changes nothing.
    pub fn request_pause(&self) {
        if !self.pause.swap(true, Ordering::SeqCst) {
            if let Some(event) = &self.stop_event {
                if let Err(e) = event.write(1) {
                    log::warn!("cannot signal the pause request's eventfd: {e}");
                }
            }
        }
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// Ends the pause: parked vCPUs go on.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
        let _guard = self.held();
        self.changed.notify_all();
    }

    /// Waits, on a parked vCPU's thread, until the pause ends or a stop is requested.
    pub fn wait_resumed(&self) {
        let mut held = self.held();
        while self.pause_requested() && self.stop_requested().is_none() {
            held = self.changed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Asks every vCPU to record its RIP the next time its loop comes round (the caller
    /// kicks the vCPU threads out of `KVM_RUN`).
    pub fn request_sample(&self) {
        self.sample_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The current sample request; a vCPU whose last recorded one differs records again.
    pub fn sample_generation(&self) -> u32 {
        self.sample_generation.load(Ordering::SeqCst)
    }

    /// Records a RIP sample of `vcpu`.
    pub fn record_sample(&self, vcpu: u8, rip: u64) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = s.get_mut(usize::from(vcpu)) {
            v.push(rip);
        }
    }

    /// The RIP samples recorded for `vcpu`, oldest first.
    pub fn samples(&self, vcpu: u8) -> Vec<u64> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.get(usize::from(vcpu)).cloned().unwrap_or_default()
    }

    /// Marks `vcpu` held (its thread then waits in [`VcpuControl::wait_released`]).
    pub fn hold(&self, vcpu: u8) {
        if let Some(h) = self.held().get_mut(usize::from(vcpu)) {
            *h = true;
        }
    }

    /// Releases `vcpu` if it is held.
    pub fn release(&self, vcpu: u8) {
        if let Some(h) = self.held().get_mut(usize::from(vcpu)) {
            *h = false;
        }
        self.changed.notify_all();
    }

    /// Whether `vcpu` is held.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "scenario conditions look at holds (issue 9)")
    )]
    pub fn is_held(&self, vcpu: u8) -> bool {
        self.held().get(usize::from(vcpu)).copied().unwrap_or(false)
    }

    /// Waits, on `vcpu`'s thread, until it is released, a stop is requested, or `limit`
    /// passes (then it is released and goes on).
    pub fn wait_released(&self, vcpu: u8, limit: Duration) -> HoldEnd {
        let deadline = Instant::now() + limit;
        let mut held = self.held();
        loop {
            if let Some(cause) = self.stop_requested() {
                return HoldEnd::Stopped(cause);
            }
            let slot = held.get_mut(usize::from(vcpu));
            match slot {
                None | Some(false) => return HoldEnd::Released,
                Some(h) => {
                    let now = Instant::now();
                    if now >= deadline {
                        *h = false;
                        return HoldEnd::TimedOut;
                    }
                    held = self
                        .changed
                        .wait_timeout(held, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_parked_vcpu_waits_for_the_resume_or_a_stop() {
        let fd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = Arc::new(VcpuControl::with_stop_event(1, fd()));
        c.request_pause();
        c.request_pause();
        assert!(c.pause_requested());
        // One signal for the two requests: the event loop wakes once.
        assert_eq!(c.stop_event().unwrap().read().unwrap(), 1);
        let parked = {
            let c = c.clone();
            thread::spawn(move || c.wait_resumed())
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!parked.is_finished());
        c.resume();
        parked.join().unwrap();
        assert!(!c.pause_requested());
        // A stop ends a pause's wait too.
        c.request_pause();
        let parked = {
            let c = c.clone();
            thread::spawn(move || c.wait_resumed())
        };
        c.request_stop(StopCause::Reset);
        parked.join().unwrap();
    }

    #[test]
    fn a_hold_ends_when_released() {
        let c = Arc::new(VcpuControl::new(2));
        c.hold(1);
        assert!(c.is_held(1) && !c.is_held(0));
        let waiter = {
            let c = c.clone();
            thread::spawn(move || c.wait_released(1, Duration::from_secs(30)))
        };
        thread::sleep(Duration::from_millis(20));
        c.release(1);
        assert_eq!(waiter.join().unwrap(), HoldEnd::Released);
        assert!(!c.is_held(1));
    }

    #[test]
    fn a_hold_is_bounded() {
        let c = VcpuControl::new(1);
        c.hold(0);
        let t = Instant::now();
        assert_eq!(
            c.wait_released(0, Duration::from_millis(30)),
            HoldEnd::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(!c.is_held(0), "a timed-out hold is released");
    }

    #[test]
    fn a_stop_wakes_a_held_vcpu_and_the_first_cause_wins() {
        let c = Arc::new(VcpuControl::new(1));
        c.hold(0);
        let waiter = {
            let c = c.clone();
            thread::spawn(move || c.wait_released(0, Duration::from_secs(30)))
        };
        thread::sleep(Duration::from_millis(20));
        c.request_stop(StopCause::Reset);
        c.request_stop(StopCause::Timeout);
        assert_eq!(waiter.join().unwrap(), HoldEnd::Stopped(StopCause::Reset));
        assert_eq!(c.stop_requested(), Some(StopCause::Reset));
    }

    #[test]
    fn a_stop_request_signals_the_stop_event() {
        let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let c = VcpuControl::with_stop_event(1, event.try_clone().unwrap());
        assert!(event.read().is_err(), "nothing requested yet");
        c.request_stop(StopCause::Ended);
        assert_eq!(event.read().unwrap(), 1);
        assert_eq!(c.stop_requested(), Some(StopCause::Ended));
        assert!(VcpuControl::new(1).stop_event().is_none());
    }

    #[test]
    fn samples_are_kept_per_vcpu_in_order() {
        let c = VcpuControl::new(2);
        assert_eq!(c.sample_generation(), 0);
        c.request_sample();
        c.request_sample();
        assert_eq!(c.sample_generation(), 2);
        c.record_sample(1, 0x10);
        c.record_sample(1, 0x20);
        c.record_sample(5, 0x30);
        assert_eq!(c.samples(1), vec![0x10, 0x20]);
        assert!(c.samples(0).is_empty() && c.samples(5).is_empty());
    }

    #[test]
    fn unknown_vcpus_are_never_held() {
        let c = VcpuControl::new(1);
        c.hold(7);
        assert!(!c.is_held(7));
        assert_eq!(
            c.wait_released(7, Duration::from_secs(30)),
            HoldEnd::Released
        );
    }
}
