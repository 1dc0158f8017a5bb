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

/// The emulation profile's parameters: `luo_emulation` switches on the reference
/// guest's patches (guest-images/patches), `clearcpuid=` hides what cannot run.
pub fn emulation_params() -> String {
    format!(
        "luo_emulation clearcpuid={}",
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
    fn emulation_profile_is_added() {
        let c = compose(true, "");
        assert!(c.contains("luo_emulation"));
        assert!(c.contains("clearcpuid=popcnt,smap"));
        assert!(!c.ends_with(' '));
    }
}
