//! Arbitrary bytes as guest memory (zero page at address 0) through the whole handover reader:
//! setup_data walk -> `struct kho_data` -> KHO FDT -> scratch list -> preserved-memory radix
//! tree -> kexec-metadata -> LUO sessions, files and memfd folios; plus the bare FDT parser and
//! a bare radix walk. Any panic is a bug.
//!
//! Run (nightly): `cargo fuzz run kho_parse` from the repository root, or
//! `cargo +nightly fuzz run kho_parse -- -max_len=1048576`. A valid seed image comes from
//! `cargo test -p luo-handover --lib write_fuzz_seed -- --ignored` (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    luo_handover::fuzz_one(data);
});
