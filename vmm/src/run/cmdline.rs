//! The guest kernel command line: the base every luo-vmm guest gets, and the
//! emulation-safe additions used only on an instruction-emulating KVM.

/// What every guest gets: the serial console (and the early console on the same port,
/// so a kernel that dies before its console driver registers is still heard), a reset
/// through the i8042 on reboot, no waiting on a panic, and the initramfs kept so the
/// agent can hand it to the next kernel.
///
/// `nox2apic`: without ACPI, a kexec'd kernel that finds the local APIC already in
/// x2APIC mode (left so by the kernel before it) runs with the xAPIC MMIO driver and no
/// APIC mapping until its APIC routing switches to x2APIC; an interrupt in that window
/// (a KVM async-PF "page ready" was seen here) oopses in `native_apic_mem_eoi`. See
/// docs/emulated-kvm.md. Up to 8 vCPUs need no x2APIC.
pub const BASE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 retain_initrd nox2apic";

/// CPU features the emulator cannot execute although the host's CPUID (which leaks into
/// the guest) advertises them. See docs/emulated-kvm.md for each one.
pub const EMULATION_CLEARCPUID: &[&str] = &[
    "popcnt",
    "smap",
    "smep",
    "xsave",
    "avx",
    "avx2",
    "avx512f",
    "bmi1",
    "bmi2",
    "fsgsbase",
    "pcid",
    "invpcid",
    "rdpid",
    "pku",
    "rdrand",
    "rdseed",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "pclmulqdq",
    "aes",
    "sha_ni",
    "movbe",
    "erms",
    "fsrm",
    "xsaves",
    "xsavec",
    "xsaveopt",
    "clflushopt",
    "clwb",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "adx",
    "abm",
    "umip",
];

/// glibc's ifunc choices that user space must not make on an emulating KVM, set as
/// `GLIBC_TUNABLES` in init's environment (the kernel passes an unknown `NAME=value`
/// parameter to init as an environment variable; init's children inherit it).
///
/// The guest kernel runs without XSAVE there (`clearcpuid=xsave`: the emulator cannot
/// execute `xsave`/`xrstor`), so it context-switches only the legacy FXSAVE state: x87
/// and the low 128 bits of xmm0-15. The emulator still executes AVX and AVX-512, and
/// user space still finds them (the host's CPUID and XCR0 leak through). A task that
/// holds data in ymm/zmm registers and is switched to another CPU resumes with the other
/// CPU's register contents. glibc's `memcpy` of the TLS image in a static binary's
/// start-up (zmm16/zmm17 on an AVX-512 host) did exactly that in about one two-vCPU
/// boot in twenty: init died on a zeroed TLS slot (docs/emulated-kvm.md, "two vCPUs").
///
/// `-AVX_Fast_Unaligned_Load` is needed besides `-AVX2`: glibc derives it before the
/// tunables apply, and its memcpy keeps using ymm registers without it. The other
/// entries keep glibc away from extensions the emulator cannot execute (`popcnt`,
/// BMI2, SSE4.2 string instructions), as `clearcpuid=` does for the kernel.
pub const EMULATION_GLIBC_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512BW,\
-AVX512VL,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load,-BMI1,-BMI2,-ERMS,-FSRM,-FMA,-LZCNT,\
-MOVBE,-POPCNT,-SSE4_1,-SSE4_2,-SSSE3,-XSAVEC,-OSXSAVE";

/// `rodata=off`: the emulator writes the instruction of a KVM hypercall (`vmcall` or
/// `vmmcall`) back into guest memory when it runs it, as KVM does when it patches a
/// hypercall instruction, and that write faults in kernel text made read-only by
/// `mark_rodata_ro()`: an oops in `kvm_hypercall4` (the PV send-IPI hypercall) that four
/// vCPUs met in 2 of 6 boots (docs/emulated-kvm.md, "Four vCPUs"). The kernel text stays
/// writable in the emulation profile.
pub const EMULATION_RODATA: &str = "rodata=off";

/// `nopv`: the emulator never completes a KVM hypercall. It rewrites the hypercall
/// instruction in guest memory (`vmmcall` -> `vmcall`, or `vmcall` again) and executes
/// it again, forever: the vCPU stays on that instruction with interrupts off, its
/// thread at 100 % of a host core, and the call's effect never happens. The only
/// hypercall this guest makes is the PV send-IPI (`KVM_HC_SEND_IPI`), used for an IPI to
/// a strict subset of the other CPUs, so only guests with three or more vCPUs make it:
/// a four-vCPU boot hung when its first one was made (TLB flush after `Run /init`, or
/// the KVM reboot notifier's `on_each_cpu` after the agent's last line;
/// docs/emulated-kvm.md, "Four vCPUs: the hang"). The kernel has no switch for PV IPIs
/// alone; `nopv` turns off the guest's use of KVM's PV interface as a whole (PV IPIs,
/// kvmclock, steal time, PV EOI, async PF, PV TLB flush), so no hypercall is made.
pub const EMULATION_NOPV: &str = "nopv";

