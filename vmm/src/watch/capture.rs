//! Saving the KHO state of a real handover as a test fixture for `luo-handover`
//! (format: handover/tests/fixtures/README.md): the pages the reader touched, and what
//! luo-vmm parsed from them while the guest was stopped at next-kernel-start.

use std::path::Path;

use luo_handover::mem::{GuestMemoryRead, RecordingMemory};
use luo_handover::Handover;
use serde_json::json;

/// Writes `pages.bin` and `meta.json` into `dir`.
pub fn save<M: GuestMemoryRead>(
    dir: &Path,
    rec: &RecordingMemory<M>,
    zero_page: u64,
    guest_size: u64,
    h: &Handover,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("pages.bin"), rec.page_dump())?;
    let meta = json!({
        "description": "captured by `luo-vmm handover --capture-fixture` at the next kernel's start_kernel breakpoint",
        "guest_base": 0,
        "guest_size": guest_size,
        "zero_page_gpa": zero_page,
        "expect": h.summary(),
    });
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_string_pretty(&meta)? + "\n",
    )
}
