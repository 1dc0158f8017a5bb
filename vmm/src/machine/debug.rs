//! Hardware breakpoints through `KVM_SET_GUEST_DEBUG`: arming up to four instruction
//! breakpoints, and stepping over one transparently (disarm it, single-step one
//! instruction, re-arm) so that the guest never notices.

use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};

/// x86 has four address breakpoint registers, DR0-DR3.
pub const MAX_BREAKPOINTS: usize = 4;
/// DR6 bit: the exit came from a single step.
pub const DR6_BS: u64 = 1 << 14;

/// DR7 enabling local instruction breakpoints in the slots set in `mask` (bit i = DRi).
/// R/W = 00 (execute) and LEN = 00 (1 byte), as instruction breakpoints require.
pub fn dr7_for(mask: u8) -> u64 {
    (0..MAX_BREAKPOINTS)
        .filter(|i| mask & (1 << i) != 0)
        .fold(0, |dr7, i| dr7 | (1 << (2 * i)))
}

/// The `kvm_guest_debug` that arms `addrs` except slot `skip`, single-stepping when
/// asked. With no addresses and no stepping, debugging is switched off.
pub fn guest_debug(addrs: &[u64], skip: Option<usize>, single_step: bool) -> kvm_guest_debug {
    let mut arch = kvm_guest_debug_arch::default();
    let mut mask = 0u8;
    for (i, &addr) in addrs.iter().take(MAX_BREAKPOINTS).enumerate() {
        if Some(i) != skip {
            arch.debugreg[i] = addr;
            mask |= 1 << i;
        }
    }
    arch.debugreg[7] = dr7_for(mask);
    let mut control = 0;
    if mask != 0 || single_step {
        control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    }
    if single_step {
        // Keep interrupts from turning the step into a trip through a handler.
        control |= KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ;
    }
    kvm_guest_debug {
        control,
        pad: 0,
        arch,
    }
}

/// Which armed breakpoint a debug exit at `pc` belongs to.
pub fn slot_of(addrs: &[u64], pc: u64) -> Option<usize> {
    addrs.iter().take(MAX_BREAKPOINTS).position(|&a| a == pc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr7_enables_local_bits() {
        assert_eq!(dr7_for(0b0001), 0b01);
        assert_eq!(dr7_for(0b0101), 0b01_00_01);
        assert_eq!(dr7_for(0b1111), 0b01_01_01_01);
        assert_eq!(dr7_for(0), 0);
    }

    #[test]
    fn arming_and_stepping() {
        let addrs = [
            0xffff_ffff_8100_1000,
            0xffff_ffff_8100_2000,
            0xffff_ffff_8100_3000,
        ];
        let d = guest_debug(&addrs, None, false);
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(&d.arch.debugreg[..3], &addrs);
        assert_eq!(d.arch.debugreg[7], 0b01_01_01);

        let s = guest_debug(&addrs, Some(1), true);
        assert_ne!(s.control & KVM_GUESTDBG_SINGLESTEP, 0);
        assert_eq!(s.arch.debugreg[1], 0);
        assert_eq!(s.arch.debugreg[7], 0b01_00_01);

        assert_eq!(guest_debug(&[], None, false).control, 0);
        assert_eq!(slot_of(&addrs, 0xffff_ffff_8100_3000), Some(2));
        assert_eq!(slot_of(&addrs, 1), None);
    }
}
