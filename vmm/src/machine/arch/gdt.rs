//! Global descriptor table entries and the `kvm_segment`s they describe.

use kvm_bindings::kvm_segment;

/// Builds an 8-byte GDT descriptor from its flags (access byte in bits 0..8, flags nibble
/// in 12..16, as in Linux's `GDT_ENTRY`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT descriptor at `index` into the segment KVM loads into the vCPU.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    // Masked to the descriptor's 20 limit bits: fits in u32.
    #[allow(clippy::cast_possible_truncation)]
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With the granularity bit set the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// GDT for the 64-bit boot protocol: null, 64-bit code, data, TSS.
pub const GDT_LONG_MODE: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for the PVH entry (32-bit protected mode, flat): null, 32-bit code, data, TSS.
pub const GDT_PROTECTED_MODE: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Index of the code segment in both tables.
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment.
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS.
pub const TSS_INDEX: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let cs = kvm_segment_from_gdt(GDT_LONG_MODE[1], CODE_INDEX);
        assert_eq!(cs.selector, 0x08);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn protected_mode_segments_are_flat_32_bit() {
        let cs = kvm_segment_from_gdt(GDT_PROTECTED_MODE[1], CODE_INDEX);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.base, cs.limit),
            (0, 1, 1, 0, 0xffff_ffff)
        );
        let ds = kvm_segment_from_gdt(GDT_PROTECTED_MODE[2], DATA_INDEX);
        assert_eq!((ds.type_, ds.selector), (3, 0x10));
        let tr = kvm_segment_from_gdt(GDT_PROTECTED_MODE[3], TSS_INDEX);
        assert_eq!((tr.s, tr.type_, tr.limit), (0, 0xb, 0x67));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn base_bits_round_trip() {
        let e = gdt_entry(0x9b, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 1);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
    }
}
