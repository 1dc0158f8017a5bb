//! The whole handover as the next kernel finds it at `start_kernel`: zero page -> setup_data
//! -> `struct kho_data` -> KHO FDT -> radix tree, scratch list, `kexec-metadata`, LUO.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bootparams::{
    find_kho_data, setup_data_list, BootParams, BootParamsError, KhoData, SetupData,
    BOOT_PARAMS_SIZE,
};
use crate::budget::{Budget, BudgetError};
use crate::extents::ExtentSet;
use crate::kho::{
    read_kexec_metadata, read_kho_fdt, read_scratch_areas, KexecMetadata, KhoError, KhoFdt,
    ScratchArea, METADATA_NODE,
};
use crate::luo::{hex, read_luo, LuoError, LuoState, LUO_NODE};
use crate::mem::{read_vec, to_usize, GuestMemoryRead, PAGE_SIZE};
use crate::radix::{self, PreservedMemory, RadixError};

/// Owner label of preserved memory no subsystem claimed.
pub const OWNER_KHO: &str = "kho";
/// Owner label of the KHO FDT page.
pub const OWNER_KHO_FDT: &str = "kho-fdt";
/// Owner label of scratch areas.
pub const OWNER_SCRATCH: &str = "scratch";

/// Errors from reading a handover.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandoverError {
    /// Zero page or setup_data.
    #[error("boot_params: {0}")]
    BootParams(#[from] BootParamsError),
    /// No `SETUP_KEXEC_KHO` record: not a KHO boot.
    #[error("no SETUP_KEXEC_KHO record in setup_data")]
    NoKho,
    /// FDT, scratch list or kexec-metadata.
    #[error("KHO: {0}")]
    Kho(#[from] KhoError),
    /// Preserved-memory radix tree.
    #[error("KHO radix tree: {0}")]
    Radix(#[from] RadixError),
    /// LUO state.
    #[error("LUO: {0}")]
    Luo(#[from] LuoError),
    /// The parse's budget ran out outside the parsers above (setup_data records).
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

impl HandoverError {
    /// The budget or guest-RAM error under this one, whichever parser met it.
    pub fn budget(&self) -> Option<&BudgetError> {
        match self {
            HandoverError::Budget(b)
            | HandoverError::Kho(KhoError::Budget(b))
            | HandoverError::Kho(KhoError::Fdt(crate::fdt::FdtError::Budget(b)))
            | HandoverError::Radix(RadixError::Budget(b))
            | HandoverError::Luo(LuoError::Budget(b)) => Some(b),
            _ => None,
        }
    }
}

/// Everything a KHO handover carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The setup_data records.
    pub setup_data: Vec<SetupData>,
    /// The `SETUP_KEXEC_KHO` payload.
    pub kho_data: KhoData,
    /// The KHO FDT.
    pub fdt: KhoFdt,
    /// Scratch areas.
    pub scratch: Vec<ScratchArea>,
    /// The radix tree's contents.
    pub preserved: PreservedMemory,
    /// `kexec-metadata`, if the previous kernel exported it.
    pub metadata: Option<KexecMetadata>,
    /// LUO state, if a `LUO` subtree is present and this reader decodes its `compatible`.
    pub luo: Option<LuoState>,
    /// Subsystem states present whose `compatible` this reader does not decode (a `LUO`
    /// subtree of another ABI): listed with their bytes and owner, never silently skipped.
    #[serde(default)]
    pub unparsed: Vec<Unparsed>,
}

/// A subsystem's preserved state this reader could not decode: who owns it, its
/// `compatible`, where it lies and its first bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unparsed {
    /// Its owner (the KHO subtree's name: `LUO`).
    pub owner: String,
    /// Its `compatible`, as read.
    pub compatible: String,
    /// Guest address of the blob.
    pub gpa: u64,
    /// Its size in bytes (the subtree's `blob-size`).
    pub size: u64,
    /// Its first bytes (at most [`UNPARSED_HEAD`]), in hex.
    pub head: String,
}

/// Most bytes of an unparsed blob kept in [`Unparsed::head`].
pub const UNPARSED_HEAD: usize = 64;

impl std::fmt::Display for Unparsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {:#x} ({} bytes): compatible {:?} not understood, not parsed; first bytes {}",
            self.owner, self.gpa, self.size, self.compatible, self.head
        )
    }
}

