//! The handover timeline: marks with host-monotonic timestamps, the phases between them, the
//! blackout, and the [`HandoverReport`].

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::digest::DigestVerdict;
use crate::extents::{DirtyClassification, DirtyScope, ExtentSet};
use crate::kho::ScratchArea;

pub use luo_protocol::Mark;

/// Serialises a list of marks as their names (`luo-protocol` has no serde).
pub mod mark_names {
    use super::Mark;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// `[Mark]` as `["reboot-requested", ...]`.
    pub fn serialize<S: Serializer>(marks: &[Mark], s: S) -> Result<S::Ok, S::Error> {
        marks
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .serialize(s)
    }

    /// `["reboot-requested", ...]` as `Vec<Mark>`; an unknown name is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Mark>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| n.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Marks as they were recorded, possibly over several handover rounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    marks: Vec<(Mark, u64)>,
}

/// One round: at most one timestamp per mark, plus what was wrong with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// Timestamp of each mark, indexed like [`Mark::ALL`].
    pub at: [Option<u64>; 6],
    /// Ordering problems and duplicates found while splitting.
    pub issues: Vec<String>,
}

/// A phase between two present marks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// Phase name (`serialize`, `kexec-jump`, ...; `a..b` when marks between are missing).
    pub name: String,
    /// Start, in ns since the round's first mark.
    pub t_ns: u64,
    /// Duration in ns.
    pub duration_ns: u64,
}

impl Timeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `mark` at host-monotonic `t_ns`.
    pub fn record(&mut self, mark: Mark, t_ns: u64) {
        self.marks.push((mark, t_ns));
    }

    /// Marks in recording order.
    pub fn marks(&self) -> &[(Mark, u64)] {
        &self.marks
    }

    /// Splits the marks into rounds: a round ends when a mark comes that is not later in the
    /// canonical order than the previous one (normally the next `reboot-requested`).
    pub fn rounds(&self) -> Vec<Round> {
        let mut rounds: Vec<Round> = Vec::new();
        let mut last: Option<(Mark, u64)> = None;
        for &(mark, t) in &self.marks {
            let new_round = match last {
                None => true,
                Some((prev, _)) => mark <= prev,
            };
            if new_round {
                rounds.push(Round::default());
            }
            if let Some(round) = rounds.last_mut() {
                if let Some((prev, pt)) = last.filter(|_| !new_round) {
                    if t < pt {
                        round
                            .issues
                            .push(format!("{mark} at {t} ns is before {prev} at {pt} ns"));
                    }
                }
                if let Some(slot) = round.at.get_mut(mark.index()) {
                    *slot = Some(t);
                }
            }
            last = Some((mark, t));
        }
        rounds
    }
}

impl Round {
    /// Timestamp of `mark`.
    pub fn get(&self, mark: Mark) -> Option<u64> {
        self.at.get(mark.index()).copied().flatten()
    }

    /// Marks absent from this round.
    pub fn missing(&self) -> Vec<Mark> {
        Mark::ALL
            .into_iter()
            .filter(|&m| self.get(m).is_none())
            .collect()
    }

    /// `workload-resumed - reboot-requested`, when both are present and ordered.
    pub fn blackout_ns(&self) -> Option<u64> {
        self.get(Mark::WorkloadResumed)?
            .checked_sub(self.get(Mark::RebootRequested)?)
    }

    /// Phases between consecutive present marks (negative spans clamp to 0 and are already
    /// listed in `issues`).
    pub fn phases(&self) -> Vec<Phase> {
        let present: Vec<(Mark, u64)> = Mark::ALL
            .into_iter()
            .filter_map(|m| Some((m, self.get(m)?)))
            .collect();
        let origin = present.first().map_or(0, |&(_, t)| t);
        present
            .windows(2)
            .filter_map(|w| match w {
                [(a, ta), (b, tb)] => Some(Phase {
                    name: if b.index() == a.index() + 1 {
                        a.phase_name().to_owned()
                    } else {
                        format!("{a}..{b}")
                    },
                    t_ns: ta.saturating_sub(origin),
                    duration_ns: tb.saturating_sub(*ta),
                }),
                _ => None,
            })
            .collect()
    }
}

/// Count and size of the preserved extents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentSummary {
    /// Number of extents.
    pub count: usize,
    /// Bytes preserved.
    pub bytes: u64,
}

