//! Running a guest from a command's point of view: the reference image resolved once,
//! the kernel command line composed, what the agent said over the probe, whether the
//! kernel panicked, and the run's exit status.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luo_devices::console::LineObserver;
use luo_devices::{ConsoleOutput, Gates, ProbeEvent};
use luo_protocol::message::Message;
use luo_protocol::probe::Gate;
use luo_protocol::workload::{timeout_scale_param, EMULATED_TIMEOUT_SCALE};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::options::{GuestOptions, Profile};
use crate::machine::dirty::DirtyLog;
use crate::machine::host::{self, KvmBackend};
use crate::machine::memory::ram_slots;
use crate::machine::snapshot::{file, MachineSnapshot, RestoreStats};
use crate::machine::vcpu::control::VcpuControl;
use crate::machine::vcpu::run::{FatalExit, HookAction, VcpuNotice};
use crate::machine::vm::{
    cpuid_digest, MachineSpec, RunObserver, RunSpec, StoppedVcpu, Vm, VmError, VmExit,
};
use crate::run::agent::{AgentBoot, AgentLog};
use crate::run::cmdline;
use crate::run::image::{ensure_image, GuestImage, ImageError};
use crate::run::kernel::{cpu_limit, CpuLimit};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The reference image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A snapshot file.
    #[error(transparent)]
    SnapshotFile(#[from] file::FileError),
    /// A snapshot that cannot be used.
    #[error("{0}")]
    Snapshot(String),
    /// More vCPUs than the kernel can bring up.
    #[error("--vcpus {vcpus}: this kernel brings up at most {} CPUs ({}); use --vcpus {} or fewer, or a kernel built with a larger CONFIG_NR_CPUS", limit.cpus, limit.from, limit.cpus)]
    TooManyVcpus {
        /// `--vcpus`.
        vcpus: u8,
        /// The kernel's limit.
        limit: CpuLimit,
    },
}

/// The kernel and initramfs a command runs: the user's, or the reference guest's.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedGuest {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// The reference image, when it is used.
    pub image: Option<GuestImage>,
}

impl ResolvedGuest {
    /// The user's kernel; or, when none is named, the reference guest (a variant of it,
    /// or the kernel of `--source DIR`; built if the cache lacks it) with its initramfs
    /// unless one is named. Call once per command. Refuses `--vcpus` above the kernel's
    /// own CPU limit ([`cpu_limit`]), before anything boots.
    pub fn resolve(opts: &GuestOptions) -> Result<Self, GuestError> {
        let guest = Self::find(opts)?;
        if let Some(limit) = cpu_limit(&guest.kernel) {
            if u32::from(opts.vcpus) > limit.cpus {
                return Err(GuestError::TooManyVcpus {
                    vcpus: opts.vcpus,
                    limit,
                });
            }
        }
        Ok(guest)
    }

    fn find(opts: &GuestOptions) -> Result<Self, ImageError> {
        if let Some(kernel) = &opts.kernel {
            return Ok(ResolvedGuest {
                kernel: kernel.clone(),
                initrd: opts.initrd.clone(),
                image: None,
            });
        }
        let spec = opts.image_spec();
        let image = ensure_image(&spec)?;
        eprintln!(
            "luo-vmm: {}: Linux {} ({})",
            spec.describe(),
            image.kernel_version,
            image.dir.display()
        );
        Ok(ResolvedGuest {
            kernel: image.vmlinux.clone(),
            initrd: Some(
                opts.initrd
                    .clone()
                    .unwrap_or_else(|| image.initramfs.clone()),
            ),
            image: Some(image),
        })
    }
}

/// The result of a run.
#[derive(Debug)]
pub(crate) struct GuestOutcome {
    /// How the VM ended.
    pub exit: VmExit,
    /// What the agent said over the probe.
    pub agent: AgentLog,
    /// The same, per kernel the agent ran in ([`AgentLog::boots`], folded once).
    pub boots: Vec<AgentBoot>,
    /// The guest kernel's panic line, if it panicked (it then resets, since luo-vmm
    /// boots with `panic=-1`, which must not pass for a clean exit).
    pub kernel_panic: Option<String>,
    /// Kernel lines that say it is in trouble (oops, BUG, WARNING, panic), the first few.
    pub kernel_trouble: Vec<String>,
    /// The kernels' LUO and KHO console lines, the first few.
    pub kernel_liveupdate: Vec<String>,
    /// What the kernels said about bringing up CPUs (a CPU limit, a CPU that did not
    /// come up), the first few.
    pub kernel_cpus: Vec<String>,
    /// When the VM started.
    pub started: Instant,
    /// vCPUs the VM had: every kernel of the run must bring all of them up.
    pub vcpus: u8,
    /// Which KVM ran it.
    pub backend: KvmBackend,
}

/// Whether a console line is the kernel's panic line. The one thing luo-vmm reads from
/// the console: it comes from the kernel, which has no other way to say it.
pub(crate) fn is_kernel_panic(line: &str) -> bool {
    line.contains("Kernel panic - not syncing")
}

/// Most trouble lines kept per run.
const MAX_TROUBLE_LINES: usize = 8;
/// Most LUO/KHO lines kept per run.
const MAX_LIVEUPDATE_LINES: usize = 32;
/// Most CPU bring-up lines kept per run.
const MAX_CPU_LINES: usize = 8;

