//! The vCPU run loop: `KVM_RUN`, each exit mapped to an [`ExitEvent`], breakpoints
//! stepped over by the [`Stepper`] (with RFLAGS.IF masked by the vCPU where KVM cannot
//! block interrupts), the guest's own debug exceptions given back to it, hooks that may hold the vCPU (and tell the guest
//! afterwards that it was paused), and the reason the loop ended. Generic over
//! [`VcpuBackend`], so the tests drive it with scripted fake exits.

use std::time::{Duration, Instant};

use luo_devices::PioBus;

use super::control::{HoldEnd, StopCause, VcpuControl};
use super::stepper::{Arming, DebugAction, IfMask, StepEnd, Stepper};
use super::ExitEvent;

/// What a breakpoint hook wants once it has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    /// Step over the breakpoint and go on.
    Continue,
    /// Keep the vCPU stopped until the VMM releases it, at most `max`; then step over.
    /// The hook has marked it held ([`VcpuControl::hold`]) before returning, so that a
    /// release that comes before the loop waits is not lost.
    Hold {
        /// Longest hold.
        max: Duration,
    },
}

/// A vCPU exit the loop cannot go past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FatalExit {
    /// `KVM_EXIT_SHUTDOWN`: a triple fault. With a register dump.
    TripleFault(String),
    /// `KVM_EXIT_INTERNAL_ERROR`: KVM could not emulate an instruction. With a dump.
    InternalError(String),
    /// `KVM_EXIT_FAIL_ENTRY` with the hardware reason.
    FailEntry(u64),
    /// `KVM_EXIT_SYSTEM_EVENT` of this type.
    SystemEvent(u32),
    /// An exit luo-vmm does not handle.
    Unexpected(String),
    /// An ioctl on the vCPU failed.
    Kvm {
        /// Which.
        what: &'static str,
        /// errno.
        errno: i32,
    },
}

impl std::fmt::Display for FatalExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FatalExit::TripleFault(_) => f.write_str("triple fault (KVM_EXIT_SHUTDOWN)"),
            FatalExit::InternalError(_) => {
                f.write_str("KVM could not execute a guest instruction (KVM_EXIT_INTERNAL_ERROR)")
            }
            FatalExit::FailEntry(r) => write!(f, "KVM_EXIT_FAIL_ENTRY, hardware reason {r:#x}"),
            FatalExit::SystemEvent(k) => write!(f, "KVM_EXIT_SYSTEM_EVENT type {k}"),
            FatalExit::Unexpected(what) => write!(f, "unexpected exit {what}"),
            FatalExit::Kvm { what, errno } => {
                write!(f, "{what}: {}", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

/// Why a vCPU's loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VcpuStop {
    /// The VMM stopped every vCPU, for this reason.
    Requested(StopCause),
    /// This vCPU cannot go on.
    Fatal(FatalExit),
}

/// What became of a debug exception of the guest's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DebugFate {
    /// Given back to the guest (`KVM_GUESTDBG_INJECT_DB`).
    Reinjected,
    /// Dropped: KVM offers no `KVM_GUESTDBG_INJECT_DB`.
    Dropped,
    /// KVM refused the injection with this errno (`EBUSY`: another exception pending).
    Failed(i32),
}

/// Something a vCPU saw that the VMM should hear about while it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VcpuNotice {
    /// A debug exit at `pc` that is no breakpoint of ours nor our step: the guest's own
    /// #DB (its TF, an ICEBP).
    ForeignDebug {
        /// The vCPU.
        vcpu: u8,
        /// Guest RIP.
        pc: u64,
        /// DR6 of the exit.
        dr6: u64,
        /// What became of it.
        fate: DebugFate,
    },
    /// The step over breakpoint `slot`, with RFLAGS.IF masked, was cut short by an NMI
    /// or exception; IF was given back in its frame and the breakpoint will be stepped
    /// over again, without its hook, when the call comes back.
    StepInterrupted {
        /// The vCPU.
        vcpu: u8,
        /// The breakpoint.
        slot: usize,
    },
    /// A hold at breakpoint `slot` was not released in time; the vCPU went on.
    HoldTimedOut {
        /// The vCPU.
        vcpu: u8,
        /// The breakpoint.
        slot: usize,
    },
}

