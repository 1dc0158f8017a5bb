//! One scheduled run of a scenario in a guest machine: the handover interception and the
//! scenario's schedule as one observer, the hooks armed within each vCPU's four debug
//! registers, the run, and the facts its verdict is decided on. `luo-vmm scenario run`
//! makes N of these; `luo-vmm explore` makes one per trial, every one from the same
//! snapshot, decided at point-of-no-return (docs/explore.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luo_devices::{Gates, ProbeEvent};
use luo_handover::extents::ExtentSet;
use luo_handover::symbols::KernelSymbols;
use luo_handover::timeline::Mark;
use luo_protocol::workload::Workload;
use serde::Serialize;
use thiserror::Error;

use crate::config::options::{GuestOptions, InterceptOptions};
use crate::config::scenario::Scenario;
use crate::judge::scenario::{belief, discrepancies, judge, Judgement, RunFacts};
use crate::machine::debug::MAX_BREAKPOINTS;
use crate::machine::dirty::DirtyLog;
use crate::machine::vcpu::control::VcpuControl;
use crate::machine::vcpu::run::{HookAction, VcpuNotice};
use crate::machine::vm::{RunObserver, StoppedVcpu, VmExit};
use crate::report::RoundSeen;
use crate::run::guest::{GuestError, GuestMachine, GuestOutcome, ResolvedGuest, SnapshotPoint};
use crate::run::next::KernelSequence;
use crate::watch::intercept::{
    EndMarks, InterceptPoint, Interception, Interceptor, SessionEnds, WrittenPages,
};
use crate::watch::schedule::{ArmedHook, ScheduleLog, Scheduler, TimelineEntry};

/// Errors of arming and running a scenario.
#[derive(Debug, Error)]
pub enum TrialError {
    /// A symbol a hook or the interception needs.
    #[error("{what}: {why}")]
    Symbol {
        /// Which hook.
        what: String,
        /// Why.
        why: String,
    },
    /// More hooks on a vCPU than it has debug registers.
    #[error(
        "vCPU {vcpu} needs {n} breakpoints (the interception's and the scenario's hooks); x86 has {MAX_BREAKPOINTS}"
    )]
    TooManyHooks {
        /// The vCPU.
        vcpu: u8,
        /// How many it needs.
        n: usize,
    },
    /// Running the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// Who a debug-register slot of a vCPU belongs to, when the interception and a scenario's
/// hooks share the four.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakpointOwner {
    /// One of the interception's points.
    Intercept(InterceptPoint),
    /// The scheduler's `n`th hook on that vCPU.
    Hook(usize),
}

/// The owners of `vcpu`'s slots: the interception's breakpoints first, the scenario's
/// hooks after them.
fn breakpoint_owners(
    interceptor: &Interceptor,
    scheduler: &Scheduler,
    vcpu: u8,
) -> Vec<BreakpointOwner> {
    let points = interceptor.breakpoints(vcpu).len();
    let hooks = scheduler.breakpoints(vcpu).len();
    InterceptPoint::ALL[..points.min(InterceptPoint::ALL.len())]
        .iter()
        .map(|&p| BreakpointOwner::Intercept(p))
        .chain((0..hooks).map(BreakpointOwner::Hook))
        .collect()
}

/// The interception and the scenario's schedule as one observer.
struct ScenarioObserver {
    interceptor: Interceptor,
    scheduler: Scheduler,
    /// End the run at point-of-no-return (the outgoing state is complete there).
    decide_at_point_of_no_return: bool,
    /// Keep the timeout's report of each vCPU instead of printing it.
    keep_timeout_reports: bool,
    /// The timeout's report of each vCPU, when kept.
    timeout_reports: std::sync::Mutex<Vec<String>>,
    /// Per vCPU, the owner of each armed slot (fixed for the run; not rebuilt per hit).
    owners: Vec<Vec<BreakpointOwner>>,
    /// A snapshot may be taken though the interception has acted: the runs from it do not
    /// intercept ([`RunPlan::intercept_until_snapshot`]).
    snapshot_ignores_interception: bool,
    /// [`RunPlan::watch_preserved`].
    watch: Option<PreservedWatch>,
    /// Which messages start a session's end in the next kernel (the dirty log is read
    /// there: [`EndMarks`]).
    session_ends: SessionEnds,
}

