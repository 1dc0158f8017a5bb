//! `luo-vmm explore`: the search for LUO bugs (docs/explore.md). The guest boots once with
//! the workload and the racing thread; a snapshot is kept where every thread waits at its
//! first gate; then every trial resets to it, arms its schedule, runs to point-of-no-return
//! (or the end of the workload, or its bound) and is judged by the oracles. Findings become
//! scenario files that `luo-vmm scenario run` reproduces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use luo_handover::extents::ExtentSet;
use luo_handover::symbols::KernelSymbols;
use luo_protocol::probe::Gate;
use luo_protocol::script::Step;
use serde::Serialize;
use thiserror::Error;

use crate::config::options::{ExploreArgs, ExploreStage, GuestOptions, Profile};
use crate::config::scenario::{
    Condition, EndRule, Leeway, Scenario, ScenarioFileError, Trigger, VerdictRules,
};
use crate::config::trace::TraceSpec;
use crate::explore::code::{read_code, read_restore_fail_messages, CodeError, Fallible};
use crate::explore::findings::{deterministic, group, plot, slug, table, totals, Finding, Totals};
use crate::explore::sites::{lock_sites, PointCheck, LOCK_FUNCTIONS};
use crate::explore::space::{
    check_workload, default_workload, explore_owns, finding_scenario, lock_words, map_trials,
    racing_calls, racing_calls2, reach_key, script, search_trials, stage_cmdline, trial_scenario,
    Reach, Release, Trial, Workload, ACTION2_GATE, ACTION_GATE, IDLE_SYMBOL, RACE2_GATE, RACE_GATE,
};
use crate::explore::store::{
    check_json_out, check_results_dir, list_digest, write_atomic, Confirmation, Manifest, Plan,
    Store, StoreError, TrialRecord,
};
use crate::judge::explore::{decide, excuse_deliberate_panic, Oracle, TrialVerdict};
use crate::run::guest::{GuestError, GuestMachine, ResolvedGuest, SnapshotPoint};
use crate::run::image::ImageError;
use crate::run::kernel::{load_symbols, KernelFileError};
use crate::trial::{self, check_fits, RunPlan, Target, TrialError};
use crate::watch::intercept::InterceptPoint;

/// Exit status of `explore` when it ended with findings.
pub const EXIT_FINDINGS: u8 = 6;

/// The release policies of race trials: settled, and a bounded hold (the racing call may
/// still be running when CPU 0 goes on).
const RELEASES: [Release; 2] = [Release::Settled, Release::AfterMs(2_000)];

/// Runs of a finding's trial again from the snapshot to confirm it.
const CONFIRM_RUNS: u32 = 3;

/// How long after its boot the boot trials' machine is used: then it boots again. On the
/// emulating KVM a reset cannot put the guest's clock back, and a stage-1 snapshot run on
/// through the kexec from more than ~7 minutes back left the first kernel's agent with a
/// zeroed thread pointer (docs/explore.md, "The next kernel's boot"); within this, dozens
/// of trials ran clean.
const BOOT_SNAPSHOT_AGE: Duration = Duration::from_secs(250);

/// Largest workload or points file read.
const MAX_INPUT: u64 = 1 << 20;