/// Preserved extents labelled by owner, and what subsystems reference but KHO does not
/// preserve (should be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelledExtents {
    /// The radix tree's extents, relabelled by the FDT, its subtrees, and LUO.
    pub set: ExtentSet,
    /// `(start, end, owner)` ranges referenced by the FDT or LUO yet not preserved.
    pub not_preserved: Vec<(u64, u64, String)>,
}

impl Handover {
    /// Reads the handover whose zero page is at `zero_page_gpa` (at `start_kernel`: the
    /// physical address of the next kernel's `boot_params` symbol), within the budget of
    /// `mem`'s RAM ([`Budget::for_memory`]).
    pub fn read(
        mem: &(impl GuestMemoryRead + ?Sized),
        zero_page_gpa: u64,
    ) -> Result<Self, HandoverError> {
        Self::read_with(mem, zero_page_gpa, &Budget::for_memory(mem))
    }

    /// [`Self::read`] within `budget`, which is charged for the whole parse; what it used is
    /// [`Budget::used`] afterwards, whether the parse succeeded or not.
    pub fn read_with(
        mem: &(impl GuestMemoryRead + ?Sized),
        zero_page_gpa: u64,
        budget: &Budget,
    ) -> Result<Self, HandoverError> {
        budget.read(BOOT_PARAMS_SIZE)?;
        let bp = BootParams::read(mem, zero_page_gpa)?;
        // At most MAX_SETUP_DATA records of 16 bytes: charged after the (bounded) walk.
        let setup_data = setup_data_list(mem, bp.setup_data())?;
        budget.read(setup_data.len() * 16)?;
        budget.records(setup_data.len() as u64)?;
        let kho_data = find_kho_data(mem, &setup_data)?.ok_or(HandoverError::NoKho)?;
        Self::from_kho_data(mem, setup_data, kho_data, budget)
    }

    /// Reads the outgoing kernel's KHO state from its root FDT at `fdt_gpa`, within
    /// `budget`: what luo-vmm does at point-of-no-return (`machine_kexec`), when the state is
    /// complete but no `setup_data` exists yet. The FDT is the page `kho_init()` allocates
    /// (`kho_out.fdt = kho_alloc_preserve(PAGE_SIZE)`, `kernel/liveupdate/kexec_handover.c`),
    /// and the kexec loader hands the next kernel `fdt_size = PAGE_SIZE` for it
    /// (`setup_kho()`, `arch/x86/kernel/kexec-bzimage64.c`): the same [`KhoData`] is built
    /// here, without a scratch list (scratch size 0: the scratch areas are the next
    /// kernel's, chosen by the loader), and parsed by [`Self::from_kho_data`], which checks
    /// the FDT header's `totalsize` against it.
    pub fn from_fdt(
        mem: &(impl GuestMemoryRead + ?Sized),
        fdt_gpa: u64,
        budget: &Budget,
    ) -> Result<Self, HandoverError> {
        let kho_data = KhoData {
            fdt_addr: fdt_gpa,
            fdt_size: PAGE_SIZE,
            scratch_addr: 0,
            scratch_size: 0,
        };
        Self::from_kho_data(mem, Vec::new(), kho_data, budget)
    }

