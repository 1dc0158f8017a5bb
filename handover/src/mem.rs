//! Reading guest-physical memory.
//!
//! Every parser in this crate reads the guest through [`GuestMemoryRead`], so the same code
//! runs on a live VM (the VMM implements the trait over `vm-memory`), on a RAM dump, and on the
//! byte buffers of the unit tests, benches and fuzz target ([`VecMemory`], [`SparseMemory`]).
//!
//! All multi-byte values of the handover ABIs are little-endian (x86 CPU byte order).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

/// Size of a guest page (x86 base page).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// [`PAGE_SIZE`] as a host buffer length.
pub const PAGE_BYTES: usize = 4096;
const _: () = assert!(PAGE_BYTES as u64 == PAGE_SIZE);

#[cfg(not(target_pointer_width = "64"))]
compile_error!("luo-handover holds 64-bit guest lengths in host buffers: it needs a 64-bit host");

/// A guest length or offset as a host `usize`: lossless, since the host is 64-bit
/// (checked at compile time above).
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits wide: see the compile_error above.
pub const fn to_usize(v: u64) -> usize {
    v as usize
}

/// Errors from reading guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemError {
    /// `[gpa, gpa + len)` is not (entirely) backed by guest memory.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// First byte asked for.
        gpa: u64,
        /// Number of bytes asked for.
        len: u64,
    },
}

/// Read access to guest-physical memory.
pub trait GuestMemoryRead {
    /// Fills `buf` with the guest bytes at `[gpa, gpa + buf.len())`.
    ///
    /// Fails, without a partial guarantee on `buf`, when any byte of the range is not backed.
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// The guest's RAM, if this reader knows it. Parsers size their
    /// [`Budget`](crate::budget::Budget) from it and check that every extent and array the
    /// guest names lies inside it. `None` (the default) means unknown: the parse then uses
    /// [`GuestRam::unknown`] and the budget of a [`DEFAULT_RAM_BYTES`] guest.
    fn ram(&self) -> Option<GuestRam> {
        None
    }

    /// Calls `visit` with the guest bytes `[gpa, gpa + len)`, in order, in one or more
    /// pieces: lent in place where the reader can (a digest then reads guest memory once),
    /// else (the default) copied through [`Self::read_at`] [`VISIT_CHUNK`] bytes at a time
    /// into one buffer of at most that size.
    ///
    /// Fails when any byte of the range is not backed; `visit` may have seen a prefix.
    fn visit(&self, gpa: u64, len: u64, visit: &mut dyn FnMut(&[u8])) -> Result<(), MemError> {
        visit_by_copy(self, gpa, len, visit)
    }
}

/// [`GuestMemoryRead::visit`] through [`GuestMemoryRead::read_at`]: `[gpa, gpa + len)`
/// copied [`VISIT_CHUNK`] bytes at a time into one buffer.
pub fn visit_by_copy(
    mem: &(impl GuestMemoryRead + ?Sized),
    gpa: u64,
    len: u64,
    visit: &mut dyn FnMut(&[u8]),
) -> Result<(), MemError> {
    let mut buf = vec![0u8; to_usize(len.min(VISIT_CHUNK as u64))];
    let mut at = 0u64;
    while at < len {
        let n = to_usize((len - at).min(VISIT_CHUNK as u64));
        let chunk = buf.get_mut(..n).unwrap_or_default();
        mem.read_at(gpa.saturating_add(at), chunk)?;
        visit(chunk);
        at += n as u64;
    }
    Ok(())
}

/// Bytes copied per [`GuestMemoryRead::read_at`] by the default
/// [`GuestMemoryRead::visit`]: small enough to stay in the L2 cache.
pub const VISIT_CHUNK: usize = 64 * 1024;

impl<M: GuestMemoryRead + ?Sized> GuestMemoryRead for &M {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read_at(gpa, buf)
    }

    fn visit(&self, gpa: u64, len: u64, visit: &mut dyn FnMut(&[u8])) -> Result<(), MemError> {
        (**self).visit(gpa, len, visit)
    }

    fn ram(&self) -> Option<GuestRam> {
        (**self).ram()
    }
}

/// Highest guest-physical address bit x86-64 can name (`MAX_PHYSMEM_BITS` with 5-level paging).
pub const MAX_PHYS_BITS: u32 = 52;
/// Guest size a budget is sized for when the reader does not know its RAM: 64 GiB.
pub const DEFAULT_RAM_BYTES: u64 = 64 << 30;

