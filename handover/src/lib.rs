//! `luo-handover`: everything about a Linux Live Update handover (LUO sessions over KHO,
//! carried by kexec) that can be known from outside the guest without KVM.
//!
//! The VMM implements [`mem::GuestMemoryRead`] over its guest memory and then:
//!
//! 1. loads the kernel's symbols ([`symbols::KernelSymbols`]) to arm breakpoints on
//!    `liveupdate_reboot`, `machine_kexec` and `start_kernel`, and to find `boot_params`;
//! 2. at `next-kernel-start`, reads the handover with [`Handover::read`]: zero page ->
//!    setup_data (`SETUP_KEXEC_KHO`) -> `kho-v4` FDT -> preserved-memory radix tree, scratch
//!    areas, `kexec-metadata`, LUO sessions, files and memfd folios;
//! 3. turns it into labelled extents ([`Handover::preserved_extents`]) and classifies the
//!    pages KVM's dirty log saw written since `point-of-no-return`
//!    ([`extents::classify_dirty`]), optionally comparing digests ([`digest::ExtentDigests`]);
//! 4. checks the handover's invariants ([`invariants::check`]: nothing preserved in scratch,
//!    one owner per page, every referenced page preserved, every `compatible` understood);
//! 5. records the marks in a [`timeline::Timeline`] and emits a [`timeline::HandoverReport`].
//!
//! Every parser takes guest bytes as hostile: reads are bounds-checked, lengths validated,
//! lists and trees bounded, cycles detected; a corrupt guest yields an error, never a panic
//! (see the `no_panic` tests and the `fuzz/` targets, which drive [`fuzz_one`]). One
//! [`budget::Budget`] per parse, sized from guest RAM, bounds the pages read and the records
//! and bytes kept, and holds the RAM map that every extent and array must lie in; a page
//! reached twice by LUO's records is an error; so what a hostile guest can make the VMM spend
//! is proportional to guest RAM, whatever it writes (`tests/hostile.rs`).
//!
//! ABI sources (Linux 7.2): `include/linux/kho/abi/{kexec_handover,kexec_metadata,luo,block,
//! memfd}.h`, `kernel/liveupdate/`, `arch/x86/include/uapi/asm/{bootparam,setup_data}.h`,
//! `arch/x86/kernel/kexec-bzimage64.c`.

#![deny(missing_docs)]

#[cfg(test)]
extern crate self as luo_handover;

pub mod bootparams;
pub mod budget;
pub mod digest;
pub mod extents;
pub mod fdt;
pub mod fields;
pub mod inject;
pub mod invariants;
pub mod kho;
pub mod luo;
pub mod mem;
pub mod radix;
pub(crate) mod state;
pub mod symbols;
pub mod timeline;

#[cfg(test)]
#[path = "../tests/support/fixture.rs"]
mod fixture;

pub use state::{
    Handover, HandoverError, LabelledExtents, Unparsed, OWNER_KHO, OWNER_KHO_FDT, OWNER_SCRATCH,
    UNPARSED_HEAD,
};

/// Fuzzing entry point: `data` becomes guest memory at address 0 and is read as a handover
/// (zero page at 0; its extents labelled and its invariants checked), as a bare KHO FDT, and
/// as a radix tree whose root is the page named by its first 8 bytes. Returns how many of the
/// three parsed; must never panic.
pub fn fuzz_one(data: &[u8]) -> usize {
    let mem = mem::VecMemory::new(0, data.to_vec());
    let mut ok = 0;
    if let Ok(h) = Handover::read(&mem, 0) {
        let ext = h.preserved_extents();
        let _ = ext.set.total_pages();
        let _ = invariants::check(&h, &ext);
        ok += 1;
    }
    let budget = || budget::Budget::for_memory(&mem);
    ok += usize::from(kho::parse_kho_fdt(data, &budget()).is_ok());
    let root = mem::read_u64_le(&mem, 0).unwrap_or(0) & !(mem::PAGE_SIZE - 1);
    ok += usize::from(radix::walk(&mem, root, &budget()).is_ok());
    ok
}

