//! The interception of a live update from outside the guest: hardware breakpoints on
//! the old kernel's `liveupdate_reboot` and `machine_kexec` and the next kernel's
//! `start_kernel`, dirty-page logging of the preserved set between the last two (and, for
//! the leak check, from `start_kernel` to the end of the run), and the reading of the KHO
//! state the next kernel is handed, all while the vCPU is stopped at the breakpoint.

use std::sync::Mutex;
use std::time::Instant;

use luo_devices::ProbeEvent;
use luo_handover::budget::Budget;
use luo_handover::digest::{DigestVerdict, ExtentDigests};
use luo_handover::extents::{
    classify_dirty, classify_tracked, DirtyBitmap, DirtyClassification, ExtentSet,
};
use luo_handover::kho::ScratchArea;
use luo_handover::luo::LuoState;
use luo_handover::mem::RecordingMemory;
use luo_handover::symbols::{
    KernelSymbols, SymbolError, KHO_OUT_FDT_OFFSET, SYM_BOOT_PARAMS, SYM_KHO_OUT,
    SYM_LIVEUPDATE_REBOOT, SYM_MACHINE_KEXEC, SYM_START_KERNEL,
};
use luo_handover::timeline::{human_duration, Timeline};
use luo_handover::{Handover, LabelledExtents};
use luo_protocol::Mark;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::guest_ram::LiveRam;
use super::injector::{self, Injection};
use crate::config::options::InterceptOptions;
use crate::machine::arch::paging::translate;
use crate::machine::dirty::{DirtyLog, LogMode, SlotBitmap};
use crate::machine::vcpu::run::HookAction;
use crate::machine::vm::{RunObserver, StoppedVcpu};
use crate::run::next::{KernelId, KernelSequence};

/// Why the interception cannot watch the run's kernels.
#[derive(Debug, Error)]
pub enum MissingSymbol {
    /// A symbol of an outgoing kernel (its index in the run's kernels).
    #[error("the outgoing kernel: {1}")]
    Outgoing(usize, SymbolError),
    /// A symbol of a next kernel (its index in the run's kernels).
    #[error("the next kernel: {1}")]
    Next(usize, SymbolError),
    /// The kernels' addresses need more breakpoints than a vCPU has.
    #[error("the kernels of this run break at {needed} different addresses on vCPU 0 ({what}); a vCPU has 4 debug registers: run fewer kernels per VM (no --alternate, or --repeat 1)")]
    TooManyBreakpoints {
        /// Distinct addresses needed.
        needed: usize,
        /// Which.
        what: String,
    },
}

/// Where the interception breaks in one kernel, and what it reads there: its
/// `liveupdate_reboot`, `machine_kexec` and `start_kernel`, its `boot_params` (read when it
/// is the next kernel) and its `kho_out` (read when it is the outgoing one; a kernel
/// without KHO lacks it, which the digest reports as its reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPoints {
    /// `liveupdate_reboot`.
    pub serialize: u64,
    /// `machine_kexec`.
    pub point_of_no_return: u64,
    /// `start_kernel`.
    pub start_kernel: u64,
    /// `boot_params`.
    pub boot_params: u64,
    /// `kho_out`, or why there is none.
    pub kho_out: Result<u64, String>,
}

impl KernelPoints {
    /// The points of the kernel with `symbols`, number `index` of the run's kernels; `as_next`
    /// says which role a missing symbol is reported under.
    fn of(symbols: &KernelSymbols, index: usize) -> Result<Self, MissingSymbol> {
        let out = |name| {
            symbols
                .address(name)
                .map_err(|e| MissingSymbol::Outgoing(index, e))
        };
        let next = |name| {
            symbols
                .address(name)
                .map_err(|e| MissingSymbol::Next(index, e))
        };
        Ok(KernelPoints {
            serialize: out(SYM_LIVEUPDATE_REBOOT)?,
            point_of_no_return: out(SYM_MACHINE_KEXEC)?,
            start_kernel: next(SYM_START_KERNEL)?,
            boot_params: next(SYM_BOOT_PARAMS)?,
            kho_out: symbols.address(SYM_KHO_OUT).map_err(|e| e.to_string()),
        })
    }

    /// A round's three addresses: this kernel's two, and `next`'s `start_kernel`.
    fn round_addresses(&self, next: &KernelPoints) -> [u64; 3] {
        [self.serialize, self.point_of_no_return, next.start_kernel]
    }
}

