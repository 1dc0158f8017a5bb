//! The x86 boot protocol's zero page (`struct boot_params`), its `setup_data` list and the
//! `SETUP_KEXEC_KHO` record that carries the KHO handover to the next kernel.
//!
//! Layouts: `arch/x86/include/uapi/asm/bootparam.h` (offsets in its comments; `hdr` at 0x1f1,
//! so `hdr.setup_data` is at 0x250) and `arch/x86/include/uapi/asm/setup_data.h`. The KHO record
//! is written by `setup_kho()` in `arch/x86/kernel/kexec-bzimage64.c` and read by `add_kho()` in
//! `arch/x86/kernel/setup.c`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mem::{read_array, GuestMemoryRead, LeBytes, MemError};

/// Size of `struct boot_params`.
pub const BOOT_PARAMS_SIZE: usize = 4096;
/// Offset of `hdr.setup_data` (u64).
pub const SETUP_DATA_OFFSET: usize = 0x250;
/// Offset of `e820_entries` (u8).
pub const E820_ENTRIES_OFFSET: usize = 0x1e8;
/// Offset of `e820_table[]` (packed 20-byte `struct boot_e820_entry`).
pub const E820_TABLE_OFFSET: usize = 0x2d0;
/// `E820_MAX_ENTRIES_ZEROPAGE`.
pub const E820_MAX_ENTRIES: usize = 128;
/// Offset of `hdr.header`, which holds `"HdrS"` when a setup header is present.
pub const HEADER_MAGIC_OFFSET: usize = 0x202;
/// Offset of `hdr.cmd_line_ptr` (u32).
pub const CMD_LINE_PTR_OFFSET: usize = 0x228;
/// Offset of `ext_cmd_line_ptr` (u32, high half of the command line address).
pub const EXT_CMD_LINE_PTR_OFFSET: usize = 0x0c8;
/// `SETUP_KEXEC_KHO`.
pub const SETUP_KEXEC_KHO: u32 = 10;
/// `SETUP_INDIRECT`: the payload is a `struct setup_indirect`.
pub const SETUP_INDIRECT: u32 = 1 << 31;
/// `sizeof(struct setup_data)` (the header before `data[]`).
pub const SETUP_DATA_HEADER_SIZE: u64 = 16;
/// `sizeof(struct kho_data)`.
pub const KHO_DATA_SIZE: usize = 32;
/// Most `setup_data` records followed before giving up (the kernel's own lists hold a few).
pub const MAX_SETUP_DATA: usize = 256;

const E820_ENTRY_SIZE: usize = 20;

/// Errors from reading boot parameters and setup_data.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BootParamsError {
    /// Guest memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// `e820_entries` is larger than the zero page can hold.
    #[error("e820_entries = {0} exceeds the zero page's {E820_MAX_ENTRIES}")]
    TooManyE820(u8),
    /// The setup_data list revisits a record.
    #[error("setup_data list loops back to {0:#x}")]
    Cycle(u64),
    /// The setup_data list is longer than [`MAX_SETUP_DATA`].
    #[error("setup_data list longer than {MAX_SETUP_DATA} records")]
    TooLong,
    /// A `SETUP_KEXEC_KHO` record too short for `struct kho_data`.
    #[error("SETUP_KEXEC_KHO record at {gpa:#x} has len {len} < {KHO_DATA_SIZE}")]
    ShortKho {
        /// Record address.
        gpa: u64,
        /// Its `len`.
        len: u32,
    },
}

/// A copy of the guest's zero page.
#[derive(Clone)]
pub struct BootParams {
    raw: Box<[u8; BOOT_PARAMS_SIZE]>,
}

impl std::fmt::Debug for BootParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootParams")
            .field("setup_data", &self.setup_data())
            .field("e820_entries", &self.raw.get(E820_ENTRIES_OFFSET))
            .finish()
    }
}

/// One entry of the zero page's e820 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// `E820_TYPE_*` (1 = RAM, 2 = reserved, ...).
    pub kind: u32,
}

impl BootParams {
    /// Reads the zero page at `gpa`.
    pub fn read(mem: &(impl GuestMemoryRead + ?Sized), gpa: u64) -> Result<Self, BootParamsError> {
        Ok(BootParams {
            raw: Box::new(read_array(mem, gpa)?),
        })
    }

    /// Wraps a zero page already copied out of the guest.
    pub fn from_bytes(raw: [u8; BOOT_PARAMS_SIZE]) -> Self {
        BootParams { raw: Box::new(raw) }
    }

    /// `hdr.setup_data`: guest address of the first setup_data record, 0 if none.
    pub fn setup_data(&self) -> u64 {
        self.raw.u64_at(SETUP_DATA_OFFSET).unwrap_or(0)
    }

