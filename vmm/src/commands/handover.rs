//! `luo-vmm handover` and `luo-vmm selftest`: a workload of the guest agent, and, when it
//! hands over, the LUO live update intercepted and reported from outside.

use std::path::PathBuf;
use std::sync::Arc;

use luo_devices::Gates;
use luo_handover::symbols::SymbolError;
use luo_protocol::workload::Workload;
use thiserror::Error;

use crate::config::options::{GuestOptions, InterceptOptions};
use crate::machine::vm::RunObserver;
use crate::report::{build_report, RunReport};
use crate::run::guest::{run_guest, GuestError, GuestOutcome, ResolvedGuest};
use crate::run::kernel::{load_symbols, KernelFileError};
use crate::watch::intercept::{Interception, Interceptor, MissingSymbol};

/// Errors of running a handover (the report itself is never an error).
#[derive(Debug, Error)]
pub enum HandoverRunError {
    /// Running the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A kernel file the interception needs.
    #[error(transparent)]
    Kernel(#[from] KernelFileError),
    /// A symbol the interception needs.
    #[error("{}: {source}", path.display())]
    Symbols {
        /// The vmlinux.
        path: PathBuf,
        /// The missing symbol.
        source: SymbolError,
    },
}

/// The interceptor for `guest`'s kernel (and the next kernel's symbols, when given).
fn interceptor(
    guest: &ResolvedGuest,
    intercept: &InterceptOptions,
) -> Result<Interceptor, HandoverRunError> {
    let vmlinux = &guest.kernel;
    let next = intercept.next_kernel.as_ref().unwrap_or(vmlinux);
    let first = load_symbols(vmlinux)?;
    let other;
    let second = if next == vmlinux {
        &first
    } else {
        other = load_symbols(next)?;
        &other
    };
    Interceptor::for_kernels(&first, second, intercept.clone()).map_err(|e| {
        let (path, source) = match e {
            MissingSymbol::Outgoing(source) => (vmlinux, source),
            MissingSymbol::Next(source) => (next, source),
        };
        HandoverRunError::Symbols {
            path: path.clone(),
            source,
        }
    })
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