/// The console lines luo-vmm keeps: what only the kernel can say, each kind bounded.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct ConsoleLines {
    panic: Option<String>,
    trouble: Vec<String>,
    liveupdate: Vec<String>,
    cpus: Vec<String>,
}

impl ConsoleLines {
    /// Keeps `line` under every kind it belongs to, while that kind has room.
    fn observe(&mut self, line: &str) {
        let keep = |v: &mut Vec<String>, max: usize| {
            if v.len() < max {
                v.push(line.trim().to_owned());
            }
        };
        if is_kernel_panic(line) && self.panic.is_none() {
            self.panic = Some(line.trim().to_owned());
        }
        if is_kernel_trouble(line) {
            keep(&mut self.trouble, MAX_TROUBLE_LINES);
        }
        if is_liveupdate_line(line) {
            keep(&mut self.liveupdate, MAX_LIVEUPDATE_LINES);
        }
        if is_cpu_bringup_line(line) {
            keep(&mut self.cpus, MAX_CPU_LINES);
        }
    }
}

/// A console line's text after its `[ time ]` stamp.
fn without_timestamp(line: &str) -> &str {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .map_or(line, |(_, rest)| rest)
        .trim_start()
}

/// Whether a console line is the kernel telling how its CPUs came up: the x86 topology
/// code's CPU limit and rejected CPUs (arch/x86/kernel/cpu/topology.c, `CPU topo: `), a
/// CPU that failed to start (arch/x86/kernel/smpboot.c, `smpboot: `), and the count
/// brought up (kernel/smp.c, `smp: Brought up`).
pub(crate) fn is_cpu_bringup_line(line: &str) -> bool {
    let text = without_timestamp(line);
    let ours = ["CPU topo: ", "smpboot: ", "smp: "]
        .iter()
        .any(|p| text.starts_with(p));
    ours && [
        "limit",
        "Reject",
        "Ignor",
        "fail",
        "not respond",
        "stuck",
        "Brought up",
    ]
    .iter()
    .any(|k| text.contains(k))
}

/// Why a guest brought up fewer CPUs than it had, in its kernel's own words, for a
/// message that follows "the guest brought up N of M CPUs; ".
pub(crate) fn why_cpus_missing(kernel_cpus: &[String]) -> String {
    if kernel_cpus.is_empty() {
        "its kernel said nothing about the others on the console".to_owned()
    } else {
        format!("its kernel said: {}", kernel_cpus.join(" | "))
    }
}

/// Whether a console line says the kernel is in trouble: an oops, a BUG, a WARNING, a
/// panic, list corruption. Like the panic line, it comes from the kernel, which has no
/// other way to say it.
pub(crate) fn is_kernel_trouble(line: &str) -> bool {
    [
        "Oops:",
        "BUG:",
        "WARNING:",
        "Kernel panic",
        "general protection fault",
        "list_del corruption",
        "list_add corruption",
    ]
    .iter()
    .any(|m| line.contains(m))
}

/// Console lines of the kernel's LUO and KHO code (their `pr_fmt` prefixes), after the
/// `[ time ]` stamp: what the kernel said when it refused or took a record.
pub(crate) fn is_liveupdate_line(line: &str) -> bool {
    let text = without_timestamp(line);
    [
        "luo: ",
        "KHO: ",
        "kho: ",
        "liveupdate: ",
        "memfd_luo: ",
        "luo_session: ",
        "luo_file: ",
    ]
    .iter()
    .any(|p| text.starts_with(p))
}

/// Runs `guest` with `opts`, once, from boot; `workload_params` (the agent's `luo.*`
/// parameters) go after the user's. `observer` (if any) arms its breakpoints and sees
/// every probe message; `gates` are the probe's.
pub(crate) fn run_guest(
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    workload_params: &str,
    observer: Option<Arc<dyn RunObserver>>,
    gates: Gates,
) -> Result<GuestOutcome, GuestError> {
    let mut machine = GuestMachine::boot(opts, guest, workload_params, gates)?;
    machine.run(observer, opts.console_log.as_deref(), None)
}

/// Where a run pauses to take the snapshot later runs start from: once the agent has
/// announced a wait at every one of these gates (a scenario's stage-1 threads each at its
/// first gate: the set-up before them then runs once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotPoint {
    /// The gates, at least one.
    pub gates: BTreeSet<Gate>,
}

impl SnapshotPoint {
    /// Whether `msg`, after the gate waits in `seen` (updated), completes the point.
    fn reached(&self, seen: &mut BTreeSet<Gate>, msg: &Message) -> bool {
        match msg {
            Message::GateWait(g) if self.gates.contains(g) => {
                seen.insert(*g);
                seen.len() == self.gates.len()
            }
            _ => false,
        }
    }
}

/// The run that a snapshot was taken in, as far as it had gone: what a later run from
/// the snapshot is given before its vCPUs start.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunHistory {
    /// From the run's start to the snapshot.
    pub at: Duration,
    /// The probe messages before the snapshot, with their time from the run's start.
    pub messages: Vec<(Duration, Message)>,
    /// The console so far (what the run's log file held), at most [`MAX_HISTORY_CONSOLE`]
    /// bytes.
    pub console: Vec<u8>,
    /// The console lines kept so far.
    lines: ConsoleLines,
}

