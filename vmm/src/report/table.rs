//! `luo-vmm report`: many run reports turned into one table and one picture (blackout
//! per phase, stacked, for each run), both built by pure functions.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use luo_handover::timeline::{human_bytes, human_duration};
use luo_protocol::workload::{AgentConfig, Workload};

use super::{read_json, ReportError, RunReport};

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
    /// The verdicts of its injected rounds (`reused`, `rejected`, ...), distinct, in
    /// order; empty when nothing was injected.
    pub verdicts: Vec<String>,
}

/// The exact mean of `values` (nanoseconds), rounded down; 0 for none. Summed in `u128`, so
/// durations near `u64::MAX` neither overflow nor saturate (a mean of `u64`s fits a `u64`).
fn mean(values: impl IntoIterator<Item = u64>) -> u64 {
    let (sum, n) = values
        .into_iter()
        .fold((0u128, 0u128), |(sum, n), v| (sum + u128::from(v), n + 1));
    u64::try_from(sum / n.max(1)).unwrap_or(u64::MAX)
}

/// Averages one report's handovers.
pub fn summarize(report: &RunReport) -> RunSummary {
    let workload = AgentConfig::parse(&report.run.workload).map(|c| c.workload);
    let complete: Vec<_> = report
        .rounds
        .iter()
        .map(|r| &r.handover)
        .filter(|r| r.blackout_ns.is_some())
        .collect();
    // Each phase's mean over the handovers that had it, in order of first appearance.
    let mut durations: Vec<(String, Vec<u64>)> = Vec::new();
    for r in &complete {
        for p in &r.phases {
            match durations.iter_mut().find(|(name, _)| *name == p.name) {
                Some((_, ds)) => ds.push(p.duration_ns),
                None => durations.push((p.name.clone(), vec![p.duration_ns])),
            }
        }
    }
    let phases = durations
        .into_iter()
        .map(|(name, ds)| (name, mean(ds)))
        .collect();
    let (label, bytes) = match workload {
        Ok(Workload::Handover(m)) => (
            format!(
                "{}x{}x{}",
                m.sessions,
                m.files,
                human_bytes(m.memfd_size).replace(' ', "")
            ),
            m.total_bytes(),
        ),
        Ok(Workload::Selftest(t)) => (t.name().to_owned(), 0),
        Ok(Workload::Boot) => ("boot".to_owned(), 0),
        Ok(Workload::Scenario) => ("scenario".to_owned(), 0),
        Err(e) => (format!("unknown workload ({e})"), 0),
    };
    let mut verdicts: Vec<String> = Vec::new();
    for v in report.rounds.iter().filter_map(|r| r.outcome.as_ref()) {
        let name = v.verdict.name().to_owned();
        if !verdicts.contains(&name) {
            verdicts.push(name);
        }
    }
    RunSummary {
        label,
        bytes,
        verdicts,
        handovers: complete.len(),
        blackout_ns: mean(complete.iter().filter_map(|r| r.blackout_ns)),
        phases,
        kvm: report.run.kvm.clone(),
    }
}

