//! The run report: typed, one list of rounds (each with its marks, extents, hook time,
//! what the agent said about it, and typed errors), the selftests' TAP counts, and the
//! verdict. It is what `--json` writes and what the tests and `luo-vmm report` read back
//! (`serde`), and what the text report renders.

pub mod stats;
pub(crate) mod table;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use luo_handover::fields::{FieldList, Value};
use luo_handover::invariants::{self, InvariantCheck};
use luo_handover::timeline::{human_bytes, human_duration, HandoverReport, Round};
use luo_handover::Handover;
use luo_protocol::message::{ExitStatus, SelftestResult};
use luo_protocol::workload::{Selftest, Stage, Workload};
use luo_protocol::Mark;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::options::GuestOptions;
use crate::judge::injection as judged;
pub use crate::judge::injection::{
    InjectionOutcome, InjectionVerdict, LeakCheck, Received, WrittenPage,
};
use crate::judge::verified::HandoverChecks;
use crate::machine::host::KvmBackend;
use crate::machine::vm::VmExit;
use crate::run::agent::{AgentBoot, Totals};
use crate::run::guest::{GuestOutcome, ResolvedGuest};
use crate::watch::injector::InjectedWrite;
pub use crate::watch::intercept::{HookPart, HookTime};
use crate::watch::intercept::{Interception, RoundCapture};

/// Errors of reading or writing a report file.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a luo-vmm report.
    #[error("{path} is not a luo-vmm report: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// Everything `luo-vmm handover` and `luo-vmm selftest` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// What ran.
    pub run: RunInfo,
    /// Every handover, in order.
    pub rounds: Vec<RoundReport>,
    /// Every selftest run, in order (stage 1, stage 2, or the single stage).
    pub selftests: Vec<SelftestReport>,
    /// What the agent said about the whole run.
    pub agent: AgentSummary,
    /// The VM ended cleanly, the kernel did not panic, and the agent's verdict passed.
    pub guest_ok: bool,
    /// What went wrong at the run's level.
    pub errors: Vec<RunError>,
    /// The run did what it was asked: every handover seen whole and verified (or, for a
    /// single-stage selftest, the test passed), and `guest_ok`.
    pub verified: bool,
}

/// The run's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `hardware` or `emulated`.
    pub kvm: String,
    /// Kernel release of the reference guest, if it was used.
    pub kernel: Option<String>,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// The luo-vmm process's peak resident memory (`VmHWM` of /proc/self/status, when the
    /// report was built), in bytes: guest pages the guest touched included.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// The workload's kernel parameters (`luo_protocol::workload` parses them back).
    pub workload: String,
}

/// One handover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Phases, blackout, preserved extents, pages written, digest: what luo-vmm saw.
    #[serde(flatten)]
    pub handover: HandoverReport,
    /// The marks with their host times (ns since the VM started), in order.
    pub marks: Vec<MarkTime>,
    /// Preserved extents with owners.
    pub extent_list: Vec<ExtentEntry>,
    /// Host time luo-vmm spent with the guest stopped in its hooks (ns, included in the
    /// phases): the sum of `hooks`.
    pub hook_ns: u64,
    /// Each stop at a breakpoint: which, on which vCPU, how long, what the time went to.
    #[serde(default)]
    pub hooks: Vec<HookTime>,
    /// CPUs online, as the agent counted them, in the kernel before the handover and in
    /// the next kernel (`None`: the agent did not report in that kernel).
    pub cpus_online: CpusOnline,
    /// What the agent said it preserved before the handover.
    pub inventory: Option<InventoryReport>,
    /// What the agent checked after it (its own workload).
    pub checked: Option<Counts>,
    /// The selftest's stage-2 run (a two-stage selftest).
    pub selftest: Option<SelftestReport>,
    /// Actions that failed on either side of the handover.
    pub failed_actions: Vec<ActionReport>,
    /// A fault luo-vmm injected (the text report's `injected:` line).
    pub injected: Option<String>,
    /// Every write `--inject` made, with the field's value before and after.
    #[serde(default)]
    pub injections: Vec<InjectedWrite>,
    /// The judged outcome of a round `--inject` wrote into: the verdict (crashed,
    /// rejected, accepted, reused), what the agent and the kernel said, the leak check.
    #[serde(default)]
    pub outcome: Option<InjectionOutcome>,
    /// Every field of the KHO/LUO state parsed at next-kernel-start, before any injection:
    /// the paths `--inject PATH=VALUE` takes (JSON only; not in the text report).
    #[serde(default)]
    pub fields: Vec<FieldEntry>,
    /// The handover's invariants (`luo_handover::invariants`), checked on the state parsed at
    /// next-kernel-start, before any injection: one entry per invariant, each with `held`,
    /// the count of findings and the first few. Empty when the state was not read (reports
    /// written before the checks existed read back empty too).
    #[serde(default)]
    pub invariants: Vec<InvariantCheck>,
    /// What went wrong reading this handover.
    pub errors: Vec<RoundError>,
    /// The agent's side of this handover passed (its data checked, or its selftest
    /// passed), and the run's guest was ok.
    pub agent_ok: bool,
    /// `intact`, `agent_ok`, no error, every vCPU back up and every invariant held.
    pub verified: bool,
}

/// CPUs online on both sides of one handover, out of the VM's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusOnline {
    /// vCPUs of the VM.
    pub vcpus: u8,
    /// In the kernel that handed over.
    pub before: Option<u16>,
    /// In the next kernel.
    pub after: Option<u16>,
}

