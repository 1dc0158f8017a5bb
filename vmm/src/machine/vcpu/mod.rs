//! One vCPU: its initial state, the mapping of each KVM exit to a small [`ExitEvent`]
//! through one function that tests feed with fake exits, and (in the submodules) its run
//! loop, the breakpoint step-over state machine, and how the VMM stops and holds it.

pub(crate) mod control;
mod debug_state;
pub(crate) mod irq;
pub(crate) mod kick;
pub(crate) mod run;
pub(crate) mod stepper;

use std::fmt::Write as _;
use std::sync::Arc;

use kvm_bindings::{kvm_cpuid_entry2, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use luo_devices::PioBus;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::arch::cpuid::{normalize, CpuidError, CpuidHost};
use crate::machine::arch::paging::translate;
use crate::machine::arch::regs::{
    apply_entry_sregs, boot_msrs, entry_regs, first_refused, initial_fpu, msr_name, EntryMode,
};
use crate::machine::snapshot::state::StateError;
use run::VcpuBackend;
use stepper::{Arming, IfMask, StepEnd};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        /// The vCPU.
        id: u8,
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// KVM's supported CPUID table could not be made this vCPU's.
    #[error("vCPU {id}: CPUID: {source}")]
    Cpuid {
        /// The vCPU.
        id: u8,
        /// Why.
        source: CpuidError,
    },
    /// A table or list too long for KVM's ioctl structure.
    #[error("vCPU {id}: {what}: {len} entries, more than KVM takes")]
    TooLong {
        /// The vCPU.
        id: u8,
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// `KVM_SET_MSRS` set fewer MSRs than given: it stopped at `index`.
    #[error(
        "vCPU {id}: KVM refused to set {name} (MSR {index:#x}); it set {accepted} of {given} boot MSRs"
    )]
    MsrRefused {
        /// The vCPU.
        id: u8,
        /// The first MSR KVM did not set.
        index: u32,
        /// Its name.
        name: &'static str,
        /// How many KVM set.
        accepted: usize,
        /// How many were given.
        given: usize,
    },
}

/// What a KVM exit means for the run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExitEvent {
    /// Handled; run again.
    Continue,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// KVM could not handle an instruction (`KVM_EXIT_INTERNAL_ERROR`, emulation failure).
    InternalError,
    /// The vCPU could not enter the guest.
    FailEntry(u64),
    /// `KVM_EXIT_SYSTEM_EVENT` (reset or shutdown requested through PSCI-like paths).
    SystemEvent(u32),
    /// A hardware breakpoint or single step (`KVM_EXIT_DEBUG`).
    Debug {
        /// Guest RIP.
        pc: u64,
        /// DR6: which breakpoint, or a single step.
        dr6: u64,
    },
    /// An exit luo-vmm does not expect.
    Unexpected(String),
}

/// Maps one exit to an event, routing port I/O through `bus`. MMIO has no devices here:
/// reads return all ones, writes are dropped.
pub(crate) fn handle_exit(exit: VcpuExit<'_>, bus: &PioBus) -> ExitEvent {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if !bus.write(port, data) {
                log::debug!("unclaimed port write {port:#x} <- {data:x?}");
            }
            ExitEvent::Continue
        }
        VcpuExit::IoIn(port, data) => {
            if !bus.read(port, data) {
                log::debug!("unclaimed port read {port:#x}");
            }
            ExitEvent::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            log::debug!("unclaimed MMIO read {addr:#x}");
            data.fill(0xff);
            ExitEvent::Continue
        }
        VcpuExit::MmioWrite(addr, _) => {
            log::debug!("unclaimed MMIO write {addr:#x}");
            ExitEvent::Continue
        }
        // With the in-kernel irqchip HLT stays in KVM; an exit here is harmless.
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => ExitEvent::Continue,
        VcpuExit::Shutdown => ExitEvent::TripleFault,
        VcpuExit::InternalError => ExitEvent::InternalError,
        VcpuExit::FailEntry(reason, _) => ExitEvent::FailEntry(reason),
        VcpuExit::SystemEvent(kind, _) => ExitEvent::SystemEvent(kind),
        VcpuExit::Debug(arch) => ExitEvent::Debug {
            pc: arch.pc,
            dr6: arch.dr6,
        },
        other => ExitEvent::Unexpected(format!("{other:?}")),
    }
}

