//! Which kernel image the agent kexecs: the contract between luo-vmm, which puts the next
//! kernels into the guest's initramfs, and the agent, which loads one per handover.
//!
//! The reference initramfs carries the kernel it booted as [`OWN_KERNEL`]. For a
//! cross-kernel run luo-vmm appends a second cpio archive (the kernel unpacks concatenated
//! newc archives in order, `init/initramfs.c`) holding the kernels of the cycle as
//! `NEXT_KERNEL_DIR/0`, `/1`, ...: handover `r` (0-based: `r` handovers done before it)
//! kexecs `NEXT_KERNEL_DIR/(r % count)`. A cycle of one (`0` = kernel B) gives A→B→B...,
//! a cycle of two (`0` = B, `1` = A) the alternation A→B→A→...; no directory gives the
//! old behaviour, each kernel kexecing [`OWN_KERNEL`]. The initramfs is retained
//! (`retain_initrd`) and handed to every next kernel, so every kernel of the run sees the
//! same cycle.

/// The image the reference initramfs carries: the kernel it was built with.
pub const OWN_KERNEL: &str = "/boot/bzImage";
/// Where luo-vmm puts the kernels of a cross-kernel run, named `0`, `1`, ...
pub const NEXT_KERNEL_DIR: &str = "/boot/next";
/// Most kernels in a cycle.
pub const MAX_CYCLE: usize = 8;

/// The path of cycle entry `index` (`/boot/next/0`).
pub fn cycle_entry(index: usize) -> String {
    format!("{NEXT_KERNEL_DIR}/{index}")
}

/// The image handover `round` loads (`round`: handovers done before it) when the
/// initramfs holds a cycle of `count` kernels ([`OWN_KERNEL`] when `count` is 0).
pub fn kernel_for_round(round: u32, count: usize) -> String {
    if count == 0 {
        return OWN_KERNEL.to_owned();
    }
    // u32 -> usize never truncates on the 32- and 64-bit targets the agent runs on.
    cycle_entry(round as usize % count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_walk_the_cycle() {
        assert_eq!(kernel_for_round(0, 0), "/boot/bzImage");
        assert_eq!(kernel_for_round(7, 0), "/boot/bzImage");
        assert_eq!(kernel_for_round(0, 1), "/boot/next/0");
        assert_eq!(kernel_for_round(3, 1), "/boot/next/0");
        // Alternation: B, A, B, ...
        let alternate: Vec<String> = (0..4).map(|r| kernel_for_round(r, 2)).collect();
        assert_eq!(
            alternate,
            [
                "/boot/next/0",
                "/boot/next/1",
                "/boot/next/0",
                "/boot/next/1"
            ]
        );
        assert_eq!(cycle_entry(MAX_CYCLE - 1), "/boot/next/7");
    }
}
