//! Recognising and loading a kernel image (ELF vmlinux or bzImage) and an initramfs.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::arch::regs::EntryMode;
use crate::machine::layout::HIMEM_START;
use crate::machine::memory::{MemoryRange, RangeKind};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error(
        "{0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" setup header)"
    )]
    UnknownFormat(PathBuf),
    /// An ELF that is not a 64-bit little-endian x86-64 image (linux-loader would load it).
    #[error("{path} is an ELF for {found}, not an x86-64 kernel")]
    WrongArch { path: PathBuf, found: String },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    /// No room for the initramfs.
    #[error("initramfs of {size} bytes does not fit below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the guest more memory")]
    InitrdTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Kernel image formats luo-vmm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A `bzImage` with the x86 boot protocol header.
    BzImage,
}

/// Recognises a kernel image from its first 0x210 bytes.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    let boot_flag = head.get(0x1fe..0x200)?;
    let magic = head.get(0x202..0x206)?;
    (boot_flag == [0x55, 0xaa] && magic == b"HdrS").then_some(KernelFormat::BzImage)
}

/// `EM_X86_64` (`e_machine` of an x86-64 ELF).
const EM_X86_64: u16 = 62;

/// Checks that an ELF header (its first 20 bytes at least) is 64-bit (`ELFCLASS64`),
/// little-endian (`ELFDATA2LSB`) and for x86-64 (`e_machine` = `EM_X86_64`): linux-loader
/// checks none of them, so an AArch64 `Image` in ELF form would be loaded and entered. On a
/// mismatch, says what the header names instead.
pub fn check_elf_arch(head: &[u8]) -> Result<(), String> {
    let (class, data) = (head.get(4).copied(), head.get(5).copied());
    if class != Some(2) {
        return Err(format!("ELF class {class:?} (not ELFCLASS64)"));
    }
    if data != Some(1) {
        return Err(format!("ELF data encoding {data:?} (not little-endian)"));
    }
    let machine = head
        .get(18..20)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or("a truncated ELF header")?;
    if machine == EM_X86_64 {
        return Ok(());
    }
    let name = match machine {
        3 => "i386",
        8 => "MIPS",
        21 => "PowerPC64",
        22 => "s390",
        40 => "ARM",
        183 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "another machine",
    };
    Err(format!("e_machine {machine} ({name})"))
}

/// Where and how the kernel was loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How the bootstrap processor enters it.
    pub mode: EntryMode,
    /// The entry point (guest-physical).
    pub entry: u64,
    /// First byte past what the kernel occupies, including room to decompress.
    pub end: u64,
    /// The bzImage's setup header, for the zero page.
    pub header: Option<setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::Io {
        what,
        path: path.into(),
        source,
    })
}

