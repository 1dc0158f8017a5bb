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
    scenario_runs(name, args, 1)
}

/// The same with `--runs N`.
fn scenario_runs(name: &str, args: &[&str], runs: u32) -> (Option<i32>, String, Value) {
    reference_image();
    let dir = std::env::temp_dir().join(format!("luo-scenario-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let (json_s, dir_s) = (json.to_str().unwrap(), dir.to_str().unwrap());
    let mut all = vec!["scenario", "run"];
    all.extend_from_slice(args);
    let runs = runs.to_string();
    all.extend_from_slice(&["--runs", &runs, "--json", json_s, "--log-dir", dir_s]);
    let out = luo_vmm(&all);
    let (stdout, _) = text(&out);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("no JSON report"))
            .expect("the JSON does not parse");
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code(), stdout, report)
}

/// Runs the shipped scenario `name` once on the reference kernel, which must reproduce
/// it (exit 0, `expected reproduced`, run 1 `reproduced`); returns the text output and the
/// JSON.
fn reproduced_on_reference(tag: &str, name: &str) -> (String, Value) {
    let (code, stdout, report) = scenario(tag, &[name]);
    assert!(stdout.contains("expected reproduced"), "{stdout}");
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(
        report["runs"][0]["judgement"]["verdict"], "reproduced",
        "{stdout}"
    );
    (stdout, report)
}

fn timeline(run: &Value) -> Vec<String> {
    run["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap().to_owned())
        .collect()
}

/// The schedule of a run: its timeline without times (nor the length of holds).
fn schedule(run: &Value) -> Vec<String> {
    timeline(run)
        .into_iter()
        .map(|l| match l.find(" after ") {
            // "released from X after 13.3 ms (hook Y)": the hold's length is host time.
            Some(i) if l.starts_with("released from") => {
                let tail = l.rfind(" (").map_or("", |j| &l[j..]);
                format!("{}{tail}", &l[..i])
            }
            _ => l,
        })
        .collect()
}

/// Runs 2 and 3 start from the snapshot run 1 took (and a second process from the
/// snapshot file): the same verdict and the same schedule as a run from boot; and bad
/// snapshots are refused before any guest runs.
#[test]
fn a_session_close_during_reboot_waits_for_the_kexec_on_the_reference_kernel() {
    let snap = std::env::temp_dir().join(format!("luo-snapshot-close-{}", std::process::id()));
    let snap_s = snap.to_str().unwrap();
    let (code, stdout, report) = scenario_runs(
        "ref",
        &["session-close-during-reboot", "--save-snapshot", snap_s],
        2,
    );
    assert_eq!(code, Some(0), "the runs did not give the expected verdict");
    assert!(
        stdout.contains("verdict: not reproduced (2/2 runs)"),
        "{stdout}"
    );
    assert!(stdout.contains("snapshot saved to "), "{stdout}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs[0]["from_snapshot"], false);
    assert_eq!(runs[1]["from_snapshot"], true);
    // The run from the snapshot lacks only the first boot's start_kernel (a breakpoint
    // hit before the snapshot).
    let mut first = schedule(&runs[0]);
    let boot = first
        .iter()
        .position(|l| l == "kernel: start_kernel")
        .expect("no first boot in run 1");
    first.remove(boot);
    assert_eq!(
        first,
        schedule(&runs[1]),
        "a run from the snapshot had another schedule"
    );
    let run = &runs[1];
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

    // Another process, from the file.
    let (code, stdout, report) = scenario(
        "from-file",
        &["session-close-during-reboot", "--from-snapshot", snap_s],
    );
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("verdict: not reproduced (1/1 runs)"),
        "{stdout}"
    );
    assert_eq!(report["runs"][0]["from_snapshot"], true);

    // Bad snapshots: one line each, before any guest runs.
    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["scenario", "run", "session-close-during-reboot"];
        all.extend_from_slice(args);
        let out = luo_vmm(&all);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stdout.contains("run 1/"), "a guest ran: {stdout}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("luo-vmm: error"))
            .collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(needle), "{}", errors[0]);
    };
    refused(
        &["--from-snapshot", snap_s, "--mem", "1G"],
        "was taken with --mem 512 MiB; this run has --mem 1024 MiB",
    );
    refused(
        &[
            "--from-snapshot",
            snap_s,
            "--variant",
            "luo-reboot-unlocked",
        ],
        "was taken with the guest image",
    );
    let mem = snap.join("memory.bin");
    let mut bytes = std::fs::read(&mem).unwrap();
    bytes[12345] ^= 0x40;
    std::fs::write(&mem, &bytes).unwrap();
    refused(
        &["--from-snapshot", snap_s],
        "memory.bin is corrupt: XXH3-128",
    );
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&mem, &bytes).unwrap();
    refused(&["--from-snapshot", snap_s], "truncated");
    let _ = std::fs::remove_dir_all(&snap);
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

