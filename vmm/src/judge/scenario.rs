//! What a scenario run saw, reduced to facts, and the verdict its rules give: pure
//! functions, so every rule and the inventory detector are tested without a guest.
//!
//! The detector compares what user space believes it preserved at the moment of the
//! reboot (from the stage-1 agent's action results: sessions created and not closed,
//! files preserved into them) with the LUO records the next kernel was handed (parsed by
//! luo-vmm at next-kernel-start): a session that arrived although user space closed it, a
//! file that user space preserved but that did not arrive, and so on.

use std::collections::{BTreeMap, BTreeSet};

use luo_handover::luo::LuoState;
use luo_protocol::message::Action;
use luo_protocol::script::FileId;
use luo_protocol::workload::Memfds;
use serde::Serialize;

use crate::config::scenario::{ActionPattern, Condition, VerdictRules};
use crate::run::agent::ActionCall;

/// The verdict of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioVerdict {
    /// The buggy outcome was seen.
    Reproduced,
    /// The correct outcome was seen.
    NotReproduced,
    /// Neither.
    Inconclusive,
}

impl ScenarioVerdict {
    /// `reproduced`, `not reproduced`, `inconclusive`.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioVerdict::Reproduced => "reproduced",
            ScenarioVerdict::NotReproduced => "not reproduced",
            ScenarioVerdict::Inconclusive => "inconclusive",
        }
    }
}

/// Everything a verdict is decided on.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunFacts {
    /// Per boot of the agent, its actions in order.
    pub boots: Vec<Vec<ActionCall>>,
    /// The detector's findings at the first handover: `Some(vec![])` when records and
    /// belief agree; `None` without a handover.
    pub discrepancies: Option<Vec<String>>,
    /// A handover happened, no preserved page was written, and every stage-2 step
    /// succeeded.
    pub handover_verified: bool,
    /// The next kernel started.
    pub handover_seen: bool,
    /// The outgoing kernel reached point-of-no-return (`machine_kexec`).
    pub point_of_no_return: bool,
    /// Oops, BUG, WARNING, panic lines, or a triple fault.
    pub kernel_trouble: Vec<String>,
    /// Hooks that acted.
    pub hooks_fired: BTreeSet<String>,
    /// Holds nobody released in time.
    pub hold_timeouts: Vec<String>,
    /// The run ran out of time.
    pub timed_out: bool,
    /// Stage 2: the pages of the preserved set (owners as `LuoState::owned_ranges` labels
    /// them) the guest wrote during the run (`explore`'s trials from a snapshot in the next
    /// kernel) or since the next kernel started (an intercepted run's leak check):
    /// `(gpa, owner)`. `None` where nobody watched.
    pub preserved_written: Option<Vec<(u64, String)>>,
    /// Of those, per session name: the pages written before its first `finish` or `close`
    /// started (which that end cannot account for).
    pub written_before_end: BTreeMap<String, BTreeSet<u64>>,
}

/// The owner label of a preserved memfd's contents: `memfd:<session>/<token>/data`.
fn is_memfd_data(owner: &str) -> bool {
    owner.starts_with("memfd:") && owner.ends_with("/data")
}

/// The pages of [`RunFacts::preserved_written`] that hold a memfd's contents and that
/// nothing in the last boot accounts for: contents of a file whose `retrieve-fd` never
/// returned success, in a session that no `finish` (nor `close` of it, which finishes a
/// retrieved session: `luo_session_release()`) ended with success, those two discarding by
/// design what was not retrieved (`memfd_luo_finish()`), or written before that end
/// started ([`RunFacts::written_before_end`]: a failed retrieve's own cleanup, which the
/// finish after it does not explain). Such a page was handed back to the allocator (a
/// freed page is written at once where the guest zeroes on free, `init_on_free=1`, as
/// explore's stage 2 boots) or written in place; the maintainers' policy after a failed
/// restore is "leak, never reuse" (../shared/context).
pub(crate) fn unaccounted_data_writes(facts: &RunFacts) -> Vec<(u64, String)> {
    let Some(written) = &facts.preserved_written else {
        return vec![];
    };
    let calls = facts.boots.last().map_or(&[][..], Vec::as_slice);
    let ok = |c: &&ActionCall| c.result.is_some_and(|(r, _)| r >= 0);
    let tokens: BTreeSet<u64> = calls
        .iter()
        .filter(ok)
        .filter(|c| c.action == Action::RetrieveFd)
        .map(|c| c.arg)
        .collect();
    let ended: BTreeSet<String> = calls
        .iter()
        .filter(ok)
        .filter(|c| matches!(c.action, Action::FinishSession | Action::CloseSession))
        .filter_map(|c| u32::try_from(c.arg).ok())
        .map(|s| Memfds::session_name(s).to_string())
        .collect();
    written
        .iter()
        .filter(|(_, owner)| is_memfd_data(owner))
        .filter(|(gpa, owner)| {
            let Some((session, token)) = owner
                .strip_prefix("memfd:")
                .and_then(|o| o.strip_suffix("/data"))
                .and_then(|o| o.split_once('/'))
            else {
                return false;
            };
            let token = u64::from_str_radix(token.trim_start_matches("0x"), 16).ok();
            let before_end = facts
                .written_before_end
                .get(session)
                .is_some_and(|pages| pages.contains(gpa));
            (!ended.contains(session) || before_end) && !token.is_some_and(|t| tokens.contains(&t))
        })
        .cloned()
        .collect()
}

