//! Building a VM on /dev/kvm and running it to its end: memory, kernel and boot
//! structures, devices, one thread per vCPU (running `vcpu::run::run_loop`), and the main
//! thread, which blocks in an `event-manager` loop (epoll) until the guest resets, a vCPU
//! dies, an observer ends the run or the deadline passes, delivering the probe's messages
//! and the terminal's input meanwhile.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_guest_debug, kvm_pit_config, KVM_CAP_XCRS, KVM_CAP_XSAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use luo_devices::console::LineObserver;
use luo_devices::{
    ConsoleOutput, Gates, PioBus, ProbeEvent, ProbePort, ProbeReceiver, ResetDevice, SerialConsole,
    SerialState, Sink, COM1_IRQ, COM1_PORT, I8042_LEN, I8042_PORT, LEGACY_SINK_RANGES, PROBE_PORT,
    PROBE_PORTS,
};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::machine::arch::cpuid::CpuidHost;
use crate::machine::arch::{write_boot, BootError, BootSpec};
use crate::machine::console_input::StdinToSerial;
use crate::machine::dirty::{set_slots, DirtyLog};
pub(crate) use crate::machine::event_loop::VmExit;
use crate::machine::event_loop::{
    stop_vcpus, EventLoopError, MainLoop, ReportSender, Sources, VcpuReport, Wake, STOP_WAIT,
};
use crate::machine::host::{Capabilities, HostError};
use crate::machine::layout::KVM_TSS_ADDRESS;
use crate::machine::loader::{load_initrd, load_kernel, LoaderError};
use crate::machine::memory::{create_guest_memory, guest_memory_map, MemoryError};
use crate::machine::snapshot::memory::{regions_of, MemoryImage, MemoryImageError};
use crate::machine::snapshot::state::{self, StateError, VcpuState, VmState};
use crate::machine::snapshot::{DeviceState, MachineSnapshot, RestoreStats, UartState};
use crate::machine::vcpu::control::{StopCause, VcpuControl};
use crate::machine::vcpu::kick::{kick, kickable};
use crate::machine::vcpu::run::{run_loop, HookAction, LoopHooks, VcpuNotice, VcpuStop};
use crate::machine::vcpu::stepper::{StepCaps, Stepper};
use crate::machine::vcpu::{Vcpu, VcpuError};

