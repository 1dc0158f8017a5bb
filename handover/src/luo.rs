//! LUO's preserved state: sessions, their files, FLBs, and memfd contents.
//!
//! ABI: `include/linux/kho/abi/luo.h` (`luo-v5`), `include/linux/kho/abi/block.h` (linked
//! 4 KiB blocks of entries), `include/linux/kho/abi/memfd.h` (`memfd-v2`) and the vmalloc
//! preservation in `include/linux/kho/abi/kexec_handover.h`; readers in
//! `kernel/liveupdate/luo_core.c`, `luo_session.c`, `luo_file.c`, `luo_flb.c`, `kho_block.c`,
//! `mm/memfd_luo.c` and `kho_restore_vmalloc()`.
//!
//! ```text
//! FDT node "LUO" --preserved-data--> struct luo_ser {compatible "luo-v5", liveupdate_num,
//!                                                    sessions_pa, flbs_pa}
//!   sessions_pa -> block {next, count} + luo_session_ser[count] {name[64], files, count} -> ...
//!     files   -> block {next, count} + luo_file_ser[count] {compatible[48], data, token} -> ...
//!       data (memfd-v2) -> memfd_luo_ser {pos, size, seals, flags, nr_folios, kho_vmalloc}
//!         kho_vmalloc.first -> chunk {next, phys[511] (0-terminated)} -> ...
//!           phys[i] -> 2^order pages of memfd_luo_folio_ser[nr_folios] {pfn:52|flags:12, index}
//!   flbs_pa -> luo_flb_header_ser {pgcnt, count} + luo_flb_ser[count] {name[48], data, count}
//! ```

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::budget::{Budget, BudgetError};
use crate::kho::{understood, KhoSubtree};
use crate::mem::{
    c_string, read_array, read_vec, to_usize, GuestMemoryRead, LeBytes, MemError, PAGE_BYTES,
    PAGE_SHIFT, PAGE_SIZE,
};

/// `LUO_KHO_ENTRY_NAME`.
pub const LUO_NODE: &str = "LUO";
/// `LUO_ABI_COMPATIBLE`.
pub const LUO_ABI_COMPATIBLE: &str = "luo-v5";
/// `MEMFD_LUO_FH_COMPATIBLE`.
pub const MEMFD_COMPATIBLE: &str = "memfd-v2";
/// The memfd handler's name after the posted rename (2026: the version moves to the
/// feature-negotiation header), with the same `memfd_luo_ser` layout: decoded like
/// [`MEMFD_COMPATIBLE`] (the kernels themselves match names with `strcmp()`).
pub const MEMFD_RENAMED: &str = "memfd";
/// `sizeof(struct luo_ser)`: `ALIGN(sizeof("luo-v5"), 8)` + 3 u64.
pub const LUO_SER_SIZE: usize = 8 + 24;
/// Components this reader understands after a [`LUO_ABI_COMPATIBLE`] base (the granular
/// form of the June 2026 RFC, `luo-v5;block-v1`): the `kho_block` lists it decodes.
pub const LUO_COMPONENTS: &[&str] = &["block-v1"];
/// Longest `compatible[]` of a `struct luo_ser` this reader accepts (the whole header must
/// fit in a small read).
pub const MAX_LUO_COMPAT_LEN: usize = 64;

/// Bytes of `struct luo_ser`'s `compatible[]` for the string `compatible`:
/// `LUO_ABI_COMPAT_LEN = ALIGN(sizeof(LUO_ABI_COMPATIBLE), 8)` (`include/linux/kho/abi/luo.h`):
/// 8 for `luo-v5`, 16 for `luo-v5;block-v1`.
pub fn luo_compat_len(compatible: &str) -> usize {
    (compatible.len() + 1).next_multiple_of(8)
}

/// Whether this reader decodes a LUO state whose `luo_ser.compatible` is `compatible`:
/// `luo-v5`, alone or with components it knows ([`LUO_COMPONENTS`]). Err: the parts it does
/// not know.
pub fn luo_compatible_understood(compatible: &str) -> Result<(), Vec<String>> {
    understood(compatible, LUO_ABI_COMPATIBLE, LUO_COMPONENTS)
}

/// `sizeof(struct kho_block_header_ser)`.
pub const BLOCK_HEADER_SIZE: usize = 16;
/// `sizeof(struct luo_session_ser)`: `name[64]` + `luo_file_set_ser`.
pub const SESSION_SER_SIZE: usize = 64 + 16;
/// `sizeof(struct luo_file_ser)`: `compatible[48]` + data + token.
pub const FILE_SER_SIZE: usize = 48 + 16;
/// `sizeof(struct luo_flb_ser)`: `name[48]` + data + count.
pub const FLB_SER_SIZE: usize = 48 + 16;
/// `sizeof(struct memfd_luo_ser)`: pos, size, seals, flags, nr_folios, kho_vmalloc(16).
pub const MEMFD_SER_SIZE: usize = 48;
/// `sizeof(struct memfd_luo_folio_ser)`.
pub const FOLIO_SER_SIZE: usize = 16;
/// `KHO_MAX_BLOCKS` (kernel/liveupdate/kho_block.c): longest block list accepted.
pub const MAX_BLOCKS: usize = 10_000;
/// Entries of `phys[]` in one `struct kho_vmalloc_chunk`.
pub const VMALLOC_CHUNK_ENTRIES: usize = (PAGE_BYTES - 8) / 8;
/// Most memfd folio records read for one file (64 GiB of order-0 folios).
pub const MAX_MEMFD_FOLIOS: u64 = 1 << 24;

