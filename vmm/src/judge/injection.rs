//! The outcome of a handover whose KHO/LUO state luo-vmm corrupted (`--inject`), judged
//! from outside the guest: one verdict per round that had a write.
//!
//! - `crashed`: the next kernel panicked, oopsed or warned (luo-vmm boots injected runs
//!   with `panic_on_warn=1`), a vCPU died (triple fault), or the guest hung;
//! - `reused`: after a failed restore, a page of preserved file state (a memfd's record,
//!   folio arrays or contents) that no retrieved file accounts for was written by the
//!   next kernel between its `start_kernel` and the end of the run (the maintainers'
//!   policy is "leak, never reuse"); KHO's and LUO's own records, which the next kernel
//!   consumes by design, are listed but not counted;
//! - `rejected`: LUO refused cleanly: the call that failed in the agent, its errno, and
//!   the kernel's LUO/KHO lines;
//! - `accepted`: the next kernel took the bad record: the agent got its own bytes back,
//!   or another memfd's (named: the patterns are unique per round, session, file and
//!   offset), or zeros.
//!
//! After a failed restore the agent puts the next kernel under memory pressure before it
//! ends, and the leak check (dirty logging of the preserved set from next-kernel-start to
//! the end of the run) is reported with the number of pages it covered, whatever the
//! verdict.

use luo_handover::extents::ExtentSet;
use luo_protocol::message::{Action, AgentVerdict, FailedStep};
use luo_protocol::workload::Memfds;
use serde::{Deserialize, Serialize};

use crate::machine::vm::VmExit;
use crate::run::agent::{AgentBoot, FoundData};

/// The verdict of one injected handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InjectionVerdict {
    /// Panic, oops, WARN (with `panic_on_warn=1`), triple fault or hang.
    Crashed,
    /// LUO refused the state cleanly.
    Rejected,
    /// The next kernel took the bad record.
    Accepted,
    /// Preserved memory that was not retrieved was written after a failed restore.
    Reused,
}

impl InjectionVerdict {
    /// `crashed`, `rejected`, `accepted`, `reused`.
    pub fn name(self) -> &'static str {
        match self {
            InjectionVerdict::Crashed => "crashed",
            InjectionVerdict::Rejected => "rejected",
            InjectionVerdict::Accepted => "accepted",
            InjectionVerdict::Reused => "reused",
        }
    }
}

/// What the agent received from the memfds it retrieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Received {
    /// Every byte of every memfd was its own.
    RightData,
    /// A page held other bytes: `whose` names them (another memfd's, zeros, nobody's).
    WrongData {
        /// Session and file index of the memfd read.
        session: u32,
        /// File index.
        file: u32,
        /// Byte offset of the page.
        offset: u64,
        /// Whose bytes they were, in words.
        whose: String,
    },
    /// A memfd came back with another size.
    WrongSize,
}

/// A preserved page written after next-kernel-start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenPage {
    /// Its guest-physical address.
    pub gpa: u64,
    /// Its owner in the preserved set.
    pub owner: String,
}

/// The leak check ("leak, never reuse").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeakCheck {
    /// Pages of preserved file state (memfd records, folio arrays, contents) that nothing
    /// retrieved accounts for, watched from next-kernel-start to the end of the run.
    pub pages_checked: u64,
    /// Those written (at most [`MAX_LISTED`] listed; `written` counts them all).
    pub written_at: Vec<WrittenPage>,
    /// How many were written.
    pub written: u64,
    /// KHO and LUO records (not file state) written after next-kernel-start: consumed by
    /// the next kernel by design, listed, never counted (at most [`MAX_LISTED`]).
    #[serde(default)]
    pub records_written: Vec<WrittenPage>,
    /// Bytes of memory pressure the agent applied before the end (0: none).
    pub pressure_bytes: u64,
}

/// Most written pages listed.
pub const MAX_LISTED: usize = 16;

/// The judged outcome of one injected handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectionOutcome {
    /// The verdict.
    pub verdict: InjectionVerdict,
    /// One line: why this verdict.
    pub reason: String,
    /// The failed agent call (kebab-case step) and its errno, when one failed.
    pub agent_step: Option<String>,
    /// errno of that call (0: none).
    pub agent_errno: i32,
    /// What the agent received, when it retrieved anything.
    pub received: Option<Received>,
    /// The next kernel's LUO/KHO lines (and trouble lines), the first few.
    pub kernel: Vec<String>,
    /// The leak check, when it ran.
    pub leak: Option<LeakCheck>,
}