    /// Reads everything `kho_data` points at, within `budget`.
    pub fn from_kho_data(
        mem: &(impl GuestMemoryRead + ?Sized),
        setup_data: Vec<SetupData>,
        kho_data: KhoData,
        budget: &Budget,
    ) -> Result<Self, HandoverError> {
        let fdt = read_kho_fdt(mem, &kho_data, budget)?;
        let scratch = read_scratch_areas(mem, &kho_data, budget)?;
        let preserved = radix::walk(mem, fdt.preserved_memory_map, budget)?;
        let metadata = fdt
            .subtree(METADATA_NODE)
            .map(|s| read_kexec_metadata(mem, s, budget))
            .transpose()?;
        let mut unparsed = Vec::new();
        let luo = match fdt.subtree(LUO_NODE).map(|s| (s, read_luo(mem, s, budget))) {
            None => None,
            Some((_, Ok(luo))) => Some(luo),
            // Another LUO ABI: listed, with its bytes, rather than failing the whole parse
            // or passing for an empty one.
            Some((s, Err(LuoError::Incompatible(compatible)))) => {
                let n = to_usize(s.blob_size.min(UNPARSED_HEAD as u64));
                budget.read(n)?;
                budget.records(1)?;
                budget.bytes(compatible.len() + 2 * n)?;
                let head = read_vec(mem, s.preserved_data, n).map_err(LuoError::from)?;
                unparsed.push(Unparsed {
                    owner: LUO_NODE.to_owned(),
                    compatible,
                    gpa: s.preserved_data,
                    size: s.blob_size,
                    head: hex(&head),
                });
                None
            }
            Some((_, Err(e))) => return Err(e.into()),
        };
        Ok(Handover {
            setup_data,
            kho_data,
            fdt,
            scratch,
            preserved,
            metadata,
            luo,
            unparsed,
        })
    }

    /// The preserved extents, labelled: `kho` by default, `kho-fdt` for the FDT page, the
    /// subtree name for each blob, and LUO's finer labels (sessions, memfd metadata and data).
    /// A later label wins where labels overlap. O((labels + runs) log(labels + runs)), see
    /// [`ExtentSet::relabel`]; labels and runs are bounded by the parse's budget.
    pub fn preserved_extents(&self) -> LabelledExtents {
        let base = ExtentSet::from_ranges(
            OWNER_KHO,
            self.preserved.runs.iter().map(|r| (r.pa, r.end())),
        );
        let (set, not_preserved) = base.relabel(&self.owner_labels());
        LabelledExtents { set, not_preserved }
    }

    /// What each record of the handover says it owns, as `(start, end, owner)` in painting
    /// order: the KHO FDT page, each subtree's blob (rounded up to pages), then
    /// [`LuoState::owned_ranges`]. The labels of [`Self::preserved_extents`], and what
    /// [`crate::invariants`] checks for pages with two owners.
    pub(crate) fn owner_labels(&self) -> Vec<(u64, u64, String)> {
        let page_end = |pa: u64, len: u64| {
            pa.saturating_add(len).saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
        };
        let mut labels = vec![(
            self.kho_data.fdt_addr,
            page_end(
                self.kho_data.fdt_addr,
                self.kho_data.fdt_size.min(PAGE_SIZE),
            ),
            OWNER_KHO_FDT.to_owned(),
        )];
        labels.extend(self.fdt.subtrees.iter().map(|s| {
            (
                s.preserved_data,
                page_end(s.preserved_data, s.blob_size.max(1)),
                s.name.clone(),
            )
        }));
        if let Some(luo) = &self.luo {
            labels.extend(luo.owned_ranges());
        }
        labels
    }

    /// The scratch areas as an extent set.
    pub fn scratch_extents(&self) -> ExtentSet {
        ExtentSet::from_ranges(
            OWNER_SCRATCH,
            self.scratch
                .iter()
                .map(|a| (a.addr, a.addr.saturating_add(a.size))),
        )
    }
}

/// The counts that characterise a handover: what a captured fixture records and its
/// test checks again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverSummary {
    /// 4 KiB pages in the preserved-memory tree.
    pub preserved_pages: u64,
    /// Labelled preserved extents.
    pub preserved_extents: u64,
    /// KHO scratch areas.
    pub scratch_areas: u64,
    /// LUO sessions.
    pub sessions: u64,
    /// Preserved files over all sessions.
    pub files: u64,
    /// Bytes of all preserved memfds.
    pub memfd_bytes: u64,
    /// LUO's live-update counter.
    pub liveupdate_num: u64,
}

