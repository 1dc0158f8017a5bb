//! An exploration's results on disk (`--out DIR`), kept so that `--resume` goes on
//! without repeating a finished trial and an interrupted run is never mistaken for a
//! complete one:
//!
//! - `manifest.json`: what is explored (luo-vmm version, kernel image key, workload,
//!   options that change the trial list); written once, atomically (temporary file,
//!   rename); a resume must match it field for field.
//! - `trials.jsonl`: one [`TrialRecord`] per line, appended and flushed to disk after each
//!   trial; a line cut short by a kill is ignored (that trial runs again).
//! - `confirmations.jsonl`: one [`Confirmation`] per line, the same way: a finding's
//!   trial run again from the snapshot, so that a resume does not run it again.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::explore::space::{Mode, Release, Trial};
use crate::judge::explore::{Signature, TrialVerdict};
use crate::trial::RunTimes;

/// Format name of `manifest.json`.
pub const FORMAT: &str = "luo-vmm-explore";
/// Its version.
pub const VERSION: u32 = 1;
/// Largest `trials.jsonl` read back (a million trials is far beyond any campaign here).
const MAX_TRIALS_FILE: u64 = 1 << 30;

/// Errors of the results directory.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Reading or writing a file.
    #[error("{path}: {why}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// `--out` holds another exploration, or one `--resume` was not asked for.
    #[error("{0}")]
    Refused(String),
    /// `--out` cannot be the results directory (a file, under a file, not writable).
    #[error("--out {}: {why}", path.display())]
    Out {
        /// The path given.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// `--json` cannot be written.
    #[error("--json {}: {why}", path.display())]
    Json {
        /// The path given.
        path: PathBuf,
        /// Why not.
        why: String,
    },
}

/// Checks that the report file `path` (`--json`) can be written, without touching what is
/// there (it is written whole at the end) and leaving nothing where nothing was.
pub(crate) fn check_json_out(path: &Path) -> Result<(), StoreError> {
    let existed = path.exists();
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| StoreError::Json {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Checks, creating nothing, that `dir` can be the results directory: a directory, or a
/// path not there yet under one; and that luo-vmm can write in the nearest of them
/// (a file created and removed there).
pub(crate) fn check_out(dir: &Path) -> Result<(), StoreError> {
    let out = |why: String| StoreError::Out {
        path: dir.to_owned(),
        why,
    };
    // The nearest part of the path that exists ("" is the working directory).
    let mut nearest = None;
    for p in dir.ancestors() {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        match std::fs::metadata(p) {
            Ok(meta) => {
                nearest = Some((p, meta));
                break;
            }
            // Not there, or under a file (named when the walk reaches it).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => return Err(out(format!("{}: {e}", p.display()))),
        }
    }
    let Some((at, meta)) = nearest else {
        return Err(out("no part of the path exists".into()));
    };
    let what = if meta.is_file() {
        "is a file, not a directory"
    } else {
        "is not a directory"
    };
    if !meta.is_dir() {
        return Err(out(if at == dir {
            what.to_owned()
        } else {
            format!("{} {what}", at.display())
        }));
    }
    let probe = at.join(format!(".luo-vmm-write-check.{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if at == dir => Err(out(format!("luo-vmm cannot create a file there: {e}"))),
        Err(e) => Err(out(format!(
            "luo-vmm cannot create a file in {}: {e}",
            at.display()
        ))),
    }
}

/// The files an exploration keeps in its directory ([`Store`]), and their temporary
/// siblings.
const OURS: &[&str] = &[
    "manifest.json",
    "plan.json",
    "trials.jsonl",
    CONFIRMATIONS,
    "findings",
    "logs",
    "report.txt",
    "report.json",
    "progress.svg",
];

/// [`check_out`], and a `dir` that holds files but no exploration refused: what a results
/// directory must be, checked before the kernel is built or found, creating nothing.
pub(crate) fn check_results_dir(dir: &Path) -> Result<(), StoreError> {
    check_out(dir)?;
    refuse_unrelated_files(dir)
}

/// Refuses a `dir` that holds files but no exploration's manifest: a new exploration would
/// mix its files with another program's (and replace a `trials.jsonl` or `plan.json`
/// there).
fn refuse_unrelated_files(dir: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    if dir.join("manifest.json").exists() {
        return Ok(());
    }
    let others: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !OURS
                .iter()
                .any(|o| n == o || n.starts_with(&format!("{o}.tmp.")))
        })
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    let mut shown: Vec<&str> = others.iter().map(String::as_str).take(3).collect();
    shown.sort_unstable();
    Err(StoreError::Out {
        path: dir.to_owned(),
        why: format!(
            "holds files but no exploration ({}{}): give an empty or new directory",
            shown.join(", "),
            if others.len() > 3 { ", ..." } else { "" }
        ),
    })
}

/// Whether `dir` holds results: a recorded trial (a whole line of `trials.jsonl`) or a
/// finding's file.
fn holds_results(dir: &Path) -> Result<bool, StoreError> {
    let tpath = dir.join("trials.jsonl");
    if tpath.exists() && !read_trials(&tpath)?.is_empty() {
        return Ok(true);
    }
    let findings = dir.join("findings");
    match std::fs::read_dir(&findings) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&findings)(e)),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io {
        path: path.to_owned(),
        why: e.to_string(),
    }
}