/// The history as `state.json` keeps it: each message as its probe frame (hex).
#[derive(Serialize, Deserialize)]
struct HistoryFile {
    at_ns: u64,
    messages: Vec<(u64, String)>,
    console: String,
    lines: ConsoleLines,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl RunHistory {
    /// The JSON value a snapshot file keeps.
    fn to_json(&self) -> serde_json::Value {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let f = HistoryFile {
            at_ns: ns(self.at),
            messages: self
                .messages
                .iter()
                .map(|(t, m)| (ns(*t), hex(m.encode().as_bytes())))
                .collect(),
            console: hex(&self.console),
            lines: self.lines.clone(),
        };
        serde_json::to_value(f).unwrap_or(serde_json::Value::Null)
    }

    /// Reads [`RunHistory::to_json`]'s value back; every message must decode whole.
    fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let f: HistoryFile =
            serde_json::from_value(v.clone()).map_err(|e| format!("its run record: {e}"))?;
        if f.messages.len() > MAX_HISTORY_MESSAGES {
            return Err(format!(
                "more than {MAX_HISTORY_MESSAGES} messages in its run record"
            ));
        }
        let mut messages = Vec::with_capacity(f.messages.len());
        for (i, (t, frame)) in f.messages.iter().enumerate() {
            let bytes = unhex(frame).ok_or_else(|| format!("message {i}: not hex"))?;
            let mut d = luo_protocol::message::Decoder::new();
            match d.feed_frame(&bytes).as_slice() {
                [Ok(m)] => messages.push((Duration::from_nanos(*t), m.clone())),
                _ => return Err(format!("message {i}: not one whole probe frame")),
            }
        }
        let console = unhex(&f.console).ok_or("its console: not hex")?;
        if console.len() as u64 > MAX_HISTORY_CONSOLE {
            return Err("its console is longer than a snapshot keeps".into());
        }
        Ok(RunHistory {
            at: Duration::from_nanos(f.at_ns),
            messages,
            console,
            lines: f.lines,
        })
    }
}

/// Most probe messages a snapshot's history keeps; a run with more before its snapshot
/// point keeps no snapshot.
const MAX_HISTORY_MESSAGES: usize = 1 << 16;
/// Most console bytes a snapshot's history keeps (the start of the console; later runs'
/// logs say where it was cut).
pub(crate) const MAX_HISTORY_CONSOLE: u64 = 16 << 20;

/// Pauses the run at a [`SnapshotPoint`] when its observer is [`RunObserver::quiescent`]
/// there; everything else goes to the observer it wraps.
struct SnapshotTrigger {
    inner: Option<Arc<dyn RunObserver>>,
    point: SnapshotPoint,
    control: Mutex<Option<Arc<VcpuControl>>>,
    /// The point's gates waited at so far.
    seen: Mutex<BTreeSet<Gate>>,
    fired: AtomicBool,
    /// Why the point passed without a pause.
    skipped: Mutex<Option<String>>,
}

impl SnapshotTrigger {
    fn new(inner: Option<Arc<dyn RunObserver>>, point: SnapshotPoint) -> Self {
        SnapshotTrigger {
            inner,
            point,
            control: Mutex::new(None),
            seen: Mutex::new(BTreeSet::new()),
            fired: AtomicBool::new(false),
            skipped: Mutex::new(None),
        }
    }

    /// Why a run with this trigger kept no snapshot (`messages`: how many it recorded).
    fn why_not(&self, messages: usize) -> String {
        if let Some(why) = self
            .skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return why;
        }
        if messages > MAX_HISTORY_MESSAGES {
            format!("more than {MAX_HISTORY_MESSAGES} probe messages before the snapshot point")
        } else if self.fired.load(Ordering::SeqCst) {
            "the snapshot could not be taken (said above)".into()
        } else {
            "the agent never reached the snapshot point (its gate waits)".into()
        }
    }
}

impl RunObserver for SnapshotTrigger {
    fn breakpoints(&self, vcpu: u8) -> Vec<u64> {
        self.inner
            .as_ref()
            .map(|o| o.breakpoints(vcpu))
            .unwrap_or_default()
    }
    fn attach(&self, control: &Arc<VcpuControl>, started: Instant) {
        *self.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(control.clone());
        if let Some(o) = &self.inner {
            o.attach(control, started);
        }
    }
    fn on_notice(&self, notice: VcpuNotice) {
        if let Some(o) = &self.inner {
            o.on_notice(notice);
        }
    }
    fn on_breakpoint(&self, at: StoppedVcpu<'_>, slot: usize, pc: u64) -> HookAction {
        match &self.inner {
            Some(o) => o.on_breakpoint(at, slot, pc),
            None => HookAction::Continue,
        }
    }
    fn on_probe(&self, ev: &ProbeEvent) {
        if let Some(o) = &self.inner {
            o.on_probe(ev);
        }
    }
    fn on_probe_now(&self, ev: &ProbeEvent, dirty: &DirtyLog) {
        if let Some(o) = &self.inner {
            o.on_probe_now(ev, dirty);
        }
        let Ok(msg) = &ev.item else { return };
        let reached = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            self.point.reached(&mut seen, msg)
        };
        if !reached || self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.inner.as_ref().is_some_and(|o| !o.quiescent()) {
            *self.skipped.lock().unwrap_or_else(|e| e.into_inner()) = Some(
                "a hook had already stopped a vCPU before the snapshot point: runs from it \
                 could not replay that"
                    .into(),
            );
            return;
        }
        if let Some(c) = &*self.control.lock().unwrap_or_else(|e| e.into_inner()) {
            c.request_pause();
        }
    }
    fn on_stopped(&self, dirty: &DirtyLog) {
        if let Some(o) = &self.inner {
            o.on_stopped(dirty);
        }
    }
    fn quiescent(&self) -> bool {
        self.inner.as_ref().is_none_or(|o| o.quiescent())
    }
}

