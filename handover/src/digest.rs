//! Digests of extents, taken at two marks and compared: the second proof that preserved
//! memory was kept in place (the first is the dirty log).
//!
//! The extents hashed are the preserved set itself, not guest RAM: at point-of-no-return
//! luo-vmm hashes the extents the outgoing kernel's KHO state names
//! ([`crate::Handover::from_fdt`]), at next-kernel-start those the next kernel is handed
//! ([`crate::Handover::read`]), and [`ExtentDigests::compare`] matches them by range. Time
//! is O(preserved bytes), memory O(extents): the bytes are hashed where they lie
//! ([`GuestMemoryRead::visit`]).
//!
//! The default hash is XXH3-128 (`xxhash-rust`), which runs at memory speed: the proof is
//! against a kernel bug or a stray DMA, not an adversary who picks the bytes. SHA-256
//! ([`DigestAlgorithm::Sha256`]) is there for a user who wants a cryptographic digest.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use crate::extents::ExtentSet;
use crate::mem::{GuestMemoryRead, MemError};

/// Errors from digesting.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    /// Guest memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// An algorithm name that is neither `xxh3` nor `sha256`.
    #[error("unknown digest {0:?}: expected xxh3 or sha256")]
    UnknownAlgorithm(String),
}

/// The hash of [`ExtentDigests`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestAlgorithm {
    /// XXH3, 128-bit (16-byte digests): memory speed, not cryptographic.
    #[default]
    Xxh3,
    /// SHA-256 (32-byte digests): cryptographic, about 15x slower than memcpy.
    Sha256,
}

impl DigestAlgorithm {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Xxh3 => "xxh3",
            DigestAlgorithm::Sha256 => "sha256",
        }
    }
}

impl fmt::Display for DigestAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DigestAlgorithm {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xxh3" | "xxh3-128" => Ok(DigestAlgorithm::Xxh3),
            "sha256" => Ok(DigestAlgorithm::Sha256),
            _ => Err(DigestError::UnknownAlgorithm(s.to_owned())),
        }
    }
}

/// One running hash of either kind.
enum Hasher {
    Xxh3(Box<Xxh3>),
    Sha256(Sha256),
}

impl Hasher {
    fn new(algorithm: DigestAlgorithm) -> Self {
        match algorithm {
            DigestAlgorithm::Xxh3 => Hasher::Xxh3(Box::new(Xxh3::new())),
            DigestAlgorithm::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Xxh3(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Xxh3(h) => h.digest128().to_le_bytes().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

/// The digest of one extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentDigest {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Who owns it (the label of the preserved set).
    #[serde(default)]
    pub owner: String,
    /// The hash of the bytes (16 bytes for XXH3-128, little-endian; 32 for SHA-256).
    pub digest: Vec<u8>,
}

/// Digests of every extent of a set, in address order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentDigests {
    /// The hash used.
    pub algorithm: DigestAlgorithm,
    /// One per extent.
    pub extents: Vec<ExtentDigest>,
}

/// An extent, with its owner: one that changed, or one found in only one of the two sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestExtent {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Its owner (in the set it came from; the later one when in both).
    pub owner: String,
}

impl From<&ExtentDigest> for DigestExtent {
    fn from(d: &ExtentDigest) -> Self {
        DigestExtent {
            start: d.start,
            end: d.end,
            owner: d.owner.clone(),
        }
    }
}

/// The outcome of comparing two digest sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestVerdict {
    /// The hash used.
    #[serde(default)]
    pub algorithm: DigestAlgorithm,
    /// Extents compared (present in both).
    pub compared: usize,
    /// Bytes hashed on each side (the first set's, the second's).
    #[serde(default)]
    pub bytes: (u64, u64),
    /// Extents whose contents changed.
    pub changed: Vec<DigestExtent>,
    /// Extents present in only the first set (at point-of-no-return, not handed over).
    #[serde(default)]
    pub only_before: Vec<DigestExtent>,
    /// Extents present in only the second set (handed over, not preserved at
    /// point-of-no-return).
    #[serde(default)]
    pub only_after: Vec<DigestExtent>,
}

impl DigestVerdict {
    /// True when every extent matched and none changed.
    pub fn unchanged(&self) -> bool {
        self.changed.is_empty() && self.only_before.is_empty() && self.only_after.is_empty()
    }
}

impl ExtentDigests {
    /// Hashes every extent of `set` with `algorithm`, in place where `mem` lends its bytes
    /// ([`GuestMemoryRead::visit`]): O(bytes of the set) time, O(extents) memory.
    pub fn compute(
        mem: &(impl GuestMemoryRead + ?Sized),
        set: &ExtentSet,
        algorithm: DigestAlgorithm,
    ) -> Result<Self, DigestError> {
        let mut extents = Vec::with_capacity(set.len());
        for e in set.iter() {
            let mut h = Hasher::new(algorithm);
            mem.visit(e.start, e.len(), &mut |bytes| h.update(bytes))?;
            extents.push(ExtentDigest {
                start: e.start,
                end: e.end,
                owner: e.owner.to_owned(),
                digest: h.finish(),
            });
        }
        Ok(ExtentDigests { algorithm, extents })
    }

