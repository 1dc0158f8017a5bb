//! The VMM schedule of a scenario while it runs: hooks (hardware breakpoints, per vCPU)
//! that observe, hold, fail or stop; gates that open on events; holds released by events
//! or a bounded time. Every event goes into one timeline, in time order.
//!
//! Events come from two sides: vCPU threads reach hooks (`on_breakpoint`, with their vCPU
//! stopped), the main thread hears the agent (`on_probe`). Both go through
//! [`Scheduler::fire`], under one lock, so "release the held vCPU when the other one
//! reached a hook" and "open a gate when the agent waits at another" are the same rule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use luo_devices::{Gates, ProbeEvent};
use luo_protocol::message::{Action, Message};
use luo_protocol::probe::Gate;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::config::scenario::{EndRule, GateRule, Hook, HookKind, Trigger};
use crate::machine::arch::paging::translate;
use crate::machine::vcpu::control::{StopCause, VcpuControl};
use crate::machine::vcpu::run::{HookAction, VcpuNotice};
use crate::machine::vm::StoppedVcpu;
use crate::run::agent::ActionPairs;

/// Something that happened, as triggers match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// An armed hook was reached.
    Hook(String),
    /// The agent announced an action.
    Start(Action, u64),
    /// An action's result arrived.
    Result(Action, u64),
    /// The agent waits at a gate.
    Wait(Gate),
}

impl Trigger {
    /// Whether `event` is this trigger.
    pub(crate) fn matches(&self, event: &Event) -> bool {
        match (self, event) {
            (Trigger::Hook(a), Event::Hook(b)) => a == b,
            (Trigger::Start(p), Event::Start(a, arg))
            | (Trigger::Result(p), Event::Result(a, arg)) => p.matches(*a, *arg),
            (Trigger::Wait(a), Event::Wait(b)) => a == b,
            _ => false,
        }
    }
}

/// One line of a run's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEntry {
    /// Host time since the VM started, in ns.
    pub t_ns: u64,
    /// The vCPU it happened on, for hooks.
    pub vcpu: Option<u8>,
    /// What happened.
    pub what: String,
}

/// A hook with the address it is armed at.
#[derive(Debug, Clone)]
pub(crate) struct ArmedHook {
    pub hook: Hook,
    pub addr: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Per hook: its `after` happened (or it has none).
    armed: Vec<bool>,
    /// Per hook: armed hits so far.
    calls: Vec<u32>,
    /// Per hook name: armed hits on each vCPU (index = vCPU).
    hits: BTreeMap<String, Vec<u32>>,
    /// Holds in progress: hook index, vCPU, since.
    holding: Vec<(usize, u8, Instant)>,
    /// Hooks that acted at least once.
    fired: BTreeSet<String>,
    timeline: Vec<TimelineEntry>,
    /// Holds that nobody released in time.
    hold_timeouts: Vec<String>,
    /// The hook that ended the run.
    ended_by: Option<String>,
    /// The argument of each announced action, paired with its result by sequence number
    /// (results carry only the number); bounded, see [`ActionPairs`].
    args: ActionPairs<u64>,
}

/// What the schedule saw, after the run.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScheduleLog {
    pub timeline: Vec<TimelineEntry>,
    pub fired: BTreeSet<String>,
    pub hold_timeouts: Vec<String>,
    /// Per hook name: armed hits on each vCPU (index = vCPU), whether it acted or not.
    pub hits: BTreeMap<String, Vec<u32>>,
}

/// The schedule of one run.
pub(crate) struct Scheduler {
    hooks: Vec<ArmedHook>,
    gate_rules: Vec<GateRule>,
    gates: Gates,
    /// When the VM started (set by [`Scheduler::attach`]).
    started: OnceLock<Instant>,
    created: Instant,
    control: OnceLock<Arc<VcpuControl>>,
    /// The run ends this long after this happens.
    end: Option<EndRule>,
    /// The end's countdown started.
    ending: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

fn ns_since(t: Instant, started: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX)
}