/// What is explored; two runs with the same manifest make the same trial list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The luo-vmm that explores.
    pub luo_vmm: String,
    /// The guest image's cache key (kernel and initramfs), or the kernel file's path.
    pub kernel: String,
    /// The kernel release.
    pub release: String,
    /// The workload (`default`, or its file) and its script's wire form.
    pub workload: String,
    /// Race, fail, both.
    pub mode: Mode,
    /// `auto` or the points file's content digest.
    pub points: String,
    /// The shuffle seed.
    pub seed: u64,
    /// Release policies.
    pub releases: Vec<Release>,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest bytes.
    pub mem: u64,
    /// The hang bound, in ms.
    pub hang_after_ms: u64,
    /// The stages searched (`--stage`).
    #[serde(default = "both_stages")]
    pub stage: crate::config::options::ExploreStage,
    /// The search budget (`--budget`), if any.
    #[serde(default)]
    pub budget: Option<u64>,
    /// This shard of the search (`--shard I/N`), if any.
    #[serde(default)]
    pub shard: Option<crate::config::options::Shard>,
    /// The script every trial shares (last: a mismatch names a shorter field first).
    pub script: String,
}

fn both_stages() -> crate::config::options::ExploreStage {
    crate::config::options::ExploreStage::Both
}

/// The search trials of this exploration (or shard), written before the search starts
/// (`plan.json`): what a complete run of it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Search trials in the whole space (every shard's).
    pub space: usize,
    /// The ids of the search trials this run makes, in order (its shard, within the
    /// budget).
    pub trials: Vec<String>,
    /// [`list_digest`] of the whole search list (every shard's, before the budget): shards
    /// of one campaign must agree on it (`explore merge` checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
}

/// The digest of a search list, from its trial ids in order: XXH3-64 over the ids, each
/// followed by a newline, as 16 hex digits.
pub fn list_digest(ids: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for id in ids {
        h.update(id.as_ref().as_bytes());
        h.update(b"\n");
    }
    format!("{:016x}", h.digest())
}

impl Manifest {
    /// The first field that differs from `other`, as `field: this vs other`.
    pub fn mismatch(&self, other: &Manifest) -> Option<String> {
        self.difference(other, &[])
            .map(|(k, v, w)| format!("{k}: {v} here, {w} there"))
    }

    /// The first field but those in `ignore` whose value differs between `self` and
    /// `other`, with both values as read (JSON; `none` for an absent one, a long one cut).
    /// The script follows from the rest (the stages searched, the workload): a field
    /// that differs is named before it.
    pub fn difference(
        &self,
        other: &Manifest,
        ignore: &[&str],
    ) -> Option<(String, String, String)> {
        let a = serde_json::to_value(self).ok()?;
        let b = serde_json::to_value(other).ok()?;
        let (a, b) = (a.as_object()?, b.as_object()?);
        let mut fields: Vec<(&String, &serde_json::Value)> = a
            .iter()
            .filter(|(k, _)| !ignore.contains(&k.as_str()))
            .collect();
        fields.sort_by_key(|(k, _)| k.as_str() == "script");
        let shown = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "none".to_owned(),
            v => {
                let text = v.to_string();
                match text.char_indices().nth(80) {
                    Some((cut, _)) => format!("{}…", &text[..cut]),
                    None => text,
                }
            }
        };
        fields.into_iter().find_map(|(k, v)| {
            let w = b.get(k).unwrap_or(&serde_json::Value::Null);
            (v != w).then(|| (k.clone(), shown(v), shown(w)))
        })
    }
}