/// A preserved set whose written pages the run reads from the dirty log as each session's
/// end starts and at its end, and what it read there.
struct PreservedWatch {
    set: Arc<ExtentSet>,
    ends: std::sync::Mutex<EndMarks>,
    /// `(gpa, owner)` of every page written, and per session the pages before its end;
    /// once the run stopped.
    written: std::sync::Mutex<Option<WrittenPages>>,
}

impl ScenarioObserver {
    fn new(interceptor: Interceptor, scheduler: Scheduler, vcpus: u8, plan: &RunPlan) -> Self {
        let owners = (0..vcpus)
            .map(|v| breakpoint_owners(&interceptor, &scheduler, v))
            .collect();
        Self {
            interceptor,
            scheduler,
            decide_at_point_of_no_return: plan.decide_at_point_of_no_return,
            keep_timeout_reports: plan.keep_timeout_reports,
            timeout_reports: std::sync::Mutex::default(),
            owners,
            snapshot_ignores_interception: plan.intercept_until_snapshot,
            watch: plan.watch_preserved.clone().map(|set| PreservedWatch {
                set,
                ends: std::sync::Mutex::default(),
                written: std::sync::Mutex::default(),
            }),
            session_ends: SessionEnds::default(),
        }
    }

    /// The watched set's pages written during the run, if watched.
    fn preserved_written(&self) -> Option<WrittenPages> {
        let watch = self.watch.as_ref()?;
        let mut written = watch.written.lock().unwrap_or_else(|e| e.into_inner());
        written.take()
    }
}

impl RunObserver for ScenarioObserver {
    fn breakpoints(&self, vcpu: u8) -> Vec<u64> {
        let mut b = self.interceptor.breakpoints(vcpu);
        b.extend(self.scheduler.breakpoints(vcpu));
        b
    }

    fn attach(&self, control: &Arc<VcpuControl>, started: std::time::Instant) {
        self.scheduler.attach(control, started);
    }

    fn quiescent(&self) -> bool {
        self.scheduler.quiescent()
            && (self.snapshot_ignores_interception || self.interceptor.quiescent())
    }

    fn on_notice(&self, notice: VcpuNotice) {
        self.scheduler.on_notice(notice);
    }

    fn on_breakpoint(&self, at: StoppedVcpu<'_>, slot: usize, pc: u64) -> HookAction {
        let owner = self
            .owners
            .get(usize::from(at.vcpu.id))
            .and_then(|o| o.get(slot));
        match owner {
            Some(&BreakpointOwner::Intercept(point)) => {
                self.scheduler
                    .mark(std::time::Instant::now(), &point.describe());
                let action = self.interceptor.on_breakpoint(at, slot, pc);
                if point == InterceptPoint::PointOfNoReturn && self.decide_at_point_of_no_return {
                    self.scheduler.end_run("decided at point-of-no-return");
                }
                action
            }
            Some(&BreakpointOwner::Hook(n)) => self.scheduler.on_breakpoint(&at, n),
            None => HookAction::Continue,
        }
    }

    fn on_probe(&self, ev: &ProbeEvent) {
        self.interceptor.on_probe(ev);
    }

    fn on_probe_now(&self, ev: &ProbeEvent, dirty: &DirtyLog) {
        self.scheduler.on_probe(ev);
        if let Some(session) = self.session_ends.starts(ev) {
            match &self.watch {
                Some(watch) => match dirty.take() {
                    Ok(maps) => watch
                        .ends
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .end_starts(&session, &watch.set, &maps),
                    Err(e) => log::warn!("KVM_GET_DIRTY_LOG as {session}'s end starts: {e}"),
                },
                None => self.interceptor.on_session_end(&session, dirty),
            }
        }
    }

