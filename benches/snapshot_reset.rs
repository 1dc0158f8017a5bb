//! The reset of a VM to its snapshot (issue 17): its cost with the same pages written in a
//! 512 MiB and an 8 GiB guest (flat in guest size: only the pages written are copied,
//! KVM's dirty bitmap aside), and the memcpy of the same bytes beside it.
//!
//! Run: `cargo bench -p luo-vmm --bench snapshot_reset` (needs /dev/kvm; a minute). The VM
//! runs no guest: the written pages are written by the host, and the reset is told about
//! them besides reading KVM's dirty log (which it reads whole, as in a real reset).
//!
//! With `LUO_SNAPSHOT_E2E=1` it also runs, side by side in this one process, the real
//! thing: `luo-vmm scenario run session-close-during-reboot --runs 5` with snapshots (run
//! 1 boots, runs 2-5 reset) and with `--no-snapshot` (every run boots), and prints both
//! wall times and their ratio (on an instruction-emulating KVM: about 25 minutes).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use luo_vmm::bench::ResetRig;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Pages written between resets: about what a scenario trial writes from its snapshot to
/// point-of-no-return (the development machine's runs wrote 7452 pages in a whole run).
const WRITTEN: [usize; 2] = [256, 4096];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_reset");
    g.sample_size(30);
    let mut means = Vec::new();
    for written in WRITTEN {
        for (name, mem) in [("512MiB", 512 * MIB), ("8GiB", 8 * GIB)] {
            let mut rig = match ResetRig::new(mem, written) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("snapshot_reset: no VM ({e}); skipped");
                    return;
                }
            };
            g.throughput(Throughput::Bytes(rig.written_bytes() as u64));
            let mut total = Duration::ZERO;
            let mut n = 0u32;
            g.bench_function(
                BenchmarkId::new(format!("reset/{written}pages"), name),
                |b| {
                    b.iter_custom(|iters| {
                        let mut t = Duration::ZERO;
                        for _ in 0..iters {
                            rig.dirty();
                            t += rig.reset().expect("reset");
                        }
                        total += t;
                        n += u32::try_from(iters).unwrap_or(u32::MAX);
                        t
                    })
                },
            );
            means.push((written, name, total / n.max(1)));
        }
        let bytes = written * 4096;
        let src = vec![0x5au8; bytes];
        let mut dst = vec![0u8; bytes];
        g.bench_function(
            BenchmarkId::new(format!("memcpy/{written}pages"), "-"),
            |b| {
                b.iter(|| {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&dst);
                })
            },
        );
    }
    g.finish();
    // A plain-timer summary: the 8 GiB / 512 MiB ratio and the memcpy ratio.
    for written in WRITTEN {
        let of = |name: &str| {
            means
                .iter()
                .find(|(w, n, _)| *w == written && *n == name)
                .map(|(_, _, d)| *d)
        };
        if let (Some(small), Some(big)) = (of("512MiB"), of("8GiB")) {
            let bytes = written * 4096;
            let src = vec![0x5au8; bytes];
            let mut dst = vec![0u8; bytes];
            let t = Instant::now();
            for _ in 0..100 {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            }
            let memcpy = t.elapsed() / 100;
            println!(
                "reset of {written} written pages: {:.1} µs (512 MiB), {:.1} µs (8 GiB): 8 GiB/512 MiB = {:.2}x; \
                 memcpy of the {} KiB: {:.1} µs (reset/memcpy {:.1}x at 512 MiB)",
                small.as_secs_f64() * 1e6,
                big.as_secs_f64() * 1e6,
                big.as_secs_f64() / small.as_secs_f64(),
                bytes / 1024,
                memcpy.as_secs_f64() * 1e6,
                small.as_secs_f64() / memcpy.as_secs_f64().max(1e-9)
            );
        }
    }
}

/// `luo-vmm scenario run session-close-during-reboot --runs 5 [EXTRA]`: its wall time,
/// or why it failed.
fn scenario_runs(extra: &[&str]) -> Result<Duration, String> {
    let logs = std::env::temp_dir().join(format!("luo-snapshot-e2e-{}", std::process::id()));
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_luo-vmm"))
        .args([
            "scenario",
            "run",
            "session-close-during-reboot",
            "--runs",
            "5",
        ])
        .args(extra)
        .arg("--log-dir")
        .arg(&logs)
        .output()
        .map_err(|e| e.to_string())?;
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(&logs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("verdict:"))
        .unwrap_or("no verdict");
    println!(
        "  luo-vmm scenario run session-close-during-reboot --runs 5 {}: {:.1} s, {verdict}",
        extra.join(" "),
        took.as_secs_f64()
    );
    if out.status.success() {
        Ok(took)
    } else {
        Err(format!("exit {:?}", out.status.code()))
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    if std::env::var("LUO_SNAPSHOT_E2E").is_ok_and(|v| v == "1") {
        println!("scenario run --runs 5, with and without snapshots:");
        match (scenario_runs(&[]), scenario_runs(&["--no-snapshot"])) {
            (Ok(with), Ok(without)) => println!(
                "with snapshots {:.1} s, without {:.1} s: {:.2}x faster",
                with.as_secs_f64(),
                without.as_secs_f64(),
                without.as_secs_f64() / with.as_secs_f64()
            ),
            (a, b) => eprintln!("snapshot_reset: a scenario run failed: {a:?} {b:?}"),
        }
    }
}