/// Pages KVM's dirty log saw written between `point-of-no-return` and
/// `next-kernel-start`: counts per class, and the addresses where a class must be empty
/// or is worth a look.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesWritten {
    /// Which pages were write-protected: with [`DirtyScope::Preserved`] only `preserved`
    /// and `untracked` are known.
    #[serde(default)]
    pub scope: DirtyScope,
    /// Preserved pages written (must be 0).
    pub preserved: u64,
    /// Preserved pages that were not write-protected (must be 0 for a proof).
    #[serde(default)]
    pub untracked: u64,
    /// Pages written in the KHO scratch areas (expected: kexec segments, early boot);
    /// `None` when they were not watched (scope [`DirtyScope::Preserved`]).
    #[serde(default)]
    pub scratch: Option<u64>,
    /// Pages written in neither; `None` when they were not watched.
    #[serde(default)]
    pub other: Option<u64>,
    /// Guest-physical addresses of the preserved pages written.
    pub preserved_at: Vec<u64>,
    /// The owner of each of `preserved_at`, in the same order.
    #[serde(default)]
    pub preserved_owner: Vec<String>,
    /// Guest-physical addresses of the other pages written.
    pub other_at: Vec<u64>,
}

impl PagesWritten {
    /// The report of a dirty-log classification against the `preserved` set it was made
    /// with (for the owners).
    pub fn from_classification(c: &DirtyClassification, preserved: &ExtentSet) -> Self {
        PagesWritten {
            scope: c.scope,
            preserved: c.preserved.len() as u64,
            untracked: c.untracked,
            scratch: (c.scope == DirtyScope::AllPages).then_some(c.scratch),
            other: (c.scope == DirtyScope::AllPages).then_some(c.other.len() as u64),
            preserved_at: c.preserved.clone(),
            preserved_owner: c
                .preserved
                .iter()
                .map(|&a| preserved.find(a).map_or("?", |e| e.owner).to_owned())
                .collect(),
            other_at: c.other.clone(),
        }
    }
}

/// What one handover looked like from outside the guest (the agent's view is the VMM's
/// to add). Serialises to the JSON the benches and CI read; [`fmt::Display`] renders the
/// same as an aligned table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverReport {
    /// `workload-resumed - reboot-requested`, if both were seen.
    pub blackout_ns: Option<u64>,
    /// Phases between consecutive marks.
    pub phases: Vec<Phase>,
    /// Marks that never came.
    #[serde(with = "mark_names")]
    pub missing_marks: Vec<Mark>,
    /// Ordering problems.
    pub issues: Vec<String>,
    /// Preserved extents at `next-kernel-start`.
    pub extents: ExtentSummary,
    /// Pages written between `point-of-no-return` and `next-kernel-start`, when the dirty
    /// log was read.
    pub pages_written: Option<PagesWritten>,
    /// The digest comparison, if one was taken.
    pub digest: Option<DigestVerdict>,
    /// KHO scratch areas.
    pub scratch: Vec<ScratchArea>,
    /// All marks present and ordered, the dirty log read and no preserved page written,
    /// and the digest (if any) unchanged.
    pub intact: bool,
}

impl HandoverReport {
    /// A report for `round`; the `with_*` methods add the rest.
    pub fn new(round: &Round) -> Self {
        let mut r = HandoverReport {
            blackout_ns: round.blackout_ns(),
            phases: round.phases(),
            missing_marks: round.missing(),
            issues: round.issues.clone(),
            ..Self::default()
        };
        r.update_intact();
        r
    }

    /// Adds the preserved extents and the scratch areas.
    pub fn with_extents(mut self, preserved: &ExtentSet, scratch: &[ScratchArea]) -> Self {
        self.extents = ExtentSummary {
            count: preserved.len(),
            bytes: preserved.total_bytes(),
        };
        self.scratch = scratch.to_vec();
        self
    }

    /// Adds the dirty-log classification, made against `preserved`.
    pub fn with_dirty(mut self, dirty: &DirtyClassification, preserved: &ExtentSet) -> Self {
        self.pages_written = Some(PagesWritten::from_classification(dirty, preserved));
        self.update_intact();
        self
    }

    /// Adds a digest comparison.
    pub fn with_digest(mut self, verdict: DigestVerdict) -> Self {
        self.digest = Some(verdict);
        self.update_intact();
        self
    }

    fn update_intact(&mut self) {
        self.intact = self.missing_marks.is_empty()
            && self.issues.is_empty()
            && self
                .pages_written
                .as_ref()
                .is_some_and(|p| p.preserved == 0 && p.untracked == 0)
            && self.digest.as_ref().is_none_or(DigestVerdict::unchanged);
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// `1.234 s`, `12.3 ms`, `456 µs`, `789 ns`.
pub fn human_duration(ns: u64) -> String {
    let f = ns as f64;
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.1} µs", f / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} ms", f / 1e6),
        _ => format!("{:.3} s", f / 1e9),
    }
}

