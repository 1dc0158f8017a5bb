//! The PVH boot structures (`hvm_start_info`, module list, memory map): what a kernel
//! entered through its `XEN_ELFNOTE_PHYS32_ENTRY` reads instead of a zero page.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use crate::machine::arch::boot_params::{E820_RAM, E820_RESERVED};
use crate::machine::layout::{PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::machine::memory::{MemoryRange, RangeKind};

/// `hvm_start_info.magic`: "xEn3" with the top bit flipped.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Everything the PVH entry reads, ready to be written at the addresses in `layout`.
#[derive(Debug, Clone)]
pub struct PvhBoot {
    /// The start info, with pointers into the other two.
    pub start_info: hvm_start_info,
    /// The initramfs as module 0, if any.
    pub modules: Vec<hvm_modlist_entry>,
    /// The memory map.
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// Builds the PVH structures.
pub fn build_pvh(cmdline_addr: u64, initrd: Option<(u64, u64)>, map: &[MemoryRange]) -> PvhBoot {
    let memmap: Vec<_> = map
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.start,
            size: r.size,
            type_: match r.kind {
                RangeKind::Ram => E820_RAM,
                RangeKind::Reserved => E820_RESERVED,
            },
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::try_from(modules.len()).unwrap_or(u32::MAX),
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: cmdline_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    PvhBoot {
        start_info,
        modules,
        memmap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::guest_memory_map;

    #[test]
    fn start_info_points_at_modules_and_memmap() {
        let map = guest_memory_map(1 << 30);
        let b = build_pvh(0x20000, Some((0x3000_0000, 0x1000)), &map);
        assert_eq!(b.start_info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(b.start_info.nr_modules, 1);
        assert_eq!(b.start_info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(b.start_info.memmap_entries as usize, map.len());
        assert_eq!(b.modules[0].paddr, 0x3000_0000);
        assert_eq!(b.memmap[1].type_, E820_RESERVED);
    }

    #[test]
    fn no_initrd_means_no_module_list() {
        let map = guest_memory_map(1 << 30);
        let b = build_pvh(0x20000, None, &map);
        assert_eq!(
            (b.start_info.nr_modules, b.start_info.modlist_paddr),
            (0, 0)
        );
    }
}
