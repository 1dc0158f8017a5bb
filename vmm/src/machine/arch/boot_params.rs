//! The x86 boot protocol's `boot_params` ("zero page") and its e820 map, built by a pure
//! function (see Documentation/arch/x86/boot.rst).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use thiserror::Error;

use crate::machine::memory::{MemoryRange, RangeKind};

/// `boot_flag` magic.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic, "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` we declare for an ELF kernel without its own header.
pub const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `loadflags` bit: the protected-mode kernel is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 0x01;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Errors of this module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ZeroPageError {
    /// More ranges than the zero page's e820 table holds.
    #[error("the memory map has {0} ranges; the zero page holds at most {max}", max = E820_MAX)]
    TooManyE820Entries(usize),
    /// The kernel's boot protocol is too old to be booted directly.
    #[error("bzImage boot protocol {0:#06x} is older than 2.06, which luo-vmm needs")]
    ProtocolTooOld(u16),
    /// An address that must fit in 32 bits does not.
    #[error("{what} at {addr:#x} is above 4 GiB, which the boot protocol cannot express")]
    Above4G {
        /// What.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
}

const E820_MAX: usize = 128;

/// What the caller put in guest memory and wants the kernel to know about.
#[derive(Debug, Clone, Copy)]
pub struct BootInputs<'a> {
    /// The bzImage's own setup header, or `None` for an ELF vmlinux.
    pub header: Option<setup_header>,
    /// Command line address and length (without the NUL).
    pub cmdline: (u64, usize),
    /// Initramfs address and size.
    pub initrd: Option<(u64, u64)>,
    /// The guest's memory map.
    pub memory_map: &'a [MemoryRange],
}

/// Converts the memory map to e820 entries.
pub fn e820_entries(map: &[MemoryRange]) -> Vec<boot_e820_entry> {
    map.iter()
        .map(|r| boot_e820_entry {
            addr: r.start,
            size: r.size,
            r#type: match r.kind {
                RangeKind::Ram => E820_RAM,
                RangeKind::Reserved => E820_RESERVED,
            },
        })
        .collect()
}

fn low32(what: &'static str, addr: u64) -> Result<u32, ZeroPageError> {
    u32::try_from(addr).map_err(|_| ZeroPageError::Above4G { what, addr })
}

/// Builds the zero page for the 64-bit boot protocol.
pub fn build_boot_params(inputs: &BootInputs<'_>) -> Result<boot_params, ZeroPageError> {
    let hdr = match inputs.header {
        Some(hdr) => {
            let version = hdr.version;
            if version < 0x0206 {
                return Err(ZeroPageError::ProtocolTooOld(version));
            }
            hdr
        }
        None => setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            kernel_alignment: KERNEL_ALIGNMENT,
            ..Default::default()
        },
    };
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = low32("command line", inputs.cmdline.0)?;
    params.hdr.cmdline_size = low32("command line length", inputs.cmdline.1 as u64)?;
    if let Some((addr, size)) = inputs.initrd {
        params.hdr.ramdisk_image = low32("initramfs", addr)?;
        params.hdr.ramdisk_size = low32("initramfs size", size)?;
    }

    let entries = e820_entries(inputs.memory_map);
    if entries.len() > E820_MAX {
        return Err(ZeroPageError::TooManyE820Entries(entries.len()));
    }
    params.e820_entries = u8::try_from(entries.len())
        .map_err(|_| ZeroPageError::TooManyE820Entries(entries.len()))?;
    params.e820_table[..entries.len()].copy_from_slice(&entries);
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::guest_memory_map;

    #[test]
    fn elf_kernel_gets_a_synthesized_header_and_e820() {
        let map = guest_memory_map(512 << 20);
        let p = build_boot_params(&BootInputs {
            header: None,
            cmdline: (0x20000, 42),
            initrd: Some((0x1f00_0000, 0x10_0000)),
            memory_map: &map,
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!((hdr.cmd_line_ptr, hdr.cmdline_size), (0x20000, 42));
        assert_eq!(
            (hdr.ramdisk_image, hdr.ramdisk_size),
            (0x1f00_0000, 0x10_0000)
        );
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            (last.addr, last.size, last.r#type),
            (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM)
        );
        assert_eq!({ p.e820_table[1].r#type }, E820_RESERVED);
    }

    #[test]
    fn bzimage_header_is_kept_and_old_protocols_refused() {
        let map = guest_memory_map(512 << 20);
        let hdr = setup_header {
            version: 0x020f,
            setup_sects: 27,
            init_size: 0x123_4000,
            ..Default::default()
        };
        let inputs = BootInputs {
            header: Some(hdr),
            cmdline: (0x20000, 1),
            initrd: None,
            memory_map: &map,
        };
        let p = build_boot_params(&inputs).unwrap();
        assert_eq!({ p.hdr.init_size }, 0x123_4000);
        assert_eq!(p.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ p.hdr.ramdisk_image }, 0);

        let old = BootInputs {
            header: Some(setup_header {
                version: 0x0204,
                ..Default::default()
            }),
            ..inputs
        };
        assert_eq!(
            build_boot_params(&old),
            Err(ZeroPageError::ProtocolTooOld(0x0204))
        );
    }

    #[test]
    fn large_guest_e820_has_high_ram() {
        let map = guest_memory_map(8 << 30);
        let p = build_boot_params(&BootInputs {
            header: None,
            cmdline: (0x20000, 1),
            initrd: None,
            memory_map: &map,
        })
        .unwrap();
        assert_eq!(p.e820_entries, 4);
        assert_eq!({ p.e820_table[3].addr }, 1 << 32);
    }

    #[test]
    fn addresses_above_4g_are_refused() {
        let map = guest_memory_map(512 << 20);
        let r = build_boot_params(&BootInputs {
            header: None,
            cmdline: (0x20000, 1),
            initrd: Some((1 << 33, 4096)),
            memory_map: &map,
        });
        assert!(matches!(r, Err(ZeroPageError::Above4G { .. })));
    }
}
