//! Test and bench fixtures: KHO/LUO state laid out in guest memory byte for byte the way Linux
//! 7.2 lays it out (`kho_radix_add_page()`, `kho_out_fdt_setup()`/`kho_add_subtree()`,
//! `setup_kho()`, the LUO block sets, `memfd_luo_preserve_folios()`,
//! `kho_preserve_vmalloc()`).
//!
//! Shared by the unit tests (`crate::fixture`), the integration tests, the bench and the fuzz
//! target through `#[path]`, so it uses only the public API of `luo_handover`.
#![allow(dead_code)]

use luo_handover::bootparams::{KhoData, SETUP_DATA_OFFSET, SETUP_KEXEC_KHO};
use luo_handover::kho::{
    KhoSubtree, ScratchArea, KHO_FDT_COMPATIBLE, MEMORY_MAP_PROP, METADATA_NODE, METADATA_VERSION,
    SUB_TREE_PROP, SUB_TREE_SIZE_PROP,
};
use luo_handover::mem::{
    to_usize, MemError, SparseMemory, VecMemory, PAGE_BYTES, PAGE_SHIFT, PAGE_SIZE,
};
use luo_handover::radix::{bitmap_index, encode_key, table_index, TREE_DEPTH};

/// Guest memory the fixtures can write.
pub trait WriteMem {
    /// Copies `data` to `gpa`.
    fn put(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError>;
}

impl WriteMem for VecMemory {
    fn put(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.write(gpa, data)
    }
}

impl WriteMem for SparseMemory {
    fn put(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.write(gpa, data)
    }
}

/// Builds a preserved-memory radix tree whose nodes live at `node_base`, `node_base + 4 KiB`...
pub struct RadixBuilder {
    node_base: u64,
    nodes: Vec<Vec<u64>>, // node 0 is the root (level 5)
}

impl RadixBuilder {
    pub fn new(node_base: u64) -> Self {
        RadixBuilder {
            node_base,
            nodes: vec![vec![0; 512]],
        }
    }

    fn node_pa(&self, i: usize) -> u64 {
        self.node_base + i as u64 * PAGE_SIZE
    }

    /// `kho_radix_add_page(tree, pa >> 12, order)`.
    pub fn preserve_block(&mut self, pa: u64, order: u32) {
        let key = encode_key(pa, order).expect("order fits a key");
        let mut node = 0usize;
        for level in (1..TREE_DEPTH).rev() {
            let idx = table_index(key, level);
            if self.nodes[node][idx] == 0 {
                self.nodes.push(vec![0; 512]);
                self.nodes[node][idx] = self.node_pa(self.nodes.len() - 1);
            }
            node = ((self.nodes[node][idx] - self.node_base) / PAGE_SIZE) as usize;
        }
        let bit = bitmap_index(key);
        self.nodes[node][bit / 64] |= 1 << (bit % 64);
    }

    /// `kho_preserve_pages()`: `n` pages from `pa`, split into the largest naturally aligned
    /// blocks (`min(ctz(pfn), ilog2(n))`, one NUMA node assumed).
    pub fn preserve_pages(&mut self, pa: u64, n: u64) {
        let (mut pfn, end) = (pa >> PAGE_SHIFT, (pa >> PAGE_SHIFT) + n);
        while pfn < end {
            let order = pfn.trailing_zeros().min((end - pfn).ilog2());
            self.preserve_block(pfn << PAGE_SHIFT, order);
            pfn += 1 << order;
        }
    }