impl CpusOnline {
    /// Whether the next kernel brought up every vCPU again.
    pub fn all_up_after(&self) -> bool {
        self.after == Some(u16::from(self.vcpus))
    }
}

/// A mark and when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkTime {
    /// Mark name (`reboot-requested`, ...).
    pub name: String,
    /// Host-monotonic nanoseconds since the VM started.
    pub t_ns: u64,
}

/// One preserved extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentEntry {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Owner (kho, kho-fdt, LUO, LUO/sessions, memfd:..., ...).
    pub owner: String,
}

/// One field of the handover (`luo_handover::fields`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldEntry {
    /// Its path, e.g. `luo.session[0].file[0].compatible`.
    pub path: String,
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Bytes it occupies.
    pub width: u32,
    /// Its value: a number, or a string for names and compatibles.
    pub value: Value,
}

/// Every field of `h`, for the report.
fn field_entries(h: &Handover) -> Vec<FieldEntry> {
    FieldList::of(h)
        .fields
        .into_iter()
        .map(|f| FieldEntry {
            path: f.path,
            gpa: f.gpa,
            width: f.width,
            value: f.value,
        })
        .collect()
}

/// Sessions, files and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Sessions.
    pub sessions: u32,
    /// Files.
    pub files: u32,
    /// Bytes.
    pub bytes: u64,
}

/// The agent's stage-1 inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReport {
    /// Sessions by index and name.
    pub sessions: Vec<InventorySession>,
    /// Files.
    pub files: Vec<InventoryFile>,
    /// The totals the agent sent at its end; `None` if it never got there.
    pub totals: Option<Counts>,
}

/// A session of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventorySession {
    /// Index in the workload.
    pub index: u32,
    /// LUO name.
    pub name: String,
}

/// A file of the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryFile {
    /// Index of its session.
    pub session: u32,
    /// LUO token.
    pub token: u64,
    /// Bytes.
    pub size: u64,
}

/// An agent action that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReport {
    /// `create-session`, `preserve-fd`, ...
    pub action: String,
    /// Its argument (session index or token).
    pub arg: u64,
    /// Return value.
    pub ret: i64,
    /// errno.
    pub errno: i32,
}

/// One run of a selftest binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelftestReport {
    /// The binary.
    pub name: String,
    /// `--stage` it ran with; `None` for a single-stage test.
    pub stage: Option<u8>,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
    /// TAP cases passed.
    pub passed: u32,
    /// TAP cases failed.
    pub failed: u32,
    /// TAP cases skipped.
    pub skipped: u32,
    /// TAP cases expected to fail that failed.
    pub xfail: u32,
    /// TAP cases expected to fail that passed.
    pub xpass: u32,
    /// TAP cases in error.
    pub error: u32,
}

impl SelftestReport {
    fn new(test: Selftest, r: &SelftestResult) -> Self {
        let (exit_code, signal) = match r.status {
            ExitStatus::Exited(c) => (Some(c), None),
            ExitStatus::Signaled(s) => (None, Some(s)),
        };
        SelftestReport {
            name: test.name().to_owned(),
            stage: r.stage.map(Stage::number),
            exit_code,
            signal,
            passed: r.tap.pass,
            failed: r.tap.fail,
            skipped: r.tap.skip,
            xfail: r.tap.xfail,
            xpass: r.tap.xpass,
            error: r.tap.error,
        }
    }

    /// Exited 0.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0)
    }
}

impl std::fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(s) = self.stage {
            write!(f, " --stage {s}")?;
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => write!(f, ": exit status {c}")?,
            (None, Some(s)) => write!(f, ": killed by signal {s}")?,
            (None, None) => write!(f, ": no status")?,
        }
        write!(
            f,
            "; TAP {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )?;
        if self.xfail + self.xpass + self.error > 0 {
            write!(
                f,
                ", {} xfail, {} xpass, {} error",
                self.xfail, self.xpass, self.error
            )?;
        }
        Ok(())
    }
}

/// What the agent said about the whole run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSummary {
    /// CPUs online at the first boot.
    pub cpus_online: Option<u16>,
    /// Its final verdict: `pass`, or the failed step.
    pub verdict: Option<String>,
    /// errno of the failure, 0 if none.
    pub errno: i32,
    /// Messages received.
    pub messages: u64,
    /// Probe writes that were not messages.
    pub decode_errors: u64,
    /// Messages dropped (a flood).
    pub dropped: u64,
}

/// A problem with one handover's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum RoundError {
    /// The KHO state could not be read at next-kernel-start.
    KhoState(String),
    /// next-kernel-start was not reached, so the KHO state was not read.
    KhoStateNotRead,
    /// The dirty log could not be started or read.
    DirtyLog(String),
    /// The digests could not be computed.
    Digest(String),
    /// `--inject` could not be applied (an unknown path, a value that does not fit).
    Inject(String),
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundError::KhoState(e) => write!(f, "KHO state: {e}"),
            RoundError::KhoStateNotRead => f.write_str("KHO state was not read"),
            RoundError::DirtyLog(e) => write!(f, "dirty log: {e}"),
            RoundError::Digest(e) => write!(f, "digest: {e}"),
            RoundError::Inject(e) => write!(f, "inject: {e}"),
        }
    }
}