/// What the loop needs from a vCPU.
pub(crate) trait VcpuBackend {
    /// Its index.
    fn id(&self) -> u8;
    /// One `KVM_RUN`, its exit mapped (port I/O through `bus`); `EINTR` when the VMM
    /// kicked the vCPU (`super::kick`), the kick consumed, so that the loop looks at the
    /// VMM's requests and a later kick works again.
    fn run(&mut self, bus: &PioBus) -> Result<ExitEvent, kvm_ioctls::Error>;
    /// Applies `arming` to breakpoints at `addrs` (`KVM_SET_GUEST_DEBUG`).
    fn set_debug(&self, addrs: &[u64], arming: Arming) -> Result<(), kvm_ioctls::Error>;
    /// Before a step over the breakpoint at `pc` on a KVM without
    /// `KVM_GUESTDBG_BLOCKIRQ`: clears RFLAGS.IF where the instruction there allows it
    /// (`crate::machine::debug::if_step`), and says what it did. Never fails: where the
    /// registers or the instruction cannot be read, IF is left alone.
    fn mask_if(&self, pc: u64) -> IfMask;
    /// After that step ([`IfMask::Cleared`]): sets IF again, in RFLAGS, or, where an NMI
    /// or exception cut the step short, in the frame that returns to `bp`.
    fn unmask_if(&self, bp: u64) -> Result<StepEnd, kvm_ioctls::Error>;
    /// Gives the guest a #DB reported with `dr6` back: the guest's DR6 set as the
    /// exception would have left it, then `KVM_SET_GUEST_DEBUG` with `arming` and
    /// `KVM_GUESTDBG_INJECT_DB`.
    fn reinject_debug(
        &self,
        addrs: &[u64],
        arming: Arming,
        dr6: u64,
    ) -> Result<(), kvm_ioctls::Error>;
    /// Registers and bytes at RIP, for a fatal exit.
    fn dump(&self) -> String;
    /// The current RIP, if KVM gives the registers.
    fn rip(&self) -> Option<u64>;
    /// `KVM_KVMCLOCK_CTRL`: tells the guest, through its kvmclock page
    /// (`PVCLOCK_GUEST_STOPPED`), that the host kept it stopped, so that its soft-lockup
    /// and RCU-stall checks (`kvm_check_and_clear_guest_paused()` in
    /// arch/x86/kernel/kvmclock.c, called from kernel/watchdog.c and
    /// kernel/rcu/tree_stall.h) do not count the time. `EINVAL` when the guest has no
    /// kvmclock (or KVM lacks `KVM_CAP_KVMCLOCK_CTRL`).
    fn kvmclock_ctrl(&self) -> Result<(), kvm_ioctls::Error>;
}

/// The longest stop after which the guest is not told it was paused; a guest's
/// watchdogs take 10 s or more to complain (`watchdog_thresh`, `rcu_cpu_stall_timeout`),
/// and a shorter mark would cost an ioctl on the many brief stops at breakpoints.
pub(crate) const PAUSE_NOTICE_AFTER: Duration = Duration::from_secs(1);

/// Whether a vCPU kept out of the guest for `stopped` (a hook and its hold) calls
/// [`VcpuBackend::kvmclock_ctrl`] before it runs again: when longer than
/// [`PAUSE_NOTICE_AFTER`].
pub(crate) fn tells_guest_paused(stopped: Duration) -> bool {
    stopped > PAUSE_NOTICE_AFTER
}

/// After a stop of `stopped` at a breakpoint, before the vCPU runs again: tells the guest
/// it was paused when [`tells_guest_paused`]. A refusal is no error (KVM without
/// `KVM_CAP_KVMCLOCK_CTRL`, or a guest without kvmclock: booted with `nopv`, or the next
/// kernel before it set one up); it is logged at debug level the first time on this vCPU
/// (`logged`), and later holds try again.
fn after_stop<V: VcpuBackend>(vcpu: &V, stopped: Duration, logged: &mut bool) {
    if !tells_guest_paused(stopped) {
        return;
    }
    if let Err(e) = vcpu.kvmclock_ctrl() {
        if !*logged {
            *logged = true;
            log::debug!(
                "vCPU {}: KVM_KVMCLOCK_CTRL after a {:.1} s stop: {e} (no kvmclock in the \
                 guest, or KVM lacks KVM_CAP_KVMCLOCK_CTRL); not logged again",
                vcpu.id(),
                stopped.as_secs_f64()
            );
        }
    }
}

