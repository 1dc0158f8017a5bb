//! The KHO root FDT (`kho-v4`), the scratch-area list and the `kexec-metadata` blob.
//!
//! ABI: `include/linux/kho/abi/kexec_handover.h`, `include/linux/kho/abi/kexec_metadata.h`,
//! `include/linux/kexec_handover.h` (`struct kho_scratch`), and `kho_populate()`,
//! `kho_add_subtree()`, `kho_retrieve_subtree()` in `kernel/liveupdate/kexec_handover.c`.
//!
//! Address-valued properties (`preserved-memory-map`, `preserved-data`, `blob-size`) are
//! `u64`s in CPU byte order (little-endian on x86), not big-endian FDT cells: the kernel writes
//! them with `fdt_setprop(fdt, off, name, &phys, sizeof(phys))`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bootparams::KhoData;
use crate::budget::{Budget, BudgetError};
use crate::fdt::{self, FdtError, FdtLimits, FDT_HEADER_SIZE};
use crate::mem::{c_string, read_array, read_vec, to_usize, GuestMemoryRead, LeBytes, MemError};

/// `KHO_FDT_COMPATIBLE`.
pub const KHO_FDT_COMPATIBLE: &str = "kho-v4";
/// Components this reader understands after a [`KHO_FDT_COMPATIBLE`] base (the granular
/// form of the June 2026 RFC, `kho-v4;radix-v1;vmalloc-v1`): the preserved-memory radix
/// tree and the `kho_vmalloc` areas it decodes, as Linux 7.2 lays them out.
pub const KHO_COMPONENTS: &[&str] = &["radix-v1", "vmalloc-v1"];

/// Whether this reader decodes a KHO root whose `compatible` entry is `compatible`: `kho-v4`,
/// alone or with components it knows ([`KHO_COMPONENTS`]). Err: the parts it does not know.
pub fn kho_compatible_understood(compatible: &str) -> Result<(), Vec<String>> {
    understood(compatible, KHO_FDT_COMPATIBLE, KHO_COMPONENTS)
}

/// Whether `compatible` is `base`, alone or with `;`-separated components all in `known`
/// (the granular form; empty components ignored). Err: the base if it is another, else the
/// unknown components. Pure.
pub(crate) fn understood(compatible: &str, base: &str, known: &[&str]) -> Result<(), Vec<String>> {
    let mut parts = compatible.split(';');
    let first = parts.next().unwrap_or_default();
    if first != base {
        return Err(vec![first.to_owned()]);
    }
    let unknown: Vec<String> = parts
        .filter(|c| !c.is_empty() && !known.contains(c))
        .map(str::to_owned)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(unknown)
    }
}
/// `KHO_FDT_MEMORY_MAP_PROP_NAME`.
pub const MEMORY_MAP_PROP: &str = "preserved-memory-map";
/// `KHO_SUB_TREE_PROP_NAME`.
pub const SUB_TREE_PROP: &str = "preserved-data";
/// `KHO_SUB_TREE_SIZE_PROP_NAME`.
pub const SUB_TREE_SIZE_PROP: &str = "blob-size";
/// `KHO_METADATA_NODE_NAME`.
pub const METADATA_NODE: &str = "kexec-metadata";
/// `KHO_KEXEC_METADATA_VERSION`.
pub const METADATA_VERSION: u32 = 1;
/// `sizeof(struct kho_kexec_metadata)` (packed: `u32 + char[65] + u32`).
pub const METADATA_SIZE: usize = 4 + 65 + 4;
/// `sizeof(struct kho_scratch)`.
pub const SCRATCH_ENTRY_SIZE: u64 = 16;
/// Largest FDT this reader accepts (the kernel's is one page).
pub const MAX_FDT_SIZE: u64 = 1 << 20;
/// Most scratch areas accepted (the kernel has one per NUMA node plus two).
pub const MAX_SCRATCH_AREAS: u64 = 4096;

