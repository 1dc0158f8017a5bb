//! What the host offers: the kind of KVM (hardware virtualization, or an instruction
//! emulator such as `kvm_pvm` in native mode on machines without VMX/SVM, which needs
//! the emulation-safe guest profile), the KVM capabilities luo-vmm looks at
//! ([`Capabilities`], checked once per VM, each with what luo-vmm does without it), the
//! CPU features that change the guest ([`CpuFeatures`]) and the host kernel's release.
//! Every decision is a pure function of facts the host exposes; the functions that read
//! those facts are small and separate.

use std::fs;
use std::os::raw::c_ulong;

use kvm_bindings::{
    KVM_CAP_KVMCLOCK_CTRL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_SET_GUEST_DEBUG,
    KVM_CAP_SET_GUEST_DEBUG2, KVM_CAP_TSC_DEADLINE_TIMER, KVM_CAP_X2APIC_API, KVM_CAP_XSAVE2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_GUESTDBG_BLOCKIRQ,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_DB, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::machine::debug::GUESTDBG_BEFORE_5_15;

/// The KVM behind /dev/kvm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmBackend {
    /// VMX or SVM hardware virtualization.
    Hardware { module: String },
    /// Guest instructions are emulated; `why` says what gave it away.
    Emulated { why: String },
}

impl KvmBackend {
    /// Whether the emulation-safe guest profile is needed.
    pub fn is_emulated(&self) -> bool {
        matches!(self, KvmBackend::Emulated { .. })
    }
}

/// Classifies the host from the names of loaded modules (as in /sys/module) and the
/// `flags` line of /proc/cpuinfo.
pub fn classify(modules: &[String], cpu_flags: &str) -> KvmBackend {
    let has = |m: &str| modules.iter().any(|x| x == m);
    if has("kvm_pvm") {
        return KvmBackend::Emulated {
            why: "the kvm_pvm module drives /dev/kvm (it emulates non-PVM guests)".into(),
        };
    }
    let flags: Vec<&str> = cpu_flags.split_whitespace().collect();
    for (flag, module) in [("vmx", "kvm_intel"), ("svm", "kvm_amd")] {
        if flags.contains(&flag) {
            return KvmBackend::Hardware {
                module: module.into(),
            };
        }
    }
    KvmBackend::Emulated {
        why: "the CPU has neither vmx nor svm".into(),
    }
}

/// Classifies this host.
pub fn detect() -> KvmBackend {
    let modules: Vec<String> = fs::read_dir("/sys/module")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags")
                .and_then(|r| r.split_once(':'))
                .map(|(_, f)| f.to_owned())
        })
        .unwrap_or_default();
    classify(&modules, &flags)
}

/// The TSC frequency KVM gives a vCPU (`KVM_GET_TSC_KHZ` on a throw-away VM), or `None`
/// when /dev/kvm cannot say. The emulation profile hands it to the guest
/// (`tsc_early_khz=`), which then needs neither kvmclock nor a PIT calibration.
pub fn tsc_khz() -> Option<u32> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().filter(|&khz| khz > 0)
}

/// Errors of this module.
#[derive(Debug, Error)]
pub enum HostError {
    /// `LUO_VMM_HIDE_CAPS` names something that is not a capability luo-vmm checks.
    #[error(
        "LUO_VMM_HIDE_CAPS: {0:?} is none of {names}",
        names = HIDEABLE.join(", ")
    )]
    UnknownCapability(String),
    /// `KVM_CREATE_VM` failed: no guest can run.
    #[error("KVM_CREATE_VM: {0}: no guest can run here")]
    CreateVm(kvm_ioctls::Error),
}

/// What `KVM_CHECK_EXTENSION` answered on a VM for each capability luo-vmm looks at
/// (0: not offered; some answer with flags or a size instead of 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RawCaps {
    /// `KVM_CAP_SET_GUEST_DEBUG`: 1 where `KVM_SET_GUEST_DEBUG` exists.
    pub set_guest_debug: i32,
    /// `KVM_CAP_SET_GUEST_DEBUG2`: the `KVM_GUESTDBG_*` flags it accepts (Linux 5.15+).
    pub set_guest_debug2: i32,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the `KVM_DIRTY_LOG_*` flags it takes.
    pub manual_dirty_log_protect2: i32,
    /// `KVM_CAP_TSC_DEADLINE_TIMER`.
    pub tsc_deadline_timer: i32,
    /// `KVM_CAP_XSAVE2`: the size of the vCPU's XSAVE area for `KVM_GET_XSAVE2`.
    pub xsave2: i32,
    /// `KVM_CAP_KVMCLOCK_CTRL`.
    pub kvmclock_ctrl: i32,
    /// `KVM_CAP_X2APIC_API`: the `KVM_X2APIC_API_*` flags it takes.
    pub x2apic_api: i32,
}