/// A problem with the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum RunError {
    /// Fewer handovers than the workload makes were seen.
    MissingHandovers {
        /// Handovers the workload makes.
        expected: u32,
        /// Handovers seen.
        seen: u32,
    },
    /// The agent's verdict is a failure at this step.
    AgentFailed {
        /// The step (`preserve`, `data`, ...).
        step: String,
        /// errno, 0 if none.
        errno: i32,
    },
    /// The agent sent no verdict.
    NoVerdict,
    /// The guest kernel panicked (its console line).
    KernelPanic(String),
    /// A vCPU met a fatal exit.
    VmDied(String),
    /// The run passed its deadline (seconds).
    Timeout(u64),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::MissingHandovers { expected, seen } => write!(
                f,
                "{seen} of {expected} handovers seen (the guest never reached reboot(KEXEC) for the others)"
            ),
            RunError::AgentFailed { step, errno } if *errno != 0 => write!(
                f,
                "the agent failed at step {step}: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            RunError::AgentFailed { step, .. } => write!(f, "the agent failed at step {step}"),
            RunError::NoVerdict => f.write_str("the agent sent no verdict"),
            RunError::KernelPanic(line) => write!(f, "kernel panic: {line}"),
            RunError::VmDied(what) => write!(f, "the VM died: {what}"),
            RunError::Timeout(s) => write!(f, "timeout after {s} s"),
        }
    }
}

fn counts(t: Totals) -> Counts {
    Counts {
        sessions: t.sessions,
        files: t.files,
        bytes: t.bytes,
    }
}

fn inventory_report(boot: &AgentBoot) -> Option<InventoryReport> {
    let inv = &boot.inventory;
    if inv.sessions.is_empty() && inv.files.is_empty() && inv.end.is_none() {
        return None;
    }
    Some(InventoryReport {
        sessions: inv
            .sessions
            .iter()
            .map(|(index, name)| InventorySession {
                index: *index,
                name: name.to_string(),
            })
            .collect(),
        files: inv
            .files
            .iter()
            .map(|f| InventoryFile {
                session: f.session,
                token: f.token,
                size: f.size,
            })
            .collect(),
        totals: inv.end.map(counts),
    })
}

fn failed_actions(boots: &[&AgentBoot]) -> Vec<ActionReport> {
    boots
        .iter()
        .flat_map(|b| &b.failed_actions)
        .map(|a| ActionReport {
            action: a.action.name().to_owned(),
            arg: a.arg,
            ret: a.ret,
            errno: a.errno,
        })
        .collect()
}

/// What luo-vmm saw of one handover: its report (marks, phases, extents, pages written,
/// digests), the preserved extents with their owners, what could not be read, and the
/// invariants of the state handed over.
pub(crate) struct RoundSeen {
    /// The handover's report.
    pub handover: HandoverReport,
    /// The preserved extents at next-kernel-start, with owners.
    pub extent_list: Vec<ExtentEntry>,
    /// What went wrong reading it.
    pub errors: Vec<RoundError>,
    /// The invariants, checked on the state parsed at next-kernel-start.
    pub invariants: Vec<InvariantCheck>,
}

impl RoundSeen {
    /// Reads handover `round` of the timeline with what the interceptor captured of it.
    pub fn of(round: &Round, cap: Option<&RoundCapture>) -> Self {
        let (handover, extent_list, errors) = handover_part(round, cap);
        let invariants = cap
            .and_then(|c| c.handover.as_ref()?.as_ref().ok())
            .map_or_else(Vec::new, |st| invariants::check(&st.handover, &st.extents));
        Self {
            handover,
            extent_list,
            errors,
            invariants,
        }
    }

    /// The checks of [`HandoverChecks`], with what the caller knows of the guest side.
    pub fn checks(&self, cpus_up: bool, workload_ok: bool) -> HandoverChecks {
        HandoverChecks {
            intact: self.handover.intact,
            read_cleanly: self.errors.is_empty(),
            invariants_held: self.invariants.iter().all(|c| c.held),
            cpus_up,
            workload_ok,
        }
    }
}

/// The luo-vmm side of round `round` (what was read at its next-kernel-start).
fn handover_part(
    round: &Round,
    cap: Option<&RoundCapture>,
) -> (HandoverReport, Vec<ExtentEntry>, Vec<RoundError>) {
    let mut r = HandoverReport::new(round);
    let mut list = Vec::new();
    let mut errors = Vec::new();
    let Some(cap) = cap else {
        errors.push(RoundError::KhoStateNotRead);
        return (r, list, errors);
    };
    match &cap.handover {
        Some(Ok(st)) => {
            r = r.with_extents(&st.extents.set, &st.scratch);
            list = st
                .extents
                .set
                .iter()
                .map(|e| ExtentEntry {
                    start: e.start,
                    len: e.len(),
                    owner: e.owner.to_owned(),
                })
                .collect();
        }
        Some(Err(e)) => errors.push(RoundError::KhoState(e.clone())),
        None => errors.push(RoundError::KhoStateNotRead),
    }
    match (&cap.dirty, &cap.handover) {
        (Some(Ok(d)), Some(Ok(st))) => r = r.with_dirty(d, &st.extents.set),
        (Some(Ok(d)), _) => r = r.with_dirty(d, &luo_handover::extents::ExtentSet::default()),
        (Some(Err(e)), _) => errors.push(RoundError::DirtyLog(e.clone())),
        (None, _) => {}
    }
    match &cap.digest {
        Some(Ok(v)) => r = r.with_digest(v.clone()),
        Some(Err(e)) => errors.push(RoundError::Digest(e.clone())),
        None => {}
    }
    if let Some(e) = &cap.injection.error {
        errors.push(RoundError::Inject(e.to_string()));
    }
    (r, list, errors)
}