impl Scheduler {
    /// A schedule of `hooks` and `gate_rules`; closes the rules' gates in `gates`.
    pub fn new(hooks: Vec<ArmedHook>, gate_rules: Vec<GateRule>, gates: Gates) -> Self {
        for r in &gate_rules {
            gates.close(r.gate);
        }
        let state = State {
            armed: hooks.iter().map(|h| h.hook.after.is_none()).collect(),
            calls: vec![0; hooks.len()],
            ..State::default()
        };
        Scheduler {
            hooks,
            gate_rules,
            gates,
            started: OnceLock::new(),
            created: Instant::now(),
            control: OnceLock::new(),
            state: Mutex::new(state),
            end: None,
            ending: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, st: &mut State, at: Instant, vcpu: Option<u8>, what: String) {
        let started = *self.started.get().unwrap_or(&self.created);
        st.timeline.push(TimelineEntry {
            t_ns: ns_since(at, started),
            vcpu,
            what,
        });
    }

    /// The hook indices armed on `vcpu`, in slot order.
    fn slots(&self, vcpu: u8) -> impl Iterator<Item = usize> + '_ {
        (0..self.hooks.len()).filter(move |&i| self.hooks[i].hook.vcpus.has(vcpu))
    }

    /// Addresses to break at on `vcpu`.
    pub fn breakpoints(&self, vcpu: u8) -> Vec<u64> {
        self.slots(vcpu).map(|i| self.hooks[i].addr).collect()
    }

    /// Sets the start of the timeline (`started`, the run's time zero) and takes the
    /// run's vCPU control.
    pub fn attach(&self, control: &Arc<VcpuControl>, started: Instant) {
        let _ = self.started.set(started);
        let _ = self.control.set(control.clone());
    }

    /// Whether nothing the schedule did so far needed a vCPU stopped at a breakpoint (no
    /// hook was hit, counted or acted, none holds): its state is then what the probe
    /// messages so far make of a fresh one, and a snapshot taken now can be replayed.
    pub fn quiescent(&self) -> bool {
        let st = self.lock();
        st.fired.is_empty() && st.holding.is_empty() && st.calls.iter().all(|&c| c == 0)
    }

    /// Applies `event`: arms hooks, opens gates, releases holds.
    fn fire(&self, st: &mut State, event: &Event, at: Instant) {
        if let Some(end) = self.end.as_ref().filter(|e| e.when.matches(event)) {
            if !self.ending.swap(true, std::sync::atomic::Ordering::SeqCst) {
                self.note(
                    st,
                    at,
                    None,
                    format!(
                        "the run ends {:.1} s after {}",
                        end.after.as_secs_f64(),
                        describe(event)
                    ),
                );
                if let Some(c) = self.control.get() {
                    if end.after.is_zero() {
                        c.request_stop(StopCause::Ended);
                    } else {
                        // The countdown outlives nothing: a stop asked of a run that has
                        // ended is ignored with the run's control.
                        let c = c.clone();
                        let after = end.after;
                        std::thread::spawn(move || {
                            std::thread::sleep(after);
                            c.request_stop(StopCause::Ended);
                        });
                    }
                }
            }
        }
        for (i, h) in self.hooks.iter().enumerate() {
            if !st.armed[i] && h.hook.after.as_ref().is_some_and(|t| t.matches(event)) {
                st.armed[i] = true;
                self.note(
                    st,
                    at,
                    None,
                    format!("hook {} armed ({})", h.hook.name, describe(event)),
                );
            }
        }
        for r in &self.gate_rules {
            if !self.gates.is_open(r.gate) && r.open_when.as_ref().is_some_and(|t| t.matches(event))
            {
                self.gates.open(r.gate);
                self.note(
                    st,
                    at,
                    None,
                    format!("gate {} opened ({})", r.gate.id(), describe(event)),
                );
            }
        }
        let mut k = 0;
        while k < st.holding.len() {
            let (i, vcpu, since) = st.holding[k];
            let releases = match &self.hooks[i].hook.kind {
                HookKind::Hold { release, .. } => release.iter().any(|t| t.matches(event)),
                _ => false,
            };
            if releases {
                st.holding.remove(k);
                if let Some(c) = self.control.get() {
                    c.release(vcpu);
                }
                let held = at.saturating_duration_since(since);
                self.note(
                    st,
                    at,
                    Some(vcpu),
                    format!(
                        "released from {} after {:.1} ms ({})",
                        self.hooks[i].hook.name,
                        held.as_secs_f64() * 1e3,
                        describe(event)
                    ),
                );
            } else {
                k += 1;
            }
        }
    }

