//! The machine: a VM on `/dev/kvm` built from a [`vm::MachineSpec`] that knows nothing of
//! the command line, its vCPUs, the boot structures, guest memory and its dirty log, the
//! hardware breakpoints, and what the host's KVM offers. Nothing here imports a module
//! outside `machine/`.

pub(crate) mod arch;
pub(crate) mod console_input;
pub(crate) mod debug;
pub(crate) mod dirty;
pub(crate) mod event_loop;
pub(crate) mod host;
pub(crate) mod layout;
pub(crate) mod loader;
pub(crate) mod memory;
pub(crate) mod snapshot;
pub(crate) mod vcpu;
pub(crate) mod vm;
