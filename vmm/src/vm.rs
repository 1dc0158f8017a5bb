//! Building a VM on /dev/kvm from a [`VmConfig`] and running it to its end.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::Cmdline;
use luo_devices::console::LineObserver;
use luo_devices::probe::ProbeEvent;
use luo_devices::{
    ConsoleOutput, PioBus, ProbePort, ResetDevice, SerialConsole, Sink, COM1_IRQ, COM1_PORT,
    I8042_LEN, I8042_PORT, LEGACY_SINK_RANGES, PROBE_PORT,
};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::boot_params::{build_boot_params, BootInputs, BootParamsError};
use crate::arch::mptable::{build_mptable, MpTableError};
use crate::arch::paging::identity_tables;
use crate::arch::pvh::build_pvh;
use crate::arch::regs::EntryMode;
use crate::debug::{guest_debug, slot_of, DR6_BS};
use crate::dirty::set_slots;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, KVM_TSS_ADDRESS,
    PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::loader::{load_initrd, load_kernel, LoadedKernel, LoaderError};
use crate::memory::{create_guest_memory, guest_memory_map, MemoryError};
use crate::vcpu::{handle_exit, ExitEvent, Vcpu, VcpuError};

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
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel or initramfs.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Zero page.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The command line.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing a boot structure.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    /// More memory ranges than the PVH memory map has room for.
    #[error("the PVH memory map has {0} ranges; luo-vmm has room for {max}", max = PVH_MEMMAP_MAX_ENTRIES)]
    PvhMemmap(usize),
    /// The console log file.
    #[error("cannot open console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A host resource (eventfd, thread).
    #[error("host: {what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Everything needed to start a VM.
#[derive(Clone)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Full kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Enter an ELF kernel through the 64-bit boot protocol even if it has a PVH note.
    pub prefer_64bit: bool,
    /// Echo the console to stdout.
    pub echo_console: bool,
    /// Also append the console to this file.
    pub console_log: Option<PathBuf>,
    /// Sees every console line.
    pub console_observer: Option<LineObserver>,
    /// Guest-virtual addresses of instruction breakpoints armed on every vCPU (at most 4).
    pub breakpoints: Vec<u64>,
    /// Called on the vCPU's thread, with the vCPU stopped, at each breakpoint.
    pub on_breakpoint: Option<Arc<dyn BreakpointHandler>>,
}

/// What a breakpoint handler can reach while its vCPU is stopped at the breakpoint.
pub struct StoppedVcpu<'a> {
    /// The stopped vCPU (registers, guest page tables).
    pub vcpu: &'a Vcpu,
    /// The VM (dirty logs).
    pub vm_fd: &'a VmFd,
}

/// Observes breakpoints. The guest continues when `on_breakpoint` returns, as if nothing
/// had happened.
pub trait BreakpointHandler: Send + Sync {
    /// Breakpoint `slot` (an index into `VmConfig::breakpoints`) was hit at `pc`.
    fn on_breakpoint(&self, at: StoppedVcpu<'_>, slot: usize, pc: u64);
}

/// Watches a whole run: the breakpoints it wants armed, what happens at them, and the
/// guest agent's probe marks.
pub trait RunObserver: BreakpointHandler {
    /// Guest-virtual addresses to break at (at most four).
    fn breakpoints(&self) -> Vec<u64>;
    /// A probe mark arrived.
    fn on_probe(&self, ev: &ProbeEvent);
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042: a clean end.
    Reset,
    /// The guest triple-faulted.
    TripleFault { vcpu: u8, dump: String },
    /// KVM could not emulate an instruction.
    InternalError { vcpu: u8, dump: String },
    /// The vCPU could not enter the guest, or an exit luo-vmm does not handle.
    Failed { vcpu: u8, reason: String },
    /// The deadline passed.
    Timeout { after: Duration },
}

impl VmExit {
    /// Whether the run ended the way a guest is meant to end.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset)
    }
}

/// What a vCPU thread reports.
enum VcpuReport {
    Stopped(VmExit),
    Debug { vcpu: u8, pc: u64 },
}

