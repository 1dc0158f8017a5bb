//! x86_64 boot structures, computed by pure functions (no KVM needed), and [`write_boot`],
//! the one entry point that writes them all into guest memory.

pub(crate) mod boot_params;
pub(crate) mod cpuid;
pub(crate) mod gdt;
pub(crate) mod mptable;
pub(crate) mod paging;
pub(crate) mod pvh;
pub(crate) mod regs;

use linux_loader::loader::Cmdline;
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::layout::{
    BOOT_GDT_START, BOOT_IDT_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::machine::loader::LoadedKernel;
use crate::machine::memory::MemoryRange;
use boot_params::{build_boot_params, BootInputs, ZeroPageError};
use mptable::{build_mptable, MpTableError};
use paging::identity_tables;
use pvh::build_pvh;
use regs::EntryMode;

/// Errors of writing the boot structures.
#[derive(Debug, Error)]
pub enum BootError {
    /// The command line does not fit or is invalid.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The zero page.
    #[error(transparent)]
    ZeroPage(#[from] ZeroPageError),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// Guest memory refused a write.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// The write's error.
        source: vm_memory::GuestMemoryError,
    },
    /// More memory ranges than the PVH memory map has room for.
    #[error("the PVH memory map has {0} ranges; luo-vmm has room for {max}", max = PVH_MEMMAP_MAX_ENTRIES)]
    PvhMemmap(usize),
}

/// What the boot structures describe.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BootSpec<'a> {
    /// The kernel as loaded (entry mode, bzImage header).
    pub kernel: &'a LoadedKernel,
    /// Initramfs address and size.
    pub initrd: Option<(u64, u64)>,
    /// The full kernel command line.
    pub cmdline: &'a str,
    /// The guest's memory map.
    pub memory_map: &'a [MemoryRange],
    /// vCPUs (for the MP table).
    pub vcpus: u8,
}

/// Writes everything the kernel finds at boot: command line, GDT and IDT, MP table, and
/// for its entry mode either the identity page tables and the zero page (64-bit boot
/// protocol) or the PVH start info, module list and memory map.
pub(crate) fn write_boot(memory: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<(), BootError> {
    let cmdline_len = write_cmdline(memory, spec.cmdline)?;
    let mode = spec.kernel.mode;
    write_array(memory, "GDT", mode.gdt(), BOOT_GDT_START)?;
    write(memory, "IDT", 0u64, BOOT_IDT_START)?;
    memory
        .write_slice(&build_mptable(spec.vcpus)?, GuestAddress(EBDA_START))
        .map_err(|source| BootError::GuestWrite {
            what: "MP table",
            source,
        })?;
    match mode {
        EntryMode::LongMode => {
            for (addr, table) in identity_tables() {
                write_array(memory, "page tables", &table, addr)?;
            }
            let params = build_boot_params(&BootInputs {
                header: spec.kernel.header,
                cmdline: (CMDLINE_START, cmdline_len),
                initrd: spec.initrd,
                memory_map: spec.memory_map,
            })?;
            write(memory, "boot_params", params, ZERO_PAGE_START)
        }
        EntryMode::Pvh => {
            let pvh = build_pvh(CMDLINE_START, spec.initrd, spec.memory_map);
            if pvh.memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
                return Err(BootError::PvhMemmap(pvh.memmap.len()));
            }
            write(memory, "hvm_start_info", pvh.start_info, PVH_INFO_START)?;
            write_array(memory, "PVH module list", &pvh.modules, PVH_MODLIST_START)?;
            write_array(memory, "PVH memory map", &pvh.memmap, PVH_MEMMAP_START)
        }
    }
}

/// Writes the command line (NUL-terminated); returns its length without the NUL.
fn write_cmdline(memory: &GuestMemoryMmap, text: &str) -> Result<usize, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(text).map_err(|e| {
        BootError::Cmdline(format!(
            "{e} ({} bytes, at most {})",
            text.len(),
            CMDLINE_MAX_SIZE - 1
        ))
    })?;
    linux_loader::loader::load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(text.len())
}

fn write<T: ByteValued>(
    memory: &GuestMemoryMmap,
    what: &'static str,
    obj: T,
    at: u64,
) -> Result<(), BootError> {
    memory
        .write_obj(obj, GuestAddress(at))
        .map_err(|source| BootError::GuestWrite { what, source })
}

/// Writes `items` back to back from `at`.
fn write_array<T: ByteValued>(
    memory: &GuestMemoryMmap,
    what: &'static str,
    items: &[T],
    at: u64,
) -> Result<(), BootError> {
    let mut addr = at;
    for item in items {
        write(memory, what, *item, addr)?;
        addr += std::mem::size_of::<T>() as u64;
    }
    Ok(())
}