/// Errors of `luo-vmm explore`.
#[derive(Debug, Error)]
pub enum ExploreError {
    /// Bad options or input.
    #[error("{0}")]
    Options(String),
    /// A workload file that does not parse.
    #[error(transparent)]
    Workload(#[from] ScenarioFileError),
    /// The kernel's LUO/KHO code list.
    #[error(transparent)]
    Code(#[from] CodeError),
    /// The results directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Arming or running a trial.
    #[error(transparent)]
    Trial(#[from] TrialError),
    /// The guest image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The kernel's symbols.
    #[error(transparent)]
    Kernel(#[from] KernelFileError),
    /// Building the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Ctrl-C before the search began ([`EXIT_INTERRUPTED`]).
    #[error("{0}")]
    Interrupted(String),
}

/// The JSON report (`--json`, and `report.json` in `--out`).
#[derive(Debug, Serialize)]
pub struct ExploreReport {
    /// What was explored.
    pub manifest: Manifest,
    /// Hold points and fallible functions considered, and those the workload reaches.
    pub space: SpaceSummary,
    /// Totals and times.
    pub totals: Totals,
    /// One per signature.
    pub findings: Vec<Finding>,
    /// Whether every trial of the space (within the budget) ran.
    pub complete: bool,
    /// Why the search stopped before its end (`interrupted`, `--time reached`), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// The space, in counts and names.
#[derive(Debug, Serialize)]
pub struct SpaceSummary {
    /// Functions with an address in the kernel (hold points, map trials).
    pub points: usize,
    /// Those that return an error code.
    pub fallible: usize,
    /// Reached by the workload on the action's vCPU (race hold points).
    pub reached_on_action: Vec<String>,
    /// Reached anywhere, with their calls per vCPU.
    pub reached: BTreeMap<String, Vec<u32>>,
    /// Racing calls.
    pub calls: Vec<String>,
    /// Search trials in the space.
    pub search_trials: usize,
    /// The lock sites among the points: `FUNCTION+0xOFF` → the lock function whose call
    /// returns there (docs/explore.md, "The space").
    pub lock_sites: BTreeMap<String, String>,
}

/// Everything a trial needs, fixed for the exploration.
struct Explorer {
    w: Workload,
    /// Stage 1's machine's options.
    opts: GuestOptions,
    /// Stage 2's machine's: the same, with [`crate::explore::space::STAGE2_PARAMS`] on its
    /// command line.
    opts2: GuestOptions,
    guest: ResolvedGuest,
    syms: KernelSymbols,
    vcpus: u8,
    hold_max: Duration,
    hang_after: Duration,
    variant: Option<String>,
    kernel: String,
    started: Instant,
    /// Exploring seconds of earlier sessions of this `--out`.
    earlier_s: f64,
    /// The messages LUO panics with on purpose when it cannot restore what it was handed
    /// (`luo_restore_fail`, from the kernel's sources): the policy, not trouble.
    deliberate_panics: Vec<String>,
}

fn options(msg: impl Into<String>) -> ExploreError {
    ExploreError::Options(msg.into())
}

fn read_input(path: &Path, what: &str) -> Result<String, ExploreError> {
    let meta =
        std::fs::metadata(path).map_err(|e| options(format!("{what} {}: {e}", path.display())))?;
    if !meta.is_file() || meta.len() > MAX_INPUT {
        return Err(options(format!(
            "{what} {}: not a regular file of at most {MAX_INPUT} bytes",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| options(format!("{what} {}: {e}", path.display())))
}

/// A workload file: a scenario file (docs/scenarios.md) without hooks, whose stages,
/// gates and command line are the workload; its `[verdict]` may be left out (unused).
fn workload_from_file(path: &Path) -> Result<Workload, ExploreError> {
    let mut text = read_input(path, "--workload")?;
    // A workload has no verdict of its own (the oracles judge): one is supplied if the
    // file has none, so that it parses as a scenario file.
    let has_verdict = text.lines().any(|l| l.trim() == "[verdict]");
    if !has_verdict {
        text.push_str("\n[verdict]\ncorrect = [\"records match\"]\nbug = [\"records differ\"]\n");
    }
    // Explore replaces the rules of its action gates and adds the racing thread, which
    // waits at its race gates: what those name is not the file's to make.
    let gate = |id: u8| Gate::new(id).into_iter();
    let leeway = Leeway {
        replaced_rules: gate(ACTION_GATE).chain(gate(ACTION2_GATE)).collect(),
        waited_outside: gate(RACE_GATE).chain(gate(RACE2_GATE)).collect(),
    };
    let sc = Scenario::parse_with(&text, &path.display().to_string(), &leeway)?;
    if !sc.hooks.is_empty() {
        return Err(options(format!(
            "--workload {}: has hooks; a workload is steps and gates, explore arms the hooks",
            path.display()
        )));
    }
    // Explore owns the rules of gates 1 and 4 (a file declares them to parse as a scenario);
    // it owns 2, 5 and the selectors outright.
    if let Some(g) = sc.gates.iter().find(|g| {
        let id = g.gate.id();
        id != ACTION_GATE && id != ACTION2_GATE && explore_owns(id)
    }) {
        return Err(options(format!(
            "--workload {}: declares gate {}, which explore owns",
            path.display(),
            g.gate.id()
        )));
    }
    let gates = sc
        .gates
        .iter()
        .filter(|g| ![ACTION_GATE, ACTION2_GATE].contains(&g.gate.id()))
        .cloned()
        .collect();
    let calls = racing_calls(&sc.script.stage1);
    let calls2 = racing_calls2(&sc.script.stage1, &sc.script.stage2);
    Ok(Workload {
        origin: path.display().to_string(),
        stage1: sc.script.stage1,
        stage2: sc.script.stage2,
        cmdline: sc.cmdline,
        gates,
        calls,
        calls2,
        sites: BTreeMap::new(),
    })
}

/// The hold points, the fallible functions, the points' id for the manifest, and the lock
/// sites among the points (point → lock function).
struct PointSet {
    names: Vec<String>,
    fallible: Vec<Fallible>,
    id: String,
    sites: BTreeMap<String, String>,
}

/// The kernel-image addresses of the lock functions ([`LOCK_FUNCTIONS`]) `syms` has.
fn lock_addresses(syms: &KernelSymbols) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for name in LOCK_FUNCTIONS {
        if let Ok(addr) = syms.address(name) {
            out.entry(addr).or_insert_with(|| (*name).to_owned());
        }
    }
    out
}

/// The hold points and the fallible functions: `auto` (the kernel's LUO/KHO functions
/// with an address in its vmlinux, then the lock sites of those functions,
/// [`crate::explore::sites`]), or the points of a file (`FUNCTION` or `FUNCTION+0xOFF`,
/// one a line), each one checked: the function exists, and an offset is the start of an
/// instruction of it as decoded. A site is never fallible: fail mode makes functions fail
/// at their entry.
fn points(
    spec: &str,
    guest: &ResolvedGuest,
    syms: &KernelSymbols,
) -> Result<PointSet, ExploreError> {
    let kernel_dir = std::fs::canonicalize(&guest.kernel)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    // The interception breaks at these on vCPU 0 (liveupdate_reboot, machine_kexec,
    // start_kernel): a hold there would share its debug register's address.
    let taken: Vec<u64> = InterceptPoint::ALL
        .iter()
        .filter_map(|p| syms.address(p.symbol()).ok())
        .collect();
    let locks = lock_addresses(syms);
    if spec == "auto" {
        let code = read_code(&kernel_dir)?;
        let mut names = Vec::new();
        let mut fallible = Vec::new();
        for f in code {
            let Ok(addr) = syms.address(&f.name) else {
                continue;
            };
            if taken.contains(&addr) || names.contains(&f.name) {
                continue;
            }
            if let Some(failure) = f.failure {
                fallible.push(Fallible {
                    name: f.name.clone(),
                    failure,
                    init: f.init,
                });
            }
            names.push(f.name);
        }
        // Then each function's lock sites, in the functions' order, each by offset.
        let check = PointCheck::new(&guest.kernel, syms, &names);
        let mut sites = BTreeMap::new();
        let mut site_names = Vec::new();
        for f in &names {
            let Some(c) = check.code(f) else { continue };
            for site in lock_sites(&c.bytes, c.address, &locks) {
                let name = format!("{f}+{:#x}", site.offset);
                sites.insert(name.clone(), site.lock);
                site_names.push(name);
            }
        }
        names.extend(site_names);
        return Ok(PointSet {
            names,
            fallible,
            id: "auto".into(),
            sites,
        });
    }
    let path = PathBuf::from(spec);
    let text = read_input(&path, "--points")?;
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(options(format!("--points {spec}: names no function")));
    }
    let parsed: Vec<(String, TraceSpec)> = lines
        .iter()
        .map(|l| {
            l.parse::<TraceSpec>().map(|t| (l.clone(), t)).map_err(|_| {
                options(format!(
                    "--points {spec}: {l:?} is not FUNCTION or FUNCTION+0xOFFSET"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let symbols: Vec<String> = parsed.iter().map(|(_, t)| t.symbol.clone()).collect();
    let check = PointCheck::new(&guest.kernel, syms, &symbols);
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    let mut sites = BTreeMap::new();
    for (n, t) in parsed {
        // A hold is on CPU 0, or on CPU 1 where the map saw a call reach it.
        check
            .check(&n, &t, &taken)
            .map_err(|why| options(format!("--points {spec}: {why}")))?;
        // One spelling per address: `F+0` is `F`, `F+42` is `F+0x2a`.
        let name = match check.code(&t.symbol).filter(|_| t.offset != 0) {
            None => t.symbol.clone(),
            Some(c) => {
                let name = format!("{}+{:#x}", t.symbol, t.offset);
                if let Some(site) = lock_sites(&c.bytes, c.address, &locks)
                    .into_iter()
                    .find(|s| s.offset == t.offset)
                {
                    sites.insert(name.clone(), site.lock);
                }
                name
            }
        };
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    // Fallible when the kernel's code list says so; a name it does not list (and a site)
    // is a hold point only.
    let listed = read_code(&kernel_dir).unwrap_or_default();
    let fallible = names
        .iter()
        .filter_map(|n| {
            let f = listed.iter().find(|f| &f.name == n)?;
            Some(Fallible {
                name: n.clone(),
                failure: f.failure?,
                init: f.init,
            })
        })
        .collect();
    // The content, not the path: shards and resumes may name the same list differently.
    let id = format!("file {:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
    Ok(PointSet {
        names,
        fallible,
        id,
        sites,
    })
}

/// The workload as the manifest names it: `default`, or its script's digest (a file's path
/// may differ between shards and resumes).
fn workload_id(w: &Workload) -> String {
    if w.origin == "default" {
        return w.origin.clone();
    }
    let text = format!("{} {}", script(w).kernel_params(), w.cmdline);
    format!("file {:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// What caused a trial's trouble, for its signature.
fn cause(w: &Workload, trial: &Trial) -> String {
    match trial {
        Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot | Trial::Map { .. } => {
            "the workload alone".into()
        }
        Trial::Race {
            call,
            stage2: false,
            ..
        } => w.calls[*call].pattern().action.name().to_owned(),
        Trial::Race {
            call, stage2: true, ..
        } => format!("stage 2: {}", w.calls2[*call].pattern().action.name()),
        Trial::Fail {
            function,
            boot: true,
            ..
        } => format!("next kernel's boot: fail {function}"),
        Trial::Fail {
            function,
            stage2: false,
            ..
        } => format!("fail {function}"),
        Trial::Fail {
            function,
            stage2: true,
            ..
        } => format!("stage 2: fail {function}"),
    }
}

/// File-name form of a trial id.
/// A finding's bug conditions: the one `condition` writes for each line of its evidence
/// (those that parse), and `kernel oops`.
fn conditions_from(
    because: &[String],
    condition: impl Fn(&str) -> Option<String>,
) -> Vec<Condition> {
    because
        .iter()
        .filter_map(|b| crate::config::scenario::parse_condition(&condition(b)?).ok())
        .chain([Condition::KernelOops])
        .collect()
}

/// The header's racing calls: those of the stages searched (stage 2's are cleared when it
/// is not).
fn racing_counts(stage: ExploreStage, calls: usize, calls2: usize, boot: usize) -> String {
    let stage1 = stage.has(false);
    let stage2 = stage.has(true) && calls2 > 0;
    let mut parts = Vec::new();
    if stage1 {
        parts.push(if stage2 {
            format!("{calls} racing calls in stage 1")
        } else {
            format!("{calls} racing calls")
        });
    }
    if stage2 {
        parts.push(if stage1 {
            format!("{calls2} in stage 2")
        } else {
            format!("{calls2} racing calls in stage 2")
        });
    }
    if stage.has_boot() && boot > 0 {
        parts.push(format!("{boot} boot functions to fail"));
    }
    parts.join(", ")
}

fn log_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Explorer {
    fn target<'a>(&'a self, sc: &'a Scenario, stage2: bool) -> Target<'a> {
        Target {
            sc,
            opts: if stage2 { &self.opts2 } else { &self.opts },
            guest: &self.guest,
            syms: &self.syms,
            next_syms: None,
            vcpus: self.vcpus,
        }
    }

    fn now_s(&self) -> f64 {
        self.earlier_s + self.started.elapsed().as_secs_f64()
    }

    /// Boots `b`'s machine (a baseline: the workload alone), which keeps the snapshot its
    /// trials reset to; refused when it kept none. Its run bound: `--hang-after`, and for
    /// the boot trials' machine twice this boot besides (they go through a kexec and a
    /// whole boot).
    fn run_baseline(
        &self,
        machines: &mut Machines,
        b: &Trial,
        out: &Path,
    ) -> Result<TrialRecord, ExploreError> {
        let t0 = Instant::now();
        if b.boot() {
            machines.boot = None;
        }
        let base = self.run(machines, b, out, "")?;
        let m = machines.of(b);
        if !m.as_ref().is_some_and(GuestMachine::has_snapshot) {
            let why = m
                .as_ref()
                .and_then(GuestMachine::no_snapshot)
                .unwrap_or("the workload never waited at its gates")
                .to_owned();
            return Err(options(format!(
                "the workload did not reach the action under test{} with a snapshot ({why}); see {}",
                if b.stage2() { " in stage 2" } else { "" },
                out.join(base.log.as_deref().unwrap_or("logs")).display()
            )));
        }
        println!(
            "booted and kept {} snapshot in {:.1} s; {}: {} ({})",
            if b.stage2() {
                "stage 2's"
            } else if b.boot() {
                "stage 1's (for the boot trials)"
            } else {
                "stage 1's"
            },
            t0.elapsed().as_secs_f64(),
            base.id,
            base.verdict.name(),
            base.verdict.because().join("; ")
        );
        if let Some(m) = m.as_mut() {
            m.set_run_bound(if b.boot() {
                self.hang_after + t0.elapsed() * 2
            } else {
                self.hang_after
            });
        }
        if b.boot() {
            machines.boot_since = Some(Instant::now());
        }
        Ok(base)
    }

    /// Runs `trial`, judges it, keeps its log if it is a finding. The machine it runs on
    /// boots first, through its baseline, when it keeps no snapshot yet (a resumed
    /// exploration boots only the machines its remaining trials need), and a boot trial's
    /// again when its snapshot is older than [`BOOT_SNAPSHOT_AGE`]; the baseline's record
    /// goes to `machines.baselines`.
    fn run(
        &self,
        machines: &mut Machines,
        trial: &Trial,
        out: &Path,
        log_suffix: &str,
    ) -> Result<TrialRecord, ExploreError> {
        let base = trial.baseline();
        if base != *trial
            && (machines
                .of(trial)
                .as_ref()
                .is_none_or(|m| !m.has_snapshot())
                || trial.boot()
                    && machines
                        .boot_since
                        .is_none_or(|t| t.elapsed() > BOOT_SNAPSHOT_AGE))
        {
            let base = self.run_baseline(machines, &base, out)?;
            machines.baselines.push(base);
        }
        let id = trial.id(&self.w);
        let sc = trial_scenario(&self.w, trial, self.vcpus, self.hold_max);
        let log_rel = format!("logs/{}{log_suffix}.log", log_name(&id));
        // Stage 1's trials end at point-of-no-return; stage 2's run to the end of the
        // workload, on the machine that kept stage 2's snapshot (no interception: it
        // would not be quiescent there).
        // Stage 2's machine intercepts its one handover, on the boot that keeps its
        // snapshot, only to learn the preserved set; its trials watch that set's pages.
        let stage2 = trial.stage2();
        // A boot trial goes on through the kexec to the end of stage 2, intercepted: the
        // leak check of the next kernel is its "leak, never reuse" oracle.
        let boot = trial.boot();
        let plan = RunPlan {
            run: 1,
            log: out.join(&log_rel),
            point: Some(snapshot_point(&sc, stage2)),
            decide_at_point_of_no_return: !stage2 && !boot,
            keep_timeout_reports: true,
            no_intercept: stage2,
            intercept_until_snapshot: stage2,
            watch_preserved: machines.preserved2.clone().filter(|_| stage2),
            verbose: false,
        };
        let got = trial::run(&self.target(&sc, stage2 || boot), machines.of(trial), &plan)?;
        if stage2 && !got.result.from_snapshot {
            // The boot that kept (or failed to keep) the snapshot the next trials reset to.
            machines.preserved2 = got.handed_over.clone().map(Arc::new);
        }
        let mut facts = got.facts;
        if boot {
            // Decided at the end of stage 2: a bound passed before it is a hang, though
            // point-of-no-return was long passed.
            facts.point_of_no_return = false;
        }
        let excused = excuse_deliberate_panic(&mut facts, &self.deliberate_panics);
        let mut verdict = decide(&facts, &cause(&self.w, trial));
        if let (Some(line), TrialVerdict::Pass { because }) = (&excused, &mut verdict) {
            let msg = line
                .split_once("not syncing: ")
                .map_or(line.as_str(), |(_, m)| m);
            because.push(format!(
                "the next kernel refused what it was handed, as LUO means to (luo_restore_fail panics): {msg}"
            ));
        }
        if let (Trial::Fail { function, .. }, TrialVerdict::Pass { because }) =
            (trial, &mut verdict)
        {
            if got
                .hits
                .get("fails")
                .is_none_or(|h| h.iter().all(|&c| c == 0))
            {
                because.push(format!("{function} was not called"));
            }
        }
        let hits = match trial {
            Trial::Map { .. } => Some(got.hits.get("reach").cloned().unwrap_or_default()),
            _ => None,
        };
        let keep = matches!(
            verdict,
            TrialVerdict::Finding { .. } | TrialVerdict::Undecided { .. }
        ) || matches!(
            trial,
            Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot
        );
        if !keep {
            let _ = std::fs::remove_file(out.join(&log_rel));
        } else if !got.timeout_reports.is_empty() {
            // A hang's evidence: where each vCPU was, after its console.
            use std::io::Write as _;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .append(true)
                .open(out.join(&log_rel))
            {
                let _ = writeln!(f, "\n[luo-vmm: the trial's bound passed]");
                for r in &got.timeout_reports {
                    let _ = writeln!(f, "{r}");
                }
            }
        }
        Ok(TrialRecord {
            id,
            trial: trial.clone(),
            verdict,
            hits,
            times: got.times,
            at_s: self.now_s(),
            log: keep.then_some(log_rel),
        })
    }

    /// The scenario file of finding `f`, first seen in `record`.
    fn finding_file(&self, f: &Finding, record: &TrialRecord, facts_blocked: &[String]) -> String {
        let sig = &f.signature;
        let name = slug(f.number, sig);
        let summary = match &record.trial {
            t @ Trial::Race { on_racer: true, .. } => {
                format!("{}: {}", t.describe(&self.w), sig.oracle)
            }
            Trial::Race {
                point,
                call,
                release,
                stage2,
                ..
            } => format!(
                "{} on CPU 1 while CPU 0 is held at {point}{} (released {release}){}: {}",
                if *stage2 {
                    self.w.calls2[*call].pattern()
                } else {
                    self.w.calls[*call].pattern()
                },
                lock_words(&self.w, point),
                if *stage2 { " in stage 2" } else { "" },
                sig.oracle
            ),
            Trial::Fail {
                function,
                call,
                failure,
                with: None,
                stage2,
                boot,
            } => format!(
                "{function} fails with {} on its call {call}{}: {}",
                failure.c(),
                if *boot {
                    " in the next kernel's boot"
                } else if *stage2 {
                    " in stage 2"
                } else {
                    ""
                },
                sig.oracle
            ),
            Trial::Fail {
                function,
                call,
                failure,
                with: Some(k),
                ..
            } => format!(
                "{function} fails with {} on its call {call} in {} on CPU 1, before the reboot: {}",
                failure.c(),
                self.w.calls[*k].pattern(),
                sig.oracle
            ),
            Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot | Trial::Map { .. } => {
                format!("the workload alone: {}", sig.oracle)
            }
        };
        let mut end = None;
        let verdict =
            match sig.oracle {
                Oracle::RecordsDiffer => VerdictRules {
                    correct: vec![Condition::RecordsMatch],
                    bug: vec![Condition::RecordsDiffer, Condition::KernelOops],
                },
                Oracle::Stage2Data => VerdictRules {
                    correct: vec![Condition::RecordsMatch],
                    bug: conditions_from(&f.because, |b| {
                        Some(format!("failed {}", b.split(':').next()?))
                    }),
                },
                Oracle::RetrievedTwice => VerdictRules {
                    correct: vec![Condition::RecordsMatch],
                    bug: conditions_from(&f.because, |b| {
                        Some(format!(
                            "returned twice {}",
                            b.strip_suffix(" returned success twice")?
                        ))
                    }),
                },
                Oracle::KernelTrouble => VerdictRules {
                    correct: vec![Condition::RecordsMatch],
                    bug: vec![Condition::KernelOops],
                },
                Oracle::PreservedDataWritten => VerdictRules {
                    correct: vec![Condition::RecordsMatch],
                    bug: vec![Condition::PreservedDataWritten, Condition::KernelOops],
                },
                Oracle::Hang => {
                    // The first call left blocked: the run ends the trial's bound after it
                    // started; blocked then is the bug, returned the fix (a call that sleeps a
                    // moment is no hang). Without one, the run's timeout shows it.
                    let blocked = facts_blocked.iter().find_map(|b| {
                        match crate::config::scenario::parse_condition(&format!("blocked {b}")) {
                            Ok(Condition::Blocked(p)) => Some(p),
                            _ => None,
                        }
                    });
                    match blocked {
                        Some(p) => {
                            end = Some(EndRule {
                                when: Trigger::Start(p),
                                after: self.hang_after,
                            });
                            VerdictRules {
                                correct: vec![Condition::Returned(p)],
                                bug: vec![Condition::Blocked(p), Condition::KernelOops],
                            }
                        }
                        None => VerdictRules {
                            correct: vec![Condition::RecordsMatch],
                            bug: vec![Condition::KernelOops],
                        },
                    }
                }
            };
        let mut sc = finding_scenario(
            &self.w,
            &record.trial,
            &name,
            &summary,
            self.variant.as_deref(),
            self.vcpus,
            Duration::from_secs(1200),
            self.hold_max,
            verdict,
        );
        sc.end = end;
        let mut comment = format!(
            "Found by luo-vmm explore {} on {}{}, trial {}.\n",
            env!("CARGO_PKG_VERSION"),
            self.kernel,
            self.variant
                .as_deref()
                .map_or(String::new(), |v| format!(" (variant {v})")),
            record.id
        );
        comment.push_str(&format!("{}: {}\n", sig.oracle, sig.site));
        for line in f.because.iter().take(8) {
            comment.push_str(&format!("  {line}\n"));
        }
        comment.push_str(&format!(
            "Reproduce: luo-vmm scenario run <this file>{} --runs 3",
            self.variant
                .as_deref()
                .map_or(String::new(), |v| format!(" --variant {v}"))
        ));
        sc.to_toml(&comment)
    }
}

/// The machines of an exploration: one keeps stage 1's snapshot, the other (when stage 2 is
/// searched) stage 2's.
#[derive(Default)]
struct Machines {
    stage1: Option<GuestMachine>,
    stage2: Option<GuestMachine>,
    /// The preserved set stage 2's machine's handover handed over (with owners), read on
    /// the boot that kept its snapshot.
    preserved2: Option<Arc<ExtentSet>>,
    /// Keeps stage 1's snapshot for the trials that go on through the kexec into the next
    /// kernel's boot (booted like stage 2's, `init_on_free=1`, intercepted with the dirty
    /// log: the leak check since the next kernel started).
    boot: Option<GuestMachine>,
    /// When `boot` was booted (its baseline's end).
    boot_since: Option<Instant>,
    /// Baselines run on the way to a trial (the boot trials' machine), to record.
    baselines: Vec<TrialRecord>,
}

impl Machines {
    /// Records the baselines booted on the way to a trial, each id once (a boot trials'
    /// machine booted again repeats its baseline).
    fn record_baselines(&mut self, store: &mut Store) -> Result<(), ExploreError> {
        for base in self.baselines.drain(..) {
            if !store.done.iter().any(|d| d.id == base.id) {
                store.append(base)?;
            }
        }
        Ok(())
    }

    /// The machine `trial` runs on.
    fn of(&mut self, trial: &Trial) -> &mut Option<GuestMachine> {
        if trial.stage2() {
            &mut self.stage2
        } else if trial.boot() {
            &mut self.boot
        } else {
            &mut self.stage1
        }
    }
}

/// The gates a snapshot waits for: the first of every thread of stage 1 (or 2).
fn snapshot_point(sc: &Scenario, stage2: bool) -> SnapshotPoint {
    let stage = if stage2 {
        &sc.script.stage2
    } else {
        &sc.script.stage1
    };
    let gates: BTreeSet<Gate> = stage
        .threads
        .iter()
        .filter_map(|t| {
            t.steps.iter().find_map(|s| match s {
                Step::Gate(g) => Some(*g),
                _ => None,
            })
        })
        .collect();
    SnapshotPoint { gates }
}

/// One progress line.
fn progress(n: usize, total: usize, phase: &str, r: &TrialRecord, w: &Workload) {
    let what = r.trial.describe(w);
    let secs = (r.times.reset_ns + r.times.run_ns + r.times.judge_ns) as f64 * 1e-9;
    let detail = match (&r.verdict, &r.hits) {
        (_, Some(h)) => {
            let total: u32 = h.iter().sum();
            if total == 0 {
                "not reached".to_owned()
            } else {
                let per: Vec<String> = h
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(v, c)| format!("{c}x on vCPU {v}"))
                    .collect();
                format!("reached {}", per.join(", "))
            }
        }
        (TrialVerdict::Finding { signature, .. }, None) => format!("FINDING {signature}"),
        (v, None) => format!("{} ({})", v.name(), v.because().join("; ")),
    };
    println!("[{n:>4}/{total:<4} {phase}] {what}: {detail} [{secs:.1} s]");
}

/// `luo-vmm explore`.
pub fn run(args: &ExploreArgs) -> Result<u8, ExploreError> {
    // Everything that can be refused is refused before a guest boots.
    let mut w = match &args.workload {
        None => default_workload(),
        Some(f) => workload_from_file(f)?,
    };
    check_workload(&w).map_err(options)?;
    if args.stage == ExploreStage::Boot && !args.mode.fails() {
        return Err(options(
            "--stage boot: only fail mode searches the next kernel's boot (--mode fail or both)"
                .to_owned(),
        ));
    }
    if !args.stage.has(true) && !args.stage.has_boot() {
        w.calls2.clear();
    } else if w.calls2.is_empty() && args.stage == ExploreStage::All {
        // `all` (the default) is everything the workload has: said, not refused.
        eprintln!(
            "luo-vmm: --stage all: workload {} has no stage 2 (its stage-2 thread on CPU 0 must start with `gate 4`): stage 1 only, and no boot trials (they run on to the end of stage 2)",
            w.origin
        );
    } else if w.calls2.is_empty() && (args.stage == ExploreStage::Both || !args.stage.has(false)) {
        return Err(options(if args.stage.has_boot() {
            format!(
                "--stage {}: workload {} has no stage 2 to run on to (a boot trial goes through the kexec to the end of stage 2; its stage-2 thread on CPU 0 must start with `gate 4`)",
                args.stage, w.origin
            )
        } else {
            format!(
                "--stage {}: workload {} does not search stage 2 (its stage-2 thread on CPU 0 must start with `gate 4`)",
                args.stage, w.origin
            )
        }));
    }
    if let Some(v) = &args.variant {
        crate::config::image::check_variant(v).map_err(ImageError::from)?;
    }
    let opts = GuestOptions {
        kernel: None,
        initrd: None,
        cmdline: w.cmdline.clone(),
        mem: args.mem,
        vcpus: args.vcpus,
        timeout: Some(1200),
        console_log: None,
        profile: Profile::Auto,
        no_pvh: false,
        quiet: !args.console,
        variant: args.variant.clone(),
        source: args.source.clone(),
    };
    opts.validate().map_err(|e| options(e.to_string()))?;
    // The results directory: a directory luo-vmm can write (or one it can make), checked
    // before a kernel is built or a guest boots.
    check_results_dir(&args.out)?;
    let hold_max = args.hang_after / 2;
    let baseline = trial_scenario(&w, &Trial::Baseline, args.vcpus, hold_max);
    check_fits(&baseline, args.vcpus, args.mem).map_err(options)?;
    if let Some(json) = &args.json {
        check_json_out(json)?;
    }
    // A points file that cannot be read, before the kernel image is looked for (its
    // points are checked against the kernel afterwards).
    if args.points != "auto" {
        read_input(Path::new(&args.points), "--points")?;
    }
    let guest = ResolvedGuest::resolve(&opts)?;
    let syms = load_symbols(&guest.kernel)?;
    syms.address(IDLE_SYMBOL).map_err(|e| {
        options(format!(
            "the kernel has no {IDLE_SYMBOL} (where a blocked call's CPU goes idle): {e}"
        ))
    })?;
    let PointSet {
        names: points,
        fallible,
        id: points_id,
        sites,
    } = points(&args.points, &guest, &syms)?;
    w.sites = sites;
    if args.mode == crate::config::options::ExploreMode::Fail && fallible.is_empty() {
        return Err(options(format!(
            "--mode fail: none of the {} points returns an error code someone reads (int, long, ssize_t; not a .release handler): nothing to make fail",
            points.len()
        )));
    }
    if args.stage == ExploreStage::Boot && !fallible.iter().any(|f| f.init) {
        return Err(options(format!(
            "--stage boot: none of the {} points is an `__init` function that can fail: nothing to make fail in the next kernel's boot",
            points.len()
        )));
    }
    // Every kind of trial arms within the debug registers (a race trial needs the most).
    let probe_race = |stage2, on_racer| Trial::Race {
        point: points[0].clone(),
        call: 0,
        release: Release::Settled,
        stage2,
        on_racer,
    };
    let mut probes = vec![
        Trial::Baseline,
        probe_race(false, false),
        probe_race(false, true),
    ];
    if !w.calls2.is_empty() {
        probes.push(probe_race(true, false));
    }
    for t in probes {
        let sc = trial_scenario(&w, &t, args.vcpus, hold_max);
        trial::arm(
            &sc,
            &syms,
            &trial::interceptor(&syms, None, false, false)?,
            args.vcpus,
        )?;
    }
    let kernel = guest.image.as_ref().map_or_else(
        || guest.kernel.display().to_string(),
        |img| {
            img.dir
                .file_name()
                .map_or(img.dir.display().to_string(), |n| {
                    n.to_string_lossy().into_owned()
                })
        },
    );
    let manifest = Manifest {
        format: crate::explore::store::FORMAT.into(),
        version: crate::explore::store::VERSION,
        luo_vmm: env!("CARGO_PKG_VERSION").into(),
        kernel: kernel.clone(),
        release: guest
            .image
            .as_ref()
            .map_or(String::new(), |i| i.kernel_version.clone()),
        workload: workload_id(&w),
        script: script(&w).kernel_params(),
        mode: args.mode,
        points: points_id,
        seed: args.seed,
        releases: RELEASES.to_vec(),
        vcpus: args.vcpus,
        mem: args.mem,
        hang_after_ms: u64::try_from(args.hang_after.as_millis()).unwrap_or(u64::MAX),
        stage: args.stage,
        budget: args.budget,
        shard: args.shard,
    };
    let mut store = Store::open(&args.out, &manifest, args.resume)?;
    if store.started_afresh {
        eprintln!(
            "luo-vmm: --out {}: an earlier run of this exploration stopped before recording a trial; starting afresh",
            args.out.display()
        );
    }
    let out = store.dir().to_owned();
    let done = store.done_ids();
    let earlier_s = store.done.iter().map(|r| r.at_s).fold(0.0, f64::max);
    let opts2 = GuestOptions {
        cmdline: stage_cmdline(&w, true),
        ..opts.clone()
    };
    let deliberate_panics = std::fs::canonicalize(&guest.kernel)
        .ok()
        .and_then(|k| k.parent().map(read_restore_fail_messages))
        .unwrap_or_default();
    let ex = Explorer {
        w,
        opts,
        opts2,
        guest,
        syms,
        vcpus: args.vcpus,
        hold_max,
        hang_after: args.hang_after,
        variant: args.variant.clone(),
        kernel,
        started: Instant::now(),
        earlier_s,
        deliberate_panics,
    };
    let header = format!(
        "explore {} ({}): {} point{}{}, {} fallible, {}; mode {}, stage {}, seed {}; results in {}",
        ex.kernel,
        ex.variant
            .as_deref()
            .map_or("the reference kernel".into(), |v| format!("variant {v}")),
        points.len(),
        if points.len() == 1 { "" } else { "s" },
        match ex.w.sites.len() {
            0 => String::new(),
            n => format!(" ({n} of them lock sites)"),
        },
        fallible.len(),
        racing_counts(
            args.stage,
            ex.w.calls.len(),
            ex.w.calls2.len(),
            // Boot trials run on to the end of stage 2: a workload without one has none.
            if args.mode.fails() && !ex.w.calls2.is_empty() {
                fallible.iter().filter(|f| f.init).count()
            } else {
                0
            }
        ),
        format!("{:?}", args.mode).to_lowercase(),
        args.stage,
        args.seed,
        out.display(),
    );
    println!(
        "{header}{}",
        if done.is_empty() {
            String::new()
        } else {
            format!(" (resumed: {} trials done)", done.len())
        }
    );
    let interrupt = Interrupt::install()?;

    // The boots: the baseline run keeps the snapshot every stage-1 trial starts from; the
    // second baseline (when stage 2 is searched) goes through the handover and keeps stage
    // 2's. A new exploration boots both first (a workload that does not reach the action
    // under test is refused before any trial); a resumed one boots a machine when the
    // first trial left for it comes, and the boot trials' machine boots when the first of
    // them comes (they come last).
    let mut machines = Machines::default();
    let mut baselines = Vec::new();
    if args.stage.has(false) {
        baselines.push(Trial::Baseline);
    }
    if !ex.w.calls2.is_empty() && args.stage.has(true) {
        baselines.push(Trial::Baseline2);
    }
    for b in baselines {
        if !done.contains(&b.id(&ex.w)) {
            let base = ex.run_baseline(&mut machines, &b, &out)?;
            store.append(base)?;
        }
        interrupt.before_the_search(&out)?;
    }

    // The map: where the workload goes.
    let wanted = |t: &Trial| {
        if t.boot() {
            args.stage.has_boot()
        } else {
            args.stage.has(t.stage2())
        }
    };
    let mut map = map_trials(&ex.w, args.mode, &points, &fallible);
    map.retain(wanted);
    for (i, t) in map.iter().enumerate() {
        if done.contains(&t.id(&ex.w)) {
            continue;
        }
        let r = ex.run(&mut machines, t, &out, "")?;
        machines.record_baselines(&mut store)?;
        progress(i + 1, map.len(), "map", &r, &ex.w);
        store.append(r)?;
        interrupt.before_the_search(&out)?;
    }
    let reach: Reach = store
        .done
        .iter()
        .filter_map(|r| match (&r.trial, &r.hits) {
            (
                Trial::Map {
                    function,
                    with,
                    stage2,
                },
                Some(h),
            ) if h.iter().any(|&c| c > 0) => {
                Some((reach_key(&ex.w, function, *with, *stage2), h.clone()))
            }
            _ => None,
        })
        .collect();

    // The search.
    let mut trials = search_trials(
        &ex.w, args.mode, &points, &fallible, &reach, &RELEASES, args.seed,
    );
    trials.retain(wanted);
    if trials.is_empty() {
        return Err(options(format!(
            "the workload reaches none of the {} point{} where a trial could act (the map's lines above; {}): nothing to search",
            points.len(),
            if points.len() == 1 { "" } else { "s" },
            out.join("trials.jsonl").display()
        )));
    }
    // The budget takes the first trials of the list; a shard takes every N-th of those.
    let budget = args.budget.map_or(trials.len(), |b| {
        usize::try_from(b).unwrap_or(usize::MAX).min(trials.len())
    });
    let planned: Vec<Trial> = trials[..budget]
        .iter()
        .enumerate()
        .filter(|(k, _)| args.shard.is_none_or(|s| s.has(*k)))
        .map(|(_, t)| t.clone())
        .collect();
    let plan = Plan {
        space: trials.len(),
        trials: planned.iter().map(|t| t.id(&ex.w)).collect(),
        list: Some(list_digest(trials.iter().map(|t| t.id(&ex.w)))),
    };
    let plan_json =
        serde_json::to_string_pretty(&plan).map_err(|e| options(format!("plan.json: {e}")))?;
    write_atomic(&out.join("plan.json"), plan_json.as_bytes())?;
    // Why the search stopped before the end of its plan, if it did.
    let mut stopped: Option<&str> = None;
    // The files of findings an earlier session of this `--out` wrote are not new.
    let mut written: BTreeMap<String, String> = group(&store.done)
        .into_iter()
        .map(|f| (f.scenario, f.first))
        .collect();
    for (i, t) in planned.iter().enumerate() {
        if done.contains(&t.id(&ex.w)) {
            continue;
        }
        if interrupt.requested() {
            stopped = Some("interrupted");
        } else if args.time.is_some_and(|limit| ex.started.elapsed() >= limit) {
            stopped = Some("--time reached");
        }
        if stopped.is_some() {
            break;
        }
        let r = ex.run(&mut machines, t, &out, "")?;
        machines.record_baselines(&mut store)?;
        progress(i + 1, planned.len(), "search", &r, &ex.w);
        store.append(r)?;
        write_findings(&ex, &store.done, &out, &mut written)?;
    }

    // Each finding's representative, run again from the snapshot: the scenario file is
    // written from the first candidate that gives its signature every time.
    // Not after an interrupt: the user asked to stop; a resume confirms them.
    let mut findings = group(&store.done);
    for f in &mut findings {
        if interrupt.requested() {
            break;
        }
        confirm(&ex, &mut machines, f, &mut store, &out)?;
        write_finding(&ex, f, &store.done, &out)?;
    }
    let complete = stopped.is_none();
    let t = totals(&store.done, trials.len());
    let status = match stopped {
        None => "complete".to_owned(),
        Some(why) => format!(
            "incomplete ({why}): {} of {} planned search trials not run; --resume goes on",
            plan.trials
                .iter()
                .filter(|id| !store.done.iter().any(|r| &r.id == *id))
                .count(),
            plan.trials.len()
        ),
    };
    let text = format!("{status}\n{}", table(&findings, &t));
    println!("{text}");
    let report = ExploreReport {
        manifest,
        space: SpaceSummary {
            points: points.len(),
            fallible: fallible.len(),
            reached_on_action: reach
                .iter()
                .filter(|(_, h)| h.first().is_some_and(|&c| c > 0))
                .map(|(f, _)| f.clone())
                .collect(),
            reached: reach.clone(),
            calls: ex.w.calls.iter().map(|c| c.pattern().to_string()).collect(),
            search_trials: trials.len(),
            lock_sites: ex.w.sites.clone(),
        },
        totals: t,
        findings,
        complete,
        stopped: stopped.map(str::to_owned),
    };
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| options(format!("the JSON report: {e}")))?;
    write_atomic(&out.join("report.json"), json.as_bytes())?;
    write_atomic(
        &out.join("report.txt"),
        format!("{header}\n{text}").as_bytes(),
    )?;
    let title = format!(
        "luo-vmm explore {}: trials and findings over time",
        ex.variant.as_deref().unwrap_or("(reference)")
    );
    write_atomic(
        &out.join("progress.svg"),
        plot(&store.done, &title).as_bytes(),
    )?;
    if let Some(path) = &args.json {
        write_atomic(path, json.as_bytes())?;
    }
    println!(
        "report: {} (and report.json, progress.svg, findings/)",
        out.join("report.txt").display()
    );
    Ok(if interrupt.requested() {
        EXIT_INTERRUPTED
    } else if report.findings.is_empty() {
        0
    } else {
        EXIT_FINDINGS
    })
}

/// Exit status of an exploration stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Ctrl-C (SIGINT) or SIGTERM while exploring. The first lets the trial in progress come
/// to its decision (each is bounded) and is recorded; then the search stops, the report is
/// written (`complete: false`; findings not confirmed) and `--resume` goes on from there.
/// Before the search list exists (the boots and the map) it stops at once with no report.
/// A second one ends the process at once (exit 128 + the signal).
struct Interrupt {
    requested: Arc<AtomicBool>,
}

impl Interrupt {
    /// Catches SIGINT and SIGTERM on a thread of its own.
    fn install() -> Result<Self, ExploreError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let requested = Arc::new(AtomicBool::new(false));
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| options(format!("catching Ctrl-C: {e}")))?;
        let flag = requested.clone();
        std::thread::Builder::new()
            .name("interrupt".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if flag.swap(true, Ordering::SeqCst) {
                        eprintln!("luo-vmm: stopped at once; the trial in progress is not recorded");
                        std::process::exit(128 + sig);
                    }
                    eprintln!(
                        "luo-vmm: interrupted: the trial in progress goes on to its decision, then the report is written (again to stop at once)"
                    );
                }
            })
            .map_err(|e| options(format!("catching Ctrl-C: {e}")))?;
        Ok(Interrupt { requested })
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Before the search list exists: an interrupt ends the exploration here.
    fn before_the_search(&self, out: &Path) -> Result<(), ExploreError> {
        if self.requested() {
            return Err(ExploreError::Interrupted(format!(
                "interrupted before the search began (what was mapped is kept): `--resume --out {}` goes on",
                out.display()
            )));
        }
        Ok(())
    }
}

/// Writes the scenario file of every finding of `records` as it is found (an interrupted
/// exploration keeps them), and again when its representative changes (a deterministic
/// trial of it after a timed one); `written` holds each file's representative.
fn write_findings(
    ex: &Explorer,
    records: &[TrialRecord],
    out: &Path,
    written: &mut BTreeMap<String, String>,
) -> Result<(), ExploreError> {
    for f in group(records) {
        let new = !written.contains_key(&f.scenario);
        if written.get(&f.scenario) != Some(&f.first) {
            write_finding(ex, &f, records, out)?;
            written.insert(f.scenario.clone(), f.first.clone());
        }
        if new {
            println!(
                "finding #{}: {} -> {}",
                f.number,
                f.signature,
                out.join(&f.scenario).display()
            );
        }
    }
    Ok(())
}

/// Writes finding `f`'s scenario file, from its representative trial.
fn write_finding(
    ex: &Explorer,
    f: &Finding,
    records: &[TrialRecord],
    out: &Path,
) -> Result<(), ExploreError> {
    let Some(first) = records.iter().find(|r| r.id == f.first) else {
        return Ok(());
    };
    // The hang oracle's evidence names each call left blocked: `ACTION ARG blocked`.
    let blocked: Vec<String> = f
        .because
        .iter()
        .filter_map(|b| b.strip_suffix(" blocked").map(str::to_owned))
        .collect();
    let text = ex.finding_file(f, first, &blocked);
    write_atomic(&out.join(&f.scenario), text.as_bytes())?;
    Ok(())
}

/// Runs finding `f`'s deterministic trials (its representative first, at most three) again
/// from the snapshot, [`CONFIRM_RUNS`] times each, until one gives its signature every
/// time; makes that one the representative and records `k/n`. A trial the store has
/// confirmed already (an earlier session of this `--out`) is not run again.
fn confirm(
    ex: &Explorer,
    machines: &mut Machines,
    f: &mut Finding,
    store: &mut Store,
    out: &Path,
) -> Result<(), ExploreError> {
    let mut candidates: Vec<TrialRecord> = Vec::new();
    for id in std::iter::once(&f.first).chain(&f.trials) {
        if let Some(r) = store.done.iter().find(|r| &r.id == id) {
            if !candidates.iter().any(|c| c.id == r.id)
                && (deterministic(&r.trial) || candidates.is_empty())
            {
                candidates.push(r.clone());
            }
        }
        if candidates.len() == 3 {
            break;
        }
    }
    // The representative, its confirmation, whether it ran now.
    let mut best: Option<(TrialRecord, Confirmation, bool)> = None;
    for c in candidates {
        let (done, now) = match store.confirmation(&c.id, &f.signature) {
            Some(done) if done.runs == CONFIRM_RUNS => (done.clone(), false),
            _ => {
                let mut same = 0;
                let mut others = Vec::new();
                for _ in 0..CONFIRM_RUNS {
                    let again = ex.run(machines, &c.trial, out, "-again")?;
                    machines.record_baselines(store)?;
                    // The first run's log is the evidence; the confirmations' are not kept.
                    if let Some(log) = &again.log {
                        let _ = std::fs::remove_file(out.join(log));
                    }
                    match &again.verdict {
                        TrialVerdict::Finding { signature, .. } if *signature == f.signature => {
                            same += 1;
                        }
                        v => others.push(format!("{}: {}", v.name(), v.because().join("; "))),
                    }
                }
                let done = Confirmation {
                    trial: c.id.clone(),
                    signature: f.signature.clone(),
                    same,
                    runs: CONFIRM_RUNS,
                    others,
                };
                store.append_confirmation(done.clone())?;
                (done, true)
            }
        };
        let full = done.same == CONFIRM_RUNS;
        if best.as_ref().is_none_or(|(_, b, _)| done.same > b.same) {
            best = Some((c, done, now));
        }
        if full {
            break;
        }
    }
    if let Some((r, done, now)) = best {
        let k = done.same;
        f.first = r.id.clone();
        f.log = r.log.clone();
        if let TrialVerdict::Finding { because, .. } = &r.verdict {
            f.because = because.clone();
        }
        f.confirmed = Some(format!("{k}/{CONFIRM_RUNS}"));
        println!(
            "finding #{}: {} again from the snapshot: {k}/{CONFIRM_RUNS} the same{}",
            f.number,
            r.id,
            if now {
                ""
            } else {
                " (confirmed by an earlier run)"
            }
        );
        // What the others gave: a finding that does not come every time, and why.
        for other in &done.others {
            println!("  not the same once: {other}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The docs' workload (docs/explore.md): gates 1 and 4 declared with rules explore
    /// replaces, waiting on explore's racing threads; gate 3 its own.
    const WORKLOAD: &str = r#"name = "w"
summary = "a workload"
[stage1]
threads = [
  { cpu = 0, steps = ["create 0", "memfd 0.0 64K", "fill 0.0 write", "preserve 0.0",
                      "kexec-load", "gate 1", "reboot"] },
  { cpu = 1, steps = ["gate 3", "close 0"] },
]
[stage2]
threads = [{ cpu = 0, steps = ["gate 4", "retrieve 0", "retrieve-fd 0.0", "finish 0"] }]
[[gate]]
id = 1
open_when = "wait 2"
[[gate]]
id = 3
open_when = "result reboot"
[[gate]]
id = 4
open_when = "wait 5"
"#;

    #[test]
    fn a_workload_file_leaves_explore_its_gates_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("luo-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.toml");
        std::fs::write(&path, WORKLOAD).unwrap();
        let w = workload_from_file(&path).unwrap();
        check_workload(&w).unwrap();
        assert_eq!(w.gates.len(), 1, "gate 3; explore's rules replace 1 and 4");
        // Its own gates name what its steps make.
        std::fs::write(
            &path,
            WORKLOAD.replace("\"result reboot\"", "\"result close-session 7\""),
        )
        .unwrap();
        let e = workload_from_file(&path).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "gate 3: open_when \"result close-session 7\": no step of the script makes \
                 close-session 7; it makes close-session 0"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_header_counts_the_racing_calls_of_the_stages_searched() {
        for (stage, calls2, want) in [
            (ExploreStage::One, 0, "10 racing calls"),
            (
                ExploreStage::Both,
                8,
                "10 racing calls in stage 1, 8 in stage 2",
            ),
            (ExploreStage::Two, 8, "8 racing calls in stage 2"),
            (
                ExploreStage::All,
                8,
                "10 racing calls in stage 1, 8 in stage 2, 3 boot functions to fail",
            ),
            (ExploreStage::Boot, 8, "3 boot functions to fail"),
        ] {
            assert_eq!(racing_counts(stage, 10, calls2, 3), want, "{stage:?}");
        }
    }

    #[test]
    fn log_names_are_file_names() {
        assert_eq!(
            log_name("race:luo_flb_serialize:preserve-fd-0.1:after-2000ms"),
            "race_luo_flb_serialize_preserve-fd-0.1_after-2000ms"
        );
    }

    #[test]
    fn causes_name_the_call_or_the_function() {
        let w = default_workload();
        let race = Trial::Race {
            point: "p".into(),
            call: 2,
            release: Release::Settled,
            stage2: false,
            on_racer: false,
        };
        assert_eq!(cause(&w, &race), "close-session");
        let fail = Trial::Fail {
            failure: Default::default(),
            boot: false,
            function: "luo_file_freeze".into(),
            call: 2,
            with: None,
            stage2: false,
        };
        assert_eq!(cause(&w, &fail), "fail luo_file_freeze");
    }
}
