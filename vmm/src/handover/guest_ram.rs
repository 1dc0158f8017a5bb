//! Guest memory as the handover parsers read it: live, through vm-memory.

use luo_handover::mem::{GuestMemoryRead, GuestRam, MemError};
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_reads_are_bounded() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        mem.write_slice(b"after!", GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 6];
        LiveRam(&mem).read_at(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"after!");
        assert!(LiveRam(&mem).read_at(0x1ffe, &mut b).is_err());
        assert!(LiveRam(&mem).read_at(0x5000, &mut b).is_err());
        assert_eq!(
            LiveRam(&mem).ram().map(|r| r.ranges().to_vec()),
            Some(vec![(0, 0x2000)])
        );
    }
}
