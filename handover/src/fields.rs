//! Every field of a parsed handover, by name and guest address: what `luo-vmm handover
//! --inject PATH=VALUE` can change at next-kernel-start, and what its JSON report lists.
//!
//! [`FieldList::of`] is a pure function of a [`Handover`]: the parsers record where each
//! record lies (`Session::ser_pa`, `PreservedFile::ser_pa`, block and chunk pages, radix
//! nodes, FDT property offsets) and every other address is derived from those with the
//! kernel's record layouts (Linux 7.2, `include/linux/kho/abi/{luo,memfd,block,
//! kexec_handover,kexec_metadata}.h`, `kernel/liveupdate/kho_block.c`, `kexec_handover.c`,
//! `scripts/dtc/libfdt/fdt.h`).
//!
//! # Paths
//!
//! A path is dot-separated segments, a segment a name with an optional `[index]`; indices
//! count from 0 in the order the next kernel meets the records. A *record* path names a
//! whole record (its address is what `@PATH` means); a *field* path names one value in it.
//!
//! ```text
//! kho.data.{fdt_addr,fdt_size,scratch_addr,scratch_size}    struct kho_data (setup_data)
//! kho.scratch[i].{addr,size}                                struct kho_scratch
//! kho.fdt.header.{magic,totalsize,off_dt_struct,off_dt_strings,off_mem_rsvmap,version,
//!                 last_comp_version,boot_cpuid_phys,size_dt_strings,size_dt_struct}
//!                                                           big-endian u32 cells
//! kho.fdt.<prop>                                            a root property's value
//! kho.fdt.node[<name>].<prop>                               a subnode property's value
//! kho.radix.node[n]                                         radix node n, walk order
//! kho.radix.node[n].entry[i]                                non-zero table entry (u64)
//! kho.radix.node[n].bitmap[w]                               non-zero bitmap word (u64)
//! kexec_metadata.{version,previous_release,kexec_count}     struct kho_kexec_metadata
//! luo.{compatible,liveupdate_num,sessions_pa,flbs_pa}       struct luo_ser
//! luo.session_block[b].{next,count}                         kho_block_header_ser
//! luo.session[s].{name,files,count}                         struct luo_session_ser
//! luo.session[s].file_block[b].{next,count}                 kho_block_header_ser
//! luo.session[s].file[f].{compatible,data,token}            struct luo_file_ser
//! luo.flb.{pgcnt,count}, luo.flb[i].{name,data,count}       luo_flb_header_ser, luo_flb_ser
//! memfd[s<s>.f<f>].{pos,size,seals,flags,nr_folios}         struct memfd_luo_ser
//! memfd[s<s>.f<f>].folios.{first,total_pages,flags,order}   its struct kho_vmalloc
//! memfd[s<s>.f<f>].chunk[c].next, .chunk[c].phys[j]         struct kho_vmalloc_chunk
//! memfd[s<s>.f<f>].folio[i].{pfn,flags,index}               memfd_luo_folio_ser
//! ```
//!
//! A name in brackets or as a segment is used only when it is *simple*: 1 to 64 bytes of
//! `[A-Za-z0-9_,+@-]`, not all digits, and not already taken; otherwise the index in blob
//! order is used (`kho.fdt.node[3]`, `kho.fdt.prop[5]`), so that a hostile guest's names
//! can neither collide nor break the syntax.
//!
//! # Bounds
//!
//! Fields are a few per record the parse kept (folios: 3 each; radix bitmaps: at most 512 per
//! bitmap page), so their number is bounded by the parse's [`crate::budget::Budget`], that
//! is, proportional to guest RAM.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::bootparams::SETUP_KEXEC_KHO;
use crate::kho::{FDT_HEADER_CELLS, METADATA_NODE, SCRATCH_ENTRY_SIZE};
use crate::luo::{LuoState, Memfd, BLOCK_HEADER_SIZE, FLB_SER_SIZE, FOLIO_SER_SIZE};
use crate::mem::{c_string, PAGE_SIZE};
use crate::radix::{encode_key, PreservedMemory, BITMAP_BITS};
use crate::Handover;