/// Errors from reading LUO state.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LuoError {
    /// Guest memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The `LUO` blob is smaller than `struct luo_ser`.
    #[error("LUO blob of {0} bytes is smaller than struct luo_ser")]
    ShortBlob(u64),
    /// `compatible` is not `luo-v5`.
    #[error("LUO compatible is {0:?}, expected {LUO_ABI_COMPATIBLE:?}")]
    Incompatible(String),
    /// A block list loops.
    #[error("{what} block list loops back to {pa:#x}")]
    Cycle {
        /// Which list.
        what: &'static str,
        /// The block seen twice.
        pa: u64,
    },
    /// A block list is longer than [`MAX_BLOCKS`].
    #[error("{0} block list longer than {MAX_BLOCKS} blocks")]
    TooManyBlocks(&'static str),
    /// A block's `count` is 0 or more than fits in a block (as `kho_block_set_restore()`).
    #[error("{what} block at {pa:#x} has invalid entry count {count}")]
    BadBlockCount {
        /// Which list.
        what: &'static str,
        /// The block.
        pa: u64,
        /// Its count.
        count: u64,
    },
    /// A session's file count disagrees with its blocks (as `luo_file_deserialize()`).
    #[error("session {session:?}: {declared} files declared, {found} found")]
    FileCountMismatch {
        /// Session name.
        session: String,
        /// `luo_file_set_ser.count`.
        declared: u64,
        /// Entries in the blocks.
        found: u64,
    },
    /// The FLB header's count does not fit in its pages.
    #[error("FLB header claims {count} entries in {pgcnt} pages")]
    BadFlbCount {
        /// `pgcnt`.
        pgcnt: u64,
        /// `count`.
        count: u64,
    },
    /// A memfd's vmalloc descriptor is inconsistent.
    #[error("memfd at {pa:#x}: {what}")]
    Memfd {
        /// The `memfd_luo_ser`.
        pa: u64,
        /// What was wrong.
        what: &'static str,
    },
    /// Two records reach the same page (each LUO record has pages of its own).
    #[error("page {page:#x} reached twice: by a {first} and by a {second}")]
    PageReachedTwice {
        /// The page.
        page: u64,
        /// What reached it first.
        first: &'static str,
        /// What reached it again.
        second: &'static str,
    },
    /// A page-sized record is not page-aligned.
    #[error("{what} at {pa:#x} is not page-aligned")]
    Misaligned {
        /// Which record.
        what: &'static str,
        /// Its address.
        pa: u64,
    },
    /// The parse's budget ran out, or a folio is not guest RAM.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// The whole LUO state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuoState {
    /// Where `struct luo_ser` is.
    pub ser_pa: u64,
    /// Live updates so far, this one included.
    pub liveupdate_num: u64,
    /// Sessions in serialisation order.
    pub sessions: Vec<Session>,
    /// File-lifecycle-bound global objects.
    pub flbs: Vec<Flb>,
    /// `flbs_pa` (0 if none).
    pub flb_pa: u64,
    /// Guest addresses of the session block pages.
    pub session_blocks: Vec<u64>,
    /// `luo_flb_header_ser.pgcnt` (0 if there are no FLBs).
    #[serde(default)]
    pub flb_pgcnt: u64,
    /// Files whose `compatible` this reader does not decode (their contents are not labelled
    /// in the preserved set), in session order.
    #[serde(default)]
    pub unknown_compatibles: Vec<UnknownCompatible>,
    /// `luo_ser.compatible` as read (`luo-v5`, or a granular form such as
    /// `luo-v5;block-v1`).
    #[serde(default = "default_luo_compatible")]
    pub compatible: String,
}

fn default_luo_compatible() -> String {
    LUO_ABI_COMPATIBLE.to_owned()
}

impl LuoState {
    /// Bytes of `struct luo_ser` as this kernel laid it out ([`luo_compat_len`] + 3 u64).
    pub fn ser_size(&self) -> usize {
        luo_compat_len(&self.compatible) + 24
    }
}

/// One preserved session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Name given at `LIVEUPDATE_IOCTL_CREATE_SESSION`.
    pub name: String,
    /// Its files.
    pub files: Vec<PreservedFile>,
    /// Guest addresses of its file block pages.
    pub file_blocks: Vec<u64>,
    /// Guest address of its `struct luo_session_ser`.
    #[serde(default)]
    pub ser_pa: u64,
}

/// One preserved file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedFile {
    /// File handler compatible, e.g. `memfd-v2`.
    pub compatible: String,
    /// User token.
    pub token: u64,
    /// Handler-private `data` (for memfd: the address of `struct memfd_luo_ser`).
    pub data: u64,
    /// Decoded memfd state, for `memfd-v2` files (with known components, if any).
    pub memfd: Option<Memfd>,
    /// Guest address of its `struct luo_file_ser`.
    #[serde(default)]
    pub ser_pa: u64,
}

/// A preserved memfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memfd {
    /// File position.
    pub pos: u64,
    /// File size in bytes.
    pub size: u64,
    /// `F_SEAL_*` seals.
    pub seals: u32,
    /// File flags.
    pub flags: u32,
    /// The folios holding the file's contents.
    pub folios: Vec<MemfdFolio>,
    /// Pages of the vmalloc'ed folio array and of its chunk list (metadata, not contents):
    /// the chunks first, then the array pages read, in order.
    pub metadata_pages: Vec<u64>,
    /// `memfd_luo_ser.folios`, the folio array's `struct kho_vmalloc`, as read.
    #[serde(default)]
    pub vmalloc: Vmalloc,
    /// The chunk pages of that array, in list order, with how many `phys[]` entries each
    /// listed before its first 0.
    #[serde(default)]
    pub chunks: Vec<VmallocChunk>,
}

/// `struct kho_vmalloc` (`include/linux/kho/abi/kexec_handover.h`): 16 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vmalloc {
    /// `first.phys`: the first `struct kho_vmalloc_chunk`.
    pub first: u64,
    /// `total_pages`.
    pub total_pages: u32,
    /// `flags`.
    pub flags: u16,
    /// `order`: pages per `phys[]` entry are `2^order`.
    pub order: u16,
}

