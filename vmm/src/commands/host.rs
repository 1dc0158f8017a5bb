//! `luo-vmm host`: what this host offers a guest and what luo-vmm will do with it, as
//! libvirt's `virt-host-validate` does for its own needs: the kind of KVM, the host
//! kernel, every KVM capability luo-vmm checks with "used" or its fallback, the CPU
//! features that change the guest, and the guest profile `--profile auto` picks. The
//! facts are gathered by `machine::host`; [`render`] is a pure function of them. Exit 1,
//! with the reason on the last line, when no guest can run here (no /dev/kvm, no
//! permission, no VM).

use std::fmt::Write as _;

use crate::commands::CommandError;
use crate::machine::host::{
    self, kernel_release, kvm_facts, CpuFeatures, KvmBackend, KvmFacts, HIDE_CAPS_ENV,
};
use crate::machine::vm::open_kvm;
use crate::run::cmdline;

/// Everything `luo-vmm host` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostReport {
    /// The kind of KVM (`machine::host::detect`).
    pub backend: KvmBackend,
    /// `uname -r` and `uname -m`.
    pub kernel: Option<(String, String)>,
    /// The host CPU's own CPUID.
    pub host_cpu: CpuFeatures,
    /// What /dev/kvm said, or why it could not be asked (the whole reason, one line).
    pub kvm: Result<KvmFacts, String>,
    /// `LUO_VMM_HIDE_CAPS`, where set.
    pub hidden: Option<String>,
}

/// Gathers the report; the error is why no guest can run here.
pub(crate) fn gather() -> (HostReport, Option<CommandError>) {
    let facts = open_kvm()
        .map_err(CommandError::Kvm)
        .and_then(|kvm| kvm_facts(&kvm).map_err(CommandError::HostCheck));
    let (kvm, error) = match facts {
        Ok(f) => (Ok(f), None),
        Err(e) => (Err(e.to_string()), Some(e)),
    };
    let report = HostReport {
        backend: host::detect(),
        kernel: kernel_release(),
        host_cpu: CpuFeatures::of_host(),
        kvm,
        hidden: std::env::var(HIDE_CAPS_ENV)
            .ok()
            .filter(|v| v.split(',').any(|n| !n.trim().is_empty())),
    };
    (report, error)
}

