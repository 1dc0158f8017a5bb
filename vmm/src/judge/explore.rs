//! The oracles of an `explore` trial (docs/explore.md), applied to what the run saw:
//! kernel trouble (oops, BUG, WARNING, panic, lockdep, list corruption, a vCPU's fatal
//! exit), a hang (the run stopped progressing: neither point-of-no-return nor the end of
//! the workload came within the trial's bound: a racing call that blocks until the kexec
//! is the fix at work and lets the reboot reach point-of-no-return, a deadlock does not),
//! the detector (the LUO records the outgoing kernel hands over at point-of-no-return
//! against what user space believes it preserved), and in stage 2 the data retrieved, a
//! session retrieved twice, and "leak, never reuse" (preserved memfd contents written
//! while no retrieval or finish accounts for them).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use luo_protocol::message::Action;

use crate::config::scenario::ActionPattern;
use crate::judge::scenario::{unaccounted_data_writes, RunFacts};

/// Which oracle spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Oracle {
    /// An oops, BUG, WARNING, panic, lockdep report, list corruption, or a vCPU's fatal
    /// exit (a triple fault).
    KernelTrouble,
    /// The run stopped progressing.
    Hang,
    /// The records handed over are not what user space believes.
    RecordsDiffer,
    /// Stage 2: a retrieved memfd's bytes or size are not what stage 1 wrote.
    Stage2Data,
    /// Stage 2: one session retrieved twice, both times with success (a file may be: LUO
    /// hands out the same file again, `luo_retrieve_file()` in kernel/liveupdate/luo_file.c).
    RetrievedTwice,
    /// Stage 2: preserved memfd contents written while neither a retrieval nor a finish
    /// accounts for them (`judge::scenario::unaccounted_data_writes`): after a failed
    /// restore, memory handed back instead of leaked.
    PreservedDataWritten,
}

impl fmt::Display for Oracle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Oracle::KernelTrouble => "kernel trouble",
            Oracle::Hang => "hang",
            Oracle::RecordsDiffer => "records differ",
            Oracle::Stage2Data => "stage-2 data",
            Oracle::RetrievedTwice => "retrieved twice",
            Oracle::PreservedDataWritten => "preserved data written",
        })
    }
}

/// What makes two findings the same: the oracle, where (the kernel function of the
/// trouble, the calls left blocked, or the kinds of record that differ), and what caused
/// it (the racing call, or the failing function).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Signature {
    /// The oracle.
    pub oracle: Oracle,
    /// Where.
    pub site: String,
    /// The racing call's action, or `fail FUNCTION`.
    pub cause: String,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.oracle, self.site, self.cause)
    }
}

/// A trial's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum TrialVerdict {
    /// No oracle spoke.
    Pass {
        /// What was checked.
        because: Vec<String>,
    },
    /// An oracle spoke.
    Finding {
        /// Its signature.
        signature: Signature,
        /// The evidence, in words.
        because: Vec<String>,
    },
    /// The trial could not be decided (a hold nothing released, no records to compare).
    Undecided {
        /// Why.
        because: Vec<String>,
    },
}

impl TrialVerdict {
    /// The signature, for a finding.
    #[cfg(test)]
    pub fn signature(&self) -> Option<&Signature> {
        match self {
            TrialVerdict::Finding { signature, .. } => Some(signature),
            _ => None,
        }
    }

    /// One word.
    pub fn name(&self) -> &'static str {
        match self {
            TrialVerdict::Pass { .. } => "pass",
            TrialVerdict::Finding { .. } => "FINDING",
            TrialVerdict::Undecided { .. } => "undecided",
        }
    }

    /// The reasons.
    pub fn because(&self) -> &[String] {
        match self {
            TrialVerdict::Pass { because }
            | TrialVerdict::Finding { because, .. }
            | TrialVerdict::Undecided { because } => because,
        }
    }
}