/// What [`judge`] looks at.
pub(crate) struct Evidence<'a> {
    /// How the VM ended.
    pub exit: &'a VmExit,
    /// The kernel's panic line.
    pub kernel_panic: Option<&'a str>,
    /// Oops/BUG/WARNING lines.
    pub kernel_trouble: &'a [String],
    /// LUO/KHO lines of the kernels.
    pub kernel_lines: &'a [String],
    /// The agent's boot after this handover (None: it never came up).
    pub after: Option<&'a AgentBoot>,
    /// The agent's last verdict.
    pub agent: Option<AgentVerdict>,
    /// The leak check's written pages (address, owner), or why there are none.
    pub written_after: Option<&'a Result<Vec<(u64, String)>, String>>,
    /// The preserved set handed over (before the injection).
    pub preserved: Option<&'a ExtentSet>,
}

/// errno's symbolic name for the few LUO returns, else the number.
fn errno_name(errno: i32) -> String {
    let name = match errno {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        12 => "ENOMEM",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        22 => "EINVAL",
        61 => "ENODATA",
        74 => "EBADMSG",
        95 => "EOPNOTSUPP",
        _ => return errno.to_string(),
    };
    format!("{errno} ({name})")
}

/// Whether the agent's failure at `step` is LUO refusing (rather than data it got).
fn is_refusal(step: FailedStep) -> bool {
    matches!(
        step,
        FailedStep::OpenLuo
            | FailedStep::RetrieveSession
            | FailedStep::RetrieveFd
            | FailedStep::Finish
    )
}

/// What the agent got back from LUO in the next kernel: whose preserved pages are now the
/// workload's (or freed by LUO as it should after a successful retrieval), and so not
/// counted by the leak check.
#[derive(Debug, Default)]
struct Retrieved {
    /// LUO's own state was taken (a session was retrieved): its header and session blocks.
    luo: bool,
    /// Names of the sessions retrieved: their file blocks.
    sessions: Vec<String>,
    /// Tokens of the files retrieved: their memfd record, metadata and data.
    tokens: Vec<u64>,
}

impl Retrieved {
    fn of(after: Option<&AgentBoot>) -> Retrieved {
        let mut r = Retrieved::default();
        let ok = |c: &&crate::run::agent::ActionCall| {
            c.result.is_some_and(|(ret, errno)| ret >= 0 && errno == 0)
        };
        for c in after.iter().flat_map(|b| b.calls.iter()).filter(ok) {
            match c.action {
                Action::RetrieveSession => {
                    r.luo = true;
                    let index = u32::try_from(c.arg).unwrap_or(u32::MAX);
                    r.sessions.push(Memfds::session_name(index).to_string());
                }
                Action::RetrieveFd => r.tokens.push(c.arg),
                _ => {}
            }
        }
        r
    }

    /// Whether a preserved extent of `owner` (labels of `LuoState::owned_ranges`) is
    /// accounted for by what was retrieved.
    fn owns(&self, owner: &str) -> bool {
        if owner.starts_with("LUO") {
            return self.luo;
        }
        if let Some(session) = owner
            .strip_prefix("session:")
            .and_then(|o| o.strip_suffix("/files"))
        {
            return self.sessions.iter().any(|s| s == session);
        }
        let Some(rest) = owner.strip_prefix("memfd:") else {
            return false;
        };
        // memfd:<session>/<token>[/meta|/data]
        let token = rest
            .split('/')
            .nth(1)
            .and_then(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok());
        token.is_some_and(|t| self.tokens.contains(&t))
    }
}

