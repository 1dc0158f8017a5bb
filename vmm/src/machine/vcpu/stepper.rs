//! Stepping over a hardware breakpoint, and giving the guest its own debug exceptions
//! back, as a pure state machine over debug exits.
//!
//! A hit breakpoint must not fire again when the vCPU resumes at the same instruction, and
//! the emulating KVM does not honour RFLAGS.RF. So: at a hit, the hook runs with the vCPU
//! stopped, then that breakpoint is disarmed and one instruction single-stepped with
//! interrupts blocked, so the step lands on the next instruction, not in a handler; the
//! single-step exit re-arms every breakpoint. The machine below decides; the run loop
//! applies its [`Arming`]s through `KVM_SET_GUEST_DEBUG`.
//!
//! Interrupts are blocked by KVM (`KVM_GUESTDBG_BLOCKIRQ`, Linux 5.15+) where it can;
//! elsewhere by clearing the guest's RFLAGS.IF for the step and giving it back after, as
//! Linux's kprobes single-step (the run loop asks the vCPU, which knows the instruction:
//! [`crate::machine::debug::if_step`]). If an NMI or exception still cuts such a step
//! short (the vCPU stands at a handler, the breakpoint's instruction not yet run), IF is
//! given back in the handler's frame and the next hit of that breakpoint is the same call
//! coming back: it is stepped over again without running its hook a second time.
//!
//! With breakpoints armed (`KVM_GUESTDBG_USE_HW_BP`) KVM sends every #DB of the guest to
//! luo-vmm, the guest's own too (its TF single step, ICEBP). One that is neither a
//! breakpoint of ours nor our step is given back to the guest (`KVM_GUESTDBG_INJECT_DB`)
//! instead of being dropped.

use crate::machine::debug::slot_of;

/// What KVM offers the stepper (from [`crate::machine::host::Capabilities`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepCaps {
    /// `KVM_GUESTDBG_BLOCKIRQ`: KVM injects no interrupt during a step.
    pub block_irq: bool,
    /// `KVM_GUESTDBG_INJECT_DB`: a #DB can be queued for the guest.
    pub inject_db: bool,
}

impl StepCaps {
    /// Everything a KVM of Linux 5.15 or later offers.
    #[cfg(test)]
    pub const FULL: StepCaps = StepCaps {
        block_irq: true,
        inject_db: true,
    };
}

/// How the debug registers must be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arming {
    /// The breakpoint slot left disarmed, if any.
    pub skip: Option<usize>,
    /// Single-step the next instruction.
    pub single_step: bool,
    /// With `single_step`: KVM blocks interrupts (`KVM_GUESTDBG_BLOCKIRQ`).
    pub block_irq: bool,
}

impl Arming {
    /// Every breakpoint armed, no stepping.
    pub const ALL: Arming = Arming {
        skip: None,
        single_step: false,
        block_irq: false,
    };

    /// Every breakpoint but `slot` armed, one instruction stepped with KVM blocking
    /// interrupts.
    pub const fn step_over(slot: usize) -> Arming {
        Arming {
            skip: Some(slot),
            single_step: true,
            block_irq: true,
        }
    }

    /// As [`Arming::step_over`], for a KVM without `KVM_GUESTDBG_BLOCKIRQ`: interrupts
    /// are masked through RFLAGS.IF instead ([`DebugAction::Hit::mask_if`]).
    pub const fn step_over_unblocked(slot: usize) -> Arming {
        Arming {
            skip: Some(slot),
            single_step: true,
            block_irq: false,
        }
    }
}

/// What the vCPU did to RFLAGS.IF before a step over a breakpoint, when asked to mask
/// interrupts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfMask {
    /// IF was set and is now clear; it is owed back after the step.
    Cleared,
    /// IF was set and is now clear; the instruction sets IF itself (`cli`, `sti`, `popf`,
    /// `iret`), so nothing is owed.
    ClearedForGood,
    /// Untouched: IF was already clear, or the instruction must see IF as it is (`pushf`,
    /// `hlt`, `int n`; [`crate::machine::debug::IfStep::Unmasked`]).
    Untouched,
}

