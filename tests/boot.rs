//! Booting the reference guest, and the errors a user meets before any guest runs.

mod common;

use common::{luo_vmm, reference_image, text, GUEST_TIMEOUT_S};

#[test]
fn reference_guest_boots_to_the_agent_and_exits_cleanly() {
    reference_image();
    let out = luo_vmm(&["boot", "--timeout", GUEST_TIMEOUT_S]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "luo-vmm boot failed: {:?}",
        out.status
    );
    assert!(
        stdout.contains("Linux version"),
        "no kernel log on the console"
    );
    // The agent's online CPU count, as luo-vmm received it over the probe.
    assert!(
        stderr.contains("after VM start, 1 CPUs online"),
        "no boot time or CPU count reported"
    );
    assert!(stderr.contains("clean exit"));
}

/// Two vCPUs, no retry: before GLIBC_TUNABLES joined the emulation profile, init died in
/// about one two-vCPU boot in twenty here (docs/emulated-kvm.md, "two vCPUs").
#[test]
fn two_vcpus_are_both_brought_up() {
    reference_image();
    let out = luo_vmm(&["boot", "--vcpus", "2", "--timeout", GUEST_TIMEOUT_S]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "luo-vmm boot --vcpus 2 failed: {stderr}"
    );
    // The agent's online CPU count, as luo-vmm received it over the probe.
    assert!(
        stderr.contains("after VM start, 2 CPUs online"),
        "the second vCPU did not start on this KVM: {stderr}"
    );
    assert!(stdout.contains("smp: Brought up 1 node, 2 CPUs"));
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let started = std::time::Instant::now();
    let out = luo_vmm(args);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{args:?} took {:?}: it must fail before any guest boots",
        started.elapsed()
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{args:?} must fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got {stderr}");
    assert!(
        errors[0].contains(needle),
        "{:?} lacks {needle:?}",
        errors[0]
    );
}

#[test]
fn bad_inputs_give_one_line_errors() {
    assert_one_line_error(
        &["boot", "--kernel", "/nonexistent"],
        "/nonexistent does not exist",
    );

    let junk = std::env::temp_dir().join(format!("luo-junk-kernel-{}", std::process::id()));
    // Deterministic pseudo-random bytes (xorshift), not a valid image of any kind.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(&junk, bytes).unwrap();
    let junk_path = junk.to_str().unwrap();
    assert_one_line_error(
        &["boot", "--kernel", junk_path],
        "neither an ELF vmlinux nor a bzImage",
    );
    std::fs::remove_file(&junk).unwrap();

    assert_one_line_error(
        &["boot", "--kernel", "/nonexistent", "--mem", "1K"],
        "memory size 1024 bytes is out of range",
    );
    assert_one_line_error(
        &["boot", "--vcpus", "9", "--kernel", "/nonexistent"],
        "'9' for '--vcpus <N>': luo-vmm runs 1 to 8 vCPUs",
    );
    assert_one_line_error(
        &["soak", "--boots", "0"],
        "--boots and --parallel must be at least 1",
    );
}

#[test]
fn a_trace_of_an_unknown_symbol_is_refused_before_the_guest_boots() {
    reference_image();
    assert_one_line_error(
        &["boot", "--trace", "no_such_symbol_anywhere"],
        "--trace no_such_symbol_anywhere: symbol \"no_such_symbol_anywhere\" not found",
    );
    assert_one_line_error(
        &["boot", "--trace", "a b"],
        "expected SYMBOL or SYMBOL+OFFSET",
    );
    assert_one_line_error(
        &["boot", "--trace", "start_kernel", "--peek", "rzz"],
        "--peek rzz",
    );
}

#[test]
fn workloads_out_of_bounds_fail_before_any_guest_boots() {
    for (args, needle) in [
        (
            &["handover", "--files", "100000"][..],
            "--files 100000 is out of range",
        ),
        (
            &["handover", "--sessions", "0"],
            "--sessions 0 is out of range",
        ),
        (&["handover", "--repeat", "0"], "--repeat 0 is out of range"),
        (
            &["handover", "--memfd-size", "0"],
            "--memfd-size 0 is out of range",
        ),
        (
            &["selftest", "no_such_test"],
            "no selftest \"no_such_test\"",
        ),
    ] {
        assert_one_line_error(args, needle);
    }
}

#[test]
fn a_guest_out_of_time_shows_where_every_vcpu_was() {
    reference_image();
    let out = luo_vmm(&["boot", "--vcpus", "2", "--quiet", "--timeout", "5"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "a timeout exits 3: {stderr}");
    assert!(stderr.contains("did not finish within 5 s (timeout)"));
    for id in 0..2 {
        assert!(
            stderr.contains(&format!("at the timeout, vCPU {id}: rip=")),
            "no registers of vCPU {id}: {stderr}"
        );
    }
}

/// `luo-vmm host` names the KVM (here the emulating `kvm_pvm`), the profile `auto` picks,
/// and every capability luo-vmm checks with what it does about it; it runs no guest.
#[test]
fn host_reports_the_kvm_the_profile_and_every_capability() {
    let started = std::time::Instant::now();
    let out = luo_vmm(&["host"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "luo-vmm host failed: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(stdout.contains("KVM:            emulated: "), "{stdout}");
        assert!(stdout.contains("kvm_pvm"), "{stdout}");
        assert!(stdout.contains("--profile auto picks the emulation profile"));
        assert!(stdout.contains("luo_emulation clearcpuid="));
        assert!(stdout.contains("this KVM ignores KVM_SET_CPUID2"));
    } else {
        assert!(stdout.contains("--profile auto picks the"), "{stdout}");
    }
    assert!(stdout.contains("host kernel:    Linux "));
    assert!(stdout.contains("/dev/kvm:       usable: KVM API version 12"));
    for cap in [
        "KVM_GUESTDBG_BLOCKIRQ",
        "KVM_GUESTDBG_INJECT_DB",
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        "KVM_CAP_TSC_DEADLINE_TIMER",
        "KVM_CAP_XSAVE2",
        "KVM_CAP_KVMCLOCK_CTRL",
        "KVM_CAP_X2APIC_API",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(cap))
            .unwrap_or_else(|| panic!("{cap} is not reported: {stdout}"));
        assert!(
            [" used: ", " fallback: ", " not needed: "]
                .iter()
                .any(|s| line.contains(s)),
            "{cap} has no state: {line}"
        );
    }
    for feature in [
        "LA57 (5-level paging)",
        "x2APIC",
        "XSAVE size, all (0xD.0 ECX)",
    ] {
        assert!(stdout.contains(feature), "no {feature}: {stdout}");
    }
    assert!(stdout.contains("verdict: guests can run here"));

    // A capability hidden as if KVM lacked it shows its fallback.
    let out = std::process::Command::new(common::LUO_VMM)
        .arg("host")
        .env("LUO_VMM_HIDE_CAPS", "KVM_GUESTDBG_BLOCKIRQ")
        .output()
        .unwrap();
    let (stdout, _) = text(&out);
    let blockirq = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("KVM_GUESTDBG_BLOCKIRQ"))
        .unwrap();
    assert!(
        blockirq.contains(" fallback: the guest's RFLAGS.IF is cleared"),
        "{blockirq}"
    );
}
