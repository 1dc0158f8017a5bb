//! The four hostile shapes of issue 10, each laid out with the fixture builder: a few guest
//! pages that once made the parsers use tens of GiB or minutes. Each must now end with a clear
//! error (or, for the labelling shape, a bounded result), having read a bounded number of guest
//! pages ([`CountingMemory`]) and kept a bounded number of records ([`Budget::used`]). No test
//! here measures time: the work is bounded by counts, and timing belongs in benchmarks. The
//! last test is issue 16's overlapping radix blocks, which must be counted once.

#[path = "support/fixture.rs"]
mod fixture;

use std::cell::Cell;

use fixture::{
    kho_fdt_blob, HandoverFixture, HandoverSpec, MemfdSpec, RadixBuilder, RawFdt, SessionSpec,
    WriteMem,
};
use luo_handover::budget::{Budget, BudgetError, Resource, Usage};
use luo_handover::fdt::FdtError;
use luo_handover::invariants::{check, Invariant, MAX_FINDINGS};
use luo_handover::kho::{KhoError, KhoSubtree, KHO_FDT_COMPATIBLE};
use luo_handover::luo::{LuoError, FILE_SER_SIZE, MEMFD_COMPATIBLE};
use luo_handover::mem::{
    read_u64_le, GuestMemoryRead, GuestRam, MemError, SparseMemory, PAGE_SIZE,
};
use luo_handover::radix::RadixError;
use luo_handover::{Handover, HandoverError};

const GIB: u64 = 1 << 30;
/// Every other bit: 16384 one-block runs per bitmap page.
const ALTERNATING: u64 = 0x5555_5555_5555_5555;

/// Counts the guest pages read through it (a read of `n` bytes touches `ceil(n / 4096)` or one
/// more), independently of the parsers' own budget accounting.
struct CountingMemory<'a> {
    inner: &'a SparseMemory,
    pages: Cell<u64>,
}

impl<'a> CountingMemory<'a> {
    fn new(inner: &'a SparseMemory) -> Self {
        CountingMemory {
            inner,
            pages: Cell::new(0),
        }
    }

    fn pages(&self) -> u64 {
        self.pages.get()
    }
}

impl GuestMemoryRead for CountingMemory<'_> {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let first = gpa / PAGE_SIZE;
        let last = gpa.saturating_add(buf.len().max(1) as u64 - 1) / PAGE_SIZE;
        self.pages.set(self.pages.get() + (last - first + 1));
        self.inner.read_at(gpa, buf)
    }

    fn ram(&self) -> Option<GuestRam> {
        self.inner.ram()
    }
}

/// Reads the handover at `fx` through a counting reader with `budget`; returns the result and
/// the pages read.
fn read(
    mem: &SparseMemory,
    fx: &HandoverFixture,
    budget: &Budget,
) -> (Result<Handover, HandoverError>, u64) {
    let counting = CountingMemory::new(mem);
    let r = Handover::read_with(&counting, fx.zero_page, budget);
    (r, counting.pages())
}

