//! Invariants every handover must satisfy, checked on the parsed state: cheap enough to run on
//! every handover, and pure (no guest memory is read: only what [`Handover::read`] kept).
//!
//! | id | the invariant | what it mirrors (Linux 7.2) |
//! | --- | --- | --- |
//! | `no-scratch-overlap` | no preserved extent overlaps a KHO scratch area | `kho_scratch_overlap()` (`kernel/liveupdate/kexec_handover_debug.c`, refused at preserve time with `CONFIG_KEXEC_HANDOVER_DEBUG`): the next kernel allocates from scratch before it reserves preserved memory |
//! | `one-owner-per-page` | no page is owned by two records: no two radix blocks cover one page, no two records' ranges share a page | `kho_radix_add_page()` keeps one key per block; every LUO record lives in pages of its own (`kho_alloc_preserve()`, `kho_block` pages, `kho_preserve_vmalloc()`, `memfd_luo_preserve_folios()`) |
//! | `referenced-pages-preserved` | every page the records point at (the FDT page, subtree blobs, LUO's blocks and memfd metadata, memfd folios) is itself preserved | `kho_restore_folio()`/`kho_restore_pages()` refuse a page the radix tree does not list |
//! | `known-compatibles` | every preserved file's `compatible` is one this reader decodes; the others are listed, never dropped | `luo_file_deserialize()` matches `compatible` with `strcmp()`; a file whose contents are not decoded is not in the labelled preserved set, so the dirty-page proof does not cover it |
//!
//! A page reached twice *while parsing* LUO's records is already a parse error
//! ([`crate::luo::LuoError::PageReachedTwice`]); `one-owner-per-page` is about the labelled
//! preserved set as a whole: the FDT page, the subtree blobs and the LUO records together, and
//! the radix tree's own blocks.
//!
//! Cost: one sort and one sweep per check, O((extents + records) log(extents + records)),
//! all bounded by the parse's [`crate::budget::Budget`]; each check keeps at most
//! [`MAX_FINDINGS`] findings and counts the rest.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::luo::UnknownCompatible;
use crate::mem::PAGE_SIZE;
use crate::state::{Handover, LabelledExtents};

/// Findings kept per check; the rest are only counted.
pub const MAX_FINDINGS: usize = 16;

/// One of the invariants (serialized as its kebab-case id, e.g. `no-scratch-overlap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// No preserved extent overlaps a KHO scratch area.
    NoScratchOverlap,
    /// No page is owned by two records.
    OneOwnerPerPage,
    /// Every page the records point at is itself preserved.
    ReferencedPagesPreserved,
    /// Every preserved file's `compatible` is understood; unknown ones are listed.
    KnownCompatibles,
}

impl Invariant {
    /// Every invariant, in report order.
    pub const ALL: [Invariant; 4] = [
        Invariant::NoScratchOverlap,
        Invariant::OneOwnerPerPage,
        Invariant::ReferencedPagesPreserved,
        Invariant::KnownCompatibles,
    ];

    /// Stable id, as in JSON.
    pub fn id(self) -> &'static str {
        match self {
            Invariant::NoScratchOverlap => "no-scratch-overlap",
            Invariant::OneOwnerPerPage => "one-owner-per-page",
            Invariant::ReferencedPagesPreserved => "referenced-pages-preserved",
            Invariant::KnownCompatibles => "known-compatibles",
        }
    }

    /// The invariant as a sentence, as the text report prints it.
    pub fn description(self) -> &'static str {
        match self {
            Invariant::NoScratchOverlap => "no preserved extent overlaps a scratch area",
            Invariant::OneOwnerPerPage => "no page is owned by two records",
            Invariant::ReferencedPagesPreserved => {
                "every page the records point at is itself preserved"
            }
            Invariant::KnownCompatibles => {
                "every preserved file's compatible is understood (unknown ones listed)"
            }
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// Why an invariant does not hold, at one place. Addresses are guest-physical bytes,
/// `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Finding {
    /// Part of a preserved extent lies in a scratch area.
    ScratchOverlap {
        /// First byte of the overlap.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// Owner of the preserved extent (`kho`, `memfd:<session>/<token>/data`, ...).
        owner: String,
        /// The scratch area (merged with any it overlaps or touches): first byte.
        scratch_start: u64,
        /// One past its last byte.
        scratch_end: u64,
    },
    /// Pages owned by two records (page-rounded).
    TwoOwners {
        /// First byte of the shared pages.
        start: u64,
        /// One past their last byte.
        end: u64,
        /// The record that reaches furthest among those before (an owner label, or
        /// `radix order-N block` for the radix tree's blocks).
        first: String,
        /// The record that starts inside it.
        second: String,
    },
    /// A range a record points at that the radix tree does not preserve.
    NotPreserved {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// The record's owner label.
        owner: String,
    },
    /// A file whose `compatible` this reader does not decode.
    UnknownCompatible(UnknownCompatible),
    /// A subsystem's state whose `compatible` this reader does not decode.
    Unparsed(crate::state::Unparsed),
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::ScratchOverlap {
                start,
                end,
                owner,
                scratch_start,
                scratch_end,
            } => write!(
                f,
                "{owner} [{start:#x}, {end:#x}) in scratch [{scratch_start:#x}, {scratch_end:#x})"
            ),
            Finding::TwoOwners {
                start,
                end,
                first,
                second,
            } => write!(f, "[{start:#x}, {end:#x}) owned by {first} and {second}"),
            Finding::NotPreserved { start, end, owner } => {
                write!(f, "{owner} [{start:#x}, {end:#x}) not preserved")
            }
            Finding::UnknownCompatible(u) => write!(
                f,
                "session {:?} token {:#x}: {:?} (not understood: {}; luo_file_ser at {:#x}: {}; data {:#x} unparsed)",
                u.session,
                u.token,
                u.compatible,
                u.unknown.join(";"),
                u.ser_pa,
                u.bytes,
                u.data
            ),
            Finding::Unparsed(u) => write!(f, "{u}"),
        }
    }
}

