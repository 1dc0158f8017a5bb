//! Initial vCPU register state for each way of entering the kernel, and the MSRs every
//! vCPU starts with.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs};

use super::gdt::{
    kvm_segment_from_gdt, CODE_INDEX, DATA_INDEX, GDT_LONG_MODE, GDT_PROTECTED_MODE, TSS_INDEX,
};
use crate::machine::layout::{
    BOOT_GDT_START, BOOT_IDT_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;
/// Boot stack for the 64-bit entry (grows down below the zero page's neighbour).
const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// How the bootstrap processor enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    LongMode,
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
}

impl EntryMode {
    /// The GDT this mode loads.
    pub fn gdt(self) -> &'static [u64; 4] {
        match self {
            EntryMode::LongMode => &GDT_LONG_MODE,
            EntryMode::Pvh => &GDT_PROTECTED_MODE,
        }
    }
}

/// General-purpose registers at the entry point.
pub fn entry_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::LongMode => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Applies the segment, control and EFER state of `mode` to `sregs` (which keeps what
/// KVM put there otherwise, such as the APIC base).
pub fn apply_entry_sregs(mode: EntryMode, sregs: &mut kvm_sregs) {
    let gdt = mode.gdt();
    let code = kvm_segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    // Limits of a 4-entry GDT (31) and a one-entry IDT (7).
    #[allow(clippy::cast_possible_truncation)]
    {
        sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
        sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    }
    sregs.idt.base = BOOT_IDT_START;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::LongMode => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// FPU state as after `FNINIT`, with the default MXCSR.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// IA32_MISC_ENABLE (Intel SDM Vol. 4, Table 2-2).
pub(crate) const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast-string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE (Intel SDM Vol. 3A §12.11.2.1 "IA32_MTRR_DEF_TYPE MSR"; AMD APM
/// Vol. 2 §7.7 "Memory-Type Range Registers", MTRRdefType).
pub(crate) const MSR_IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type 6: write-back (Intel SDM Vol. 3A §12.11.2, Table 12-8).
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs every vCPU starts with, in the order `KVM_SET_MSRS` takes them:
/// IA32_MISC_ENABLE with fast strings, as firmware leaves it, and IA32_MTRR_DEF_TYPE =
/// 0x806, MTRRs enabled with write-back as the default type (what Firecracker's
/// `arch/x86_64/msr.rs` and Cloud Hypervisor's `arch/src/x86_64/regs.rs` set). Left at
/// its reset value 0, MTRRs are off and the architecture makes all memory uncacheable:
/// the guest kernel sees that, and KVM honours it where guest memory types count (an
/// assigned device with non-coherent DMA).
pub(crate) fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The first MSR of `given` that KVM refused, when `KVM_SET_MSRS` set only `accepted` of
/// them: KVM sets them in order and stops at the first it cannot (`msr_io()` in
/// arch/x86/kvm/x86.c returns how many it processed), so that is entry `accepted`.
pub(crate) fn first_refused(given: &[kvm_msr_entry], accepted: usize) -> Option<u32> {
    given.get(accepted).map(|e| e.index)
}

/// The architectural name of an MSR this module sets, for an error message.
pub(crate) fn msr_name(index: u32) -> &'static str {
    match index {
        MSR_IA32_MISC_ENABLE => "IA32_MISC_ENABLE",
        MSR_IA32_MTRR_DEF_TYPE => "IA32_MTRR_DEF_TYPE",
        _ => "MSR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_entry() {
        let r = entry_regs(EntryMode::LongMode, 0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
        let mut s = kvm_sregs::default();
        apply_entry_sregs(EntryMode::LongMode, &mut s);
        assert_eq!(s.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn pvh_entry() {
        let r = entry_regs(EntryMode::Pvh, 0x100_0123);
        assert_eq!((r.rip, r.rbx), (0x100_0123, PVH_INFO_START));
        let mut s = kvm_sregs::default();
        apply_entry_sregs(EntryMode::Pvh, &mut s);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.db, s.cs.l), (1, 0));
    }

    #[test]
    fn boot_msrs_enable_write_back_mtrrs() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_IA32_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(msrs.len(), 2);
    }

    #[test]
    fn the_refused_msr_is_the_first_kvm_did_not_set() {
        let msrs = boot_msrs();
        assert_eq!(first_refused(&msrs, msrs.len()), None);
        assert_eq!(first_refused(&msrs, 0), Some(MSR_IA32_MISC_ENABLE));
        assert_eq!(first_refused(&msrs, 1), Some(MSR_IA32_MTRR_DEF_TYPE));
        assert_eq!(msr_name(0x2ff), "IA32_MTRR_DEF_TYPE");
        assert_eq!(msr_name(0x1a0), "IA32_MISC_ENABLE");
        assert_eq!(msr_name(0x10), "MSR");
    }
}
