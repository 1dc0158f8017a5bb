//! The one rule for "handover verified", whoever asks: a `handover` or `selftest` round in
//! the report, or a scenario run's `handover verified` condition.

/// What one handover showed, check by check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HandoverChecks {
    /// Every mark came in order, the preserved set was watched and none of its pages was
    /// written between point-of-no-return and next-kernel-start, and the digests (where
    /// asked) matched: `luo_handover::timeline::HandoverReport::intact`.
    pub intact: bool,
    /// Everything luo-vmm read of the handover (the next kernel's KHO/LUO state, the dirty
    /// log, the digests, an injection) was read without error.
    pub read_cleanly: bool,
    /// Every invariant of the handed-over state held (`luo_handover::invariants`).
    pub invariants_held: bool,
    /// The next kernel brought every vCPU up.
    pub cpus_up: bool,
    /// The workload's own side succeeded: the agent checked its data, or the stage-2
    /// selftest passed, or a scenario's stage-2 steps all succeeded without kernel trouble.
    pub workload_ok: bool,
}

impl HandoverChecks {
    /// Verified: every check holds.
    pub fn verified(&self) -> bool {
        let HandoverChecks {
            intact,
            read_cleanly,
            invariants_held,
            cpus_up,
            workload_ok,
        } = *self;
        intact && read_cleanly && invariants_held && cpus_up && workload_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_is_needed() {
        let all = HandoverChecks {
            intact: true,
            read_cleanly: true,
            invariants_held: true,
            cpus_up: true,
            workload_ok: true,
        };
        assert!(all.verified());
        for one in [
            HandoverChecks {
                intact: false,
                ..all
            },
            HandoverChecks {
                read_cleanly: false,
                ..all
            },
            HandoverChecks {
                invariants_held: false,
                ..all
            },
            HandoverChecks {
                cpus_up: false,
                ..all
            },
            HandoverChecks {
                workload_ok: false,
                ..all
            },
        ] {
            assert!(!one.verified(), "{one:?}");
        }
    }
}
