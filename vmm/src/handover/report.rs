//! The handover report: one [`HandoverReport`] per handover, plus what the run was.

use std::fmt::Write as _;

use luo_devices::probe::ProbeMark;
use luo_handover::timeline::{human_bytes, human_duration, HandoverReport, Mark};
use serde::Serialize;

use super::intercept::{Interception, RoundCapture};
use super::{HandoverRequest, Workload};
use crate::guest::GuestOutcome;
use crate::host::KvmBackend;

/// Everything `luo-vmm handover` reports. The top-level handover fields describe the
/// first handover; `rounds` has every one; `verified` is true only if all were.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// The first handover, flattened.
    #[serde(flatten)]
    pub first: HandoverReport,
    /// Every handover in order.
    pub rounds: Vec<HandoverReport>,
    /// Preserved extents of each handover: (start, length, owner).
    pub extent_list: Vec<Vec<ExtentEntry>>,
    /// The marks of each handover: name and host time since the VM started.
    pub marks: Vec<Vec<MarkEntry>>,
    /// What ran.
    pub run: RunInfo,
    /// Whether the VM ended cleanly and the agent reported success.
    pub guest_ok: bool,
    /// Errors met while reading the handover state, per round.
    pub errors: Vec<String>,
    /// Faults injected.
    pub injected: Vec<String>,
}

/// One preserved extent.
#[derive(Debug, Clone, Serialize)]
pub struct ExtentEntry {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Owner (kho, kho-fdt, LUO, LUO/sessions, memfd, ...).
    pub owner: String,
}

/// One mark of a handover.
#[derive(Debug, Clone, Serialize)]
pub struct MarkEntry {
    /// Mark name (`reboot-requested`, ...).
    pub name: &'static str,
    /// Host-monotonic nanoseconds since the VM started.
    pub t_ns: u64,
}

/// The run's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `hardware` or `emulated`.
    pub kvm: String,
    /// Kernel release of the reference guest, if it was used.
    pub kernel: Option<String>,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub mem_bytes: u64,
    /// Kernel command-line parameters of the workload.
    pub workload: String,
    /// Host time luo-vmm spent with a vCPU stopped in its hooks, per round (included in
    /// the phases above).
    pub interception_ns: Vec<u64>,
}

fn round_report(
    round: &luo_handover::timeline::Round,
    cap: Option<&RoundCapture>,
    agent_line: &str,
    agent_ok: bool,
    errors: &mut Vec<String>,
    extents: &mut Vec<Vec<ExtentEntry>>,
) -> HandoverReport {
    let mut r = HandoverReport::new(round);
    let mut list = Vec::new();
    if let Some(cap) = cap {
        match &cap.handover {
            Some(Ok(st)) => {
                r = r.with_extents(&st.extents.set, &st.scratch);
                list = st
                    .extents
                    .set
                    .iter()
                    .map(|e| ExtentEntry {
                        start: e.start,
                        len: e.len(),
                        owner: e.owner.to_owned(),
                    })
                    .collect();
            }
            Some(Err(e)) => errors.push(format!("KHO state: {e}")),
            None => errors.push("KHO state was not read".into()),
        }
        match &cap.dirty {
            Some(Ok(d)) => r = r.with_dirty(d),
            Some(Err(e)) => errors.push(format!("dirty log: {e}")),
            None => {}
        }
        match &cap.digest {
            Some(Ok(v)) => r = r.with_digest(v.clone()),
            Some(Err(e)) => errors.push(format!("digest: {e}")),
            None => {}
        }
    }
    extents.push(list);
    r.with_agent(agent_line, agent_ok)
}

/// The agent's result line of each handover: `luo-agent: verified ...` for our own
/// workload, the stage-2 `... exited: ...` line of a selftest.
fn result_lines<'a>(lines: &'a [String], workload: &Workload) -> Vec<&'a String> {
    match workload {
        Workload::Memfds { .. } => lines
            .iter()
            .filter(|l| l.starts_with("luo-agent: verified"))
            .collect(),
        Workload::Selftest(_) => {
            let mut stage2 = false;
            lines
                .iter()
                .filter(|l| {
                    stage2 |= l.contains(" stage 2 ");
                    stage2 && l.contains(" exited: ")
                })
                .collect()
        }
    }
}

