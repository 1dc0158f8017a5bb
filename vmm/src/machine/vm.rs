//! Building a VM on /dev/kvm and running it to its end: memory, kernel and boot
//! structures, devices, one thread per vCPU (running `vcpu::run::run_loop`), and the main
//! thread, which blocks in an `event-manager` loop (epoll) until the guest resets, a vCPU
//! dies, an observer ends the run or the deadline passes, delivering the probe's messages
//! and the terminal's input meanwhile.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use luo_devices::console::LineObserver;
use luo_devices::{
    ConsoleOutput, Gates, PioBus, ProbeEvent, ProbePort, ProbeReceiver, ResetDevice, SerialConsole,
    Sink, COM1_IRQ, COM1_PORT, I8042_LEN, I8042_PORT, LEGACY_SINK_RANGES, PROBE_PORT, PROBE_PORTS,
};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::machine::arch::cpuid::CpuidHost;
use crate::machine::arch::{write_boot, BootError, BootSpec};
use crate::machine::console_input::StdinToSerial;
use crate::machine::dirty::set_slots;
pub(crate) use crate::machine::event_loop::VmExit;
use crate::machine::event_loop::{
    stop_vcpus, EventLoopError, MainLoop, ReportSender, Sources, VcpuReport, STOP_WAIT,
};
use crate::machine::host::{Capabilities, HostError};
use crate::machine::layout::KVM_TSS_ADDRESS;
use crate::machine::loader::{load_initrd, load_kernel, LoaderError};
use crate::machine::memory::{create_guest_memory, guest_memory_map, MemoryError};
use crate::machine::vcpu::control::{StopCause, VcpuControl};
use crate::machine::vcpu::kick::{kick, kickable};
use crate::machine::vcpu::run::{run_loop, HookAction, LoopHooks, VcpuNotice, VcpuStop};
use crate::machine::vcpu::stepper::{StepCaps, Stepper};
use crate::machine::vcpu::{Vcpu, VcpuError};

/// Errors of building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: this host offers no KVM (load the kvm module, or run on a machine with virtualization)")]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error("permission denied opening /dev/kvm: add your user to the 'kvm' group or run as root")]
    KvmPermission,
    /// Another KVM failure.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or initramfs.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The console log file.
    #[error("cannot open console log {path}: {source}")]
    ConsoleLog {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A host resource (eventfd, thread, bus).
    #[error("host: {what}: {source}")]
    Host {
        /// Which.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The main thread's event loop.
    #[error("the event loop: {0}")]
    EventLoop(#[from] EventLoopError),
    /// Checking KVM's capabilities.
    #[error(transparent)]
    Capabilities(#[from] HostError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Everything a VM is built from, with no command-line types: the machine's size and
/// entry, what it boots, and who watches it (as rust-vmm's vmm-reference builds its VMM from
/// a config separate from its CLI). `run::guest` builds one from the user's options.
pub(crate) struct MachineSpec<'a> {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs, 1 to [`crate::machine::arch::mptable::MAX_VCPUS`].
    pub vcpus: u8,
    /// Enter an ELF vmlinux through the 64-bit boot protocol even if it has a PVH note.
    pub no_pvh: bool,
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: &'a Path,
    /// Initramfs.
    pub initrd: Option<&'a Path>,
    /// The full kernel command line.
    pub cmdline: &'a str,
    /// Echo the console to stdout.
    pub echo_console: bool,
    /// Also append the console to this file.
    pub console_log: Option<&'a Path>,
    /// Sees every console line.
    pub console_observer: Option<LineObserver>,
    /// Arms breakpoints, runs at them, sees every probe message.
    pub observer: Option<Arc<dyn RunObserver>>,
    /// The probe's gates.
    pub gates: Gates,
}

/// What a hook can reach while its vCPU is stopped at a breakpoint.
pub(crate) struct StoppedVcpu<'a> {
    /// The stopped vCPU (registers, guest page tables, memory).
    pub vcpu: &'a Vcpu,
    /// The VM (dirty logs).
    pub vm_fd: &'a VmFd,
    /// Every vCPU's holds.
    pub control: &'a VcpuControl,
    /// What KVM offers this VM.
    pub caps: &'a Capabilities,
}

/// Watches a whole run: the breakpoints it wants armed on every vCPU, what happens at
/// them, and the guest agent's probe messages.
pub(crate) trait RunObserver: Send + Sync {
    /// Guest-virtual addresses to break at on vCPU `vcpu` (at most four).
    fn breakpoints(&self, vcpu: u8) -> Vec<u64>;
    /// The run starts: `control` stops, holds and releases its vCPUs.
    fn attach(&self, _control: &Arc<VcpuControl>) {}
    /// A vCPU's notice (a hold that timed out, a foreign debug exit), on its thread.
    fn on_notice(&self, _notice: VcpuNotice) {}
    /// Breakpoint `slot` (an index into [`RunObserver::breakpoints`]) was hit at `pc`;
    /// runs on the vCPU's thread with the vCPU stopped.
    fn on_breakpoint(&self, at: StoppedVcpu<'_>, slot: usize, pc: u64) -> HookAction;
    /// A probe message (or decode error) arrived; runs on the main thread.
    fn on_probe(&self, ev: &ProbeEvent);
    /// The same message, on the vCPU thread that wrote it, before the guest goes on: for
    /// what must happen before the guest's next instruction (arming a hook on the call
    /// the agent just announced).
    fn on_probe_now(&self, _ev: &ProbeEvent) {}
    /// Every vCPU has stopped; the VM and its memory are still there.
    fn on_stopped(&self, _vm_fd: &VmFd, _memory: &GuestMemoryMmap) {}
}

/// A VM ready to run.
pub(crate) struct Vm {
    _kvm: Kvm,
    /// What KVM offers this VM, checked once when it was created.
    caps: Capabilities,
    /// Guest memory (the vCPUs hold it too); the observer reads it once they stopped.
    memory: Arc<GuestMemoryMmap>,
    vm_fd: Arc<VmFd>,
    vcpus: Vec<Vcpu>,
    bus: PioBus,
    reset: EventFd,
    probe: ProbeReceiver,
    /// Signalled by the probe each time it queues a message.
    probe_ready: EventFd,
    serial: Arc<Mutex<SerialConsole>>,
    observer: Option<Arc<dyn RunObserver>>,
}

/// Opens /dev/kvm, its two usual failures (missing, no permission) as their own errors.
pub(crate) fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::Kvm {
            what: "opening /dev/kvm",
            source: e,
        },
    })
}