/// The one shipped scenario the reference kernel itself reproduces: a memfd whose retrieve
/// fails part-way has its preserved folios freed (zeroed at once with `init_on_free=1`,
/// so written where the dirty log sees it), not leaked.
#[test]
fn a_failed_memfd_retrieve_frees_preserved_folios_on_the_reference_kernel() {
    let (stdout, report) =
        reproduced_on_reference("reuse", "memfd-retrieve-frees-preserved-folios");
    let run = &report["runs"][0];
    assert_eq!(
        run["judgement"]["because"],
        serde_json::json!(["preserved data written"]),
        "{stdout}"
    );
    // The retrieve failed where the hook made it fail, and only there.
    let t = timeline(run);
    assert!(
        t.iter()
            .any(|l| l.contains("shmem_add_to_page_cache returned -12")),
        "{t:?}"
    );
    assert!(
        t.iter()
            .any(|l| l.contains("retrieve-fd 0.0 failed: Cannot allocate memory")),
        "{t:?}"
    );
}

#[test]
fn a_failed_kho_init_frees_the_incoming_scratch_on_the_reference_kernel() {
    let (_, report) = reproduced_on_reference("scratch", "kho-init-error-frees-incoming-scratch");
    let run = &report["runs"][0];
    // The hook acted in the next kernel's boot (armed by the reboot), not in this one's.
    let t = timeline(run);
    assert!(
        t.iter().any(|l| l.contains("kho_debugfs_init returned -5")),
        "{t:?}"
    );
}

/// A hook no breakpoint could fire at (inside an instruction, past its function's end, on
/// data, where the interception itself breaks) is refused before a guest boots, by
/// `check` and by `run` alike, as `explore --points` refuses such a point.
#[test]
fn a_hook_that_could_never_fire_is_refused_before_a_boot() {
    reference_image();
    let builtin = include_str!("../scenarios/session-close-during-reboot.toml");
    let path = std::env::temp_dir().join(format!("bad-hook-{}.toml", std::process::id()));
    for (at, vcpu, why) in [
        (
            "luo_flb_serialize+0x3",
            0,
            "offset 0x3 of luo_flb_serialize: not an instruction boundary",
        ),
        ("luo_flb_serialize+0x100000", 0, "past its end"),
        ("luo_global", 0, "is not a function of the kernel"),
        (
            "liveupdate_reboot",
            0,
            "where the interception itself breaks",
        ),
        // The interception breaks there on the other vCPUs too (a reboot from CPU 1).
        ("machine_kexec", 1, "where the interception itself breaks"),
    ] {
        let mine = builtin.replace(
            "at = \"luo_flb_serialize\"\nvcpu = 0",
            &format!("at = \"{at}\"\nvcpu = {vcpu}"),
        );
        assert_ne!(mine, builtin);
        std::fs::write(&path, mine).unwrap();
        for cmd in ["check", "run"] {
            let o = luo_vmm(&["scenario", cmd, path.to_str().unwrap()]);
            let (stdout, stderr) = text(&o);
            assert_eq!(o.status.code(), Some(1), "{cmd} {at}: {stdout}\n{stderr}");
            assert!(
                stderr.contains(&format!("hook serialized: {at}")) && stderr.contains(why),
                "{cmd} {at}: {stderr}"
            );
            assert!(
                !stderr.contains("guest agent up") && !stdout.contains("run 1"),
                "{cmd} {at}: a guest booted: {stdout}\n{stderr}"
            );
        }
    }
    let _ = std::fs::remove_file(&path);
}
