//! `luo-vmm explore merge`: one report from the results of the shards of a campaign
//! (`explore --shard I/N --out DIR`, one DIR per shard, docs/explore.md "Campaigns").
//!
//! A shard's result is its `--out` directory: `manifest.json` (what is explored, written
//! atomically before any guest boots), `plan.json` (the ids of the search trials the shard
//! makes, written atomically before its search starts) and `trials.jsonl` (one record per
//! finished trial, appended and synced; a torn last line is dropped). From these, and
//! nothing else, this module decides:
//!
//! - whether the shards belong together: their manifests must be equal but for `shard`
//!   (else the merge is refused with one line naming the field), their shard counts equal,
//!   no shard given twice, and their plans must come from one search list (the list's
//!   digest, [`crate::explore::store::list_digest`]);
//! - what is missing: a shard index without a directory, a directory without a manifest
//!   (never started), without a plan (stopped before its search), with a damaged trials
//!   file, or whose plan's trials are not all in its trials file (`incomplete: k of m
//!   trials`); each is named, and the merge is then incomplete;
//! - the merged records: the baseline and the map once (from the lowest shard that has
//!   them: every shard boots and maps itself), then the search trials in the order of the
//!   one search list (shard I's j-th planned trial is trial I + j·N of the list), so that
//!   the findings, grouped by signature with [`group`], are numbered as one process would;
//! - totals, trials per machine-hour, each shard's part of the space.
//!
//! Loading reads files; [`merge`] and the renderings ([`text`], [`html`]) are pure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::config::options::Shard;
use crate::explore::findings::{group, plot, table, totals, Finding, Totals};
use crate::explore::space::Trial;
use crate::explore::store::{read_trials, Manifest, Plan, TrialRecord, FORMAT, VERSION};
use crate::judge::explore::{Signature, TrialVerdict};

/// Exit status of `explore merge` when a shard is missing or incomplete (whatever was
/// found); 6 ([`crate::commands::explore::EXIT_FINDINGS`]) when complete with findings.
pub const EXIT_INCOMPLETE: u8 = 7;

/// Largest `manifest.json` or `plan.json` read (a plan of a million trial ids is ~60 MB).
const MAX_JSON: u64 = 256 << 20;

/// Errors of `explore merge`: the shards cannot be merged at all.
#[derive(Debug, Error)]
pub enum MergeError {
    /// No directory given, or none holds a manifest.
    #[error("explore merge: {0}")]
    Nothing(String),
    /// A manifest or plan that cannot be read or parsed.
    #[error("explore merge: {path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Two shards of different explorations, or the same shard twice.
    #[error("explore merge: {0}")]
    Mismatch(String),
}

