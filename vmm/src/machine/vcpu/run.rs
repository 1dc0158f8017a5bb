//! The vCPU run loop: `KVM_RUN`, each exit mapped to an [`ExitEvent`], breakpoints
//! stepped over by the [`Stepper`], hooks that may hold the vCPU, and the reason the loop
//! ended. Generic over [`VcpuBackend`], so the tests drive it with scripted fake exits.

use std::time::Duration;

use luo_devices::PioBus;

use super::control::{HoldEnd, StopCause, VcpuControl};
use super::stepper::{Arming, DebugAction, Stepper};
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

/// Something a vCPU saw that the VMM should hear about while it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VcpuNotice {
    /// A debug exit at `pc` that is no breakpoint of ours.
    ForeignDebug {
        /// The vCPU.
        vcpu: u8,
        /// Guest RIP.
        pc: u64,
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
    /// Registers and bytes at RIP, for a fatal exit.
    fn dump(&self) -> String;
    /// The current RIP, if KVM gives the registers.
    fn rip(&self) -> Option<u64>;
}

/// Where the loop reports to and what it asks: the hook at a breakpoint, notices.
pub(crate) struct LoopHooks<'a, V> {
    /// Runs at breakpoint `slot` hit at `pc`, with the vCPU stopped.
    pub on_hit: &'a mut dyn FnMut(&mut V, usize, u64) -> HookAction,
    /// Hears notices.
    pub notice: &'a dyn Fn(VcpuNotice),
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
    loop {
        if let Some(cause) = control.stop_requested() {
            return VcpuStop::Requested(cause);
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
                    DebugAction::Hit { slot, pc, then } => {
                        if let HookAction::Hold { max } = (hooks.on_hit)(vcpu, slot, pc) {
                            match control.wait_released(id, max) {
                                HoldEnd::Released => {}
                                HoldEnd::TimedOut => {
                                    (hooks.notice)(VcpuNotice::HoldTimedOut { vcpu: id, slot })
                                }
                                HoldEnd::Stopped(cause) => return VcpuStop::Requested(cause),
                            }
                        }
                        if let Err(stop) = arm(vcpu, stepper, then) {
                            return stop;
                        }
                    }
                    DebugAction::Rearm(a) => {
                        if let Err(stop) = arm(vcpu, stepper, a) {
                            return stop;
                        }
                    }
                    DebugAction::Foreign { pc } => {
                        (hooks.notice)(VcpuNotice::ForeignDebug { vcpu: id, pc })
                    }
                    DebugAction::Ignore => {}
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
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use crate::machine::debug::DR6_BS;

    const BP: u64 = 0xffff_ffff_8100_1000;
    /// A scripted exit: the VMM requests a RIP sample and kicks the vCPU (EINTR).
    const SAMPLE_THEN_EINTR: i32 = -1;

    /// A vCPU whose exits come from a script; when the script ends it asks the VMM to
    /// stop (as a reset would) and returns EINTR (as a kick would).
    struct FakeVcpu {
        exits: VecDeque<Result<ExitEvent, i32>>,
        armings: Mutex<Vec<Arming>>,
        control: Arc<VcpuControl>,
    }

    impl FakeVcpu {
        fn new(control: &Arc<VcpuControl>, exits: Vec<Result<ExitEvent, i32>>) -> Self {
            FakeVcpu {
                exits: exits.into(),
                armings: Mutex::new(Vec::new()),
                control: control.clone(),
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
        fn dump(&self) -> String {
            "fake registers".into()
        }
        fn rip(&self) -> Option<u64> {
            Some(0x1000 + self.exits.len() as u64)
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
        let mut stepper = Stepper::new(vec![BP]);
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
        let stop = run_loop(
            &mut vcpu,
            &PioBus::new(),
            control,
            &mut stepper,
            LoopHooks {
                on_hit: &mut on_hit,
                notice: &notice,
            },
        );
        (
            stop,
            hits.into_inner().unwrap(),
            notices.into_inner().unwrap(),
            vcpu.armings.into_inner().unwrap(),
        )
    }

    fn debug(pc: u64, dr6: u64) -> Result<ExitEvent, i32> {
        Ok(ExitEvent::Debug { pc, dr6 })
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
                debug(0x1234, 0),
            ],
            HookAction::Continue,
        );
        assert_eq!(stop, VcpuStop::Requested(StopCause::Reset));
        assert_eq!(hits, vec![(0, BP)]);
        assert_eq!(
            notices,
            vec![VcpuNotice::ForeignDebug {
                vcpu: 0,
                pc: 0x1234
            }]
        );
        assert_eq!(armings, [Arming::ALL, Arming::step_over(0), Arming::ALL]);
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