/// A VM ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    vcpus: Vec<Vcpu>,
    bus: PioBus,
    reset: EventFd,
    probe_rx: Receiver<ProbeEvent>,
    /// The console device, for input.
    serial: Arc<Mutex<SerialConsole>>,
    breakpoints: Vec<u64>,
    on_breakpoint: Option<Arc<dyn BreakpointHandler>>,
    /// The kernel as loaded.
    pub kernel: LoadedKernel,
}

fn open_kvm() -> Result<Kvm, VmError> {
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
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
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

        let memory = Arc::new(create_guest_memory(config.mem_size)?);
        // The Vm keeps `memory` alive as long as `vm_fd`.
        set_slots(&vm_fd, &memory, false).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let kernel = load_kernel(&memory, &config.kernel, config.prefer_64bit)?;
        let map = guest_memory_map(config.mem_size);
        let initrd = config
            .initrd
            .as_deref()
            .map(|p| load_initrd(&memory, p, &map, &kernel))
            .transpose()?;
        let cmdline_len = write_cmdline(&memory, &config.cmdline)?;
        write_boot_structures(&memory, &kernel, initrd, cmdline_len, &map, config.vcpus)?;

        let (bus, reset, probe_rx, serial) = build_devices(&vm_fd, config)?;
        let vm_fd = Arc::new(vm_fd);
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let vcpu = Vcpu::new(id, fd, memory.clone());
            vcpu.configure_common(&cpuid, config.vcpus)?;
            if id == 0 {
                vcpu.configure_boot(kernel.mode, kernel.entry)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Self {
            _kvm: kvm,
            vm_fd,
            memory,
            vcpus,
            bus,
            reset,
            probe_rx,
            serial,
            breakpoints: config.breakpoints.clone(),
            on_breakpoint: config.on_breakpoint.clone(),
            kernel,
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// Runs the VM until it resets, dies or `timeout` passes. `on_mark` sees each probe
    /// mark as it arrives.
    pub fn run(
        mut self,
        timeout: Option<Duration>,
        mut on_mark: impl FnMut(&ProbeEvent),
    ) -> Result<VmExit, VmError> {
        let started = Instant::now();
        let (tx, rx) = channel::<VcpuReport>();
        let stop = Arc::new(AtomicBool::new(false));
        install_kick_handler()?;
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let ctx = VcpuContext {
                bus: self.bus.clone(),
                vm_fd: self.vm_fd.clone(),
                breakpoints: self.breakpoints.clone(),
                on_breakpoint: self.on_breakpoint.clone(),
                tx: tx.clone(),
                stop: stop.clone(),
            };
            threads.push(spawn_vcpu(vcpu, ctx)?);
        }
        let exit = self.wait(started, timeout, &rx, &mut on_mark);
        stop.store(true, Ordering::SeqCst);
        stop_vcpus(threads);
        Ok(exit)
    }

    fn wait(
        &self,
        started: Instant,
        timeout: Option<Duration>,
        rx: &Receiver<VcpuReport>,
        on_mark: &mut impl FnMut(&ProbeEvent),
    ) -> VmExit {
        let _input = crate::console_input::spawn(self.serial.clone());

        loop {
            for ev in self.probe_rx.try_iter() {
                on_mark(&ev);
            }
            if self.reset.read().is_ok() {
                return VmExit::Reset;
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(VcpuReport::Stopped(exit)) => {
                    for ev in self.probe_rx.try_iter() {
                        on_mark(&ev);
                    }
                    return exit;
                }
                Ok(VcpuReport::Debug { vcpu, pc }) => {
                    log::warn!("vCPU {vcpu}: debug exit at {pc:#x} that is no breakpoint of ours");
                }
                Err(_) => {}
            }
            if let Some(t) = timeout {
                if started.elapsed() > t {
                    return VmExit::Timeout { after: t };
                }
            }
        }
    }
}

fn write_cmdline(memory: &GuestMemoryMmap, text: &str) -> Result<usize, VmError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| VmError::Cmdline(e.to_string()))?;
    cmdline.insert_str(text).map_err(|e| {
        VmError::Cmdline(format!(
            "{e} ({} bytes, at most {})",
            text.len(),
            CMDLINE_MAX_SIZE - 1
        ))
    })?;
    linux_loader::loader::load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| VmError::Cmdline(e.to_string()))?;
    Ok(text.len())
}

