//! The search space of `explore` and the scenario of each trial (docs/explore.md).
//!
//! A workload is a scenario's stage 1 and 2 whose CPU-0 thread waits at gate
//! [`ACTION_GATE`] right before its `reboot` (the action under test). `explore` adds the
//! racing thread on CPU 1: the preparation its calls need, a wait at [`RACE_GATE`], then
//! every candidate call `k` behind `if` gate [`SELECT_BASE`]` + k`. The guest boots once
//! with that script and the VMM keeps a snapshot where both threads wait; every trial
//! starts there and differs only in what the VMM arms: where CPU 0 is held, which
//! selector gate opens (so which call CPU 1 makes while it is held), when the hold ends,
//! or which function is made to fail on its N-th call.

use std::fmt;
use std::time::Duration;

use luo_protocol::message::Action;
use luo_protocol::probe::Gate;
use luo_protocol::script::{FileId, Fill, Script, StageScript, Step, Thread};
use serde::{Deserialize, Serialize};

pub use crate::config::options::ExploreMode as Mode;
use crate::config::scenario::{
    ActionPattern, Condition, GateRule, Hook, HookKind, Scenario, Trigger, VcpuSelect, VerdictRules,
};
use crate::config::trace::TraceSpec;

/// The gate CPU 0 waits at before `reboot`.
pub const ACTION_GATE: u8 = 1;
/// The gate the racing thread waits at.
pub const RACE_GATE: u8 = 2;
/// Selector gates: `SELECT_BASE + k` lets the racing thread make call `k`.
pub const SELECT_BASE: u8 = 10;
/// Most racing calls (selector gates 10..=41).
pub const MAX_CALLS: u8 = 32;
/// The vCPU the action runs on (held at hold points).
pub const ACTION_VCPU: u8 = 0;
/// The vCPU of the racing thread.
pub const RACE_VCPU: u8 = 1;
/// Most calls of one function made to fail, one trial each (1st, 2nd, ...).
pub const MAX_FAIL_CALLS: u32 = 4;
/// Where a vCPU goes when its task blocks (kernel/sched/idle.c): the racing call blocked
/// when its vCPU gets here after the call started.
pub const IDLE_SYMBOL: &str = "default_idle_call";
/// The error a failing function returns (-EIO).
pub const FAIL_RETURN: i64 = -5;

/// When a hold at a hold point ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Release {
    /// When the racing call returned, or its vCPU went idle after it started (it blocked:
    /// nothing more happens on that side until CPU 0 goes on).
    Settled,
    /// After this many milliseconds, whatever the racing call did.
    AfterMs(u64),
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Release::Settled => f.write_str("settled"),
            Release::AfterMs(ms) => write!(f, "after-{ms}ms"),
        }
    }
}

/// One racing call: a step of the racing thread, with the steps that prepare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RacingCall {
    /// The call.
    pub step: Step,
    /// Steps before the race gate it needs (a memfd to preserve).
    pub prep: Vec<Step>,
}

impl RacingCall {
    /// How the agent announces it (what `result` and `start` triggers match).
    pub fn pattern(&self) -> ActionPattern {
        announced(self.step).unwrap_or(ActionPattern {
            action: Action::Fill,
            arg: None,
        })
    }

    /// A label for trial ids: `close-session-1`, `preserve-fd-0.1`.
    pub fn label(&self) -> String {
        self.pattern().to_string().replace(' ', "-")
    }
}

