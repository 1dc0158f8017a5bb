//! Hardware breakpoints through `KVM_SET_GUEST_DEBUG`: arming up to four instruction
//! breakpoints, and stepping over one transparently (disarm it, single-step one
//! instruction, re-arm) so that the guest never notices; and the pure pieces of what
//! that needs where KVM lacks `KVM_GUESTDBG_BLOCKIRQ` (which instructions may be stepped
//! with RFLAGS.IF cleared, and how to tell a step that an interrupt or exception cut
//! short), and of giving the guest back a #DB of its own (the DR6 it must read).

use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_INJECT_DB, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};

/// x86 has four address breakpoint registers, DR0-DR3.
pub const MAX_BREAKPOINTS: usize = 4;
/// DR6 bits B0-B3: which address breakpoint matched.
pub(crate) const DR6_BN: u64 = 0xf;
/// DR6 bit BD: a debug-register access while DR7.GD was set.
pub(crate) const DR6_BD: u64 = 1 << 13;
/// DR6 bit: the exit came from a single step.
pub const DR6_BS: u64 = 1 << 14;
/// DR6 bit BT: a task switch to a task with the T flag.
pub(crate) const DR6_BT: u64 = 1 << 15;
/// The DR6 bits that read 1 when nothing happened (the fixed-1 and active-low bits),
/// as KVM names them (`DR6_ACTIVE_LOW` in arch/x86/include/asm/kvm_host.h); KVM reports
/// a debug exit's DR6 with them set.
pub(crate) const DR6_ACTIVE_LOW: u64 = 0xffff_0ff0;
/// RFLAGS.TF, the single-step flag.
pub(crate) const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS.IF, maskable interrupts enabled.
pub(crate) const RFLAGS_IF: u64 = 1 << 9;

/// The `KVM_GUESTDBG_*` flags `KVM_SET_GUEST_DEBUG` has taken on x86 since Linux 2.6.31,
/// before `KVM_CAP_SET_GUEST_DEBUG2` could say which (Linux 5.15 added it, with
/// `KVM_GUESTDBG_BLOCKIRQ`): what a KVM without that capability is assumed to accept.
pub(crate) const GUESTDBG_BEFORE_5_15: u32 = KVM_GUESTDBG_ENABLE
    | KVM_GUESTDBG_SINGLESTEP
    | kvm_bindings::KVM_GUESTDBG_USE_SW_BP
    | KVM_GUESTDBG_USE_HW_BP
    | KVM_GUESTDBG_INJECT_DB
    | kvm_bindings::KVM_GUESTDBG_INJECT_BP;

/// DR7 enabling local instruction breakpoints in the slots set in `mask` (bit i = DRi).
/// R/W = 00 (execute) and LEN = 00 (1 byte), as instruction breakpoints require.
pub fn dr7_for(mask: u8) -> u64 {
    (0..MAX_BREAKPOINTS)
        .filter(|i| mask & (1 << i) != 0)
        .fold(0, |dr7, i| dr7 | (1 << (2 * i)))
}

/// What `KVM_SET_GUEST_DEBUG` is asked for besides the breakpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DebugFlags {
    /// Single-step the next instruction (`KVM_GUESTDBG_SINGLESTEP`).
    pub single_step: bool,
    /// While stepping, KVM injects no interrupt (`KVM_GUESTDBG_BLOCKIRQ`, Linux 5.15+).
    pub block_irq: bool,
    /// Queue a #DB for the guest (`KVM_GUESTDBG_INJECT_DB`): the guest's own debug
    /// exception, given back.
    pub inject_db: bool,
}

