//! KHO's preserved-memory radix tree (`kho-v4`), read from guest memory.
//!
//! ABI: `include/linux/kho/abi/kexec_handover.h` ("KHO persistent memory tracker") and
//! `kho_radix_*()` in `kernel/liveupdate/kexec_handover.c`. With 4 KiB pages:
//!
//! * a key encodes a preserved block of `2^order` pages: bit `52 - order` is set (the "order
//!   bit") and the bits below it hold `pa >> (12 + order)`;
//! * the tree has 6 levels: levels 5..1 are pages of 512 `u64` physical addresses (0 = empty),
//!   level 0 is a 4096-byte bitmap (32768 bits);
//! * level `l` (1..=5) is indexed by key bits `[15 + 9(l-1), 15 + 9l)`, the bitmap by bits
//!   `[0, 15)`.
//!
//! The walk copies each node out of the guest, checks that every pointer is non-zero,
//! page-aligned, readable and not seen before (a real tree never shares nodes, so sharing means
//! corruption or a cycle), rejects bits whose key decodes to no valid order and blocks that are
//! not guest RAM, and charges the parse's [`Budget`] a page per node and a record per node and
//! per run. Consecutive blocks of the same order are coalesced into [`PreservedRun`]s so that
//! 10 million preserved pages need not become 10 million records.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::budget::{Budget, BudgetError};
use crate::mem::{GuestMemoryRead, MemError, PAGE_BYTES, PAGE_SHIFT, PAGE_SIZE};

/// `KHO_ORDER_0_LOG2`: position of the order bit of an order-0 key.
pub const ORDER_0_BIT: u32 = 64 - PAGE_SHIFT;
/// `KHO_TABLE_SIZE_LOG2`: index bits per table level.
pub const TABLE_BITS: u32 = 9;
/// `KHO_BITMAP_SIZE_LOG2`: index bits of the leaf bitmap.
pub const BITMAP_BITS: u32 = PAGE_SHIFT + 3;
/// `KHO_TREE_MAX_DEPTH`: table levels plus the bitmap level.
pub const TREE_DEPTH: u32 = (ORDER_0_BIT - BITMAP_BITS + 1).div_ceil(TABLE_BITS) + 1;
/// Highest order a key can encode (`12 + order` must stay below 64 for the decode shift).
pub const MAX_ORDER: u32 = ORDER_0_BIT - 1;

const ENTRIES: usize = (PAGE_SIZE / 8) as usize;

/// Errors from walking the radix tree.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RadixError {
    /// `preserved-memory-map` is 0.
    #[error("preserved-memory-map is 0")]
    NullRoot,
    /// A node could not be read.
    #[error("radix node at {pa:#x} (level {level}) unreadable: {source}")]
    Unreadable {
        /// Node address.
        pa: u64,
        /// Its level (0 = bitmap).
        level: u32,
        /// Why.
        source: MemError,
    },
    /// A node pointer is not page-aligned.
    #[error("radix node pointer {pa:#x} (level {level}) is not page-aligned")]
    Misaligned {
        /// Pointer value.
        pa: u64,
        /// Level it points to.
        level: u32,
    },
    /// A node is referenced twice (cycle or shared subtree).
    #[error("radix node {pa:#x} referenced twice (cycle or shared node)")]
    Revisited {
        /// The node.
        pa: u64,
    },
    /// A set bit decodes to a key with no valid order bit.
    #[error("radix key {key:#x} encodes no valid order")]
    InvalidKey {
        /// The key.
        key: u64,
    },
    /// The parse's budget ran out (nodes read, runs kept), or a block is not guest RAM.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// `count` consecutive preserved blocks of `2^order` pages starting at `pa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedRun {
    /// Physical address of the first block.
    pub pa: u64,
    /// Block order (pages per block = `2^order`).
    pub order: u32,
    /// Number of blocks.
    pub count: u64,
}

impl PreservedRun {
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        1u64.checked_shl(PAGE_SHIFT + self.order)
            .map_or(u64::MAX, |block| self.count.saturating_mul(block))
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.pa.saturating_add(self.len())
    }
}