/// Names of the `struct fdt_header` cells, in order.
pub const FDT_HEADER_NAMES: [&str; FDT_HEADER_CELLS] = [
    "magic",
    "totalsize",
    "off_dt_struct",
    "off_dt_strings",
    "off_mem_rsvmap",
    "version",
    "last_comp_version",
    "boot_cpuid_phys",
    "size_dt_strings",
    "size_dt_struct",
];

/// Longest name used as a path segment.
const MAX_SIMPLE_NAME: usize = 64;

/// How a field is stored in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// A little-endian unsigned integer of `width` bytes (1, 2, 4 or 8).
    Le,
    /// A big-endian unsigned integer of `width` bytes (FDT header cells).
    Be,
    /// Bits `[shift, shift + bits)` of a little-endian `u64` (`width` 8) whose whole current
    /// value is `word` (`memfd_luo_folio_ser`'s `pfn:52` and `flags:12`).
    Bits {
        /// Lowest bit.
        shift: u8,
        /// Number of bits.
        bits: u8,
        /// The whole word as read.
        word: u64,
    },
    /// A byte array of `width` bytes: a C string (name, compatible) or a raw FDT value.
    Bytes,
}

/// A field's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// An integer field.
    Int(u64),
    /// A byte-array field, up to its first NUL, lossily as UTF-8.
    Text(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v:#x}"),
            Value::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// One field of the handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Its path (module documentation).
    pub path: String,
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Bytes it occupies in guest memory.
    pub width: u32,
    /// How it is stored.
    pub layout: Layout,
    /// Its value as parsed.
    pub value: Value,
}

impl Field {
    /// Bits of the integer it holds (`8 * width`, or the bit field's size); 0 for bytes.
    pub fn bits(&self) -> u32 {
        match self.layout {
            Layout::Le | Layout::Be => self.width.saturating_mul(8).min(64),
            Layout::Bits { bits, .. } => u32::from(bits).min(64),
            Layout::Bytes => 0,
        }
    }
}

/// A whole record: what `@PATH` resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its path.
    pub path: String,
    /// Guest-physical address of its first byte.
    pub gpa: u64,
}

/// Every field and record of one parsed handover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldList {
    /// Fields, in the order the next kernel meets them.
    pub fields: Vec<Field>,
    /// Records.
    pub records: Vec<Record>,
}

impl FieldList {
    /// Lists every field of `h` (see the module documentation for the paths).
    pub fn of(h: &Handover) -> Self {
        let mut l = Lister::default();
        l.kho(h);
        if let (Some(m), Some(st)) = (&h.metadata, h.fdt.subtree(METADATA_NODE)) {
            let at = st.preserved_data;
            l.record("kexec_metadata", at);
            l.int("kexec_metadata.version", at, 4, 1);
            let release = &m.previous_release;
            l.text(
                "kexec_metadata.previous_release",
                at.wrapping_add(4),
                65,
                release,
            );
            let count = m.kexec_count.into();
            l.int("kexec_metadata.kexec_count", at.wrapping_add(69), 4, count);
        }
        if let Some(luo) = &h.luo {
            l.luo(luo);
        }
        FieldList {
            fields: l.fields,
            records: l.records,
        }
    }

    /// The field at `path`.
    pub fn field(&self, path: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.path == path)
    }

    /// The address of the record or field at `path`.
    pub fn address(&self, path: &str) -> Option<u64> {
        self.records
            .iter()
            .find(|r| r.path == path)
            .map(|r| r.gpa)
            .or_else(|| self.field(path).map(|f| f.gpa))
    }

    /// Every path, records first.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.records
            .iter()
            .map(|r| r.path.as_str())
            .chain(self.fields.iter().map(|f| f.path.as_str()))
    }
}

/// Whether `name` can stand in a path as it is.
pub(crate) fn is_simple_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SIMPLE_NAME
        && !name.bytes().all(|b| b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_,+@-".contains(&b))
}

#[derive(Default)]
struct Lister {
    fields: Vec<Field>,
    records: Vec<Record>,
}

/// The block page of the LUO record at `pa`.
fn page_of(pa: u64) -> u64 {
    pa & !(PAGE_SIZE - 1)
}