    fn on_stopped(&self, dirty: &DirtyLog) {
        match &self.watch {
            // The log runs over the whole guest while a snapshot is kept: this read also
            // goes into what the next reset writes back.
            Some(watch) => match dirty.take() {
                Ok(maps) => {
                    let mut ends =
                        std::mem::take(&mut *watch.ends.lock().unwrap_or_else(|e| e.into_inner()));
                    ends.add(&watch.set, &maps);
                    *watch.written.lock().unwrap_or_else(|e| e.into_inner()) = Some(ends.finish());
                }
                Err(e) => log::warn!(
                    "KVM_GET_DIRTY_LOG at the end of the run: {e}; the preserved pages it \
                     wrote are not known"
                ),
            },
            None => self.interceptor.on_stopped(dirty),
        }
    }

    fn on_timeout_report(&self, _vcpu: u8, report: &str) {
        if self.keep_timeout_reports {
            self.timeout_reports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(report.to_owned());
        } else {
            eprintln!("{report}");
        }
    }
}

/// What one run gave.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// 1-based.
    pub run: u32,
    /// Whether the run started from a snapshot (else it booted).
    pub from_snapshot: bool,
    /// The verdict and why.
    pub judgement: Judgement,
    /// The schedule as it happened.
    pub timeline: Vec<TimelineEntry>,
    /// Why the handover is not verified, check by check (empty when it is, or without a
    /// handover).
    pub handover_not_verified: Vec<String>,
    /// The detector's findings (`null` without a handover).
    pub discrepancies: Option<Vec<String>>,
    /// Oops, BUG, WARNING, panic lines.
    pub kernel_trouble: Vec<String>,
    /// How the VM ended.
    pub vm_exit: String,
    /// The console log.
    pub console_log: PathBuf,
}

/// Resolves each hook's address in `syms`; checks each vCPU's breakpoint budget.
pub(crate) fn arm(
    sc: &Scenario,
    syms: &KernelSymbols,
    interceptor: &Interceptor,
    vcpus: u8,
) -> Result<Vec<ArmedHook>, TrialError> {
    let hooks = sc
        .hooks
        .iter()
        .map(|h| {
            let base = syms.address(&h.at.symbol).map_err(|e| TrialError::Symbol {
                what: format!("hook {} at {}", h.name, h.at.symbol),
                why: e.to_string(),
            })?;
            Ok(ArmedHook {
                hook: h.clone(),
                addr: base.wrapping_add(h.at.offset),
            })
        })
        .collect::<Result<Vec<_>, TrialError>>()?;
    for v in 0..vcpus {
        let n =
            interceptor.breakpoints(v).len() + hooks.iter().filter(|h| h.hook.vcpus.has(v)).count();
        if n > MAX_BREAKPOINTS {
            return Err(TrialError::TooManyHooks { vcpu: v, n });
        }
    }
    Ok(hooks)
}

/// The interception of a scenario's one handover: into the kernel itself, or into the
/// next kernel (`--next-*`) when its symbols are given; scenarios take no digests.
pub(crate) fn interceptor(
    syms: &KernelSymbols,
    next: Option<&KernelSymbols>,
    no_intercept: bool,
    no_dirty_log: bool,
) -> Result<Interceptor, TrialError> {
    let (kernels, sequence) = match next {
        Some(n) => (vec![syms, n], KernelSequence::cross(false)),
        None => (vec![syms], KernelSequence::same()),
    };
    let options = InterceptOptions {
        no_intercept,
        no_dirty_log,
        ..InterceptOptions::default()
    };
    Interceptor::for_kernels(&kernels, sequence, 1, options).map_err(|e| TrialError::Symbol {
        what: "the interception".to_owned(),
        why: e.to_string(),
    })
}