/// The agent action a step announces, with its argument.
pub fn announced(step: Step) -> Option<ActionPattern> {
    let (action, arg) = match step {
        Step::Create(s) => (Action::CreateSession, u64::from(s)),
        Step::Close(s) => (Action::CloseSession, u64::from(s)),
        Step::Finish(s) => (Action::FinishSession, u64::from(s)),
        Step::Retrieve(s) => (Action::RetrieveSession, u64::from(s)),
        Step::Preserve(id) => (Action::PreserveFd, id.token()),
        Step::RetrieveFd(id) => (Action::RetrieveFd, id.token()),
        Step::Fill(id, _) => (Action::Fill, id.token()),
        Step::Memfd(id, _) => (Action::Memfd, id.token()),
        Step::KexecLoad => (Action::KexecLoad, 0),
        Step::Reboot => (Action::Reboot, 0),
        Step::Pressure(n) => (Action::Pressure, n),
        Step::Gate(_) | Step::If(_) => return None,
    };
    Some(ActionPattern {
        action,
        arg: Some(arg),
    })
}

/// The workload of an exploration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Where it came from (`default`, or the file).
    pub origin: String,
    /// Stage 1's threads (one on CPU 0 waits at [`ACTION_GATE`] before `reboot`); the
    /// racing thread is not among them.
    pub stage1: StageScript,
    /// Stage 2.
    pub stage2: StageScript,
    /// Extra kernel parameters.
    pub cmdline: String,
    /// The workload's own gates (not [`ACTION_GATE`], [`RACE_GATE`] nor a selector).
    pub gates: Vec<GateRule>,
    /// The candidate racing calls.
    pub calls: Vec<RacingCall>,
}

/// The gate the default workload's second thread waits at until a `reboot` failed.
pub const RETRY_GATE: u8 = 3;

/// The default workload: two sessions with a memfd each, the next kernel loaded, gate 1,
/// `reboot` on CPU 0; on CPU 1, a thread that goes on only if that reboot failed (an
/// injected failure): it uses LUO again and hands over (preserves one more memfd, closes
/// session 1, reboots), so the unwind of a failed reboot is part of the search.
pub fn default_workload() -> Workload {
    let steps = |list: &[&str]| -> Vec<Step> {
        list.iter()
            .map(|s| Step::parse(s).expect("the default workload's steps parse"))
            .collect()
    };
    let stage1 = StageScript {
        threads: vec![
            Thread {
                cpu: 0,
                steps: steps(&[
                    "create 0",
                    "memfd 0.0 64K",
                    "fill 0.0 write",
                    "preserve 0.0",
                    "create 1",
                    "memfd 1.0 64K",
                    "fill 1.0 write",
                    "preserve 1.0",
                    "kexec-load",
                    "gate 1",
                    "reboot",
                ]),
            },
            Thread {
                cpu: 1,
                steps: steps(&[
                    "memfd 0.2 64K",
                    "fill 0.2 write",
                    "gate 3",
                    "preserve 0.2",
                    "close 1",
                    "reboot",
                ]),
            },
        ],
    };
    let stage2 = StageScript {
        threads: vec![Thread {
            cpu: 0,
            steps: steps(&["retrieve 0", "retrieve-fd 0.0", "finish 0"]),
        }],
    };
    let mut w = Workload {
        origin: "default".into(),
        stage1,
        stage2,
        cmdline: String::new(),
        gates: vec![GateRule {
            gate: gate(RETRY_GATE),
            open_when: Some(Trigger::Result(ActionPattern {
                action: Action::Reboot,
                arg: None,
            })),
        }],
        calls: vec![],
    };
    w.calls = racing_calls(&w.stage1);
    w
}

/// Whether explore owns gate `g` (the action's, the race's, the selectors).
pub fn explore_owns(g: u8) -> bool {
    g == ACTION_GATE || g == RACE_GATE || (SELECT_BASE..SELECT_BASE + MAX_CALLS).contains(&g)
}

