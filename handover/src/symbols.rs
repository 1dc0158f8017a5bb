//! Kernel symbol addresses from a `vmlinux` ELF (or `System.map`), and the kernel image's
//! virtual-to-physical mapping, so the VMM can arm breakpoints on `liveupdate_reboot`,
//! `machine_kexec`, `start_kernel` and read `boot_params` of a kernel without KASLR.

use std::collections::HashMap;

use object::elf::PT_LOAD;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SymbolKind};
use thiserror::Error;

/// `__START_KERNEL_map` on x86-64: a kernel-image virtual address minus this is its physical
/// address when `phys_base` is 0 (no relocation, no KASLR).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Entered by the old kernel when serialisation starts (`serialize-start`).
pub const SYM_LIVEUPDATE_REBOOT: &str = "liveupdate_reboot";
/// Entered by the old kernel at the point of no return (`point-of-no-return`).
pub const SYM_MACHINE_KEXEC: &str = "machine_kexec";
/// Entered by the next kernel (`next-kernel-start`).
pub const SYM_START_KERNEL: &str = "start_kernel";
/// The next kernel's copy of the zero page, filled before `start_kernel`.
pub const SYM_BOOT_PARAMS: &str = "boot_params";
/// The outgoing kernel's KHO state (`static struct kho_out kho_out`,
/// `kernel/liveupdate/kexec_handover.c`, a `b` symbol); its first member, at offset 0, is
/// `void *fdt`, the direct-map address of the KHO root FDT ([`KHO_OUT_FDT_OFFSET`]).
pub const SYM_KHO_OUT: &str = "kho_out";
/// Offset of `fdt` in `struct kho_out` (Linux 7.2: `struct kho_out { void *fdt; struct
/// mutex lock; struct kho_radix_tree radix_tree; struct kho_debugfs dbg; }`), in bytes.
pub const KHO_OUT_FDT_OFFSET: u64 = 0;

/// Errors from loading symbols or translating addresses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SymbolError {
    /// The file is not a 64-bit ELF.
    #[error("not a 64-bit ELF file: {0}")]
    NotElf(String),
    /// No definition of the symbol.
    #[error("symbol {0:?} not found")]
    Missing(String),
    /// Several local definitions and no global one.
    #[error("symbol {0:?} is defined more than once (local symbols)")]
    Ambiguous(String),
    /// A System.map line that is not `ADDRESS TYPE NAME`.
    #[error("System.map line {line}: {text:?}")]
    BadSystemMap {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// The address is in no loadable segment of the image.
    #[error("virtual address {0:#x} is in no PT_LOAD segment of the kernel image")]
    Unmapped(u64),
}

#[derive(Debug, Clone, Copy)]
struct Sym {
    addr: u64,
    global: bool,
    ambiguous: bool,
}

/// A `PT_LOAD` segment: `[vaddr, vaddr + memsz)` is loaded at `paddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_paddr`.
    pub paddr: u64,
    /// `p_memsz`.
    pub memsz: u64,
}

/// The initial value of the `u32` data symbol `name` of a 64-bit ELF `vmlinux`: the four
/// bytes the file holds for it. For `nr_cpu_ids`, which kernel/smp.c initializes to
/// `CONFIG_NR_CPUS`, that is the most CPUs the kernel can bring up. `None`: not an ELF file,
/// no such symbol, or no file data for it (a `.bss` symbol, a symbol past its section).
pub fn initial_u32(data: &[u8], name: &str) -> Option<u32> {
    let elf = ElfFile64::<Endianness>::parse(data).ok()?;
    let sym = elf.symbols().find(|s| s.name() == Ok(name))?;
    let section = elf.section_by_index(sym.section_index()?).ok()?;
    let bytes = section.data().ok()?;
    let at = usize::try_from(sym.address().checked_sub(section.address())?).ok()?;
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

/// Largest function [`function_code`] returns the bytes of (bytes): the LUO/KHO functions
/// are a few hundred bytes to a few KiB; a symbol claiming more is not one of them.
pub const MAX_FUNCTION_SIZE: u64 = 64 << 10;

/// One function of a 64-bit ELF `vmlinux`, as its symbol table gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCode {
    /// Its entry: the symbol's address (kernel-image virtual address). With IBT or
    /// `CALL_PADDING` the `__pfx_` padding lies before it and an `endbr64` may be its first
    /// instruction; the symbol is still the entry.
    pub address: u64,
    /// Its code, `st_size` bytes from the entry, as the file holds them (before the
    /// kernel's boot-time patching: alternatives, static calls, call thunks).
    pub bytes: Vec<u8>,
}