/// Shape 1: 64 extra FDT subnodes with `preserved-data = 0` and `blob-size = u64::MAX`, over a
/// radix tree of a million one-page runs (64 bitmap pages of alternating bits). Labelling took
/// 47 s and 5.4 GiB. Such a blob is not guest RAM: refused before the tree is read. Blobs that
/// *are* RAM (64 labels each covering all the runs) label in one sweep, with output linear in
/// runs plus labels.
#[test]
fn subtrees_spanning_a_million_runs() {
    let mut mem = SparseMemory::new(0, 12 * GIB);
    let mut fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();
    let mut radix = RadixBuilder::new(GIB);
    for &(pa, order) in &fx.preserved {
        radix.preserve_block(pa, order);
    }
    radix.preserve_block(3 * GIB, 0); // where the FDT moves
    for b in 0..64 {
        radix.fill_leaf(4 * GIB + b * (128 << 20), 0, ALTERNATING);
    }
    let root = radix.write(&mut mem).unwrap();
    let fixture_subtrees = fx.subtrees.clone();
    let with_blobs = |preserved_data, blob_size| {
        let mut subtrees = fixture_subtrees.clone();
        subtrees.extend((0..64).map(|i| KhoSubtree {
            name: format!("evil{i}"),
            preserved_data,
            blob_size,
        }));
        kho_fdt_blob(KHO_FDT_COMPATIBLE, root, &subtrees)
    };

    fx.replace_fdt(&mut mem, 3 * GIB, &with_blobs(0, u64::MAX))
        .unwrap();
    let budget = Budget::for_memory(&mem);
    let (r, pages) = read(&mem, &fx, &budget);
    assert_eq!(
        r.unwrap_err(),
        HandoverError::Kho(KhoError::Budget(BudgetError::OutsideRam {
            what: "KHO subtree blob",
            start: 0,
            len: u64::MAX
        }))
    );
    assert!(pages <= 6, "zero page, setup_data, FDT: {pages} pages read");

    // The same labels over RAM: the parse succeeds and labelling stays linear.
    fx.replace_fdt(&mut mem, 3 * GIB, &with_blobs(4 * GIB, 8 * GIB))
        .unwrap();
    let budget = Budget::for_memory(&mem);
    let (h, pages) = read(&mem, &fx, &budget);
    let h = h.unwrap();
    let runs = 64 * 16384;
    let fixture_runs = h.preserved.runs.len() - runs;
    assert!(
        fixture_runs < 16,
        "hostile runs + {fixture_runs} of the fixture's"
    );
    assert!(pages < 200, "{pages} pages read");
    assert!(budget.used().records < budget.limits().records);
    let ext = h.preserved_extents();
    assert!(ext.set.len() <= h.preserved.runs.len() + 2 * h.fdt.subtrees.len());
    assert_eq!(ext.set.find(4 * GIB).unwrap().owner, "evil63");
    // The gaps between the runs, once each, under the label that wins there.
    assert_eq!(ext.not_preserved.len(), runs);
    // The invariants over the same state: one sort and sweep each, findings counted and
    // bounded. The 64 blobs share their pages (63 findings); every gap is a range they point
    // at that is not preserved.
    let checks = check(&h, &ext);
    let of = |id| checks.iter().find(|c| c.id == id).unwrap();
    assert_eq!(of(Invariant::OneOwnerPerPage).count, 63);
    assert_eq!(of(Invariant::ReferencedPagesPreserved).count, runs as u64);
    assert!(checks.iter().all(|c| c.findings.len() <= MAX_FINDINGS));
}

