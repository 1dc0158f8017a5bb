//! `luo-vmm soak`: boot a guest K times, P at a time, and count how many runs reached
//! a clean exit and every distinct way the others failed.
//!
//! Each boot is a child `luo-vmm boot` process with its console in a file, so a hung or
//! crashed guest never takes the soak down, and P > 1 oversubscribes the host cores the
//! way two guests side by side do. A failure's *signature* is its first telling console
//! or luo-vmm line with the numbers that change from run to run (timestamps, addresses,
//! PIDs) masked, so the same fault on another run or CPU counts once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum SoakError {
    /// Zero boots or zero parallel runs.
    #[error("soak: --boots and --parallel must be at least 1")]
    Empty,
    /// The log directory holds the logs of an earlier soak.
    #[error("soak: {0} already holds boot logs of an earlier soak; remove them or choose another --log-dir")]
    LogDirInUse(PathBuf),
    /// A host failure (spawning a child, the log directory).
    #[error("soak: {what}: {source}")]
    Host {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What one boot came to.
#[derive(Debug, Clone, PartialEq)]
pub struct BootResult {
    /// 1-based run number.
    pub run: u32,
    /// The child's exit status (`None`: killed by a signal).
    pub status: Option<i32>,
    /// `None` for a clean run, else the failure's signature.
    pub failure: Option<String>,
    /// Wall seconds.
    pub secs: f64,
    /// The console log of this run.
    pub console: PathBuf,
}

/// Console lines that say why a guest died, most specific first. The first one found
/// (in this order) is the signature.
const TELLING: [&str; 9] = [
    "segfault at",
    "Kernel panic - not syncing",
    "BUG:",
    "Oops",
    "WARNING:",
    "general protection fault",
    "traps:",
    "RIP:",
    "Code:",
];

/// Masks what differs between runs of the same failure: the timestamp, and every
/// number standing alone (hex or decimal: addresses, PIDs, CPU numbers; `on CPU 1` and
/// `on CPU 0` are one fault). Hex words of fewer than four letters-only digits (`add`,
/// `be`) are words, not numbers.
pub fn mask_numbers(line: &str) -> String {
    let line = match line.find("] ") {
        Some(i) if line.trim_start().starts_with('[') => &line[i + 2..],
        _ => line,
    };
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '0' && chars.peek() == Some(&'x') {
            chars.next();
            while chars.peek().is_some_and(char::is_ascii_hexdigit) {
                chars.next();
            }
            out.push_str("0x_");
        } else if c.is_ascii_hexdigit() && !out.ends_with(|p: char| p.is_ascii_alphanumeric()) {
            let mut word = String::from(c);
            while chars
                .peek()
                .is_some_and(|&n| n.is_ascii_hexdigit() || n == '_')
            {
                word.extend(chars.next());
            }
            let hex_like = word.len() >= 4 && word.chars().all(|c| c.is_ascii_hexdigit());
            let number = word.chars().all(|c| c.is_ascii_digit());
            if hex_like || number {
                out.push('N');
            } else {
                out.push_str(&word);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The signature of a failed run from its console and luo-vmm's stderr: the first
/// telling console line (see [`TELLING`]), else luo-vmm's last `luo-vmm:` line (after
/// "killed by a signal" when the child did not exit), else the exit status.
pub fn signature(console: &str, stderr: &str, status: Option<i32>) -> String {
    for needle in TELLING {
        if let Some(line) = console.lines().find(|l| l.contains(needle)) {
            return mask_numbers(line.trim());
        }
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("luo-vmm:"))
        .map(|l| mask_numbers(l.trim()));
    match (status, last) {
        (Some(_), Some(line)) => line,
        (Some(code), None) => format!("exit status {code}, nothing telling on the console"),
        (None, Some(line)) => format!("killed by a signal; last: {line}"),
        (None, None) => "killed by a signal".into(),
    }
}

/// How to run the soak.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// Boots in all.
    pub boots: u32,
    /// Boots at a time.
    pub parallel: u32,
    /// Arguments passed to every `luo-vmm boot` (vCPUs, memory, timeout, kernel...).
    pub boot_args: Vec<String>,
    /// Where the logs go: `boot-NNN.log` (console), `boot-NNN.vmm.log` (luo-vmm's own).
    pub log_dir: PathBuf,
}

impl SoakPlan {
    /// Errors: zero boots, or zero at a time.
    pub fn validate(&self) -> Result<(), SoakError> {
        if self.boots == 0 || self.parallel == 0 {
            return Err(SoakError::Empty);
        }
        Ok(())
    }
}

/// Runs `plan` with `exe` as the luo-vmm binary, printing one line per finished boot.
/// Returns every result, in run order.
pub fn run(exe: &Path, plan: &SoakPlan) -> Result<Vec<BootResult>, SoakError> {
    plan.validate()?;
    std::fs::create_dir_all(&plan.log_dir).map_err(|source| SoakError::Host {
        what: format!("creating {}", plan.log_dir.display()),
        source,
    })?;
    let earlier = std::fs::read_dir(&plan.log_dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("boot-"));
    if earlier {
        return Err(SoakError::LogDirInUse(plan.log_dir.clone()));
    }
    let next = Arc::new(Mutex::new(1u32));
    let (tx, rx) = channel();
    let mut workers = Vec::new();
    for _ in 0..plan.parallel.min(plan.boots) {
        let (next, tx, plan, exe) = (next.clone(), tx.clone(), plan.clone(), exe.to_owned());
        workers.push(thread::spawn(move || loop {
            let run = {
                let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                if *n > plan.boots {
                    return;
                }
                *n += 1;
                *n - 1
            };
            if tx.send(boot_once(&exe, &plan, run)).is_err() {
                return;
            }
        }));
    }
    drop(tx);
    let mut results = Vec::new();
    for r in rx {
        let r = r?;
        println!(
            "boot {:>3}/{}: {} in {:.1} s{}",
            r.run,
            plan.boots,
            if r.failure.is_none() {
                "ok    "
            } else {
                "FAILED"
            },
            r.secs,
            r.failure.as_ref().map_or(String::new(), |f| format!(
                ": {f} ({})",
                r.console.display()
            ))
        );
        results.push(r);
    }
    for w in workers {
        let _ = w.join();
    }
    results.sort_by_key(|r| r.run);
    Ok(results)
}

fn boot_once(exe: &Path, plan: &SoakPlan, run: u32) -> Result<BootResult, SoakError> {
    let console = plan.log_dir.join(format!("boot-{run:03}.log"));
    let _ = std::fs::remove_file(&console);
    let started = Instant::now();
    let out = Command::new(exe)
        .arg0("luo-vmm")
        .arg("boot")
        .args(&plan.boot_args)
        .arg("--quiet")
        .arg("--console-log")
        .arg(&console)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SoakError::Host {
            what: format!("running {} boot", exe.display()),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::write(console.with_extension("vmm.log"), out.stderr.as_slice());
    let text = std::fs::read(&console).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let status = out.status.code();
    let failure = (!out.status.success()).then(|| signature(&text, &stderr, status));
    Ok(BootResult {
        run,
        status,
        failure,
        secs: started.elapsed().as_secs_f64(),
        console,
    })
}

/// The closing summary: how many runs were clean, and each distinct failure signature
/// with its count and runs.
pub fn summary(results: &[BootResult]) -> String {
    let ok = results.iter().filter(|r| r.failure.is_none()).count();
    let mut failures: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for r in results {
        if let Some(f) = &r.failure {
            failures.entry(f).or_default().push(r.run);
        }
    }
    let mut out = format!(
        "soak: {ok} of {} boots reached a clean exit; {} failed",
        results.len(),
        results.len() - ok
    );
    if !failures.is_empty() {
        let _ = write!(out, " ({} distinct signatures)", failures.len());
    }
    out.push('\n');
    for (sig, runs) in failures {
        let runs: Vec<String> = runs.iter().map(u32::to_string).collect();
        let _ = writeln!(out, "  {}x {sig}  (runs {})", runs.len(), runs.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_what_changes_between_runs() {
        let a = "[   53.122418] init[1]: segfault at 0 ip 00007ff123cba552 sp 00007ffe52ba6b08 error 4 in init[a2552,7ff123c6b000+107000] likely on CPU 0 (core 0, socket 0)";
        let b = "[   61.000001] init[1]: segfault at 0 ip 00007f0000cba552 sp 00007ffd52ba6000 error 4 in init[a2552,7f0000c6b000+107000] likely on CPU 1 (core 1, socket 0)";
        assert_eq!(mask_numbers(a), mask_numbers(b));
        assert!(
            mask_numbers(a).starts_with("init[N]: segfault at N ip N"),
            "{}",
            mask_numbers(a)
        );
        assert_eq!(
            mask_numbers("RIP: 0010:native_apic_mem_eoi+0x6/0xe"),
            "RIP: N:native_apic_mem_eoi+0x_/0x_"
        );
    }

    #[test]
    fn signature_prefers_the_console() {
        let console = "[ 1.0] Run /init\n[ 53.1] init[1]: segfault at 0 ip 00007ff1 error 4\n[ 53.3] Kernel panic - not syncing: Attempted to kill init!";
        assert!(
            signature(console, "luo-vmm: the guest kernel panicked", Some(1))
                .starts_with("init[N]: segfault at N")
        );
        assert_eq!(
            signature(
                "",
                "luo-vmm: starting\nluo-vmm: guest did not finish within 600 s (timeout)",
                Some(3)
            ),
            "luo-vmm: guest did not finish within N s (timeout)"
        );
        assert_eq!(
            signature("", "", Some(2)),
            "exit status 2, nothing telling on the console"
        );
        assert_eq!(signature("", "", None), "killed by a signal");
        assert_eq!(
            signature(
                "",
                "luo-vmm: guest agent up 98.5 s after VM start, 4 CPUs online",
                None
            ),
            "killed by a signal; last: luo-vmm: guest agent up N.N s after VM start, N CPUs online"
        );
    }

    #[test]
    fn summary_groups_signatures() {
        let r = |run, failure: Option<&str>| BootResult {
            run,
            status: Some(if failure.is_some() { 1 } else { 0 }),
            failure: failure.map(Into::into),
            secs: 1.0,
            console: PathBuf::from("x"),
        };
        let s = summary(&[r(1, None), r(2, Some("A")), r(3, None), r(4, Some("A"))]);
        assert!(s.starts_with(
            "soak: 2 of 4 boots reached a clean exit; 2 failed (1 distinct signatures)"
        ));
        assert!(s.contains("  2x A  (runs 2, 4)"));
        assert_eq!(
            summary(&[r(1, None)]),
            "soak: 1 of 1 boots reached a clean exit; 0 failed\n"
        );
    }

    #[test]
    fn an_earlier_soak_s_logs_are_not_mixed_in() {
        let dir = std::env::temp_dir().join(format!("luo-soak-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("boot-001.log"), "old").unwrap();
        let plan = SoakPlan {
            boots: 1,
            parallel: 1,
            boot_args: vec![],
            log_dir: dir.clone(),
        };
        assert!(matches!(
            run(Path::new("/nonexistent"), &plan),
            Err(SoakError::LogDirInUse(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_plan_is_refused() {
        let plan = SoakPlan {
            boots: 0,
            parallel: 1,
            boot_args: vec![],
            log_dir: PathBuf::from("/nonexistent"),
        };
        assert!(matches!(run(Path::new("x"), &plan), Err(SoakError::Empty)));
    }
}
