//! The scenario file (TOML): parsed once, checked whole, before any guest boots. The
//! format is documented in docs/scenarios.md; `scenarios/*.toml` are the built-in ones.

use std::time::Duration;

use luo_protocol::message::Action;
use luo_protocol::probe::Gate;
use luo_protocol::script::{FileId, Script, StageScript, Step, Thread};
use luo_protocol::session::{parse_size, MAX_SESSIONS};
use serde::Deserialize;
use thiserror::Error;

use crate::config::trace::TraceSpec;

/// Errors of reading a scenario file.
#[derive(Debug, Error)]
pub enum ScenarioFileError {
    /// Not TOML, or a field of the wrong type, or an unknown field.
    #[error("{origin}: {error}")]
    Toml {
        /// Where it came from.
        origin: String,
        /// The TOML error (with line and column).
        error: String,
    },
    /// A value that does not make sense.
    #[error("{origin}: {what}")]
    Invalid {
        /// Where it came from.
        origin: String,
        /// What is wrong.
        what: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    summary: String,
    variant: Option<String>,
    #[serde(default)]
    reproduces_on_reference: bool,
    vcpus: Option<u8>,
    timeout: Option<String>,
    cmdline: Option<String>,
    stage1: RawStage,
    stage2: Option<RawStage>,
    #[serde(default)]
    gate: Vec<RawGate>,
    #[serde(default)]
    hook: Vec<RawHook>,
    verdict: RawVerdict,
    end: Option<RawEnd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnd {
    when: String,
    after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    threads: Vec<RawThread>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThread {
    cpu: u16,
    steps: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    id: u8,
    open_when: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawVcpus {
    One(u8),
    All(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    name: String,
    at: String,
    vcpu: RawVcpus,
    action: String,
    after: Option<String>,
    call: Option<u32>,
    max: Option<String>,
    #[serde(default)]
    open: Vec<u8>,
    #[serde(default)]
    release_when: Vec<String>,
    release_after: Option<String>,
    #[serde(rename = "return")]
    ret: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerdict {
    correct: Vec<String>,
    bug: Vec<String>,
}

/// An agent action with, optionally, its argument (session index, or token of `S.F`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionPattern {
    /// The action.
    pub action: Action,
    /// Its argument; any when `None`.
    pub arg: Option<u64>,
}

impl ActionPattern {
    /// Whether `(action, arg)` matches.
    pub fn matches(&self, action: Action, arg: u64) -> bool {
        self.action == action && self.arg.is_none_or(|a| a == arg)
    }
}

impl std::fmt::Display for ActionPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.action.name())?;
        match self.arg {
            Some(a) if self.action.arg_is_token() => match FileId::from_token(a) {
                Some(id) => write!(f, " {id}"),
                None => write!(f, " {a}"),
            },
            Some(a) => write!(f, " {a}"),
            None => Ok(()),
        }
    }
}

/// The actions `step` announces, each with its argument: one for most steps, two for
/// `retrieve-fd` (the retrieval, then the check of its data, docs/scenarios.md), none for
/// `gate` and `if`.
pub(crate) fn step_announces(step: Step) -> Vec<ActionPattern> {
    let one = |action: Action, arg: u64| {
        vec![ActionPattern {
            action,
            arg: Some(arg),
        }]
    };
    match step {
        Step::Create(s) => one(Action::CreateSession, u64::from(s)),
        Step::Close(s) => one(Action::CloseSession, u64::from(s)),
        Step::Finish(s) => one(Action::FinishSession, u64::from(s)),
        Step::Retrieve(s) => one(Action::RetrieveSession, u64::from(s)),
        Step::Preserve(id) => one(Action::PreserveFd, id.token()),
        Step::RetrieveFd(id) => {
            let mut both = one(Action::RetrieveFd, id.token());
            both.extend(one(Action::CheckData, id.token()));
            both
        }
        Step::Fill(id, _) => one(Action::Fill, id.token()),
        Step::Memfd(id, _) => one(Action::Memfd, id.token()),
        Step::Truncate(id, _) => one(Action::Truncate, id.token()),
        Step::CloseFd(id) => one(Action::CloseFd, id.token()),
        Step::KexecLoad => one(Action::KexecLoad, 0),
        Step::Reboot => one(Action::Reboot, 0),
        Step::Pressure(n) => one(Action::Pressure, n),
        Step::Gate(_) | Step::If(_) => vec![],
    }
}

/// What a caller that completes a scenario itself lets it leave open (`explore
/// --workload`: explore replaces the rules of its action gates and adds the racing
/// thread). A scenario file run as it is gets none ([`Leeway::default`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Leeway {
    /// Gates whose `open_when` the caller replaces: not checked against the script.
    pub(crate) replaced_rules: Vec<Gate>,
    /// Gates a thread the caller adds waits at (what `wait N` may name besides the
    /// script's own `gate N` steps).
    pub(crate) waited_outside: Vec<Gate>,
}

/// Something that happens during a run, which opens gates, releases holds, arms hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `hook NAME`: an armed hook was reached.
    Hook(String),
    /// `start ACTION [ARG]`: the agent announced an action.
    Start(ActionPattern),
    /// `result ACTION [ARG]`: an action's result arrived.
    Result(ActionPattern),
    /// `wait N`: the agent waits at gate N.
    Wait(Gate),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Hook(n) => write!(f, "hook {n}"),
            Trigger::Start(a) => write!(f, "start {a}"),
            Trigger::Result(a) => write!(f, "result {a}"),
            Trigger::Wait(g) => write!(f, "wait {}", g.id()),
        }
    }
}

