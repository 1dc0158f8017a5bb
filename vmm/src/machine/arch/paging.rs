//! Identity page tables for entering a kernel in long mode (64-bit boot protocol), and
//! the page walker that reads a running guest's own tables (4- or 5-level, by CR4.LA57).

use kvm_bindings::kvm_sregs;

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

/// CR4.LA57 (bit 12): 5-level paging, 57-bit linear addresses.
const CR4_LA57: u64 = 1 << 12;
/// Bits 51:12 of a paging-structure entry (or of CR3): the physical address of the next
/// table or of a 4 KiB page.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bit 0 of every entry: present.
const PRESENT: u64 = 1 << 0;
/// Bit 7 (PS): in a PDPTE a 1 GiB page, in a PDE a 2 MiB page; reserved in a PML4E and a
/// PML5E.
const PS: u64 = 1 << 7;
/// Bit 12 of a 1 GiB or 2 MiB page entry is its PAT bit, not an address bit.
const LARGE_PAT: u64 = 1 << 12;

/// How many table levels a long-mode walk goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// CR4.LA57 = 0: PML4 -> PDPT -> PD -> PT, 48-bit linear addresses (the kernel's
    /// `pgtable_l5_enabled()` false: `PGDIR_SHIFT` 39).
    Four,
    /// CR4.LA57 = 1: PML5 (indexed by linear-address bits 56:48) -> PML4 -> PDPT -> PD ->
    /// PT, 57-bit linear addresses (`pgtable_l5_enabled()` true: `PGDIR_SHIFT` 48).
    Five,
}

/// A vCPU's long-mode paging as the walker needs it: the root table (CR3) and the
/// depth chosen by CR4.LA57. Built from the registers with `Paging::from(&sregs)`. The
/// walker assumes long mode (CR0.PG = 1, EFER.LMA = 1), which its callers check
/// (`Vcpu::bytes_at`: CR0.PG) or know (a stop in the 64-bit kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// CR3: bits 51:12 are the root table (PML4 or PML5); the low bits (PCID or
    /// PWT/PCD) and the high bits (LAM, no-flush) are ignored.
    pub cr3: u64,
    /// Four or five levels, from CR4.LA57.
    pub levels: Levels,
}

/// The paging of a vCPU from its special registers: `cr3` and CR4.LA57 (so that
/// [`translate`] takes the vCPU's `&kvm_sregs` as they are).
impl From<&kvm_sregs> for Paging {
    fn from(sregs: &kvm_sregs) -> Self {
        Paging {
            cr3: sregs.cr3,
            levels: if sregs.cr4 & CR4_LA57 != 0 {
                Levels::Five
            } else {
                Levels::Four
            },
        }
    }
}

/// Translates a guest-virtual address to a guest-physical one by walking the guest's
/// long-mode page tables as the CPU does (Intel SDM vol. 3 §4.5, the shape of KVM's
/// `FNAME(walk_addr_generic)` in arch/x86/kvm/mmu/paging_tmpl.h): 4 levels or 5 as
/// `paging` says (a [`Paging`], or the vCPU's `&kvm_sregs`), each entry read through
/// `read_u64` (a guest-physical address, 8 bytes).
///
/// - `va` must be canonical for the depth (bits 63:47 all equal with 4 levels, bits
///   63:56 with 5), else `None` (the CPU raises #GP).
/// - A PDPTE with PS maps a 1 GiB page (address bits 51:30), a PDE with PS a 2 MiB page
///   (51:21), a PTE a 4 KiB page (51:12); the PAT bit (12) of a large page is not an
///   address bit.
/// - `None` for a non-present entry, an entry `read_u64` cannot read, and the reserved
///   bits the CPU faults on whatever MAXPHYADDR is (KVM's `__reset_rsvds_bits_mask` in
///   arch/x86/kvm/mmu/mmu.c): PS in a PML5E or PML4E, bits 29:13 of a 1 GiB page and
///   bits 20:13 of a 2 MiB page.
///
/// The guest is not trusted: any entry value is handled without panicking, and a walk
/// reads at most five entries (one per level), so the work is bounded whatever the
/// tables hold. Access rights (U/S, R/W, NX) are not checked: the VMM reads with the
/// kernel's view.
pub fn translate(
    paging: impl Into<Paging>,
    va: u64,
    read_u64: impl Fn(u64) -> Option<u64>,
) -> Option<u64> {
    let paging = paging.into();
    let levels: u32 = match paging.levels {
        Levels::Four => 4,
        Levels::Five => 5,
    };
    // 48 or 57 linear-address bits: the bits above the top one repeat it.
    let va_bits = 12 + 9 * levels;
    let high = va >> (va_bits - 1);
    if high != 0 && high != u64::MAX >> (va_bits - 1) {
        return None;
    }
    let mut table = paging.cr3 & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        // table <= ADDR_MASK and the offset <= 511 * 8: no overflow.
        let entry = read_u64(table + ((va >> shift) & 511) * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        let page_mask = (1u64 << shift) - 1;
        match level {
            1 => return Some((entry & ADDR_MASK) | (va & page_mask)),
            2 | 3 if entry & PS != 0 => {
                // Bits 20:13 (2 MiB) or 29:13 (1 GiB) are reserved.
                if entry & ADDR_MASK & page_mask & !LARGE_PAT != 0 {
                    return None;
                }
                return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
            }
            4 | 5 if entry & PS != 0 => return None,
            _ => table = entry & ADDR_MASK,
        }
    }
    None
}

