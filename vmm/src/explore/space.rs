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
    ActionPattern, Condition, EndRule, GateRule, Hook, HookKind, Scenario, Trigger, VcpuSelect,
    VerdictRules,
};
use crate::config::trace::TraceSpec;
use crate::explore::code::{Failure, Fallible};

/// The gate CPU 0 waits at before `reboot`.
pub const ACTION_GATE: u8 = 1;
/// The gate the racing thread waits at.
pub const RACE_GATE: u8 = 2;
/// Selector gates: `SELECT_BASE + k` lets the racing thread make call `k`.
pub const SELECT_BASE: u8 = 10;
/// Most racing calls (selector gates 10..=41).
pub const MAX_CALLS: u8 = 32;
/// The gate stage 2's CPU-0 thread waits at before its first step (stage 2's action).
pub const ACTION2_GATE: u8 = 4;
/// The gate stage 2's racing thread waits at.
pub const RACE2_GATE: u8 = 5;
/// Stage 2's selector gates: `SELECT2_BASE + k` lets its racing thread make call `k`.
pub const SELECT2_BASE: u8 = 42;
/// Most stage-2 racing calls (selector gates 42..=61).
pub const MAX_CALLS2: u8 = 20;
/// The vCPU the action runs on (held at hold points).
pub const ACTION_VCPU: u8 = 0;
/// The vCPU of the racing thread.
pub const RACE_VCPU: u8 = 1;
/// Most calls of one function made to fail, one trial each (1st, 2nd, ...).
pub const MAX_FAIL_CALLS: u32 = 4;
/// Where a vCPU goes when its task blocks (kernel/sched/idle.c): the racing call blocked
/// when its vCPU gets here after the call started.
pub const IDLE_SYMBOL: &str = "default_idle_call";
/// What stage 2's machine boots with besides the workload's parameters: a freed page is
/// zeroed at once (`init_on_free=1`, mm/mm_init.c), so that preserved memory the next
/// kernel hands back to its allocator is written, and seen in the dirty log, within the
/// trial that freed it (the "preserved data written" oracle, docs/explore.md).
pub const STAGE2_PARAMS: &str = "init_on_free=1";

/// The workload's extra kernel parameters for a trial of stage 1 or 2 ([`STAGE2_PARAMS`]).
pub fn stage_cmdline(w: &Workload, stage2: bool) -> String {
    match (stage2, w.cmdline.trim()) {
        (false, extra) => extra.to_owned(),
        (true, "") => STAGE2_PARAMS.to_owned(),
        (true, extra) => format!("{extra} {STAGE2_PARAMS}"),
    }
}

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

/// The agent action a step announces (its first: `retrieve-fd` goes on with
/// `check-data`), with its argument.
pub fn announced(step: Step) -> Option<ActionPattern> {
    crate::config::scenario::step_announces(step)
        .into_iter()
        .next()
}

/// The size a racing `truncate` of memfd `id` gives it: half its size in `stage` (its
/// `memfd` step), or half of [`TRUNCATE_DEFAULT`] when `stage` does not make it; at least
/// one byte (a step's size is 1 or more).
fn truncated_size(stage: &StageScript, id: FileId) -> u64 {
    let made = stage
        .threads
        .iter()
        .flat_map(|t| &t.steps)
        .find_map(|s| match s {
            Step::Memfd(f, size) if *f == id => Some(*size),
            _ => None,
        });
    (made.unwrap_or(TRUNCATE_DEFAULT) / 2).max(1)
}

/// The racing calls on memfd `id` itself: `ftruncate` to half its size (stage 1's `memfd`
/// step says it), then `close()` of the agent's descriptor.
fn file_calls(stage1: &StageScript, id: FileId) -> [RacingCall; 2] {
    [
        RacingCall {
            step: Step::Truncate(id, truncated_size(stage1, id)),
            prep: vec![],
        },
        RacingCall {
            step: Step::CloseFd(id),
            prep: vec![],
        },
    ]
}

/// Every step of a stage, its threads one after the other.
fn stage_steps(stage: &StageScript) -> Vec<Step> {
    stage
        .threads
        .iter()
        .flat_map(|t| t.steps.iter().copied())
        .collect()
}

/// The sessions `pick` names in `steps`, in order, runs of one collapsed.
fn sessions_of(steps: &[Step], pick: impl Fn(&Step) -> Option<u32>) -> Vec<u32> {
    let mut sessions: Vec<u32> = steps.iter().filter_map(pick).collect();
    sessions.dedup();
    sessions
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
    /// Stage 2's racing calls (none: stage 2 is not searched, its CPU-0 thread does not
    /// start with `gate 4`).
    pub calls2: Vec<RacingCall>,
    /// The lock sites among the hold points (`FUNCTION+0xOFF`, [`crate::explore::sites`])
    /// → the lock function whose call returns there. Words only ([`Trial::describe`]):
    /// no trial id depends on it.
    pub sites: std::collections::BTreeMap<String, String>,
}

/// The size a racing `truncate` halves when the script does not say the memfd's (bytes).
pub const TRUNCATE_DEFAULT: u64 = 64 << 10;

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
            steps: steps(&[
                "gate 4",
                "retrieve 0",
                "retrieve-fd 0.0",
                "finish 0",
                "retrieve 1",
                "retrieve-fd 1.0",
                "finish 1",
            ]),
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
        calls2: vec![],
        sites: Default::default(),
    };
    w.calls = racing_calls(&w.stage1);
    w.calls2 = racing_calls2(&w.stage1, &w.stage2);
    w
}

/// Stage 2's racing calls, when its CPU-0 thread starts with `gate 4`: retrieving each
/// session it retrieves a second time, the first file it retrieves a second time,
/// finishing and closing the first session (on the handle the other thread retrieved), a
/// new session, and on that first file (the descriptor the other thread retrieved, which
/// the agent shares once its data is checked) `truncate` to half its size in `stage1`
/// and `close-fd`. At most [`MAX_CALLS2`], the first ones.
pub fn racing_calls2(stage1: &StageScript, stage2: &StageScript) -> Vec<RacingCall> {
    let starts = stage2.threads.iter().any(|t| {
        t.cpu == u16::from(ACTION_VCPU) && t.steps.first() == Some(&Step::Gate(gate(ACTION2_GATE)))
    });
    if !starts {
        return vec![];
    }
    let steps = stage_steps(stage2);
    let sessions = sessions_of(&steps, |s| match s {
        Step::Retrieve(s) => Some(*s),
        _ => None,
    });
    let call = |step| RacingCall { step, prep: vec![] };
    let mut calls: Vec<RacingCall> = sessions
        .iter()
        .take(4)
        .map(|&s| call(Step::Retrieve(s)))
        .collect();
    let retrieved = steps.iter().find_map(|s| match s {
        Step::RetrieveFd(id) => Some(*id),
        _ => None,
    });
    if let Some(id) = retrieved {
        calls.push(call(Step::RetrieveFd(id)));
    }
    if let Some(&s) = sessions.first() {
        calls.push(call(Step::Finish(s)));
        calls.push(call(Step::Close(s)));
        calls.push(call(Step::Create(
            sessions.iter().max().map_or(0, |m| m + 1),
        )));
    }
    if let Some(id) = retrieved {
        calls.extend(file_calls(stage1, id));
    }
    calls.truncate(usize::from(MAX_CALLS2));
    calls
}

