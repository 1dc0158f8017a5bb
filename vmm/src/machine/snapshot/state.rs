//! The architectural state of a stopped VM, as KVM gives it: per vCPU and per VM, read
//! and written with the ioctls Firecracker's `vstate` uses (src/vmm/src/arch/x86_64/vcpu.rs,
//! `save_state`/`restore_state`; src/vmm/src/vstate/vm.rs), in the order KVM needs.
//!
//! Order of a restore (each step depends on the ones before): MP state, registers, special
//! registers, XSAVE, XCRs, debug registers, local APIC, MSRs
//! (the TSC among them), vCPU events (pending exceptions, NMIs, interrupt shadow) last. Per
//! VM: the PIT, the KVM clock, the PIC pair and the IOAPIC.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_device_attr, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVMIO, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
    KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A KVM ioctl that failed while saving or restoring state.
#[derive(Debug, Error)]
pub enum StateError {
    /// The ioctl, on which vCPU (or the VM), and KVM's error.
    #[error("{whose}: {what}: {source}")]
    Kvm {
        /// `vCPU N` or `the VM`.
        whose: String,
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted a register but reads back another value: the guest would go on from a
    /// state that is not the snapshot's.
    #[error("vCPU {vcpu}: {register} reads back {got:#x} after a restore of {wanted:#x}: this KVM did not take the saved state back")]
    NotTaken {
        /// The vCPU.
        vcpu: u8,
        /// Which register.
        register: &'static str,
        /// The saved value.
        wanted: u64,
        /// What KVM reads back.
        got: u64,
    },
    /// KVM took fewer MSRs than were saved, and skipping the one it refused did not help.
    #[error("vCPU {vcpu}: KVM_SET_MSRS: KVM refused MSR {index:#x} of the saved ones")]
    MsrRefused {
        /// The vCPU.
        vcpu: u8,
        /// The MSR.
        index: u32,
    },
}

fn kvm_err(whose: String, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm {
        whose,
        what,
        source,
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// Its index (and APIC ID).
    pub id: u8,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_XSAVE`: the FPU, SSE and AVX state (the 4 KiB area; every feature but
    /// AMX tiles, which luo-vmm's guests are not given).
    pub xsave: Box<kvm_xsave>,
    /// `KVM_GET_XCRS`.
    pub xcrs: kvm_xcrs,
    /// `KVM_GET_DEBUGREGS`: the guest's own DR0-3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// `KVM_GET_LAPIC`.
    pub lapic: kvm_lapic_state,
    /// `(index, value)` of every MSR of KVM's list that it read, the TSC among them.
    pub msrs: Vec<(u32, u64)>,
    /// `KVM_GET_VCPU_EVENTS`.
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads vCPU `id`'s state from `fd` (stopped, its pending I/O completed); `msr_list`
    /// is KVM's `KVM_GET_MSR_INDEX_LIST`. MSRs KVM lists but will not read are left out
    /// (KVM reads a prefix and stops). Needs `KVM_CAP_XSAVE` and `KVM_CAP_XCRS`.
    pub fn capture(id: u8, fd: &VcpuFd, msr_list: &[u32]) -> Result<Self, StateError> {
        let who = || format!("vCPU {id}");
        let xsave = Box::new(fd.get_xsave().map_err(kvm_err(who(), "KVM_GET_XSAVE"))?);
        let xcrs = fd.get_xcrs().map_err(kvm_err(who(), "KVM_GET_XCRS"))?;
        Ok(VcpuState {
            id,
            mp_state: fd
                .get_mp_state()
                .map_err(kvm_err(who(), "KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm_err(who(), "KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm_err(who(), "KVM_GET_SREGS"))?,
            xsave,
            xcrs,
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm_err(who(), "KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm_err(who(), "KVM_GET_LAPIC"))?,
            msrs: read_msrs(id, fd, msr_list)?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm_err(who(), "KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Writes this state into `fd` (a stopped vCPU of a VM with the same CPUID), in the
    /// order in the module's documentation.
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let who = || format!("vCPU {}", self.id);
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err(who(), "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm_err(who(), "KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err(who(), "KVM_SET_SREGS"))?;
        // SAFETY: `xsave` is a whole `kvm_xsave` (read by KVM_GET_XSAVE from a vCPU of the
        // same CPUID, or parsed into one); KVM reads exactly its 4 KiB region.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_err(who(), "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs)
            .map_err(kvm_err(who(), "KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err(who(), "KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm_err(who(), "KVM_SET_LAPIC"))?;
        write_msrs(self.id, fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_err(who(), "KVM_SET_VCPU_EVENTS"))?;
        self.verify(fd)
    }

    /// Reads back what the guest resumes with (where it is, its stack, its page tables,
    /// its thread-local bases and the kernel's per-CPU base) and says which one KVM did not
    /// take: a KVM that accepts a value and keeps another would let the guest run on in a
    /// mix of two states.
    fn verify(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let who = || format!("vCPU {}", self.id);
        let regs = fd.get_regs().map_err(kvm_err(who(), "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err(who(), "KVM_GET_SREGS"))?;
        let pairs = [
            ("rip", self.regs.rip, regs.rip),
            ("rsp", self.regs.rsp, regs.rsp),
            ("cr3", self.sregs.cr3, sregs.cr3),
            ("fs.base", self.sregs.fs.base, sregs.fs.base),
            ("gs.base", self.sregs.gs.base, sregs.gs.base),
        ];
        for (register, wanted, got) in pairs {
            if wanted != got {
                return Err(StateError::NotTaken {
                    vcpu: self.id,
                    register,
                    wanted,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// Reads every MSR of `list` that KVM will read: `KVM_GET_MSRS` reads a prefix and stops
/// at the first it cannot; that one is skipped and the rest read again.
fn read_msrs(id: u8, fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Kvm {
            whose: format!("vCPU {id}"),
            what: "KVM_GET_MSRS (list too long)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(format!("vCPU {id}"), "KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // The one at `read` was refused (if the chunk was not read whole): skip it.
        let used = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[used..];
    }
    Ok(out)
}

/// Writes `saved` back; KVM sets a prefix and stops at the first it refuses: that one is
/// an error (it read it, so it must take it back).
fn write_msrs(id: u8, fd: &VcpuFd, saved: &[(u32, u64)]) -> Result<(), StateError> {
    for chunk in saved.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Kvm {
            whose: format!("vCPU {id}"),
            what: "KVM_SET_MSRS (list too long)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = fd
            .set_msrs(&msrs)
            .map_err(kvm_err(format!("vCPU {id}"), "KVM_SET_MSRS"))?;
        if let Some(&(index, _)) = chunk.get(set) {
            return Err(StateError::MsrRefused { vcpu: id, index });
        }
    }
    Ok(())
}

/// `IA32_TIME_STAMP_COUNTER`: the guest's TSC.
const MSR_IA32_TSC: u32 = 0x10;

// `KVM_GET_DEVICE_ATTR`/`KVM_SET_DEVICE_ATTR` on a vCPU fd (Documentation/virt/kvm/api.rst,
// 4.81): kvm-ioctls offers them for vCPUs on aarch64 only.
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);

impl VcpuState {
    /// The guest TSC this state saved (`IA32_TSC` among its MSRs), if KVM read it.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|&&(index, _)| index == MSR_IA32_TSC)
            .map(|&(_, value)| value)
    }
}

/// vCPU `id`'s guest TSC now (`KVM_GET_MSRS` of `IA32_TSC`).
fn read_tsc(id: u8, fd: &VcpuFd) -> Result<u64, StateError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| StateError::Kvm {
        whose: format!("vCPU {id}"),
        what: "KVM_GET_MSRS (IA32_TSC)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(StateError::MsrRefused {
            vcpu: id,
            index: MSR_IA32_TSC,
        }),
        Err(e) => Err(kvm_err(format!("vCPU {id}"), "KVM_GET_MSRS (IA32_TSC)")(e)),
    }
}

/// The vCPU's TSC offset attribute (`KVM_VCPU_TSC_CTRL`/`KVM_VCPU_TSC_OFFSET`,
/// Documentation/virt/kvm/devices/vcpu.rst, Linux 5.16+): read, or written when `set`.
/// `None` where KVM does not offer it.
fn tsc_offset(fd: &VcpuFd, set: Option<u64>) -> Option<u64> {
    let mut value = set.unwrap_or(0);
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: std::ptr::addr_of_mut!(value) as u64,
    };
    let request = if set.is_some() {
        KVM_SET_DEVICE_ATTR()
    } else {
        KVM_GET_DEVICE_ATTR()
    };
    // SAFETY: `fd` is a vCPU fd; `attr` is a whole `kvm_device_attr` whose `addr` points
    // at `value`, a u64 that outlives the call, which KVM reads (set) or writes (get):
    // the attribute is one u64.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, request, &attr) };
    (r == 0).then_some(value)
}

/// Puts vCPU `id`'s guest TSC back at `saved`, after [`VcpuState::apply`] asked for it with
/// `KVM_SET_MSRS`, and returns how far ahead of `saved` it is then, in TSC cycles
/// (negative: behind).
///
/// The MSR write is not enough everywhere. KVM takes a host write that lands within a
/// second of the cycles the one before it predicts as meant to be "in sync" with it and
/// keeps the earlier offset instead (`kvm_synchronize_tsc`, arch/x86/kvm/x86.c): resets a
/// fraction of a second apart would each leave the guest's TSC ahead by the runs before.
/// And the `kvm_pvm` emulator ignores the write (docs/snapshots.md). So where the TSC is
/// more than `slack` cycles off, the vCPU's TSC offset is moved by the difference, where
/// KVM offers it; what is left after that is returned, not refused: the guest goes on,
/// its clock that much ahead.
pub fn rewind_tsc(id: u8, fd: &VcpuFd, saved: u64, slack: u64) -> Result<i64, StateError> {
    // The difference in two's complement: TSCs are far below 2^63 cycles (a century at
    // 3 GHz), so as an i64 it is the signed distance.
    let off = read_tsc(id, fd)?.wrapping_sub(saved);
    if (off as i64).unsigned_abs() <= slack {
        return Ok(off as i64);
    }
    match tsc_offset(fd, None) {
        Some(offset) if tsc_offset(fd, Some(offset.wrapping_sub(off))).is_some() => {
            Ok(read_tsc(id, fd)?.wrapping_sub(saved) as i64)
        }
        _ => Ok(off as i64),
    }
}

/// The VM's own state: the in-kernel PIC pair and IOAPIC, the PIT, the KVM clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_IRQCHIP` of the PIC master, the PIC slave and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// `KVM_GET_PIT2`.
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`: kvmclock's nanoseconds when the VM stopped.
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Reads the VM's state (every vCPU stopped).
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        let who = || "the VM".to_owned();
        let irqchips = IRQCHIPS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map(|()| chip)
                    .map_err(kvm_err(who(), "KVM_GET_IRQCHIP"))
            })
            .collect::<Result<_, _>>()?;
        Ok(VmState {
            irqchips,
            pit: vm.get_pit2().map_err(kvm_err(who(), "KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err(who(), "KVM_GET_CLOCK"))?,
        })
    }

    /// Writes it back. The clock is set to the saved nanoseconds with no flag (not
    /// `KVM_CLOCK_REALTIME`): the guest's kvmclock goes on from the instant it stopped,
    /// however long ago that was on the host.
    pub fn apply(&self, vm: &VmFd) -> Result<(), StateError> {
        let who = || "the VM".to_owned();
        vm.set_pit2(&self.pit)
            .map_err(kvm_err(who(), "KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(kvm_err(who(), "KVM_SET_CLOCK"))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(kvm_err(who(), "KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
