//! The command line, as types that go unchanged from clap to the VM: [`GuestOptions`]
//! (what to boot and how), [`InterceptOptions`] (what to watch), and the workload of each
//! command. Everything is checked by [`GuestOptions::validate`] and the workload's
//! `validate` before any image is resolved or any guest boots.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use luo_handover::digest::DigestAlgorithm;
use luo_handover::inject::InjectSpec;
use luo_protocol::workload::{parse_size, Memfds, Selftest, Workload, WorkloadError};
use thiserror::Error;

use crate::config::image::{next_spec, source_tree_problem, ImageSpec, ImageSpecError, NextSpec};
use crate::config::trace::{PeekSpec, TraceSpec};
use crate::machine::arch::mptable::MAX_VCPUS;
use crate::machine::memory::{validate_size, MemoryError};

/// Errors in the options, found before anything runs.
#[derive(Debug, Error)]
pub enum OptionsError {
    /// Memory size.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU count.
    #[error("--vcpus {0}: luo-vmm runs 1 to {MAX_VCPUS} vCPUs")]
    Vcpus(u8),
    /// A file named on the command line does not exist.
    #[error("{what} {path} does not exist")]
    Missing {
        /// `kernel`, `initramfs`, ...
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// `--console-log FILE` cannot be opened for appending.
    #[error("--console-log {}: {source}", path.display())]
    ConsoleLog {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be opened.
        source: std::io::Error,
    },
    /// `--json FILE` cannot be written.
    #[error("--json {}: {source}", path.display())]
    Json {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be created.
        source: std::io::Error,
    },
    /// An option that acts on a handover, for a workload that has none.
    #[error("{option}: {workload} does not hand over (it is single-stage), so there is nothing to {what}")]
    NoHandover {
        /// The option.
        option: &'static str,
        /// The workload's name.
        workload: String,
        /// What the option does.
        what: &'static str,
    },
    /// `--source DIR` is not a kernel source tree.
    #[error("--source {}: {why}", path.display())]
    Source {
        /// The directory given.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The workload is out of bounds.
    #[error("{0}")]
    Workload(#[from] WorkloadError),
    /// `--next-variant`, `--next-source` or `--next-kernel` names no kernel luo-vmm can use.
    #[error(transparent)]
    Next(#[from] ImageSpecError),
    /// `--alternate` without a next kernel, or with a single handover.
    #[error("--alternate: {0}")]
    Alternate(&'static str),
    /// A workload option outside its bounds.
    #[error("{option} {value} is out of range: 1 to {max}")]
    OutOfRange {
        /// The option, as typed (`--files`).
        option: String,
        /// The value given.
        value: u64,
        /// The largest allowed.
        max: u64,
    },
    /// The workload's data does not fit in the guest.
    #[error(
        "{bytes} bytes of memfds do not fit in a guest of {mem} bytes (at most half of it); \
         give it more --mem or ask for less"
    )]
    TooMuchData {
        /// Bytes the workload preserves.
        bytes: u64,
        /// Guest memory.
        mem: u64,
    },
}

/// `luo-vmm`.
#[derive(Debug, Parser)]
#[command(
    name = "luo-vmm",
    version,
    about = "Run Linux guests through Live Update handovers on /dev/kvm and show what happens"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest (the reference guest unless --kernel is given) until it reboots.
    Boot(BootArgs),
    /// Boot a guest K times, P at a time, and count clean runs and distinct failures.
    Soak(SoakArgs),
    /// Run a LUO live update in the guest, intercept it, and report every phase.
    Handover(HandoverArgs),
    /// Run one of the kernel's own LUO selftests (across a real handover when it has two
    /// stages); its result is the exit status.
    Selftest(SelftestArgs),
    /// Turn handover JSON reports into a table and an SVG of blackout per phase.
    Report(ReportArgs),
    /// Provoke a race or an error path: list the built-in scenarios, or run one N times
    /// and give a verdict per run.
    Scenario {
        /// What to do.
        #[command(subcommand)]
        action: ScenarioAction,
    },
    /// Say what this host offers a guest (the kind of KVM, the kernel, each KVM
    /// capability luo-vmm checks, the CPU features that change the guest) and what
    /// luo-vmm will do with it; exit 1 with the reason when no guest can run here.
    Host,
    /// Every ordered pair of kernels as a cross-kernel handover: the matrix of verdicts
    /// (compatible, rejected, reused, crashed, accepted) as text, JSON and an SVG; exit 0
    /// when every cell gives the verdict its kernels' READMEs declare, 5 when not.
    Compat(CompatArgs),
    /// Search for LUO bugs nobody has reported: every hold point of the kernel's LUO/KHO
    /// code × every racing LUO call, and every fallible LUO function made to fail, each
    /// trial from one snapshot, judged by the oracles; each finding becomes a scenario
    /// file (docs/explore.md). `explore merge DIR...` merges the results of the shards
    /// of a campaign (`--shard I/N`) into one report. Exit 0: nothing found; 6:
    /// findings; 7 (merge): a shard missing or incomplete; 130: stopped by Ctrl-C (the
    /// report written); 1: could not run; 2: an option refused.
    #[command(args_conflicts_with_subcommands = true)]
    Explore(ExploreArgs),
    /// The reference guest image.
    Image {
        /// What to do with it.
        #[command(subcommand)]
        action: ImageAction,
    },
}

/// Which trials `explore` makes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ExploreMode {
    /// Hold points × racing calls × release policies.
    Race,
    /// Every fallible function made to fail on its 1st, 2nd, ... call.
    Fail,
    /// Both.
    Both,
}

impl ExploreMode {
    /// Whether race trials are made.
    pub fn races(self) -> bool {
        matches!(self, ExploreMode::Race | ExploreMode::Both)
    }