/// Shape 2: 63 file records in one block, all pointing at one memfd record whose folio array
/// (one guest page listed 65536 times in its vmalloc chunks) declares 2^24 folios: about 10^9
/// folio records, aborting at a 4 GiB limit. The second listing of the page is a page reached
/// twice. Sessions sharing one file block, which multiplied it further, are refused the same
/// way.
#[test]
fn one_memfd_record_behind_sixty_three_files() {
    let mut mem = SparseMemory::new(0, GIB);
    let mut spec = HandoverSpec::small();
    spec.sessions = vec![SessionSpec {
        name: "evil".into(),
        memfds: vec![MemfdSpec {
            token: 1,
            first_pfn: 0x200,
            folios: 256,
            size: 1 << 20,
        }],
        other_files: vec![],
    }];
    let fx = HandoverFixture::write(&mut mem, &spec).unwrap();
    let ser = fx.luo.memfd_ser[0];
    let old_chunk = read_u64_le(&mem, ser + 32).unwrap();
    let array_page = read_u64_le(&mem, old_chunk + 8).unwrap();

    // 2^24 folios in 65536 pages, all of them the same page, in a chain of 129 chunks.
    let chunks = 0x2000_0000u64;
    let mut listed = 0u64;
    for c in 0..129u64 {
        let mut page = vec![0u8; 4096];
        let next = if c == 128 {
            0
        } else {
            chunks + (c + 1) * PAGE_SIZE
        };
        page[..8].copy_from_slice(&next.to_le_bytes());
        let n = (65536 - listed).min(511);
        for slot in page[8..].chunks_exact_mut(8).take(n as usize) {
            slot.copy_from_slice(&array_page.to_le_bytes());
        }
        listed += n;
        mem.put(chunks + c * PAGE_SIZE, &page).unwrap();
    }
    mem.put(ser + 24, &(1u64 << 24).to_le_bytes()).unwrap();
    mem.put(ser + 32, &chunks.to_le_bytes()).unwrap();
    mem.put(ser + 40, &65536u32.to_le_bytes()).unwrap();
    mem.put(ser + 44, &0u32.to_le_bytes()).unwrap(); // order 0

    // One file block of 63 memfd records, all pointing at that record.
    let session = fx.luo.session_block + 16;
    let files = read_u64_le(&mem, session + 64).unwrap();
    let mut block = vec![0u8; 4096];
    block[8..16].copy_from_slice(&63u64.to_le_bytes());
    for (i, rec) in block[16..]
        .chunks_exact_mut(FILE_SER_SIZE)
        .take(63)
        .enumerate()
    {
        rec[..MEMFD_COMPATIBLE.len()].copy_from_slice(MEMFD_COMPATIBLE.as_bytes());
        rec[48..56].copy_from_slice(&ser.to_le_bytes());
        rec[56..64].copy_from_slice(&(i as u64).to_le_bytes());
    }
    mem.put(files, &block).unwrap();
    mem.put(session + 72, &63u64.to_le_bytes()).unwrap();

    let budget = Budget::for_memory(&mem);
    let (r, pages) = read(&mem, &fx, &budget);
    assert_eq!(
        r.unwrap_err(),
        HandoverError::Luo(LuoError::PageReachedTwice {
            page: array_page,
            first: "memfd folio array",
            second: "memfd folio array"
        })
    );
    assert!(pages < 40, "{pages} pages read");
    assert!(budget.used().records < 1000, "{:?}", budget.used());

    // Two sessions sharing one file block.
    let mut mem = SparseMemory::new(0, GIB);
    let mut spec = HandoverSpec::small();
    spec.sessions.push(SessionSpec {
        name: "twin".into(),
        ..spec.sessions[0].clone()
    });
    spec.sessions[1].memfds[0].first_pfn = 0x400;
    let fx = HandoverFixture::write(&mut mem, &spec).unwrap();
    let first = fx.luo.session_block + 16;
    let shared = read_u64_le(&mem, first + 64).unwrap();
    mem.put(first + 80 + 64, &shared.to_le_bytes()).unwrap();
    let budget = Budget::for_memory(&mem);
    let (r, pages) = read(&mem, &fx, &budget);
    assert_eq!(
        r.unwrap_err(),
        HandoverError::Luo(LuoError::PageReachedTwice {
            page: shared,
            first: "file block",
            second: "file block"
        })
    );
    assert!(pages < 40, "{pages} pages read");
}

/// Shape 3: a 1 MiB FDT with tens of thousands of properties sharing one 512 KiB name: 21 GiB
/// of name copies. Names longer than 256 bytes are refused at the first one, looked for no
/// further than that; names at the limit are charged, and the bytes budget stops them.
#[test]
fn a_megabyte_fdt_of_long_property_names() {
    let mut mem = SparseMemory::new(0, GIB);
    let mut fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();
    let radix_root = fx.radix_root;
    let hostile_fdt = |name_len: usize| {
        let mut raw = RawFdt::default();
        let compatible = raw.string("compatible");
        let map = raw.string("preserved-memory-map");
        let long = raw.string(&"n".repeat(name_len));
        raw.begin_node("")
            .prop(compatible, b"kho-v4\0")
            .prop(map, &radix_root.to_le_bytes());
        let mut props = 0u64;
        while raw.len() + 12 + 8 <= 1 << 20 {
            raw.prop(long, &[]);
            props += 1;
        }
        raw.end_node();
        (raw.finish(), props)
    };

    let (blob, props) = hostile_fdt(512 << 10);
    assert!(props > 40_000, "{props} properties");
    fx.replace_fdt(&mut mem, 0x2000_0000, &blob).unwrap();
    let budget = Budget::for_memory(&mem);
    let (r, pages) = read(&mem, &fx, &budget);
    assert!(
        matches!(
            r.unwrap_err(),
            HandoverError::Kho(KhoError::Fdt(FdtError::Malformed {
                what: "name longer than MAX_NAME_LEN",
                ..
            }))
        ),
        "refused at the first long name"
    );
    assert!(pages <= 256 + 8, "the blob and its header: {pages} pages");
    assert!(budget.used().bytes < 64, "{:?}", budget.used());

    let (blob, props) = hostile_fdt(256);
    assert!(props > 80_000, "{props} properties");
    fx.replace_fdt(&mut mem, 0x2000_0000, &blob).unwrap();
    let budget = Budget::for_memory(&mem);
    let (r, _) = read(&mem, &fx, &budget);
    let limit = budget.limits().bytes;
    assert_eq!(
        r.unwrap_err(),
        HandoverError::Kho(KhoError::Fdt(FdtError::Budget(BudgetError::Exhausted {
            resource: Resource::Bytes,
            limit
        })))
    );
    assert!(budget.used().bytes <= limit);
}

