//! Host-side handover work, without KVM: how long the VMM needs to read KHO state at
//! `next-kernel-start`, to intersect KVM's dirty log with the preserved extents, and to digest
//! extents. Guest memory is a `SparseMemory` / `VecMemory` laid out by the same fixtures the
//! tests use, byte for byte as Linux 7.2 lays it out.
//!
//! Run: `cargo bench --bench handover_host` (about a minute). After criterion's own output it
//! prints a scaling summary measured with a plain timer.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use luo_handover::budget::Budget;
use luo_handover::digest::{DigestAlgorithm, ExtentDigests};
use luo_handover::extents::{classify_dirty, DirtyBitmap, ExtentSet};
use luo_handover::mem::{to_usize, GuestMemoryRead, SparseMemory, VecMemory, PAGE_SIZE};
use luo_handover::Handover;

#[path = "../handover/tests/support/fixture.rs"]
mod fixture;

use fixture::{HandoverFixture, HandoverSpec, MemfdSpec, SessionSpec, XorShift};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// One KHO layout to parse.
struct ParseCase {
    name: &'static str,
    mem: SparseMemory,
    zero_page: u64,
    pages: u64,
}

fn spec_with_memfd(folios: u64, extra_blocks: Vec<(u64, u32)>) -> HandoverSpec {
    let mut spec = HandoverSpec::small();
    spec.meta_base = 0x10_0000;
    spec.radix_base = 0xc0_0000;
    spec.sessions = vec![SessionSpec {
        name: "bench".into(),
        memfds: vec![MemfdSpec {
            token: 1,
            first_pfn: 0x1_0000,
            folios,
            size: folios * PAGE_SIZE,
        }],
        other_files: vec![],
    }];
    spec.extra_blocks = extra_blocks;
    spec
}

fn parse_cases() -> Vec<ParseCase> {
    let build = |name, spec: HandoverSpec| {
        let mut mem = SparseMemory::new(0, 64 * GIB);
        let fx = HandoverFixture::write(&mut mem, &spec).expect("fixture fits");
        ParseCase {
            name,
            zero_page: fx.zero_page,
            pages: fx.preserved_pages(),
            mem,
        }
    };
    // 10M: 19,000 order-9 (2 MiB) folios from 4 GiB, plus 272,000 order-0 pages, every other
    // page from 48 GiB (fragmented: each is its own run). 19,000 * 512 + 272,000 = 10,000,000.
    let mut big: Vec<(u64, u32)> = (0..19_000u64).map(|i| (4 * GIB + i * 2 * MIB, 9)).collect();
    big.extend((0..272_000u64).map(|i| (48 * GIB + i * 2 * PAGE_SIZE, 0)));
    vec![
        build(
            "1k_pages/memfd_1000_order0_folios",
            spec_with_memfd(1_000, vec![]),
        ),
        build(
            "100k_pages/memfd_100000_order0_folios",
            spec_with_memfd(100_000, vec![]),
        ),
        build(
            "10M_pages/19k_order9_folios+272k_order0_every_other_page",
            spec_with_memfd(256, big),
        ),
    ]
}

fn bench_parse(c: &mut Criterion, cases: &[ParseCase]) {
    let mut g = c.benchmark_group("kho_parse");
    for case in cases {
        g.throughput(Throughput::Elements(case.pages));
        g.bench_function(BenchmarkId::new("read", case.name), |b| {
            b.iter(|| Handover::read(&case.mem, black_box(case.zero_page)).expect("parses"))
        });
        let h = Handover::read(&case.mem, case.zero_page).expect("parses");
        g.bench_function(BenchmarkId::new("labelled_extents", case.name), |b| {
            b.iter(|| black_box(&h).preserved_extents())
        });
    }
    g.finish();
}

/// A guest of `size` bytes with a dirty bitmap: `written` pages spread over the whole guest,
/// one of them inside each of the 64 preserved extents (1 MiB each, in the first 512 MiB).
struct DirtyCase {
    size: u64,
    words: Vec<u64>,
}

const EXTENTS: u64 = 64;
const WRITTEN: u64 = 4096;

fn preserved_set() -> ExtentSet {
    let mut b = ExtentSet::builder();
    for i in 0..EXTENTS {
        let start = 64 * MIB + i * 6 * MIB;
        b.add(start, start + MIB, "kho");
    }
    b.build()
}

fn scratch_set() -> ExtentSet {
    let mut b = ExtentSet::builder();
    b.add(16 * MIB, 48 * MIB, "scratch");
    b.build()
}

fn dirty_case(size: u64) -> DirtyCase {
    let pages = size / PAGE_SIZE;
    let mut words = vec![0u64; (pages / 64) as usize];
    // Sets the page's bit; false if it was already set (or out of range).
    let mut set = |page: u64| match words.get_mut((page / 64) as usize) {
        Some(w) if *w >> (page % 64) & 1 == 0 => {
            *w |= 1 << (page % 64);
            true
        }
        _ => false,
    };
    for i in 0..EXTENTS {
        set((64 * MIB + i * 6 * MIB + 4 * PAGE_SIZE) / PAGE_SIZE);
    }
    // The rest land outside the extents, so every guest size sees the same 64 hits.
    let preserved = preserved_set();
    let mut rng = XorShift(size);
    let mut placed = EXTENTS;
    while placed < WRITTEN {
        let page = rng.below(pages);
        if !preserved.contains(page * PAGE_SIZE) && set(page) {
            placed += 1;
        }
    }
    DirtyCase { size, words }
}