/// A guest VM that runs once or many times: booted, or built from a snapshot file, and
/// reset to the snapshot it keeps between runs.
pub(crate) struct GuestMachine {
    vm: Vm,
    gates: Gates,
    backend: KvmBackend,
    echo: bool,
    vcpus: u8,
    timeout: Option<Duration>,
    /// Each run's own bound, counted from where it starts (the snapshot's instant for a
    /// run from it); `timeout` (from boot) without one.
    run_bound: Option<Duration>,
    /// The composed kernel command line (what a snapshot's identity records).
    cmdline: String,
    /// The run as far as it had gone when the kept snapshot was taken.
    history: Option<RunHistory>,
    /// Why a snapshot asked for was not kept.
    no_snapshot: Option<String>,
    /// The VM is at its snapshot (just reset, or just built from one): the next run
    /// starts there and is given the snapshot's run so far.
    at_snapshot: bool,
    /// How far ahead of the snapshot's the last reset left the guest's clock (ns;
    /// [`RestoreStats::clock_ahead_ns`]): said in the next run's console log.
    clock_ahead_ns: u64,
}

impl GuestMachine {
    /// A VM of `guest` with `opts`, `workload_params` after the user's command line, and
    /// the probe's `gates`; not started.
    pub fn boot(
        opts: &GuestOptions,
        guest: &ResolvedGuest,
        workload_params: &str,
        gates: Gates,
    ) -> Result<Self, GuestError> {
        let (backend, cmdline) = compose_cmdline(opts, workload_params);
        let vm = Vm::new(&machine_spec(opts, guest, &cmdline, gates.clone()))?;
        Ok(Self::of(vm, gates, backend, opts, cmdline, None))
    }

    /// A VM in the state of the snapshot in `dir` (checked whole against this run's
    /// identity before anything is built); later runs start from it.
    pub fn from_snapshot(
        opts: &GuestOptions,
        guest: &ResolvedGuest,
        workload_params: &str,
        gates: Gates,
        dir: &Path,
    ) -> Result<Self, GuestError> {
        let (backend, cmdline) = compose_cmdline(opts, workload_params);
        let want = identity(opts, guest, &cmdline)?;
        let regions = ram_slots(opts.mem);
        let (snap, run) = file::read(dir, &want, &regions)?;
        let history = RunHistory::from_json(&run)
            .map_err(|why| GuestError::Snapshot(format!("snapshot {}: {why}", dir.display())))?;
        let vm = Vm::from_snapshot(&machine_spec(opts, guest, &cmdline, gates.clone()), snap)?;
        Ok(Self::of(vm, gates, backend, opts, cmdline, Some(history)))
    }

    /// The machine around `vm`; with the `history` of a snapshot it was built from, its
    /// next run starts there.
    fn of(
        vm: Vm,
        gates: Gates,
        backend: KvmBackend,
        opts: &GuestOptions,
        cmdline: String,
        history: Option<RunHistory>,
    ) -> Self {
        GuestMachine {
            vm,
            gates,
            backend,
            echo: !opts.quiet,
            vcpus: opts.vcpus,
            timeout: opts.timeout(),
            run_bound: None,
            cmdline,
            at_snapshot: history.is_some(),
            clock_ahead_ns: 0,
            history,
            no_snapshot: None,
        }
    }

    /// Bounds each later run to `bound` from where it starts (instead of the guest's
    /// timeout from its boot).
    pub fn set_run_bound(&mut self, bound: Duration) {
        self.run_bound = Some(bound);
    }

    /// The probe's gates (one set for the VM's life; each run's schedule drives them).
    pub fn gates(&self) -> Gates {
        self.gates.clone()
    }

    /// Whether a snapshot is kept (later runs can start from it).
    pub fn has_snapshot(&self) -> bool {
        self.history.is_some() && self.vm.kept_snapshot().is_some()
    }

    /// Why a snapshot asked for in the last run was not kept.
    pub fn no_snapshot(&self) -> Option<&str> {
        self.no_snapshot.as_deref()
    }

    /// Resets the VM to the snapshot it keeps.
    pub fn reset(&mut self) -> Result<RestoreStats, GuestError> {
        let stats = self.vm.reset()?;
        self.at_snapshot = true;
        self.clock_ahead_ns = stats.clock_ahead_ns;
        Ok(stats)
    }

    /// Writes the kept snapshot to `dir`; returns the bytes written.
    pub fn save(
        &self,
        dir: &Path,
        opts: &GuestOptions,
        guest: &ResolvedGuest,
    ) -> Result<u64, GuestError> {
        let (Some(snap), Some(history)) = (self.vm.kept_snapshot(), &self.history) else {
            return Err(GuestError::Snapshot(format!(
                "no snapshot to save: {}",
                self.no_snapshot.as_deref().unwrap_or("none was taken")
            )));
        };
        let id = identity(opts, guest, &self.cmdline)?;
        Ok(file::write(dir, &id, snap, history.to_json())?)
    }

