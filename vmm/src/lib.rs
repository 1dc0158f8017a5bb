//! luo-vmm: a small KVM virtual machine monitor that runs Linux guests through Live
//! Update (LUO over KHO) handovers and observes them from outside.

pub mod arch;
pub mod cmdline;
pub mod console_input;
pub mod debug;
pub mod dirty;
pub mod guest;
pub mod handover;
pub mod host;
pub mod image;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod soak;
pub mod summary;
pub mod trace;
pub mod vcpu;
pub mod vm;