fn calls<'a>(facts: &'a RunFacts, p: &'a ActionPattern) -> impl Iterator<Item = &'a ActionCall> {
    facts
        .boots
        .iter()
        .flatten()
        .filter(move |c| p.matches(c.action, c.arg))
}

/// Whether `c` holds for `facts`.
pub(crate) fn holds(c: &Condition, facts: &RunFacts) -> bool {
    match c {
        Condition::Blocked(p) => calls(facts, p).any(|c| c.result.is_none()),
        Condition::Returned(p) => calls(facts, p).any(|c| c.result.is_some_and(|(r, _)| r >= 0)),
        Condition::ReturnedTwice(p) => facts.boots.iter().any(|boot| {
            boot.iter()
                .filter(|c| p.matches(c.action, c.arg) && c.result.is_some_and(|(r, _)| r >= 0))
                .count()
                >= 2
        }),
        Condition::Failed(p) => calls(facts, p).any(|c| c.result.is_some_and(|(r, _)| r < 0)),
        Condition::RecordsMatch => facts.discrepancies.as_ref().is_some_and(Vec::is_empty),
        Condition::RecordsDiffer => facts.discrepancies.as_ref().is_some_and(|d| !d.is_empty()),
        Condition::HandoverVerified => facts.handover_verified,
        Condition::NoHandover => !facts.handover_seen,
        Condition::KernelOops => !facts.kernel_trouble.is_empty(),
        Condition::PreservedDataWritten => !unaccounted_data_writes(facts).is_empty(),
        Condition::Hook(n) => facts.hooks_fired.contains(n),
    }
}

/// A verdict with its reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Judgement {
    /// The verdict.
    pub verdict: ScenarioVerdict,
    /// Why, in words: the bug conditions that held, or the correct ones that did not.
    pub because: Vec<String>,
}

/// Applies `rules`: any bug condition means reproduced; else a hold that timed out or a
/// run out of time means inconclusive; else all correct conditions mean not reproduced.
pub(crate) fn judge(rules: &VerdictRules, facts: &RunFacts) -> Judgement {
    let bugs: Vec<String> = rules
        .bug
        .iter()
        .filter(|c| holds(c, facts))
        .map(ToString::to_string)
        .collect();
    if !bugs.is_empty() {
        return Judgement {
            verdict: ScenarioVerdict::Reproduced,
            because: bugs,
        };
    }
    let mut because: Vec<String> = facts
        .hold_timeouts
        .iter()
        .map(|h| format!("hold {h} timed out"))
        .collect();
    if facts.timed_out {
        because.push("the run timed out".into());
    }
    let missing: Vec<String> = rules
        .correct
        .iter()
        .filter(|c| !holds(c, facts))
        .map(|c| format!("not: {c}"))
        .collect();
    if because.is_empty() && missing.is_empty() {
        return Judgement {
            verdict: ScenarioVerdict::NotReproduced,
            because: rules.correct.iter().map(ToString::to_string).collect(),
        };
    }
    because.extend(missing);
    Judgement {
        verdict: ScenarioVerdict::Inconclusive,
        because,
    }
}

/// What user space believes is preserved: session index -> tokens of its files.
pub(crate) type Belief = BTreeMap<u32, BTreeSet<u64>>;

