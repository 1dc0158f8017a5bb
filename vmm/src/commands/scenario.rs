//! `luo-vmm scenario`: provoke a LUO race or error path on purpose, N times, and give a
//! verdict per run (docs/scenarios.md).
//!
//! A scenario ([`crate::config::scenario`]) is the agent's steps per stage and thread, the VMM's hooks and
//! gates ([`crate::watch::schedule`]), and the rules of its verdict ([`crate::judge::scenario`]). Each run is a fresh VM
//! of the reference guest (or a variant), with the handover interception on, so the LUO
//! records the next kernel gets are parsed and compared with what user space believes it
//! preserved.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use luo_devices::Gates;
use luo_handover::symbols::KernelSymbols;
use luo_protocol::probe::Gate;
use luo_protocol::script::Step;
use serde::Serialize;
use thiserror::Error;

use crate::config::options::{GuestOptions, Profile, ScenarioRunArgs, ScenarioTarget};
use crate::config::scenario::{Scenario, ScenarioFileError};
use crate::explore::sites::PointCheck;
use crate::judge::scenario::{vote, ScenarioVerdict};
use crate::run::guest::{GuestError, GuestMachine, ResolvedGuest, SnapshotPoint};
use crate::run::image::ImageError;
use crate::run::kernel::{load_symbols, KernelFileError};
use crate::run::next::RunKernels;
use crate::trial::{
    self, arm, check_fits, interceptor, script_params, RunPlan, RunResult, Target, TrialError,
};

/// Exit status of `scenario run` when a run's verdict is not the one expected.
pub const EXIT_UNEXPECTED_VERDICT: u8 = 5;

/// Largest scenario file read.
const MAX_FILE: u64 = 1 << 20;

/// The built-in scenarios (`scenarios/*.toml`), by name.
const BUILTIN: [(&str, &str); 7] = [
    (
        "session-close-during-reboot",
        include_str!("../../../scenarios/session-close-during-reboot.toml"),
    ),
    (
        "session-preserve-during-reboot",
        include_str!("../../../scenarios/session-preserve-during-reboot.toml"),
    ),
    (
        "session-create-during-reboot",
        include_str!("../../../scenarios/session-create-during-reboot.toml"),
    ),
    (
        "session-destroy-during-serialize",
        include_str!("../../../scenarios/session-destroy-during-serialize.toml"),
    ),
    (
        "reboot-unwind-after-serialize",
        include_str!("../../../scenarios/reboot-unwind-after-serialize.toml"),
    ),
    (
        "memfd-retrieve-frees-preserved-folios",
        include_str!("../../../scenarios/memfd-retrieve-frees-preserved-folios.toml"),
    ),
    (
        "kho-init-error-frees-incoming-scratch",
        include_str!("../../../scenarios/kho-init-error-frees-incoming-scratch.toml"),
    ),
];

