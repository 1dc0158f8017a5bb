//! Sets of guest-physical extents with owner labels, and their intersection with KVM's dirty
//! log.
//!
//! An [`ExtentSet`] is a sorted vector of disjoint `[start, end)` ranges, each labelled with an
//! owner ("kho", "memfd:state/0x7/data", ...). It is built with an [`ExtentSetBuilder`] whose
//! `add` *paints*: a later range overwrites the labels of what it covers, and touching ranges
//! with the same label merge.
//!
//! [`ExtentSet::written_pages`] intersects a set with a KVM dirty bitmap while reading only the
//! bitmap words that the extents cover: its cost is O(extents + covered bytes / 256 KiB + hits),
//! independent of the guest's size. Locating written pages *outside* every known set
//! ([`classify_dirty`]) needs one pass over the bitmap, done only when a popcount says there is
//! something to find.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

use crate::mem::{to_usize, PAGE_SHIFT, PAGE_SIZE};

/// One extent: `[start, end)` and an index into the set's owner table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    start: u64,
    end: u64,
    owner: u32,
}

/// A view of one extent of an [`ExtentSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRef<'a> {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Owner label.
    pub owner: &'a str,
}

impl ExtentRef<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the extent is empty (never true for extents of a set).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Sorted, disjoint, labelled extents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentSet {
    extents: Vec<Extent>,
    owners: Vec<String>,
}

/// Builds an [`ExtentSet`]; see the module documentation for the painting rule.
#[derive(Debug, Clone, Default)]
pub struct ExtentSetBuilder {
    map: BTreeMap<u64, (u64, u32)>,
    owners: Vec<String>,
    owner_ids: HashMap<String, u32>,
}

impl ExtentSetBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    fn owner_id(&mut self, owner: &str) -> u32 {
        if let Some(&id) = self.owner_ids.get(owner) {
            return id;
        }
        // Owners come from one bounded parse, far fewer than 2^32; saturating only guards.
        let id = u32::try_from(self.owners.len()).unwrap_or(u32::MAX);
        self.owners.push(owner.to_owned());
        self.owner_ids.insert(owner.to_owned(), id);
        id
    }

    /// Paints `[start, end)` with `owner`. Empty or inverted ranges are ignored.
    pub fn add(&mut self, start: u64, end: u64, owner: &str) -> &mut Self {
        if start >= end {
            return self;
        }
        let id = self.owner_id(owner);
        let overlapping: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapping {
            if let Some((e, o)) = self.map.remove(&s) {
                if s < start {
                    self.map.insert(s, (start, o));
                }
                if e > end {
                    self.map.insert(end, (e, o));
                }
            }
        }
        let (mut start, mut end) = (start, end);
        if let Some((&ps, &(pe, po))) = self.map.range(..start).next_back() {
            if pe == start && po == id {
                self.map.remove(&ps);
                start = ps;
            }
        }
        if let Some(&(ne, no)) = self.map.get(&end) {
            if no == id {
                self.map.remove(&end);
                end = ne;
            }
        }
        self.map.insert(start, (end, id));
        self
    }

    /// The finished set.
    pub fn build(self) -> ExtentSet {
        ExtentSet {
            extents: self
                .map
                .into_iter()
                .map(|(start, (end, owner))| Extent { start, end, owner })
                .collect(),
            owners: self.owners,
        }
    }
}

impl ExtentSet {
    /// A builder.
    pub fn builder() -> ExtentSetBuilder {
        ExtentSetBuilder::new()
    }

    /// Extents in address order.
    pub fn iter(&self) -> impl Iterator<Item = ExtentRef<'_>> + '_ {
        self.extents.iter().map(|e| self.view(e))
    }