/// `luo-vmm host`.
pub(crate) fn run() -> Result<u8, CommandError> {
    // A misspelt LUO_VMM_HIDE_CAPS is the variable's fault, not /dev/kvm's: one line.
    if let Ok(names) = std::env::var(HIDE_CAPS_ENV) {
        host::hidden(host::RawCaps::default(), &names).map_err(CommandError::HostCheck)?;
    }
    let (report, error) = gather();
    let text = render(&report);
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
        .map_err(CommandError::Stdout)?;
    match error {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The report as `luo-vmm host` prints it.
pub(crate) fn render(r: &HostReport) -> String {
    let mut out = String::new();
    let emulated = r.backend.is_emulated();
    let _ = writeln!(
        out,
        "luo-vmm host: what this host offers a guest, and what luo-vmm does with it\n"
    );
    let kind = match &r.backend {
        KvmBackend::Emulated { why } => {
            format!("emulated: guest instructions are emulated ({why})")
        }
        KvmBackend::Hardware { module } => {
            format!("hardware: {module} (VMX/SVM runs guest code)")
        }
    };
    let _ = writeln!(out, "KVM:            {kind}");
    let _ = writeln!(
        out,
        "host kernel:    {}",
        r.kernel.as_ref().map_or_else(
            || "unknown (uname failed)".into(),
            |(release, machine)| format!("Linux {release} {machine}")
        )
    );
    let tsc_khz = r.kvm.as_ref().ok().and_then(|f| f.tsc_khz);
    match &r.kvm {
        Ok(f) => {
            let _ = writeln!(
                out,
                "/dev/kvm:       usable: KVM API version {}, a VM created{}",
                f.api_version,
                f.tsc_khz
                    .map_or(String::new(), |k| format!(", TSC {k} kHz"))
            );
        }
        Err(why) => {
            let _ = writeln!(out, "/dev/kvm:       NOT USABLE: {why}");
        }
    }
    let profile = if emulated {
        format!(
            "emulation profile (docs/emulated-kvm.md); the guest's command line gets: {}",
            cmdline::emulation_params(tsc_khz)
        )
    } else {
        "hardware profile: nothing of the emulation profile, the guest gets the full CPU".into()
    };
    let _ = writeln!(out, "guest profile:  --profile auto picks the {profile}");

    let _ = writeln!(out, "\ncapabilities (KVM_CHECK_EXTENSION on a VM):");
    match &r.kvm {
        Ok(f) => {
            for u in f.caps.uses(!emulated) {
                let _ = writeln!(
                    out,
                    "  {:<34} {:<10} {}: {}",
                    u.name,
                    u.value,
                    u.state.word(),
                    u.state.why()
                );
            }
            if f.caps.raw.set_guest_debug2 <= 0 && f.caps.raw.set_guest_debug > 0 {
                let _ = writeln!(
                    out,
                    "  (assumed: KVM has no KVM_CAP_SET_GUEST_DEBUG2, so KVM_SET_GUEST_DEBUG is \
                     taken to accept what it has since Linux 2.6.31, {:#x}, without BLOCKIRQ)",
                    f.caps.guest_debug
                );
            }
            if let Some(h) = &r.hidden {
                let _ = writeln!(
                    out,
                    "  ({HIDE_CAPS_ENV}={h}: those are shown and used as if KVM lacked them)"
                );
            }
        }
        Err(_) => {
            let _ = writeln!(out, "  unknown: /dev/kvm could not be asked");
        }
    }

    let guest = r.kvm.as_ref().ok().and_then(|f| f.guest_cpu);
    let _ = writeln!(
        out,
        "\nCPU features that change the guest:  {:<12} KVM offers the guest",
        "host CPU"
    );
    let row = |out: &mut String, name: &str, host: String, kvm: Option<String>| {
        let _ = writeln!(
            out,
            "  {name:<34} {host:<12} {}",
            kvm.unwrap_or_else(|| "unknown".into())
        );
    };
    let h = &r.host_cpu;
    row(
        &mut out,
        "LA57 (5-level paging)",
        yes(h.la57).into(),
        guest.map(|g| yes(g.la57).into()),
    );
    row(
        &mut out,
        "x2APIC",
        yes(h.x2apic).into(),
        guest.map(|g| yes(g.x2apic).into()),
    );
    row(
        &mut out,
        "XSAVE",
        yes(h.xsave).into(),
        guest.map(|g| yes(g.xsave).into()),
    );
    row(
        &mut out,
        "TSC-deadline timer",
        yes(h.tsc_deadline).into(),
        r.kvm.as_ref().ok().map(|f| {
            format!(
                "{} (KVM_CAP_TSC_DEADLINE_TIMER)",
                yes(f.caps.tsc_deadline_timer)
            )
        }),
    );
    row(
        &mut out,
        "VMX/SVM",
        yes(h.virtualization).into(),
        guest.map(|g| yes(g.virtualization).into()),
    );
    row(
        &mut out,
        "XCR0 features (0xD.0 EDX:EAX)",
        format!("{:#x}", h.xcr0),
        guest.map(|g| format!("{:#x}", g.xcr0)),
    );
    row(
        &mut out,
        "XSAVE size, enabled (0xD.0 EBX)",
        format!("{} bytes", h.xsave_size),
        guest.map(|g| format!("{} bytes", g.xsave_size)),
    );
    row(
        &mut out,
        "XSAVE size, all (0xD.0 ECX)",
        format!("{} bytes", h.xsave_max),
        guest.map(|g| format!("{} bytes", g.xsave_max)),
    );

    let _ = writeln!(out, "\nwhat luo-vmm does with them:");
    let la57 = guest.map_or(h.la57, |g| g.la57);
    let cpuid = if emulated {
        "CPUID: this KVM ignores KVM_SET_CPUID2, so the guest sees the host CPU's CPUID \
         (the first column); the emulation profile's clearcpuid= hides what the emulator \
         cannot execute (xsave, avx, ...) from the guest kernel"
    } else {
        "CPUID: the guest sees KVM's table (the second column), normalized per vCPU \
         (topology, the hypervisor bit, VMX/SVM hidden)"
    };
    let _ = writeln!(out, "  {cpuid}");
    let la57 = match (emulated, la57) {
        (true, _) => "the guest's CPUID is the emulator's to give, not luo-vmm's",
        (false, true) => "offered: a kernel entered through its bzImage decompressor (the next kernel of a handover) turns 5-level paging on; one entered through PVH (the reference vmlinux) stays on 4 levels",
        (false, false) => "not offered, so the guest uses 4-level paging",
    };
    let _ = writeln!(
        out,
        "  LA57: {la57}; luo-vmm walks the guest's page tables with 4 or 5 levels as its \
         CR4.LA57 says"
    );
    let _ = writeln!(
        out,
        "  x2APIC: the guest boots with nox2apic (xAPIC mode; luo-vmm runs at most 8 vCPUs)"
    );
    let _ = writeln!(
        out,
        "  XSAVE: {}",
        if emulated {
            "the emulation profile boots the guest with clearcpuid=xsave (the emulator cannot \
             execute xsave/xrstor) and keeps glibc off AVX (GLIBC_TUNABLES)"
        } else {
            "the guest kernel uses XSAVE with the sizes KVM offers"
        }
    );

    let verdict = match &r.kvm {
        Ok(_) if emulated => "guests can run here, emulated (about 1000x slower than hardware)",
        Ok(_) => "guests can run here on hardware KVM",
        Err(_) => "no guest can run here (the reason is the line below)",
    };
    let _ = writeln!(out, "\nverdict: {verdict}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::host::{Capabilities, RawCaps};

    fn pvm_report() -> HostReport {
        let cpu = CpuFeatures {
            x2apic: true,
            xsave: true,
            tsc_deadline: true,
            hypervisor: true,
            xcr0: 0x2e7,
            xsave_size: 2696,
            xsave_max: 2696,
            ..CpuFeatures::default()
        };
        HostReport {
            backend: KvmBackend::Emulated {
                why: "the kvm_pvm module drives /dev/kvm (it emulates non-PVM guests)".into(),
            },
            kernel: Some(("6.18.44-fc-v1252".into(), "x86_64".into())),
            host_cpu: cpu,
            kvm: Ok(KvmFacts {
                api_version: 12,
                caps: Capabilities::from_raw(RawCaps::KVM_PVM),
                guest_cpu: Some(cpu),
                tsc_khz: Some(2_999_999),
            }),
            hidden: None,
        }
    }

    #[test]
    fn an_emulating_host_is_reported_with_its_profile_and_every_capability() {
        let text = render(&pvm_report());
        assert!(text.contains(
            "KVM:            emulated: guest instructions are emulated (the kvm_pvm module"
        ));
        assert!(text.contains("host kernel:    Linux 6.18.44-fc-v1252 x86_64"));
        assert!(text.contains("usable: KVM API version 12, a VM created, TSC 2999999 kHz"));
        assert!(text.contains("--profile auto picks the emulation profile"));
        assert!(text.contains("tsc_early_khz=2999999"));
        for (cap, state) in [
            ("KVM_GUESTDBG_BLOCKIRQ", "0x1f0003   used: "),
            ("KVM_GUESTDBG_INJECT_DB", "0x1f0003   used: "),
            ("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "0x3        used: "),
            ("KVM_CAP_TSC_DEADLINE_TIMER", "1          used: "),
            ("KVM_CAP_XSAVE2", "4096       not needed: "),
            (
                "KVM_CAP_KVMCLOCK_CTRL",
                "1          not needed: the guest runs without kvmclock",
            ),
            ("KVM_CAP_X2APIC_API", "0xb        not needed: "),
        ] {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(cap))
                .unwrap_or_else(|| panic!("no {cap} in {text}"));
            assert!(line.contains(state), "{line}");
        }
        assert!(text.contains("  LA57 (5-level paging)              no           no"));
        assert!(text.contains("this KVM ignores KVM_SET_CPUID2"));
        assert!(text.contains("  XSAVE size, all (0xD.0 ECX)        2696 bytes   2696 bytes"));
        assert!(text.ends_with(
            "verdict: guests can run here, emulated (about 1000x slower than hardware)\n"
        ));
    }

    #[test]
    fn a_hardware_host_without_blockirq_shows_the_fallback_and_the_hardware_profile() {
        let mut r = pvm_report();
        r.backend = KvmBackend::Hardware {
            module: "kvm_intel".into(),
        };
        r.host_cpu.la57 = true;
        if let Ok(f) = &mut r.kvm {
            f.caps = Capabilities::from_raw(RawCaps {
                set_guest_debug2: 0,
                xsave2: 0,
                ..f.caps.raw
            });
            f.guest_cpu = Some(r.host_cpu);
        }
        r.hidden = Some("KVM_CAP_SET_GUEST_DEBUG2".into());
        let text = render(&r);
        assert!(text.contains("KVM:            hardware: kvm_intel"));
        assert!(text.contains("--profile auto picks the hardware profile"));
        assert!(!text.contains("clearcpuid"));
        let blockirq = text
            .lines()
            .find(|l| l.trim_start().starts_with("KVM_GUESTDBG_BLOCKIRQ"))
            .unwrap();
        assert!(
            blockirq.contains("fallback: the guest's RFLAGS.IF is cleared"),
            "{blockirq}"
        );
        assert!(text.contains("KVM_CAP_KVMCLOCK_CTRL              1          used: "));
        assert!(text.contains("LA57: offered: a kernel entered through its bzImage decompressor"));
        assert!(blockirq.contains(" assumed    fallback: "), "{blockirq}");
        assert!(text.contains("(assumed: KVM has no KVM_CAP_SET_GUEST_DEBUG2, so KVM_SET_GUEST_DEBUG is taken to accept what it has since Linux 2.6.31, 0xf0003, without BLOCKIRQ)"));
        assert!(text.contains("(LUO_VMM_HIDE_CAPS=KVM_CAP_SET_GUEST_DEBUG2: "));
        assert!(text.contains("verdict: guests can run here on hardware KVM"));
    }

    #[test]
    fn host_is_a_command_without_arguments() {
        use crate::config::options::{Cli, Command};
        use clap::Parser;
        let cli = Cli::try_parse_from(["luo-vmm", "host"]).unwrap();
        assert!(matches!(cli.command, Command::Host));
        assert!(Cli::try_parse_from(["luo-vmm", "host", "--vcpus", "2"]).is_err());
    }

    #[test]
    fn a_host_without_kvm_says_why_no_guest_can_run() {
        let mut r = pvm_report();
        r.kvm = Err(crate::machine::vm::VmError::NoKvm.to_string());
        let text = render(&r);
        assert!(text.contains("/dev/kvm:       NOT USABLE: /dev/kvm does not exist"));
        assert!(text.contains("  unknown: /dev/kvm could not be asked"));
        assert!(text.contains("  LA57 (5-level paging)              no           unknown"));
        assert!(text.ends_with("verdict: no guest can run here (the reason is the line below)\n"));
    }
}