/// One shard's results as read from its directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInput {
    /// The directory, as given.
    pub dir: String,
    /// Its manifest; `None` when it has none (the shard never started).
    pub manifest: Option<Manifest>,
    /// Its plan; `None` when it has none (stopped before its search).
    pub plan: Option<Plan>,
    /// Its finished trials, or why its trials file could not be read.
    pub records: Result<Vec<TrialRecord>, String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, MergeError> {
    let err = |why: String| MergeError::Read {
        path: path.to_owned(),
        why,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    if !meta.is_file() || meta.len() > MAX_JSON {
        return Err(err(format!(
            "not a regular file of at most {MAX_JSON} bytes"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

/// Reads the shard result in `dir`. A directory that does not exist or has no
/// `manifest.json` gives a shard without a manifest; a manifest or plan that does not
/// parse is an error (a file of something else, refused); a damaged `trials.jsonl` is
/// kept as the reason in `records`.
pub fn load_shard(dir: &Path) -> Result<ShardInput, MergeError> {
    let name = dir.display().to_string();
    // Missing is a shard that never started; something else there is no shard.
    if dir.exists() && !dir.is_dir() {
        return Err(MergeError::Read {
            path: dir.to_owned(),
            why: "not a directory (a shard's --out)".into(),
        });
    }
    let manifest: Option<Manifest> = read_json(&dir.join("manifest.json"))?;
    let plan: Option<Plan> = read_json(&dir.join("plan.json"))?;
    let tpath = dir.join("trials.jsonl");
    let records = if manifest.is_none() || !tpath.exists() {
        Ok(Vec::new())
    } else {
        read_trials(&tpath).map_err(|e| e.to_string())
    };
    Ok(ShardInput {
        dir: name,
        manifest,
        plan,
        records,
    })
}

/// How a shard's result stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ShardState {
    /// Every trial of its plan is in its trials file.
    Complete,
    /// Some are not.
    Incomplete {
        /// Planned trials done.
        done: usize,
        /// Planned trials.
        planned: usize,
    },
    /// No plan: stopped while booting or mapping the workload (or still there).
    NoPlan,
    /// The directory has no manifest: the shard never started.
    NoManifest,
    /// No directory was given for this shard index.
    Missing,
    /// Its trials file is damaged (not merged).
    Damaged {
        /// Why.
        why: String,
    },
    /// Its plan comes from another search list than the first shard's (its map of the
    /// workload differs), so the shards do not partition one list.
    OtherList {
        /// The first map trial whose reach differs, if one does.
        why: String,
    },
}

impl ShardState {
    fn ok(&self) -> bool {
        matches!(self, ShardState::Complete)
    }
}

impl std::fmt::Display for ShardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardState::Complete => f.write_str("complete"),
            ShardState::Incomplete { done, planned } => {
                write!(f, "incomplete: {done} of {planned} trials")
            }
            ShardState::NoPlan => f.write_str(
                "incomplete: no plan.json (stopped before its search: while booting or mapping the workload)",
            ),
            ShardState::NoManifest => {
                f.write_str("no manifest.json (the shard never started here)")
            }
            ShardState::Missing => f.write_str("no result given for it"),
            ShardState::Damaged { why } => write!(f, "damaged: {why} (not merged)"),
            ShardState::OtherList { why } => write!(
                f,
                "another search list than the first shard's ({why}): the shards do not partition one list"
            ),
        }
    }
}

/// One shard in the merged report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardSummary {
    /// Its directory (`-` for a missing index).
    pub dir: String,
    /// `I/N`, or `-` for a directory without a manifest, `unsharded` for a run without `--shard`.
    pub shard: String,
    /// How it stands.
    pub state: ShardState,
    /// Its part of the space, in words.
    pub covers: String,
    /// Search trials planned.
    pub planned: usize,
    /// Search trials of its plan done.
    pub done: usize,
    /// Its map and baseline trials.
    pub map: usize,
    /// Its trials that gave a finding.
    pub findings: usize,
    /// Its undecided trials.
    pub undecided: usize,
    /// Its exploring time, in s.
    pub seconds: f64,
    /// Its trials (map and search) per hour.
    pub trials_per_hour: f64,
}

/// A finding of the merged report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergedFinding {
    /// Numbered and named as in one process; `scenario` is its file in the merge's
    /// `--out`.
    #[serde(flatten)]
    pub finding: Finding,
    /// The shards whose trials gave it (their directories).
    pub shards: Vec<String>,
    /// The scenario file the first shard wrote for it (`DIR/findings/NN-....toml`).
    pub source: String,
    /// Its first trial's console log, in that shard's directory.
    pub source_log: Option<String>,
}

/// What the merged trials cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Search trials in the whole space.
    pub space: usize,
    /// Search trials the campaign plans (within the budget, every shard).
    pub planned: usize,
    /// Of those, done.
    pub done: usize,
    /// The ids of the search trials done, in the search list's order.
    pub trials: Vec<String>,
}

/// The merged report (`report.json` of `explore merge --out`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Merged {
    /// The campaign's manifest (the first shard's, `shard` cleared).
    pub manifest: Manifest,
    /// Shards: N.
    pub shards_of: u32,
    /// Every shard index, and every directory given that was not a shard.
    pub shards: Vec<ShardSummary>,
    /// One line per shard that is not complete.
    pub missing: Vec<String>,
    /// Whether every shard is complete.
    pub complete: bool,
    /// What the merged trials cover.
    pub coverage: Coverage,
    /// Totals of the merged trials; `seconds` is the shards' exploring time added up, and
    /// `trials_per_hour` every trial any shard ran per such hour.
    pub totals: Totals,
    /// Findings, deduplicated by signature across shards.
    pub findings: Vec<MergedFinding>,
    /// The merged records, in one process's order (not serialized).
    #[serde(skip)]
    pub records: Vec<TrialRecord>,
    /// Every record of every shard, by exploring time (for the plot; not serialized).
    #[serde(skip)]
    pub timeline: Vec<TrialRecord>,
}

fn shard_of(m: &Manifest) -> Shard {
    m.shard.unwrap_or(Shard { index: 0, count: 1 })
}

/// `I/N`, or `unsharded`.
fn shard_name(m: &Manifest) -> String {
    m.shard.map_or("unsharded".into(), |s| s.to_string())
}

fn is_map(r: &TrialRecord) -> bool {
    matches!(
        r.trial,
        Trial::Map { .. } | Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot
    )
}