impl Vm {
    /// Creates the VM, loads the kernel, initramfs and boot structures, creates the
    /// devices and vCPUs.
    pub fn new(spec: &MachineSpec<'_>) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Once per VM; what luo-vmm does without each missing one, said before it boots.
        let caps = Capabilities::check(&vm_fd)?;
        let kvmclock_in_guest = !spec.cmdline.split_whitespace().any(|w| w == "nopv");
        for line in caps.fallback_lines(kvmclock_in_guest) {
            eprintln!("luo-vmm: {line}");
        }
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let memory = Arc::new(create_guest_memory(spec.mem)?);
        // The Vm keeps `memory` alive (in its vCPUs) as long as `vm_fd`.
        set_slots(&vm_fd, &memory, false).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let kernel = load_kernel(&memory, spec.kernel, spec.no_pvh)?;
        let map = guest_memory_map(spec.mem);
        let initrd = spec
            .initrd
            .map(|p| load_initrd(&memory, p, &map, &kernel))
            .transpose()?;
        write_boot(
            &memory,
            &BootSpec {
                kernel: &kernel,
                initrd,
                cmdline: spec.cmdline,
                memory_map: &map,
                vcpus: spec.vcpus,
            },
        )?;

        let devices = build_devices(&vm_fd, spec)?;
        let vm_fd = Arc::new(vm_fd);
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        // KVM emulates the TSC-deadline timer and says so only through this capability.
        let cpuid_host = CpuidHost {
            tsc_deadline: caps.tsc_deadline_timer,
        };
        let mut vcpus = Vec::new();
        for id in 0..spec.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let vcpu = Vcpu::new(id, fd, memory.clone());
            vcpu.configure_common(&cpuid, spec.vcpus, cpuid_host)?;
            if id == 0 {
                vcpu.configure_boot(kernel.mode, kernel.entry)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Self {
            _kvm: kvm,
            caps,
            memory,
            vm_fd,
            vcpus,
            bus: devices.bus,
            reset: devices.reset,
            probe: devices.probe,
            probe_ready: devices.probe_ready,
            serial: devices.serial,
            observer: spec.observer.clone(),
        })
    }