    /// Whether the setup header carries the `"HdrS"` signature.
    pub fn has_setup_header(&self) -> bool {
        self.raw.get(HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4) == Some(b"HdrS")
    }

    /// The command line's guest address (`ext_cmd_line_ptr << 32 | hdr.cmd_line_ptr`).
    pub fn cmd_line_ptr(&self) -> u64 {
        let lo = self.raw.u32_at(CMD_LINE_PTR_OFFSET).unwrap_or(0) as u64;
        let hi = self.raw.u32_at(EXT_CMD_LINE_PTR_OFFSET).unwrap_or(0) as u64;
        hi << 32 | lo
    }

    /// The e820 table (`e820_entries` entries of `e820_table`).
    pub fn e820(&self) -> Result<Vec<E820Entry>, BootParamsError> {
        let n = self.raw.get(E820_ENTRIES_OFFSET).copied().unwrap_or(0);
        if n as usize > E820_MAX_ENTRIES {
            return Err(BootParamsError::TooManyE820(n));
        }
        Ok((0..n as usize)
            .filter_map(|i| {
                let off = E820_TABLE_OFFSET + i * E820_ENTRY_SIZE;
                Some(E820Entry {
                    addr: self.raw.u64_at(off)?,
                    size: self.raw.u64_at(off + 8)?,
                    kind: self.raw.u32_at(off + 16)?,
                })
            })
            .collect())
    }
}

/// One record of the setup_data list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupData {
    /// Guest address of the record (its `struct setup_data` header).
    pub gpa: u64,
    /// `type` (`SETUP_*`, possibly with [`SETUP_INDIRECT`]).
    pub kind: u32,
    /// `len`: payload bytes after the 16-byte header.
    pub len: u32,
}

impl SetupData {
    /// Guest address of the payload (`data[]`).
    pub fn payload_gpa(&self) -> u64 {
        self.gpa.wrapping_add(SETUP_DATA_HEADER_SIZE)
    }
}

/// Walks the setup_data list starting at `head` (normally [`BootParams::setup_data`]).
///
/// Bounded by [`MAX_SETUP_DATA`]; a record seen twice is reported as a cycle.
pub fn setup_data_list(
    mem: &(impl GuestMemoryRead + ?Sized),
    head: u64,
) -> Result<Vec<SetupData>, BootParamsError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut at = head;
    while at != 0 {
        if !seen.insert(at) {
            return Err(BootParamsError::Cycle(at));
        }
        if out.len() == MAX_SETUP_DATA {
            return Err(BootParamsError::TooLong);
        }
        let hdr: [u8; 16] = read_array(mem, at)?;
        let next = hdr.u64_at(0).unwrap_or(0);
        out.push(SetupData {
            gpa: at,
            kind: hdr.u32_at(8).unwrap_or(0),
            len: hdr.u32_at(12).unwrap_or(0),
        });
        at = next;
    }
    Ok(out)
}

/// `struct kho_data`: where the previous kernel left the KHO FDT and the scratch list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KhoData {
    /// Guest address of the KHO root FDT.
    pub fdt_addr: u64,
    /// Bytes mapped for the FDT (the kexec loader always passes `PAGE_SIZE`).
    pub fdt_size: u64,
    /// Guest address of the scratch **list**: `struct kho_scratch {addr, size}` records.
    pub scratch_addr: u64,
    /// Size of that list in bytes (16 per area).
    pub scratch_size: u64,
}

