//! The text report of a run.

use super::*;

/// The text of an injected round's outcome: the verdict line, what the agent got, the
/// kernel's lines, the leak check.
pub(super) fn write_outcome(s: &mut String, o: &InjectionOutcome) {
    let _ = writeln!(s, "verdict: {} ({})", o.verdict.name(), o.reason);
    write_evidence(s, o);
}

/// What a judged round's verdict rests on: what the agent got, the kernel's lines, the leak
/// check (an injected round's, and a cross-kernel round's under its own verdict line).
pub(super) fn write_evidence(s: &mut String, o: &InjectionOutcome) {
    match &o.received {
        Some(Received::RightData) => {
            let _ = writeln!(s, "received: every memfd's own bytes");
        }
        Some(Received::WrongData {
            session,
            file,
            offset,
            whose,
        }) => {
            let _ = writeln!(
                s,
                "received: session {session} file {file} offset {offset:#x} held {whose}"
            );
        }
        Some(Received::WrongSize) => {
            let _ = writeln!(s, "received: a memfd of another size");
        }
        None => {
            let _ = writeln!(s, "received: no memfd (none was retrieved and read)");
        }
    }
    for line in &o.kernel {
        let _ = writeln!(s, "  kernel: {line}");
    }
    match &o.leak {
        Some(l) => {
            let _ = writeln!(
                s,
                "leak check: {} of {} pages of preserved file state not retrieved were written between next-kernel-start and the end of the run (after {} of memory pressure)",
                l.written,
                l.pages_checked,
                human_bytes(l.pressure_bytes)
            );
            for p in &l.written_at {
                let _ = writeln!(s, "  reused page: {:#x}  {}", p.gpa, p.owner);
            }
            for p in &l.records_written {
                let _ = writeln!(
                    s,
                    "  record page written (KHO/LUO state the next kernel consumes; not counted): {:#x}  {}",
                    p.gpa, p.owner
                );
            }
        }
        None => {
            let _ = writeln!(
                s,
                "leak check: not run (no dirty log after next-kernel-start)"
            );
        }
    }
}

/// The text report.
pub(crate) fn render_text(report: &RunReport) -> String {
    let mut s = String::new();
    for (i, r) in report.rounds.iter().enumerate() {
        let _ = writeln!(s, "\n== handover {} of {} ==", i + 1, report.rounds.len());
        if let Some(k) = &r.kernels {
            let _ = writeln!(s, "kernels: {} -> {}", k.from.describe(), k.to.describe());
        }
        let origin = r.marks.first().map_or(0, |m| m.t_ns);
        for m in &r.marks {
            let _ = writeln!(
                s,
                "mark {:<20} +{}",
                m.name,
                human_duration(m.t_ns.saturating_sub(origin))
            );
        }
        let _ = write!(s, "{}", r.handover);
        if let Some(w) = &r.handover.pages_written {
            let pages = r.handover.extents.bytes / 4096;
            let _ = writeln!(s, "{} preserved pages written (of {pages} preserved pages) between point-of-no-return and next-kernel-start", w.preserved);
        }
        for e in &r.extent_list {
            let _ = writeln!(
                s,
                "  extent {:#012x} + {:>10}  {}",
                e.start,
                human_bytes(e.len),
                e.owner
            );
        }
        for c in &r.invariants {
            let _ = writeln!(s, "invariant: {c}");
        }
        let _ = writeln!(
            s,
            "luo-vmm hook time (guest stopped, included above): {}",
            human_duration(r.hook_ns)
        );
        for h in &r.hooks {
            let _ = writeln!(s, "  hook {h}");
        }
        let count = |n: Option<u16>| n.map_or("?".to_owned(), |n| n.to_string());
        let c = r.cpus_online;
        let _ = writeln!(
            s,
            "CPUs online: {} before the handover, {} in the next kernel (of {} vCPUs){}",
            count(c.before),
            count(c.after),
            c.vcpus,
            if c.all_up_after() { "" } else { ": NOT ALL UP" }
        );
        if let Some(inv) = &r.inventory {
            match inv.totals {
                Some(t) => {
                    let _ = writeln!(
                        s,
                        "agent preserved: {} sessions, {} files, {} bytes",
                        t.sessions, t.files, t.bytes
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "agent preserved (incomplete): {} sessions, {} files",
                        inv.sessions.len(),
                        inv.files.len()
                    );
                }
            }
        }
        if let Some(c) = r.checked {
            let _ = writeln!(
                s,
                "agent checked: {} sessions, {} files, {} bytes",
                c.sessions, c.files, c.bytes
            );
        }
        if let Some(t) = &r.selftest {
            let _ = writeln!(s, "selftest {t}");
        }
        for a in &r.failed_actions {
            let _ = writeln!(
                s,
                "failed action: {} {} returned {} ({})",
                a.action,
                a.arg,
                a.ret,
                std::io::Error::from_raw_os_error(a.errno)
            );
        }
        if let Some(inj) = &r.injected {
            let _ = writeln!(s, "injected: {inj}");
        }
        if let Some(o) = &r.outcome {
            write_outcome(&mut s, o);
        }
        if let Some(c) = r
            .cross
            .as_ref()
            .filter(|_| r.kernels.as_ref().is_some_and(RoundKernels::cross))
        {
            let _ = writeln!(
                s,
                "cross-kernel verdict: {} ({})",
                c.verdict.name(),
                c.reason
            );
            write_evidence(&mut s, &c.evidence);
        }
        for e in &r.errors {
            let _ = writeln!(s, "error: {e}");
        }
        let _ = writeln!(s, "verified: {}", if r.verified { "yes" } else { "NO" });
    }
    if !report.selftests.is_empty() {
        let _ = writeln!(s);
    }
    for t in &report.selftests {
        let _ = writeln!(s, "selftest {t}");
    }
    for e in &report.errors {
        let _ = writeln!(s, "error: {e}");
    }
    let hold: u64 = report.rounds.iter().map(|r| r.hook_ns).sum();
    let _ = writeln!(
        s,
        "\nluo-vmm held the guest {} in {} handovers ({} guest); peak memory of the luo-vmm process {}",
        human_duration(hold),
        report.rounds.len(),
        human_bytes(report.run.mem_bytes),
        report.run.peak_rss_bytes.map_or("?".into(), human_bytes)
    );
    let word = match (report.rounds.is_empty(), report.verified) {
        (false, true) => "VERIFIED",
        (false, false) => "NOT VERIFIED",
        (true, true) => "PASSED",
        (true, false) => "FAILED",
    };
    let _ = writeln!(s, "\nresult: {word}");
    s
}