/// User space's belief after the actions of one boot: sessions whose creation returned
/// success and whose close did not, with the files whose preserve returned success.
/// Actions that never returned did not happen, as far as user space knows.
pub(crate) fn belief(calls: &[ActionCall]) -> Belief {
    let mut b = Belief::new();
    for c in calls {
        if c.result.is_none_or(|(r, _)| r < 0) {
            continue;
        }
        match c.action {
            Action::CreateSession => {
                b.insert(u32::try_from(c.arg).unwrap_or(u32::MAX), BTreeSet::new());
            }
            Action::CloseSession => {
                b.remove(&u32::try_from(c.arg).unwrap_or(u32::MAX));
            }
            Action::PreserveFd => {
                if let Some(id) = FileId::from_token(c.arg) {
                    if let Some(files) = b.get_mut(&id.session) {
                        files.insert(c.arg);
                    }
                }
            }
            _ => {}
        }
    }
    b
}

/// Most calls left in flight whose outcomes [`discrepancies`] tries both ways (2^N
/// beliefs).
const MAX_IN_FLIGHT: usize = 4;

/// The differences between what user space may believe after `calls` and the LUO
/// `records`: empty when one belief agrees. A create, close or preserve that was
/// announced and never returned (in flight when the CPUs stopped for the kexec) may have
/// happened in the kernel or not: user space cannot know, so both are right (a preserve
/// that completes just before the reboot serializes, its return lost to the kexec, lands
/// in the records). Else the differences from the belief where none of them happened.
pub(crate) fn discrepancies(calls: &[ActionCall], records: &LuoState) -> Vec<String> {
    let first = compare(&belief(calls), records);
    let in_flight: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.result.is_none()
                && matches!(
                    c.action,
                    Action::CreateSession | Action::CloseSession | Action::PreserveFd
                )
        })
        .map(|(i, _)| i)
        .take(MAX_IN_FLIGHT)
        .collect();
    if first.is_empty() || in_flight.is_empty() {
        return first;
    }
    for mask in 1u32..(1 << in_flight.len()) {
        let mut done = calls.to_vec();
        for (bit, &i) in in_flight.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                done[i].result = Some((0, 0));
            }
        }
        if compare(&belief(&done), records).is_empty() {
            return vec![];
        }
    }
    first
}

fn session_index(name: &str) -> Option<u32> {
    let i: u32 = name.strip_prefix("luo-vmm-s")?.parse().ok()?;
    (Memfds::session_name(i).as_str() == name).then_some(i)
}

fn file_name(token: u64) -> String {
    FileId::from_token(token).map_or(format!("token {token}"), |id| format!("file {id}"))
}

/// Differences between `belief` and the LUO `records` the next kernel got, in words;
/// empty when they agree.
pub(crate) fn compare(belief: &Belief, records: &LuoState) -> Vec<String> {
    let mut out = Vec::new();
    let mut arrived: Belief = Belief::new();
    for s in &records.sessions {
        match session_index(&s.name) {
            Some(i) => {
                arrived.insert(i, s.files.iter().map(|f| f.token).collect());
            }
            None => out.push(format!(
                "session {:?} arrived, which user space never created",
                s.name
            )),
        }
    }
    for (s, files) in &arrived {
        let name = Memfds::session_name(*s);
        let Some(believed) = belief.get(s) else {
            out.push(format!(
                "session {name} arrived, but user space does not have it (closed, or its creation never returned)"
            ));
            continue;
        };
        for t in files.difference(believed) {
            out.push(format!(
                "{} arrived in session {name}, but user space never preserved it",
                file_name(*t)
            ));
        }
        for t in believed.difference(files) {
            out.push(format!(
                "{} was preserved in session {name} (preserve returned 0) but did not arrive",
                file_name(*t)
            ));
        }
    }
    for s in belief.keys().filter(|s| !arrived.contains_key(s)) {
        out.push(format!(
            "session {} was created and not closed, but did not arrive",
            Memfds::session_name(*s)
        ));
    }
    out
}

