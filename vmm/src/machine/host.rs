//! What kind of KVM the host offers: hardware virtualization, or an instruction
//! emulator (such as `kvm_pvm` in native mode on machines without VMX/SVM), which needs
//! the emulation-safe guest profile. Decided from facts the host exposes, by a pure
//! function.

use std::fs;

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

#[cfg(test)]
mod tests {
    use super::*;

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