/// One `struct kho_vmalloc_chunk` (a page: `hdr.next`, then `phys[511]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmallocChunk {
    /// Guest address of the chunk page.
    pub pa: u64,
    /// `phys[]` entries used (before the first 0, or all 511).
    pub entries: u32,
}

/// `struct memfd_luo_folio_ser`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemfdFolio {
    /// Page frame number (0 marks a hole the kernel skips).
    pub pfn: u64,
    /// `MEMFD_LUO_FOLIO_*` flags.
    pub flags: u16,
    /// Page offset in the file.
    pub index: u64,
}

/// `struct luo_flb_ser`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flb {
    /// Compatible name.
    pub name: String,
    /// Opaque handle.
    pub data: u64,
    /// Files depending on it.
    pub count: u64,
}

/// A file handler `compatible` string: a base and `;`-separated components, as proposed
/// upstream for handlers whose serialisation embeds other versioned formats (e.g.
/// `memfd-v2;vmalloc-v1`: a memfd-v2 record whose folio array is a `kho_vmalloc` area). Linux
/// 7.2 matches the whole string with `strcmp()` (`luo_file.c`); a bare base is the same as a
/// base with no components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compatible<'a> {
    /// Up to the first `;`.
    pub base: &'a str,
    /// The rest, split at `;`, empty components dropped.
    pub components: Vec<&'a str>,
}

impl<'a> Compatible<'a> {
    /// Splits `s` (at most 48 bytes in a `luo_file_ser`) into base and components.
    pub fn parse(s: &'a str) -> Self {
        let mut parts = s.split(';');
        Compatible {
            base: parts.next().unwrap_or_default(),
            components: parts.filter(|c| !c.is_empty()).collect(),
        }
    }
}

/// Owner label prefix of preserved memory a record points at that this reader could not
/// decode (`unparsed:<session>/<token>`, or `unparsed:<subtree>`).
pub const UNPARSED_PREFIX: &str = "unparsed:";

/// Components this reader understands after a [`MEMFD_COMPATIBLE`] base: the folio array
/// layout it decodes (`struct kho_vmalloc`, `kho_restore_vmalloc()`).
pub const MEMFD_COMPONENTS: &[&str] = &["vmalloc-v1"];

/// A preserved file whose `compatible` this reader cannot decode: its contents are not in the
/// labelled preserved set, so a report must say so rather than count it as checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnknownCompatible {
    /// Session holding the file.
    pub session: String,
    /// The file's token.
    pub token: u64,
    /// The whole `compatible` string.
    pub compatible: String,
    /// The parts not understood: the base if it is unknown, else the unknown components.
    pub unknown: Vec<String>,
    /// Guest address of its `struct luo_file_ser`.
    #[serde(default)]
    pub ser_pa: u64,
    /// The record's 64 bytes (`compatible[48]`, `data`, `token`), in hex.
    #[serde(default)]
    pub bytes: String,
    /// Its handler-private `data`: the address of what this reader could not decode
    /// (labelled `unparsed:<session>/<token>` in the preserved set when it is preserved).
    #[serde(default)]
    pub data: u64,
}

/// Bytes as lower-case hex, two digits each.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `compatible` tells this reader to do: decode a memfd, or report the parts it does not
/// know.
fn classify(compatible: &str) -> Result<(), Vec<String>> {
    let base = if Compatible::parse(compatible).base == MEMFD_RENAMED {
        MEMFD_RENAMED
    } else {
        MEMFD_COMPATIBLE
    };
    understood(compatible, base, MEMFD_COMPONENTS)
}

/// One entry of a block list: its guest address and its bytes.
type BlockEntry = (u64, Vec<u8>);

/// One parse of LUO's records: guest memory, the parse's budget, and every page the records
/// reached so far with what reached it. Every LUO record lives in pages of its own
/// (`kho_alloc_preserve()`, `kho_block` pages, vmalloc pages, folios), so a page reached twice
/// means records that alias: corruption or an attack that multiplies work, refused either way.
struct Reader<'a, M: ?Sized> {
    mem: &'a M,
    budget: &'a Budget,
    claims: HashMap<u64, &'static str>,
}