#[cfg(test)]
mod translate_tests {
    use super::*;

    /// `__PAGE_OFFSET_BASE_L5` (arch/x86/include/asm/page_64_types.h): the direct map of
    /// all physical memory with 5-level paging (Documentation/arch/x86/x86_64/mm.rst).
    const DIRECT_MAP_L5: u64 = 0xff11_0000_0000_0000;
    /// `__PAGE_OFFSET_BASE_L4`: the direct map with 4-level paging.
    const DIRECT_MAP_L4: u64 = 0xffff_8880_0000_0000;
    /// `__START_KERNEL_map`: the kernel text mapping, the same in both modes.
    const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

    const P: u64 = 0x3; // present, writable
    const G: u64 = 1 << 8; // global
    const NX: u64 = 1 << 63;

    /// A small fake guest memory: a byte buffer from guest-physical 0; a read outside it
    /// fails.
    struct Ram(Vec<u8>);

    impl Ram {
        fn new(pages: usize) -> Self {
            Ram(vec![0; pages * 4096])
        }
        fn read(&self, gpa: u64) -> Option<u64> {
            let at = usize::try_from(gpa).ok()?;
            let bytes = self.0.get(at..at.checked_add(8)?)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        }
        fn write(&mut self, gpa: u64, value: u64) {
            let at = usize::try_from(gpa).unwrap();
            self.0[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        /// Sets entry `index` of the table at `table`.
        fn set(&mut self, table: u64, index: u64, entry: u64) {
            self.write(table + index * 8, entry);
        }
    }

    fn index(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * (level - 1))) & 511
    }

    const PML5: u64 = 0x1000;
    const PML4_DIRECT: u64 = 0x2000; // the PML4 under PML5[273] (the direct map)
    const PML4_KERNEL: u64 = 0x3000; // the PML4 under PML5[511] (kernel text, modules)
    const PML4_ROOT: u64 = 0x4000; // the 4-level root, sharing the PDPTs below
    const PDPT_DIRECT: u64 = 0x5000;
    const PDPT_KERNEL: u64 = 0x6000;
    const PD_DIRECT: u64 = 0x7000;
    const PD_KERNEL: u64 = 0x8000;
    const PT_KERNEL: u64 = 0x9000;

    /// The kernel's shape, as its head_64.S and the direct-map setup leave it: the first
    /// GiB of the direct map as one 1 GiB page, the second as 2 MiB pages, and the kernel
    /// text at `__START_KERNEL_map` as 2 MiB pages onto physical 0 (`level2_kernel_pgt`)
    /// except its second 2 MiB, split into 4 KiB pages. One set of PDPTs, PDs and PTs
    /// under a PML5 (with PML4s at 273 and 511) and under a PML4 (at 273 and 511): what
    /// Linux's p4d folding shares between the two modes.
    fn kernel_tables() -> Ram {
        let mut ram = Ram::new(16);
        ram.set(PML5, index(DIRECT_MAP_L5, 5), PML4_DIRECT | P);
        ram.set(PML5, index(START_KERNEL_MAP, 5), PML4_KERNEL | P);
        ram.set(PML4_DIRECT, index(DIRECT_MAP_L5, 4), PDPT_DIRECT | P);
        ram.set(PML4_KERNEL, index(START_KERNEL_MAP, 4), PDPT_KERNEL | P);
        ram.set(PML4_ROOT, index(DIRECT_MAP_L4, 4), PDPT_DIRECT | P);
        ram.set(PML4_ROOT, index(START_KERNEL_MAP, 4), PDPT_KERNEL | P);
        // Direct map: GiB 0 as a 1 GiB page, GiB 1 through a PD of 2 MiB pages.
        ram.set(PDPT_DIRECT, 0, PS | G | NX | P);
        ram.set(PDPT_DIRECT, 1, PD_DIRECT | P);
        for i in 0..512 {
            ram.set(PD_DIRECT, i, ((1 << 30) + (i << 21)) | PS | G | NX | P);
        }
        // Kernel text: PDPT[510] -> PD of 2 MiB pages onto physical 0, PD[1] split.
        ram.set(PDPT_KERNEL, index(START_KERNEL_MAP, 3), PD_KERNEL | P);
        for i in 0..256 {
            ram.set(PD_KERNEL, i, (i << 21) | PS | G | P);
        }
        ram.set(PD_KERNEL, 1, PT_KERNEL | P);
        for i in 0..512 {
            ram.set(PT_KERNEL, i, ((1 << 21) + (i << 12)) | G | P);
        }
        ram
    }