/// Guest RAM: ascending, disjoint, non-empty `[start, end)` byte ranges (the VMM's memory
/// slots, e.g. `[0, 3 GiB)` and `[4 GiB, ...)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRam {
    ranges: Vec<(u64, u64)>,
}

impl GuestRam {
    /// RAM made of `ranges` (any order; empty ones dropped, overlapping ones merged).
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut v: Vec<(u64, u64)> = ranges.into_iter().filter(|(s, e)| s < e).collect();
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        GuestRam { ranges: merged }
    }

    /// What a reader that does not know its RAM stands for: every address x86-64 can name,
    /// `[0, 2^52)`. Still rejects the absurd (a blob of `u64::MAX` bytes).
    pub fn unknown() -> Self {
        Self::new([(0, 1 << MAX_PHYS_BITS)])
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Total bytes of RAM.
    pub fn bytes(&self) -> u64 {
        self.ranges
            .iter()
            .fold(0u64, |sum, (s, e)| sum.saturating_add(e - s))
    }

    /// Whether every byte of `[start, start + len)` is RAM (an empty range is, anywhere in or
    /// at the end of a range). O(log ranges).
    pub fn contains(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let i = self.ranges.partition_point(|&(_, e)| e < end.max(1));
        self.ranges
            .get(i)
            .is_some_and(|&(s, e)| s <= start && end <= e)
    }
}

/// Reads a little-endian `u64` at `gpa`.
pub fn read_u64_le(mem: &(impl GuestMemoryRead + ?Sized), gpa: u64) -> Result<u64, MemError> {
    read_array(mem, gpa).map(u64::from_le_bytes)
}

/// Reads a little-endian `u32` at `gpa`.
pub fn read_u32_le(mem: &(impl GuestMemoryRead + ?Sized), gpa: u64) -> Result<u32, MemError> {
    read_array(mem, gpa).map(u32::from_le_bytes)
}

/// Reads `N` bytes at `gpa`.
pub fn read_array<const N: usize>(
    mem: &(impl GuestMemoryRead + ?Sized),
    gpa: u64,
) -> Result<[u8; N], MemError> {
    let mut buf = [0u8; N];
    mem.read_at(gpa, &mut buf)?;
    Ok(buf)
}

/// Reads `len` bytes at `gpa` into a new vector; `len` must already be validated by the caller.
pub fn read_vec(
    mem: &(impl GuestMemoryRead + ?Sized),
    gpa: u64,
    len: usize,
) -> Result<Vec<u8>, MemError> {
    let mut buf = vec![0u8; len];
    mem.read_at(gpa, &mut buf)?;
    Ok(buf)
}

/// Little-endian field accessors over a byte slice that never panic: out-of-bounds reads are
/// `None`. Used on structures already copied out of the guest.
pub(crate) trait LeBytes {
    /// The `u64` at `off`, if the slice holds it.
    fn u64_at(&self, off: usize) -> Option<u64>;
    /// The `u32` at `off`, if the slice holds it.
    fn u32_at(&self, off: usize) -> Option<u32>;
    /// The `u16` at `off`, if the slice holds it.
    fn u16_at(&self, off: usize) -> Option<u16>;
}

impl LeBytes for [u8] {
    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.get(off..off.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }
    fn u16_at(&self, off: usize) -> Option<u16> {
        let b = self.get(off..off.checked_add(2)?)?;
        Some(u16::from_le_bytes(b.try_into().ok()?))
    }
}

/// A NUL-terminated (or NUL-padded) C string inside a fixed-size field, lossily decoded.
pub(crate) fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or_default()).into_owned()
}

/// Whether `[gpa, gpa+len)` lies inside `[base, base+size)`, without overflow.
fn within(base: u64, size: u64, gpa: u64, len: u64) -> Option<u64> {
    let off = gpa.checked_sub(base)?;
    let end = off.checked_add(len)?;
    (end <= size).then_some(off)
}

/// Guest memory backed by one contiguous byte vector mapped at `base`.
#[derive(Debug, Clone, Default)]
pub struct VecMemory {
    base: u64,
    bytes: Vec<u8>,
}

impl VecMemory {
    /// `bytes` become guest memory at `[base, base + bytes.len())`.
    pub fn new(base: u64, bytes: Vec<u8>) -> Self {
        VecMemory { base, bytes }
    }

