//! What one parse of a guest's handover may cost the VMM, and where the guest may point.
//!
//! The guest writes the handover metadata, so a hostile guest chooses every count, pointer
//! and length in it. Structural checks alone (no cycles, counts that fit their blocks) still
//! let a few guest pages fan out into billions of records: one folio array listed 65536 times,
//! a million one-page runs labelled by 64 subtrees, 512 KiB property names copied 40,000
//! times. A [`Budget`] closes the whole kind: one per parse ([`crate::Handover::read`]), sized
//! from guest RAM, charged by every parser:
//!
//! * **pages**: guest pages read (radix nodes, block pages, folio arrays, FDT, ...);
//! * **records**: entries kept (radix runs, sessions, files, folios, FDT nodes and properties,
//!   metadata page addresses);
//! * **bytes**: variable-sized bytes kept (names, compatibles, property values).
//!
//! The budget also holds the [`GuestRam`] map: extents and arrays named by the guest must lie
//! inside it ([`Budget::check_ram`]). A parse that runs out, or meets an address outside RAM,
//! stops with a [`BudgetError`]; the work done (and so the host memory and time spent) is at
//! most what the limits allow, whatever the guest wrote.

use std::cell::Cell;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mem::{GuestMemoryRead, GuestRam, DEFAULT_RAM_BYTES, PAGE_SHIFT};

/// A resource a [`Budget`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resource {
    /// Guest pages read.
    Pages,
    /// Records kept.
    Records,
    /// Variable-sized bytes kept.
    Bytes,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Pages => "guest pages read",
            Resource::Records => "records kept",
            Resource::Bytes => "bytes kept",
        })
    }
}

/// Errors from charging a [`Budget`] or checking an address against guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BudgetError {
    /// The parse needed more of `resource` than its budget allows.
    #[error("handover parse budget exhausted: more than {limit} {resource}")]
    Exhausted {
        /// What ran out.
        resource: Resource,
        /// The limit.
        limit: u64,
    },
    /// The guest names memory that is not guest RAM.
    #[error("{what} at {start:#x}+{len:#x} is not guest RAM")]
    OutsideRam {
        /// What the guest named (a radix run, a subtree blob, a memfd folio, ...).
        what: &'static str,
        /// First byte.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Amounts of each [`Resource`]: a budget's limits, or what a parse used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Guest pages read (a read of `n` bytes counts `ceil(n / 4096)`; an unaligned one may
    /// touch one more page than it counts).
    pub pages: u64,
    /// Records kept.
    pub records: u64,
    /// Variable-sized bytes kept.
    pub bytes: u64,
}

impl Usage {
    /// Limits for a guest with `ram_bytes` of RAM, generous for any real handover:
    ///
    /// * pages: `ram_pages / 64 + 4096` (all of RAM in order-0 memfd folios needs
    ///   `ram_pages / 256` pages of folio arrays, plus one radix bitmap per 128 MiB);
    /// * records: `2 * ram_pages + 65536` (a page is in at most one radix run and one folio);
    /// * bytes: `ram_bytes / 1024 + 16 MiB` (names and FDT values; the FDT is at most 1 MiB).
    ///
    /// A record costs the host at most ~64 bytes, so a parse keeps at most about
    /// `64 * records + bytes` host bytes: ~1/32 of guest RAM, plus 20 MiB.
    pub fn for_ram(ram_bytes: u64) -> Self {
        let ram_pages = ram_bytes >> PAGE_SHIFT;
        Usage {
            pages: ram_pages / 64 + 4096,
            records: ram_pages.saturating_mul(2).saturating_add(1 << 16),
            bytes: ram_bytes / 1024 + (16 << 20),
        }
    }
}

/// One parse's budget and the guest's RAM map. Charged through `&self` (a `Cell` inside), so
/// that one budget can be shared by every reader of a parse; not `Sync`.
#[derive(Debug, Clone)]
pub struct Budget {
    ram: GuestRam,
    limits: Usage,
    used: Cell<Usage>,
}

impl Budget {
    /// A budget with explicit `limits` over `ram`.
    pub fn new(ram: GuestRam, limits: Usage) -> Self {
        Budget {
            ram,
            limits,
            used: Cell::new(Usage::default()),
        }
    }

    /// The budget of a guest with `ram`: [`Usage::for_ram`] of its size.
    pub fn for_ram(ram: GuestRam) -> Self {
        let limits = Usage::for_ram(ram.bytes());
        Self::new(ram, limits)
    }

