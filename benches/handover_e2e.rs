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
//!     cargo bench -p luo-vmm --bench handover_e2e
//!
//! Afterwards the JSON reports of every run are in target/luo-e2e/; the bench prints their
//! table and writes target/luo-e2e/phases.svg (through `luo-vmm report`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_main, BenchmarkId, Criterion, SamplingMode};
use luo_vmm::report::read_json;

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
    intercept: bool,
}

const ALL: [Config; 7] = [
    Config {
        name: "1M",
        sessions: 1,
        memfd_size: "1M",
        intercept: true,
    },
    Config {
        name: "16M",
        sessions: 1,
        memfd_size: "16M",
        intercept: true,
    },
    Config {
        name: "128M",
        sessions: 1,
        memfd_size: "128M",
        intercept: true,
    },
    Config {
        name: "8-sessions",
        sessions: 8,
        memfd_size: "1M",
        intercept: true,
    },
    Config {
        name: "32-sessions",
        sessions: 32,
        memfd_size: "1M",
        intercept: true,
    },
    Config {
        name: "1M-no-intercept",
        sessions: 1,
        memfd_size: "1M",
        intercept: false,
    },
    Config {
        name: "1M-no-dirty-log",
        sessions: 1,
        memfd_size: "1M",
        intercept: true,
    },
];

fn matrix() -> Vec<Config> {
    let choice = std::env::var("LUO_E2E").unwrap_or_else(|_| "quick".into());
    let names: Vec<&str> = match choice.as_str() {
        "full" => ALL.iter().map(|c| c.name).collect(),
        "quick" => vec!["1M", "16M", "8-sessions", "1M-no-intercept"],
        list => list.split(',').collect(),
    };
    ALL.iter()
        .copied()
        .filter(|c| names.contains(&c.name))
        .collect()
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

/// Runs one VM with `SAMPLES` handovers of `cfg` and returns what luo-vmm measured.
fn run(cfg: &Config) -> Vec<Sample> {
    let json = out_dir().join(format!("{}.json", cfg.name));
    // The console goes to a file (follow it with tail -f to see the handovers go by).
    let console = out_dir().join(format!("{}.console", cfg.name));
    let _ = std::fs::remove_file(&console);
    let repeat = SAMPLES.to_string();
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
        "1G",
        "--timeout",
        "20000",
        "--json",
        json.to_str().unwrap(),
        "--console-log",
        console.to_str().unwrap(),
    ];
    if !cfg.intercept {
        args.push("--no-intercept");
    }
    if cfg.name.ends_with("no-dirty-log") {
        args.push("--no-dirty-log");
    }
    eprintln!("handover_e2e: {}: luo-vmm {}", cfg.name, args.join(" "));
    let status = Command::new(LUO_VMM)
        .args(&args)
        .status()
        .expect("cannot run luo-vmm");
    let report = read_json(&json).expect("no readable JSON report");
    let samples: Vec<Sample> = report
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
    assert!(
        samples.len() >= SAMPLES,
        "{}: luo-vmm measured {} of {SAMPLES} handovers ({status}); see {}",
        cfg.name,
        samples.len(),
        json.display()
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

/// Feeds criterion the measured durations: each call consumes the next `iters` samples.
fn bench_measured(c: &mut Criterion, group: &str, id: &str, values: Vec<Duration>) {
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

fn handover_e2e(c: &mut Criterion) {
    let mut blackout_means: HashMap<&str, f64> = HashMap::new();
    for cfg in matrix() {
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
            "interception overhead: blackout with breakpoints + dirty log / without = {:.3}",
            on / off
        );
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
