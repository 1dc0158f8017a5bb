//! Cross-kernel handovers: the reference kernel hands over to a kernel variant (issue 20).
//! Each test boots real guests on /dev/kvm (a minute or two each on an instruction-
//! emulating KVM); the variants are built on first use from the reference's object tree
//! (about a minute each). Results come from the typed JSON report, never the console.

mod common;

use common::{luo_vmm, reference_image, text, GUEST_TIMEOUT_S};
use luo_vmm::report::{read_json, CrossVerdict, RunReport};

/// Runs `luo-vmm handover ARGS --timeout .. --json <tmp>` (one vCPU): its exit status,
/// stdout and report.
fn handover(name: &str, args: &[&str]) -> (std::process::Output, String, RunReport) {
    reference_image();
    let path = std::env::temp_dir().join(format!("luo-cross-{name}-{}.json", std::process::id()));
    let mut all = vec!["handover"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--timeout",
        GUEST_TIMEOUT_S,
        "--json",
        path.to_str().unwrap(),
    ]);
    let out = luo_vmm(&all);
    let (stdout, _) = text(&out);
    let report = read_json(&path).expect("no readable JSON report");
    let _ = std::fs::remove_file(&path);
    (out, stdout, report)
}

#[test]
fn the_control_variant_verifies_there_and_back() {
    // A -> B -> A: the reference, the control variant (nothing LUO sees differs), back.
    let (out, stdout, r) = handover(
        "control",
        &[
            "--next-variant",
            "abi-control",
            "--repeat",
            "2",
            "--alternate",
        ],
    );
    assert!(out.status.success(), "{:?}\n{stdout}", out.status);
    assert!(r.verified && r.guest_ok, "{:?}", r.errors);
    assert_eq!(r.rounds.len(), 2);
    let k0 = r.rounds[0]
        .kernels
        .as_ref()
        .expect("round 1 names no kernels");
    let k1 = r.rounds[1]
        .kernels
        .as_ref()
        .expect("round 2 names no kernels");
    // Two distinct kernels (keys), and the second round goes back.
    assert_ne!(k0.from.key, k0.to.key);
    assert_eq!((&k1.from, &k1.to), (&k0.to, &k0.from));
    assert!(k0.to.key.contains("abi-control"), "{k0:?}");
    assert!(k0.to.release.ends_with("-luo-control"), "{k0:?}");
    assert!(!k0.from.release.ends_with("-luo-control"), "{k0:?}");
    for round in &r.rounds {
        assert!(round.verified, "{round:?}");
        let cross = round.cross.as_ref().expect("no cross-kernel verdict");
        assert_eq!(cross.verdict, CrossVerdict::Compatible, "{}", cross.reason);
        // The agent's data check passed in the other kernel.
        let inv = round.inventory.as_ref().and_then(|i| i.totals).unwrap();
        assert_eq!(round.checked, Some(inv));
        assert_eq!(
            round.handover.pages_written.as_ref().map(|p| p.preserved),
            Some(0)
        );
    }
    assert!(
        stdout.contains(&format!(
            "kernels: {} -> {}",
            k0.from.describe(),
            k0.to.describe()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("cross-kernel verdict: compatible"),
        "{stdout}"
    );
}

#[test]
fn a_renamed_memfd_handler_is_rejected_and_nothing_is_reused() {
    let (out, stdout, r) = handover("memfd", &["--next-variant", "memfd-renamed"]);
    // The agent's restore fails in the next kernel: a guest failure, exit 1.
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(r.rounds.len(), 1, "{:?}", r.errors);
    let round = &r.rounds[0];
    let k = round.kernels.as_ref().unwrap();
    assert!(k.cross() && k.to.key.contains("memfd-renamed"), "{k:?}");
    let cross = round.cross.as_ref().expect("no cross-kernel verdict");
    assert_eq!(cross.verdict, CrossVerdict::Rejected, "{}", cross.reason);
    // The agent's LUO call that failed, and B's own words for why.
    assert!(cross.evidence.agent_step.is_some());
    assert!(
        cross.evidence.kernel.iter().any(|l| l.contains("memfd-v2")),
        "{:?}",
        cross.evidence.kernel
    );
    // The leak check watched the preserved file state under memory pressure: untouched.
    let leak = cross.evidence.leak.as_ref().expect("no leak check");
    assert!(leak.pages_checked >= 256, "{leak:?}");
    assert_eq!(leak.written, 0, "{leak:?}");
    assert!(leak.pressure_bytes > 0, "{leak:?}");
}

#[test]
fn next_kernels_that_cannot_be_used_are_refused_before_a_guest_boots() {
    let dir = std::env::temp_dir().join(format!("luo-cross-refuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not a kernel").unwrap();
    let cases: [(&[&str], String); 3] = [
        (
            &["--next-kernel", notes.to_str().unwrap()],
            format!(
                "--next-kernel {}: not a kernel (neither an ELF vmlinux nor an x86 bzImage)",
                notes.display()
            ),
        ),
        (
            &["--next-variant", "no-such-variant"],
            "--next-variant: no kernel variant \"no-such-variant\"".to_owned(),
        ),
        (
            &["--alternate"],
            "--alternate: there is no next kernel to alternate with".to_owned(),
        ),
    ];
    for (args, want) in cases {
        let started = std::time::Instant::now();
        let mut all = vec!["handover"];
        all.extend_from_slice(args);
        let out = luo_vmm(&all);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(&want), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            started.elapsed().as_secs() < 10,
            "refused before any build or boot"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