/// The breakpoints of a run whose handovers go `sequence`'s way through `kernels`, for
/// `rounds` handovers: on vCPU 0 the first round's `liveupdate_reboot`, `machine_kexec` and
/// next `start_kernel` in slots 0-2 (in [`InterceptPoint::ALL`]'s order), then every
/// other address a later round needs; on the other vCPUs the outgoing kernels'
/// `liveupdate_reboot` and `machine_kexec`. Addresses are deduplicated (a kernel that
/// kexecs itself needs three). Pure. Errors: more than four on a vCPU.
pub(crate) fn plan_breakpoints(
    kernels: &[KernelPoints],
    sequence: &KernelSequence,
    rounds: u32,
) -> Result<(Vec<u64>, Vec<u64>), MissingSymbol> {
    let mut vcpu0: Vec<u64> = Vec::new();
    let mut others: Vec<u64> = Vec::new();
    let push = |v: &mut Vec<u64>, a: u64| {
        if !v.contains(&a) {
            v.push(a);
        }
    };
    // Enough rounds to see every pair of the cycle once.
    let distinct = (rounds.max(1) as usize).min(sequence.cycle.len() + 1);
    for r in 0..distinct {
        let (out, next) = sequence.round(r);
        let (Some(o), Some(n)) = (kernels.get(out), kernels.get(next)) else {
            continue;
        };
        for a in o.round_addresses(n) {
            push(&mut vcpu0, a);
        }
        push(&mut others, o.serialize);
        push(&mut others, o.point_of_no_return);
    }
    if vcpu0.len() > 4 || others.len() > 4 {
        return Err(MissingSymbol::TooManyBreakpoints {
            needed: vcpu0.len().max(others.len()),
            what: vcpu0
                .iter()
                .map(|a| format!("{a:#x}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok((vcpu0, others))
}

/// What a breakpoint hit at `pc` is in round `round` (`in_kexec`: between its
/// point-of-no-return and next-kernel-start): the round's outgoing kernel's
/// `liveupdate_reboot` or `machine_kexec`, its next kernel's `start_kernel`, the first
/// kernel's `start_kernel` at the first boot, or nothing (another kernel's address,
/// reached by this kernel's code, or a stop the round does not expect). Pure.
pub(crate) fn point_at(
    kernels: &[KernelPoints],
    sequence: &KernelSequence,
    round: usize,
    in_kexec: bool,
    pc: u64,
) -> Option<InterceptPoint> {
    let (out, next) = sequence.round(round);
    let (o, n) = (kernels.get(out)?, kernels.get(next)?);
    if in_kexec {
        return (pc == n.start_kernel).then_some(InterceptPoint::StartKernel);
    }
    if pc == o.serialize {
        Some(InterceptPoint::Serialize)
    } else if pc == o.point_of_no_return {
        Some(InterceptPoint::PointOfNoReturn)
    } else if round == 0 && pc == kernels.first()?.start_kernel {
        // The first boot's start_kernel: no handover's.
        Some(InterceptPoint::StartKernel)
    } else {
        None
    }
}

/// The interception's breakpoints, by what each marks; in a run's first handover its slot
/// on vCPU 0 is its place in [`InterceptPoint::ALL`] ([`plan_breakpoints`]); a hit is
/// named by its address and the round ([`point_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InterceptPoint {
    /// `liveupdate_reboot`: serialize-start.
    Serialize,
    /// `machine_kexec`: point-of-no-return.
    PointOfNoReturn,
    /// `start_kernel`: next-kernel-start (or the first boot).
    StartKernel,
}

impl InterceptPoint {
    /// Every point, in slot order.
    pub const ALL: [Self; 3] = [Self::Serialize, Self::PointOfNoReturn, Self::StartKernel];

    /// The kernel symbol it breaks at.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Serialize => SYM_LIVEUPDATE_REBOOT,
            Self::PointOfNoReturn => SYM_MACHINE_KEXEC,
            Self::StartKernel => SYM_START_KERNEL,
        }
    }

    /// How a schedule's timeline names a hit: `kernel: machine_kexec (point-of-no-return)`.
    pub fn describe(self) -> String {
        match self {
            Self::StartKernel => format!("kernel: {}", self.symbol()),
            _ => format!("kernel: {} ({})", self.symbol(), self.mark().name()),
        }
    }

    /// The mark it records (in a handover, for `start_kernel`).
    fn mark(self) -> Mark {
        match self {
            Self::Serialize => Mark::SerializeStart,
            Self::PointOfNoReturn => Mark::PointOfNoReturn,
            Self::StartKernel => Mark::NextKernelStart,
        }
    }
}

/// What the interceptor learned about one handover.
#[derive(Debug, Default)]
pub struct RoundCapture {
    /// The KHO state handed to the next kernel, or why it could not be read.
    pub handover: Option<Result<HandoverState, String>>,
    /// Pages written between point-of-no-return and next-kernel-start.
    pub dirty: Option<Result<DirtyClassification, String>>,
    /// Extent digests before and after, when asked for.
    pub digest: Option<Result<DigestVerdict, String>>,
    /// What was injected, and where (the text report's line).
    pub injected: Option<String>,
    /// `--inject PATH=VALUE`: the writes made, or why none was.
    pub injection: Injection,
    /// Host time luo-vmm spent with the guest stopped in its hooks this round (the sum of
    /// `hooks`).
    pub hook_ns: u64,
    /// Each stop at a breakpoint this round: which, on which vCPU, how long, and what the
    /// time went to.
    pub hooks: Vec<HookTime>,
    /// The leak check of the last round: the preserved pages (address, owner) the next
    /// kernel wrote between its start and the end of the run, or why that is not known.
    pub written_after: Option<Result<Vec<(u64, String)>, String>>,
    /// Of those, per session: the pages written before its first `finish` or `close`
    /// started ([`EndMarks`]).
    pub written_before_end: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>>,
}

/// The parts of the KHO state the report needs.
#[derive(Debug)]
pub struct HandoverState {
    /// Preserved extents with owners.
    pub extents: LabelledExtents,
    /// Scratch areas.
    pub scratch: Vec<ScratchArea>,
    /// The full parse.
    pub handover: Handover,
}

/// The pages whose dirty bits were cleared at this round's point-of-no-return.
#[derive(Debug)]
enum Watched {
    /// Every guest page.
    AllPages,
    /// The preserved set as the outgoing kernel had it.
    Preserved(ExtentSet),
}

/// The marks, behind a lock of their own: the main thread records probe marks here and
/// must never wait for a vCPU thread's parse of guest data (which holds [`State`]), or
/// `--timeout` could not end the run.
#[derive(Default)]
struct Marks {
    marks: Vec<(Mark, Instant)>,
    /// The next userspace-up belongs to a handover (not to the first boot): set by
    /// reboot-requested.
    await_userspace: bool,
}

/// What the hooks work on (vCPU threads only).
#[derive(Default)]
struct State {
    /// Between point-of-no-return and next-kernel-start.
    in_kexec: bool,
    /// Breakpoints hit so far, the first boot's `start_kernel` aside.
    hits: usize,
    /// `--verify-digest`: the preserved extents' digests taken at point-of-no-return, or
    /// why there are none.
    before: Option<Result<ExtentDigests, String>>,
    /// What this round's dirty log watches, once it is on.
    watched: Option<Watched>,
    /// The preserved set handed over at the last next-kernel-start, watched since then
    /// for the leak check (its bits cleared there, whichever way the log is kept).
    watched_after: Option<ExtentSet>,
    /// What the leak check read as each session's end started.
    ends: EndMarks,
    rounds: Vec<RoundCapture>,
    current: RoundCapture,
    /// The outgoing LUO records at each point-of-no-return.
    outgoing: Vec<Result<Option<LuoState>, String>>,
}

/// Observes the handover; shared between the vCPU threads and the main thread.
pub struct Interceptor {
    /// vCPU 0's breakpoints ([`plan_breakpoints`]).
    breakpoints: Vec<u64>,
    /// The other vCPUs'.
    breakpoints_other: Vec<u64>,
    /// The run's kernels: 0 boots, the others are kexec'd into.
    kernels: Vec<KernelPoints>,
    /// Which kernel each handover goes from and to.
    sequence: KernelSequence,
    /// The kernels' names, by index, for the report (empty: not named).
    ids: Vec<KernelId>,
    options: InterceptOptions,
    marks: Mutex<Marks>,
    state: Mutex<State>,
}

/// What the interceptor hands back after the run.
#[derive(Debug)]
pub struct Interception {
    /// All marks, host-monotonic ns since VM start.
    pub timeline: Timeline,
    /// One capture per handover that reached the next kernel.
    pub rounds: Vec<RoundCapture>,
    /// Per handover of the timeline (as many as it has, or none when the kernels were not
    /// named): the kernel it went from and the one it went to.
    pub kernels: Vec<(KernelId, KernelId)>,
    /// Per point-of-no-return reached: the LUO records the outgoing kernel's KHO FDT holds
    /// there (`None`: no LUO subtree), or why they could not be read. A run that ends at
    /// point-of-no-return (`explore`) is judged on these.
    pub outgoing: Vec<Result<Option<LuoState>, String>>,
}

impl Interception {
    /// Nothing intercepted (a run without a handover).
    pub fn empty() -> Self {
        Interception {
            timeline: Timeline::new(),
            rounds: Vec::new(),
            kernels: Vec::new(),
            outgoing: Vec::new(),
        }
    }
}

impl Interceptor {
    /// The interceptor of `rounds` handovers through the kernels with symbols `kernels`
    /// (index 0 boots; a kernel that kexecs itself is one kernel and
    /// [`KernelSequence::same`]), going `sequence`'s way: the one constructor every
    /// command uses. Each round breaks at its outgoing kernel's `liveupdate_reboot` and
    /// `machine_kexec` and its next kernel's `start_kernel`, reads the outgoing kernel's
    /// `kho_out` at point-of-no-return and the next kernel's `boot_params` at
    /// next-kernel-start. Errors: a symbol the interception needs is missing, or the
    /// addresses do not fit in the debug registers ([`plan_breakpoints`]).
    pub fn for_kernels(
        kernels: &[&KernelSymbols],
        sequence: KernelSequence,
        rounds: u32,
        options: InterceptOptions,
    ) -> Result<Self, MissingSymbol> {
        let points = kernels
            .iter()
            .enumerate()
            .map(|(i, k)| KernelPoints::of(k, i))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(points, sequence, rounds, options)
    }

    /// An interceptor over the kernels' `points` (see [`Self::for_kernels`]).
    fn new(
        kernels: Vec<KernelPoints>,
        sequence: KernelSequence,
        rounds: u32,
        options: InterceptOptions,
    ) -> Result<Self, MissingSymbol> {
        let (breakpoints, breakpoints_other) = plan_breakpoints(&kernels, &sequence, rounds)?;
        Ok(Self {
            breakpoints,
            breakpoints_other,
            kernels,
            sequence,
            ids: Vec::new(),
            options,
            marks: Mutex::new(Marks::default()),
            state: Mutex::new(State::default()),
        })
    }

    /// Names the kernels (by index, as given to [`Self::for_kernels`]) in the report.
    pub(crate) fn with_ids(mut self, ids: Vec<KernelId>) -> Self {
        self.ids = ids;
        self
    }

    /// The run's kernels of handover `round` (0-based): outgoing and next.
    fn round_kernels(&self, round: usize) -> Option<(&KernelPoints, &KernelPoints)> {
        let (out, next) = self.sequence.round(round);
        Some((self.kernels.get(out)?, self.kernels.get(next)?))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a breakpoint's mark (a short lock of its own).
    fn mark(&self, mark: Mark, at: Instant) {
        self.marks().marks.push((mark, at));
    }

    /// Everything captured, with times relative to `started`; call after the VM stopped.
    pub fn finish(&self, started: Instant) -> Interception {
        let marks = std::mem::take(&mut self.marks().marks);
        let timeline = timeline_from(marks, started);
        let mut s = self.lock();
        let kernels = (0..timeline.rounds().len())
            .map_while(|r| {
                let (out, next) = self.sequence.round(r);
                Some((self.ids.get(out)?.clone(), self.ids.get(next)?.clone()))
            })
            .collect();
        Interception {
            timeline,
            rounds: std::mem::take(&mut s.rounds),
            kernels,
            outgoing: std::mem::take(&mut s.outgoing),
        }
    }

    fn point_of_no_return(&self, at: &StoppedVcpu<'_>, s: &mut State, parts: &mut Parts) {
        s.in_kexec = true;
        let memory = at.vcpu.memory();
        let log = !self.options.no_dirty_log;
        let track_preserved = log && !self.options.track_all_pages;
        let kho_out = self.round_kernels(s.rounds.len()).map_or_else(
            || Err("no kernel for this round".to_owned()),
            |(o, _)| o.kho_out.clone(),
        );
        // Read once: the records for the judge, the preserved set for the digest and the
        // dirty log.
        let handover = self.outgoing_handover(at, kho_out);
        parts.lap("outgoing KHO state");
        s.outgoing.push(
            handover
                .as_ref()
                .map(|h| h.luo.clone())
                .map_err(Clone::clone),
        );
        let outgoing = (self.options.verify_digest || track_preserved)
            .then(|| handover.map(|h| h.preserved_extents().set));
        if self.options.verify_digest {
            s.before = outgoing.as_ref().map(|set| {
                set.as_ref().map_err(Clone::clone).and_then(|set| {
                    ExtentDigests::compute(&LiveRam(memory), set, self.options.digest)
                        .map_err(|e| format!("digest at point-of-no-return: {e}"))
                })
            });
            parts.lap("digest");
        }
        if log {
            let tracked = outgoing.and_then(Result::ok).filter(|_| track_preserved);
            match self.start_dirty_log(at, tracked) {
                Ok(watched) => s.watched = Some(watched),
                Err(e) => s.current.dirty = Some(Err(e)),
            }
            parts.lap("dirty log on");
        }
    }

    /// Starts this round's dirty log: under manual protection (when KVM offers it and the
    /// preserved set is known) only the pages of `tracked` are write-protected, otherwise
    /// every page.
    fn start_dirty_log(
        &self,
        at: &StoppedVcpu<'_>,
        tracked: Option<ExtentSet>,
    ) -> Result<Watched, String> {
        let mode = at
            .dirty
            .start(tracked.as_ref())
            .map_err(|e| format!("cannot start dirty logging: {e}"))?;
        Ok(match (mode, tracked) {
            (LogMode::Manual, Some(set)) => Watched::Preserved(set),
            _ => Watched::AllPages,
        })
    }

    /// The KHO state as the outgoing kernel has it at `machine_kexec`: `kho_out.fdt`
    /// (a direct-map pointer to the KHO root FDT, complete since `kho_fill_kimage()`) read
    /// through the stopped vCPU's page tables, and the FDT parsed with
    /// [`Handover::from_fdt`] within a budget sized from guest RAM.
    fn outgoing_handover(
        &self,
        at: &StoppedVcpu<'_>,
        kho_out: Result<u64, String>,
    ) -> Result<Handover, String> {
        let kho_out = kho_out?;
        let memory = at.vcpu.memory();
        let sregs = sregs_of(at)?;
        let read = |pa: u64| memory.read_obj::<u64>(GuestAddress(pa)).ok();
        let field = kho_out.wrapping_add(KHO_OUT_FDT_OFFSET);
        let fdt_va = translate(&sregs, field, read)
            .and_then(read)
            .ok_or_else(|| format!("{SYM_KHO_OUT} at {kho_out:#x} is not mapped"))?;
        if fdt_va == 0 {
            return Err(format!("{SYM_KHO_OUT}.fdt is NULL: KHO is not enabled"));
        }
        let fdt_gpa = translate(&sregs, fdt_va, read)
            .ok_or_else(|| format!("{SYM_KHO_OUT}.fdt {fdt_va:#x} is not mapped"))?;
        let live = LiveRam(memory);
        Handover::from_fdt(&live, fdt_gpa, &Budget::for_memory(&live))
            .map_err(|e| format!("the outgoing KHO FDT at {fdt_gpa:#x}: {e}"))
    }

    fn next_kernel_start(&self, at: &StoppedVcpu<'_>, s: &mut State, parts: &mut Parts) {
        s.in_kexec = false;
        let memory = at.vcpu.memory();
        let watched = s.watched.take();
        let bitmaps = watched.as_ref().map(|_| at.dirty.take());
        parts.lap("dirty log read");
        let live = LiveRam(memory);
        let state = match self.round_kernels(s.rounds.len()) {
            Some((_, next)) => self.read_handover(at, next.boot_params),
            None => Err("no kernel for this round".to_owned()),
        };
        parts.lap("KHO state");
        let before = s.before.take();
        if let Ok(st) = &state {
            let scratch = st.handover.scratch_extents();
            if let (Some(watched), Some(bitmaps)) = (watched, bitmaps) {
                s.current.dirty = Some(
                    bitmaps
                        .map(|maps| classify(&maps, &watched, &st.extents.set, &scratch))
                        .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}")),
                );
            }
            parts.lap("dirty ∩ extents");
            // The leak check: the log stays on, now watching the set handed over.
            if at.dirty.mode().is_some() {
                // Under manual protection the set's bits are cleared again; over the
                // whole guest the log was just read, and so cleared.
                let again = at.dirty.clear(&st.extents.set);
                match again {
                    Ok(_) => {
                        s.watched_after = Some(st.extents.set.clone());
                        s.ends = EndMarks::default();
                    }
                    Err(e) => {
                        s.current.written_after = Some(Err(format!("KVM_CLEAR_DIRTY_LOG: {e}")))
                    }
                }
                parts.lap("leak check on");
            }
            if let Some(before) = before {
                s.current.digest = Some(before.and_then(|b| {
                    ExtentDigests::compute(&live, &st.extents.set, b.algorithm)
                        .map(|after| b.compare(&after))
                        .map_err(|e| format!("digest at next-kernel-start: {e}"))
                }));
                parts.lap("digest");
            }
        }
        let parsed = state.as_ref().ok().map(|st| &st.handover);
        let injection = injector::at_next_kernel_start(memory, parsed, &self.options.inject);
        s.current.injected = injection.summary.clone();
        s.current.injection = injection;
        s.current.handover = Some(state);
    }

    fn read_handover(
        &self,
        at: &StoppedVcpu<'_>,
        boot_params_va: u64,
    ) -> Result<HandoverState, String> {
        let memory = at.vcpu.memory();
        let sregs = sregs_of(at)?;
        let read = |pa: u64| memory.read_obj::<u64>(GuestAddress(pa)).ok();
        let zero_page = translate(&sregs, boot_params_va, read).ok_or_else(|| {
            format!(
                "boot_params at {boot_params_va:#x} is not mapped by the next kernel's page tables"
            )
        })?;
        let live = LiveRam(memory);
        let handover = match &self.options.capture_fixture {
            Some(dir) => {
                let rec = RecordingMemory::new(&live);
                let h = Handover::read(&rec, zero_page).map_err(|e| e.to_string())?;
                let size = memory
                    .iter()
                    .map(|r| r.start_addr().raw_value() + r.len())
                    .max()
                    .unwrap_or(0);
                if let Err(e) = super::capture::save(dir, &rec, zero_page, size, &h) {
                    log::warn!("cannot save the fixture in {}: {e}", dir.display());
                }
                h
            }
            None => Handover::read(&live, zero_page).map_err(|e| e.to_string())?,
        };
        Ok(HandoverState {
            extents: handover.preserved_extents(),
            scratch: handover.scratch.clone(),
            handover,
        })
    }
}

/// Orders marks by when they happened (probe marks reach the interceptor through a
/// channel, breakpoint marks directly, so recording order is not time order) and makes
/// them relative to `started`.
pub fn timeline_from(mut marks: Vec<(Mark, Instant)>, started: Instant) -> Timeline {
    marks.sort_by_key(|&(_, at)| at);
    let mut timeline = Timeline::new();
    for (mark, at) in marks {
        let ns = at.saturating_duration_since(started).as_nanos();
        timeline.record(mark, u64::try_from(ns).unwrap_or(u64::MAX));
    }
    timeline
}

/// Classifies every slot's bitmap against the preserved set handed over, by what was
/// watched: with only the outgoing preserved set watched, its pages missing from the
/// handed-over set are counted once as untracked.
fn classify(
    maps: &[SlotBitmap],
    watched: &Watched,
    preserved: &ExtentSet,
    scratch: &ExtentSet,
) -> DirtyClassification {
    let mut all = DirtyClassification::default();
    for m in maps {
        let bitmap = DirtyBitmap::new(m.base, &m.words);
        let c = match watched {
            Watched::AllPages => classify_dirty(&bitmap, preserved, scratch),
            Watched::Preserved(tracked) => classify_tracked(&bitmap, preserved, tracked),
        };
        all.preserved.extend(c.preserved);
        all.scratch += c.scratch;
        all.other.extend(c.other);
    }
    if let Watched::Preserved(tracked) = watched {
        all.scope = luo_handover::extents::DirtyScope::Preserved;
        all.untracked = preserved.pages_outside(tracked);
    }
    all
}

/// Nanoseconds since `since`, saturating.
fn ns_since(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What one hook's time went to: consecutive laps of one stopwatch.
struct Parts {
    last: Instant,
    parts: Vec<HookPart>,
}

impl Parts {
    fn new(started: Instant) -> Self {
        Parts {
            last: started,
            parts: Vec::new(),
        }
    }

    /// Ends a lap called `what`.
    fn lap(&mut self, what: &str) {
        let now = Instant::now();
        let ns =
            u64::try_from(now.saturating_duration_since(self.last).as_nanos()).unwrap_or(u64::MAX);
        self.parts.push(HookPart {
            what: what.to_owned(),
            ns,
        });
        self.last = now;
    }
}

/// The stopped vCPU's special registers (CR3 and CR4.LA57 for the page walk).
fn sregs_of(at: &StoppedVcpu<'_>) -> Result<kvm_bindings::kvm_sregs, String> {
    at.vcpu
        .fd
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))
}

/// The mark and the symbol of breakpoint `point` (`in_kexec`: a start_kernel hit belongs
/// to a handover).
fn hook_names(point: Option<InterceptPoint>, in_kexec: bool) -> (&'static str, &'static str) {
    match point {
        Some(InterceptPoint::StartKernel) if !in_kexec => ("first-boot", SYM_START_KERNEL),
        Some(p) => (p.mark().name(), p.symbol()),
        None => ("unknown", "?"),
    }
}

/// The pages of `set` that `maps` (a read of the dirty log) says were written, with their
/// owners, ascending.
/// The pages of a watched preserved set written before each session's end: a `finish` or
/// `close` of a retrieved session discards what was not retrieved (`memfd_luo_finish()`),
/// which explains a page written after it started but not one written before (a failed
/// retrieve's own cleanup). The dirty log is read as each session's first end starts (on
/// the vCPU that announced it, before it goes on), and at the run's end.
#[derive(Debug, Default)]
pub(crate) struct EndMarks {
    /// Every page read so far, with its owner.
    written: std::collections::BTreeMap<u64, String>,
    /// Per session name, the pages written before its end started.
    before_end: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>>,
}

impl EndMarks {
    /// Adds the pages of `set` in `maps` (a read of the dirty log) to what was written.
    pub(crate) fn add(&mut self, set: &ExtentSet, maps: &[SlotBitmap]) {
        self.written.extend(pages_written(set, maps));
    }

    /// `session`'s end starts now (the first one counts): `maps` is the log read now.
    pub(crate) fn end_starts(&mut self, session: &str, set: &ExtentSet, maps: &[SlotBitmap]) {
        self.add(set, maps);
        if !self.before_end.contains_key(session) {
            let so_far = self.written.keys().copied().collect();
            self.before_end.insert(session.to_owned(), so_far);
        }
    }

    /// Every page written, with its owner, and the pages before each session's end.
    pub(crate) fn finish(self) -> WrittenPages {
        (self.written.into_iter().collect(), self.before_end)
    }
}

/// Every preserved page written `(gpa, owner)`, and per session name the pages written
/// before its end started.
pub(crate) type WrittenPages = (
    Vec<(u64, String)>,
    std::collections::BTreeMap<String, std::collections::BTreeSet<u64>>,
);

/// Tells which probe messages start a session's end in the next kernel: the agent's
/// `finish` or `close` announcements (a `close` finishes a retrieved session) after it
/// said it runs stage 2. A stage-1 `close` of the same session, replayed to a run from a
/// snapshot taken in stage 2, is none.
#[derive(Debug, Default)]
pub(crate) struct SessionEnds {
    /// The agent's last `Boot` message said stage 2.
    stage2: std::sync::atomic::AtomicBool,
}

impl SessionEnds {
    /// The session, by name, whose end `ev` announces the start of.
    pub(crate) fn starts(&self, ev: &ProbeEvent) -> Option<String> {
        use luo_protocol::message::{Action, Message};
        use std::sync::atomic::Ordering;
        match &ev.item {
            Ok(Message::Boot { stage, .. }) => {
                self.stage2.store(
                    *stage == luo_protocol::workload::Stage::Two,
                    Ordering::SeqCst,
                );
                None
            }
            Ok(Message::ActionStart {
                action: Action::FinishSession | Action::CloseSession,
                arg,
                ..
            }) if self.stage2.load(Ordering::SeqCst) => {
                let s = u32::try_from(*arg).ok()?;
                Some(luo_protocol::workload::Memfds::session_name(s).to_string())
            }
            _ => None,
        }
    }
}

pub(crate) fn pages_written(set: &ExtentSet, maps: &[SlotBitmap]) -> Vec<(u64, String)> {
    maps.iter()
        .flat_map(|m| set.written_pages(&DirtyBitmap::new(m.base, &m.words)))
        .map(|page| {
            let owner = set.find(page).map_or("?", |e| e.owner);
            (page, owner.to_owned())
        })
        .collect()
}

impl Interceptor {
    /// The leak check's end: the preserved pages (of the last set handed over) written
    /// since that next-kernel-start, with their owners, into the last round.
    fn leak_check(&self, dirty: &DirtyLog) {
        let mut s = self.lock();
        let Some(preserved) = s.watched_after.take() else {
            return;
        };
        let mut ends = std::mem::take(&mut s.ends);
        let (written, before_end) = match dirty.take() {
            Ok(maps) => {
                ends.add(&preserved, &maps);
                let (written, before) = ends.finish();
                (Ok(written), before)
            }
            Err(e) => (Err(format!("KVM_GET_DIRTY_LOG: {e}")), Default::default()),
        };
        if let Some(last) = s.rounds.last_mut() {
            last.written_after = Some(written);
            last.written_before_end = before_end;
        }
    }

    /// A session's end starts in the next kernel (a probe message, on the vCPU that sent
    /// it): the leak check reads the log now, to tell what that end discards from what
    /// was written before it ([`EndMarks`]).
    pub fn on_session_end(&self, session: &str, dirty: &DirtyLog) {
        let mut s = self.lock();
        let Some(preserved) = s.watched_after.clone() else {
            return;
        };
        match dirty.take() {
            Ok(maps) => s.ends.end_starts(session, &preserved, &maps),
            Err(e) => log::warn!("KVM_GET_DIRTY_LOG as {session}'s end starts: {e}"),
        }
    }
}

impl RunObserver for Interceptor {
    fn on_stopped(&self, dirty: &DirtyLog) {
        self.leak_check(dirty);
    }

    /// No breakpoint of the interception hit yet but the first boot's `start_kernel`
    /// (which only times its hook): what it knows came from the probe.
    fn quiescent(&self) -> bool {
        self.lock().hits == 0
    }

    /// `liveupdate_reboot` and `machine_kexec` on every vCPU (the reboot may come from
    /// any CPU); `start_kernel` only on vCPU 0, the only CPU that runs it.
    fn breakpoints(&self, vcpu: u8) -> Vec<u64> {
        if self.options.no_intercept {
            Vec::new()
        } else if vcpu == 0 {
            self.breakpoints.clone()
        } else {
            self.breakpoints_other.clone()
        }
    }

    fn on_probe(&self, ev: &ProbeEvent) {
        let Some(mark) = ev.item.as_ref().ok().and_then(|m| m.mark()) else {
            return;
        };
        let mut s = self.marks();
        match mark {
            Mark::RebootRequested => {
                // The next userspace-up is the next kernel's.
                s.await_userspace = true;
                s.marks.push((mark, ev.at));
            }
            Mark::UserspaceUp if s.await_userspace => {
                s.await_userspace = false;
                s.marks.push((mark, ev.at));
            }
            Mark::WorkloadResumed => s.marks.push((mark, ev.at)),
            _ => {}
        }
    }

    fn on_breakpoint(&self, at: StoppedVcpu<'_>, _slot: usize, pc: u64) -> HookAction {
        let hit = Instant::now();
        let mut s = self.lock();
        let point = point_at(
            &self.kernels,
            &self.sequence,
            s.rounds.len(),
            s.in_kexec,
            pc,
        );
        // The first boot's start_kernel only times the hook: not a handover's state.
        if point != Some(InterceptPoint::StartKernel) || s.in_kexec {
            s.hits += 1;
        }
        let (mark, symbol) = hook_names(point, s.in_kexec);
        let mut parts = Parts::new(hit);
        let mut round_done = false;
        match point {
            Some(InterceptPoint::Serialize) => self.mark(Mark::SerializeStart, hit),
            Some(InterceptPoint::PointOfNoReturn) => {
                self.mark(Mark::PointOfNoReturn, hit);
                self.point_of_no_return(&at, &mut s, &mut parts);
            }
            // The first start_kernel is the first boot, not a handover.
            Some(InterceptPoint::StartKernel) if s.in_kexec => {
                self.mark(Mark::NextKernelStart, hit);
                self.next_kernel_start(&at, &mut s, &mut parts);
                round_done = true;
            }
            _ => {}
        }
        let ns = ns_since(hit);
        s.current.hook_ns += ns;
        s.current.hooks.push(HookTime {
            mark: mark.to_owned(),
            symbol: symbol.to_owned(),
            vcpu: at.vcpu.id,
            ns,
            parts: parts.parts,
        });
        if round_done {
            let done = std::mem::take(&mut s.current);
            s.rounds.push(done);
        }
        HookAction::Continue
    }
}

/// Host time luo-vmm held one vCPU stopped at one breakpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookTime {
    /// The mark it recorded (`serialize-start`, `point-of-no-return`,
    /// `next-kernel-start`; `first-boot` for the first kernel's `start_kernel`, which is no
    /// handover's).
    pub mark: String,
    /// The kernel symbol of the breakpoint.
    pub symbol: String,
    /// The vCPU that stopped there.
    pub vcpu: u8,
    /// From the breakpoint's exit to the vCPU's release, in ns (the single-step over the
    /// breakpoint not included).
    pub ns: u64,
    /// What that time went to, in order (dirty log, KHO state, digest...).
    pub parts: Vec<HookPart>,
}