/// The text of an injected round's outcome: the verdict line, what the agent got, the
/// kernel's lines, the leak check.
fn write_outcome(s: &mut String, o: &InjectionOutcome) {
    let _ = writeln!(s, "verdict: {} ({})", o.verdict.name(), o.reason);
    match &o.received {
        Some(Received::RightData) => {
            let _ = writeln!(s, "received: every memfd's own bytes");
        }
        Some(Received::WrongData {
            session,
            file,
            offset,
            whose,
        }) => {
            let _ = writeln!(
                s,
                "received: session {session} file {file} offset {offset:#x} held {whose}"
            );
        }
        Some(Received::WrongSize) => {
            let _ = writeln!(s, "received: a memfd of another size");
        }
        None => {
            let _ = writeln!(s, "received: no memfd (none was retrieved and read)");
        }
    }
    for line in &o.kernel {
        let _ = writeln!(s, "  kernel: {line}");
    }
    match &o.leak {
        Some(l) => {
            let _ = writeln!(
                s,
                "leak check: {} of {} pages of preserved file state not retrieved were written between next-kernel-start and the end of the run (after {} of memory pressure)",
                l.written,
                l.pages_checked,
                human_bytes(l.pressure_bytes)
            );
            for p in &l.written_at {
                let _ = writeln!(s, "  reused page: {:#x}  {}", p.gpa, p.owner);
            }
            for p in &l.records_written {
                let _ = writeln!(
                    s,
                    "  record page written (KHO/LUO state the next kernel consumes; not counted): {:#x}  {}",
                    p.gpa, p.owner
                );
            }
        }
        None => {
            let _ = writeln!(
                s,
                "leak check: not run (no dirty log after next-kernel-start)"
            );
        }
    }
}

/// Builds the report of a run from what the guest did, what the interceptor saw, and
/// what was asked.
pub(crate) fn build_report(
    outcome: &GuestOutcome,
    got: Interception,
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    workload: Workload,
) -> RunReport {
    let verdict = outcome.agent.verdict();
    let guest_ok = outcome.exit.is_clean()
        && outcome.kernel_panic.is_none()
        && verdict.is_some_and(|v| v.passed());
    let boots = &outcome.boots;
    let selftest = match workload {
        Workload::Selftest(t) => Some(t),
        _ => None,
    };
    let selftests: Vec<SelftestReport> = selftest
        .map(|t| {
            boots
                .iter()
                .flat_map(|b| &b.selftests)
                .map(|r| SelftestReport::new(t, r))
                .collect()
        })
        .unwrap_or_default();

    let mut rounds = Vec::new();
    for (i, round) in got.timeline.rounds().iter().enumerate() {
        let cap = got.rounds.get(i);
        let seen = RoundSeen::of(round, cap);
        // Handover i goes from boot i (stage 1) to boot i + 1 (stage 2).
        let before = boots.get(i);
        let after = boots.get(i + 1);
        let inventory = before.and_then(inventory_report);
        let checked = after.and_then(|b| b.verified).map(counts);
        let stage2 = selftest.and_then(|t| {
            after
                .and_then(|b| b.selftest(Some(Stage::Two)))
                .map(|r| SelftestReport::new(t, r))
        });
        let agent_side = match workload {
            Workload::Handover(_) => checked.is_some_and(|c| {
                inventory
                    .as_ref()
                    .and_then(|inv| inv.totals)
                    .is_none_or(|t| t.files == c.files && t.bytes == c.bytes)
            }),
            Workload::Selftest(_) => stage2.as_ref().is_some_and(SelftestReport::passed),
            Workload::Boot | Workload::Scenario => false,
        };
        let agent_ok = guest_ok && agent_side;
        let marks = Mark::ALL
            .iter()
            .filter_map(|&m| {
                Some(MarkTime {
                    name: m.name().to_owned(),
                    t_ns: round.get(m)?,
                })
            })
            .collect();
        let pair: Vec<&AgentBoot> = before.into_iter().chain(after).collect();
        let cpus_online = CpusOnline {
            vcpus: opts.vcpus,
            before: before.and_then(|b| b.cpus_online),
            after: after.and_then(|b| b.cpus_online),
        };
        let state = cap.and_then(|c| c.handover.as_ref()?.as_ref().ok());
        let verified = seen.checks(cpus_online.all_up_after(), agent_ok).verified();
        let RoundSeen {
            handover,
            extent_list,
            errors,
            invariants,
        } = seen;
        rounds.push(RoundReport {
            verified,
            cpus_online,
            handover,
            marks,
            extent_list,
            hook_ns: cap.map_or(0, |c| c.hook_ns),
            hooks: cap.map_or_else(Vec::new, |c| c.hooks.clone()),
            inventory,
            checked,
            selftest: stage2,
            failed_actions: failed_actions(&pair),
            injected: cap.and_then(|c| c.injected.clone()),
            injections: cap.map(|c| c.injection.writes.clone()).unwrap_or_default(),
            outcome: cap.filter(|c| !c.injection.writes.is_empty()).map(|c| {
                judged::judge(&judged::Evidence {
                    exit: &outcome.exit,
                    kernel_panic: outcome.kernel_panic.as_deref(),
                    kernel_trouble: &outcome.kernel_trouble,
                    kernel_lines: &outcome.kernel_liveupdate,
                    after,
                    agent: after.and_then(|b| b.verdict).or(verdict),
                    written_after: c.written_after.as_ref(),
                    preserved: state.map(|st| &st.extents.set),
                })
            }),
            fields: state
                .map(|st| field_entries(&st.handover))
                .unwrap_or_default(),
            invariants,
            errors,
            agent_ok,
        });
    }

    let mut errors = Vec::new();
    let expected = workload.handovers();
    let seen = u32::try_from(rounds.len()).unwrap_or(u32::MAX);
    if seen < expected {
        errors.push(RunError::MissingHandovers { expected, seen });
    }
    match verdict {
        Some(v) if !v.passed() => errors.push(RunError::AgentFailed {
            step: v.step.name().to_owned(),
            errno: v.errno,
        }),
        Some(_) => {}
        None => errors.push(RunError::NoVerdict),
    }
    if let Some(line) = &outcome.kernel_panic {
        errors.push(RunError::KernelPanic(line.clone()));
    }
    match &outcome.exit {
        VmExit::Reset => {}
        VmExit::Timeout { after } => errors.push(RunError::Timeout(after.as_secs())),
        VmExit::Fatal { vcpu, exit } => {
            errors.push(RunError::VmDied(format!("vCPU {vcpu}: {exit}")))
        }
        VmExit::Ended => errors.push(RunError::VmDied("the run was ended early".into())),
    }
    let verified = guest_ok
        && if workload.hands_over() {
            seen >= expected && rounds.iter().all(|r| r.verified)
        } else {
            !selftests.is_empty() && selftests.iter().all(SelftestReport::passed)
        };
    RunReport {
        run: RunInfo {
            kvm: match &outcome.backend {
                KvmBackend::Hardware { .. } => "hardware".into(),
                KvmBackend::Emulated { .. } => "emulated".into(),
            },
            kernel: guest.image.as_ref().map(|i| i.kernel_version.clone()),
            vcpus: opts.vcpus,
            mem_bytes: opts.mem,
            peak_rss_bytes: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|t| vm_hwm_bytes(&t)),
            workload: workload.kernel_params(),
        },
        rounds,
        selftests,
        agent: AgentSummary {
            cpus_online: outcome.agent.first_cpus_online(),
            verdict: verdict.map(|v| {
                if v.passed() {
                    "pass".to_owned()
                } else {
                    v.step.name().to_owned()
                }
            }),
            errno: verdict.map_or(0, |v| v.errno),
            messages: outcome.agent.messages.len() as u64,
            decode_errors: outcome.agent.error_count,
            dropped: outcome.agent.dropped,
        },
        guest_ok,
        errors,
        verified,
    }
}