    /// Zeroed guest memory of `size` bytes at `base`.
    pub fn zeroed(base: u64, size: usize) -> Self {
        Self::new(base, vec![0; size])
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        let off = within(self.base, self.bytes.len() as u64, gpa, len)
            .ok_or(MemError::OutOfRange { gpa, len })?;
        let off = to_usize(off);
        self.bytes
            .get_mut(off..off + data.len())
            .ok_or(MemError::OutOfRange { gpa, len })?
            .copy_from_slice(data);
        Ok(())
    }

    /// The backing bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl GuestMemoryRead for VecMemory {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        let err = MemError::OutOfRange { gpa, len };
        let off = within(self.base, self.bytes.len() as u64, gpa, len)
            .ok_or(err.clone())
            .map(to_usize)?;
        buf.copy_from_slice(self.bytes.get(off..off + buf.len()).ok_or(err)?);
        Ok(())
    }

    /// Lends the bytes in place, in one piece.
    fn visit(&self, gpa: u64, len: u64, visit: &mut dyn FnMut(&[u8])) -> Result<(), MemError> {
        let err = MemError::OutOfRange { gpa, len };
        let off = within(self.base, self.bytes.len() as u64, gpa, len)
            .ok_or(err.clone())
            .map(to_usize)?;
        visit(self.bytes.get(off..off + to_usize(len)).ok_or(err)?);
        Ok(())
    }

    fn ram(&self) -> Option<GuestRam> {
        Some(GuestRam::new([(
            self.base,
            self.base.saturating_add(self.bytes.len() as u64),
        )]))
    }
}

/// A large guest address space `[base, base + size)` of which only written pages take host
/// memory; unwritten pages read as zeros, like fresh guest RAM. Used to lay out KHO state of
/// 64 GiB guests in tests and benches.
#[derive(Debug, Clone, Default)]
pub struct SparseMemory {
    base: u64,
    size: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl SparseMemory {
    /// An all-zero guest address space of `size` bytes starting at `base` (page-aligned).
    pub fn new(base: u64, size: u64) -> Self {
        SparseMemory {
            base,
            size,
            pages: BTreeMap::new(),
        }
    }

    /// Number of pages that hold host memory.
    pub fn resident_pages(&self) -> usize {
        self.pages.len()
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        within(self.base, self.size, gpa, len).ok_or(MemError::OutOfRange { gpa, len })?;
        let mut done = 0usize;
        while done < data.len() {
            let at = gpa + done as u64;
            let in_page = (at % PAGE_SIZE) as usize;
            let n = (PAGE_BYTES - in_page).min(data.len() - done);
            let page = self
                .pages
                .entry(at / PAGE_SIZE)
                .or_insert_with(|| vec![0u8; PAGE_BYTES].into_boxed_slice());
            if let (Some(dst), Some(src)) =
                (page.get_mut(in_page..in_page + n), data.get(done..done + n))
            {
                dst.copy_from_slice(src);
            }
            done += n;
        }
        Ok(())
    }
}

impl GuestMemoryRead for SparseMemory {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        within(self.base, self.size, gpa, len).ok_or(MemError::OutOfRange { gpa, len })?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let in_page = (at % PAGE_SIZE) as usize;
            let n = (PAGE_BYTES - in_page).min(buf.len() - done);
            if let Some(dst) = buf.get_mut(done..done + n) {
                match self.pages.get(&(at / PAGE_SIZE)) {
                    Some(page) => {
                        dst.copy_from_slice(page.get(in_page..in_page + n).unwrap_or_default())
                    }
                    None => dst.fill(0),
                }
            }
            done += n;
        }
        Ok(())
    }

    fn ram(&self) -> Option<GuestRam> {
        Some(GuestRam::new([(
            self.base,
            self.base.saturating_add(self.size),
        )]))
    }
}

/// Wraps guest memory and remembers every page read through it, so that the pages a
/// handover reader needed can be saved as a small fixture ([`RecordingMemory::page_dump`]) and
/// replayed later ([`SparseMemory::from_page_dump`]).
#[derive(Debug)]
pub struct RecordingMemory<M> {
    inner: M,
    pages: RefCell<BTreeSet<u64>>,
}

/// Magic at the start of a page dump.
pub const PAGE_DUMP_MAGIC: &[u8; 8] = b"LUOPGDMP";