#[cfg(test)]
impl RawCaps {
    /// What this development machine's `kvm_pvm` answers on a VM (2026-12-04): the tests'
    /// one copy of it.
    pub(crate) const KVM_PVM: RawCaps = RawCaps {
        set_guest_debug: 1,
        set_guest_debug2: 0x1f_0003,
        manual_dirty_log_protect2: 3,
        tsc_deadline_timer: 1,
        xsave2: 4096,
        kvmclock_ctrl: 1,
        x2apic_api: 0xb,
    };
}

/// The names `LUO_VMM_HIDE_CAPS` takes (comma-separated): each hides one capability, or
/// one `KVM_GUESTDBG_*` flag, from luo-vmm as if KVM lacked it, to run the fallbacks on
/// a KVM that has everything (docs/hardware.md).
pub(crate) const HIDEABLE: &[&str] = &[
    "KVM_CAP_SET_GUEST_DEBUG2",
    "KVM_GUESTDBG_BLOCKIRQ",
    "KVM_GUESTDBG_INJECT_DB",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_TSC_DEADLINE_TIMER",
    "KVM_CAP_XSAVE2",
    "KVM_CAP_KVMCLOCK_CTRL",
    "KVM_CAP_X2APIC_API",
];

/// The environment variable of [`HIDEABLE`].
pub(crate) const HIDE_CAPS_ENV: &str = "LUO_VMM_HIDE_CAPS";

/// What KVM offers a VM, checked once per VM ([`Capabilities::check`]) and handed to
/// whoever needs it: the stepper (`block_irq`, `inject_db`), the dirty log
/// (`manual_dirty_log`), the CPUID table (`tsc_deadline_timer`), the hold path
/// (`kvmclock_ctrl`). [`Capabilities::uses`] says what luo-vmm does with each, or
/// without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// The answers this was built from (after any hiding).
    pub raw: RawCaps,
    /// The `KVM_GUESTDBG_*` flags `KVM_SET_GUEST_DEBUG` takes: from
    /// `KVM_CAP_SET_GUEST_DEBUG2`, else [`GUESTDBG_BEFORE_5_15`] where
    /// `KVM_CAP_SET_GUEST_DEBUG` is offered, else none.
    pub guest_debug: u32,
    /// `KVM_DIRTY_LOG_*` flags of `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
    pub manual_dirty_log: u32,
    /// KVM's local APIC has the TSC-deadline mode.
    pub tsc_deadline_timer: bool,
    /// The XSAVE area size `KVM_GET_XSAVE2` needs, where offered.
    pub xsave2_size: Option<u32>,
    /// `KVM_KVMCLOCK_CTRL` exists.
    pub kvmclock_ctrl: bool,
    /// `KVM_X2APIC_API_*` flags.
    pub x2apic_api: u32,
}

/// What luo-vmm does about one capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CapState {
    /// Offered and used for this.
    Used(String),
    /// Not offered; luo-vmm does this instead.
    Fallback(String),
    /// luo-vmm has no use for it (offered or not), for this reason.
    NotNeeded(String),
}

impl CapState {
    /// The first word `luo-vmm host` prints for it.
    pub fn word(&self) -> &'static str {
        match self {
            CapState::Used(_) => "used",
            CapState::Fallback(_) => "fallback",
            CapState::NotNeeded(_) => "not needed",
        }
    }

    /// What it says after that word.
    pub fn why(&self) -> &str {
        match self {
            CapState::Used(s) | CapState::Fallback(s) | CapState::NotNeeded(s) => s,
        }
    }
}

/// One capability (or `KVM_GUESTDBG_*` flag) and what luo-vmm does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CapUse {
    /// Its name, as the kernel's headers spell it.
    pub name: &'static str,
    /// What `KVM_CHECK_EXTENSION` answered (for a flag: the capability that lists it).
    pub value: String,
    /// What luo-vmm does.
    pub state: CapState,
}