    fn view(&self, e: &Extent) -> ExtentRef<'_> {
        ExtentRef {
            start: e.start,
            end: e.end,
            owner: self.owners.get(e.owner as usize).map_or("", String::as_str),
        }
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes covered.
    pub fn total_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.end - e.start).sum()
    }

    /// Distinct 4 KiB pages touched by at least one extent.
    pub fn total_pages(&self) -> u64 {
        let mut pages = 0;
        let mut next_uncounted = 0u64; // first page index not yet counted
        for e in &self.extents {
            let first = (e.start >> PAGE_SHIFT).max(next_uncounted);
            let last = (e.end - 1) >> PAGE_SHIFT;
            if last >= first {
                pages += last - first + 1;
                next_uncounted = last + 1;
            }
        }
        pages
    }

    /// Index of the first extent whose end is above `gpa`.
    fn first_ending_after(&self, gpa: u64) -> usize {
        self.extents.partition_point(|e| e.end <= gpa)
    }

    /// The extent holding byte `gpa`.
    pub fn find(&self, gpa: u64) -> Option<ExtentRef<'_>> {
        let e = self.extents.get(self.first_ending_after(gpa))?;
        (e.start <= gpa).then(|| self.view(e))
    }

    /// Whether byte `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.find(gpa).is_some()
    }

    /// Whether any byte of the page holding `gpa` is in the set.
    pub fn touches_page(&self, gpa: u64) -> bool {
        let page = gpa & !(PAGE_SIZE - 1);
        self.extents
            .get(self.first_ending_after(page))
            .is_some_and(|e| e.start < page.saturating_add(PAGE_SIZE))
    }

    /// Whether every byte of `[start, end)` is in the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for e in self.extents.iter().skip(self.first_ending_after(start)) {
            if at >= end {
                break;
            }
            if e.start > at {
                return false;
            }
            at = e.end;
        }
        at >= end
    }

    /// The union of `ranges`, all owned by `owner`: sorts and merges in O(n log n) (cheaper than
    /// painting when there is one owner). Empty ranges are dropped.
    pub fn from_ranges(owner: &str, ranges: impl IntoIterator<Item = (u64, u64)>) -> ExtentSet {
        let mut v: Vec<(u64, u64)> = ranges.into_iter().filter(|(s, e)| s < e).collect();
        v.sort_unstable();
        let mut extents: Vec<Extent> = Vec::with_capacity(v.len());
        for (start, end) in v {
            match extents.last_mut() {
                Some(last) if start <= last.end => last.end = last.end.max(end),
                _ => extents.push(Extent {
                    start,
                    end,
                    owner: 0,
                }),
            }
        }
        ExtentSet {
            extents,
            owners: vec![owner.to_owned()],
        }
    }

    /// A builder holding this set, to paint more on it.
    pub fn to_builder(&self) -> ExtentSetBuilder {
        ExtentSetBuilder {
            // Sorted input: `collect` bulk-builds the map in linear time.
            map: self
                .extents
                .iter()
                .map(|e| (e.start, (e.end, e.owner)))
                .collect(),
            owners: self.owners.clone(),
            owner_ids: self
                .owners
                .iter()
                .enumerate()
                .map(|(i, o)| (o.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
                .collect(),
        }
    }

    /// A copy where each `(start, end, owner)` relabels only what this set already covers; a
    /// later label wins where labels overlap (the painting rule). Returns the new set and the
    /// parts of labels that fall outside the set, each part once, under the label that wins
    /// there; touching parts with the same owner are merged.
    ///
    /// One sweep over the label boundaries and the extents, with a heap of the labels open at
    /// the sweep point: O((L + E) log L) time and O(L + E) output for L labels and E extents,
    /// however the labels overlap (a naive repaint is O(L x E): 64 labels over a million runs
    /// took 47 s).
    pub fn relabel(&self, labels: &[(u64, u64, String)]) -> (ExtentSet, Vec<(u64, u64, String)>) {
        // (position, label index, opens): sorted by position only; at one position every event
        // is applied before the segment that starts there.
        let mut events: Vec<(u64, usize, bool)> = Vec::with_capacity(2 * labels.len());
        for (i, (start, end, _)) in labels.iter().enumerate() {
            if start < end {
                events.extend([(*start, i, true), (*end, i, false)]);
            }
        }
        events.sort_unstable_by_key(|&(at, _, _)| at);

        let mut owners = self.owners.clone();
        let mut owner_ids: HashMap<&str, u32> = HashMap::new();
        let mut label_owner = |i: usize| -> u32 {
            let name = labels.get(i).map_or("", |l| l.2.as_str());
            *owner_ids.entry(name).or_insert_with(|| {
                owners.push(name.to_owned());
                u32::try_from(owners.len() - 1).unwrap_or(u32::MAX)
            })
        };
        let mut extents: Vec<Extent> = Vec::with_capacity(self.extents.len());
        let mut outside: Vec<(u64, u64, usize)> = Vec::new();
        let mut open: BinaryHeap<usize> = BinaryHeap::new();
        let mut is_open = vec![false; labels.len()];
        let (mut ev, mut k) = (0usize, 0usize);
        let Some(mut at) = [
            events.first().map(|e| e.0),
            self.extents.first().map(|e| e.start),
        ]
        .into_iter()
        .flatten()
        .min() else {
            return (self.clone(), Vec::new());
        };
        loop {
            while let Some(&(_, i, opens)) = events.get(ev).filter(|e| e.0 <= at) {
                if let Some(flag) = is_open.get_mut(i) {
                    *flag = opens;
                }
                if opens {
                    open.push(i);
                }
                ev += 1;
            }
            while open
                .peek()
                .is_some_and(|&i| !is_open.get(i).copied().unwrap_or(false))
            {
                open.pop();
            }
            while self.extents.get(k).is_some_and(|e| e.end <= at) {
                k += 1;
            }
            let extent = self.extents.get(k);
            let covered = extent.filter(|e| e.start <= at);
            let next_extent = extent.map(|e| if e.start <= at { e.end } else { e.start });
            let next_event = events.get(ev).map(|e| e.0);
            // Both are above `at`, so the sweep always advances.
            let Some(next) = [next_extent, next_event].into_iter().flatten().min() else {
                break;
            };
            let top = open.peek().copied();
            match (covered, top) {
                (Some(e), _) => {
                    let owner = top.map_or(e.owner, &mut label_owner);
                    match extents.last_mut() {
                        Some(last) if last.end == at && last.owner == owner => last.end = next,
                        _ => extents.push(Extent {
                            start: at,
                            end: next,
                            owner,
                        }),
                    }
                }
                (None, Some(i)) => match outside.last_mut() {
                    Some(last)
                        if last.1 == at
                            && labels.get(last.2).map(|l| &l.2) == labels.get(i).map(|l| &l.2) =>
                    {
                        last.1 = next;
                    }
                    _ => outside.push((at, next, i)),
                },
                (None, None) => {}
            }
            at = next;
        }
        let outside = outside
            .into_iter()
            .map(|(s, e, i)| (s, e, labels.get(i).map(|l| l.2.clone()).unwrap_or_default()))
            .collect();
        (ExtentSet { extents, owners }, outside)
    }

    /// The 4 KiB pages this set touches, as merged `[first, end)` ranges of page frame
    /// numbers (gpa >> 12) in address order: O(extents).
    pub fn pfn_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.extents.len());
        for e in self.extents.iter().filter(|e| e.end > e.start) {
            let (first, end) = (e.start >> PAGE_SHIFT, ((e.end - 1) >> PAGE_SHIFT) + 1);
            match out.last_mut() {
                Some(last) if first <= last.1 => last.1 = last.1.max(end),
                _ => out.push((first, end)),
            }
        }
        out
    }

    /// Number of 4 KiB pages this set touches that `other` does not: O(extents of both).
    pub fn pages_outside(&self, other: &ExtentSet) -> u64 {
        let theirs = other.pfn_ranges();
        let mut j = 0;
        let mut outside = 0;
        for (first, end) in self.pfn_ranges() {
            let mut at = first;
            while at < end {
                while theirs.get(j).is_some_and(|&(_, e)| e <= at) {
                    j += 1;
                }
                let next = match theirs.get(j) {
                    Some(&(s, e)) if s <= at => e.min(end),
                    Some(&(s, _)) if s < end => {
                        outside += s - at;
                        s
                    }
                    _ => {
                        outside += end - at;
                        end
                    }
                };
                at = next;
            }
        }
        outside
    }

    /// Pages of `bitmap` that are dirty and touched by this set, ascending, reading only the
    /// bitmap words under the extents.
    pub fn written_pages(&self, bitmap: &DirtyBitmap<'_>) -> Vec<u64> {
        let mut out = Vec::new();
        let first = self.first_ending_after(bitmap.base);
        for e in self.extents.iter().skip(first) {
            if e.start >= bitmap.end() {
                break;
            }
            bitmap.dirty_in(e.start, e.end, &mut out);
        }
        out.dedup(); // two extents may share a page
        out
    }
}

