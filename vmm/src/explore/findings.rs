//! What an exploration found, from its trial records: findings grouped by signature (the
//! first trial of each is its representative), totals and times, the final table, and a
//! plot of trials and findings over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::explore::space::Trial;
use crate::explore::store::TrialRecord;
use crate::judge::explore::{Signature, TrialVerdict};

/// The trials of one signature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// 1-based, in the order found.
    pub number: usize,
    /// What makes it one finding.
    pub signature: Signature,
    /// Its representative trial (the one its scenario file reproduces): the first trial
    /// found with a deterministic schedule (a race released when the call settled, or a
    /// failing function), else the first found.
    pub first: String,
    /// How often the representative gave the same signature when run again from the
    /// snapshot (`k/n`), once confirmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<String>,
    /// Every trial that gave it.
    pub trials: Vec<String>,
    /// The evidence of the first trial.
    pub because: Vec<String>,
    /// Its first trial's console log (relative to `--out`).
    pub log: Option<String>,
    /// The scenario file (relative to `--out`).
    pub scenario: String,
}

/// The file name of finding `number` with `signature`: `01-records-differ-close-session`.
pub fn slug(number: usize, signature: &Signature) -> String {
    let mut out = format!("{number:02}-{}-{}", signature.oracle, signature.cause);
    out = out
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_end_matches('-').chars().take(60).collect()
}

/// Whether `trial`'s schedule does not depend on host time (a hold released after a
/// time does).
pub fn deterministic(trial: &Trial) -> bool {
    !matches!(
        trial,
        Trial::Race {
            release: crate::explore::space::Release::AfterMs(_),
            ..
        }
    )
}

/// The findings of `records`, one per signature, in the order first found.
pub fn group(records: &[TrialRecord]) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut index: BTreeMap<Signature, usize> = BTreeMap::new();
    for r in records {
        let TrialVerdict::Finding { signature, because } = &r.verdict else {
            continue;
        };
        match index.get(signature) {
            Some(&i) => {
                let f = &mut out[i];
                f.trials.push(r.id.clone());
                let first_timed = records
                    .iter()
                    .find(|x| x.id == f.first)
                    .is_some_and(|x| !deterministic(&x.trial));
                if first_timed && deterministic(&r.trial) {
                    f.first = r.id.clone();
                    f.because = because.clone();
                    f.log = r.log.clone();
                }
            }
            None => {
                let number = out.len() + 1;
                index.insert(signature.clone(), out.len());
                out.push(Finding {
                    number,
                    signature: signature.clone(),
                    first: r.id.clone(),
                    confirmed: None,
                    trials: vec![r.id.clone()],
                    because: because.clone(),
                    log: r.log.clone(),
                    scenario: format!("findings/{}.toml", slug(number, signature)),
                });
            }
        }
    }
    out
}

/// Host time of the trials' parts, mean per trial, in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeanTimes {
    /// Reset to the snapshot.
    pub reset_ms: f64,
    /// The run to the decision.
    pub run_ms: f64,
    /// Judging.
    pub judge_ms: f64,
}

/// Totals of an exploration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    /// Map trials (where the workload goes).
    pub map: usize,
    /// Search trials done.
    pub search: usize,
    /// Search trials in the space.
    pub space: usize,
    /// Passed.
    pub passed: usize,
    /// Gave a finding.
    pub findings: usize,
    /// Undecided.
    pub undecided: usize,
    /// Seconds of exploring.
    pub seconds: f64,
    /// Trials (map and search) per hour.
    pub trials_per_hour: f64,
    /// Mean times of the trials that started from the snapshot.
    pub mean: MeanTimes,
}