/// Whether explore owns gate `g` (the action's, the race's, the selectors).
pub fn explore_owns(g: u8) -> bool {
    [ACTION_GATE, RACE_GATE, ACTION2_GATE, RACE2_GATE].contains(&g)
        || (SELECT_BASE..SELECT_BASE + MAX_CALLS).contains(&g)
        || (SELECT2_BASE..SELECT2_BASE + MAX_CALLS2).contains(&g)
}

/// The racing calls a stage-1 script offers: a new session, closing each session,
/// preserving a new memfd into the first, writing a preserved memfd, the calls that
/// belong to stage 2 made too early (finish, retrieve, retrieve-fd), and on that
/// preserved memfd `truncate` to half its size and `close-fd`. At most [`MAX_CALLS`], the
/// first ones.
pub fn racing_calls(stage1: &StageScript) -> Vec<RacingCall> {
    let steps = stage_steps(stage1);
    let sessions = sessions_of(&steps, |s| match s {
        Step::Create(s) => Some(*s),
        _ => None,
    });
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
        calls.extend(file_calls(stage1, id));
    }
    calls.truncate(usize::from(MAX_CALLS));
    calls
}

/// Why a workload cannot be explored.
pub fn check_workload(w: &Workload) -> Result<(), String> {
    let Some(main) = w.stage1.threads.iter().find(|t| t.cpu == 0) else {
        return Err(format!(
            "--workload {}: stage 1 has no thread on CPU 0 (the one that reboots)",
            w.origin
        ));
    };
    let reboot = main.steps.iter().position(|s| *s == Step::Reboot);
    let Some(reboot) = reboot else {
        return Err(format!(
            "--workload {}: stage 1 never reaches the action under test: its CPU-0 thread has no `reboot`",
            w.origin
        ));
    };
    if reboot == 0 || main.steps[reboot - 1] != Step::Gate(gate(ACTION_GATE)) {
        return Err(format!(
            "--workload {}: CPU 0's first `reboot` must come right after `gate {ACTION_GATE}` (where every trial starts)",
            w.origin
        ));
    }
    // The reboot is a kexec: without a kernel loaded it fails at once (EINVAL), and the
    // other threads wait for a handover that never comes.
    let loads = |t: &luo_protocol::script::Thread| t.steps.contains(&Step::KexecLoad);
    if !main.steps[..reboot].contains(&Step::KexecLoad)
        && !w.stage1.threads.iter().filter(|t| t.cpu != 0).any(loads)
    {
        return Err(format!(
            "--workload {}: stage 1 never loads the next kernel: add `kexec-load` to CPU 0's thread before its `reboot` (a kexec reboot without one fails with EINVAL)",
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
        .filter(|&g| g != ACTION_GATE && g != ACTION2_GATE)
        .collect();
    if let Some(g) = waits.iter().find(|&&g| explore_owns(g)) {
        return Err(format!(
            "--workload {}: uses gate {g}; explore owns gates {ACTION_GATE} to {RACE2_GATE}, {SELECT_BASE} to {} and {SELECT2_BASE} to {} (the workload waits at gate {ACTION_GATE} before its reboot, at gate {ACTION2_GATE} first in stage 2, at others of its own)",
            w.origin,
            SELECT_BASE + MAX_CALLS - 1,
            SELECT2_BASE + MAX_CALLS2 - 1
        ));
    }
    if let Some(g) = waits.iter().find(|&&g| {
        !w.gates
            .iter()
            .any(|r| r.gate.id() == g && r.open_when.is_some())
    }) {
        return Err(format!(
            "--workload {}: waits at gate {g}, which no [[gate]] with an open_when opens",
            w.origin
        ));
    }
    if w.calls.is_empty() {
        return Err(format!(
            "--workload {}: creates no session, so there is no racing call to make",
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

/// The selector gate of stage-2 racing call `k` (`k` < [`MAX_CALLS2`]).
fn selector2(k: usize) -> Gate {
    let k = u8::try_from(k)
        .ok()
        .filter(|&k| k < MAX_CALLS2)
        .expect("at most MAX_CALLS2 stage-2 racing calls");
    gate(SELECT2_BASE + k)
}

/// What differs between the stages' searches: their gates, selectors and calls.
struct Side<'a> {
    action_gate: Gate,
    race_gate: Gate,
    selector: fn(usize) -> Gate,
    calls: &'a [RacingCall],
}

fn side(w: &Workload, stage2: bool) -> Side<'_> {
    if stage2 {
        Side {
            action_gate: gate(ACTION2_GATE),
            race_gate: gate(RACE2_GATE),
            selector: selector2,
            calls: &w.calls2,
        }
    } else {
        Side {
            action_gate: gate(ACTION_GATE),
            race_gate: gate(RACE_GATE),
            selector,
            calls: &w.calls,
        }
    }
}

/// The racing thread of `side`: the calls' preparation, the race gate, every call behind
/// its selector.
fn racer(side: &Side<'_>) -> Thread {
    let mut steps = Vec::new();
    for c in side.calls {
        for p in &c.prep {
            if !steps.contains(p) {
                steps.push(*p);
            }
        }
    }
    steps.push(Step::Gate(side.race_gate));
    for (k, c) in side.calls.iter().enumerate() {
        steps.push(Step::If((side.selector)(k)));
        steps.push(c.step);
    }
    Thread {
        cpu: u16::from(RACE_VCPU),
        steps,
    }
}

/// The script every trial shares (the snapshot's): the workload plus the racing thread of
/// each stage searched.
pub fn script(w: &Workload) -> Script {
    let mut stage1 = w.stage1.clone();
    stage1.threads.push(racer(&side(w, false)));
    let mut stage2 = w.stage2.clone();
    if !w.calls2.is_empty() {
        stage2.threads.push(racer(&side(w, true)));
    }
    Script { stage1, stage2 }
}

/// One trial.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Trial {
    /// The workload alone, nothing armed: the run that boots and keeps the snapshot; every
    /// oracle must pass on it.
    Baseline,
    /// The same through the handover into stage 2, without interception: the run that
    /// keeps stage 2's snapshot (where its threads wait at their first gates).
    Baseline2,
    /// The workload alone, intercepted, through the handover to the end of stage 2, on the
    /// machine the boot trials reset to (its snapshot is stage 1's): every oracle must
    /// pass on it.
    #[serde(rename = "baseline-boot")]
    BaselineBoot,
    /// Where the workload goes: how often `function` runs (per vCPU), no race; with
    /// `with`, racing call `with` is made first, to its end, and then the reboot.
    Map {
        /// The function.
        function: String,
        /// The racing call made before the reboot (index into the workload's calls).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        with: Option<usize>,
        /// In stage 2 (from stage 2's snapshot, to the end of the workload).
        #[serde(default, skip_serializing_if = "is_false")]
        stage2: bool,
    },
    /// CPU 0 held at `point`'s first call, racing call `call` made on CPU 1, released
    /// by `release`; or, `on_racer`, the other way round: CPU 1 held at `point` inside
    /// call `call`, CPU 0's `reboot` going on meanwhile, released when the reboot settles
    /// (returned, or CPU 0 idle: blocked on what CPU 1 holds) or by time.
    Race {
        /// The hold point: a function's entry (`FUNCTION`) or a lock site in it
        /// (`FUNCTION+0xOFF`, [`point_spec`]).
        point: String,
        /// Index into the workload's calls.
        call: usize,
        /// When the hold ends.
        release: Release,
        /// In stage 2 (`call` indexes stage 2's calls).
        #[serde(default, skip_serializing_if = "is_false")]
        stage2: bool,
        /// The hold is on the racing CPU, inside its call (stage 1).
        #[serde(default, skip_serializing_if = "is_false")]
        on_racer: bool,
    },
    /// `function` returns `failure` (-EIO, `ERR_PTR(-EIO)` or `NULL`) without running on
    /// its `call`-th call; with `with`, during racing call `with`, made before the reboot
    /// (the uAPI's error paths).
    Fail {
        /// The function.
        function: String,
        /// 1-based.
        call: u32,
        /// What it returns (left out of the id: a function fails one way).
        #[serde(default, skip_serializing_if = "Failure::is_error_code")]
        failure: Failure,
        /// The racing call made before the reboot (index into the workload's calls).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        with: Option<usize>,
        /// In stage 2.
        #[serde(default, skip_serializing_if = "is_false")]
        stage2: bool,
        /// In the next kernel's boot (an `__init` function), from stage 1's snapshot
        /// through the kexec to the end of stage 2.
        #[serde(default, skip_serializing_if = "is_false")]
        boot: bool,
    },
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

/// `2` for a stage-2 trial's id kind.
fn stage_tag(stage2: bool) -> &'static str {
    if stage2 {
        "2"
    } else {
        ""
    }
}

/// ` (stage 2)` in a stage-2 trial's words.
fn stage_words(stage2: bool) -> &'static str {
    if stage2 {
        " (stage 2)"
    } else {
        ""
    }
}

/// `@LABEL` of racing call `with`, or nothing.
fn with_label(w: &Workload, with: Option<usize>) -> String {
    with.map_or(String::new(), |k| {
        format!("@{}", w.calls.get(k).map_or("?".into(), RacingCall::label))
    })
}

/// The key of [`Reach`] for `function` reached with racing call `with` made first, or in
/// stage 2 (`2:FUNCTION`).
pub fn reach_key(w: &Workload, function: &str, with: Option<usize>, stage2: bool) -> String {
    let stage = if stage2 { "2:" } else { "" };
    format!("{stage}{function}{}", with_label(w, with))
}

impl Trial {
    /// Whether it runs in stage 2 (from stage 2's snapshot).
    pub fn stage2(&self) -> bool {
        match self {
            Trial::Baseline | Trial::BaselineBoot => false,
            Trial::Baseline2 => true,
            Trial::Map { stage2, .. } | Trial::Race { stage2, .. } | Trial::Fail { stage2, .. } => {
                *stage2
            }
        }
    }
}

impl Trial {
    /// Whether it runs through the kexec into the next kernel's boot (from stage 1's
    /// snapshot, on the machine that keeps it for these).
    pub fn boot(&self) -> bool {
        matches!(self, Trial::BaselineBoot | Trial::Fail { boot: true, .. })
    }

    /// The baseline whose boot keeps the snapshot this trial starts from (itself for a
    /// baseline).
    pub fn baseline(&self) -> Trial {
        if self.boot() {
            Trial::BaselineBoot
        } else if self.stage2() {
            Trial::Baseline2
        } else {
            Trial::Baseline
        }
    }

    /// Its id, unique in an exploration: `race:luo_flb_serialize:close-session-1:settled`.
    pub fn id(&self, w: &Workload) -> String {
        match self {
            Trial::Baseline => "baseline".into(),
            Trial::Baseline2 => "baseline2".into(),
            Trial::BaselineBoot => "baseline-boot".into(),
            Trial::Map {
                function,
                with,
                stage2,
            } => format!(
                "map{}:{function}{}",
                stage_tag(*stage2),
                with_label(w, *with)
            ),
            Trial::Race {
                point,
                call,
                release,
                stage2,
                on_racer,
            } => format!(
                "race{}{}:{point}:{}:{release}",
                stage_tag(*stage2),
                if *on_racer { "-cpu1" } else { "" },
                side(w, *stage2)
                    .calls
                    .get(*call)
                    .map_or("?".into(), RacingCall::label)
            ),
            Trial::Fail {
                function,
                call,
                with,
                stage2,
                boot,
                ..
            } => format!(
                "fail{}:{function}:{call}{}",
                if *boot { "-boot" } else { stage_tag(*stage2) },
                with_label(w, *with)
            ),
        }
    }

    /// What it does, in words.
    pub fn describe(&self, w: &Workload) -> String {
        match self {
            Trial::Baseline => "the workload alone".into(),
            Trial::Baseline2 => "the workload alone, into stage 2".into(),
            Trial::BaselineBoot => {
                "the workload alone, intercepted, through the handover to the end of stage 2".into()
            }
            Trial::Map {
                function,
                with,
                stage2,
            } => match with {
                None => format!("map {function}{}", stage_words(*stage2)),
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
                on_racer: true,
                ..
            } => format!(
                "hold CPU 1 at {point}{} inside {}, CPU 0 reboots, release {release}",
                lock_words(w, point),
                w.calls
                    .get(*call)
                    .map_or("?".into(), |c| c.pattern().to_string()),
            ),
            Trial::Race {
                point,
                call,
                release,
                stage2,
                ..
            } => format!(
                "hold CPU 0 at {point}{}, {} on CPU 1, release {release}{}",
                lock_words(w, point),
                side(w, *stage2)
                    .calls
                    .get(*call)
                    .map_or("?".into(), |c| c.pattern().to_string()),
                stage_words(*stage2)
            ),
            Trial::Fail {
                function,
                call,
                failure,
                boot: true,
                ..
            } => format!(
                "{function} fails ({}) on call {call} in the next kernel's boot",
                failure.c(),
            ),
            Trial::Fail {
                function,
                call,
                failure,
                with: None,
                stage2,
                ..
            } => format!(
                "{function} fails ({}) on call {call}{}",
                failure.c(),
                stage_words(*stage2)
            ),
            Trial::Fail {
                function,
                call,
                failure,
                with: Some(k),
                ..
            } => format!(
                "{function} fails ({}) on call {call}, {} on CPU 1 before the reboot",
                failure.c(),
                w.calls
                    .get(*k)
                    .map_or("?".into(), |c| c.pattern().to_string())
            ),
        }
    }
}

/// ` (LOCK returned: lock held)` for a lock site of the workload's points, else nothing.
pub fn lock_words(w: &Workload, point: &str) -> String {
    w.sites.get(point).map_or(String::new(), |lock| {
        format!(" ({lock} returned: lock held)")
    })
}

/// Where a hold point (or a mapped function) is: `FUNCTION` is its entry,
/// `FUNCTION+0xOFF` a lock site OFF bytes into it ([`TraceSpec`]'s syntax). A name that
/// does not parse (none the explorer makes) is taken whole, at offset 0, and fails to
/// resolve when armed.
pub fn point_spec(point: &str) -> TraceSpec {
    point.parse().unwrap_or_else(|_| TraceSpec {
        symbol: point.into(),
        offset: 0,
    })
}

/// What the map trials found: per [`reach_key`] (a function, alone or with a racing call
/// made first), its calls on each vCPU (index = vCPU).
pub type Reach = std::collections::BTreeMap<String, Vec<u32>>;

/// The map trials: every point alone, in stage 1 and (when the workload searches it) in
/// stage 2; in fail mode also every fallible function with each racing call made first.
pub fn map_trials(
    w: &Workload,
    mode: Mode,
    points: &[String],
    fallible: &[Fallible],
) -> Vec<Trial> {
    let map = |function: &String, with, stage2| Trial::Map {
        function: function.clone(),
        with,
        stage2,
    };
    let mut out: Vec<Trial> = points.iter().map(|f| map(f, None, false)).collect();
    // What each call reaches on CPU 1: fail mode's functions inside a call, and race
    // mode's holds on CPU 1.
    if mode.fails() || mode.races() {
        for k in 0..w.calls.len() {
            // An `__init` function never runs after the boot: no call reaches it.
            out.extend(
                fallible
                    .iter()
                    .filter(|f| !f.init)
                    .map(|f| map(&f.name, Some(k), false)),
            );
        }
    }
    if !w.calls2.is_empty() {
        out.extend(points.iter().map(|f| map(f, None, true)));
    }
    out
}

/// The search trials, in a deterministic order: for `mode`, race trials at the points
/// reached on the action's vCPU × calls × `releases`, in each stage searched; fail trials
/// for the fallible functions reached (in the reboot, in each racing call made first, in
/// stage 2), on calls 1..=min(calls, [`MAX_FAIL_CALLS`]), and the `__init` ones once in the
/// next kernel's boot; then shuffled by `seed` (so a budget samples the whole space, and
/// the same seed gives the same list), the boot trials last.
pub fn search_trials(
    w: &Workload,
    mode: Mode,
    points: &[String],
    fallible: &[Fallible],
    reach: &Reach,
    releases: &[Release],
    seed: u64,
) -> Vec<Trial> {
    let mut out = Vec::new();
    let stages: &[bool] = if w.calls2.is_empty() {
        &[false]
    } else {
        &[false, true]
    };
    if mode.races() {
        for &stage2 in stages {
            for p in points {
                let on_action = reach
                    .get(&reach_key(w, p, None, stage2))
                    .and_then(|v| v.get(usize::from(ACTION_VCPU)))
                    .copied()
                    .unwrap_or(0);
                if on_action == 0 {
                    continue;
                }
                for call in 0..side(w, stage2).calls.len() {
                    for &release in releases {
                        out.push(Trial::Race {
                            point: p.clone(),
                            call,
                            release,
                            stage2,
                            on_racer: false,
                        });
                    }
                }
            }
        }
        // The other way round (stage 1): CPU 1 held inside each call at the functions the
        // map saw that call reach on CPU 1, while CPU 0 reboots.
        for call in 0..w.calls.len() {
            for p in points {
                let on_racer = reach
                    .get(&reach_key(w, p, Some(call), false))
                    .and_then(|v| v.get(usize::from(RACE_VCPU)))
                    .copied()
                    .unwrap_or(0);
                if on_racer == 0 {
                    continue;
                }
                for &release in releases {
                    out.push(Trial::Race {
                        point: p.clone(),
                        call,
                        release,
                        stage2: false,
                        on_racer: true,
                    });
                }
            }
        }
    }
    if mode.fails() {
        let mut settings: Vec<(Option<usize>, bool)> = vec![(None, false)];
        settings.extend((0..w.calls.len()).map(|k| (Some(k), false)));
        if stages.len() == 2 {
            settings.push((None, true));
        }
        for (with, stage2) in settings {
            for f in fallible {
                let total: u32 = reach
                    .get(&reach_key(w, &f.name, with, stage2))
                    .map_or(0, |v| v.iter().sum());
                for call in 1..=total.min(MAX_FAIL_CALLS) {
                    out.push(Trial::Fail {
                        function: f.name.clone(),
                        call,
                        failure: f.failure,
                        with,
                        stage2,
                        boot: false,
                    });
                }
            }
        }
        // The next kernel's boot: no map (each trial goes through a kexec and a boot), so
        // each `__init` function fails on its first call there.
        if stages.len() == 2 {
            out.extend(fallible.iter().filter(|f| f.init).map(|f| Trial::Fail {
                function: f.name.clone(),
                call: 1,
                failure: f.failure,
                with: None,
                stage2: false,
                boot: true,
            }));
        }
    }
    shuffle(&mut out, seed);
    // The boot trials last, together: their machine boots for them (and again when its
    // snapshot is old), not while the others run.
    out.sort_by_key(Trial::boot);
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

/// An observe hook at `point` ([`point_spec`]).
fn observe(name: &str, point: &str, vcpus: VcpuSelect, after: Option<Trigger>) -> Hook {
    Hook {
        name: name.into(),
        at: point_spec(point),
        vcpus,
        kind: HookKind::Observe,
        after,
        call: None,
    }
}

/// How a stage's action and its racing call are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// CPU 0 goes to its action at once and is held there; the hold opens the race gate
    /// (and the call's selector).
    Held,
    /// Call `k` is made first, to its end; the action follows its result.
    CallFirst(usize),
    /// Call `k` is made at once; CPU 1, held inside it, opens the action gate.
    RacerHeld(usize),
}

/// How `trial` orders its stage's action and racing call.
fn order(trial: &Trial) -> Order {
    match trial {
        Trial::Race {
            call,
            on_racer: true,
            ..
        } => Order::RacerHeld(*call),
        Trial::Race { .. } => Order::Held,
        _ => racing_call(trial).map_or(Order::Held, Order::CallFirst),
    }
}

/// The gate rules of one stage's search, by `order`: the action gate opens when the
/// racer waits (a call made first: on its result; CPU 1 held: by that hold), the race
/// gate when a hold opens it (a call made first, or CPU 1 held: at once), the selectors
/// closed (but the call's, made first or CPU 1 held: at once). `select_all`: declare
/// every selector (the shared script's trials).
fn stage_gates(side: &Side<'_>, order: Order, select_all: bool) -> Vec<GateRule> {
    let at_once = Some(Trigger::Wait(side.race_gate));
    let (action_open, race_open, with) = match order {
        Order::Held => (at_once, None, None),
        Order::CallFirst(k) => (
            Some(Trigger::Result(side.calls[k].pattern())),
            at_once,
            Some(k),
        ),
        Order::RacerHeld(k) => (None, at_once, Some(k)),
    };
    let mut gates = vec![
        GateRule {
            gate: side.action_gate,
            open_when: action_open,
        },
        GateRule {
            gate: side.race_gate,
            open_when: race_open,
        },
    ];
    if select_all {
        for k in 0..side.calls.len() {
            gates.push(GateRule {
                gate: (side.selector)(k),
                open_when: (with == Some(k)).then_some(Trigger::Wait(side.race_gate)),
            });
        }
    }
    gates
}

/// What arms a stage-2 trial's hooks: the start of stage 2's first announced step on CPU 0
/// (the same functions run in stage 1 at the same addresses; a scenario file from boot
/// must not count those calls).
fn stage2_arm(w: &Workload) -> Option<Trigger> {
    w.stage2
        .threads
        .iter()
        .find(|t| t.cpu == u16::from(ACTION_VCPU))
        .and_then(|t| t.steps.iter().find_map(|s| announced(*s)))
        .map(Trigger::Start)
}

/// When a stage-2 trial is decided: the result of the last announced step of stage 2's
/// CPU-0 thread (its racing thread may wait at its gate forever).
pub fn stage2_end(w: &Workload) -> Option<Trigger> {
    w.stage2
        .threads
        .iter()
        .find(|t| t.cpu == u16::from(ACTION_VCPU))
        .and_then(|t| t.steps.iter().rev().find_map(|s| announced(*s)))
        .map(Trigger::Result)
}

/// How long CPU 0's reboot may go on, neither returned nor idle, while CPU 1 is held: the
/// reboot waits for every CPU without sleeping (`stop_machine()` to take CPU 1 down,
/// `stop_other_cpus()`), so a hold on CPU 1 that nothing else settles ends then.
pub const REBOOT_SPIN: Duration = Duration::from_secs(3);

/// A hold of a race trial: one vCPU stopped at a point while the other makes its call.
struct Held<'a> {
    /// Where (a function's entry or a lock site).
    point: &'a str,
    /// The vCPU held (its first hit there, once `after` happened).
    vcpu: u8,
    /// Gates the hold opens (the other vCPU's call, or the action).
    open: Vec<Gate>,
    /// What arms the hold.
    after: Option<Trigger>,
    /// The other vCPU, and the call it makes while this one is held.
    other: u8,
    other_call: ActionPattern,
    /// The other call may wait for the held vCPU without sleeping (the reboot stops every
    /// CPU: `stop_machine()`, IPIs answered with interrupts on, spinning, never idle):
    /// a settled hold also ends after this long, as a release, not as undecided.
    spins: Option<Duration>,
}

impl Held<'_> {
    /// The hold's hook and, when it ends as the other call settles, the idle hook on the
    /// other vCPU that says the call blocked (armed by the call's start).
    fn hooks(self, release: Release, hold_max: Duration) -> Vec<Hook> {
        let (max, release_when, timed) = match release {
            Release::Settled => (
                self.spins.map_or(hold_max, |d| d.min(hold_max)),
                vec![
                    Trigger::Result(self.other_call),
                    Trigger::Hook("blocked".into()),
                ],
                self.spins.is_some(),
            ),
            Release::AfterMs(ms) => (Duration::from_millis(ms), vec![], true),
        };
        let mut hooks = vec![Hook {
            name: "held".into(),
            at: point_spec(self.point),
            vcpus: VcpuSelect::One(self.vcpu),
            kind: HookKind::Hold {
                max,
                open: self.open,
                release: release_when,
                timed,
            },
            after: self.after,
            call: Some(1),
        }];
        if release == Release::Settled {
            hooks.push(observe(
                "blocked",
                IDLE_SYMBOL,
                VcpuSelect::One(self.other),
                Some(Trigger::Start(self.other_call)),
            ));
        }
        hooks
    }
}

/// The hooks of `trial`. `hold_max`: the longest a settled hold waits; `select_all`: the
/// hold opens the call's selector gate (the shared script's trials).
fn hooks(w: &Workload, trial: &Trial, hold_max: Duration, select_all: bool) -> Vec<Hook> {
    let after = if trial.stage2() {
        stage2_arm(w)
    } else if trial.boot() {
        // The next kernel's boot comes after the reboot (its `__init` functions ran in
        // this kernel's boot too, before any snapshot: a scenario file from boot must not
        // count those).
        Some(Trigger::Start(ActionPattern {
            action: Action::Reboot,
            arg: None,
        }))
    } else {
        None
    };
    match trial {
        Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot => vec![],
        // With a racing call made first, only its CPU counts: what the call reaches, not
        // the reboot after it (the plain trials cover that).
        Trial::Map { function, with, .. } => {
            let vcpus = match with {
                Some(_) => VcpuSelect::One(RACE_VCPU),
                None => VcpuSelect::All,
            };
            vec![observe("reach", function, vcpus, after)]
        }
        Trial::Race {
            point,
            call,
            release,
            on_racer: true,
            ..
        } => {
            // CPU 1 held inside its call opens the action gate; the reboot settles by
            // returning (it failed) or by CPU 0 going idle (blocked on CPU 1).
            let side = side(w, false);
            let held = Held {
                point,
                vcpu: RACE_VCPU,
                open: vec![side.action_gate],
                after: Some(Trigger::Start(side.calls[*call].pattern())),
                other: ACTION_VCPU,
                other_call: ActionPattern {
                    action: Action::Reboot,
                    arg: None,
                },
                spins: Some(REBOOT_SPIN),
            };
            held.hooks(*release, hold_max)
        }
        Trial::Race {
            point,
            call,
            release,
            stage2,
            ..
        } => {
            let side = side(w, *stage2);
            let mut open = Vec::new();
            if select_all {
                open.push((side.selector)(*call));
            }
            open.push(side.race_gate);
            let held = Held {
                point,
                vcpu: ACTION_VCPU,
                open,
                after,
                other: RACE_VCPU,
                other_call: side.calls[*call].pattern(),
                spins: None,
            };
            held.hooks(*release, hold_max)
        }
        Trial::Fail {
            function,
            call,
            failure,
            with,
            ..
        } => vec![Hook {
            name: "fails".into(),
            at: TraceSpec {
                symbol: function.clone(),
                offset: 0,
            },
            vcpus: match with {
                Some(_) => VcpuSelect::One(RACE_VCPU),
                None => VcpuSelect::All,
            },
            kind: HookKind::Fail { ret: failure.ret() },
            after,
            call: Some(*call),
        }],
    }
}

/// The racing call `trial` makes in its own stage, if any.
fn racing_call(trial: &Trial) -> Option<usize> {
    match trial {
        Trial::Race { call, .. } => Some(*call),
        Trial::Fail { with, .. } | Trial::Map { with, .. } => *with,
        Trial::Baseline | Trial::Baseline2 | Trial::BaselineBoot => None,
    }
}

/// The scenario a trial runs: the shared script (every racing call of both stages behind
/// its selector gate), every gate of it declared, and the trial's hooks.
pub fn trial_scenario(w: &Workload, trial: &Trial, vcpus: u8, hold_max: Duration) -> Scenario {
    let order1 = if trial.stage2() {
        Order::Held
    } else {
        order(trial)
    };
    let mut gates = stage_gates(&side(w, false), order1, true);
    gates.extend(w.gates.iter().cloned());
    if !w.calls2.is_empty() {
        gates.extend(stage_gates(&side(w, true), Order::Held, true));
    }
    Scenario {
        name: "explore-trial".into(),
        summary: trial.describe(w),
        variant: None,
        reproduces_on_reference: false,
        vcpus,
        timeout: Duration::from_secs(1200),
        cmdline: stage_cmdline(w, trial.stage2() || trial.boot()),
        script: script(w),
        gates,
        hooks: hooks(w, trial, hold_max, true),
        verdict: default_verdict(),
        // A stage-2 trial (or one through the next kernel's boot) is decided when stage
        // 2's CPU-0 thread's last step returned (the racing thread may wait at its gate
        // forever).
        end: if trial.stage2() || trial.boot() {
            stage2_end(w).map(|when| EndRule {
                when,
                after: Duration::ZERO,
            })
        } else {
            None
        },
    }
}

/// `stage` without its `gate` step at `g` (nobody opens it in a finding's scenario).
fn without_gate(stage: &StageScript, g: Gate) -> StageScript {
    let mut stage = stage.clone();
    for t in &mut stage.threads {
        t.steps.retain(|s| *s != Step::Gate(g));
    }
    stage
}

/// The scenario file of a finding: the workload with only the trial's racing call, in its
/// stage (no selector gates), the gates that call needs, its hooks, and `verdict`.
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
    let stage2 = trial.stage2();
    let sd = side(w, stage2);
    let call = racing_call(trial);
    let mut stage1 = without_gate(&w.stage1, gate(ACTION_GATE));
    let mut stage2_script = without_gate(&w.stage2, gate(ACTION2_GATE));
    let mut gates = w.gates.clone();
    if let Some(k) = call {
        let c = &sd.calls[k];
        let mut steps = c.prep.clone();
        steps.push(Step::Gate(sd.race_gate));
        steps.push(c.step);
        let thread = Thread {
            cpu: u16::from(RACE_VCPU),
            steps,
        };
        gates.splice(0..0, stage_gates(&sd, order(trial), false));
        if stage2 {
            stage2_script = w.stage2.clone();
            stage2_script.threads.push(thread);
        } else {
            stage1 = w.stage1.clone();
            stage1.threads.push(thread);
        }
    }
    Scenario {
        name: name.into(),
        summary: summary.into(),
        variant: variant.map(str::to_owned),
        reproduces_on_reference: false,
        vcpus,
        timeout,
        cmdline: stage_cmdline(w, trial.stage2() || trial.boot()),
        script: Script {
            stage1,
            stage2: stage2_script,
        },
        gates,
        hooks: hooks(w, trial, hold_max, false),
        verdict,
        end: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::scenario::Leeway;

    /// `trial`'s finding scenario, written as a file and read back (the same scenario):
    /// what was read, and the text.
    fn written_back(
        w: &Workload,
        trial: &Trial,
        name: &str,
        variant: Option<&str>,
    ) -> (Scenario, String) {
        let f = finding_scenario(
            w,
            trial,
            name,
            "a finding",
            variant,
            2,
            Duration::from_secs(600),
            Duration::from_secs(30),
            default_verdict(),
        );
        let text = f.to_toml("found by luo-vmm explore");
        let back = Scenario::parse(&text, &format!("{name}.toml")).unwrap();
        assert_eq!(back, f, "{text}");
        (back, text)
    }

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
                "retrieve-fd-0.0",
                "truncate-0.0",
                "close-fd-0.0"
            ]
        );
        // Half of memfd 0.0's 64 KiB.
        assert_eq!(
            w.calls[8].step,
            Step::Truncate(
                FileId {
                    session: 0,
                    file: 0
                },
                32 << 10
            )
        );
        let labels2: Vec<String> = w.calls2.iter().map(RacingCall::label).collect();
        assert_eq!(
            labels2,
            [
                "retrieve-session-0",
                "retrieve-session-1",
                "retrieve-fd-0.0",
                "finish-session-0",
                "close-session-0",
                "create-session-2",
                "truncate-0.0",
                "close-fd-0.0"
            ]
        );
        assert_eq!(
            w.calls2[6].step,
            Step::Truncate(
                FileId {
                    session: 0,
                    file: 0
                },
                32 << 10
            )
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
        // No kernel loaded: the reboot would fail, and nothing after it come.
        let mut w = default_workload();
        w.stage1.threads[0].steps.retain(|s| *s != Step::KexecLoad);
        assert!(check_workload(&w)
            .unwrap_err()
            .contains("stage 1 never loads the next kernel: add `kexec-load`"));
        // Loaded by another thread: the workload's own affair.
        w.stage1.threads[1].steps.insert(0, Step::KexecLoad);
        check_workload(&w).unwrap();
    }

    #[test]
    fn trial_lists_are_deterministic_and_cover_the_reached_space() {
        let w = default_workload();
        let mut reach = Reach::new();
        reach.insert("a".into(), vec![1, 0]);
        reach.insert("b".into(), vec![0, 3]);
        reach.insert("c".into(), vec![0, 0]);
        reach.insert(reach_key(&w, "c", Some(3), false), vec![0, 2]);
        let points: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        // c fails with NULL (a pointer function), the others with -EIO.
        let fallible: Vec<Fallible> = points
            .iter()
            .map(|p| Fallible {
                name: p.clone(),
                failure: if p == "c" {
                    Failure::Null
                } else {
                    Failure::ErrorCode
                },
                // b runs in a boot: one trial through the kexec.
                init: p == "b",
            })
            .collect();
        let rel = [Release::Settled, Release::AfterMs(500)];
        let one = search_trials(&w, Mode::Both, &points, &fallible, &reach, &rel, 7);
        let two = search_trials(&w, Mode::Both, &points, &fallible, &reach, &rel, 7);
        assert_eq!(one, two);
        // Race: only a is reached on vCPU 0: 10 calls × 2 releases. Fail: a once, b 3
        // times, c twice with call 3 (preserve-fd 0.1) made first.
        // And b, an `__init` function, fails once in the next kernel's boot; and CPU 1 is
        // held at c inside call 3 (where the map saw it there) × 2 releases.
        assert_eq!(one.len(), 20 + 1 + 3 + 2 + 1 + 2);
        let racer = Trial::Race {
            point: "c".into(),
            call: 3,
            release: Release::Settled,
            stage2: false,
            on_racer: true,
        };
        assert!(one.contains(&racer));
        assert_eq!(racer.id(&w), "race-cpu1:c:preserve-fd-0.1:settled");
        // Its call starts at once; CPU 1, held inside it, opens gate 1 (the reboot), and
        // is released when the reboot returns or CPU 0 goes idle.
        let sc = trial_scenario(&w, &racer, 2, Duration::from_secs(30));
        let rule = |g: u8| sc.gates.iter().find(|r| r.gate.id() == g).unwrap();
        assert_eq!(rule(ACTION_GATE).open_when, None);
        assert_eq!(
            rule(RACE_GATE).open_when,
            Some(Trigger::Wait(gate(RACE_GATE)))
        );
        assert_eq!(
            rule(selector(3).id()).open_when,
            Some(Trigger::Wait(gate(RACE_GATE)))
        );
        assert_eq!(rule(selector(2).id()).open_when, None);
        let held = &sc.hooks[0];
        assert_eq!(held.vcpus, VcpuSelect::One(RACE_VCPU));
        assert_eq!(
            held.after,
            Some(Trigger::Start(w.calls[3].pattern())),
            "armed by its call: not at the call's preparation"
        );
        // The reboot waits for CPU 1 spinning (stop_machine), never idle: a settled hold
        // there also ends after REBOOT_SPIN, as a release.
        assert!(
            matches!(&held.kind, HookKind::Hold { open, max, timed: true, .. }
            if open == &[gate(ACTION_GATE)] && *max == REBOOT_SPIN)
        );
        assert_eq!(sc.hooks[1].vcpus, VcpuSelect::One(ACTION_VCPU));
        // Its finding's file has the same order: the call at once, the reboot by the hold.
        let (f, _) = written_back(&w, &racer, "racer", None);
        let frule = |g: u8| f.gates.iter().find(|r| r.gate.id() == g).unwrap();
        assert_eq!(frule(ACTION_GATE).open_when, None);
        let boot = Trial::Fail {
            function: "b".into(),
            call: 1,
            failure: Failure::ErrorCode,
            with: None,
            stage2: false,
            boot: true,
        };
        assert!(one.contains(&boot));
        assert_eq!(one.last(), Some(&boot), "the boot trials come last");
        assert_eq!(boot.id(&w), "fail-boot:b:1");
        assert!(boot.boot() && !boot.stage2());
        // It runs through the kexec to the end of stage 2, `init_on_free=1` like stage 2,
        // its hook armed by the reboot (the same function ran in this kernel's boot).
        let sc = trial_scenario(&w, &boot, 2, Duration::from_secs(30));
        assert!(sc.cmdline.contains(STAGE2_PARAMS));
        assert_eq!(sc.end.as_ref().map(|e| &e.when), stage2_end(&w).as_ref());
        assert_eq!(
            sc.hooks[0].after,
            Some(Trigger::Start(ActionPattern {
                action: Action::Reboot,
                arg: None
            }))
        );
        assert_eq!(sc.hooks[0].vcpus, VcpuSelect::All);
        // Its record reads back the same.
        let json = serde_json::to_string(&boot).unwrap();
        assert_eq!(serde_json::from_str::<Trial>(&json).unwrap(), boot);
        let old: Trial =
            serde_json::from_str(r#"{"kind":"fail","function":"b","call":1}"#).unwrap();
        assert!(
            !old.boot(),
            "records written before boot trials read as they were"
        );
        let c = Trial::Fail {
            function: "c".into(),
            call: 2,
            failure: Failure::Null,
            with: Some(3),
            stage2: false,
            boot: false,
        };
        assert!(one.contains(&c));
        assert_eq!(c.id(&w), "fail:c:2@preserve-fd-0.1");
        assert!(c.describe(&w).starts_with("c fails (NULL) on call 2"));
        let hooks = trial_scenario(&w, &c, 2, Duration::from_secs(30)).hooks;
        assert_eq!(hooks[0].kind, HookKind::Fail { ret: 0 });
        let other = search_trials(&w, Mode::Both, &points, &fallible, &reach, &rel, 8);
        assert_ne!(one, other, "another seed, another order");
        let mut sorted = one.clone();
        sorted.sort();
        let mut sorted_other = other;
        sorted_other.sort();
        assert_eq!(sorted, sorted_other, "the same trials");
        assert!(
            search_trials(&w, Mode::Race, &points, &fallible, &reach, &rel, 7)
                .iter()
                .all(|t| matches!(t, Trial::Race { point, on_racer, .. }
                    if (point == "a" && !on_racer) || (point == "c" && *on_racer)))
        );
        // The map: every point alone; in fail mode every fallible one after each call.
        // (and every point in stage 2: the default workload searches it)
        assert_eq!(
            map_trials(&w, Mode::Race, &points, &fallible[..1]).len(),
            // and what each call reaches on CPU 1, for the holds there
            3 + 10 + 3
        );
        assert_eq!(
            map_trials(&w, Mode::Fail, &points, &fallible[..1]).len(),
            3 + 10 + 3
        );
        let with = Trial::Fail {
            function: "memfd_luo_preserve".into(),
            call: 1,
            failure: Failure::ErrorCode,
            with: Some(3),
            stage2: false,
            boot: false,
        };
        assert_eq!(with.id(&w), "fail:memfd_luo_preserve:1@preserve-fd-0.1");
    }

    #[test]
    fn lock_sites_are_points_at_an_offset_and_say_which_lock() {
        let mut w = default_workload();
        let site = "luo_session_serialize+0x2d";
        let t = Trial::Race {
            point: site.into(),
            call: 2,
            release: Release::Settled,
            stage2: false,
            on_racer: false,
        };
        assert_eq!(
            t.id(&w),
            "race:luo_session_serialize+0x2d:close-session-1:settled"
        );
        let at = |t: &Trial, hook: &str| {
            trial_scenario(&w, t, 2, Duration::from_secs(30))
                .hooks
                .into_iter()
                .find(|h| h.name == hook)
                .unwrap()
                .at
        };
        let want = TraceSpec {
            symbol: "luo_session_serialize".into(),
            offset: 0x2d,
        };
        assert_eq!(at(&t, "held"), want);
        let map = Trial::Map {
            function: site.into(),
            with: None,
            stage2: false,
        };
        assert_eq!(map.id(&w), "map:luo_session_serialize+0x2d");
        assert_eq!(at(&map, "reach"), want);
        // A function's entry is offset 0 of its own name, as before.
        let entry = Trial::Race {
            point: "luo_flb_serialize".into(),
            call: 2,
            release: Release::Settled,
            stage2: false,
            on_racer: false,
        };
        assert_eq!(
            at(&entry, "held"),
            TraceSpec {
                symbol: "luo_flb_serialize".into(),
                offset: 0
            }
        );
        // The words name the lock when the workload knows the site; the id never does.
        assert!(!t.describe(&w).contains("returned"));
        w.sites.insert(site.into(), "down_write".into());
        assert_eq!(
            t.describe(&w),
            "hold CPU 0 at luo_session_serialize+0x2d (down_write returned: lock held), close-session 1 on CPU 1, release settled"
        );
        assert_eq!(
            t.id(&w),
            "race:luo_session_serialize+0x2d:close-session-1:settled"
        );
        // The finding's scenario file holds at the site, and reads back.
        let (back, text) = written_back(&w, &t, "site-race", None);
        assert!(text.contains("luo_session_serialize+0x2d"), "{text}");
        assert_eq!(back.hooks[0].at, want);
    }

    #[test]
    fn a_trial_scenario_checks_and_its_finding_scenario_round_trips() {
        let w = default_workload();
        let t = Trial::Race {
            point: "luo_flb_serialize".into(),
            call: 2,
            release: Release::Settled,
            stage2: false,
            on_racer: false,
        };
        assert_eq!(t.id(&w), "race:luo_flb_serialize:close-session-1:settled");
        // A trial's scenario declares every gate of the shared script (the other stage's
        // race gate is never opened: no file is written from it).
        let sc = trial_scenario(&w, &t, 2, Duration::from_secs(30));
        sc.script.stage1.validate().unwrap();
        sc.script.stage2.validate().unwrap();
        let declared = |g: u8| sc.gates.iter().any(|r| r.gate.id() == g);
        assert!([1, 2, 3, 4, 5, 10, 17, 42, 47].into_iter().all(declared));
        assert_eq!(
            sc.script.stage2.threads[1].steps[0],
            Step::Gate(gate(RACE2_GATE))
        );
        // A stage-2 race: its file holds the stage-2 racer and arms its hooks in stage 2.
        let t2 = Trial::Race {
            point: "luo_session_retrieve".into(),
            call: 0,
            release: Release::Settled,
            stage2: true,
            on_racer: false,
        };
        assert_eq!(
            t2.id(&w),
            "race2:luo_session_retrieve:retrieve-session-0:settled"
        );
        let (_, text) = written_back(&w, &t2, "double-retrieve", None);
        assert!(
            text.contains("after = \"start retrieve-session 0\""),
            "{text}"
        );
        assert!(!text.contains("\"gate 1\""), "{text}");
        let (_, text) = written_back(&w, &t, "close-race", Some("luo-reboot-unlocked"));
        assert!(text.contains("steps = [\"gate 2\", \"close 1\"]"), "{text}");
        let fail = Trial::Fail {
            failure: Failure::ErrorCode,
            boot: false,
            function: "luo_file_freeze".into(),
            call: 2,
            with: None,
            stage2: false,
        };
        let (back, _) = written_back(&w, &fail, "unwind", None);
        assert_eq!(back.gates.len(), 1, "the workload's own gate only");
        // A failure inside a racing call made before the reboot.
        let during = Trial::Fail {
            failure: Failure::ErrorCode,
            boot: false,
            function: "memfd_luo_preserve".into(),
            call: 1,
            with: Some(3),
            stage2: false,
        };
        let (_, text) = written_back(&w, &during, "preserve-fails", None);
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
    fn every_trial_scenario_names_only_what_its_script_makes() {
        // The scenario checks a file gets (hooks, actions and arguments, waited gates)
        // hold for what explore builds itself, and for its finding files read back.
        let w = default_workload();
        let mut trials = vec![Trial::Baseline, Trial::Baseline2];
        for stage2 in [false, true] {
            let calls = if stage2 { &w.calls2 } else { &w.calls };
            trials.push(Trial::Map {
                function: "luo_session_serialize".into(),
                with: None,
                stage2,
            });
            for call in 0..calls.len() {
                for release in [Release::Settled, Release::AfterMs(20)] {
                    for on_racer in [false, !stage2] {
                        trials.push(Trial::Race {
                            point: "luo_flb_serialize".into(),
                            call,
                            release,
                            stage2,
                            on_racer,
                        });
                    }
                }
                let with = (!stage2).then_some(call);
                trials.push(Trial::Map {
                    function: "luo_session_serialize".into(),
                    with,
                    stage2,
                });
                trials.push(Trial::Fail {
                    function: "luo_file_freeze".into(),
                    call: 1,
                    failure: Failure::ErrorCode,
                    with,
                    stage2,
                    boot: false,
                });
            }
        }
        trials.push(Trial::Fail {
            function: "luo_session_setup_incoming".into(),
            call: 1,
            failure: Failure::ErrorCode,
            with: None,
            stage2: false,
            boot: true,
        });
        for t in &trials {
            let sc = trial_scenario(&w, t, 2, Duration::from_secs(30));
            let id = t.id(&w);
            sc.check_named(&Leeway::default())
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            written_back(&w, t, "finding", None);
        }
        assert!(trials.len() > 40, "{}", trials.len());
    }

    #[test]
    fn file_operations_race_on_the_first_preserved_and_the_first_retrieved_memfd() {
        let steps =
            |list: &[&str]| -> Vec<Step> { list.iter().map(|s| Step::parse(s).unwrap()).collect() };
        let f = |session, file| FileId { session, file };
        // Stage 1: the first preserved memfd (1.0), halved; a 1-byte memfd stays 1 byte.
        let stage1 = StageScript {
            threads: vec![Thread {
                cpu: 0,
                steps: steps(&[
                    "create 1",
                    "memfd 1.0 1",
                    "memfd 1.1 1M",
                    "preserve 1.0",
                    "preserve 1.1",
                    "kexec-load",
                    "gate 1",
                    "reboot",
                ]),
            }],
        };
        let calls = racing_calls(&stage1);
        let tail: Vec<Step> = calls[calls.len() - 2..].iter().map(|c| c.step).collect();
        assert_eq!(tail, [Step::Truncate(f(1, 0), 1), Step::CloseFd(f(1, 0))]);
        assert!(calls.len() <= usize::from(MAX_CALLS));
        // Stage 2: the first file retrieved; stage 1 does not make 3.0: half of 64 KiB.
        let stage2 = StageScript {
            threads: vec![Thread {
                cpu: 0,
                steps: steps(&["gate 4", "retrieve 3", "retrieve-fd 3.0", "retrieve-fd 1.1"]),
            }],
        };
        let calls2 = racing_calls2(&stage1, &stage2);
        let tail: Vec<Step> = calls2[calls2.len() - 2..].iter().map(|c| c.step).collect();
        assert_eq!(
            tail,
            [Step::Truncate(f(3, 0), 32 << 10), Step::CloseFd(f(3, 0))]
        );
        assert!(calls2.len() <= usize::from(MAX_CALLS2));
        // Nothing retrieved: no file calls in stage 2.
        let none = StageScript {
            threads: vec![Thread {
                cpu: 0,
                steps: steps(&["gate 4", "retrieve 3"]),
            }],
        };
        assert!(racing_calls2(&stage1, &none)
            .iter()
            .all(|c| !matches!(c.step, Step::Truncate(..) | Step::CloseFd(_))));
    }

    #[test]
    fn file_operation_findings_round_trip() {
        let w = default_workload();
        let truncate = Trial::Race {
            point: "luo_flb_serialize".into(),
            call: 8,
            release: Release::Settled,
            stage2: false,
            on_racer: false,
        };
        assert_eq!(
            truncate.id(&w),
            "race:luo_flb_serialize:truncate-0.0:settled"
        );
        let (_, text) = written_back(&w, &truncate, "truncate-race", None);
        assert!(
            text.contains("steps = [\"gate 2\", \"truncate 0.0 32768\"]"),
            "{text}"
        );
        assert!(text.contains("\"result truncate 0.0\""), "{text}");
        let close = Trial::Race {
            point: "memfd_luo_finish".into(),
            call: 7,
            release: Release::AfterMs(2000),
            stage2: true,
            on_racer: false,
        };
        assert_eq!(
            close.id(&w),
            "race2:memfd_luo_finish:close-fd-0.0:after-2000ms"
        );
        let (_, text) = written_back(&w, &close, "close-fd-race", None);
        assert!(text.contains("\"gate 5\", \"close-fd 0.0\""), "{text}");
        assert!(
            text.contains("after = \"start retrieve-session 0\""),
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
