//! `luo-vmm explore merge DIR...`: reads every shard's result directory, merges them
//! ([`crate::explore::merge`]), prints the report, and writes it to `--out` as text, JSON
//! and an HTML page, with the findings' scenario files copied in and renumbered as one
//! process would. No guest runs.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::commands::explore::EXIT_FINDINGS;
use crate::config::options::MergeArgs;
use crate::explore::merge::{html, load_shard, merge, text, MergeError, EXIT_INCOMPLETE};
use crate::explore::store::{check_json_out, check_out, write_atomic, StoreError};

/// Errors of `luo-vmm explore merge`.
#[derive(Debug, Error)]
pub enum MergeCommandError {
    /// The shards cannot be merged.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// `--out` is a shard's directory, or cannot be written.
    #[error("explore merge: --out {}: {why}", path.display())]
    Out {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Writing a report file.
    #[error(transparent)]
    Write(#[from] StoreError),
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `luo-vmm explore merge`: exit 0 when complete without findings, 6 with findings, 7
/// when a shard is missing or incomplete.
pub fn run(args: &MergeArgs) -> Result<u8, MergeCommandError> {
    let out_err = |why: String| MergeCommandError::Out {
        path: args.out.clone(),
        why,
    };
    // `--out` must not be (or hold) an exploration: the merge would write over a shard.
    if args.out.join("manifest.json").exists() || args.dirs.iter().any(|d| same_dir(d, &args.out)) {
        return Err(out_err(
            "holds an exploration (a shard's --out); give the merge a directory of its own".into(),
        ));
    }
    // Both outputs checked before anything is read or written.
    check_out(&args.out).map_err(|e| match e {
        StoreError::Out { why, .. } => out_err(why),
        e => MergeCommandError::Write(e),
    })?;
    if let Some(json) = &args.json {
        check_json_out(json)?;
    }
    let inputs = args
        .dirs
        .iter()
        .map(|d| load_shard(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut merged = merge(&inputs)?;
    // The confirmation of each finding, and the trial it confirmed (the representative
    // the scenario file was written from), as the shard whose file is copied wrote them in
    // its report (or else the first shard that has one).
    // Each shard's report, read once (absent or unreadable: `Null`).
    let reports: std::collections::BTreeMap<String, serde_json::Value> = merged
        .findings
        .iter()
        .flat_map(|f| &f.shards)
        .map(|dir| {
            let report = std::fs::read_to_string(Path::new(dir).join("report.json"))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default();
            (dir.clone(), report)
        })
        .collect();
    for f in &mut merged.findings {
        let sig = serde_json::to_value(&f.finding.signature).ok();
        let in_report = |dir: &String| -> Option<serde_json::Value> {
            reports.get(dir)?["findings"]
                .as_array()?
                .iter()
                .find(|g| Some(&g["signature"]) == sig.as_ref())
                .cloned()
        };
        let source = f
            .shards
            .iter()
            .filter(|d| f.source.starts_with(&format!("{d}/")));
        if let Some(g) = source.chain(&f.shards).find_map(in_report) {
            f.finding.confirmed = g["confirmed"].as_str().map(str::to_owned);
            if let Some(first) = g["first"].as_str() {
                f.finding.first = first.to_owned();
            }
        }
    }
    let findings_dir = args.out.join("findings");
    std::fs::create_dir_all(&findings_dir).map_err(|e| out_err(e.to_string()))?;
    // A merge's findings are this merge's only: files of an earlier merge into --out go.
    if let Ok(entries) = std::fs::read_dir(&findings_dir) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut report = text(&merged);
    for f in &merged.findings {
        let to = args.out.join(&f.finding.scenario);
        match std::fs::read(&f.source) {
            Ok(bytes) => write_atomic(&to, &bytes)?,
            Err(e) => report.push_str(&format!(
                "  #{}: no scenario file to copy ({}: {e}); the shard stopped before writing it\n",
                f.finding.number, f.source
            )),
        }
    }
    let json = serde_json::to_string_pretty(&merged).map_err(|e| out_err(e.to_string()))?;
    write_atomic(&args.out.join("report.txt"), report.as_bytes())?;
    write_atomic(&args.out.join("report.json"), json.as_bytes())?;
    write_atomic(&args.out.join("report.html"), html(&merged).as_bytes())?;
    if let Some(path) = &args.json {
        write_atomic(path, json.as_bytes())?;
    }
    // The files are written first; standard output closed early (`| head`) is not an
    // error, and no panic.
    let mut stdout = std::io::stdout().lock();
    let _ = write!(stdout, "{report}").and_then(|()| {
        writeln!(
            stdout,
            "merged report: {} (and report.json, report.html, findings/)",
            args.out.join("report.txt").display()
        )
    });
    Ok(if !merged.complete {
        EXIT_INCOMPLETE
    } else if merged.findings.is_empty() {
        0
    } else {
        EXIT_FINDINGS
    })
}