/// Errors from reading the KHO FDT and its companions.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KhoError {
    /// Guest memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The FDT blob is malformed.
    #[error("KHO FDT: {0}")]
    Fdt(#[from] FdtError),
    /// The FDT is larger than `fdt_size` or [`MAX_FDT_SIZE`].
    #[error("KHO FDT totalsize {total} exceeds the {limit} bytes allowed")]
    FdtTooLarge {
        /// `totalsize` from the header.
        total: u64,
        /// `min(fdt_size, MAX_FDT_SIZE)`.
        limit: u64,
    },
    /// The root `compatible` is not `kho-v4`.
    #[error("KHO FDT compatible is {0:?}, expected {KHO_FDT_COMPATIBLE:?}")]
    Incompatible(String),
    /// A required property is absent or not 8 bytes.
    #[error("KHO FDT node {node:?}: property {prop:?} missing or not a u64")]
    BadProperty {
        /// Node name ("" for the root).
        node: String,
        /// Property name.
        prop: &'static str,
    },
    /// The scratch list is larger than [`MAX_SCRATCH_AREAS`] records.
    #[error("scratch list of {0} bytes is too large")]
    ScratchTooLarge(u64),
    /// `kexec-metadata` is too small, or of another version.
    #[error("kexec-metadata: {0}")]
    Metadata(&'static str),
    /// The parse's budget ran out, or a blob or scratch area is not guest RAM.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// One subsystem blob registered with `kho_add_subtree()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoSubtree {
    /// Node name, e.g. `LUO` or `kexec-metadata`.
    pub name: String,
    /// `preserved-data`: physical address of the blob.
    pub preserved_data: u64,
    /// `blob-size`: its size in bytes.
    pub blob_size: u64,
}

/// The decoded KHO root FDT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoFdt {
    /// `preserved-memory-map`: root of the radix tree.
    pub preserved_memory_map: u64,
    /// Subnodes in blob order.
    pub subtrees: Vec<KhoSubtree>,
    /// The ten big-endian `u32` cells of `struct fdt_header` (`magic`, `totalsize`, ...,
    /// `size_dt_struct`; `scripts/dtc/libfdt/fdt.h`), as read.
    #[serde(default)]
    pub header: [u32; FDT_HEADER_CELLS],
    /// Every property of the root and of its subnodes, in blob order, with where its value
    /// lies (what [`crate::fields`] lists).
    #[serde(default)]
    pub properties: Vec<KhoFdtProperty>,
}

/// Cells of `struct fdt_header` (v17): 40 bytes.
pub const FDT_HEADER_CELLS: usize = FDT_HEADER_SIZE / 4;

/// One property of the KHO FDT, kept with its place in the blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoFdtProperty {
    /// `None` for the root, else the index of its node in [`KhoFdt::subtrees`].
    pub node: Option<usize>,
    /// Property name.
    pub name: String,
    /// Offset of the value from the start of the blob (its guest address is
    /// `fdt_addr + offset`).
    pub offset: u64,
    /// The raw value.
    pub value: Vec<u8>,
}

impl KhoFdt {
    /// The subtree called `name`.
    pub fn subtree(&self, name: &str) -> Option<&KhoSubtree> {
        self.subtrees.iter().find(|s| s.name == name)
    }
}

