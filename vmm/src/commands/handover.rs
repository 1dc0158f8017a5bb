//! `luo-vmm handover` and `luo-vmm selftest`: a workload of the guest agent, and, when it
//! hands over, the LUO live update intercepted and reported from outside.

use std::path::PathBuf;
use std::sync::Arc;

use luo_devices::Gates;
use luo_handover::symbols::SymbolError;
use luo_protocol::workload::Workload;
use thiserror::Error;

use crate::config::image::NextSpec;
use crate::config::options::{GuestOptions, InterceptOptions};
use crate::machine::vm::RunObserver;
use crate::report::{build_report, RunReport};
use crate::run::guest::{run_guest, GuestError, GuestOutcome, ResolvedGuest};
use crate::run::kernel::{load_symbols, KernelFileError};
use crate::run::next::{NextKernelError, RunKernels};
use crate::watch::intercept::{Interception, Interceptor, MissingSymbol};
use luo_handover::symbols::KernelSymbols;

/// Errors of running a handover (the report itself is never an error).
#[derive(Debug, Error)]
pub enum HandoverRunError {
    /// Running the guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A kernel file the interception needs.
    #[error(transparent)]
    Kernel(#[from] KernelFileError),
    /// The next kernel's image, or the initramfs that carries it.
    #[error(transparent)]
    Next(#[from] NextKernelError),
    /// The kernels need more breakpoints than a vCPU has.
    #[error("{0}")]
    Breakpoints(String),
    /// A symbol the interception needs.
    #[error("{}: {source}", path.display())]
    Symbols {
        /// The vmlinux.
        path: PathBuf,
        /// The missing symbol.
        source: SymbolError,
    },
}

/// The interceptor of `rounds` handovers through `kernels` (each kernel's symbols loaded
/// once).
pub(crate) fn interceptor(
    kernels: &RunKernels,
    rounds: u32,
    intercept: &InterceptOptions,
) -> Result<Interceptor, HandoverRunError> {
    let symbols = kernels
        .kernels
        .iter()
        .map(|k| load_symbols(&k.vmlinux))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&KernelSymbols> = symbols.iter().collect();
    Interceptor::for_kernels(&refs, kernels.sequence.clone(), rounds, intercept.clone()).map_err(
        |e| match e {
            MissingSymbol::Outgoing(i, source) | MissingSymbol::Next(i, source) => {
                HandoverRunError::Symbols {
                    path: kernels
                        .kernels
                        .get(i)
                        .map(|k| k.vmlinux.clone())
                        .unwrap_or_default(),
                    source,
                }
            }
            other => HandoverRunError::Breakpoints(other.to_string()),
        },
    )
}

/// Runs `workload` in `guest` and builds its report. A workload that hands over runs
/// intercepted (unless `--no-intercept`); one that does not (a single-stage selftest)
/// runs without breakpoints and its report has no rounds.
pub(crate) fn run_workload(
    opts: &GuestOptions,
    guest: &ResolvedGuest,
    intercept: &InterceptOptions,
    next: Option<&NextSpec>,
    workload: Workload,
) -> Result<(GuestOutcome, RunReport), HandoverRunError> {
    let mut cross_guest = guest.clone();
    let kernels = RunKernels::prepare(
        &guest.kernel,
        guest.image.as_ref(),
        &mut cross_guest.initrd,
        next,
        intercept.next.alternate,
    )?;
    let guest = &cross_guest;
    let interceptor = if workload.hands_over() {
        Some(Arc::new(
            interceptor(&kernels, workload.handovers(), intercept)?.with_ids(kernels.ids()),
        ))
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
