//! Scenarios on real guests: a race from the LUO thread provoked on purpose, on the fixed
//! reference kernel (the racing call must wait for the kexec) and on the variant that
//! reverts the fix (the call goes through, and the detector sees the consequence). Each
//! run is a real two-vCPU guest doing a real handover (minutes on an emulating KVM).
//! Results are read from the JSON of `scenario run --json`.

mod common;

use common::{luo_vmm, reference_image, text};
use serde_json::Value;

/// Runs `luo-vmm scenario run ARGS --runs 1 --json <tmp>`; returns the exit status, the
/// text output and the JSON.
fn scenario(name: &str, args: &[&str]) -> (Option<i32>, String, Value) {
    reference_image();
    let dir = std::env::temp_dir().join(format!("luo-scenario-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let (json_s, dir_s) = (json.to_str().unwrap(), dir.to_str().unwrap());
    let mut all = vec!["scenario", "run"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--runs", "1", "--json", json_s, "--log-dir", dir_s]);
    let out = luo_vmm(&all);
    let (stdout, _) = text(&out);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("no JSON report"))
            .expect("the JSON does not parse");
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code(), stdout, report)
}

fn timeline(run: &Value) -> Vec<String> {
    run["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_session_close_during_reboot_waits_for_the_kexec_on_the_reference_kernel() {
    let (code, stdout, report) = scenario("ref", &["session-close-during-reboot"]);
    assert_eq!(code, Some(0), "the run did not give the expected verdict");
    assert!(
        stdout.contains("verdict: not reproduced (1/1 runs)"),
        "{stdout}"
    );
    let run = &report["runs"][0];
    assert_eq!(run["judgement"]["verdict"], "not-reproduced");
    // The close reached the rwsem's slow path on vCPU 1 while vCPU 0 was held after
    // serialization; that, and nothing else, released vCPU 0.
    let t = timeline(run);
    let held = t
        .iter()
        .position(|l| l.starts_with("held at serialized"))
        .expect("never held");
    let blocked = t
        .iter()
        .position(|l| l.starts_with("reached blocked"))
        .expect("the close never blocked");
    let released = t
        .iter()
        .position(|l| l.starts_with("released from serialized"))
        .expect("never released");
    assert!(held < blocked && blocked < released, "{t:#?}");
    assert!(t[released].ends_with("(hook blocked)"), "{}", t[released]);
    assert!(
        !t.iter().any(|l| l.contains("close-session 1 returned")),
        "the close returned: {t:#?}"
    );
    assert_eq!(run["discrepancies"], serde_json::json!([]));
    assert_eq!(run["kernel_trouble"], serde_json::json!([]));
}

/// A user's scenario file (the built-in one, renamed and with its own hold limit) on the
/// variant without the fix: no Rust involved.
#[test]
fn a_user_scenario_file_reproduces_the_close_race_on_the_variant_without_the_fix() {
    let builtin = include_str!("../scenarios/session-close-during-reboot.toml");
    let mine = builtin
        .replace(
            "name = \"session-close-during-reboot\"",
            "name = \"my-close-race\"",
        )
        .replace("max = \"300s\"", "max = \"200s\"");
    assert_ne!(mine, builtin);
    let path = std::env::temp_dir().join(format!("my-close-race-{}.toml", std::process::id()));
    std::fs::write(&path, mine).unwrap();
    let (code, stdout, report) = scenario(
        "variant",
        &[path.to_str().unwrap(), "--variant", "luo-reboot-unlocked"],
    );
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(0), "the run did not give the expected verdict");
    assert!(
        stdout.contains("scenario my-close-race on variant luo-reboot-unlocked"),
        "{stdout}"
    );
    assert!(
        stdout.contains("verdict: reproduced (1/1 runs)"),
        "{stdout}"
    );
    let run = &report["runs"][0];
    assert_eq!(report["expected"], "reproduced");
    let t = timeline(run);
    assert!(
        t.iter().any(|l| l == "agent: close-session 1 returned 0"),
        "{t:#?}"
    );
    let found: Vec<&str> = run["discrepancies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        found
            .iter()
            .any(|d| d.contains("session luo-vmm-s1 arrived")),
        "{found:?}"
    );
}
