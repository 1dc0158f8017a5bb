//! A vCPU's interrupt state as KVM holds it, in one readable line each: its MP state
//! (running or halted), the pending/injected events, and its local APIC (in service,
//! requested, TPR/PPR, the timer). What a hung guest's "is this CPU waiting for an
//! interrupt that never came, or sitting on one it never took?" is answered with.

use kvm_bindings::{kvm_lapic_state, kvm_mp_state, kvm_vcpu_events};

/// Local APIC register offsets (Intel SDM vol. 3, table 11-1).
const APIC_ID: usize = 0x20;
const APIC_TPR: usize = 0x80;
const APIC_PPR: usize = 0xa0;
const APIC_SVR: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_ICR_LOW: usize = 0x300;
const APIC_ICR_HIGH: usize = 0x310;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TIMER_INITIAL: usize = 0x380;
const APIC_TIMER_CURRENT: usize = 0x390;

/// The 32-bit local APIC register at `offset` of a `KVM_GET_LAPIC` image.
pub(crate) fn lapic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs.get(offset + i).map_or(0, |c| c.to_ne_bytes()[0]);
    }
    u32::from_le_bytes(b)
}

/// The vectors set in a 256-bit local APIC bitmap (ISR, TMR, IRR) starting at `base`:
/// eight 32-bit registers 16 bytes apart.
pub(crate) fn lapic_vectors(regs: &[std::os::raw::c_char; 1024], base: usize) -> Vec<u8> {
    (0u8..=255)
        .filter(|&v| {
            let reg = lapic_reg(regs, base + usize::from(v / 32) * 0x10);
            reg & (1 << (v % 32)) != 0
        })
        .collect()
}

fn vector_list(v: &[u8]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:#04x}")).collect();
    format!("[{}]", items.join(" "))
}

/// `KVM_MP_STATE_*` by name.
pub(crate) fn mp_state_name(state: u32) -> &'static str {
    match state {
        0 => "RUNNABLE",
        1 => "UNINITIALIZED",
        2 => "INIT_RECEIVED",
        3 => "HALTED",
        4 => "SIPI_RECEIVED",
        _ => "?",
    }
}

/// One line for the local APIC: enabled or not, TPR/PPR, vectors in service and
/// requested, the last ICR written, and the timer.
pub(crate) fn format_lapic(lapic: &kvm_lapic_state) -> String {
    let r = &lapic.regs;
    let svr = lapic_reg(r, APIC_SVR);
    let lvt = lapic_reg(r, APIC_LVT_TIMER);
    format!(
        "lapic: id={} {} tpr={:#x} ppr={:#x} isr={} irr={} icr={:#x}:{:#010x} \
         timer: lvt={lvt:#x} ({}, mode {}) initial={} current={}",
        lapic_reg(r, APIC_ID) >> 24,
        if svr & 0x100 != 0 {
            "enabled"
        } else {
            "software-disabled"
        },
        lapic_reg(r, APIC_TPR),
        lapic_reg(r, APIC_PPR),
        vector_list(&lapic_vectors(r, APIC_ISR)),
        vector_list(&lapic_vectors(r, APIC_IRR)),
        lapic_reg(r, APIC_ICR_HIGH) >> 24,
        lapic_reg(r, APIC_ICR_LOW),
        if lvt & 0x1_0000 != 0 {
            "masked"
        } else {
            "unmasked"
        },
        match (lvt >> 17) & 3 {
            0 => "one-shot",
            1 => "periodic",
            2 => "tsc-deadline",
            _ => "?",
        },
        lapic_reg(r, APIC_TIMER_INITIAL),
        lapic_reg(r, APIC_TIMER_CURRENT),
    )
}

/// One line for the MP state and the events KVM holds for the vCPU.
pub(crate) fn format_events(mp: Option<&kvm_mp_state>, ev: Option<&kvm_vcpu_events>) -> String {
    let mp = mp.map_or("unavailable", |m| mp_state_name(m.mp_state));
    let Some(e) = ev else {
        return format!("mp_state={mp} events unavailable");
    };
    format!(
        "mp_state={mp} interrupt: injected={} nr={:#x} shadow={} nmi: injected={} pending={} \
         masked={} exception: injected={} pending={} nr={}",
        e.interrupt.injected,
        e.interrupt.nr,
        e.interrupt.shadow,
        e.nmi.injected,
        e.nmi.pending,
        e.nmi.masked,
        e.exception.injected,
        e.exception.pending,
        e.exception.nr,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic_with(words: &[(usize, u32)]) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        for &(off, v) in words {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                l.regs[off + i] = std::os::raw::c_char::from_ne_bytes([*b]);
            }
        }
        l
    }

    #[test]
    fn bitmaps_give_their_vectors() {
        // IRR: vector 0xfb (reg 7 bit 27) and 0xec (reg 7 bit 12), 0x30 (reg 1 bit 16).
        let l = lapic_with(&[
            (APIC_IRR + 7 * 0x10, (1 << 27) | (1 << 12)),
            (APIC_IRR + 0x10, 1 << 16),
        ]);
        assert_eq!(lapic_vectors(&l.regs, APIC_IRR), vec![0x30, 0xec, 0xfb]);
        assert!(lapic_vectors(&l.regs, APIC_ISR).is_empty());
    }

    #[test]
    fn the_lapic_line_names_what_matters() {
        let l = lapic_with(&[
            (APIC_ID, 2 << 24),
            (APIC_SVR, 0x1ff),
            (APIC_ISR + 7 * 0x10, 1 << 27),
            (APIC_LVT_TIMER, 0x4_00ec),
            (APIC_ICR_LOW, 0x4_00fd),
            (APIC_ICR_HIGH, 3 << 24),
        ]);
        let s = format_lapic(&l);
        assert!(s.starts_with("lapic: id=2 enabled"), "{s}");
        assert!(s.contains("isr=[0xfb] irr=[]"), "{s}");
        assert!(s.contains("icr=0x3:0x000400fd"), "{s}");
        assert!(s.contains("(unmasked, mode tsc-deadline)"), "{s}");
        let off = format_lapic(&lapic_with(&[(APIC_LVT_TIMER, 0x1_0000)]));
        assert!(off.contains("software-disabled") && off.contains("masked, mode one-shot"));
    }

    #[test]
    fn events_line() {
        let mut e = kvm_vcpu_events::default();
        e.interrupt.injected = 1;
        e.interrupt.nr = 0xec;
        let mp = kvm_mp_state { mp_state: 3 };
        let s = format_events(Some(&mp), Some(&e));
        assert!(
            s.starts_with("mp_state=HALTED interrupt: injected=1 nr=0xec"),
            "{s}"
        );
        assert_eq!(
            format_events(None, None),
            "mp_state=unavailable events unavailable"
        );
    }
}