/// The code of the text symbols `wanted` (name, address: the address
/// [`KernelSymbols::address`] gave, so that a local symbol of one name in two files is the
/// one the caller means) of a 64-bit ELF `vmlinux`, in one pass over its symbol table.
/// A wanted symbol without file bytes (no size, larger than [`MAX_FUNCTION_SIZE`], in a
/// section without data, or past its section's end) is left out of the answer; the
/// caller says what its absence means. `Err` only for a file that is not a 64-bit ELF.
pub fn function_code(
    data: &[u8],
    wanted: &[(String, u64)],
) -> Result<HashMap<String, FunctionCode>, SymbolError> {
    let elf =
        ElfFile64::<Endianness>::parse(data).map_err(|e| SymbolError::NotElf(e.to_string()))?;
    let want: HashMap<&str, u64> = wanted.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let mut out = HashMap::new();
    for s in elf.symbols() {
        if !s.is_definition() || s.kind() != SymbolKind::Text {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        if want.get(name) != Some(&s.address()) || out.contains_key(name) {
            continue;
        }
        let size = s.size();
        if size == 0 || size > MAX_FUNCTION_SIZE {
            continue;
        }
        let Some(index) = s.section_index() else {
            continue;
        };
        let Ok(section) = elf.section_by_index(index) else {
            continue;
        };
        let Ok(bytes) = section.data() else { continue };
        let Some(at) = s
            .address()
            .checked_sub(section.address())
            .and_then(|a| usize::try_from(a).ok())
        else {
            continue;
        };
        let Some(code) = usize::try_from(size)
            .ok()
            .and_then(|n| at.checked_add(n))
            .and_then(|end| bytes.get(at..end))
        else {
            continue;
        };
        out.insert(
            name.to_owned(),
            FunctionCode {
                address: s.address(),
                bytes: code.to_vec(),
            },
        );
    }
    Ok(out)
}

/// Symbols and load segments of one kernel image.
#[derive(Debug, Clone, Default)]
pub struct KernelSymbols {
    symbols: HashMap<String, Sym>,
    segments: Vec<LoadSegment>,
}

impl KernelSymbols {
    fn insert(&mut self, name: &str, addr: u64, global: bool) {
        use std::collections::hash_map::Entry;
        match self.symbols.entry(name.to_owned()) {
            Entry::Vacant(v) => {
                v.insert(Sym {
                    addr,
                    global,
                    ambiguous: false,
                });
            }
            Entry::Occupied(mut o) => {
                let s = o.get_mut();
                if global && !s.global {
                    *s = Sym {
                        addr,
                        global,
                        ambiguous: false,
                    };
                } else if !global && !s.global && s.addr != addr {
                    s.ambiguous = true;
                }
            }
        }
    }

    /// Loads the symbol table and `PT_LOAD` segments of a 64-bit ELF `vmlinux`.
    pub fn from_elf(data: &[u8]) -> Result<Self, SymbolError> {
        let elf =
            ElfFile64::<Endianness>::parse(data).map_err(|e| SymbolError::NotElf(e.to_string()))?;
        let mut out = KernelSymbols::default();
        for s in elf.symbols() {
            if !s.is_definition()
                || !matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            {
                continue;
            }
            if let Ok(name) = s.name() {
                if !name.is_empty() {
                    out.insert(name, s.address(), s.is_global());
                }
            }
        }
        let endian = elf.endian();
        out.segments = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == PT_LOAD)
            .map(|ph| LoadSegment {
                vaddr: ph.p_vaddr(endian),
                paddr: ph.p_paddr(endian),
                memsz: ph.p_memsz(endian),
            })
            .collect();
        Ok(out)
    }

    /// Parses `System.map` text (`ffffffff81000000 T _text` per line). Upper-case types are
    /// global. There are no segments: [`Self::virt_to_phys`] falls back to
    /// [`START_KERNEL_MAP`].
    pub fn from_system_map(text: &str) -> Result<Self, SymbolError> {
        let mut out = KernelSymbols::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || SymbolError::BadSystemMap {
                line: i + 1,
                text: line.to_owned(),
            };
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
                return Err(bad());
            };
            let addr = u64::from_str_radix(addr, 16).map_err(|_| bad())?;
            let global = kind.chars().next().is_some_and(|c| c.is_ascii_uppercase());
            out.insert(name, addr, global);
        }
        Ok(out)
    }

    /// The address of `name` (global definitions win over local ones).
    pub fn address(&self, name: &str) -> Result<u64, SymbolError> {
        match self.symbols.get(name) {
            None => Err(SymbolError::Missing(name.to_owned())),
            Some(s) if s.ambiguous => Err(SymbolError::Ambiguous(name.to_owned())),
            Some(s) => Ok(s.addr),
        }
    }

    /// Number of distinct symbol names.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether no symbol was loaded.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The `PT_LOAD` segments (empty for System.map).
    pub fn segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// Translates a kernel-image virtual address to the physical address it is loaded at,
    /// through the segment holding it; without segments, `vaddr - __START_KERNEL_map`.
    /// Valid for a kernel that was not relocated (no KASLR, `phys_base` = 0).
    pub fn virt_to_phys(&self, vaddr: u64) -> Result<u64, SymbolError> {
        if self.segments.is_empty() {
            return vaddr
                .checked_sub(START_KERNEL_MAP)
                .ok_or(SymbolError::Unmapped(vaddr));
        }
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.memsz)
            .and_then(|s| s.paddr.checked_add(vaddr - s.vaddr))
            .ok_or(SymbolError::Unmapped(vaddr))
    }

    /// `virt_to_phys(address(name))`.
    pub fn physical_address(&self, name: &str) -> Result<u64, SymbolError> {
        self.virt_to_phys(self.address(name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::tiny_kernel_elf;

    #[test]
    fn elf_symbols_and_translation() {
        let elf = tiny_kernel_elf(&[
            ("start_kernel", 0xffff_ffff_8300_0100, true),
            ("machine_kexec", 0xffff_ffff_8100_2000, true),
            ("liveupdate_reboot", 0xffff_ffff_8100_3000, true),
            ("boot_params", 0xffff_ffff_8240_0000, true),
            ("helper", 0xffff_ffff_8100_4000, false),
            ("helper", 0xffff_ffff_8100_5000, false),
            ("dup", 0xffff_ffff_8100_6000, false),
            ("dup", 0xffff_ffff_8100_7000, true),
        ]);
        let k = KernelSymbols::from_elf(&elf).unwrap();
        assert_eq!(k.address("machine_kexec").unwrap(), 0xffff_ffff_8100_2000);
        assert_eq!(k.address("dup").unwrap(), 0xffff_ffff_8100_7000);
        assert_eq!(
            k.address("helper"),
            Err(SymbolError::Ambiguous("helper".into()))
        );
        assert_eq!(k.address("nope"), Err(SymbolError::Missing("nope".into())));
        assert_eq!(k.segments().len(), 2);
        // Segment 1: text at 0xffffffff81000000 -> 0x1000000; segment 2: data -> 0x2400000.
        assert_eq!(k.physical_address("liveupdate_reboot").unwrap(), 0x100_3000);
        assert_eq!(k.physical_address("boot_params").unwrap(), 0x240_0000);
        assert_eq!(
            k.virt_to_phys(0xffff_ffff_8300_0100),
            Err(SymbolError::Unmapped(0xffff_ffff_8300_0100))
        );
    }

    /// The object file `cc -c FLAGS` makes of C `source` (a real compiler's ELF).
    fn compile(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("luo-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, obj) = (dir.join("t.c"), dir.join("t.o"));
        std::fs::write(&src, source).unwrap();
        let status = std::process::Command::new("cc")
            .arg("-c")
            .args(flags)
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .expect("cc (gcc) is needed for this test");
        assert!(status.success());
        let data = std::fs::read(&obj).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        data
    }

    #[test]
    fn initial_values_of_data_symbols() {
        // A real compiler's object file: `nr_cpu_ids` in .data with its initial value, a
        // .bss symbol with no file bytes.
        let data = compile(
            "initial-u32",
            "unsigned int before = 7;\nunsigned int nr_cpu_ids = 64;\nunsigned int in_bss;\n",
            &["-O0"],
        );
        assert_eq!(initial_u32(&data, "nr_cpu_ids"), Some(64));
        assert_eq!(initial_u32(&data, "before"), Some(7));
        assert_eq!(initial_u32(&data, "in_bss"), None);
        assert_eq!(initial_u32(&data, "no_such_symbol"), None);
        assert_eq!(initial_u32(b"not an ELF file", "nr_cpu_ids"), None);
        assert_eq!(initial_u32(&data[..data.len() / 2], "nr_cpu_ids"), None);
    }

    #[test]
    fn function_code_comes_from_the_symbol_table_and_its_section() {
        // A real compiler's object file: two functions of known sizes in .text.
        let data = compile(
            "function-code",
            "int g(int x) { return x + 1; }\nint f(int x) { return g(x) * 3; }\nint d = 5;\n",
            &["-O1", "-fno-inline", "-fcf-protection=none"],
        );
        let elf = ElfFile64::<Endianness>::parse(&*data).unwrap();
        let addr = |n: &str| {
            elf.symbols()
                .find(|s| s.name() == Ok(n))
                .map(|s| (s.address(), s.size()))
                .unwrap()
        };
        let (fa, fsize) = addr("f");
        let wanted = vec![
            ("f".to_owned(), fa),
            ("g".to_owned(), addr("g").0),
            // A data symbol and a wrong address are not functions to read.
            ("d".to_owned(), addr("d").0),
            ("g".to_owned(), 0x1234),
        ];
        let got = function_code(&data, &wanted[..3]).unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["f"].address, fa);
        assert_eq!(got["f"].bytes.len() as u64, fsize);
        // gcc -O1 ends a function with `ret` (0xc3).
        assert_eq!(got["g"].bytes.last(), Some(&0xc3));
        assert!(function_code(&data, &wanted[3..]).unwrap().is_empty());
        assert!(function_code(b"not an ELF", &wanted).is_err());
        for cut in [10, 64, data.len() / 2, data.len() - 1] {
            let _ = function_code(&data[..cut], &wanted);
        }
    }

    #[test]
    fn not_elf() {
        assert!(matches!(
            KernelSymbols::from_elf(b"\x7fELF but not really"),
            Err(SymbolError::NotElf(_))
        ));
        assert!(matches!(
            KernelSymbols::from_elf(&[]),
            Err(SymbolError::NotElf(_))
        ));
        let mut elf = tiny_kernel_elf(&[("x", 0xffff_ffff_8100_0000, true)]);
        for cut in [10, 64, 100, elf.len() - 1] {
            let _ = KernelSymbols::from_elf(&elf[..cut]);
        }
        elf[4] = 1; // ELFCLASS32
        assert!(KernelSymbols::from_elf(&elf).is_err());
    }

    #[test]
    fn system_map() {
        let map = "ffffffff81000000 T _text\nffffffff81002000 T machine_kexec\n\
                   ffffffff81004000 t helper\nffffffff81005000 t helper\nffffffff82400000 D boot_params\n";
        let k = KernelSymbols::from_system_map(map).unwrap();
        assert_eq!(k.len(), 4);
        assert_eq!(k.physical_address("_text").unwrap(), 0x100_0000);
        assert_eq!(k.physical_address("boot_params").unwrap(), 0x240_0000);
        assert!(matches!(
            k.address("helper"),
            Err(SymbolError::Ambiguous(_))
        ));
        assert!(matches!(
            KernelSymbols::from_system_map("ffffffff81000000 T\n"),
            Err(SymbolError::BadSystemMap { line: 1, .. })
        ));
        assert!(KernelSymbols::from_system_map("zzzz T x").is_err());
        assert_eq!(k.virt_to_phys(0x1000), Err(SymbolError::Unmapped(0x1000)));
    }
}
