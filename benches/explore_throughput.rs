//! Trials per hour of `luo-vmm explore` against full `luo-vmm scenario run` runs per hour,
//! for the same schedules, side by side in one process (docs/benchmarks.md, "Explore").
//!
//! 1. `explore --variant luo-reboot-unlocked --mode race --stage 1 --points <luo_flb_serialize>`:
//!    one boot (the baseline, which keeps the snapshot), one map trial, 20 search trials
//!    (10 racing calls × 2 release policies), each from the snapshot to point-of-no-return.
//! 2. `scenario run <the close-session finding that search wrote> --no-snapshot --runs 2`:
//!    the same schedule as one of those trials, run as a scenario is without explore (every
//!    run boots and goes through the next kernel's stage 2).
//!
//! Prints trials/hour (the boot included, and the trials alone), the time per trial split
//! into reset, run to the decision and judging, runs/hour of the scenario, and the ratios.
//! On an instruction-emulating KVM: about 10 minutes.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

fn luo_vmm(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_luo-vmm"))
        .args(args)
        .output()
        .expect("cannot start luo-vmm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() && out.status.code() != Some(6) {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success() || out.status.code() == Some(6), stdout)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("luo-explore-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let points = dir.join("points");
    std::fs::write(&points, "luo_flb_serialize\n").expect("points file");
    let out = dir.join("out");
    let t = Instant::now();
    let (ok, _) = luo_vmm(&[
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
    ]);
    let explore_s = t.elapsed().as_secs_f64();
    assert!(ok, "explore failed");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    let totals = &report["totals"];
    let trials = totals["map"].as_f64().unwrap_or(0.0) + totals["search"].as_f64().unwrap_or(0.0);
    let mean = &totals["mean"];
    let (reset, run, judge) = (
        mean["reset_ms"].as_f64().unwrap_or(0.0),
        mean["run_ms"].as_f64().unwrap_or(0.0),
        mean["judge_ms"].as_f64().unwrap_or(0.0),
    );
    let per_trial_s = (reset + run + judge) / 1e3;
    let with_boot = trials * 3600.0 / explore_s;
    let steady = 3600.0 / per_trial_s.max(1e-9);
    println!(
        "explore: {trials:.0} trials (baseline and map included) in {explore_s:.1} s: {with_boot:.0} trials/hour with the boot, {steady:.0} trials/hour from the snapshot"
    );
    println!(
        "  per trial (mean): reset {reset:.2} ms, run to the decision {run:.0} ms, judging {judge:.2} ms"
    );

    // The same schedule as a scenario: the close-session finding.
    let finding = report["findings"]
        .as_array()
        .and_then(|f| {
            f.iter()
                .find(|f| f["signature"]["cause"] == "close-session")
        })
        .and_then(|f| f["scenario"].as_str())
        .map(|s| out.join(s));
    let Some(file) = finding.filter(|f| Path::new(f).is_file()) else {
        eprintln!("explore_throughput: no close-session finding to run as a scenario");
        return;
    };
    let logs = dir.join("logs");
    let runs = 2.0;
    let t = Instant::now();
    let (ok, stdout) = luo_vmm(&[
        "scenario",
        "run",
        file.to_str().unwrap(),
        "--variant",
        "luo-reboot-unlocked",
        "--no-snapshot",
        "--runs",
        "2",
        "--log-dir",
        logs.to_str().unwrap(),
    ]);
    let scenario_s = t.elapsed().as_secs_f64();
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("verdict:"))
        .unwrap_or("no verdict");
    println!(
        "scenario run {} --no-snapshot --runs 2: {scenario_s:.1} s ({verdict}): {:.0} runs/hour",
        file.file_name().unwrap().to_string_lossy(),
        runs * 3600.0 / scenario_s
    );
    if !ok {
        eprintln!("explore_throughput: the scenario run failed");
    }
    let per_run = scenario_s / runs;
    println!(
        "explore/scenario: {:.0}x (trials from the snapshot), {:.0}x (the boot included)",
        steady / (3600.0 / per_run),
        with_boot / (3600.0 / per_run)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