    /// Runs the VM until it ends: from boot (or where the last run left it), or, after
    /// [`GuestMachine::reset`] (or built from a snapshot file), from the kept snapshot,
    /// this run's observer given the snapshot's run as far as it had gone. The console
    /// goes to stdout (unless quiet) and `console_log`. With `snapshot_at`, the run pauses
    /// there, the VM keeps a snapshot, and the run goes on.
    pub fn run(
        &mut self,
        observer: Option<Arc<dyn RunObserver>>,
        console_log: Option<&Path>,
        snapshot_at: Option<SnapshotPoint>,
    ) -> Result<GuestOutcome, GuestError> {
        let from_snapshot = std::mem::take(&mut self.at_snapshot) && self.history.is_some();
        let history = match (&self.history, from_snapshot) {
            (Some(h), true) => h.clone(),
            _ => RunHistory::default(),
        };
        let console = Arc::new(Mutex::new(history.lines.clone()));
        self.set_console(console_log, &history, &console)?;
        let trigger =
            snapshot_at.map(|point| Arc::new(SnapshotTrigger::new(observer.clone(), point)));
        self.vm.set_observer(match &trigger {
            Some(t) => Some(t.clone() as Arc<dyn RunObserver>),
            None => observer,
        });

        // Time goes on from the snapshot's run: this run "started" that long ago.
        let started = Instant::now()
            .checked_sub(history.at)
            .unwrap_or_else(Instant::now);
        let replay: Vec<ProbeEvent> = history
            .messages
            .iter()
            .map(|(t, m)| ProbeEvent {
                item: Ok(m.clone()),
                at: started + *t,
            })
            .collect();
        let rec = RefCell::new(Recorder {
            started,
            replayed_until: from_snapshot.then(|| started + history.at),
            vcpus: self.vcpus,
            agent: AgentLog::default(),
            messages: Vec::new(),
            saved: None,
        });
        let exit = self.vm.run(
            RunSpec {
                started,
                timeout: self.run_bound.map(|b| history.at + b).or(self.timeout),
                replay: &replay,
            },
            |ev: &ProbeEvent| rec.borrow_mut().on_probe(ev, &console),
            |snap: Result<&MachineSnapshot, &VmError>| {
                rec.borrow_mut().on_pause(snap, console_log, &console)
            },
        )?;
        self.vm.set_observer(None);
        let rec = rec.into_inner();
        if let Some(t) = &trigger {
            match rec.saved {
                Some(h) => {
                    self.history = Some(h);
                    self.no_snapshot = None;
                }
                None => self.no_snapshot = Some(t.why_not(rec.messages.len())),
            }
        }
        let agent = rec.agent;
        if agent.error_count > 0 {
            eprintln!(
                "luo-vmm: {} probe writes were not messages (first: {})",
                agent.error_count,
                agent
                    .errors
                    .first()
                    .map_or(String::new(), ToString::to_string)
            );
        }
        let lines = std::mem::take(&mut *console.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(GuestOutcome {
            exit,
            boots: agent.boots(),
            agent,
            kernel_panic: lines.panic,
            kernel_trouble: lines.trouble,
            kernel_liveupdate: lines.liveupdate,
            kernel_cpus: lines.cpus,
            started,
            vcpus: self.vcpus,
            backend: self.backend.clone(),
        })
    }

    /// This run's console: stdout (unless quiet), `console_log` (the snapshot's run's
    /// console first), and the kept kernel lines (`console`, starting from the snapshot's).
    fn set_console(
        &self,
        console_log: Option<&Path>,
        history: &RunHistory,
        console: &Arc<Mutex<ConsoleLines>>,
    ) -> Result<(), GuestError> {
        let log = open_console_log(console_log, &history.console, self.clock_ahead_ns)?;
        if self.echo && !history.console.is_empty() {
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&history.console);
        }
        let seen = console.clone();
        let line_observer: LineObserver = Arc::new(move |line: &str| {
            seen.lock().unwrap_or_else(|e| e.into_inner()).observe(line);
        });
        self.vm
            .set_console(ConsoleOutput::new(self.echo, log, Some(line_observer)));
        Ok(())
    }
}

/// What one run records from the probe: the agent's log, the messages a snapshot's
/// history keeps, and the history when the snapshot is taken.
struct Recorder {
    started: Instant,
    /// In a run from a snapshot: until when messages are the snapshot's, replayed.
    replayed_until: Option<Instant>,
    vcpus: u8,
    agent: AgentLog,
    /// Every message so far with its time from `started` (at most one past
    /// [`MAX_HISTORY_MESSAGES`]: then no snapshot is kept).
    messages: Vec<(Duration, Message)>,
    saved: Option<RunHistory>,
}

impl Recorder {
    fn on_probe(&mut self, ev: &ProbeEvent, console: &Mutex<ConsoleLines>) {
        let replayed = self.replayed_until.is_some_and(|until| ev.at <= until);
        if let Ok(m) = &ev.item {
            if self.messages.len() <= MAX_HISTORY_MESSAGES {
                self.messages
                    .push((ev.at.saturating_duration_since(self.started), m.clone()));
            }
        }
        if let (Ok(Message::UserspaceUp { cpus_online }), false) = (&ev.item, replayed) {
            if self.agent.first_cpus_online().is_none() {
                eprintln!(
                    "luo-vmm: guest agent up {:.2} s after VM start, {cpus_online} CPUs online",
                    ev.at.duration_since(self.started).as_secs_f64()
                );
            }
            if *cpus_online < u16::from(self.vcpus) {
                let lines = console.lock().unwrap_or_else(|e| e.into_inner());
                eprintln!(
                    "luo-vmm: the guest brought up {cpus_online} of {} CPUs; {}",
                    self.vcpus,
                    why_cpus_missing(&lines.cpus)
                );
            }
        }
        self.agent.push(ev);
    }

