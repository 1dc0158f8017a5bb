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

use crate::agent::AgentLog;
use crate::cmdline;
use crate::host::{self, KvmBackend};
use crate::image::{ensure_image, GuestImage, ImageError};
use crate::options::{GuestOptions, Profile};
use crate::vcpu::run::FatalExit;
use crate::vm::{RunObserver, Vm, VmError, VmExit, VmSpec};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The reference image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
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
    /// unless one is named. Call once per command.
    pub fn resolve(opts: &GuestOptions) -> Result<Self, ImageError> {
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
    /// The guest kernel's panic line, if it panicked (it then resets, since luo-vmm
    /// boots with `panic=-1`, which must not pass for a clean exit).
    pub kernel_panic: Option<String>,
    /// Kernel lines that say it is in trouble (oops, BUG, WARNING, panic), the first few.
    pub kernel_trouble: Vec<String>,
    /// The kernels' LUO and KHO console lines, the first few.
    pub kernel_liveupdate: Vec<String>,
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

    let panic_line = Arc::new(Mutex::new(None::<String>));
    let trouble = Arc::new(Mutex::new(Vec::<String>::new()));
    let liveupdate = Arc::new(Mutex::new(Vec::<String>::new()));
    let (seen, troubled, lu) = (panic_line.clone(), trouble.clone(), liveupdate.clone());
    let console_observer: luo_devices::console::LineObserver = Arc::new(move |line: &str| {
        if is_kernel_panic(line) {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| line.trim().to_owned());
        }
        if is_kernel_trouble(line) {
            let mut t = troubled.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() < MAX_TROUBLE_LINES {
                t.push(line.trim().to_owned());
            }
        }
        if crate::handover::outcome::is_liveupdate_line(line) {
            let mut l = lu.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() < MAX_LIVEUPDATE_LINES {
                l.push(line.trim().to_owned());
            }
        }
    });
    let vm = Vm::new(&VmSpec {
        options: opts,
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
                eprintln!(
                    "luo-vmm: the guest brought up {cpus_online} of {vcpus} CPUs; the start-up \
                     IPIs (INIT/SIPI) of the others were not delivered by this KVM"
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
    let kernel_panic = panic_line.lock().unwrap_or_else(|e| e.into_inner()).take();
    let kernel_trouble = std::mem::take(&mut *trouble.lock().unwrap_or_else(|e| e.into_inner()));
    let kernel_liveupdate =
        std::mem::take(&mut *liveupdate.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(GuestOutcome {
        exit,
        agent,
        kernel_panic,
        kernel_trouble,
        kernel_liveupdate,
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
            let boots = outcome.agent.boots();
            if let Some((k, n)) = boots
                .iter()
                .enumerate()
                .find_map(|(k, b)| b.cpus_online.filter(|&n| n < want).map(|n| (k, n)))
            {
                eprintln!(
                    "luo-vmm: kernel {} of the run brought up {n} of {want} CPUs; the VM reset after {secs:.1} s",
                    k + 1
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
    use luo_protocol::message::{Step, Verdict};

    fn outcome(exit: VmExit, msgs: Vec<Message>, panic: Option<&str>) -> GuestOutcome {
        let mut agent = AgentLog::default();
        let at = Instant::now();
        for m in msgs {
            agent.push(&ProbeEvent { item: Ok(m), at });
        }
        GuestOutcome {
            exit,
            agent,
            kernel_panic: panic.map(str::to_owned),
            kernel_trouble: vec![],
            kernel_liveupdate: vec![],
            started: at,
            vcpus: 2,
            backend: KvmBackend::Hardware {
                module: "kvm_intel".into(),
            },
        }
    }

    #[test]
    fn exit_statuses() {
        let pass = vec![Message::Verdict(Verdict::PASS)];
        assert_eq!(exit_status(&outcome(VmExit::Reset, pass.clone(), None)), 0);
        // Two vCPUs asked for; the next kernel brought up one.
        let lost_cpu = vec![
            Message::UserspaceUp { cpus_online: 2 },
            Message::UserspaceUp { cpus_online: 1 },
            Message::Verdict(Verdict::PASS),
        ];
        assert_eq!(exit_status(&outcome(VmExit::Reset, lost_cpu, None)), 1);
        let both = vec![
            Message::UserspaceUp { cpus_online: 2 },
            Message::UserspaceUp { cpus_online: 2 },
            Message::Verdict(Verdict::PASS),
        ];
        assert_eq!(exit_status(&outcome(VmExit::Reset, both, None)), 0);
        assert_eq!(exit_status(&outcome(VmExit::Reset, vec![], None)), 0);
        let fail = vec![Message::Verdict(Verdict::fail(Step::Preserve, 22))];
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
}