impl Capabilities {
    /// The capabilities of `raw`: the pure part of [`Capabilities::check`].
    pub fn from_raw(raw: RawCaps) -> Self {
        let flags = |v: i32| u32::try_from(v).unwrap_or(0);
        let guest_debug = if raw.set_guest_debug2 > 0 {
            flags(raw.set_guest_debug2)
        } else if raw.set_guest_debug > 0 {
            GUESTDBG_BEFORE_5_15
        } else {
            0
        };
        Capabilities {
            raw,
            guest_debug,
            manual_dirty_log: flags(raw.manual_dirty_log_protect2),
            tsc_deadline_timer: raw.tsc_deadline_timer > 0,
            xsave2_size: u32::try_from(raw.xsave2).ok().filter(|&n| n > 0),
            kvmclock_ctrl: raw.kvmclock_ctrl > 0,
            x2apic_api: flags(raw.x2apic_api),
        }
    }

    /// Asks KVM about each capability on the VM `vm_fd` (KVM's documentation prefers the
    /// VM to /dev/kvm: some answers depend on the VM), hides what `LUO_VMM_HIDE_CAPS`
    /// names, and builds the result.
    pub fn check(vm_fd: &VmFd) -> Result<Self, HostError> {
        let ask = |cap: u32| vm_fd.check_extension_raw(c_ulong::from(cap));
        let raw = RawCaps {
            set_guest_debug: ask(KVM_CAP_SET_GUEST_DEBUG),
            set_guest_debug2: ask(KVM_CAP_SET_GUEST_DEBUG2),
            manual_dirty_log_protect2: ask(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            tsc_deadline_timer: ask(KVM_CAP_TSC_DEADLINE_TIMER),
            xsave2: ask(KVM_CAP_XSAVE2),
            kvmclock_ctrl: ask(KVM_CAP_KVMCLOCK_CTRL),
            x2apic_api: ask(KVM_CAP_X2APIC_API),
        };
        let hide = std::env::var(HIDE_CAPS_ENV).unwrap_or_default();
        Ok(Capabilities::from_raw(hidden(raw, &hide)?))
    }

    /// Whether hardware breakpoints can be armed and stepped over at all.
    pub fn breakpoints(&self) -> bool {
        let need = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_SINGLESTEP;
        self.guest_debug & need == need
    }

    /// `KVM_GUESTDBG_BLOCKIRQ`: KVM injects no interrupt while a step is in progress.
    pub fn block_irq(&self) -> bool {
        self.guest_debug & KVM_GUESTDBG_BLOCKIRQ != 0
    }

    /// `KVM_GUESTDBG_INJECT_DB`: a #DB can be given back to the guest.
    pub fn inject_db(&self) -> bool {
        self.guest_debug & KVM_GUESTDBG_INJECT_DB != 0
    }

    /// Manual dirty-log protection with every bit initially set: what the dirty log of a
    /// handover uses to write-protect only the preserved pages (`machine::dirty`).
    pub fn manual_dirty_protect(&self) -> bool {
        let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        self.manual_dirty_log & want == want
    }

    /// What luo-vmm does about each capability, in the order `luo-vmm host` prints them.
    /// `kvmclock_in_guest`: whether the guest uses kvmclock (not with `nopv`, which the
    /// emulation profile passes).
    pub fn uses(&self, kvmclock_in_guest: bool) -> Vec<CapUse> {
        let debug2 = if self.raw.set_guest_debug2 > 0 {
            format!("{:#x}", self.raw.set_guest_debug2)
        } else if self.raw.set_guest_debug > 0 {
            // KVM_CAP_SET_GUEST_DEBUG2 absent: GUESTDBG_BEFORE_5_15 assumed.
            "assumed".into()
        } else {
            "0".into()
        };
        let no_breakpoints = || {
            CapState::Fallback(
                "none: KVM_SET_GUEST_DEBUG cannot arm hardware breakpoints here, so handover, \
                 selftest, scenario and boot --trace fail at their first breakpoint; boot works"
                    .into(),
            )
        };
        let block_irq = if !self.breakpoints() {
            no_breakpoints()
        } else if self.block_irq() {
            CapState::Used(
                "KVM blocks interrupts while a breakpoint is stepped over \
                 (KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ)"
                    .into(),
            )
        } else {
            CapState::Fallback(
                "the guest's RFLAGS.IF is cleared for the one instruction stepped over at a \
                 breakpoint and given back after it, as Linux's kprobes step (Linux before \
                 5.15 has no KVM_GUESTDBG_BLOCKIRQ)"
                    .into(),
            )
        };
        let inject_db = if !self.breakpoints() {
            no_breakpoints()
        } else if self.inject_db() {
            CapState::Used(
                "a debug exception of the guest's own (its TF, ICEBP) that reaches luo-vmm is \
                 given back to it"
                    .into(),
            )
        } else {
            CapState::Fallback(
                "a debug exception of the guest's own that reaches luo-vmm while breakpoints \
                 are armed is dropped, with a warning"
                    .into(),
            )
        };
        let dirty = if self.manual_dirty_protect() {
            CapState::Used(
                "at point-of-no-return only the preserved pages are write-protected \
                 (KVM_CLEAR_DIRTY_LOG), O(preserved pages)"
                    .into(),
            )
        } else {
            CapState::Fallback(
                "switching the dirty log on at point-of-no-return write-protects every guest \
                 page, with the guest stopped: O(guest size), 4.5 ms for 8 GiB on the development \
                 machine"
                    .into(),
            )
        };
        let tsc = if self.tsc_deadline_timer {
            CapState::Used(
                "the guest's CPUID offers the TSC-deadline timer (leaf 1 ECX[24])".into(),
            )
        } else {
            CapState::Fallback(
                "the guest's CPUID does not offer the TSC-deadline timer; its local APIC timer \
                 runs in one-shot mode"
                    .into(),
            )
        };
        let xsave2 = CapState::NotNeeded(match self.xsave2_size {
            Some(n) => format!(
                "a {n}-byte vCPU XSAVE area; luo-vmm saves no vCPU state (the guest's own \
                 XSAVE, set up by KVM_SET_CPUID2, does not depend on it)"
            ),
            None => "luo-vmm saves no vCPU state, so KVM_GET_XSAVE2 is never called".into(),
        });
        let kvmclock = match (kvmclock_in_guest, self.kvmclock_ctrl) {
            (false, _) => CapState::NotNeeded(
                "the guest runs without kvmclock (nopv, as the emulation profile boots it)".into(),
            ),
            (true, true) => CapState::Used(
                "after every hold at a breakpoint longer than a second the guest is told it \
                 was paused (KVM_KVMCLOCK_CTRL), so its watchdogs do not count the hold"
                    .into(),
            ),
            (true, false) => CapState::Fallback(
                "a hold at a breakpoint longer than a second (a scenario's) can make the guest \
                 report a soft lockup or an RCU stall afterwards"
                    .into(),
            ),
        };
        let x2apic = CapState::NotNeeded(
            "luo-vmm runs at most 8 vCPUs, APIC IDs below 255 in the xAPIC format, and boots \
             the guest with nox2apic"
                .into(),
        );
        let hex = |v: i32| format!("{v:#x}");
        vec![
            CapUse {
                name: "KVM_GUESTDBG_BLOCKIRQ",
                value: debug2.clone(),
                state: block_irq,
            },
            CapUse {
                name: "KVM_GUESTDBG_INJECT_DB",
                value: debug2,
                state: inject_db,
            },
            CapUse {
                name: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                value: hex(self.raw.manual_dirty_log_protect2),
                state: dirty,
            },
            CapUse {
                name: "KVM_CAP_TSC_DEADLINE_TIMER",
                value: self.raw.tsc_deadline_timer.to_string(),
                state: tsc,
            },
            CapUse {
                name: "KVM_CAP_XSAVE2",
                value: self.raw.xsave2.to_string(),
                state: xsave2,
            },
            CapUse {
                name: "KVM_CAP_KVMCLOCK_CTRL",
                value: self.raw.kvmclock_ctrl.to_string(),
                state: kvmclock,
            },
            CapUse {
                name: "KVM_CAP_X2APIC_API",
                value: hex(self.raw.x2apic_api),
                state: x2apic,
            },
        ]
    }

    /// One line for each capability KVM lacks and luo-vmm works around, said before the
    /// guest boots (nothing where KVM offers everything).
    pub fn fallback_lines(&self, kvmclock_in_guest: bool) -> Vec<String> {
        self.uses(kvmclock_in_guest)
            .into_iter()
            .filter_map(|u| match u.state {
                CapState::Fallback(what) => Some(format!("KVM lacks {}: {what}", u.name)),
                _ => None,
            })
            .collect()
    }
}

/// `raw` with the capabilities named in `names` (comma-separated, [`HIDEABLE`]) made to
/// answer 0, or for a `KVM_GUESTDBG_*` flag, taken out of `KVM_CAP_SET_GUEST_DEBUG2`'s
/// answer (or of [`GUESTDBG_BEFORE_5_15`] where that capability is absent).
pub(crate) fn hidden(mut raw: RawCaps, names: &str) -> Result<RawCaps, HostError> {
    // Hiding KVM_CAP_SET_GUEST_DEBUG2 hides the whole list, whatever else is named and in
    // whichever order: it is applied after the single flags.
    let mut no_debug2 = false;
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let without = |raw: &mut RawCaps, flag: u32| {
            let listed = u32::try_from(raw.set_guest_debug2)
                .ok()
                .filter(|&f| f > 0)
                .unwrap_or(if raw.set_guest_debug > 0 {
                    GUESTDBG_BEFORE_5_15
                } else {
                    0
                });
            raw.set_guest_debug2 = i32::try_from(listed & !flag).unwrap_or(0);
        };
        match name {
            "KVM_CAP_SET_GUEST_DEBUG2" => no_debug2 = true,
            "KVM_GUESTDBG_BLOCKIRQ" => without(&mut raw, KVM_GUESTDBG_BLOCKIRQ),
            "KVM_GUESTDBG_INJECT_DB" => without(&mut raw, KVM_GUESTDBG_INJECT_DB),
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" => raw.manual_dirty_log_protect2 = 0,
            "KVM_CAP_TSC_DEADLINE_TIMER" => raw.tsc_deadline_timer = 0,
            "KVM_CAP_XSAVE2" => raw.xsave2 = 0,
            "KVM_CAP_KVMCLOCK_CTRL" => raw.kvmclock_ctrl = 0,
            "KVM_CAP_X2APIC_API" => raw.x2apic_api = 0,
            other => return Err(HostError::UnknownCapability(other.into())),
        }
    }
    if no_debug2 {
        raw.set_guest_debug2 = 0;
    }
    Ok(raw)
}