impl Lister {
    fn record(&mut self, path: impl Into<String>, gpa: u64) {
        self.records.push(Record {
            path: path.into(),
            gpa,
        });
    }

    fn push(&mut self, path: String, gpa: u64, width: u32, layout: Layout, value: Value) {
        self.fields.push(Field {
            path,
            gpa,
            width,
            layout,
            value,
        });
    }

    /// A little-endian integer of `width` bytes at `gpa` (addresses wrap like the guest's
    /// would not: a record read from guest RAM does not reach the top of the address space).
    fn int(&mut self, path: impl Into<String>, gpa: u64, width: u32, value: u64) {
        self.push(path.into(), gpa, width, Layout::Le, Value::Int(value));
    }

    fn text(&mut self, path: impl Into<String>, gpa: u64, width: u32, value: &str) {
        self.push(
            path.into(),
            gpa,
            width,
            Layout::Bytes,
            Value::Text(value.to_owned()),
        );
    }

    fn kho(&mut self, h: &Handover) {
        if let Some(rec) = h.setup_data.iter().find(|r| r.kind == SETUP_KEXEC_KHO) {
            let at = rec.payload_gpa();
            let k = &h.kho_data;
            self.record("kho.data", at);
            for (i, (name, v)) in [
                ("fdt_addr", k.fdt_addr),
                ("fdt_size", k.fdt_size),
                ("scratch_addr", k.scratch_addr),
                ("scratch_size", k.scratch_size),
            ]
            .into_iter()
            .enumerate()
            {
                self.int(
                    format!("kho.data.{name}"),
                    at.wrapping_add(8 * i as u64),
                    8,
                    v,
                );
            }
        }
        for (i, a) in h.scratch.iter().enumerate() {
            let at = h
                .kho_data
                .scratch_addr
                .wrapping_add(i as u64 * SCRATCH_ENTRY_SIZE);
            self.record(format!("kho.scratch[{i}]"), at);
            self.int(format!("kho.scratch[{i}].addr"), at, 8, a.addr);
            self.int(
                format!("kho.scratch[{i}].size"),
                at.wrapping_add(8),
                8,
                a.size,
            );
        }
        let fdt = h.kho_data.fdt_addr;
        self.record("kho.fdt", fdt);
        for (i, (name, &v)) in FDT_HEADER_NAMES.iter().zip(&h.fdt.header).enumerate() {
            self.push(
                format!("kho.fdt.header.{name}"),
                fdt.wrapping_add(4 * i as u64),
                4,
                Layout::Be,
                Value::Int(v.into()),
            );
        }
        self.fdt_properties(h);
        self.radix(&h.preserved);
    }

    fn fdt_properties(&mut self, h: &Handover) {
        let fdt = h.kho_data.fdt_addr;
        let mut node_names: HashMap<&str, usize> = HashMap::new();
        for s in &h.fdt.subtrees {
            *node_names.entry(s.name.as_str()).or_default() += 1;
        }
        let node_seg = |i: usize| match h.fdt.subtrees.get(i) {
            Some(s) if is_simple_name(&s.name) && node_names.get(s.name.as_str()) == Some(&1) => {
                format!("kho.fdt.node[{}]", s.name)
            }
            _ => format!("kho.fdt.node[{i}]"),
        };
        let mut taken: HashSet<String> = HashSet::new();
        for (i, p) in h.fdt.properties.iter().enumerate() {
            let node = p.node.map_or_else(|| "kho.fdt".to_owned(), node_seg);
            let by_name = format!("{node}.{}", p.name);
            // A root property may not shadow the header or the node list.
            let reserved = p.node.is_none() && (p.name == "header" || p.name == "node");
            let path = if is_simple_name(&p.name) && !reserved && !taken.contains(&by_name) {
                by_name
            } else {
                format!("{node}.prop[{i}]")
            };
            taken.insert(path.clone());
            let gpa = fdt.wrapping_add(p.offset);
            let width = u32::try_from(p.value.len()).unwrap_or(u32::MAX);
            match (<[u8; 8]>::try_from(p.value.as_slice()), p.value.len()) {
                // KHO's u64 properties are in CPU byte order (module kho).
                (Ok(v), _) => self.int(path, gpa, 8, u64::from_le_bytes(v)),
                (_, 4) => {
                    let v = p.value.as_slice().try_into().map_or(0, u32::from_be_bytes);
                    self.push(path, gpa, 4, Layout::Be, Value::Int(v.into()));
                }
                _ => self.text(path, gpa, width, &c_string(&p.value)),
            }
        }
    }