/// Counts `records` (of a space of `space` search trials).
pub fn totals(records: &[TrialRecord], space: usize) -> Totals {
    let map = records
        .iter()
        .filter(|r| {
            matches!(
                r.trial,
                Trial::Map { .. } | Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot
            )
        })
        .count();
    let count = |f: fn(&TrialVerdict) -> bool| records.iter().filter(|r| f(&r.verdict)).count();
    let seconds = records.iter().map(|r| r.at_s).fold(0.0, f64::max);
    // The trials that started from a snapshot (not the ones that booted).
    let reset: Vec<&TrialRecord> = records
        .iter()
        .filter(|r| {
            !matches!(
                r.trial,
                Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot
            )
        })
        .collect();
    let mean = |f: fn(&TrialRecord) -> u64| {
        if reset.is_empty() {
            0.0
        } else {
            reset.iter().map(|r| f(r) as f64).sum::<f64>() / reset.len() as f64 / 1e6
        }
    };
    Totals {
        map,
        search: records.len() - map,
        space,
        passed: count(|v| matches!(v, TrialVerdict::Pass { .. })),
        findings: count(|v| matches!(v, TrialVerdict::Finding { .. })),
        undecided: count(|v| matches!(v, TrialVerdict::Undecided { .. })),
        seconds,
        trials_per_hour: if seconds > 0.0 {
            records.len() as f64 * 3600.0 / seconds
        } else {
            0.0
        },
        mean: MeanTimes {
            reset_ms: mean(|r| r.times.reset_ns),
            run_ms: mean(|r| r.times.run_ns),
            judge_ms: mean(|r| r.times.judge_ns),
        },
    }
}

/// The final table.
pub fn table(findings: &[Finding], t: &Totals) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trials: {} boot and map + {} search of {} ({} passed, {} with a finding, {} undecided) in {:.0} s: {:.0} trials/hour",
        t.map, t.search, t.space, t.passed, t.findings, t.undecided, t.seconds, t.trials_per_hour
    );
    let _ = writeln!(
        out,
        "per trial (from the snapshot, mean): reset {:.1} ms, run to the decision {:.0} ms, judging {:.1} ms",
        t.mean.reset_ms, t.mean.run_ms, t.mean.judge_ms
    );
    if findings.is_empty() {
        out.push_str("findings: none\n");
        return out;
    }
    let _ = writeln!(out, "findings: {}", findings.len());
    let _ = writeln!(
        out,
        "  {:<3} {:<15} {:<28} {:<52} {:>6} {:>9}  scenario",
        "#", "oracle", "cause", "where", "trials", "confirmed"
    );
    for f in findings {
        // Cut to its column, marked (the whole is in the scenario file and report.json).
        let site: String = match f.signature.site.chars().count() {
            n if n > 52 => f.signature.site.chars().take(51).chain(['…']).collect(),
            _ => f.signature.site.clone(),
        };
        let _ = writeln!(
            out,
            "  {:<3} {:<15} {:<28} {:<52} {:>6} {:>9}  {}",
            f.number,
            f.signature.oracle.to_string(),
            f.signature.cause,
            site,
            f.trials.len(),
            f.confirmed.as_deref().unwrap_or("-"),
            f.scenario
        );
    }
    out
}

