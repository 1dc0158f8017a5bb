//! Structure-aware fuzzing of the handover reader: libFuzzer's bytes become an [`Image`], a
//! description of the records a guest writes (zero page and setup_data, the KHO FDT and its
//! subnodes, radix-tree blocks and whole bitmaps, the LUO header, sessions, file blocks,
//! files and memfd records with their vmalloc chunks and folio arrays), whose pointers may
//! alias earlier records or be raw values. A builder lays it out in a sparse guest of 1 to 256
//! MiB, then [`Handover::read`] parses it and the preserved extents are labelled.
//!
//! Beyond "never panics": the parse's budget is never exceeded, and labelling produces at
//! most `runs + 2 * labels` extents. Run with a memory limit (see fuzz/README.md):
//!
//!     cargo +nightly fuzz run kho_records -- -rss_limit_mb=2048 -max_len=65536
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use luo_handover::bootparams::{KhoData, SETUP_KEXEC_KHO};
use luo_handover::budget::Budget;
use luo_handover::kho::{MEMORY_MAP_PROP, SUB_TREE_PROP, SUB_TREE_SIZE_PROP};
use luo_handover::mem::{SparseMemory, PAGE_SIZE};
use luo_handover::Handover;

#[path = "../../handover/tests/support/fixture.rs"]
mod fixture;

use fixture::{kho_data_bytes, setup_data_bytes, zero_page, RadixBuilder, RawFdt};

/// A pointer field: the record the builder would put there, an earlier record (sharing,
/// loops), or any value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ptr {
    Own,
    Earlier(u8),
    Null,
    Raw(u64),
}

/// A count field: the right one, off by a little, or any value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    Right,
    Off(i8),
    Raw(u64),
}