fn write<T: ByteValued>(
    memory: &GuestMemoryMmap,
    what: &'static str,
    obj: T,
    at: u64,
) -> Result<(), VmError> {
    memory
        .write_obj(obj, GuestAddress(at))
        .map_err(|source| VmError::GuestWrite { what, source })
}

fn write_boot_structures(
    memory: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    map: &[crate::memory::MemoryRange],
    vcpus: u8,
) -> Result<(), VmError> {
    let gdt = kernel.mode.gdt();
    for (i, entry) in gdt.iter().enumerate() {
        write(memory, "GDT", *entry, BOOT_GDT_START + 8 * i as u64)?;
    }
    write(memory, "IDT", 0u64, BOOT_IDT_START)?;
    memory
        .write_slice(&build_mptable(vcpus)?, GuestAddress(EBDA_START))
        .map_err(|source| VmError::GuestWrite {
            what: "MP table",
            source,
        })?;

    match kernel.mode {
        EntryMode::LongMode => {
            for (addr, table) in identity_tables() {
                for (i, e) in table.iter().enumerate() {
                    write(memory, "page tables", *e, addr + 8 * i as u64)?;
                }
            }
            let params = build_boot_params(&BootInputs {
                header: kernel.header,
                cmdline: (CMDLINE_START, cmdline_len),
                initrd,
                memory_map: map,
            })?;
            write(memory, "boot_params", params, ZERO_PAGE_START)?;
        }
        EntryMode::Pvh => {
            let pvh = build_pvh(CMDLINE_START, initrd, map);
            if pvh.memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
                return Err(VmError::PvhMemmap(pvh.memmap.len()));
            }
            write(memory, "hvm_start_info", pvh.start_info, PVH_INFO_START)?;
            for (i, m) in pvh.modules.iter().enumerate() {
                write(
                    memory,
                    "PVH module list",
                    *m,
                    PVH_MODLIST_START + 32 * i as u64,
                )?;
            }
            for (i, e) in pvh.memmap.iter().enumerate() {
                write(
                    memory,
                    "PVH memory map",
                    *e,
                    PVH_MEMMAP_START + 24 * i as u64,
                )?;
            }
        }
    }
    Ok(())
}

type Devices = (
    PioBus,
    EventFd,
    Receiver<ProbeEvent>,
    Arc<Mutex<SerialConsole>>,
);

fn build_devices(vm_fd: &VmFd, config: &VmConfig) -> Result<Devices, VmError> {
    let host = |what| move |source| VmError::Host { what, source };
    let log = config
        .console_log
        .as_ref()
        .map(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::ConsoleLog {
                    path: path.clone(),
                    source,
                })
        })
        .transpose()?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD for the serial port"))?;
    let out = ConsoleOutput::new(config.echo_console, log, config.console_observer.clone());
    let serial = Arc::new(Mutex::new(SerialConsole::new(irq, out)));

    let reset = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    let i8042 = ResetDevice::new(reset.try_clone().map_err(host("eventfd clone"))?);
    let (probe_tx, probe_rx): (Sender<ProbeEvent>, _) = channel();

    let mut bus = PioBus::new();
    let bus_err = |e: luo_devices::BusError| VmError::Host {
        what: "I/O bus",
        source: std::io::Error::other(e.to_string()),
    };
    bus.insert(serial.clone(), COM1_PORT, 8).map_err(bus_err)?;
    bus.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, I8042_LEN)
        .map_err(bus_err)?;
    bus.insert(
        Arc::new(Mutex::new(ProbePort::new(probe_tx))),
        PROBE_PORT,
        1,
    )
    .map_err(bus_err)?;
    let sink = Arc::new(Mutex::new(Sink));
    for (base, len) in LEGACY_SINK_RANGES {
        bus.insert(sink.clone(), base, len).map_err(bus_err)?;
    }
    Ok((bus, reset, probe_rx, serial))
}