    /// The budget for reading `mem`: from [`GuestMemoryRead::ram`], or, when the reader does
    /// not know its RAM, [`GuestRam::unknown`] with the limits of a [`DEFAULT_RAM_BYTES`] guest.
    pub fn for_memory(mem: &(impl GuestMemoryRead + ?Sized)) -> Self {
        match mem.ram() {
            Some(ram) => Self::for_ram(ram),
            None => Self::new(GuestRam::unknown(), Usage::for_ram(DEFAULT_RAM_BYTES)),
        }
    }

    /// The limits.
    pub fn limits(&self) -> Usage {
        self.limits
    }

    /// What has been charged so far.
    pub fn used(&self) -> Usage {
        self.used.get()
    }

    /// The guest's RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn charge(&self, resource: Resource, n: u64) -> Result<(), BudgetError> {
        let mut used = self.used.get();
        let (slot, limit) = match resource {
            Resource::Pages => (&mut used.pages, self.limits.pages),
            Resource::Records => (&mut used.records, self.limits.records),
            Resource::Bytes => (&mut used.bytes, self.limits.bytes),
        };
        match slot.checked_add(n).filter(|&total| total <= limit) {
            Some(total) => {
                *slot = total;
                self.used.set(used);
                Ok(())
            }
            None => Err(BudgetError::Exhausted { resource, limit }),
        }
    }

    /// Charges a read of `len` bytes: `ceil(len / 4096)` pages.
    pub fn read(&self, len: usize) -> Result<(), BudgetError> {
        let pages = (len as u64).div_ceil(1 << PAGE_SHIFT);
        self.charge(Resource::Pages, pages)
    }

    /// Charges `n` records kept.
    pub fn records(&self, n: u64) -> Result<(), BudgetError> {
        self.charge(Resource::Records, n)
    }

    /// Charges `n` bytes kept.
    pub fn bytes(&self, n: usize) -> Result<(), BudgetError> {
        self.charge(Resource::Bytes, n as u64)
    }

    /// Checks that `[start, start + len)` is guest RAM; `what` names it in the error.
    pub fn check_ram(&self, what: &'static str, start: u64, len: u64) -> Result<(), BudgetError> {
        if self.ram.contains(start, len) {
            Ok(())
        } else {
            Err(BudgetError::OutsideRam { what, start, len })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{SparseMemory, VecMemory};

    #[test]
    fn charges_until_the_limit_and_not_past_it() {
        let limits = Usage {
            pages: 2,
            records: 10,
            bytes: 100,
        };
        let b = Budget::new(GuestRam::new([(0, 1 << 20)]), limits);
        b.read(4097).unwrap();
        assert_eq!(
            b.read(1),
            Err(BudgetError::Exhausted {
                resource: Resource::Pages,
                limit: 2
            })
        );
        b.records(10).unwrap();
        assert!(b.records(1).is_err());
        assert!(b.bytes(101).is_err(), "a refused charge is not recorded");
        b.bytes(100).unwrap();
        assert_eq!(
            b.used(),
            Usage {
                pages: 2,
                records: 10,
                bytes: 100
            }
        );
        assert!(b.records(u64::MAX).is_err());
        assert_eq!(b.used().records, 10);
    }

    #[test]
    fn checks_ram() {
        let b = Budget::for_memory(&VecMemory::zeroed(0x1000, 0x1000));
        b.check_ram("blob", 0x1000, 0x1000).unwrap();
        assert_eq!(
            b.check_ram("blob", 0, u64::MAX),
            Err(BudgetError::OutsideRam {
                what: "blob",
                start: 0,
                len: u64::MAX
            })
        );
        assert!(b.check_ram("blob", 0x1800, 0x1000).is_err());
    }

    #[test]
    fn sized_from_ram() {
        let b = Budget::for_memory(&SparseMemory::new(0, 1 << 30));
        assert_eq!(
            b.limits(),
            Usage {
                pages: (1 << 18) / 64 + 4096,
                records: (1 << 19) + (1 << 16),
                bytes: (1 << 20) + (16 << 20),
            }
        );
        struct Opaque;
        impl GuestMemoryRead for Opaque {
            fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), crate::mem::MemError> {
                Err(crate::mem::MemError::OutOfRange {
                    gpa,
                    len: buf.len() as u64,
                })
            }
        }
        let b = Budget::for_memory(&Opaque);
        assert_eq!(b.limits(), Usage::for_ram(DEFAULT_RAM_BYTES));
        assert_eq!(b.ram(), &GuestRam::unknown());
    }
}