    fn on_pause(
        &mut self,
        snap: Result<&MachineSnapshot, &VmError>,
        console_log: Option<&Path>,
        console: &Mutex<ConsoleLines>,
    ) {
        let snap = match snap {
            Ok(snap) => snap,
            Err(e) => {
                eprintln!("luo-vmm: no snapshot: {e}");
                return;
            }
        };
        if self.messages.len() > MAX_HISTORY_MESSAGES {
            return;
        }
        let at = self.started.elapsed();
        eprintln!(
            "luo-vmm: snapshot taken {:.2} s after VM start ({} vCPUs, {} guest pages kept)",
            at.as_secs_f64(),
            snap.vcpus.len(),
            snap.memory.pages()
        );
        self.saved = Some(RunHistory {
            at,
            messages: self.messages.clone(),
            console: console_log
                .map(|p| read_prefix(p, MAX_HISTORY_CONSOLE))
                .unwrap_or_default(),
            lines: console.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        });
    }
}

/// The KVM in use and the full kernel command line for `opts` and the workload's
/// parameters (said on stderr).
fn compose_cmdline(opts: &GuestOptions, workload_params: &str) -> (KvmBackend, String) {
    let backend = host::detect();
    let emulated = match opts.profile {
        Profile::Auto => backend.is_emulated(),
        Profile::Emulated => true,
        Profile::Hardware => false,
    };
    match &backend {
        KvmBackend::Emulated { why } => eprintln!(
            "luo-vmm: /dev/kvm emulates instructions ({why}){}",
            if emulated {
                "; using the emulation-safe guest profile"
            } else {
                ""
            }
        ),
        KvmBackend::Hardware { module } => eprintln!("luo-vmm: hardware KVM ({module})"),
    }
    // The agent's harness timeouts follow the KVM: longer where guest code is emulated.
    let scale = if emulated && !workload_params.is_empty() {
        timeout_scale_param(EMULATED_TIMEOUT_SCALE)
    } else {
        String::new()
    };
    let user = [opts.cmdline.trim(), workload_params.trim(), &scale].join(" ");
    let tsc_khz = if emulated { host::tsc_khz() } else { None };
    let cmdline = cmdline::compose(emulated, tsc_khz, &user);
    log::info!("kernel command line: {cmdline}");
    (backend, cmdline)
}

fn machine_spec<'a>(
    opts: &GuestOptions,
    guest: &'a ResolvedGuest,
    cmdline: &'a str,
    gates: Gates,
) -> MachineSpec<'a> {
    MachineSpec {
        mem: opts.mem,
        vcpus: opts.vcpus,
        no_pvh: opts.no_pvh,
        // Each run sets its own console (GuestMachine::run).
        echo_console: false,
        console_log: None,
        kernel: &guest.kernel,
        initrd: guest.initrd.as_deref(),
        cmdline,
        console_observer: None,
        observer: None,
        gates,
    }
}

/// Opens a run's console log (truncated), with `history` (the snapshot's run's console)
/// written first, and a line saying where this run starts (and, if the reset left the
/// guest's clock `clock_ahead_ns` ahead, by how much).
fn open_console_log(
    path: Option<&Path>,
    history: &[u8],
    clock_ahead_ns: u64,
) -> Result<Option<File>, GuestError> {
    let Some(path) = path else { return Ok(None) };
    let err = |source| {
        GuestError::Vm(VmError::ConsoleLog {
            path: path.to_owned(),
            source,
        })
    };
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    if !history.is_empty() {
        use std::io::Write as _;
        f.write_all(history).map_err(err)?;
        writeln!(f, "\n{}", resumed_line(clock_ahead_ns)).map_err(err)?;
    }
    Ok(Some(f))
}

/// The console log's line between the snapshot's run and this one.
fn resumed_line(clock_ahead_ns: u64) -> String {
    let mut line =
        "[luo-vmm: the run above, to here, is the snapshot's; this run starts from it".to_owned();
    if clock_ahead_ns > 0 {
        line.push_str(&format!(
            "; the guest's clock is {:.1} s ahead of the snapshot's (this KVM did not put \
             the TSC back: docs/snapshots.md)",
            clock_ahead_ns as f64 * 1e-9
        ));
    }
    line.push(']');
    line
}

/// The first `max` bytes of `path` (empty if unreadable).
fn read_prefix(path: &Path, max: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, max), &mut out);
    }
    out
}

