//! End-to-end through the public API: a handover laid out as Linux 7.2 does, read back,
//! labelled, intersected with a dirty log, digested, and reported; plus every captured fixture
//! under `tests/fixtures/`.

#[path = "support/fixture.rs"]
mod fixture;

use std::path::Path;

use fixture::{HandoverFixture, HandoverSpec, WriteMem};
use luo_handover::digest::{DigestAlgorithm, ExtentDigests};
use luo_handover::extents::{classify_dirty, DirtyBitmap};
use luo_handover::fields::FieldList;
use luo_handover::invariants::check;
use luo_handover::mem::{RecordingMemory, SparseMemory, PAGE_SIZE};
use luo_handover::timeline::{HandoverReport, Mark, Timeline};
use luo_handover::Handover;

const GUEST: u64 = 512 << 20;

fn dirty(words: &mut [u64], gpa: u64) {
    words[(gpa / PAGE_SIZE / 64) as usize] |= 1 << (gpa / PAGE_SIZE % 64);
}

#[test]
fn handover_pipeline_end_to_end() {
    let mut mem = SparseMemory::new(0, GUEST);
    let fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();

    let h = Handover::read(&mem, fx.zero_page).unwrap();
    let ext = h.preserved_extents();
    assert!(ext.not_preserved.is_empty());
    assert_eq!(ext.set.total_pages(), fx.preserved_pages());
    let scratch = h.scratch_extents();
    let before = ExtentDigests::compute(&mem, &ext.set, DigestAlgorithm::default()).unwrap();

    // Between point-of-no-return and next-kernel-start: kexec writes in scratch, one stray page.
    let mut words = vec![0u64; (GUEST / PAGE_SIZE / 64) as usize];
    for i in 0..2057 {
        dirty(&mut words, 0x100_0000 + i * PAGE_SIZE);
    }
    dirty(&mut words, 0x9_f000);
    mem.put(0x100_0000, b"kexec segment").unwrap();
    let c = classify_dirty(&DirtyBitmap::new(0, &words), &ext.set, &scratch);
    assert_eq!(
        (c.preserved.len(), c.scratch, c.other.clone()),
        (0, 2057, vec![0x9_f000])
    );
    let after = ExtentDigests::compute(&mem, &ext.set, DigestAlgorithm::default()).unwrap();

    let mut tl = Timeline::new();
    for (i, m) in Mark::ALL.into_iter().enumerate() {
        tl.record(m, 1_000 + i as u64 * 1_000_000);
    }
    let report = HandoverReport::new(&tl.rounds()[0])
        .with_extents(&ext.set, &h.scratch)
        .with_dirty(&c, &ext.set)
        .with_digest(before.compare(&after));
    assert!(report.intact, "{report}");
    assert_eq!(report.blackout_ns, Some(5_000_000));
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["pages_written"]["preserved"], 0);
    assert_eq!(
        json["pages_written"]["other_at"],
        serde_json::json!([0x9_f000])
    );

    // A preserved page written: caught by both proofs.
    mem.put(0x200 << 12, b"corrupted").unwrap();
    dirty(&mut words, 0x200 << 12);
    let c = classify_dirty(&DirtyBitmap::new(0, &words), &ext.set, &scratch);
    assert_eq!(c.preserved, vec![0x200 << 12]);
    assert_eq!(
        ext.set.find(0x200 << 12).unwrap().owner,
        "memfd:luo-agent/0x1/data"
    );
    let verdict = before
        .compare(&ExtentDigests::compute(&mem, &ext.set, DigestAlgorithm::default()).unwrap());
    assert_eq!(verdict.changed.len(), 1);
    assert!(
        !HandoverReport::new(&tl.rounds()[0])
            .with_dirty(&c, &ext.set)
            .intact
    );
}

#[test]
fn recorded_pages_replay_the_handover() {
    let mut mem = SparseMemory::new(0, GUEST);
    let fx = HandoverFixture::write(&mut mem, &HandoverSpec::small()).unwrap();
    let rec = RecordingMemory::new(&mem);
    let h = Handover::read(&rec, fx.zero_page).unwrap();
    let dump = rec.page_dump();
    assert!(
        rec.pages().len() < 32,
        "a fixture is a few pages: {}",
        rec.pages().len()
    );
    let replay = SparseMemory::from_page_dump(0, GUEST, &dump).unwrap();
    assert_eq!(Handover::read(&replay, fx.zero_page).unwrap(), h);
}

/// Checks every `tests/fixtures/<name>/{pages.bin,meta.json}` (see the README there): the
/// KHO pages of real guest handovers, captured by `luo-vmm handover --capture-fixture`, must
/// parse to what luo-vmm saw live. At least one must exist.
#[test]
fn captured_fixtures_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = 0;
    for dir in std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
    {
        let (pages, meta) = (dir.join("pages.bin"), dir.join("meta.json"));
        if !pages.exists() || !meta.exists() {
            continue;
        }
        seen += 1;
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        let num = |k: &str| {
            meta[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: meta.json needs {k}", dir.display()))
        };
        let mem = SparseMemory::from_page_dump(
            num("guest_base"),
            num("guest_size"),
            &std::fs::read(&pages).unwrap(),
        )
        .unwrap();
        let h = Handover::read(&mem, num("zero_page_gpa"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let ext = h.preserved_extents();
        let summary = serde_json::to_value(h.summary()).unwrap();
        let actual: Vec<(&str, u64)> = summary
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_u64().unwrap()))
            .collect();
        for (key, got) in actual {
            if let Some(want) = meta["expect"][key].as_u64() {
                assert_eq!(got, want, "{}: {key}", dir.display());
            }
        }
        assert!(
            ext.not_preserved.is_empty(),
            "{}: {:?}",
            dir.display(),
            ext.not_preserved
        );
        // A real handover holds every invariant.
        for check in check(&h, &ext) {
            assert!(check.held, "{}: invariant: {check}", dir.display());
        }
        // Every field the injector can name is where the real kernel put its value.
        let fields = FieldList::of(&h);
        for f in &fields.fields {
            let got = fixture::read_field(&mem, f)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", dir.display(), f.path));
            assert_eq!(got, f.value, "{}: {}", dir.display(), f.path);
        }
        for path in [
            "kho.fdt.header.magic",
            "luo.session[0].name",
            "luo.session_block[0].next",
        ] {
            assert!(fields.field(path).is_some(), "{}: {path}", dir.display());
        }
    }
    assert!(seen > 0, "no captured fixture under {}", root.display());
}
