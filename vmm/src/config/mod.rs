//! What a user asks for, parsed and validated before any guest boots: the command line's
//! options, scenario files, `--trace`/`--peek` specs, and which guest image. Imports only
//! `machine/` (its limits: vCPUs, memory sizes).

pub(crate) mod image;
pub mod options;
pub(crate) mod scenario;
pub(crate) mod trace;