/// The racing calls a stage-1 script offers: a new session, closing each session,
/// preserving a new memfd into the first, writing a preserved memfd, and the calls that
/// belong to stage 2 made too early (finish, retrieve, retrieve-fd).
pub fn racing_calls(stage1: &StageScript) -> Vec<RacingCall> {
    let steps: Vec<Step> = stage1
        .threads
        .iter()
        .flat_map(|t| t.steps.iter().copied())
        .collect();
    let mut sessions: Vec<u32> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Create(s) => Some(*s),
            _ => None,
        })
        .collect();
    sessions.dedup();
    let files: Vec<FileId> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Memfd(id, _) => Some(*id),
            _ => None,
        })
        .collect();
    let preserved: Vec<FileId> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Preserve(id) => Some(*id),
            _ => None,
        })
        .collect();
    let mut calls = Vec::new();
    let call = |step| RacingCall { step, prep: vec![] };
    let new_session = sessions.iter().max().map_or(0, |m| m + 1);
    calls.push(call(Step::Create(new_session)));
    for &s in sessions.iter().take(4) {
        calls.push(call(Step::Close(s)));
    }
    if let Some(&s) = sessions.first() {
        let free = (0..).find(|&f| {
            !files.contains(&FileId {
                session: s,
                file: f,
            })
        });
        if let Some(f) = free {
            let id = FileId {
                session: s,
                file: f,
            };
            calls.push(RacingCall {
                step: Step::Preserve(id),
                prep: vec![Step::Memfd(id, 64 << 10), Step::Fill(id, Fill::Write)],
            });
        }
        calls.push(call(Step::Finish(s)));
        calls.push(call(Step::Retrieve(s)));
    }
    if let Some(&id) = preserved.first() {
        calls.push(call(Step::Fill(id, Fill::Write)));
        calls.push(call(Step::RetrieveFd(id)));
    }
    calls.truncate(usize::from(MAX_CALLS));
    calls
}

/// Why a workload cannot be explored.
pub fn check_workload(w: &Workload) -> Result<(), String> {
    let Some(main) = w.stage1.threads.iter().find(|t| t.cpu == 0) else {
        return Err(format!(
            "workload {}: stage 1 has no thread on CPU 0 (the one that reboots)",
            w.origin
        ));
    };
    let reboot = main.steps.iter().position(|s| *s == Step::Reboot);
    let Some(reboot) = reboot else {
        return Err(format!(
            "workload {}: stage 1 never reaches the action under test: its CPU-0 thread has no `reboot`",
            w.origin
        ));
    };
    if reboot == 0 || main.steps[reboot - 1] != Step::Gate(gate(ACTION_GATE)) {
        return Err(format!(
            "workload {}: CPU 0's first `reboot` must come right after `gate {ACTION_GATE}` (where every trial starts)",
            w.origin
        ));
    }
    let waits: Vec<u8> = w
        .stage1
        .threads
        .iter()
        .chain(&w.stage2.threads)
        .flat_map(|t| &t.steps)
        .filter_map(|s| match s {
            Step::Gate(g) | Step::If(g) => Some(g.id()),
            _ => None,
        })
        .filter(|&g| g != ACTION_GATE)
        .collect();
    if let Some(g) = waits.iter().find(|&&g| explore_owns(g)) {
        return Err(format!(
            "workload {}: uses gate {g}; explore owns gates {ACTION_GATE}, {RACE_GATE} and {SELECT_BASE} to {} (the workload waits at gate {ACTION_GATE} before its reboot, at others of its own)",
            w.origin,
            SELECT_BASE + MAX_CALLS - 1
        ));
    }
    if let Some(g) = waits.iter().find(|&&g| {
        !w.gates
            .iter()
            .any(|r| r.gate.id() == g && r.open_when.is_some())
    }) {
        return Err(format!(
            "workload {}: waits at gate {g}, which no [[gate]] with an open_when opens",
            w.origin
        ));
    }
    if w.calls.is_empty() {
        return Err(format!(
            "workload {}: creates no session, so there is no racing call to make",
            w.origin
        ));
    }
    Ok(())
}

fn gate(id: u8) -> Gate {
    Gate::new(id).expect("explore's gates are below 64")
}