/// What a snapshot of this run must have been taken on.
fn identity(
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    cmdline: &str,
) -> Result<file::Identity, GuestError> {
    let stamp = |p: &Path| {
        std::fs::metadata(p).map_or_else(
            |_| format!("{} (unreadable)", p.display()),
            |m| format!("{} ({} bytes)", p.display(), m.len()),
        )
    };
    let image = match &guest.image {
        // The image's cache key, and the initramfs if it is not the image's own (the
        // next kernel of a cross-kernel run travels in an initramfs of its own).
        Some(img) => {
            let key = img.dir.file_name().map_or_else(
                || img.dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            match &guest.initrd {
                Some(i) if *i != img.initramfs => format!("{key} + {}", stamp(i)),
                _ => key,
            }
        }
        None => match &guest.initrd {
            Some(i) => format!("{} + {}", stamp(&guest.kernel), stamp(i)),
            None => stamp(&guest.kernel),
        },
    };
    Ok(file::Identity {
        luo_vmm: env!("CARGO_PKG_VERSION").to_owned(),
        image,
        mem: opts.mem,
        vcpus: opts.vcpus,
        cpuid: cpuid_digest()?,
        cmdline: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(cmdline.as_bytes())),
    })
}

/// Exit status of a guest failure (kernel panic, agent failure).
pub(crate) const EXIT_GUEST_FAILED: u8 = 1;
/// Exit status of a VM that died (triple fault, emulation failure, KVM error).
pub(crate) const EXIT_VM_DIED: u8 = 2;
/// Exit status of a run past its deadline.
pub(crate) const EXIT_TIMEOUT: u8 = 3;