/// Errors from decoding a page dump.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DumpError {
    /// Wrong magic, truncated, or a record that does not fit the address space.
    #[error("bad page dump: {0}")]
    Malformed(&'static str),
    /// A page lies outside the address space given to the loader.
    #[error(transparent)]
    Mem(#[from] MemError),
}

impl<M: GuestMemoryRead> RecordingMemory<M> {
    /// Starts recording reads of `inner`.
    pub fn new(inner: M) -> Self {
        RecordingMemory {
            inner,
            pages: RefCell::new(BTreeSet::new()),
        }
    }

    /// Page addresses read so far, ascending.
    pub fn pages(&self) -> Vec<u64> {
        self.pages.borrow().iter().copied().collect()
    }

    /// The pages read so far, re-read from the inner memory, as a dump:
    /// `"LUOPGDMP"`, `u64` count, then per page `u64` address + 4096 bytes (little-endian).
    /// Pages that cannot be read whole are left out.
    pub fn page_dump(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_BYTES];
        let mut records = Vec::new();
        for gpa in self.pages() {
            if self.inner.read_at(gpa, &mut page).is_ok() {
                records.extend_from_slice(&gpa.to_le_bytes());
                records.extend_from_slice(&page);
            }
        }
        let count = (records.len() / (8 + PAGE_BYTES)) as u64;
        let mut out = PAGE_DUMP_MAGIC.to_vec();
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&records);
        out
    }
}

impl<M: GuestMemoryRead> GuestMemoryRead for RecordingMemory<M> {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read_at(gpa, buf)?;
        if let Some(last) = gpa.checked_add(buf.len().max(1) as u64 - 1) {
            let mut pages = self.pages.borrow_mut();
            let mut p = gpa & !(PAGE_SIZE - 1);
            while p <= last {
                pages.insert(p);
                match p.checked_add(PAGE_SIZE) {
                    Some(n) => p = n,
                    None => break,
                }
            }
        }
        Ok(())
    }

    fn ram(&self) -> Option<GuestRam> {
        self.inner.ram()
    }
}

