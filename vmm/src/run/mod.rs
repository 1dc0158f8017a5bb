//! One guest run: the image resolved and built, the kernel command line, the VM run to its
//! end, the console's trouble lines, and the agent's probe messages folded once
//! ([`agent::AgentLog`]).

pub(crate) mod agent;
pub(crate) mod cmdline;
pub(crate) mod guest;
pub(crate) mod image;
pub(crate) mod kernel;
pub(crate) mod next;