impl<M: GuestMemoryRead + ?Sized> Reader<'_, M> {
    /// Records that `what` reaches the page holding `pa`.
    fn claim(&mut self, pa: u64, what: &'static str) -> Result<(), LuoError> {
        let page = pa & !(PAGE_SIZE - 1);
        match self.claims.entry(page) {
            Entry::Occupied(first) => Err(LuoError::PageReachedTwice {
                page,
                first: first.get(),
                second: what,
            }),
            Entry::Vacant(v) => {
                v.insert(what);
                Ok(())
            }
        }
    }

    /// Claims and reads the whole page at `pa`, which must be page-aligned.
    fn page(&mut self, pa: u64, what: &'static str) -> Result<Vec<u8>, LuoError> {
        if pa % PAGE_SIZE != 0 {
            return Err(LuoError::Misaligned { what, pa });
        }
        self.claim(pa, what)?;
        self.budget.read(PAGE_BYTES)?;
        Ok(read_vec(self.mem, pa, PAGE_BYTES)?)
    }

    /// Reads the entries of a `kho_block_header_ser` list the way `kho_block_set_restore()`
    /// and the block iterator do; returns the block addresses and the concatenated entries
    /// (each a record), each with its guest address.
    fn blocks(
        &mut self,
        head: u64,
        entry_size: usize,
        what: &'static str,
    ) -> Result<(Vec<u64>, Vec<BlockEntry>), LuoError> {
        let per_block = ((PAGE_BYTES - BLOCK_HEADER_SIZE) / entry_size) as u64;
        let mut seen = HashSet::new();
        let (mut blocks, mut entries) = (Vec::new(), Vec::new());
        let mut at = head;
        while at != 0 {
            if !seen.insert(at) {
                return Err(LuoError::Cycle { what, pa: at });
            }
            if blocks.len() == MAX_BLOCKS {
                return Err(LuoError::TooManyBlocks(what));
            }
            let page = self.page(at, what)?;
            let (next, count) = (page.u64_at(0).unwrap_or(0), page.u64_at(8).unwrap_or(0));
            if count == 0 || count > per_block {
                return Err(LuoError::BadBlockCount {
                    what,
                    pa: at,
                    count,
                });
            }
            self.budget.records(1 + count)?;
            blocks.push(at);
            let body = page.get(BLOCK_HEADER_SIZE..).unwrap_or_default();
            // `at` is a page-aligned page just read: its entries' addresses do not wrap.
            let first = at.wrapping_add(BLOCK_HEADER_SIZE as u64);
            entries.extend(
                body.chunks_exact(entry_size)
                    .take(to_usize(count))
                    .enumerate()
                    .map(|(i, e)| (first.wrapping_add((i * entry_size) as u64), e.to_vec())),
            );
            at = next;
        }
        Ok((blocks, entries))
    }

    /// A C string field of a record, kept: its bytes are charged.
    fn name(&self, field: &[u8]) -> Result<String, LuoError> {
        let s = c_string(field);
        self.budget.bytes(s.len())?;
        Ok(s)
    }

    fn luo(&mut self, subtree: &KhoSubtree) -> Result<LuoState, LuoError> {
        if subtree.blob_size < LUO_SER_SIZE as u64 {
            return Err(LuoError::ShortBlob(subtree.blob_size));
        }
        self.claim(subtree.preserved_data, "luo_ser")?;
        // The header's width follows its compatible string (LUO_ABI_COMPAT_LEN): read the
        // string first, within the blob.
        let head_len = to_usize(subtree.blob_size.min((MAX_LUO_COMPAT_LEN + 24) as u64));
        self.budget.read(head_len)?;
        let ser = read_vec(self.mem, subtree.preserved_data, head_len)?;
        let compatible = c_string(
            ser.get(..head_len.min(MAX_LUO_COMPAT_LEN))
                .unwrap_or_default(),
        );
        if luo_compatible_understood(&compatible).is_err() {
            return Err(LuoError::Incompatible(compatible));
        }
        let width = luo_compat_len(&compatible);
        // `ser` holds min(blob_size, MAX_LUO_COMPAT_LEN + 24) bytes.
        if ser.len() < width + 24 {
            return Err(LuoError::ShortBlob(subtree.blob_size));
        }
        self.budget.bytes(compatible.len())?;
        let field = |off| ser.u64_at(width + off).unwrap_or(0);
        let (liveupdate_num, sessions_pa, flb_pa) = (field(0), field(8), field(16));
        let (session_blocks, raw_sessions) =
            self.blocks(sessions_pa, SESSION_SER_SIZE, "session block")?;
        let mut unknown_compatibles = Vec::new();
        let sessions = raw_sessions
            .iter()
            .map(|(pa, s)| self.session(*pa, s, &mut unknown_compatibles))
            .collect::<Result<_, _>>()?;
        let (flb_pgcnt, flbs) = self.flbs(flb_pa)?;
        Ok(LuoState {
            ser_pa: subtree.preserved_data,
            liveupdate_num,
            sessions,
            flbs,
            flb_pa,
            flb_pgcnt,
            session_blocks,
            unknown_compatibles,
            compatible,
        })
    }

    fn session(
        &mut self,
        ser_pa: u64,
        raw: &[u8],
        unknown: &mut Vec<UnknownCompatible>,
    ) -> Result<Session, LuoError> {
        let name = self.name(raw.get(..64).unwrap_or_default())?;
        let files_pa = raw.u64_at(64).unwrap_or(0);
        let declared = raw.u64_at(72).unwrap_or(0);
        let (file_blocks, raw_files) = self.blocks(files_pa, FILE_SER_SIZE, "file block")?;
        if raw_files.len() as u64 != declared {
            return Err(LuoError::FileCountMismatch {
                session: name,
                declared,
                found: raw_files.len() as u64,
            });
        }
        let mut files = Vec::with_capacity(raw_files.len());
        for (file_pa, f) in &raw_files {
            let compatible = self.name(f.get(..48).unwrap_or_default())?;
            let data = f.u64_at(48).unwrap_or(0);
            let token = f.u64_at(56).unwrap_or(0);
            let memfd = match classify(&compatible) {
                Ok(()) => Some(self.memfd(data)?),
                Err(parts) => {
                    self.budget.records(1)?;
                    self.budget.bytes(
                        name.len()
                            + compatible.len()
                            + parts.iter().map(String::len).sum::<usize>(),
                    )?;
                    self.budget.bytes(2 * FILE_SER_SIZE)?;
                    unknown.push(UnknownCompatible {
                        session: name.clone(),
                        token,
                        compatible: compatible.clone(),
                        unknown: parts,
                        ser_pa: *file_pa,
                        bytes: hex(f),
                        data,
                    });
                    None
                }
            };
            files.push(PreservedFile {
                compatible,
                token,
                data,
                memfd,
                ser_pa: *file_pa,
            });
        }
        Ok(Session {
            name,
            files,
            file_blocks,
            ser_pa,
        })
    }

    /// The FLB header's `pgcnt` and its entries.
    fn flbs(&mut self, pa: u64) -> Result<(u64, Vec<Flb>), LuoError> {
        if pa == 0 {
            return Ok((0, Vec::new()));
        }
        self.budget.read(16)?;
        let hdr: [u8; 16] = read_array(self.mem, pa)?;
        let (pgcnt, count) = (hdr.u64_at(0).unwrap_or(0), hdr.u64_at(8).unwrap_or(0));
        // The kernel trusts `count` (luo_flb.c); here it must fit in the `pgcnt` pages.
        let room = pgcnt
            .checked_mul(PAGE_SIZE)
            .and_then(|b| b.checked_sub(16))
            .map_or(0, |b| b / FLB_SER_SIZE as u64)
            .min(MAX_BLOCKS as u64);
        if count > room {
            return Err(LuoError::BadFlbCount { pgcnt, count });
        }
        let len = 16 + to_usize(count) * FLB_SER_SIZE;
        for page in (0..len.div_ceil(PAGE_BYTES) as u64).map(|i| pa.wrapping_add(i * PAGE_SIZE)) {
            self.claim(page, "FLB header")?;
        }
        self.budget.read(len)?;
        self.budget.records(count)?;
        let raw = read_vec(self.mem, pa.saturating_add(16), len - 16)?;
        let flbs = raw
            .chunks_exact(FLB_SER_SIZE)
            .map(|e| {
                Ok(Flb {
                    name: self.name(e.get(..48).unwrap_or_default())?,
                    data: e.u64_at(48).unwrap_or(0),
                    count: e.u64_at(56).unwrap_or(0),
                })
            })
            .collect::<Result<_, LuoError>>()?;
        Ok((pgcnt, flbs))
    }

    /// Reads `struct memfd_luo_ser` at `pa` and the folio array behind its vmalloc
    /// descriptor, checking what `kho_restore_vmalloc()` checks (pages add up to
    /// `total_pages`), and that every page it reaches (the record, the chunks, the array
    /// pages, each folio) is reached once, and every folio is guest RAM.
    fn memfd(&mut self, pa: u64) -> Result<Memfd, LuoError> {
        let err = |what| LuoError::Memfd { pa, what };
        self.claim(pa, "memfd_luo_ser")?;
        self.budget.read(MEMFD_SER_SIZE)?;
        let s: [u8; MEMFD_SER_SIZE] = read_array(self.mem, pa)?;
        let f = |off| s.u64_at(off).unwrap_or(0);
        let nr_folios = f(24);
        let first_chunk = f(32);
        let vmalloc = Vmalloc {
            first: first_chunk,
            total_pages: s.u32_at(40).unwrap_or(0),
            flags: s.u16_at(44).unwrap_or(0),
            order: s.u16_at(46).unwrap_or(0),
        };
        let total_pages = u64::from(vmalloc.total_pages);
        let order = u32::from(vmalloc.order);
        if nr_folios > MAX_MEMFD_FOLIOS {
            return Err(err("too many folios"));
        }
        let needed_bytes = nr_folios * FOLIO_SER_SIZE as u64;
        if needed_bytes > total_pages * PAGE_SIZE {
            return Err(err("folio array larger than its vmalloc area"));
        }
        let contig = 1u64
            .checked_shl(order)
            .filter(|&c| c <= total_pages.max(1))
            .ok_or(err("vmalloc order too large"))?;
        // vcalloc(nr_folios, 16) maps just enough pages (rounded up to the mapping order).
        if total_pages > needed_bytes.div_ceil(PAGE_SIZE).next_multiple_of(contig) {
            return Err(err("vmalloc area larger than the folio array needs"));
        }

        // Chunk list -> pages of the vmalloc area, in order.
        let mut metadata_pages = Vec::new();
        let mut area_pages: Vec<u64> = Vec::new();
        let mut chunks: Vec<VmallocChunk> = Vec::new();
        let mut chunk = if nr_folios == 0 { 0 } else { first_chunk };
        while chunk != 0 {
            if chunks.len() >= MAX_BLOCKS {
                return Err(err("vmalloc chunk list is too long"));
            }
            // A chunk listed twice (a loop) is a page reached twice.
            let page = self.page(chunk, "vmalloc chunk")?;
            self.budget.records(1)?;
            metadata_pages.push(chunk);
            let mut entries = 0u32;
            for phys in page
                .chunks_exact(8)
                .skip(1)
                .map(|b| b.u64_at(0).unwrap_or(0))
            {
                if phys == 0 {
                    break;
                }
                if area_pages.len() as u64 + contig > total_pages {
                    return Err(err("vmalloc chunks list more pages than total_pages"));
                }
                if phys % PAGE_SIZE != 0 {
                    return Err(LuoError::Misaligned {
                        what: "memfd folio array",
                        pa: phys,
                    });
                }
                self.budget.records(contig)?;
                entries += 1;
                for i in 0..contig {
                    let p = phys.wrapping_add(i << PAGE_SHIFT);
                    self.claim(p, "memfd folio array")?;
                    area_pages.push(p);
                }
            }
            chunks.push(VmallocChunk { pa: chunk, entries });
            chunk = page.u64_at(0).unwrap_or(0);
        }
        if nr_folios != 0 && area_pages.len() as u64 != total_pages {
            return Err(err("vmalloc chunks list fewer pages than total_pages"));
        }

        let mut folios = Vec::new();
        let mut left = to_usize(nr_folios);
        for &page_pa in &area_pages {
            if left == 0 {
                break;
            }
            self.budget.read(PAGE_BYTES)?;
            self.budget.records(1)?;
            metadata_pages.push(page_pa);
            let page = read_vec(self.mem, page_pa, PAGE_BYTES)?;
            let entries = page.chunks_exact(FOLIO_SER_SIZE).take(left);
            self.budget.records(entries.len() as u64)?;
            for e in entries {
                let w = e.u64_at(0).unwrap_or(0);
                let folio = MemfdFolio {
                    pfn: w & ((1 << 52) - 1),
                    flags: (w >> 52) as u16,
                    index: e.u64_at(8).unwrap_or(0),
                };
                if folio.pfn != 0 {
                    let at = folio.pfn << PAGE_SHIFT; // pfn < 2^52: no bits lost
                    self.budget.check_ram("memfd folio", at, PAGE_SIZE)?;
                    self.claim(at, "memfd folio")?;
                }
                folios.push(folio);
            }
            left = to_usize(nr_folios) - folios.len();
        }
        Ok(Memfd {
            pos: f(0),
            size: f(8),
            seals: s.u32_at(16).unwrap_or(0),
            flags: s.u32_at(20).unwrap_or(0),
            folios,
            metadata_pages,
            vmalloc,
            chunks,
        })
    }
}

