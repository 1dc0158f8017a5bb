//! Building a [`RunReport`] from what the guest did, what the interceptor saw and what was
//! asked: the rounds, the verified rule's checks ([`RoundSeen`]), injection verdicts,
//! run errors.

use super::*;
use crate::run::agent::AgentLog;

/// Every field of `h`, for the report.
pub(super) fn field_entries(h: &Handover) -> Vec<FieldEntry> {
    FieldList::of(h)
        .fields
        .into_iter()
        .map(|f| FieldEntry {
            path: f.path,
            gpa: f.gpa,
            width: f.width,
            value: f.value,
        })
        .collect()
}

pub(super) fn inventory_report(boot: &AgentBoot) -> Option<InventoryReport> {
    let inv = &boot.inventory;
    if inv.sessions.is_empty() && inv.files.is_empty() && inv.end.is_none() {
        return None;
    }
    Some(InventoryReport {
        sessions: inv
            .sessions
            .iter()
            .map(|(index, name)| InventorySession {
                index: *index,
                name: name.to_string(),
            })
            .collect(),
        files: inv.files.clone(),
        totals: inv.end,
    })
}

pub(super) fn failed_actions(boots: &[&AgentBoot]) -> Vec<ActionReport> {
    boots
        .iter()
        .flat_map(|b| &b.failed_actions)
        .map(|a| ActionReport {
            action: a.action.name().to_owned(),
            arg: a.arg,
            ret: a.ret,
            errno: a.errno,
        })
        .collect()
}

/// What luo-vmm saw of one handover: its report (marks, phases, extents, pages written,
/// digests), the preserved extents with their owners, what could not be read, and the
/// invariants of the state handed over.
pub(crate) struct RoundSeen {
    /// The handover's report.
    pub handover: HandoverReport,
    /// The preserved extents at next-kernel-start, with owners.
    pub extent_list: Vec<ExtentEntry>,
    /// What went wrong reading it.
    pub errors: Vec<RoundError>,
    /// The invariants, checked on the state parsed at next-kernel-start.
    pub invariants: Vec<InvariantCheck>,
}

impl RoundSeen {
    /// Reads handover `round` of the timeline with what the interceptor captured of it.
    pub fn of(round: &Round, cap: Option<&RoundCapture>) -> Self {
        let (handover, extent_list, errors) = handover_part(round, cap);
        let invariants = cap
            .and_then(|c| c.handover.as_ref()?.as_ref().ok())
            .map_or_else(Vec::new, |st| invariants::check(&st.handover, &st.extents));
        Self {
            handover,
            extent_list,
            errors,
            invariants,
        }
    }

    /// Why the round is not verified, check by check, in words (empty when it is): the
    /// marks missing or out of order, the dirty log's findings, the digest, what could not
    /// be read, the invariants that failed, and the guest side.
    pub fn unverified(&self, cpus_up: bool, workload_ok: bool) -> Vec<String> {
        let h = &self.handover;
        let mut why = Vec::new();
        if !h.missing_marks.is_empty() {
            let names: Vec<&str> = h.missing_marks.iter().map(|m| m.name()).collect();
            why.push(format!("marks missing: {}", names.join(", ")));
        }
        why.extend(h.issues.iter().map(|i| format!("timeline: {i}")));
        match &h.pages_written {
            None => why.push("the dirty log was not read".into()),
            Some(p) if p.preserved > 0 || p.untracked > 0 => why.push(format!(
                "preserved pages written: {}, not watched: {}",
                p.preserved, p.untracked
            )),
            Some(_) => {}
        }
        if h.digest.as_ref().is_some_and(|d| !d.unchanged()) {
            why.push("the digests changed".into());
        }
        why.extend(self.errors.iter().map(|e| format!("not read: {e}")));
        why.extend(
            self.invariants
                .iter()
                .filter(|c| !c.held)
                .map(|c| format!("invariant failed: {}", c.name)),
        );
        if !cpus_up {
            why.push("the next kernel did not bring up every CPU".into());
        }
        if !workload_ok {
            why.push(
                "the workload did not pass in the next kernel (or the kernel was in trouble)"
                    .into(),
            );
        }
        why
    }

    /// The checks of [`HandoverChecks`], with what the caller knows of the guest side.
    pub fn checks(&self, cpus_up: bool, workload_ok: bool) -> HandoverChecks {
        HandoverChecks {
            intact: self.handover.intact,
            read_cleanly: self.errors.is_empty(),
            invariants_held: self.invariants.iter().all(|c| c.held),
            cpus_up,
            workload_ok,
        }
    }
}