/// Said once per process: this KVM leaves the guest's TSC where it was on a reset.
static TSC_NOT_PUT_BACK: Once = Once::new();

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
    /// Saving or restoring vCPU or VM state.
    #[error("snapshot: {0}")]
    State(#[from] StateError),
    /// Saving or restoring guest RAM.
    #[error("snapshot: {0}")]
    MemoryImage(#[from] MemoryImageError),
    /// A snapshot could not be taken or put back.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A vCPU thread of an earlier run never returned: the VM cannot run again.
    #[error("the VM cannot run again: {0}")]
    Lost(String),
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
    /// The VM's dirty log.
    pub dirty: &'a DirtyLog,
    /// Every vCPU's holds.
    pub control: &'a VcpuControl,
}

/// Watches a whole run: the breakpoints it wants armed on every vCPU, what happens at
/// them, and the guest agent's probe messages.
pub(crate) trait RunObserver: Send + Sync {
    /// Guest-virtual addresses to break at on vCPU `vcpu` (at most four).
    fn breakpoints(&self, vcpu: u8) -> Vec<u64>;
    /// The run starts: `control` stops, holds, releases and pauses its vCPUs; `started`
    /// is the run's time zero (a run from a snapshot started before the snapshot).
    fn attach(&self, _control: &Arc<VcpuControl>, _started: Instant) {}
    /// A vCPU's notice (a hold that timed out, a foreign debug exit), on its thread.
    fn on_notice(&self, _notice: VcpuNotice) {}
    /// Breakpoint `slot` (an index into [`RunObserver::breakpoints`]) was hit at `pc`;
    /// runs on the vCPU's thread with the vCPU stopped.
    fn on_breakpoint(&self, at: StoppedVcpu<'_>, slot: usize, pc: u64) -> HookAction;
    /// A probe message (or decode error) arrived; runs on the main thread.
    fn on_probe(&self, ev: &ProbeEvent);
    /// The same message, on the vCPU thread that wrote it, before the guest goes on: for
    /// what must happen before the guest's next instruction (arming a hook on the call
    /// the agent just announced, reading the dirty log as the call starts).
    fn on_probe_now(&self, _ev: &ProbeEvent, _dirty: &DirtyLog) {}
    /// Every vCPU has stopped; the VM, its memory and dirty log are still there.
    fn on_stopped(&self, _dirty: &DirtyLog) {}
    /// Whether nothing this observer did so far needed a vCPU stopped at one of its
    /// breakpoints: then a fresh observer given the probe messages so far is in the same
    /// state, and a snapshot taken now can serve later runs.
    fn quiescent(&self) -> bool {
        true
    }
    /// Where vCPU `vcpu` was when the run ran out of time (registers, LAPIC, sampled RIPs):
    /// on stderr unless the observer keeps it.
    fn on_timeout_report(&self, _vcpu: u8, report: &str) {
        eprintln!("{report}");
    }
}

/// The observer of the current run, behind a lock: the probe device's listener reads it
/// for each message, and each run of a VM that is reset to a snapshot has its own.
type ObserverSlot = Arc<Mutex<Option<Arc<dyn RunObserver>>>>;

fn current(slot: &ObserverSlot) -> Option<Arc<dyn RunObserver>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// How one run of a VM starts.
pub(crate) struct RunSpec<'a> {
    /// The run's time zero: now for a boot; for a run from a snapshot, now less the
    /// time the snapshot's run had taken, so that times go on where they were.
    pub started: Instant,
    /// The run ends [`VmExit::Timeout`] this long after `started`.
    pub timeout: Option<Duration>,
    /// Probe messages of the snapshot's run before it was taken, delivered to this run's
    /// observer (and `on_probe`) before any vCPU runs.
    pub replay: &'a [ProbeEvent],
}

/// How long the vCPUs get to park once a pause is asked for.
const PARK_WAIT: Duration = Duration::from_secs(5);

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
    probe_port: Arc<Mutex<ProbePort>>,
    gates: Gates,
    observer: ObserverSlot,
    /// The dirty log, every reader's (`machine::dirty`).
    dirty: Arc<DirtyLog>,
    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs a snapshot saves.
    msr_list: Arc<Vec<u32>>,
    /// The snapshot the VM resets to, once one is taken or loaded.
    kept: Option<Arc<MachineSnapshot>>,
    /// Why the VM cannot run again, if it cannot.
    lost: Option<String>,
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

/// XXH3-64 (hex) of what identifies this host's CPU and KVM in KVM's supported CPUID
/// table ([`crate::machine::arch::cpuid::identity`]): snapshots are used only where it is the same.
pub(crate) fn cpuid_digest() -> Result<String, VmError> {
    let kvm = open_kvm()?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(crate::machine::arch::cpuid::identity(cpuid.as_slice()))
}

impl Vm {
    /// Creates the VM, loads the kernel, initramfs and boot structures, creates the
    /// devices and vCPUs.
    pub fn new(spec: &MachineSpec<'_>) -> Result<Self, VmError> {
        let vm = Self::create(spec)?;
        let kernel = load_kernel(&vm.memory, spec.kernel, spec.no_pvh)?;
        let map = guest_memory_map(spec.mem);
        let initrd = spec
            .initrd
            .map(|p| load_initrd(&vm.memory, p, &map, &kernel))
            .transpose()?;
        write_boot(
            &vm.memory,
            &BootSpec {
                kernel: &kernel,
                initrd,
                cmdline: spec.cmdline,
                memory_map: &map,
                vcpus: spec.vcpus,
            },
        )?;
        if let Some(bsp) = vm.vcpus.first() {
            bsp.configure_boot(kernel.mode, kernel.entry)?;
        }
        Ok(vm)
    }

    /// A VM of `spec`'s size put in the state of `snap` (read from a file and checked
    /// against this VM's memory layout): every kept page written into its fresh memory,
    /// every vCPU, the VM's in-kernel state and the devices restored. `spec`'s kernel,
    /// initramfs and command line are not used: they are in the snapshot's memory. The
    /// VM keeps `snap` and resets to it.
    pub fn from_snapshot(spec: &MachineSpec<'_>, snap: MachineSnapshot) -> Result<Self, VmError> {
        let mut vm = Self::create(spec)?;
        snap.memory.check(&regions_of(&vm.memory))?;
        let pages = snap.memory.restore_all(&vm.memory)?;
        vm.put_back(&snap)?;
        vm.dirty
            .keep_snapshot()
            .map_err(kvm_err("starting the dirty log"))?;
        log::info!("restored a snapshot: {pages} pages");
        vm.kept = Some(Arc::new(snap));
        Ok(vm)
    }

    /// KVM's VM with its irqchip, PIT, memory, devices and vCPUs (CPUID, MSRs, LAPIC);
    /// nothing loaded.
    fn create(spec: &MachineSpec<'_>) -> Result<Self, VmError> {
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

        let observer: ObserverSlot = Arc::new(Mutex::new(spec.observer.clone()));
        let vm_fd = Arc::new(vm_fd);
        let dirty = Arc::new(DirtyLog::new(vm_fd.clone(), memory.clone(), caps));
        let devices = build_devices(&vm_fd, spec, &observer, &dirty)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
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
            probe_port: devices.probe_port,
            gates: spec.gates.clone(),
            observer,
            dirty,
            msr_list: Arc::new(msr_list),
            kept: None,
            lost: None,
        })
    }

    /// Who watches the next run (replacing the one the VM was built with).
    pub fn set_observer(&mut self, observer: Option<Arc<dyn RunObserver>>) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    /// Where the guest's console goes from now on (the next run's log and observer).
    pub fn set_console(&self, out: ConsoleOutput) {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_output(out);
    }

    /// The snapshot the VM resets to, if one was taken or loaded.
    pub fn kept_snapshot(&self) -> Option<&Arc<MachineSnapshot>> {
        self.kept.as_ref()
    }

    /// Whether KVM offers what a snapshot needs (XSAVE and XCRs); why not, if it does not.
    pub fn snapshot_support(&self) -> Result<(), String> {
        for (cap, name) in [
            (KVM_CAP_XSAVE, "KVM_CAP_XSAVE"),
            (KVM_CAP_XCRS, "KVM_CAP_XCRS"),
        ] {
            if self.vm_fd.check_extension_raw(libc::c_ulong::from(cap)) <= 0 {
                return Err(format!("this KVM lacks {name}, which a snapshot needs"));
            }
        }
        Ok(())
    }

    /// A VM of `mem` bytes and one vCPU that never runs, keeping a snapshot of itself as
    /// created: what the reset benchmark resets (`crate::bench`).
    pub fn idle(mem: u64) -> Result<Self, VmError> {
        let spec = MachineSpec {
            mem,
            vcpus: 1,
            no_pvh: false,
            kernel: Path::new(""),
            initrd: None,
            cmdline: "",
            echo_console: false,
            console_log: None,
            console_observer: None,
            observer: None,
            gates: Gates::default(),
        };
        let mut vm = Self::create(&spec)?;
        let states = vm
            .vcpus
            .iter()
            .map(|v| VcpuState::capture(v.id, &v.fd, &vm.msr_list).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        let snap = vm.take_snapshot(states.into_iter().map(|s| s.map(Ok)).collect())?;
        vm.dirty
            .keep_snapshot()
            .map_err(kvm_err("starting the dirty log for resets"))?;
        vm.kept = Some(Arc::new(snap));
        Ok(vm)
    }

    /// The VM's guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Puts the VM back in the state of the snapshot it keeps: the pages written since
    /// (KVM's dirty log, every reader's), every vCPU (its host debug state cleared first:
    /// the next run arms its own breakpoints; its TSC put back, [`state::rewind_tsc`]), the
    /// VM's in-kernel state, the devices. No run leaves port I/O pending in KVM (its vCPU
    /// threads complete it before they end), which the next `KVM_RUN` would otherwise
    /// apply on top of the restored state.
    /// Every vCPU must be stopped (between runs).
    pub fn reset(&mut self) -> Result<RestoreStats, VmError> {
        self.reset_with(&[])
    }

    /// [`Vm::reset`], with the pages at `also` (guest-physical, page-aligned) written
    /// back too: pages the host wrote, which KVM's dirty log does not see (the
    /// benchmark's stand-in for pages a guest wrote).
    pub fn reset_with(&mut self, also: &[u64]) -> Result<RestoreStats, VmError> {
        let t = Instant::now();
        if let Some(why) = &self.lost {
            return Err(VmError::Lost(why.clone()));
        }
        let snap = self
            .kept
            .clone()
            .ok_or_else(|| VmError::Snapshot("no snapshot was taken to reset to".into()))?;
        let mut written = self
            .dirty
            .written_since_snapshot()
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?
            .ok_or_else(|| VmError::Snapshot("the dirty log kept no record".into()))?;
        if !also.is_empty() {
            written.extend_from_slice(also);
            written.sort_unstable();
            written.dedup();
        }
        let pages = snap.memory.restore_pages(&self.memory, written)?;
        let clock_ahead_ns = self.put_back(&snap)?;
        Ok(RestoreStats {
            pages,
            nanos: u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX),
            clock_ahead_ns,
        })
    }

    /// Every vCPU, the VM's state and the devices from `snap` (memory aside). Returns how
    /// far ahead of the snapshot's the guest's clock is left (ns, the vCPU furthest off;
    /// [`state::rewind_tsc`]).
    fn put_back(&mut self, snap: &MachineSnapshot) -> Result<u64, VmError> {
        if snap.vcpus.len() != self.vcpus.len() {
            return Err(VmError::Snapshot(format!(
                "{} vCPU states for {} vCPUs",
                snap.vcpus.len(),
                self.vcpus.len()
            )));
        }
        for (vcpu, state) in self.vcpus.iter().zip(&snap.vcpus) {
            vcpu.fd
                .set_guest_debug(&kvm_guest_debug::default())
                .map_err(kvm_err("KVM_SET_GUEST_DEBUG (off, for a restore)"))?;
            state.apply(&vcpu.fd)?;
        }
        let mut clock_ahead_ns = 0;
        for (vcpu, state) in self.vcpus.iter().zip(&snap.vcpus) {
            let (Some(saved), Ok(khz)) = (state.tsc(), vcpu.fd.get_tsc_khz()) else {
                continue;
            };
            let khz = u64::from(khz.max(1));
            // Slack: a millisecond of cycles (the reset itself takes a fraction of that);
            // within it the TSC counts as put back.
            let ahead = state::rewind_tsc(vcpu.id, &vcpu.fd, saved, khz)?;
            if ahead > 0 && ahead.unsigned_abs() > khz {
                let ns = ahead.unsigned_abs().saturating_mul(1_000_000) / khz;
                clock_ahead_ns = clock_ahead_ns.max(ns);
            }
        }
        if clock_ahead_ns > 0 {
            TSC_NOT_PUT_BACK.call_once(|| {
                log::warn!(
                    "this KVM does not put a vCPU's TSC back (KVM_SET_MSRS, KVM_VCPU_TSC_OFFSET): \
                     after a reset the guest's clock runs on by the host time since the \
                     snapshot ({:.1} s now; docs/snapshots.md)",
                    clock_ahead_ns as f64 * 1e-9
                );
            });
        }
        snap.vm.apply(&self.vm_fd)?;
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&SerialState::from(&snap.devices.uart))
            .map_err(|e| VmError::Snapshot(e.to_string()))?;
        self.probe_port
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&snap.devices.probe());
        self.gates.set_closed_bits(snap.devices.gates_closed);
        // The i8042's reset line belongs to the run that raised it. Linux writes the reset
        // command up to ten times (`native_machine_emergency_restart`), and those the
        // guest wrote after the event loop read the first one are still counted: the next
        // run, from the snapshot, ended on them before its first instruction (a boot
        // trial after a panicking one, in CI).
        let _ = self.reset.read();
        Ok(clock_ahead_ns)
    }

    /// The snapshot of the VM with every vCPU parked in `parked`.
    fn take_snapshot(
        &self,
        parked: Vec<Option<Result<VcpuState, StateError>>>,
    ) -> Result<MachineSnapshot, VmError> {
        self.snapshot_support().map_err(VmError::Snapshot)?;
        let mut vcpus = Vec::with_capacity(parked.len());
        for (id, p) in parked.into_iter().enumerate() {
            match p {
                Some(state) => vcpus.push(state?),
                None => {
                    return Err(VmError::Snapshot(format!(
                        "vCPU {id} did not stop at an instruction boundary within {} s \
                         (held at a hook, or its thread ended)",
                        PARK_WAIT.as_secs()
                    )))
                }
            }
        }
        let vm = VmState::capture(&self.vm_fd)?;
        let devices = DeviceState {
            uart: UartState::from(
                &self
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .state(),
            ),
            probe_pending: self
                .probe_port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state()
                .pending,
            gates_closed: self.gates.closed_bits(),
        };
        let memory = MemoryImage::capture(&self.memory)?;
        Ok(MachineSnapshot {
            vcpus,
            vm,
            devices,
            memory,
        })
    }

    /// Runs the VM until it resets, a vCPU dies or the run's timeout passes. `on_probe`
    /// sees each probe message as it arrives (after the observer). When the observer asks
    /// for a pause ([`VcpuControl::request_pause`]), every vCPU parks at an instruction
    /// boundary, the VM's snapshot is taken and handed to `on_pause` (or why it could not
    /// be), the VM keeps it to [`Vm::reset`] to, and the run goes on. The VM can run again
    /// afterwards (from where it stopped, or after a reset).
    pub fn run(
        &mut self,
        run: RunSpec<'_>,
        mut on_probe: impl FnMut(&ProbeEvent),
        mut on_pause: impl FnMut(Result<&MachineSnapshot, &VmError>),
    ) -> Result<VmExit, VmError> {
        if let Some(why) = &self.lost {
            return Err(VmError::Lost(why.clone()));
        }
        let started = run.started;
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
        let deadline = match run.timeout {
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
        let observer = current(&self.observer);

        let mut deliver = |ev: ProbeEvent| {
            if let Some(o) = &observer {
                o.on_probe(&ev);
            }
            on_probe(&ev);
        };
        if let Some(o) = &observer {
            o.attach(&control, started);
        }
        // The snapshot's run, as far as it had gone: for this run's observers.
        for ev in run.replay {
            if let Some(o) = &observer {
                o.on_probe_now(ev, &self.dirty);
            }
            deliver(ev.clone());
        }
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

        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let breakpoints = observer
                .as_ref()
                .map(|o| o.breakpoints(vcpu.id))
                .unwrap_or_default();
            let ctx = VcpuThread {
                bus: self.bus.clone(),
                dirty: self.dirty.clone(),
                stepper: Stepper::with_caps(
                    breakpoints,
                    StepCaps {
                        block_irq: self.caps.block_irq(),
                        inject_db: self.caps.inject_db(),
                    },
                ),
                msr_list: self.msr_list.clone(),
                observer: observer.clone(),
                report: report.clone(),
                control: control.clone(),
            };
            match spawn_vcpu(vcpu, ctx) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    control.request_stop(StopCause::Host);
                    let stopped = main.stopped();
                    drop(main);
                    self.take_back(stop_vcpus(threads, &reports, stopped, STOP_WAIT));
                    // The vCPU whose thread never started went with it.
                    self.lost = Some("a vCPU thread could not be spawned".into());
                    return Err(e);
                }
            }
        }
        // Only the vCPU threads send reports now.
        drop(report);

        let mut kept = None;
        let waited = loop {
            match main.wait() {
                Ok(Wake::Pause) => {
                    for t in &threads {
                        kick(t);
                    }
                    let snap = main
                        .wait_parked(PARK_WAIT)
                        .map_err(|e| VmError::Snapshot(format!("waiting for the vCPUs: {e}")))
                        .and_then(|parked| self.take_snapshot(parked))
                        .and_then(|snap| {
                            self.dirty
                                .keep_snapshot()
                                .map_err(kvm_err("starting the dirty log for resets"))?;
                            Ok(snap)
                        });
                    on_pause(snap.as_ref());
                    if let Ok(snap) = snap {
                        kept = Some(Arc::new(snap));
                    }
                    control.resume();
                }
                Ok(Wake::End(exit, cause)) => break Ok((exit, cause)),
                Err(e) => break Err(e),
            }
        };
        let stopped = main.stopped();
        // The loop's borrows (of `deliver` among others) end here.
        drop(main);
        if kept.is_some() {
            self.kept = kept;
        }
        let (exit, cause) = match waited {
            Ok(end) => end,
            Err(e) => {
                control.request_stop(StopCause::Host);
                self.take_back(stop_vcpus(threads, &reports, stopped, STOP_WAIT));
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
        self.take_back(stop_vcpus(threads, &reports, stopped, STOP_WAIT));
        if let Some(o) = &observer {
            o.on_stopped(&self.dirty);
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

    /// Takes back the vCPUs their threads returned; a missing one makes the VM unable to
    /// run again.
    fn take_back(&mut self, back: Vec<Option<Vcpu>>) {
        for (id, v) in back.into_iter().enumerate() {
            match v {
                Some(v) => self.vcpus.push(v),
                None => {
                    self.lost
                        .get_or_insert(format!("vCPU {id}'s thread did not return"));
                }
            }
        }
    }
}

/// The devices on the bus, and the VMM's ends of them.
struct Devices {
    bus: PioBus,
    reset: EventFd,
    probe: ProbeReceiver,
    probe_ready: EventFd,
    serial: Arc<Mutex<SerialConsole>>,
    probe_port: Arc<Mutex<ProbePort>>,
}

fn build_devices(
    vm_fd: &VmFd,
    spec: &MachineSpec<'_>,
    observer: &ObserverSlot,
    dirty: &Arc<DirtyLog>,
) -> Result<Devices, VmError> {
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
    let slot = observer.clone();
    let log = dirty.clone();
    probe = probe.with_listener(Arc::new(move |ev: &ProbeEvent| {
        if let Some(o) = current(&slot) {
            o.on_probe_now(ev, &log);
        }
    }));
    let probe_port = Arc::new(Mutex::new(probe));

    let mut bus = PioBus::new();
    let bus_err = |e: luo_devices::BusError| VmError::Host {
        what: "I/O bus",
        source: std::io::Error::other(e.to_string()),
    };
    bus.insert(serial.clone(), COM1_PORT, 8).map_err(bus_err)?;
    bus.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, I8042_LEN)
        .map_err(bus_err)?;
    bus.insert(probe_port.clone(), PROBE_PORT, PROBE_PORTS)
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
        probe_port,
    })
}