/// Answers `touches_page` for ascending pages in amortised O(1), by walking the extents once.
struct Cursor<'a> {
    extents: &'a [Extent],
    i: usize,
}

impl Cursor<'_> {
    /// Whether any extent touches the page at `page` (page-aligned, ascending across calls).
    fn touches_page(&mut self, page: u64) -> bool {
        while self.extents.get(self.i).is_some_and(|e| e.end <= page) {
            self.i += 1;
        }
        self.extents
            .get(self.i)
            .is_some_and(|e| e.start < page.saturating_add(PAGE_SIZE))
    }
}

impl ExtentSet {
    fn cursor(&self) -> Cursor<'_> {
        Cursor {
            extents: &self.extents,
            i: 0,
        }
    }
}

/// A KVM dirty bitmap (`KVM_GET_DIRTY_LOG`) for one memory slot: bit `i` of word `w` is the
/// page at `base + (64 w + i) * 4096`.
#[derive(Debug, Clone, Copy)]
pub struct DirtyBitmap<'a> {
    base: u64,
    words: &'a [u64],
}

impl<'a> DirtyBitmap<'a> {
    /// The bitmap of a slot starting at `base` (rounded down to a page).
    pub fn new(base: u64, words: &'a [u64]) -> Self {
        DirtyBitmap {
            base: base & !(PAGE_SIZE - 1),
            words,
        }
    }