/// CPU features that change what the guest does, read from a CPUID table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuFeatures {
    /// Leaf 7 ECX[16]: 57-bit linear addresses, 5-level paging (Intel Ice Lake-SP, AMD
    /// Zen 4 and later). A kernel entered through its bzImage decompressor turns it on where
    /// offered; one entered through PVH stays on 4 levels.
    pub la57: bool,
    /// Leaf 1 ECX[21].
    pub x2apic: bool,
    /// Leaf 1 ECX[26].
    pub xsave: bool,
    /// Leaf 1 ECX[24]: the local APIC's TSC-deadline mode.
    pub tsc_deadline: bool,
    /// Leaf 1 ECX[5] (Intel VMX) or leaf 0x8000_0001 ECX[2] (AMD SVM).
    pub virtualization: bool,
    /// Leaf 1 ECX[31]: running under a hypervisor.
    pub hypervisor: bool,
    /// Leaf 0xD sub-leaf 0 EDX:EAX: the XCR0 features that can be enabled.
    pub xcr0: u64,
    /// Leaf 0xD sub-leaf 0 EBX: the XSAVE area size for the features XCR0 enables now
    /// (in KVM's table: for every feature KVM lets a guest enable).
    pub xsave_size: u32,
    /// Leaf 0xD sub-leaf 0 ECX: the XSAVE area size for every feature XCR0 can enable.
    pub xsave_max: u32,
}