/// The `kvm_guest_debug` that arms `addrs` except slot `skip`, with `flags`. With no
/// addresses, no stepping and nothing to inject, debugging is switched off.
pub fn guest_debug(addrs: &[u64], skip: Option<usize>, flags: DebugFlags) -> kvm_guest_debug {
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
    if mask != 0 || flags.single_step {
        control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    }
    if flags.single_step {
        control |= KVM_GUESTDBG_SINGLESTEP;
        if flags.block_irq {
            // Keep interrupts from turning the step into a trip through a handler.
            control |= KVM_GUESTDBG_BLOCKIRQ;
        }
    }
    if flags.inject_db {
        control |= KVM_GUESTDBG_INJECT_DB;
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

/// The DR6 the guest must read in its #DB handler when luo-vmm gives it back a debug
/// exception KVM reported with `exit_dr6`, its DR6 having been `old`: the cause bits (B0-B3,
/// BD, BS, BT) of the exit, B0-B3 replaced, the other causes added, the fixed bits set;
/// as KVM itself delivers a #DB payload (`kvm_deliver_exception_payload()` in
/// arch/x86/kvm/x86.c: "certain debug exceptions may clear bits 0-3; the remaining
/// contents of the DR6 register are never cleared by the processor"; bit 12 reads 0).
pub(crate) fn guest_dr6(old: u64, exit_dr6: u64) -> u64 {
    let causes = exit_dr6 & (DR6_BN | DR6_BD | DR6_BS | DR6_BT);
    ((old & !DR6_BN) | DR6_ACTIVE_LOW | causes) & !(1 << 12)
}

/// How the instruction at a breakpoint may be single-stepped with interrupts masked by
/// clearing RFLAGS.IF (where KVM has no `KVM_GUESTDBG_BLOCKIRQ`), after Linux's own
/// kprobes, which single-step with IF cleared and give it back after unless the
/// instruction changed IF itself (`setup_singlestep()` and `is_IF_modifier()` in
/// arch/x86/kernel/kprobes/core.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfStep {
    /// Clear IF for the step and set it again after: the instruction neither reads nor
    /// writes IF.
    MaskAndRestore,
    /// Clear IF for the step and leave it as the instruction set it: `cli`, `sti`,
    /// `popf`, `iret`, `sysret`, `sysexit`, `rsm` define IF themselves.
    MaskOnly,
    /// Step with IF as it is: the instruction saves RFLAGS where the guest reads it back
    /// later (`pushf`, `int3`, `int n`, `into`, `int1`, `syscall`, `sysenter`, `ud2`,
    /// which raises #UD on purpose for the kernel's `BUG()`/`WARN()`), or waits for an
    /// interrupt (`hlt`, `mwait`), or its bytes could not be read. An interrupt may then
    /// come in during the step, as in QEMU's gdbstub without BLOCKIRQ.
    Unmasked,
}

/// [`IfStep`] of the instruction whose first bytes are `code` (up to 15; fewer when
/// the rest was not readable): legacy prefixes and one REX prefix skipped, then the
/// opcode looked up. Anything not listed is [`IfStep::MaskAndRestore`].
pub(crate) fn if_step(code: &[u8]) -> IfStep {
    let mut i = 0;
    while i < code.len()
        && matches!(
            code[i],
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
        )
    {
        i += 1;
    }
    if i < code.len() && (0x40..=0x4f).contains(&code[i]) {
        i += 1;
    }
    match (code.get(i), code.get(i + 1), code.get(i + 2)) {
        (None, _, _) => IfStep::Unmasked,
        (Some(0xfa | 0xfb | 0x9d | 0xcf), _, _) => IfStep::MaskOnly,
        (Some(0x9c | 0xf4 | 0xcc | 0xcd | 0xce | 0xf1), _, _) => IfStep::Unmasked,
        (Some(0x0f), None, _) => IfStep::Unmasked,
        (Some(0x0f), Some(0x07 | 0x35 | 0xaa), _) => IfStep::MaskOnly,
        (Some(0x0f), Some(0x05 | 0x34 | 0x0b), _) => IfStep::Unmasked,
        // mwait, and the 0f 01 group when its third byte is missing.
        (Some(0x0f), Some(0x01), Some(0xc9) | None) => IfStep::Unmasked,
        _ => IfStep::MaskAndRestore,
    }
}

/// Where, in the words on the stack after a single step over the instruction at `bp`,
/// the RFLAGS of an interrupt or exception frame lies that the step ran into before the
/// instruction completed: the vCPU then stands at the handler's first instruction, and
/// the frame it pushed (64-bit mode: [error code,] RIP, CS, RFLAGS, RSP, SS) holds
/// `bp` as the return address. `stack` holds the words from RSP up; the answer is an
/// index into it. A frame is recognised by RIP = `bp`, a selector-sized CS and RFLAGS
/// with its always-one bit 1 set.
pub(crate) fn interrupted_frame(stack: &[u64], bp: u64) -> Option<usize> {
    (0..2).find_map(|at| {
        let (rip, cs, rflags) = (stack.get(at)?, stack.get(at + 1)?, stack.get(at + 2)?);
        (*rip == bp && *cs <= 0xffff && rflags & 0b10 != 0).then_some(at + 2)
    })
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
        let d = guest_debug(&addrs, None, DebugFlags::default());
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(&d.arch.debugreg[..3], &addrs);
        assert_eq!(d.arch.debugreg[7], 0b01_01_01);

        let step = DebugFlags {
            single_step: true,
            block_irq: true,
            inject_db: false,
        };
        let s = guest_debug(&addrs, Some(1), step);
        assert_ne!(s.control & KVM_GUESTDBG_SINGLESTEP, 0);
        assert_ne!(s.control & KVM_GUESTDBG_BLOCKIRQ, 0);
        assert_eq!(s.arch.debugreg[1], 0);
        assert_eq!(s.arch.debugreg[7], 0b01_00_01);

        assert_eq!(guest_debug(&[], None, DebugFlags::default()).control, 0);
        assert_eq!(slot_of(&addrs, 0xffff_ffff_8100_3000), Some(2));
        assert_eq!(slot_of(&addrs, 1), None);
    }

    #[test]
    fn without_blockirq_the_step_asks_for_none_and_an_injection_is_one_flag() {
        let addrs = [0xffff_ffff_8100_1000];
        let s = guest_debug(
            &addrs,
            Some(0),
            DebugFlags {
                single_step: true,
                ..DebugFlags::default()
            },
        );
        assert_eq!(
            s.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_SINGLESTEP
        );
        // Everything a pre-5.15 KVM accepts: no BLOCKIRQ among it.
        assert_eq!(s.control & !GUESTDBG_BEFORE_5_15, 0);

        let i = guest_debug(
            &addrs,
            None,
            DebugFlags {
                inject_db: true,
                ..DebugFlags::default()
            },
        );
        assert_eq!(
            i.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_INJECT_DB
        );
        assert_eq!(i.arch.debugreg[0], addrs[0]);
    }

    #[test]
    fn the_guest_reads_the_cause_of_its_own_debug_exception() {
        // A single step from the guest's TF, reported as KVM does (active-low bits set).
        assert_eq!(
            guest_dr6(DR6_ACTIVE_LOW, DR6_ACTIVE_LOW | DR6_BS),
            0xffff_4ff0
        );
        // B0-B3 are replaced, the other causes kept: B1 over an old B0 and BS.
        assert_eq!(
            guest_dr6(DR6_ACTIVE_LOW | DR6_BS | 0b0001, DR6_ACTIVE_LOW | 0b0010),
            0xffff_4ff2
        );
        // Bit 12 never reads 1, whatever the exit said.
        assert_eq!(guest_dr6(0, 0xffff_ffff) & (1 << 12), 0);
        // An exit that names no cause (an ICEBP) leaves the causes as they were.
        assert_eq!(guest_dr6(0xffff_0ff0, 0xffff_0ff0), 0xffff_0ff0);
    }

    #[test]
    fn which_instructions_are_stepped_with_if_cleared() {
        // Function entries: endbr64, push %rbp, nop DWORD (ftrace), call __fentry__.
        for code in [
            &[0xf3, 0x0f, 0x1e, 0xfa][..],
            &[0x55],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0xe8, 0, 0, 0, 0],
            &[0x48, 0x89, 0xe5],
            &[0x0f, 0x01, 0xcb], // stac: not IF
        ] {
            assert_eq!(if_step(code), IfStep::MaskAndRestore, "{code:x?}");
        }
        // They set IF themselves: masked, not given back.
        for code in [
            &[0xfa][..],
            &[0xfb],
            &[0x9d],
            &[0x66, 0x9d],
            &[0x48, 0xcf],
            &[0x48, 0x0f, 0x07],
        ] {
            assert_eq!(if_step(code), IfStep::MaskOnly, "{code:x?}");
        }
        // They save RFLAGS, wait for an interrupt, or could not be read: not masked.
        for code in [
            &[0x9c][..],
            &[0x66, 0x9c],
            &[0xf4],
            &[0xcc],
            &[0xcd, 0x80],
            &[0xf1],
            &[0x0f, 0x05],
            &[0x0f, 0x0b],
            &[0x0f, 0x01, 0xc9],
            &[0x0f],
            &[0x66, 0x48],
            &[],
        ] {
            assert_eq!(if_step(code), IfStep::Unmasked, "{code:x?}");
        }
    }

    #[test]
    fn a_frame_on_the_stack_that_returns_to_the_breakpoint_is_found() {
        const BP: u64 = 0xffff_ffff_8100_1000;
        // An interrupt: RIP, CS, RFLAGS (IF cleared by luo-vmm, TF by KVM), RSP, SS.
        assert_eq!(
            interrupted_frame(&[BP, 0x10, 0x102, 0xffff_c900_0001_3f58, 0x18], BP),
            Some(2)
        );
        // An exception with an error code first.
        assert_eq!(
            interrupted_frame(&[0x2, BP, 0x10, 0x146, 0xffff_c900_0001_3f58, 0x18], BP),
            Some(3)
        );
        // A completed `call`: the return address is past the breakpoint.
        assert_eq!(interrupted_frame(&[BP + 5, 0x10, 0x2, 0], BP), None);
        // Not a frame: what follows is no selector, or no RFLAGS.
        assert_eq!(interrupted_frame(&[BP, BP, 0x2], BP), None);
        assert_eq!(interrupted_frame(&[BP, 0x10, 0x0], BP), None);
        assert_eq!(interrupted_frame(&[BP], BP), None);
    }
}
