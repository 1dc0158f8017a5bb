//! What the guest agent said over the probe, as the VMM keeps it: bounded (the guest is
//! hostile), in arrival order, and grouped by boot. Nothing here reads the console.

use std::collections::HashMap;
use std::time::Instant;

use luo_devices::ProbeEvent;
use luo_protocol::message::{
    Action, AgentVerdict, DecodeError, Message, SelftestResult, SessionName,
};
use luo_protocol::workload::{Progress, Stage};
use serde::{Deserialize, Serialize};

/// Most messages kept for one run; later ones are counted as dropped.
pub(crate) const MAX_MESSAGES: usize = 1 << 18;
/// Most decode errors kept (all are counted).
pub(crate) const MAX_ERRORS: usize = 64;

/// Most action starts an [`ActionPairs`] keeps (as many as [`AgentLog`] keeps messages, so
/// pairing the kept messages never drops a start).
pub(crate) const MAX_OPEN_ACTIONS: usize = MAX_MESSAGES;

/// Pairs each action's result with its start by `seq` (a [`Message::ActionResult`] carries
/// only the number, not the start's argument): the one definition, used for the boots of an
/// [`AgentLog`] and by the scenario's scheduler (`watch::schedule`), which hears messages one
/// at a time. `T` is what a caller keeps of a start (its argument, where it put the call).
///
/// The guest is hostile, so: a result with no start pairs with nothing; a start whose `seq`
/// was seen before replaces it (a result pairs with the latest start of its number); a result
/// does not consume its start (a second result of one `seq` pairs with the same start); at most
/// [`MAX_OPEN_ACTIONS`] numbers are kept, and a start with a new number beyond that is not kept
/// ([`ActionPairs::start`] says so; its result pairs with nothing). Memory is
/// O(min(distinct `seq`s, [`MAX_OPEN_ACTIONS`])); nothing panics.
#[derive(Debug, Clone)]
pub(crate) struct ActionPairs<T> {
    starts: HashMap<u32, T>,
}

impl<T> Default for ActionPairs<T> {
    fn default() -> Self {
        ActionPairs {
            starts: HashMap::new(),
        }
    }
}

impl<T: Copy> ActionPairs<T> {
    /// The start of action `seq`, keeping `value` for its result. Returns whether it was kept.
    pub fn start(&mut self, seq: u32, value: T) -> bool {
        if let Some(v) = self.starts.get_mut(&seq) {
            *v = value;
            return true;
        }
        if self.starts.len() >= MAX_OPEN_ACTIONS {
            return false;
        }
        self.starts.insert(seq, value);
        true
    }

    /// The result of action `seq`: what its start kept, if a start of that number was kept.
    pub fn result(&self, seq: u32) -> Option<T> {
        self.starts.get(&seq).copied()
    }

    /// Forgets every start (a new boot numbers its actions afresh).
    pub fn clear(&mut self) {
        self.starts.clear();
    }
}

/// Every message of a run, in arrival order, each with the instant its frame began.
#[derive(Debug, Default, Clone)]
pub(crate) struct AgentLog {
    /// The messages.
    pub messages: Vec<(Instant, Message)>,
    /// The first [`MAX_ERRORS`] decode errors.
    pub errors: Vec<DecodeError>,
    /// Decode errors, all of them.
    pub error_count: u64,
    /// Messages not kept: over [`MAX_MESSAGES`], or dropped by the probe's full queue.
    pub dropped: u64,
}

impl AgentLog {
    /// Keeps `ev` (or counts it).
    pub fn push(&mut self, ev: &ProbeEvent) {
        match &ev.item {
            Ok(msg) if self.messages.len() < MAX_MESSAGES => {
                self.messages.push((ev.at, msg.clone()));
            }
            Ok(_) => self.dropped += 1,
            Err(e) => {
                self.error_count += 1;
                if self.errors.len() < MAX_ERRORS {
                    self.errors.push(e.clone());
                }
            }
        }
    }

    /// The last verdict the agent sent.
    pub fn verdict(&self) -> Option<AgentVerdict> {
        self.messages.iter().rev().find_map(|(_, m)| match m {
            Message::Verdict(v) => Some(*v),
            _ => None,
        })
    }