    /// Bytes covered by the digests.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.end - e.start).sum()
    }

    /// Compares `self` (before) with `after`, matching extents by their exact range: a
    /// merge of the two sorted lists, O(extents).
    pub fn compare(&self, after: &ExtentDigests) -> DigestVerdict {
        let mut v = DigestVerdict {
            algorithm: after.algorithm,
            bytes: (self.bytes(), after.bytes()),
            ..DigestVerdict::default()
        };
        let (mut a, mut b) = (
            self.extents.iter().peekable(),
            after.extents.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if (x.start, x.end) == (y.start, y.end) => {
                    v.compared += 1;
                    if x.digest != y.digest || self.algorithm != after.algorithm {
                        v.changed.push(DigestExtent::from(*y));
                    }
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if (x.start, x.end) < (y.start, y.end) => {
                    v.only_before.push(DigestExtent::from(*x));
                    a.next();
                }
                (_, Some(y)) => {
                    v.only_after.push(DigestExtent::from(*y));
                    b.next();
                }
                (Some(x), None) => {
                    v.only_before.push(DigestExtent::from(*x));
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

    fn ranges(v: &[DigestExtent]) -> Vec<(u64, u64)> {
        v.iter().map(|e| (e.start, e.end)).collect()
    }

    #[test]
    fn detects_changes_and_matches_the_reference_hashes() {
        let mut mem = VecMemory::new(0, (0..=255u8).cycle().take(1 << 20).collect());
        let mut b = ExtentSet::builder();
        b.add(0x1000, 0x2000, "a")
            .add(0x10_000, 0x10_000 + 300_000, "b")
            .add(0x9_0000, 0x9_0001, "c");
        let set = b.build();
        for alg in [DigestAlgorithm::Xxh3, DigestAlgorithm::Sha256] {
            let before = ExtentDigests::compute(&mem, &set, alg).unwrap();
            let page = &mem.as_bytes()[0x1000..0x2000];
            let direct = match alg {
                DigestAlgorithm::Xxh3 => xxhash_rust::xxh3::xxh3_128(page).to_le_bytes().to_vec(),
                DigestAlgorithm::Sha256 => Sha256::digest(page).to_vec(),
            };
            assert_eq!(before.extents[0].digest, direct, "{alg}");
            assert_eq!(before.extents[1].owner, "b");
            assert!(before.compare(&before).unchanged());
            // The last byte of the extent read in several chunks.
            let last = 0x10_000 + 299_999;
            let old = mem.as_bytes()[last];
            mem.write(last as u64, &[old ^ 0xff]).unwrap();
            let after = ExtentDigests::compute(&mem, &set, alg).unwrap();
            mem.write(last as u64, &[old]).unwrap();
            let v = before.compare(&after);
            assert_eq!(v.compared, 3);
            assert_eq!(ranges(&v.changed), vec![(0x10_000, 0x10_000 + 300_000)]);
            assert_eq!(v.changed[0].owner, "b");
            assert_eq!(v.bytes, (0x1000 + 300_000 + 1, 0x1000 + 300_000 + 1));
            assert!(!v.unchanged());
        }
    }

    #[test]
    fn extents_in_one_set_only_and_read_errors() {
        let mem = VecMemory::zeroed(0, 0x10000);
        let one = ExtentSet::builder()
            .add(0x1000, 0x2000, "a")
            .clone()
            .build();
        let two = ExtentSet::builder()
            .add(0x1000, 0x2000, "a")
            .add(0x4000, 0x5000, "late")
            .clone()
            .build();
        let alg = DigestAlgorithm::default();
        let (d1, d2) = (
            ExtentDigests::compute(&mem, &one, alg).unwrap(),
            ExtentDigests::compute(&mem, &two, alg).unwrap(),
        );
        let v = d1.compare(&d2);
        assert_eq!(ranges(&v.only_after), vec![(0x4000, 0x5000)]);
        assert_eq!(v.only_after[0].owner, "late");
        assert!(v.only_before.is_empty() && !v.unchanged());
        let v = d2.compare(&d1);
        assert_eq!(ranges(&v.only_before), vec![(0x4000, 0x5000)]);
        let far = ExtentSet::builder()
            .add(0xf000, 0x11000, "a")
            .clone()
            .build();
        assert!(matches!(
            ExtentDigests::compute(&mem, &far, alg),
            Err(DigestError::Mem(_))
        ));
    }

    #[test]
    fn algorithm_names() {
        assert_eq!("xxh3".parse(), Ok(DigestAlgorithm::Xxh3));
        assert_eq!("sha256".parse(), Ok(DigestAlgorithm::Sha256));
        assert!("md5".parse::<DigestAlgorithm>().is_err());
        assert_eq!(DigestAlgorithm::default().to_string(), "xxh3");
        // Digests of different algorithms never compare equal.
        let mem = VecMemory::zeroed(0, 0x2000);
        let set = ExtentSet::builder().add(0, 0x1000, "a").clone().build();
        let x = ExtentDigests::compute(&mem, &set, DigestAlgorithm::Xxh3).unwrap();
        let s = ExtentDigests::compute(&mem, &set, DigestAlgorithm::Sha256).unwrap();
        assert_eq!(x.compare(&s).changed.len(), 1);
    }
}