    /// Runs the VM until it resets, a vCPU dies or `timeout` passes. `on_probe` sees each
    /// probe message as it arrives (after the observer, if any).
    pub fn run(
        mut self,
        timeout: Option<Duration>,
        mut on_probe: impl FnMut(&ProbeEvent),
    ) -> Result<VmExit, VmError> {
        let started = Instant::now();
        let host = |what| move |source| VmError::Host { what, source };
        install_kick_handler()?;
        let stop_event = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
        let control = Arc::new(VcpuControl::with_stop_event(self.vcpus.len(), stop_event));
        let reports_ready = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?);
        let (tx, reports) = mpsc::channel::<VcpuReport>();
        let report = ReportSender {
            tx,
            ready: reports_ready.clone(),
        };
        let deadline = match timeout {
            Some(after) => {
                let sys = |what| move |e: vmm_sys_util::errno::Error| host(what)(e.into());
                let mut timer = TimerFd::new().map_err(sys("timerfd"))?;
                // A zero duration would disarm the timer: at least a nanosecond.
                let left = after.saturating_sub(started.elapsed());
                timer
                    .reset(left.max(Duration::from_nanos(1)), None)
                    .map_err(sys("arming the deadline timerfd"))?;
                Some((timer, after))
            }
            None => None,
        };

        let mut deliver = |ev: ProbeEvent| {
            if let Some(o) = &self.observer {
                o.on_probe(&ev);
            }
            on_probe(&ev);
        };
        // Everything the main thread waits for, registered before any vCPU runs.
        let mut main = MainLoop::new(Sources {
            vcpus: self.vcpus.len(),
            probe_ready: &self.probe_ready,
            probe: &self.probe.events,
            deliver: &mut deliver,
            control: &control,
            reset: &self.reset,
            reports_ready: &reports_ready,
            reports: &reports,
            deadline,
            input: StdinToSerial::for_terminal(self.serial.clone()),
        })?;

        if let Some(o) = &self.observer {
            o.attach(&control);
        }
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let breakpoints = self
                .observer
                .as_ref()
                .map(|o| o.breakpoints(vcpu.id))
                .unwrap_or_default();
            let ctx = VcpuThread {
                bus: self.bus.clone(),
                vm_fd: self.vm_fd.clone(),
                stepper: Stepper::with_caps(
                    breakpoints,
                    StepCaps {
                        block_irq: self.caps.block_irq(),
                        inject_db: self.caps.inject_db(),
                    },
                ),
                caps: self.caps,
                observer: self.observer.clone(),
                report: report.clone(),
                control: control.clone(),
            };
            match spawn_vcpu(vcpu, ctx) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    control.request_stop(StopCause::Host);
                    stop_vcpus(threads, &reports, main.stopped(), STOP_WAIT);
                    return Err(e);
                }
            }
        }
        // Only the vCPU threads send reports now.
        drop(report);

        let waited = main.wait();
        let stopped = main.stopped();
        // The loop's borrows (of `deliver` among others) end here.
        drop(main);
        let (exit, cause) = match waited {
            Ok(end) => end,
            Err(e) => {
                control.request_stop(StopCause::Host);
                stop_vcpus(threads, &reports, stopped, STOP_WAIT);
                return Err(VmError::Host {
                    what: "the event loop (epoll)",
                    source: std::io::Error::other(e),
                });
            }
        };
        if cause == StopCause::Timeout {
            sample_rips(&control, &threads);
        }
        control.request_stop(cause);
        stop_vcpus(threads, &reports, stopped, STOP_WAIT);
        if let Some(o) = &self.observer {
            o.on_stopped(&self.vm_fd, &self.memory);
        }
        // Messages that arrived while the vCPUs stopped.
        for ev in self.probe.events.try_iter() {
            deliver(ev);
        }
        let dropped = self
            .probe
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("the probe dropped {dropped} messages (queue full)");
        }
        Ok(exit)
    }
}

/// The devices on the bus, and the VMM's ends of them.
struct Devices {
    bus: PioBus,
    reset: EventFd,
    probe: ProbeReceiver,
    probe_ready: EventFd,
    serial: Arc<Mutex<SerialConsole>>,
}

