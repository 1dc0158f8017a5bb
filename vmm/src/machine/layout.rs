//! Every fixed guest-physical address luo-vmm uses, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left alone)
//! 0x0000_0500  boot GDT                       BOOT_GDT_START
//! 0x0000_0520  boot IDT (empty)               BOOT_IDT_START
//! 0x0000_6000  PVH hvm_start_info             PVH_INFO_START
//! 0x0000_6040  PVH module list (initrd)       PVH_MODLIST_START
//! 0x0000_6080  PVH memory map                 PVH_MEMMAP_START
//! 0x0000_7000  boot_params ("zero page")      ZERO_PAGE_START
//! 0x0000_9000  PML4, PDPTE, PDE (identity)    PML4_START ..
//! 0x0002_0000  kernel command line            CMDLINE_START
//! 0x0009_fc00  EBDA: MP floating ptr + table  EBDA_START
//! 0x000a_0000  VGA / option ROM / BIOS hole   (reserved, no RAM)
//! 0x0010_0000  high memory: kernel, initrd    HIMEM_START
//! 0xc000_0000  32-bit MMIO hole (no RAM)      MMIO_HOLE_START
//! 0x1_0000_0000 RAM above 4 GiB                HIGH_RAM_START
//! ```

/// Boot GDT: null, code64, data, TSS descriptors.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: a zero-length IDT is enough until the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;

/// `hvm_start_info` for the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Room for PVH memory map entries (24 bytes each) before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;

/// The x86 boot protocol's `boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory: 512 x 2 MiB = the first GiB identity-mapped.
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass (x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Extended BIOS data area; the MP table lives here, where Linux's mpparse looks.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (start of the VGA/BIOS hole).
pub const LOW_RAM_END: u64 = 0xa0000;

/// Start of "high" memory; the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: no RAM between 3 GiB and 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM beyond the hole starts at 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Smallest guest we accept: room for the boot structures, a kernel and an initramfs.
pub const MIN_MEM_SIZE: u64 = 64 << 20;
/// Largest guest we accept.
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// Local APIC MMIO base (default, as the MP table and the kernel expect it).
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel (`KVM_SET_TSS_ADDR`), just below the BIOS
/// area at the top of the 32-bit space, where no RAM is.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// IO-APIC MMIO base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
