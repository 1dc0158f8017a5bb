//! An exploration's results on disk (`--out DIR`), kept so that `--resume` goes on
//! without repeating a finished trial and an interrupted run is never mistaken for a
//! complete one:
//!
//! - `manifest.json`: what is explored (luo-vmm version, kernel image key, workload,
//!   options that change the trial list); written once, atomically (temporary file,
//!   rename); a resume must match it field for field.
//! - `trials.jsonl`: one [`TrialRecord`] per line, appended and flushed to disk after each
//!   trial; a line cut short by a kill is ignored (that trial runs again).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::explore::space::{Mode, Release, Trial};
use crate::judge::explore::TrialVerdict;
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
        let a = serde_json::to_value(self).ok()?;
        let b = serde_json::to_value(other).ok()?;
        let (a, b) = (a.as_object()?, b.as_object()?);
        a.iter().find_map(|(k, v)| {
            let w = b.get(k).unwrap_or(&serde_json::Value::Null);
            (v != w).then(|| format!("{k}: {v} here, {w} there"))
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

/// The results directory.
pub struct Store {
    dir: PathBuf,
    trials: File,
    /// Trials already finished (read back on `--resume`).
    pub done: Vec<TrialRecord>,
}

impl Store {
    /// Opens `dir` for `manifest`: a new exploration (refused if `dir` holds one and
    /// `resume` is not set), or, with `resume`, the one there (refused if its manifest
    /// differs). Checks that `dir` can be written before any guest boots.
    pub fn open(dir: &Path, manifest: &Manifest, resume: bool) -> Result<Store, StoreError> {
        if resume && !dir.join("manifest.json").exists() {
            return Err(StoreError::Refused(format!(
                "--resume: {} holds no exploration to go on with",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            path: dir.to_owned(),
            why: format!("--out: {e}"),
        })?;
        let mpath = dir.join("manifest.json");
        let tpath = dir.join("trials.jsonl");
        let mut done = Vec::new();
        if mpath.exists() {
            let text = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
            let old: Manifest = serde_json::from_str(&text).map_err(|e| StoreError::Io {
                path: mpath.clone(),
                why: format!("not an exploration's manifest: {e}"),
            })?;
            if !resume {
                return Err(StoreError::Refused(format!(
                    "--out {}: holds an exploration already (luo-vmm {}, {}): add --resume to go on with it, or give another --out",
                    dir.display(),
                    old.luo_vmm,
                    old.kernel
                )));
            }
            if let Some(m) = manifest.mismatch(&old) {
                return Err(StoreError::Refused(format!(
                    "--resume {}: another exploration ({m}); give another --out",
                    dir.display()
                )));
            }
            if tpath.exists() {
                done = read_trials(&tpath)?;
                // A line cut short by a kill is dropped from the file too, so that the
                // next record starts a line of its own.
                let text = std::fs::read(&tpath).map_err(io(&tpath))?;
                let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if keep < text.len() {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&tpath)
                        .map_err(io(&tpath))?;
                    f.set_len(keep as u64).map_err(io(&tpath))?;
                }
            }
        } else {
            if resume {
                return Err(StoreError::Refused(format!(
                    "--resume: {} holds no exploration to go on with",
                    dir.display()
                )));
            }
            let text = serde_json::to_string_pretty(manifest).map_err(|e| StoreError::Io {
                path: mpath.clone(),
                why: e.to_string(),
            })?;
            write_atomic(&mpath, text.as_bytes())?;
            // A stale trials file or plan of an exploration whose manifest was lost is not
            // ours.
            let _ = std::fs::remove_file(&tpath);
            let _ = std::fs::remove_file(dir.join("plan.json"));
        }
        let trials = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tpath)
            .map_err(io(&tpath))?;
        for sub in ["findings", "logs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        Ok(Store {
            dir: dir.to_owned(),
            trials,
            done,
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
        let path = self.dir.join("trials.jsonl");
        let mut line = serde_json::to_string(&record).map_err(|e| StoreError::Io {
            path: path.clone(),
            why: e.to_string(),
        })?;
        line.push('\n');
        self.trials.write_all(line.as_bytes()).map_err(io(&path))?;
        self.trials.sync_data().map_err(io(&path))?;
        self.done.push(record);
        Ok(())
    }
}

/// The records of `path`; a last line cut short (a killed run) is dropped, any other bad
/// line is an error.
pub fn read_trials(path: &Path) -> Result<Vec<TrialRecord>, StoreError> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    if len > MAX_TRIALS_FILE {
        return Err(StoreError::Io {
            path: path.to_owned(),
            why: format!("larger than {MAX_TRIALS_FILE} bytes"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_trials(&text).map_err(|why| StoreError::Io {
        path: path.to_owned(),
        why,
    })
}

/// Parses `trials.jsonl`'s text (see [`read_trials`]).
pub fn parse_trials(text: &str) -> Result<Vec<TrialRecord>, String> {
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<TrialRecord>(line) {
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

    #[test]
    fn a_bad_line_in_the_middle_is_an_error() {
        let good = serde_json::to_string(&record("a")).unwrap();
        assert!(parse_trials(&format!("{good}\nnonsense\n{good}\n")).is_err());
        assert_eq!(parse_trials(&format!("{good}\n{good}\n")).unwrap().len(), 2);
    }
}