#[cfg(test)]
mod no_panic {
    //! Deterministic stand-in for the fuzz target: thousands of random and mutated images.

    use super::*;
    use crate::fixture::{HandoverFixture, HandoverSpec, XorShift};

    /// A complete small handover packed into 2 MiB at address 0, zero page first.
    fn seed_image() -> Vec<u8> {
        let mut mem = mem::VecMemory::zeroed(0, 2 << 20);
        let spec = HandoverSpec {
            meta_base: 0,
            radix_base: 0x4_0000,
            scratch: vec![kho::ScratchArea {
                addr: 0x6_0000,
                size: 0x1_0000,
            }],
            extra_blocks: vec![(0x7_0000, 4)],
            sessions: vec![crate::fixture::SessionSpec {
                name: "s".into(),
                memfds: vec![crate::fixture::MemfdSpec {
                    token: 1,
                    first_pfn: 0x80,
                    folios: 300,
                    size: 300 * 4096,
                }],
                other_files: vec![("other-v1".into(), 2)],
            }],
            liveupdate_num: 1,
        };
        let fx = HandoverFixture::write(&mut mem, &spec).unwrap();
        assert_eq!(fx.zero_page, 0);
        mem.as_bytes().to_vec()
    }

    #[test]
    fn seed_image_parses() {
        let img = seed_image();
        let mem = mem::VecMemory::new(0, img.clone());
        let h = Handover::read(&mem, 0).unwrap();
        assert_eq!(h.luo.unwrap().sessions[0].files.len(), 2);
        assert!(fuzz_one(&img) >= 1);
    }

    /// Writes the seed image for `cargo fuzz` (path from `LUO_FUZZ_SEED`, relative to the
    /// workspace root; default `fuzz/corpus/kho_parse/seed`).
    #[test]
    #[ignore = "writes a file; run on demand"]
    fn write_fuzz_seed() {
        let rel =
            std::env::var("LUO_FUZZ_SEED").unwrap_or_else(|_| "fuzz/corpus/kho_parse/seed".into());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, seed_image()).unwrap();
    }

    #[test]
    fn random_buffers_never_panic() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..2000 {
            let len = mem::to_usize(rng.below(3 * 4096));
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64().to_le_bytes()[0]).collect();
            fuzz_one(&data);
        }
    }

    #[test]
    fn mutated_handovers_never_panic() {
        let seed = seed_image();
        // Bytes worth hitting: everything that is not zero in the seed (headers, pointers,
        // counts, bitmaps), plus a sprinkle of random offsets.
        let hot: Vec<usize> = seed
            .iter()
            .enumerate()
            .filter(|(_, &b)| b != 0)
            .map(|(i, _)| i)
            .collect();
        let mut rng = XorShift(0xfeed_f00d_dead_beef);
        let mut img = seed.clone();
        let mut parsed = 0;
        // LUO_FUZZ_ITERS raises the count for a longer soak (e.g. in release mode).
        let iters = std::env::var("LUO_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        for round in 0..iters {
            img.copy_from_slice(&seed);
            for _ in 0..1 + rng.below(4) {
                let at = if rng.below(4) == 0 {
                    mem::to_usize(rng.below(img.len() as u64))
                } else {
                    hot[mem::to_usize(rng.below(hot.len() as u64))] & !7
                };
                let v = match rng.below(6) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => rng.next_u64(),
                    3 => rng.below(img.len() as u64), // a plausible in-memory pointer
                    4 => rng.below(img.len() as u64) & !0xfff,
                    _ => {
                        u64::from_le_bytes(img[at.min(img.len() - 8)..][..8].try_into().unwrap())
                            ^ (1 << rng.below(64))
                    }
                };
                let at = at.min(img.len() - 8);
                img[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            if round % 2 == 1 {
                let cut = mem::to_usize(rng.below(img.len() as u64));
                parsed += fuzz_one(&img[..cut]);
            } else {
                parsed += fuzz_one(&img);
            }
        }
        assert!(parsed > 0, "mutations should not all be fatal");
    }
}