    fn five(cr3: u64) -> Paging {
        Paging {
            cr3,
            levels: Levels::Five,
        }
    }

    fn four(cr3: u64) -> Paging {
        Paging {
            cr3,
            levels: Levels::Four,
        }
    }

    #[test]
    fn paging_of_sregs_follows_cr4_la57() {
        let mut s = kvm_sregs {
            cr3: 0x1234_5000 | 0x18,
            ..Default::default()
        };
        assert_eq!(Paging::from(&s), four(0x1234_5018));
        s.cr4 |= CR4_LA57 | 0x20; // LA57 and PAE
        assert_eq!(Paging::from(&s), five(0x1234_5018));
    }

    #[test]
    fn five_levels_follow_the_kernel_layout() {
        let ram = kernel_tables();
        let read = |a| ram.read(a);
        let t = |va| translate(five(PML5), va, read);
        // 1 GiB page: the direct map of physical 0..1 GiB.
        assert_eq!(t(DIRECT_MAP_L5), Some(0));
        assert_eq!(t(DIRECT_MAP_L5 + 0x1234_5678), Some(0x1234_5678));
        assert_eq!(t(DIRECT_MAP_L5 + 0x3fff_ffff), Some(0x3fff_ffff));
        // 2 MiB pages: the direct map of the second GiB.
        assert_eq!(t(DIRECT_MAP_L5 + 0x4000_0000), Some(0x4000_0000));
        assert_eq!(t(DIRECT_MAP_L5 + 0x5234_5678), Some(0x5234_5678));
        // The end of the mapping: the third GiB is not present.
        assert_eq!(t(DIRECT_MAP_L5 + 0x7fff_fff8), Some(0x7fff_fff8));
        assert_eq!(t(DIRECT_MAP_L5 + 0x8000_0000), None);
        // Kernel text: 2 MiB pages, and 4 KiB pages in the split one.
        assert_eq!(t(START_KERNEL_MAP), Some(0));
        assert_eq!(t(START_KERNEL_MAP + 0x1000_0123), Some(0x1000_0123));
        assert_eq!(t(START_KERNEL_MAP + 0x20_0000), Some(0x20_0000));
        assert_eq!(t(START_KERNEL_MAP + 0x23_4567), Some(0x23_4567));
        assert_eq!(t(START_KERNEL_MAP + 0x3f_ffff), Some(0x3f_ffff));
        // Past KERNEL_IMAGE_SIZE (512 MiB) nothing is mapped here.
        assert_eq!(t(START_KERNEL_MAP + 0x2000_0000), None);
        // The 4-level direct map is a different (unmapped) place with 5 levels:
        // PML5[511] -> the kernel PML4, whose entry 273 is empty.
        assert_eq!(t(DIRECT_MAP_L4), None);
    }

