//! SHA-256 digests of extents, taken at two marks and compared: the optional second proof that
//! preserved memory was kept in place (the first is the dirty log).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::extents::ExtentSet;
use crate::mem::{to_usize, GuestMemoryRead, MemError};

/// Bytes read from the guest per call while hashing.
const CHUNK: usize = 256 * 1024;

/// Errors from digesting.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    /// Guest memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// The digest of one extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentDigest {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
}

/// Digests of every extent of a set, in address order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentDigests {
    /// One per extent.
    pub extents: Vec<ExtentDigest>,
}

/// The outcome of comparing two digest sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestVerdict {
    /// Extents compared (present in both).
    pub compared: usize,
    /// `[start, end)` of extents whose contents changed.
    pub changed: Vec<(u64, u64)>,
    /// Extents present in only one of the two sets.
    pub unmatched: Vec<(u64, u64)>,
}

impl DigestVerdict {
    /// True when every extent matched and none changed.
    pub fn unchanged(&self) -> bool {
        self.changed.is_empty() && self.unmatched.is_empty()
    }
}

impl ExtentDigests {
    /// Hashes every extent of `set`, reading guest memory in 256 KiB chunks.
    pub fn compute(
        mem: &(impl GuestMemoryRead + ?Sized),
        set: &ExtentSet,
    ) -> Result<Self, DigestError> {
        let mut buf = vec![0u8; CHUNK];
        let mut extents = Vec::with_capacity(set.len());
        for e in set.iter() {
            let mut h = Sha256::new();
            let mut at = e.start;
            while at < e.end {
                let n = to_usize((e.end - at).min(CHUNK as u64));
                let chunk = buf.get_mut(..n).unwrap_or_default();
                mem.read_at(at, chunk)?;
                h.update(&*chunk);
                at += n as u64;
            }
            extents.push(ExtentDigest {
                start: e.start,
                end: e.end,
                sha256: h.finalize().into(),
            });
        }
        Ok(ExtentDigests { extents })
    }

    /// Compares `self` (before) with `after`, matching extents by their exact range.
    pub fn compare(&self, after: &ExtentDigests) -> DigestVerdict {
        let mut v = DigestVerdict::default();
        let (mut a, mut b) = (
            self.extents.iter().peekable(),
            after.extents.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if (x.start, x.end) == (y.start, y.end) => {
                    v.compared += 1;
                    if x.sha256 != y.sha256 {
                        v.changed.push((x.start, x.end));
                    }
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if (x.start, x.end) < (y.start, y.end) => {
                    v.unmatched.push((x.start, x.end));
                    a.next();
                }
                (_, Some(y)) => {
                    v.unmatched.push((y.start, y.end));
                    b.next();
                }
                (Some(x), None) => {
                    v.unmatched.push((x.start, x.end));
                    a.next();
                }
                (None, None) => return v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMemory;

    #[test]
    fn detects_changes_and_matches_sha256() {
        let mut mem = VecMemory::new(0, (0..=255u8).cycle().take(1 << 20).collect());
        let mut b = ExtentSet::builder();
        b.add(0x1000, 0x2000, "a")
            .add(0x10_000, 0x10_000 + 300_000, "b")
            .add(0x9_0000, 0x9_0001, "c");
        let set = b.build();
        let before = ExtentDigests::compute(&mem, &set).unwrap();
        let direct: [u8; 32] = Sha256::digest(&mem.as_bytes()[0x1000..0x2000]).into();
        assert_eq!(before.extents[0].sha256, direct);
        assert!(before.compare(&before).unchanged());
        mem.write(0x10_000 + 299_999, &[0xee]).unwrap(); // last byte of the chunked extent
        let after = ExtentDigests::compute(&mem, &set).unwrap();
        let v = before.compare(&after);
        assert_eq!(v.compared, 3);
        assert_eq!(v.changed, vec![(0x10_000, 0x10_000 + 300_000)]);
        assert!(!v.unchanged());
    }

    #[test]
    fn unmatched_extents_and_read_errors() {
        let mem = VecMemory::zeroed(0, 0x10000);
        let one = ExtentSet::builder()
            .add(0x1000, 0x2000, "a")
            .clone()
            .build();
        let two = ExtentSet::builder()
            .add(0x1000, 0x2000, "a")
            .add(0x4000, 0x5000, "a")
            .clone()
            .build();
        let (d1, d2) = (
            ExtentDigests::compute(&mem, &one).unwrap(),
            ExtentDigests::compute(&mem, &two).unwrap(),
        );
        assert_eq!(d1.compare(&d2).unmatched, vec![(0x4000, 0x5000)]);
        assert_eq!(d2.compare(&d1).unmatched, vec![(0x4000, 0x5000)]);
        let far = ExtentSet::builder()
            .add(0xf000, 0x11000, "a")
            .clone()
            .build();
        assert!(matches!(
            ExtentDigests::compute(&mem, &far),
            Err(DigestError::Mem(_))
        ));
    }
}