impl CpuFeatures {
    /// The features in a CPUID table: `leaf(function, index)` gives EAX, EBX, ECX, EDX,
    /// or `None` where the table has no such leaf.
    pub fn from_cpuid(leaf: impl Fn(u32, u32) -> Option<[u32; 4]>) -> Self {
        let bit = |r: u32, n: u32| r & (1 << n) != 0;
        let max = leaf(0, 0).map_or(0, |r| r[0]);
        let get = |f: u32, i: u32| if f <= max { leaf(f, i) } else { None };
        let l1 = get(1, 0).unwrap_or_default();
        let l7 = get(7, 0).unwrap_or_default();
        let ld = get(0xd, 0).unwrap_or_default();
        let ext_max = leaf(0x8000_0000, 0).map_or(0, |r| r[0]);
        let e1 = if ext_max >= 0x8000_0001 {
            leaf(0x8000_0001, 0).unwrap_or_default()
        } else {
            [0; 4]
        };
        let xsave = bit(l1[2], 26);
        CpuFeatures {
            la57: bit(l7[2], 16),
            x2apic: bit(l1[2], 21),
            xsave,
            tsc_deadline: bit(l1[2], 24),
            virtualization: bit(l1[2], 5) || bit(e1[2], 2),
            hypervisor: bit(l1[2], 31),
            xcr0: if xsave {
                u64::from(ld[0]) | (u64::from(ld[3]) << 32)
            } else {
                0
            },
            xsave_size: if xsave { ld[1] } else { 0 },
            xsave_max: if xsave { ld[2] } else { 0 },
        }
    }

