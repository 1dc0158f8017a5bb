//! Guest memory: the supported sizes, the RAM map around the 32-bit MMIO hole, and the
//! vm-memory backing.

use luo_handover::mem::to_usize;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::machine::layout::{
    EBDA_START, HIGH_RAM_START, HIMEM_START, LOW_RAM_END, MAX_MEM_SIZE, MIN_MEM_SIZE,
    MMIO_HOLE_START,
};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size is outside what we support.
    #[error("memory size {size} bytes is out of range: luo-vmm needs at least {} MiB and at most {} GiB", MIN_MEM_SIZE >> 20, MAX_MEM_SIZE >> 30)]
    OutOfRange {
        /// The size asked for.
        size: u64,
    },
    /// The host could not map the memory.
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Mmap {
        /// The size asked for.
        size: u64,
        /// What vm-memory said.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Checks that `size` is a guest size we support.
pub fn validate_size(size: u64) -> Result<u64, MemoryError> {
    if (MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(MemoryError::OutOfRange { size })
    }
}

/// What a range of guest-physical address space holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    /// Usable RAM.
    Ram,
    /// RAM the guest must not use (EBDA with the MP table).
    Reserved,
}

/// A range of guest-physical address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it holds.
    pub kind: RangeKind,
}

impl MemoryRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The RAM slots backing a guest of `mem_size` bytes: everything below the MMIO hole,
/// and the rest from 4 GiB up.
pub fn ram_slots(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut slots = vec![(0, low)];
    if mem_size > low {
        slots.push((HIGH_RAM_START, mem_size - low));
    }
    slots
}

/// The memory map the guest is told about (e820 or the PVH memmap): conventional memory
/// up to the EBDA, the EBDA reserved, then RAM from 1 MiB, skipping the MMIO hole.
/// The 0xa0000..0x100000 legacy hole is simply absent.
pub fn guest_memory_map(mem_size: u64) -> Vec<MemoryRange> {
    let mut map = vec![
        MemoryRange {
            start: 0,
            size: EBDA_START,
            kind: RangeKind::Ram,
        },
        MemoryRange {
            start: EBDA_START,
            size: LOW_RAM_END - EBDA_START,
            kind: RangeKind::Reserved,
        },
    ];
    for (start, size) in ram_slots(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push(MemoryRange {
                start,
                size: end - start,
                kind: RangeKind::Ram,
            });
        }
    }
    map
}

/// Maps anonymous host memory for every RAM slot.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = ram_slots(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), to_usize(size)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Mmap {
        size: mem_size,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_range() {
        assert!(validate_size(1024).is_err());
        assert!(validate_size(512 << 20).is_ok());
        assert!(validate_size(2 << 40).is_err());
    }

    #[test]
    fn small_guest_has_one_slot_and_no_high_ram() {
        assert_eq!(ram_slots(512 << 20), vec![(0, 512 << 20)]);
        let map = guest_memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].start, HIMEM_START);
        assert_eq!(map[2].end(), 512 << 20);
        assert!(map.iter().all(|r| r.end() <= 512 << 20));
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let size = 8u64 << 30;
        let slots = ram_slots(size);
        assert_eq!(
            slots,
            vec![
                (0, MMIO_HOLE_START),
                (HIGH_RAM_START, size - MMIO_HOLE_START)
            ]
        );
        let map = guest_memory_map(size);
        let ram: u64 = map
            .iter()
            .filter(|r| r.kind == RangeKind::Ram)
            .map(|r| r.size)
            .sum();
        // All RAM is reported except the EBDA and the 0xa0000..1MiB legacy hole.
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        assert!(!map
            .iter()
            .any(|r| r.start < HIGH_RAM_START && r.end() > MMIO_HOLE_START));
        // Sorted and non-overlapping.
        assert!(map.windows(2).all(|w| w[0].end() <= w[1].start));
    }
}