    /// Whether fail trials are made.
    pub fn fails(self) -> bool {
        matches!(self, ExploreMode::Fail | ExploreMode::Both)
    }
}

/// Which stages `explore` searches; kept in a manifest as its command-line value (`1`,
/// `2`, `boot`, `both`, `all`; `one` and `two` read back from older ones).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ExploreStage {
    /// Stage 1: the reboot and the calls around it.
    #[value(name = "1")]
    #[serde(rename = "1", alias = "one")]
    One,
    /// Stage 2: retrieve and finish in the next kernel.
    #[value(name = "2")]
    #[serde(rename = "2", alias = "two")]
    Two,
    /// The next kernel's boot: its `__init` LUO/KHO functions made to fail (fail mode),
    /// each trial through the kexec.
    Boot,
    /// Stages 1 and 2.
    Both,
    /// Stages 1 and 2 and the next kernel's boot.
    All,
}

impl ExploreStage {
    /// Whether stage 1 (`false`) or stage 2 (`true`) is searched.
    pub fn has(self, stage2: bool) -> bool {
        match self {
            ExploreStage::One => !stage2,
            ExploreStage::Two => stage2,
            ExploreStage::Boot => false,
            ExploreStage::Both | ExploreStage::All => true,
        }
    }

    /// Whether the next kernel's boot is searched.
    pub fn has_boot(self) -> bool {
        matches!(self, ExploreStage::Boot | ExploreStage::All)
    }
}

/// As the command line spells it (`1`, `2`, `boot`, `both`, `all`).
impl std::fmt::Display for ExploreStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// `luo-vmm explore`.
#[derive(Debug, Clone, Args)]
pub struct ExploreArgs {
    /// Explore this kernel variant of guest-images/variants (default: the reference).
    #[arg(long)]
    pub variant: Option<String>,
    /// Explore the kernel of this source tree (built like the reference, out of tree).
    #[arg(long, value_name = "DIR", conflicts_with = "variant")]
    pub source: Option<PathBuf>,
    /// The workload: a scenario file whose CPU-0 thread waits at `gate 1` right before
    /// its `reboot` (default: two sessions with a memfd each; docs/explore.md).
    #[arg(long, value_name = "FILE")]
    pub workload: Option<PathBuf>,
    /// Race trials, fail trials, or both.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: ExploreMode,
    /// Hold points and fallible functions: `auto` (every function of the kernel's LUO/KHO
    /// object files, then the lock sites in them), or a file of points, one per line
    /// (`#` comments): `FUNCTION` (its entry) or `FUNCTION+0xOFF` (an instruction
    /// boundary of it, e.g. a lock site).
    #[arg(long, default_value = "auto", value_name = "auto|FILE")]
    pub points: String,
    /// Run at most N search trials (the map of where the workload goes comes first and
    /// is not counted).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_budget)]
    pub budget: Option<u64>,
    /// Stop starting trials after this long (e.g. 30m, 2h).
    #[arg(long, value_name = "T", value_parser = parse_duration_arg)]
    pub time: Option<std::time::Duration>,
    /// vCPUs, 2 to 8 (at least 2: the racing thread runs on CPU 1).
    #[arg(long, value_name = "N", default_value_t = 2, allow_negative_numbers = true, value_parser = parse_explore_vcpus)]
    pub vcpus: u8,
    /// Guest memory, e.g. 512M.
    #[arg(long, default_value = "512M", value_parser = parse_bytes)]
    pub mem: u64,
    /// Where the results go: trials (trials.jsonl), findings (findings/*.toml, their
    /// logs), the report and its plot.
    #[arg(long, default_value = "explore-out", value_name = "DIR")]
    pub out: PathBuf,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "F")]
    pub json: Option<PathBuf>,
    /// Go on with the exploration in --out (same kernel, workload and options), without
    /// repeating finished trials.
    #[arg(long)]
    pub resume: bool,
    /// The order of the search trials (a budget samples the space in this order).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Which stages to search: 1 (around `reboot()`), 2 (around retrieve and finish in the
    /// next kernel, from a second snapshot taken there), boot (the next kernel's boot:
    /// fail mode, each trial through the kexec), both (1 and 2), or all.
    #[arg(long, value_enum, default_value = "all")]
    pub stage: ExploreStage,
    /// A trial that reaches neither point-of-no-return nor the end of its workload within
    /// this long (guest time here is ~1000x hardware) is a hang.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    pub hang_after: std::time::Duration,
    /// Run only shard I of N of the search trials (0 <= I < N): the same trial list on
    /// every shard, trial k goes to shard k mod N (each shard maps the workload itself).
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    pub shard: Option<Shard>,
    /// Also echo the guest console.
    #[arg(long)]
    pub console: bool,
    /// `explore merge`, instead of exploring.
    #[command(subcommand)]
    pub action: Option<ExploreAction>,
}

/// `luo-vmm explore ACTION`.
#[derive(Debug, Clone, Subcommand)]
pub enum ExploreAction {
    /// Merge the results of the shards of a campaign (each an `explore --shard I/N --out
    /// DIR`) into one report: findings deduplicated across shards, what each shard
    /// covered, what is missing; text, JSON and an HTML page. Exit 0 when complete without
    /// findings, 6 with findings, 7 when a shard is missing or incomplete.
    Merge(MergeArgs),
}