/// Everything the tree says is preserved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedMemory {
    /// Coalesced runs in key order (descending order, then ascending address).
    pub runs: Vec<PreservedRun>,
    /// Number of preserved blocks (set bits).
    pub blocks: u64,
    /// Number of distinct 4 KiB pages covered: a page under two blocks (which a real tree
    /// never has; `one-owner-per-page` reports it) is counted once.
    pub pages: u64,
    /// Guest addresses of the tree's own nodes (tables and bitmaps). They are *not* preserved
    /// memory, yet the next kernel reads them: they must survive until `kho_memory_init()`.
    pub node_pages: Vec<u64>,
    /// The same nodes, in the same order, with their place in the tree (what
    /// [`crate::fields`] needs to name each entry).
    #[serde(default)]
    pub nodes: Vec<RadixNode>,
}

/// One node of the tree as the walk reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RadixNode {
    /// Guest address of the node page.
    pub pa: u64,
    /// Its level: [`TREE_DEPTH`]` - 1` for the root, 0 for a bitmap.
    pub level: u32,
    /// Guest address of the parent's entry that points here (0 for the root, which the FDT's
    /// `preserved-memory-map` points at).
    pub slot: u64,
    /// The key bits above this node's index bits (0 for the root).
    pub prefix: u64,
}

/// `kho_radix_encode_key()`; `None` for an order above [`MAX_ORDER`].
pub fn encode_key(pa: u64, order: u32) -> Option<u64> {
    let order_bit = ORDER_0_BIT
        .checked_sub(order)
        .filter(|_| order <= MAX_ORDER)?;
    Some(1u64 << order_bit | pa >> (PAGE_SHIFT + order))
}

/// `kho_radix_decode_key()`, returning `(pa, order)`, or `None` where the kernel's arithmetic
/// would be undefined (no order bit, or an order bit above bit 52).
pub fn decode_key(key: u64) -> Option<(u64, u32)> {
    let order_bit = 63u32.checked_sub(key.leading_zeros())?;
    let order = ORDER_0_BIT.checked_sub(order_bit)?;
    if order > MAX_ORDER {
        return None;
    }
    Some((key << (PAGE_SHIFT + order), order))
}

/// `kho_radix_get_table_index()` for `level` in 1..=5.
pub fn table_index(key: u64, level: u32) -> usize {
    ((key >> ((level - 1) * TABLE_BITS + BITMAP_BITS)) % (1 << TABLE_BITS)) as usize
}

/// `kho_radix_get_bitmap_index()`.
pub fn bitmap_index(key: u64) -> usize {
    (key % (1 << BITMAP_BITS)) as usize
}

struct Walk<'m, M: ?Sized> {
    mem: &'m M,
    budget: &'m Budget,
    seen: HashSet<u64>,
    out: PreservedMemory,
    open: Option<PreservedRun>,
    page: Box<[u8; PAGE_BYTES]>,
}