/// Errors of `luo-vmm scenario`.
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// Neither a built-in name nor a readable file.
    #[error("{0:?} is neither a built-in scenario ({names}) nor a scenario file", names = builtin_names())]
    Unknown(String),
    /// A scenario file that cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A scenario that does not parse or check.
    #[error(transparent)]
    File(#[from] ScenarioFileError),
    /// The kernel's symbols.
    #[error(transparent)]
    Kernel(#[from] KernelFileError),
    /// Arming or running the scenario.
    #[error(transparent)]
    Trial(#[from] TrialError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// The guest image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Running a guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Writing the JSON.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn builtin_names() -> String {
    BUILTIN.map(|(n, _)| n).join(", ")
}

/// The built-in scenarios, parsed (a parse error is a bug, caught by the unit tests).
fn builtins() -> Vec<Scenario> {
    BUILTIN
        .iter()
        .filter_map(|(name, text)| Scenario::parse(text, name).ok())
        .collect()
}

/// `luo-vmm scenario list`.
pub fn list() -> String {
    let mut out = String::new();
    for s in builtins() {
        out.push_str(&format!(
            "{}\n    {}\n    reproduces on: {}\n",
            s.name,
            s.summary,
            match (&s.variant, s.reproduces_on_reference) {
                (Some(v), false) => v.clone(),
                (Some(v), true) => format!("the reference kernel, {v}"),
                (None, true) => "the reference kernel".to_owned(),
                (None, false) => "(no kernel yet)".to_owned(),
            }
        ));
    }
    out
}

/// The scenario named `what`: a built-in name, or a file.
pub(crate) fn load(what: &str) -> Result<Scenario, ScenarioError> {
    if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == what) {
        return Ok(Scenario::parse(text, name)?);
    }
    let path = Path::new(what);
    if !path.exists() {
        return Err(ScenarioError::Unknown(what.to_owned()));
    }
    let read_err = |source| ScenarioError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(ScenarioError::Options(format!(
            "{what}: not a regular file"
        )));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE + 1), &mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_FILE {
        return Err(ScenarioError::Options(format!(
            "{what}: larger than {MAX_FILE} bytes; a scenario is a small file"
        )));
    }
    Ok(Scenario::parse(&text, what)?)
}

/// The JSON of `scenario run --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub scenario: String,
    /// The kernel variant (none: the reference kernel).
    pub variant: Option<String>,
    /// The kernel source tree (`--source`), when the kernel was built from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// The verdict expected on that kernel.
    pub expected: ScenarioVerdict,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// The most frequent verdict.
    pub verdict: ScenarioVerdict,
    /// How many runs gave it.
    pub count: u32,
}

fn print_run(r: &RunResult, total: u32) {
    println!(
        "run {}/{total}: {} ({})",
        r.run,
        r.judgement.verdict.name(),
        r.judgement.because.join("; ")
    );
    for e in &r.timeline {
        let vcpu = e.vcpu.map_or(String::new(), |v| format!("vCPU{v}"));
        println!("  {:>10.3} s {vcpu:<6} {}", e.t_ns as f64 * 1e-9, e.what);
    }
    match &r.discrepancies {
        Some(d) if d.is_empty() => {
            println!("  detector: the LUO records match what user space preserved")
        }
        Some(d) => {
            for line in d {
                println!("  detector: {line}");
            }
        }
        None => println!("  detector: no handover, nothing to compare"),
    }
    for line in &r.kernel_trouble {
        println!("  kernel: {line}");
    }
    for why in &r.handover_not_verified {
        println!("  handover not verified: {why}");
    }
    println!("  VM: {}; console: {}", r.vm_exit, r.console_log.display());
}

/// A scenario ready to run: checked whole, its kernel resolved (built if needed), its
/// hooks' symbols found, each vCPU's breakpoint budget checked.
struct Prepared {
    sc: Scenario,
    opts: GuestOptions,
    guest: ResolvedGuest,
    syms: KernelSymbols,
    /// The next kernel's symbols (`--next-*`), when stage 2 runs in another kernel.
    next_syms: Option<KernelSymbols>,
    vcpus: u8,
}