/// Reads and summarises report files, ordered by preserved bytes.
pub fn load(paths: &[PathBuf]) -> Result<Vec<RunSummary>, ReportError> {
    let mut out = Vec::new();
    for path in paths {
        let report = read_json(path)?;
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
    let _ = writeln!(s, " {:>12}  verdict", "blackout");
    for r in runs {
        let _ = write!(s, "{:<32} {:>4} {:>9}", r.label, r.handovers, r.kvm);
        // A phase (or blackout) no handover of the run had is "-", not 0 ns.
        for n in &names {
            let d = r.phases.iter().find(|(p, _)| p == n).map(|(_, d)| *d);
            let _ = write!(
                s,
                " {:>16}",
                d.map_or_else(|| "-".to_owned(), human_duration)
            );
        }
        let blackout = if r.handovers == 0 {
            "-".to_owned()
        } else {
            human_duration(r.blackout_ns)
        };
        let verdict = if r.verdicts.is_empty() {
            "-".to_owned()
        } else {
            r.verdicts.join(",")
        };
        let _ = writeln!(s, " {blackout:>12}  {verdict}");
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

/// A duration computed in `f64` for the picture, back in whole nanoseconds.
fn ns_of(v: f64) -> u64 {
    // Scaled sums of u64 durations: finite and non-negative; `as` saturates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let ns = v.round() as u64;
    ns
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
        .map(|r| r.phases.iter().map(|p| p.1).fold(0u64, u64::saturating_add))
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
            human_duration(ns_of(v))
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
                human_duration(ns_of(d / scale))
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
pub fn write_svg(path: &Path, content: &str) -> Result<(), ReportError> {
    std::fs::write(path, content).map_err(|source| ReportError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use luo_handover::timeline::{HandoverReport, Phase};

    fn report(size: u64, blackouts: &[(u64, u64)]) -> RunReport {
        let rounds = blackouts
            .iter()
            .map(|&(a, b)| super::super::RoundReport {
                handover: HandoverReport {
                    blackout_ns: Some(a + b),
                    phases: vec![
                        Phase {
                            name: "kexec-jump".into(),
                            t_ns: 0,
                            duration_ns: a,
                        },
                        Phase {
                            name: "kernel-boot".into(),
                            t_ns: a,
                            duration_ns: b,
                        },
                    ],
                    ..Default::default()
                },
                marks: vec![],
                extent_list: vec![],
                hook_ns: 0,
                hooks: Vec::new(),
                cpus_online: super::super::CpusOnline {
                    vcpus: 1,
                    before: Some(1),
                    after: Some(1),
                },
                inventory: None,
                checked: None,
                selftest: None,
                failed_actions: vec![],
                injected: None,
                injections: vec![],
                outcome: None,
                kernels: None,
                cross: None,
                fields: vec![],
                invariants: vec![],
                errors: vec![],
                agent_ok: true,
                verified: true,
            })
            .collect();
        RunReport {
            run: super::super::RunInfo {
                kvm: "emulated".into(),
                kernel: None,
                vcpus: 1,
                mem_bytes: 512 << 20,
                peak_rss_bytes: None,
                workload: Workload::Handover(luo_protocol::workload::Memfds {
                    sessions: 2,
                    files: 1,
                    memfd_size: size,
                    repeat: 2,
                })
                .kernel_params(),
            },
            rounds,
            selftests: vec![],
            agent: super::super::AgentSummary {
                cpus_online: Some(1),
                verdict: Some("pass".into()),
                errno: 0,
                messages: 0,
                decode_errors: 0,
                dropped: 0,
            },
            guest_ok: true,
            errors: vec![],
            verified: true,
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
        assert!(t.lines().nth(1).is_some_and(|l| l.ends_with("  -")), "{t}");
        // A run without a complete handover shows "-" for what it lacks, and a verdict.
        let mut none = report(1 << 20, &[]);
        none.rounds = report(1 << 20, &[(100, 300)]).rounds;
        none.rounds[0].handover.blackout_ns = None;
        none.rounds[0].outcome = Some(crate::report::InjectionOutcome {
            verdict: crate::report::InjectionVerdict::Reused,
            reason: String::new(),
            agent_step: None,
            agent_errno: 0,
            received: None,
            kernel: vec![],
            leak: None,
        });
        let t = table(&[summarize(&none), s.clone()]);
        let row = t
            .lines()
            .find(|l| l.starts_with("2x1x1.0MiB") && l.contains("reused"));
        assert!(
            row.is_some_and(|l| l.contains(" -") && !l.contains("0 ns")),
            "{t}"
        );
        // Durations near u64::MAX neither overflow nor saturate the means.
        let big = summarize(&report(
            1,
            &[(u64::MAX / 2, u64::MAX / 2), (u64::MAX / 2, 1)],
        ));
        assert_eq!(big.handovers, 2);
        // ((2^64 - 2) + 2^63) / 2, which a saturating u64 sum got wrong.
        assert_eq!(big.blackout_ns, (3 << 62) - 1);
        assert_eq!(
            big.phases,
            vec![
                ("kexec-jump".into(), u64::MAX / 2),
                ("kernel-boot".into(), u64::MAX / 4 + 1)
            ]
        );
        let t = table(std::slice::from_ref(&big));
        assert!(t.contains("2x1x1B"), "{t}");
        // The picture stacks phases whose sum exceeds u64::MAX.
        assert!(svg(&[big], "big").contains("<rect"));
        assert_eq!(mean([u64::MAX, u64::MAX, u64::MAX]), u64::MAX);
        assert_eq!(mean([]), 0);
    }

    #[test]
    fn reports_written_are_read_back() {
        let r = report(1 << 20, &[(100, 300)]);
        let path = std::env::temp_dir().join(format!("luo-report-{}.json", std::process::id()));
        crate::report::write_json(&r, &path).unwrap();
        let back = read_json(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, r);
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