/// The leak check over `preserved` less the retrieved files' data pages.
fn leak_check(e: &Evidence<'_>) -> Option<LeakCheck> {
    let written = e.written_after?.as_ref().ok()?;
    let preserved = e.preserved?;
    let retrieved = Retrieved::of(e.after);
    // Preserved memory no record luo-vmm decoded claims ("kho") may belong to a record it
    // could not decode (an unknown compatible): then it is watched as file state too, so
    // that the check never covers less than the state handed over.
    let unattributed = preserved
        .iter()
        .any(|x| x.owner.starts_with(luo_handover::luo::UNPARSED_PREFIX));
    let checked = |owner: &str| {
        (is_file_state(owner) || (unattributed && owner == luo_handover::OWNER_KHO))
            && !retrieved.owns(owner)
    };
    let pages_checked = ExtentSet::from_ranges(
        "",
        preserved
            .iter()
            .filter(|x| checked(x.owner))
            .map(|x| (x.start, x.end)),
    )
    .total_pages();
    let page = |(gpa, owner): &(u64, String)| WrittenPage {
        gpa: *gpa,
        owner: owner.clone(),
    };
    let hits: Vec<WrittenPage> = written
        .iter()
        .filter(|(_, o)| checked(o))
        .map(page)
        .collect();
    let records: Vec<WrittenPage> = written
        .iter()
        .filter(|(_, o)| !is_file_state(o))
        .map(page)
        .collect();
    let pressure_bytes = e
        .after
        .and_then(|b| b.calls.iter().find(|c| c.action == Action::Pressure))
        .map_or(0, |c| c.arg);
    Some(LeakCheck {
        pages_checked,
        written: hits.len() as u64,
        written_at: hits.into_iter().take(MAX_LISTED).collect(),
        records_written: records.into_iter().take(MAX_LISTED).collect(),
        pressure_bytes,
    })
}

/// Whether a preserved extent of `owner` is a file's state (a memfd's record, folio
/// arrays or contents: what a retrieval hands to user space; or the page a file luo-vmm
/// could not decode points at, `unparsed:<session>/<token>`), as opposed to the KHO and
/// LUO records the next kernel consumes whatever happens (`kho`, `kho-fdt`,
/// `kexec-metadata`, `LUO`, `LUO/...`, `session:<name>/files`: Linux 7.2 frees `luo_ser`
/// with `kho_restore_free()` in `liveupdate_early_init()` on every boot, and the block
/// pages with `kho_block_set_destroy()`).
fn is_file_state(owner: &str) -> bool {
    owner.starts_with("memfd:") || owner.starts_with(luo_handover::luo::UNPARSED_PREFIX)
}

fn received(after: Option<&AgentBoot>, agent: Option<AgentVerdict>) -> Option<Received> {
    let failed = agent.filter(|v| !v.passed()).map(|v| v.step);
    match failed {
        Some(FailedStep::Data) => Some(after.and_then(|b| b.found.first()).map_or(
            Received::WrongData {
                session: 0,
                file: 0,
                offset: 0,
                whose: "not reported".into(),
            },
            |f: &FoundData| Received::WrongData {
                session: f.session,
                file: f.file,
                offset: f.offset,
                whose: f.whose.to_string(),
            },
        )),
        Some(FailedStep::Size) => Some(Received::WrongSize),
        Some(_) => None,
        None if after.is_some_and(|b| b.verified.is_some()) => Some(Received::RightData),
        None => None,
    }
}