/// The facts of one run, and why its handover is not verified (empty if it is, or if
/// there was none).
fn facts(outcome: &GuestOutcome, got: &Interception, log: &ScheduleLog) -> (RunFacts, Vec<String>) {
    let agent_boots = &outcome.boots;
    // Stage 2 ran its steps to the end (its verdict passed: /dev/liveupdate opened) and
    // every one succeeded.
    let stage2_ok = agent_boots.get(1).is_some_and(|b| {
        b.verdict.is_some_and(|v| v.passed())
            && b.calls
                .iter()
                .all(|c| c.result.is_some_and(|(r, _)| r >= 0))
    });
    let agent_boots_cpus: Vec<Option<u16>> = agent_boots.iter().map(|b| b.cpus_online).collect();
    let boots: Vec<_> = agent_boots.iter().map(|b| b.calls.clone()).collect();
    let capture = got.rounds.first();
    // The records of the first handover: those the next kernel got or, for a run decided
    // at point-of-no-return, those the outgoing kernel handed over.
    let records = match capture.and_then(|c| c.handover.as_ref()) {
        Some(Ok(st)) => Some(Ok(st.handover.luo.as_ref())),
        Some(Err(e)) => Some(Err(e.clone())),
        None => got
            .outgoing
            .first()
            .map(|o| o.as_ref().map(Option::as_ref).map_err(Clone::clone)),
    };
    let discrepancies = records.map(|records| match records {
        Ok(luo) => {
            let stage1 = boots.first().map_or(&[][..], Vec::as_slice);
            let believed = belief(stage1);
            match luo {
                Some(luo) => discrepancies(stage1, luo),
                None if believed.is_empty() => vec![],
                None => vec!["no LUO records arrived".into()],
            }
        }
        Err(e) => vec![format!("the LUO records could not be read: {e}")],
    });
    let mut kernel_trouble = outcome.kernel_trouble.clone();
    if let Some(p) = &outcome.kernel_panic {
        if !kernel_trouble.contains(p) {
            kernel_trouble.push(p.clone());
        }
    }
    if let VmExit::Fatal { vcpu, exit } = &outcome.exit {
        kernel_trouble.push(format!("vCPU {vcpu}: {exit}"));
    }
    // The one rule of judge::verified, over the first handover.
    let cpus_up = agent_boots_cpus
        .get(1)
        .copied()
        .flatten()
        .is_some_and(|n| n >= u16::from(outcome.vcpus));
    let workload_ok = stage2_ok && kernel_trouble.is_empty();
    // A reboot that failed before point-of-no-return (the unwind scenarios) leaves a round
    // of marks with no handover: the handover is the first round that reached
    // point-of-no-return, the one the first capture belongs to.
    let rounds = got.timeline.rounds();
    let round = rounds
        .iter()
        .find(|r| r.get(Mark::PointOfNoReturn).is_some())
        .or(rounds.first())
        .map(|round| RoundSeen::of(round, capture));
    let handover_verified = round
        .as_ref()
        .is_some_and(|r| r.checks(cpus_up, workload_ok).verified());
    let not_verified = round.map_or_else(Vec::new, |r| r.unverified(cpus_up, workload_ok));
    let facts = RunFacts {
        handover_seen: capture.is_some(),
        point_of_no_return: !got.outgoing.is_empty(),
        handover_verified,
        boots,
        discrepancies,
        kernel_trouble,
        hooks_fired: log.fired.clone(),
        hold_timeouts: log.hold_timeouts.clone(),
        timed_out: matches!(outcome.exit, VmExit::Timeout { .. }),
        // The leak check of an intercepted run: since the (last) next kernel started.
        preserved_written: got
            .rounds
            .last()
            .and_then(|c| c.written_after.as_ref())
            .and_then(|w| w.as_ref().ok())
            .cloned(),
        written_before_end: got
            .rounds
            .last()
            .map(|c| c.written_before_end.clone())
            .unwrap_or_default(),
    };
    (facts, not_verified)
}