    /// This host CPU's features (the `cpuid` instruction, run here).
    pub fn of_host() -> Self {
        CpuFeatures::from_cpuid(|f, i| {
            // `__cpuid_count` is a safe function from Rust 1.87 on, an unsafe one before
            // (the workspace builds with 1.85).
            #[allow(unused_unsafe)]
            // SAFETY: `cpuid` exists on every x86_64 CPU and only reads; asking for a leaf
            // above the maximum gives unspecified values, which `from_cpuid` never asks
            // for (it checks leaf 0 and 0x8000_0000 first).
            let r = unsafe { core::arch::x86_64::__cpuid_count(f, i) };
            Some([r.eax, r.ebx, r.ecx, r.edx])
        })
    }

    /// What KVM offers a guest (`KVM_GET_SUPPORTED_CPUID`).
    pub fn of_kvm(kvm: &Kvm) -> Result<Self, kvm_ioctls::Error> {
        let table = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        let entries = table.as_slice();
        Ok(CpuFeatures::from_cpuid(|f, i| {
            entries
                .iter()
                .find(|e| e.function == f && e.index == i)
                .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        }))
    }
}

/// The host kernel's release and machine (`uname -r`, `uname -m`).
pub(crate) fn kernel_release() -> Option<(String, String)> {
    // SAFETY: `utsname` is plain data for which all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uname` writes only into the struct it is given, which lives on this
    // stack for the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| u8::from_ne_bytes(c.to_ne_bytes()))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Some((field(&u.release), field(&u.machine)))
}

/// Everything `luo-vmm host` reports about /dev/kvm, gathered with a throw-away VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KvmFacts {
    /// `KVM_GET_API_VERSION` (12 since Linux 2.6.22).
    pub api_version: i32,
    /// The capabilities, as a VM of luo-vmm's would see them.
    pub caps: Capabilities,
    /// What KVM offers a guest's CPUID, where it could say.
    pub guest_cpu: Option<CpuFeatures>,
    /// KVM's TSC frequency (kHz), where it could say.
    pub tsc_khz: Option<u32>,
}

