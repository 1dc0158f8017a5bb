//! Shared helpers of the integration tests: they run the real `luo-vmm` binary against
//! the real reference guest on /dev/kvm, as a user would.

#![allow(dead_code)]

use std::process::{Command, Output};
use std::sync::OnceLock;

/// The luo-vmm binary cargo built for these tests.
pub const LUO_VMM: &str = env!("CARGO_BIN_EXE_luo-vmm");

/// Generous limit for one guest run: an instruction-emulating KVM boots in minutes.
pub const GUEST_TIMEOUT_S: &str = "1500";

/// Runs luo-vmm with `args`, console on stdout, and returns its output.
pub fn luo_vmm(args: &[&str]) -> Output {
    let out = Command::new(LUO_VMM)
        .args(args)
        .output()
        .expect("cannot start luo-vmm");
    eprintln!(
        "$ luo-vmm {}\n--- stdout (tail) ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        tail(&String::from_utf8_lossy(&out.stdout), 40),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Builds the reference guest once per test binary (the build script caches across
/// binaries), so that parallel tests never race on the first build.
pub fn reference_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = luo_vmm(&["image", "build"]);
        assert!(out.status.success(), "building the reference guest failed");
    });
}

/// stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