/// Where the loop reports to and what it asks: the hook at a breakpoint, notices.
pub(crate) struct LoopHooks<'a, V> {
    /// Runs at breakpoint `slot` hit at `pc`, with the vCPU stopped.
    pub on_hit: &'a mut dyn FnMut(&mut V, usize, u64) -> HookAction,
    /// Hears notices.
    pub notice: &'a dyn Fn(VcpuNotice),
    /// Parks the vCPU for a pause ([`VcpuControl::request_pause`]): called at an
    /// instruction boundary with no step in progress; returns when the pause ends.
    pub park: &'a mut dyn FnMut(&mut V),
}

/// Runs `vcpu` until the VMM stops it or an exit is fatal.
pub(crate) fn run_loop<V: VcpuBackend>(
    vcpu: &mut V,
    bus: &PioBus,
    control: &VcpuControl,
    stepper: &mut Stepper,
    hooks: LoopHooks<'_, V>,
) -> VcpuStop {
    let id = vcpu.id();
    let arm = |vcpu: &V, stepper: &Stepper, a: Arming| {
        vcpu.set_debug(stepper.addrs(), a).map_err(|e| {
            VcpuStop::Fatal(FatalExit::Kvm {
                what: "KVM_SET_GUEST_DEBUG",
                errno: e.errno(),
            })
        })
    };
    if let Some(a) = stepper.initial() {
        if let Err(stop) = arm(vcpu, stepper, a) {
            return stop;
        }
    }
    let mut sampled = control.sample_generation();
    let mut kvmclock_logged = false;
    loop {
        if let Some(cause) = control.stop_requested() {
            return VcpuStop::Requested(cause);
        }
        // Parked only between steps: a step in progress ends at the next exit.
        if control.pause_requested() && stepper.is_idle() {
            (hooks.park)(vcpu);
            continue;
        }
        let generation = control.sample_generation();
        if generation != sampled {
            sampled = generation;
            if let Some(rip) = vcpu.rip() {
                control.record_sample(id, rip);
            }
        }
        let event = match vcpu.run(bus) {
            Ok(event) => event,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return VcpuStop::Fatal(FatalExit::Kvm {
                    what: "KVM_RUN",
                    errno: e.errno(),
                })
            }
        };
        let fatal = match event {
            ExitEvent::Continue => continue,
            ExitEvent::Debug { pc, dr6 } => {
                match stepper.on_debug(pc, dr6) {
                    DebugAction::Hit {
                        slot,
                        pc,
                        then,
                        mask_if,
                    } => {
                        let stopped = Instant::now();
                        if let HookAction::Hold { max } = (hooks.on_hit)(vcpu, slot, pc) {
                            match control.wait_released(id, max) {
                                HoldEnd::Released => {}
                                HoldEnd::TimedOut => {
                                    (hooks.notice)(VcpuNotice::HoldTimedOut { vcpu: id, slot })
                                }
                                HoldEnd::Stopped(cause) => return VcpuStop::Requested(cause),
                            }
                        }
                        after_stop(vcpu, stopped.elapsed(), &mut kvmclock_logged);
                        if mask_if {
                            stepper.masked(vcpu.mask_if(pc));
                        }
                        if let Err(stop) = arm(vcpu, stepper, then) {
                            return stop;
                        }
                    }
                    DebugAction::Resume {
                        pc, then, mask_if, ..
                    } => {
                        if mask_if {
                            stepper.masked(vcpu.mask_if(pc));
                        }
                        if let Err(stop) = arm(vcpu, stepper, then) {
                            return stop;
                        }
                    }
                    DebugAction::Rearm {
                        arming,
                        give_back_if,
                    } => {
                        if let Some(bp) = give_back_if {
                            match vcpu.unmask_if(bp) {
                                Ok(StepEnd::Completed) => {}
                                Ok(StepEnd::Interrupted) => {
                                    if let Some(slot) =
                                        stepper.addrs().iter().position(|&a| a == bp)
                                    {
                                        (hooks.notice)(VcpuNotice::StepInterrupted {
                                            vcpu: id,
                                            slot,
                                        });
                                    }
                                    stepper.interrupted();
                                }
                                Err(e) => {
                                    return VcpuStop::Fatal(FatalExit::Kvm {
                                        what: "giving RFLAGS.IF back after a step (KVM_SET_REGS)",
                                        errno: e.errno(),
                                    })
                                }
                            }
                        }
                        if let Err(stop) = arm(vcpu, stepper, arming) {
                            return stop;
                        }
                    }
                    DebugAction::Reinject { pc, dr6, arming } => {
                        let fate = match vcpu.reinject_debug(stepper.addrs(), arming, dr6) {
                            Ok(()) => DebugFate::Reinjected,
                            Err(e) => DebugFate::Failed(e.errno()),
                        };
                        (hooks.notice)(VcpuNotice::ForeignDebug {
                            vcpu: id,
                            pc,
                            dr6,
                            fate,
                        })
                    }
                    DebugAction::Foreign { pc, dr6 } => (hooks.notice)(VcpuNotice::ForeignDebug {
                        vcpu: id,
                        pc,
                        dr6,
                        fate: DebugFate::Dropped,
                    }),
                }
                continue;
            }
            ExitEvent::TripleFault => FatalExit::TripleFault(vcpu.dump()),
            ExitEvent::InternalError => FatalExit::InternalError(vcpu.dump()),
            ExitEvent::FailEntry(reason) => FatalExit::FailEntry(reason),
            ExitEvent::SystemEvent(kind) => FatalExit::SystemEvent(kind),
            ExitEvent::Unexpected(what) => FatalExit::Unexpected(what),
        };
        return VcpuStop::Fatal(fatal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::machine::debug::DR6_BS;
    use crate::machine::vcpu::stepper::StepCaps;

    const BP: u64 = 0xffff_ffff_8100_1000;
    /// A scripted exit: the VMM requests a RIP sample and kicks the vCPU (EINTR).
    const SAMPLE_THEN_EINTR: i32 = -1;
    /// A scripted exit: the VMM requests a pause and kicks the vCPU (EINTR).
    const PAUSE_THEN_EINTR: i32 = -2;

    /// A vCPU whose exits come from a script; when the script ends it asks the VMM to
    /// stop (as a reset would) and returns EINTR (as a kick would).
    struct FakeVcpu {
        exits: VecDeque<Result<ExitEvent, i32>>,
        armings: Mutex<Vec<Arming>>,
        control: Arc<VcpuControl>,
        /// `KVM_KVMCLOCK_CTRL` calls so far.
        kvmclock_calls: AtomicUsize,
        /// What `KVM_KVMCLOCK_CTRL` fails with, if it does.
        kvmclock_errno: Option<i32>,
        /// What KVM offers the stepper.
        caps: StepCaps,
        /// What `mask_if` does to IF (as the instruction at the breakpoint allows).
        if_mask: IfMask,
        /// How each step whose IF was cleared ends, in order (then `Completed`).
        step_ends: Mutex<VecDeque<StepEnd>>,
        /// RFLAGS.IF operations: `(true, pc)` cleared for the step at `pc`, `(false,
        /// bp)` given back after the step over `bp`.
        if_ops: Mutex<Vec<(bool, u64)>>,
        /// #DBs given back to the guest: the exit's DR6 and the arming applied with it.
        injected: Mutex<Vec<(u64, Arming)>>,
        /// Per park: how many armings had been applied by then.
        parked_after: Mutex<Vec<usize>>,
    }

    impl FakeVcpu {
        fn new(control: &Arc<VcpuControl>, exits: Vec<Result<ExitEvent, i32>>) -> Self {
            FakeVcpu {
                exits: exits.into(),
                armings: Mutex::new(Vec::new()),
                control: control.clone(),
                kvmclock_calls: AtomicUsize::new(0),
                kvmclock_errno: None,
                caps: StepCaps::FULL,
                if_mask: IfMask::Cleared,
                step_ends: Mutex::new(VecDeque::new()),
                if_ops: Mutex::new(Vec::new()),
                injected: Mutex::new(Vec::new()),
                parked_after: Mutex::new(Vec::new()),
            }
        }
    }

    impl VcpuBackend for FakeVcpu {
        fn id(&self) -> u8 {
            0
        }
        fn run(&mut self, _bus: &PioBus) -> Result<ExitEvent, kvm_ioctls::Error> {
            match self.exits.pop_front() {
                Some(Ok(e)) => Ok(e),
                Some(Err(SAMPLE_THEN_EINTR)) => {
                    self.control.request_sample();
                    Err(kvm_ioctls::Error::new(libc::EINTR))
                }
                Some(Err(PAUSE_THEN_EINTR)) => {
                    self.control.request_pause();
                    Err(kvm_ioctls::Error::new(libc::EINTR))
                }
                Some(Err(errno)) => Err(kvm_ioctls::Error::new(errno)),
                None => {
                    self.control.request_stop(StopCause::Reset);
                    Err(kvm_ioctls::Error::new(libc::EINTR))
                }
            }
        }
        fn set_debug(&self, _addrs: &[u64], arming: Arming) -> Result<(), kvm_ioctls::Error> {
            self.armings.lock().unwrap().push(arming);
            Ok(())
        }
        fn mask_if(&self, pc: u64) -> IfMask {
            if self.if_mask != IfMask::Untouched {
                self.if_ops.lock().unwrap().push((true, pc));
            }
            self.if_mask
        }
        fn unmask_if(&self, bp: u64) -> Result<StepEnd, kvm_ioctls::Error> {
            self.if_ops.lock().unwrap().push((false, bp));
            let end = self.step_ends.lock().unwrap().pop_front();
            Ok(end.unwrap_or(StepEnd::Completed))
        }
        fn reinject_debug(
            &self,
            _addrs: &[u64],
            arming: Arming,
            dr6: u64,
        ) -> Result<(), kvm_ioctls::Error> {
            self.injected.lock().unwrap().push((dr6, arming));
            Ok(())
        }
        fn dump(&self) -> String {
            "fake registers".into()
        }
        fn rip(&self) -> Option<u64> {
            Some(0x1000 + self.exits.len() as u64)
        }
        fn kvmclock_ctrl(&self) -> Result<(), kvm_ioctls::Error> {
            self.kvmclock_calls.fetch_add(1, Ordering::SeqCst);
            self.kvmclock_errno
                .map_or(Ok(()), |e| Err(kvm_ioctls::Error::new(e)))
        }
    }

    /// What a scripted run left: how it stopped, the hook calls `(slot, pc)`, the
    /// notices, and the debug armings applied.
    type Script = (VcpuStop, Vec<(usize, u64)>, Vec<VcpuNotice>, Vec<Arming>);

    /// Runs the loop on a script with breakpoint `BP`.
    fn run_script(
        control: &Arc<VcpuControl>,
        exits: Vec<Result<ExitEvent, i32>>,
        action: HookAction,
    ) -> Script {
        let mut vcpu = FakeVcpu::new(control, exits);
        let (stop, hits, notices) = run_fake(control, &mut vcpu, action);
        (stop, hits, notices, vcpu.armings.into_inner().unwrap())
    }

    /// Runs the loop on `vcpu` with breakpoint `BP`: how it stopped, the hook calls, the
    /// notices.
    fn run_fake(
        control: &Arc<VcpuControl>,
        vcpu: &mut FakeVcpu,
        action: HookAction,
    ) -> (VcpuStop, Vec<(usize, u64)>, Vec<VcpuNotice>) {
        let mut stepper = Stepper::with_caps(vec![BP], vcpu.caps);
        let hits = Mutex::new(Vec::new());
        let notices = Mutex::new(Vec::new());
        let mut on_hit = |_: &mut FakeVcpu, slot: usize, pc: u64| {
            hits.lock().unwrap().push((slot, pc));
            if matches!(action, HookAction::Hold { .. }) {
                control.hold(0);
            }
            action
        };
        let notice = |n: VcpuNotice| notices.lock().unwrap().push(n);
        let mut park = |v: &mut FakeVcpu| {
            let armed = v.armings.lock().unwrap().len();
            v.parked_after.lock().unwrap().push(armed);
            v.control.resume();
        };
        let stop = run_loop(
            vcpu,
            &PioBus::new(),
            control,
            &mut stepper,
            LoopHooks {
                on_hit: &mut on_hit,
                notice: &notice,
                park: &mut park,
            },
        );
        (
            stop,
            hits.into_inner().unwrap(),
            notices.into_inner().unwrap(),
        )
    }

    fn debug(pc: u64, dr6: u64) -> Result<ExitEvent, i32> {
        Ok(ExitEvent::Debug { pc, dr6 })
    }

    #[test]
    fn a_pause_parks_the_vcpu_only_between_steps() {
        let control = Arc::new(VcpuControl::new(1));
        // A pause requested while stepping over the breakpoint waits for the step's end;
        // one requested with no step in progress parks at once.
        let mut vcpu = FakeVcpu::new(
            &control,
            vec![
                debug(BP, 1),
                Err(PAUSE_THEN_EINTR),
                debug(BP + 3, DR6_BS),
                Err(PAUSE_THEN_EINTR),
            ],
        );
        let (stop, hits, _) = run_fake(&control, &mut vcpu, HookAction::Continue);
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(hits, vec![(0, BP)]);
        let armings = vcpu.armings.lock().unwrap().clone();
        // Initial arming, the step over, the re-arming after it.
        assert_eq!(armings.len(), 3);
        assert_eq!(
            *vcpu.parked_after.lock().unwrap(),
            vec![3, 3],
            "both parks came after the step ended and the breakpoint was armed again"
        );
    }

    #[test]
    fn a_breakpoint_is_hooked_once_and_stepped_over() {
        let control = Arc::new(VcpuControl::new(1));
        let (stop, hits, notices, armings) = run_script(
            &control,
            vec![
                Ok(ExitEvent::Continue),
                debug(BP, 1),
                debug(BP + 5, DR6_BS),
                Err(libc::EINTR),
            ],
            HookAction::Continue,
        );
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(hits, vec![(0, BP)]);
        assert!(notices.is_empty());
        assert_eq!(armings, [Arming::ALL, Arming::step_over(0), Arming::ALL]);
    }

    /// Two hits stepped over with IF masked: the breakpoint disarmed for each step and
    /// re-armed after it, and IF cleared before each step and given back after it.
    fn assert_two_masked_steps(vcpu: FakeVcpu, step: Arming) {
        assert_eq!(
            vcpu.armings.into_inner().unwrap(),
            [Arming::ALL, step, Arming::ALL, step, Arming::ALL]
        );
        assert_eq!(
            vcpu.if_ops.into_inner().unwrap(),
            [(true, BP), (false, BP), (true, BP), (false, BP)]
        );
    }

    #[test]
    fn without_blockirq_a_step_over_masks_if_and_gives_it_back() {
        let control = Arc::new(VcpuControl::new(1));
        let mut vcpu = FakeVcpu::new(
            &control,
            vec![
                debug(BP, 1),
                debug(BP + 4, DR6_BS),
                Ok(ExitEvent::Continue),
                debug(BP, 1),
                debug(BP + 4, DR6_BS),
            ],
        );
        vcpu.caps = StepCaps {
            block_irq: false,
            inject_db: true,
        };
        let (stop, hits, notices) = run_fake(&control, &mut vcpu, HookAction::Continue);
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        // Two calls, two hooks; each step without KVM_GUESTDBG_BLOCKIRQ, IF cleared
        // before it and given back after it.
        assert_eq!(hits, vec![(0, BP), (0, BP)]);
        assert!(notices.is_empty());
        let step = Arming::step_over_unblocked(0);
        assert!(!step.block_irq);
        assert_two_masked_steps(vcpu, step);
    }

    #[test]
    fn without_blockirq_an_instruction_that_sets_if_itself_owes_nothing_back() {
        for mask in [IfMask::ClearedForGood, IfMask::Untouched] {
            let control = Arc::new(VcpuControl::new(1));
            let mut vcpu = FakeVcpu::new(&control, vec![debug(BP, 1), debug(BP + 1, DR6_BS)]);
            vcpu.caps.block_irq = false;
            vcpu.if_mask = mask;
            let (_, hits, _) = run_fake(&control, &mut vcpu, HookAction::Continue);
            assert_eq!(hits.len(), 1);
            // Cleared (or not) before the step; nothing given back after it.
            let cleared: Vec<(bool, u64)> = if mask == IfMask::Untouched {
                vec![]
            } else {
                vec![(true, BP)]
            };
            assert_eq!(vcpu.if_ops.into_inner().unwrap(), cleared, "{mask:?}");
        }
    }

    #[test]
    fn without_blockirq_a_step_cut_short_runs_the_hook_once() {
        let control = Arc::new(VcpuControl::new(1));
        let handler = 0xffff_ffff_81e0_1500;
        let mut vcpu = FakeVcpu::new(
            &control,
            vec![
                debug(BP, 1),
                // An NMI first: the step ends at its handler, BP's instruction not run.
                debug(handler, DR6_BS),
                Ok(ExitEvent::Continue),
                // The handler returns to BP: the same call.
                debug(BP, 1),
                debug(BP + 4, DR6_BS),
            ],
        );
        vcpu.caps.block_irq = false;
        vcpu.step_ends = Mutex::new(VecDeque::from([StepEnd::Interrupted]));
        let (stop, hits, notices) = run_fake(&control, &mut vcpu, HookAction::Continue);
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(hits, vec![(0, BP)]);
        assert_eq!(
            notices,
            vec![VcpuNotice::StepInterrupted { vcpu: 0, slot: 0 }]
        );
        let step = Arming::step_over_unblocked(0);
        assert_two_masked_steps(vcpu, step);
    }

    #[test]
    fn a_foreign_debug_exception_is_reinjected_not_dropped() {
        let control = Arc::new(VcpuControl::new(1));
        // The guest's own TF single step at 0x1234, between two hits of BP (the second
        // one's step is ours, not the guest's).
        let mut vcpu = FakeVcpu::new(
            &control,
            vec![
                debug(BP, 1),
                debug(BP + 5, DR6_BS),
                debug(0x1234, DR6_BS),
                debug(BP, 1),
                debug(BP + 5, DR6_BS),
            ],
        );
        let (stop, hits, notices) = run_fake(&control, &mut vcpu, HookAction::Continue);
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(hits, vec![(0, BP), (0, BP)]);
        assert_eq!(
            notices,
            vec![VcpuNotice::ForeignDebug {
                vcpu: 0,
                pc: 0x1234,
                dr6: DR6_BS,
                fate: DebugFate::Reinjected,
            }]
        );
        assert_eq!(vcpu.injected.into_inner().unwrap(), [(DR6_BS, Arming::ALL)]);

        // Without KVM_GUESTDBG_INJECT_DB it is dropped, and said so.
        let control = Arc::new(VcpuControl::new(1));
        let mut vcpu = FakeVcpu::new(&control, vec![debug(0x1234, DR6_BS)]);
        vcpu.caps.inject_db = false;
        let (_, _, notices) = run_fake(&control, &mut vcpu, HookAction::Continue);
        assert_eq!(
            notices,
            vec![VcpuNotice::ForeignDebug {
                vcpu: 0,
                pc: 0x1234,
                dr6: DR6_BS,
                fate: DebugFate::Dropped,
            }]
        );
        assert!(vcpu.injected.into_inner().unwrap().is_empty());
    }

    #[test]
    fn a_held_vcpu_waits_for_its_release() {
        let control = Arc::new(VcpuControl::new(1));
        let releaser = {
            let c = control.clone();
            std::thread::spawn(move || {
                while !c.is_held(0) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(30));
                c.release(0);
            })
        };
        let t = Instant::now();
        let (stop, hits, notices, _) = run_script(
            &control,
            vec![debug(BP, 1), debug(BP + 5, DR6_BS)],
            HookAction::Hold {
                max: Duration::from_secs(30),
            },
        );
        releaser.join().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(hits.len(), 1);
        assert!(notices.is_empty());
    }

    #[test]
    fn an_unreleased_hold_times_out_and_says_so() {
        let control = Arc::new(VcpuControl::new(1));
        let (stop, _, notices, _) = run_script(
            &control,
            vec![debug(BP, 1), debug(BP + 5, DR6_BS)],
            HookAction::Hold {
                max: Duration::from_millis(10),
            },
        );
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(notices, vec![VcpuNotice::HoldTimedOut { vcpu: 0, slot: 0 }]);
    }

    #[test]
    fn only_a_stop_longer_than_a_second_tells_the_guest() {
        assert!(!tells_guest_paused(Duration::ZERO));
        assert!(!tells_guest_paused(Duration::from_millis(30)));
        assert!(!tells_guest_paused(Duration::from_secs(1)));
        assert!(tells_guest_paused(
            Duration::from_secs(1) + Duration::from_nanos(1)
        ));
        assert!(tells_guest_paused(Duration::from_secs(20)));
    }

    /// A hold of `hold` (unreleased: it ends at its limit) at one breakpoint, on a vCPU
    /// whose `KVM_KVMCLOCK_CTRL` fails with `errno`: how the loop ended and how often it
    /// called `KVM_KVMCLOCK_CTRL`.
    fn hold_once(hold: Duration, errno: Option<i32>) -> (VcpuStop, usize, Vec<Arming>) {
        let control = Arc::new(VcpuControl::new(1));
        let mut vcpu = FakeVcpu::new(&control, vec![debug(BP, 1), debug(BP + 5, DR6_BS)]);
        vcpu.kvmclock_errno = errno;
        let (stop, hits, _) = run_fake(&control, &mut vcpu, HookAction::Hold { max: hold });
        assert_eq!(hits, vec![(0, BP)]);
        (
            stop,
            vcpu.kvmclock_calls.load(Ordering::SeqCst),
            vcpu.armings.into_inner().unwrap(),
        )
    }

    #[test]
    fn a_hold_longer_than_a_second_tells_the_guest_it_was_paused() {
        let t = Instant::now();
        let (stop, calls, armings) = hold_once(Duration::from_millis(1100), None);
        assert!(t.elapsed() >= Duration::from_millis(1100));
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(calls, 1);
        assert_eq!(armings, [Arming::ALL, Arming::step_over(0), Arming::ALL]);
    }

    #[test]
    fn a_short_hold_does_not_tell_the_guest() {
        let (stop, calls, _) = hold_once(Duration::from_millis(30), None);
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(calls, 0);
    }

    #[test]
    fn a_guest_without_kvmclock_is_held_and_goes_on() {
        // KVM_KVMCLOCK_CTRL fails with EINVAL where the guest has no kvmclock: logged,
        // never fatal, and the breakpoint is stepped over as usual.
        let (stop, calls, armings) = hold_once(Duration::from_millis(1100), Some(libc::EINVAL));
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(calls, 1);
        assert_eq!(armings, [Arming::ALL, Arming::step_over(0), Arming::ALL]);
    }

    #[test]
    fn a_stop_during_a_hold_ends_the_loop_with_its_cause() {
        let control = Arc::new(VcpuControl::new(1));
        let stopper = {
            let c = control.clone();
            std::thread::spawn(move || {
                while !c.is_held(0) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                c.request_stop(StopCause::Timeout);
            })
        };
        let (stop, _, _, _) = run_script(
            &control,
            vec![debug(BP, 1)],
            HookAction::Hold {
                max: Duration::from_secs(30),
            },
        );
        stopper.join().unwrap();
        assert_eq!(stop, VcpuStop::Requested(StopCause::Timeout));
    }

    #[test]
    fn a_sample_request_records_each_rip_once_after_the_kick() {
        let control = Arc::new(VcpuControl::new(1));
        // A request made before the loop starts is not answered.
        control.request_sample();
        let (stop, _, _, _) = run_script(
            &control,
            vec![
                Ok(ExitEvent::Continue),
                Err(SAMPLE_THEN_EINTR),
                Ok(ExitEvent::Continue),
                Ok(ExitEvent::Continue),
                Err(SAMPLE_THEN_EINTR),
            ],
            HookAction::Continue,
        );
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        // The fake's RIP is 0x1000 + the exits left: 3 after the first kick, 0 after
        // the second; the continues in between record nothing more.
        assert_eq!(control.samples(0), vec![0x1003, 0x1000]);
    }

    #[test]
    fn fatal_exits_end_the_loop_with_their_reason() {
        let control = Arc::new(VcpuControl::new(1));
        let (stop, _, _, _) = run_script(
            &control,
            vec![Ok(ExitEvent::Continue), Ok(ExitEvent::TripleFault)],
            HookAction::Continue,
        );
        assert_eq!(
            stop,
            VcpuStop::Fatal(FatalExit::TripleFault("fake registers".into()))
        );
        let (stop, _, _, _) = run_script(&control, vec![Err(libc::EFAULT)], HookAction::Continue);
        assert_eq!(
            stop,
            VcpuStop::Fatal(FatalExit::Kvm {
                what: "KVM_RUN",
                errno: libc::EFAULT
            })
        );
    }
}