/// A condition of the verdict, evaluated on what a run saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `blocked ACTION [ARG]`: announced, and no result in the same boot.
    Blocked(ActionPattern),
    /// `returned ACTION [ARG]`: returned success.
    Returned(ActionPattern),
    /// `returned twice ACTION [ARG]`: returned success twice in one boot (a session or
    /// file retrieved twice).
    ReturnedTwice(ActionPattern),
    /// `failed ACTION [ARG]`: returned an error.
    Failed(ActionPattern),
    /// `records match`: the LUO records the next kernel got are what user space believed
    /// it preserved.
    RecordsMatch,
    /// `records differ`: they are not (or could not be read).
    RecordsDiffer,
    /// `handover verified`: a handover whose preserved memory was not written, and every
    /// stage-2 step succeeded.
    HandoverVerified,
    /// `no handover`: the next kernel never started.
    NoHandover,
    /// `kernel oops`: an oops, BUG, WARNING, panic or triple fault.
    KernelOops,
    /// `preserved data written`: in stage 2, a page of a preserved memfd's contents was
    /// written while no retrieval or finish accounted for it (judge::scenario,
    /// `unaccounted_data_writes`): "leak, never reuse" broken.
    PreservedDataWritten,
    /// `hook NAME`: the hook was reached (armed).
    Hook(String),
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::Blocked(a) => write!(f, "blocked {a}"),
            Condition::Returned(a) => write!(f, "returned {a}"),
            Condition::ReturnedTwice(a) => write!(f, "returned twice {a}"),
            Condition::Failed(a) => write!(f, "failed {a}"),
            Condition::RecordsMatch => f.write_str("records match"),
            Condition::RecordsDiffer => f.write_str("records differ"),
            Condition::HandoverVerified => f.write_str("handover verified"),
            Condition::NoHandover => f.write_str("no handover"),
            Condition::KernelOops => f.write_str("kernel oops"),
            Condition::PreservedDataWritten => f.write_str("preserved data written"),
            Condition::Hook(n) => write!(f, "hook {n}"),
        }
    }
}

/// Which vCPUs a hook is armed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuSelect {
    /// One vCPU.
    One(u8),
    /// Every vCPU.
    All,
}

impl VcpuSelect {
    /// Whether `vcpu` is selected.
    pub fn has(self, vcpu: u8) -> bool {
        match self {
            VcpuSelect::One(v) => v == vcpu,
            VcpuSelect::All => true,
        }
    }
}

/// What a hook does when reached (and armed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookKind {
    /// Records the hit.
    Observe,
    /// Keeps the vCPU stopped until one of `release` happens, at most `max`; opens `open`
    /// when it starts.
    Hold {
        /// Longest hold (then the run is inconclusive).
        max: Duration,
        /// Gates opened when the hold starts.
        open: Vec<Gate>,
        /// Any of these releases it.
        release: Vec<Trigger>,
        /// `max` is a release policy (`release_after`), not a failure: the hold ends after
        /// `max` without making the run inconclusive.
        timed: bool,
    },
    /// Returns `ret` from the function at whose entry the hook is, without running it.
    Fail {
        /// The return value (`rax`), e.g. -5 for -EIO.
        ret: i64,
    },
    /// Ends the run (the scenario has seen what it waited for).
    Stop,
}

/// A hook of the VMM schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Its name (for triggers and the timeline).
    pub name: String,
    /// Where: a kernel symbol and offset.
    pub at: TraceSpec,
    /// On which vCPUs.
    pub vcpus: VcpuSelect,
    /// What it does.
    pub kind: HookKind,
    /// Armed only once this happened (always armed without it).
    pub after: Option<Trigger>,
    /// Acts only on the N-th armed hit (every hit without it).
    pub call: Option<u32>,
}

/// A gate the scenario closes at start, and what opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRule {
    /// The gate.
    pub gate: Gate,
    /// Opened when this happens (or by a hook's `open`).
    pub open_when: Option<Trigger>,
}

/// `[end]`: the run ends `after` this long once `when` happened (a hang's scenario: a call
/// that has not returned that long after it started is blocked; a trial decided when its
/// workload's last step returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndRule {
    /// What starts the countdown.
    pub when: Trigger,
    /// How long after it the run ends (zero: at once).
    pub after: Duration,
}

/// The verdict's rules: any `bug` condition means reproduced; all `correct` conditions
/// mean not reproduced; else inconclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictRules {
    /// All must hold for "not reproduced".
    pub correct: Vec<Condition>,
    /// Any one means "reproduced".
    pub bug: Vec<Condition>,
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// One line: what it tests.
    pub summary: String,
    /// The kernel variant that reproduces it (none: no variant does yet).
    pub variant: Option<String>,
    /// The reference kernel reproduces it too (a behaviour upstream has, not one a variant
    /// brings back): `scenario run` on the reference expects `reproduced`.
    pub reproduces_on_reference: bool,
    /// vCPUs (default 2).
    pub vcpus: u8,
    /// Bound of one run (default 1200 s).
    pub timeout: Duration,
    /// Extra kernel parameters.
    pub cmdline: String,
    /// The agent's steps.
    pub script: Script,
    /// Gates closed at start.
    pub gates: Vec<GateRule>,
    /// The VMM's hooks.
    pub hooks: Vec<Hook>,
    /// The verdict.
    pub verdict: VerdictRules,
    /// When the run ends before the guest does, if ever.
    pub end: Option<EndRule>,
}

