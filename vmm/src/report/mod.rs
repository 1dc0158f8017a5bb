//! The run report: typed, one list of rounds (each with its marks, extents, hook time,
//! what the agent said about it, and typed errors), the selftests' TAP counts, and the
//! verdict. It is what `--json` writes and what the tests and `luo-vmm report` read back
//! (`serde`), and what the text report renders.

pub(crate) mod build;
pub mod stats;
pub(crate) mod table;
pub(crate) mod text;

pub(crate) use build::{build_report, RoundSeen};
pub(crate) use text::render_text;

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
use crate::judge::cross;
pub use crate::judge::cross::{CrossOutcome, CrossVerdict};
use crate::judge::injection as judged;
pub use crate::judge::injection::{
    InjectionOutcome, InjectionVerdict, LeakCheck, Received, WrittenPage,
};
use crate::judge::verified::HandoverChecks;
use crate::machine::host::KvmBackend;
use crate::machine::vm::VmExit;
use crate::run::agent::AgentBoot;
pub use crate::run::agent::{Counts, InventoryFile};
use crate::run::guest::{GuestOutcome, ResolvedGuest};
pub use crate::run::next::KernelId;
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

/// The two kernels of one handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundKernels {
    /// The outgoing kernel (A).
    pub from: KernelId,
    /// The next kernel (B).
    pub to: KernelId,
}

impl RoundKernels {
    /// Whether the handover went to another kernel (the cache keys differ).
    pub fn cross(&self) -> bool {
        self.from.key != self.to.key
    }
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
    /// The kernel this handover went from and the one it went to (release and cache key);
    /// `None` in reports written before kernels were named.
    #[serde(default)]
    pub kernels: Option<RoundKernels>,
    /// The verdict of this handover as one between two kernels (`judge::cross`; given
    /// whenever `kernels` is, A→A included): compatible, rejected, reused, crashed or
    /// accepted, why, and the evidence. The text report prints it when the kernels differ.
    #[serde(default)]
    pub cross: Option<CrossOutcome>,
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

    use super::build::vm_hwm_bytes;

    #[test]
    fn peak_memory_from_proc_status() {
        let status = "Name:\tluo-vmm\nVmPeak:\t  900 kB\nVmHWM:\t  612 kB\nVmRSS:\t 10 kB\n";
        assert_eq!(vm_hwm_bytes(status), Some(612 * 1024));
        assert_eq!(vm_hwm_bytes("VmRSS: 1 kB"), None);
        assert_eq!(vm_hwm_bytes("VmHWM: lots kB"), None);
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
            kernels: Vec::new(),
            outgoing: Vec::new(),
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