/// The selector gate of racing call `k` (`k` < [`MAX_CALLS`]: the calls are truncated to
/// that many).
fn selector(k: usize) -> Gate {
    let k = u8::try_from(k)
        .ok()
        .filter(|&k| k < MAX_CALLS)
        .expect("at most MAX_CALLS racing calls");
    gate(SELECT_BASE + k)
}

/// The script every trial shares (the snapshot's): the workload plus the racing thread.
pub fn script(w: &Workload) -> Script {
    let mut racer = Vec::new();
    for c in &w.calls {
        for p in &c.prep {
            if !racer.contains(p) {
                racer.push(*p);
            }
        }
    }
    racer.push(Step::Gate(gate(RACE_GATE)));
    for (k, c) in w.calls.iter().enumerate() {
        racer.push(Step::If(selector(k)));
        racer.push(c.step);
    }
    let mut stage1 = w.stage1.clone();
    stage1.threads.push(Thread {
        cpu: u16::from(RACE_VCPU),
        steps: racer,
    });
    Script {
        stage1,
        stage2: w.stage2.clone(),
    }
}

/// One trial.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Trial {
    /// The workload alone, nothing armed: the run that boots and keeps the snapshot; every
    /// oracle must pass on it.
    Baseline,
    /// Where the workload goes: how often `function` runs (per vCPU), no race; with
    /// `with`, racing call `with` is made first, to its end, and then the reboot.
    Map {
        /// The function.
        function: String,
        /// The racing call made before the reboot (index into the workload's calls).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        with: Option<usize>,
    },
    /// CPU 0 held at `point`'s first call, racing call `call` made on CPU 1, released
    /// by `release`.
    Race {
        /// The hold point (a function's entry).
        point: String,
        /// Index into the workload's calls.
        call: usize,
        /// When the hold ends.
        release: Release,
    },
    /// `function` returns -EIO without running on its `call`-th call; with `with`,
    /// during racing call `with`, made before the reboot (the uAPI's error paths).
    Fail {
        /// The function.
        function: String,
        /// 1-based.
        call: u32,
        /// The racing call made before the reboot (index into the workload's calls).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        with: Option<usize>,
    },
}

/// `@LABEL` of racing call `with`, or nothing.
fn with_label(w: &Workload, with: Option<usize>) -> String {
    with.map_or(String::new(), |k| {
        format!("@{}", w.calls.get(k).map_or("?".into(), RacingCall::label))
    })
}

/// The key of [`Reach`] for `function` reached with racing call `with` made first.
pub fn reach_key(w: &Workload, function: &str, with: Option<usize>) -> String {
    format!("{function}{}", with_label(w, with))
}

impl Trial {
    /// Its id, unique in an exploration: `race:luo_flb_serialize:close-session-1:settled`.
    pub fn id(&self, w: &Workload) -> String {
        match self {
            Trial::Baseline => "baseline".into(),
            Trial::Map { function, with } => format!("map:{}", reach_key(w, function, *with)),
            Trial::Race {
                point,
                call,
                release,
            } => format!(
                "race:{point}:{}:{release}",
                w.calls.get(*call).map_or("?".into(), RacingCall::label)
            ),
            Trial::Fail {
                function,
                call,
                with,
            } => format!("fail:{function}:{call}{}", with_label(w, *with)),
        }
    }

    /// What it does, in words.
    pub fn describe(&self, w: &Workload) -> String {
        match self {
            Trial::Baseline => "the workload alone".into(),
            Trial::Map { function, with } => match with {
                None => format!("map {function}"),
                Some(k) => format!(
                    "map {function} during {}",
                    w.calls
                        .get(*k)
                        .map_or("?".into(), |c| c.pattern().to_string())
                ),
            },
            Trial::Race {
                point,
                call,
                release,
            } => format!(
                "hold CPU 0 at {point}, {} on CPU 1, release {release}",
                w.calls
                    .get(*call)
                    .map_or("?".into(), |c| c.pattern().to_string())
            ),
            Trial::Fail {
                function,
                call,
                with: None,
            } => format!("{function} fails (-EIO) on call {call}"),
            Trial::Fail {
                function,
                call,
                with: Some(k),
            } => format!(
                "{function} fails (-EIO) on call {call}, {} on CPU 1 before the reboot",
                w.calls
                    .get(*k)
                    .map_or("?".into(), |c| c.pattern().to_string())
            ),
        }
    }
}