/// `luo-vmm explore merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The shards' `--out` directories (e.g. `campaign/shard-*`).
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Where the merged report goes: report.txt, report.json, report.html, and the
    /// findings' scenario files (findings/), renumbered as one process would.
    #[arg(long, default_value = "explore-merged", value_name = "DIR")]
    pub out: PathBuf,
    /// Also write the merged report as JSON to this file.
    #[arg(long, value_name = "F")]
    pub json: Option<PathBuf>,
}

/// `--shard I/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This shard, 0-based.
    pub index: u32,
    /// How many.
    pub count: u32,
}

impl Shard {
    /// Whether search trial `k` (0-based, in the trial list's order) is this shard's.
    pub fn has(self, k: usize) -> bool {
        k % self.count as usize == self.index as usize
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

fn parse_shard(text: &str) -> Result<Shard, String> {
    let bad = || format!("{text:?}: I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let index: u32 = i.trim().parse().map_err(|_| bad())?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 || index >= count {
        return Err(bad());
    }
    Ok(Shard { index, count })
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::scenario::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?}: a duration of more than 0, e.g. 30s, 20m, 2h"))
}

/// `luo-vmm image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageAction {
    /// Build the reference guest (kernel, selftests, initramfs) unless it is cached.
    Build {
        /// A kernel variant of guest-images/variants instead of the reference kernel
        /// (with --source: only its config fragment applies).
        #[arg(long)]
        variant: Option<String>,
        /// Build the kernel from this source tree instead of the reference source, out
        /// of tree (the tree is never written to), cached by the tree's state.
        #[arg(long, value_name = "DIR")]
        source: Option<PathBuf>,
    },
}

/// `luo-vmm scenario ...`.
#[derive(Debug, Subcommand)]
pub enum ScenarioAction {
    /// Print each built-in scenario, what it tests, and the variant that reproduces it.
    List,
    /// Run a scenario (a built-in one's name, or a scenario file) N times. Exit 0: every
    /// run gave the verdict the scenario expects; 5: not; 1: could not run; 2: an option
    /// refused.
    Run(ScenarioRunArgs),
    /// Check a scenario as `run` does before a guest boots (the file, the kernel's
    /// symbols, the breakpoint budget), and run nothing.
    Check(ScenarioTarget),
}

/// What `scenario check` and `scenario run` take: the scenario and the guest it runs in.
#[derive(Debug, Clone, Args)]
pub struct ScenarioTarget {
    /// A built-in scenario's name (`luo-vmm scenario list`) or the path of a scenario
    /// file (TOML, docs/scenarios.md).
    pub scenario: String,
    /// Run on this kernel variant of guest-images/variants (default: the reference
    /// kernel). On the scenario's own variant the expected verdict is "reproduced".
    #[arg(long)]
    pub variant: Option<String>,
    /// Run on the kernel of this source tree (built like the reference, out of tree,
    /// cached by the tree's state); it is expected not to reproduce, like the reference,
    /// unless --variant names the scenario's variant (whose config fragment then applies).
    #[arg(long, value_name = "DIR")]
    pub source: Option<PathBuf>,
    /// vCPUs, 1 to 8 (default: the scenario's).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_vcpus)]
    pub vcpus: Option<u8>,
    /// Guest memory, e.g. 512M.
    #[arg(long, default_value = "512M", value_parser = parse_bytes)]
    pub mem: u64,
    /// The kernel stage 2 runs in (default: the first kernel).
    #[command(flatten)]
    pub next: NextKernelOptions,
}

/// `luo-vmm scenario run`.
#[derive(Debug, Clone, Args)]
pub struct ScenarioRunArgs {
    /// The scenario and its guest.
    #[command(flatten)]
    pub target: ScenarioTarget,
    /// How many runs: run 1 boots and keeps a snapshot at the scenario's first gates, runs
    /// 2..N reset to it (`--no-snapshot`: each run boots a fresh VM).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Give up on a run after this many seconds, at least 1 (default: the scenario's
    /// timeout); the run is then inconclusive.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Write the runs (verdicts and timelines) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where each run's guest console goes (NAME[-VARIANT]-runN.log).
    #[arg(long, default_value = "scenario-logs")]
    pub log_dir: PathBuf,
    /// Also echo the guest console.
    #[arg(long)]
    pub console: bool,
    /// Boot every run (by default run 1 boots, pauses once the agent waits at the
    /// scenario's first gates, keeps a snapshot there, and runs 2..N start from it).
    #[arg(long, conflicts_with_all = ["from_snapshot", "save_snapshot", "snapshot_gate"])]
    pub no_snapshot: bool,
    /// Take the snapshot once the agent has waited at every one of these gates (a
    /// `gate N` step; repeatable) instead of at each stage-1 thread's first gate.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..64))]
    pub snapshot_gate: Vec<u8>,
    /// Also write the snapshot to this directory (replaced if it holds one), for
    /// `--from-snapshot` in another process.
    #[arg(long, value_name = "DIR")]
    pub save_snapshot: Option<PathBuf>,
    /// Start every run from the snapshot in this directory (written by
    /// `--save-snapshot` for the same scenario, kernel, --mem and --vcpus; checked whole
    /// before anything runs).
    #[arg(long, value_name = "DIR", conflicts_with = "snapshot_gate")]
    pub from_snapshot: Option<PathBuf>,
}