/// A vCPU with the guest memory it works on.
pub(crate) struct Vcpu {
    /// Index, which is also its APIC ID.
    pub id: u8,
    /// The KVM file descriptor.
    pub fd: VcpuFd,
    memory: Arc<GuestMemoryMmap>,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(id: u8, fd: VcpuFd, memory: Arc<GuestMemoryMmap>) -> Self {
        Self { id, fd, memory }
    }

    /// The guest memory this vCPU runs on.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn kvm<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Kvm {
            id: self.id,
            what,
            source,
        })
    }

    /// CPUID, MSRs, FPU and local APIC, common to every vCPU. `cpuid` is KVM's supported
    /// table, made this vCPU's of `count` by [`normalize`] (with what `host` says KVM
    /// offers); the MSRs are [`boot_msrs`], each of which KVM must accept.
    pub fn configure_common(
        &self,
        cpuid: &CpuId,
        count: u8,
        host: CpuidHost,
    ) -> Result<(), VcpuError> {
        let entries: Vec<kvm_cpuid_entry2> = normalize(cpuid.as_slice(), self.id, count, host)
            .map_err(|source| VcpuError::Cpuid {
                id: self.id,
                source,
            })?;
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::TooLong {
            id: self.id,
            what: "CPUID table",
            len: entries.len(),
        })?;
        self.kvm("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        self.set_boot_msrs()?;
        self.kvm("KVM_SET_FPU", self.fd.set_fpu(&initial_fpu()))?;

        // LINT0 = ExtINT, LINT1 = NMI, as the MP table says.
        let mut lapic = self.kvm("KVM_GET_LAPIC", self.fd.get_lapic())?;
        set_lapic_reg(&mut lapic.regs, 0x350, 7 << 8);
        set_lapic_reg(&mut lapic.regs, 0x360, 4 << 8);
        self.kvm("KVM_SET_LAPIC", self.fd.set_lapic(&lapic))
    }

    /// Sets [`boot_msrs`]; `KVM_SET_MSRS` returns how many it set, and anything short of
    /// all of them is an error naming the first it refused.
    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        let given = boot_msrs();
        let msrs = Msrs::from_entries(&given).map_err(|_| VcpuError::TooLong {
            id: self.id,
            what: "boot MSR list",
            len: given.len(),
        })?;
        let accepted = self.kvm("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        match first_refused(&given, accepted) {
            None => Ok(()),
            Some(index) => Err(VcpuError::MsrRefused {
                id: self.id,
                index,
                name: msr_name(index),
                accepted,
                given: given.len(),
            }),
        }
    }

    /// Completes the port I/O of the last exit (KVM finishes an `in`/`out` — the value
    /// read into RAX, RIP past the instruction — only on the next `KVM_RUN`): one
    /// `KVM_RUN` with `immediate_exit` set, which completes it and returns `EINTR` before
    /// entering the guest (Documentation/virt/kvm/api.rst, "immediate_exit"; Firecracker
    /// does the same before saving a vCPU). Needed before the vCPU's state is read for a
    /// snapshot. An exit KVM still reports is handled on `bus` (port I/O) or an error.
    pub fn complete_pending_io(&mut self, bus: &PioBus) -> Result<(), StateError> {
        let err = |id: u8, what, source| StateError::Kvm {
            whose: format!("vCPU {id}"),
            what,
            source,
        };
        for _ in 0..4 {
            self.fd.set_kvm_immediate_exit(1);
            let event = match self.fd.run() {
                Ok(exit) => Some(handle_exit(exit, bus)),
                Err(e) if e.errno() == libc::EINTR => None,
                Err(e) => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Err(err(self.id, "KVM_RUN (completing I/O for a pause)", e));
                }
            };
            self.fd.set_kvm_immediate_exit(0);
            match event {
                None => return Ok(()),
                Some(ExitEvent::Continue) => {}
                Some(other) => {
                    log::warn!(
                        "vCPU {}: {other:?} while completing I/O for a pause",
                        self.id
                    );
                    return Err(err(
                        self.id,
                        "KVM_RUN (completing I/O for a pause): an exit other than I/O",
                        kvm_ioctls::Error::new(libc::EIO),
                    ));
                }
            }
        }
        Err(err(
            self.id,
            "KVM_RUN (completing I/O for a pause): still exiting after 4 tries",
            kvm_ioctls::Error::new(libc::EIO),
        ))
    }

    /// Registers of the bootstrap processor at the kernel's entry point.
    pub fn configure_boot(&self, mode: EntryMode, entry: u64) -> Result<(), VcpuError> {
        let mut sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        apply_entry_sregs(mode, &mut sregs);
        self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
        self.kvm("KVM_SET_REGS", self.fd.set_regs(&entry_regs(mode, entry)))
    }

    /// A register dump plus the guest bytes at RIP: how an emulation failure is read.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return format!("vCPU {}: registers unavailable", self.id);
        };
        let _ = write!(out, "{}", format_regs(self.id, &r, &s));
        let bytes = self.bytes_at(&s, r.rip, 16);
        let _ = write!(
            out,
            "\n  bytes at rip: {}",
            bytes.map_or_else(
                || "<not mapped>".into(),
                |b| b
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        );
        out
    }

    /// For a guest that stopped making progress: [`Vcpu::dump`], then the MP state and
    /// pending events, the local APIC (in service, requested, timer), and the
    /// kernel-text words on the top of the stack (return addresses to map with the
    /// kernel's System.map).
    pub fn hang_dump(&self) -> String {
        let mut out = self.dump();
        let mp = self.fd.get_mp_state().ok();
        let ev = self.fd.get_vcpu_events().ok();
        let _ = write!(out, "\n  {}", irq::format_events(mp.as_ref(), ev.as_ref()));
        match self.fd.get_lapic() {
            Ok(l) => {
                let _ = write!(out, "\n  {}", irq::format_lapic(&l));
            }
            Err(e) => {
                let _ = write!(out, "\n  lapic unavailable: {e}");
            }
        }
        if let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            let words = self
                .bytes_at(&s, r.rsp, STACK_SCAN_BYTES)
                .map(|b| kernel_text_words(&b));
            let _ = write!(
                out,
                "\n  kernel text on the stack: {}",
                words.map_or_else(
                    || "<stack not mapped>".into(),
                    |w| w
                        .iter()
                        .map(|x| format!("{x:#x}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            );
        }
        out
    }

    /// Reads `len` guest bytes at a virtual address, through the guest's page tables
    /// when paging is on.
    pub fn bytes_at(&self, sregs: &kvm_sregs, va: u64, len: usize) -> Option<Vec<u8>> {
        let gpa = if sregs.cr0 & 0x8000_0000 != 0 {
            translate(sregs, va, |pa| {
                self.memory.read_obj::<u64>(GuestAddress(pa)).ok()
            })?
        } else {
            va.wrapping_add(sregs.cs.base)
        };
        let mut buf = vec![0u8; len];
        self.memory.read_slice(&mut buf, GuestAddress(gpa)).ok()?;
        Some(buf)
    }
}

impl VcpuBackend for Vcpu {
    fn id(&self) -> u8 {
        self.id
    }

    /// One `KVM_RUN`. On `EINTR` (a kick, [`kick`]) it clears `immediate_exit` before
    /// the loop looks at what the kicker asked for, so a later kick is never lost.
    fn run(&mut self, bus: &PioBus) -> Result<ExitEvent, kvm_ioctls::Error> {
        match self.fd.run() {
            Ok(exit) => Ok(handle_exit(exit, bus)),
            Err(e) => {
                if e.errno() == libc::EINTR {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e)
            }
        }
    }

    fn set_debug(&self, addrs: &[u64], arming: Arming) -> Result<(), kvm_ioctls::Error> {
        debug_state::set_guest_debug(&self.fd, addrs, arming, false)
    }

    fn mask_if(&self, pc: u64) -> IfMask {
        self.mask_if_for_step(pc)
    }

    fn unmask_if(&self, bp: u64) -> Result<StepEnd, kvm_ioctls::Error> {
        self.unmask_if_after_step(bp)
    }

    fn reinject_debug(
        &self,
        addrs: &[u64],
        arming: Arming,
        dr6: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        self.reinject_debug_exception(addrs, arming, dr6)
    }

    fn dump(&self) -> String {
        Vcpu::dump(self)
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    fn kvmclock_ctrl(&self) -> Result<(), kvm_ioctls::Error> {
        self.fd.kvmclock_ctrl()
    }
}

/// How much of the stack [`Vcpu::hang_dump`] scans for return addresses (stays within
/// the page when RSP is 512-byte aligned or better; a read across an unmapped page
/// boundary shows as unmapped).
const STACK_SCAN_BYTES: usize = 512;

/// The little-endian u64 words of `b` that point into the x86-64 kernel text mapping
/// (`0xffffffff80000000..`), in stack order: candidate return addresses.
pub(crate) fn kernel_text_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .filter_map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let v = u64::from_le_bytes(w);
            (0xffff_ffff_8000_0000..0xffff_ffff_c000_0000)
                .contains(&v)
                .then_some(v)
        })
        .collect()
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = std::os::raw::c_char::from_ne_bytes([*b]);
    }
}