/// Decodes a KHO FDT blob. Every subtree's blob, `[preserved-data, +blob-size)`, must be
/// guest RAM (as `kho_add_subtree()` only registers kernel memory); nodes, properties and the
/// subtree list are charged to `budget`.
pub fn parse_kho_fdt(blob: &[u8], budget: &Budget) -> Result<KhoFdt, KhoError> {
    let mut root = fdt::parse(blob, FdtLimits::default(), budget)?;
    // Like fdt_node_check_compatible(): any entry of the string list may match; an entry
    // may be the granular form (`kho-v4;radix-v1;vmalloc-v1`) naming formats this reader
    // decodes.
    let compatible = root.property("compatible").unwrap_or_default();
    if !compatible
        .split(|&b| b == 0)
        .any(|c| std::str::from_utf8(c).is_ok_and(|c| kho_compatible_understood(c).is_ok()))
    {
        return Err(KhoError::Incompatible(c_string(compatible)));
    }
    let bad = |node: &str, prop| KhoError::BadProperty {
        node: node.to_owned(),
        prop,
    };
    let preserved_memory_map = root
        .property_u64_le(MEMORY_MAP_PROP)
        .ok_or_else(|| bad("", MEMORY_MAP_PROP))?;
    let subtrees = root
        .children
        .iter()
        .map(|n| {
            let st = KhoSubtree {
                name: n.name.clone(),
                preserved_data: n
                    .property_u64_le(SUB_TREE_PROP)
                    .ok_or_else(|| bad(&n.name, SUB_TREE_PROP))?,
                blob_size: n
                    .property_u64_le(SUB_TREE_SIZE_PROP)
                    .ok_or_else(|| bad(&n.name, SUB_TREE_SIZE_PROP))?,
            };
            budget.check_ram("KHO subtree blob", st.preserved_data, st.blob_size)?;
            budget.records(1)?;
            budget.bytes(st.name.len())?;
            Ok(st)
        })
        .collect::<Result<_, KhoError>>()?;
    // Moved out of the parsed tree, whose values and names the budget already paid for.
    let mut properties: Vec<KhoFdtProperty> = Vec::new();
    let nodes = std::iter::once((None, &mut root.properties)).chain(
        root.children
            .iter_mut()
            .enumerate()
            .map(|(i, n)| (Some(i), &mut n.properties)),
    );
    for (node, props) in nodes {
        properties.extend(std::mem::take(props).into_iter().map(|p| KhoFdtProperty {
            node,
            name: p.name,
            offset: p.offset as u64,
            value: p.value,
        }));
    }
    let mut header = [0u32; FDT_HEADER_CELLS];
    for (cell, b) in header.iter_mut().zip(blob.chunks_exact(4)) {
        *cell = u32::from_be_bytes(b.try_into().unwrap_or_default());
    }
    Ok(KhoFdt {
        preserved_memory_map,
        subtrees,
        header,
        properties,
    })
}

/// Reads and decodes the FDT that `kho` points at: the header first, then `totalsize` bytes,
/// which must fit in `fdt_size` (what the kernel maps) and [`MAX_FDT_SIZE`]; see
/// [`parse_kho_fdt`].
pub fn read_kho_fdt(
    mem: &(impl GuestMemoryRead + ?Sized),
    kho: &KhoData,
    budget: &Budget,
) -> Result<KhoFdt, KhoError> {
    budget.read(FDT_HEADER_SIZE)?;
    let header: [u8; FDT_HEADER_SIZE] = read_array(mem, kho.fdt_addr)?;
    let total = u64::from(fdt::total_size(&header)?);
    let limit = kho.fdt_size.min(MAX_FDT_SIZE);
    if total > limit {
        return Err(KhoError::FdtTooLarge { total, limit });
    }
    budget.read(to_usize(total))?;
    parse_kho_fdt(&read_vec(mem, kho.fdt_addr, to_usize(total))?, budget)
}

/// One KHO scratch area: memory the next kernel may allocate from before KHO has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchArea {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Reads the scratch list (`scratch_size / 16` records at `scratch_addr`, the remainder
/// ignored like `kho_populate()` does). Each area must be guest RAM (they come from memblock).
pub fn read_scratch_areas(
    mem: &(impl GuestMemoryRead + ?Sized),
    kho: &KhoData,
    budget: &Budget,
) -> Result<Vec<ScratchArea>, KhoError> {
    let n = kho.scratch_size / SCRATCH_ENTRY_SIZE;
    if n > MAX_SCRATCH_AREAS {
        return Err(KhoError::ScratchTooLarge(kho.scratch_size));
    }
    let len = to_usize(n * SCRATCH_ENTRY_SIZE);
    budget.read(len)?;
    budget.records(n)?;
    let raw = read_vec(mem, kho.scratch_addr, len)?;
    raw.chunks_exact(to_usize(SCRATCH_ENTRY_SIZE))
        .map(|c| {
            let area = ScratchArea {
                addr: c.u64_at(0).unwrap_or(0),
                size: c.u64_at(8).unwrap_or(0),
            };
            budget.check_ram("KHO scratch area", area.addr, area.size)?;
            Ok(area)
        })
        .collect()
}

