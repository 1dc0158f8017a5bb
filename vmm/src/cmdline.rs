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

/// The emulation profile's parameters: `luo_emulation` switches on the reference
/// guest's patches (guest-images/patches), `clearcpuid=` hides what cannot run from the
/// kernel, [`EMULATION_RODATA`] keeps its text writable for the emulator's hypercall
/// rewrites, and [`EMULATION_GLIBC_TUNABLES`] keeps glibc-based user space off AVX.
pub fn emulation_params() -> String {
    format!(
        "luo_emulation clearcpuid={} {EMULATION_RODATA} GLIBC_TUNABLES={EMULATION_GLIBC_TUNABLES}",
        EMULATION_CLEARCPUID.join(",")
    )
}

/// Joins the base, the emulation profile (when `emulated`), and the user's or the
/// mode's own parameters.
pub fn compose(emulated: bool, extra: &str) -> String {
    let mut parts = vec![BASE.to_owned()];
    if emulated {
        parts.push(emulation_params());
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
        let c = compose(false, "luo.mode=boot");
        assert_eq!(c, format!("{BASE} luo.mode=boot"));
        assert!(!c.contains("clearcpuid"));
    }

    #[test]
    fn glibc_tunables_reach_init_as_one_environment_variable() {
        let c = compose(true, "");
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
        assert!(!compose(false, "").contains("GLIBC_TUNABLES"));
        assert!(c.split_whitespace().any(|w| w == "rodata=off"));
        assert!(!compose(false, "").contains("rodata"));
    }

    #[test]
    fn emulation_profile_is_added() {
        let c = compose(true, "");
        assert!(c.contains("luo_emulation"));
        assert!(c.contains("clearcpuid=popcnt,smap"));
        assert!(!c.ends_with(' '));
    }
}