impl Handover {
    /// Counts of what this handover carries.
    pub fn summary(&self) -> HandoverSummary {
        let luo = self.luo.as_ref();
        let files = || {
            luo.into_iter()
                .flat_map(|l| &l.sessions)
                .flat_map(|s| &s.files)
        };
        HandoverSummary {
            preserved_pages: self.preserved.pages,
            preserved_extents: self.preserved_extents().set.len() as u64,
            scratch_areas: self.scratch.len() as u64,
            sessions: luo.map_or(0, |l| l.sessions.len() as u64),
            files: files().count() as u64,
            memfd_bytes: files()
                .filter_map(|f| f.memfd.as_ref())
                .map(|m| m.size)
                .sum(),
            liveupdate_num: luo.map_or(0, |l| l.liveupdate_num),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Resource;
    use crate::fixture::{HandoverFixture, HandoverSpec, WriteMem};
    use crate::mem::SparseMemory;

    fn small() -> (SparseMemory, HandoverFixture) {
        let mut mem = SparseMemory::new(0, 1 << 30);
        let fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();
        (mem, fx)
    }

    #[test]
    fn reads_a_complete_handover() {
        let (mem, fx) = small();
        let h = Handover::read(&mem, fx.zero_page).unwrap();
        assert_eq!(h.kho_data, fx.kho);
        assert_eq!(h.setup_data.len(), 2);
        assert_eq!(h.scratch.len(), 2);
        assert_eq!(h.preserved.pages, fx.preserved_pages());
        assert_eq!(h.preserved.node_pages.len(), fx.radix_nodes);
        assert_eq!(h.metadata.as_ref().unwrap().previous_release, "7.2.13");
        let luo = h.luo.as_ref().unwrap();
        assert_eq!(
            luo.sessions[0].files[0]
                .memfd
                .as_ref()
                .unwrap()
                .folios
                .len(),
            256
        );

        let ext = h.preserved_extents();
        assert!(ext.not_preserved.is_empty(), "{:?}", ext.not_preserved);
        assert_eq!(ext.set.total_pages(), fx.preserved_pages());
        assert_eq!(ext.set.find(fx.kho.fdt_addr).unwrap().owner, OWNER_KHO_FDT);
        assert_eq!(
            ext.set.find(0x200 << 12).unwrap().owner,
            "memfd:luo-agent/0x1/data"
        );
        assert_eq!(
            ext.set.find(fx.luo.subtree.preserved_data).unwrap().owner,
            "LUO"
        );
        assert_eq!(h.scratch_extents().total_bytes(), 0x600_0000);
    }

    #[test]
    fn unpreserved_references_are_reported() {
        let mut mem = SparseMemory::new(0, 1 << 30);
        let fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();
        // Rebuild the tree without the memfd's first folio.
        let mut radix = crate::fixture::RadixBuilder::new(0x3000_0000);
        for &(pa, o) in fx.preserved.iter().filter(|&&(pa, _)| pa != 0x200 << 12) {
            radix.preserve_block(pa, o);
        }
        let root = radix.write(&mut mem).unwrap();
        let h = Handover::read(&mem, fx.zero_page).unwrap();
        let mut fdt = h.fdt.clone();
        fdt.preserved_memory_map = root;
        let blob =
            crate::fixture::kho_fdt_blob(crate::kho::KHO_FDT_COMPATIBLE, root, &fdt.subtrees);
        mem.put(fx.kho.fdt_addr, &blob).unwrap();
        let h = Handover::read(&mem, fx.zero_page).unwrap();
        let ext = h.preserved_extents();
        assert_eq!(
            ext.not_preserved,
            vec![(0x20_0000, 0x20_1000, "memfd:luo-agent/0x1/data".to_string())]
        );
    }

    #[test]
    fn one_budget_for_the_whole_parse() {
        let (mem, fx) = small();
        let budget = Budget::for_memory(&mem);
        Handover::read_with(&mem, fx.zero_page, &budget).unwrap();
        let used = budget.used();
        // Zero page, setup_data, FDT, scratch list, radix nodes, kexec-metadata, LUO records
        // and the memfd's chunk and folio array: a few dozen pages for a 1 MiB memfd.
        assert!(
            used.pages > fx.radix_nodes as u64 && used.pages < 40,
            "{used:?}"
        );
        assert!(
            used.records > 256,
            "the memfd's folios are records: {used:?}"
        );

        for resource in [Resource::Pages, Resource::Records, Resource::Bytes] {
            let mut limits = used;
            match resource {
                Resource::Pages => limits.pages -= 1,
                Resource::Records => limits.records -= 1,
                Resource::Bytes => limits.bytes -= 1,
            }
            let tight = Budget::new(mem.ram().unwrap(), limits);
            let err = Handover::read_with(&mem, fx.zero_page, &tight).unwrap_err();
            assert!(
                matches!(err.budget(), Some(BudgetError::Exhausted { resource: r, .. }) if *r == resource),
                "{resource}: {err}"
            );
        }
        let exact = Budget::new(mem.ram().unwrap(), used);
        assert!(Handover::read_with(&mem, fx.zero_page, &exact).is_ok());
    }

    #[test]
    fn the_outgoing_fdt_alone_gives_the_same_preserved_set() {
        let (mem, fx) = small();
        let next = Handover::read(&mem, fx.zero_page).unwrap();
        let budget = Budget::for_memory(&mem);
        let out = Handover::from_fdt(&mem, fx.kho.fdt_addr, &budget).unwrap();
        assert_eq!(out.preserved_extents(), next.preserved_extents());
        assert!(out.scratch.is_empty() && out.setup_data.is_empty());
        assert_eq!((out.luo, out.fdt), (next.luo, next.fdt));
        // Not an FDT: a bounded error, not a panic.
        let err = Handover::from_fdt(&mem, fx.zero_page, &budget).unwrap_err();
        assert!(matches!(err, HandoverError::Kho(_)), "{err}");
        assert!(Handover::from_fdt(&mem, 1 << 40, &budget).is_err());
    }

    #[test]
    fn another_luo_abi_is_listed_unparsed_not_dropped() {
        let (mut mem, fx) = small();
        let pa = fx.luo.subtree.preserved_data;
        mem.put(pa, b"luo-v9\0\0").unwrap();
        let h = Handover::read(&mem, fx.zero_page).unwrap();
        assert!(h.luo.is_none());
        assert_eq!(h.unparsed.len(), 1);
        let u = &h.unparsed[0];
        assert_eq!(
            (u.owner.as_str(), u.compatible.as_str(), u.gpa),
            ("LUO", "luo-v9", pa)
        );
        assert_eq!(u.size, fx.luo.subtree.blob_size);
        assert!(u.head.starts_with("6c756f2d7639"), "{}", u.head);
        assert!(u.to_string().starts_with(&format!("LUO at {pa:#x} (")));
        // The KHO level still parses: the preserved set is whole, the LUO blob labelled.
        assert_eq!(h.preserved.pages, fx.preserved_pages());
        let inv = crate::invariants::check(&h, &h.preserved_extents());
        assert!(inv
            .iter()
            .any(|c| !c.held && c.to_string().contains("\"luo-v9\" not understood")));
    }

    #[test]
    fn no_kho_record() {
        let mut mem = SparseMemory::new(0, 1 << 20);
        mem.put(0x1000, &crate::fixture::zero_page(0)).unwrap();
        assert_eq!(Handover::read(&mem, 0x1000), Err(HandoverError::NoKho));
    }
}