fn prepare(
    args: &ScenarioTarget,
    timeout: Option<u64>,
    console: bool,
) -> Result<Prepared, ScenarioError> {
    let sc = load(&args.scenario)?;
    let vcpus = args.vcpus.unwrap_or(sc.vcpus);
    let opts = guest_options(&sc, args, vcpus, timeout, console);
    opts.validate()
        .map_err(|e| ScenarioError::Options(e.to_string()))?;
    check_fits(&sc, vcpus, args.mem).map_err(ScenarioError::Options)?;
    if let Some(v) = &sc.variant {
        crate::config::image::check_variant(v).map_err(ImageError::from)?;
    }
    let next = args
        .next
        .spec(1)
        .map_err(|e| ScenarioError::Options(e.to_string()))?;
    let mut guest = ResolvedGuest::resolve(&opts)?;
    let syms = load_symbols(&guest.kernel)?;
    // Stage 2 in another kernel: its image in the initramfs, its symbols for start_kernel.
    let next_syms = match &next {
        Some(spec) => {
            let kernels = RunKernels::prepare(
                &guest.kernel,
                guest.image.as_ref(),
                &mut guest.initrd,
                Some(spec),
                false,
            )
            .map_err(|e| ScenarioError::Options(e.to_string()))?;
            let vmlinux = &kernels.kernels[kernels.kernels.len() - 1].vmlinux;
            Some(load_symbols(vmlinux)?)
        }
        None => None,
    };
    let interceptor = interceptor(&syms, next_syms.as_ref(), false, false)?;
    // Each hook's `at` as `explore --points` checks a point: a function, not where the
    // interception breaks on the hook's vCPUs, an offset at one of its instructions (a
    // breakpoint elsewhere would never fire, and the run would say "not reproduced").
    let names: Vec<String> = sc.hooks.iter().map(|h| h.at.symbol.clone()).collect();
    let check = PointCheck::new(&guest.kernel, &syms, &names);
    for h in &sc.hooks {
        let at = match h.at.offset {
            0 => h.at.symbol.clone(),
            off => format!("{}+{off:#x}", h.at.symbol),
        };
        // Where the interception breaks on the hook's vCPUs.
        let taken: Vec<u64> = (0..vcpus)
            .filter(|&v| h.vcpus.has(v))
            .flat_map(|v| crate::machine::vm::RunObserver::breakpoints(&interceptor, v))
            .collect();
        check
            .check(&at, &h.at, &taken)
            .map_err(|why| ScenarioError::Options(format!("hook {}: {why}", h.name)))?;
    }
    arm(&sc, &syms, &interceptor, vcpus)?;
    Ok(Prepared {
        sc,
        opts,
        guest,
        syms,
        next_syms,
        vcpus,
    })
}

/// The guest a scenario runs in: the reference (or `--variant`/`--source`) with the
/// scenario's command line, `--mem`, `vcpus`, and its timeout unless `--timeout` is given.
fn guest_options(
    sc: &Scenario,
    args: &ScenarioTarget,
    vcpus: u8,
    timeout: Option<u64>,
    console: bool,
) -> GuestOptions {
    GuestOptions {
        kernel: None,
        initrd: None,
        cmdline: sc.cmdline.clone(),
        mem: args.mem,
        vcpus,
        timeout: Some(timeout.unwrap_or(sc.timeout.as_secs())),
        console_log: None,
        profile: Profile::Auto,
        no_pvh: false,
        quiet: !console,
        variant: args.variant.clone(),
        source: args.source.clone(),
    }
}

/// `luo-vmm scenario check`: everything `run` checks before a guest boots, and nothing
/// more; prints what the scenario does.
pub fn check(args: &ScenarioTarget) -> Result<u8, ScenarioError> {
    let p = prepare(args, None, false)?;
    let sc = &p.sc;
    let steps = |s: &luo_protocol::script::StageScript| {
        s.threads.iter().map(|t| t.steps.len()).sum::<usize>()
    };
    // `1 thread`, `2 threads`.
    let n = |k: usize, what: &str| format!("{k} {what}{}", if k == 1 { "" } else { "s" });
    println!(
        "{}: ok ({}; stage 1: {}, {}; stage 2: {}, {}; {}; {}, every symbol found in {})",
        sc.name,
        n(usize::from(p.vcpus), "vCPU"),
        n(sc.script.stage1.threads.len(), "thread"),
        n(steps(&sc.script.stage1), "step"),
        n(sc.script.stage2.threads.len(), "thread"),
        n(steps(&sc.script.stage2), "step"),
        n(sc.gates.len(), "gate"),
        n(sc.hooks.len(), "hook"),
        p.guest.kernel.display()
    );
    Ok(0)
}