/// Asks an opened /dev/kvm what `luo-vmm host` reports (a VM created and dropped).
pub(crate) fn kvm_facts(kvm: &Kvm) -> Result<KvmFacts, HostError> {
    let vm = kvm.create_vm().map_err(HostError::CreateVm)?;
    let caps = Capabilities::check(&vm)?;
    let tsc_khz = vm
        .create_vcpu(0)
        .ok()
        .and_then(|v| v.get_tsc_khz().ok())
        .filter(|&k| k > 0);
    Ok(KvmFacts {
        api_version: kvm.get_api_version(),
        caps,
        guest_cpu: CpuFeatures::of_kvm(kvm).ok(),
        tsc_khz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hiding_is_the_same_in_any_order() {
        let raw = RawCaps::KVM_PVM;
        for (a, b) in [
            ("KVM_CAP_SET_GUEST_DEBUG2", "KVM_GUESTDBG_BLOCKIRQ"),
            ("KVM_CAP_SET_GUEST_DEBUG2", "KVM_GUESTDBG_INJECT_DB"),
            ("KVM_GUESTDBG_BLOCKIRQ", "KVM_GUESTDBG_INJECT_DB"),
        ] {
            let one = hidden(raw, &format!("{a},{b}")).unwrap();
            let other = hidden(raw, &format!("{b},{a}")).unwrap();
            assert_eq!(one, other, "{a} and {b}");
        }
        assert_eq!(
            hidden(raw, "KVM_GUESTDBG_BLOCKIRQ,KVM_CAP_SET_GUEST_DEBUG2")
                .unwrap()
                .set_guest_debug2,
            0
        );
    }

    const PVM: RawCaps = RawCaps::KVM_PVM;

    /// A KVM of Linux 5.10: no SET_GUEST_DEBUG2 (so no BLOCKIRQ), no XSAVE2.
    const LINUX_5_10: RawCaps = RawCaps {
        set_guest_debug: 1,
        set_guest_debug2: 0,
        manual_dirty_log_protect2: 3,
        tsc_deadline_timer: 1,
        xsave2: 0,
        kvmclock_ctrl: 1,
        x2apic_api: 3,
    };

    fn state(caps: &Capabilities, name: &str, kvmclock: bool) -> CapState {
        caps.uses(kvmclock)
            .into_iter()
            .find(|u| u.name == name)
            .unwrap()
            .state
    }

    #[test]
    fn every_capability_is_used_on_a_kvm_that_has_everything() {
        let caps = Capabilities::from_raw(PVM);
        assert!(caps.breakpoints() && caps.block_irq() && caps.inject_db());
        assert!(caps.manual_dirty_protect());
        assert!(caps.tsc_deadline_timer && caps.kvmclock_ctrl);
        assert_eq!(caps.xsave2_size, Some(4096));
        let uses = caps.uses(true);
        assert_eq!(uses.len(), 7);
        for u in &uses {
            assert!(
                matches!(u.state, CapState::Used(_) | CapState::NotNeeded(_)),
                "{u:?}"
            );
        }
        assert_eq!(uses[0].value, "0x1f0003");
        assert!(caps.fallback_lines(true).is_empty());
        // With nopv the guest has no kvmclock to tell.
        assert_eq!(
            state(&caps, "KVM_CAP_KVMCLOCK_CTRL", false).word(),
            "not needed"
        );
    }

    #[test]
    fn a_kvm_before_5_15_steps_with_if_masked_and_still_reinjects() {
        let caps = Capabilities::from_raw(LINUX_5_10);
        assert_eq!(caps.guest_debug, GUESTDBG_BEFORE_5_15);
        assert!(caps.breakpoints() && !caps.block_irq() && caps.inject_db());
        assert_eq!(
            state(&caps, "KVM_GUESTDBG_BLOCKIRQ", true).word(),
            "fallback"
        );
        assert_eq!(state(&caps, "KVM_GUESTDBG_INJECT_DB", true).word(), "used");
        assert_eq!(state(&caps, "KVM_CAP_XSAVE2", true).word(), "not needed");
        let lines = caps.fallback_lines(true);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("KVM lacks KVM_GUESTDBG_BLOCKIRQ: the guest's RFLAGS.IF"));
    }

    #[test]
    fn each_missing_capability_has_a_fallback_line() {
        let caps = Capabilities::from_raw(RawCaps::default());
        assert!(!caps.breakpoints());
        let lines = caps.fallback_lines(true);
        for name in [
            "KVM_GUESTDBG_BLOCKIRQ",
            "KVM_GUESTDBG_INJECT_DB",
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            "KVM_CAP_TSC_DEADLINE_TIMER",
            "KVM_CAP_KVMCLOCK_CTRL",
        ] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("KVM lacks {name}: "))),
                "{name}: {lines:?}"
            );
        }
        assert!(lines[0].contains("handover"));
        // The two that luo-vmm does not use need no line.
        assert_eq!(lines.len(), 5);
        // Manual protection needs both flags.
        let half = Capabilities::from_raw(RawCaps {
            manual_dirty_log_protect2: 1,
            ..PVM
        });
        assert!(!half.manual_dirty_protect());
    }

    #[test]
    fn hiding_capabilities_runs_the_fallbacks() {
        let raw = hidden(PVM, "KVM_GUESTDBG_BLOCKIRQ").unwrap();
        let caps = Capabilities::from_raw(raw);
        assert!(caps.breakpoints() && !caps.block_irq() && caps.inject_db());
        assert_eq!(raw.set_guest_debug2, 0x0f_0003);

        let raw = hidden(
            PVM,
            "KVM_CAP_SET_GUEST_DEBUG2, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        )
        .unwrap();
        let caps = Capabilities::from_raw(raw);
        assert_eq!(caps.guest_debug, GUESTDBG_BEFORE_5_15);
        assert!(!caps.manual_dirty_protect());

        // A flag hidden where SET_GUEST_DEBUG2 is absent: taken out of the assumed set.
        let caps = Capabilities::from_raw(hidden(LINUX_5_10, "KVM_GUESTDBG_INJECT_DB").unwrap());
        assert!(caps.breakpoints() && !caps.inject_db());

        for name in HIDEABLE {
            assert!(hidden(PVM, name).is_ok(), "{name}");
        }
        assert_eq!(hidden(PVM, "").unwrap(), PVM);
        assert!(matches!(
            hidden(PVM, "KVM_CAP_NOPE"),
            Err(HostError::UnknownCapability(n)) if n == "KVM_CAP_NOPE"
        ));
    }

    /// A CPUID table as a list of (function, index, [eax, ebx, ecx, edx]).
    fn table(entries: &'static [(u32, u32, [u32; 4])]) -> impl Fn(u32, u32) -> Option<[u32; 4]> {
        move |f, i| entries.iter().find(|e| e.0 == f && e.1 == i).map(|e| e.2)
    }

    #[test]
    fn cpu_features_from_an_intel_table_with_la57_and_amx() {
        // A Sapphire Rapids-like table: LA57, x2APIC, XSAVE with AMX (XCR0 bits 17, 18),
        // an 11008-byte XSAVE area of which 2696 bytes are enabled now.
        let f = CpuFeatures::from_cpuid(table(&[
            (0, 0, [0x20, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            (
                1,
                0,
                [0x806f8, 0, (1 << 21) | (1 << 24) | (1 << 26) | (1 << 5), 0],
            ),
            (7, 0, [0, 0, 1 << 16, 0]),
            (0xd, 0, [0x6_02e7, 2696, 11008, 0]),
            (0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
        ]));
        assert!(f.la57 && f.x2apic && f.xsave && f.tsc_deadline && f.virtualization);
        assert!(!f.hypervisor);
        assert_eq!(f.xcr0, 0x6_02e7);
        assert_eq!((f.xsave_size, f.xsave_max), (2696, 11008));
    }

    #[test]
    fn cpu_features_from_an_amd_guest_table_without_la57() {
        // A Zen 3 seen from a guest: SVM in leaf 0x8000_0001, the hypervisor bit, no
        // LA57; leaf 7 above the maximum leaf is not read.
        let f = CpuFeatures::from_cpuid(table(&[
            (0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            (1, 0, [0xa00f11, 0, (1 << 31) | (1 << 26), 0]),
            (7, 0, [0, 0, 1 << 16, 0]),
            (0xd, 0, [0x207, 2440, 2440, 0]),
            (0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            (0x8000_0001, 0, [0, 0, 1 << 2, 0]),
        ]));
        assert!(f.la57, "leaf 7 is below the maximum 0x10, so it counts");
        let g = CpuFeatures::from_cpuid(table(&[
            (0, 0, [0x6, 0, 0, 0]),
            (1, 0, [0, 0, 1 << 31, 0]),
            (7, 0, [0, 0, 1 << 16, 0]),
        ]));
        assert!(!g.la57 && !g.xsave && g.hypervisor);
        assert_eq!((g.xsave_size, g.xcr0), (0, 0));
        assert!(f.virtualization && f.hypervisor && !f.x2apic);
        assert_eq!((f.xsave_size, f.xsave_max, f.xcr0), (2440, 2440, 0x207));
    }

    #[test]
    fn this_host_has_a_kernel_release_and_a_cpuid() {
        let (release, machine) = kernel_release().unwrap();
        assert!(!release.is_empty());
        assert_eq!(machine, "x86_64");
        // Every x86_64 CPU has SSE2 and a leaf 1; XSAVE sizes are at least the legacy
        // 512-byte area plus the 64-byte header where XSAVE exists.
        let f = CpuFeatures::of_host();
        if f.xsave {
            assert!(f.xsave_max >= 576 && f.xsave_size >= 576);
        }
    }

    fn mods(m: &[&str]) -> Vec<String> {
        m.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pvm_is_emulated_even_with_hypervisor_flag() {
        assert!(classify(&mods(&["kvm", "kvm_pvm"]), "fpu sse hypervisor").is_emulated());
    }

    #[test]
    fn vmx_or_svm_is_hardware() {
        assert_eq!(
            classify(&mods(&["kvm", "kvm_intel"]), "fpu vmx sse"),
            KvmBackend::Hardware {
                module: "kvm_intel".into()
            }
        );
        assert_eq!(
            classify(&mods(&["kvm", "kvm_amd"]), "fpu svm"),
            KvmBackend::Hardware {
                module: "kvm_amd".into()
            }
        );
    }

    #[test]
    fn no_virtualization_flags_is_emulated() {
        assert!(classify(&mods(&["kvm"]), "fpu sse hypervisor").is_emulated());
    }
}