/// Judges one injected handover. Pure: everything comes in `e`.
pub(crate) fn judge(e: &Evidence<'_>) -> InjectionOutcome {
    let leak = leak_check(e);
    let received = received(e.after, e.agent);
    let failed = e.agent.filter(|v| !v.passed());
    let mut kernel: Vec<String> = e.kernel_trouble.iter().take(4).cloned().collect();
    kernel.extend(e.kernel_lines.iter().take(8).cloned());
    let (agent_step, agent_errno) =
        failed.map_or((None, 0), |v| (Some(v.step.name().to_owned()), v.errno));
    // The first trouble line says what went wrong (a panic line usually follows it).
    let crash = if let Some(t) = e.kernel_trouble.first() {
        Some(t.clone())
    } else if let Some(p) = e.kernel_panic {
        Some(p.to_owned())
    } else {
        match e.exit {
            VmExit::Fatal { vcpu, exit } => Some(format!("vCPU {vcpu}: {exit}")),
            VmExit::Timeout { after } => Some(format!(
                "the guest hung: no end within {} s",
                after.as_secs()
            )),
            VmExit::Reset | VmExit::Ended => None,
        }
    };
    let (verdict, reason) = if let Some(what) = crash {
        (InjectionVerdict::Crashed, what)
    } else if let Some(l) = leak.as_ref().filter(|l| l.written > 0 && failed.is_some()) {
        (
            InjectionVerdict::Reused,
            format!(
                "{} of {} pages of preserved file state not retrieved were written after the failed restore",
                l.written, l.pages_checked
            ),
        )
    } else if let Some(v) = failed.filter(|v| is_refusal(v.step)) {
        (
            InjectionVerdict::Rejected,
            format!(
                "the agent's {} failed with errno {}",
                v.step.name(),
                errno_name(v.errno)
            ),
        )
    } else if let Some(r) = &received {
        let what = match r {
            Received::RightData => "the agent got its own bytes back".to_owned(),
            Received::WrongData {
                session,
                file,
                offset,
                ..
            } => format!(
                "the agent read bytes not its own at session {session} file {file} offset {offset:#x}"
            ),
            Received::WrongSize => "a memfd came back with another size".to_owned(),
        };
        (InjectionVerdict::Accepted, what)
    } else if let Some(v) = failed {
        (
            InjectionVerdict::Rejected,
            format!(
                "the agent's {} failed with errno {}",
                v.step.name(),
                errno_name(v.errno)
            ),
        )
    } else if e.after.is_none() {
        (
            InjectionVerdict::Crashed,
            "the agent never came up in the next kernel".to_owned(),
        )
    } else {
        (
            InjectionVerdict::Accepted,
            "the agent gave no verdict after the handover".to_owned(),
        )
    };
    InjectionOutcome {
        verdict,
        reason,
        agent_step,
        agent_errno,
        received,
        kernel,
        leak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::agent::ActionCall;
    use luo_protocol::Whose;
    use std::time::Instant;

    fn call(action: Action, arg: u64, ret: i64, errno: i32) -> ActionCall {
        ActionCall {
            action,
            arg,
            at: Instant::now(),
            result: Some((ret, errno)),
        }
    }

    fn set() -> ExtentSet {
        let mut b = ExtentSet::builder();
        b.add(0x1000, 0x2000, "kho-fdt");
        b.add(0x10000, 0x12000, "memfd:luo-vmm-s0/0x0/data");
        b.add(0x20000, 0x21000, "memfd:luo-vmm-s1/0x10000/data");
        b.add(0x30000, 0x31000, "LUO/sessions");
        b.build()
    }

    fn evidence<'a>(
        exit: &'a VmExit,
        after: Option<&'a AgentBoot>,
        agent: Option<AgentVerdict>,
        written: Option<&'a Result<Vec<(u64, String)>, String>>,
        preserved: &'a ExtentSet,
    ) -> Evidence<'a> {
        Evidence {
            exit,
            kernel_panic: None,
            kernel_trouble: &[],
            kernel_lines: &[],
            after,
            agent,
            written_after: written,
            preserved: Some(preserved),
        }
    }

    #[test]
    fn a_clean_refusal_is_rejected_and_the_leak_check_counts_what_it_covered() {
        let preserved = set();
        let boot = AgentBoot {
            calls: vec![
                call(Action::RetrieveSession, 0, -1, 5),
                call(Action::Pressure, 200 << 20, 0, 0),
            ],
            ..AgentBoot::default()
        };
        // LUO's session block written: a record the kernel consumes, listed, not counted.
        let written = Ok(vec![(0x30000, "LUO/sessions".to_owned())]);
        let exit = VmExit::Reset;
        let o = judge(&evidence(
            &exit,
            Some(&boot),
            Some(AgentVerdict::fail(FailedStep::RetrieveSession, 5)),
            Some(&written),
            &preserved,
        ));
        assert_eq!(o.verdict, InjectionVerdict::Rejected);
        assert!(
            o.reason
                .contains("retrieve-session failed with errno 5 (EIO)"),
            "{}",
            o.reason
        );
        let leak = o.leak.unwrap();
        // Nothing retrieved: every memfd page counts (2 + 1), no record does.
        assert_eq!(
            (leak.pages_checked, leak.written, leak.pressure_bytes),
            (3, 0, 200 << 20)
        );
        assert_eq!(leak.records_written[0].owner, "LUO/sessions");
    }

    #[test]
    fn a_write_to_unretrieved_preserved_memory_after_a_failure_is_reuse() {
        let preserved = set();
        let boot = AgentBoot {
            calls: vec![
                call(Action::RetrieveSession, 0, 3, 0),
                call(Action::RetrieveFd, 0, 4, 0),
                call(Action::RetrieveSession, 1, -1, 22),
            ],
            ..AgentBoot::default()
        };
        // The retrieved file's page is the workload's; the other session's is not.
        let written = Ok(vec![
            (0x10000, "memfd:luo-vmm-s0/0x0/data".to_owned()),
            (0x20000, "memfd:luo-vmm-s1/0x10000/data".to_owned()),
        ]);
        let exit = VmExit::Reset;
        let o = judge(&evidence(
            &exit,
            Some(&boot),
            Some(AgentVerdict::fail(FailedStep::RetrieveSession, 22)),
            Some(&written),
            &preserved,
        ));
        assert_eq!(o.verdict, InjectionVerdict::Reused);
        let leak = o.leak.unwrap();
        // Session 0's memfd is accounted for; session 1's page is not.
        assert_eq!((leak.pages_checked, leak.written), (1, 1));
        assert_eq!(leak.written_at[0].gpa, 0x20000);
    }

    #[test]
    fn another_memfds_bytes_are_accepted_and_named() {
        let preserved = set();
        let boot = AgentBoot {
            found: vec![FoundData {
                session: 0,
                file: 0,
                offset: 0x3000,
                whose: Whose::Pattern {
                    round: 1,
                    session: 1,
                    file: 0,
                    offset: 0,
                },
            }],
            ..AgentBoot::default()
        };
        let exit = VmExit::Reset;
        let o = judge(&evidence(
            &exit,
            Some(&boot),
            Some(AgentVerdict::fail(FailedStep::Data, 0)),
            None,
            &preserved,
        ));
        assert_eq!(o.verdict, InjectionVerdict::Accepted);
        assert!(
            o.reason
                .contains("not its own at session 0 file 0 offset 0x3000"),
            "{}",
            o.reason
        );
        assert!(
            matches!(&o.received, Some(Received::WrongData { whose, .. }) if whose.starts_with("session 1 file 0 offset 0x0")),
            "{:?}",
            o.received
        );
        assert!(o.leak.is_none());
    }

    #[test]
    fn right_data_is_accepted_and_a_panic_or_hang_is_a_crash() {
        let preserved = set();
        let boot = AgentBoot {
            verified: Some(crate::run::agent::Counts {
                sessions: 1,
                files: 1,
                bytes: 4096,
            }),
            ..AgentBoot::default()
        };
        let exit = VmExit::Reset;
        let ok = judge(&evidence(
            &exit,
            Some(&boot),
            Some(AgentVerdict::PASS),
            None,
            &preserved,
        ));
        assert_eq!(
            (ok.verdict, ok.received),
            (InjectionVerdict::Accepted, Some(Received::RightData))
        );

        let mut e = evidence(&exit, None, None, None, &preserved);
        let trouble = ["[ 1.0] Kernel panic - not syncing: panic_on_warn set ...".to_owned()];
        e.kernel_trouble = &trouble;
        assert_eq!(judge(&e).verdict, InjectionVerdict::Crashed);
        let hung = VmExit::Timeout {
            after: std::time::Duration::from_secs(600),
        };
        let o = judge(&evidence(&hung, None, None, None, &preserved));
        assert_eq!(o.verdict, InjectionVerdict::Crashed);
        assert!(o.reason.contains("hung"));
    }

    #[test]
    fn what_a_retrieval_accounts_for() {
        let boot = AgentBoot {
            calls: vec![
                call(Action::RetrieveSession, 1, 3, 0),
                call(Action::RetrieveFd, 0x3e8, 4, 0),
                call(Action::RetrieveFd, 0x3e9, -1, 2),
            ],
            ..AgentBoot::default()
        };
        let r = Retrieved::of(Some(&boot));
        for owner in [
            "LUO",
            "LUO/sessions",
            "session:luo-vmm-s1/files",
            "memfd:luo-vmm-s1/0x3e8",
            "memfd:luo-vmm-s1/0x3e8/meta",
            "memfd:luo-vmm-s1/0x3e8/data",
        ] {
            assert!(r.owns(owner), "{owner}");
        }
        for owner in [
            "kho-fdt",
            "session:luo-vmm-s0/files",
            "memfd:luo-vmm-s1/0x3e9/data",
            "memfd:luo-vmm-s0/0x0/data",
        ] {
            assert!(!r.owns(owner), "{owner}");
        }
        assert!(!Retrieved::of(None).owns("LUO"));
    }
}