/// `VmHWM` (peak resident set) of a /proc/PID/status text, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The text report.
pub(crate) fn render_text(report: &RunReport) -> String {
    let mut s = String::new();
    for (i, r) in report.rounds.iter().enumerate() {
        let _ = writeln!(s, "\n== handover {} of {} ==", i + 1, report.rounds.len());
        let origin = r.marks.first().map_or(0, |m| m.t_ns);
        for m in &r.marks {
            let _ = writeln!(
                s,
                "mark {:<20} +{}",
                m.name,
                human_duration(m.t_ns.saturating_sub(origin))
            );
        }
        let _ = write!(s, "{}", r.handover);
        if let Some(w) = &r.handover.pages_written {
            let pages = r.handover.extents.bytes / 4096;
            let _ = writeln!(s, "{} preserved pages written (of {pages} preserved pages) between point-of-no-return and next-kernel-start", w.preserved);
        }
        for e in &r.extent_list {
            let _ = writeln!(
                s,
                "  extent {:#012x} + {:>10}  {}",
                e.start,
                human_bytes(e.len),
                e.owner
            );
        }
        for c in &r.invariants {
            let _ = writeln!(s, "invariant: {c}");
        }
        let _ = writeln!(
            s,
            "luo-vmm hook time (guest stopped, included above): {}",
            human_duration(r.hook_ns)
        );
        for h in &r.hooks {
            let _ = writeln!(s, "  hook {h}");
        }
        let count = |n: Option<u16>| n.map_or("?".to_owned(), |n| n.to_string());
        let c = r.cpus_online;
        let _ = writeln!(
            s,
            "CPUs online: {} before the handover, {} in the next kernel (of {} vCPUs){}",
            count(c.before),
            count(c.after),
            c.vcpus,
            if c.all_up_after() { "" } else { ": NOT ALL UP" }
        );
        if let Some(inv) = &r.inventory {
            match inv.totals {
                Some(t) => {
                    let _ = writeln!(
                        s,
                        "agent preserved: {} sessions, {} files, {} bytes",
                        t.sessions, t.files, t.bytes
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "agent preserved (incomplete): {} sessions, {} files",
                        inv.sessions.len(),
                        inv.files.len()
                    );
                }
            }
        }
        if let Some(c) = r.checked {
            let _ = writeln!(
                s,
                "agent checked: {} sessions, {} files, {} bytes",
                c.sessions, c.files, c.bytes
            );
        }
        if let Some(t) = &r.selftest {
            let _ = writeln!(s, "selftest {t}");
        }
        for a in &r.failed_actions {
            let _ = writeln!(
                s,
                "failed action: {} {} returned {} ({})",
                a.action,
                a.arg,
                a.ret,
                std::io::Error::from_raw_os_error(a.errno)
            );
        }
        if let Some(inj) = &r.injected {
            let _ = writeln!(s, "injected: {inj}");
        }
        if let Some(o) = &r.outcome {
            write_outcome(&mut s, o);
        }
        for e in &r.errors {
            let _ = writeln!(s, "error: {e}");
        }
        let _ = writeln!(s, "verified: {}", if r.verified { "yes" } else { "NO" });
    }
    if !report.selftests.is_empty() {
        let _ = writeln!(s);
    }
    for t in &report.selftests {
        let _ = writeln!(s, "selftest {t}");
    }
    for e in &report.errors {
        let _ = writeln!(s, "error: {e}");
    }
    let hold: u64 = report.rounds.iter().map(|r| r.hook_ns).sum();
    let _ = writeln!(
        s,
        "\nluo-vmm held the guest {} in {} handovers ({} guest); peak memory of the luo-vmm process {}",
        human_duration(hold),
        report.rounds.len(),
        human_bytes(report.run.mem_bytes),
        report.run.peak_rss_bytes.map_or("?".into(), human_bytes)
    );
    let word = match (report.rounds.is_empty(), report.verified) {
        (false, true) => "VERIFIED",
        (false, false) => "NOT VERIFIED",
        (true, true) => "PASSED",
        (true, false) => "FAILED",
    };
    let _ = writeln!(s, "\nresult: {word}");
    s
}