    /// Sets every word of the bitmap that holds the key of `(pa, order)` to `word` (creating
    /// the path to it): e.g. `0x5555...` preserves every other block of the bitmap's 32768,
    /// 16384 one-block runs from one guest page.
    pub fn fill_leaf(&mut self, pa: u64, order: u32, word: u64) {
        self.preserve_block(pa, order);
        let key = encode_key(pa, order).expect("order fits a key");
        let mut node = 0usize;
        for level in (1..TREE_DEPTH).rev() {
            let next = self.nodes[node][table_index(key, level)];
            node = ((next - self.node_base) / PAGE_SIZE) as usize;
        }
        self.nodes[node].fill(word);
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn root(&self) -> u64 {
        self.node_base
    }

    /// Writes every node; returns the root's address (`preserved-memory-map`).
    pub fn write(&self, mem: &mut impl WriteMem) -> Result<u64, MemError> {
        let mut page = vec![0u8; PAGE_BYTES];
        for (i, n) in self.nodes.iter().enumerate() {
            for (dst, w) in page.chunks_exact_mut(8).zip(n) {
                dst.copy_from_slice(&w.to_le_bytes());
            }
            mem.put(self.node_pa(i), &page)?;
        }
        Ok(self.node_base)
    }
}

/// The KHO root FDT as `kho_out_fdt_setup()` + `kho_add_subtree()` build it: u64 properties
/// in CPU byte order.
pub fn kho_fdt_blob(compatible: &str, memory_map: u64, subtrees: &[KhoSubtree]) -> Vec<u8> {
    let mut w = vm_fdt::FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_string("compatible", compatible).unwrap();
    w.property(MEMORY_MAP_PROP, &memory_map.to_le_bytes())
        .unwrap();
    for s in subtrees {
        let n = w.begin_node(&s.name).unwrap();
        w.property(SUB_TREE_PROP, &s.preserved_data.to_le_bytes())
            .unwrap();
        w.property(SUB_TREE_SIZE_PROP, &s.blob_size.to_le_bytes())
            .unwrap();
        w.end_node(n).unwrap();
    }
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

/// A hand-made FDT blob (version 17, empty reservation map), for shapes `vm_fdt` refuses to
/// write: long names, repeated properties, one name shared by many properties.
#[derive(Default)]
pub struct RawFdt {
    structure: Vec<u8>,
    strings: Vec<u8>,
}

impl RawFdt {
    fn token(&mut self, t: u32) {
        self.structure.extend_from_slice(&t.to_be_bytes());
    }

    fn pad(&mut self) {
        self.structure
            .resize(self.structure.len().next_multiple_of(4), 0);
    }

    /// `FDT_BEGIN_NODE` and `name`.
    pub fn begin_node(&mut self, name: &str) -> &mut Self {
        self.token(1);
        self.structure.extend_from_slice(name.as_bytes());
        self.structure.push(0);
        self.pad();
        self
    }

    /// `FDT_END_NODE`.
    pub fn end_node(&mut self) -> &mut Self {
        self.token(2);
        self
    }

    /// Adds `name` to the strings block; returns its offset.
    pub fn string(&mut self, name: &str) -> u32 {
        let off = u32::try_from(self.strings.len()).unwrap();
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        off
    }

    /// `FDT_PROP` whose name is the string at `name_off`.
    pub fn prop(&mut self, name_off: u32, value: &[u8]) -> &mut Self {
        self.token(3);
        self.token(u32::try_from(value.len()).unwrap());
        self.token(name_off);
        self.structure.extend_from_slice(value);
        self.pad();
        self
    }

    /// Bytes the blob will have if finished now.
    pub fn len(&self) -> usize {
        40 + 16 + self.structure.len() + 4 + self.strings.len()
    }

    /// `FDT_END`, then header + reservation map + structure + strings.
    pub fn finish(mut self) -> Vec<u8> {
        self.token(9);
        let off_rsv = 40u32;
        let off_struct = off_rsv + 16;
        let size_struct = u32::try_from(self.structure.len()).unwrap();
        let off_strings = off_struct + size_struct;
        let size_strings = u32::try_from(self.strings.len()).unwrap();
        let total = off_strings + size_strings;
        let mut b = Vec::with_capacity(total as usize);
        for v in [
            0xd00d_feed,
            total,
            off_struct,
            off_strings,
            off_rsv,
            17,
            16,
            0,
            size_strings,
            size_struct,
        ] {
            b.extend_from_slice(&u32::to_be_bytes(v));
        }
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&self.structure);
        b.extend_from_slice(&self.strings);
        b
    }
}

/// `struct kho_kexec_metadata` (packed, 73 bytes).
pub fn metadata_blob(release: &str, kexec_count: u32) -> Vec<u8> {
    let mut b = vec![0u8; 73];
    b[..4].copy_from_slice(&METADATA_VERSION.to_le_bytes());
    b[4..4 + release.len().min(64)].copy_from_slice(&release.as_bytes()[..release.len().min(64)]);
    b[69..73].copy_from_slice(&kexec_count.to_le_bytes());
    b
}

/// A `struct setup_data` header plus payload.
pub fn setup_data_bytes(next: u64, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + payload.len());
    v.extend_from_slice(&next.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// `struct kho_data`.
pub fn kho_data_bytes(k: &KhoData) -> Vec<u8> {
    [k.fdt_addr, k.fdt_size, k.scratch_addr, k.scratch_size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// A zero page with the `HdrS` signature and `hdr.setup_data = setup_data`.
pub fn zero_page(setup_data: u64) -> Vec<u8> {
    let mut z = vec![0u8; 4096];
    z[0x202..0x206].copy_from_slice(b"HdrS");
    z[SETUP_DATA_OFFSET..SETUP_DATA_OFFSET + 8].copy_from_slice(&setup_data.to_le_bytes());
    z
}

/// A memfd whose contents are `folios` order-0 folios from `first_pfn`.
#[derive(Clone, Debug)]
pub struct MemfdSpec {
    pub token: u64,
    pub first_pfn: u64,
    pub folios: u64,
    pub size: u64,
}

/// A session with memfds and other (non-memfd) files `(compatible, token)`.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    pub name: String,
    pub memfds: Vec<MemfdSpec>,
    pub other_files: Vec<(String, u64)>,
}

/// Where [`LuoLayout::write`] put things, and what the kernel would have preserved.
#[derive(Clone, Debug)]
pub struct LuoLayout {
    pub subtree: KhoSubtree,
    pub session_block: u64,
    pub memfd_ser: Vec<u64>,
    /// `(pa, order)` blocks preserved by LUO and memfd (metadata pages and folios).
    pub preserved: Vec<(u64, u32)>,
    /// First free page after the layout.
    pub next_free: u64,
}

struct Bump(u64);
impl Bump {
    fn page(&mut self) -> u64 {
        let p = self.0;
        self.0 += PAGE_SIZE;
        p
    }
}

fn put_u64(page: &mut [u8], off: usize, v: u64) {
    page[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_str(page: &mut [u8], off: usize, len: usize, s: &str) {
    let n = s.len().min(len - 1);
    page[off..off + n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Writes a linked block set (`kho_block_header_ser` + entries) for `entries` of `size` bytes;
/// returns the head and the block pages.
fn write_blocks(
    mem: &mut impl WriteMem,
    bump: &mut Bump,
    size: usize,
    entries: &[Vec<u8>],
) -> (u64, Vec<u64>) {
    let per = (4096 - 16) / size;
    let chunks: Vec<&[Vec<u8>]> = entries.chunks(per).collect();
    let pages: Vec<u64> = chunks.iter().map(|_| bump.page()).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut page = vec![0u8; 4096];
        put_u64(&mut page, 0, pages.get(i + 1).copied().unwrap_or(0));
        put_u64(&mut page, 8, chunk.len() as u64);
        for (j, e) in chunk.iter().enumerate() {
            page[16 + j * size..16 + j * size + e.len()].copy_from_slice(e);
        }
        mem.put(pages[i], &page).unwrap();
    }
    (pages.first().copied().unwrap_or(0), pages)
}

impl LuoLayout {
    /// Lays LUO state out from `base` (page-aligned), page by page.
    pub fn write(
        mem: &mut impl WriteMem,
        base: u64,
        liveupdate_num: u64,
        sessions: &[SessionSpec],
    ) -> Result<LuoLayout, MemError> {
        let mut bump = Bump(base);
        let mut preserved = Vec::new();
        let ser_pa = bump.page();
        let flb_pa = bump.page();
        preserved.extend([(ser_pa, 0), (flb_pa, 0)]);
        let mut memfd_ser = Vec::new();
        let mut session_entries = Vec::new();
        for s in sessions {
            let mut files = Vec::new();
            for m in &s.memfds {
                let ser = bump.page();
                memfd_ser.push(ser);
                preserved.push((ser, 0));
                // Folio array (vcalloc(nr, 16)) and its vmalloc chunk.
                let array_pages = (m.folios * 16).div_ceil(4096);
                let chunk = bump.page();
                preserved.push((chunk, 0));
                let mut chunk_page = vec![0u8; 4096];
                let mut array: Vec<u64> = Vec::new();
                for i in 0..array_pages {
                    let p = bump.page();
                    array.push(p);
                    preserved.push((p, 0));
                    put_u64(&mut chunk_page, 8 + to_usize(i) * 8, p);
                }
                mem.put(chunk, &chunk_page)?;
                for (pi, &p) in array.iter().enumerate() {
                    let mut page = vec![0u8; 4096];
                    for j in 0..256u64 {
                        let i = pi as u64 * 256 + j;
                        if i >= m.folios {
                            break;
                        }
                        let pfn = m.first_pfn + i;
                        put_u64(&mut page, to_usize(j) * 16, pfn | 3 << 52);
                        put_u64(&mut page, to_usize(j) * 16 + 8, i);
                        preserved.push((pfn << PAGE_SHIFT, 0));
                    }
                    mem.put(p, &page)?;
                }
                let mut s_page = vec![0u8; 48];
                put_u64(&mut s_page, 8, m.size);
                put_u64(&mut s_page, 24, m.folios);
                put_u64(&mut s_page, 32, chunk);
                s_page[40..44].copy_from_slice(&u32::try_from(array_pages).unwrap().to_le_bytes());
                mem.put(ser, &s_page)?;
                let mut f = vec![0u8; 64];
                put_str(&mut f, 0, 48, "memfd-v2");
                put_u64(&mut f, 48, ser);
                put_u64(&mut f, 56, m.token);
                files.push(f);
            }
            for (compat, token) in &s.other_files {
                let mut f = vec![0u8; 64];
                put_str(&mut f, 0, 48, compat);
                put_u64(&mut f, 56, *token);
                files.push(f);
            }
            let (files_head, file_pages) = write_blocks(mem, &mut bump, 64, &files);
            preserved.extend(file_pages.iter().map(|&p| (p, 0)));
            let mut e = vec![0u8; 80];
            put_str(&mut e, 0, 64, &s.name);
            put_u64(&mut e, 64, files_head);
            put_u64(&mut e, 72, files.len() as u64);
            session_entries.push(e);
        }
        let (sessions_head, session_pages) = write_blocks(mem, &mut bump, 80, &session_entries);
        preserved.extend(session_pages.iter().map(|&p| (p, 0)));
        let mut ser = vec![0u8; 32];
        put_str(&mut ser, 0, 8, "luo-v5");
        put_u64(&mut ser, 8, liveupdate_num);
        put_u64(&mut ser, 16, sessions_head);
        put_u64(&mut ser, 24, flb_pa);
        mem.put(ser_pa, &ser)?;
        let mut flb = vec![0u8; 16 + 64];
        put_u64(&mut flb, 0, 1);
        put_u64(&mut flb, 8, 1);
        put_str(&mut flb, 16, 48, "test-flb");
        put_u64(&mut flb, 16 + 48, 0xabc);
        put_u64(&mut flb, 16 + 56, 1);
        mem.put(flb_pa, &flb)?;
        Ok(LuoLayout {
            subtree: KhoSubtree {
                name: "LUO".into(),
                preserved_data: ser_pa,
                blob_size: 32,
            },
            session_block: sessions_head,
            memfd_ser,
            preserved,
            next_free: bump.0,
        })
    }
}

/// What a complete handover fixture should contain.
#[derive(Clone, Debug)]
pub struct HandoverSpec {
    /// Where metadata pages (zero page, setup_data, FDT, blobs, LUO) are allocated.
    pub meta_base: u64,
    /// Where radix nodes go.
    pub radix_base: u64,
    pub scratch: Vec<ScratchArea>,
    /// Extra preserved blocks `(pa, order)` (e.g. a workload's folios, for scale).
    pub extra_blocks: Vec<(u64, u32)>,
    pub sessions: Vec<SessionSpec>,
    pub liveupdate_num: u64,
}

impl HandoverSpec {
    /// A small, realistic handover: one session with a 1 MiB memfd (256 order-0 folios), as
    /// in the first real run (`dev-machine-kvm.md`).
    pub fn small() -> Self {
        HandoverSpec {
            meta_base: 0x10_0000,
            radix_base: 0x8_0000,
            scratch: vec![
                ScratchArea {
                    addr: 0x100_0000,
                    size: 0x400_0000,
                },
                ScratchArea {
                    addr: 0x800_0000,
                    size: 0x200_0000,
                },
            ],
            extra_blocks: vec![],
            sessions: vec![SessionSpec {
                name: "luo-agent".into(),
                memfds: vec![MemfdSpec {
                    token: 1,
                    first_pfn: 0x200,
                    folios: 256,
                    size: 1 << 20,
                }],
                other_files: vec![],
            }],
            liveupdate_num: 1,
        }
    }
}

/// Addresses of a written fixture.
#[derive(Clone, Debug)]
pub struct HandoverFixture {
    pub zero_page: u64,
    pub kho: KhoData,
    /// The `SETUP_KEXEC_KHO` record (its `struct kho_data` is 16 bytes in).
    pub kho_record: u64,
    /// The FDT's subtrees (`kexec-metadata`, `LUO`).
    pub subtrees: Vec<KhoSubtree>,
    pub radix_root: u64,
    pub radix_nodes: usize,
    pub luo: LuoLayout,
    /// Every `(pa, order)` block in the radix tree.
    pub preserved: Vec<(u64, u32)>,
}

impl HandoverFixture {
    /// Lays the whole handover out: zero page -> setup_data(KHO) -> kho_data -> FDT
    /// (preserved-memory-map, `kexec-metadata`, `LUO`) -> radix tree, scratch list, LUO state.
    pub fn write(mem: &mut impl WriteMem, spec: &HandoverSpec) -> Result<Self, MemError> {
        let mut bump = Bump(spec.meta_base);
        let zero = bump.page();
        let setup = bump.page();
        let scratch_list = bump.page();
        let fdt = bump.page();
        let meta = bump.page();
        let luo = LuoLayout::write(mem, bump.0, spec.liveupdate_num, &spec.sessions)?;

        let mut preserved: Vec<(u64, u32)> = vec![(fdt, 0), (meta, 0)];
        preserved.extend(&luo.preserved);
        preserved.extend(&spec.extra_blocks);
        let mut radix = RadixBuilder::new(spec.radix_base);
        for &(pa, order) in &preserved {
            radix.preserve_block(pa, order);
        }
        let root = radix.write(mem)?;

        let subtrees = [
            KhoSubtree {
                name: METADATA_NODE.into(),
                preserved_data: meta,
                blob_size: 73,
            },
            luo.subtree.clone(),
        ];
        mem.put(fdt, &kho_fdt_blob(KHO_FDT_COMPATIBLE, root, &subtrees))?;
        mem.put(meta, &metadata_blob("7.2.13", 1))?;
        let list: Vec<u8> = spec
            .scratch
            .iter()
            .flat_map(|a| a.addr.to_le_bytes().into_iter().chain(a.size.to_le_bytes()))
            .collect();
        mem.put(scratch_list, &list)?;
        let kho = KhoData {
            fdt_addr: fdt,
            fdt_size: PAGE_SIZE,
            scratch_addr: scratch_list,
            scratch_size: list.len() as u64,
        };
        // An RNG-seed record first, then KHO, as setup_boot_parameters() chains them.
        let kho_rec = setup + 0x100;
        mem.put(setup, &setup_data_bytes(kho_rec, 9, &[0x5a; 32]))?;
        mem.put(
            kho_rec,
            &setup_data_bytes(0, SETUP_KEXEC_KHO, &kho_data_bytes(&kho)),
        )?;
        mem.put(zero, &zero_page(setup))?;
        Ok(HandoverFixture {
            zero_page: zero,
            kho,
            kho_record: kho_rec,
            subtrees: subtrees.to_vec(),
            radix_root: root,
            radix_nodes: radix.node_count(),
            luo,
            preserved,
        })
    }

    /// Writes `blob` at `at` as the KHO FDT and points `kho_data` at it, with `fdt_size`
    /// the blob's length rounded up to pages.
    pub fn replace_fdt(
        &mut self,
        mem: &mut impl WriteMem,
        at: u64,
        blob: &[u8],
    ) -> Result<(), MemError> {
        mem.put(at, blob)?;
        self.kho.fdt_addr = at;
        self.kho.fdt_size = (blob.len() as u64).next_multiple_of(PAGE_SIZE);
        mem.put(self.kho_record + 16, &kho_data_bytes(&self.kho))
    }

    /// Total preserved pages.
    pub fn preserved_pages(&self) -> u64 {
        self.preserved.iter().map(|&(_, o)| 1u64 << o).sum()
    }
}

/// A minimal x86-64 `ET_EXEC` ELF with two `PT_LOAD` segments (text at
/// `0xffffffff81000000 -> 0x1000000`, 16 MiB; data at `0xffffffff82400000 -> 0x2400000`,
/// 1 MiB) and a symbol table of `(name, value, global)`.
pub fn tiny_kernel_elf(symbols: &[(&str, u64, bool)]) -> Vec<u8> {
    fn u16le(v: &mut Vec<u8>, x: u16) {
        v.extend_from_slice(&x.to_le_bytes());
    }
    fn u32le(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_le_bytes());
    }
    fn u64le(v: &mut Vec<u8>, x: u64) {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24]; // the null symbol
    for &(name, value, global) in symbols {
        let off = u32::try_from(strtab.len()).unwrap();
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
        u32le(&mut symtab, off);
        let kind = if name == "boot_params" { 1 } else { 2 }; // STT_OBJECT / STT_FUNC
        symtab.push(u8::from(global) << 4 | kind);
        symtab.push(0);
        u16le(&mut symtab, 1); // .text
        u64le(&mut symtab, value);
        u64le(&mut symtab, 16);
    }
    let shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0".to_vec();
    let phoff = 64u64;
    let symoff = phoff + 2 * 56;
    let stroff = symoff + symtab.len() as u64;
    let shstroff = stroff + strtab.len() as u64;
    let shoff = (shstroff + shstrtab.len() as u64).next_multiple_of(8);

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    u16le(&mut f, 2); // ET_EXEC
    u16le(&mut f, 62); // EM_X86_64
    u32le(&mut f, 1);
    u64le(&mut f, 0x100_0000); // e_entry (physical, like vmlinux)
    u64le(&mut f, phoff);
    u64le(&mut f, shoff);
    u32le(&mut f, 0);
    u16le(&mut f, 64);
    u16le(&mut f, 56);
    u16le(&mut f, 2);
    u16le(&mut f, 64);
    u16le(&mut f, 5);
    u16le(&mut f, 4);
    for (vaddr, paddr, memsz) in [
        (0xffff_ffff_8100_0000u64, 0x100_0000u64, 0x100_0000u64),
        (0xffff_ffff_8240_0000, 0x240_0000, 0x10_0000),
    ] {
        u32le(&mut f, 1); // PT_LOAD
        u32le(&mut f, 5);
        u64le(&mut f, 0);
        u64le(&mut f, vaddr);
        u64le(&mut f, paddr);
        u64le(&mut f, 0);
        u64le(&mut f, memsz);
        u64le(&mut f, 0x20_0000);
    }
    f.extend_from_slice(&symtab);
    f.extend_from_slice(&strtab);
    f.extend_from_slice(&shstrtab);
    f.resize(to_usize(shoff), 0);
    // Section headers: null, .text (NOBITS), .symtab, .strtab, .shstrtab.
    let mut sh = |name: u32,
                  kind: u32,
                  flags: u64,
                  addr: u64,
                  off: u64,
                  size: u64,
                  link: u32,
                  info: u32,
                  entsize: u64| {
        u32le(&mut f, name);
        u32le(&mut f, kind);
        u64le(&mut f, flags);
        u64le(&mut f, addr);
        u64le(&mut f, off);
        u64le(&mut f, size);
        u32le(&mut f, link);
        u32le(&mut f, info);
        u64le(&mut f, 8);
        u64le(&mut f, entsize);
    };
    sh(0, 0, 0, 0, 0, 0, 0, 0, 0);
    sh(1, 8, 6, 0xffff_ffff_8100_0000, 0, 0x100_0000, 0, 0, 0);
    sh(7, 2, 0, 0, symoff, symtab.len() as u64, 3, 1, 24);
    sh(15, 3, 0, 0, stroff, strtab.len() as u64, 0, 0, 0);
    sh(23, 3, 0, 0, shstroff, shstrtab.len() as u64, 0, 0, 0);
    f
}

/// A tiny deterministic PRNG (xorshift64*), so the no-panic tests need no new dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// The value of `field` as guest memory holds it now, decoded by its layout: what
/// [`luo_handover::fields::FieldList::of`] must have listed.
pub fn read_field(
    mem: &(impl luo_handover::mem::GuestMemoryRead + ?Sized),
    field: &luo_handover::fields::Field,
) -> Result<luo_handover::fields::Value, MemError> {
    use luo_handover::fields::{Layout, Value};
    let bytes = luo_handover::mem::read_vec(mem, field.gpa, to_usize(field.width.into()))?;
    let int = |b: &[u8], be: bool| {
        let mut w = [0u8; 8];
        let n = b.len().min(8);
        if be {
            w[8 - n..].copy_from_slice(&b[..n]);
            u64::from_be_bytes(w)
        } else {
            w[..n].copy_from_slice(&b[..n]);
            u64::from_le_bytes(w)
        }
    };
    Ok(match field.layout {
        Layout::Le => Value::Int(int(&bytes, false)),
        Layout::Be => Value::Int(int(&bytes, true)),
        Layout::Bits { shift, bits, .. } => {
            Value::Int(int(&bytes, false) >> shift & ((1u64 << bits) - 1))
        }
        Layout::Bytes => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            Value::Text(String::from_utf8_lossy(&bytes[..end]).into_owned())
        }
    })
}
