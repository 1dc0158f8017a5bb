//! Guest RAM as it was when a snapshot was taken, kept sparsely: per memory region, the
//! indices of the 4 KiB pages that were not all zero and their bytes, one after another.
//! A reset writes back only the pages the guest wrote since (`restore_pages`, from KVM's
//! dirty log): O(pages written), flat in guest size. A VM built from a snapshot file gets
//! every kept page (`restore_all`); its fresh memory is zero everywhere else.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Bytes per page.
pub const PAGE: u64 = 4096;
const PAGE_USIZE: usize = 4096;
/// How much RAM is read at once while taking the image.
const CHUNK: usize = 2 << 20;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum MemoryImageError {
    /// Guest memory could not be read or written.
    #[error("guest memory at {gpa:#x}: {why}")]
    Access {
        /// The guest-physical address.
        gpa: u64,
        /// vm-memory's error.
        why: String,
    },
    /// An image whose layout is not this VM's, or that contradicts itself.
    #[error("the memory image does not fit: {0}")]
    Layout(String),
}

/// One memory region's kept pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical start.
    pub base: u64,
    /// Length in bytes (a multiple of [`PAGE`]).
    pub len: u64,
    /// Indices (from `base`, in pages) of the pages kept, strictly increasing.
    pub pages: Vec<u32>,
}

/// Guest RAM, sparse: the layout (which pages) and the bytes of every kept page, in the
/// layout's order (region by region).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage {
    /// Per region, in guest-physical order.
    pub layout: Vec<RegionLayout>,
    /// `PAGE` bytes per kept page.
    pub data: Vec<u8>,
}