impl<M: GuestMemoryRead + ?Sized> Walk<'_, M> {
    /// Checks and reads the node at `pa` into `self.page`, returning it as 512 words.
    fn read_node(&mut self, node: RadixNode) -> Result<[u64; ENTRIES], RadixError> {
        let RadixNode { pa, level, .. } = node;
        if pa % PAGE_SIZE != 0 {
            return Err(RadixError::Misaligned { pa, level });
        }
        if self.seen.contains(&pa) {
            return Err(RadixError::Revisited { pa });
        }
        self.budget.read(PAGE_BYTES)?;
        self.budget.records(1)?;
        self.seen.insert(pa);
        self.mem
            .read_at(pa, &mut self.page[..])
            .map_err(|source| RadixError::Unreadable { pa, level, source })?;
        self.out.node_pages.push(pa);
        self.out.nodes.push(node);
        let mut words = [0u64; ENTRIES];
        for (w, b) in words.iter_mut().zip(self.page.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().unwrap_or_default());
        }
        Ok(words)
    }

    fn add_block(&mut self, key: u64) -> Result<(), RadixError> {
        let (pa, order) = decode_key(key).ok_or(RadixError::InvalidKey { key })?;
        // order <= MAX_ORDER, so the shift cannot overflow.
        self.budget
            .check_ram("KHO preserved block", pa, PAGE_SIZE << order)?;
        self.out.blocks += 1;
        if let Some(run) = &mut self.open {
            if run.order == order && run.end() == pa {
                run.count += 1;
                return Ok(());
            }
        }
        self.close_run()?;
        self.open = Some(PreservedRun {
            pa,
            order,
            count: 1,
        });
        Ok(())
    }

    /// Moves the open run, if any, to the output: one record.
    fn close_run(&mut self) -> Result<(), RadixError> {
        if let Some(done) = self.open.take() {
            self.budget.records(1)?;
            self.out.runs.push(done);
        }
        Ok(())
    }

    fn leaf(&mut self, node: RadixNode) -> Result<(), RadixError> {
        let prefix = node.prefix;
        let words = self.read_node(node)?;
        for (i, &w) in words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                self.add_block(prefix | (i as u64 * 64 + bit))?;
            }
        }
        Ok(())
    }

    /// Depth-first, in ascending key order, with an explicit stack (depth is fixed at 6).
    fn run(&mut self, root: u64) -> Result<(), RadixError> {
        let mut stack = vec![RadixNode {
            pa: root,
            level: TREE_DEPTH - 1,
            slot: 0,
            prefix: 0,
        }];
        while let Some(node) = stack.pop() {
            let table = self.read_node(node)?;
            let (pa, level, prefix) = (node.pa, node.level, node.prefix);
            let shift = (level - 1) * TABLE_BITS + BITMAP_BITS;
            let child = |i: usize, c: u64| RadixNode {
                pa: c,
                level: level - 1,
                slot: pa.wrapping_add(8 * i as u64), // a read page: no wrap in practice
                prefix: prefix | (i as u64) << shift,
            };
            let children = table.iter().enumerate().filter(|(_, &c)| c != 0);
            if level == 1 {
                for (i, &leaf) in children {
                    self.leaf(child(i, leaf))?;
                }
            } else {
                // Pushed in reverse so that the smallest index is walked first.
                for (i, &c) in children.rev() {
                    stack.push(child(i, c));
                }
            }
        }
        Ok(())
    }
}

/// Walks the tree rooted at `root` (the `preserved-memory-map` property), as
/// `kho_radix_walk_tree()` does, charging `budget` (see the module documentation).
pub fn walk(
    mem: &(impl GuestMemoryRead + ?Sized),
    root: u64,
    budget: &Budget,
) -> Result<PreservedMemory, RadixError> {
    if root == 0 {
        return Err(RadixError::NullRoot);
    }
    let mut w = Walk {
        mem,
        budget,
        seen: HashSet::new(),
        out: PreservedMemory::default(),
        open: None,
        page: Box::new([0u8; PAGE_BYTES]),
    };
    w.run(root)?;
    w.close_run()?;
    w.out.pages = distinct_pages(&w.out.runs);
    Ok(w.out)
}