/// An SVG of cumulative trials and findings over exploring time.
pub fn plot(records: &[TrialRecord], title: &str) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 360.0, 60.0, 40.0, 40.0, 60.0);
    let t_max = records.iter().map(|r| r.at_s).fold(1.0, f64::max);
    let n = records.len().max(1) as f64;
    let mut finds = 0usize;
    let mut trials_pts = String::new();
    let mut find_pts = String::new();
    let f_max = records
        .iter()
        .filter(|r| matches!(r.verdict, TrialVerdict::Finding { .. }))
        .count()
        .max(1) as f64;
    let x = |t: f64| left + (w - left - right) * t / t_max;
    let y = |v: f64, max: f64| h - bottom - (h - bottom - top) * v / max;
    for (i, r) in records.iter().enumerate() {
        if matches!(r.verdict, TrialVerdict::Finding { .. }) {
            finds += 1;
        }
        let _ = write!(trials_pts, "{:.1},{:.1} ", x(r.at_s), y((i + 1) as f64, n));
        let _ = write!(find_pts, "{:.1},{:.1} ", x(r.at_s), y(finds as f64, f_max));
    }
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="14">{title}</text>
<line x1="{left}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{yb}" stroke="black"/>
<line x1="{xr}" y1="{top}" x2="{xr}" y2="{yb}" stroke="black"/>
<text x="{xm}" y="{h2}" text-anchor="middle">exploring time (s), 0 to {t_max:.0}</text>
<text x="10" y="{top}" fill="#1f77b4">trials</text>
<text x="10" y="{t2}" fill="#1f77b4">{n:.0}</text>
<text x="{xr2}" y="{top}" fill="#d62728">findings</text>
<text x="{xr2}" y="{t2}" fill="#d62728">{f_max:.0}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{trials_pts}"/>
<polyline fill="none" stroke="#d62728" stroke-width="2" points="{find_pts}"/>
</svg>
"##,
        title = esc(title),
        yb = h - bottom,
        xr = w - right,
        xm = (w + left - right) / 2.0,
        h2 = h - 10.0,
        t2 = top + 16.0,
        xr2 = w - right + 4.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::explore::Oracle;
    use crate::trial::RunTimes;

    fn rec(id: &str, at: f64, verdict: TrialVerdict) -> TrialRecord {
        TrialRecord {
            id: id.into(),
            trial: Trial::Fail {
                failure: Default::default(),
                boot: false,
                function: id.into(),
                call: 1,
                with: None,
                stage2: false,
            },
            verdict,
            hits: None,
            times: RunTimes {
                reset_ns: 5_000_000,
                run_ns: 2_000_000_000,
                judge_ns: 1_000_000,
            },
            at_s: at,
            log: Some(format!("logs/{id}.log")),
        }
    }

    fn finding(site: &str) -> TrialVerdict {
        TrialVerdict::Finding {
            signature: Signature {
                oracle: Oracle::Hang,
                site: site.into(),
                cause: "fail luo_file_freeze".into(),
            },
            because: vec![site.into()],
        }
    }

    #[test]
    fn a_finding_is_represented_by_a_deterministic_schedule() {
        use crate::explore::space::Release;
        let race = |id: &str, release| TrialRecord {
            trial: Trial::Race {
                point: "p".into(),
                call: 0,
                release,
                stage2: false,
                on_racer: false,
            },
            ..rec(id, 1.0, finding("x"))
        };
        let records = vec![
            race("timed", Release::AfterMs(2000)),
            race("settled", Release::Settled),
            race("settled-too", Release::Settled),
        ];
        let f = group(&records);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].first, "settled");
        assert_eq!(f[0].trials, ["timed", "settled", "settled-too"]);
    }

    #[test]
    fn findings_group_by_signature_in_the_order_found() {
        let records = vec![
            rec("a", 1.0, TrialVerdict::Pass { because: vec![] }),
            rec("b", 2.0, finding("preserve-fd blocked")),
            rec("c", 3.0, finding("preserve-fd blocked")),
            rec("d", 4.0, finding("close-session blocked")),
        ];
        let f = group(&records);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].first, "b");
        assert_eq!(f[0].trials, ["b", "c"]);
        assert_eq!(f[0].scenario, "findings/01-hang-fail-luo-file-freeze.toml");
        assert_eq!(f[1].number, 2);
        let t = totals(&records, 10);
        assert_eq!((t.search, t.passed, t.findings), (4, 1, 3));
        assert!((t.trials_per_hour - 3600.0).abs() < 1e-6);
        assert!((t.mean.run_ms - 2000.0).abs() < 1e-6);
        let text = table(&f, &t);
        assert!(text.contains("findings: 2"), "{text}");
        let svg = plot(&records, "a <test>");
        assert!(svg.contains("&lt;test&gt;") && svg.contains("<polyline"));
    }

    #[test]
    fn both_baselines_count_as_boots_not_search_trials_nor_resets() {
        let pass = || TrialVerdict::Pass { because: vec![] };
        let mut records = vec![
            rec("baseline", 1.0, pass()),
            rec("baseline2", 2.0, pass()),
            rec("fail", 3.0, pass()),
        ];
        records[0].trial = Trial::Baseline;
        records[1].trial = Trial::Baseline2;
        for r in &mut records[..2] {
            r.times.run_ns = 100_000_000_000;
        }
        let t = totals(&records, 1);
        assert_eq!((t.map, t.search), (2, 1));
        // The boots' 100 s runs are not a trial from the snapshot.
        assert!((t.mean.run_ms - 2000.0).abs() < 1e-6, "{}", t.mean.run_ms);
    }
}