/// `luo-vmm boot`.
#[derive(Debug, Clone, Args)]
pub struct BootArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestOptions,
    /// Diagnostic hooks.
    #[command(flatten)]
    pub trace: TraceOptions,
}

/// `luo-vmm boot --trace ...`: stop a vCPU at kernel addresses and print its state.
#[derive(Debug, Clone, Default, Args)]
pub struct TraceOptions {
    /// Stop a vCPU each time it reaches this kernel address (SYMBOL or SYMBOL+OFFSET, at
    /// most four), print its registers, MSRs and peeks, and let it go on.
    #[arg(long, value_name = "SYMBOL[+OFFSET]")]
    pub trace: Vec<TraceSpec>,
    /// With --trace: also print guest memory at BASE[+|-OFFSET][:LEN], BASE a register
    /// (rax..r15, rsp, rip), fs, gs, an address, or [BASE+-OFFSET] (the u64 stored
    /// there); read through the vCPU's page tables.
    #[arg(long, value_name = "BASE[+-OFFSET][:LEN]", requires = "trace")]
    pub peek: Vec<PeekSpec>,
    /// With --trace: print at most this many hits of each traced address (at least 1).
    #[arg(long, default_value_t = 20, requires = "trace",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub trace_max: u32,
}

/// `luo-vmm soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// How many boots.
    #[arg(long, default_value_t = 10)]
    pub boots: u32,
    /// How many boots run at a time (2 oversubscribes a 2-core host with 2-vCPU guests).
    #[arg(long, default_value_t = 1)]
    pub parallel: u32,
    /// Where each boot's logs go: boot-NNN.log (console), boot-NNN.vmm.log (luo-vmm).
    #[arg(long, default_value = "soak-logs")]
    pub log_dir: PathBuf,
    /// Arguments for every `luo-vmm boot`, after `--`: e.g. `-- --vcpus 2 --timeout 600`.
    #[arg(last = true)]
    pub boot_args: Vec<String>,
}

/// What to boot and how: the options of every command that runs a guest.
#[derive(Debug, Clone, Args)]
pub struct GuestOptions {
    /// Kernel image: ELF vmlinux or bzImage. Default: the reference guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (uncompressed cpio recommended on an emulating KVM).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters, after luo-vmm's console/reboot ones.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory in bytes (K, M, G, T suffixes), e.g. 512M or 8G.
    #[arg(long, default_value = "512M", value_parser = parse_bytes)]
    pub mem: u64,
    /// Number of vCPUs (1 to 8).
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true, value_parser = parse_vcpus)]
    pub vcpus: u8,
    /// Give up after this many seconds (at least 1; default: never).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Also write the guest console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Guest profile: auto picks the emulation-safe one only on an emulating KVM.
    #[arg(long, value_enum, default_value_t = Profile::Auto)]
    pub profile: Profile,
    /// Enter an ELF vmlinux through the 64-bit boot protocol even if it has a PVH entry.
    #[arg(long)]
    pub no_pvh: bool,
    /// Do not echo the guest console to stdout.
    #[arg(long)]
    pub quiet: bool,
    /// The reference guest with a kernel variant of guest-images/variants (built and
    /// cached on first use) instead of the reference kernel.
    #[arg(long, conflicts_with = "kernel")]
    pub variant: Option<String>,
    /// The reference guest with its kernel built from this source tree instead (out of
    /// tree, never written to; built and cached by the tree's state on first use).
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    pub source: Option<PathBuf>,
}

/// How to choose the guest profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Emulation-safe on an instruction-emulating KVM, full CPU on hardware KVM.
    Auto,
    /// Always the emulation-safe profile.
    Emulated,
    /// Never the emulation-safe profile.
    Hardware,
}

/// The kernel a handover kexecs into (default: the kernel that runs, into itself).
#[derive(Debug, Clone, Default, Args)]
pub struct NextKernelOptions {
    /// Hand over to this kernel variant of guest-images/variants (built and cached on
    /// first use, like --variant): stage 1 runs the first kernel, the agent kexecs this one.
    #[arg(long, value_name = "NAME", conflicts_with = "next_kernel")]
    pub next_variant: Option<String>,
    /// Hand over to the kernel built from this source tree (out of tree, cached by the
    /// tree's state, like --source).
    #[arg(long, value_name = "DIR", conflicts_with = "next_kernel")]
    pub next_source: Option<PathBuf>,
    /// Hand over to this kernel: an ELF vmlinux with its bzImage beside it, or a bzImage
    /// with its vmlinux beside it (the agent kexecs the bzImage; luo-vmm breaks at the
    /// vmlinux's symbols).
    #[arg(long, value_name = "vmlinux|bzImage")]
    pub next_kernel: Option<PathBuf>,
    /// Alternate A->B->A->... instead of A->B->B->... (`handover --repeat N`; a scenario
    /// has one handover).
    #[arg(long)]
    pub alternate: bool,
}

impl NextKernelOptions {
    /// The next kernel asked for, checked before anything is built or booted; `None`:
    /// the kernel kexecs itself. `handovers` is how many the workload runs (`--alternate`
    /// needs two).
    pub(crate) fn spec(&self, handovers: u32) -> Result<Option<NextSpec>, OptionsError> {
        let spec = next_spec(
            self.next_variant.as_deref(),
            self.next_source.as_deref(),
            self.next_kernel.as_deref(),
        )?;
        if self.alternate {
            if spec.is_none() {
                return Err(OptionsError::Alternate(
                    "there is no next kernel to alternate with (give --next-variant, --next-source or --next-kernel)",
                ));
            }
            if handovers < 2 {
                return Err(OptionsError::Alternate(
                    "a single handover has nothing to alternate (handover: give --repeat 2 or more; a scenario or a single-stage selftest runs one)",
                ));
            }
        }
        Ok(spec)
    }
}