    /// Slot start.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One past the slot's last byte.
    pub fn end(&self) -> u64 {
        self.base
            .saturating_add((self.words.len() as u64).saturating_mul(64 << PAGE_SHIFT))
    }

    /// Whether the page holding `gpa` is dirty (false outside the slot).
    pub fn is_dirty(&self, gpa: u64) -> bool {
        if gpa < self.base || gpa >= self.end() {
            return false;
        }
        let page = (gpa - self.base) >> PAGE_SHIFT;
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w >> (page % 64) & 1 == 1)
    }

    /// Number of dirty pages (one popcount pass).
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Dirty pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        let base = self.base;
        self.words
            .iter()
            .enumerate()
            .filter(|(_, &w)| w != 0)
            .flat_map(move |(i, &w)| {
                SetBits(w).map(move |b| base + ((i as u64 * 64 + b) << PAGE_SHIFT))
            })
    }

    /// Appends the dirty pages that intersect `[start, end)`.
    fn dirty_in(&self, start: u64, end: u64, out: &mut Vec<u64>) {
        let lo = start.max(self.base);
        let hi = end.min(self.end());
        if lo >= hi {
            return;
        }
        let first = (lo - self.base) >> PAGE_SHIFT;
        let last = (hi - 1 - self.base) >> PAGE_SHIFT; // inclusive
        for wi in first / 64..=last / 64 {
            let Some(&w) = self.words.get(to_usize(wi)) else {
                break;
            };
            let mut mask = u64::MAX;
            if wi == first / 64 {
                mask &= u64::MAX << (first % 64);
            }
            if wi == last / 64 {
                mask &= u64::MAX >> (63 - last % 64);
            }
            out.extend(SetBits(w & mask).map(|b| self.base + ((wi * 64 + b) << PAGE_SHIFT)));
        }
    }
}

/// Iterator over the set bit positions of a word.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(u64::from(b))
    }
}

/// Which pages KVM write-protected at point-of-no-return, and so which bits of the dirty
/// log mean something.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyScope {
    /// Every guest page (`KVM_MEM_LOG_DIRTY_PAGES` switched on, or the whole log cleared):
    /// preserved, scratch and other pages are all counted. Costs O(guest size).
    #[default]
    AllPages,
    /// Only the pages of the preserved set as the outgoing kernel had it
    /// (`KVM_CLEAR_DIRTY_LOG` of those pages under `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
    /// KVM_DIRTY_LOG_INITIALLY_SET`): every other bit stays set from the start and says
    /// nothing. Costs O(preserved pages).
    Preserved,
}

/// Dirty pages sorted by where they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyClassification {
    /// Which pages were write-protected (and so which of the fields below are known).
    #[serde(default)]
    pub scope: DirtyScope,
    /// Written pages touched by the preserved set (must be empty for a correct handover).
    pub preserved: Vec<u64>,
    /// Pages of the preserved set that were not write-protected (scope
    /// [`DirtyScope::Preserved`]: not in the set the outgoing kernel had): nothing is known
    /// of them, so a handover with any is not proven.
    #[serde(default)]
    pub untracked: u64,
    /// Number of written pages in the scratch areas (expected: kexec segments, early boot);
    /// 0 when the scope is [`DirtyScope::Preserved`].
    pub scratch: u64,
    /// Written pages in neither; empty when the scope is [`DirtyScope::Preserved`].
    pub other: Vec<u64>,
}