/// Builds the report from the run and what the interceptor saw.
pub fn build_report(outcome: &GuestOutcome, got: Interception, req: &HandoverRequest) -> RunReport {
    let agent_ok = outcome.exit.is_clean()
        && outcome.agent.kernel_panic.is_none()
        && outcome.agent.succeeded();
    let verified_lines = result_lines(&outcome.agent.lines, &req.workload);
    let resumed = outcome
        .agent
        .marks
        .iter()
        .filter(|e| e.mark == ProbeMark::WorkloadResumed)
        .count();
    let mut errors = Vec::new();
    let mut extent_list = Vec::new();
    let mut rounds = Vec::new();
    let mut marks = Vec::new();
    for (i, round) in got.timeline.rounds().iter().enumerate() {
        marks.push(
            Mark::ALL
                .iter()
                .filter_map(|&m| {
                    Some(MarkEntry {
                        name: m.name(),
                        t_ns: round.get(m)?,
                    })
                })
                .collect(),
        );
        let line = verified_lines.get(i).map_or("", |s| s.as_str());
        // A round is the agent's success only if it resumed its workload in it.
        let ok =
            agent_ok && i < resumed.max(usize::from(matches!(req.workload, Workload::Selftest(_))));
        rounds.push(round_report(
            round,
            got.rounds.get(i),
            line,
            ok,
            &mut errors,
            &mut extent_list,
        ));
    }
    if rounds.is_empty() {
        errors.push("no handover was seen (the guest never reached reboot(KEXEC))".into());
    }
    let mut first = rounds.first().cloned().unwrap_or_default();
    first.verified = !rounds.is_empty() && rounds.iter().all(|r| r.verified);
    RunReport {
        first,
        rounds,
        extent_list,
        marks,
        run: RunInfo {
            kvm: match &outcome.backend {
                KvmBackend::Hardware { .. } => "hardware".into(),
                KvmBackend::Emulated { .. } => "emulated".into(),
            },
            kernel: outcome.image.as_ref().map(|i| i.kernel_version.clone()),
            vcpus: req.guest.vcpus,
            mem_bytes: req.guest.mem_size,
            workload: req.workload.cmdline(),
            interception_ns: got.rounds.iter().map(|r| r.hook_ns).collect(),
        },
        guest_ok: agent_ok,
        errors,
        injected: got
            .rounds
            .iter()
            .filter_map(|r| r.injected.clone())
            .collect(),
    }
}

/// The text report.
pub fn render_text(report: &RunReport) -> String {
    let mut s = String::new();
    for (i, r) in report.rounds.iter().enumerate() {
        let _ = writeln!(s, "\n== handover {} of {} ==", i + 1, report.rounds.len());
        let marks = report.marks.get(i).map(Vec::as_slice).unwrap_or_default();
        let origin = marks.first().map_or(0, |m| m.t_ns);
        for m in marks {
            let _ = writeln!(
                s,
                "mark {:<20} +{}",
                m.name,
                human_duration(m.t_ns - origin)
            );
        }
        let _ = write!(s, "{r}");
        if let Some(w) = r.preserved_pages_written {
            let pages = r.extents.bytes / 4096;
            let _ = writeln!(s, "{w} preserved pages written (of {pages} preserved pages) between point-of-no-return and next-kernel-start");
        }
        for e in report.extent_list.get(i).into_iter().flatten() {
            let _ = writeln!(
                s,
                "  extent {:#012x} + {:>10}  {}",
                e.start,
                human_bytes(e.len),
                e.owner
            );
        }
        if let Some(ns) = report.run.interception_ns.get(i) {
            let _ = writeln!(
                s,
                "luo-vmm hook time (guest stopped, included above): {}",
                human_duration(*ns)
            );
        }
    }
    for e in &report.errors {
        let _ = writeln!(s, "error: {e}");
    }
    for i in &report.injected {
        let _ = writeln!(s, "injected: {i}");
    }
    let _ = writeln!(
        s,
        "\nresult: {}",
        if report.first.verified {
            "VERIFIED"
        } else {
            "NOT VERIFIED"
        }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn result_lines_per_workload() {
        let memfd = lines(&[
            "luo-agent: userspace up (cpus=1)",
            "luo-agent: verified 1 sessions, 1 memfds, 1048576 bytes [t=1s]",
        ]);
        let w = Workload::Memfds {
            sessions: 1,
            files: 1,
            memfd_size: 1 << 20,
            repeat: 1,
        };
        assert_eq!(result_lines(&memfd, &w).len(), 1);

        let st = lines(&[
            "luo-agent: mode Selftest(\"x\") stage 1 round 0/1",
            "luo-agent: /selftests/x exited: exit status: 0",
            "luo-agent: mode Selftest(\"x\") stage 2 round 1/1",
            "luo-agent: /selftests/x exited: exit status: 0 [t=2s]",
        ]);
        let got = result_lines(&st, &Workload::Selftest("x".into()));
        assert_eq!(got, vec![&st[3]]);
    }
}