/// The result of one invariant on one handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvariantCheck {
    /// Which invariant (its id in JSON).
    pub id: Invariant,
    /// The invariant as a sentence ([`Invariant::description`]).
    pub name: String,
    /// No finding: the invariant holds.
    pub held: bool,
    /// Findings in all, kept or not.
    pub count: u64,
    /// The first [`MAX_FINDINGS`] findings, in address (or session) order.
    pub findings: Vec<Finding>,
}

impl InvariantCheck {
    fn new(id: Invariant) -> Self {
        InvariantCheck {
            id,
            name: id.description().to_owned(),
            held: true,
            count: 0,
            findings: Vec::new(),
        }
    }

    /// Counts `finding`, and keeps it if fewer than [`MAX_FINDINGS`] are kept.
    fn push(&mut self, finding: impl FnOnce() -> Finding) {
        self.held = false;
        self.count = self.count.saturating_add(1);
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(finding());
        }
    }
}

impl fmt::Display for InvariantCheck {
    /// `<name>: held`, or `<name>: VIOLATED: <finding>; <finding> (N in all)`, with at most 3
    /// findings: one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.held {
            return write!(f, "{}: held", self.name);
        }
        write!(f, "{}: VIOLATED: ", self.name)?;
        for (i, finding) in self.findings.iter().take(3).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{finding}")?;
        }
        if self.count > 3 {
            write!(f, " ({} in all)", self.count)?;
        }
        Ok(())
    }
}

/// Every invariant on `handover`, whose labelled preserved set is `extents` (what
/// [`Handover::preserved_extents`] returned for it), in [`Invariant::ALL`] order.
pub fn check(handover: &Handover, extents: &LabelledExtents) -> Vec<InvariantCheck> {
    vec![
        scratch_overlap(handover, extents),
        two_owners(handover),
        not_preserved(extents),
        unknown_compatibles(handover),
    ]
}

impl Handover {
    /// [`check`] with this handover's [`Handover::preserved_extents`].
    pub fn invariants(&self) -> Vec<InvariantCheck> {
        check(self, &self.preserved_extents())
    }
}

/// `no-scratch-overlap`: one merge of the sorted, disjoint preserved extents with the sorted,
/// merged scratch areas. O(E + S log S).
fn scratch_overlap(handover: &Handover, extents: &LabelledExtents) -> InvariantCheck {
    let mut c = InvariantCheck::new(Invariant::NoScratchOverlap);
    let scratch = handover.scratch_extents();
    let mut preserved = extents.set.iter().peekable();
    let mut areas = scratch.iter().peekable();
    while let (Some(p), Some(s)) = (preserved.peek(), areas.peek()) {
        let (start, end) = (p.start.max(s.start), p.end.min(s.end));
        if start < end {
            c.push(|| Finding::ScratchOverlap {
                start,
                end,
                owner: p.owner.to_owned(),
                scratch_start: s.start,
                scratch_end: s.end,
            });
        }
        if p.end <= s.end {
            preserved.next();
        } else {
            areas.next();
        }
    }
    c
}