fn build_devices(vm_fd: &VmFd, spec: &MachineSpec<'_>) -> Result<Devices, VmError> {
    let host = |what| move |source| VmError::Host { what, source };
    let log = spec
        .console_log
        .map(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::ConsoleLog {
                    path: path.into(),
                    source,
                })
        })
        .transpose()?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD for the serial port"))?;
    let out = ConsoleOutput::new(spec.echo_console, log, spec.console_observer.clone());
    let serial = Arc::new(Mutex::new(SerialConsole::new(irq, out)));

    let reset = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let i8042 = ResetDevice::new(reset.try_clone().map_err(host("eventfd clone"))?);
    let probe_ready = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let (probe, probe_rx) = ProbePort::new(spec.gates.clone());
    let mut probe = probe.with_notifier(probe_ready.try_clone().map_err(host("eventfd clone"))?);
    if let Some(o) = &spec.observer {
        let o = o.clone();
        probe = probe.with_listener(Arc::new(move |ev: &ProbeEvent| o.on_probe_now(ev)));
    }

    let mut bus = PioBus::new();
    let bus_err = |e: luo_devices::BusError| VmError::Host {
        what: "I/O bus",
        source: std::io::Error::other(e.to_string()),
    };
    bus.insert(serial.clone(), COM1_PORT, 8).map_err(bus_err)?;
    bus.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, I8042_LEN)
        .map_err(bus_err)?;
    bus.insert(Arc::new(Mutex::new(probe)), PROBE_PORT, PROBE_PORTS)
        .map_err(bus_err)?;
    let sink = Arc::new(Mutex::new(Sink));
    for (base, len) in LEGACY_SINK_RANGES {
        bus.insert(sink.clone(), base, len).map_err(bus_err)?;
    }
    Ok(Devices {
        bus,
        reset,
        probe: probe_rx,
        probe_ready,
        serial,
    })
}

/// What a vCPU thread works with besides its vCPU.
struct VcpuThread {
    caps: Capabilities,
    bus: PioBus,
    vm_fd: Arc<VmFd>,
    stepper: Stepper,
    observer: Option<Arc<dyn RunObserver>>,
    report: ReportSender,
    control: Arc<VcpuControl>,
}

/// Installs (once) the handler of the signal that kicks a vCPU thread out of `KVM_RUN`
/// (`vcpu::kick`).
fn install_kick_handler() -> Result<(), VmError> {
    crate::machine::vcpu::kick::install_handler().map_err(|source| VmError::Host {
        what: "installing the vCPU kick signal handler",
        source,
    })
}

/// How many RIP samples a timed-out guest gets before its vCPUs stop, and how far apart.
const TIMEOUT_SAMPLES: usize = 5;
const TIMEOUT_SAMPLE_GAP: Duration = Duration::from_millis(200);

/// Samples every vCPU's RIP [`TIMEOUT_SAMPLES`] times (a request, then one kick out of
/// `KVM_RUN`; the vCPU records it and runs on): a vCPU that spins in one place shows
/// the same RIP each time, one that loops shows where.
fn sample_rips(control: &VcpuControl, threads: &[thread::JoinHandle<()>]) {
    for _ in 0..TIMEOUT_SAMPLES {
        control.request_sample();
        for t in threads {
            kick(t);
        }
        thread::sleep(TIMEOUT_SAMPLE_GAP);
    }
}

fn spawn_vcpu(vcpu: Vcpu, ctx: VcpuThread) -> Result<thread::JoinHandle<()>, VmError> {
    thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id))
        .spawn(move || {
            let mut vcpu = vcpu;
            let VcpuThread {
                caps,
                bus,
                vm_fd,
                mut stepper,
                observer,
                report,
                control,
            } = ctx;
            let mut on_hit = |v: &mut Vcpu, slot: usize, pc: u64| match &observer {
                Some(o) => o.on_breakpoint(
                    StoppedVcpu {
                        vcpu: v,
                        vm_fd: &vm_fd,
                        control: &control,
                        caps: &caps,
                    },
                    slot,
                    pc,
                ),
                None => HookAction::Continue,
            };
            let notice = |n: VcpuNotice| {
                if let Some(o) = &observer {
                    o.on_notice(n);
                }
                report.send(VcpuReport::Notice(n));
            };
            // Kicks sent to this thread reach this vCPU while its loop runs.
            let stop = kickable(&mut vcpu, |vcpu| {
                run_loop(
                    vcpu,
                    &bus,
                    &control,
                    &mut stepper,
                    LoopHooks {
                        on_hit: &mut on_hit,
                        notice: &notice,
                    },
                )
            });
            // A guest that ran out of time: where each vCPU was is the first thing to
            // know (a spinning CPU, one halted waiting for an IPI); map RIP with the
            // kernel's System.map.
            if stop == VcpuStop::Requested(StopCause::Timeout) {
                let samples: Vec<String> = control
                    .samples(vcpu.id)
                    .iter()
                    .map(|r| format!("{r:#x}"))
                    .collect();
                eprintln!(
                    "luo-vmm: at the timeout, {}\n  rip sampled {} times {} ms apart: {}",
                    vcpu.hang_dump(),
                    samples.len(),
                    TIMEOUT_SAMPLE_GAP.as_millis(),
                    samples.join(" ")
                );
            }
            report.send(VcpuReport::Stopped {
                vcpu: vcpu.id,
                stop,
            });
        })
        .map_err(|source| VmError::Host {
            what: "spawning a vCPU thread",
            source,
        })
}
