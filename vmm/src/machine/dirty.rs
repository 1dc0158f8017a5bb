//! KVM dirty-page logging over every guest memory slot.
//!
//! Two ways to start the log, chosen at the first point-of-no-return:
//! - switching `KVM_MEM_LOG_DIRTY_PAGES` on write-protects every guest page: O(guest size)
//!   with the guest stopped (4.5 ms for 8 GiB on the development machine);
//! - with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
//!   KVM_DIRTY_LOG_INITIALLY_SET`), switching the log on protects nothing (every bit starts
//!   set) and `KVM_CLEAR_DIRTY_LOG` ([`clear_log`]) write-protects exactly the pages whose
//!   bits it clears: the preserved set, O(preserved pages). `KVM_GET_DIRTY_LOG` then only
//!   reads. See Documentation/virt/kvm/api.rst, "KVM_CLEAR_DIRTY_LOG".

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use luo_handover::extents::ExtentSet;
use luo_handover::mem::{to_usize, PAGE_SHIFT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::machine::host::Capabilities;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_CLEAR_DIRTY_LOG` wants `first_page` and `num_pages` in multiples of 64 (one bitmap
/// word), except a range that ends at the end of the slot.
const WORD_PAGES: u64 = 64;
/// The largest range one `KVM_CLEAR_DIRTY_LOG` takes here (`num_pages` is a u32; a multiple
/// of 64).
const MAX_CLEAR_PAGES: u64 = 1 << 31;

/// One slot's dirty bitmap: bit i of the words is page `base + i * 4096`.
#[derive(Debug, Clone)]
pub struct SlotBitmap {
    /// Guest-physical start of the slot.
    pub base: u64,
    /// The bitmap, as KVM returns it.
    pub words: Vec<u64>,
}

fn region_descriptor(
    slot: u32,
    region: &vm_memory::GuestRegionMmap,
    flags: u32,
) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: region.start_addr().raw_value(),
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    }
}

/// Registers every region of `memory` with KVM as slots 0.., with dirty logging on or off.
/// Turning logging on starts every bitmap clean.
pub fn set_slots(
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), kvm_ioctls::Error> {
    let flags = if log_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let mr = region_descriptor(slot, region, flags);
        // SAFETY: the region is a live mapping owned by `memory`, which the caller keeps
        // alive for as long as the VM exists.
        unsafe { vm_fd.set_user_memory_region(mr) }?;
    }
    Ok(())
}

/// Reads (and clears) the dirty bitmap of every slot.
pub fn take_bitmaps(
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
) -> Result<Vec<SlotBitmap>, kvm_ioctls::Error> {
    (0u32..)
        .zip(memory.iter())
        .map(|(slot, region)| {
            Ok(SlotBitmap {
                base: region.start_addr().raw_value(),
                words: vm_fd.get_dirty_log(slot, to_usize(region.len()))?,
            })
        })
        .collect()
}

/// Switches `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET` on for the
/// VM, if KVM offers both (`caps`, checked when the VM was created); false if not (then the
/// log protects every page when it starts). Call before dirty logging is first switched on.
pub fn enable_manual_protect(vm_fd: &VmFd, caps: &Capabilities) -> bool {
    if !caps.manual_dirty_protect() {
        return false;
    }
    let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(want);
    vm_fd.enable_cap(&cap).is_ok()
}

/// One `KVM_CLEAR_DIRTY_LOG` of a slot: clear (and write-protect) the pages whose bits are
/// set in `bitmap`, bit i being page `first_page + i` of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClearRequest {
    /// First page of the range, slot-relative, a multiple of 64.
    pub first_page: u64,
    /// Pages in the range: a multiple of 64 or up to the slot's end.
    pub num_pages: u64,
    /// One bit per page of the range.
    pub bitmap: Vec<u64>,
}

/// The `KVM_CLEAR_DIRTY_LOG` requests that clear exactly the pages of `pfns` (merged
/// `[first, end)` page-frame ranges in address order, as [`ExtentSet::pfn_ranges`] gives)
/// inside a slot of `slot_pages` pages starting at page frame `slot_pfn`; every page of
/// the slot when `pfns` is `None`. Ranges are widened to whole bitmap words (bits outside
/// `pfns` stay 0) and touching ranges merged: O(ranges + covered words).
pub fn clear_requests(
    slot_pfn: u64,
    slot_pages: u64,
    pfns: Option<&[(u64, u64)]>,
) -> Vec<ClearRequest> {
    requests_of_at_most(slot_pfn, slot_pages, pfns, MAX_CLEAR_PAGES)
}

/// [`clear_requests`] with requests of at most `max_pages` pages (a multiple of 64).
fn requests_of_at_most(
    slot_pfn: u64,
    slot_pages: u64,
    pfns: Option<&[(u64, u64)]>,
    max_pages: u64,
) -> Vec<ClearRequest> {
    let slot_end = slot_pfn.saturating_add(slot_pages);
    let whole = [(slot_pfn, slot_end)];
    let mut out: Vec<ClearRequest> = Vec::new();
    for &(first, end) in pfns.unwrap_or(&whole) {
        // Slot-relative and clipped to the slot.
        let (first, end) = (
            first.clamp(slot_pfn, slot_end),
            end.clamp(slot_pfn, slot_end),
        );
        let (mut at, end) = (first - slot_pfn, end - slot_pfn);
        while at < end {
            let joins_last = out.last().is_some_and(|req| {
                at & !(WORD_PAGES - 1) <= req.first_page + req.num_pages
                    && at < req.first_page + max_pages
            });
            if !joins_last {
                out.push(ClearRequest {
                    first_page: at & !(WORD_PAGES - 1),
                    num_pages: 0,
                    bitmap: Vec::new(),
                });
            }
            let Some(req) = out.last_mut() else { break };
            let stop = end.min(req.first_page + max_pages);
            let window_end = stop
                .div_ceil(WORD_PAGES)
                .saturating_mul(WORD_PAGES)
                .min(slot_pages);
            req.num_pages = req.num_pages.max(window_end - req.first_page);
            req.bitmap
                .resize(to_usize(req.num_pages.div_ceil(WORD_PAGES)), 0);
            set_bits(&mut req.bitmap, at - req.first_page, stop - req.first_page);
            at = stop;
        }
    }
    out
}

/// Sets bits `[from, to)` of `words`, a word at a time.
fn set_bits(words: &mut [u64], from: u64, to: u64) {
    let mut bit = from;
    while bit < to {
        let (word, shift) = (to_usize(bit / WORD_PAGES), bit % WORD_PAGES);
        let n = (to - bit).min(WORD_PAGES - shift);
        let mask = if n == WORD_PAGES {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << shift
        };
        if let Some(w) = words.get_mut(word) {
            *w |= mask;
        }
        bit += n;
    }
}

/// Clears (and so write-protects) in every slot of `memory` the dirty bits of the pages
/// `tracked` touches, or of every page when `tracked` is `None`. Needs
/// [`enable_manual_protect`] and the log switched on. Returns the number of ioctls.
///
/// # Errors
/// `KVM_CLEAR_DIRTY_LOG`'s errno.
pub fn clear_log(
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
    tracked: Option<&ExtentSet>,
) -> Result<usize, kvm_ioctls::Error> {
    let pfns = tracked.map(ExtentSet::pfn_ranges);
    let mut calls = 0;
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let slot_pfn = region.start_addr().raw_value() >> PAGE_SHIFT;
        let slot_pages = region.len() >> PAGE_SHIFT;
        for req in clear_requests(slot_pfn, slot_pages, pfns.as_deref()) {
            let mut log = kvm_clear_dirty_log {
                slot,
                num_pages: u32::try_from(req.num_pages).unwrap_or(u32::MAX),
                first_page: req.first_page,
                ..Default::default()
            };
            log.__bindgen_anon_1.dirty_bitmap = req.bitmap.as_ptr().cast_mut().cast();
            // SAFETY: `log` is a valid kvm_clear_dirty_log whose bitmap points at
            // `req.bitmap`, which holds num_pages bits and outlives the call; KVM only
            // reads it. The fd is a VM fd.
            let rc = unsafe { ioctl_with_ref(vm_fd, KVM_CLEAR_DIRTY_LOG(), &log) };
            if rc < 0 {
                return Err(kvm_ioctls::Error::last());
            }
            calls += 1;
        }
    }
    Ok(calls)
}

/// How the log is kept once on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// `KVM_MEM_LOG_DIRTY_PAGES` on every slot, every page write-protected when it
    /// started; reading the log clears it.
    WholeGuest,
    /// Manual protection: only the pages whose bits were cleared are watched.
    Manual,
}

#[derive(Debug, Default)]
struct LogState {
    /// `None` while off.
    mode: Option<LogMode>,
    /// Every page written since the snapshot a reset goes back to, accumulated over
    /// every read of the log (any reader's), while a snapshot is kept.
    since_snapshot: Option<Vec<SlotBitmap>>,
}

/// The VM's dirty log, one per VM and every reader through it: the interception's
/// rounds and leak check, and the reset to a snapshot, which must learn of every page
/// written since the snapshot even when another reader's `KVM_GET_DIRTY_LOG` cleared its
/// bit. While a snapshot is kept the log runs [`LogMode::WholeGuest`] (manual protection
/// would hide from the reset what it does not watch).
pub struct DirtyLog {
    vm_fd: std::sync::Arc<VmFd>,
    memory: std::sync::Arc<GuestMemoryMmap>,
    caps: Capabilities,
    state: std::sync::Mutex<LogState>,
}

impl DirtyLog {
    /// The log of the VM `vm_fd` over `memory` (registered with [`set_slots`]), off.
    pub fn new(
        vm_fd: std::sync::Arc<VmFd>,
        memory: std::sync::Arc<GuestMemoryMmap>,
        caps: Capabilities,
    ) -> Self {
        DirtyLog {
            vm_fd,
            memory,
            caps,
            state: std::sync::Mutex::new(LogState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching, for a reader that wants a clean log from now: switches the log on
    /// if it is off (under manual protection when `tracked` is given, KVM offers it and
    /// no snapshot is kept), then clears the bits of `tracked` (manual) or reads the
    /// whole log once (whole guest). Returns the mode.
    ///
    /// # Errors
    /// The errno of `KVM_SET_USER_MEMORY_REGION`, `KVM_CLEAR_DIRTY_LOG` or
    /// `KVM_GET_DIRTY_LOG`.
    pub fn start(&self, tracked: Option<&ExtentSet>) -> Result<LogMode, kvm_ioctls::Error> {
        let mut st = self.state();
        let mode = match st.mode {
            Some(mode) => mode,
            None => {
                let manual = tracked.is_some()
                    && st.since_snapshot.is_none()
                    && enable_manual_protect(&self.vm_fd, &self.caps);
                set_slots(&self.vm_fd, &self.memory, true)?;
                let mode = if manual {
                    LogMode::Manual
                } else {
                    LogMode::WholeGuest
                };
                st.mode = Some(mode);
                mode
            }
        };
        match mode {
            LogMode::Manual => {
                clear_log(&self.vm_fd, &self.memory, tracked)?;
            }
            LogMode::WholeGuest => {
                self.take_locked(&mut st)?;
            }
        }
        Ok(mode)
    }

    /// Clears (and write-protects) the bits of `tracked` again; under
    /// [`LogMode::WholeGuest`] (or off) nothing needs doing. Returns the ioctls made.
    pub fn clear(&self, tracked: &ExtentSet) -> Result<usize, kvm_ioctls::Error> {
        let st = self.state();
        match st.mode {
            Some(LogMode::Manual) => clear_log(&self.vm_fd, &self.memory, Some(tracked)),
            _ => Ok(0),
        }
    }

    /// The current mode (`None`: off).
    pub fn mode(&self) -> Option<LogMode> {
        self.state().mode
    }

    /// Reads the log of every slot (clearing it under [`LogMode::WholeGuest`]); what it
    /// saw is also added to the pages written since the snapshot, if one is kept.
    pub fn take(&self) -> Result<Vec<SlotBitmap>, kvm_ioctls::Error> {
        let mut st = self.state();
        self.take_locked(&mut st)
    }

    fn take_locked(&self, st: &mut LogState) -> Result<Vec<SlotBitmap>, kvm_ioctls::Error> {
        let maps = take_bitmaps(&self.vm_fd, &self.memory)?;
        if let Some(acc) = &mut st.since_snapshot {
            accumulate(acc, &maps);
        }
        Ok(maps)
    }

    /// A snapshot was just taken (every vCPU stopped): from now on every page written is
    /// remembered for [`DirtyLog::written_since_snapshot`]. Switches the log on over the
    /// whole guest if it is off (every page write-protected once: O(guest size)).
    ///
    /// # Errors
    /// Under manual protection (an interception round started before the snapshot) the
    /// log cannot tell every page written: `EBUSY`.
    pub fn keep_snapshot(&self) -> Result<(), kvm_ioctls::Error> {
        let mut st = self.state();
        match st.mode {
            Some(LogMode::Manual) => return Err(kvm_ioctls::Error::new(libc::EBUSY)),
            Some(LogMode::WholeGuest) => {}
            None => {
                set_slots(&self.vm_fd, &self.memory, true)?;
                st.mode = Some(LogMode::WholeGuest);
            }
        }
        // Read (and so cleared) once: from here on the log holds only later writes.
        st.since_snapshot = Some(empty_like(&take_bitmaps(&self.vm_fd, &self.memory)?));
        Ok(())
    }

    /// The guest-physical addresses of every page written since the snapshot (or since
    /// the last call), ascending; the record starts again empty. Every vCPU must be
    /// stopped. `None` if no snapshot is kept.
    pub fn written_since_snapshot(&self) -> Result<Option<Vec<u64>>, kvm_ioctls::Error> {
        let mut st = self.state();
        let Some(mut acc) = st.since_snapshot.take() else {
            return Ok(None);
        };
        let maps = match take_bitmaps(&self.vm_fd, &self.memory) {
            Ok(maps) => maps,
            Err(e) => {
                st.since_snapshot = Some(acc);
                return Err(e);
            }
        };
        // One pass: what was accumulated and what the log holds now, emptied in place
        // (no new, zeroed allocation for the next round: its first touch would fault
        // in every page of it).
        let pages = drain_pages(&mut acc, &maps);
        st.since_snapshot = Some(acc);
        Ok(Some(pages))
    }
}

/// The pages set in `acc` or in `maps` (the same slots, in order), ascending per slot;
/// `acc` is left all clear.
pub fn drain_pages(acc: &mut [SlotBitmap], maps: &[SlotBitmap]) -> Vec<u64> {
    let mut out = Vec::new();
    for (a, m) in acc.iter_mut().zip(maps) {
        for (i, (w, x)) in a.words.iter_mut().zip(&m.words).enumerate() {
            let mut bits = *w | x;
            *w = 0;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                out.push(a.base + ((i as u64) * 64 + b) * (1 << PAGE_SHIFT));
                bits &= bits - 1;
            }
        }
    }
    out
}

/// ORs `maps` into `acc` (the same slots, in order).
pub fn accumulate(acc: &mut [SlotBitmap], maps: &[SlotBitmap]) {
    for (a, m) in acc.iter_mut().zip(maps) {
        for (w, x) in a.words.iter_mut().zip(&m.words) {
            *w |= x;
        }
    }
}

/// The same slots with every bit clear.
pub fn empty_like(maps: &[SlotBitmap]) -> Vec<SlotBitmap> {
    maps.iter()
        .map(|m| SlotBitmap {
            base: m.base,
            words: vec![0; m.words.len()],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_requests_cover_exactly_the_pages_asked_in_whole_words() {
        // Slot of 1000 pages at pfn 0x100; pages 0x105..0x107 and 0x1c0..0x1c1.
        let r = clear_requests(0x100, 1000, Some(&[(0x105, 0x107), (0x1c0, 0x1c1)]));
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].first_page, r[0].num_pages), (0, 64));
        assert_eq!(r[0].bitmap, vec![0b110_0000]);
        assert_eq!((r[1].first_page, r[1].num_pages), (0xc0, 64));
        assert_eq!(r[1].bitmap, vec![1]);
        // Ranges sharing a word merge into one request.
        let r = clear_requests(0, 1000, Some(&[(1, 2), (3, 4), (70, 71)]));
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].num_pages, r[0].bitmap.clone()),
            (128, vec![0b1010, 1 << 6])
        );
    }

    #[test]
    fn clear_requests_clip_to_the_slot_and_may_end_with_it() {
        // 100-page slot: the last range ends at the slot's end, not at a word boundary.
        let r = clear_requests(0, 100, Some(&[(90, 200)]));
        assert_eq!((r[0].first_page, r[0].num_pages), (64, 36));
        assert_eq!(r[0].bitmap, vec![((1u64 << 10) - 1) << 26]);
        // Outside the slot: nothing.
        assert!(clear_requests(1000, 10, Some(&[(0, 1000), (1010, 2000)])).is_empty());
        // The whole slot.
        let r = clear_requests(0x80000, 130, None);
        assert_eq!((r[0].first_page, r[0].num_pages), (0, 130));
        assert_eq!(r[0].bitmap, vec![u64::MAX, u64::MAX, 0b11]);
    }

    #[test]
    fn one_request_stays_within_the_ioctl_limit() {
        let r = requests_of_at_most(0, 1000, Some(&[(5, 300)]), 128);
        assert_eq!(r.len(), 3);
        assert!(r
            .iter()
            .all(|q| q.num_pages <= 128 && q.first_page % 64 == 0));
        let bits: u32 = r
            .iter()
            .flat_map(|q| q.bitmap.iter())
            .map(|w| w.count_ones())
            .sum();
        assert_eq!(bits, 295);
        assert_eq!(r[2].bitmap, vec![(1 << 44) - 1]);
    }

    #[test]
    fn pages_written_accumulate_over_reads() {
        let one = |base, words: Vec<u64>| vec![SlotBitmap { base, words }];
        let mut acc = empty_like(&one(0x10_0000, vec![0, 0]));
        accumulate(&mut acc, &one(0x10_0000, vec![0b101, 0]));
        // The last read: its pages and the accumulated ones, once each.
        let pages = drain_pages(&mut acc, &one(0x10_0000, vec![0b100, 1 << 63]));
        assert_eq!(pages, vec![0x10_0000, 0x10_2000, 0x10_0000 + 127 * 4096]);
        assert!(acc[0].words.iter().all(|&w| w == 0), "left clear");
        assert!(drain_pages(&mut acc, &one(0x10_0000, vec![0, 0])).is_empty());
    }

    #[test]
    fn set_bits_spans_words() {
        let mut w = [0u64; 3];
        set_bits(&mut w, 60, 130);
        assert_eq!(w, [0xf << 60, u64::MAX, 0b11]);
    }
}