    fn radix(&mut self, pm: &PreservedMemory) {
        let index: HashMap<u64, usize> = pm
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.pa, i))
            .collect();
        let leaves: HashMap<u64, usize> = pm
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.level == 0)
            .map(|(i, n)| (n.prefix, i))
            .collect();
        // Non-zero words per node: table entries from the children's slots, bitmap words
        // from the preserved blocks.
        let mut words: Vec<Vec<(usize, u64)>> = vec![Vec::new(); pm.nodes.len()];
        for n in pm.nodes.iter().filter(|n| n.slot != 0) {
            if let Some(&p) = index.get(&page_of(n.slot)) {
                words[p].push((((n.slot % PAGE_SIZE) / 8) as usize, n.pa));
            }
        }
        let mut bitmaps: HashMap<usize, Vec<u64>> = HashMap::new();
        let low = (1u64 << BITMAP_BITS) - 1;
        for run in &pm.runs {
            let step = 1u64.checked_shl(12 + run.order).unwrap_or(0);
            for b in 0..run.count {
                let pa = run.pa.wrapping_add(b.wrapping_mul(step));
                let Some(key) = encode_key(pa, run.order) else {
                    continue;
                };
                let Some(&leaf) = leaves.get(&(key & !low)) else {
                    continue;
                };
                let bit = key & low;
                let w = bitmaps.entry(leaf).or_insert_with(|| vec![0; 512]);
                if let Some(word) = w.get_mut((bit / 64) as usize) {
                    *word |= 1 << (bit % 64);
                }
            }
        }
        for (leaf, w) in bitmaps {
            words[leaf].extend(w.into_iter().enumerate().filter(|&(_, v)| v != 0));
        }
        for (i, (n, mut ws)) in pm.nodes.iter().zip(words).enumerate() {
            let node = format!("kho.radix.node[{i}]");
            self.record(node.clone(), n.pa);
            ws.sort_unstable();
            let kind = if n.level == 0 { "bitmap" } else { "entry" };
            for (w, v) in ws {
                self.int(
                    format!("{node}.{kind}[{w}]"),
                    n.pa.wrapping_add(8 * w as u64),
                    8,
                    v,
                );
            }
        }
    }

    /// A block header (`struct kho_block_header_ser`) at `pa`, followed in the list by
    /// `next`, holding `count` entries.
    fn block(&mut self, path: String, pa: u64, next: u64, count: u64) {
        self.int(format!("{path}.next"), pa, 8, next);
        self.int(format!("{path}.count"), pa.wrapping_add(8), 8, count);
        self.record(path, pa);
    }

    /// Headers of the blocks `pages`, each counting the records of `record_pas` it holds.
    fn blocks(&mut self, prefix: &str, pages: &[u64], record_pas: &[u64]) {
        for (b, &pa) in pages.iter().enumerate() {
            let next = pages.get(b + 1).copied().unwrap_or(0);
            let count = record_pas.iter().filter(|&&r| page_of(r) == pa).count() as u64;
            self.block(format!("{prefix}[{b}]"), pa, next, count);
        }
    }

    fn luo(&mut self, luo: &LuoState) {
        let at = luo.ser_pa;
        self.record("luo", at);
        let width = crate::luo::luo_compat_len(&luo.compatible);
        let w = width as u64;
        self.text(
            "luo.compatible",
            at,
            u32::try_from(width).unwrap_or(u32::MAX),
            &luo.compatible,
        );
        self.int(
            "luo.liveupdate_num",
            at.wrapping_add(w),
            8,
            luo.liveupdate_num,
        );
        let head = luo.session_blocks.first().copied().unwrap_or(0);
        self.int("luo.sessions_pa", at.wrapping_add(w + 8), 8, head);
        self.int("luo.flbs_pa", at.wrapping_add(w + 16), 8, luo.flb_pa);
        let session_pas: Vec<u64> = luo.sessions.iter().map(|s| s.ser_pa).collect();
        self.blocks("luo.session_block", &luo.session_blocks, &session_pas);
        for (si, s) in luo.sessions.iter().enumerate() {
            let sp = format!("luo.session[{si}]");
            self.record(sp.clone(), s.ser_pa);
            self.text(format!("{sp}.name"), s.ser_pa, 64, &s.name);
            let head = s.file_blocks.first().copied().unwrap_or(0);
            self.int(format!("{sp}.files"), s.ser_pa.wrapping_add(64), 8, head);
            let n = s.files.len() as u64;
            self.int(format!("{sp}.count"), s.ser_pa.wrapping_add(72), 8, n);
            let file_pas: Vec<u64> = s.files.iter().map(|f| f.ser_pa).collect();
            self.blocks(&format!("{sp}.file_block"), &s.file_blocks, &file_pas);
            for (fi, f) in s.files.iter().enumerate() {
                let fp = format!("{sp}.file[{fi}]");
                self.record(fp.clone(), f.ser_pa);
                self.text(format!("{fp}.compatible"), f.ser_pa, 48, &f.compatible);
                self.int(format!("{fp}.data"), f.ser_pa.wrapping_add(48), 8, f.data);
                self.int(format!("{fp}.token"), f.ser_pa.wrapping_add(56), 8, f.token);
            }
        }
        if luo.flb_pa != 0 {
            let at = luo.flb_pa;
            self.record("luo.flb", at);
            self.int("luo.flb.pgcnt", at, 8, luo.flb_pgcnt);
            self.int(
                "luo.flb.count",
                at.wrapping_add(8),
                8,
                luo.flbs.len() as u64,
            );
            for (i, e) in luo.flbs.iter().enumerate() {
                let p = format!("luo.flb[{i}]");
                let e_at = at.wrapping_add((BLOCK_HEADER_SIZE + i * FLB_SER_SIZE) as u64);
                self.record(p.clone(), e_at);
                self.text(format!("{p}.name"), e_at, 48, &e.name);
                self.int(format!("{p}.data"), e_at.wrapping_add(48), 8, e.data);
                self.int(format!("{p}.count"), e_at.wrapping_add(56), 8, e.count);
            }
        }
        for (si, s) in luo.sessions.iter().enumerate() {
            for (fi, f) in s.files.iter().enumerate() {
                if let Some(m) = &f.memfd {
                    self.memfd(&format!("memfd[s{si}.f{fi}]"), f.data, m);
                }
            }
        }
    }

    /// `struct memfd_luo_ser` at `at`, its vmalloc chunks and its folio records.
    fn memfd(&mut self, mp: &str, at: u64, m: &Memfd) {
        self.record(mp, at);
        let off = |o: u64| at.wrapping_add(o);
        self.int(format!("{mp}.pos"), at, 8, m.pos);
        self.int(format!("{mp}.size"), off(8), 8, m.size);
        self.int(format!("{mp}.seals"), off(16), 4, m.seals.into());
        self.int(format!("{mp}.flags"), off(20), 4, m.flags.into());
        self.int(format!("{mp}.nr_folios"), off(24), 8, m.folios.len() as u64);
        let v = &m.vmalloc;
        self.int(format!("{mp}.folios.first"), off(32), 8, v.first);
        self.int(
            format!("{mp}.folios.total_pages"),
            off(40),
            4,
            v.total_pages.into(),
        );
        self.int(format!("{mp}.folios.flags"), off(44), 2, v.flags.into());
        self.int(format!("{mp}.folios.order"), off(46), 2, v.order.into());
        // metadata_pages: the chunks, then the array pages read, in order.
        let array = m.metadata_pages.get(m.chunks.len()..).unwrap_or_default();
        let contig = 1usize.checked_shl(v.order.into()).unwrap_or(usize::MAX);
        let mut g = 0usize;
        for (c, chunk) in m.chunks.iter().enumerate() {
            let cp = format!("{mp}.chunk[{c}]");
            let next = m.chunks.get(c + 1).map_or(0, |n| n.pa);
            self.record(cp.clone(), chunk.pa);
            self.int(format!("{cp}.next"), chunk.pa, 8, next);
            for j in 0..chunk.entries as usize {
                let phys = g.checked_mul(contig).and_then(|p| array.get(p));
                if let Some(&phys) = phys {
                    let gpa = chunk.pa.wrapping_add(8 + 8 * j as u64);
                    self.int(format!("{cp}.phys[{j}]"), gpa, 8, phys);
                }
                g += 1;
            }
        }
        let per_page = crate::mem::PAGE_BYTES / FOLIO_SER_SIZE;
        for (i, fo) in m.folios.iter().enumerate() {
            let Some(&page) = array.get(i / per_page) else {
                break;
            };
            let fp = format!("{mp}.folio[{i}]");
            let gpa = page.wrapping_add(((i % per_page) * FOLIO_SER_SIZE) as u64);
            let word = fo.pfn | u64::from(fo.flags) << 52;
            self.record(fp.clone(), gpa);
            let bits = |shift, bits| Layout::Bits { shift, bits, word };
            self.push(format!("{fp}.pfn"), gpa, 8, bits(0, 52), Value::Int(fo.pfn));
            let flags = Value::Int(fo.flags.into());
            self.push(format!("{fp}.flags"), gpa, 8, bits(52, 12), flags);
            self.int(format!("{fp}.index"), gpa.wrapping_add(8), 8, fo.index);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fixture::{read_field, HandoverFixture, HandoverSpec, MemfdSpec, SessionSpec};
    use crate::mem::SparseMemory;

    /// Two sessions: the first with a 300-folio memfd (two array pages) and another file, the
    /// second with two small memfds.
    pub(crate) fn spec() -> HandoverSpec {
        let memfd = |token, first_pfn, folios| MemfdSpec {
            token,
            first_pfn,
            folios,
            size: folios * PAGE_SIZE,
        };
        HandoverSpec {
            sessions: vec![
                SessionSpec {
                    name: "first".into(),
                    memfds: vec![memfd(1, 0x2000, 300)],
                    other_files: vec![("other-v1".into(), 9)],
                },
                SessionSpec {
                    name: "second".into(),
                    memfds: vec![memfd(2, 0x3000, 4), memfd(3, 0x3100, 2)],
                    other_files: vec![],
                },
            ],
            ..HandoverSpec::small()
        }
    }

    pub(crate) fn fixture() -> (SparseMemory, HandoverFixture, Handover, FieldList) {
        let mut mem = SparseMemory::new(0, 1 << 30);
        let fx = HandoverFixture::write(&mut mem, &spec()).unwrap();
        let h = Handover::read(&mem, fx.zero_page).unwrap();
        let list = FieldList::of(&h);
        (mem, fx, h, list)
    }

    fn value(l: &FieldList, path: &str) -> Value {
        l.field(path)
            .unwrap_or_else(|| panic!("no field {path}"))
            .value
            .clone()
    }

    #[test]
    fn every_field_is_where_its_value_is() {
        let (mem, _, _, list) = fixture();
        for f in &list.fields {
            assert_eq!(read_field(&mem, f).unwrap(), f.value, "{}", f.path);
        }
        let mut paths: Vec<&str> = list.paths().collect();
        let n = paths.len();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), n, "paths are unique");
        assert!(list.fields.len() > 1000, "{}", list.fields.len());
    }

    #[test]
    fn paths_name_the_records_the_kernel_reads() {
        let (_, fx, h, l) = fixture();
        let int = |p: &str| match value(&l, p) {
            Value::Int(v) => v,
            other => panic!("{p}: {other:?}"),
        };
        let text = |p: &str| match value(&l, p) {
            Value::Text(v) => v,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(int("kho.data.fdt_addr"), fx.kho.fdt_addr);
        assert_eq!(int("kho.scratch[1].size"), 0x200_0000);
        assert_eq!(int("kho.fdt.header.magic"), 0xd00d_feed);
        assert_eq!(text("kho.fdt.compatible"), "kho-v4");
        assert_eq!(int("kho.fdt.preserved-memory-map"), fx.radix_root);
        let luo = fx.luo.subtree.preserved_data;
        assert_eq!(int("kho.fdt.node[LUO].preserved-data"), luo);
        assert_eq!(int("kho.fdt.node[kexec-metadata].blob-size"), 73);
        assert_eq!(text("kexec_metadata.previous_release"), "7.2.13");
        assert_eq!(l.address("luo"), Some(luo));
        assert_eq!(text("luo.compatible"), "luo-v5");
        assert_eq!(int("luo.sessions_pa"), fx.luo.session_block);
        assert_eq!(int("luo.session_block[0].count"), 2);
        assert_eq!(int("luo.session_block[0].next"), 0);
        assert_eq!(text("luo.session[1].name"), "second");
        assert_eq!(
            l.address("luo.session[1]"),
            Some(fx.luo.session_block + 16 + 80)
        );
        assert_eq!(int("luo.session[0].count"), 2);
        assert_eq!(int("luo.session[0].file_block[0].count"), 2);
        assert_eq!(int("luo.session[1].file_block[0].next"), 0);
        assert_eq!(text("luo.session[0].file[1].compatible"), "other-v1");
        assert_eq!(int("luo.session[0].file[1].token"), 9);
        assert_eq!(int("luo.session[1].file[1].data"), fx.luo.memfd_ser[2]);
        assert_eq!(text("luo.flb[0].name"), "test-flb");
        assert_eq!(int("luo.flb.pgcnt"), 1);
        assert_eq!(l.address("memfd[s0.f0]"), Some(fx.luo.memfd_ser[0]));
        assert_eq!(int("memfd[s0.f0].nr_folios"), 300);
        assert_eq!(int("memfd[s0.f0].folios.total_pages"), 2);
        assert_eq!(int("memfd[s0.f0].folio[3].pfn"), 0x2003);
        assert_eq!(int("memfd[s0.f0].folio[299].pfn"), 0x2000 + 299);
        assert_eq!(int("memfd[s0.f0].folio[299].flags"), 3);
        assert_eq!(int("memfd[s0.f0].folio[299].index"), 299);
        assert_eq!(int("memfd[s1.f1].folio[1].pfn"), 0x3101);
        assert!(l.field("memfd[s0.f1].size").is_none(), "not a memfd");
        let m = h.luo.as_ref().unwrap().sessions[0].files[0]
            .memfd
            .clone()
            .unwrap();
        assert_eq!(int("memfd[s0.f0].folios.first"), m.chunks[0].pa);
        assert_eq!(int("memfd[s0.f0].chunk[0].phys[1]"), m.metadata_pages[2]);
        assert!(l.field("memfd[s0.f0].chunk[0].phys[2]").is_none());
        // The radix tree: one entry per child, and every preserved block's bit.
        let tree = &h.preserved;
        let entries = l
            .fields
            .iter()
            .filter(|f| f.path.contains(".entry["))
            .count();
        assert_eq!(entries, tree.nodes.len() - 1);
        let bits: u32 = l
            .fields
            .iter()
            .filter(|f| f.path.contains(".bitmap["))
            .map(|f| match f.value {
                Value::Int(v) => v.count_ones(),
                Value::Text(_) => 0,
            })
            .sum();
        assert_eq!(u64::from(bits), tree.blocks);
        assert_eq!(l.address("kho.radix.node[0]"), Some(fx.radix_root));
    }

    #[test]
    fn hostile_names_become_indices() {
        assert!(is_simple_name("kexec-metadata") && is_simple_name("LUO"));
        for bad in ["", "12", "a.b", "a]b", "a b", &"x".repeat(65)] {
            assert!(!is_simple_name(bad), "{bad:?}");
        }
        let (_, _, mut h, _) = fixture();
        h.fdt.subtrees[1].name = "a.b]".into();
        h.fdt.properties.push(h.fdt.properties[0].clone());
        let l = FieldList::of(&h);
        assert!(l.field("kho.fdt.node[1].preserved-data").is_some());
        // The root's compatible, listed twice: the second by index.
        let dup = h.fdt.properties.len() - 1;
        assert!(l.field(&format!("kho.fdt.prop[{dup}]")).is_some());
    }
}