    /// The messages grouped by boot: a boot begins at each `userspace-up`.
    pub fn boots(&self) -> Vec<AgentBoot> {
        let mut boots: Vec<AgentBoot> = Vec::new();
        // Per start: its argument and its index in the boot's `calls`.
        let mut starts: ActionPairs<(u64, usize)> = ActionPairs::default();
        for (at, msg) in &self.messages {
            if matches!(msg, Message::UserspaceUp { .. }) || boots.is_empty() {
                boots.push(AgentBoot::default());
                starts.clear();
            }
            let Some(b) = boots.last_mut() else {
                continue;
            };
            match msg {
                Message::UserspaceUp { cpus_online } => b.cpus_online = Some(*cpus_online),
                Message::Boot { stage, round } => {
                    b.progress = Some(Progress {
                        stage: *stage,
                        round: *round,
                    })
                }
                Message::Verdict(v) => b.verdict = Some(*v),
                Message::Verified {
                    sessions,
                    files,
                    bytes,
                } => {
                    b.verified = Some(Counts {
                        sessions: *sessions,
                        files: *files,
                        bytes: *bytes,
                    })
                }
                Message::Selftest(r) => b.selftests.push(*r),
                Message::InventorySession { session, name } => {
                    b.inventory.sessions.push((*session, name.clone()))
                }
                Message::InventoryFile {
                    session,
                    token,
                    size,
                } => b.inventory.files.push(InventoryFile {
                    session: *session,
                    token: *token,
                    size: *size,
                }),
                Message::InventoryEnd {
                    sessions,
                    files,
                    bytes,
                } => {
                    b.inventory.end = Some(Counts {
                        sessions: *sessions,
                        files: *files,
                        bytes: *bytes,
                    })
                }
                Message::ActionStart { seq, action, arg } => {
                    b.actions += 1;
                    starts.start(*seq, (*arg, b.calls.len()));
                    b.calls.push(ActionCall {
                        action: *action,
                        arg: *arg,
                        at: *at,
                        result: None,
                    });
                }
                Message::ActionResult {
                    seq,
                    action,
                    ret,
                    errno,
                } => {
                    let start = starts.result(*seq);
                    if let Some(call) = start.and_then(|(_, k)| b.calls.get_mut(k)) {
                        call.result = Some((*ret, *errno));
                    }
                    if *errno != 0 || *ret < 0 {
                        b.failed_actions.push(FailedAction {
                            action: *action,
                            arg: start.map_or(0, |(arg, _)| arg),
                            ret: *ret,
                            errno: *errno,
                        });
                    }
                }
                Message::GatePassed(g) => b.gates_passed.push(g.id()),
                Message::DataFound {
                    session,
                    file,
                    offset,
                    whose,
                } => b.found.push(FoundData {
                    session: *session,
                    file: *file,
                    offset: *offset,
                    whose: *whose,
                }),
                Message::GateWait(_) | Message::RebootRequested | Message::WorkloadResumed => {}
            }
        }
        boots
    }

    /// CPUs online at the first boot.
    pub fn first_cpus_online(&self) -> Option<u16> {
        self.messages.iter().find_map(|(_, m)| match m {
            Message::UserspaceUp { cpus_online } => Some(*cpus_online),
            _ => None,
        })
    }
}

/// Counts of sessions, files and bytes: what the agent preserved or checked (the report
/// carries it as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Sessions.
    pub sessions: u32,
    /// Files.
    pub files: u32,
    /// Bytes.
    pub bytes: u64,
}

/// A preserved file of the stage-1 inventory (the report carries it as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryFile {
    /// Index of its session.
    pub session: u32,
    /// LUO token.
    pub token: u64,
    /// Bytes.
    pub size: u64,
}

/// What the agent says it preserved before a handover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Inventory {
    /// Sessions: index and name.
    pub sessions: Vec<(u32, SessionName)>,
    /// Files.
    pub files: Vec<InventoryFile>,
    /// The totals the agent sent at the end, if it got there.
    pub end: Option<Counts>,
}

/// An action whose result was a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailedAction {
    /// What.
    pub action: Action,
    /// Its argument (see `Action`).
    pub arg: u64,
    /// Return value.
    pub ret: i64,
    /// errno.
    pub errno: i32,
}

