//! Stepping over a hardware breakpoint, as a pure state machine over debug exits.
//!
//! A hit breakpoint must not fire again when the vCPU resumes at the same instruction, and
//! the emulating KVM does not honour RFLAGS.RF. So: at a hit, the hook runs with the vCPU
//! stopped, then that breakpoint is disarmed and one instruction single-stepped (with
//! interrupts blocked, so the step lands on the next instruction, not in a handler); the
//! single-step exit re-arms every breakpoint. The machine below decides; the run loop
//! applies its [`Arming`]s through `KVM_SET_GUEST_DEBUG`.

use crate::machine::debug::{slot_of, DR6_BS};

/// How the debug registers must be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arming {
    /// The breakpoint slot left disarmed, if any.
    pub skip: Option<usize>,
    /// Single-step the next instruction.
    pub single_step: bool,
}

impl Arming {
    /// Every breakpoint armed, no stepping.
    pub const ALL: Arming = Arming {
        skip: None,
        single_step: false,
    };

    /// Every breakpoint but `slot` armed, one instruction stepped.
    pub const fn step_over(slot: usize) -> Arming {
        Arming {
            skip: Some(slot),
            single_step: true,
        }
    }
}

/// What a debug exit asks the run loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DebugAction {
    /// Breakpoint `slot` was hit at `pc`: run its hook, then apply `then` (step over it).
    Hit {
        /// Index into the breakpoint addresses.
        slot: usize,
        /// Guest RIP.
        pc: u64,
        /// The arming that steps over it.
        then: Arming,
    },
    /// The step over a breakpoint is done: apply this arming (every breakpoint again).
    Rearm(Arming),
    /// A debug exit at `pc` that is none of ours.
    Foreign {
        /// Guest RIP.
        pc: u64,
    },
    /// A single-step exit with nothing to do.
    Ignore,
}

/// The step-over state of one vCPU.
#[derive(Debug, Clone)]
pub(crate) struct Stepper {
    addrs: Vec<u64>,
    /// The slot being stepped over.
    stepping: Option<usize>,
}

impl Stepper {
    /// A stepper for breakpoints at `addrs` (guest-virtual, at most four are used).
    pub fn new(addrs: Vec<u64>) -> Self {
        Stepper {
            addrs,
            stepping: None,
        }
    }

    /// The breakpoint addresses.
    pub fn addrs(&self) -> &[u64] {
        &self.addrs
    }

    /// The arming to apply before the first `KVM_RUN`; `None` with no breakpoints.
    pub fn initial(&self) -> Option<Arming> {
        (!self.addrs.is_empty()).then_some(Arming::ALL)
    }

    /// The next state for a `KVM_EXIT_DEBUG` at `pc` with `dr6`.
    pub fn on_debug(&mut self, pc: u64, dr6: u64) -> DebugAction {
        if self.stepping.take().is_some() {
            // One instruction past the breakpoint (whatever DR6 says): arm it again. If
            // that instruction is itself a breakpoint, it fires on the next entry.
            return DebugAction::Rearm(Arming::ALL);
        }
        if let Some(slot) = slot_of(&self.addrs, pc) {
            self.stepping = Some(slot);
            return DebugAction::Hit {
                slot,
                pc,
                then: Arming::step_over(slot),
            };
        }
        if dr6 & DR6_BS != 0 {
            DebugAction::Ignore
        } else {
            DebugAction::Foreign { pc }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0xffff_ffff_8100_1000;
    const B: u64 = 0xffff_ffff_8100_2000;

    #[test]
    fn hit_step_rearm() {
        let mut s = Stepper::new(vec![A, B]);
        assert_eq!(s.initial(), Some(Arming::ALL));
        assert_eq!(
            s.on_debug(B, 0b10),
            DebugAction::Hit {
                slot: 1,
                pc: B,
                then: Arming::step_over(1)
            }
        );
        assert_eq!(s.on_debug(B + 3, DR6_BS), DebugAction::Rearm(Arming::ALL));
        // The same breakpoint again (a loop): hit again, not swallowed.
        assert!(matches!(
            s.on_debug(B, 0b10),
            DebugAction::Hit { slot: 1, .. }
        ));
    }

    #[test]
    fn a_breakpoint_right_after_the_stepped_one_fires_after_the_rearm() {
        let mut s = Stepper::new(vec![A, A + 1]);
        assert!(matches!(s.on_debug(A, 1), DebugAction::Hit { slot: 0, .. }));
        // The step lands on the second breakpoint's address: first re-arm...
        assert_eq!(s.on_debug(A + 1, DR6_BS), DebugAction::Rearm(Arming::ALL));
        // ...then the next entry hits it.
        assert!(matches!(
            s.on_debug(A + 1, 0b10),
            DebugAction::Hit { slot: 1, .. }
        ));
    }

    #[test]
    fn foreign_exits_and_stray_steps() {
        let mut s = Stepper::new(vec![A]);
        assert_eq!(s.on_debug(0x1234, 0), DebugAction::Foreign { pc: 0x1234 });
        assert_eq!(s.on_debug(0x1234, DR6_BS), DebugAction::Ignore);
        assert_eq!(Stepper::new(vec![]).initial(), None);
    }
}
