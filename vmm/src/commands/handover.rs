//! `luo-vmm handover` and `luo-vmm selftest`: a workload of the guest agent, and, when it
//! hands over, the LUO live update intercepted and reported from outside.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use luo_devices::Gates;
use luo_handover::symbols::{
    KernelSymbols, SymbolError, SYM_BOOT_PARAMS, SYM_KHO_OUT, SYM_LIVEUPDATE_REBOOT,
    SYM_MACHINE_KEXEC, SYM_START_KERNEL,
};
use luo_protocol::workload::Workload;
use thiserror::Error;

use crate::config::options::{GuestOptions, InterceptOptions};
use crate::machine::vm::RunObserver;
use crate::report::{build_report, RunReport};
use crate::run::guest::{run_guest, GuestError, GuestOutcome, ResolvedGuest};
use crate::watch::intercept::{Interception, Interceptor};

/// Errors of running a handover (the report itself is never an error).
#[derive(Debug, Error)]
pub enum HandoverRunError {
    /// Running the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Reading a kernel's symbols.
    #[error("{path}: {source}")]
    Symbols {
        /// The vmlinux.
        path: PathBuf,
        /// What is wrong with it.
        source: SymbolError,
    },
    /// Reading a kernel file.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The vmlinux.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn symbols(path: &Path) -> Result<KernelSymbols, HandoverRunError> {
    let data = std::fs::read(path).map_err(|source| HandoverRunError::Io {
        path: path.into(),
        source,
    })?;
    KernelSymbols::from_elf(&data).map_err(|source| HandoverRunError::Symbols {
        path: path.into(),
        source,
    })
}

fn address(syms: &KernelSymbols, path: &Path, name: &str) -> Result<u64, HandoverRunError> {
    syms.address(name)
        .map_err(|source| HandoverRunError::Symbols {
            path: path.into(),
            source,
        })
}

/// The interceptor for `guest`'s kernel (and the next kernel's symbols, when given).
fn interceptor(
    guest: &ResolvedGuest,
    intercept: &InterceptOptions,
) -> Result<Interceptor, HandoverRunError> {
    let vmlinux = &guest.kernel;
    let next = intercept.next_kernel.as_ref().unwrap_or(vmlinux);
    let (first, second) = (symbols(vmlinux)?, symbols(next)?);
    let bps = [
        address(&first, vmlinux, SYM_LIVEUPDATE_REBOOT)?,
        address(&first, vmlinux, SYM_MACHINE_KEXEC)?,
        address(&second, next, SYM_START_KERNEL)?,
    ];
    let boot_params = address(&second, next, SYM_BOOT_PARAMS)?;
    // Only `--verify-digest` needs it; a kernel without KHO lacks it, which the digest
    // reports as its reason.
    let kho_out = first
        .address(SYM_KHO_OUT)
        .map_err(|e| format!("{}: {e}", vmlinux.display()));
    Ok(Interceptor::new(
        bps,
        kho_out,
        boot_params,
        intercept.clone(),
    ))
}

/// Runs `workload` in `guest` and builds its report. A workload that hands over runs
/// intercepted (unless `--no-intercept`); one that does not (a single-stage selftest)
/// runs without breakpoints and its report has no rounds.
pub(crate) fn run_workload(
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    intercept: &InterceptOptions,
    workload: Workload,
) -> Result<(GuestOutcome, RunReport), HandoverRunError> {
    let interceptor = if workload.hands_over() {
        Some(Arc::new(interceptor(guest, intercept)?))
    } else {
        None
    };
    let observer = interceptor.clone().map(|i| i as Arc<dyn RunObserver>);
    // An injected handover is judged `crashed` on a WARN too: make the kernel say so.
    let injected_opts;
    let opts = if intercept.inject.is_empty() {
        opts
    } else {
        injected_opts = GuestOptions {
            cmdline: format!("{} panic_on_warn=1", opts.cmdline),
            ..opts.clone()
        };
        &injected_opts
    };
    let outcome = run_guest(
        opts,
        guest,
        &workload.kernel_params(),
        observer,
        Gates::default(),
    )?;
    let interception = interceptor
        .map(|i| i.finish(outcome.started))
        .unwrap_or_else(Interception::empty);
    let report = build_report(&outcome, interception, opts, guest, workload);
    Ok((outcome, report))
}