/// One finished trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    /// Its id.
    pub id: String,
    /// What it was.
    pub trial: Trial,
    /// What the oracles said.
    pub verdict: TrialVerdict,
    /// Per vCPU, how often the mapped function ran (map trials only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<Vec<u32>>,
    /// Host time of its parts.
    pub times: RunTimes,
    /// Seconds of exploring (all sessions of this `--out` together) when it ended.
    pub at_s: f64,
    /// Its console log, kept for findings (relative to `--out`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// A finding's trial run again from the snapshot: how many of `runs` gave `signature`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The trial's id.
    pub trial: String,
    /// The finding's signature.
    pub signature: Signature,
    /// Runs that gave it.
    pub same: u32,
    /// Runs made.
    pub runs: u32,
    /// What each run that did not give it gave instead (its verdict and reasons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<String>,
}

/// The results directory.
pub struct Store {
    dir: PathBuf,
    trials: File,
    confirmations_file: File,
    /// Trials already finished (read back on `--resume`).
    pub done: Vec<TrialRecord>,
    /// Confirmations already made (read back on `--resume`).
    confirmations: Vec<Confirmation>,
    /// The directory held this exploration's manifest but no result (a run stopped
    /// before its first trial was recorded): it starts afresh, as if empty.
    pub(crate) started_afresh: bool,
}

impl Store {
    /// Opens `dir` for `manifest`: a new exploration (refused if `dir` holds results of
    /// one and `resume` is not set; a `dir` with the same manifest and no result, left by
    /// a run stopped before its first trial, starts afresh), or, with `resume`, the one
    /// there (refused if its manifest differs). Checks that `dir` can be written before
    /// any guest boots.
    pub fn open(dir: &Path, manifest: &Manifest, resume: bool) -> Result<Store, StoreError> {
        if resume && !dir.join("manifest.json").exists() {
            return Err(StoreError::Refused(format!(
                "--resume: {} holds no exploration to go on with",
                dir.display()
            )));
        }
        check_results_dir(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Out {
            path: dir.to_owned(),
            why: e.to_string(),
        })?;
        let mpath = dir.join("manifest.json");
        let tpath = dir.join("trials.jsonl");
        let cpath = dir.join(CONFIRMATIONS);
        let mut done = Vec::new();
        let mut confirmations = Vec::new();
        let mut started_afresh = false;
        let mut fresh = !mpath.exists();
        if !fresh {
            let text = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
            let old: Manifest = serde_json::from_str(&text).map_err(|e| StoreError::Io {
                path: mpath.clone(),
                why: format!("not an exploration's manifest: {e}"),
            })?;
            let mismatch = manifest.mismatch(&old);
            if !resume {
                match (holds_results(dir)?, mismatch) {
                    (false, None) => {
                        fresh = true;
                        started_afresh = true;
                    }
                    (false, Some(m)) => {
                        return Err(StoreError::Refused(format!(
                            "--out {}: holds another exploration ({m}), with no trial recorded: give another --out, or remove {} to start this one there",
                            dir.display(),
                            dir.display()
                        )))
                    }
                    (true, _) => {
                        return Err(StoreError::Refused(format!(
                            "--out {}: holds an exploration already (luo-vmm {}, {}): add --resume to go on with it, or give another --out",
                            dir.display(),
                            old.luo_vmm,
                            old.kernel
                        )))
                    }
                }
            } else if let Some(m) = mismatch {
                return Err(StoreError::Refused(format!(
                    "--resume {}: another exploration ({m}); give another --out",
                    dir.display()
                )));
            } else {
                if tpath.exists() {
                    done = read_lines(&tpath)?;
                    drop_cut_line(&tpath)?;
                }
                if cpath.exists() {
                    confirmations = read_lines(&cpath)?;
                    drop_cut_line(&cpath)?;
                }
            }
        }
        if fresh {
            let text = serde_json::to_string_pretty(manifest).map_err(|e| StoreError::Io {
                path: mpath.clone(),
                why: e.to_string(),
            })?;
            write_atomic(&mpath, text.as_bytes())?;
            // A stale trials file or plan of an exploration whose manifest was lost (or
            // that recorded nothing) is not ours.
            let _ = std::fs::remove_file(&tpath);
            let _ = std::fs::remove_file(&cpath);
            let _ = std::fs::remove_file(dir.join("plan.json"));
        }
        let append = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io(path))
        };
        let trials = append(&tpath)?;
        let confirmations_file = append(&cpath)?;
        for sub in ["findings", "logs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        Ok(Store {
            dir: dir.to_owned(),
            trials,
            confirmations_file,
            done,
            confirmations,
            started_afresh,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ids of finished trials.
    pub fn done_ids(&self) -> BTreeSet<String> {
        self.done.iter().map(|r| r.id.clone()).collect()
    }

    /// Appends `record` and syncs it to disk.
    pub fn append(&mut self, record: TrialRecord) -> Result<(), StoreError> {
        append_line(&mut self.trials, &self.dir.join("trials.jsonl"), &record)?;
        self.done.push(record);
        Ok(())
    }

    /// The confirmation of trial `trial` for `signature`, if it was confirmed.
    pub fn confirmation(&self, trial: &str, signature: &Signature) -> Option<&Confirmation> {
        self.confirmations
            .iter()
            .find(|c| c.trial == trial && c.signature == *signature)
    }

    /// Appends `c` and syncs it to disk.
    pub fn append_confirmation(&mut self, c: Confirmation) -> Result<(), StoreError> {
        append_line(
            &mut self.confirmations_file,
            &self.dir.join(CONFIRMATIONS),
            &c,
        )?;
        self.confirmations.push(c);
        Ok(())
    }
}