/// `luo-vmm scenario run`: runs it, prints each run and the verdict; returns the exit
/// status (0: every run gave the expected verdict; 5: not).
pub fn run(args: &ScenarioRunArgs) -> Result<u8, ScenarioError> {
    let p = prepare(&args.target, args.timeout, args.console)?;
    check_snapshot_options(&p.sc, args).map_err(ScenarioError::Options)?;
    std::fs::create_dir_all(&args.log_dir).map_err(|source| ScenarioError::Write {
        path: args.log_dir.clone(),
        source,
    })?;
    // A JSON file that cannot be written is found before the runs, not after them.
    let json = args
        .json
        .as_ref()
        .map(|path| {
            std::fs::File::create(path)
                .map(|f| (f, path))
                .map_err(|source| ScenarioError::Write {
                    path: path.clone(),
                    source,
                })
        })
        .transpose()?;
    let on_reference = args.target.variant.is_none() && args.target.source.is_none();
    let expected = if (args.target.variant.is_some() && args.target.variant == p.sc.variant)
        || (on_reference && p.sc.reproduces_on_reference)
    {
        ScenarioVerdict::Reproduced
    } else {
        ScenarioVerdict::NotReproduced
    };
    println!(
        "scenario {} on {} ({} vCPUs, {} run{}): expected {}",
        p.sc.name,
        kernel_name(&args.target),
        p.vcpus,
        args.runs,
        if args.runs == 1 { "" } else { "s" },
        expected.name()
    );
    let point = snapshot_point(&p.sc, args);
    let mut machine = match &args.from_snapshot {
        Some(dir) => {
            let m = GuestMachine::from_snapshot(
                &p.opts,
                &p.guest,
                &script_params(&p.sc),
                Gates::default(),
                dir,
            )?;
            eprintln!(
                "luo-vmm: every run starts from the snapshot in {}",
                dir.display()
            );
            Some(m)
        }
        None => None,
    };
    if args.from_snapshot.is_none() && !args.no_snapshot && point.is_none() {
        eprintln!(
            "luo-vmm: the scenario has no gate step in stage 1: every run boots (no snapshot point)"
        );
    }
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let log = args.log_dir.join(format!(
            "{}{}-run{run}.log",
            p.sc.name,
            args.target
                .variant
                .as_deref()
                .map_or(String::new(), |v| format!("-{v}"))
        ));
        let target = Target {
            sc: &p.sc,
            opts: &p.opts,
            guest: &p.guest,
            syms: &p.syms,
            next_syms: p.next_syms.as_ref(),
            vcpus: p.vcpus,
        };
        let plan = RunPlan {
            run,
            log,
            point: point.clone(),
            decide_at_point_of_no_return: false,
            keep_timeout_reports: false,
            no_intercept: false,
            verbose: true,
            ..RunPlan::default()
        };
        let result = trial::run(&target, &mut machine, &plan)?.result;
        print_run(&result, args.runs);
        runs.push(result);
    }
    let (verdict, count) = vote(runs.iter().map(|r| r.judgement.verdict));
    println!("verdict: {} ({count}/{} runs)", verdict.name(), args.runs);
    let all_expected = runs.iter().all(|r| r.judgement.verdict == expected);
    if !all_expected {
        println!("expected {} in every run", expected.name());
    }
    if let Some((file, path)) = json {
        let report = ScenarioReport {
            scenario: p.sc.name.clone(),
            variant: args.target.variant.clone(),
            source: args.target.source.clone(),
            expected,
            runs,
            verdict,
            count,
        };
        write_json(file, path, &report)?;
    }
    // Last: the verdicts and the JSON are out even if the snapshot cannot be written.
    if let Some(dir) = &args.save_snapshot {
        let m = machine.as_ref().ok_or_else(|| {
            ScenarioError::Options("--save-snapshot: no run kept a snapshot".into())
        })?;
        let bytes = m.save(dir, &p.opts, &p.guest)?;
        println!(
            "snapshot saved to {} ({:.1} MiB)",
            dir.display(),
            bytes as f64 / f64::from(1u32 << 20)
        );
    }
    Ok(if all_expected {
        0
    } else {
        EXIT_UNEXPECTED_VERDICT
    })
}

