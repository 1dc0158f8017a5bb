//! `luo-vmm report`: many handover JSON reports turned into one table and one picture
//! (blackout per phase, stacked, for each run), both built by pure functions.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use luo_handover::timeline::{human_bytes, human_duration, HandoverReport};
use serde::Deserialize;
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum SummaryError {
    /// A report could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A report is not a luo-vmm handover report.
    #[error("{path} is not a luo-vmm handover report: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// Writing the picture failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The parts of a `luo-vmm handover --json` report the summary needs.
#[derive(Debug, Clone, Deserialize)]
pub struct SavedReport {
    /// Every handover of the run.
    pub rounds: Vec<HandoverReport>,
    /// What ran.
    pub run: SavedRun,
}

/// The run parameters of a saved report.
#[derive(Debug, Clone, Deserialize)]
pub struct SavedRun {
    /// The workload's kernel parameters (`luo.sessions=...`).
    pub workload: String,
    /// `hardware` or `emulated`.
    pub kvm: String,
}

/// One run, averaged over its handovers.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Label: sessions x files x memfd size.
    pub label: String,
    /// Bytes preserved per handover (sessions x files x memfd size) for ordering.
    pub bytes: u64,
    /// Number of handovers that had a blackout.
    pub handovers: usize,
    /// Mean duration of each phase, in phase order.
    pub phases: Vec<(String, u64)>,
    /// Mean blackout.
    pub blackout_ns: u64,
    /// Which KVM.
    pub kvm: String,
}

fn param(workload: &str, key: &str) -> Option<u64> {
    workload
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Averages one report's handovers.
pub fn summarize(report: &SavedReport) -> RunSummary {
    let w = &report.run.workload;
    let (sessions, files, size) = (
        param(w, "luo.sessions").unwrap_or(1),
        param(w, "luo.files").unwrap_or(1),
        param(w, "luo.memfd_size").unwrap_or(0),
    );
    let complete: Vec<&HandoverReport> = report
        .rounds
        .iter()
        .filter(|r| r.blackout_ns.is_some())
        .collect();
    let n = complete.len().max(1) as u64;
    let mut phases: Vec<(String, u64)> = Vec::new();
    for r in &complete {
        for p in &r.phases {
            match phases.iter_mut().find(|(name, _)| *name == p.name) {
                Some((_, sum)) => *sum += p.duration_ns,
                None => phases.push((p.name.clone(), p.duration_ns)),
            }
        }
    }
    for (_, sum) in &mut phases {
        *sum /= n;
    }
    let mode = w
        .split_whitespace()
        .find_map(|p| p.strip_prefix("luo.mode="))
        .unwrap_or("handover");
    let label = match mode {
        "handover" => format!("{sessions}x{files}x{}", human_bytes(size).replace(' ', "")),
        other => other.to_owned(),
    };
    RunSummary {
        label,
        bytes: sessions * files * size,
        handovers: complete.len(),
        blackout_ns: complete.iter().filter_map(|r| r.blackout_ns).sum::<u64>() / n,
        phases,
        kvm: report.run.kvm.clone(),
    }
}

/// Reads and summarises report files, ordered by preserved bytes.
pub fn load(paths: &[PathBuf]) -> Result<Vec<RunSummary>, SummaryError> {
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| SummaryError::Read {
            path: path.clone(),
            source,
        })?;
        let report: SavedReport =
            serde_json::from_str(&text).map_err(|source| SummaryError::Parse {
                path: path.clone(),
                source,
            })?;
        let mut run = summarize(&report);
        // The file's name says what the workload alone does not (e.g. "1M-no-intercept").
        if let Some(stem) = path.file_stem() {
            run.label = format!("{} ({})", stem.to_string_lossy(), run.label);
        }
        out.push(run);
    }
    out.sort_by(|a, b| a.bytes.cmp(&b.bytes).then_with(|| a.label.cmp(&b.label)));
    Ok(out)
}

/// The text table: one row per run, one column per phase, then the blackout.
pub fn table(runs: &[RunSummary]) -> String {
    let names = phase_names(runs);
    let mut s = String::new();
    let _ = write!(
        s,
        "{:<32} {:>4} {:>9}",
        "run (sessions x files x size)", "n", "kvm"
    );
    for n in &names {
        let _ = write!(s, " {n:>16}");
    }
    let _ = writeln!(s, " {:>12}", "blackout");
    for r in runs {
        let _ = write!(s, "{:<32} {:>4} {:>9}", r.label, r.handovers, r.kvm);
        for n in &names {
            let d = r.phases.iter().find(|(p, _)| p == n).map_or(0, |(_, d)| *d);
            let _ = write!(s, " {:>16}", human_duration(d));
        }
        let _ = writeln!(s, " {:>12}", human_duration(r.blackout_ns));
    }
    s
}