/// Reads LUO's state from its KHO subtree (`luo_ser` -> sessions -> files -> memfds, and the
/// FLBs), as `luo_session_deserialize()`, `luo_file_deserialize()` and
/// `memfd_luo_retrieve()` would, charging `budget` for every page read and record kept.
///
/// Errors: unreadable memory, counts or lists the kernel would refuse, a page reached by two
/// records ([`LuoError::PageReachedTwice`]), a folio outside guest RAM or a budget run out
/// ([`LuoError::Budget`]). Files whose `compatible` is not understood are kept and listed in
/// [`LuoState::unknown_compatibles`].
pub fn read_luo(
    mem: &(impl GuestMemoryRead + ?Sized),
    subtree: &KhoSubtree,
    budget: &Budget,
) -> Result<LuoState, LuoError> {
    Reader {
        mem,
        budget,
        claims: HashMap::new(),
    }
    .luo(subtree)
}

impl LuoState {
    /// Every guest range LUO's state refers to, with an owner label: the `luo_ser` blob,
    /// block pages, memfd descriptors, vmalloc chunks and folio arrays, and memfd contents
    /// (one page per folio: the folio's order lives only in the radix tree).
    pub fn owned_ranges(&self) -> Vec<(u64, u64, String)> {
        let page = |pa: u64, label: String| (pa, pa.saturating_add(PAGE_SIZE), label);
        let mut out = vec![(
            self.ser_pa,
            self.ser_pa.saturating_add(self.ser_size() as u64),
            "LUO".to_owned(),
        )];
        out.extend(
            self.session_blocks
                .iter()
                .map(|&b| page(b, "LUO/sessions".into())),
        );
        if self.flb_pa != 0 {
            out.push(page(self.flb_pa, "LUO/flb".into()));
        }
        for s in &self.sessions {
            out.extend(
                s.file_blocks
                    .iter()
                    .map(|&b| page(b, format!("session:{}/files", s.name))),
            );
            for f in &s.files {
                let Some(m) = &f.memfd else {
                    // A file this reader cannot decode: the page its `data` points at is
                    // labelled as such (what lies beyond it is unknown).
                    if f.data != 0 {
                        out.push(page(
                            f.data & !(PAGE_SIZE - 1),
                            format!("{UNPARSED_PREFIX}{}/{:#x}", s.name, f.token),
                        ));
                    }
                    continue;
                };
                let who = format!("memfd:{}/{:#x}", s.name, f.token);
                out.push((
                    f.data,
                    f.data.saturating_add(MEMFD_SER_SIZE as u64),
                    who.clone(),
                ));
                out.extend(
                    m.metadata_pages
                        .iter()
                        .map(|&p| page(p, format!("{who}/meta"))),
                );
                out.extend(
                    pfn_ranges(m.folios.iter().map(|fo| fo.pfn))
                        .map(|(s, e)| (s, e, format!("{who}/data"))),
                );
            }
        }
        out
    }
}