/// The luo-vmm side of round `round` (what was read at its next-kernel-start).
pub(super) fn handover_part(
    round: &Round,
    cap: Option<&RoundCapture>,
) -> (HandoverReport, Vec<ExtentEntry>, Vec<RoundError>) {
    let mut r = HandoverReport::new(round);
    let mut list = Vec::new();
    let mut errors = Vec::new();
    let Some(cap) = cap else {
        errors.push(RoundError::KhoStateNotRead);
        return (r, list, errors);
    };
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
        Some(Err(e)) => errors.push(RoundError::KhoState(e.clone())),
        None => errors.push(RoundError::KhoStateNotRead),
    }
    match (&cap.dirty, &cap.handover) {
        (Some(Ok(d)), Some(Ok(st))) => r = r.with_dirty(d, &st.extents.set),
        (Some(Ok(d)), _) => r = r.with_dirty(d, &luo_handover::extents::ExtentSet::default()),
        (Some(Err(e)), _) => errors.push(RoundError::DirtyLog(e.clone())),
        (None, _) => {}
    }
    match &cap.digest {
        Some(Ok(v)) => r = r.with_digest(v.clone()),
        Some(Err(e)) => errors.push(RoundError::Digest(e.clone())),
        None => {}
    }
    if let Some(e) = &cap.injection.error {
        errors.push(RoundError::Inject(e.to_string()));
    }
    (r, list, errors)
}

/// Builds the report of a run from what the guest did, what the interceptor saw, and
/// what was asked.
pub(crate) fn build_report(
    outcome: &GuestOutcome,
    got: Interception,
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    workload: Workload,
) -> RunReport {
    let verdict = outcome.agent.verdict();
    let guest_ok = outcome.exit.is_clean()
        && outcome.kernel_panic.is_none()
        && verdict.is_some_and(|v| v.passed());
    let selftest = match workload {
        Workload::Selftest(t) => Some(t),
        _ => None,
    };
    let selftests: Vec<SelftestReport> = selftest
        .map(|t| {
            outcome
                .boots
                .iter()
                .flat_map(|b| &b.selftests)
                .map(|r| SelftestReport::new(t, r))
                .collect()
        })
        .unwrap_or_default();
    let rounds: Vec<RoundReport> = got
        .timeline
        .rounds()
        .iter()
        .enumerate()
        .map(|(i, round)| {
            let ctx = RoundContext {
                outcome,
                workload,
                vcpus: opts.vcpus,
                guest_ok,
            };
            build_round(&ctx, i, round, got.rounds.get(i), got.kernels.get(i))
        })
        .collect();
    let expected = workload.handovers();
    let seen = u32::try_from(rounds.len()).unwrap_or(u32::MAX);
    let errors = run_errors(outcome, expected, seen);
    let verified = guest_ok
        && if workload.hands_over() {
            seen >= expected && rounds.iter().all(|r| r.verified)
        } else {
            !selftests.is_empty() && selftests.iter().all(SelftestReport::passed)
        };
    RunReport {
        run: RunInfo {
            kvm: match &outcome.backend {
                KvmBackend::Hardware { .. } => "hardware".into(),
                KvmBackend::Emulated { .. } => "emulated".into(),
            },
            kernel: guest.image.as_ref().map(|i| i.kernel_version.clone()),
            vcpus: opts.vcpus,
            mem_bytes: opts.mem,
            peak_rss_bytes: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|t| vm_hwm_bytes(&t)),
            workload: workload.kernel_params(),
        },
        rounds,
        selftests,
        agent: agent_summary(&outcome.agent),
        guest_ok,
        errors,
        verified,
    }
}

/// What every round of a run shares.
struct RoundContext<'a> {
    outcome: &'a GuestOutcome,
    workload: Workload,
    vcpus: u8,
    guest_ok: bool,
}