/// Writes `report` as JSON to `path`.
pub(crate) fn write_json(report: &RunReport, path: &Path) -> Result<(), ReportError> {
    let json = serde_json::to_string_pretty(report).map_err(|e| ReportError::Io {
        path: path.into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, json + "\n").map_err(|source| ReportError::Io {
        path: path.into(),
        source,
    })
}

/// Reads a report written by `--json`.
pub fn read_json(path: &Path) -> Result<RunReport, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ReportError::Parse {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    #[test]
    fn peak_memory_from_proc_status() {
        let status = "Name:\tluo-vmm\nVmPeak:\t  900 kB\nVmHWM:\t  612 kB\nVmRSS:\t 10 kB\n";
        assert_eq!(super::vm_hwm_bytes(status), Some(612 * 1024));
        assert_eq!(super::vm_hwm_bytes("VmRSS: 1 kB"), None);
        assert_eq!(super::vm_hwm_bytes("VmHWM: lots kB"), None);
    }

    use clap::Parser;
    use luo_devices::ProbeEvent;
    use luo_handover::extents::DirtyClassification;
    use luo_handover::timeline::Timeline;
    use luo_protocol::message::{AgentVerdict, FailedStep, Message, SessionName};
    use luo_protocol::workload::{Memfds, Selftest};
    use luo_protocol::TapCounts;

    use super::*;
    use crate::config::options::{Cli, Command};
    use crate::run::agent::AgentLog;

    fn opts() -> GuestOptions {
        match Cli::try_parse_from(["luo-vmm", "boot"]).unwrap().command {
            Command::Boot(b) => b.guest,
            other => panic!("{other:?}"),
        }
    }

    fn outcome(msgs: Vec<Message>) -> GuestOutcome {
        let mut agent = AgentLog::default();
        let at = Instant::now();
        for m in msgs {
            agent.push(&ProbeEvent { item: Ok(m), at });
        }
        GuestOutcome {
            exit: VmExit::Reset,
            boots: agent.boots(),
            agent,
            kernel_panic: None,
            kernel_trouble: vec![],
            kernel_liveupdate: vec![],
            kernel_cpus: vec![],
            started: at,
            vcpus: 1,
            backend: KvmBackend::Emulated { why: "test".into() },
        }
    }

    fn guest() -> ResolvedGuest {
        ResolvedGuest {
            kernel: "/vmlinux".into(),
            initrd: None,
            image: None,
        }
    }

    /// One whole handover's marks, and a capture whose dirty log saw no preserved page.
    fn one_handover() -> Interception {
        let mut timeline = Timeline::new();
        for (i, m) in (0u64..).zip(Mark::ALL) {
            timeline.record(m, 1_000 + i * 1_000_000);
        }
        Interception {
            timeline,
            rounds: vec![RoundCapture {
                dirty: Some(Ok(DirtyClassification {
                    preserved: vec![],
                    scratch: 10,
                    other: vec![],
                    ..Default::default()
                })),
                ..RoundCapture::default()
            }],
        }
    }

    fn stage(selftest: Option<(Stage, i32)>, extra: Vec<Message>) -> Vec<Message> {
        let mut v = vec![Message::UserspaceUp { cpus_online: 1 }];
        if let Some((stage, code)) = selftest {
            v.push(Message::Selftest(SelftestResult {
                stage: Some(stage),
                status: ExitStatus::Exited(code),
                tap: TapCounts::default(),
            }));
        }
        v.extend(extra);
        v
    }

    #[test]
    fn a_single_stage_selftest_has_no_rounds_and_its_tap_counts() {
        let tap = TapCounts {
            pass: 13,
            fail: 2,
            ..TapCounts::default()
        };
        let msgs = vec![
            Message::UserspaceUp { cpus_online: 1 },
            Message::Selftest(SelftestResult {
                stage: None,
                status: ExitStatus::Exited(1),
                tap,
            }),
            Message::Verdict(AgentVerdict::fail(FailedStep::Selftest, 0)),
        ];
        let w = Workload::Selftest(Selftest::Liveupdate);
        let r = build_report(&outcome(msgs), Interception::empty(), &opts(), &guest(), w);
        assert!(r.rounds.is_empty() && !r.verified && !r.guest_ok);
        assert_eq!(
            (
                r.selftests[0].passed,
                r.selftests[0].failed,
                r.selftests[0].stage
            ),
            (13, 2, None)
        );
        assert_eq!(
            r.errors,
            vec![RunError::AgentFailed {
                step: "selftest".into(),
                errno: 0
            }]
        );
        assert!(render_text(&r).contains("result: FAILED"));
    }

    #[test]
    fn a_round_takes_its_inventory_and_check_from_the_boots_around_it() {
        let totals = |files| Message::InventoryEnd {
            sessions: 1,
            files,
            bytes: 4096,
        };
        let checked = Message::Verified {
            sessions: 1,
            files: 1,
            bytes: 4096,
        };
        let session = Message::InventorySession {
            session: 0,
            name: SessionName::new("luo-vmm-s0").unwrap(),
        };
        let run = |inventory_files| {
            let mut msgs = stage(None, vec![session.clone(), totals(inventory_files)]);
            msgs.extend(stage(
                None,
                vec![checked.clone(), Message::Verdict(AgentVerdict::PASS)],
            ));
            let w = Workload::Handover(Memfds {
                memfd_size: 4096,
                ..Memfds::default()
            });
            build_report(&outcome(msgs), one_handover(), &opts(), &guest(), w)
        };
        let r = run(1);
        let round = &r.rounds[0];
        assert!(r.guest_ok && round.agent_ok && round.handover.intact);
        assert_eq!(
            round.inventory.as_ref().unwrap().sessions[0].name,
            "luo-vmm-s0"
        );
        assert_eq!(round.checked.map(|c| c.bytes), Some(4096));
        // The KHO state was not read in this fake capture: that is an error of the round.
        assert_eq!(round.errors, vec![RoundError::KhoStateNotRead]);
        assert!(!round.verified && !r.verified);
        // What the agent checked is not what it preserved: not the agent's success.
        assert!(!run(2).rounds[0].agent_ok);
        // The typed report survives JSON both ways.
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<RunReport>(&json).unwrap(), r);
    }

    #[test]
    fn fields_and_injections_are_in_the_json_and_only_the_line_in_the_text() {
        use crate::watch::injector::{at_next_kernel_start, tests::captured};
        use crate::watch::intercept::HandoverState;
        use luo_handover::inject::InjectSpec;
        let (h, ram) = captured();
        let round = |spec: &str| {
            let specs = [InjectSpec::parse(spec).unwrap()];
            let injection = at_next_kernel_start(&ram, Some(&h), &specs);
            let mut i = one_handover();
            let cap = &mut i.rounds[0];
            cap.injected = injection.summary.clone();
            cap.injection = injection;
            cap.handover = Some(Ok(HandoverState {
                extents: h.preserved_extents(),
                scratch: h.scratch.clone(),
                handover: h.clone(),
            }));
            let w = Workload::Handover(Memfds::default());
            build_report(&outcome(vec![]), i, &opts(), &guest(), w)
        };
        let r = round("compatible=\"memfd-v3\"");
        let rr = &r.rounds[0];
        let f = rr
            .fields
            .iter()
            .find(|f| f.path == "luo.session[0].file[0].compatible")
            .unwrap();
        assert_eq!((f.gpa, f.width), (0x276010, 48));
        assert_eq!(
            f.value,
            Value::Text("memfd-v2".into()),
            "as parsed, before the write"
        );
        assert_eq!(rr.injections[0].new, Value::Text("memfd-v3".into()));
        assert!(rr.errors.is_empty(), "{:?}", rr.errors);
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        let first = &json["rounds"][0]["fields"][0];
        assert_eq!(first["path"], "kho.data.fdt_addr");
        assert_eq!(first["value"], 0x221000);
        let text = render_text(&r);
        assert!(text.contains(
            "injected: luo.session[0].file[0].compatible at 0x276010: \"memfd-v2\" -> \"memfd-v3\""
        ));
        assert!(!text.contains("kho.data.fdt_addr"), "fields are JSON only");
        // The injected round is judged: no agent message at all, so the agent never came
        // up; no dirty log after next-kernel-start, so no leak check.
        let judged = rr
            .outcome
            .as_ref()
            .expect("an injected round has an outcome");
        assert_eq!(judged.verdict, InjectionVerdict::Crashed);
        assert!(
            text.contains("verdict: crashed (the agent never came up in the next kernel)")
                && text.contains("leak check: not run"),
            "{text}"
        );
        // An unknown path: a clear error of the round, nothing injected.
        let r = round("luo.session[0].file[0].compatibel='x'");
        let rr = &r.rounds[0];
        assert!(rr.injected.is_none() && rr.injections.is_empty() && !rr.verified);
        assert!(render_text(&r).contains(
            "error: inject: nothing injected: no field luo.session[0].file[0].compatibel in \
             this handover; did you mean luo.session[0].file[0].compatible?"
        ));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<RunReport>(&json).unwrap(), r);
    }

    /// A round whose guest succeeded, with the captured handover's state as read at
    /// next-kernel-start, after `edit` changed that state.
    fn captured_round(edit: impl FnOnce(&mut Handover)) -> RunReport {
        use crate::watch::injector::tests::captured;
        use crate::watch::intercept::HandoverState;
        let (mut h, _) = captured();
        edit(&mut h);
        let mut i = one_handover();
        i.rounds[0].handover = Some(Ok(HandoverState {
            extents: h.preserved_extents(),
            scratch: h.scratch.clone(),
            handover: h,
        }));
        let mut msgs = stage(None, vec![]);
        msgs.extend(stage(
            None,
            vec![
                Message::Verified {
                    sessions: 1,
                    files: 1,
                    bytes: 4096,
                },
                Message::Verdict(AgentVerdict::PASS),
            ],
        ));
        let w = Workload::Handover(Memfds::default());
        build_report(&outcome(msgs), i, &opts(), &guest(), w)
    }

    #[test]
    fn every_round_carries_its_invariants_and_a_violated_one_is_not_verified() {
        let r = captured_round(|_| {});
        let rr = &r.rounds[0];
        assert_eq!(
            rr.invariants.len(),
            luo_handover::invariants::Invariant::ALL.len()
        );
        assert!(rr.invariants.iter().all(|c| c.held), "{:?}", rr.invariants);
        assert!(rr.verified && r.verified, "{:?}", rr.errors);
        let text = render_text(&r);
        for line in [
            "invariant: no preserved extent overlaps a scratch area: held",
            "invariant: no page is owned by two records: held",
            "invariant: every page the records point at is itself preserved: held",
            "invariant: every preserved file's compatible is understood (unknown ones listed): held",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line}\n{text}");
        }
        let json = serde_json::to_value(&r).unwrap();
        let first = &json["rounds"][0]["invariants"][0];
        assert_eq!(first["id"], "no-scratch-overlap");
        assert_eq!(first["held"], true);
        assert_eq!(first["count"], 0);

        // The first preserved extent becomes a scratch area: the guest still succeeded, the
        // round is not verified (exit status 4), and the text says which extent.
        let r = captured_round(|h| {
            let first = h
                .preserved_extents()
                .set
                .iter()
                .next()
                .map(|e| (e.start, e.len()));
            let (addr, size) = first.unwrap();
            h.scratch
                .push(luo_handover::kho::ScratchArea { addr, size });
        });
        let rr = &r.rounds[0];
        assert!(r.guest_ok && rr.agent_ok && rr.handover.intact && rr.errors.is_empty());
        assert!(!rr.verified && !r.verified);
        let text = render_text(&r);
        let line = text
            .lines()
            .find(|l| l.starts_with("invariant: no preserved extent overlaps a scratch area"))
            .unwrap();
        assert!(line.contains(": VIOLATED: "), "{line}");
        assert!(text.contains("result: NOT VERIFIED"));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<RunReport>(&json).unwrap(), r);
    }

    #[test]
    fn reports_without_invariants_still_read() {
        let r = captured_round(|_| {});
        let mut json = serde_json::to_value(&r).unwrap();
        let round = json["rounds"][0].as_object_mut().unwrap();
        assert!(round.remove("invariants").is_some());
        let back: RunReport = serde_json::from_value(json).unwrap();
        assert!(back.rounds[0].invariants.is_empty());
        assert_eq!(back.rounds[0].verified, r.rounds[0].verified);
    }

    #[test]
    fn a_two_stage_selftest_is_judged_by_its_stage_two() {
        let mut msgs = stage(Some((Stage::One, 0)), vec![]);
        msgs.extend(stage(
            Some((Stage::Two, 1)),
            vec![Message::Verdict(AgentVerdict::fail(
                FailedStep::Selftest,
                0,
            ))],
        ));
        let w = Workload::Selftest(Selftest::KexecSimple);
        let r = build_report(&outcome(msgs), one_handover(), &opts(), &guest(), w);
        assert_eq!(r.selftests.len(), 2);
        assert_eq!(
            r.rounds[0].selftest.as_ref().and_then(|t| t.exit_code),
            Some(1)
        );
        assert!(!r.rounds[0].agent_ok);
    }

    #[test]
    fn a_round_counts_the_cpus_of_both_kernels() {
        let w = Workload::Handover(Memfds::default());
        let up = |n| Message::UserspaceUp { cpus_online: n };
        let mut two = opts();
        two.vcpus = 2;
        let msgs = vec![up(2), up(1), Message::Verdict(AgentVerdict::PASS)];
        let r = build_report(&outcome(msgs), one_handover(), &two, &guest(), w);
        let c = r.rounds[0].cpus_online;
        assert_eq!((c.vcpus, c.before, c.after), (2, Some(2), Some(1)));
        assert!(!c.all_up_after() && !r.rounds[0].verified);
        assert!(render_text(&r).contains(
            "CPUs online: 2 before the handover, 1 in the next kernel (of 2 vCPUs): NOT ALL UP"
        ));
        let msgs = vec![up(2), up(2), Message::Verdict(AgentVerdict::PASS)];
        let r = build_report(&outcome(msgs), one_handover(), &two, &guest(), w);
        assert!(r.rounds[0].cpus_online.all_up_after());
    }

    #[test]
    fn missing_handovers_and_verdicts_are_typed_errors() {
        let w = Workload::Handover(Memfds {
            repeat: 2,
            ..Memfds::default()
        });
        let r = build_report(
            &outcome(stage(None, vec![])),
            one_handover(),
            &opts(),
            &guest(),
            w,
        );
        assert!(r.errors.contains(&RunError::MissingHandovers {
            expected: 2,
            seen: 1
        }));
        assert!(r.errors.contains(&RunError::NoVerdict));
        assert!(!r.verified);
    }
}
