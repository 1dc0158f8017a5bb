//! A minimal, bounds-checked reader for flattened device tree blobs (DTB v17).
//!
//! Why not the `fdt` crate: `fdt` 0.1.5 assumes well-formed input and panics on malformed blobs
//! (`unwrap`/`expect`/`assert_eq!` and unchecked slicing in its node and property walkers,
//! e.g. `src/node.rs` `stream.u32().unwrap()` and `&stream.remaining()[..data_len]`; the test
//! `fdt_crate_panics_on_malformed_blob` below shows it). The KHO FDT comes from the guest, so a
//! corrupted or hostile guest must produce an error here, never a VMM panic. This walker copies
//! the tree into owned [`FdtNode`]s, checking every offset and bounding depth and node count.
//!
//! Only what KHO needs is implemented: header, structure block, strings block. The memory
//! reservation block is not interpreted (KHO leaves it empty).
//!
//! Names are at most [`MAX_NAME_LEN`] bytes and are looked for only that far, so a blob whose
//! properties all share one 512 KiB name costs neither a scan nor a copy per property; every
//! node and property kept is charged to the parse's [`Budget`] (a record, and its name and
//! value bytes).

use thiserror::Error;

use crate::budget::{Budget, BudgetError};

/// Longest node or property name accepted, in bytes without the NUL (the devicetree
/// specification allows 31; libfdt does not check; KHO's are a few bytes).
pub const MAX_NAME_LEN: usize = 256;

