//! luo-vmm: a small KVM virtual machine monitor that runs Linux guests through Live
//! Update (LUO over KHO) handovers and observes them from outside.
//!
//! The binary parses [`options::Cli`] and hands its command to [`commands::run`]. The
//! public surface is that, and the typed [`report`] that `--json` writes and the tests
//! read back; everything else is the crate's own.

pub(crate) mod agent;
pub(crate) mod arch;
pub(crate) mod cmdline;
pub mod commands;
pub(crate) mod console_input;
pub(crate) mod debug;
pub(crate) mod dirty;
pub(crate) mod guest;
pub(crate) mod handover;
pub(crate) mod host;
pub(crate) mod image;
pub(crate) mod layout;
pub(crate) mod loader;
pub(crate) mod memory;
pub mod options;
pub mod report;
pub mod scenario;
pub mod soak;
pub mod trace;
pub(crate) mod vcpu;
pub(crate) mod vm;