/// What the map trials found: per [`reach_key`] (a function, alone or with a racing call
/// made first), its calls on each vCPU (index = vCPU).
pub type Reach = std::collections::BTreeMap<String, Vec<u32>>;

/// The map trials: every point alone, then (fail mode) every fallible function with each
/// racing call made first.
pub fn map_trials(mode: Mode, points: &[String], fallible: &[String], calls: usize) -> Vec<Trial> {
    let mut out: Vec<Trial> = points
        .iter()
        .map(|f| Trial::Map {
            function: f.clone(),
            with: None,
        })
        .collect();
    if mode.fails() {
        for k in 0..calls {
            out.extend(fallible.iter().map(|f| Trial::Map {
                function: f.clone(),
                with: Some(k),
            }));
        }
    }
    out
}

/// The search trials, in a deterministic order: for `mode`, race trials at the points
/// reached on the action's vCPU × calls × `releases`; fail trials for the fallible
/// functions reached, alone and with each racing call made first, on calls
/// 1..=min(calls, [`MAX_FAIL_CALLS`]); then shuffled by `seed` (so a budget samples the
/// whole space, and the same seed gives the same list).
pub fn search_trials(
    w: &Workload,
    mode: Mode,
    points: &[String],
    fallible: &[String],
    reach: &Reach,
    releases: &[Release],
    seed: u64,
) -> Vec<Trial> {
    let calls = w.calls.len();
    let mut out = Vec::new();
    if mode.races() {
        for p in points {
            let on_action = reach
                .get(p)
                .and_then(|v| v.get(usize::from(ACTION_VCPU)))
                .copied()
                .unwrap_or(0);
            if on_action == 0 {
                continue;
            }
            for call in 0..calls {
                for &release in releases {
                    out.push(Trial::Race {
                        point: p.clone(),
                        call,
                        release,
                    });
                }
            }
        }
    }
    if mode.fails() {
        for with in std::iter::once(None).chain((0..calls).map(Some)) {
            for f in fallible {
                let total: u32 = reach
                    .get(&reach_key(w, f, with))
                    .map_or(0, |v| v.iter().sum());
                for call in 1..=total.min(MAX_FAIL_CALLS) {
                    out.push(Trial::Fail {
                        function: f.clone(),
                        call,
                        with,
                    });
                }
            }
        }
    }
    shuffle(&mut out, seed);
    out
}

/// Fisher-Yates with splitmix64: the same `seed`, the same order, on every machine.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = usize::try_from(next() % (i as u64 + 1)).unwrap_or(i);
        items.swap(i, j);
    }
}

/// The verdict rules of a trial's scenario (the explorer judges with its own oracles;
/// these are what `scenario run` of a finding applies).
fn default_verdict() -> VerdictRules {
    VerdictRules {
        correct: vec![Condition::RecordsMatch],
        bug: vec![Condition::RecordsDiffer, Condition::KernelOops],
    }
}

fn observe(name: &str, symbol: &str, vcpus: VcpuSelect, after: Option<Trigger>) -> Hook {
    Hook {
        name: name.into(),
        at: TraceSpec {
            symbol: symbol.into(),
            offset: 0,
        },
        vcpus,
        kind: HookKind::Observe,
        after,
        call: None,
    }
}