/// What luo-vmm watches and does during a handover.
#[derive(Debug, Clone, Default, Args)]
pub struct InterceptOptions {
    /// The kernel the handover kexecs into.
    #[command(flatten)]
    pub next: NextKernelOptions,
    /// Also compare digests of every preserved extent at point-of-no-return (the set the
    /// outgoing kernel's KHO FDT names, read through `kho_out`) and at next-kernel-start (the
    /// set handed over): host time and memory follow the preserved bytes, not guest size.
    #[arg(long, conflicts_with = "no_intercept")]
    pub verify_digest: bool,
    /// The hash of `--verify-digest`: xxh3 (XXH3-128, memory speed) or sha256
    /// (cryptographic, about 15x slower).
    #[arg(
        long,
        value_name = "xxh3|sha256",
        default_value = "xxh3",
        requires = "verify_digest"
    )]
    pub digest: DigestAlgorithm,
    /// Do not log dirty pages during the kexec (no in-place proof; measures the cost of
    /// the interception).
    #[arg(long)]
    pub no_dirty_log: bool,
    /// Write-protect every guest page at point-of-no-return, not only the preserved set, to
    /// also count the scratch and other pages written during the kexec (costs O(guest
    /// size) with the guest stopped; see docs/benchmarks.md).
    #[arg(long, conflicts_with_all = ["no_dirty_log", "no_intercept"])]
    pub track_all_pages: bool,
    /// Save the KHO pages read at the first next-kernel-start, and what was parsed from
    /// them, as a luo-handover test fixture in this directory.
    #[arg(long)]
    pub capture_fixture: Option<PathBuf>,
    /// Arm no breakpoints and log no dirty pages: only the guest agent's marks are timed.
    #[arg(long)]
    pub no_intercept: bool,
    /// At next-kernel-start, change a field of the parsed KHO/LUO state before the next
    /// kernel reads it (repeatable): PATH=VALUE, PATH as the JSON report's `fields` list it
    /// (or a short name: compatible, file-count, block-next, folio-count, folio-pfn, ...),
    /// VALUE a number, +N/-N, @PATH (an address), $PATH (a value), self, bytes:HEX or
    /// "text"; or corrupt-kho-fdt (the FDT header). See docs/faults.md.
    #[arg(long, value_name = "PATH=VALUE", value_parser = parse_inject, conflicts_with = "no_intercept")]
    pub inject: Vec<InjectSpec>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `luo-vmm handover`.
#[derive(Debug, Clone, Args)]
pub struct HandoverArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestOptions,
    /// The interception.
    #[command(flatten)]
    pub intercept: InterceptOptions,
    /// LUO sessions to preserve (1 to 1000).
    #[arg(long, default_value_t = 1)]
    pub sessions: u32,
    /// memfds per session (1 to 999).
    #[arg(long, default_value_t = 1)]
    pub files: u32,
    /// Size of each memfd, e.g. 1M.
    #[arg(long, default_value = "1M", value_parser = parse_bytes)]
    pub memfd_size: u64,
    /// Consecutive handovers in one VM (1 to 1000).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

/// `luo-vmm selftest`.
#[derive(Debug, Clone, Args)]
pub struct SelftestArgs {
    /// Selftest name: liveupdate (single-stage), luo_kexec_simple, luo_multi_session,
    /// luo_stress_sessions, luo_stress_files (across a handover).
    pub name: String,
    /// The guest.
    #[command(flatten)]
    pub guest: GuestOptions,
    /// The interception (two-stage selftests).
    #[command(flatten)]
    pub intercept: InterceptOptions,
}

/// `luo-vmm compat`.
#[derive(Debug, Clone, Args)]
pub struct CompatArgs {
    /// The kernels, comma-separated: `reference` and variants of guest-images/variants.
    #[arg(
        long,
        default_value = "reference,abi-granular,memfd-renamed,abi-control"
    )]
    pub kernels: String,
    /// Also the kernel of this source tree (repeatable; it declares no ABI, so its cells
    /// are reported, not checked).
    #[arg(long, value_name = "DIR")]
    pub source: Vec<PathBuf>,
    /// Give up on a cell's handover after this many seconds (the cell then has no
    /// verdict, or `crashed` when the next kernel hung).
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Guest memory of every cell, e.g. 512M.
    #[arg(long, default_value = "512M", value_parser = parse_bytes)]
    pub mem: u64,
    /// Write the matrix as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where to write the picture (a grid coloured by verdict).
    #[arg(long, default_value = "compat-matrix.svg")]
    pub svg: PathBuf,
    /// Where each cell's guest console goes (A-to-B.log).
    #[arg(long, default_value = "compat-logs")]
    pub log_dir: PathBuf,
}

/// `luo-vmm report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// JSON reports written by `handover --json` or `selftest --json`.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Where to write the SVG picture.
    #[arg(long, default_value = "handover-phases.svg")]
    pub svg: PathBuf,
    /// Title of the picture.
    #[arg(long, default_value = "luo-vmm: blackout per phase")]
    pub title: String,
}

/// `--inject`: its syntax is checked here, before anything runs; its path against the
/// handover at next-kernel-start.
fn parse_inject(s: &str) -> Result<InjectSpec, String> {
    InjectSpec::parse(s).map_err(|e| e.to_string())
}