fn access(gpa: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> MemoryImageError {
    move |e| MemoryImageError::Access {
        gpa,
        why: e.to_string(),
    }
}

impl MemoryImage {
    /// Copies every page of `memory` that is not all zero (every vCPU stopped).
    pub fn capture(memory: &GuestMemoryMmap) -> Result<Self, MemoryImageError> {
        let mut layout = Vec::new();
        let mut data = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        for region in memory.iter() {
            let base = region.start_addr().raw_value();
            let len = region.len();
            let mut pages = Vec::new();
            let mut off = 0u64;
            while off < len {
                let n = usize::try_from((len - off).min(CHUNK as u64)).unwrap_or(CHUNK);
                let chunk = &mut buf[..n];
                memory
                    .read_slice(chunk, GuestAddress(base + off))
                    .map_err(access(base + off))?;
                for (i, page) in chunk.chunks_exact(PAGE_USIZE).enumerate() {
                    if page.iter().any(|&b| b != 0) {
                        let index = (off / PAGE) + i as u64;
                        pages.push(u32::try_from(index).map_err(|_| {
                            MemoryImageError::Layout(format!(
                                "region at {base:#x} has more than 2^32 pages"
                            ))
                        })?);
                        data.extend_from_slice(page);
                    }
                }
                off += n as u64;
            }
            layout.push(RegionLayout { base, len, pages });
        }
        Ok(MemoryImage { layout, data })
    }

    /// Pages kept.
    pub fn pages(&self) -> usize {
        self.layout.iter().map(|r| r.pages.len()).sum()
    }

    /// Checks that the image is whole and fits `memory`: the same regions, page indices
    /// strictly increasing and inside their region, and [`PAGE`] bytes of data per page.
    /// What a file read from disk must pass before a byte of it reaches guest memory.
    pub fn check(&self, regions: &[(u64, u64)]) -> Result<(), MemoryImageError> {
        let bad = |s: String| Err(MemoryImageError::Layout(s));
        let have: Vec<(u64, u64)> = self.layout.iter().map(|r| (r.base, r.len)).collect();
        if have != regions {
            return bad(format!(
                "its regions {} are not this VM's {}",
                describe(&have),
                describe(regions)
            ));
        }
        for r in &self.layout {
            let limit = r.len / PAGE;
            if r.pages.windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("region {:#x}: page indices out of order", r.base));
            }
            if let Some(&last) = r.pages.last() {
                if u64::from(last) >= limit {
                    return bad(format!(
                        "region {:#x}: page {last} past its {limit} pages",
                        r.base
                    ));
                }
            }
        }
        let want = self.pages() as u64 * PAGE;
        if self.data.len() as u64 != want {
            return bad(format!(
                "{} bytes of page data for {} pages ({want} bytes)",
                self.data.len(),
                self.pages()
            ));
        }
        Ok(())
    }

    /// The kept bytes of the page at `gpa` (page-aligned), or `None` if it was zero.
    /// O(log pages).
    fn page(&self, gpa: u64) -> Option<&[u8]> {
        let mut before = 0usize;
        for r in &self.layout {
            if gpa >= r.base && gpa < r.base + r.len {
                let index = u32::try_from((gpa - r.base) / PAGE).ok()?;
                let at = r.pages.binary_search(&index).ok()?;
                let start = (before + at) * PAGE_USIZE;
                return self.data.get(start..start + PAGE_USIZE);
            }
            before += r.pages.len();
        }
        None
    }

    /// Writes back the pages at `gpas` (page-aligned guest-physical addresses, each in a
    /// region of the image): the kept bytes, or zeros for a page that was zero. Returns
    /// how many it wrote.
    pub fn restore_pages(
        &self,
        memory: &GuestMemoryMmap,
        gpas: impl IntoIterator<Item = u64>,
    ) -> Result<usize, MemoryImageError> {
        const ZERO: [u8; PAGE_USIZE] = [0; PAGE_USIZE];
        let mut n = 0;
        for gpa in gpas {
            let bytes = self.page(gpa).unwrap_or(&ZERO);
            memory
                .write_slice(bytes, GuestAddress(gpa))
                .map_err(access(gpa))?;
            n += 1;
        }
        Ok(n)
    }

    /// Writes every kept page into `memory` (a fresh VM's, zero elsewhere). Call
    /// [`MemoryImage::check`] first.
    pub fn restore_all(&self, memory: &GuestMemoryMmap) -> Result<usize, MemoryImageError> {
        let mut pages = self.data.chunks_exact(PAGE_USIZE);
        let mut n = 0;
        for r in &self.layout {
            for (&index, bytes) in r.pages.iter().zip(pages.by_ref()) {
                let gpa = r.base + u64::from(index) * PAGE;
                memory
                    .write_slice(bytes, GuestAddress(gpa))
                    .map_err(access(gpa))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn describe(regions: &[(u64, u64)]) -> String {
    let parts: Vec<String> = regions
        .iter()
        .map(|(b, l)| format!("{b:#x}+{}M", l >> 20))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The regions of `memory` as `(base, len)`.
pub fn regions_of(memory: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    memory
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap()
    }

    fn put(m: &GuestMemoryMmap, gpa: u64, byte: u8) {
        m.write_slice(&[byte; 16], GuestAddress(gpa)).unwrap();
    }

    fn get(m: &GuestMemoryMmap, gpa: u64) -> u8 {
        let mut b = [0u8];
        m.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b[0]
    }

    #[test]
    fn only_nonzero_pages_are_kept() {
        let m = ram();
        put(&m, 0x3000, 1);
        put(&m, (1 << 32) + 0x5000, 2);
        let img = MemoryImage::capture(&m).unwrap();
        assert_eq!(img.layout[0].pages, vec![3]);
        assert_eq!(img.layout[1].pages, vec![5]);
        assert_eq!(img.data.len(), 2 * PAGE_USIZE);
        img.check(&regions_of(&m)).unwrap();
    }

    #[test]
    fn a_reset_writes_back_exactly_the_pages_named() {
        let m = ram();
        put(&m, 0x3000, 1);
        let img = MemoryImage::capture(&m).unwrap();
        // The guest writes a kept page, a zero page, and another page nobody names.
        put(&m, 0x3000, 9);
        put(&m, 0x7000, 9);
        put(&m, 0x9000, 9);
        let n = img.restore_pages(&m, [0x3000, 0x7000]).unwrap();
        assert_eq!(n, 2);
        assert_eq!(get(&m, 0x3000), 1);
        assert_eq!(get(&m, 0x7000), 0);
        assert_eq!(get(&m, 0x9000), 9, "a page not named is not touched");
    }

    #[test]
    fn a_fresh_vm_gets_every_kept_page() {
        let m = ram();
        put(&m, 0x1000, 4);
        put(&m, (1 << 32) + 0xf_f000, 5);
        let img = MemoryImage::capture(&m).unwrap();
        let fresh = ram();
        assert_eq!(img.restore_all(&fresh).unwrap(), 2);
        assert_eq!(MemoryImage::capture(&fresh).unwrap(), img);
    }

    #[test]
    fn images_that_do_not_fit_are_refused() {
        let m = ram();
        put(&m, 0x1000, 4);
        let img = MemoryImage::capture(&m).unwrap();
        let regions = regions_of(&m);
        let mut other = img.clone();
        other.layout[0].len = 2 << 20;
        assert!(other.check(&regions).is_err(), "another memory size");
        let mut short = img.clone();
        short.data.pop();
        assert!(short.check(&regions).is_err(), "truncated data");
        let mut past = img.clone();
        past.layout[0].pages = vec![256];
        assert!(past.check(&regions).is_err(), "a page past the region");
        let mut unordered = img.clone();
        unordered.layout[1].pages = vec![2, 1];
        unordered.data.extend_from_slice(&[0; PAGE_USIZE * 2]);
        assert!(unordered.check(&regions).is_err(), "indices out of order");
    }
}