/// Classifies the dirty pages of `bitmap` when only the pages `tracked` touches were
/// write-protected ([`DirtyScope::Preserved`]): the preserved pages written among them.
/// Every other bit is meaningless (set since logging began), so scratch and other pages
/// are not looked for and untracked preserved pages ([`ExtentSet::pages_outside`]) are
/// the caller's to count, once for all slots. O(extents + covered words + hits), no pass
/// over the bitmap.
pub fn classify_tracked(
    bitmap: &DirtyBitmap<'_>,
    preserved: &ExtentSet,
    tracked: &ExtentSet,
) -> DirtyClassification {
    DirtyClassification {
        scope: DirtyScope::Preserved,
        preserved: preserved
            .written_pages(bitmap)
            .into_iter()
            .filter(|&page| tracked.touches_page(page))
            .collect(),
        ..DirtyClassification::default()
    }
}

/// Classifies the dirty pages of `bitmap`. Preserved and scratch are found by
/// [`ExtentSet::written_pages`] (cost independent of guest size); `other` needs one pass over
/// the bitmap's words, merged with the sorted extents: O(words + dirty pages + extents). (A
/// popcount to skip that pass when nothing is left costs as much as the pass itself.) A page in
/// both sets counts as preserved.
pub fn classify_dirty(
    bitmap: &DirtyBitmap<'_>,
    preserved: &ExtentSet,
    scratch: &ExtentSet,
) -> DirtyClassification {
    let preserved_hits = preserved.written_pages(bitmap);
    let scratch_hits = scratch.written_pages(bitmap);
    let scratch_only: Vec<u64> = scratch_hits
        .into_iter()
        .filter(|p| preserved_hits.binary_search(p).is_err())
        .collect();
    let (mut p, mut s) = (preserved.cursor(), scratch.cursor());
    let other = bitmap
        .iter()
        .filter(|&page| !p.touches_page(page) && !s.touches_page(page))
        .collect();
    DirtyClassification {
        preserved: preserved_hits,
        scratch: scratch_only.len() as u64,
        other,
        ..DirtyClassification::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64, &str)]) -> ExtentSet {
        let mut b = ExtentSet::builder();
        for &(s, e, o) in ranges {
            b.add(s, e, o);
        }
        b.build()
    }

    #[test]
    fn pages_outside_counts_touched_pages_the_other_set_lacks() {
        let a = set(&[
            (0x1000, 0x3000, "a"),
            (0x5800, 0x6001, "b"),
            (0x9000, 0xa000, "c"),
        ]);
        // Same pages through different byte ranges: nothing outside.
        let same = set(&[
            (0x1fff, 0x2001, "x"),
            (0x1000, 0x1001, "y"),
            (0x5000, 0x7000, "z"),
            (0x9000, 0xa000, "w"),
        ]);
        assert_eq!(a.pages_outside(&same), 0);
        assert_eq!(a.pages_outside(&ExtentSet::default()), a.total_pages());
        // 0x2000 and 0x6000 missing.
        let partial = set(&[
            (0x1000, 0x2000, "x"),
            (0x5000, 0x6000, "y"),
            (0x9000, 0xa000, "z"),
        ]);
        assert_eq!(a.pages_outside(&partial), 2);
        assert_eq!(a.pfn_ranges(), vec![(1, 3), (5, 7), (9, 10)]);
        assert_eq!(ExtentSet::default().pages_outside(&a), 0);
        // An extent ending at the top of the address space does not overflow.
        let top = set(&[(u64::MAX - 0x1fff, u64::MAX, "t")]);
        assert_eq!(top.pages_outside(&ExtentSet::default()), 2);
    }

    #[test]
    fn tracked_classification_ignores_bits_it_did_not_clear() {
        let preserved = set(&[(0x0, 0x2000, "kho"), (0x4000, 0x5000, "memfd")]);
        let tracked = set(&[(0x0, 0x2000, "kho")]);
        // Every bit set, as under KVM_DIRTY_LOG_INITIALLY_SET, except page 1 (cleared, unwritten).
        let words = [!0b10u64];
        let c = classify_tracked(&DirtyBitmap::new(0, &words), &preserved, &tracked);
        assert_eq!(c.scope, DirtyScope::Preserved);
        assert_eq!(c.preserved, vec![0x0]);
        assert_eq!((c.scratch, c.other.len(), c.untracked), (0, 0, 0));
        assert_eq!(preserved.pages_outside(&tracked), 1);
    }

    fn dump(s: &ExtentSet) -> Vec<(u64, u64, String)> {
        s.iter()
            .map(|e| (e.start, e.end, e.owner.to_owned()))
            .collect()
    }

    #[test]
    fn painting_merges_and_splits() {
        let s = set(&[
            (0x3000, 0x4000, "a"),
            (0x1000, 0x2000, "a"),
            (0x2000, 0x3000, "a"),
        ]);
        assert_eq!(dump(&s), vec![(0x1000, 0x4000, "a".into())]);
        let s = set(&[
            (0x1000, 0x5000, "a"),
            (0x2000, 0x3000, "b"),
            (0x2800, 0x6000, "c"),
            (0, 0, "x"),
        ]);
        assert_eq!(
            dump(&s),
            vec![
                (0x1000, 0x2000, "a".into()),
                (0x2000, 0x2800, "b".into()),
                (0x2800, 0x6000, "c".into())
            ]
        );
        assert_eq!(s.total_bytes(), 0x5000);
        assert_eq!(s.total_pages(), 5);
        let s = set(&[
            (0x1000, 0x2000, "a"),
            (0x1000, 0x2000, "b"),
            (0x2000, 0x3000, "b"),
        ]);
        assert_eq!(dump(&s), vec![(0x1000, 0x3000, "b".into())]);
    }

    #[test]
    fn from_ranges_unions_and_to_builder_round_trips() {
        let s = ExtentSet::from_ranges(
            "kho",
            [(0x3000, 0x4000), (0x1000, 0x2000), (0x1800, 0x3000), (5, 5)],
        );
        assert_eq!(dump(&s), vec![(0x1000, 0x4000, "kho".into())]);
        let mut b = s.to_builder();
        b.add(0x4000, 0x5000, "kho").add(0x1000, 0x1001, "x");
        assert_eq!(
            dump(&b.build()),
            vec![(0x1000, 0x1001, "x".into()), (0x1001, 0x5000, "kho".into())]
        );
        assert!(ExtentSet::from_ranges("a", []).is_empty());
    }

    #[test]
    fn lookups() {
        let s = set(&[
            (0x1000, 0x3000, "a"),
            (0x5000, 0x5010, "b"),
            (0x5010, 0x6000, "c"),
        ]);
        assert!(s.contains(0x1000) && s.contains(0x2fff) && !s.contains(0x3000) && !s.contains(0));
        assert_eq!(s.find(0x5008).map(|e| e.owner), Some("b"));
        assert!(s.covers(0x1000, 0x3000) && s.covers(0x5000, 0x6000) && !s.covers(0x1000, 0x5001));
        assert!(s.covers(0x2000, 0x2000));
        assert!(s.touches_page(0x5fff) && !s.touches_page(0x4000));
        assert_eq!(s.total_pages(), 3);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn relabel_stays_inside_and_reports_outside() {
        let s = set(&[(0x1000, 0x4000, "kho"), (0x8000, 0x9000, "kho")]);
        let (r, outside) = s.relabel(&[(0x2000, 0x8800, "luo".into())]);
        assert_eq!(
            dump(&r),
            vec![
                (0x1000, 0x2000, "kho".into()),
                (0x2000, 0x4000, "luo".into()),
                (0x8000, 0x8800, "luo".into()),
                (0x8800, 0x9000, "kho".into())
            ]
        );
        assert_eq!(outside, vec![(0x4000, 0x8000, "luo".to_string())]);
        assert_eq!(r.total_bytes(), s.total_bytes());
    }

    #[test]
    fn relabel_paints_later_labels_over_earlier_ones() {
        let s = set(&[(0x1000, 0x5000, "kho")]);
        let labels = [
            (0x0, 0x3000, "a".to_string()),
            (0x2000, 0x4000, "b".to_string()),
            (0x2800, 0x2c00, "a".to_string()),
            (0x4800, 0x6000, "c".to_string()),
        ];
        let (r, outside) = s.relabel(&labels);
        assert_eq!(
            dump(&r),
            vec![
                (0x1000, 0x2000, "a".into()),
                (0x2000, 0x2800, "b".into()),
                (0x2800, 0x2c00, "a".into()),
                (0x2c00, 0x4000, "b".into()),
                (0x4000, 0x4800, "kho".into()),
                (0x4800, 0x5000, "c".into()),
            ]
        );
        assert_eq!(
            outside,
            vec![
                (0, 0x1000, "a".to_string()),
                (0x5000, 0x6000, "c".to_string())
            ]
        );
        assert_eq!(s.relabel(&[]).0, s);
    }

    /// The first hostile shape's labelling: 64 labels covering everything over a million
    /// one-page runs. Painting each label over every run it covers was O(labels x runs) (47 s,
    /// 5.4 GiB); the sweep's output is one extent per run and nothing outside.
    #[test]
    fn relabel_is_linear_in_labels_plus_extents() {
        let runs = 1u64 << 20;
        let s = ExtentSet::from_ranges("kho", (0..runs).map(|i| (i * 0x2000, i * 0x2000 + 0x1000)));
        let labels: Vec<(u64, u64, String)> = (0..64)
            .map(|i| (0, runs * 0x2000, format!("node{i}")))
            .collect();
        let (r, outside) = s.relabel(&labels);
        assert_eq!(r.len(), s.len());
        assert!(r.iter().all(|e| e.owner == "node63"));
        // The gaps between runs, once each, merged under the winning label.
        assert_eq!(outside.len(), to_usize(runs));
        assert!(outside.iter().all(|o| o.2 == "node63"));
    }

    fn bitmap_with(pages: &[u64], words: usize) -> Vec<u64> {
        let mut v = vec![0u64; words];
        for &p in pages {
            v[(p / 64) as usize] |= 1 << (p % 64);
        }
        v
    }

    #[test]
    fn dirty_bitmap_basics() {
        let words = bitmap_with(&[0, 63, 64, 200], 4);
        let bm = DirtyBitmap::new(0x10_0000, &words);
        assert_eq!(bm.count(), 4);
        assert_eq!(bm.end(), 0x10_0000 + 256 * 4096);
        assert!(bm.is_dirty(0x10_0fff) && !bm.is_dirty(0x10_1000) && !bm.is_dirty(0));
        let got: Vec<u64> = bm.iter().collect();
        assert_eq!(got, [0, 63, 64, 200].map(|p| 0x10_0000 + p * 4096));
    }

    #[test]
    fn written_pages_masks_edges_and_dedups() {
        let words = bitmap_with(&[1, 2, 3, 62, 63, 64, 65, 130], 3);
        let bm = DirtyBitmap::new(0, &words);
        // Extent [page 2, page 64] plus one sharing page 65 with the next.
        let s = set(&[
            (2 << 12, 65 << 12, "a"),
            (0x41800, 0x42000, "b"),
            (0x41000, 0x41800, "c"),
        ]);
        let pages: Vec<u64> = s.written_pages(&bm).into_iter().map(|p| p >> 12).collect();
        assert_eq!(pages, vec![2, 3, 62, 63, 64, 65]);
        // Extents beyond the slot, or before it, contribute nothing.
        let far = set(&[(1 << 40, (1 << 40) + 4096, "x")]);
        assert!(far.written_pages(&bm).is_empty());
        let bm2 = DirtyBitmap::new(1 << 30, &words);
        assert!(s.written_pages(&bm2).is_empty());
    }

    #[test]
    fn classification() {
        let words = bitmap_with(&[1, 10, 11, 100, 150], 4);
        let bm = DirtyBitmap::new(0, &words);
        let preserved = set(&[(10 << 12, 12 << 12, "kho")]);
        let scratch = set(&[(64 << 12, 128 << 12, "scratch")]);
        let c = classify_dirty(&bm, &preserved, &scratch);
        assert_eq!(c.preserved, vec![10 << 12, 11 << 12]);
        assert_eq!(c.scratch, 1);
        assert_eq!(c.other, vec![1 << 12, 150 << 12]);
        // Nothing outside known sets: no scan needed, and the result is empty.
        let all = set(&[(0, 256 << 12, "scratch")]);
        assert!(classify_dirty(&bm, &preserved, &all).other.is_empty());
    }
}
