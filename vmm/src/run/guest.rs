//! Running a guest from a command's point of view: the reference image resolved once,
//! the kernel command line composed, what the agent said over the probe, whether the
//! kernel panicked, and the run's exit status.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use luo_devices::{Gates, ProbeEvent};
use luo_protocol::message::Message;
use luo_protocol::workload::{timeout_scale_param, EMULATED_TIMEOUT_SCALE};
use thiserror::Error;

use crate::config::options::{GuestOptions, Profile};
use crate::machine::host::{self, KvmBackend};
use crate::machine::vcpu::run::FatalExit;
use crate::machine::vm::{MachineSpec, RunObserver, Vm, VmError, VmExit};
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
#[derive(Debug, Default)]
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

/// Runs `guest` with `opts`; `workload_params` (the agent's `luo.*` parameters) go after
/// the user's. `observer` (if any) arms its breakpoints and sees every probe message;
/// `gates` are the probe's.
pub(crate) fn run_guest(
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    workload_params: &str,
    observer: Option<Arc<dyn RunObserver>>,
    gates: Gates,
) -> Result<GuestOutcome, GuestError> {
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

    let console = Arc::new(Mutex::new(ConsoleLines::default()));
    let seen = console.clone();
    let console_observer: luo_devices::console::LineObserver = Arc::new(move |line: &str| {
        seen.lock().unwrap_or_else(|e| e.into_inner()).observe(line);
    });
    let vm = Vm::new(&MachineSpec {
        mem: opts.mem,
        vcpus: opts.vcpus,
        no_pvh: opts.no_pvh,
        echo_console: !opts.quiet,
        console_log: opts.console_log.as_deref(),
        kernel: &guest.kernel,
        initrd: guest.initrd.as_deref(),
        cmdline: &cmdline,
        console_observer: Some(console_observer),
        observer,
        gates,
    })?;
    let started = Instant::now();
    let mut agent = AgentLog::default();
    let vcpus = opts.vcpus;
    let exit = vm.run(opts.timeout(), |ev: &ProbeEvent| {
        if let Ok(Message::UserspaceUp { cpus_online }) = &ev.item {
            if agent.first_cpus_online().is_none() {
                eprintln!(
                    "luo-vmm: guest agent up {:.2} s after VM start, {cpus_online} CPUs online",
                    ev.at.duration_since(started).as_secs_f64()
                );
            }
            if *cpus_online < u16::from(vcpus) {
                let lines = console.lock().unwrap_or_else(|e| e.into_inner());
                eprintln!(
                    "luo-vmm: the guest brought up {cpus_online} of {vcpus} CPUs; {}",
                    why_cpus_missing(&lines.cpus)
                );
            }
        }
        agent.push(ev);
    })?;
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
        vcpus,
        backend,
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