/// `FDT_MAGIC` (big-endian in the blob).
pub const FDT_MAGIC: u32 = 0xd00d_feed;
/// Size of the v17 header.
pub const FDT_HEADER_SIZE: usize = 40;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Errors from parsing an FDT blob.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FdtError {
    /// The blob is shorter than its header or than `totalsize`.
    #[error("FDT truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the header says are needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// Wrong magic number.
    #[error("bad FDT magic {0:#x}")]
    BadMagic(u32),
    /// Version this reader does not understand.
    #[error("unsupported FDT version {version} (last compatible {last_comp})")]
    Version {
        /// `version` field.
        version: u32,
        /// `last_comp_version` field.
        last_comp: u32,
    },
    /// A block offset/size in the header points outside `totalsize`.
    #[error("FDT {0} block lies outside the blob")]
    BlockOutOfBounds(&'static str),
    /// The structure block is malformed at this offset.
    #[error("malformed FDT structure at offset {offset:#x}: {what}")]
    Malformed {
        /// Offset inside the structure block.
        offset: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// More nodes or deeper nesting than the configured limits.
    #[error("FDT exceeds limit: {0}")]
    Limit(&'static str),
    /// The parse's budget ran out.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// One property: name and raw value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdtProperty {
    /// Property name from the strings block.
    pub name: String,
    /// Raw value.
    pub value: Vec<u8>,
    /// Where the value starts, in bytes from the start of the blob (so its guest address is
    /// the blob's plus this).
    pub offset: usize,
}

/// One node of the tree, owning its properties and children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FdtNode {
    /// Node name (the root's is empty).
    pub name: String,
    /// Properties in blob order.
    pub properties: Vec<FdtProperty>,
    /// Child nodes in blob order.
    pub children: Vec<FdtNode>,
}

impl FdtNode {
    /// The value of property `name`, if present.
    pub fn property(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_slice())
    }

    /// Property `name` as a string (value up to the first NUL).
    pub fn property_str(&self, name: &str) -> Option<String> {
        self.property(name).map(crate::mem::c_string)
    }

    /// Property `name` as a `u64` stored in **CPU (little-endian) byte order**, the way KHO
    /// stores addresses (`fdt_setprop(fdt, off, name, &phys, sizeof(phys))`). `None` if absent
    /// or not exactly 8 bytes long.
    pub fn property_u64_le(&self, name: &str) -> Option<u64> {
        let v: [u8; 8] = self.property(name)?.try_into().ok()?;
        Some(u64::from_le_bytes(v))
    }

    /// The child called `name`.
    pub fn child(&self, name: &str) -> Option<&FdtNode> {
        self.children.iter().find(|c| c.name == name)
    }
}

/// Bounds for [`parse`].
#[derive(Debug, Clone, Copy)]
pub struct FdtLimits {
    /// Maximum number of nodes, root included.
    pub max_nodes: usize,
    /// Maximum nesting depth (root is depth 1).
    pub max_depth: usize,
}

impl Default for FdtLimits {
    fn default() -> Self {
        FdtLimits {
            max_nodes: 4096,
            max_depth: 16,
        }
    }
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

/// The `totalsize` field of an FDT header, after checking the magic. Lets a caller read the
/// header first and then exactly the blob.
pub fn total_size(header: &[u8]) -> Result<u32, FdtError> {
    let magic = be32(header, 0).ok_or(FdtError::Truncated {
        need: FDT_HEADER_SIZE as u64,
        have: header.len() as u64,
    })?;
    if magic != FDT_MAGIC {
        return Err(FdtError::BadMagic(magic));
    }
    be32(header, 4).ok_or(FdtError::Truncated {
        need: FDT_HEADER_SIZE as u64,
        have: header.len() as u64,
    })
}

/// Parses `blob` and returns its root node, charging `budget` one record per node and
/// property and the bytes of their names and values.
pub fn parse(blob: &[u8], limits: FdtLimits, budget: &Budget) -> Result<FdtNode, FdtError> {
    let truncated = |need: u64| FdtError::Truncated {
        need,
        have: blob.len() as u64,
    };
    if blob.len() < FDT_HEADER_SIZE {
        return Err(truncated(FDT_HEADER_SIZE as u64));
    }
    let h = |i: usize| be32(blob, i * 4).ok_or(truncated(FDT_HEADER_SIZE as u64));
    let total = total_size(blob)? as usize;
    let (off_struct, off_strings, version, last_comp) = (h(2)?, h(3)?, h(5)?, h(6)?);
    let (size_strings, size_struct) = (h(8)?, h(9)?);
    if total > blob.len() || total < FDT_HEADER_SIZE {
        return Err(truncated(total as u64));
    }
    if version < 16 || last_comp > 17 {
        return Err(FdtError::Version { version, last_comp });
    }
    let blob = blob.get(..total).ok_or(truncated(total as u64))?;
    let block = |off: u32, size: u32, what| {
        let start = off as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(FdtError::BlockOutOfBounds(what))?;
        blob.get(start..end).ok_or(FdtError::BlockOutOfBounds(what))
    };
    let structure = block(off_struct, size_struct, "structure")?;
    let strings = block(off_strings, size_strings, "strings")?;
    Walker {
        s: structure,
        s_off: off_struct as usize,
        strings,
        pos: 0,
        limits,
        budget,
    }
    .walk()
}

struct Walker<'a> {
    s: &'a [u8],
    /// Offset of the structure block in the blob.
    s_off: usize,
    strings: &'a [u8],
    pos: usize,
    limits: FdtLimits,
    budget: &'a Budget,
}

/// Length of the NUL-terminated name at the start of `rest`, looking at most
/// [`MAX_NAME_LEN`] + 1 bytes.
fn name_len(rest: &[u8]) -> Result<usize, &'static str> {
    let window = rest.get(..MAX_NAME_LEN + 1).unwrap_or(rest);
    match window.iter().position(|&b| b == 0) {
        Some(len) => Ok(len),
        None if window.len() > MAX_NAME_LEN => Err("name longer than MAX_NAME_LEN"),
        None => Err("unterminated name"),
    }
}