/// Finds the `SETUP_KEXEC_KHO` record in the setup_data list and reads its `struct kho_data`.
///
/// The kernel (`add_kho()`) maps `len` bytes but reads 32 regardless; this reader insists on
/// `len >= 32` instead of reading past the record. Returns `None` when there is no KHO record.
pub fn find_kho_data(
    mem: &(impl GuestMemoryRead + ?Sized),
    list: &[SetupData],
) -> Result<Option<KhoData>, BootParamsError> {
    let Some(rec) = list.iter().find(|r| r.kind == SETUP_KEXEC_KHO) else {
        return Ok(None);
    };
    if (rec.len as usize) < KHO_DATA_SIZE {
        return Err(BootParamsError::ShortKho {
            gpa: rec.gpa,
            len: rec.len,
        });
    }
    let b: [u8; KHO_DATA_SIZE] = read_array(mem, rec.payload_gpa())?;
    Ok(Some(KhoData {
        fdt_addr: b.u64_at(0).unwrap_or(0),
        fdt_size: b.u64_at(8).unwrap_or(0),
        scratch_addr: b.u64_at(16).unwrap_or(0),
        scratch_size: b.u64_at(24).unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{kho_data_bytes, setup_data_bytes as encode_setup_data};
    use crate::mem::VecMemory;

    fn zero_page() -> [u8; BOOT_PARAMS_SIZE] {
        let mut z = [0u8; BOOT_PARAMS_SIZE];
        z[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        z[CMD_LINE_PTR_OFFSET..CMD_LINE_PTR_OFFSET + 4].copy_from_slice(&0x2_0000u32.to_le_bytes());
        z[EXT_CMD_LINE_PTR_OFFSET..EXT_CMD_LINE_PTR_OFFSET + 4]
            .copy_from_slice(&1u32.to_le_bytes());
        z[E820_ENTRIES_OFFSET] = 2;
        let mut put = |i: usize, addr: u64, size: u64, kind: u32| {
            let o = E820_TABLE_OFFSET + i * 20;
            z[o..o + 8].copy_from_slice(&addr.to_le_bytes());
            z[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
            z[o + 16..o + 20].copy_from_slice(&kind.to_le_bytes());
        };
        put(0, 0, 0x9fc00, 1);
        put(1, 0x10_0000, 0x1ff0_0000, 1);
        z
    }

    #[test]
    fn zero_page_fields() {
        let bp = BootParams::from_bytes(zero_page());
        assert!(bp.has_setup_header());
        assert_eq!(bp.cmd_line_ptr(), 0x1_0002_0000);
        assert_eq!(
            bp.e820().unwrap(),
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 0x1ff0_0000,
                    kind: 1
                }
            ]
        );
        let mut z = zero_page();
        z[E820_ENTRIES_OFFSET] = 129;
        assert_eq!(
            BootParams::from_bytes(z).e820(),
            Err(BootParamsError::TooManyE820(129))
        );
    }

    fn kho() -> KhoData {
        KhoData {
            fdt_addr: 0x5000,
            fdt_size: 4096,
            scratch_addr: 0x6000,
            scratch_size: 32,
        }
    }

    #[test]
    fn finds_kho_after_other_records() {
        let mut m = VecMemory::zeroed(0, 0x10000);
        let mut z = zero_page();
        z[SETUP_DATA_OFFSET..SETUP_DATA_OFFSET + 8].copy_from_slice(&0x2000u64.to_le_bytes());
        m.write(0x1000, &z).unwrap();
        m.write(0x2000, &encode_setup_data(0x3000, 9, &[0xaa; 32]))
            .unwrap();
        m.write(
            0x3000,
            &encode_setup_data(0, SETUP_KEXEC_KHO, &kho_data_bytes(&kho())),
        )
        .unwrap();
        let bp = BootParams::read(&m, 0x1000).unwrap();
        assert_eq!(bp.setup_data(), 0x2000);
        let list = setup_data_list(&m, bp.setup_data()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[1],
            SetupData {
                gpa: 0x3000,
                kind: 10,
                len: 32
            }
        );
        assert_eq!(find_kho_data(&m, &list).unwrap(), Some(kho()));
        assert_eq!(find_kho_data(&m, &list[..1]).unwrap(), None);
    }

    #[test]
    fn list_errors() {
        let mut m = VecMemory::zeroed(0, 0x10000);
        m.write(0x2000, &encode_setup_data(0x3000, 1, &[])).unwrap();
        m.write(0x3000, &encode_setup_data(0x2000, 1, &[])).unwrap();
        assert_eq!(
            setup_data_list(&m, 0x2000),
            Err(BootParamsError::Cycle(0x2000))
        );
        m.write(0x3000, &encode_setup_data(0xffff_0000, 1, &[]))
            .unwrap();
        assert!(matches!(
            setup_data_list(&m, 0x2000),
            Err(BootParamsError::Mem(_))
        ));
        m.write(0x3000, &encode_setup_data(0, SETUP_KEXEC_KHO, &[0; 8]))
            .unwrap();
        let list = setup_data_list(&m, 0x2000).unwrap();
        assert_eq!(
            find_kho_data(&m, &list),
            Err(BootParamsError::ShortKho {
                gpa: 0x3000,
                len: 8
            })
        );
        // A long acyclic chain: 16-byte records back to back.
        let n = MAX_SETUP_DATA as u64 + 1;
        for i in 0..n {
            let next = if i + 1 == n { 0 } else { 0x4000 + (i + 1) * 16 };
            m.write(0x4000 + i * 16, &encode_setup_data(next, 1, &[]))
                .unwrap();
        }
        assert_eq!(setup_data_list(&m, 0x4000), Err(BootParamsError::TooLong));
    }
}
