//! What luo-vmm does to a running guest from outside, as [`crate::machine::vm::RunObserver`]s:
//! the handover interception (marks, dirty log, KHO state at next-kernel-start), field
//! injection, a scenario's schedule (holds, gates, fail hooks) and `boot --trace`.

pub(crate) mod capture;
pub(crate) mod guest_ram;
pub(crate) mod injector;
pub(crate) mod intercept;
pub(crate) mod schedule;
pub(crate) mod trace;