impl Walker<'_> {
    fn malformed(&self, what: &'static str) -> FdtError {
        FdtError::Malformed {
            offset: self.pos,
            what,
        }
    }

    fn token(&mut self) -> Result<u32, FdtError> {
        let t =
            be32(self.s, self.pos).ok_or(self.malformed("structure block ends without FDT_END"))?;
        self.pos += 4;
        Ok(t)
    }

    /// Advances past `len` bytes, padded to 4, returning them.
    fn take(&mut self, len: usize, what: &'static str) -> Result<&[u8], FdtError> {
        let s = self.s;
        let end = self.pos.checked_add(len).ok_or(self.malformed(what))?;
        let bytes = s.get(self.pos..end).ok_or(self.malformed(what))?;
        self.pos = end.checked_add(3).ok_or(self.malformed(what))? & !3;
        Ok(bytes)
    }

    fn node_name(&mut self) -> Result<String, FdtError> {
        let rest = self.s.get(self.pos..).unwrap_or_default();
        let len = name_len(rest).map_err(|what| self.malformed(what))?;
        self.budget.bytes(len)?;
        let name = String::from_utf8_lossy(
            self.take(len + 1, "node name")?
                .get(..len)
                .unwrap_or_default(),
        );
        Ok(name.into_owned())
    }

    fn string_at(&self, off: u32) -> Result<String, FdtError> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or(self.malformed("property name offset outside strings block"))?;
        let len = name_len(rest).map_err(|what| self.malformed(what))?;
        self.budget.bytes(len)?;
        Ok(String::from_utf8_lossy(rest.get(..len).unwrap_or_default()).into_owned())
    }

    fn walk(mut self) -> Result<FdtNode, FdtError> {
        // Explicit stack instead of recursion: depth is bounded by `limits.max_depth`.
        let mut stack: Vec<FdtNode> = Vec::new();
        let mut nodes = 0usize;
        let mut root: Option<FdtNode> = None;
        loop {
            match self.token()? {
                FDT_NOP => {}
                FDT_BEGIN_NODE => {
                    if root.is_some() {
                        return Err(self.malformed("second root node"));
                    }
                    nodes += 1;
                    if nodes > self.limits.max_nodes {
                        return Err(FdtError::Limit("too many nodes"));
                    }
                    self.budget.records(1)?;
                    if stack.len() >= self.limits.max_depth {
                        return Err(FdtError::Limit("nesting too deep"));
                    }
                    let name = self.node_name()?;
                    stack.push(FdtNode {
                        name,
                        ..FdtNode::default()
                    });
                }
                FDT_PROP => {
                    let len = self.token()? as usize;
                    let name_off = self.token()?;
                    self.budget.records(1)?;
                    let name = self.string_at(name_off)?;
                    let budget = self.budget;
                    let offset = self.s_off.saturating_add(self.pos);
                    let value = self.take(len, "property value")?;
                    budget.bytes(value.len())?;
                    let value = value.to_vec();
                    stack
                        .last_mut()
                        .ok_or(self.malformed("property outside any node"))?
                        .properties
                        .push(FdtProperty {
                            name,
                            value,
                            offset,
                        });
                }
                FDT_END_NODE => {
                    let node = stack
                        .pop()
                        .ok_or(self.malformed("unbalanced FDT_END_NODE"))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => root = Some(node),
                    }
                }
                FDT_END => {
                    if !stack.is_empty() {
                        return Err(self.malformed("FDT_END inside a node"));
                    }
                    return root.ok_or(self.malformed("no root node"));
                }
                _ => return Err(self.malformed("unknown token")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Resource, Usage};
    use crate::mem::GuestRam;

    fn budget() -> Budget {
        Budget::for_ram(GuestRam::new([(0, 1 << 30)]))
    }

    /// `parse` with a fresh budget, as most tests need.
    fn parse(blob: &[u8], limits: FdtLimits) -> Result<FdtNode, FdtError> {
        super::parse(blob, limits, &budget())
    }

    fn sample() -> Vec<u8> {
        let mut w = vm_fdt::FdtWriter::new().unwrap();
        let root = w.begin_node("").unwrap();
        w.property_string("compatible", "kho-v4").unwrap();
        w.property("preserved-memory-map", &0x1234_5000u64.to_le_bytes())
            .unwrap();
        let luo = w.begin_node("LUO").unwrap();
        w.property("preserved-data", &0x8000u64.to_le_bytes())
            .unwrap();
        w.end_node(luo).unwrap();
        w.end_node(root).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn parses_what_vm_fdt_writes() {
        let root = parse(&sample(), FdtLimits::default()).unwrap();
        assert_eq!(root.name, "");
        assert_eq!(root.property_str("compatible").as_deref(), Some("kho-v4"));
        assert_eq!(
            root.property_u64_le("preserved-memory-map"),
            Some(0x1234_5000)
        );
        assert_eq!(root.property_u64_le("compatible"), None);
        let luo = root.child("LUO").unwrap();
        assert_eq!(luo.property_u64_le("preserved-data"), Some(0x8000));
        assert!(root.child("nope").is_none());
    }

    #[test]
    fn rejects_bad_headers() {
        let b = sample();
        assert!(matches!(
            parse(&b[..20], FdtLimits::default()),
            Err(FdtError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&b[..b.len() - 1], FdtLimits::default()),
            Err(FdtError::Truncated { .. })
        ));
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(
            parse(&bad, FdtLimits::default()),
            Err(FdtError::BadMagic(_))
        ));
        let mut bad = b.clone();
        bad[8..12].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            parse(&bad, FdtLimits::default()),
            Err(FdtError::BlockOutOfBounds("structure"))
        ));
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(
            parse(&bad, FdtLimits::default()),
            Err(FdtError::Version { .. })
        ));
    }

    #[test]
    fn enforces_limits() {
        let limits = FdtLimits {
            max_nodes: 1,
            max_depth: 16,
        };
        assert_eq!(
            parse(&sample(), limits),
            Err(FdtError::Limit("too many nodes"))
        );
        let limits = FdtLimits {
            max_nodes: 10,
            max_depth: 1,
        };
        assert_eq!(
            parse(&sample(), limits),
            Err(FdtError::Limit("nesting too deep"))
        );
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_not_a_panic() {
        let b = sample();
        for cut in 0..b.len() {
            let _ = parse(&b[..cut], FdtLimits::default());
        }
        for i in 0..b.len() {
            for v in [0u8, 1, 2, 3, 4, 9, 0x7f, 0xff] {
                let mut m = b.clone();
                m[i] = v;
                let _ = parse(&m, FdtLimits::default());
            }
        }
    }

    #[test]
    fn long_names_are_refused_and_everything_kept_is_charged() {
        let b = budget();
        super::parse(&sample(), FdtLimits::default(), &b).unwrap();
        // Two nodes and three properties; names and values.
        assert_eq!(b.used().records, 5);
        let names = "LUO".len() + "compatible".len() + "preserved-memory-map".len();
        let names = names + "preserved-data".len();
        assert_eq!(b.used().bytes, (names + 7 + 8 + 8) as u64);

        let mut raw = crate::fixture::RawFdt::default();
        let long = raw.string(&"p".repeat(MAX_NAME_LEN + 1));
        raw.begin_node("").prop(long, &[1]).end_node();
        assert!(matches!(
            parse(&raw.finish(), FdtLimits::default()),
            Err(FdtError::Malformed {
                what: "name longer than MAX_NAME_LEN",
                ..
            })
        ));
        let tiny = Budget::new(
            GuestRam::new([(0, 1 << 30)]),
            Usage {
                pages: 1,
                records: 2,
                bytes: 1 << 20,
            },
        );
        assert!(matches!(
            super::parse(&sample(), FdtLimits::default(), &tiny),
            Err(FdtError::Budget(BudgetError::Exhausted {
                resource: Resource::Records,
                limit: 2
            }))
        ));
    }

    /// Evidence for not using the `fdt` crate on guest bytes: a property whose length runs
    /// past the structure block makes `fdt` 0.1.5 panic, where [`parse`] returns an error.
    #[test]
    fn fdt_crate_panics_on_malformed_blob() {
        let mut b = sample();
        let off_struct = u32::from_be_bytes(b[8..12].try_into().unwrap()) as usize;
        // Root node "" = BEGIN_NODE + 4 bytes of name padding; the first property follows.
        let prop = off_struct + 8;
        assert_eq!(be32(&b, prop), Some(FDT_PROP));
        b[prop + 4..prop + 8].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
        assert!(parse(&b, FdtLimits::default()).is_err());
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(|| {
            let f = fdt::Fdt::new(&b).ok()?;
            let root = f.find_node("/")?;
            Some(root.properties().count())
        });
        std::panic::set_hook(hook);
        assert!(r.is_err(), "fdt crate did not panic: {r:?}");
    }
}
