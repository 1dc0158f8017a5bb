//! `luo-protocol`: the one contract between luo-vmm and its guest agent.
//!
//! Everything both sides must agree on lives here, once:
//!
//! - [`probe`]: the probe device's I/O ports, its read registers (signature, version,
//!   gates) and the frame format of what the agent writes;
//! - [`message`]: what a frame carries (marks, the agent's verdict, a selftest's exit
//!   status and TAP counts, the online CPU count, the stage-1 inventory, actions
//!   announced with their result, gates) and its byte encoding, with the one decoder the
//!   VMM runs on hostile guest bytes ([`Decoder`]);
//! - [`mark`]: the six marks of a handover, the one `Mark` type of the project;
//! - [`workload`]: what the agent is asked to do, its bounds, and its `luo.*` kernel
//!   command-line form (one renderer, one parser);
//! - [`script`]: a scenario's guest workload per stage and thread, and its `luo.script*`
//!   form;
//! - [`session`]: LUO sessions and their memfds as the workloads number and name them
//!   (bounds, tokens, session names, sizes);
//! - [`tap`]: counting a kselftest's TAP output in the guest;
//! - [`kexec`]: which kernel image each handover kexecs (the next kernels luo-vmm puts
//!   into the initramfs).
//!
//! Modules import downwards only: `probe`, `mark`, `tap`, `kexec` and `session` import no other
//! module; `script` imports `probe` and `session`; `workload` imports `script` and
//! `session`; `message` imports `mark`, `probe`, `tap`, `session` and `workload`.
//!
//! The crate has no dependencies (the agent links it into the guest's static `/init`) and
//! no `unsafe`. docs/protocol.md has the whole protocol in one table.

#![forbid(unsafe_code)]

pub mod kexec;
pub mod mark;
pub mod message;
pub mod probe;
pub mod script;
pub mod session;
pub mod tap;
pub mod workload;

pub use mark::Mark;
pub use message::{
    Action, AgentVerdict, DecodeError, Decoder, ExitStatus, FailedStep, Feed, Message, Outcome,
    SelftestResult, Whose,
};
pub use probe::{Frame, Gate};
pub use session::SessionName;
pub use tap::TapCounts;
pub use workload::{AgentConfig, Memfds, Progress, Selftest, Stage, Workload, WorkloadError};