impl Count {
    fn of(self, right: u64) -> u64 {
        match self {
            Count::Right => right,
            Count::Off(d) => right.wrapping_add_signed(i64::from(d)),
            Count::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Compat {
    Memfd,
    MemfdVmalloc,
    MemfdUnknownComponent,
    MemfdV3,
    Other(u8),
}

impl Compat {
    fn text(&self) -> String {
        match self {
            Compat::Memfd => "memfd-v2".into(),
            Compat::MemfdVmalloc => "memfd-v2;vmalloc-v1".into(),
            Compat::MemfdUnknownComponent => "memfd-v2;vmalloc-v1;hugetlb-v9".into(),
            Compat::MemfdV3 => "memfd-v3".into(),
            Compat::Other(n) => format!("other-v{n}"),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Memfd {
    folios: u16,
    /// Folio pfns: consecutive from here (in pages of RAM), or all the same.
    first_page: u32,
    same_pfn: bool,
    nr_folios: Count,
    total_pages: Count,
    order: u8,
    /// The chunk's `next` (Own = 0, the end).
    chunk_next: Ptr,
    /// An array page listed twice.
    repeat_array_page: bool,
}

#[derive(Arbitrary, Debug)]
struct File {
    compatible: Compat,
    token: u64,
    /// `data`: Own is this file's memfd record.
    data: Ptr,
    memfd: Option<Memfd>,
}

#[derive(Arbitrary, Debug)]
struct Session {
    name: Vec<u8>,
    files: Vec<File>,
    /// The file block: Own is this session's.
    files_ptr: Ptr,
    declared: Count,
    block_next: Ptr,
    block_count: Count,
}

#[derive(Arbitrary, Debug)]
enum RadixOp {
    Block { page: u32, order: u8 },
    Fill { page: u32, order: u8, word: u64 },
}

#[derive(Arbitrary, Debug)]
struct Subnode {
    name: u8,
    data: Ptr,
    size: u64,
}

#[derive(Arbitrary, Debug)]
struct Image {
    ram_mib: u8,
    kho_compatible: bool,
    memory_map: Ptr,
    /// `fdt_size` in pages (0 = what the blob needs).
    fdt_pages: u8,
    long_name: Option<u32>,
    subnodes: Vec<Subnode>,
    scratch: Vec<(u32, u32)>,
    radix: Vec<RadixOp>,
    preserve_records: bool,
    luo: bool,
    luo_compatible: bool,
    liveupdate_num: u64,
    sessions: Vec<Session>,
    session_count: Count,
    flb: Option<(u8, u16)>,
    pokes: Vec<(u32, u64)>,
}

/// Lays records out in a sparse guest: one page per record, bump-allocated and wrapping
/// inside RAM, every allocated page remembered for [`Ptr::Earlier`].
struct Layout {
    mem: SparseMemory,
    ram: u64,
    next: u64,
    records: Vec<u64>,
}

impl Layout {
    fn page(&mut self) -> u64 {
        let p = self.next;
        self.next = (self.next + PAGE_SIZE) % self.ram;
        self.records.push(p);
        p
    }

    fn ptr(&self, p: Ptr, own: u64) -> u64 {
        match p {
            Ptr::Own => own,
            Ptr::Null => 0,
            Ptr::Earlier(k) if !self.records.is_empty() => {
                self.records[usize::from(k) % self.records.len()]
            }
            Ptr::Earlier(_) => own,
            Ptr::Raw(v) => v,
        }
    }

    fn put(&mut self, gpa: u64, data: &[u8]) {
        // Records that would cross the end of RAM are simply not written.
        let _ = self.mem.write(gpa, data);
    }

    fn put_u64(&mut self, gpa: u64, v: u64) {
        self.put(gpa, &v.to_le_bytes());
    }
}

fn c_field(text: &[u8], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    let n = text.len().min(len - 1);
    f[..n].copy_from_slice(&text[..n]);
    f
}

/// Writes a memfd record and its folio array; returns the record's address.
fn write_memfd(l: &mut Layout, m: &Memfd) -> u64 {
    let ser = l.page();
    let chunk = l.page();
    let folios = u64::from(m.folios % 1024);
    let array_pages = (folios * 16).div_ceil(PAGE_SIZE);
    let pages: Vec<u64> = (0..array_pages).map(|_| l.page()).collect();
    let ram_pages = l.ram / PAGE_SIZE;
    for (pi, &p) in pages.iter().enumerate() {
        let mut page = vec![0u8; 4096];
        for j in 0..256u64 {
            let i = pi as u64 * 256 + j;
            if i >= folios {
                break;
            }
            let pfn = if m.same_pfn {
                u64::from(m.first_page) % ram_pages
            } else {
                (u64::from(m.first_page) + i) % ram_pages
            };
            let at = usize::try_from(j * 16).unwrap_or(0);
            page[at..at + 8].copy_from_slice(&(pfn | 3 << 52).to_le_bytes());
            page[at + 8..at + 16].copy_from_slice(&i.to_le_bytes());
        }
        l.put(p, &page);
    }
    let mut c = vec![0u8; 4096];
    let next = l.ptr(m.chunk_next, 0);
    c[..8].copy_from_slice(&next.to_le_bytes());
    let mut listed = pages.clone();
    if m.repeat_array_page {
        if let Some(&first) = pages.first() {
            listed.push(first);
        }
    }
    for (slot, p) in c[8..].chunks_exact_mut(8).zip(&listed) {
        slot.copy_from_slice(&p.to_le_bytes());
    }
    l.put(chunk, &c);
    let mut s = vec![0u8; 48];
    s[8..16].copy_from_slice(&(folios * 4096).to_le_bytes());
    s[24..32].copy_from_slice(&m.nr_folios.of(folios).to_le_bytes());
    s[32..40].copy_from_slice(&chunk.to_le_bytes());
    let total = u32::try_from(m.total_pages.of(array_pages) & 0xffff_ffff).unwrap_or(0);
    s[40..44].copy_from_slice(&total.to_le_bytes());
    s[46..48].copy_from_slice(&u16::from(m.order % 8).to_le_bytes());
    l.put(ser, &s);
    ser
}

/// Writes `entries` as one block (at most what fits); returns its address.
fn write_block(l: &mut Layout, size: usize, entries: &[Vec<u8>], next: Ptr, count: Count) -> u64 {
    let block = l.page();
    let fit = (4096 - 16) / size;
    let n = entries.len().min(fit);
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(&l.ptr(next, 0).to_le_bytes());
    page[8..16].copy_from_slice(&count.of(n as u64).to_le_bytes());
    for (i, e) in entries.iter().take(n).enumerate() {
        page[16 + i * size..16 + i * size + e.len()].copy_from_slice(e);
    }
    l.put(block, &page);
    block
}

fn write_luo(l: &mut Layout, img: &Image) -> u64 {
    let ser = l.page();
    let mut session_entries = Vec::new();
    let mut file_blocks: Vec<u64> = Vec::new();
    for s in img.sessions.iter().take(8) {
        let mut files = Vec::new();
        for f in s.files.iter().take(16) {
            let own = f.memfd.as_ref().map_or(0, |m| write_memfd(l, m));
            let mut e = c_field(f.compatible.text().as_bytes(), 48);
            e.extend_from_slice(&l.ptr(f.data, own).to_le_bytes());
            e.extend_from_slice(&f.token.to_le_bytes());
            files.push(e);
        }
        let own = write_block(l, 64, &files, s.block_next, s.block_count);
        let files_pa = match s.files_ptr {
            Ptr::Earlier(k) if !file_blocks.is_empty() => {
                file_blocks[usize::from(k) % file_blocks.len()]
            }
            p => l.ptr(p, own),
        };
        file_blocks.push(own);
        let mut e = c_field(&s.name, 64);
        e.extend_from_slice(&files_pa.to_le_bytes());
        e.extend_from_slice(&s.declared.of(files.len() as u64).to_le_bytes());
        session_entries.push(e);
    }
    let sessions = if session_entries.is_empty() {
        0
    } else {
        write_block(l, 80, &session_entries, Ptr::Null, img.session_count)
    };
    let flb = match img.flb {
        Some((pgcnt, count)) => {
            let p = l.page();
            l.put_u64(p, u64::from(pgcnt));
            l.put_u64(p + 8, u64::from(count));
            p
        }
        None => 0,
    };
    let compat: &[u8] = if img.luo_compatible {
        b"luo-v5\0\0"
    } else {
        b"luo-v4\0\0"
    };
    l.put(ser, compat);
    l.put_u64(ser + 8, img.liveupdate_num);
    l.put_u64(ser + 16, sessions);
    l.put_u64(ser + 24, flb);
    ser
}

/// Builds the guest; returns it and the zero page's address (0).
fn build(img: &Image) -> SparseMemory {
    let ram = (u64::from(img.ram_mib) + 1) << 20;
    let mut l = Layout {
        mem: SparseMemory::new(0, ram),
        ram,
        next: 0,
        records: Vec::new(),
    };
    let zero = l.page();
    let setup = l.page();
    let scratch = l.page();
    let luo = if img.luo { write_luo(&mut l, img) } else { 0 };

    // The radix tree, in the top eighth of RAM: the records, then the ops.
    let ram_pages = ram / PAGE_SIZE;
    let mut radix = RadixBuilder::new(ram - ram / 8);
    if img.preserve_records {
        for &p in &l.records.clone() {
            radix.preserve_block(p, 0);
        }
    }
    // Whole bitmaps (up to 32768 blocks each) are what makes an execution slow: at most two.
    let mut fills = 0;
    for op in img.radix.iter().take(16) {
        match *op {
            RadixOp::Block { page, order } => {
                let order = u32::from(order % 20);
                let pa = ((u64::from(page) % ram_pages) << 12) & !((PAGE_SIZE << order) - 1);
                radix.preserve_block(pa, order);
            }
            RadixOp::Fill { page, order, word } if fills < 2 => {
                fills += 1;
                let order = u32::from(order % 20);
                let pa = ((u64::from(page) % ram_pages) << 12) & !((PAGE_SIZE << order) - 1);
                radix.fill_leaf(pa, order, word);
            }
            RadixOp::Fill { .. } => {}
        }
    }
    // Up to 16 ops of at most 5 nodes, plus the records'; past the end of RAM the tree is cut.
    let root = radix.write(&mut l.mem).unwrap_or(0);

    let mut raw = RawFdt::default();
    let compatible = raw.string("compatible");
    let map = raw.string(MEMORY_MAP_PROP);
    let data = raw.string(SUB_TREE_PROP);
    let size = raw.string(SUB_TREE_SIZE_PROP);
    let kho: &[u8] = if img.kho_compatible {
        b"kho-v4\0"
    } else {
        b"kho-v3\0"
    };
    raw.begin_node("")
        .prop(compatible, kho)
        .prop(map, &l.ptr(img.memory_map, root).to_le_bytes());
    if let Some(len) = img.long_name {
        let long = raw.string(&"n".repeat(usize::try_from(len % (600 << 10)).unwrap_or(0)));
        raw.prop(long, &[]);
    }
    if luo != 0 {
        raw.begin_node("LUO")
            .prop(data, &luo.to_le_bytes())
            .prop(size, &32u64.to_le_bytes())
            .end_node();
    }
    for n in img.subnodes.iter().take(64) {
        let name = ["LUO", "kexec-metadata", "x"][usize::from(n.name % 3)];
        raw.begin_node(name)
            .prop(data, &l.ptr(n.data, luo).to_le_bytes())
            .prop(size, &n.size.to_le_bytes())
            .end_node();
    }
    raw.end_node();
    let blob = raw.finish();
    // Pages of its own, after everything else (the blob is up to 600 KiB long).
    let fdt = l.page();
    for _ in 1..blob.len().div_ceil(4096) {
        l.page();
    }
    let fdt_size = match img.fdt_pages {
        0 => (blob.len() as u64).next_multiple_of(PAGE_SIZE),
        n => u64::from(n) * PAGE_SIZE,
    };
    l.put(fdt, &blob);

    let areas: Vec<u8> = img
        .scratch
        .iter()
        .take(8)
        .flat_map(|&(a, s)| {
            (u64::from(a) << 12)
                .to_le_bytes()
                .into_iter()
                .chain((u64::from(s) << 12).to_le_bytes())
        })
        .collect();
    l.put(scratch, &areas);
    let kho_data = KhoData {
        fdt_addr: fdt,
        fdt_size,
        scratch_addr: scratch,
        scratch_size: areas.len() as u64,
    };
    l.put(
        setup,
        &setup_data_bytes(0, SETUP_KEXEC_KHO, &kho_data_bytes(&kho_data)),
    );
    l.put(zero, &zero_page(setup));
    for &(at, v) in img.pokes.iter().take(8) {
        l.put_u64((u64::from(at) % ram) & !7, v);
    }
    l.mem
}

fuzz_target!(|img: Image| {
    let mem = build(&img);
    let budget = Budget::for_memory(&mem);
    let parsed = Handover::read_with(&mem, 0, &budget);
    let (used, limits) = (budget.used(), budget.limits());
    assert!(used.pages <= limits.pages && used.records <= limits.records);
    assert!(used.bytes <= limits.bytes);
    if let Ok(h) = parsed {
        let labels =
            1 + h.fdt.subtrees.len() + h.luo.as_ref().map_or(0, |l| l.owned_ranges().len());
        let ext = h.preserved_extents();
        assert!(ext.set.len() <= h.preserved.runs.len() + 2 * labels);
        assert!(ext.not_preserved.len() <= h.preserved.runs.len() + 2 * labels);
    }
});