/// A duration as a scenario file writes it (`ms` when not whole seconds).
fn duration_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A TOML string literal (basic string: quotes and backslashes escaped).
fn quoted(text: &str) -> String {
    let mut out = String::from('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quoted_list<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| quoted(&i.to_string())).collect();
    format!("[{}]", items.join(", "))
}

impl Scenario {
    /// The scenario as a scenario file (docs/scenarios.md) that [`Scenario::parse`] reads
    /// back to the same scenario; `comment` (lines) goes first, as `#` lines.
    pub fn to_toml(&self, comment: &str) -> String {
        let mut out = String::new();
        for line in comment.lines() {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        out.push_str(&format!("name = {}\n", quoted(&self.name)));
        out.push_str(&format!("summary = {}\n", quoted(&self.summary)));
        if self.reproduces_on_reference {
            out.push_str("reproduces_on_reference = true\n");
        }
        if let Some(v) = &self.variant {
            out.push_str(&format!("variant = {}\n", quoted(v)));
        }
        out.push_str(&format!("vcpus = {}\n", self.vcpus));
        out.push_str(&format!(
            "timeout = {}\n",
            quoted(&duration_text(self.timeout))
        ));
        if !self.cmdline.is_empty() {
            out.push_str(&format!("cmdline = {}\n", quoted(&self.cmdline)));
        }
        for (title, stage) in [
            ("stage1", &self.script.stage1),
            ("stage2", &self.script.stage2),
        ] {
            if stage.threads.is_empty() {
                continue;
            }
            out.push_str(&format!("\n[{title}]\nthreads = [\n"));
            for t in &stage.threads {
                // Steps as a person writes them: words separated by spaces.
                let steps: Vec<String> = t
                    .steps
                    .iter()
                    .map(|s| quoted(&s.to_string().replace(':', " ")))
                    .collect();
                out.push_str(&format!(
                    "  {{ cpu = {}, steps = [{}] }},\n",
                    t.cpu,
                    steps.join(", ")
                ));
            }
            out.push_str("]\n");
        }
        for g in &self.gates {
            out.push_str(&format!("\n[[gate]]\nid = {}\n", g.gate.id()));
            if let Some(t) = &g.open_when {
                out.push_str(&format!("open_when = {}\n", quoted(&t.to_string())));
            }
        }
        for h in &self.hooks {
            out.push_str(&format!("\n[[hook]]\nname = {}\n", quoted(&h.name)));
            let at = if h.at.offset == 0 {
                h.at.symbol.clone()
            } else {
                format!("{}+{:#x}", h.at.symbol, h.at.offset)
            };
            out.push_str(&format!("at = {}\n", quoted(&at)));
            match h.vcpus {
                VcpuSelect::One(v) => out.push_str(&format!("vcpu = {v}\n")),
                VcpuSelect::All => out.push_str("vcpu = \"all\"\n"),
            }
            if let Some(n) = h.call {
                out.push_str(&format!("call = {n}\n"));
            }
            match &h.kind {
                HookKind::Observe => out.push_str("action = \"observe\"\n"),
                HookKind::Stop => out.push_str("action = \"stop\"\n"),
                HookKind::Fail { ret } => {
                    out.push_str(&format!("action = \"fail\"\nreturn = {ret}\n"));
                }
                HookKind::Hold {
                    max,
                    open,
                    release,
                    timed,
                } => {
                    out.push_str("action = \"hold\"\n");
                    if !open.is_empty() {
                        let ids: Vec<String> = open.iter().map(|g| g.id().to_string()).collect();
                        out.push_str(&format!("open = [{}]\n", ids.join(", ")));
                    }
                    if !release.is_empty() {
                        out.push_str(&format!("release_when = {}\n", quoted_list(release)));
                    }
                    let key = if *timed { "release_after" } else { "max" };
                    out.push_str(&format!("{key} = {}\n", quoted(&duration_text(*max))));
                }
            }
            if let Some(t) = &h.after {
                out.push_str(&format!("after = {}\n", quoted(&t.to_string())));
            }
        }
        out.push_str(&format!(
            "\n[verdict]\ncorrect = {}\nbug = {}\n",
            quoted_list(&self.verdict.correct),
            quoted_list(&self.verdict.bug)
        ));
        if let Some(e) = &self.end {
            out.push_str(&format!(
                "\n[end]\nwhen = {}\nafter = {}\n",
                quoted(&e.when.to_string()),
                quoted(&duration_text(e.after))
            ));
        }
        out
    }
}

/// Parses `1200s`, `20m`, `500ms`, `2h`.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// What an action's argument is, as its announcement carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArgKind {
    /// A session index (`close-session 1`).
    Session,
    /// A memfd, `S.F` (its token on the wire).
    File,
    /// A number of bytes (`pressure 4096`, or `4K`).
    Bytes,
    /// Nothing (`kexec-load`, `reboot`; announced with 0).
    Nothing,
}

fn arg_kind(action: Action) -> ArgKind {
    // The protocol says which actions name a memfd ([`Action::arg_is_token`]).
    if action.arg_is_token() {
        return ArgKind::File;
    }
    match action {
        Action::KexecLoad | Action::Reboot => ArgKind::Nothing,
        Action::Pressure => ArgKind::Bytes,
        _ => ArgKind::Session,
    }
}

/// Parses `arg`, the argument of `action` in a trigger or condition, as that action
/// announces it: a session index, a memfd `S.F` (its token), bytes, or nothing (0).
fn action_arg(action: Action, arg: &str) -> Result<u64, String> {
    let name = action.name();
    let is_file = arg.contains('.');
    match arg_kind(action) {
        ArgKind::Session if is_file => Err(format!(
            "{name} takes a session index (0 to {}), not a file",
            MAX_SESSIONS - 1
        )),
        ArgKind::Session => arg
            .parse::<u32>()
            .ok()
            .filter(|s| *s < MAX_SESSIONS)
            .map(u64::from)
            .ok_or_else(|| {
                format!(
                    "{name} takes a session index (0 to {}), not {arg:?}",
                    MAX_SESSIONS - 1
                )
            }),
        ArgKind::File if !is_file => Err(format!(
            "{name} takes a file (SESSION.FILE, e.g. 0.1), not {arg:?}"
        )),
        ArgKind::File => match Step::parse(&format!("preserve {arg}")) {
            Ok(Step::Preserve(id)) => Ok(id.token()),
            Ok(_) => Err(format!("{arg:?}: not a file (SESSION.FILE, e.g. 0.1)")),
            Err(e) => Err(e.to_string()),
        },
        ArgKind::Bytes if is_file => Err(format!("{name} takes a size in bytes, not a file")),
        ArgKind::Bytes => parse_size(arg)
            .ok_or_else(|| format!("{name} takes a size in bytes (e.g. 4096 or 4K), not {arg:?}")),
        ArgKind::Nothing if arg == "0" => Ok(0),
        ArgKind::Nothing => Err(format!("{name} takes no argument, not {arg:?}")),
    }
}

fn action_pattern(w: &[&str]) -> Result<ActionPattern, String> {
    let (name, arg) = match w {
        [name] => (name, None),
        [name, arg] => (name, Some(*arg)),
        _ => return Err("ACTION [ARG] expected".into()),
    };
    let action = Action::from_name(name)
        .ok_or_else(|| format!("{name:?}: not an action ({})", Action::names()))?;
    let arg = arg.map(|a| action_arg(action, a)).transpose()?;
    Ok(ActionPattern { action, arg })
}

fn gate(text: &str) -> Result<Gate, String> {
    text.parse::<u8>()
        .ok()
        .and_then(Gate::new)
        .ok_or_else(|| format!("{text:?}: not a gate (0 to 63)"))
}

/// Parses a trigger: `hook NAME`, `start ACTION [ARG]`, `result ACTION [ARG]`, `wait N`.
pub(crate) fn parse_trigger(text: &str) -> Result<Trigger, String> {
    let w = words(text);
    let bad =
        || format!("{text:?}: hook NAME, start ACTION [ARG], result ACTION [ARG] or wait GATE");
    match w.as_slice() {
        ["hook", name] => Ok(Trigger::Hook((*name).to_owned())),
        ["start", rest @ ..] => action_pattern(rest)
            .map(Trigger::Start)
            .map_err(|e| format!("{text:?}: {e}")),
        ["result", rest @ ..] => action_pattern(rest)
            .map(Trigger::Result)
            .map_err(|e| format!("{text:?}: {e}")),
        ["wait", g] => gate(g)
            .map(Trigger::Wait)
            .map_err(|e| format!("{text:?}: {e}")),
        _ => Err(bad()),
    }
}

/// Parses a verdict condition (see [`Condition`]).
pub(crate) fn parse_condition(text: &str) -> Result<Condition, String> {
    let w = words(text);
    let pattern = |rest: &[&str]| action_pattern(rest).map_err(|e| format!("{text:?}: {e}"));
    match w.as_slice() {
        ["blocked", rest @ ..] => pattern(rest).map(Condition::Blocked),
        ["returned", "twice", rest @ ..] => pattern(rest).map(Condition::ReturnedTwice),
        ["returned", rest @ ..] => pattern(rest).map(Condition::Returned),
        ["failed", rest @ ..] => pattern(rest).map(Condition::Failed),
        ["records", "match"] => Ok(Condition::RecordsMatch),
        ["records", "differ"] => Ok(Condition::RecordsDiffer),
        ["handover", "verified"] => Ok(Condition::HandoverVerified),
        ["no", "handover"] => Ok(Condition::NoHandover),
        ["kernel", "oops"] => Ok(Condition::KernelOops),
        ["preserved", "data", "written"] => Ok(Condition::PreservedDataWritten),
        ["hook", name] => Ok(Condition::Hook((*name).to_owned())),
        _ => Err(format!(
            "{text:?}: not a condition (blocked|returned|failed ACTION [ARG], returned twice \
             ACTION [ARG], records match, records differ, handover verified, no handover, \
             kernel oops, preserved data written, hook NAME)"
        )),
    }
}

fn stage(raw: Option<RawStage>) -> Result<StageScript, String> {
    let Some(raw) = raw else {
        return Ok(StageScript::default());
    };
    let threads = raw
        .threads
        .into_iter()
        .map(|t| {
            let steps = t
                .steps
                .iter()
                .map(|s| Step::parse(s).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Thread { cpu: t.cpu, steps })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let script = StageScript { threads };
    script.validate().map_err(|e| e.to_string())?;
    Ok(script)
}

impl Scenario {
    /// Parses and checks the scenario in `text`; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Scenario, ScenarioFileError> {
        Scenario::parse_with(text, source, &Leeway::default())
    }

    /// [`Scenario::parse`] for a caller that completes the scenario itself: `leeway` says
    /// what it may leave to that caller.
    pub(crate) fn parse_with(
        text: &str,
        source: &str,
        leeway: &Leeway,
    ) -> Result<Scenario, ScenarioFileError> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| ScenarioFileError::Toml {
            origin: source.to_owned(),
            error: e.to_string(),
        })?;
        Scenario::from_raw(raw, leeway).map_err(|what| ScenarioFileError::Invalid {
            origin: source.to_owned(),
            what,
        })
    }

    fn from_raw(raw: RawScenario, leeway: &Leeway) -> Result<Scenario, String> {
        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= 64
            && !raw.name.starts_with('.')
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(format!(
                "name = {:?}: 1 to 64 of A-Z a-z 0-9 - _ . (it names the run's log files)",
                raw.name
            ));
        }
        let vcpus = raw.vcpus.unwrap_or(2);
        if !(1..=crate::machine::arch::mptable::MAX_VCPUS).contains(&vcpus) {
            return Err(format!(
                "vcpus = {vcpus}: 1 to {}",
                crate::machine::arch::mptable::MAX_VCPUS
            ));
        }
        let timeout = match &raw.timeout {
            Some(t) => parse_duration(t)
                .filter(|d| d.as_secs() >= 1)
                .ok_or_else(|| format!("timeout = {t:?}: at least 1s, e.g. 1200s or 20m"))?,
            None => Duration::from_secs(1200),
        };
        let script = Script {
            stage1: stage(Some(raw.stage1)).map_err(|e| format!("stage1: {e}"))?,
            stage2: stage(raw.stage2).map_err(|e| format!("stage2: {e}"))?,
        };
        for t in script.stage1.threads.iter().chain(&script.stage2.threads) {
            if t.cpu >= u16::from(vcpus) {
                return Err(format!("a thread on CPU {} of a {vcpus}-vCPU guest", t.cpu));
            }
        }
        let gates = raw
            .gate
            .iter()
            .map(|g| {
                Ok(GateRule {
                    gate: Gate::new(g.id).ok_or_else(|| format!("gate {}: 0 to 63", g.id))?,
                    open_when: g
                        .open_when
                        .as_deref()
                        .map(parse_trigger)
                        .transpose()
                        .map_err(|e| format!("gate {}: open_when {e}", g.id))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let declared = |g: Gate| gates.iter().any(|r| r.gate == g);
        for (i, r) in gates.iter().enumerate() {
            if gates[..i].iter().any(|o| o.gate == r.gate) {
                return Err(format!("gate {} is declared twice", r.gate.id()));
            }
        }
        if gates.iter().any(|r| r.gate == Gate::BEFORE_REBOOT) {
            return Err("gate 0 is the handover workload's; scenarios use gates 1 to 63".into());
        }
        let mut hooks = Vec::new();
        for h in raw.hook {
            let at: TraceSpec =
                h.at.parse()
                    .map_err(|_| format!("hook {}: at = {:?}: SYMBOL[+OFFSET]", h.name, h.at))?;
            let vcpus_sel = match h.vcpu {
                RawVcpus::One(v) if v < vcpus => VcpuSelect::One(v),
                RawVcpus::One(v) => return Err(format!("hook {}: vcpu {v} of {vcpus}", h.name)),
                RawVcpus::All(s) if s == "all" => VcpuSelect::All,
                RawVcpus::All(s) => {
                    return Err(format!(
                        "hook {}: vcpu = {s:?}: a number or \"all\"",
                        h.name
                    ))
                }
            };
            let only = |what: &str, set: bool| {
                if set {
                    Err(format!(
                        "hook {}: {what} only goes with action = \"hold\"",
                        h.name
                    ))
                } else {
                    Ok(())
                }
            };
            let kind = match h.action.as_str() {
                "hold" => {
                    if h.max.is_some() && h.release_after.is_some() {
                        return Err(format!(
                            "hook {}: max or release_after, not both (release_after is a max that releases the hold as expected)",
                            h.name
                        ));
                    }
                    let timed = h.release_after.is_some();
                    let max = h
                        .max
                        .as_deref()
                        .or(h.release_after.as_deref())
                        .map_or(Some(Duration::from_secs(120)), parse_duration)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            format!(
                                "hook {}: {}: more than 0, e.g. 120s, 2m, 500ms",
                                h.name,
                                if timed { "release_after" } else { "max" }
                            )
                        })?;
                    let open = h
                        .open
                        .iter()
                        .map(|&g| {
                            let g = Gate::new(g).filter(|&g| declared(g)).ok_or_else(|| {
                                format!(
                                    "hook {}: opens gate {g}, which no [[gate]] declares",
                                    h.name
                                )
                            })?;
                            Ok(g)
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    if h.release_when.is_empty() && !timed {
                        return Err(format!(
                            "hook {}: a hold needs release_when or release_after",
                            h.name
                        ));
                    }
                    let release = h
                        .release_when
                        .iter()
                        .map(|t| parse_trigger(t))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("hook {}: release_when {e}", h.name))?;
                    HookKind::Hold {
                        max,
                        open,
                        release,
                        timed,
                    }
                }
                other => {
                    only("max", h.max.is_some())?;
                    only("release_after", h.release_after.is_some())?;
                    only("open", !h.open.is_empty())?;
                    only("release_when", !h.release_when.is_empty())?;
                    match other {
                        "observe" => HookKind::Observe,
                        "stop" => HookKind::Stop,
                        "fail" => HookKind::Fail {
                            ret: h.ret.ok_or_else(|| {
                                format!("hook {}: fail needs return = N (e.g. -5 for -EIO)", h.name)
                            })?,
                        },
                        _ => {
                            return Err(format!(
                                "hook {}: action = {other:?}: observe, hold, fail or stop",
                                h.name
                            ))
                        }
                    }
                }
            };
            if h.ret.is_some() && !matches!(kind, HookKind::Fail { .. }) {
                return Err(format!(
                    "hook {}: return only goes with action = \"fail\"",
                    h.name
                ));
            }
            if h.call == Some(0) {
                return Err(format!("hook {}: call counts from 1", h.name));
            }
            if hooks.iter().any(|o: &Hook| o.name == h.name) {
                return Err(format!("two hooks named {}", h.name));
            }
            let after = h
                .after
                .as_deref()
                .map(parse_trigger)
                .transpose()
                .map_err(|e| format!("hook {}: after {e}", h.name))?;
            hooks.push(Hook {
                name: h.name,
                at,
                vcpus: vcpus_sel,
                kind,
                after,
                call: h.call,
            });
        }
        let verdict = VerdictRules {
            correct: raw
                .verdict
                .correct
                .iter()
                .map(|c| parse_condition(c))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("verdict correct {e}"))?,
            bug: raw
                .verdict
                .bug
                .iter()
                .map(|c| parse_condition(c))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("verdict bug {e}"))?,
        };
        if verdict.correct.is_empty() || verdict.bug.is_empty() {
            return Err("verdict: both correct and bug need at least one condition".into());
        }
        let end = raw
            .end
            .map(|e| {
                Ok::<_, String>(EndRule {
                    when: parse_trigger(&e.when).map_err(|x| format!("[end] when {x}"))?,
                    after: e
                        .after
                        .as_deref()
                        .map_or(Some(Duration::ZERO), parse_duration)
                        .ok_or_else(|| "[end] after: a duration, e.g. 30s".to_owned())?,
                })
            })
            .transpose()?;
        let scenario = Scenario {
            name: raw.name,
            summary: raw.summary,
            variant: raw.variant,
            reproduces_on_reference: raw.reproduces_on_reference,
            vcpus,
            timeout,
            cmdline: raw.cmdline.unwrap_or_default(),
            script,
            gates,
            hooks,
            verdict,
            end,
        };
        scenario.check_references(leeway)?;
        Ok(scenario)
    }

    /// [`Scenario::check_named`], and every gate a step waits at is declared (else it
    /// would be open and the step would not wait) and something opens it. `leeway`: what
    /// the caller completes itself.
    fn check_references(&self, leeway: &Leeway) -> Result<(), String> {
        self.check_named(leeway)?;
        let stages = self
            .script
            .stage1
            .threads
            .iter()
            .chain(&self.script.stage2.threads);
        let opened_by_hook = |g: Gate| {
            self.hooks
                .iter()
                .any(|h| matches!(&h.kind, HookKind::Hold { open, .. } if open.contains(&g)))
        };
        for step in stages.flat_map(|t| &t.steps) {
            if let Step::Gate(g) = step {
                if *g == Gate::BEFORE_REBOOT {
                    return Err(
                        "step gate 0: gate 0 is the handover workload's; use 1 to 63".into(),
                    );
                }
                let Some(rule) = self.gates.iter().find(|r| r.gate == *g) else {
                    return Err(format!(
                        "step gate {}: declare it with [[gate]] id = {}",
                        g.id(),
                        g.id()
                    ));
                };
                if rule.open_when.is_none() && !opened_by_hook(*g) {
                    return Err(format!(
                        "gate {}: a step waits there, but neither its open_when nor a hold's open opens it",
                        g.id()
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the triggers and conditions name exists: every hook (`hook NAME`); every
    /// action and argument, made by a step of the script (either stage; without an
    /// argument, the action by any step); every gate a `wait N` names, waited at by a
    /// step. The first that does not is named, with what the script does make.
    pub(crate) fn check_named(&self, leeway: &Leeway) -> Result<(), String> {
        // What names each trigger, as its error message starts.
        let mut triggers: Vec<(String, &Trigger)> = Vec::new();
        for g in &self.gates {
            if let Some(t) = &g.open_when {
                if !leeway.replaced_rules.contains(&g.gate) {
                    triggers.push((format!("gate {}: open_when", g.gate.id()), t));
                }
            }
        }
        for h in &self.hooks {
            if let HookKind::Hold { release, .. } = &h.kind {
                for t in release {
                    triggers.push((format!("hook {}: release_when", h.name), t));
                }
            }
            if let Some(t) = &h.after {
                triggers.push((format!("hook {}: after", h.name), t));
            }
        }
        if let Some(e) = &self.end {
            triggers.push(("[end] when".to_owned(), &e.when));
        }
        let made = ScriptMakes::of(&self.script, &leeway.waited_outside);
        let known = |n: &str| {
            if self.hooks.iter().any(|h| h.name == n) {
                Ok(())
            } else {
                Err(format!("no hook is named {n}"))
            }
        };
        for (whose, t) in triggers {
            match t {
                Trigger::Hook(n) => known(n),
                Trigger::Start(p) | Trigger::Result(p) => made.check(p),
                Trigger::Wait(g) => made.check_wait(*g),
            }
            .map_err(|e| format!("{whose} \"{t}\": {e}"))?;
        }
        for (list, conditions) in [
            ("correct", &self.verdict.correct),
            ("bug", &self.verdict.bug),
        ] {
            for c in conditions {
                match c {
                    Condition::Hook(n) => known(n),
                    Condition::Blocked(p)
                    | Condition::Returned(p)
                    | Condition::ReturnedTwice(p)
                    | Condition::Failed(p) => made.check(p),
                    _ => Ok(()),
                }
                .map_err(|e| format!("verdict {list} \"{c}\": {e}"))?;
            }
        }
        Ok(())
    }
}

/// What a script's steps make (both stages): the actions they announce with their
/// arguments, in order of first appearance, and the gates they wait at.
struct ScriptMakes {
    /// Every announced action and argument, once each.
    calls: Vec<(Action, u64)>,
    /// Every gate a step waits at (and those waited at outside the script), once each.
    waits: Vec<Gate>,
}

impl ScriptMakes {
    fn of(script: &Script, waited_outside: &[Gate]) -> ScriptMakes {
        let mut calls = Vec::new();
        let mut waits = waited_outside.to_vec();
        let steps = script
            .stage1
            .threads
            .iter()
            .chain(&script.stage2.threads)
            .flat_map(|t| &t.steps);
        for step in steps {
            if let Step::Gate(g) = step {
                if !waits.contains(g) {
                    waits.push(*g);
                }
            }
            for p in step_announces(*step) {
                let call = (p.action, p.arg.unwrap_or(0));
                if !calls.contains(&call) {
                    calls.push(call);
                }
            }
        }
        ScriptMakes { calls, waits }
    }

    /// `action arg` as a scenario file writes it.
    fn name(action: Action, arg: u64) -> String {
        ActionPattern {
            action,
            arg: (arg_kind(action) != ArgKind::Nothing).then_some(arg),
        }
        .to_string()
    }

    /// Whether a step makes what `p` matches; else what the script does make.
    fn check(&self, p: &ActionPattern) -> Result<(), String> {
        if self.calls.iter().any(|&(a, arg)| p.matches(a, arg)) {
            return Ok(());
        }
        let same: Vec<String> = self
            .calls
            .iter()
            .filter(|(a, _)| *a == p.action)
            .map(|&(a, arg)| ScriptMakes::name(a, arg))
            .collect();
        if !same.is_empty() {
            return Err(format!(
                "no step of the script makes {p}; it makes {}",
                same.join(", ")
            ));
        }
        let mut actions: Vec<&str> = Vec::new();
        for (a, _) in &self.calls {
            if !actions.contains(&a.name()) {
                actions.push(a.name());
            }
        }
        if actions.is_empty() {
            return Err(format!(
                "no step of the script makes {p}; its steps announce nothing"
            ));
        }
        Err(format!(
            "no step of the script makes {}; its steps announce {}",
            p.action.name(),
            actions.join(", ")
        ))
    }

    /// Whether a step waits at gate `g`; else at which gates steps wait.
    fn check_wait(&self, g: Gate) -> Result<(), String> {
        if self.waits.contains(&g) {
            return Ok(());
        }
        let mut ids: Vec<u8> = self.waits.iter().map(|g| g.id()).collect();
        ids.sort_unstable();
        if ids.is_empty() {
            return Err(format!(
                "no step of the script waits at gate {}; none waits at any gate",
                g.id()
            ));
        }
        let plural = if ids.len() == 1 { "" } else { "s" };
        let ids: Vec<String> = ids.iter().map(u8::to_string).collect();
        Err(format!(
            "no step of the script waits at gate {}; steps wait at gate{plural} {}",
            g.id(),
            ids.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name = "example"
summary = "a session closed while reboot() is held after serialization"
variant = "luo-reboot-unlocked"
timeout = "20m"
[stage1]
threads = [
  { cpu = 0, steps = ["create 0", "memfd 0.0 64K", "fill 0.0 write", "preserve 0.0", "kexec-load", "gate 1", "reboot"] },
  { cpu = 1, steps = ["gate 2", "close 0"] },
]
[stage2]
threads = [{ cpu = 0, steps = ["retrieve 0", "retrieve-fd 0.0", "finish 0"] }]
[[gate]]
id = 1
open_when = "wait 2"
[[gate]]
id = 2
[[hook]]
name = "serialized"
at = "luo_flb_serialize"
vcpu = 0
action = "hold"
open = [2]
release_when = ["hook blocked", "result close-session 0"]
max = "90s"
[[hook]]
name = "blocked"
at = "rwsem_down_read_slowpath+0x4"
vcpu = 1
action = "observe"
after = "start close-session 0"
[verdict]
correct = ["blocked close-session 0", "records match", "handover verified"]
bug = ["returned close-session 0", "records differ", "kernel oops"]
"#;

    #[test]
    fn a_scenario_file_parses_whole() {
        let s = Scenario::parse(EXAMPLE, "example.toml").unwrap();
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.timeout, Duration::from_secs(1200));
        assert_eq!(s.script.stage1.threads.len(), 2);
        assert_eq!(
            s.hooks[1].at,
            TraceSpec {
                symbol: "rwsem_down_read_slowpath".into(),
                offset: 4
            }
        );
        let close = ActionPattern {
            action: Action::CloseSession,
            arg: Some(0),
        };
        assert_eq!(s.hooks[1].after, Some(Trigger::Start(close)));
        match &s.hooks[0].kind {
            HookKind::Hold {
                max, open, release, ..
            } => {
                assert_eq!(*max, Duration::from_secs(90));
                assert_eq!(open, &[Gate::new(2).unwrap()]);
                assert_eq!(release[1], Trigger::Result(close));
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(s.verdict.bug[0], Condition::Returned(close));
        assert_eq!(
            s.gates[0].open_when,
            Some(Trigger::Wait(Gate::new(2).unwrap()))
        );
    }

    #[test]
    fn an_end_rule_parses_and_is_written_back() {
        let text = format!("{EXAMPLE}\n[end]\nwhen = \"start close-session 0\"\nafter = \"30s\"\n");
        let s = Scenario::parse(&text, "x.toml").unwrap();
        let end = s.end.clone().unwrap();
        assert_eq!(end.after, Duration::from_secs(30));
        assert_eq!(end.when.to_string(), "start close-session 0");
        assert_eq!(Scenario::parse(&s.to_toml(""), "x.toml").unwrap(), s);
        let bad = format!("{EXAMPLE}\n[end]\nwhen = \"hook nobody\"\n");
        let e = Scenario::parse(&bad, "x.toml").unwrap_err().to_string();
        assert!(e.contains("no hook is named nobody"), "{e}");
    }

    #[test]
    fn file_operations_name_their_memfd_in_steps_triggers_and_conditions() {
        let text = EXAMPLE
            .replace(
                "steps = [\"gate 2\", \"close 0\"]",
                "steps = [\"gate 2\", \"truncate 0.0 32K\", \"close-fd 0.0\"]",
            )
            .replace("result close-session 0", "result close-fd 0.0")
            .replace("start close-session 0", "start truncate 0.0")
            .replace("blocked close-session 0", "failed truncate 0.0")
            .replace("returned close-session 0", "returned truncate 0.0");
        let s = Scenario::parse(&text, "fileops.toml").unwrap();
        let racer = &s.script.stage1.threads[1].steps;
        let f = FileId {
            session: 0,
            file: 0,
        };
        assert_eq!(racer[1..], [Step::Truncate(f, 32 << 10), Step::CloseFd(f)]);
        let truncate = ActionPattern {
            action: Action::Truncate,
            arg: Some(f.token()),
        };
        let close_fd = ActionPattern {
            action: Action::CloseFd,
            arg: Some(f.token()),
        };
        assert_eq!(s.hooks[1].after, Some(Trigger::Start(truncate)));
        assert!(matches!(
            &s.hooks[0].kind,
            HookKind::Hold { release, .. } if release[1] == Trigger::Result(close_fd)
        ));
        assert_eq!(s.verdict.correct[0], Condition::Failed(truncate));
        assert_eq!(s.verdict.bug[0], Condition::Returned(truncate));
        // Written back: the memfd as S.F, the steps with spaces, the same scenario.
        let back = s.to_toml("");
        for want in [
            "\"truncate 0.0 32768\", \"close-fd 0.0\"",
            "\"result close-fd 0.0\"",
            "after = \"start truncate 0.0\"",
            "\"failed truncate 0.0\"",
            "\"returned truncate 0.0\"",
        ] {
            assert!(back.contains(want), "{want}: {back}");
        }
        assert_eq!(Scenario::parse(&back, "fileops.toml").unwrap(), s);
        assert_eq!(
            parse_condition("returned close-fd 2.3"),
            Ok(Condition::Returned(ActionPattern {
                action: Action::CloseFd,
                arg: Some(2003),
            }))
        );
        assert!(parse_trigger("start truncate 0.x").is_err());
    }

    #[test]
    fn a_timed_hold_releases_after_its_time() {
        let text = EXAMPLE.replace("max = \"90s\"", "release_after = \"2s\"");
        let s = Scenario::parse(&text, "x.toml").unwrap();
        assert!(matches!(
            &s.hooks[0].kind,
            HookKind::Hold { max, timed: true, .. } if *max == Duration::from_secs(2)
        ));
        assert_eq!(Scenario::parse(&s.to_toml(""), "x.toml").unwrap(), s);
        let both = EXAMPLE.replace("max = \"90s\"", "max = \"90s\"\nrelease_after = \"2s\"");
        let e = Scenario::parse(&both, "x.toml").unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn mistakes_are_named_before_anything_runs() {
        let bad = |from: &str, to: &str| {
            let text = EXAMPLE.replace(from, to);
            assert_ne!(text, EXAMPLE, "{from}");
            Scenario::parse(&text, "x.toml").unwrap_err().to_string()
        };
        assert!(bad("\"hook blocked\"", "\"hook nobody\"").contains("no hook is named nobody"));
        assert!(bad("\"close 0\"", "\"close\"").contains("takes 1 argument"));
        assert!(bad("cpu = 1", "cpu = 2").contains("CPU 2 of a 2-vCPU guest"));
        assert!(bad("[[gate]]\nid = 2\n", "").contains("gate 2"));
        assert!(bad("action = \"observe\"", "action = \"dance\"")
            .contains("observe, hold, fail or stop"));
        assert!(bad("\"kernel oops\"", "\"kernel happy\"").contains("not a condition"));
        assert!(bad("result close-session 0", "result close-door 0").contains("not an action"));
        assert!(bad("timeout = \"20m\"", "timeout = \"soon\"").contains("timeout"));
        assert!(bad("vcpu = 1", "vcpu = 7").contains("vcpu 7 of 2"));
        assert!(bad("summary", "summery").contains("unknown field"));
        assert!(bad("name = \"example\"", "name = \"/tmp/x\"").contains("name ="));
        assert!(bad("open = [2]\n", "").contains("neither its open_when nor a hold's open"));
        assert!(bad("timeout = \"20m\"", "timeout = \"500ms\"").contains("at least 1s"));
        assert!(bad("max = \"90s\"", "max = \"0s\"").contains("more than 0"));
        assert!(
            bad("[[gate]]\nid = 2\n", "[[gate]]\nid = 2\n[[gate]]\nid = 2\n")
                .contains("declared twice")
        );
    }

    /// The error `EXAMPLE` with `from` replaced by `to` gives.
    fn refused(from: &str, to: &str) -> String {
        let text = EXAMPLE.replacen(from, to, 1);
        assert_ne!(text, EXAMPLE, "{from}");
        Scenario::parse(&text, "x.toml").unwrap_err().to_string()
    }

    #[test]
    fn an_argument_of_the_wrong_kind_is_refused_where_it_is_named() {
        let gate = "[[gate]]\nid = 2\n";
        let e = refused(
            gate,
            "[[gate]]\nid = 2\nopen_when = \"result close-session 0.0\"\n",
        );
        assert_eq!(
            e,
            "x.toml: gate 2: open_when \"result close-session 0.0\": close-session takes a \
             session index (0 to 999), not a file"
        );
        let e = refused("\"returned close-session 0\"", "\"returned retrieve-fd 3\"");
        assert!(
            e.ends_with(
                "verdict bug \"returned retrieve-fd 3\": retrieve-fd takes a file \
                 (SESSION.FILE, e.g. 0.1), not \"3\""
            ),
            "{e}"
        );
        let e = refused(
            "after = \"start close-session 0\"",
            "after = \"start reboot 1\"",
        );
        assert!(
            e.contains("hook blocked: after \"start reboot 1\": reboot takes no argument"),
            "{e}"
        );
        let e = refused("\"hook blocked\", ", "\"result pressure 0.1\", ");
        assert!(
            e.contains(
                "hook serialized: release_when \"result pressure 0.1\": pressure takes a size"
            ),
            "{e}"
        );
        // What the agent announces is accepted: `reboot` with 0, pressure as a size.
        assert_eq!(
            parse_trigger("result pressure 4K"),
            Ok(Trigger::Result(ActionPattern {
                action: Action::Pressure,
                arg: Some(4096),
            }))
        );
        assert!(parse_trigger("result reboot 0").is_ok());
        assert!(parse_condition("failed close-session 1000").is_err());
    }

    #[test]
    fn events_and_conditions_name_what_the_script_makes() {
        // A gate that waits on a call no step makes: named, with what the script makes.
        let e = refused(
            "[[gate]]\nid = 2\n",
            "[[gate]]\nid = 2\nopen_when = \"result create-session 7\"\n",
        );
        assert_eq!(
            e,
            "x.toml: gate 2: open_when \"result create-session 7\": no step of the script \
             makes create-session 7; it makes create-session 0"
        );
        // Either stage's steps count: stage 2 retrieves 0.0 (and checks its data).
        let e = refused(
            "\"returned close-session 0\"",
            "\"returned retrieve-fd 3.0\"",
        );
        assert!(
            e.ends_with(
                "verdict bug \"returned retrieve-fd 3.0\": no step of the script \
                 makes retrieve-fd 3.0; it makes retrieve-fd 0.0"
            ),
            "{e}"
        );
        // An action no step makes: the actions the steps announce are listed.
        let e = refused("\"blocked close-session 0\"", "\"blocked truncate\"");
        assert!(
            e.ends_with(
                "verdict correct \"blocked truncate\": no step of the script makes truncate; \
                 its steps announce create-session, memfd, fill, preserve-fd, kexec-load, \
                 reboot, close-session, retrieve-session, retrieve-fd, check-data, \
                 finish-session"
            ),
            "{e}"
        );
        let e = refused("\"start close-session 0\"", "\"start finish-session 1\"");
        assert!(
            e.contains("hook blocked: after \"start finish-session 1\": no step of the script makes finish-session 1; it makes finish-session 0"),
            "{e}"
        );
        let e = refused("\"result close-session 0\"", "\"result close-session 2\"");
        assert!(
            e.contains("hook serialized: release_when \"result close-session 2\""),
            "{e}"
        );
        // `wait N` names a gate some step waits at.
        let e = refused("open_when = \"wait 2\"", "open_when = \"wait 9\"");
        assert_eq!(
            e,
            "x.toml: gate 1: open_when \"wait 9\": no step of the script waits at gate 9; \
             steps wait at gates 1, 2"
        );
        let end = format!("{EXAMPLE}\n[end]\nwhen = \"result memfd 0.1\"\n");
        let e = Scenario::parse(&end, "x.toml").unwrap_err().to_string();
        assert!(
            e.contains("[end] when \"result memfd 0.1\": no step of the script makes memfd 0.1; it makes memfd 0.0"),
            "{e}"
        );
        // Without an argument, any step of the action will do; check-data comes with
        // retrieve-fd, kexec-load and reboot without one.
        for ok in [
            ("\"returned close-session 0\"", "\"returned close-session\""),
            ("\"returned close-session 0\"", "\"failed check-data 0.0\""),
            ("\"returned close-session 0\"", "\"blocked reboot\""),
            ("\"returned close-session 0\"", "\"returned kexec-load 0\""),
        ] {
            let text = EXAMPLE.replacen(ok.0, ok.1, 1);
            assert_ne!(text, EXAMPLE);
            Scenario::parse(&text, "x.toml").unwrap();
        }
    }

    #[test]
    fn a_caller_that_completes_the_scenario_may_leave_its_gates_open() {
        // A workload (explore --workload) declares gate 1 with a rule explore replaces, and
        // explore's racing thread waits at gate 5.
        let text = EXAMPLE
            .replace(
                "open_when = \"wait 2\"",
                "open_when = \"result close-session 9\"",
            )
            .replace(
                "[[gate]]\nid = 2\n",
                "[[gate]]\nid = 2\nopen_when = \"wait 5\"\n",
            );
        let e = Scenario::parse(&text, "w.toml").unwrap_err().to_string();
        assert!(e.contains("gate 1: open_when"), "{e}");
        let gate = |id| Gate::new(id).unwrap();
        let leeway = Leeway {
            replaced_rules: vec![gate(1)],
            waited_outside: vec![],
        };
        let e = Scenario::parse_with(&text, "w.toml", &leeway)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gate 2: open_when \"wait 5\": no step of the script waits at gate 5"),
            "{e}"
        );
        let leeway = Leeway {
            waited_outside: vec![gate(5)],
            ..leeway
        };
        let s = Scenario::parse_with(&text, "w.toml", &leeway).unwrap();
        assert_eq!(s.gates[1].open_when, Some(Trigger::Wait(gate(5))));
    }

    #[test]
    fn a_step_announces_its_action_and_argument() {
        let f = FileId {
            session: 1,
            file: 2,
        };
        let names = |step: &str| -> Vec<String> {
            step_announces(Step::parse(step).unwrap())
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            names("retrieve-fd 1.2"),
            ["retrieve-fd 1.2", "check-data 1.2"]
        );
        assert_eq!(names("close 3"), ["close-session 3"]);
        assert_eq!(names("pressure 4K"), ["pressure 4096"]);
        assert_eq!(names("reboot"), ["reboot 0"]);
        assert!(names("gate 3").is_empty() && names("if 3").is_empty());
        // What a step announces parses back to itself, as a trigger would name it.
        for step in [
            "create 2",
            "truncate 1.2 4K",
            "close-fd 1.2",
            "fill 1.2 mmap",
        ] {
            for p in step_announces(Step::parse(step).unwrap()) {
                assert_eq!(
                    parse_trigger(&format!("start {p}")),
                    Ok(Trigger::Start(p)),
                    "{step}"
                );
            }
        }
        assert_eq!(step_announces(Step::Preserve(f))[0].arg, Some(f.token()));
    }

    #[test]
    fn triggers_conditions_and_durations() {
        assert_eq!(
            parse_trigger("wait 3"),
            Ok(Trigger::Wait(Gate::new(3).unwrap()))
        );
        let p = ActionPattern {
            action: Action::PreserveFd,
            arg: Some(1002),
        };
        assert_eq!(
            parse_trigger("result preserve-fd 1.2"),
            Ok(Trigger::Result(p))
        );
        assert_eq!(p.to_string(), "preserve-fd 1.2");
        assert!(p.matches(Action::PreserveFd, 1002) && !p.matches(Action::PreserveFd, 1));
        let any = ActionPattern {
            action: Action::Reboot,
            arg: None,
        };
        assert!(any.matches(Action::Reboot, 7));
        assert_eq!(parse_condition("failed reboot"), Ok(Condition::Failed(any)));
        for word_condition in [
            Condition::PreservedDataWritten,
            Condition::KernelOops,
            Condition::RecordsDiffer,
        ] {
            assert_eq!(
                parse_condition(&word_condition.to_string()),
                Ok(word_condition)
            );
        }
        assert!(parse_trigger("wait 64").is_err());
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("2d"), None);
    }
}