    /// Hook `slot` (among this scheduler's on `at`'s vCPU) was reached.
    pub fn on_breakpoint(&self, at: &StoppedVcpu<'_>, slot: usize) -> HookAction {
        let now = Instant::now();
        let vcpu = at.vcpu.id;
        let Some(i) = self.slots(vcpu).nth(slot) else {
            return HookAction::Continue;
        };
        let hook = &self.hooks[i].hook;
        let mut st = self.lock();
        if !st.armed[i] {
            return HookAction::Continue;
        }
        st.calls[i] += 1;
        let call = st.calls[i];
        let per_vcpu = st.hits.entry(hook.name.clone()).or_default();
        if per_vcpu.len() <= usize::from(vcpu) {
            per_vcpu.resize(usize::from(vcpu) + 1, 0);
        }
        per_vcpu[usize::from(vcpu)] += 1;
        if hook.call.is_some_and(|n| n != call) {
            return HookAction::Continue;
        }
        st.fired.insert(hook.name.clone());
        let name = &hook.name;
        let action = match &hook.kind {
            HookKind::Observe => {
                self.note(
                    &mut st,
                    now,
                    Some(vcpu),
                    format!("reached {name} ({}, call {call})", hook.at.symbol),
                );
                HookAction::Continue
            }
            HookKind::Hold { max, open, .. } => {
                // Marked held before any event can release it.
                at.control.hold(vcpu);
                st.holding.push((i, vcpu, now));
                self.note(
                    &mut st,
                    now,
                    Some(vcpu),
                    format!("held at {name} ({}, call {call})", hook.at.symbol),
                );
                for &g in open {
                    self.gates.open(g);
                    self.note(
                        &mut st,
                        now,
                        None,
                        format!("gate {} opened (hold {name})", g.id()),
                    );
                }
                HookAction::Hold { max: *max }
            }
            HookKind::Fail { ret } => {
                let what = match fail_function(at, *ret) {
                    Ok(back) => format!(
                        "{name}: {} returned {ret} without running (call {call}), back at {back:#x}",
                        hook.at.symbol
                    ),
                    Err(e) => format!("{name}: could not make {} fail: {e}", hook.at.symbol),
                };
                self.note(&mut st, now, Some(vcpu), what);
                HookAction::Continue
            }
            HookKind::Stop => {
                self.note(
                    &mut st,
                    now,
                    Some(vcpu),
                    format!("reached {name} ({}): the run ends here", hook.at.symbol),
                );
                st.ended_by = Some(name.clone());
                if let Some(c) = self.control.get() {
                    c.request_stop(StopCause::Ended);
                }
                HookAction::Continue
            }
        };
        self.fire(&mut st, &Event::Hook(name.clone()), now);
        action
    }

    /// A probe message arrived (on the vCPU thread that wrote it: an action is seen
    /// before the guest makes the call it announces).
    pub fn on_probe(&self, ev: &ProbeEvent) {
        let Ok(msg) = &ev.item else {
            return;
        };
        let mut st = self.lock();
        let (event, what) = match msg {
            Message::ActionStart { seq, action, arg } => {
                st.args.start(*seq, *arg);
                let e = Event::Start(*action, *arg);
                let what = format!("agent: {} starts", action_pattern(*action, *arg));
                (Some(e), what)
            }
            Message::ActionResult {
                seq,
                action,
                ret,
                errno,
            } => {
                let arg = st.args.result(*seq).unwrap_or(0);
                let e = Event::Result(*action, arg);
                let outcome = if *ret < 0 {
                    format!("failed: {}", std::io::Error::from_raw_os_error(*errno))
                } else {
                    format!("returned {ret}")
                };
                let what = format!("agent: {} {outcome}", &describe(&e)["result ".len()..]);
                (Some(e), what)
            }
            Message::GateWait(g) => (
                Some(Event::Wait(*g)),
                format!("agent: waits at gate {}", g.id()),
            ),
            Message::GatePassed(g) => (None, format!("agent: passed gate {}", g.id())),
            Message::Boot { stage, round } => {
                st.args.clear();
                (None, format!("agent: stage {stage} (round {round}) up"))
            }
            _ => return,
        };
        self.note(&mut st, ev.at, None, what);
        if let Some(e) = event {
            self.fire(&mut st, &e, ev.at);
        }
    }