    #[test]
    fn four_levels_give_the_same_pages() {
        let ram = kernel_tables();
        let read = |a| ram.read(a);
        for off in [0, 0x1234_5678, 0x3fff_ffff, 0x4000_0000, 0x5234_5678] {
            assert_eq!(
                translate(four(PML4_ROOT), DIRECT_MAP_L4 + off, read),
                translate(five(PML5), DIRECT_MAP_L5 + off, read)
            );
            assert_eq!(
                translate(four(PML4_ROOT), DIRECT_MAP_L4 + off, read),
                Some(off)
            );
        }
        // __START_KERNEL_map is the same va in both modes.
        for off in [0, 0x1000_0123, 0x20_0000, 0x23_4567, 0x3f_ffff] {
            let va = START_KERNEL_MAP + off;
            assert_eq!(translate(four(PML4_ROOT), va, read), Some(off));
            assert_eq!(translate(five(PML5), va, read), Some(off));
        }
        // A 5-level direct-map address is not canonical with 48 bits: #GP, not a walk.
        let reads = std::cell::Cell::new(0);
        let counting = |a| {
            reads.set(reads.get() + 1);
            ram.read(a)
        };
        assert_eq!(translate(four(PML4_ROOT), DIRECT_MAP_L5, counting), None);
        assert_eq!(reads.get(), 0);
        // Walking a 5-level root as 4 levels (LA57 ignored) reads the PML5 as a PML4 and
        // misses: the bug this walker fixes.
        assert_eq!(translate(four(PML5), START_KERNEL_MAP, read), None);
    }

    #[test]
    fn non_canonical_addresses_are_refused() {
        let ram = kernel_tables();
        let read = |a| ram.read(a);
        // Bit 47 set, bits 63:48 clear: canonical with 57 bits, not with 48.
        assert_eq!(
            translate(four(PML4_ROOT), 0x0000_8000_0000_0000, read),
            None
        );
        // Bit 56 set, bits 63:57 clear: canonical with neither.
        assert_eq!(translate(five(PML5), 0x0100_0000_0000_0000, read), None);
        assert_eq!(translate(five(PML5), 0x7f11_0000_0000_0000, read), None);
        // The top of the address space is canonical in both.
        assert_eq!(translate(five(PML5), u64::MAX, read), None);
        assert_eq!(translate(four(PML4_ROOT), u64::MAX, read), None);
    }

    /// The guest-physical address of each entry a walk reads, in order.
    fn entries_read(ram: &Ram, paging: Paging, va: u64) -> Vec<u64> {
        let seen = std::cell::RefCell::new(Vec::new());
        translate(paging, va, |a| {
            seen.borrow_mut().push(a);
            ram.read(a)
        });
        seen.into_inner()
    }

    #[test]
    fn a_non_present_entry_at_each_level_stops_the_walk() {
        let cases = [
            (five(PML5), START_KERNEL_MAP + 0x23_4567, 5), // down to a 4 KiB page
            (four(PML4_ROOT), START_KERNEL_MAP + 0x23_4567, 4),
            (five(PML5), DIRECT_MAP_L5 + 0x5234_5678, 4), // a 2 MiB page
            (five(PML5), DIRECT_MAP_L5 + 0x1234_5678, 3), // a 1 GiB page
        ];
        for (paging, va, depth) in cases {
            let ram = kernel_tables();
            assert!(translate(paging, va, |a| ram.read(a)).is_some());
            let entries = entries_read(&ram, paging, va);
            assert_eq!(entries.len(), depth);
            for at in entries {
                let mut broken = kernel_tables();
                let entry = broken.read(at).unwrap();
                broken.write(at, entry & !PRESENT);
                assert_eq!(translate(paging, va, |a| broken.read(a)), None, "{at:#x}");
            }
        }
    }

    #[test]
    fn a_failed_read_at_each_level_stops_the_walk() {
        let ram = kernel_tables();
        let va = START_KERNEL_MAP + 0x23_4567;
        for fail_at in 0..5 {
            let n = std::cell::Cell::new(0);
            let read = |a| {
                n.set(n.get() + 1);
                (n.get() != fail_at + 1).then(|| ram.read(a)).flatten()
            };
            assert_eq!(translate(five(PML5), va, read), None);
            assert_eq!(n.get(), fail_at + 1);
        }
        // Tables beyond the end of guest memory.
        assert_eq!(translate(five(0x10_0000_0000), va, |a| ram.read(a)), None);
    }

