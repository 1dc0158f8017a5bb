//! The reset of a VM to its snapshot (issue 17): its cost with the same pages written in a
//! 512 MiB and an 8 GiB guest (flat in guest size: only the pages written are copied,
//! KVM's dirty bitmap aside), and the memcpy of the same bytes beside it.
//!
//! Run: `cargo bench -p luo-vmm --bench snapshot_reset` (needs /dev/kvm; a minute). The VM
//! runs no guest: the written pages are written by the host, and the reset is told about
//! them besides reading KVM's dirty log (which it reads whole, as in a real reset).

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

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