/// How a step over a breakpoint whose IF was [`IfMask::Cleared`] ended, as the vCPU
/// found it when it gave IF back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepEnd {
    /// The instruction ran; IF was set again in RFLAGS.
    Completed,
    /// An NMI or exception came first: the vCPU stands at its handler, and IF was set in
    /// the frame it returns through, to the breakpoint's instruction.
    Interrupted,
}

/// What a debug exit asks the run loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DebugAction {
    /// Breakpoint `slot` was hit at `pc`: run its hook, then step over it (`then`;
    /// clearing RFLAGS.IF first when `mask_if`, and telling [`Stepper::masked`] what
    /// was done).
    Hit {
        /// Index into the breakpoint addresses.
        slot: usize,
        /// Guest RIP.
        pc: u64,
        /// The arming that steps over it.
        then: Arming,
        /// Mask interrupts through RFLAGS.IF for the step (no `KVM_GUESTDBG_BLOCKIRQ`).
        mask_if: bool,
    },
    /// The call whose step over `slot` an NMI or exception cut short has come back to
    /// the breakpoint: step over it as for [`DebugAction::Hit`], without the hook.
    Resume {
        /// Index into the breakpoint addresses.
        slot: usize,
        /// Guest RIP.
        pc: u64,
        /// The arming that steps over it.
        then: Arming,
        /// As for [`DebugAction::Hit`].
        mask_if: bool,
    },
    /// The step over a breakpoint is done: apply `arming` (every breakpoint again), after
    /// giving back the IF cleared for the step when `give_back_if` names the breakpoint's
    /// address (then tell [`Stepper::interrupted`] if the vCPU found the step cut short).
    Rearm {
        /// Every breakpoint.
        arming: Arming,
        /// The breakpoint's address, when IF is owed back.
        give_back_if: Option<u64>,
    },
    /// A debug exception of the guest's own at `pc` (`dr6` as KVM reported it): give it
    /// back (`KVM_GUESTDBG_INJECT_DB`, the guest's DR6 set from `dr6`) with `arming`.
    Reinject {
        /// Guest RIP.
        pc: u64,
        /// DR6 of the exit.
        dr6: u64,
        /// The arming to apply with the injection (the current one).
        arming: Arming,
    },
    /// A debug exception of the guest's own that KVM cannot give back (no
    /// `KVM_GUESTDBG_INJECT_DB`): dropped, and said so.
    Foreign {
        /// Guest RIP.
        pc: u64,
        /// DR6 of the exit.
        dr6: u64,
    },
}

/// The step in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stepping {
    /// The slot being stepped over.
    slot: usize,
    /// RFLAGS.IF is owed back after the step.
    owes_if: bool,
}

/// The step-over state of one vCPU.
#[derive(Debug, Clone)]
pub(crate) struct Stepper {
    addrs: Vec<u64>,
    caps: StepCaps,
    /// The step in progress.
    stepping: Option<Stepping>,
    /// The slot whose step was cut short: its next hit is the same call coming back.
    resume: Option<usize>,
    /// The slot of the last step, until [`Stepper::interrupted`] may name it.
    last_step: Option<usize>,
}

impl Stepper {
    /// A stepper for breakpoints at `addrs` (guest-virtual, at most four are used) on a
    /// KVM that offers everything ([`StepCaps::FULL`]).
    #[cfg(test)]
    pub fn new(addrs: Vec<u64>) -> Self {
        Self::with_caps(addrs, StepCaps::FULL)
    }

    /// A stepper for breakpoints at `addrs` on a KVM that offers `caps`.
    pub fn with_caps(addrs: Vec<u64>, caps: StepCaps) -> Self {
        Stepper {
            addrs,
            caps,
            stepping: None,
            resume: None,
            last_step: None,
        }
    }

    /// Whether no step over a breakpoint is in progress: the vCPU is at an instruction
    /// boundary with its own RFLAGS.IF, where it may be paused and saved.
    pub fn is_idle(&self) -> bool {
        self.stepping.is_none()
    }

