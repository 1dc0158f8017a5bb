//! Running a guest from the command line's point of view: which kernel, which command
//! line, what the agent said, and what the run's exit status is.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luo_devices::probe::{ProbeEvent, ProbeMark};
use thiserror::Error;

use crate::cmdline;
use crate::host::{self, KvmBackend};
use crate::image::{ensure_reference_image, GuestImage, ImageError};
use crate::memory::{validate_size, MemoryError};
use crate::vm::{RunObserver, Vm, VmConfig, VmError, VmExit};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The reference image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Memory size.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU count.
    #[error("--vcpus {0}: luo-vmm runs 1 to 8 vCPUs")]
    Vcpus(u8),
    /// A file named on the command line does not exist.
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
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

/// What the user asked to boot.
#[derive(Debug, Clone)]
pub struct GuestRequest {
    /// Kernel; `None` means the reference guest.
    pub kernel: Option<PathBuf>,
    /// Initramfs (the reference guest's when the kernel is the reference one).
    pub initrd: Option<PathBuf>,
    /// Parameters after luo-vmm's own.
    pub cmdline: String,
    /// Memory size in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// Append the console to this file.
    pub console_log: Option<PathBuf>,
    /// Guest profile choice.
    pub profile: Profile,
    /// Boot an ELF through the 64-bit protocol even when it has a PVH entry.
    pub prefer_64bit: bool,
    /// Show the console on stdout.
    pub echo_console: bool,
}

/// What the agent printed and sent, as seen from outside.
#[derive(Debug, Default, Clone)]
pub struct AgentView {
    /// `cpus=N` from `luo-agent: userspace up (cpus=N)`, per boot.
    pub cpus_online: Vec<u32>,
    /// Lines starting with `luo-agent:`.
    pub lines: Vec<String>,
    /// Marks with their arrival time.
    pub marks: Vec<ProbeEvent>,
    /// The guest kernel's panic line, if it panicked (it then resets, since luo-vmm
    /// boots with `panic=-1`, which must not pass for a clean exit).
    pub kernel_panic: Option<String>,
}

impl AgentView {
    /// Whether the agent reported success (and no failure).
    pub fn succeeded(&self) -> bool {
        let has = |m| self.marks.iter().any(|e| e.mark == m);
        has(ProbeMark::AgentSuccess) && !has(ProbeMark::AgentFailure)
    }
}

/// Parses `cpus=N` from the agent's banner line.
pub fn parse_cpus(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("luo-agent: userspace up (cpus=")?;
    rest.split(')').next()?.parse().ok()
}

/// The result of a run.
#[derive(Debug)]
pub struct GuestOutcome {
    /// How the VM ended.
    pub exit: VmExit,
    /// What the agent said.
    pub agent: AgentView,
    /// When the VM started.
    pub started: Instant,
    /// Which KVM ran it.
    pub backend: KvmBackend,
    /// The reference image, when it was used.
    pub image: Option<GuestImage>,
}

/// Where `req` names no kernel, the reference guest (built if the cache lacks it): its
/// vmlinux, and its initramfs unless the request names one. Returns the completed
/// request and the image used, if any.
pub fn with_reference_image(
    req: &GuestRequest,
) -> Result<(GuestRequest, Option<GuestImage>), ImageError> {
    let mut req = req.clone();
    if req.kernel.is_some() {
        return Ok((req, None));
    }
    let image = ensure_reference_image()?;
    eprintln!(
        "luo-vmm: reference guest: Linux {} ({})",
        image.kernel_version,
        image.dir.display()
    );
    req.kernel = Some(image.vmlinux.clone());
    req.initrd.get_or_insert_with(|| image.initramfs.clone());
    Ok((req, Some(image)))
}