/// `--vcpus N` of a guest: 1 to [`MAX_VCPUS`]; any other value is the parser's to
/// refuse (exit status 2), as every out-of-range option is.
fn parse_vcpus(s: &str) -> Result<u8, String> {
    vcpus_in(s, 1, "luo-vmm", "")
}

/// `--vcpus N` of `explore`: 2 to [`MAX_VCPUS`] (its racing thread runs on CPU 1).
/// `--budget N`: a count of search trials, at least 1.
fn parse_budget(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| "a number of search trials, at least 1".to_owned())
}

fn parse_explore_vcpus(s: &str) -> Result<u8, String> {
    vcpus_in(
        s,
        2,
        "explore",
        " (at least 2: the racing thread runs on CPU 1)",
    )
}

/// `s` as a vCPU count from `min` to [`MAX_VCPUS`]; else why not, naming `who` needs
/// that range and, after it, `note`.
fn vcpus_in(s: &str, min: u8, who: &str, note: &str) -> Result<u8, String> {
    s.trim()
        .parse::<u8>()
        .ok()
        .filter(|n| (min..=MAX_VCPUS).contains(n))
        .ok_or_else(|| format!("{who} runs {min} to {MAX_VCPUS} vCPUs{note}"))
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| {
        format!("invalid size {s:?}: expected a number with an optional K, M, G or T suffix")
    })
}

