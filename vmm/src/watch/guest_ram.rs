//! Guest memory as the handover parsers read it: live, through vm-memory.

use luo_handover::mem::{to_usize, visit_by_copy, GuestMemoryRead, GuestRam, MemError};
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

    /// Lends the bytes in place when the range lies in one region (a digest then reads
    /// guest memory once, at memory speed), else copies them ([`visit_by_copy`]).
    fn visit(&self, gpa: u64, len: u64, visit: &mut dyn FnMut(&[u8])) -> Result<(), MemError> {
        let Ok(slice) = self.0.get_slice(GuestAddress(gpa), to_usize(len)) else {
            return visit_by_copy(self, gpa, len, visit);
        };
        let guard = slice.ptr_guard();
        // No guest CPU writes these bytes meanwhile: luo-vmm calls this from a hook with the
        // vCPU that runs the kernel stopped, when no other guest CPU runs (`machine_kexec()`
        // is entered after `stop_other_cpus()`; at `start_kernel` the next kernel has not
        // started its APs), and it emulates no DMA device.
        // SAFETY: `get_slice` checked that `[gpa, gpa + len)` lies in one region, mapped
        // readable while `self.0` is borrowed (the whole call); `guard` keeps the pointer
        // valid; `u8` has no invalid values; nothing writes them concurrently (above).
        let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
        visit(bytes);
        Ok(())
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
        let mut seen = Vec::new();
        LiveRam(&mem)
            .visit(0x1000, 6, &mut |p| seen.extend_from_slice(p))
            .unwrap();
        assert_eq!(seen, b"after!");
        assert!(LiveRam(&mem).visit(0x1ffe, 6, &mut |_| ()).is_err());
        assert!(LiveRam(&mem).read_at(0x5000, &mut b).is_err());
        assert_eq!(
            LiveRam(&mem).ram().map(|r| r.ranges().to_vec()),
            Some(vec![(0, 0x2000)])
        );
    }
}
