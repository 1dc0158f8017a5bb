//! What the run loop's debug-exit handling asks of a real vCPU besides
//! `KVM_SET_GUEST_DEBUG`: masking interrupts through RFLAGS.IF for a step where KVM has
//! no `KVM_GUESTDBG_BLOCKIRQ` and giving IF back after it, and giving the guest's own #DB
//! back to it. The decisions are pure functions of `machine::debug`; this file only reads
//! and writes the vCPU's registers and the guest's stack.

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::stepper::{Arming, IfMask, StepEnd};
use super::Vcpu;
use crate::machine::arch::paging::translate;
use crate::machine::debug::{
    guest_debug, guest_dr6, if_step, interrupted_frame, DebugFlags, IfStep, RFLAGS_IF, RFLAGS_TF,
};

/// The longest x86 instruction.
const MAX_INSN: usize = 15;
/// Words read from the stack to find an interrupt or exception frame: an error code,
/// RIP, CS, RFLAGS, RSP, SS.
const FRAME_WORDS: usize = 6;

/// The `kvm_guest_debug` for `arming` of `addrs`, with `inject_db`.
pub(super) fn set_guest_debug(
    fd: &VcpuFd,
    addrs: &[u64],
    arming: Arming,
    inject_db: bool,
) -> Result<(), kvm_ioctls::Error> {
    fd.set_guest_debug(&guest_debug(
        addrs,
        arming.skip,
        DebugFlags {
            single_step: arming.single_step,
            block_irq: arming.block_irq,
            inject_db,
        },
    ))
}

impl Vcpu {
    /// Clears RFLAGS.IF for a step over the instruction at `pc` where [`if_step`] allows;
    /// see `VcpuBackend::mask_if`.
    pub(super) fn mask_if_for_step(&self, pc: u64) -> IfMask {
        let (Ok(mut regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return IfMask::Untouched;
        };
        if regs.rflags & RFLAGS_IF == 0 {
            return IfMask::Untouched;
        }
        // The instruction's bytes; near the end of a mapped page only what is readable.
        let code = (1..=MAX_INSN)
            .rev()
            .find_map(|len| self.bytes_at(&sregs, pc, len))
            .unwrap_or_default();
        let mask = match if_step(&code) {
            IfStep::MaskAndRestore => IfMask::Cleared,
            IfStep::MaskOnly => IfMask::ClearedForGood,
            IfStep::Unmasked => return IfMask::Untouched,
        };
        regs.rflags &= !RFLAGS_IF;
        match self.fd.set_regs(&regs) {
            Ok(()) => {
                log::debug!(
                    "vCPU {}: RFLAGS.IF cleared for the step over {pc:#x} ({mask:?})",
                    self.id
                );
                mask
            }
            Err(e) => {
                log::warn!(
                    "vCPU {}: KVM_SET_REGS to mask interrupts for a step: {e}",
                    self.id
                );
                IfMask::Untouched
            }
        }
    }

    /// Gives RFLAGS.IF back after a step over the breakpoint at `bp` whose IF was
    /// [`IfMask::Cleared`]: in the frame on the stack that returns to `bp` when an NMI
    /// or exception cut the step short (its TF, set by KVM for the step, cleared too),
    /// else in RFLAGS.
    pub(super) fn unmask_if_after_step(&self, bp: u64) -> Result<StepEnd, kvm_ioctls::Error> {
        let mut regs = self.fd.get_regs()?;
        let sregs = self.fd.get_sregs()?;
        let stack: Vec<u64> = self
            .bytes_at(&sregs, regs.rsp, FRAME_WORDS * 8)
            .map(|b| {
                b.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        if regs.rip != bp {
            if let Some(at) = interrupted_frame(&stack, bp) {
                let va = regs.rsp.wrapping_add(8 * at as u64);
                let memory = self.memory();
                let read = |pa: u64| memory.read_obj::<u64>(GuestAddress(pa)).ok();
                let rflags = (stack[at] | RFLAGS_IF) & !RFLAGS_TF;
                let written = translate(&sregs, va, read)
                    .is_some_and(|gpa| memory.write_obj(rflags, GuestAddress(gpa)).is_ok());
                if written {
                    return Ok(StepEnd::Interrupted);
                }
                log::warn!(
                    "vCPU {}: the step over {bp:#x} was cut short and its frame's RFLAGS at \
                     {va:#x} cannot be written; IF set in the handler's RFLAGS instead",
                    self.id
                );
            }
        }
        regs.rflags |= RFLAGS_IF;
        self.fd.set_regs(&regs)?;
        log::debug!(
            "vCPU {}: RFLAGS.IF given back after the step over {bp:#x} (now at {:#x})",
            self.id,
            regs.rip
        );
        Ok(StepEnd::Completed)
    }

    /// Gives the guest a #DB reported with `dr6` back: its DR6 as the exception leaves
    /// it (`KVM_SET_DEBUGREGS`; where that fails the guest reads its old DR6, and the
    /// #DB still comes), then `KVM_SET_GUEST_DEBUG` with `arming` and
    /// `KVM_GUESTDBG_INJECT_DB`.
    pub(super) fn reinject_debug_exception(
        &self,
        addrs: &[u64],
        arming: Arming,
        dr6: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let dr = self.fd.get_debug_regs().and_then(|mut dr| {
            dr.dr6 = guest_dr6(dr.dr6, dr6);
            self.fd.set_debug_regs(&dr)
        });
        if let Err(e) = dr {
            log::debug!("vCPU {}: the guest's DR6 for its own #DB: {e}", self.id);
        }
        set_guest_debug(&self.fd, addrs, arming, true)
    }
}