pub(crate) fn vm_exit(exit: &VmExit) -> String {
    match exit {
        VmExit::Reset => "reset".into(),
        VmExit::Timeout { after } => format!("timeout after {} s", after.as_secs()),
        VmExit::Fatal { vcpu, exit } => format!("vCPU {vcpu}: {exit}"),
        VmExit::Ended => "ended by the scenario".into(),
    }
}

/// The agent's parameters for `sc`.
pub(crate) fn script_params(sc: &Scenario) -> String {
    format!(
        "{} {}",
        Workload::Scenario.kernel_params(),
        sc.script.kernel_params()
    )
}

/// Room kept on the command line for what the agent adds for the next kernel
/// (`luo.stage=2 luo.round=N`).
const NEXT_KERNEL_PARAMS: usize = 32;

/// Whether `sc` fits a guest of `vcpus` vCPUs and `mem` bytes, and its script the kernel
/// command line; the reason when it does not.
pub(crate) fn check_fits(sc: &Scenario, vcpus: u8, mem: u64) -> Result<(), String> {
    let threads = sc.script.stage1.threads.iter();
    for t in threads.chain(&sc.script.stage2.threads) {
        if t.cpu >= u16::from(vcpus) {
            return Err(format!(
                "--vcpus {vcpus}: the scenario pins a thread to CPU {}",
                t.cpu
            ));
        }
    }
    for h in &sc.hooks {
        if let crate::config::scenario::VcpuSelect::One(v) = h.vcpus {
            if v >= vcpus {
                return Err(format!("--vcpus {vcpus}: hook {} is on vCPU {v}", h.name));
            }
        }
    }
    // Each memfd at the largest size a `memfd` or `truncate` step gives it (a fill writes
    // it whole), in either stage.
    let mut largest = std::collections::BTreeMap::new();
    let stages = [&sc.script.stage1, &sc.script.stage2];
    for step in stages
        .iter()
        .flat_map(|s| &s.threads)
        .flat_map(|t| &t.steps)
    {
        if let luo_protocol::script::Step::Memfd(id, size)
        | luo_protocol::script::Step::Truncate(id, size) = step
        {
            let at = largest.entry(*id).or_insert(0u64);
            *at = (*at).max(*size);
        }
    }
    let memfds: u64 = largest.values().fold(0u64, |a, &b| a.saturating_add(b));
    if memfds > mem / 2 {
        return Err(format!(
            "the scenario's memfds hold {memfds} bytes; a guest of {mem} bytes takes at most half of it (--mem)"
        ));
    }
    // The script travels on the kernel command line (x86: at most 2047 bytes), to both
    // kernels; the longest it can be is with the emulation profile's additions.
    let line = crate::run::cmdline::compose(
        true,
        Some(u32::MAX),
        &format!(
            "{} {} {}",
            sc.cmdline,
            script_params(sc),
            luo_protocol::workload::timeout_scale_param(
                luo_protocol::workload::EMULATED_TIMEOUT_SCALE
            )
        ),
    );
    let limit = crate::machine::layout::CMDLINE_MAX_SIZE - 1 - NEXT_KERNEL_PARAMS;
    if line.len() > limit {
        return Err(format!(
            "the kernel command line would be {} bytes, of which the scenario's steps take {} and its cmdline {}; \
             Linux takes at most {limit} here: fewer or shorter steps",
            line.len(),
            sc.script.kernel_params().len(),
            sc.cmdline.len()
        ));
    }
    Ok(())
}

/// What a scenario runs on: its guest, the kernels' symbols, the vCPUs.
pub(crate) struct Target<'a> {
    /// The scenario.
    pub sc: &'a Scenario,
    /// The guest's options (`--mem`, `--vcpus`, timeout, ...).
    pub opts: &'a GuestOptions,
    /// The guest's kernel and initramfs.
    pub guest: &'a ResolvedGuest,
    /// The kernel's symbols.
    pub syms: &'a KernelSymbols,
    /// The next kernel's symbols, when stage 2 runs in another kernel.
    pub next_syms: Option<&'a KernelSymbols>,
    /// vCPUs.
    pub vcpus: u8,
}

