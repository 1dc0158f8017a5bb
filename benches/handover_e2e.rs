//! End-to-end handover latency of the reference guest on /dev/kvm, measured by luo-vmm
//! itself: every sample is one real live update inside a VM, and criterion receives
//! (through `iter_custom`) the durations luo-vmm measured between the marks, never the
//! wall time of starting a process or booting a VM.
//!
//! Several handovers run in one VM (`--repeat`), so a configuration costs one boot plus
//! `SAMPLES` handovers. On an instruction-emulating KVM one handover takes minutes: the
//! default "quick" matrix there takes hours (see README); pick a matrix with
//! `LUO_E2E=quick|full|<name>,<name>,...` (names below).
//!
//! `LUO_E2E=intercept-ratio` measures the interception's own cost as one number: VMs of
//! the `1M` workload with the interception on and off (`--no-intercept`) alternate in ABBA
//! order in this one process (`LUO_E2E_PAIRS` pairs, default 3, of `LUO_E2E_REPEAT`
//! handovers each, default 2), and the bench prints the ratio of the mean blackouts with
//! its 95% confidence interval (`luo_vmm::report::stats::ratio_of_means`).
//!
//!     cargo bench -p luo-vmm --bench handover_e2e
//!
//! Afterwards the JSON reports of every run are in target/luo-e2e/; the bench prints their
//! table and writes target/luo-e2e/phases.svg (through `luo-vmm report`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, SamplingMode};
use luo_handover::timeline::human_duration;
use luo_vmm::report::read_json;
use luo_vmm::report::stats::ratio_of_means;

const LUO_VMM: &str = env!("CARGO_BIN_EXE_luo-vmm");
/// Criterion's minimum sample count, plus the one warm-up call.
const SAMPLES: usize = 11;
const PHASES: [&str; 5] = [
    "reboot-syscall",
    "serialize",
    "kexec-jump",
    "kernel-boot",
    "workload-restore",
];

#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    sessions: u32,
    memfd_size: &'static str,
    /// Breakpoints and dirty logging (off: `--no-intercept`, the agent's marks only).
    intercept: bool,
    /// KVM's dirty log during the kexec (off: `--no-dirty-log`); `--no-intercept` logs
    /// none either way.
    dirty_log: bool,
}

const ALL: [Config; 7] = [
    Config {
        name: "1M",
        sessions: 1,
        memfd_size: "1M",
        intercept: true,
        dirty_log: true,
    },
    Config {
        name: "16M",
        sessions: 1,
        memfd_size: "16M",
        intercept: true,
        dirty_log: true,
    },
    Config {
        name: "128M",
        sessions: 1,
        memfd_size: "128M",
        intercept: true,
        dirty_log: true,
    },
    Config {
        name: "8-sessions",
        sessions: 8,
        memfd_size: "1M",
        intercept: true,
        dirty_log: true,
    },
    Config {
        name: "32-sessions",
        sessions: 32,
        memfd_size: "1M",
        intercept: true,
        dirty_log: true,
    },
    Config {
        name: "1M-no-intercept",
        sessions: 1,
        memfd_size: "1M",
        intercept: false,
        dirty_log: false,
    },
    Config {
        name: "1M-no-dirty-log",
        sessions: 1,
        memfd_size: "1M",
        intercept: true,
        dirty_log: false,
    },
];

/// The interleaved measurement of the interception's cost (`LUO_E2E=intercept-ratio`).
const RATIO: &str = "intercept-ratio";
/// The confidence level of the ratio's interval.
const CONFIDENCE: f64 = 0.95;
/// Guest memory of every VM (`--mem`).
const MEM: &str = "1G";
/// vCPUs of every VM (`--vcpus`).
const VCPUS: &str = "1";

/// What `LUO_E2E` asks for: the configurations, and whether the interleaved
/// interception ratio too.
fn selection() -> (Vec<Config>, bool) {
    let choice = std::env::var("LUO_E2E").unwrap_or_else(|_| "quick".into());
    let names: Vec<&str> = match choice.as_str() {
        "full" => ALL.iter().map(|c| c.name).chain([RATIO]).collect(),
        "quick" => vec!["1M", "16M", "8-sessions", "1M-no-intercept"],
        list => list.split(',').collect(),
    };
    for n in &names {
        if *n != RATIO && !ALL.iter().any(|c| c.name == *n) {
            eprintln!("handover_e2e: LUO_E2E names no configuration {n:?}; ignored");
        }
    }
    let configs = ALL
        .iter()
        .copied()
        .filter(|c| names.contains(&c.name))
        .collect();
    (configs, names.contains(&RATIO))
}

/// The configuration called `name` in [`ALL`].
fn config(name: &str) -> Config {
    *ALL.iter()
        .find(|c| c.name == name)
        .expect("a configuration of ALL")
}

/// A positive count from the environment variable `var`, `default` when unset.
fn env_count(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Err(_) => default,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{var}={v:?}: want a positive whole number"),
        },
    }
}