/// The first map trial whose reach differs between `a` and `b`, in words.
fn map_difference(a: &[TrialRecord], b: &[TrialRecord]) -> Option<String> {
    let hits = |rs: &[TrialRecord]| -> BTreeMap<String, Vec<u32>> {
        rs.iter()
            .filter_map(|r| match (&r.trial, &r.hits) {
                (Trial::Map { .. }, Some(h)) => Some((r.id.clone(), h.clone())),
                _ => None,
            })
            .collect()
    };
    let (ha, hb) = (hits(a), hits(b));
    ha.iter().find_map(|(f, va)| {
        let vb = hb.get(f)?;
        (va != vb).then(|| format!("{f} ran {va:?} times per vCPU there, {vb:?} here"))
    })
}

/// Merges `inputs` (one per directory given). Refused (an error naming the first
/// mismatch) when two manifests differ but for `shard`, the shard counts differ, a
/// shard is given twice, or no input has a manifest. Missing and incomplete shards are
/// named in the result, never merged silently.
pub fn merge(inputs: &[ShardInput]) -> Result<Merged, MergeError> {
    if inputs.is_empty() {
        return Err(MergeError::Nothing(
            "no shard directory given (explore merge DIR...)".into(),
        ));
    }
    let with: Vec<&ShardInput> = inputs.iter().filter(|s| s.manifest.is_some()).collect();
    let Some((first, base)) = with.iter().find_map(|s| Some((*s, s.manifest.clone()?))) else {
        return Err(MergeError::Nothing(format!(
            "none of {} holds an exploration (no manifest.json)",
            inputs
                .iter()
                .map(|s| s.dir.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    // Every manifest: one format, one exploration, one shard count, each index once.
    let mut by_index: BTreeMap<u32, &ShardInput> = BTreeMap::new();
    for s in &with {
        let Some(m) = &s.manifest else { continue };
        if m.format != FORMAT || m.version != VERSION {
            return Err(MergeError::Mismatch(format!(
                "{}: a {} v{} manifest; this luo-vmm reads {FORMAT} v{VERSION}",
                s.dir, m.format, m.version
            )));
        }
        if let Some((field, va, vb)) = base.difference(m, &["shard"]) {
            return Err(MergeError::Mismatch(format!(
                "{} and {} are not shards of one exploration: {field} is {va} in the first, {vb} in the second",
                first.dir, s.dir
            )));
        }
        let (a, b) = (shard_of(&base), shard_of(m));
        if a.count != b.count {
            return Err(MergeError::Mismatch(format!(
                "{} and {} are shards of different splits: {} and {}",
                first.dir,
                s.dir,
                shard_name(&base),
                shard_name(m)
            )));
        }
        if let Some(other) = by_index.insert(b.index, s) {
            return Err(MergeError::Mismatch(match m.shard {
                Some(_) => format!("shard {b} given twice: {} and {}", other.dir, s.dir),
                None => format!(
                    "one unsharded exploration given twice: {} and {}",
                    other.dir, s.dir
                ),
            }));
        }
    }
    let n = shard_of(&base).count;
    let list = by_index
        .values()
        .find_map(|s| s.plan.as_ref().and_then(|p| p.list.clone()));
    let list_owner = by_index
        .values()
        .find(|s| s.plan.as_ref().and_then(|p| p.list.as_ref()) == list.as_ref())
        .copied();

    // Each shard's state and records.
    let mut shards = Vec::new();
    let mut missing = Vec::new();
    let mut merged: Vec<TrialRecord> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut search: Vec<(usize, usize, TrialRecord)> = Vec::new();
    let mut timeline: Vec<TrialRecord> = Vec::new();
    let space = by_index
        .values()
        .filter_map(|s| s.plan.as_ref().map(|p| p.space))
        .max()
        .unwrap_or(0);
    let planned_total = base.budget.map_or(space, |b| {
        usize::try_from(b).unwrap_or(usize::MAX).min(space)
    });
    let mut machine_s = 0.0f64;
    let mut all_trials = 0usize;
    let mut found_in: BTreeMap<Signature, Vec<String>> = BTreeMap::new();
    for index in 0..n {
        let Some(s) = by_index.get(&index) else {
            let line = format!("shard {index}/{n}: {}", ShardState::Missing);
            missing.push(line);
            shards.push(ShardSummary {
                dir: "-".into(),
                shard: format!("{index}/{n}"),
                state: ShardState::Missing,
                covers: covers(index, n, &base, space),
                planned: 0,
                done: 0,
                map: 0,
                findings: 0,
                undecided: 0,
                seconds: 0.0,
                trials_per_hour: 0.0,
            });
            continue;
        };
        let records = match &s.records {
            Ok(r) => r.as_slice(),
            Err(_) => &[],
        };
        let ids: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let (planned, done) = s.plan.as_ref().map_or((0, 0), |p| {
            (
                p.trials.len(),
                p.trials.iter().filter(|t| ids.contains(t.as_str())).count(),
            )
        });
        let state = match (&s.records, &s.plan) {
            (Err(why), _) => ShardState::Damaged { why: why.clone() },
            (_, None) => ShardState::NoPlan,
            (_, Some(p)) if list.is_some() && p.list != list => ShardState::OtherList {
                why: list_owner
                    .and_then(|o| map_difference(o.records.as_deref().unwrap_or(&[]), records))
                    .map_or_else(
                        || "the same map, another list".to_owned(),
                        |d| format!("its map differs: {d}"),
                    ),
            },
            _ if done < planned => ShardState::Incomplete { done, planned },
            _ => ShardState::Complete,
        };
        let seconds = records.iter().map(|r| r.at_s).fold(0.0, f64::max);
        machine_s += seconds;
        all_trials += records.len();
        let position: BTreeMap<&str, usize> = s.plan.as_ref().map_or_else(BTreeMap::new, |p| {
            p.trials
                .iter()
                .enumerate()
                .map(|(j, id)| (id.as_str(), j * n as usize + index as usize))
                .collect()
        });
        for r in records {
            if let TrialVerdict::Finding { signature, .. } = &r.verdict {
                let e = found_in.entry(signature.clone()).or_default();
                if !e.contains(&s.dir) {
                    e.push(s.dir.clone());
                }
            }
            timeline.push(r.clone());
            if !seen.insert(r.id.clone()) {
                continue;
            }
            if is_map(r) {
                merged.push(r.clone());
            } else {
                let pos = position.get(r.id.as_str()).copied().unwrap_or(usize::MAX);
                search.push((pos, search.len(), r.clone()));
            }
        }
        let shard = s
            .manifest
            .as_ref()
            .map_or_else(|| format!("{index}/{n}"), shard_name);
        if !state.ok() {
            missing.push(format!("shard {shard} ({}): {state}", s.dir));
        }
        let map = records.iter().filter(|r| is_map(r)).count();
        let count = |f: fn(&TrialVerdict) -> bool| records.iter().filter(|r| f(&r.verdict)).count();
        shards.push(ShardSummary {
            dir: s.dir.clone(),
            shard,
            covers: covers(index, n, &base, s.plan.as_ref().map_or(0, |p| p.space)),
            state,
            planned,
            done,
            map,
            findings: count(|v| matches!(v, TrialVerdict::Finding { .. })),
            undecided: count(|v| matches!(v, TrialVerdict::Undecided { .. })),
            seconds,
            trials_per_hour: per_hour(records.len(), seconds),
        });
    }
    for s in inputs.iter().filter(|s| s.manifest.is_none()) {
        missing.push(format!("{}: {}", s.dir, ShardState::NoManifest));
        shards.push(ShardSummary {
            dir: s.dir.clone(),
            shard: "-".into(),
            state: ShardState::NoManifest,
            covers: "-".into(),
            planned: 0,
            done: 0,
            map: 0,
            findings: 0,
            undecided: 0,
            seconds: 0.0,
            trials_per_hour: 0.0,
        });
    }
    search.sort_by_key(|(pos, k, _)| (*pos, *k));
    let done_ids: Vec<String> = search.iter().map(|(_, _, r)| r.id.clone()).collect();
    let planned_done = search.iter().filter(|(p, _, _)| *p != usize::MAX).count();
    merged.extend(search.into_iter().map(|(_, _, r)| r));

    // Findings: one per signature over the merged records, each pointing at the
    // scenario file its first shard wrote.
    let mut findings = Vec::new();
    for mut f in group(&merged) {
        // The shard that ran its first trial wrote its scenario file, numbered in that
        // shard's own order, from that shard's first trial of it (the one confirmed, if
        // the shard confirmed another, is read from its report by the merge command).
        let found = by_index.values().find_map(|s| {
            let rs = s.records.as_deref().ok()?;
            rs.iter().find(|r| r.id == f.first)?;
            let local = group(rs).into_iter().find(|g| g.signature == f.signature)?;
            let first = rs.iter().find(|r| r.id == local.first)?;
            let log = first.log.as_ref().map(|l| format!("{}/{l}", s.dir));
            Some((format!("{}/{}", s.dir, local.scenario), log, local.first))
        });
        let (source, source_log) = match found {
            Some((source, log, first)) => {
                f.first = first;
                (source, log)
            }
            None => Default::default(),
        };
        findings.push(MergedFinding {
            shards: found_in.get(&f.signature).cloned().unwrap_or_default(),
            finding: f,
            source,
            source_log,
        });
    }
    let mut t = totals(&merged, space);
    t.seconds = machine_s;
    t.trials_per_hour = per_hour(all_trials, machine_s);
    timeline.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let mut manifest = base;
    manifest.shard = None;
    Ok(Merged {
        manifest,
        shards_of: n,
        complete: missing.is_empty(),
        missing,
        shards,
        coverage: Coverage {
            space,
            planned: planned_total,
            done: planned_done,
            trials: done_ids,
        },
        totals: t,
        findings,
        records: merged,
        timeline,
    })
}

fn per_hour(trials: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        trials as f64 * 3600.0 / seconds
    } else {
        0.0
    }
}

/// Shard `index` of `n`'s part of the search list, in words.
fn covers(index: u32, n: u32, m: &Manifest, space: usize) -> String {
    let of = match (m.budget, space) {
        (Some(b), 0) => format!("the first {b} search trials"),
        (Some(b), s) => format!(
            "the first {} of {s} search trials",
            usize::try_from(b).unwrap_or(usize::MAX).min(s)
        ),
        (None, 0) => "the search trials".to_owned(),
        (None, s) => format!("all {s} search trials"),
    };
    if n == 1 {
        format!("every trial of {of}")
    } else {
        format!("trials k = {index} (mod {n}) of {of}")
    }
}

/// The merged report as text: the campaign, each shard, what is missing, the totals and
/// the findings table (scenario files as copied into the merge's `--out`).
pub fn text(m: &Merged) -> String {
    let mut out = String::new();
    let man = &m.manifest;
    let _ = writeln!(
        out,
        "campaign: luo-vmm {} on {} (release {}), mode {}, stage {}, seed {}, budget {}, {} shard{}",
        man.luo_vmm,
        man.kernel,
        if man.release.is_empty() {
            "?"
        } else {
            &man.release
        },
        serde_json::to_value(man.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        man.stage,
        man.seed,
        man.budget.map_or("none".into(), |b| b.to_string()),
        m.shards_of,
        if m.shards_of == 1 { "" } else { "s" }
    );
    for s in &m.shards {
        if matches!(s.state, ShardState::Missing | ShardState::NoManifest) {
            let _ = writeln!(
                out,
                "  shard {:<7} {}: {} (its part: {})",
                s.shard, s.dir, s.state, s.covers
            );
            continue;
        }
        let _ = writeln!(
            out,
            "  shard {:<7} {}: {}; {} of {} search trials ({}), {} boot and map, {} trials with a finding, {} undecided, {:.0} s, {:.0} trials/hour",
            s.shard,
            s.dir,
            s.state,
            s.done,
            s.planned,
            s.covers,
            s.map,
            s.findings,
            s.undecided,
            s.seconds,
            s.trials_per_hour
        );
    }
    let c = &m.coverage;
    let _ = writeln!(
        out,
        "covered: {} of {} planned search trials (space {}){}",
        c.done,
        c.planned,
        c.space,
        if m.complete { "" } else { "; INCOMPLETE" }
    );
    for line in &m.missing {
        let _ = writeln!(out, "missing: {line}");
    }
    let _ = writeln!(
        out,
        "time: {:.0} s of exploring over all shards (machine time, added up)",
        m.totals.seconds
    );
    let plain: Vec<Finding> = m.findings.iter().map(|f| f.finding.clone()).collect();
    out.push_str(&table(&plain, &m.totals));
    for f in &m.findings {
        let _ = writeln!(
            out,
            "  #{} represented by {} (from {}), seen in {}",
            f.finding.number,
            f.finding.first,
            f.source,
            f.shards.join(", ")
        );
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The merged report as one HTML page: the campaign, the shards, what is missing, the
/// findings table and the plot of trials and findings over exploring time (inline SVG).
pub fn html(m: &Merged) -> String {
    let man = &m.manifest;
    let mut out = String::new();
    let title = format!(
        "luo-vmm explore: {} shard{} on {}",
        m.shards_of,
        if m.shards_of == 1 { "" } else { "s" },
        man.kernel
    );
    let _ = write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
td.n {{ text-align: right; }}
.bad {{ color: #b00; font-weight: bold; }}
.ok {{ color: #070; font-weight: bold; }}
code {{ font-size: 90%; }}
</style></head><body>
<h1>{t}</h1>
<p>luo-vmm {v}, kernel <code>{k}</code> (release {r}), workload <code>{w}</code>, mode {mode}, seed {seed}, budget {budget}.</p>
"#,
        t = esc(&title),
        v = esc(&man.luo_vmm),
        k = esc(&man.kernel),
        r = esc(&man.release),
        w = esc(&man.workload),
        mode = esc(&serde_json::to_value(man.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()),
        seed = man.seed,
        budget = man.budget.map_or("none".into(), |b| b.to_string()),
    );
    let c = &m.coverage;
    if m.complete {
        let _ = writeln!(
            out,
            r#"<p class="ok">Complete: {} of {} planned search trials (space {}).</p>"#,
            c.done, c.planned, c.space
        );
    } else {
        let _ = writeln!(
            out,
            r#"<p class="bad">Incomplete: {} of {} planned search trials (space {}).</p><ul>"#,
            c.done, c.planned, c.space
        );
        for line in &m.missing {
            let _ = writeln!(out, r#"<li class="bad">{}</li>"#, esc(line));
        }
        out.push_str("</ul>\n");
    }
    let t = &m.totals;
    let _ = writeln!(
        out,
        "<p>Trials: {} boot and map + {} search ({} passed, {} findings, {} undecided); {:.0} s of exploring over all shards (added up), {:.0} trials per machine-hour.</p>",
        t.map, t.search, t.passed, t.findings, t.undecided, t.seconds, t.trials_per_hour
    );
    out.push_str("<h2>Findings</h2>\n");
    if m.findings.is_empty() {
        out.push_str("<p class=\"ok\">None.</p>\n");
    } else {
        out.push_str("<table><tr><th>#</th><th>oracle</th><th>cause</th><th>where</th><th>trials</th><th>first trial</th><th>scenario</th><th>shards</th></tr>\n");
        for f in &m.findings {
            let g = &f.finding;
            let _ = writeln!(
                out,
                r#"<tr><td class="n">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td><code>{}</code></td><td><a href="{}">{}</a></td><td>{}</td></tr>"#,
                g.number,
                esc(&g.signature.oracle.to_string()),
                esc(&g.signature.cause),
                esc(&g.signature.site),
                g.trials.len(),
                esc(&g.first),
                esc(&g.scenario),
                esc(&g.scenario),
                esc(&f.shards.join(", "))
            );
        }
        out.push_str("</table>\n");
    }
    out.push_str("<h2>Shards</h2>\n<table><tr><th>shard</th><th>directory</th><th>state</th><th>covers</th><th>search trials</th><th>map</th><th>findings</th><th>undecided</th><th>s</th><th>trials/hour</th></tr>\n");
    for s in &m.shards {
        let _ = writeln!(
            out,
            r#"<tr><td>{}</td><td><code>{}</code></td><td class="{}">{}</td><td>{}</td><td class="n">{} of {}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{:.0}</td><td class="n">{:.0}</td></tr>"#,
            esc(&s.shard),
            esc(&s.dir),
            if s.state.ok() { "ok" } else { "bad" },
            esc(&s.state.to_string()),
            esc(&s.covers),
            s.done,
            s.planned,
            s.map,
            s.findings,
            s.undecided,
            s.seconds,
            s.trials_per_hour
        );
    }
    out.push_str("</table>\n<h2>Progress</h2>\n");
    out.push_str(&plot(
        &m.timeline,
        "every shard's trials and findings over its exploring time",
    ));
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explore::space::{Mode, Release};
    use crate::explore::store::list_digest;
    use crate::judge::explore::Oracle;
    use crate::trial::RunTimes;

    fn manifest(shard: Option<(u32, u32)>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            luo_vmm: "0.1.0".into(),
            kernel: "7.2.13-1-abc".into(),
            release: "7.2.13".into(),
            workload: "default".into(),
            script: "s".into(),
            mode: Mode::Race,
            points: "auto".into(),
            seed: 1,
            releases: vec![Release::Settled],
            vcpus: 2,
            mem: 512 << 20,
            hang_after_ms: 30_000,
            stage: crate::config::options::ExploreStage::Both,
            budget: Some(6),
            shard: shard.map(|(index, count)| Shard { index, count }),
        }
    }

    fn rec(id: &str, at: f64, verdict: TrialVerdict) -> TrialRecord {
        let trial = if id == "baseline" {
            Trial::Baseline
        } else if let Some(f) = id.strip_prefix("map:") {
            Trial::Map {
                function: f.into(),
                with: None,
                stage2: false,
            }
        } else {
            Trial::Fail {
                failure: Default::default(),
                boot: false,
                function: id.into(),
                call: 1,
                with: None,
                stage2: false,
            }
        };
        TrialRecord {
            id: id.into(),
            hits: matches!(trial, Trial::Map { .. }).then(|| vec![1, 0]),
            trial,
            verdict,
            times: RunTimes::default(),
            at_s: at,
            log: Some(format!("logs/{id}.log")),
        }
    }

    fn pass() -> TrialVerdict {
        TrialVerdict::Pass { because: vec![] }
    }

    fn finding(site: &str) -> TrialVerdict {
        TrialVerdict::Finding {
            signature: Signature {
                oracle: Oracle::Hang,
                site: site.into(),
                cause: "close-session".into(),
            },
            because: vec![site.into()],
        }
    }

    /// The search list t0..t5 with findings at t1 (site a), t4 (site b), t5 (site a).
    fn verdict_of(id: &str) -> TrialVerdict {
        match id {
            "t1" | "t5" => finding("a"),
            "t4" => finding("b"),
            _ => pass(),
        }
    }

    const LIST: [&str; 6] = ["t0", "t1", "t2", "t3", "t4", "t5"];

    /// Shard `i` of `n` of LIST, with its first `done` planned trials finished.
    fn shard(i: u32, n: u32, done: usize) -> ShardInput {
        let planned: Vec<String> = LIST
            .iter()
            .enumerate()
            .filter(|(k, _)| k % n as usize == i as usize)
            .map(|(_, t)| (*t).to_owned())
            .collect();
        let mut records = vec![
            rec("baseline", 30.0, pass()),
            rec("map:f", 31.0, pass()),
            rec("map:g", 32.0, pass()),
        ];
        for (j, t) in planned.iter().take(done).enumerate() {
            records.push(rec(t, 40.0 + j as f64, verdict_of(t)));
        }
        ShardInput {
            dir: format!("shard-{i}"),
            manifest: Some(manifest((n > 1).then_some((i, n)))),
            plan: Some(Plan {
                space: 10,
                trials: planned,
                list: Some(list_digest(LIST)),
            }),
            records: Ok(records),
        }
    }

    fn signatures(m: &Merged) -> Vec<(usize, String, Vec<String>)> {
        m.findings
            .iter()
            .map(|f| {
                (
                    f.finding.number,
                    f.finding.signature.site.clone(),
                    f.finding.trials.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn shards_merge_to_what_one_process_finds() {
        let whole = merge(&[shard(0, 1, 6)]).unwrap();
        assert!(whole.complete, "{:?}", whole.missing);
        let parts = merge(&[shard(2, 3, 2), shard(0, 3, 2), shard(1, 3, 2)]).unwrap();
        assert!(parts.complete, "{:?}", parts.missing);
        assert_eq!(signatures(&parts), signatures(&whole));
        assert_eq!(
            signatures(&whole),
            [
                (1, "a".to_owned(), vec!["t1".to_owned(), "t5".to_owned()]),
                (2, "b".to_owned(), vec!["t4".to_owned()])
            ]
        );
        // The same trials, in the one list's order; the map once.
        assert_eq!(parts.coverage.trials, LIST);
        assert_eq!(parts.coverage, whole.coverage);
        let ids = |m: &Merged| m.records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&parts), ids(&whole));
        assert_eq!((parts.totals.map, parts.totals.search), (3, 6));
        // Machine time adds up: each shard explored 41 s.
        assert!((parts.totals.seconds - 123.0).abs() < 1e-9);
        // Finding 1 was seen by shards 1 and 2 (t1, t5); its scenario is shard 1's.
        let f1 = &parts.findings[0];
        assert_eq!(f1.shards, ["shard-1", "shard-2"]);
        assert!(
            f1.source.starts_with("shard-1/findings/01-"),
            "{}",
            f1.source
        );
        assert_eq!(f1.source_log.as_deref(), Some("shard-1/logs/t1.log"));
        // Finding 2 (t4) is shard 1's second.
        let f2 = &parts.findings[1];
        assert_eq!(f2.source, "shard-1/findings/02-hang-close-session.toml");
        assert_eq!(f2.finding.scenario, "findings/02-hang-close-session.toml");
        let text = text(&parts);
        assert!(text.contains("3 shards"), "{text}");
        assert!(
            text.contains("trials k = 1 (mod 3) of the first 6 of 10 search trials"),
            "{text}"
        );
        assert!(text.contains("findings: 2"), "{text}");
        let page = html(&parts);
        assert!(page.contains("<svg") && page.contains("Complete"), "{page}");
    }

    #[test]
    fn missing_and_incomplete_shards_are_named() {
        let m = merge(&[shard(0, 3, 2), shard(2, 3, 1)]).unwrap();
        assert!(!m.complete);
        assert_eq!(
            m.missing,
            [
                "shard 1/3: no result given for it",
                "shard 2/3 (shard-2): incomplete: 1 of 2 trials"
            ]
        );
        assert_eq!((m.coverage.planned, m.coverage.done), (6, 3));
        let t = text(&m);
        assert!(
            t.contains("INCOMPLETE") && t.contains("missing: shard 1/3"),
            "{t}"
        );
        assert!(html(&m).contains("Incomplete"));

        // No plan (killed while mapping), no manifest, a damaged trials file.
        let mut no_plan = shard(1, 3, 0);
        no_plan.plan = None;
        let mut damaged = shard(2, 3, 2);
        damaged.records = Err("line 3: expected value".into());
        let never = ShardInput {
            dir: "shard-x".into(),
            manifest: None,
            plan: None,
            records: Ok(vec![]),
        };
        let m = merge(&[shard(0, 3, 2), no_plan, damaged, never]).unwrap();
        assert_eq!(
            m.missing,
            [
                "shard 1/3 (shard-1): incomplete: no plan.json (stopped before its search: while booting or mapping the workload)",
                "shard 2/3 (shard-2): damaged: line 3: expected value (not merged)",
                "shard-x: no manifest.json (the shard never started here)"
            ]
        );
        // The damaged shard's records are not merged.
        assert_eq!(m.coverage.trials, ["t0", "t3"]);
    }

    #[test]
    fn shards_of_other_explorations_are_refused_in_one_line() {
        let mut other = shard(1, 2, 3);
        if let Some(m) = other.manifest.as_mut() {
            m.kernel = "7.2.13-1-xyz".into();
        }
        let e = merge(&[shard(0, 2, 3), other]).unwrap_err().to_string();
        assert_eq!(
            e,
            "explore merge: shard-0 and shard-1 are not shards of one exploration: kernel is \"7.2.13-1-abc\" in the first, \"7.2.13-1-xyz\" in the second"
        );
        assert!(!e.contains('\n'));
        let mut newer = shard(1, 2, 3);
        if let Some(m) = newer.manifest.as_mut() {
            m.luo_vmm = "0.2.0".into();
        }
        let e = merge(&[shard(0, 2, 3), newer]).unwrap_err().to_string();
        assert!(e.contains("luo_vmm is \"0.1.0\""), "{e}");
        let e = merge(&[shard(0, 2, 3), shard(1, 3, 2)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("different splits: 0/2 and 1/3"), "{e}");
        let e = merge(&[shard(0, 2, 3), shard(0, 1, 6)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("different splits: 0/2 and unsharded"), "{e}");
        let e = merge(&[shard(0, 2, 3), shard(0, 2, 3)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("shard 0/2 given twice"), "{e}");
        let e = merge(&[]).unwrap_err().to_string();
        assert!(e.contains("no shard directory"), "{e}");
        let never = ShardInput {
            dir: "d".into(),
            manifest: None,
            plan: None,
            records: Ok(vec![]),
        };
        let e = merge(&[never]).unwrap_err().to_string();
        assert!(e.contains("none of d holds an exploration"), "{e}");
    }

    #[test]
    fn a_shard_of_another_search_list_is_named_with_its_map() {
        let mut other = shard(1, 2, 3);
        if let Some(p) = other.plan.as_mut() {
            p.list = Some(list_digest(["t9"]));
        }
        if let Ok(rs) = other.records.as_mut() {
            rs[1].hits = Some(vec![0, 2]);
        }
        let m = merge(&[shard(0, 2, 3), other]).unwrap();
        assert!(!m.complete);
        assert_eq!(
            m.missing,
            ["shard 1/2 (shard-1): another search list than the first shard's (its map differs: map:f ran [1, 0] times per vCPU there, [0, 2] here): the shards do not partition one list"]
        );
    }

    #[test]
    fn shard_results_load_from_disk() {
        let dir = std::env::temp_dir().join(format!("luo-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A directory that does not exist: no manifest.
        let s = load_shard(&dir).unwrap();
        assert!(s.manifest.is_none() && s.plan.is_none());
        std::fs::create_dir_all(&dir).unwrap();
        let input = shard(0, 2, 3);
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write(
            "manifest.json",
            serde_json::to_string(&input.manifest).unwrap(),
        );
        write("plan.json", serde_json::to_string(&input.plan).unwrap());
        let mut lines = String::new();
        for r in input.records.as_ref().unwrap() {
            lines.push_str(&serde_json::to_string(r).unwrap());
            lines.push('\n');
        }
        // A kill mid-line: the torn last record is not counted.
        lines.push_str("{\"id\":\"t4\",\"tr");
        write("trials.jsonl", lines);
        let back = load_shard(&dir).unwrap();
        assert_eq!(
            back,
            ShardInput {
                dir: dir.display().to_string(),
                ..input
            }
        );
        let m = merge(&[back]).unwrap();
        assert_eq!(m.missing.len(), 1, "{:?}", m.missing);
        // A manifest that is not one: refused, the file named.
        write("manifest.json", "{}".into());
        let e = load_shard(&dir).unwrap_err().to_string();
        assert!(e.contains("manifest.json"), "{e}");
        // A file given as a shard: named as not one.
        let e = load_shard(&dir.join("plan.json")).unwrap_err().to_string();
        assert!(
            e.ends_with("plan.json: not a directory (a shard's --out)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
