//! Identity page tables for entering a kernel in long mode (64-bit boot protocol).

use crate::machine::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The three 4 KiB tables, each as (guest address, 512 entries): PML4 -> PDPT -> PD,
/// identity-mapping the first GiB with 2 MiB pages.
pub fn identity_tables() -> [(u64, Vec<u64>); 3] {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPTE_START | PRESENT_RW;
    let mut pdpt = vec![0u64; 512];
    pdpt[0] = PDE_START | PRESENT_RW;
    let pd = (0..512u64)
        .map(|i| (i << 21) | PRESENT_RW | PAGE_SIZE_2M)
        .collect();
    [(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pd)]
}

/// Translates `va` through tables built by [`identity_tables`]: used by tests to check
/// the tables really are an identity map.
#[cfg(test)]
fn walk(tables: &[(u64, Vec<u64>); 3], va: u64) -> Option<u64> {
    let table = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
    let pml4e = table(PML4_START)?[((va >> 39) & 511) as usize];
    let pdpte = table(pml4e & !0xfff)?[((va >> 30) & 511) as usize];
    let pde = table(pdpte & !0xfff)?[((va >> 21) & 511) as usize];
    (pde & 1 == 1).then_some((pde & !0x1f_ffff & !0xfff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_first_gib_identically() {
        let t = identity_tables();
        for va in [0u64, 0x7000, 0x100_0000, 0x3fff_ffff] {
            assert_eq!(walk(&t, va), Some(va));
        }
        assert_eq!(walk(&t, 0x4000_0000), None);
    }
}

/// Translates a guest-virtual address by walking 4-level page tables rooted at `cr3`,
/// reading each entry through `read_u64` (guest-physical). Handles 1 GiB and 2 MiB
/// pages. Returns `None` for a non-present mapping or an unreadable table.
pub fn translate(cr3: u64, va: u64, read_u64: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    const PS: u64 = 0x80;
    let mut table = cr3 & ADDR_MASK;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let entry = read_u64(table + ((va >> shift) & 511) * 8)?;
        if entry & 1 == 0 {
            return None;
        }
        let leaf = level == 1 || ((level == 3 || level == 2) && entry & PS != 0);
        if leaf {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod translate_tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn walks_identity_and_4k_mappings() {
        let mut mem = HashMap::new();
        for (addr, entries) in identity_tables() {
            for (i, e) in entries.iter().enumerate() {
                mem.insert(addr + i as u64 * 8, *e);
            }
        }
        let read = |a: u64| mem.get(&a).copied().or(Some(0));
        assert_eq!(translate(PML4_START, 0x123_4567, read), Some(0x123_4567));
        assert_eq!(translate(PML4_START, 0x8000_0000, read), None);

        // A kernel-style mapping: 0xffffffff81000000 -> 0x1000000 through 4 KiB pages.
        let va: u64 = 0xffff_ffff_8100_0123;
        let mut m = HashMap::new();
        m.insert(0x1000 + ((va >> 39) & 511) * 8, 0x2000 | 3);
        m.insert(0x2000 + ((va >> 30) & 511) * 8, 0x3000 | 3);
        m.insert(0x3000 + ((va >> 21) & 511) * 8, 0x4000 | 3);
        m.insert(0x4000 + ((va >> 12) & 511) * 8, 0x100_0000 | 3);
        let r = |a: u64| m.get(&a).copied().or(Some(0));
        assert_eq!(translate(0x1000, va, r), Some(0x100_0123));
    }
}
