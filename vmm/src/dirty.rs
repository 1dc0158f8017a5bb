//! KVM dirty-page logging over every guest memory slot.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use luo_handover::mem::to_usize;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