/// How one run goes.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunPlan {
    /// 1-based, for the messages.
    pub run: u32,
    /// Where its console goes.
    pub log: PathBuf,
    /// Where a run that boots keeps a snapshot.
    pub point: Option<SnapshotPoint>,
    /// End the run at the first point-of-no-return.
    pub decide_at_point_of_no_return: bool,
    /// Keep each vCPU's timeout report in the output instead of printing it.
    pub keep_timeout_reports: bool,
    /// No interception (no breakpoints of its own, no dirty log): a run whose snapshot is
    /// taken after a handover needs none before it (it would not be quiescent).
    pub no_intercept: bool,
    /// With `no_intercept`: the run that boots (and keeps the snapshot) intercepts its
    /// handover anyway, without a dirty log, to read the preserved set it hands over
    /// ([`RunOutput::handed_over`]); the snapshot after it is taken though the
    /// interception acted (the runs from it do not intercept, so need not replay it).
    pub intercept_until_snapshot: bool,
    /// A run from the snapshot reads, at its end, which pages of this preserved set it
    /// wrote (the dirty log since the reset): [`RunFacts::preserved_written`].
    pub watch_preserved: Option<Arc<ExtentSet>>,
    /// Say each reset on stderr.
    pub verbose: bool,
}

/// What one run gave, with what it was decided on.
pub(crate) struct RunOutput {
    /// The verdict, the timeline, the detector's lines.
    pub result: RunResult,
    /// The facts the verdict was decided on.
    pub facts: RunFacts,
    /// Per hook name: its armed hits on each vCPU.
    pub hits: std::collections::BTreeMap<String, Vec<u32>>,
    /// Where each vCPU was at the timeout (kept, not printed, for runs decided at
    /// point-of-no-return).
    pub timeout_reports: Vec<String>,
    /// Host time of the reset, the run, and the judging.
    pub times: RunTimes,
    /// The preserved set (with owners) the handover handed over, read at next-kernel-start,
    /// where the run intercepted one.
    pub handed_over: Option<ExtentSet>,
}

/// Host time of one run's parts, in ns.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RunTimes {
    /// Resetting the VM to the snapshot (0 when the run booted).
    pub reset_ns: u64,
    /// From the start of the vCPUs to the end of the run (the decision).
    pub run_ns: u64,
    /// Reading the interception and the schedule, and judging.
    pub judge_ns: u64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs `t.sc` once, its console in `plan.log`, the interception and the schedule armed,