/// The confirmations' file in the results directory.
const CONFIRMATIONS: &str = "confirmations.jsonl";

/// Appends `value` as a line of `file` (at `path`) and syncs it to disk.
fn append_line(file: &mut File, path: &Path, value: &impl Serialize) -> Result<(), StoreError> {
    let mut line = serde_json::to_string(value).map_err(|e| StoreError::Io {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(io(path))?;
    file.sync_data().map_err(io(path))
}

/// Drops a last line cut short by a kill from `path`, so that the next line appended
/// starts a line of its own.
fn drop_cut_line(path: &Path) -> Result<(), StoreError> {
    let text = std::fs::read(path).map_err(io(path))?;
    let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < text.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(keep as u64).map_err(io(path))?;
    }
    Ok(())
}

/// The records of `path`; a last line cut short (a killed run) is dropped, any other bad
/// line is an error.
pub fn read_trials(path: &Path) -> Result<Vec<TrialRecord>, StoreError> {
    read_lines(path)
}

/// The values of the JSON-lines file `path` (see [`parse_lines`]), refused past
/// [`MAX_TRIALS_FILE`] bytes.
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StoreError> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    if len > MAX_TRIALS_FILE {
        return Err(StoreError::Io {
            path: path.to_owned(),
            why: format!("larger than {MAX_TRIALS_FILE} bytes"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_lines(&text).map_err(|why| StoreError::Io {
        path: path.to_owned(),
        why,
    })
}

/// Parses JSON-lines text: a last line cut short (no newline after it, not a value) is
/// dropped, any other bad line is an error.
fn parse_lines<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<T>, String> {
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => return Err(format!("line {}: {e}", i + 1)),
        }
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            luo_vmm: "0.1.0".into(),
            kernel: "7.2.13-1-abc-def".into(),
            release: "7.2.13".into(),
            workload: "default".into(),
            script: "0@reboot".into(),
            mode: Mode::Both,
            points: "auto".into(),
            seed: 1,
            releases: vec![Release::Settled],
            vcpus: 2,
            mem: 512 << 20,
            hang_after_ms: 30_000,
            stage: crate::config::options::ExploreStage::Both,
            budget: None,
            shard: None,
        }
    }

    fn record(id: &str) -> TrialRecord {
        TrialRecord {
            id: id.into(),
            trial: Trial::Map {
                function: id.into(),
                with: None,
                stage2: false,
            },
            verdict: TrialVerdict::Pass { because: vec![] },
            hits: Some(vec![1, 0]),
            times: RunTimes::default(),
            at_s: 1.5,
            log: None,
        }
    }

    #[test]
    fn a_mismatch_names_the_stage_before_the_script_it_makes() {
        let m = manifest();
        let mut other = m.clone();
        other.stage = crate::config::options::ExploreStage::One;
        other.script = "luo.script1=another".into();
        let said = m.mismatch(&other).unwrap();
        assert!(said.starts_with("stage: "), "{said}");
        // As the command line spells it.
        assert!(said.ends_with("\"1\" there"), "{said}");
        assert_eq!(m.mismatch(&m), None);
        // A manifest of an older luo-vmm (`"stage": "one"`) reads back as the same.
        let text = serde_json::to_string(&other)
            .unwrap()
            .replace("\"stage\":\"1\"", "\"stage\":\"one\"");
        assert!(text.contains("\"stage\":\"one\""), "{text}");
        let old: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(old.mismatch(&other), None);
    }

    #[test]
    fn a_store_resumes_only_its_own_exploration() {
        let dir = std::env::temp_dir().join(format!("luo-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = manifest();
        let mut s = Store::open(&dir, &m, false).unwrap();
        s.append(record("a")).unwrap();
        s.append(record("b")).unwrap();
        drop(s);
        // Without --resume: refused, named.
        let e = Store::open(&dir, &m, false).err().unwrap().to_string();
        assert!(e.contains("--resume"), "{e}");
        // Another kernel: refused, the field named.
        let mut other = m.clone();
        other.kernel = "7.2.13-1-xyz".into();
        let e = Store::open(&dir, &other, true).err().unwrap().to_string();
        assert!(e.contains("kernel"), "{e}");
        // A kill mid-line: the torn line is dropped.
        let path = dir.join("trials.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"id\":\"c\",\"tri");
        std::fs::write(&path, &text).unwrap();
        let mut s = Store::open(&dir, &m, true).unwrap();
        assert_eq!(s.done_ids().into_iter().collect::<Vec<_>>(), ["a", "b"]);
        s.append(record("c")).unwrap();
        drop(s);
        let back = read_trials(&path).unwrap();
        assert_eq!(
            back.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Store::open(&dir, &m, true).is_err(), "nothing to resume");
        assert!(!dir.exists(), "a refused resume creates nothing");
    }

    /// A finding's confirmation is kept for a resume (a torn last line dropped), and
    /// forgotten by a new exploration in the same place.
    #[test]
    fn confirmations_are_kept_for_a_resume() {
        let dir = temp("confirm");
        let m = manifest();
        let sig = Signature {
            oracle: crate::judge::explore::Oracle::Hang,
            site: "close-session N blocked".into(),
            cause: "fail luo_file_freeze".into(),
        };
        let mut s = Store::open(&dir, &m, false).unwrap();
        s.append(record("a")).unwrap();
        s.append_confirmation(Confirmation {
            trial: "a".into(),
            signature: sig.clone(),
            same: 3,
            runs: 3,
            others: vec![],
        })
        .unwrap();
        assert_eq!(s.confirmation("a", &sig).map(|c| c.same), Some(3));
        drop(s);
        let path = dir.join(CONFIRMATIONS);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"trial\":\"b\",\"sig");
        std::fs::write(&path, &text).unwrap();
        let mut s = Store::open(&dir, &m, true).unwrap();
        assert_eq!(s.confirmation("a", &sig).map(|c| c.same), Some(3));
        assert_eq!(s.confirmation("b", &sig), None);
        let other = Signature {
            cause: "fail luo_session_freeze".into(),
            ..sig.clone()
        };
        assert_eq!(s.confirmation("a", &other), None, "another finding's");
        s.append_confirmation(Confirmation {
            trial: "b".into(),
            signature: sig.clone(),
            same: 2,
            runs: 3,
            others: vec!["pass: records match at point-of-no-return".into()],
        })
        .unwrap();
        drop(s);
        let s = Store::open(&dir, &m, true).unwrap();
        let b = s.confirmation("b", &sig).unwrap();
        assert_eq!((b.same, b.runs), (2, 3));
        assert_eq!(b.others, ["pass: records match at point-of-no-return"]);
        drop(s);
        // A new exploration there (its manifest lost): nothing of the old one.
        std::fs::remove_file(dir.join("manifest.json")).unwrap();
        let s = Store::open(&dir, &m, false).unwrap();
        assert_eq!(s.confirmation("a", &sig), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory of other files is no results directory; one of this exploration's
    /// own files (a run killed before its first trial) is.
    #[test]
    fn a_directory_of_other_files_is_refused() {
        let dir = temp("others");
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = Store::open(&dir, &manifest(), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.ends_with(
                "holds files but no exploration (notes.txt): give an empty or new directory"
            ),
            "{e}"
        );
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        std::fs::write(dir.join("report.txt.tmp.7"), "").unwrap();
        Store::open(&dir, &manifest(), false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A difference names an absent value `none` and cuts a long one.
    #[test]
    fn differences_read_as_values() {
        let m = manifest();
        let mut other = m.clone();
        other.budget = Some(40);
        assert_eq!(
            m.difference(&other, &[]),
            Some(("budget".into(), "none".into(), "40".into()))
        );
        assert_eq!(m.difference(&other, &["budget"]), None);
        let mut long = m.clone();
        long.script = "x".repeat(500);
        let (field, _, there) = m.difference(&long, &[]).unwrap();
        assert_eq!(field, "script");
        assert_eq!(there.chars().count(), 81, "{there}");
        assert!(there.ends_with('…'));
    }

    /// A fresh, empty temporary directory of this test.
    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luo-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_out_that_cannot_be_a_directory_is_named() {
        let dir = temp("out");
        let file = dir.join("a-file");
        std::fs::write(&file, "x").unwrap();
        let m = manifest();
        let e = check_out(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("--out {}: is a file, not a directory", file.display())
        );
        // Store::open says the same, and changes nothing.
        let e = Store::open(&file, &m, false).err().unwrap().to_string();
        assert_eq!(
            e,
            format!("--out {}: is a file, not a directory", file.display())
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        let under = file.join("sub/out");
        let e = check_out(&under).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "--out {}: {} is a file, not a directory",
                under.display(),
                file.display()
            )
        );
        // A directory not there yet under one that is: fine, and nothing is made.
        let new = dir.join("new/out");
        check_out(&new).unwrap();
        assert!(!dir.join("new").exists());
        check_out(&dir).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "the write check leaves nothing behind");
        // A directory luo-vmm cannot write in (root writes anywhere but in /proc).
        let ro = dir.join("read-only");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
        let writable = std::fs::write(ro.join("w"), "").is_ok();
        match check_out(&ro) {
            Ok(()) => assert!(writable),
            Err(e) => assert!(
                !writable
                    && e.to_string().starts_with(&format!(
                        "--out {}: luo-vmm cannot create a file there: ",
                        ro.display()
                    )),
                "{e}"
            ),
        }
        match check_out(&ro.join("out")) {
            Ok(()) => assert!(writable, "a directory nobody may write in was accepted"),
            Err(e) => {
                assert!(!writable);
                let e = e.to_string();
                assert!(
                    e.starts_with(&format!(
                        "--out {}: luo-vmm cannot create a file in {}: ",
                        ro.join("out").display(),
                        ro.display()
                    )) && e.contains("denied"),
                    "{e}"
                );
            }
        }
        if Path::new("/proc/self").exists() {
            let e = check_out(Path::new("/proc/luo-vmm-out"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("--out /proc/luo-vmm-out: luo-vmm cannot create a file in /proc: "),
                "{e}"
            );
        }
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_run_stopped_before_its_first_trial_leaves_nothing_to_resume() {
        let dir = temp("afresh");
        let out = dir.join("out");
        let m = manifest();
        // The first run wrote its manifest and stopped (a kill while booting).
        let s = Store::open(&out, &m, false).unwrap();
        assert!(!s.started_afresh);
        drop(s);
        // A torn first line is no recorded trial either.
        std::fs::write(out.join("trials.jsonl"), "{\"id\":\"a\",\"tri").unwrap();
        let mut s = Store::open(&out, &m, false).unwrap();
        assert!(s.started_afresh);
        assert!(s.done.is_empty());
        assert_eq!(
            std::fs::read_to_string(out.join("trials.jsonl")).unwrap(),
            ""
        );
        // Another exploration with nothing recorded is still another exploration.
        let mut other = m.clone();
        other.seed = 2;
        let e = Store::open(&out, &other, false).err().unwrap().to_string();
        assert!(
            e.contains("holds another exploration (seed: 2 here, 1 there), with no trial recorded"),
            "{e}"
        );
        // Once a trial is recorded, going on needs --resume.
        s.append(record("a")).unwrap();
        drop(s);
        let e = Store::open(&out, &m, false).err().unwrap().to_string();
        assert!(e.contains("add --resume"), "{e}");
        let s = Store::open(&out, &m, true).unwrap();
        assert!(!s.started_afresh);
        assert_eq!(s.done.len(), 1);
        drop(s);
        // A finding's file counts as a result too.
        std::fs::write(out.join("trials.jsonl"), "").unwrap();
        std::fs::write(out.join("findings/01-x.toml"), "name = \"x\"").unwrap();
        let e = Store::open(&out, &m, false).err().unwrap().to_string();
        assert!(e.contains("add --resume"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error() {
        let good = serde_json::to_string(&record("a")).unwrap();
        assert!(parse_lines::<TrialRecord>(&format!("{good}\nnonsense\n{good}\n")).is_err());
        assert_eq!(
            parse_lines::<TrialRecord>(&format!("{good}\n{good}\n"))
                .unwrap()
                .len(),
            2
        );
    }
}