impl InterceptOptions {
    /// Checks, before any boot, what only makes sense with a handover and that `--json`
    /// can be written (the file is created empty now and written at the end).
    pub fn validate(&self, workload: &Workload) -> Result<(), OptionsError> {
        if !workload.hands_over() {
            let no_handover = |option, what| OptionsError::NoHandover {
                option,
                workload: match workload {
                    Workload::Selftest(t) => format!("selftest {}", t.name()),
                    _ => "this workload".to_owned(),
                },
                what,
            };
            if !self.inject.is_empty() {
                return Err(no_handover("--inject", "inject into"));
            }
            if self.verify_digest {
                return Err(no_handover("--verify-digest", "verify"));
            }
            if self.track_all_pages {
                return Err(no_handover("--track-all-pages", "track"));
            }
            let n = &self.next;
            if n.next_variant.is_some() || n.next_source.is_some() || n.next_kernel.is_some() {
                return Err(no_handover("--next-*", "hand over to"));
            }
        }
        self.next.spec(workload.handovers())?;
        if let Some(path) = &self.json {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|source| OptionsError::Json {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

impl GuestOptions {
    /// Checks memory, vCPUs, that named files exist, that `--console-log` can be opened
    /// and that `--source` is a kernel tree; runs nothing.
    pub fn validate(&self) -> Result<(), OptionsError> {
        validate_size(self.mem)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(OptionsError::Vcpus(self.vcpus));
        }
        for (what, path) in [("kernel", &self.kernel), ("initramfs", &self.initrd)] {
            if let Some(p) = path {
                if !p.exists() {
                    return Err(OptionsError::Missing {
                        what,
                        path: p.clone(),
                    });
                }
            }
        }
        if let Some(path) = &self.console_log {
            // Opened (and created) the way the console will open it, before any boot.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| OptionsError::ConsoleLog {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(dir) = &self.source {
            if let Some(why) = source_tree_problem(dir) {
                return Err(OptionsError::Source {
                    path: dir.clone(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// The image these options ask for, when no `--kernel` is given.
    pub(crate) fn image_spec(&self) -> ImageSpec {
        ImageSpec {
            variant: self.variant.clone(),
            source: self.source.clone(),
        }
    }

    /// The run's deadline.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.map(Duration::from_secs)
    }
}

impl HandoverArgs {
    /// The workload, checked against its bounds and the guest's memory.
    pub fn workload(&self) -> Result<Workload, OptionsError> {
        let m = Memfds {
            sessions: self.sessions,
            files: self.files,
            memfd_size: self.memfd_size,
            repeat: self.repeat,
        }
        .validate()
        .map_err(|e| match e {
            // Named as the user typed it.
            WorkloadError::OutOfRange { what, value, max } => OptionsError::OutOfRange {
                option: format!("--{}", what.replace('_', "-")),
                value,
                max,
            },
            other => OptionsError::Workload(other),
        })?;
        if m.total_bytes() > self.guest.mem / 2 {
            return Err(OptionsError::TooMuchData {
                bytes: m.total_bytes(),
                mem: self.guest.mem,
            });
        }
        Ok(Workload::Handover(m))
    }
}

impl SelftestArgs {
    /// The workload: a selftest the image has.
    pub fn workload(&self) -> Result<Workload, OptionsError> {
        Ok(Workload::Selftest(Selftest::from_name(&self.name)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Command {
        let mut all = vec!["luo-vmm"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().command
    }

    fn handover(args: &[&str]) -> Result<Workload, OptionsError> {
        let mut all = vec!["handover"];
        all.extend_from_slice(args);
        match cli(&all) {
            Command::Handover(h) => h.workload(),
            other => panic!("not a handover: {other:?}"),
        }
    }

    #[test]
    fn workloads_out_of_bounds_are_refused_up_front() {
        let msg = |args: &[&str]| handover(args).unwrap_err().to_string();
        assert_eq!(
            msg(&["--files", "100000"]),
            "--files 100000 is out of range: 1 to 999"
        );
        assert_eq!(
            msg(&["--sessions", "0"]),
            "--sessions 0 is out of range: 1 to 1000"
        );
        assert_eq!(
            msg(&["--repeat", "0"]),
            "--repeat 0 is out of range: 1 to 1000"
        );
        assert!(msg(&["--memfd-size", "0"]).starts_with("--memfd-size 0 is out of range"));
        assert!(msg(&["--memfd-size", "300M"]).contains("do not fit in a guest"));
        assert!(handover(&["--sessions", "3", "--files", "2", "--memfd-size", "8M"]).is_ok());
        let Command::Selftest(s) = cli(&["selftest", "no_such_test"]) else {
            panic!("not a selftest");
        };
        assert!(s
            .workload()
            .unwrap_err()
            .to_string()
            .contains("luo_kexec_simple"));
    }

    #[test]
    fn every_command_refuses_a_vcpu_count_out_of_its_range_the_same_way() {
        let refused = |args: &[&str]| {
            let mut all = vec!["luo-vmm"];
            all.extend_from_slice(args);
            let e = Cli::try_parse_from(all).unwrap_err();
            // The parser's refusal: exit status 2, as for any out-of-range option.
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            assert_eq!(e.exit_code(), 2, "{args:?}");
            e.to_string()
        };
        let accepted = |args: &[&str]| {
            let mut all = vec!["luo-vmm"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        };
        for n in ["0", "-1", "9", "300", "two"] {
            for cmd in [
                &["boot"][..],
                &["handover"],
                &["scenario", "run", "x"],
                &["scenario", "check", "x"],
            ] {
                let mut args = cmd.to_vec();
                args.extend(["--vcpus", n]);
                let e = refused(&args);
                assert!(
                    e.contains(&format!(
                        "'{n}' for '--vcpus <N>': luo-vmm runs 1 to 8 vCPUs"
                    )),
                    "{args:?}: {e}"
                );
            }
        }
        for n in ["1", "8"] {
            accepted(&["boot", "--vcpus", n]);
            accepted(&["handover", "--vcpus", n]);
            accepted(&["scenario", "run", "x", "--vcpus", n]);
        }
        // Explore needs a racing CPU: 1 and 9 alike are the parser's to refuse.
        for n in ["0", "-1", "1", "9", "300"] {
            let e = refused(&["explore", "--vcpus", n]);
            assert!(
                e.contains(&format!(
                    "'{n}' for '--vcpus <N>': explore runs 2 to 8 vCPUs (at least 2: the \
                     racing thread runs on CPU 1)"
                )),
                "{e}"
            );
        }
        // A search budget the same way.
        for n in ["0", "-1", "many"] {
            let e = refused(&["explore", "--budget", n]);
            assert!(
                e.contains(&format!(
                    "'{n}' for '--budget <N>': a number of search trials, at least 1"
                )),
                "{e}"
            );
        }
        for n in ["2", "8"] {
            let Command::Explore(x) = cli(&["explore", "--vcpus", n]) else {
                panic!("not explore");
            };
            assert_eq!(x.vcpus.to_string(), n);
        }
    }

    #[test]
    fn guest_options_are_checked() {
        // Options built by luo-vmm itself (a scenario's vcpus) are checked too.
        let Command::Boot(BootArgs { guest: mut g, .. }) = cli(&["boot"]) else {
            panic!("not boot");
        };
        g.vcpus = 9;
        assert_eq!(
            g.validate().unwrap_err().to_string(),
            "--vcpus 9: luo-vmm runs 1 to 8 vCPUs"
        );
        let Command::Boot(BootArgs { guest: g, .. }) = cli(&["boot", "--mem", "1K"]) else {
            panic!("not boot");
        };
        assert!(g.validate().is_err());
        let Command::Boot(BootArgs { guest: g, .. }) = cli(&["boot", "--kernel", "/nonexistent"])
        else {
            panic!("not boot");
        };
        assert_eq!(
            g.validate().unwrap_err().to_string(),
            "kernel /nonexistent does not exist"
        );
        let Command::Boot(BootArgs { guest: g, .. }) =
            cli(&["boot", "--console-log", "/nonexistent/dir/console.log"])
        else {
            panic!("not boot");
        };
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--console-log /nonexistent/dir/console.log: "));
        assert!(Cli::try_parse_from(["luo-vmm", "boot", "--timeout", "0"]).is_err());
        // --digest names the hash of --verify-digest: alone it would be ignored.
        assert!(Cli::try_parse_from(["luo-vmm", "handover", "--digest", "sha256"]).is_err());
        assert!(Cli::try_parse_from([
            "luo-vmm",
            "handover",
            "--verify-digest",
            "--digest",
            "sha256"
        ])
        .is_ok());
    }

    #[test]
    fn handover_options_are_checked_before_a_boot() {
        let intercept = |args: &[&str]| {
            let mut all = vec!["luo-vmm"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Selftest(s)) => {
                    let w = s.workload().unwrap();
                    s.intercept.validate(&w).map_err(|e| e.to_string())
                }
                Ok(Command::Handover(h)) => {
                    let w = h.workload().unwrap();
                    h.intercept.validate(&w).map_err(|e| e.to_string())
                }
                Ok(_) => unreachable!(),
                Err(e) => Err(e.to_string()),
            }
        };
        let e = intercept(&["selftest", "liveupdate", "--inject", "token=+1"]).unwrap_err();
        assert!(
            e.contains("--inject: selftest liveupdate does not hand over"),
            "{e}"
        );
        assert!(intercept(&["selftest", "liveupdate", "--verify-digest"]).is_err());
        assert!(intercept(&["selftest", "luo_kexec_simple", "--verify-digest"]).is_ok());
        for clash in [
            ["--no-intercept", "--inject=token=+1"],
            ["--no-intercept", "--verify-digest"],
            ["--no-intercept", "--track-all-pages"],
            ["--no-dirty-log", "--track-all-pages"],
        ] {
            let mut args = vec!["handover"];
            args.extend(clash);
            assert!(intercept(&args)
                .unwrap_err()
                .contains("cannot be used with"));
        }
        let e = intercept(&["handover", "--json", "/nonexistent/dir/x.json"]).unwrap_err();
        assert!(e.starts_with("--json /nonexistent/dir/x.json: "), "{e}");
        let Command::Boot(BootArgs { guest: g, .. }) =
            cli(&["boot", "--mem", "1G", "--timeout", "5"])
        else {
            panic!("not boot");
        };
        assert_eq!(
            (g.mem, g.timeout()),
            (1 << 30, Some(Duration::from_secs(5)))
        );
    }

    #[test]
    fn injections_are_parsed_up_front() {
        let Command::Handover(h) = cli(&[
            "handover",
            "--inject",
            "corrupt-kho-fdt",
            "--inject",
            "luo.session[0].file_block[0].next=self",
            "--inject",
            "compatible=\"memfd-v3\"",
        ]) else {
            panic!("not a handover");
        };
        let i = &h.intercept.inject;
        assert_eq!(i.len(), 3);
        assert!(i[0].is_corrupt_kho_fdt());
        assert_eq!(
            i[1].assignments[0].path,
            "luo.session[0].file_block[0].next"
        );
        assert_eq!(
            i[2].assignments[0].path,
            "luo.session[0].file[0].compatible"
        );
        for bad in ["corrupt", "luo.session[0=1", "token=12z", "token=bytes:abc"] {
            let all = ["luo-vmm", "handover", "--inject", bad];
            let err = Cli::try_parse_from(all).unwrap_err().to_string();
            assert!(err.contains("--inject"), "{bad}: {err}");
        }
    }

    #[test]
    fn boot_traces_and_soak_arguments() {
        let Command::Boot(b) = cli(&[
            "boot",
            "--trace",
            "start_kernel",
            "--peek",
            "fs-0xa8",
            "--trace-max",
            "3",
        ]) else {
            panic!("not boot");
        };
        assert_eq!(b.trace.trace[0].symbol, "start_kernel");
        assert_eq!((b.trace.peek.len(), b.trace.trace_max), (1, 3));
        let all = ["luo-vmm", "boot", "--peek", "fs"];
        assert!(Cli::try_parse_from(all).is_err(), "--peek needs --trace");
        let Command::Soak(s) = cli(&["soak", "--boots", "3", "--", "--vcpus", "2"]) else {
            panic!("not soak");
        };
        assert_eq!((s.boots, s.parallel), (3, 1));
        assert_eq!(s.boot_args, ["--vcpus", "2"]);
        let all = ["luo-vmm", "boot", "--variant", "v", "--kernel", "k"];
        assert!(Cli::try_parse_from(all).is_err(), "--variant or --kernel");
    }

    #[test]
    fn source_trees_are_options_of_every_guest_command() {
        for args in [
            &["boot", "--source", "k", "--kernel", "k"][..],
            &["handover", "--kernel", "k", "--source", "k"][..],
            &["selftest", "liveupdate", "--source", "k", "--kernel", "k"][..],
        ] {
            let all = [&["luo-vmm"][..], args].concat();
            let err = Cli::try_parse_from(all).unwrap_err().to_string();
            assert!(err.contains("--kernel"), "{args:?}: {err}");
        }
        let Command::Handover(h) = cli(&["handover", "--source", "/src", "--variant", "v"]) else {
            panic!("not a handover");
        };
        assert_eq!(
            h.guest.image_spec(),
            ImageSpec {
                variant: Some("v".into()),
                source: Some("/src".into()),
            }
        );
        let Command::Selftest(s) = cli(&["selftest", "liveupdate", "--source", "/src"]) else {
            panic!("not a selftest");
        };
        assert_eq!(s.guest.source, Some(PathBuf::from("/src")));
        let Command::Image {
            action: ImageAction::Build { variant, source },
        } = cli(&["image", "build", "--source", "/src"])
        else {
            panic!("not image build");
        };
        assert_eq!((variant, source), (None, Some(PathBuf::from("/src"))));
        let Command::Scenario {
            action: ScenarioAction::Run(r),
        } = cli(&["scenario", "run", "x", "--source", "/src"])
        else {
            panic!("not scenario run");
        };
        assert_eq!(r.target.source, Some(PathBuf::from("/src")));
        let Command::Soak(s) = cli(&["soak", "--", "--source", "/src"]) else {
            panic!("not soak");
        };
        assert_eq!(s.boot_args, ["--source", "/src"]);
    }

    #[test]
    fn source_trees_are_checked_before_anything_boots() {
        let Command::Boot(BootArgs { guest: g, .. }) =
            cli(&["boot", "--source", "/nonexistent/linux"])
        else {
            panic!("not boot");
        };
        assert_eq!(
            g.validate().unwrap_err().to_string(),
            "--source /nonexistent/linux: no such directory"
        );
        // A directory that is no kernel tree (this crate's own: no kernel/).
        let here = env!("CARGO_MANIFEST_DIR");
        let Command::Boot(BootArgs { guest: g, .. }) = cli(&["boot", "--source", here]) else {
            panic!("not boot");
        };
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a kernel source tree"));
    }
}