/// `struct kho_kexec_metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KexecMetadata {
    /// Kernel release that performed the kexec.
    pub previous_release: String,
    /// Kexec boots since the last cold boot.
    pub kexec_count: u32,
}

/// Reads the `kexec-metadata` blob, with the same checks as `kho_in_kexec_metadata()`.
pub fn read_kexec_metadata(
    mem: &(impl GuestMemoryRead + ?Sized),
    subtree: &KhoSubtree,
    budget: &Budget,
) -> Result<KexecMetadata, KhoError> {
    if subtree.blob_size < 4 {
        return Err(KhoError::Metadata("blob smaller than its version field"));
    }
    budget.read(METADATA_SIZE)?;
    budget.bytes(METADATA_SIZE)?;
    let b: [u8; METADATA_SIZE] = read_array(mem, subtree.preserved_data)?;
    if b.u32_at(0) != Some(METADATA_VERSION) {
        return Err(KhoError::Metadata("unsupported version"));
    }
    if subtree.blob_size < METADATA_SIZE as u64 {
        return Err(KhoError::Metadata(
            "blob smaller than struct kho_kexec_metadata",
        ));
    }
    Ok(KexecMetadata {
        previous_release: c_string(b.get(4..69).unwrap_or_default()),
        kexec_count: b.u32_at(69).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{kho_fdt_blob, metadata_blob, WriteMem};
    use crate::mem::{GuestRam, VecMemory};

    fn budget() -> Budget {
        Budget::for_ram(GuestRam::new([(0, 1 << 32)]))
    }

    fn subtrees() -> Vec<KhoSubtree> {
        vec![
            KhoSubtree {
                name: "LUO".into(),
                preserved_data: 0x3000,
                blob_size: 32,
            },
            KhoSubtree {
                name: METADATA_NODE.into(),
                preserved_data: 0x4000,
                blob_size: 73,
            },
        ]
    }

    #[test]
    fn fdt_round_trip() {
        let blob = kho_fdt_blob(KHO_FDT_COMPATIBLE, 0x9000, &subtrees());
        let f = parse_kho_fdt(&blob, &budget()).unwrap();
        assert_eq!(f.preserved_memory_map, 0x9000);
        assert_eq!(f.subtrees, subtrees());
        assert_eq!(f.subtree("LUO").unwrap().preserved_data, 0x3000);

        let mut m = VecMemory::zeroed(0, 0x10000);
        m.put(0x1000, &blob).unwrap();
        let kho = KhoData {
            fdt_addr: 0x1000,
            fdt_size: 4096,
            scratch_addr: 0x2000,
            scratch_size: 40,
        };
        assert_eq!(read_kho_fdt(&m, &kho, &budget()).unwrap(), f);
        let tiny = KhoData {
            fdt_size: 16,
            ..kho
        };
        assert!(matches!(
            read_kho_fdt(&m, &tiny, &budget()),
            Err(KhoError::FdtTooLarge { .. })
        ));
    }

    #[test]
    fn fdt_semantic_errors() {
        let blob = kho_fdt_blob("kho-v3", 0x9000, &[]);
        assert_eq!(
            parse_kho_fdt(&blob, &budget()),
            Err(KhoError::Incompatible("kho-v3".into()))
        );
        let mut w = vm_fdt::FdtWriter::new().unwrap();
        let r = w.begin_node("").unwrap();
        w.property_string("compatible", KHO_FDT_COMPATIBLE).unwrap();
        w.property_u32(MEMORY_MAP_PROP, 0x9000).unwrap(); // 4 bytes: not a u64
        w.end_node(r).unwrap();
        assert!(matches!(
            parse_kho_fdt(&w.finish().unwrap(), &budget()),
            Err(KhoError::BadProperty {
                prop: MEMORY_MAP_PROP,
                ..
            })
        ));
        // A blob that is not guest RAM: here, larger than the address space.
        let mut huge = subtrees();
        huge[0].blob_size = u64::MAX;
        assert_eq!(
            parse_kho_fdt(&kho_fdt_blob(KHO_FDT_COMPATIBLE, 0x9000, &huge), &budget()),
            Err(KhoError::Budget(BudgetError::OutsideRam {
                what: "KHO subtree blob",
                start: 0x3000,
                len: u64::MAX
            }))
        );
        // The granular form names the formats this reader decodes: parsed as kho-v4.
        let granular = kho_fdt_blob("kho-v4;radix-v1;vmalloc-v1", 0x9000, &subtrees());
        assert_eq!(
            parse_kho_fdt(&granular, &budget()).unwrap().subtrees,
            subtrees()
        );
        // A component it does not know: refused, the string named.
        let unknown = kho_fdt_blob("kho-v4;radix-v2", 0x9000, &subtrees());
        assert_eq!(
            parse_kho_fdt(&unknown, &budget()),
            Err(KhoError::Incompatible("kho-v4;radix-v2".into()))
        );
        assert_eq!(kho_compatible_understood("kho-v4"), Ok(()));
        assert_eq!(
            kho_compatible_understood("kho-v5;radix-v1"),
            Err(vec!["kho-v5".to_string()])
        );
    }

    #[test]
    fn scratch_list() {
        let mut m = VecMemory::zeroed(0, 0x10000);
        for (i, (a, s)) in [(0x100_0000u64, 0x80_0000u64), (0x4000_0000, 0x1000_0000)]
            .iter()
            .enumerate()
        {
            m.put(0x2000 + i as u64 * 16, &a.to_le_bytes()).unwrap();
            m.put(0x2008 + i as u64 * 16, &s.to_le_bytes()).unwrap();
        }
        let kho = KhoData {
            fdt_addr: 0,
            fdt_size: 0,
            scratch_addr: 0x2000,
            scratch_size: 40,
        };
        let areas = read_scratch_areas(&m, &kho, &budget()).unwrap();
        assert_eq!(
            areas,
            vec![
                ScratchArea {
                    addr: 0x100_0000,
                    size: 0x80_0000
                },
                ScratchArea {
                    addr: 0x4000_0000,
                    size: 0x1000_0000
                }
            ]
        );
        let huge = KhoData {
            scratch_size: u64::MAX,
            ..kho
        };
        assert!(matches!(
            read_scratch_areas(&m, &huge, &budget()),
            Err(KhoError::ScratchTooLarge(_))
        ));
    }

    #[test]
    fn kexec_metadata() {
        let mut m = VecMemory::zeroed(0, 0x10000);
        m.put(0x4000, &metadata_blob("7.2.13", 3)).unwrap();
        let st = &subtrees()[1];
        assert_eq!(
            read_kexec_metadata(&m, st, &budget()).unwrap(),
            KexecMetadata {
                previous_release: "7.2.13".into(),
                kexec_count: 3
            }
        );
        let short = KhoSubtree {
            blob_size: 10,
            ..st.clone()
        };
        assert!(read_kexec_metadata(&m, &short, &budget()).is_err());
        m.put(0x4000, &2u32.to_le_bytes()).unwrap();
        assert_eq!(
            read_kexec_metadata(&m, st, &budget()),
            Err(KhoError::Metadata("unsupported version"))
        );
    }
}