/// `4.0 KiB`, `1.0 MiB`, ...
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{b} B"),
        _ => format!("{v:.1} {}", UNITS.get(unit).copied().unwrap_or("B")),
    }
}

impl fmt::Display for HandoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        let width = self
            .phases
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let _ = writeln!(s, "{:<width$}  {:>12}  {:>12}", "phase", "at", "duration");
        for p in &self.phases {
            let _ = writeln!(
                s,
                "{:<width$}  {:>12}  {:>12}",
                p.name,
                human_duration(p.t_ns),
                human_duration(p.duration_ns)
            );
        }
        let _ = writeln!(
            s,
            "{:<width$}  {:>12}  {:>12}",
            "blackout",
            "",
            self.blackout_ns.map_or("-".into(), human_duration)
        );
        if !self.missing_marks.is_empty() {
            let names: Vec<&str> = self.missing_marks.iter().map(|m| m.name()).collect();
            let _ = writeln!(s, "missing marks: {}", names.join(", "));
        }
        for i in &self.issues {
            let _ = writeln!(s, "issue: {i}");
        }
        let _ = writeln!(
            s,
            "preserved: {} extents, {}",
            self.extents.count,
            human_bytes(self.extents.bytes)
        );
        match &self.pages_written {
            Some(p) => {
                let _ = match p.scope {
                    DirtyScope::AllPages => writeln!(
                        s,
                        "written pages: preserved {}, scratch {}, other {}",
                        p.preserved,
                        p.scratch.unwrap_or(0),
                        p.other.unwrap_or(0)
                    ),
                    DirtyScope::Preserved => writeln!(
                        s,
                        "written pages: preserved {} (only the preserved set was write-protected; --track-all-pages counts scratch and other pages too)",
                        p.preserved
                    ),
                };
                if p.untracked > 0 {
                    let _ = writeln!(
                        s,
                        "  {} preserved pages were not write-protected at point-of-no-return (not in the outgoing kernel's KHO state): not proven",
                        p.untracked
                    );
                }
                for (i, a) in p.preserved_at.iter().enumerate() {
                    let owner = p.preserved_owner.get(i).map_or("?", String::as_str);
                    let _ = writeln!(s, "  preserved page written: {a:#x}  {owner}");
                }
                for a in &p.other_at {
                    let _ = writeln!(s, "  other page written: {a:#x}");
                }
            }
            None => {
                let _ = writeln!(s, "written pages: not logged");
            }
        }
        for a in &self.scratch {
            let _ = writeln!(s, "scratch: {:#x} + {}", a.addr, human_bytes(a.size));
        }
        if let Some(d) = &self.digest {
            let _ = writeln!(
                s,
                "digest ({}): {} extents compared ({} at point-of-no-return, {} at next-kernel-start), {} changed, {} only at point-of-no-return, {} only at next-kernel-start",
                d.algorithm,
                d.compared,
                human_bytes(d.bytes.0),
                human_bytes(d.bytes.1),
                d.changed.len(),
                d.only_before.len(),
                d.only_after.len()
            );
            let lists = [
                ("changed", &d.changed),
                ("only at point-of-no-return", &d.only_before),
                ("only at next-kernel-start", &d.only_after),
            ];
            for (what, list) in lists {
                for e in list {
                    let _ = writeln!(
                        s,
                        "  digest {what}: {:#x} + {}  {}",
                        e.start,
                        human_bytes(e.end - e.start),
                        e.owner
                    );
                }
            }
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(t0: u64) -> Vec<(Mark, u64)> {
        Mark::ALL
            .into_iter()
            .zip([0, 10, 30, 60, 100, 150].map(|d| t0 + d * 1_000_000))
            .collect()
    }

    #[test]
    fn phases_and_blackout() {
        let mut tl = Timeline::new();
        for (m, t) in full(5_000) {
            tl.record(m, t);
        }
        let rounds = tl.rounds();
        assert_eq!(rounds.len(), 1);
        let r = &rounds[0];
        assert_eq!(r.blackout_ns(), Some(150_000_000));
        let names: Vec<String> = r.phases().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "reboot-syscall",
                "serialize",
                "kexec-jump",
                "kernel-boot",
                "workload-restore"
            ]
        );
        assert_eq!(
            r.phases()[2],
            Phase {
                name: "kexec-jump".into(),
                t_ns: 30_000_000,
                duration_ns: 30_000_000
            }
        );
        assert!(r.missing().is_empty() && r.issues.is_empty());
    }

    #[test]
    fn repeated_rounds_and_missing_marks() {
        let mut tl = Timeline::new();
        for (m, t) in full(0) {
            tl.record(m, t);
        }
        for (m, t) in full(1_000_000_000) {
            if m != Mark::SerializeStart && m != Mark::WorkloadResumed {
                tl.record(m, t);
            }
        }
        let rounds = tl.rounds();
        assert_eq!(rounds.len(), 2);
        let r = &rounds[1];
        assert_eq!(
            r.missing(),
            vec![Mark::SerializeStart, Mark::WorkloadResumed]
        );
        assert_eq!(r.blackout_ns(), None);
        assert_eq!(r.phases()[0].name, "reboot-requested..point-of-no-return");
        let report = HandoverReport::new(r);
        assert!(!report.intact);
        assert!(report
            .to_string()
            .contains("missing marks: serialize-start, workload-resumed"));
    }

    #[test]
    fn out_of_order_timestamps_are_issues() {
        let mut tl = Timeline::new();
        tl.record(Mark::RebootRequested, 100);
        tl.record(Mark::SerializeStart, 50);
        let r = &tl.rounds()[0];
        assert_eq!(r.issues.len(), 1);
        assert_eq!(r.phases()[0].duration_ns, 0);
    }

    #[test]
    fn report_verification_json_and_text() {
        let mut tl = Timeline::new();
        for (m, t) in full(0) {
            tl.record(m, t);
        }
        let round = &tl.rounds()[0];
        let preserved = ExtentSet::builder()
            .add(0x1000, 0x101000, "kho")
            .clone()
            .build();
        let clean = DirtyClassification {
            preserved: vec![],
            scratch: 2057,
            other: vec![0x9000, 0xa000],
            ..Default::default()
        };
        let r = HandoverReport::new(round)
            .with_extents(
                &preserved,
                &[ScratchArea {
                    addr: 0x100_0000,
                    size: 64 << 20,
                }],
            )
            .with_dirty(&clean, &preserved)
            .with_digest(DigestVerdict {
                compared: 1,
                ..Default::default()
            });
        assert!(r.intact);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        for key in [
            "blackout_ns",
            "phases",
            "extents",
            "pages_written",
            "intact",
            "digest",
            "scratch",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["extents"]["count"], 1);
        assert_eq!(v["phases"][0]["name"], "reboot-syscall");
        assert_eq!(v["missing_marks"], serde_json::json!([]));
        let text = r.to_string();
        assert!(text.contains("kexec-jump"), "{text}");
        assert!(
            text.contains("150.0 ms")
                && text.contains("written pages: preserved 0, scratch 2057, other 2"),
            "{text}"
        );
        let dirty = DirtyClassification {
            preserved: vec![0x2000],
            ..clean
        };
        let written = r.clone().with_dirty(&dirty, &preserved);
        assert!(!written.intact);
        let owner = preserved.find(0x2000).map(|e| e.owner.to_owned());
        assert_eq!(
            written
                .pages_written
                .as_ref()
                .map(|p| p.preserved_owner.first().cloned()),
            Some(owner)
        );
        assert!(written
            .to_string()
            .contains("preserved page written: 0x2000"));
        assert_eq!(
            v["pages_written"]["other_at"],
            serde_json::json!([0x9000, 0xa000])
        );
        assert_eq!(v["missing_marks"], serde_json::json!([]));
        let back: HandoverReport = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);

        // Only the preserved set write-protected: scratch and other are not claimed, and
        // a preserved page nobody watched makes the handover unproven.
        let tracked = DirtyClassification {
            scope: DirtyScope::Preserved,
            ..Default::default()
        };
        let only = r.clone().with_dirty(&tracked, &preserved);
        assert!(only.intact);
        let v: serde_json::Value = serde_json::from_str(&only.to_json()).unwrap();
        assert!(v["pages_written"]["scratch"].is_null() && v["pages_written"]["other"].is_null());
        let text = only.to_string();
        assert!(
            text.contains("written pages: preserved 0 (only the preserved set")
                && !text.contains("scratch 0"),
            "{text}"
        );
        let unwatched = r.clone().with_dirty(
            &DirtyClassification {
                untracked: 3,
                ..tracked
            },
            &preserved,
        );
        assert!(!unwatched.intact);
        assert!(unwatched
            .to_string()
            .contains("3 preserved pages were not write-protected"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(789), "789 ns");
        assert_eq!(human_duration(456_000), "456.0 µs");
        assert_eq!(human_duration(12_300_000), "12.3 ms");
        assert_eq!(human_duration(1_234_000_000), "1.234 s");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1 << 20), "1.0 MiB");
        assert_eq!(human_bytes(64 << 30), "64.0 GiB");
        assert_eq!(Mark::PointOfNoReturn.to_string(), "point-of-no-return");
    }
}