/// Handover `i` of the run (from the agent's boot `i`, stage 1, to boot `i + 1`, stage
/// 2), with what the interceptor captured of it.
fn build_round(
    ctx: &RoundContext<'_>,
    i: usize,
    round: &Round,
    cap: Option<&RoundCapture>,
    kernels: Option<&(KernelId, KernelId)>,
) -> RoundReport {
    let outcome = ctx.outcome;
    let kernels = kernels.map(|(from, to)| RoundKernels {
        from: from.clone(),
        to: to.clone(),
    });
    let seen = RoundSeen::of(round, cap);
    let before = outcome.boots.get(i);
    let after = outcome.boots.get(i + 1);
    let inventory = before.and_then(inventory_report);
    let checked = after.and_then(|b| b.verified);
    let stage2 = match ctx.workload {
        Workload::Selftest(t) => after
            .and_then(|b| b.selftest(Some(Stage::Two)))
            .map(|r| SelftestReport::new(t, r)),
        _ => None,
    };
    let agent_side = match ctx.workload {
        Workload::Handover(_) => checked.is_some_and(|c| {
            inventory
                .as_ref()
                .and_then(|inv| inv.totals)
                .is_none_or(|t| t.files == c.files && t.bytes == c.bytes)
        }),
        Workload::Selftest(_) => stage2.as_ref().is_some_and(SelftestReport::passed),
        Workload::Boot | Workload::Scenario => false,
    };
    let agent_ok = ctx.guest_ok && agent_side;
    let marks = Mark::ALL
        .iter()
        .filter_map(|&m| {
            Some(MarkTime {
                name: m.name().to_owned(),
                t_ns: round.get(m)?,
            })
        })
        .collect();
    let pair: Vec<&AgentBoot> = before.into_iter().chain(after).collect();
    let cpus_online = CpusOnline {
        vcpus: ctx.vcpus,
        before: before.and_then(|b| b.cpus_online),
        after: after.and_then(|b| b.cpus_online),
    };
    let state = cap.and_then(|c| c.handover.as_ref()?.as_ref().ok());
    let verified = seen.checks(cpus_online.all_up_after(), agent_ok).verified();
    // What the judges of refusals, reuse and crashes look at (injected and cross-kernel
    // rounds alike).
    let evidence = judged::Evidence {
        exit: &outcome.exit,
        kernel_panic: outcome.kernel_panic.as_deref(),
        kernel_trouble: &outcome.kernel_trouble,
        kernel_lines: &outcome.kernel_liveupdate,
        after,
        agent: after.and_then(|b| b.verdict).or(outcome.agent.verdict()),
        written_after: cap.and_then(|c| c.written_after.as_ref()),
        preserved: state.map(|st| &st.extents.set),
    };
    let RoundSeen {
        handover,
        extent_list,
        errors,
        invariants,
    } = seen;
    RoundReport {
        verified,
        cpus_online,
        handover,
        marks,
        extent_list,
        hook_ns: cap.map_or(0, |c| c.hook_ns),
        hooks: cap.map_or_else(Vec::new, |c| c.hooks.clone()),
        inventory,
        checked,
        selftest: stage2,
        failed_actions: failed_actions(&pair),
        injected: cap.and_then(|c| c.injected.clone()),
        injections: cap.map(|c| c.injection.writes.clone()).unwrap_or_default(),
        outcome: cap
            .filter(|c| !c.injection.writes.is_empty())
            .map(|_| judged::judge(&evidence)),
        cross: kernels
            .as_ref()
            .map(|_| cross::judge(verified, judged::judge(&evidence))),
        kernels,
        fields: state
            .map(|st| field_entries(&st.handover))
            .unwrap_or_default(),
        invariants,
        errors,
        agent_ok,
    }
}

/// What went wrong with the run as a whole: handovers missing (`seen` of `expected`),
/// the agent's failure or silence, a panic, how the VM ended.
fn run_errors(outcome: &GuestOutcome, expected: u32, seen: u32) -> Vec<RunError> {
    let mut errors = Vec::new();
    if seen < expected {
        errors.push(RunError::MissingHandovers { expected, seen });
    }
    match outcome.agent.verdict() {
        Some(v) if !v.passed() => errors.push(RunError::AgentFailed {
            step: v.step.name().to_owned(),
            errno: v.errno,
        }),
        Some(_) => {}
        None => errors.push(RunError::NoVerdict),
    }
    if let Some(line) = &outcome.kernel_panic {
        errors.push(RunError::KernelPanic(line.clone()));
    }
    match &outcome.exit {
        VmExit::Reset => {}
        VmExit::Timeout { after } => errors.push(RunError::Timeout(after.as_secs())),
        VmExit::Fatal { vcpu, exit } => {
            errors.push(RunError::VmDied(format!("vCPU {vcpu}: {exit}")))
        }
        VmExit::Ended => errors.push(RunError::VmDied("the run was ended early".into())),
    }
    errors
}

/// The agent's side of the run in a few numbers.
fn agent_summary(agent: &AgentLog) -> AgentSummary {
    let verdict = agent.verdict();
    AgentSummary {
        cpus_online: agent.first_cpus_online(),
        verdict: verdict.map(|v| {
            if v.passed() {
                "pass".to_owned()
            } else {
                v.step.name().to_owned()
            }
        }),
        errno: verdict.map_or(0, |v| v.errno),
        messages: agent.messages.len() as u64,
        decode_errors: agent.error_count,
        dropped: agent.dropped,
    }
}

/// `VmHWM` (peak resident set) of a /proc/PID/status text, in bytes.
pub(super) fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