/// What a vCPU thread works with besides its vCPU.
struct VcpuContext {
    bus: PioBus,
    vm_fd: Arc<VmFd>,
    breakpoints: Vec<u64>,
    on_breakpoint: Option<Arc<dyn BreakpointHandler>>,
    tx: Sender<VcpuReport>,
    stop: Arc<AtomicBool>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs (once) the handler of the signal that kicks a vCPU thread out of `KVM_RUN`:
/// it does nothing, so the ioctl returns `EINTR` and the thread sees the stop flag.
fn install_kick_handler() -> Result<(), VmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| VmError::Host {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// Stops every vCPU thread: kicks each out of `KVM_RUN` until it has returned (the stop
/// flag is already set), for at most a second; a thread still running then ends with
/// the process.
fn stop_vcpus(threads: Vec<thread::JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(1);
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            let _ = t.kill(SIGRTMIN());
            thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}

fn spawn_vcpu(vcpu: Vcpu, ctx: VcpuContext) -> Result<thread::JoinHandle<()>, VmError> {
    thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id))
        .spawn(move || {
            let mut vcpu = vcpu;
            let exit = run_vcpu(&mut vcpu, &ctx);
            let _ = ctx.tx.send(VcpuReport::Stopped(exit));
        })
        .map_err(|source| VmError::Host {
            what: "spawning a vCPU thread",
            source,
        })
}

fn set_debug(vcpu: &Vcpu, debug: &kvm_bindings::kvm_guest_debug) -> Result<(), VmExit> {
    vcpu.fd.set_guest_debug(debug).map_err(|e| VmExit::Failed {
        vcpu: vcpu.id,
        reason: format!("KVM_SET_GUEST_DEBUG: {e}"),
    })
}

fn run_vcpu(vcpu: &mut Vcpu, ctx: &VcpuContext) -> VmExit {
    match run_vcpu_loop(vcpu, ctx) {
        Ok(exit) | Err(exit) => exit,
    }
}

fn run_vcpu_loop(vcpu: &mut Vcpu, ctx: &VcpuContext) -> Result<VmExit, VmExit> {
    let id = vcpu.id;
    let bps = &ctx.breakpoints;
    if !bps.is_empty() {
        set_debug(vcpu, &guest_debug(bps, None, false))?;
    }
    // The breakpoint being stepped over, if any.
    let mut stepping: Option<usize> = None;
    while !ctx.stop.load(Ordering::Relaxed) {
        let event = match vcpu.fd.run() {
            Ok(exit) => handle_exit(exit, &ctx.bus),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return Err(VmExit::Failed {
                    vcpu: id,
                    reason: format!("KVM_RUN: {e}"),
                })
            }
        };
        let fatal = match event {
            ExitEvent::Continue => continue,
            ExitEvent::Debug { pc, dr6 } => {
                if stepping.take().is_some() {
                    // One instruction past the breakpoint: arm it again.
                    set_debug(vcpu, &guest_debug(bps, None, false))?;
                } else if let Some(slot) = slot_of(bps, pc) {
                    if let Some(h) = &ctx.on_breakpoint {
                        h.on_breakpoint(
                            StoppedVcpu {
                                vcpu: &*vcpu,
                                vm_fd: &ctx.vm_fd,
                            },
                            slot,
                            pc,
                        );
                    }
                    set_debug(vcpu, &guest_debug(bps, Some(slot), true))?;
                    stepping = Some(slot);
                } else if dr6 & DR6_BS == 0 {
                    let _ = ctx.tx.send(VcpuReport::Debug { vcpu: id, pc });
                }
                continue;
            }
            ExitEvent::TripleFault => VmExit::TripleFault {
                vcpu: id,
                dump: vcpu.dump(),
            },
            ExitEvent::InternalError => VmExit::InternalError {
                vcpu: id,
                dump: vcpu.dump(),
            },
            ExitEvent::FailEntry(reason) => VmExit::Failed {
                vcpu: id,
                reason: format!("KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"),
            },
            ExitEvent::SystemEvent(kind) => VmExit::Failed {
                vcpu: id,
                reason: format!("KVM_EXIT_SYSTEM_EVENT type {kind}"),
            },
            ExitEvent::Unexpected(what) => VmExit::Failed {
                vcpu: id,
                reason: format!("unexpected exit {what}"),
            },
        };
        return Err(fatal);
    }
    Ok(VmExit::Reset)
}