/// One handover as luo-vmm measured it.
#[derive(Debug, Clone)]
struct Sample {
    blackout: Duration,
    phases: HashMap<String, Duration>,
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/luo-e2e");
    std::fs::create_dir_all(&dir).expect("cannot create target/luo-e2e");
    dir
}

/// What one VM's report says.
#[derive(Debug, Clone)]
struct VmRun {
    /// Its handovers that have a blackout.
    samples: Vec<Sample>,
    /// The report's `verified` (never with `--no-intercept`: nothing checks the KHO state).
    verified: bool,
    /// Host time luo-vmm held the guest stopped in its hooks, all handovers together.
    hook: Duration,
}

/// Runs one VM with `repeat` handovers of `cfg`, its JSON report and console as
/// `dir/label.json` and `dir/label.console`, and returns what its report says (possibly
/// fewer handovers than `repeat`), or why there is no report.
fn run_vm(cfg: &Config, dir: &Path, label: &str, repeat: usize) -> Result<VmRun, String> {
    let json = dir.join(format!("{label}.json"));
    let _ = std::fs::remove_file(&json);
    // The console goes to a file (follow it with tail -f to see the handovers go by).
    let console = dir.join(format!("{label}.console"));
    let _ = std::fs::remove_file(&console);
    let repeat = repeat.to_string();
    let sessions = cfg.sessions.to_string();
    let mut args = vec![
        "handover",
        "--quiet",
        "--sessions",
        &sessions,
        "--memfd-size",
        cfg.memfd_size,
        "--repeat",
        &repeat,
        "--mem",
        MEM,
        "--vcpus",
        VCPUS,
        "--timeout",
        "20000",
        "--json",
        json.to_str().unwrap(),
        "--console-log",
        console.to_str().unwrap(),
    ];
    if !cfg.intercept {
        args.push("--no-intercept");
    } else if !cfg.dirty_log {
        args.push("--no-dirty-log");
    }
    eprintln!("handover_e2e: {label}: luo-vmm {}", args.join(" "));
    let status = Command::new(LUO_VMM)
        .args(&args)
        .status()
        .expect("cannot run luo-vmm");
    let report = read_json(&json).map_err(|e| format!("{label}: {status}: {e}"))?;
    let samples = report
        .rounds
        .iter()
        .filter_map(|r| {
            Some(Sample {
                blackout: Duration::from_nanos(r.handover.blackout_ns?),
                phases: r
                    .handover
                    .phases
                    .iter()
                    .map(|p| (p.name.clone(), Duration::from_nanos(p.duration_ns)))
                    .collect(),
            })
        })
        .collect();
    Ok(VmRun {
        samples,
        verified: report.verified,
        hook: Duration::from_nanos(report.rounds.iter().map(|r| r.hook_ns).sum()),
    })
}

/// Runs one VM with `SAMPLES` handovers of `cfg` and returns what luo-vmm measured.
fn run(cfg: &Config) -> Vec<Sample> {
    let dir = out_dir();
    let samples = run_vm(cfg, &dir, cfg.name, SAMPLES)
        .expect("no readable JSON report")
        .samples;
    assert!(
        samples.len() >= SAMPLES,
        "{}: luo-vmm measured {} of {SAMPLES} handovers; see {}",
        cfg.name,
        samples.len(),
        dir.join(format!("{}.json", cfg.name)).display()
    );
    samples
}

thread_local! {
    static CACHE: RefCell<HashMap<&'static str, Vec<Sample>>> = RefCell::new(HashMap::new());
}

fn samples(cfg: &Config) -> Vec<Sample> {
    CACHE.with(|c| {
        c.borrow_mut()
            .entry(cfg.name)
            .or_insert_with(|| run(cfg))
            .clone()
    })
}

/// Feeds criterion the measured durations: each call consumes the next `iters` samples
/// (cycling through them when there are fewer than criterion's 10 samples plus warm-up).
fn bench_measured(c: &mut Criterion, group: &str, id: &str, values: Vec<Duration>) {
    if values.is_empty() {
        eprintln!("handover_e2e: {group}/{id}: nothing measured, nothing for criterion");
        return;
    }
    let mut g = c.benchmark_group(group);
    g.sample_size(SAMPLES - 1)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_nanos(1))
        .measurement_time(Duration::from_nanos(1));
    let mut next = 0usize;
    g.bench_function(BenchmarkId::from_parameter(id), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let v = values[next % values.len()];
                    next += 1;
                    v
                })
                .sum()
        })
    });
    g.finish();
}

fn mean(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len().max(1) as f64
}

/// A duration in seconds as luo-vmm's reports write it.
fn human(secs: f64) -> String {
    human_duration(
        Duration::from_secs_f64(secs)
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX),
    )
}