/// An announced action and its result, if one came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ActionCall {
    /// What.
    pub action: Action,
    /// Its argument (see `Action`).
    pub arg: u64,
    /// When it was announced.
    pub at: Instant,
    /// Return value and errno; `None` while it had not returned.
    pub result: Option<(i64, i32)>,
}

/// What the agent said during one boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AgentBoot {
    /// Every action announced, in order, with its result.
    pub calls: Vec<ActionCall>,
    /// CPUs online.
    pub cpus_online: Option<u16>,
    /// Stage and round.
    pub progress: Option<Progress>,
    /// Stage-1 inventory.
    pub inventory: Inventory,
    /// Stage-2 check.
    pub verified: Option<Counts>,
    /// Selftest runs.
    pub selftests: Vec<SelftestResult>,
    /// Actions announced.
    pub actions: u32,
    /// Actions that failed.
    pub failed_actions: Vec<FailedAction>,
    /// Gates passed.
    pub gates_passed: Vec<u8>,
    /// The verdict, in the boot that ended the agent's work.
    pub verdict: Option<AgentVerdict>,
    /// Pages of retrieved memfds that did not hold their own bytes.
    pub found: Vec<FoundData>,
}

/// A page of a retrieved memfd that held other bytes ([`Message::DataFound`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FoundData {
    /// Session index of the memfd read.
    pub session: u32,
    /// File index of the memfd read.
    pub file: u32,
    /// Byte offset of the page.
    pub offset: u64,
    /// Whose bytes it held.
    pub whose: luo_protocol::Whose,
}

