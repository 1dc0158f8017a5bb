//! The verdict of a cross-kernel handover (kernel A hands over to a different kernel B),
//! from what luo-vmm saw and what the agent reported, never from the kernels' wording:
//!
//! - `crashed`: B panicked, oopsed or warned, a vCPU died, or the guest hung;
//! - `compatible`: the handover verified ([`crate::judge::verified`]: whole, no preserved
//!   page written, the invariants held, every CPU up, the agent's data back in B);
//! - `reused`: B refused A's state and then wrote preserved file state nobody retrieved
//!   (the leak check, as for `--inject`: "leak, never reuse" broken);
//! - `rejected`: B refused A's state cleanly: the agent's LUO call that failed with its
//!   errno, B's LUO/KHO lines, and a clean leak check;
//! - `accepted`: B took the state but the handover is not verified (the agent got bytes
//!   not its own, or luo-vmm could not prove the handover): the reason says which.
//!
//! The evidence is [`crate::judge::injection`]'s (one judge of refusals, reuse and
//! crashes); this module only adds the `verified` rule on top.

use serde::{Deserialize, Serialize};

use crate::judge::injection::{InjectionOutcome, InjectionVerdict};

/// The verdict of one cross-kernel handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrossVerdict {
    /// The handover verified.
    Compatible,
    /// B refused A's state cleanly (leak check clean).
    Rejected,
    /// B wrote preserved memory nobody retrieved after refusing.
    Reused,
    /// Panic, oops, WARN, triple fault or hang.
    Crashed,
    /// B took the state, but the handover did not verify.
    Accepted,
}

impl CrossVerdict {
    /// Every verdict, in the order the matrix's legend lists them.
    pub const ALL: [Self; 5] = [
        Self::Compatible,
        Self::Rejected,
        Self::Reused,
        Self::Crashed,
        Self::Accepted,
    ];

    /// `compatible`, `rejected`, `reused`, `crashed`, `accepted`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Compatible => "compatible",
            Self::Rejected => "rejected",
            Self::Reused => "reused",
            Self::Crashed => "crashed",
            Self::Accepted => "accepted",
        }
    }

    /// The verdict called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// The judged outcome of one cross-kernel handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrossOutcome {
    /// The verdict.
    pub verdict: CrossVerdict,
    /// One line: why.
    pub reason: String,
    /// The evidence: the agent's failed call, what it received, B's LUO/KHO lines, the leak
    /// check.
    pub evidence: InjectionOutcome,
}

/// Judges one cross-kernel handover from the round's `verified` and the evidence judged as
/// for an injected round. Pure.
pub(crate) fn judge(verified: bool, evidence: InjectionOutcome) -> CrossOutcome {
    let (verdict, reason) = match evidence.verdict {
        InjectionVerdict::Crashed => (CrossVerdict::Crashed, evidence.reason.clone()),
        _ if verified => (
            CrossVerdict::Compatible,
            "the handover verified: the agent's data came back in the next kernel and no preserved page was written".to_owned(),
        ),
        InjectionVerdict::Reused => (CrossVerdict::Reused, evidence.reason.clone()),
        InjectionVerdict::Rejected => {
            let leak = match &evidence.leak {
                Some(l) if l.pages_checked > 0 => format!(
                    "; leak check clean: 0 of {} pages of preserved file state written",
                    l.pages_checked
                ),
                Some(_) => "; the leak check covered no page".to_owned(),
                None => "; no leak check".to_owned(),
            };
            (CrossVerdict::Rejected, format!("{}{leak}", evidence.reason))
        }
        InjectionVerdict::Accepted => (
            CrossVerdict::Accepted,
            format!("{}, but the handover did not verify", evidence.reason),
        ),
    };
    CrossOutcome {
        verdict,
        reason,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::injection::{LeakCheck, Received};

    fn evidence(verdict: InjectionVerdict, leak: Option<(u64, u64)>) -> InjectionOutcome {
        InjectionOutcome {
            verdict,
            reason: format!("because {}", verdict.name()),
            agent_step: None,
            agent_errno: 0,
            received: Some(Received::RightData),
            kernel: vec![],
            leak: leak.map(|(checked, written)| LeakCheck {
                pages_checked: checked,
                written_at: vec![],
                written,
                records_written: vec![],
                pressure_bytes: 40 << 20,
            }),
        }
    }

    #[test]
    fn verified_is_compatible_unless_it_crashed() {
        let ok = judge(true, evidence(InjectionVerdict::Accepted, None));
        assert_eq!(ok.verdict, CrossVerdict::Compatible);
        let crash = judge(true, evidence(InjectionVerdict::Crashed, None));
        assert_eq!(crash.verdict, CrossVerdict::Crashed);
        assert_eq!(crash.reason, "because crashed");
        let not = judge(false, evidence(InjectionVerdict::Accepted, None));
        assert_eq!(not.verdict, CrossVerdict::Accepted);
        assert_eq!(
            not.reason,
            "because accepted, but the handover did not verify"
        );
    }

    #[test]
    fn refusals_say_what_the_leak_check_covered() {
        let clean = judge(false, evidence(InjectionVerdict::Rejected, Some((259, 0))));
        assert_eq!(clean.verdict, CrossVerdict::Rejected);
        assert_eq!(
            clean.reason,
            "because rejected; leak check clean: 0 of 259 pages of preserved file state written"
        );
        let empty = judge(false, evidence(InjectionVerdict::Rejected, Some((0, 0))));
        assert!(empty.reason.ends_with("the leak check covered no page"));
        let none = judge(false, evidence(InjectionVerdict::Rejected, None));
        assert!(none.reason.ends_with("; no leak check"));
        let reused = judge(false, evidence(InjectionVerdict::Reused, Some((518, 435))));
        assert_eq!(reused.verdict, CrossVerdict::Reused);
    }

    #[test]
    fn names_round_trip() {
        for v in CrossVerdict::ALL {
            assert_eq!(CrossVerdict::from_name(v.name()), Some(v));
        }
        assert_eq!(CrossVerdict::from_name("fine"), None);
    }
}