/// Resolves, builds and runs the guest. `extra_cmdline` is added after the user's;
/// `observer` (if any) gets its breakpoints armed and sees every probe mark.
pub fn run_guest(
    req: &GuestRequest,
    extra_cmdline: &str,
    observer: Option<Arc<dyn RunObserver>>,
) -> Result<GuestOutcome, GuestError> {
    validate_size(req.mem_size)?;
    if req.vcpus == 0 || req.vcpus > crate::arch::mptable::MAX_VCPUS {
        return Err(GuestError::Vcpus(req.vcpus));
    }
    for (what, path) in [("kernel", &req.kernel), ("initramfs", &req.initrd)] {
        if let Some(p) = path {
            if !p.exists() {
                return Err(GuestError::Missing {
                    what,
                    path: p.clone(),
                });
            }
        }
    }
    let backend = host::detect();
    let emulated = match req.profile {
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

    let (req, image) = with_reference_image(req)?;
    let kernel = req.kernel.clone().unwrap_or_default();
    let initrd = req.initrd.clone();
    let user = [req.cmdline.trim(), extra_cmdline.trim()].join(" ");
    let cmdline = cmdline::compose(emulated, &user);

    let agent = Arc::new(Mutex::new(AgentView::default()));
    let seen = agent.clone();
    let vcpus = req.vcpus;
    let console_observer: luo_devices::console::LineObserver = Arc::new(move |line: &str| {
        if line.contains("Kernel panic - not syncing") {
            let mut a = seen.lock().unwrap_or_else(|e| e.into_inner());
            a.kernel_panic.get_or_insert_with(|| line.trim().to_owned());
            return;
        }
        let Some(idx) = line.find("luo-agent:") else {
            return;
        };
        let line = &line[idx..];
        let mut a = seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = parse_cpus(line) {
            if n < u32::from(vcpus) {
                eprintln!(
                    "luo-vmm: vCPU {n} did not start: the guest brought up {n} of {vcpus} CPUs; \
                     its start-up IPIs (INIT/SIPI) were not delivered by this KVM"
                );
            }
            a.cpus_online.push(n);
        }
        a.lines.push(line.to_owned());
    });

    let config = VmConfig {
        kernel,
        initrd,
        cmdline,
        mem_size: req.mem_size,
        vcpus: req.vcpus,
        prefer_64bit: req.prefer_64bit,
        echo_console: req.echo_console,
        console_log: req.console_log.clone(),
        console_observer: Some(console_observer),
        breakpoints: observer
            .as_ref()
            .map(|o| o.breakpoints())
            .unwrap_or_default(),
        on_breakpoint: observer
            .clone()
            .map(|o| o as Arc<dyn crate::vm::BreakpointHandler>),
    };
    log::info!("kernel command line: {}", config.cmdline);
    let vm = Vm::new(&config)?;
    let started = Instant::now();
    let marks = agent.clone();
    let exit = vm.run(req.timeout, move |ev| {
        let first_up = ev.mark == ProbeMark::UserspaceUp
            && !marks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .marks
                .iter()
                .any(|e| e.mark == ProbeMark::UserspaceUp);
        if first_up {
            eprintln!(
                "luo-vmm: guest agent up {:.2} s after VM start",
                ev.at.duration_since(started).as_secs_f64()
            );
        }
        if let Some(o) = &observer {
            o.on_probe(ev);
        }
        marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .marks
            .push(*ev);
    })?;
    let agent = agent.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(GuestOutcome {
        exit,
        agent,
        started,
        backend,
        image,
    })
}

/// The process exit status for a run, with a one-paragraph explanation on stderr.
pub fn report_exit(outcome: &GuestOutcome) -> i32 {
    let secs = outcome.started.elapsed().as_secs_f64();
    match &outcome.exit {
        VmExit::Reset if outcome.agent.kernel_panic.is_some() => {
            let line = outcome.agent.kernel_panic.as_deref().unwrap_or_default();
            eprintln!("luo-vmm: the guest kernel panicked after {secs:.1} s: {line}");
            1
        }
        VmExit::Reset => {
            if outcome
                .agent
                .marks
                .iter()
                .any(|e| e.mark == ProbeMark::AgentFailure)
            {
                eprintln!("luo-vmm: the guest agent reported a failure (see its lines above); the VM reset after {secs:.1} s");
                1
            } else {
                eprintln!("luo-vmm: guest reset after {secs:.1} s: clean exit");
                0
            }
        }
        VmExit::TripleFault { dump, .. } => {
            eprintln!("luo-vmm: guest triple fault (KVM_EXIT_SHUTDOWN) after {secs:.1} s\n{dump}");
            2
        }
        VmExit::InternalError { dump, .. } => {
            eprintln!(
                "luo-vmm: KVM could not execute a guest instruction (KVM_EXIT_INTERNAL_ERROR) after {secs:.1} s\n{dump}"
            );
            2
        }
        VmExit::Failed { vcpu, reason } => {
            eprintln!("luo-vmm: vCPU {vcpu} stopped: {reason}");
            2
        }
        VmExit::Timeout { after } => {
            let last = outcome.agent.lines.last().map_or("none", String::as_str);
            eprintln!(
                "luo-vmm: guest did not finish within {} s (timeout); last agent line: {last}",
                after.as_secs()
            );
            3
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agent_banner() {
        assert_eq!(parse_cpus("luo-agent: userspace up (cpus=2)"), Some(2));
        assert_eq!(parse_cpus("luo-agent: userspace up (cpus=x)"), None);
        assert_eq!(parse_cpus("something else"), None);
    }
}