impl AgentBoot {
    /// The selftest run of `stage` (`None`: single-stage).
    pub fn selftest(&self, stage: Option<Stage>) -> Option<&SelftestResult> {
        self.selftests.iter().find(|r| r.stage == stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luo_protocol::message::{ExitStatus, FailedStep};
    use luo_protocol::TapCounts;

    fn log(msgs: Vec<Message>) -> AgentLog {
        let mut log = AgentLog::default();
        let at = Instant::now();
        for m in msgs {
            log.push(&ProbeEvent { item: Ok(m), at });
        }
        log
    }

    #[test]
    fn messages_are_grouped_by_boot() {
        let name = SessionName::new("luo-vmm-s0").unwrap();
        let log = log(vec![
            Message::UserspaceUp { cpus_online: 2 },
            Message::Boot {
                stage: Stage::One,
                round: 0,
            },
            Message::ActionStart {
                seq: 0,
                action: Action::CreateSession,
                arg: 0,
            },
            Message::ActionResult {
                seq: 0,
                action: Action::CreateSession,
                ret: 0,
                errno: 0,
            },
            Message::InventorySession {
                session: 0,
                name: name.clone(),
            },
            Message::InventoryFile {
                session: 0,
                token: 0,
                size: 4096,
            },
            Message::InventoryEnd {
                sessions: 1,
                files: 1,
                bytes: 4096,
            },
            Message::RebootRequested,
            Message::UserspaceUp { cpus_online: 2 },
            Message::ActionStart {
                seq: 0,
                action: Action::RetrieveFd,
                arg: 7,
            },
            Message::ActionResult {
                seq: 0,
                action: Action::RetrieveFd,
                ret: -1,
                errno: 2,
            },
            Message::Selftest(SelftestResult {
                stage: Some(Stage::Two),
                status: ExitStatus::Exited(0),
                tap: TapCounts::default(),
            }),
            Message::Verdict(AgentVerdict::fail(FailedStep::RetrieveFd, 2)),
        ]);
        let boots = log.boots();
        assert_eq!(boots.len(), 2);
        assert_eq!(boots[0].cpus_online, Some(2));
        assert_eq!(boots[0].inventory.sessions, vec![(0, name)]);
        assert_eq!(boots[0].inventory.end.map(|t| t.bytes), Some(4096));
        assert!(boots[0].failed_actions.is_empty());
        assert_eq!(
            boots[1].failed_actions,
            vec![FailedAction {
                action: Action::RetrieveFd,
                arg: 7,
                ret: -1,
                errno: 2
            }]
        );
        assert!(boots[1].selftest(Some(Stage::Two)).is_some());
        assert_eq!(
            log.verdict(),
            Some(AgentVerdict::fail(FailedStep::RetrieveFd, 2))
        );
        assert_eq!(log.first_cpus_online(), Some(2));
    }

    #[test]
    fn results_pair_with_their_starts_in_order() {
        let mut p = ActionPairs::default();
        for seq in 0..3u32 {
            assert!(p.start(seq, u64::from(seq) * 10));
            assert_eq!(p.result(seq), Some(u64::from(seq) * 10));
        }
    }

    #[test]
    fn results_pair_with_their_starts_out_of_order() {
        let mut p = ActionPairs::default();
        p.start(7, 'a');
        p.start(3, 'b');
        p.start(9, 'c');
        assert_eq!(p.result(9), Some('c'));
        assert_eq!(p.result(7), Some('a'));
        assert_eq!(p.result(3), Some('b'));
    }

    #[test]
    fn a_start_without_result_and_a_result_without_start() {
        let mut p = ActionPairs::default();
        p.start(1, 5u64);
        // Seq 1 never gets a result: nothing else pairs with it.
        assert_eq!(
            p.result(2),
            None,
            "a result with no start pairs with nothing"
        );
        assert_eq!(p.result(u32::MAX), None);
        // After a new boot, the old numbers pair with nothing.
        p.clear();
        assert_eq!(p.result(1), None);
    }

    #[test]
    fn a_duplicate_seq_pairs_with_the_latest_start() {
        let mut p = ActionPairs::default();
        p.start(4, 1u64);
        p.start(4, 2u64);
        assert_eq!(p.result(4), Some(2));
        // A second result of the same number pairs with the same start.
        assert_eq!(p.result(4), Some(2));
        assert_eq!(p.starts.len(), 1);
    }

    #[test]
    fn the_pairing_is_bounded() {
        let mut p = ActionPairs::default();
        let max = u32::try_from(MAX_OPEN_ACTIONS).unwrap();
        for seq in 0..max {
            assert!(p.start(seq, seq));
        }
        // A new number beyond the bound is not kept; a kept one is still replaced.
        assert!(!p.start(max, max));
        assert!(!p.start(u32::MAX, 0));
        assert_eq!(p.result(max), None);
        assert!(p.start(0, 42));
        assert_eq!(p.result(0), Some(42));
        assert_eq!(p.starts.len(), MAX_OPEN_ACTIONS);
        p.clear();
        assert!(p.start(max, max));
    }

    #[test]
    fn boots_pair_results_by_seq() {
        let start = |seq, arg| Message::ActionStart {
            seq,
            action: Action::PreserveFd,
            arg,
        };
        let result = |seq, ret, errno| Message::ActionResult {
            seq,
            action: Action::PreserveFd,
            ret,
            errno,
        };
        let log = log(vec![
            Message::UserspaceUp { cpus_online: 1 },
            start(1, 10),
            start(2, 20),
            start(3, 30),
            result(2, -1, 9),
            result(1, 0, 0),
            result(8, -1, 5), // no start
            start(3, 33),     // seq 3 again: the later start is paired
            result(3, -1, 1),
        ]);
        let boots = log.boots();
        let b = &boots[0];
        assert_eq!(b.actions, 4);
        let results: Vec<_> = b.calls.iter().map(|c| (c.arg, c.result)).collect();
        assert_eq!(
            results,
            vec![
                (10, Some((0, 0))),
                (20, Some((-1, 9))),
                (30, None),
                (33, Some((-1, 1)))
            ]
        );
        let failed: Vec<_> = b.failed_actions.iter().map(|f| (f.arg, f.errno)).collect();
        assert_eq!(failed, vec![(20, 9), (0, 5), (33, 1)]);
    }

    #[test]
    fn the_log_is_bounded() {
        let mut log = AgentLog::default();
        let at = Instant::now();
        for _ in 0..MAX_ERRORS + 5 {
            log.push(&ProbeEvent {
                item: Err(DecodeError::UnknownKind(0x7f)),
                at,
            });
        }
        assert_eq!(log.errors.len(), MAX_ERRORS);
        assert_eq!(log.error_count, (MAX_ERRORS + 5) as u64);
        log.messages = vec![(at, Message::RebootRequested); MAX_MESSAGES];
        log.push(&ProbeEvent {
            item: Ok(Message::WorkloadResumed),
            at,
        });
        assert_eq!((log.messages.len(), log.dropped), (MAX_MESSAGES, 1));
    }
}
