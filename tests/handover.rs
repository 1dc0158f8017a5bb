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

/// What one luo-vmm run left: exit status, output, and its JSON report.
struct Run {
    out: std::process::Output,
    stdout: String,
    stderr: String,
    json: Value,
}

/// Runs `luo-vmm ARGS --vcpus 2 --timeout .. --json <tmp>` against the reference guest:
/// every handover test runs on two vCPUs, the next kernel must bring both up again.
fn luo_vmm_json(name: &str, args: &[&str]) -> Run {
    reference_image();
    let path = std::env::temp_dir().join(format!("luo-{name}-{}.json", std::process::id()));
    let path_str = path.to_str().unwrap().to_owned();
    let mut all = args.to_vec();
    all.extend_from_slice(&[
        "--vcpus",
        "2",
        "--timeout",
        GUEST_TIMEOUT_S,
        "--json",
        &path_str,
    ]);
    let out = luo_vmm(&all);
    let (stdout, stderr) = text(&out);
    let json = std::fs::read_to_string(&path)
        .map(|t| serde_json::from_str(&t).expect("the JSON report does not parse"))
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&path);
    Run {
        out,
        stdout,
        stderr,
        json,
    }
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
    let run = luo_vmm_json("repeat", &["handover", "--repeat", "3"]);
    assert!(
        run.out.status.success(),
        "handover failed: {:?}",
        run.out.status
    );
    for m in MARKS {
        assert_eq!(
            run.stdout.matches(&format!("mark {m}")).count(),
            3,
            "mark {m} is not in every handover"
        );
    }
    assert_eq!(run.stdout.matches("0 preserved pages written").count(), 3);
    // The agent's own console lines (the report quotes them again after "agent: ").
    let verified = "luo-agent: verified 1 sessions, 1 memfds, 1048576 bytes";
    let console_lines = run
        .stdout
        .lines()
        .filter(|l| l.starts_with(verified))
        .count();
    assert_eq!(console_lines, 3);
    assert!(
        run.stdout.contains("memfd:luo-vmm-s0"),
        "the memfd's extent has no owner"
    );

    assert_round_verified(&run.json);
    let rounds = run.json["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    rounds.iter().for_each(assert_round_verified);
    for round_marks in run.json["marks"].as_array().unwrap() {
        let names: Vec<&str> = round_marks
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, MARKS);
    }
}

#[test]
fn several_sessions_and_files_with_digests() {
    let args = [
        "handover",
        "--sessions",
        "3",
        "--files",
        "2",
        "--memfd-size",
        "8M",
        "--verify-digest",
    ];
    let run = luo_vmm_json("multi", &args);
    assert!(
        run.out.status.success(),
        "handover failed: {:?}",
        run.out.status
    );
    assert!(run
        .stdout
        .contains("luo-agent: verified 3 sessions, 6 memfds, 50331648 bytes"));
    // Both kernels, the one before the kexec and the next one, brought up both CPUs.
    assert_eq!(
        run.stdout
            .matches("luo-agent: userspace up (cpus=2)")
            .count(),
        2,
        "a kernel did not bring up both vCPUs"
    );
    assert_round_verified(&run.json);
    assert!(run.json["extents"]["bytes"].as_u64().unwrap() >= 48 << 20);
    let digest = &run.json["digest"];
    assert!(digest["compared"].as_u64().unwrap() >= 6);
    assert_eq!(digest["changed"].as_array().unwrap().len(), 0);
}

fn selftest_passes(name: &str) {
    let run = luo_vmm_json(name, &["selftest", name]);
    assert!(
        run.out.status.success(),
        "selftest {name} failed: {:?}",
        run.out.status
    );
    assert!(
        run.stdout.contains(&format!(
            "luo-agent: /selftests/{name} exited: exit status: 0"
        )),
        "the selftest's stage 2 did not exit 0"
    );
    assert!(run.stdout.contains("0 preserved pages written"));
    assert_round_verified(&run.json);
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
    let run = luo_vmm_json("corrupt", &["handover", "--inject", "corrupt-kho-fdt"]);
    assert!(!run.stderr.contains("panicked"), "luo-vmm panicked");
    assert!(
        !run.out.status.success(),
        "a corrupted handover must not pass"
    );
    assert!(run
        .stdout
        .contains("injected: overwrote the KHO FDT header"));
    // The extents were read before the corruption, so the in-place proof still stands.
    assert!(run.stdout.contains("0 preserved pages written"));
    assert_eq!(run.json["verified"].as_bool(), Some(false));
    assert_eq!(run.json["injected"].as_array().unwrap().len(), 1);
}