/// Page-rounded `[start, end)` (empty stays empty).
fn pages(start: u64, end: u64) -> (u64, u64) {
    let down = start & !(PAGE_SIZE - 1);
    let up = end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    if start < end {
        (down, up.max(down))
    } else {
        (down, down)
    }
}

/// Overlaps among `ranges` whose owners differ: sorted by start, swept with the range that
/// reaches furthest so far. Every range that starts inside an earlier one of another owner is
/// one finding (ranges of one owner may overlap: the `LUO` subtree blob and LUO's `luo_ser`
/// are one record). O(n log n).
fn overlaps<'a>(c: &mut InvariantCheck, mut ranges: Vec<(u64, u64, &'a str)>) {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable_by_key(|r| (r.0, r.1));
    let mut reach: Option<(u64, &'a str)> = None;
    for (start, end, owner) in ranges {
        match reach {
            Some((far, first)) if start < far => {
                if first != owner {
                    c.push(|| Finding::TwoOwners {
                        start,
                        end: end.min(far),
                        first: first.to_owned(),
                        second: owner.to_owned(),
                    });
                }
                if end > far {
                    reach = Some((end, owner));
                }
            }
            _ => reach = Some((end, owner)),
        }
    }
}

/// The owner name of the radix tree's blocks of `order` (made once per order, not per block).
fn radix_owner(order: u32) -> String {
    format!("radix order-{order} block")
}

/// `one-owner-per-page`: the radix tree's blocks against each other (runs of one order never
/// overlap each other, runs of two orders may), then the records' page-rounded ranges
/// against each other.
fn two_owners(handover: &Handover) -> InvariantCheck {
    let mut c = InvariantCheck::new(Invariant::OneOwnerPerPage);
    let runs = &handover.preserved.runs;
    let mut orders: Vec<u32> = runs.iter().map(|r| r.order).collect();
    orders.sort_unstable();
    orders.dedup();
    let names: Vec<String> = orders.iter().map(|&o| radix_owner(o)).collect();
    let name_of = |order: u32| {
        orders
            .binary_search(&order)
            .ok()
            .and_then(|i| names.get(i))
            .map_or("radix block", String::as_str)
    };
    overlaps(
        &mut c,
        runs.iter()
            .map(|r| (r.pa, r.end(), name_of(r.order)))
            .collect(),
    );
    let labels = handover.owner_labels();
    overlaps(
        &mut c,
        labels
            .iter()
            .map(|(s, e, owner)| {
                let (s, e) = pages(*s, *e);
                (s, e, owner.as_str())
            })
            .collect(),
    );
    c
}

/// `referenced-pages-preserved`: [`LabelledExtents::not_preserved`], which the labelling
/// already found.
fn not_preserved(extents: &LabelledExtents) -> InvariantCheck {
    let mut c = InvariantCheck::new(Invariant::ReferencedPagesPreserved);
    for (start, end, owner) in &extents.not_preserved {
        c.push(|| Finding::NotPreserved {
            start: *start,
            end: *end,
            owner: owner.clone(),
        });
    }
    c
}

/// `known-compatibles`: [`crate::luo::LuoState::unknown_compatibles`] and
/// [`Handover::unparsed`], one finding each.
fn unknown_compatibles(handover: &Handover) -> InvariantCheck {
    let mut c = InvariantCheck::new(Invariant::KnownCompatibles);
    for u in handover.luo.iter().flat_map(|l| &l.unknown_compatibles) {
        c.push(|| Finding::UnknownCompatible(u.clone()));
    }
    for u in &handover.unparsed {
        c.push(|| Finding::Unparsed(u.clone()));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{HandoverFixture, HandoverSpec, RadixBuilder, SessionSpec, WriteMem};
    use crate::kho::{ScratchArea, KHO_FDT_COMPATIBLE};
    use crate::mem::{SparseMemory, PAGE_SHIFT};

    /// The small fixture (one session, a 256-folio memfd at pfn 0x200), with `edit` applied
    /// to its spec.
    fn written(edit: impl FnOnce(&mut HandoverSpec)) -> (SparseMemory, HandoverFixture) {
        let mut mem = SparseMemory::new(0, 1 << 30);
        let mut spec = HandoverSpec::small();
        edit(&mut spec);
        let fx = HandoverFixture::write(&mut mem, &spec).unwrap();
        (mem, fx)
    }

    fn checks(mem: &SparseMemory, fx: &HandoverFixture) -> Vec<InvariantCheck> {
        Handover::read(mem, fx.zero_page).unwrap().invariants()
    }

    fn get(checks: &[InvariantCheck], id: Invariant) -> &InvariantCheck {
        checks.iter().find(|c| c.id == id).unwrap()
    }

    /// Rewrites the radix tree of `fx` from `blocks` and points the FDT at it.
    fn replace_tree(mem: &mut SparseMemory, fx: &HandoverFixture, blocks: &[(u64, u32)]) {
        let mut radix = RadixBuilder::new(0x3000_0000);
        for &(pa, order) in blocks {
            radix.preserve_block(pa, order);
        }
        let root = radix.write(mem).unwrap();
        let blob = crate::fixture::kho_fdt_blob(KHO_FDT_COMPATIBLE, root, &fx.subtrees);
        mem.put(fx.kho.fdt_addr, &blob).unwrap();
    }

    #[test]
    fn a_correct_handover_holds_every_invariant() {
        let (mem, fx) = written(|_| {});
        let c = checks(&mem, &fx);
        assert_eq!(
            c.iter().map(|c| c.id).collect::<Vec<_>>(),
            Invariant::ALL.to_vec()
        );
        for check in &c {
            assert!(check.held && check.count == 0, "{check}");
            assert!(check.findings.is_empty());
        }
        assert_eq!(
            c[0].to_string(),
            "no preserved extent overlaps a scratch area: held"
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json[0]["id"], "no-scratch-overlap");
        assert_eq!(
            serde_json::from_value::<Vec<InvariantCheck>>(json).unwrap(),
            c
        );
    }

    #[test]
    fn a_preserved_extent_in_scratch_is_found() {
        // The memfd's folios (pfn 0x200.., 1 MiB at 2 MiB) inside a scratch area.
        let (mem, fx) = written(|s| {
            s.scratch.push(ScratchArea {
                addr: 0x28_0000,
                size: 0x1_0000,
            })
        });
        let c = checks(&mem, &fx);
        let s = get(&c, Invariant::NoScratchOverlap);
        assert!(!s.held);
        assert_eq!(s.count, 1);
        assert_eq!(
            s.findings,
            vec![Finding::ScratchOverlap {
                start: 0x28_0000,
                end: 0x29_0000,
                owner: "memfd:luo-agent/0x1/data".into(),
                scratch_start: 0x28_0000,
                scratch_end: 0x29_0000,
            }]
        );
        assert_eq!(
            s.to_string(),
            "no preserved extent overlaps a scratch area: VIOLATED: memfd:luo-agent/0x1/data \
             [0x280000, 0x290000) in scratch [0x280000, 0x290000)"
        );
        // The others still hold.
        assert!(c.iter().filter(|c| c.id != s.id).all(|c| c.held));
    }

    #[test]
    fn a_page_of_two_records_is_found() {
        // The memfd's second folio is the KHO FDT page: a folio and a metadata page. (Two
        // LUO records on one page are refused by the parse already; the FDT page is not a
        // LUO record.)
        let (mut mem, fx) = written(|_| {});
        let chunk = crate::mem::read_u64_le(&mem, fx.luo.memfd_ser[0] + 32).unwrap();
        let array = crate::mem::read_u64_le(&mem, chunk + 8).unwrap();
        let fdt_pfn = fx.kho.fdt_addr >> PAGE_SHIFT;
        mem.put(array + 16, &(fdt_pfn | 3 << 52).to_le_bytes())
            .unwrap();
        let c = checks(&mem, &fx);
        let t = get(&c, Invariant::OneOwnerPerPage);
        assert_eq!(
            t.findings,
            vec![Finding::TwoOwners {
                start: fx.kho.fdt_addr,
                end: fx.kho.fdt_addr + PAGE_SIZE,
                first: "kho-fdt".into(),
                second: "memfd:luo-agent/0x1/data".into(),
            }]
        );
        assert_eq!(
            t.to_string(),
            format!(
                "no page is owned by two records: VIOLATED: [{:#x}, {:#x}) owned by kho-fdt \
                 and memfd:luo-agent/0x1/data",
                fx.kho.fdt_addr,
                fx.kho.fdt_addr + PAGE_SIZE
            )
        );
        // The folio it replaced is no longer referenced; nothing else changes.
        assert!(get(&c, Invariant::ReferencedPagesPreserved).held);
    }

    #[test]
    fn two_radix_blocks_over_one_page_are_found() {
        let (mut mem, fx) = written(|_| {});
        let mut blocks = fx.preserved.clone();
        // An order-3 block over the memfd's first eight order-0 folios.
        blocks.push((0x20_0000, 3));
        replace_tree(&mut mem, &fx, &blocks);
        let c = checks(&mem, &fx);
        let t = get(&c, Invariant::OneOwnerPerPage);
        assert_eq!(t.count, 1, "{t}");
        assert_eq!(
            t.findings[0],
            Finding::TwoOwners {
                start: 0x20_0000,
                end: 0x20_8000,
                first: "radix order-3 block".into(),
                second: "radix order-0 block".into(),
            }
        );
    }

    #[test]
    fn records_of_one_owner_may_overlap() {
        let mut c = InvariantCheck::new(Invariant::OneOwnerPerPage);
        overlaps(
            &mut c,
            vec![
                (0x1000, 0x2000, "LUO"),
                (0x1000, 0x1020, "LUO"),
                (0x3000, 0x5000, "a"),
                (0x4000, 0x6000, "b"),
                (0x4800, 0x4900, "c"),
                (0x6000, 0x7000, "d"),
            ],
        );
        let got: Vec<String> = c.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "[0x4000, 0x5000) owned by a and b",
                "[0x4800, 0x4900) owned by b and c"
            ]
        );
        assert_eq!(pages(0x1010, 0x1020), (0x1000, 0x2000));
        assert_eq!(pages(0x1000, 0x1000), (0x1000, 0x1000));
    }

    #[test]
    fn an_unpreserved_metadata_page_is_found() {
        // The tree without the session block page.
        let (mut mem, fx) = written(|_| {});
        let blocks: Vec<(u64, u32)> = fx
            .preserved
            .iter()
            .copied()
            .filter(|&(pa, _)| pa != fx.luo.session_block)
            .collect();
        replace_tree(&mut mem, &fx, &blocks);
        let c = checks(&mem, &fx);
        let n = get(&c, Invariant::ReferencedPagesPreserved);
        assert_eq!(
            n.findings,
            vec![Finding::NotPreserved {
                start: fx.luo.session_block,
                end: fx.luo.session_block + PAGE_SIZE,
                owner: "LUO/sessions".into(),
            }]
        );
        assert!(n.to_string().ends_with(&format!(
            "VIOLATED: LUO/sessions [{:#x}, {:#x}) not preserved",
            fx.luo.session_block,
            fx.luo.session_block + PAGE_SIZE
        )));
    }

    #[test]
    fn unknown_compatibles_are_violations_with_the_file_named() {
        let (mem, fx) = written(|s| {
            s.sessions.push(SessionSpec {
                name: "other".into(),
                memfds: vec![],
                other_files: vec![("memfd-v2;hugetlb-v1".into(), 9), ("vfio-v1".into(), 10)],
            })
        });
        let c = checks(&mem, &fx);
        let u = get(&c, Invariant::KnownCompatibles);
        assert_eq!(u.count, 2);
        assert_eq!(
            u.to_string(),
            format!(
                "every preserved file's compatible is understood (unknown ones listed): VIOLATED: \
             session \"other\" token 0x9: \"memfd-v2;hugetlb-v1\" (not understood: hugetlb-v1; \
             luo_file_ser at 0x10b010: 6d656d66642d76323b68756765746c622d7631{z}0900000000000000; \
             data 0x0 unparsed); \
             session \"other\" token 0xa: \"vfio-v1\" (not understood: vfio-v1; \
             luo_file_ser at 0x10b050: 7666696f2d7631{y}0a00000000000000; data 0x0 unparsed)",
                z = "00".repeat(48 - 19 + 8),
                y = "00".repeat(48 - 7 + 8),
            )
        );
        let json = serde_json::to_value(&u.findings[1]).unwrap();
        assert_eq!(json["kind"], "unknown-compatible");
        assert_eq!(json["compatible"], "vfio-v1");
    }

    #[test]
    fn findings_are_bounded_and_counted() {
        // Every folio of the memfd in scratch: one preserved extent, so one finding; many
        // scratch areas make many.
        let (mem, fx) = written(|s| {
            s.scratch = (0..100)
                .map(|i| ScratchArea {
                    addr: 0x20_0000 + i * 0x2000,
                    size: 0x1000,
                })
                .collect();
        });
        let c = checks(&mem, &fx);
        let s = get(&c, Invariant::NoScratchOverlap);
        assert_eq!(s.count, 100);
        assert_eq!(s.findings.len(), MAX_FINDINGS);
        assert!(s.to_string().ends_with("(100 in all)"), "{s}");
    }
}