/// The verdict most runs gave, with how many gave it (ties go to the one of
/// reproduced, not reproduced, inconclusive that comes last: a tie is never called
/// reproduced); `(Inconclusive, 0)` for no runs.
pub(crate) fn vote(
    verdicts: impl Iterator<Item = ScenarioVerdict> + Clone,
) -> (ScenarioVerdict, u32) {
    [
        ScenarioVerdict::Reproduced,
        ScenarioVerdict::NotReproduced,
        ScenarioVerdict::Inconclusive,
    ]
    .into_iter()
    .map(|v| {
        let n = verdicts.clone().filter(|&w| w == v).count();
        (v, u32::try_from(n).unwrap_or(u32::MAX))
    })
    .max_by_key(|&(_, n)| n)
    .unwrap_or((ScenarioVerdict::Inconclusive, 0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::scenario::parse_condition;
    use luo_handover::luo::{PreservedFile, Session};
    use std::time::Instant;

    /// A call of the agent with `result` (errno 5 when negative); also the explore
    /// oracles' tests'.
    pub(crate) fn call(action: Action, arg: u64, result: Option<i64>) -> ActionCall {
        ActionCall {
            action,
            arg,
            at: Instant::now(),
            result: result.map(|r| (r, if r < 0 { 5 } else { 0 })),
        }
    }

    fn records(sessions: &[(u32, &[u64])]) -> LuoState {
        LuoState {
            ser_pa: 0,
            liveupdate_num: 1,
            sessions: sessions
                .iter()
                .map(|(s, tokens)| Session {
                    name: Memfds::session_name(*s).as_str().to_owned(),
                    files: tokens
                        .iter()
                        .map(|&token| PreservedFile {
                            compatible: "memfd-v2".into(),
                            token,
                            data: 0,
                            memfd: None,
                            ser_pa: 0,
                        })
                        .collect(),
                    file_blocks: vec![],
                    ser_pa: 0,
                })
                .collect(),
            flbs: vec![],
            flb_pa: 0,
            flb_pgcnt: 0,
            session_blocks: vec![],
            unknown_compatibles: vec![],
            compatible: "luo-v5".into(),
        }
    }

    #[test]
    fn a_closed_session_that_arrives_is_found() {
        let stage1 = [
            call(Action::CreateSession, 0, Some(0)),
            call(Action::PreserveFd, 0, Some(0)),
            call(Action::CreateSession, 1, Some(0)),
            call(Action::PreserveFd, 1000, Some(0)),
            call(Action::Reboot, 0, None),
            call(Action::CloseSession, 1, Some(0)),
        ];
        let b = belief(&stage1);
        assert_eq!(b.keys().copied().collect::<Vec<_>>(), [0]);
        let d = compare(&b, &records(&[(0, &[0]), (1, &[1000])]));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("session luo-vmm-s1 arrived"), "{d:?}");
        // The fixed kernel: the close never returned, so the session is still user
        // space's, and it arrived.
        let mut blocked = stage1;
        blocked[5].result = None;
        assert!(compare(&belief(&blocked), &records(&[(0, &[0]), (1, &[1000])])).is_empty());
        // Nor is it wrong if the close in flight happened in the kernel, its return lost.
        assert!(discrepancies(&blocked, &records(&[(0, &[0])])).is_empty());
        // The close that returned is wrong either way.
        assert_eq!(
            discrepancies(&stage1, &records(&[(0, &[0]), (1, &[1000])])),
            d
        );
    }

    #[test]
    fn a_preserve_in_flight_may_land_or_not() {
        let stage1 = [
            call(Action::CreateSession, 0, Some(0)),
            call(Action::PreserveFd, 0, Some(0)),
            call(Action::Reboot, 0, None),
            call(Action::PreserveFd, 1, None),
        ];
        for arrived in [&[0u64][..], &[0, 1]] {
            assert!(
                discrepancies(&stage1, &records(&[(0, arrived)])).is_empty(),
                "{arrived:?}"
            );
        }
        // What returned must still be there.
        let d = discrepancies(&stage1, &records(&[(0, &[1])]));
        assert!(
            d.iter().any(|l| l.contains("file 0.0 was preserved")),
            "{d:?}"
        );
    }

    #[test]
    fn missing_sessions_and_files_are_found() {
        let stage1 = [
            call(Action::CreateSession, 0, Some(0)),
            call(Action::PreserveFd, 0, Some(0)),
            call(Action::PreserveFd, 1, Some(0)),
            call(Action::PreserveFd, 2, Some(-1)),
            call(Action::CreateSession, 2, Some(0)),
        ];
        let d = compare(&belief(&stage1), &records(&[(0, &[0, 7])]));
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.iter().any(|l| l.contains("file 0.7 arrived")));
        assert!(d.iter().any(|l| l.contains("file 0.1 was preserved")));
        assert!(d.iter().any(|l| l.contains("luo-vmm-s2 was created")));
        let strangers = LuoState {
            sessions: vec![Session {
                name: "someone-else".into(),
                files: vec![],
                file_blocks: vec![],
                ser_pa: 0,
            }],
            ..records(&[])
        };
        assert!(compare(&Belief::new(), &strangers)[0].contains("never created"));
        assert_eq!(session_index("luo-vmm-s01"), None);
    }

    fn rules(correct: &[&str], bug: &[&str]) -> VerdictRules {
        let p = |v: &[&str]| v.iter().map(|c| parse_condition(c).unwrap()).collect();
        VerdictRules {
            correct: p(correct),
            bug: p(bug),
        }
    }

    #[test]
    fn verdicts_follow_the_rules() {
        let r = rules(
            &[
                "blocked close-session 1",
                "records match",
                "handover verified",
            ],
            &["returned close-session 1", "records differ", "kernel oops"],
        );
        let fixed = RunFacts {
            boots: vec![vec![call(Action::CloseSession, 1, None)]],
            discrepancies: Some(vec![]),
            handover_verified: true,
            handover_seen: true,
            ..RunFacts::default()
        };
        assert_eq!(judge(&r, &fixed).verdict, ScenarioVerdict::NotReproduced);
        let buggy = RunFacts {
            boots: vec![vec![call(Action::CloseSession, 1, Some(0))]],
            discrepancies: Some(vec!["session luo-vmm-s1 arrived".into()]),
            ..fixed.clone()
        };
        let j = judge(&r, &buggy);
        assert_eq!(j.verdict, ScenarioVerdict::Reproduced);
        assert_eq!(j.because, ["returned close-session 1", "records differ"]);
        let held_too_long = RunFacts {
            hold_timeouts: vec!["serialized".into()],
            ..fixed.clone()
        };
        let j = judge(&r, &held_too_long);
        assert_eq!(j.verdict, ScenarioVerdict::Inconclusive);
        assert_eq!(j.because, ["hold serialized timed out"]);
        let nothing = RunFacts::default();
        assert_eq!(judge(&r, &nothing).verdict, ScenarioVerdict::Inconclusive);
        let oops = RunFacts {
            kernel_trouble: vec!["BUG: unable to handle page fault".into()],
            ..fixed
        };
        assert_eq!(judge(&r, &oops).verdict, ScenarioVerdict::Reproduced);
    }

    #[test]
    fn preserved_data_written_counts_only_contents_nothing_accounts_for() {
        let r = rules(&["records match"], &["preserved data written"]);
        let token = Memfds::token(1, 0);
        let mut f = RunFacts {
            boots: vec![vec![], vec![call(Action::RetrieveSession, 1, Some(0))]],
            discrepancies: Some(vec![]),
            // Contents of s1's file, and a page of another kind: its record.
            preserved_written: Some(vec![
                (0x20_0000, format!("memfd:luo-vmm-s1/{token:#x}/data")),
                (0x30_0000, format!("memfd:luo-vmm-s1/{token:#x}")),
            ]),
            ..RunFacts::default()
        };
        assert_eq!(unaccounted_data_writes(&f).len(), 1);
        assert_eq!(judge(&r, &f).verdict, ScenarioVerdict::Reproduced);
        // Closing the retrieved session finishes it: what was not retrieved is discarded.
        f.boots[1].push(call(Action::CloseSession, 1, Some(0)));
        assert!(unaccounted_data_writes(&f).is_empty());
        assert_eq!(judge(&r, &f).verdict, ScenarioVerdict::NotReproduced);
        // Another session's finish accounts for nothing here.
        f.boots[1].pop();
        f.boots[1].push(call(Action::FinishSession, 0, Some(0)));
        assert_eq!(unaccounted_data_writes(&f).len(), 1);
        // Retrieved: its pages are user space's to write.
        f.boots[1] = vec![call(Action::RetrieveFd, token, Some(0))];
        assert!(unaccounted_data_writes(&f).is_empty());
        assert!(!is_memfd_data(&format!("memfd:luo-vmm-s1/{token:#x}/meta")));
    }

    #[test]
    fn the_vote_is_the_most_common_verdict() {
        use ScenarioVerdict::*;
        assert_eq!(
            vote([Reproduced, NotReproduced, Reproduced].into_iter()),
            (Reproduced, 2)
        );
        assert_eq!(
            vote([Inconclusive, NotReproduced].into_iter()),
            (Inconclusive, 1)
        );
        assert_eq!(
            vote([Reproduced, NotReproduced].into_iter()),
            (NotReproduced, 1)
        );
        assert_eq!(vote([Inconclusive].into_iter()), (Inconclusive, 1));
        assert_eq!(vote([].into_iter()), (Inconclusive, 0));
    }
}