    /// The breakpoint addresses.
    pub fn addrs(&self) -> &[u64] {
        &self.addrs
    }

    /// The arming to apply before the first `KVM_RUN`; `None` with no breakpoints.
    pub fn initial(&self) -> Option<Arming> {
        (!self.addrs.is_empty()).then_some(Arming::ALL)
    }

    /// The arming that steps over `slot` on this KVM.
    fn step_over(&self, slot: usize) -> Arming {
        if self.caps.block_irq {
            Arming::step_over(slot)
        } else {
            Arming::step_over_unblocked(slot)
        }
    }

    /// The next state for a `KVM_EXIT_DEBUG` at `pc` with `dr6`.
    pub fn on_debug(&mut self, pc: u64, dr6: u64) -> DebugAction {
        if let Some(step) = self.stepping.take() {
            // One instruction past the breakpoint (whatever DR6 says): arm it again. If
            // that instruction is itself a breakpoint, it fires on the next entry.
            self.last_step = Some(step.slot);
            return DebugAction::Rearm {
                arming: Arming::ALL,
                give_back_if: step.owes_if.then(|| self.addrs[step.slot]),
            };
        }
        self.last_step = None;
        if let Some(slot) = slot_of(&self.addrs, pc) {
            self.stepping = Some(Stepping {
                slot,
                owes_if: false,
            });
            let (then, mask_if) = (self.step_over(slot), !self.caps.block_irq);
            if self.resume == Some(slot) {
                self.resume = None;
                return DebugAction::Resume {
                    slot,
                    pc,
                    then,
                    mask_if,
                };
            }
            return DebugAction::Hit {
                slot,
                pc,
                then,
                mask_if,
            };
        }
        // Neither a breakpoint of ours nor our step: the guest's own #DB (its TF, an
        // ICEBP); with our breakpoints armed KVM hands every #DB to us.
        if self.caps.inject_db {
            DebugAction::Reinject {
                pc,
                dr6,
                arming: Arming::ALL,
            }
        } else {
            DebugAction::Foreign { pc, dr6 }
        }
    }

    /// What the vCPU did to RFLAGS.IF for the step just armed (after a
    /// [`DebugAction::Hit`] or [`DebugAction::Resume`] with `mask_if`).
    pub fn masked(&mut self, mask: IfMask) {
        if let Some(step) = &mut self.stepping {
            step.owes_if = mask == IfMask::Cleared;
        }
    }