    /// A hold on `vcpu` timed out.
    pub fn on_notice(&self, notice: VcpuNotice) {
        let VcpuNotice::HoldTimedOut { vcpu, .. } = notice else {
            return;
        };
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(k) = st.holding.iter().position(|&(_, v, _)| v == vcpu) {
            let (i, _, since) = st.holding.remove(k);
            let name = self.hooks[i].hook.name.clone();
            if matches!(self.hooks[i].hook.kind, HookKind::Hold { timed: true, .. }) {
                let held = now.saturating_duration_since(since);
                self.note(
                    &mut st,
                    now,
                    Some(vcpu),
                    format!(
                        "released from {name} after {:.1} ms (release_after)",
                        held.as_secs_f64() * 1e3
                    ),
                );
            } else {
                self.note(
                    &mut st,
                    now,
                    Some(vcpu),
                    format!("hold {name} timed out: nothing released it"),
                );
                st.hold_timeouts.push(name);
            }
        }
    }

    /// Ends the run when `end` says.
    pub fn with_end(mut self, end: Option<EndRule>) -> Self {
        self.end = end;
        self
    }

    /// Ends the run now (every vCPU stops), saying `why` in the timeline.
    pub fn end_run(&self, why: &str) {
        let mut st = self.lock();
        self.note(
            &mut st,
            Instant::now(),
            None,
            format!("the run ends: {why}"),
        );
        if let Some(c) = self.control.get() {
            c.request_stop(StopCause::Ended);
        }
    }

    /// Marks a handover stage boundary seen by the interceptor.
    pub fn mark(&self, at: Instant, what: &str) {
        let mut st = self.lock();
        self.note(&mut st, at, None, what.to_owned());
    }

    /// What the schedule saw, in time order.
    pub fn finish(&self) -> ScheduleLog {
        let mut st = self.lock();
        let mut timeline = std::mem::take(&mut st.timeline);
        timeline.sort_by_key(|e| e.t_ns);
        ScheduleLog {
            timeline,
            fired: std::mem::take(&mut st.fired),
            hold_timeouts: std::mem::take(&mut st.hold_timeouts),
            hits: std::mem::take(&mut st.hits),
        }
    }
}

/// How an event reads in the timeline.
/// The call `action(arg)` as a scenario file writes it.
fn action_pattern(action: Action, arg: u64) -> crate::config::scenario::ActionPattern {
    crate::config::scenario::ActionPattern {
        action,
        arg: Some(arg),
    }
}

fn describe(event: &Event) -> String {
    let p = action_pattern;
    match event {
        Event::Hook(n) => format!("hook {n}"),
        Event::Start(a, arg) => format!("start {}", p(*a, *arg)),
        Event::Result(a, arg) => format!("result {}", p(*a, *arg)),
        Event::Wait(g) => format!("wait {}", g.id()),
    }
}