/// The hooks and gates of `trial` (the script aside). `hold_max`: the longest a settled
/// hold waits.
fn schedule(
    w: &Workload,
    trial: &Trial,
    hold_max: Duration,
    select_all: bool,
) -> (Vec<GateRule>, Vec<Hook>) {
    let mut gates = vec![
        GateRule {
            gate: gate(ACTION_GATE),
            open_when: Some(Trigger::Wait(gate(RACE_GATE))),
        },
        GateRule {
            gate: gate(RACE_GATE),
            open_when: None,
        },
    ];
    gates.extend(w.gates.iter().cloned());
    if select_all {
        for k in 0..w.calls.len() {
            gates.push(GateRule {
                gate: selector(k),
                open_when: None,
            });
        }
    }
    // A racing call made first: the race gate and its selector open as soon as the racer
    // waits, and the reboot waits for the call's result instead of for the racer.
    if let Trial::Map { with: Some(k), .. } | Trial::Fail { with: Some(k), .. } = trial {
        let pattern = w.calls[*k].pattern();
        gates[0].open_when = Some(Trigger::Result(pattern));
        gates[1].open_when = Some(Trigger::Wait(gate(RACE_GATE)));
        if select_all {
            if let Some(g) = gates.iter_mut().find(|g| g.gate == selector(*k)) {
                g.open_when = Some(Trigger::Wait(gate(RACE_GATE)));
            }
        }
    }
    let hooks = match trial {
        Trial::Baseline => vec![],
        Trial::Map { function, .. } => vec![observe("reach", function, VcpuSelect::All, None)],
        Trial::Race {
            point,
            call,
            release,
        } => {
            let c = &w.calls[*call];
            let mut open = Vec::new();
            if select_all {
                open.push(selector(*call));
            }
            open.push(gate(RACE_GATE));
            let (max, release_when, timed) = match release {
                Release::Settled => (
                    hold_max,
                    vec![
                        Trigger::Result(c.pattern()),
                        Trigger::Hook("blocked".into()),
                    ],
                    false,
                ),
                Release::AfterMs(ms) => (Duration::from_millis(*ms), vec![], true),
            };
            let mut hooks = vec![Hook {
                name: "held".into(),
                at: TraceSpec {
                    symbol: point.clone(),
                    offset: 0,
                },
                vcpus: VcpuSelect::One(ACTION_VCPU),
                kind: HookKind::Hold {
                    max,
                    open,
                    release: release_when,
                    timed,
                },
                after: None,
                call: Some(1),
            }];
            if *release == Release::Settled {
                hooks.push(observe(
                    "blocked",
                    IDLE_SYMBOL,
                    VcpuSelect::One(RACE_VCPU),
                    Some(Trigger::Start(c.pattern())),
                ));
            }
            hooks
        }
        Trial::Fail { function, call, .. } => vec![Hook {
            name: "fails".into(),
            at: TraceSpec {
                symbol: function.clone(),
                offset: 0,
            },
            vcpus: VcpuSelect::All,
            kind: HookKind::Fail { ret: FAIL_RETURN },
            after: None,
            call: Some(*call),
        }],
    };
    (gates, hooks)
}

/// The scenario a trial runs: the shared script (all racing calls behind their selector
/// gates) and the trial's hooks and gates.
pub fn trial_scenario(w: &Workload, trial: &Trial, vcpus: u8, hold_max: Duration) -> Scenario {
    let (gates, hooks) = schedule(w, trial, hold_max, true);
    Scenario {
        name: "explore-trial".into(),
        summary: trial.describe(w),
        variant: None,
        vcpus,
        timeout: Duration::from_secs(1200),
        cmdline: w.cmdline.clone(),
        script: script(w),
        gates,
        hooks,
        verdict: default_verdict(),
    }
}