    /// The vCPU found the step just ended ([`DebugAction::Rearm`] with `give_back_if`)
    /// cut short by an NMI or exception: the next hit of that breakpoint is the same
    /// call coming back.
    pub fn interrupted(&mut self) {
        self.resume = self.last_step.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::debug::DR6_BS;

    const A: u64 = 0xffff_ffff_8100_1000;
    const B: u64 = 0xffff_ffff_8100_2000;
    /// A KVM before Linux 5.15: no BLOCKIRQ, INJECT_DB since 2.6.31.
    const OLD_KVM: StepCaps = StepCaps {
        block_irq: false,
        inject_db: true,
    };

    fn rearm(give_back_if: Option<u64>) -> DebugAction {
        DebugAction::Rearm {
            arming: Arming::ALL,
            give_back_if,
        }
    }

    #[test]
    fn hit_step_rearm() {
        let mut s = Stepper::new(vec![A, B]);
        assert_eq!(s.initial(), Some(Arming::ALL));
        assert_eq!(
            s.on_debug(B, 0b10),
            DebugAction::Hit {
                slot: 1,
                pc: B,
                then: Arming::step_over(1),
                mask_if: false,
            }
        );
        assert_eq!(s.on_debug(B + 3, DR6_BS), rearm(None));
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
        assert_eq!(s.on_debug(A + 1, DR6_BS), rearm(None));
        // ...then the next entry hits it.
        assert!(matches!(
            s.on_debug(A + 1, 0b10),
            DebugAction::Hit { slot: 1, .. }
        ));
    }

    #[test]
    fn without_blockirq_the_step_masks_if_and_gives_it_back() {
        let mut s = Stepper::with_caps(vec![A, B], OLD_KVM);
        assert_eq!(
            s.on_debug(A, 0b1),
            DebugAction::Hit {
                slot: 0,
                pc: A,
                then: Arming::step_over_unblocked(0),
                mask_if: true,
            }
        );
        assert!(!Arming::step_over_unblocked(0).block_irq);
        s.masked(IfMask::Cleared);
        // The step's end gives IF back for the breakpoint at A, then re-arms.
        assert_eq!(s.on_debug(A + 1, DR6_BS), rearm(Some(A)));
        // The same breakpoint again: a new call, hooked again.
        assert!(matches!(
            s.on_debug(A, 0b1),
            DebugAction::Hit { slot: 0, .. }
        ));
        // An instruction that sets IF itself (`cli`) owes nothing back; neither does one
        // stepped with IF untouched (`pushf`, or IF already clear).
        s.masked(IfMask::ClearedForGood);
        assert_eq!(s.on_debug(A + 1, DR6_BS), rearm(None));
        assert!(matches!(
            s.on_debug(B, 0b10),
            DebugAction::Hit { slot: 1, .. }
        ));
        s.masked(IfMask::Untouched);
        assert_eq!(s.on_debug(B + 4, DR6_BS), rearm(None));
    }

    #[test]
    fn a_step_cut_short_resumes_without_a_second_hook() {
        let mut s = Stepper::with_caps(vec![A], OLD_KVM);
        assert!(matches!(s.on_debug(A, 0b1), DebugAction::Hit { .. }));
        s.masked(IfMask::Cleared);
        // An NMI came first: the step ends at the handler's first instruction.
        assert_eq!(s.on_debug(0xffff_ffff_81e0_1500, DR6_BS), rearm(Some(A)));
        s.interrupted();
        // The handler returns to A: the same call, stepped over again, no hook.
        assert_eq!(
            s.on_debug(A, 0b1),
            DebugAction::Resume {
                slot: 0,
                pc: A,
                then: Arming::step_over_unblocked(0),
                mask_if: true,
            }
        );
        s.masked(IfMask::Cleared);
        assert_eq!(s.on_debug(A + 1, DR6_BS), rearm(Some(A)));
        // Completed this time; the next hit is a new call.
        assert!(matches!(s.on_debug(A, 0b1), DebugAction::Hit { .. }));
    }

    #[test]
    fn a_foreign_debug_exception_is_given_back_to_the_guest() {
        let mut s = Stepper::new(vec![A]);
        // The guest's own TF single step, and an ICEBP (no cause bit in DR6).
        assert_eq!(
            s.on_debug(0x1234, DR6_BS),
            DebugAction::Reinject {
                pc: 0x1234,
                dr6: DR6_BS,
                arming: Arming::ALL
            }
        );
        assert_eq!(
            s.on_debug(0x1234, 0),
            DebugAction::Reinject {
                pc: 0x1234,
                dr6: 0,
                arming: Arming::ALL
            }
        );
        // Between a hit and its step's end, the exit is the step, not the guest's.
        assert!(matches!(s.on_debug(A, 1), DebugAction::Hit { .. }));
        assert_eq!(s.on_debug(A + 5, DR6_BS), rearm(None));
        assert!(matches!(
            s.on_debug(0x5678, DR6_BS),
            DebugAction::Reinject { pc: 0x5678, .. }
        ));
        // Where KVM cannot inject, it is dropped and said so.
        let mut s = Stepper::with_caps(
            vec![A],
            StepCaps {
                block_irq: false,
                inject_db: false,
            },
        );
        assert_eq!(
            s.on_debug(0x1234, DR6_BS),
            DebugAction::Foreign {
                pc: 0x1234,
                dr6: DR6_BS
            }
        );
        assert_eq!(Stepper::new(vec![]).initial(), None);
    }
}
