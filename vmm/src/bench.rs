//! What the benchmarks (`benches/`) measure that lives inside the VMM: the reset of a VM
//! to its snapshot. Not for other use: the VM here never runs a guest.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::machine::memory::ram_slots;
use crate::machine::vm::Vm;

/// A VM of a given size with one vCPU and a snapshot of itself, and a set of pages that
/// each [`ResetRig::dirty`] writes and each [`ResetRig::reset`] writes back.
pub struct ResetRig {
    vm: Vm,
    pages: Vec<u64>,
}

impl ResetRig {
    /// A VM of `mem` bytes (at least 2 MiB) whose `written` pages, spread evenly over its
    /// RAM, are written between resets. Errors: no usable /dev/kvm, or a VM KVM refuses.
    pub fn new(mem: u64, written: usize) -> Result<Self, String> {
        let vm = Vm::idle(mem).map_err(|e| e.to_string())?;
        let all: Vec<u64> = ram_slots(mem)
            .into_iter()
            .flat_map(|(base, len)| (0..len / 4096).map(move |i| base + i * 4096))
            .collect();
        let step = (all.len() / written.max(1)).max(1);
        let pages = all.into_iter().step_by(step).take(written).collect();
        Ok(ResetRig { vm, pages })
    }

    /// Bytes the written pages hold (what a memcpy of them would copy).
    pub fn written_bytes(&self) -> usize {
        self.pages.len() * 4096
    }

    /// Writes every page of the set (as a guest would have).
    pub fn dirty(&self) {
        for &gpa in &self.pages {
            // A page of the VM's own RAM: cannot fail.
            let _ = self.vm.memory().write_slice(&[0xa5; 64], GuestAddress(gpa));
        }
    }

    /// One reset: the dirty log read, the written pages put back, the vCPU, VM and device
    /// state restored. Returns its wall time.
    pub fn reset(&mut self) -> Result<Duration, String> {
        let stats = self.vm.reset_with(&self.pages).map_err(|e| e.to_string())?;
        if stats.pages != self.pages.len() {
            return Err(format!(
                "{} pages written back, {} written",
                stats.pages,
                self.pages.len()
            ));
        }
        Ok(Duration::from_nanos(stats.nanos))
    }
}
