//! `luo-vmm explore` on real guests: bad input refused before any guest boots, and a
//! small search (one hold point, every racing call, both release policies) on the variant
//! that reverts the reboot lock, interrupted after its map and resumed, which must find
//! the close, create and preserve races with nothing but the kernel and the default
//! workload, and write scenario files that `scenario check` accepts.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{luo_vmm, reference_image, text};
use serde_json::Value;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("luo-explore-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `luo-vmm explore ARGS` must fail with one `luo-vmm: error` line naming `what`, and
/// boot nothing.
fn refused(args: &[&str], what: &str) {
    let mut all = vec!["explore"];
    all.extend_from_slice(args);
    let out = luo_vmm(&all);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(stderr.contains(what), "{args:?}: {stderr}");
    assert!(
        !stderr.contains("guest agent up") && !stdout.contains("booted"),
        "{args:?} booted a guest"
    );
}

#[test]
fn bad_input_is_refused_before_a_guest_boots() {
    reference_image();
    let dir = tmp("refused");
    std::fs::create_dir_all(&dir).unwrap();
    let points = dir.join("points");
    std::fs::write(&points, "luo_flb_serialize\nno_such_function_anywhere\n").unwrap();
    let out = dir.join("out");
    let out_s = out.to_str().unwrap();
    refused(
        &["--points", points.to_str().unwrap(), "--out", out_s],
        "unknown point \"no_such_function_anywhere\"",
    );
    // A lock site's offset must be an instruction boundary of the function, inside it
    // (the reference kernel has IBT: its functions start with the 4-byte endbr64).
    std::fs::write(&points, "luo_flb_serialize+0x1b\nluo_flb_serialize+0x1\n").unwrap();
    refused(
        &["--points", points.to_str().unwrap(), "--out", out_s],
        "luo_flb_serialize+0x1: offset 0x1 of luo_flb_serialize: not an instruction boundary",
    );
    std::fs::write(&points, "luo_flb_serialize+0x100000\n").unwrap();
    refused(
        &["--points", points.to_str().unwrap(), "--out", out_s],
        "past its end",
    );
    // Data is no hold point (LUO's global state, in .bss).
    std::fs::write(&points, "luo_global\n").unwrap();
    refused(
        &["--points", points.to_str().unwrap(), "--out", out_s],
        "luo_global is not a function of the kernel",
    );
    // No `__init` function among the points: nothing to fail in the next kernel's boot.
    std::fs::write(&points, "luo_session_serialize\n").unwrap();
    refused(
        &[
            "--stage",
            "boot",
            "--mode",
            "fail",
            "--points",
            points.to_str().unwrap(),
            "--out",
            out_s,
        ],
        "--stage boot: none of the 1 points is an `__init` function",
    );
    // A variant and a source tree are two kernels.
    let o = luo_vmm(&[
        "explore",
        "--variant",
        "debug",
        "--source",
        "/tmp",
        "--out",
        out_s,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o).1);
    // Only fail mode searches the next kernel's boot.
    refused(
        &["--stage", "boot", "--mode", "race", "--out", out_s],
        "--stage boot: only fail mode",
    );
    let workload = dir.join("workload.toml");
    std::fs::write(
        &workload,
        r#"name = "no-reboot"
summary = "never reboots"
[stage1]
threads = [{ cpu = 0, steps = ["create 0", "memfd 0.0 64K", "preserve 0.0"] }]
"#,
    )
    .unwrap();
    refused(
        &["--workload", workload.to_str().unwrap(), "--out", out_s],
        "never reaches the action under test",
    );
    refused(&["--budget", "0", "--out", out_s], "--budget");
    refused(&["--vcpus", "1", "--out", out_s], "--vcpus");
    refused(&["--out", "/proc/luo-vmm-explore"], "/proc/luo-vmm-explore");
    refused(
        &["--resume", "--out", out_s],
        "no exploration to go on with",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `luo-vmm explore ARGS --points FILE --out DIR` on the reference kernel, `points` in
/// FILE, in a fresh directory named `name`: the run, that directory and its `--out`.
fn explore_at(name: &str, points: &str, args: &[&str]) -> (Output, PathBuf, PathBuf) {
    reference_image();
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("points");
    std::fs::write(&file, points).unwrap();
    let out = dir.join("out");
    let mut all = vec!["explore"];
    all.extend_from_slice(args);
    all.extend([
        "--points",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    (luo_vmm(&all), dir, out)
}

/// The ids of `dir`'s trials.jsonl.
fn trial_ids(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("trials.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn a_blind_search_finds_the_reboot_races_and_resumes() {
    reference_image();
    let dir = tmp("races");
    std::fs::create_dir_all(&dir).unwrap();
    // One hold point after serialization; every racing call of the default workload.
    let points = dir.join("points");
    std::fs::write(
        &points,
        "# after luo_session_serialize()\nluo_flb_serialize\n",
    )
    .unwrap();
    let out = dir.join("out");
    let json = dir.join("report.json");
    let base = [
        "explore",
        "--variant",
        "luo-reboot-unlocked",
        "--mode",
        "race",
        "--stage",
        "1",
        "--points",
        points.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    // Interrupted: the time is up before the first search trial.
    let mut first = base.to_vec();
    first.extend_from_slice(&["--time", "1s"]);
    let o = luo_vmm(&first);
    let (stdout, _) = text(&o);
    assert!(stdout.contains("--time reached"), "{stdout}");
    let mapped = trial_ids(&out);
    // The point alone: it returns nothing, so no map of what each call reaches with it on
    // CPU 1 (those are of the fallible functions).
    assert_eq!(mapped, ["baseline", "map:luo_flb_serialize"], "{stdout}");
    // Resumed: the map is not run again, every search trial runs once.
    let mut second = base.to_vec();
    second.push("--resume");
    let o = luo_vmm(&second);
    let (stdout, stderr) = text(&o);
    assert!(stdout.contains("resumed: 2 trials done"), "{stdout}");
    assert!(!stdout.contains(" map]"), "the map ran again: {stdout}");
    assert_eq!(
        o.status.code(),
        Some(6),
        "findings: exit 6\n{stdout}\n{stderr}"
    );
    let ids = trial_ids(&out);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "a trial ran twice: {ids:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // No call reaches luo_flb_serialize on CPU 1: no holds there.
    assert_eq!(report["totals"]["search"], 20, "10 calls × 2 releases");
    assert_eq!(report["complete"], true);
    let findings = report["findings"].as_array().unwrap();
    let causes: BTreeSet<&str> = findings
        .iter()
        .filter(|f| f["signature"]["oracle"] == "records-differ")
        .map(|f| f["signature"]["cause"].as_str().unwrap())
        .collect();
    for want in ["close-session", "create-session", "preserve-fd"] {
        assert!(causes.contains(want), "no {want} race found: {findings:?}");
    }
    // Resumed once more, complete: no guest boots, no confirmation runs again, the same
    // findings.
    let o = luo_vmm(&second);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(6), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("booted"),
        "a complete exploration booted: {stdout}"
    );
    assert_eq!(
        stdout.matches("again from the snapshot").count(),
        stdout.matches("(confirmed by an earlier run)").count(),
        "a confirmation ran again: {stdout}"
    );
    assert_eq!(trial_ids(&out), ids, "{stdout}");
    let again: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(again["findings"], report["findings"]);
    // Every finding is a scenario file `scenario` accepts, on the variant it was found on.
    for f in findings {
        let file = out.join(f["scenario"].as_str().unwrap());
        // Its summary names the racing call first, then the hold.
        let toml = std::fs::read_to_string(&file).unwrap();
        let cause = f["signature"]["cause"].as_str().unwrap();
        assert!(
            toml.contains(&format!("summary = \"{cause} "))
                && toml.contains(" on CPU 1 while CPU 0 is held at luo_flb_serialize (released "),
            "{}: {toml}",
            file.display()
        );
        let o = luo_vmm(&[
            "scenario",
            "check",
            file.to_str().unwrap(),
            "--variant",
            "luo-reboot-unlocked",
        ]);
        assert!(o.status.success(), "{}: {}", file.display(), text(&o).1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stage_2_is_searched_from_a_snapshot_in_the_next_kernel() {
    let (o, dir, out) = explore_at(
        "stage2",
        "luo_session_retrieve\nmemfd_luo_retrieve\nluo_session_deserialize\n",
        &["--stage", "2", "--mode", "fail"],
    );
    let (stdout, stderr) = text(&o);
    // The reference kernel: a failed retrieve is an error returned, nothing worse.
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("kept stage 2's snapshot"), "{stdout}");
    let ids = trial_ids(&out);
    assert_eq!(
        ids[0], "baseline2",
        "stage 2 only: no stage-1 boot: {ids:?}"
    );
    assert!(
        ids.iter().any(|i| i == "map2:memfd_luo_retrieve"),
        "{ids:?}"
    );
    // The retrieves run twice in stage 2 (two sessions, one file each): a trial per call.
    // Deserialization runs once, at the first open of /dev/liveupdate, which the agent
    // makes after the snapshot: every trial from it deserializes again.
    let fails: Vec<&String> = ids.iter().filter(|i| i.starts_with("fail2:")).collect();
    assert_eq!(fails.len(), 5, "{ids:?}");
    assert!(
        fails
            .iter()
            .any(|i| *i == "fail2:luo_session_deserialize:1"),
        "{ids:?}"
    );
    // "Leak, never reuse" watched each of them: a failed restore handed nothing back.
    let trials = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    for line in trials.lines().filter(|l| l.contains("\"fail2:")) {
        assert!(line.contains("preserved data not reused"), "{line}");
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["totals"]["findings"], 0, "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cpu_1_is_held_inside_its_call_while_cpu_0_reboots() {
    let (o, dir, out) = explore_at(
        "racer",
        "luo_preserve_file\n",
        &["--stage", "1", "--mode", "race"],
    );
    let (stdout, stderr) = text(&o);
    // The reference kernel: the reboot waits for the preserve CPU 1 is held in (the
    // session's lock), which lands in the records; its return may be lost to the kexec.
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    let ids = trial_ids(&out);
    // The reboot does not call luo_preserve_file: no hold on CPU 0; preserve-fd 0.1
    // reaches it on CPU 1: a hold there under both releases.
    let racer: BTreeSet<&str> = ids
        .iter()
        .filter(|i| i.starts_with("race"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        racer,
        BTreeSet::from([
            "race-cpu1:luo_preserve_file:preserve-fd-0.1:after-2000ms",
            "race-cpu1:luo_preserve_file:preserve-fd-0.1:settled",
        ]),
        "{ids:?}"
    );
    let trials = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    for line in trials.lines().filter(|l| l.contains("race-cpu1:")) {
        assert!(line.contains("records match"), "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_next_kernel_s_boot_is_searched_through_the_kexec() {
    let (o, dir, out) = explore_at(
        "boot",
        "luo_session_setup_incoming\nkho_init\n",
        &["--stage", "boot", "--mode", "fail"],
    );
    let (stdout, stderr) = text(&o);
    // The reference kernel: a failed boot restore panics on purpose (luo_restore_fail)
    // or leaves stage 2's retrieves failing, and hands no preserved page back.
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    let ids: BTreeSet<String> = trial_ids(&out).into_iter().collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            "baseline-boot".to_owned(),
            "fail-boot:kho_init:1".to_owned(),
            "fail-boot:luo_session_setup_incoming:1".to_owned(),
        ]),
        "no map: each boot function fails once, through the kexec"
    );
    let trials = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    let line = |id: &str| {
        trials
            .lines()
            .find(|l| l.contains(&format!("\"id\":\"{id}\"")))
            .unwrap_or_else(|| panic!("no {id}: {trials}"))
            .to_owned()
    };
    assert!(
        line("fail-boot:luo_session_setup_incoming:1").contains("as LUO means to"),
        "{trials}"
    );
    let kho = line("fail-boot:kho_init:1");
    assert!(kho.contains("restore(s) failed"), "{kho}");
    assert!(kho.contains("preserved data not reused"), "{kho}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C during the search: the trial in progress comes to its decision and is recorded,
/// the report says the exploration is incomplete and how to go on, and the exit status is
/// 130; a second Ctrl-C is not needed.
#[test]
fn ctrl_c_ends_the_search_with_a_report() {
    use std::io::BufRead as _;
    reference_image();
    let dir = tmp("ctrl-c");
    std::fs::create_dir_all(&dir).unwrap();
    let points = dir.join("points");
    std::fs::write(&points, "luo_flb_serialize\n").unwrap();
    let out = dir.join("out");
    let mut child = std::process::Command::new(common::LUO_VMM)
        .args(["explore", "--mode", "race", "--stage", "1", "--points"])
        .arg(&points)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut stdout = String::new();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        stdout.push_str(&line);
        stdout.push('\n');
        if line.starts_with("[   1/20   search]") {
            let sent = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
            break;
        }
    }
    for line in lines {
        stdout.push_str(&line.unwrap());
        stdout.push('\n');
    }
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    eprintln!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert_eq!(status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("luo-vmm: interrupted: the trial in progress goes on"),
        "{stderr}"
    );
    assert!(stdout.contains("incomplete (interrupted): "), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["complete"], false);
    // Every trial that began is recorded: the one running at the signal too, at most one
    // more than the progress lines showed before it.
    let ids = trial_ids(&out);
    let search = ids.iter().filter(|i| i.starts_with("race:")).count();
    assert!((1..=3).contains(&search), "{ids:?}");
    assert_eq!(
        report["totals"]["search"].as_u64(),
        Some(search as u64),
        "{ids:?}"
    );
    assert!(std::fs::read_to_string(out.join("report.txt"))
        .unwrap()
        .contains("--resume goes on"));
    let _ = std::fs::remove_dir_all(&dir);
}
