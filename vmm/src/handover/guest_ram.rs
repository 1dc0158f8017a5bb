//! Guest memory as the handover parsers read it: live (through vm-memory) or a copy
//! taken at one instant.

use luo_handover::mem::{to_usize, GuestMemoryRead, GuestRam, MemError};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Live guest memory.
pub struct LiveRam<'a>(pub &'a GuestMemoryMmap);

impl GuestMemoryRead for LiveRam<'_> {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// The VM's memory regions: parses of the live guest are sized from them.
    fn ram(&self) -> Option<GuestRam> {
        Some(GuestRam::new(self.0.iter().map(|r| {
            let start = r.start_addr().raw_value();
            (start, start.saturating_add(r.len()))
        })))
    }
}

/// A copy of every RAM region, for comparing preserved extents before and after.
pub struct RamSnapshot {
    regions: Vec<(u64, Vec<u8>)>,
}

impl RamSnapshot {
    /// Copies all of guest RAM.
    pub fn take(memory: &GuestMemoryMmap) -> Self {
        let regions = memory
            .iter()
            .map(|r| {
                let base = r.start_addr().raw_value();
                let mut bytes = vec![0u8; to_usize(r.len())];
                // The region is exactly this long, so the read cannot fall outside it.
                let _ = memory.read_slice(&mut bytes, GuestAddress(base));
                (base, bytes)
            })
            .collect();
        Self { regions }
    }
}

impl GuestMemoryRead for RamSnapshot {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let out = MemError::OutOfRange {
            gpa,
            len: buf.len() as u64,
        };
        let (base, bytes) = self
            .regions
            .iter()
            .find(|(base, bytes)| gpa >= *base && gpa - base < bytes.len() as u64)
            .ok_or(out.clone())?;
        let off = to_usize(gpa - base);
        let src = bytes.get(off..off + buf.len()).ok_or(out)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_keeps_old_bytes_and_bounds_reads() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        mem.write_slice(b"before", GuestAddress(0x1000)).unwrap();
        let snap = RamSnapshot::take(&mem);
        mem.write_slice(b"after!", GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 6];
        snap.read_at(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"before");
        LiveRam(&mem).read_at(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"after!");
        assert!(snap.read_at(0x1ffe, &mut b).is_err());
        assert!(LiveRam(&mem).read_at(0x5000, &mut b).is_err());
        assert_eq!(
            LiveRam(&mem).ram().map(|r| r.ranges().to_vec()),
            Some(vec![(0, 0x2000)])
        );
    }
}