/// The process exit status for a run, with a one-paragraph explanation on stderr.
pub(crate) fn exit_status(outcome: &GuestOutcome) -> u8 {
    let secs = outcome.started.elapsed().as_secs_f64();
    match &outcome.exit {
        VmExit::Reset => {
            if let Some(line) = &outcome.kernel_panic {
                eprintln!("luo-vmm: the guest kernel panicked after {secs:.1} s: {line}");
                return EXIT_GUEST_FAILED;
            }
            let want = u16::from(outcome.vcpus);
            let boots = &outcome.boots;
            if let Some((k, n)) = boots
                .iter()
                .enumerate()
                .find_map(|(k, b)| b.cpus_online.filter(|&n| n < want).map(|n| (k, n)))
            {
                eprintln!(
                    "luo-vmm: kernel {} of the run brought up {n} of {want} CPUs; {}; the VM reset after {secs:.1} s",
                    k + 1,
                    why_cpus_missing(&outcome.kernel_cpus)
                );
                return EXIT_GUEST_FAILED;
            }
            match outcome.agent.verdict() {
                Some(v) if !v.passed() => {
                    let errno = if v.errno != 0 {
                        format!(" ({})", std::io::Error::from_raw_os_error(v.errno))
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "luo-vmm: the guest agent failed at step {}{errno}; the VM reset after {secs:.1} s",
                        v.step.name()
                    );
                    EXIT_GUEST_FAILED
                }
                _ => {
                    eprintln!("luo-vmm: guest reset after {secs:.1} s: clean exit");
                    0
                }
            }
        }
        VmExit::Fatal { vcpu, exit } => {
            let dump = match exit {
                FatalExit::TripleFault(d) | FatalExit::InternalError(d) => format!("\n{d}"),
                _ => String::new(),
            };
            eprintln!("luo-vmm: vCPU {vcpu} stopped after {secs:.1} s: {exit}{dump}");
            EXIT_VM_DIED
        }
        VmExit::Ended => {
            eprintln!("luo-vmm: the run was ended after {secs:.1} s by what it waited for");
            0
        }
        VmExit::Timeout { after } => {
            let last = outcome
                .agent
                .messages
                .last()
                .map_or("none".to_owned(), |(_, m)| format!("{m:?}"));
            eprintln!(
                "luo-vmm: guest did not finish within {} s (timeout); last agent message: {last}",
                after.as_secs()
            );
            EXIT_TIMEOUT
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luo_protocol::message::{AgentVerdict, FailedStep};

    fn outcome(exit: VmExit, msgs: Vec<Message>, panic: Option<&str>) -> GuestOutcome {
        let mut agent = AgentLog::default();
        let at = Instant::now();
        for m in msgs {
            agent.push(&ProbeEvent { item: Ok(m), at });
        }
        GuestOutcome {
            exit,
            boots: agent.boots(),
            agent,
            kernel_panic: panic.map(str::to_owned),
            kernel_trouble: vec![],
            kernel_liveupdate: vec![],
            kernel_cpus: vec![],
            started: at,
            vcpus: 2,
            backend: KvmBackend::Hardware {
                module: "kvm_intel".into(),
            },
        }
    }

    #[test]
    fn exit_statuses() {
        let pass = vec![Message::Verdict(AgentVerdict::PASS)];
        assert_eq!(exit_status(&outcome(VmExit::Reset, pass.clone(), None)), 0);
        // Two vCPUs asked for; the next kernel brought up one.
        let lost_cpu = vec![
            Message::UserspaceUp { cpus_online: 2 },
            Message::UserspaceUp { cpus_online: 1 },
            Message::Verdict(AgentVerdict::PASS),
        ];
        assert_eq!(exit_status(&outcome(VmExit::Reset, lost_cpu, None)), 1);
        let both = vec![
            Message::UserspaceUp { cpus_online: 2 },
            Message::UserspaceUp { cpus_online: 2 },
            Message::Verdict(AgentVerdict::PASS),
        ];
        assert_eq!(exit_status(&outcome(VmExit::Reset, both, None)), 0);
        assert_eq!(exit_status(&outcome(VmExit::Reset, vec![], None)), 0);
        let fail = vec![Message::Verdict(AgentVerdict::fail(
            FailedStep::Preserve,
            22,
        ))];
        assert_eq!(exit_status(&outcome(VmExit::Reset, fail, None)), 1);
        assert_eq!(
            exit_status(&outcome(
                VmExit::Reset,
                pass,
                Some("Kernel panic - not syncing: x")
            )),
            1
        );
        let fatal = VmExit::Fatal {
            vcpu: 0,
            exit: FatalExit::TripleFault("regs".into()),
        };
        assert_eq!(exit_status(&outcome(fatal, vec![], None)), 2);
        let timeout = VmExit::Timeout {
            after: std::time::Duration::from_secs(1),
        };
        assert_eq!(exit_status(&outcome(timeout, vec![], None)), 3);
        assert!(is_kernel_trouble(
            "[ 3.1] WARNING: CPU: 0 PID: 1 at kernel/x.c:1"
        ));
        assert!(!is_kernel_trouble("luo-agent: all done"));
        assert!(is_kernel_panic(
            "[ 1.0] Kernel panic - not syncing: Attempted to kill init!"
        ));
    }

    #[test]
    fn liveupdate_lines_are_the_kernels_not_the_agents() {
        assert!(is_liveupdate_line(
            "[   31.2] luo: Failed to deserialize files for session [luo-vmm-s1] -22"
        ));
        assert!(is_liveupdate_line(
            "[    0.000000] KHO: setup: handover FDT (0x221000) is invalid: -9"
        ));
        assert!(!is_liveupdate_line("luo-agent: opened /dev/liveupdate"));
        assert!(!is_liveupdate_line(
            "[   24.1] luo_emulation: no /sys/module entries"
        ));
    }

    #[test]
    fn cpu_lines_are_the_kernels_reasons() {
        let mut c = ConsoleLines::default();
        for line in [
            "[    0.010000] CPU topo: CPU limit of 4 reached. Ignoring further CPUs",
            "[    0.020000] smp: Bringing up secondary CPUs ...",
            "[    0.030000] smpboot: do_boot_cpu failed(-1) to wakeup CPU#3",
            "[    0.040000] smp: Brought up 1 node, 4 CPUs",
            "[    0.050000] luo-agent: 4 CPUs online",
        ] {
            c.observe(line);
        }
        assert_eq!(
            c.cpus,
            [
                "[    0.010000] CPU topo: CPU limit of 4 reached. Ignoring further CPUs",
                "[    0.030000] smpboot: do_boot_cpu failed(-1) to wakeup CPU#3",
                "[    0.040000] smp: Brought up 1 node, 4 CPUs",
            ]
        );
        assert!(why_cpus_missing(&c.cpus)
            .starts_with("its kernel said: [    0.010000] CPU topo: CPU limit of 4"));
        assert_eq!(
            why_cpus_missing(&[]),
            "its kernel said nothing about the others on the console"
        );
        for _ in 0..20 {
            c.observe("[ 1.0] smpboot: CPU 5 is stuck");
        }
        assert_eq!(c.cpus.len(), MAX_CPU_LINES);
    }

    #[test]
    fn a_run_history_survives_its_file_form() {
        let mut lines = ConsoleLines::default();
        lines.observe("[ 1.0] smp: Brought up 1 node, 2 CPUs");
        let h = RunHistory {
            at: Duration::from_millis(64_730),
            messages: vec![
                (
                    Duration::from_secs(25),
                    Message::UserspaceUp { cpus_online: 2 },
                ),
                (
                    Duration::from_secs(64),
                    Message::GateWait(Gate::new(1).unwrap()),
                ),
            ],
            console: b"boot\n".to_vec(),
            lines,
        };
        let back = RunHistory::from_json(&h.to_json()).unwrap();
        assert_eq!(back.at, h.at);
        assert_eq!(back.messages, h.messages);
        assert_eq!(back.console, h.console);
        assert_eq!(back.lines.cpus, h.lines.cpus);
        // A frame that is not one whole message is refused, not half-read.
        let mut v = h.to_json();
        v["messages"][1][1] = serde_json::json!("0501");
        assert!(RunHistory::from_json(&v).unwrap_err().contains("message 1"));
        v["messages"][1][1] = serde_json::json!("zz");
        assert!(RunHistory::from_json(&v).unwrap_err().contains("not hex"));
    }

    #[test]
    fn the_snapshot_point_is_reached_once_every_gate_was_waited_at() {
        let g = |n| Gate::new(n).unwrap();
        let point = SnapshotPoint {
            gates: [g(1), g(2)].into(),
        };
        let mut seen = BTreeSet::new();
        assert!(!point.reached(&mut seen, &Message::GateWait(g(2))));
        assert!(!point.reached(&mut seen, &Message::GateWait(g(3))));
        assert!(!point.reached(&mut seen, &Message::RebootRequested));
        assert!(point.reached(&mut seen, &Message::GateWait(g(1))));
    }

    #[test]
    fn console_lines_keep_the_first_panic() {
        let mut c = ConsoleLines::default();
        c.observe("[ 2.0] Kernel panic - not syncing: first");
        c.observe("[ 3.0] Kernel panic - not syncing: second");
        assert_eq!(
            c.panic.as_deref(),
            Some("[ 2.0] Kernel panic - not syncing: first")
        );
        assert_eq!(c.trouble.len(), 2);
    }
}