/// Makes the function whose first instruction the vCPU is stopped at return `ret`
/// without running it, as the kernel's error injection does (`override_function_with_return`
/// in arch/x86/kernel/kprobes/core.c): `rax = ret`, `rip = [rsp]`, `rsp += 8`. Returns the
/// address it returns to.
fn fail_function(at: &StoppedVcpu<'_>, ret: i64) -> Result<u64, String> {
    let fd = &at.vcpu.fd;
    let mut regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let memory = at.vcpu.memory();
    let read = |pa: u64| memory.read_obj::<u64>(GuestAddress(pa)).ok();
    let pa = translate(&sregs, regs.rsp, read)
        .ok_or_else(|| format!("the stack at {:#x} is not mapped", regs.rsp))?;
    let back = read(pa).ok_or_else(|| format!("cannot read the stack at {pa:#x}"))?;
    regs.rax = u64::from_ne_bytes(ret.to_ne_bytes());
    regs.rip = back;
    regs.rsp = regs.rsp.wrapping_add(8);
    fd.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::scenario::{parse_trigger, ActionPattern, VcpuSelect};
    use crate::config::trace::TraceSpec;
    use std::time::Duration;

    fn hook(name: &str, vcpu: u8, kind: HookKind, after: Option<&str>) -> ArmedHook {
        ArmedHook {
            hook: Hook {
                name: name.into(),
                at: TraceSpec {
                    symbol: name.into(),
                    offset: 0,
                },
                vcpus: VcpuSelect::One(vcpu),
                kind,
                after: after.map(|a| parse_trigger(a).unwrap()),
                call: None,
            },
            addr: 0x1000,
        }
    }

    fn probe(msg: Message) -> ProbeEvent {
        ProbeEvent {
            item: Ok(msg),
            at: Instant::now(),
        }
    }

    #[test]
    fn gates_open_and_holds_release_on_agent_events() {
        let gates = Gates::default();
        let g1 = Gate::new(1).unwrap();
        let g2 = Gate::new(2).unwrap();
        let hold = HookKind::Hold {
            max: Duration::from_secs(60),
            open: vec![g2],
            release: vec![parse_trigger("result close-session 1").unwrap()],
            timed: false,
        };
        let s = Scheduler::new(
            vec![
                hook("serialized", 0, hold, None),
                hook(
                    "blocked",
                    1,
                    HookKind::Observe,
                    Some("start close-session 1"),
                ),
            ],
            vec![
                GateRule {
                    gate: g1,
                    open_when: Some(Trigger::Wait(g2)),
                },
                GateRule {
                    gate: g2,
                    open_when: None,
                },
            ],
            gates.clone(),
        );
        let control = Arc::new(VcpuControl::new(2));
        s.attach(&control, Instant::now());
        assert!(!gates.is_open(g1) && !gates.is_open(g2));
        assert_eq!(s.breakpoints(0).len(), 1);
        assert_eq!(s.breakpoints(1).len(), 1);
        s.on_probe(&probe(Message::GateWait(g2)));
        assert!(
            gates.is_open(g1),
            "gate 1 opens when the agent waits at gate 2"
        );
        // A hold as on_breakpoint starts it (that needs a real vCPU), then its release.
        control.hold(0);
        s.lock().holding.push((0, 0, Instant::now()));
        let start = |seq, arg| Message::ActionStart {
            seq,
            action: Action::CloseSession,
            arg,
        };
        let done = |seq| Message::ActionResult {
            seq,
            action: Action::CloseSession,
            ret: 0,
            errno: 0,
        };
        s.on_probe(&probe(start(1, 0)));
        s.on_probe(&probe(done(1)));
        assert!(
            control.is_held(0),
            "another session's close does not release"
        );
        s.on_probe(&probe(start(2, 1)));
        assert!(
            s.lock().armed[1],
            "the observer is armed by the start of the close"
        );
        s.on_probe(&probe(done(2)));
        assert!(!control.is_held(0));
        let log = s.finish();
        assert!(
            log.timeline
                .iter()
                .any(|e| e.what.starts_with("released from serialized")),
            "{:?}",
            log.timeline
        );
        assert!(log.hold_timeouts.is_empty());
    }

    #[test]
    fn a_hold_that_times_out_is_recorded() {
        let hold = HookKind::Hold {
            max: Duration::from_millis(1),
            open: vec![],
            release: vec![Trigger::Hook("x".into())],
            timed: false,
        };
        let s = Scheduler::new(vec![hook("h", 0, hold, None)], vec![], Gates::default());
        s.lock().holding.push((0, 0, Instant::now()));
        s.on_notice(VcpuNotice::HoldTimedOut { vcpu: 0, slot: 0 });
        assert_eq!(s.finish().hold_timeouts, ["h"]);
    }

    #[test]
    fn a_timed_release_is_no_timeout() {
        let hold = HookKind::Hold {
            max: Duration::from_millis(1),
            open: vec![],
            release: vec![],
            timed: true,
        };
        let s = Scheduler::new(vec![hook("h", 0, hold, None)], vec![], Gates::default());
        s.lock().holding.push((0, 0, Instant::now()));
        s.on_notice(VcpuNotice::HoldTimedOut { vcpu: 0, slot: 0 });
        let log = s.finish();
        assert!(log.hold_timeouts.is_empty());
        assert!(
            log.timeline
                .iter()
                .any(|e| e.what.contains("(release_after)")),
            "{:?}",
            log.timeline
        );
    }

    #[test]
    fn events_match_their_patterns() {
        let t = Trigger::Start(ActionPattern {
            action: Action::PreserveFd,
            arg: None,
        });
        assert!(t.matches(&Event::Start(Action::PreserveFd, 5)));
        assert!(!t.matches(&Event::Result(Action::PreserveFd, 5)));
        assert!(Trigger::Hook("a".into()).matches(&Event::Hook("a".into())));
    }
}