/// One part of a hook's time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookPart {
    /// What was done.
    pub what: String,
    /// How long it took, in ns.
    pub ns: u64,
}

impl std::fmt::Display for HookTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, vCPU {}): {}",
            self.mark,
            self.symbol,
            self.vcpu,
            human_duration(self.ns)
        )?;
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{} {}", p.what, human_duration(p.ns)))
            .collect();
        if !parts.is_empty() {
            write!(f, " [{}]", parts.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_session_s_end_starts_in_stage_2_only() {
        use luo_protocol::message::{Action, Message};
        use luo_protocol::workload::Stage;
        let ev = |item| ProbeEvent {
            item: Ok(item),
            at: Instant::now(),
        };
        let boot = |stage| ev(Message::Boot { stage, round: 0 });
        let start = |action, arg| {
            ev(Message::ActionStart {
                seq: 1,
                action,
                arg,
            })
        };
        let ends = SessionEnds::default();
        assert_eq!(ends.starts(&boot(Stage::One)), None);
        // Stage 1's racing close (replayed to a stage-2 run) is no end in the next kernel.
        assert_eq!(ends.starts(&start(Action::CloseSession, 1)), None);
        assert_eq!(ends.starts(&boot(Stage::Two)), None);
        assert_eq!(
            ends.starts(&start(Action::FinishSession, 0)).as_deref(),
            Some("luo-vmm-s0")
        );
        assert_eq!(
            ends.starts(&start(Action::CloseSession, 1)).as_deref(),
            Some("luo-vmm-s1")
        );
        assert_eq!(ends.starts(&start(Action::RetrieveSession, 0)), None);
    }

    #[test]
    fn each_session_s_end_keeps_what_was_written_before_it() {
        let mut b = ExtentSet::builder();
        b.add(0x10000, 0x12000, "memfd:luo-vmm-s0/0x0/data");
        let set = b.build();
        let page = |gpa: u64| SlotBitmap {
            base: 0,
            words: {
                let mut w = vec![0u64; 1];
                w[(gpa >> 12) as usize / 64] |= 1 << ((gpa >> 12) % 64);
                w
            },
        };
        let mut ends = EndMarks::default();
        ends.end_starts("luo-vmm-s0", &set, &[page(0x10000)]);
        // The second end of a session does not move its mark.
        ends.end_starts("luo-vmm-s0", &set, &[page(0x11000)]);
        ends.add(&set, &[page(0x11000)]);
        let (written, before) = ends.finish();
        assert_eq!(
            written,
            [
                (0x10000, "memfd:luo-vmm-s0/0x0/data".to_owned()),
                (0x11000, "memfd:luo-vmm-s0/0x0/data".to_owned())
            ]
        );
        assert_eq!(before["luo-vmm-s0"], [0x10000].into_iter().collect());
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn each_hook_is_named_by_its_mark_and_symbol() {
        assert_eq!(
            hook_names(Some(InterceptPoint::PointOfNoReturn), false),
            ("point-of-no-return", "machine_kexec")
        );
        assert_eq!(
            hook_names(Some(InterceptPoint::StartKernel), true),
            ("next-kernel-start", "start_kernel")
        );
        assert_eq!(
            hook_names(Some(InterceptPoint::StartKernel), false).0,
            "first-boot"
        );
        assert_eq!(
            hook_names(Some(InterceptPoint::Serialize), true).1,
            "liveupdate_reboot"
        );
        assert_eq!(hook_names(None, true), ("unknown", "?"));
        assert_eq!(
            InterceptPoint::PointOfNoReturn.describe(),
            "kernel: machine_kexec (point-of-no-return)"
        );
        assert_eq!(
            InterceptPoint::StartKernel.describe(),
            "kernel: start_kernel"
        );
        let mut parts = Parts::new(Instant::now());
        parts.lap("a");
        parts.lap("b");
        let names: Vec<&str> = parts.parts.iter().map(|p| p.what.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    /// A kernel whose points are `base`, `base + 0x10`, `base + 0x20`.
    fn points(base: u64) -> KernelPoints {
        KernelPoints {
            serialize: base,
            point_of_no_return: base + 0x10,
            start_kernel: base + 0x20,
            boot_params: base + 0x30,
            kho_out: Err("none".into()),
        }
    }

    #[test]
    fn breakpoints_follow_the_kernels_of_each_round() {
        let (a, b) = (points(0x1000), points(0x2000));
        let same = plan_breakpoints(std::slice::from_ref(&a), &KernelSequence::same(), 5).unwrap();
        assert_eq!(same, (vec![0x1000, 0x1010, 0x1020], vec![0x1000, 0x1010]));
        let kernels = [a.clone(), b.clone()];
        // One handover A->B: A's two, B's start_kernel, in slot order.
        let one = plan_breakpoints(&kernels, &KernelSequence::cross(false), 1).unwrap();
        assert_eq!(one, (vec![0x1000, 0x1010, 0x2020], vec![0x1000, 0x1010]));
        // A->B->B: B's own two are added (5 > 4 debug registers: refused)...
        let e = plan_breakpoints(&kernels, &KernelSequence::cross(false), 2).unwrap_err();
        assert!(e.to_string().contains("5 different addresses"), "{e}");
        // ...unless the kernels share addresses (a rebuild that moved nothing LUO runs).
        let b_same_text = KernelPoints {
            boot_params: 0x9999,
            ..a.clone()
        };
        let shared = [a.clone(), b_same_text.clone()];
        let abb = plan_breakpoints(&shared, &KernelSequence::cross(true), 3).unwrap();
        assert_eq!(abb.0, vec![0x1000, 0x1010, 0x1020]);
        // What a hit is depends on the round.
        let seq = KernelSequence::cross(true);
        let at = |round, in_kexec, pc| point_at(&kernels, &seq, round, in_kexec, pc);
        assert_eq!(
            at(0, false, 0x1020),
            Some(InterceptPoint::StartKernel),
            "first boot"
        );
        assert_eq!(at(0, false, 0x1000), Some(InterceptPoint::Serialize));
        assert_eq!(at(0, false, 0x2000), None, "B's address while A runs");
        assert_eq!(at(0, true, 0x2020), Some(InterceptPoint::StartKernel));
        assert_eq!(at(0, true, 0x1020), None);
        assert_eq!(at(1, false, 0x2010), Some(InterceptPoint::PointOfNoReturn));
        assert_eq!(
            at(1, true, 0x1020),
            Some(InterceptPoint::StartKernel),
            "back to A"
        );
        assert_eq!(
            at(1, false, 0x1020),
            None,
            "A's start_kernel is no first boot later"
        );
    }

    #[test]
    fn probe_marks_never_wait_for_a_hook_at_work() {
        use std::sync::Arc;
        let i = Arc::new(
            Interceptor::new(
                vec![points(1)],
                KernelSequence::same(),
                1,
                InterceptOptions::default(),
            )
            .unwrap(),
        );
        // A vCPU thread in a hook (parsing guest data) holds the state...
        let _hook = i.lock();
        // ...while the main thread delivers a probe mark: it must not block.
        let (tx, rx) = std::sync::mpsc::channel();
        let main = i.clone();
        std::thread::spawn(move || {
            main.on_probe(&ProbeEvent {
                item: Ok(luo_protocol::message::Message::RebootRequested),
                at: Instant::now(),
            });
            let _ = tx.send(());
        });
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        assert_eq!(i.marks().marks.len(), 1);
    }

    #[test]
    fn marks_are_ordered_by_time_not_by_arrival() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // The probe's reboot-requested was recorded after the breakpoint that followed it.
        let marks = vec![
            (Mark::SerializeStart, at(10)),
            (Mark::RebootRequested, at(5)),
            (Mark::PointOfNoReturn, at(40)),
            (Mark::NextKernelStart, at(1000)),
            (Mark::UserspaceUp, at(2000)),
            (Mark::WorkloadResumed, at(2500)),
        ];
        let rounds = timeline_from(marks, t0).rounds();
        assert_eq!(rounds.len(), 1);
        assert!(rounds[0].missing().is_empty());
        assert_eq!(rounds[0].blackout_ns(), Some(2_495_000_000));
    }
}