/// The interception's cost as one number: `LUO_E2E_PAIRS` pairs of VMs, the same workload
/// as `1M` with the interception on (`1M`) and off (`1M-no-intercept`), run one after
/// the other in ABBA order (on, off, off, on, on, off, ...) so that a load drifting
/// slowly weighs on both alike, each VM doing `LUO_E2E_REPEAT` handovers. Prints the ratio
/// of the mean blackouts, on / off, with its Fieller interval, and feeds criterion both
/// sets. Reports and consoles go to target/luo-e2e/intercept-ratio/.
fn intercept_ratio(c: &mut Criterion) {
    let pairs = env_count("LUO_E2E_PAIRS", 3);
    let repeat = env_count("LUO_E2E_REPEAT", 2);
    let (on_cfg, off_cfg) = (config("1M"), config("1M-no-intercept"));
    let dir = out_dir().join(RATIO);
    std::fs::create_dir_all(&dir).expect("cannot create target/luo-e2e/intercept-ratio");
    let started = Instant::now();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let mut vm = 0;
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for intercept in order {
            vm += 1;
            let (cfg, side) = if intercept {
                (&on_cfg, "on")
            } else {
                (&off_cfg, "off")
            };
            let label = format!("{vm:02}-{side}");
            let (blackouts, verified, hook) = match run_vm(cfg, &dir, &label, repeat) {
                Ok(r) => (
                    r.samples.iter().map(|x| x.blackout).collect::<Vec<_>>(),
                    r.verified,
                    r.hook,
                ),
                Err(e) => {
                    eprintln!("handover_e2e: {RATIO}: {e}; this VM's handovers are left out");
                    (Vec::new(), false, Duration::ZERO)
                }
            };
            eprintln!(
                "handover_e2e: {RATIO}: {label} ({:.0?} since the start): {} of {repeat} \
                 handovers measured, blackouts {:?}, verified {verified}, luo-vmm held the \
                 guest {hook:?}",
                started.elapsed(),
                blackouts.len(),
                blackouts
            );
            if intercept { &mut on } else { &mut off }.extend(blackouts);
        }
    }
    let wall = started.elapsed();
    bench_measured(c, "blackout", &format!("{RATIO}/on"), on.clone());
    bench_measured(c, "blackout", &format!("{RATIO}/off"), off.clone());
    let secs = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>();
    match ratio_of_means(&secs(&on), &secs(&off), CONFIDENCE) {
        Ok(r) => {
            println!(
                "interception on/off blackout ratio: {:.3} ({:.0}% CI {:.3}-{:.3}; {} handovers \
                 on, {} off, interleaved ABBA)",
                r.ratio,
                r.confidence * 100.0,
                r.low,
                r.high,
                r.n_num,
                r.n_den
            );
            println!(
                "  mean blackout on {}, off {}; Fieller's interval, Welch df {:.1}; {} VMs \
                 ({pairs} on/off pairs) x {repeat} handovers in {:.0?} wall",
                human(r.mean_num),
                human(r.mean_den),
                r.df,
                2 * pairs,
                wall
            );
        }
        Err(e) => println!(
            "interception on/off blackout ratio: not computed: {e} ({} handovers on, {} off, \
             interleaved ABBA, {:.0?} wall)",
            on.len(),
            off.len(),
            wall
        ),
    }
}

fn handover_e2e(c: &mut Criterion) {
    let (configs, ratio) = selection();
    let mut blackout_means: HashMap<&str, f64> = HashMap::new();
    for cfg in configs {
        let s = samples(&cfg);
        let blackouts: Vec<Duration> = s.iter().map(|x| x.blackout).collect();
        blackout_means.insert(cfg.name, mean(&blackouts));
        bench_measured(c, "blackout", cfg.name, blackouts);
        if cfg.intercept {
            for phase in PHASES {
                let v: Vec<Duration> = s
                    .iter()
                    .filter_map(|x| x.phases.get(phase).copied())
                    .collect();
                if v.len() == s.len() {
                    bench_measured(c, &format!("phase/{phase}"), cfg.name, v);
                }
            }
        }
    }
    if let (Some(on), Some(off)) = (
        blackout_means.get("1M"),
        blackout_means.get("1M-no-intercept"),
    ) {
        println!(
            "interception overhead (1M / 1M-no-intercept, separate VMs, not interleaved): \
             blackout with breakpoints + dirty log / without = {:.3}",
            on / off
        );
    }
    if ratio {
        intercept_ratio(c);
    }
    write_table_and_picture();
}

/// The table and the picture of every report in target/luo-e2e (this run's and earlier
/// ones), by `luo-vmm report`.
fn write_table_and_picture() {
    let dir = out_dir();
    let mut reports: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    reports.sort();
    if reports.is_empty() {
        return;
    }
    let svg = dir.join("phases.svg");
    let status = Command::new(LUO_VMM)
        .arg("report")
        .args(&reports)
        .arg("--svg")
        .arg(&svg)
        .status();
    match status {
        Ok(s) if s.success() => println!("table above; picture: {}", svg.display()),
        other => eprintln!("handover_e2e: luo-vmm report failed: {other:?}"),
    }
}

/// The benchmark group (what `criterion_group!` would generate, documented).
fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    handover_e2e(&mut criterion);
}

criterion_main!(benches);