fn phase_names(runs: &[RunSummary]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        for (n, _) in &r.phases {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
}

/// Horizontal distance between bars in the picture.
const BAR_PITCH: f64 = 150.0;

const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
];

/// An SVG of stacked bars: one bar per run, one segment per phase, height = duration.
pub fn svg(runs: &[RunSummary], title: &str) -> String {
    let names = phase_names(runs);
    let (h, left, bottom, top) = (420.0, 80.0, 60.0, 40.0);
    let bars_end = left + 20.0 + BAR_PITCH * runs.len() as f64;
    let w = bars_end + 240.0;
    let max = runs
        .iter()
        .map(|r| r.phases.iter().map(|p| p.1).sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let scale = (h - bottom - top) / max;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        xml_escape(title)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - bottom,
        bars_end,
        h - bottom
    );
    for tick in 0..=4 {
        let v = max * f64::from(tick) / 4.0;
        let y = h - bottom - v * scale;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{y:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            human_duration(v as u64)
        );
    }
    for (i, r) in runs.iter().enumerate() {
        let x = left + 20.0 + BAR_PITCH * i as f64;
        let mut y = h - bottom;
        for (k, n) in names.iter().enumerate() {
            let d = r.phases.iter().find(|(p, _)| p == n).map_or(0, |(_, d)| *d) as f64 * scale;
            y -= d;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{y:.1}" width="70" height="{d:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                COLOURS[k % COLOURS.len()],
                xml_escape(n),
                human_duration((d / scale) as u64)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x + 35.0,
            h - bottom + 18.0,
            xml_escape(&r.label)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x + 35.0,
            h - bottom + 34.0,
            human_duration(r.blackout_ns)
        );
    }
    for (k, n) in names.iter().enumerate() {
        let y = top + 20.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{y}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            bars_end + 20.0,
            COLOURS[k % COLOURS.len()],
            bars_end + 38.0,
            y + 10.0,
            xml_escape(n)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes the SVG.
pub fn write_svg(path: &Path, content: &str) -> Result<(), SummaryError> {
    std::fs::write(path, content).map_err(|source| SummaryError::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(size: u64, blackouts: &[(u64, u64)]) -> SavedReport {
        let rounds = blackouts
            .iter()
            .map(|&(a, b)| HandoverReport {
                blackout_ns: Some(a + b),
                phases: vec![
                    luo_handover::timeline::Phase {
                        name: "kexec-jump".into(),
                        t_ns: 0,
                        duration_ns: a,
                    },
                    luo_handover::timeline::Phase {
                        name: "kernel-boot".into(),
                        t_ns: a,
                        duration_ns: b,
                    },
                ],
                ..Default::default()
            })
            .collect();
        SavedReport {
            rounds,
            run: SavedRun {
                workload: format!("liveupdate=1 luo.mode=handover luo.sessions=2 luo.files=1 luo.memfd_size={size} luo.repeat=2"),
                kvm: "emulated".into(),
            },
        }
    }

    #[test]
    fn averages_rounds_and_orders_by_size() {
        let s = summarize(&report(1 << 20, &[(100, 300), (300, 500)]));
        assert_eq!(s.handovers, 2);
        assert_eq!(s.blackout_ns, 600);
        assert_eq!(
            s.phases,
            vec![("kexec-jump".into(), 200), ("kernel-boot".into(), 400)]
        );
        assert_eq!(s.bytes, 2 << 20);
        assert_eq!(s.label, "2x1x1.0MiB");
        let t = table(std::slice::from_ref(&s));
        assert!(t.contains("kexec-jump") && t.contains("2x1x1.0MiB"));
    }

    #[test]
    fn svg_has_one_bar_segment_per_phase_and_run() {
        let runs = vec![
            summarize(&report(1 << 20, &[(100, 300)])),
            summarize(&report(16 << 20, &[(200, 900)])),
        ];
        let svg = svg(&runs, "blackout <by> phase");
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect x=").count(), 4 + 2);
        assert!(svg.contains("&lt;by&gt;"));
    }
}
