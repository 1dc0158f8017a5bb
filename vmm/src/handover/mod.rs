//! `luo-vmm handover` and `luo-vmm selftest`: a real LUO live update inside the guest,
//! intercepted and reported from outside.

pub mod fixture;
pub mod guest_ram;
pub mod intercept;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use luo_handover::symbols::{KernelSymbols, SymbolError};
use thiserror::Error;

use crate::guest::{run_guest, with_reference_image, GuestError, GuestOutcome, GuestRequest};
use crate::image::ImageError;
pub use intercept::{Fault, InterceptOptions, Interceptor, BREAKPOINT_SYMBOLS};
pub use report::{build_report, RunReport};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum HandoverError {
    /// The reference image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Running the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Reading a kernel's symbols.
    #[error("{path}: {source}")]
    Symbols { path: PathBuf, source: SymbolError },
    /// Reading a kernel file.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Writing the JSON report.
    #[error("cannot write the JSON report to {path}: {source}")]
    Json {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the guest agent is asked to do across the handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Our agent's sessions of preserved memfds.
    Memfds {
        /// Sessions.
        sessions: u32,
        /// memfds per session.
        files: u32,
        /// Bytes per memfd.
        memfd_size: u64,
        /// Consecutive handovers.
        repeat: u32,
    },
    /// One of the kernel's own LUO selftests (tools/testing/selftests/liveupdate).
    Selftest(String),
}

impl Workload {
    /// The agent's parameters on the kernel command line.
    pub fn cmdline(&self) -> String {
        match self {
            Workload::Memfds {
                sessions,
                files,
                memfd_size,
                repeat,
            } => format!(
                "liveupdate=1 luo.mode=handover luo.sessions={sessions} luo.files={files} luo.memfd_size={memfd_size} luo.repeat={repeat}"
            ),
            Workload::Selftest(name) => format!("liveupdate=1 luo.mode=selftest:{name}"),
        }
    }
}

/// A handover run.
#[derive(Debug, Clone)]
pub struct HandoverRequest {
    /// The guest (kernel, initrd, memory, vCPUs, ...).
    pub guest: GuestRequest,
    /// vmlinux of the next kernel, for its symbols (default: the first kernel's).
    pub next_vmlinux: Option<PathBuf>,
    /// What the agent does.
    pub workload: Workload,
    /// Interception options.
    pub intercept: InterceptOptions,
}

fn symbols(path: &Path) -> Result<KernelSymbols, HandoverError> {
    let data = std::fs::read(path).map_err(|source| HandoverError::Io {
        path: path.into(),
        source,
    })?;
    KernelSymbols::from_elf(&data).map_err(|source| HandoverError::Symbols {
        path: path.into(),
        source,
    })
}

fn address(syms: &KernelSymbols, path: &Path, name: &str) -> Result<u64, HandoverError> {
    syms.address(name).map_err(|source| HandoverError::Symbols {
        path: path.into(),
        source,
    })
}

/// Runs the handover and builds its report.
pub fn run_handover(req: &HandoverRequest) -> Result<(GuestOutcome, RunReport), HandoverError> {
    let (guest, image) = with_reference_image(&req.guest)?;
    let vmlinux = guest.kernel.clone().unwrap_or_default();
    let next = req.next_vmlinux.clone().unwrap_or_else(|| vmlinux.clone());
    let (first, second) = (symbols(&vmlinux)?, symbols(&next)?);
    let bps = [
        address(&first, &vmlinux, BREAKPOINT_SYMBOLS[0])?,
        address(&first, &vmlinux, BREAKPOINT_SYMBOLS[1])?,
        address(&second, &next, BREAKPOINT_SYMBOLS[2])?,
    ];
    let boot_params = address(&second, &next, "boot_params")?;
    let interceptor = Arc::new(Interceptor::new(bps, boot_params, req.intercept.clone()));
    let mut outcome = run_guest(&guest, &req.workload.cmdline(), Some(interceptor.clone()))?;
    outcome.image = outcome.image.or(image);
    let interception = interceptor.finish(outcome.started);
    let report = build_report(&outcome, interception, req);
    Ok((outcome, report))
}

/// Writes `report` as JSON to `path`.
pub fn write_json(report: &RunReport, path: &Path) -> Result<(), HandoverError> {
    let json =
        serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    std::fs::write(path, json + "\n").map_err(|source| HandoverError::Json {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_command_lines() {
        let w = Workload::Memfds {
            sessions: 3,
            files: 2,
            memfd_size: 8 << 20,
            repeat: 1,
        };
        assert_eq!(
            w.cmdline(),
            "liveupdate=1 luo.mode=handover luo.sessions=3 luo.files=2 luo.memfd_size=8388608 luo.repeat=1"
        );
        assert_eq!(
            Workload::Selftest("luo_kexec_simple".into()).cmdline(),
            "liveupdate=1 luo.mode=selftest:luo_kexec_simple"
        );
    }
}
