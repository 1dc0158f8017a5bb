//! x86_64 boot structures, computed by pure functions (no KVM needed) and then written
//! into guest memory or handed to KVM by the caller.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod paging;
pub mod pvh;
pub mod regs;