/// What a vCPU thread works with besides its vCPU.
struct VcpuThread {
    bus: PioBus,
    dirty: Arc<DirtyLog>,
    msr_list: Arc<Vec<u32>>,
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
fn sample_rips(control: &VcpuControl, threads: &[thread::JoinHandle<Vcpu>]) {
    for _ in 0..TIMEOUT_SAMPLES {
        control.request_sample();
        for t in threads {
            kick(t);
        }
        thread::sleep(TIMEOUT_SAMPLE_GAP);
    }
}

/// Starts `vcpu`'s thread, which returns it when its loop ends.
fn spawn_vcpu(vcpu: Vcpu, ctx: VcpuThread) -> Result<thread::JoinHandle<Vcpu>, VmError> {
    thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id))
        .spawn(move || {
            let mut vcpu = vcpu;
            vcpu_thread(&mut vcpu, ctx);
            vcpu
        })
        .map_err(|source| VmError::Host {
            what: "spawning a vCPU thread",
            source,
        })
}

/// The body of a vCPU thread: its run loop, with the observer's hooks, parking for a
/// pause, and the timeout's report.
fn vcpu_thread(vcpu: &mut Vcpu, ctx: VcpuThread) {
    let VcpuThread {
        bus,
        dirty,
        msr_list,
        mut stepper,
        observer,
        report,
        control,
    } = ctx;
    let mut on_hit = |v: &mut Vcpu, slot: usize, pc: u64| match &observer {
        Some(o) => o.on_breakpoint(
            StoppedVcpu {
                vcpu: v,
                dirty: &dirty,
                control: &control,
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
    // A pause: the port I/O of the last exit completed, the state read and sent, then
    // wait until the VMM resumes the run.
    let mut park = |v: &mut Vcpu| {
        let state = v
            .complete_pending_io(&bus)
            .and_then(|()| VcpuState::capture(v.id, &v.fd, &msr_list));
        report.send(VcpuReport::Parked {
            vcpu: v.id,
            state: Box::new(state),
        });
        control.wait_resumed();
    };
    // Kicks sent to this thread reach this vCPU while its loop runs.
    let stop = kickable(vcpu, |vcpu| {
        run_loop(
            vcpu,
            &bus,
            &control,
            &mut stepper,
            LoopHooks {
                on_hit: &mut on_hit,
                notice: &notice,
                park: &mut park,
            },
        )
    });
    // A guest that ran out of time: where each vCPU was is the first thing to know (a
    // spinning CPU, one halted waiting for an IPI); map RIP with the kernel's System.map.
    if stop == VcpuStop::Requested(StopCause::Timeout) {
        let samples: Vec<String> = control
            .samples(vcpu.id)
            .iter()
            .map(|r| format!("{r:#x}"))
            .collect();
        let text = format!(
            "luo-vmm: at the timeout, {}\n  rip sampled {} times {} ms apart: {}",
            vcpu.hang_dump(),
            samples.len(),
            TIMEOUT_SAMPLE_GAP.as_millis(),
            samples.join(" ")
        );
        match &observer {
            Some(o) => o.on_timeout_report(vcpu.id, &text),
            None => eprintln!("{text}"),
        }
    }
    // A vCPU stopped in a port I/O exit has KVM's completion of it pending, which the
    // next `KVM_RUN` applies: after a reset to a snapshot that would land on the restored
    // state (an emulated `in` writes back the old instruction's RIP: the guest then ran
    // at this run's address in the snapshot's mode; 3 of 123 stage-2 trials of one
    // exploration here, docs/snapshots.md). Completed now, on this thread; what it
    // writes, a reset overwrites.
    if let Err(e) = vcpu.complete_pending_io(&bus) {
        log::debug!(
            "vCPU {}: completing its last I/O at the end of the run: {e}",
            vcpu.id
        );
    }
    report.send(VcpuReport::Stopped {
        vcpu: vcpu.id,
        stop,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's KVM, asked from a thread pinned to each CPU in turn (where there is
    /// /dev/kvm and more than one CPU).
    #[test]
    fn the_cpuid_digest_is_the_same_on_every_cpu() {
        if open_kvm().is_err() {
            eprintln!("no usable /dev/kvm: skipped");
            return;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let on = |cpu: usize| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
                // sched_setaffinity only touch it and this thread's affinity.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                cpuid_digest().unwrap()
            })
            .join()
            .unwrap()
        };
        let first = on(0);
        for cpu in 1..cpus.min(8) {
            assert_eq!(on(cpu), first, "CPU {cpu}");
        }
    }

    /// A VM of 64 MiB with its snapshot kept ([`Vm::idle`]); `None` (said) without a
    /// usable /dev/kvm.
    fn idle_vm() -> Option<Vm> {
        if open_kvm().is_err() {
            eprintln!("no usable /dev/kvm: skipped");
            return None;
        }
        Some(Vm::idle(64 << 20).unwrap())
    }

    /// A reset the guest asked for in a run (the i8042's reset command, written twice)
    /// is not pending after a reset to the snapshot: the next run does not end on it.
    #[test]
    fn a_reset_to_the_snapshot_forgets_the_last_run_s_reset_requests() {
        let Some(mut vm) = idle_vm() else {
            return;
        };
        for _ in 0..2 {
            assert!(vm.bus.write(I8042_PORT + 4, &[0xfe]));
        }
        vm.reset().unwrap();
        assert!(
            vm.reset.read().is_err(),
            "a reset request of the last run is still pending"
        );
    }

    /// A reset puts every vCPU's TSC back where KVM lets it, and says how far ahead the
    /// guest's clock is left where it does not (the emulator here: about the host time
    /// since the snapshot): the figure agrees with the TSC KVM reads back.
    #[test]
    fn a_reset_puts_the_tsc_back_or_says_how_far_ahead_it_is() {
        let Some(mut vm) = idle_vm() else {
            return;
        };
        let saved = vm.kept_snapshot().unwrap().vcpus[0].tsc().unwrap();
        let khz = u64::from(vm.vcpus[0].fd.get_tsc_khz().unwrap());
        std::thread::sleep(Duration::from_millis(300));
        let stats = vm.reset().unwrap();
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: 0x10,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vm.vcpus[0].fd.get_msrs(&mut msrs).unwrap(), 1);
        let ahead_ms = msrs.as_slice()[0].data.saturating_sub(saved) / khz;
        let said_ms = stats.clock_ahead_ns / 1_000_000;
        if stats.clock_ahead_ns == 0 {
            assert!(
                ahead_ms < 5,
                "TSC {ahead_ms} ms ahead, reported as put back"
            );
        } else {
            assert!(said_ms >= 250, "{said_ms} ms ahead after 300 ms");
            assert!(
                ahead_ms.abs_diff(said_ms) < 50,
                "read {ahead_ms} ms, said {said_ms} ms"
            );
        }
    }
}