/// Digits to `N`: PIDs, CPU numbers, addresses and session indices do not split a
/// signature.
fn without_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// The kernel function a trouble line names: `... at FILE:LINE FUNCTION+0x../0x..` (a
/// WARNING), `RIP: 0010:FUNCTION+0x..`, else the line, its numbers dropped (at most 100
/// characters).
pub fn trouble_site(line: &str) -> String {
    let symbol = |s: &str| {
        let name = s.split('+').next().unwrap_or(s);
        (!name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .then(|| name.to_owned())
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        if *w == "at" {
            if let (Some(file), Some(func)) = (words.get(i + 1), words.get(i + 2)) {
                if file.contains(".c:") {
                    if let Some(f) = symbol(func) {
                        return f;
                    }
                }
            }
        }
        if let Some(rest) = w.strip_prefix("RIP:") {
            let at = if rest.is_empty() {
                words.get(i + 1).copied()
            } else {
                Some(rest)
            };
            if let Some(f) = at.and_then(|a| a.rsplit(':').next()).and_then(symbol) {
                return f;
            }
        }
    }
    without_numbers(line.trim()).chars().take(100).collect()
}

/// The call `action(arg)` as a scenario file writes it.
fn pattern(action: Action, arg: u64) -> ActionPattern {
    ActionPattern {
        action,
        arg: Some(arg),
    }
}

/// What a stage-2 trial that passed checked: how many files' data, how many restores
/// failed, whether the preserved pages were watched.
fn stage2_pass(facts: &RunFacts) -> String {
    let calls = facts.boots.last().map_or(&[][..], Vec::as_slice);
    let count = |action: Action, ok: bool| {
        calls
            .iter()
            .filter(|c| c.action == action && c.result.is_some_and(|(r, _)| (r >= 0) == ok))
            .count()
    };
    let checked = count(Action::CheckData, true);
    let failed = count(Action::RetrieveSession, false) + count(Action::RetrieveFd, false);
    let mut text = format!(
        "stage 2 ran to its end: {}, nothing retrieved twice",
        match checked {
            0 => "no data checked".to_owned(),
            1 => "1 file's data as written".to_owned(),
            n => format!("{n} files' data as written"),
        }
    );
    if failed > 0 {
        text.push_str(&format!(", {failed} restore(s) failed"));
    }
    if facts.preserved_written.is_some() {
        text.push_str(", preserved data not reused");
    }
    text
}

/// Takes out of `facts.kernel_trouble` the panics LUO makes on purpose (`deliberate`: the
/// messages of its `luo_restore_fail()` calls, explore::code::restore_fail_messages): a
/// next kernel that cannot restore what it was handed panics rather than run on with
/// memory in an unknown state, which is the policy, not a bug. Only when that panic is all
/// the trouble (an oops before it is still trouble). Returns the line taken out.
pub(crate) fn excuse_deliberate_panic(
    facts: &mut RunFacts,
    deliberate: &[String],
) -> Option<String> {
    let is_deliberate = |line: &str| {
        line.split_once("Kernel panic - not syncing: ")
            .is_some_and(|(_, msg)| deliberate.iter().any(|d| msg.starts_with(d.as_str())))
    };
    if facts.kernel_trouble.is_empty() || !facts.kernel_trouble.iter().all(|l| is_deliberate(l)) {
        return None;
    }
    facts.kernel_trouble.drain(..).next()
}

/// Decides a trial on `facts`; `cause` names what the trial did (the racing call's
/// action, or `fail FUNCTION`).
pub fn decide(facts: &RunFacts, cause: &str) -> TrialVerdict {
    let sig = |oracle, site: String| Signature {
        oracle,
        site,
        cause: cause.to_owned(),
    };
    if let Some(first) = facts.kernel_trouble.first() {
        return TrialVerdict::Finding {
            signature: sig(Oracle::KernelTrouble, trouble_site(first)),
            because: facts.kernel_trouble.clone(),
        };
    }
    let blocked: BTreeSet<String> = facts
        .boots
        .last()
        .into_iter()
        .flatten()
        .filter(|c| c.result.is_none() && c.action != Action::Reboot)
        .map(|c| format!("{} blocked", pattern(c.action, c.arg)))
        .collect();
    if facts.timed_out && !facts.point_of_no_return {
        let site = if blocked.is_empty() {
            "no call left blocked".to_owned()
        } else {
            blocked.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        let mut because = vec![
            "neither point-of-no-return nor the end of the workload within the trial's bound"
                .to_owned(),
        ];
        because.extend(blocked.iter().cloned());
        return TrialVerdict::Finding {
            signature: sig(Oracle::Hang, site),
            because,
        };
    }
    // Stage 2 (the last boot, when there was a handover): the data, and what was retrieved.
    if facts.boots.len() > 1 {
        let calls = facts.boots.last().map_or(&[][..], Vec::as_slice);
        let bad_data: Vec<String> = calls
            .iter()
            .filter(|c| c.action == Action::CheckData && c.result.is_some_and(|(r, _)| r < 0))
            .map(|c| {
                let errno = c.result.map_or(0, |(_, e)| e);
                format!(
                    "{}: {}",
                    pattern(c.action, c.arg),
                    std::io::Error::from_raw_os_error(errno)
                )
            })
            .collect();
        if let Some(first) = bad_data.first() {
            return TrialVerdict::Finding {
                signature: sig(Oracle::Stage2Data, without_numbers(first)),
                because: bad_data,
            };
        }
        let mut seen = BTreeSet::new();
        let twice: Vec<String> = calls
            .iter()
            .filter(|c| {
                c.action == Action::RetrieveSession && c.result.is_some_and(|(r, _)| r >= 0)
            })
            .filter(|c| !seen.insert((c.action.name(), c.arg)))
            .map(|c| format!("{} returned success twice", pattern(c.action, c.arg)))
            .collect();
        if let Some(first) = twice.first() {
            return TrialVerdict::Finding {
                signature: sig(Oracle::RetrievedTwice, first.clone()),
                because: twice,
            };
        }
        let written = unaccounted_data_writes(facts);
        if !written.is_empty() {
            let failed_restore = calls.iter().find(|c| {
                matches!(c.action, Action::RetrieveSession | Action::RetrieveFd)
                    && c.result.is_some_and(|(r, _)| r < 0)
            });
            let site = match failed_restore {
                Some(c) => format!("memfd contents written after a failed {}", c.action.name()),
                None => "memfd contents written, neither retrieved nor finished".to_owned(),
            };
            let mut because: Vec<String> = failed_restore
                .map(|c| {
                    let errno = c.result.map_or(0, |(_, e)| e);
                    format!(
                        "{} failed: {}",
                        pattern(c.action, c.arg),
                        std::io::Error::from_raw_os_error(errno)
                    )
                })
                .into_iter()
                .collect();
            because.push(format!("{} preserved page(s) written:", written.len()));
            because.extend(
                written
                    .iter()
                    .take(8)
                    .map(|(gpa, owner)| format!("{gpa:#x} ({owner})")),
            );
            return TrialVerdict::Finding {
                signature: sig(Oracle::PreservedDataWritten, site),
                because,
            };
        }
    }
    if let Some(d) = facts.discrepancies.as_ref().filter(|d| !d.is_empty()) {
        let kinds: BTreeSet<String> = d.iter().map(|l| without_numbers(l)).collect();
        return TrialVerdict::Finding {
            signature: sig(
                Oracle::RecordsDiffer,
                kinds.into_iter().collect::<Vec<_>>().join("; "),
            ),
            because: d.clone(),
        };
    }
    if !facts.hold_timeouts.is_empty() {
        return TrialVerdict::Undecided {
            because: facts
                .hold_timeouts
                .iter()
                .map(|h| format!("hold {h}: the racing call neither returned nor blocked in time"))
                .collect(),
        };
    }
    let mut because = Vec::new();
    if facts.boots.len() > 1 {
        because.push(stage2_pass(facts));
    } else if facts.point_of_no_return {
        because.push("records match at point-of-no-return".to_owned());
    } else if facts.handover_seen {
        because.push("the handover went through; the next kernel ran no stage 2".to_owned());
    } else {
        because.push("no handover (the workload ended without one)".to_owned());
    }
    because.extend(blocked);
    TrialVerdict::Pass { because }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::scenario::tests::call;
    use luo_protocol::workload::Memfds;

    #[test]
    fn trouble_lines_name_their_function() {
        assert_eq!(
            trouble_site("WARNING: CPU: 1 PID: 97 at kernel/liveupdate/luo_session.c:412 luo_session_serialize+0x1a2/0x2c0"),
            "luo_session_serialize"
        );
        assert_eq!(
            trouble_site("RIP: 0010:luo_file_unfreeze+0x12/0x80"),
            "luo_file_unfreeze"
        );
        assert_eq!(
            trouble_site("BUG: kernel NULL pointer dereference, address: 0000000000000010"),
            "BUG: kernel NULL pointer dereference, address: N"
        );
        assert_eq!(
            trouble_site("Kernel panic - not syncing: Fatal exception"),
            "Kernel panic - not syncing: Fatal exception"
        );
    }

    #[test]
    fn luo_s_own_restore_panic_is_the_policy_not_trouble() {
        let deliberate = ["The incoming tree failed to initialize properly [".to_owned()];
        let panic = "[   75.458829] Kernel panic - not syncing: The incoming tree failed to initialize properly [-5], disabling live update";
        let mut facts = RunFacts {
            kernel_trouble: vec![panic.into()],
            ..RunFacts::default()
        };
        assert_eq!(
            excuse_deliberate_panic(&mut facts, &deliberate).as_deref(),
            Some(panic)
        );
        assert!(facts.kernel_trouble.is_empty());
        // The handover went through; the next kernel stopped in its boot.
        facts.handover_seen = true;
        assert_eq!(
            decide(&facts, "x").because(),
            ["the handover went through; the next kernel ran no stage 2"]
        );
        // An oops before it is trouble still; another panic is trouble.
        for lines in [
            vec![
                "BUG: unable to handle page fault".to_owned(),
                panic.to_owned(),
            ],
            vec!["Kernel panic - not syncing: Fatal exception".to_owned()],
        ] {
            let mut facts = RunFacts {
                kernel_trouble: lines.clone(),
                ..RunFacts::default()
            };
            assert_eq!(excuse_deliberate_panic(&mut facts, &deliberate), None);
            assert_eq!(facts.kernel_trouble, lines);
        }
    }

    #[test]
    fn the_oracles_in_order() {
        let mut f = RunFacts {
            point_of_no_return: true,
            discrepancies: Some(vec![]),
            ..RunFacts::default()
        };
        assert!(matches!(
            decide(&f, "close-session"),
            TrialVerdict::Pass { .. }
        ));
        f.discrepancies = Some(vec![
            "session luo-vmm-s1 arrived, but user space does not have it".into(),
        ]);
        let v = decide(&f, "close-session");
        let s = v.signature().unwrap();
        assert_eq!(s.oracle, Oracle::RecordsDiffer);
        assert_eq!(
            s.site,
            "session luo-vmm-sN arrived, but user space does not have it"
        );
        // A blocked racing call with point-of-no-return reached is the fix at work.
        f.discrepancies = Some(vec![]);
        f.boots = vec![vec![call(Action::CloseSession, 1, None)]];
        assert!(matches!(
            decide(&f, "close-session"),
            TrialVerdict::Pass { .. }
        ));
        // The same blocked call without point-of-no-return, out of time: a hang.
        f.point_of_no_return = false;
        f.timed_out = true;
        let v = decide(&f, "fail luo_file_freeze");
        assert_eq!(v.signature().unwrap().oracle, Oracle::Hang);
        assert_eq!(v.signature().unwrap().site, "close-session 1 blocked");
        f.kernel_trouble = vec!["BUG: scheduling while atomic: luo/1/0x00000002".into()];
        assert_eq!(
            decide(&f, "x").signature().unwrap().oracle,
            Oracle::KernelTrouble
        );
        let undecided = RunFacts {
            hold_timeouts: vec!["held".into()],
            point_of_no_return: true,
            ..RunFacts::default()
        };
        assert!(matches!(
            decide(&undecided, "x"),
            TrialVerdict::Undecided { .. }
        ));
    }

    #[test]
    fn stage_2_oracles_read_the_last_boot() {
        let mut f = RunFacts {
            boots: vec![
                vec![],
                vec![
                    call(Action::RetrieveSession, 0, Some(0)),
                    call(Action::RetrieveFd, 0, Some(0)),
                    call(Action::CheckData, 0, Some(0)),
                ],
            ],
            ..RunFacts::default()
        };
        assert!(matches!(decide(&f, "x"), TrialVerdict::Pass { .. }));
        f.boots[1].push(call(Action::RetrieveSession, 0, Some(0)));
        let v = decide(&f, "stage 2: retrieve-session");
        assert_eq!(v.signature().unwrap().oracle, Oracle::RetrievedTwice);
        assert_eq!(
            v.signature().unwrap().site,
            "retrieve-session 0 returned success twice"
        );
        f.boots[1][2] = call(Action::CheckData, 0, Some(-1));
        let v = decide(&f, "stage 2: fail memfd_luo_retrieve");
        assert_eq!(v.signature().unwrap().oracle, Oracle::Stage2Data);
        // A failed retrieve is no finding by itself (the failure may be the one injected).
        f.boots[1] = vec![call(Action::RetrieveSession, 0, Some(-1))];
        assert!(matches!(decide(&f, "x"), TrialVerdict::Pass { .. }));
    }

    #[test]
    fn preserved_contents_written_with_no_owner_are_a_finding() {
        let token = Memfds::token(0, 0);
        let data = |t: u64| format!("memfd:luo-vmm-s0/{t:#x}/data");
        let mut f = RunFacts {
            boots: vec![
                vec![],
                vec![
                    call(Action::RetrieveSession, 0, Some(0)),
                    call(Action::RetrieveFd, token, Some(-1)),
                ],
            ],
            preserved_written: Some(vec![
                (0x1234_5000, data(token)),
                // A record page and another session's file: not contents of this one.
                (0x1234_6000, format!("memfd:luo-vmm-s0/{token:#x}")),
            ]),
            ..RunFacts::default()
        };
        let v = decide(&f, "stage 2: fail memfd_luo_retrieve");
        let s = v.signature().unwrap();
        assert_eq!(s.oracle, Oracle::PreservedDataWritten);
        assert_eq!(s.site, "memfd contents written after a failed retrieve-fd");
        assert!(v.because().iter().any(|l| l.contains("0x12345000")));
        assert!(!v.because().iter().any(|l| l.contains("0x12346000")));
        // Retrieved: the file's pages are user space's to write.
        f.boots[1][1] = call(Action::RetrieveFd, token, Some(0));
        assert!(matches!(decide(&f, "x"), TrialVerdict::Pass { .. }));
        // Not retrieved but its session finished (or closed): discarded by design.
        for end in [Action::FinishSession, Action::CloseSession] {
            f.boots[1][1] = call(Action::RetrieveFd, token, Some(-1));
            f.boots[1].push(call(end, 0, Some(0)));
            assert!(
                matches!(decide(&f, "x"), TrialVerdict::Pass { .. }),
                "{end:?}"
            );
            f.boots[1].pop();
        }
        // But a page written before the finish started is the failed retrieve's own doing
        // (its cleanup handing the folios back), which the finish does not explain.
        f.boots[1][1] = call(Action::RetrieveFd, token, Some(-1));
        f.boots[1].push(call(Action::FinishSession, 0, Some(0)));
        f.written_before_end
            .insert("luo-vmm-s0".into(), [0x1234_5000].into_iter().collect());
        assert_eq!(
            decide(&f, "x").signature().unwrap().site,
            "memfd contents written after a failed retrieve-fd"
        );
        // Another session's end says nothing of this one's pages.
        f.written_before_end.clear();
        f.written_before_end
            .insert("luo-vmm-s1".into(), [0x1234_5000].into_iter().collect());
        assert!(matches!(decide(&f, "x"), TrialVerdict::Pass { .. }));
        f.written_before_end.clear();
        f.boots[1].pop();
        // A finish that failed discards nothing.
        f.boots[1].push(call(Action::FinishSession, 0, Some(-1)));
        assert_eq!(
            decide(&f, "x").signature().unwrap().oracle,
            Oracle::PreservedDataWritten
        );
        // Written with no restore failing at all.
        f.boots[1] = vec![call(Action::RetrieveSession, 0, Some(0))];
        assert_eq!(
            decide(&f, "x").signature().unwrap().site,
            "memfd contents written, neither retrieved nor finished"
        );
        // Nobody watched: nothing to say.
        f.preserved_written = None;
        assert!(matches!(decide(&f, "x"), TrialVerdict::Pass { .. }));
    }
}