/// Number of distinct 4 KiB pages under `runs`, which may overlap (a hostile tree can hold an
/// order-9 block and order-0 blocks inside it): the size of their union, not the sum of their
/// sizes. One sort and one merge over the runs, O(runs log runs) time and O(runs) memory;
/// the runs are already bounded by the parse's [`Budget`].
pub fn distinct_pages(runs: &[PreservedRun]) -> u64 {
    let mut pfns: Vec<(u64, u64)> = runs
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| (r.pa >> PAGE_SHIFT, r.end().saturating_sub(1) >> PAGE_SHIFT))
        .collect();
    pfns.sort_unstable();
    let mut pages = 0u64;
    let mut next = 0u64; // first page not yet counted
    for (first, last) in pfns {
        let first = first.max(next);
        if last >= first {
            pages = pages.saturating_add(last - first + 1);
            next = last.saturating_add(1);
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Resource, Usage};
    use crate::fixture::RadixBuilder;
    use crate::mem::{GuestRam, SparseMemory, VecMemory};

    /// The budget of a 64 GiB guest.
    fn budget() -> Budget {
        Budget::for_ram(GuestRam::new([(0, 64 << 30)]))
    }

    fn limited(pages: u64, records: u64) -> Budget {
        let ram = GuestRam::new([(0, 64 << 30)]);
        Budget::new(
            ram,
            Usage {
                pages,
                records,
                bytes: 0,
            },
        )
    }

    #[test]
    fn constants_match_the_kernel() {
        assert_eq!(ORDER_0_BIT, 52);
        assert_eq!(BITMAP_BITS, 15);
        assert_eq!(TREE_DEPTH, 6);
    }

    #[test]
    fn key_round_trip_and_header_table() {
        // The table in kexec_handover.h: order 0 -> bit 52, order 1 -> bit 51, order 2 -> 50.
        assert_eq!(encode_key(0, 0), Some(1 << 52));
        assert_eq!(encode_key(0, 1), Some(1 << 51));
        assert_eq!(encode_key(0x20_0000, 9), Some(1 << 43 | 1));
        assert_eq!(encode_key(0, 52), None);
        for (pa, order) in [
            (0x1000, 0),
            (0x7fff_f000, 0),
            (0x4000_0000, 18),
            (u64::MAX << 20, 8),
        ] {
            let pa = pa & !((PAGE_SIZE << order) - 1);
            assert_eq!(
                decode_key(encode_key(pa, order).unwrap()),
                Some((pa, order))
            );
        }
        assert_eq!(decode_key(0), None);
        assert_eq!(decode_key(1 << 53), None);
        assert_eq!(decode_key(1), None, "order 52 would shift by 64");
        assert_eq!(decode_key(2), Some((0, 51)));
    }

    #[test]
    fn indices_partition_the_key() {
        let key = encode_key(0x1234_5678_9000, 0).unwrap();
        let mut rebuilt = bitmap_index(key) as u64;
        for level in 1..TREE_DEPTH {
            rebuilt |= (table_index(key, level) as u64) << ((level - 1) * TABLE_BITS + BITMAP_BITS);
        }
        assert_eq!(rebuilt, key);
    }

    #[test]
    fn walks_mixed_orders_and_coalesces() {
        let mut mem = SparseMemory::new(0, 64 << 30);
        let mut b = RadixBuilder::new(0x100_0000);
        for pa in [0x20_0000, 0x20_1000, 0x20_2000] {
            b.preserve_block(pa, 0); // 3 order-0 pages
        }
        b.preserve_block(0x4000_0000, 9); // one 2 MiB folio
        b.preserve_block(0x4020_0000, 9); // adjacent: same run
        b.preserve_block(0x8_0000_0000, 18); // 1 GiB
        b.preserve_block(0x20_5000, 0); // separate order-0 run
        let root = b.write(&mut mem).unwrap();
        let p = walk(&mem, root, &budget()).unwrap();
        assert_eq!(
            p.runs,
            vec![
                PreservedRun {
                    pa: 0x8_0000_0000,
                    order: 18,
                    count: 1
                },
                PreservedRun {
                    pa: 0x4000_0000,
                    order: 9,
                    count: 2
                },
                PreservedRun {
                    pa: 0x20_0000,
                    order: 0,
                    count: 3
                },
                PreservedRun {
                    pa: 0x20_5000,
                    order: 0,
                    count: 1
                },
            ]
        );
        assert_eq!(p.blocks, 7);
        assert_eq!(p.pages, (1 << 18) + 1024 + 4);
        assert_eq!(p.node_pages.len(), b.node_count());
    }

    #[test]
    fn overlapping_blocks_count_distinct_pages() {
        // A hostile tree: a 2 MiB block and three order-0 blocks inside it. The blocks' sizes
        // add up to 515 pages; they cover 512 distinct ones.
        let mut mem = SparseMemory::new(0, 64 << 30);
        let mut b = RadixBuilder::new(0x100_0000);
        b.preserve_block(0x20_0000, 9);
        for pa in [0x20_0000, 0x20_1000, 0x3f_f000] {
            b.preserve_block(pa, 0);
        }
        let root = b.write(&mut mem).unwrap();
        let p = walk(&mem, root, &budget()).unwrap();
        assert_eq!(p.blocks, 4);
        let summed: u64 = p.runs.iter().map(|r| r.len() >> PAGE_SHIFT).sum();
        assert_eq!(summed, 515);
        assert_eq!(p.pages, 512);
    }

    #[test]
    fn distinct_pages_is_the_size_of_the_union() {
        let run = |pa, order, count| PreservedRun { pa, order, count };
        assert_eq!(distinct_pages(&[]), 0);
        assert_eq!(distinct_pages(&[run(0x1000, 0, 0)]), 0, "empty run");
        // Disjoint: the sum.
        assert_eq!(distinct_pages(&[run(0, 0, 3), run(0x10_0000, 1, 2)]), 7);
        // The same block twice, in any order: once.
        assert_eq!(distinct_pages(&[run(0x5000, 0, 1), run(0x5000, 0, 1)]), 1);
        // Partial overlap, out of order: [0x2000, 0x6000) and [0x4000, 0x8000) -> 6 pages.
        assert_eq!(distinct_pages(&[run(0x4000, 1, 2), run(0x2000, 0, 4)]), 6);
        // Nested in a larger block, touching its end: the larger block only.
        assert_eq!(
            distinct_pages(&[
                run(0x3f_f000, 0, 1),
                run(0x20_0000, 9, 1),
                run(0x20_0000, 0, 2)
            ]),
            512
        );
        // Adjacent runs are not overlapping.
        assert_eq!(distinct_pages(&[run(0x1000, 0, 1), run(0x2000, 0, 1)]), 2);
    }

    #[test]
    fn rejects_corrupt_trees() {
        let mut mem = VecMemory::zeroed(0, 0x10_0000);
        assert_eq!(walk(&mem, 0, &budget()), Err(RadixError::NullRoot));
        assert!(matches!(
            walk(&mem, 0x20_0000, &budget()),
            Err(RadixError::Unreadable { .. })
        ));
        assert_eq!(
            walk(&mem, 0x1008, &budget()),
            Err(RadixError::Misaligned {
                pa: 0x1008,
                level: 5
            })
        );
        // Root entry pointing back at the root: a cycle.
        mem.write(0x1000, &0x1000u64.to_le_bytes()).unwrap();
        assert_eq!(
            walk(&mem, 0x1000, &budget()),
            Err(RadixError::Revisited { pa: 0x1000 })
        );
        // A chain down to a leaf whose key has bits above the order-0 bit: invalid order.
        let mut m = VecMemory::zeroed(0, 0x10_0000);
        m.write(0x1000 + 8 * 8, &0x2000u64.to_le_bytes()).unwrap(); // level 5, index 8 (bit 54)
        for (node, next) in [
            (0x2000u64, 0x3000u64),
            (0x3000, 0x4000),
            (0x4000, 0x5000),
            (0x5000, 0x6000),
        ] {
            m.write(node, &next.to_le_bytes()).unwrap();
        }
        m.write(0x6000, &[1]).unwrap();
        assert!(matches!(
            walk(&m, 0x1000, &budget()),
            Err(RadixError::InvalidKey { .. })
        ));
        assert_eq!(
            walk(&m, 0x1000, &limited(3, 10)),
            Err(RadixError::Budget(BudgetError::Exhausted {
                resource: Resource::Pages,
                limit: 3
            }))
        );
    }

    #[test]
    fn run_limit_is_enforced() {
        let mut mem = SparseMemory::new(0, 1 << 30);
        let mut b = RadixBuilder::new(0x10_0000);
        for i in 0..10 {
            b.preserve_block(0x100_0000 + i * 0x2000, 0);
        }
        let root = b.write(&mut mem).unwrap();
        // Six nodes (five tables and a bitmap) plus ten runs.
        assert!(matches!(
            walk(&mem, root, &limited(100, 15)),
            Err(RadixError::Budget(BudgetError::Exhausted {
                resource: Resource::Records,
                ..
            }))
        ));
        let b = limited(100, 16);
        assert_eq!(walk(&mem, root, &b).unwrap().runs.len(), 10);
        assert_eq!(b.used().pages, 6);
    }

    #[test]
    fn blocks_outside_ram_are_refused() {
        let mut mem = SparseMemory::new(0, (1 << 30) - (1 << 20));
        let mut b = RadixBuilder::new(0x10_0000);
        b.preserve_block(0x100_0000, 0);
        b.preserve_block(0x3fe0_0000, 9); // 2 MiB up to 1 GiB: crosses the end of RAM
        let root = b.write(&mut mem).unwrap();
        assert_eq!(
            walk(&mem, root, &Budget::for_memory(&mem)),
            Err(RadixError::Budget(BudgetError::OutsideRam {
                what: "KHO preserved block",
                start: 0x3fe0_0000,
                len: 0x20_0000
            }))
        );
    }
}