/// Coalesces page frame numbers (0 = hole, skipped) into sorted `[start, end)` byte ranges.
fn pfn_ranges(pfns: impl Iterator<Item = u64>) -> impl Iterator<Item = (u64, u64)> {
    let mut v: Vec<u64> = pfns.filter(|&p| p != 0).collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for pfn in v {
        let start = pfn << PAGE_SHIFT; // pfn < 2^52: no bits lost
        let end = start.saturating_add(PAGE_SIZE);
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{LuoLayout, MemfdSpec, SessionSpec, WriteMem};
    use crate::mem::SparseMemory;

    /// [`read_luo`] with the budget of `mem`'s RAM.
    fn read(mem: &SparseMemory, subtree: &KhoSubtree) -> Result<LuoState, LuoError> {
        read_luo(mem, subtree, &Budget::for_memory(mem))
    }

    fn layout() -> (SparseMemory, LuoLayout) {
        let mut mem = SparseMemory::new(0, 1 << 32);
        let sessions = vec![
            SessionSpec {
                name: "state".into(),
                memfds: vec![MemfdSpec {
                    token: 7,
                    first_pfn: 0x1_0000,
                    folios: 256,
                    size: 1 << 20,
                }],
                other_files: vec![("liveupdate-test-v1".into(), 9)],
            },
            SessionSpec {
                name: "empty".into(),
                memfds: vec![],
                other_files: vec![],
            },
        ];
        let l = LuoLayout::write(&mut mem, 0x100_0000, 4, &sessions).unwrap();
        (mem, l)
    }

    #[test]
    fn reads_sessions_files_and_memfd_folios() {
        let (mem, l) = layout();
        let st = read(&mem, &l.subtree).unwrap();
        assert_eq!(st.liveupdate_num, 4);
        assert_eq!(st.sessions.len(), 2);
        let s = &st.sessions[0];
        assert_eq!(s.name, "state");
        assert_eq!(s.files.len(), 2);
        let m = s.files[0].memfd.as_ref().unwrap();
        assert_eq!(s.files[0].compatible, MEMFD_COMPATIBLE);
        assert_eq!(s.files[0].token, 7);
        assert_eq!(m.size, 1 << 20);
        assert_eq!(m.folios.len(), 256);
        assert_eq!(
            m.folios[3],
            MemfdFolio {
                pfn: 0x1_0003,
                flags: 3,
                index: 3
            }
        );
        assert_eq!(s.files[1].compatible, "liveupdate-test-v1");
        assert!(s.files[1].memfd.is_none());
        assert!(st.sessions[1].files.is_empty());
        assert_eq!(
            st.flbs,
            vec![Flb {
                name: "test-flb".into(),
                data: 0xabc,
                count: 1
            }]
        );
        let owned = st.owned_ranges();
        let data: Vec<_> = owned.iter().filter(|r| r.2.ends_with("/data")).collect();
        assert_eq!(data.len(), 1, "256 contiguous folios coalesce");
        assert_eq!((data[0].0, data[0].1), (0x1_0000 << 12, 0x1_0100 << 12));
        let r: Vec<_> = pfn_ranges([5, 0, 3, 4, 9, 4].into_iter()).collect();
        assert_eq!(r, vec![(3 << 12, 6 << 12), (9 << 12, 10 << 12)]);
    }

    /// The first file record of session 0 (`struct luo_file_ser`).
    fn first_file(mem: &SparseMemory, l: &LuoLayout) -> u64 {
        crate::mem::read_u64_le(mem, l.session_block + 16 + 64).unwrap() + 16
    }

    fn set_compatible(mem: &mut SparseMemory, file: u64, c: &str) {
        let mut field = [0u8; 48];
        field[..c.len()].copy_from_slice(c.as_bytes());
        mem.put(file, &field).unwrap();
    }

    #[test]
    fn compatible_strings_split_into_base_and_components() {
        let c = Compatible::parse("memfd-v2;vmalloc-v1;;x");
        assert_eq!(
            (c.base, c.components),
            ("memfd-v2", vec!["vmalloc-v1", "x"])
        );
        let c = Compatible::parse("memfd-v2");
        assert_eq!((c.base, c.components.len()), ("memfd-v2", 0));
        assert_eq!(Compatible::parse("").base, "");
        assert_eq!(classify("memfd-v2"), Ok(()));
        assert_eq!(classify("memfd-v2;vmalloc-v1"), Ok(()));
        assert_eq!(
            classify("memfd-v2;vmalloc-v1;hugetlb-v1"),
            Err(vec!["hugetlb-v1".to_string()])
        );
        assert_eq!(
            classify("memfd-v3;vmalloc-v1"),
            Err(vec!["memfd-v3".to_string()])
        );
    }

    #[test]
    fn granular_luo_headers_are_wider() {
        assert_eq!(luo_compat_len("luo-v5"), 8);
        assert_eq!(luo_compat_len("luo-v5;block-v1"), 16);
        assert_eq!(luo_compat_len("luo-v5;block-v1;x"), 24);
        assert_eq!(luo_compatible_understood("luo-v5;block-v1"), Ok(()));
        assert_eq!(
            luo_compatible_understood("luo-v5;block-v2"),
            Err(vec!["block-v2".to_string()])
        );
        assert_eq!(
            luo_compatible_understood("luo-v6"),
            Err(vec!["luo-v6".to_string()])
        );
        // The header as the granular kernel writes it: compatible[16], then the counters.
        let (mut mem, l) = layout();
        let before = read(&mem, &l.subtree).unwrap();
        let pa = l.subtree.preserved_data;
        let ser = read_vec(&mem, pa, LUO_SER_SIZE).unwrap();
        let mut wide = vec![0u8; 16];
        wide[..15].copy_from_slice(b"luo-v5;block-v1");
        wide.extend_from_slice(&ser[8..]);
        mem.put(pa, &wide).unwrap();
        let granular = read(
            &mem,
            &KhoSubtree {
                blob_size: 40,
                ..l.subtree.clone()
            },
        )
        .unwrap();
        assert_eq!(granular.compatible, "luo-v5;block-v1");
        assert_eq!(granular.ser_size(), 40);
        assert_eq!(
            (granular.liveupdate_num, granular.sessions.len()),
            (before.liveupdate_num, before.sessions.len())
        );
        // Another ABI altogether is refused (the handover lists it as unparsed).
        mem.put(pa, b"luo-v9\0\0").unwrap();
        assert_eq!(
            read(&mem, &l.subtree),
            Err(LuoError::Incompatible("luo-v9".into()))
        );
    }

    #[test]
    fn unknown_compatibles_are_reported_not_dropped() {
        let (mut mem, l) = layout();
        let st = read(&mem, &l.subtree).unwrap();
        let u = &st.unknown_compatibles;
        assert_eq!(u.len(), 1);
        assert_eq!(
            (u[0].session.as_str(), u[0].token, u[0].compatible.as_str()),
            ("state", 9, "liveupdate-test-v1")
        );
        assert_eq!(u[0].unknown, ["liveupdate-test-v1"]);
        // Listed with its record's bytes and where it lies: the compatible, data, token.
        let f = st.sessions[0].files.iter().find(|f| f.token == 9).unwrap();
        assert_eq!(u[0].ser_pa, f.ser_pa);
        assert_eq!(u[0].data, f.data);
        assert_eq!(u[0].bytes.len(), 2 * FILE_SER_SIZE);
        assert!(u[0].bytes.starts_with(&hex(b"liveupdate-test-v1\0")));
        assert!(u[0].bytes.ends_with(&hex(&9u64.to_le_bytes())));
        // The page its data points at is labelled as not parsed.
        if f.data != 0 {
            let owners = st.owned_ranges();
            assert!(owners
                .iter()
                .any(|(a, _, o)| *a == f.data & !(PAGE_SIZE - 1) && o == "unparsed:state/0x9"));
        }
        let file = first_file(&mem, &l);
        // The renamed handler has memfd-v2's layout: decoded.
        set_compatible(&mut mem, file, "memfd");
        let st = read(&mem, &l.subtree).unwrap();
        assert!(st.sessions[0].files[0].memfd.is_some());
        assert_eq!(
            classify("memfd;hugetlb-v1"),
            Err(vec!["hugetlb-v1".to_string()])
        );
        assert_eq!(classify("memfd-v3"), Err(vec!["memfd-v3".to_string()]));
        // With components this reader knows, the memfd is still decoded.
        set_compatible(&mut mem, file, "memfd-v2;vmalloc-v1");
        let st = read(&mem, &l.subtree).unwrap();
        assert_eq!(st.sessions[0].files[0].compatible, "memfd-v2;vmalloc-v1");
        assert_eq!(
            st.sessions[0].files[0].memfd.as_ref().unwrap().folios.len(),
            256
        );
        assert_eq!(st.unknown_compatibles.len(), 1);
        // Another version, or an unknown component: reported, and its folios not claimed.
        for (c, unknown) in [
            ("memfd-v3", "memfd-v3"),
            ("memfd-v2;vmalloc-v2", "vmalloc-v2"),
        ] {
            set_compatible(&mut mem, file, c);
            let st = read(&mem, &l.subtree).unwrap();
            assert!(st.sessions[0].files[0].memfd.is_none());
            let u = &st.unknown_compatibles[0];
            assert_eq!((u.token, u.compatible.as_str()), (7, c));
            assert_eq!(u.unknown, vec![unknown.to_string()]);
            assert!(!st.owned_ranges().iter().any(|r| r.2.ends_with("/data")));
        }
    }

    #[test]
    fn a_page_reached_twice_is_refused() {
        let (mut mem, l) = layout();
        // The second file becomes a memfd sharing the first one's record.
        let second = first_file(&mem, &l) + FILE_SER_SIZE as u64;
        set_compatible(&mut mem, second, MEMFD_COMPATIBLE);
        mem.put(second + 48, &l.memfd_ser[0].to_le_bytes()).unwrap();
        assert_eq!(
            read(&mem, &l.subtree),
            Err(LuoError::PageReachedTwice {
                page: l.memfd_ser[0],
                first: "memfd_luo_ser",
                second: "memfd_luo_ser"
            })
        );
        // A folio that is the session block.
        let (mut mem, l) = layout();
        let chunk = crate::mem::read_u64_le(&mem, l.memfd_ser[0] + 32).unwrap();
        let array = crate::mem::read_u64_le(&mem, chunk + 8).unwrap();
        mem.put(
            array + 16,
            &(l.session_block >> PAGE_SHIFT | 3 << 52).to_le_bytes(),
        )
        .unwrap();
        assert_eq!(
            read(&mem, &l.subtree),
            Err(LuoError::PageReachedTwice {
                page: l.session_block,
                first: "session block",
                second: "memfd folio"
            })
        );
        // A folio outside guest RAM (4 GiB here).
        mem.put(array + 16, &(1u64 << 40 >> PAGE_SHIFT).to_le_bytes())
            .unwrap();
        assert_eq!(
            read(&mem, &l.subtree),
            Err(LuoError::Budget(BudgetError::OutsideRam {
                what: "memfd folio",
                start: 1 << 40,
                len: PAGE_SIZE
            }))
        );
    }

    #[test]
    fn many_sessions_span_blocks() {
        let mut mem = SparseMemory::new(0, 1 << 32);
        let sessions: Vec<_> = (0..120)
            .map(|i| SessionSpec {
                name: format!("s{i}"),
                memfds: vec![],
                other_files: vec![],
            })
            .collect();
        let l = LuoLayout::write(&mut mem, 0x100_0000, 1, &sessions).unwrap();
        let st = read(&mem, &l.subtree).unwrap();
        assert_eq!(st.sessions.len(), 120);
        assert_eq!(st.session_blocks.len(), 3, "51 sessions per block");
        assert_eq!(st.sessions[119].name, "s119");
    }

    #[test]
    fn corruption_is_reported() {
        let (mut mem, l) = layout();
        let short = KhoSubtree {
            blob_size: 8,
            ..l.subtree.clone()
        };
        assert_eq!(read(&mem, &short), Err(LuoError::ShortBlob(8)));
        // Session block pointing at itself.
        let first_block = l.session_block;
        mem.put(first_block, &first_block.to_le_bytes()).unwrap();
        assert!(matches!(
            read(&mem, &l.subtree),
            Err(LuoError::Cycle {
                what: "session block",
                ..
            })
        ));
        mem.put(first_block, &0u64.to_le_bytes()).unwrap();
        mem.put(first_block + 8, &52u64.to_le_bytes()).unwrap();
        assert!(matches!(
            read(&mem, &l.subtree),
            Err(LuoError::BadBlockCount { count: 52, .. })
        ));
        mem.put(first_block + 8, &2u64.to_le_bytes()).unwrap();
        // File count mismatch in session 0.
        mem.put(first_block + 16 + 72, &5u64.to_le_bytes()).unwrap();
        assert!(matches!(
            read(&mem, &l.subtree),
            Err(LuoError::FileCountMismatch { declared: 5, .. })
        ));
        mem.put(first_block + 16 + 72, &2u64.to_le_bytes()).unwrap();
        assert!(read(&mem, &l.subtree).is_ok());
        // memfd total_pages too small for nr_folios.
        mem.put(l.memfd_ser[0] + 40, &0u32.to_le_bytes()).unwrap();
        assert!(matches!(
            read(&mem, &l.subtree),
            Err(LuoError::Memfd { .. })
        ));
        mem.put(l.subtree.preserved_data, b"luo-v4\0\0").unwrap();
        assert_eq!(
            read(&mem, &l.subtree),
            Err(LuoError::Incompatible("luo-v4".into()))
        );
    }
}