/// Shape 4: a radix tree of 1023 bitmap pages of alternating bits (16 million runs, 1.96 GiB
/// from 4 MiB of guest data). In a 1 GiB guest, the ninth bitmap names memory that is not RAM;
/// with a RAM map that covers them all, the records budget of a 1 GiB guest stops the walk.
#[test]
fn a_thousand_alternating_bitmaps() {
    let tree = |mem: &mut SparseMemory| {
        let mut fx = HandoverFixture::write(mem, &HandoverSpec::small()).unwrap();
        let mut radix = RadixBuilder::new(0x3000_0000);
        for b in 0..1023 {
            radix.fill_leaf(b * (128 << 20), 0, ALTERNATING);
        }
        let root = radix.write(mem).unwrap();
        let blob = kho_fdt_blob(KHO_FDT_COMPATIBLE, root, &fx.subtrees);
        fx.replace_fdt(mem, fx.kho.fdt_addr, &blob).unwrap();
        fx
    };

    let mut mem = SparseMemory::new(0, GIB);
    let fx = tree(&mut mem);
    let budget = Budget::for_memory(&mem);
    let (r, pages) = read(&mem, &fx, &budget);
    assert_eq!(
        r.unwrap_err(),
        HandoverError::Radix(RadixError::Budget(BudgetError::OutsideRam {
            what: "KHO preserved block",
            start: GIB,
            len: PAGE_SIZE
        }))
    );
    assert!(pages < 32, "{pages} pages read");
    assert!(
        budget.used().records <= 8 * 16384 + 64,
        "{:?}",
        budget.used()
    );

    let mut mem = SparseMemory::new(0, 128 * GIB);
    let fx = tree(&mut mem);
    let budget = Budget::new(mem.ram().unwrap(), Usage::for_ram(GIB));
    let (r, pages) = read(&mem, &fx, &budget);
    let limit = budget.limits().records;
    assert_eq!(
        r.unwrap_err(),
        HandoverError::Radix(RadixError::Budget(BudgetError::Exhausted {
            resource: Resource::Records,
            limit
        }))
    );
    assert!(budget.used().records <= limit);
    // 16384 runs per bitmap: the walk stopped after limit / 16384 bitmaps, not 1023.
    let bitmaps = limit / 16384 + 1;
    assert!(pages < bitmaps + 32, "{pages} pages read");
}

/// Issue 16: a radix tree whose blocks overlap (a 2 MiB block and three order-0 blocks inside
/// it, 515 pages by block size over 512 distinct pages). The summary counts the distinct pages,
/// as the labelled extents do, and `one-owner-per-page` reports the overlap.
#[test]
fn overlapping_radix_blocks_are_counted_once() {
    let base = {
        let mut mem = SparseMemory::new(0, GIB);
        let fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();
        let h = Handover::read(&mem, fx.zero_page).unwrap();
        assert_eq!(h.summary().preserved_pages, fx.preserved_pages());
        fx.preserved_pages()
    };

    let block = 0x2000_0000;
    let mut spec = HandoverSpec::small();
    spec.extra_blocks = vec![
        (block, 9),
        (block, 0),
        (block + PAGE_SIZE, 0),
        (block + 511 * PAGE_SIZE, 0),
    ];
    let mut mem = SparseMemory::new(0, GIB);
    let fx = HandoverFixture::write(&mut mem, &spec).unwrap();
    assert_eq!(fx.preserved_pages(), base + 515, "block sizes added up");
    let budget = Budget::for_memory(&mem);
    let (h, pages) = read(&mem, &fx, &budget);
    let h = h.unwrap();
    assert!(pages < 40, "{pages} pages read");
    assert_eq!(h.preserved.pages, base + 512);
    assert_eq!(h.summary().preserved_pages, base + 512);
    let ext = h.preserved_extents();
    assert_eq!(ext.set.total_pages(), base + 512);
    let checks = check(&h, &ext);
    let one_owner = checks
        .iter()
        .find(|c| c.id == Invariant::OneOwnerPerPage)
        .unwrap();
    assert!(!one_owner.held, "{one_owner}");
}