fn gib_label(size: u64) -> String {
    if size >= GIB {
        format!("{}GiB", size / GIB)
    } else {
        format!("{}MiB", size / MIB)
    }
}

fn bench_dirty(c: &mut Criterion, cases: &[DirtyCase]) {
    let (preserved, scratch) = (preserved_set(), scratch_set());
    let mut g = c.benchmark_group("dirty_log_vs_extents");
    for case in cases {
        let bm = DirtyBitmap::new(0, &case.words);
        let label = format!(
            "{}_guest_{WRITTEN}_written_{EXTENTS}_extents",
            gib_label(case.size)
        );
        g.bench_function(BenchmarkId::new("written_pages(intersect)", &label), |b| {
            b.iter(|| preserved.written_pages(black_box(&bm)))
        });
        g.bench_function(
            BenchmarkId::new("classify_dirty(+other_scan)", &label),
            |b| b.iter(|| classify_dirty(black_box(&bm), &preserved, &scratch)),
        );
        g.bench_function(BenchmarkId::new("naive_scan_then_lookup", &label), |b| {
            b.iter(|| {
                black_box(&bm)
                    .iter()
                    .filter(|&p| preserved.contains(p))
                    .count()
            })
        });
    }
    g.finish();
}

/// 16 extents of 1 MiB spread over a 64 MiB guest.
fn digest_setup() -> (VecMemory, ExtentSet) {
    let mut rng = XorShift(7);
    let bytes: Vec<u8> = (0..64 * MIB)
        .map(|_| rng.next_u64().to_le_bytes()[0])
        .collect();
    let mut b = ExtentSet::builder();
    for i in 0..16 {
        b.add(i * 4 * MIB, i * 4 * MIB + MIB, "kho");
    }
    (VecMemory::new(0, bytes), b.build())
}

fn memcpy_extents(mem: &VecMemory, set: &ExtentSet, dst: &mut [u8]) {
    let mut at = 0usize;
    for e in set.iter() {
        let n = to_usize(e.len());
        if let Some(d) = dst.get_mut(at..at + n) {
            mem.read_at(e.start, d).expect("in range");
        }
        at += n;
    }
}

fn bench_digest(c: &mut Criterion, mem: &VecMemory, set: &ExtentSet) {
    let mut g = c.benchmark_group("extent_digest_16MiB");
    g.throughput(Throughput::Bytes(set.total_bytes()));
    for alg in [DigestAlgorithm::Xxh3, DigestAlgorithm::Sha256] {
        g.bench_function(alg.name(), |b| {
            b.iter(|| ExtentDigests::compute(mem, black_box(set), alg).expect("reads"))
        });
    }
    let mut dst = vec![0u8; to_usize(set.total_bytes())];
    g.bench_function("memcpy", |b| {
        b.iter(|| memcpy_extents(mem, black_box(set), &mut dst))
    });
    g.finish();
}