/// The scenario file of a finding: the workload with only the trial's racing call (no
/// selector gates), its hooks, and `verdict`.
#[allow(clippy::too_many_arguments)]
pub fn finding_scenario(
    w: &Workload,
    trial: &Trial,
    name: &str,
    summary: &str,
    variant: Option<&str>,
    vcpus: u8,
    timeout: Duration,
    hold_max: Duration,
    verdict: VerdictRules,
) -> Scenario {
    let (gates, hooks) = schedule(w, trial, hold_max, false);
    let mut stage1 = w.stage1.clone();
    if let Trial::Race { call, .. }
    | Trial::Fail {
        with: Some(call), ..
    }
    | Trial::Map {
        with: Some(call), ..
    } = trial
    {
        let c = &w.calls[*call];
        let mut steps = c.prep.clone();
        steps.push(Step::Gate(gate(RACE_GATE)));
        steps.push(c.step);
        stage1.threads.push(Thread {
            cpu: u16::from(RACE_VCPU),
            steps,
        });
    }
    // Without a racing thread nobody waits at the race gate: the reboot needs no gate.
    let racer = matches!(
        trial,
        Trial::Race { .. } | Trial::Fail { with: Some(_), .. } | Trial::Map { with: Some(_), .. }
    );
    let gates = if racer {
        gates
    } else {
        for t in &mut stage1.threads {
            t.steps.retain(|s| *s != Step::Gate(gate(ACTION_GATE)));
        }
        w.gates.clone()
    };
    Scenario {
        name: name.into(),
        summary: summary.into(),
        variant: variant.map(str::to_owned),
        vcpus,
        timeout,
        cmdline: w.cmdline.clone(),
        script: Script {
            stage1,
            stage2: w.stage2.clone(),
        },
        gates,
        hooks,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_workload_offers_every_kind_of_call_and_checks() {
        let w = default_workload();
        check_workload(&w).unwrap();
        let labels: Vec<String> = w.calls.iter().map(RacingCall::label).collect();
        assert_eq!(
            labels,
            [
                "create-session-2",
                "close-session-0",
                "close-session-1",
                "preserve-fd-0.1",
                "finish-session-0",
                "retrieve-session-0",
                "fill-0.0",
                "retrieve-fd-0.0"
            ]
        );
        let s = script(&w);
        s.stage1.validate().unwrap();
        let racer = &s.stage1.threads[2];
        assert_eq!(racer.cpu, 1);
        assert_eq!(racer.steps[2], Step::Gate(gate(RACE_GATE)));
        assert_eq!(racer.steps[3], Step::If(gate(SELECT_BASE)));
        assert_eq!(racer.steps.len(), 3 + 2 * w.calls.len());
    }

    #[test]
    fn workloads_that_miss_the_action_are_refused() {
        let mut w = default_workload();
        w.stage1.threads[0].steps.retain(|s| *s != Step::Reboot);
        assert!(check_workload(&w).unwrap_err().contains("never reaches"));
        let mut w = default_workload();
        w.stage1.threads[0]
            .steps
            .retain(|s| *s != Step::Gate(gate(ACTION_GATE)));
        assert!(check_workload(&w)
            .unwrap_err()
            .contains("right after `gate 1`"));
        let mut w = default_workload();
        w.stage1.threads[1].steps[2] = Step::Gate(gate(RACE_GATE));
        assert!(check_workload(&w).unwrap_err().contains("explore owns"));
        let mut w = default_workload();
        w.gates.clear();
        assert!(check_workload(&w).unwrap_err().contains("no [[gate]]"));
    }

    #[test]
    fn trial_lists_are_deterministic_and_cover_the_reached_space() {
        let w = default_workload();
        let mut reach = Reach::new();
        reach.insert("a".into(), vec![1, 0]);
        reach.insert("b".into(), vec![0, 3]);
        reach.insert("c".into(), vec![0, 0]);
        reach.insert(reach_key(&w, "c", Some(3)), vec![0, 2]);
        let points: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let rel = [Release::Settled, Release::AfterMs(500)];
        let one = search_trials(&w, Mode::Both, &points, &points, &reach, &rel, 7);
        let two = search_trials(&w, Mode::Both, &points, &points, &reach, &rel, 7);
        assert_eq!(one, two);
        // Race: only a is reached on vCPU 0: 8 calls × 2 releases. Fail: a once, b 3
        // times, c twice with call 3 (preserve-fd 0.1) made first.
        assert_eq!(one.len(), 16 + 1 + 3 + 2);
        assert!(one.contains(&Trial::Fail {
            function: "c".into(),
            call: 2,
            with: Some(3)
        }));
        let other = search_trials(&w, Mode::Both, &points, &points, &reach, &rel, 8);
        assert_ne!(one, other, "another seed, another order");
        let mut sorted = one.clone();
        sorted.sort();
        let mut sorted_other = other;
        sorted_other.sort();
        assert_eq!(sorted, sorted_other, "the same trials");
        assert!(
            search_trials(&w, Mode::Race, &points, &points, &reach, &rel, 7)
                .iter()
                .all(|t| matches!(t, Trial::Race { point, .. } if point == "a"))
        );
        // The map: every point alone; in fail mode every fallible one after each call.
        assert_eq!(map_trials(Mode::Race, &points, &points[..1], 8).len(), 3);
        assert_eq!(
            map_trials(Mode::Fail, &points, &points[..1], 8).len(),
            3 + 8
        );
        let with = Trial::Fail {
            function: "memfd_luo_preserve".into(),
            call: 1,
            with: Some(3),
        };
        assert_eq!(with.id(&w), "fail:memfd_luo_preserve:1@preserve-fd-0.1");
    }

    #[test]
    fn a_trial_scenario_checks_and_its_finding_scenario_round_trips() {
        let w = default_workload();
        let t = Trial::Race {
            point: "luo_flb_serialize".into(),
            call: 2,
            release: Release::Settled,
        };
        assert_eq!(t.id(&w), "race:luo_flb_serialize:close-session-1:settled");
        let sc = trial_scenario(&w, &t, 2, Duration::from_secs(30));
        let back = Scenario::parse(&sc.to_toml(""), "trial.toml").unwrap();
        assert_eq!(back, sc);
        let f = finding_scenario(
            &w,
            &t,
            "close-race",
            "a close",
            Some("luo-reboot-unlocked"),
            2,
            Duration::from_secs(600),
            Duration::from_secs(30),
            default_verdict(),
        );
        let text = f.to_toml("found by luo-vmm explore");
        let back = Scenario::parse(&text, "close-race.toml").unwrap();
        assert_eq!(back, f, "{text}");
        assert!(text.contains("steps = [\"gate 2\", \"close 1\"]"), "{text}");
        let fail = Trial::Fail {
            function: "luo_file_freeze".into(),
            call: 2,
            with: None,
        };
        let f = finding_scenario(
            &w,
            &fail,
            "unwind",
            "a failed freeze",
            None,
            2,
            Duration::from_secs(600),
            Duration::from_secs(30),
            default_verdict(),
        );
        let back = Scenario::parse(&f.to_toml(""), "unwind.toml").unwrap();
        assert_eq!(back, f);
        assert_eq!(back.gates.len(), 1, "the workload's own gate only");
        // A failure inside a racing call made before the reboot.
        let during = Trial::Fail {
            function: "memfd_luo_preserve".into(),
            call: 1,
            with: Some(3),
        };
        let f = finding_scenario(
            &w,
            &during,
            "preserve-fails",
            "a failed preserve",
            None,
            2,
            Duration::from_secs(600),
            Duration::from_secs(30),
            default_verdict(),
        );
        let text = f.to_toml("");
        let back = Scenario::parse(&text, "preserve-fails.toml").unwrap();
        assert_eq!(back, f);
        assert!(
            text.contains("open_when = \"result preserve-fd 0.1\""),
            "{text}"
        );
        assert!(
            text.contains(
                "steps = [\"memfd 0.1 65536\", \"fill 0.1 write\", \"gate 2\", \"preserve 0.1\"]"
            ),
            "{text}"
        );
    }

    #[test]
    fn shuffles_are_permutations() {
        let mut v: Vec<u32> = (0..100).collect();
        shuffle(&mut v, 42);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