impl SparseMemory {
    /// Loads a [`RecordingMemory::page_dump`] into a `size`-byte address space at `base`.
    pub fn from_page_dump(base: u64, size: u64, dump: &[u8]) -> Result<Self, DumpError> {
        let body = dump
            .strip_prefix(PAGE_DUMP_MAGIC.as_slice())
            .ok_or(DumpError::Malformed("no LUOPGDMP magic"))?;
        let count = body
            .u64_at(0)
            .ok_or(DumpError::Malformed("no page count"))?;
        let records = body.get(8..).unwrap_or_default();
        let rec = 8 + PAGE_BYTES;
        if records.len() % rec != 0 || (records.len() / rec) as u64 != count {
            return Err(DumpError::Malformed("length does not match the page count"));
        }
        let mut mem = SparseMemory::new(base, size);
        for r in records.chunks_exact(rec) {
            let gpa = r.u64_at(0).ok_or(DumpError::Malformed("record"))?;
            mem.write(gpa, r.get(8..).unwrap_or_default())?;
        }
        Ok(mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visit_lends_or_copies_the_same_bytes_in_order() {
        let len = 3 * VISIT_CHUNK as u64 + 17;
        let vec = VecMemory::new(0x1000, (0..len + 10).map(|i| (i % 251) as u8).collect());
        let mut sparse = SparseMemory::new(0, 1 << 20);
        sparse.write(0x1000, vec.as_bytes()).unwrap();
        let collect = |m: &dyn GuestMemoryRead| {
            let (mut bytes, mut pieces) = (Vec::new(), 0);
            m.visit(0x1003, len, &mut |p| {
                bytes.extend_from_slice(p);
                pieces += 1;
            })
            .map(|()| (bytes, pieces))
        };
        let (lent, one) = collect(&vec).unwrap();
        let (copied, four) = collect(&sparse).unwrap();
        assert_eq!((one, four), (1, 4));
        assert_eq!(lent, copied);
        assert_eq!(&lent[..], &vec.as_bytes()[3..3 + to_usize(len)]);
        assert!(vec.visit(0x1000 + len, 11, &mut |_| ()).is_err());
        assert!(sparse.visit((1 << 20) - 1, 2, &mut |_| ()).is_err());
    }

    #[test]
    fn recording_memory_dumps_what_was_read_and_replays_it() {
        let mut m = VecMemory::zeroed(0, 0x10000);
        m.write(0x2ff8, &7u64.to_le_bytes()).unwrap();
        m.write(0x3000, &9u64.to_le_bytes()).unwrap();
        let rec = RecordingMemory::new(&m);
        let mut b = [0u8; 16];
        rec.read_at(0x2ff8, &mut b).unwrap(); // spans two pages
        assert!(rec.read_at(0xfff8, &mut b).is_err()); // failed reads are not recorded
        assert_eq!(read_u64_le(&rec, 0x8000).unwrap(), 0);
        assert_eq!(rec.pages(), vec![0x2000, 0x3000, 0x8000]);
        let dump = rec.page_dump();
        assert_eq!(dump.len(), 16 + 3 * (8 + 4096));
        let back = SparseMemory::from_page_dump(0, 0x10000, &dump).unwrap();
        assert_eq!(read_u64_le(&back, 0x2ff8).unwrap(), 7);
        assert_eq!(read_u64_le(&back, 0x3000).unwrap(), 9);
        assert_eq!(back.resident_pages(), 3);
        assert!(matches!(
            SparseMemory::from_page_dump(0, 0x10000, &dump[..100]),
            Err(DumpError::Malformed(_))
        ));
        assert!(matches!(
            SparseMemory::from_page_dump(0, 0x10000, b"nope"),
            Err(DumpError::Malformed(_))
        ));
        assert!(matches!(
            SparseMemory::from_page_dump(0, 0x4000, &dump),
            Err(DumpError::Mem(_))
        ));
    }

    #[test]
    fn vec_memory_reads_inside_and_rejects_outside() {
        let mut m = VecMemory::zeroed(0x1000, 0x2000);
        m.write(0x1ff8, &0x1122_3344_5566_7788u64.to_le_bytes())
            .unwrap();
        assert_eq!(read_u64_le(&m, 0x1ff8).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(read_u32_le(&m, 0x1ffc).unwrap(), 0x1122_3344);
        assert!(read_u64_le(&m, 0x2ffc).is_err());
        assert!(read_u64_le(&m, 0xff8).is_err());
        assert!(read_u64_le(&m, u64::MAX - 3).is_err());
        assert!(m.write(0x2fff, &[1, 2]).is_err());
    }

    #[test]
    fn sparse_memory_spans_pages_and_reads_zero_elsewhere() {
        let mut m = SparseMemory::new(0, 64 << 30);
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        m.write((8 << 30) - 100, &data).unwrap();
        assert_eq!(read_vec(&m, (8 << 30) - 100, data.len()).unwrap(), data);
        assert_eq!(m.resident_pages(), 4);
        assert_eq!(read_u64_le(&m, 4 << 30).unwrap(), 0);
        assert!(read_u64_le(&m, (64 << 30) - 4).is_err());
        assert!(m.write(u64::MAX, &[0]).is_err());
    }

    #[test]
    fn guest_ram_merges_and_contains() {
        let ram = GuestRam::new([(4 << 30, 5 << 30), (0, 0x1000), (0x1000, 3 << 30), (7, 7)]);
        assert_eq!(ram.ranges(), &[(0, 3 << 30), (4 << 30, 5 << 30)]);
        assert_eq!(ram.bytes(), 4 << 30);
        assert!(ram.contains(0, 3 << 30) && ram.contains(4 << 30, 1 << 30));
        assert!(ram.contains(3 << 30, 0), "an empty range at the end of RAM");
        assert!(!ram.contains((3 << 30) - 1, 2), "spans the hole");
        assert!(!ram.contains(0, u64::MAX) && !ram.contains(u64::MAX, 1));
        assert!(!ram.contains(5 << 30, 1));
        assert!(GuestRam::unknown().contains(0, 1 << 40));
        assert!(!GuestRam::unknown().contains(0, u64::MAX));
        assert_eq!(
            VecMemory::zeroed(0x1000, 0x2000).ram(),
            Some(GuestRam::new([(0x1000, 0x3000)]))
        );
        assert_eq!(
            RecordingMemory::new(SparseMemory::new(0, 1 << 30)).ram(),
            Some(GuestRam::new([(0, 1 << 30)]))
        );
    }

    #[test]
    fn le_bytes_never_panics() {
        let b = [1u8, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(b.u64_at(0), Some(1));
        assert_eq!(b.u64_at(2), None);
        assert_eq!(b.u32_at(usize::MAX), None);
        assert_eq!(b.u16_at(7), Some(0x200));
        assert_eq!(c_string(b"memfd-v2\0\0junk"), "memfd-v2");
        assert_eq!(c_string(b"no-nul"), "no-nul");
    }
}