/// Formats the registers that matter when a guest dies.
pub(crate) fn format_regs(id: u8, r: &kvm_regs, s: &kvm_sregs) -> String {
    format!(
        "vCPU {id}: rip={:#018x} rsp={:#018x} rflags={:#x}\n  \
         rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}\n  \
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (l={} db={})",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.cs.selector,
        s.cs.l,
        s.cs.db
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn kvm_takes_the_normalized_cpuid_and_every_boot_msr() {
        // Needs /dev/kvm, runs no guest. On an emulating KVM (kvm_pvm) KVM_SET_CPUID2 is
        // accepted and ignored; a hardware KVM checks the table here.
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no usable /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let host = CpuidHost {
            tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        };
        let memory = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        for id in 0..2 {
            let vcpu = Vcpu::new(id, vm.create_vcpu(u64::from(id)).unwrap(), memory.clone());
            vcpu.configure_common(&supported, 2, host).unwrap();
            let mut back = Msrs::from_entries(&boot_msrs()).unwrap();
            assert_eq!(vcpu.fd.get_msrs(&mut back).unwrap(), boot_msrs().len());
            let mtrr = back
                .as_slice()
                .iter()
                .find(|e| e.index == crate::machine::arch::regs::MSR_IA32_MTRR_DEF_TYPE);
            assert_eq!(mtrr.map(|e| e.data), Some(0x806));
        }
    }

    #[test]
    fn io_exits_reach_the_bus() {
        struct Rec(Vec<u8>);
        impl luo_devices::PioDevice for Rec {
            fn read(&mut self, _o: u16, d: &mut [u8]) {
                d.fill(0x42);
            }
            fn write(&mut self, _o: u16, d: &[u8]) {
                self.0.extend_from_slice(d);
            }
        }
        let dev = Arc::new(Mutex::new(Rec(vec![])));
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x600, 1).unwrap();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x600, &[7]), &bus),
            ExitEvent::Continue
        );
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x600, &mut data), &bus),
            ExitEvent::Continue
        );
        assert_eq!(data, [0x42]);
        assert_eq!(dev.lock().unwrap().0, vec![7]);
    }

    #[test]
    fn stack_words_in_kernel_text_are_picked() {
        let mut b = Vec::new();
        for w in [
            0xffff_ffff_8123_4567u64,
            0xffff_8880_0000_1000,
            0x42,
            0xffff_ffff_c000_0000,
            0xffff_ffff_8100_0000,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&[0xff; 4]);
        assert_eq!(
            kernel_text_words(&b),
            vec![0xffff_ffff_8123_4567, 0xffff_ffff_8100_0000]
        );
    }

    #[test]
    fn fatal_exits_are_classified() {
        let bus = PioBus::new();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &bus),
            ExitEvent::TripleFault
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &bus),
            ExitEvent::InternalError
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x80000021, 0), &bus),
            ExitEvent::FailEntry(0x80000021)
        );
        assert_eq!(handle_exit(VcpuExit::Hlt, &bus), ExitEvent::Continue);
        let mut d = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xfed0_0000, &mut d), &bus),
            ExitEvent::Continue
        );
        assert_eq!(d, [0xff; 4]);
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &bus),
            ExitEvent::Unexpected(_)
        ));
    }
}