/// Median wall time of `f`, in ns, over enough runs to take ~`budget`.
fn time_ns(budget: Duration, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    let once = t.elapsed().max(Duration::from_nanos(50));
    let runs = usize::try_from((budget.as_nanos() / once.as_nanos()).clamp(3, 2001)).unwrap_or(3);
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn human(ns: f64) -> String {
    // A median of elapsed times: finite and non-negative; `as` saturates beyond u64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let ns = ns.round() as u64;
    luo_handover::timeline::human_duration(ns)
}

fn summary(parse: &[ParseCase], dirty: &[DirtyCase], mem: &VecMemory, set: &ExtentSet) {
    let budget = Duration::from_millis(300);
    println!("\n== handover_host summary (median of a plain timer) ==");
    for case in parse {
        let t = time_ns(budget, || {
            black_box(Handover::read(&case.mem, case.zero_page).ok());
        });
        println!(
            "kho_parse {:<58} {:>10}  ({:.1} ns/preserved page)",
            case.name,
            human(t),
            t / case.pages as f64
        );
    }
    let (preserved, scratch) = (preserved_set(), scratch_set());
    let mut rows = Vec::new();
    for case in dirty {
        let bm = DirtyBitmap::new(0, &case.words);
        let hits = preserved.written_pages(&bm).len();
        let a = time_ns(budget, || {
            black_box(preserved.written_pages(&bm));
        });
        let b = time_ns(budget, || {
            black_box(classify_dirty(&bm, &preserved, &scratch));
        });
        let n = time_ns(budget, || {
            black_box(bm.iter().filter(|&p| preserved.contains(p)).count());
        });
        println!(
            "dirty ∩ extents {:>6} guest ({:>7} bitmap words, {WRITTEN} written, {hits} in {EXTENTS} extents): \
             intersect {:>9}  classify {:>9}  naive {:>9}",
            gib_label(case.size),
            case.words.len(),
            human(a),
            human(b),
            human(n)
        );
        rows.push((a, b, n));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let growth = dirty.last().map_or(1, |d| d.size) / dirty.first().map_or(1, |d| d.size);
        println!(
            "scaling 512MiB -> 64GiB (guest x{growth}): intersect x{:.2}, classify(+other scan) x{:.1}, naive x{:.1}",
            last.0 / first.0,
            last.1 / first.1,
            last.2 / first.2
        );
    }
    let bytes = set.total_bytes() as f64;
    let digest = |alg| {
        time_ns(budget, || {
            black_box(ExtentDigests::compute(mem, set, alg).ok());
        })
    };
    let (xxh3, sha) = (
        digest(DigestAlgorithm::Xxh3),
        digest(DigestAlgorithm::Sha256),
    );
    let mut dst = vec![0u8; to_usize(set.total_bytes())];
    let cpy = time_ns(budget, || memcpy_extents(mem, set, &mut dst));
    let mibs = |ns: f64| bytes / ns * 1e9 / MIB as f64;
    println!(
        "digest 16 MiB in 16 extents: xxh3 {} ({:.0} MiB/s), sha256 {} ({:.0} MiB/s), memcpy {} ({:.0} MiB/s)",
        human(xxh3),
        mibs(xxh3),
        human(sha),
        mibs(sha),
        human(cpy),
        mibs(cpy),
    );
    println!(
        "digest/memcpy (throughput, same bytes) = {:.2} (xxh3, the default; >= 0.8 wanted), sha256/memcpy = {:.2}",
        cpy / xxh3,
        cpy / sha
    );
    verification_scaling(budget);
}

/// The `--verify-digest` work luo-vmm does with the guest stopped, on guests of `size`
/// bytes holding the same handover: at point-of-no-return the outgoing KHO FDT is parsed
/// and its preserved extents hashed; at next-kernel-start the handover is read, the dirty
/// bitmap intersected with its extents, the extents hashed again and compared.
struct VerifyCase {
    size: u64,
    mem: SparseMemory,
    fx: HandoverFixture,
    dirty: DirtyCase,
}

fn verify_case(size: u64) -> VerifyCase {
    let mut mem = SparseMemory::new(0, size);
    // 16 MiB of memfd folios plus KHO's and LUO's own pages, all below 512 MiB.
    let fx = HandoverFixture::write(&mut mem, &spec_with_memfd(4096, vec![])).expect("fits");
    VerifyCase {
        size,
        mem,
        fx,
        dirty: dirty_case(size),
    }
}

/// One verification: (preserved bytes hashed at each mark, extents compared).
fn verify(case: &VerifyCase) -> (u64, usize) {
    let alg = DigestAlgorithm::Xxh3;
    let budget = Budget::for_memory(&case.mem);
    let out = Handover::from_fdt(&case.mem, case.fx.kho.fdt_addr, &budget).expect("parses");
    let before =
        ExtentDigests::compute(&case.mem, &out.preserved_extents().set, alg).expect("reads");
    let next = Handover::read(&case.mem, case.fx.zero_page).expect("parses");
    let ext = next.preserved_extents();
    let bm = DirtyBitmap::new(0, &case.dirty.words);
    black_box(ext.set.written_pages(&bm));
    let after = ExtentDigests::compute(&case.mem, &ext.set, alg).expect("reads");
    let v = before.compare(&after);
    assert!(v.unchanged());
    (v.bytes.1, v.compared)
}

fn verification_scaling(budget: Duration) {
    let cases: Vec<VerifyCase> = [512 * MIB, 8 * GIB, 64 * GIB]
        .into_iter()
        .map(verify_case)
        .collect();
    let mut times = Vec::new();
    for case in &cases {
        let (bytes, extents) = verify(case);
        let t = time_ns(budget, || {
            black_box(verify(case));
        });
        println!(
            "verify (point-of-no-return + next-kernel-start) {:>6} guest: {:>9} ({} preserved in {extents} extents hashed twice)",
            gib_label(case.size),
            human(t),
            luo_handover::timeline::human_bytes(bytes)
        );
        times.push(t);
    }
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        println!(
            "scaling verify 512MiB -> 64GiB (guest x128, same preserved set): x{:.2}",
            last / first
        );
    }
}

fn main() {
    let t = Instant::now();
    let parse = parse_cases();
    let dirty: Vec<DirtyCase> = [512 * MIB, 8 * GIB, 64 * GIB]
        .into_iter()
        .map(dirty_case)
        .collect();
    let (mem, set) = digest_setup();
    println!(
        "fixtures laid out in {}",
        human(t.elapsed().as_nanos() as f64)
    );

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800))
        .nresamples(10_000)
        .without_plots()
        .configure_from_args();
    bench_parse(&mut c, &parse);
    bench_dirty(&mut c, &dirty);
    bench_digest(&mut c, &mem, &set);
    c.final_summary();
    summary(&parse, &dirty, &mem, &set);
}