    #[test]
    fn reserved_bits_fault_and_pat_is_not_an_address_bit() {
        let va = DIRECT_MAP_L5 + 0x5234_5678; // through a 2 MiB page (PD_DIRECT[145])
        let pde_at = PD_DIRECT + index(va, 2) * 8;
        let mut ram = kernel_tables();
        let pde = ram.read(pde_at).unwrap();
        ram.write(pde_at, pde | LARGE_PAT);
        assert_eq!(
            translate(five(PML5), va, |a| ram.read(a)),
            Some(0x5234_5678)
        );
        ram.write(pde_at, pde | (1 << 13));
        assert_eq!(translate(five(PML5), va, |a| ram.read(a)), None);
        ram.write(pde_at, pde | (1 << 20));
        assert_eq!(translate(five(PML5), va, |a| ram.read(a)), None);

        // A 1 GiB page: PAT at bit 12, bits 29:13 reserved.
        let va = DIRECT_MAP_L5 + 0x1234_5678;
        let pdpte_at = PDPT_DIRECT;
        let mut ram = kernel_tables();
        let pdpte = ram.read(pdpte_at).unwrap();
        ram.write(pdpte_at, pdpte | LARGE_PAT);
        assert_eq!(
            translate(five(PML5), va, |a| ram.read(a)),
            Some(0x1234_5678)
        );
        for bit in [13, 21, 29] {
            ram.write(pdpte_at, pdpte | (1 << bit));
            assert_eq!(
                translate(five(PML5), va, |a| ram.read(a)),
                None,
                "bit {bit}"
            );
        }

        // PS in a PML5E or a PML4E: reserved, not a 256 TiB or 512 GiB page.
        let va = START_KERNEL_MAP;
        for (paging, at) in [
            (five(PML5), PML5 + index(va, 5) * 8),
            (five(PML5), PML4_KERNEL + index(va, 4) * 8),
            (four(PML4_ROOT), PML4_ROOT + index(va, 4) * 8),
        ] {
            let mut ram = kernel_tables();
            assert_eq!(translate(paging, va, |a| ram.read(a)), Some(0));
            let entry = ram.read(at).unwrap();
            ram.write(at, entry | PS);
            assert_eq!(translate(paging, va, |a| ram.read(a)), None, "{at:#x}");
        }

        // Bits above 51 (NX, protection keys, software bits) are not address bits.
        let mut ram = kernel_tables();
        let pte_at = PT_KERNEL + 3 * 8;
        let pte = ram.read(pte_at).unwrap();
        ram.write(pte_at, pte | (0x7ff << 52) | NX);
        let got = translate(five(PML5), START_KERNEL_MAP + 0x20_3abc, |a| ram.read(a));
        assert_eq!(got, Some(0x20_3abc));
    }

    /// xorshift64: deterministic noise without a dependency.
    fn noise(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn hostile_tables_never_panic_and_read_at_most_five_entries() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let interesting = [
            0,
            u64::MAX,
            PRESENT,
            PRESENT | PS,
            ADDR_MASK | PRESENT,
            ADDR_MASK | PRESENT | PS,
            !PS,
            0x1000 | PRESENT, // points back at a table
        ];
        // How many walks read 0..=5 entries, and how many found a page: the noise must
        // reach every level for the test to mean anything.
        let mut depths = [0u32; 6];
        let mut found = 0u32;
        for round in 0..2000u64 {
            // 16 pages of noise with random flags; three entries in four point inside
            // this memory (so walks go deep), the rest anywhere or at a chosen value.
            let mut ram = Ram::new(16);
            for i in 0..(16 * 512) {
                let mut e = noise(&mut state);
                if e & 0x300 == 0 {
                    e = interesting[usize::try_from(e >> 61).unwrap()];
                } else if e & 0xc00 != 0 {
                    e = (e & !ADDR_MASK) | (e & 0xf000);
                }
                ram.write(i * 8, e);
            }
            let cr3 = match round % 4 {
                0 => noise(&mut state),
                1 => u64::MAX,
                _ => noise(&mut state) & 0xf000,
            };
            for levels in [Levels::Four, Levels::Five] {
                let v = noise(&mut state);
                let vas = [
                    v,                         // mostly not canonical
                    v & 0x0000_7fff_ffff_ffff, // low half, both modes
                    v | 0xffff_8000_0000_0000, // high half, both modes
                    v | 0xff00_0000_0000_0000, // high half with 57 bits
                    u64::MAX,
                    0,
                    START_KERNEL_MAP,
                ];
                for va in vas {
                    let reads = std::cell::Cell::new(0u32);
                    let got = translate(Paging { cr3, levels }, va, |a| {
                        reads.set(reads.get() + 1);
                        assert_eq!(a % 8, 0);
                        assert!(a <= ADDR_MASK + 511 * 8);
                        ram.read(a)
                    });
                    assert!(reads.get() <= 5);
                    depths[usize::try_from(reads.get()).unwrap()] += 1;
                    if let Some(pa) = got {
                        found += 1;
                        assert_eq!(pa & 0xfff, va & 0xfff);
                        assert!(pa < 1 << 52);
                    }
                }
            }
        }
        assert!(depths.iter().all(|&n| n > 0), "{depths:?}");
        assert!(found > 0);
    }
}