/// the facts judged. From the snapshot `machine` keeps, reset to it, when it keeps one;
/// else a fresh VM from boot, which keeps a snapshot at `plan.point` if given.
pub(crate) fn run(
    t: &Target<'_>,
    machine: &mut Option<GuestMachine>,
    plan: &RunPlan,
) -> Result<RunOutput, TrialError> {
    let from_snapshot = machine.as_ref().is_some_and(GuestMachine::has_snapshot);
    // The boot of a machine whose runs do not intercept: it may still read its handover.
    let intercept_boot = plan.no_intercept && plan.intercept_until_snapshot && !from_snapshot;
    let interceptor = interceptor(
        t.syms,
        t.next_syms,
        plan.no_intercept && !intercept_boot,
        intercept_boot,
    )?;
    let hooks = arm(t.sc, t.syms, &interceptor, t.vcpus)?;
    let t0 = Instant::now();
    let m = match machine {
        Some(m) if from_snapshot => {
            let reset = m.reset()?;
            if plan.verbose {
                let clock = if reset.clock_ahead_ns > 0 {
                    format!(
                        "; the guest's clock {:.1} s ahead of the snapshot's",
                        reset.clock_ahead_ns as f64 * 1e-9
                    )
                } else {
                    String::new()
                };
                eprintln!(
                    "luo-vmm: run {}: reset to the snapshot ({} pages written back, {:.1} ms{clock})",
                    plan.run,
                    reset.pages,
                    reset.nanos as f64 * 1e-6
                );
            }
            m
        }
        _ => machine.insert(GuestMachine::boot(
            t.opts,
            t.guest,
            &script_params(t.sc),
            Gates::default(),
        )?),
    };
    let t1 = Instant::now();
    let watched = RunPlan {
        watch_preserved: plan.watch_preserved.clone().filter(|_| from_snapshot),
        ..plan.clone()
    };
    let observer = Arc::new(ScenarioObserver::new(
        interceptor,
        Scheduler::new(hooks, t.sc.gates.clone(), m.gates()).with_end(t.sc.end.clone()),
        t.vcpus,
        &watched,
    ));
    let outcome = m.run(
        Some(observer.clone() as Arc<dyn RunObserver>),
        Some(&plan.log),
        if from_snapshot {
            None
        } else {
            plan.point.clone()
        },
    )?;
    let t2 = Instant::now();
    if !from_snapshot && plan.point.is_some() {
        if let Some(why) = m.no_snapshot() {
            eprintln!(
                "luo-vmm: run {} kept no snapshot ({why}); the next runs boot",
                plan.run
            );
        }
    }
    let got = observer.interceptor.finish(outcome.started);
    let mut log_seen = observer.scheduler.finish();
    let (mut f, not_verified) = facts(&outcome, &got, &log_seen);
    if let Some((written, before_end)) = observer.preserved_written() {
        f.preserved_written = Some(written);
        f.written_before_end = before_end;
    }
    let handed_over = got
        .rounds
        .first()
        .and_then(|c| c.handover.as_ref())
        .and_then(|h| h.as_ref().ok())
        .map(|st| st.extents.set.clone());
    let hits = std::mem::take(&mut log_seen.hits);
    let timeout_reports = std::mem::take(
        &mut *observer
            .timeout_reports
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    let result = RunResult {
        run: plan.run,
        from_snapshot,
        judgement: judge(&t.sc.verdict, &f),
        timeline: log_seen.timeline,
        handover_not_verified: not_verified,
        discrepancies: f.discrepancies.clone(),
        kernel_trouble: f.kernel_trouble.clone(),
        vm_exit: vm_exit(&outcome.exit),
        console_log: plan.log.clone(),
    };
    let times = RunTimes {
        reset_ns: ns(t1 - t0),
        run_ns: ns(t2 - t1),
        judge_ns: ns(t2.elapsed()),
    };
    Ok(RunOutput {
        result,
        facts: f,
        hits,
        timeout_reports,
        times,
        handed_over,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENARIO: &str = r#"
name = "fits"
summary = "memfds, one truncated larger"
[stage1]
threads = [ { cpu = 0, steps = ["create 0", "memfd 0.0 64K", "truncate 0.0 SIZE", "memfd 0.1 64K", "reboot"] } ]
[verdict]
correct = ["records match"]
bug = ["records differ"]
"#;

    #[test]
    fn a_truncate_counts_toward_the_memory_a_scenario_needs() {
        let sc = |size: &str| Scenario::parse(&SCENARIO.replace("SIZE", size), "t.toml").unwrap();
        // 64 KiB + 64 KiB, then 8 KiB + 64 KiB (the largest size each file has) fit.
        assert_eq!(check_fits(&sc("32K"), 2, 512 << 20), Ok(()));
        assert_eq!(check_fits(&sc("8K"), 2, 512 << 20), Ok(()));
        let too_big = check_fits(&sc("100G"), 2, 512 << 20).unwrap_err();
        assert!(too_big.contains("memfds hold"), "{too_big}");
        let cpus = check_fits(&sc("8K"), 1, 512 << 20);
        assert!(cpus.is_ok(), "{cpus:?}");
    }
}
