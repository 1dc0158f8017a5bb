//! Live-update handovers of the reference guest, intercepted by luo-vmm: each test is a
//! real guest doing a real LUO live update on /dev/kvm (minutes on an instruction-
//! emulating KVM), so each run checks as much as it can.

mod common;

use common::{luo_vmm, reference_image, text, GUEST_TIMEOUT_S};
use serde_json::Value;

const MARKS: [&str; 6] = [
    "reboot-requested",
    "serialize-start",
    "point-of-no-return",
    "next-kernel-start",
    "userspace-up",
    "workload-resumed",
];

fn json_report(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("luo-{name}-{}.json", std::process::id()))
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("no JSON report written");
    serde_json::from_str(&text).expect("the JSON report does not parse")
}

/// Checks one handover report (a JSON object with the report keys).
fn assert_round_verified(r: &Value) {
    assert!(r["blackout_ns"].as_u64().unwrap() > 0, "no blackout in {r}");
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 5, "five phases between six marks: {r}");
    assert!(phases
        .iter()
        .all(|p| p["name"].is_string() && p["t_ns"].is_u64()));
    assert!(r["extents"]["count"].as_u64().unwrap() >= 1);
    assert!(r["extents"]["bytes"].as_u64().unwrap() >= 4096);
    assert_eq!(r["preserved_pages_written"].as_u64(), Some(0));
    assert_eq!(r["verified"].as_bool(), Some(true));
}

#[test]
fn three_consecutive_handovers_are_intercepted_and_verified() {
    reference_image();
    let json = json_report("repeat");
    let out = luo_vmm(&[
        "handover",
        "--repeat",
        "3",
        "--timeout",
        GUEST_TIMEOUT_S,
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "handover failed: {:?}", out.status);
    for m in MARKS {
        assert_eq!(
            stdout.matches(&format!("mark {m}")).count(),
            3,
            "mark {m} not in every handover"
        );
    }
    assert_eq!(stdout.matches("0 preserved pages written").count(), 3);
    assert_eq!(
        stdout
            .matches("luo-agent: verified 1 sessions, 1 memfds, 1048576 bytes")
            .count(),
        3
    );
    assert!(
        stdout.contains("memfd:luo-vmm-s0"),
        "the memfd's extent has no owner"
    );

    let report = read_json(&json);
    assert_round_verified(&report);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    rounds.iter().for_each(assert_round_verified);
    for round_marks in report["marks"].as_array().unwrap() {
        let names: Vec<&str> = round_marks
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, MARKS);
    }
    std::fs::remove_file(&json).unwrap();
}

#[test]
fn several_sessions_and_files_on_two_vcpus_with_digests() {
    reference_image();
    let json = json_report("multi");
    let out = luo_vmm(&[
        "handover",
        "--sessions",
        "3",
        "--files",
        "2",
        "--memfd-size",
        "8M",
        "--vcpus",
        "2",
        "--verify-digest",
        "--timeout",
        GUEST_TIMEOUT_S,
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "handover failed: {:?}", out.status);
    assert!(stdout.contains("luo-agent: verified 3 sessions, 6 memfds, 50331648 bytes"));
    assert!(stdout.contains("luo-agent: userspace up (cpus=2)"));
    let report = read_json(&json);
    assert_round_verified(&report);
    assert!(report["extents"]["bytes"].as_u64().unwrap() >= 48 << 20);
    let digest = &report["digest"];
    assert!(digest["compared"].as_u64().unwrap() >= 6);
    assert_eq!(digest["changed"].as_array().unwrap().len(), 0);
    std::fs::remove_file(&json).unwrap();
}

fn selftest_passes(name: &str) {
    reference_image();
    let out = luo_vmm(&["selftest", name, "--timeout", GUEST_TIMEOUT_S]);
    let (stdout, _) = text(&out);
    assert!(
        out.status.success(),
        "selftest {name} failed: {:?}",
        out.status
    );
    assert!(stdout.contains("0 preserved pages written"));
    assert!(
        stdout.contains("# PASSED") || stdout.contains("ok "),
        "no kselftest result for {name}"
    );
}

#[test]
fn upstream_selftest_luo_kexec_simple() {
    selftest_passes("luo_kexec_simple");
}

#[test]
fn upstream_selftest_luo_multi_session() {
    selftest_passes("luo_multi_session");
}

#[test]
fn corrupt_kho_fdt_is_reported_and_never_crashes_the_vmm() {
    reference_image();
    let json = json_report("corrupt");
    let out = luo_vmm(&[
        "handover",
        "--inject",
        "corrupt-kho-fdt",
        "--timeout",
        GUEST_TIMEOUT_S,
        "--json",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(!stderr.contains("panicked"), "luo-vmm panicked");
    assert!(!out.status.success(), "a corrupted handover must not pass");
    assert!(stdout.contains("injected: overwrote the KHO FDT header"));
    // The extents were read before the corruption, so the proof still stands.
    assert!(stdout.contains("0 preserved pages written"));
    let report = read_json(&json);
    assert_eq!(report["verified"].as_bool(), Some(false));
    assert_eq!(report["injected"].as_array().unwrap().len(), 1);
    std::fs::remove_file(&json).unwrap();
}