/// How `scenario run` names the kernel it runs on.
fn kernel_name(target: &ScenarioTarget) -> String {
    match (&target.source, &target.variant) {
        (Some(dir), v) => format!(
            "the kernel of {}{}",
            dir.display(),
            v.as_deref()
                .map_or(String::new(), |v| format!(" (variant {v}'s config)"))
        ),
        (None, Some(v)) => format!("variant {v}"),
        (None, None) => "the reference kernel".to_owned(),
    }
}

/// The snapshot options checked before anything runs: every `--snapshot-gate` is a gate
/// of the scenario's stage 1, and `--save-snapshot` names a snapshot or a path that does
/// not exist yet (never a directory holding something else).
fn check_snapshot_options(sc: &Scenario, args: &ScenarioRunArgs) -> Result<(), String> {
    let waits: BTreeSet<u8> = sc
        .script
        .stage1
        .threads
        .iter()
        .flat_map(|t| &t.steps)
        .filter_map(|s| match s {
            Step::Gate(g) => Some(g.id()),
            _ => None,
        })
        .collect();
    if let Some(g) = args.snapshot_gate.iter().find(|g| !waits.contains(g)) {
        let have: Vec<String> = waits.iter().map(ToString::to_string).collect();
        return Err(format!(
            "--snapshot-gate {g}: the scenario's stage 1 waits at no gate {g} (its gates: {})",
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            }
        ));
    }
    if let Some(dir) = &args.save_snapshot {
        if dir.exists() && !crate::machine::snapshot::file::is_snapshot(dir) {
            return Err(format!(
                "--save-snapshot {}: exists and is not a luo-vmm snapshot; not overwritten",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Where `scenario run` takes its snapshot: `--snapshot-gate`s, or the first gate of
/// every stage-1 thread that has one; none with `--no-snapshot` or without gates.
fn snapshot_point(sc: &Scenario, args: &ScenarioRunArgs) -> Option<SnapshotPoint> {
    if args.no_snapshot {
        return None;
    }
    let gates: BTreeSet<Gate> = if args.snapshot_gate.is_empty() {
        sc.script
            .stage1
            .threads
            .iter()
            .filter_map(|t| {
                t.steps.iter().find_map(|s| match s {
                    Step::Gate(g) => Some(*g),
                    _ => None,
                })
            })
            .collect()
    } else {
        args.snapshot_gate
            .iter()
            .filter_map(|&g| Gate::new(g))
            .collect()
    };
    (!gates.is_empty()).then_some(SnapshotPoint { gates })
}

/// Writes the scenario's JSON report into `file` (created before the runs at `path`).
fn write_json(
    mut file: std::fs::File,
    path: &Path,
    report: &ScenarioReport,
) -> Result<(), ScenarioError> {
    let write_err = |source| ScenarioError::Write {
        path: path.to_owned(),
        source,
    };
    let text =
        serde_json::to_string_pretty(report).map_err(|e| write_err(std::io::Error::other(e)))?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_scenario_parses() {
        for (name, text) in BUILTIN {
            let s = Scenario::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name, name);
            assert!(
                s.variant.is_some() || s.reproduces_on_reference,
                "{name}: names the kernel that reproduces it (a variant, or the reference)"
            );
        }
        assert_eq!(builtins().len(), BUILTIN.len());
        for s in builtins() {
            let text = s.to_toml("written back");
            assert_eq!(Scenario::parse(&text, &s.name).unwrap(), s, "{text}");
        }
        assert!(list().contains("reproduces on: luo-reboot-unlocked"));
        assert!(list().contains("reproduces on: the reference kernel"));
        assert!(matches!(
            load("no-such-scenario"),
            Err(ScenarioError::Unknown(_))
        ));
    }
}