/// `rcupdate.rcu_cpu_stall_suppress=1`: the emulator cannot move a guest's TSC (it ignores
/// `KVM_SET_MSRS` of `IA32_TSC` and `KVM_VCPU_TSC_OFFSET`; the guest reads the host's), so
/// after a reset to a snapshot the guest's clock is ahead by the host time since the
/// snapshot, minutes into an exploration. An RCU grace period in flight in the snapshot
/// then looks stalled for all that time: RCU reports a stall at once, after nearly every
/// reset, and sends NMIs to dump the stacks of the CPUs it blames (docs/snapshots.md).
/// Those reports say nothing true on the emulator; `luo-vmm`'s own hang bound, on host
/// time, stands in for the detector there.
pub const EMULATION_RCU_STALLS: &str = "rcupdate.rcu_cpu_stall_suppress=1";

/// The emulation profile's parameters: `luo_emulation` switches on the reference
/// guest's patches (guest-images/patches), `clearcpuid=` hides what cannot run from the
/// kernel, [`EMULATION_RODATA`] keeps its text writable for the emulator's hypercall
/// rewrites, [`EMULATION_NOPV`] keeps the guest off hypercalls altogether,
/// [`EMULATION_RCU_STALLS`] keeps RCU from taking a reset's clock leap for a stall, and
/// [`EMULATION_GLIBC_TUNABLES`] keeps glibc-based user space off AVX.
///
/// `tsc_khz` (KVM's TSC frequency, `host::tsc_khz`) becomes `tsc_early_khz=`: without
/// kvmclock the kernel would calibrate the TSC against the PIT, which fails under
/// emulation ("tsc: Unable to calibrate against PIT", TSC marked unstable, the jiffies
/// clocksource and a 1.29-BogoMIPS delay loop); with it the TSC is the clocksource as
/// before.
pub fn emulation_params(tsc_khz: Option<u32>) -> String {
    let mut p = format!(
        "luo_emulation clearcpuid={} {EMULATION_RODATA} {EMULATION_NOPV} {EMULATION_RCU_STALLS}",
        EMULATION_CLEARCPUID.join(",")
    );
    if let Some(khz) = tsc_khz {
        p.push_str(&format!(" tsc_early_khz={khz}"));
    }
    p.push_str(&format!(" GLIBC_TUNABLES={EMULATION_GLIBC_TUNABLES}"));
    p
}

/// Joins the base, the emulation profile (when `emulated`; `tsc_khz` as in
/// [`emulation_params`]), and the user's or the mode's own parameters.
pub fn compose(emulated: bool, tsc_khz: Option<u32>, extra: &str) -> String {
    let mut parts = vec![BASE.to_owned()];
    if emulated {
        parts.push(emulation_params(tsc_khz));
    }
    if !extra.trim().is_empty() {
        parts.push(extra.trim().to_owned());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_gets_no_emulation_profile() {
        let c = compose(false, Some(2_596_102), "luo.mode=boot");
        assert_eq!(c, format!("{BASE} luo.mode=boot"));
        assert!(!c.contains("clearcpuid"));
    }

    #[test]
    fn glibc_tunables_reach_init_as_one_environment_variable() {
        let c = compose(true, None, "");
        let word = c
            .split_whitespace()
            .find(|w| w.starts_with("GLIBC_TUNABLES="))
            .expect("no GLIBC_TUNABLES in the emulation profile");
        // The kernel hands `NAME=value` to init only when NAME has no '.' (else it is an
        // unknown module parameter) and the word has no space.
        let (name, value) = word.split_once('=').unwrap();
        assert!(!name.contains('.'));
        assert!(value.starts_with("glibc.cpu.hwcaps=-AVX,"));
        assert!(value.contains("-AVX_Fast_Unaligned_Load"));
        assert!(!compose(false, None, "").contains("GLIBC_TUNABLES"));
        assert!(c.split_whitespace().any(|w| w == "rodata=off"));
        assert!(!compose(false, None, "").contains("rodata"));
    }

    #[test]
    fn the_emulation_profile_keeps_the_guest_off_hypercalls() {
        let c = compose(true, Some(2_596_102), "luo.mode=boot");
        let words: Vec<&str> = c.split_whitespace().collect();
        assert!(words.contains(&"nopv"));
        assert!(words.contains(&EMULATION_RCU_STALLS));
        assert!(words.contains(&"tsc_early_khz=2596102"));
        // The user's parameters come last, so they can override the profile's.
        assert_eq!(words.last(), Some(&"luo.mode=boot"));
        // Without a TSC frequency, no tsc_early_khz (the kernel calibrates as it can).
        assert!(!compose(true, None, "").contains("tsc_early_khz"));
        let hw = compose(false, Some(2_596_102), "");
        assert!(!hw.contains("nopv") && !hw.contains("tsc_early_khz"));
        assert!(!hw.contains("rcu_cpu_stall"));
    }

    #[test]
    fn emulation_profile_is_added() {
        let c = compose(true, None, "");
        assert!(c.contains("luo_emulation"));
        assert!(c.contains("clearcpuid=popcnt,smap"));
        assert!(!c.ends_with(' '));
    }
}