/// Loads the kernel at `path`. An ELF with a PVH note is entered through PVH unless
/// `no_pvh` is set; everything else through the 64-bit boot protocol.
pub fn load_kernel(
    memory: &GuestMemoryMmap,
    path: &Path,
    no_pvh: bool,
) -> Result<LoadedKernel, LoaderError> {
    let mut file = open("kernel", path)?;
    let mut head = vec![0u8; 0x210];
    let n = file.read(&mut head).map_err(|source| LoaderError::Io {
        what: "kernel",
        path: path.into(),
        source,
    })?;
    head.truncate(n);
    let format = detect_format(&head).ok_or_else(|| LoaderError::UnknownFormat(path.into()))?;
    let load_err = |source| LoaderError::Load {
        path: path.into(),
        source,
    };
    match format {
        KernelFormat::Elf => {
            check_elf_arch(&head).map_err(|found| LoaderError::WrongArch {
                path: path.into(),
                found,
            })?;
            let r = Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let (mode, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) if !no_pvh => (EntryMode::Pvh, addr.0),
                _ => (EntryMode::LongMode, r.kernel_load.0),
            };
            Ok(LoadedKernel {
                mode,
                entry,
                end: r.kernel_end,
                header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            // The decompressor runs in place and may grow to init_size above the
            // preferred load address.
            let pref = hdr.pref_address.max(r.kernel_load.0);
            let end = r.kernel_end.max(pref + u64::from(hdr.init_size));
            Ok(LoadedKernel {
                mode: EntryMode::LongMode,
                // The 64-bit entry point sits 0x200 into the protected-mode kernel.
                entry: r.kernel_load.0 + 0x200,
                end,
                header: r.setup_header,
            })
        }
    }
}

/// Where the initramfs goes: as high as possible in RAM below `addr_max` (and below
/// 4 GiB), page aligned, above the kernel.
pub fn initrd_address(
    map: &[MemoryRange],
    kernel_end: u64,
    size: u64,
    addr_max: u64,
) -> Result<u64, LoaderError> {
    let limit = map
        .iter()
        .filter(|r| r.kind == RangeKind::Ram && r.start >= HIMEM_START && r.start < (1 << 32))
        .map(|r| r.end().min(addr_max.saturating_add(1)).min(1 << 32))
        .max()
        .unwrap_or(0);
    let too_large = || LoaderError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    Ok(addr)
}

/// Reads the initramfs and places it; returns (address, size).
pub fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    map: &[MemoryRange],
    kernel: &LoadedKernel,
) -> Result<(u64, u64), LoaderError> {
    let data = std::fs::read(path).map_err(|source| LoaderError::Io {
        what: "initramfs",
        path: path.into(),
        source,
    })?;
    let addr_max = kernel
        .header
        .map_or(0x7fff_ffff, |h| u64::from(h.initrd_addr_max));
    let addr = initrd_address(map, kernel.end, data.len() as u64, addr_max)?;
    memory
        .write_slice(&data, GuestAddress(addr))
        .map_err(|source| LoaderError::GuestWrite {
            what: "initramfs",
            source,
        })?;
    Ok((addr, data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::guest_memory_map;

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x210];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(&[0u8; 0x210]), None);
        assert_eq!(detect_format(b"short"), None);
    }

    /// The first 20 bytes of an ELF header: `e_ident`, `e_type` (ET_EXEC), `e_machine`.
    fn elf_head(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![
            0x7f, b'E', b'L', b'F', class, data, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn only_x86_64_elves_are_kernels() {
        assert_eq!(check_elf_arch(&elf_head(2, 1, 62)), Ok(()));
        assert_eq!(
            check_elf_arch(&elf_head(2, 1, 183)),
            Err("e_machine 183 (AArch64)".into())
        );
        assert!(check_elf_arch(&elf_head(1, 1, 3))
            .unwrap_err()
            .contains("ELFCLASS64"));
        assert!(check_elf_arch(&elf_head(2, 2, 62))
            .unwrap_err()
            .contains("little-endian"));
        assert!(check_elf_arch(b"\x7fELF\x02\x01").is_err());
    }

    #[test]
    fn an_aarch64_elf_is_refused_before_loading() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let path = std::env::temp_dir().join(format!("luo-vmm-aarch64-{}.elf", std::process::id()));
        let mut image = elf_head(2, 1, 183);
        image.resize(0x1000, 0);
        std::fs::write(&path, &image).unwrap();
        let err = load_kernel(&memory, &path, false).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, LoaderError::WrongArch { .. }), "{err}");
        assert!(err.to_string().contains("AArch64"), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let map = guest_memory_map(512 << 20);
        let a = initrd_address(&map, 0x300_0000, 0x12345, 0x7fff_ffff).unwrap();
        assert_eq!(a, ((512 << 20) - 0x12345) & !0xfff);
        assert_eq!(a % 4096, 0);
        assert!(a + 0x12345 <= 512 << 20);
    }

    #[test]
    fn initrd_respects_addr_max_and_the_mmio_hole() {
        let map = guest_memory_map(8 << 30);
        let a = initrd_address(&map, 0x300_0000, 0x1000, 0x7fff_ffff).unwrap();
        assert_eq!(a, 0x8000_0000 - 0x1000);
        let b = initrd_address(&map, 0x300_0000, 0x1000, u64::from(u32::MAX)).unwrap();
        assert_eq!(b, 0xc000_0000 - 0x1000);
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error() {
        let map = guest_memory_map(64 << 20);
        assert!(matches!(
            initrd_address(&map, 0x300_0000, 63 << 20, 0x7fff_ffff),
            Err(LoaderError::InitrdTooLarge { .. })
        ));
    }
}
