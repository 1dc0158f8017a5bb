//! The commands of `luo-vmm`, from parsed options to an exit status.
//!
//! Exit statuses: 0 success; 1 a guest failure (kernel panic, the agent's failing
//! verdict) or an error before the guest ran; 2 the VM died (triple fault, emulation
//! failure); 3 timeout; 4 the guest succeeded but the handover could not be verified.

pub(crate) mod compat;
pub(crate) mod explore;
pub(crate) mod explore_merge;
pub(crate) mod handover;
pub(crate) mod host;
pub(crate) mod scenario;
pub(crate) mod soak;

use std::sync::Arc;

use luo_devices::Gates;
use luo_protocol::workload::Workload;
use thiserror::Error;

use crate::commands::handover::{run_workload, HandoverRunError};
use crate::config::image::ImageSpec;
use crate::run::guest::{exit_status, run_guest, GuestError, ResolvedGuest};
use crate::run::image::{ensure_image, ImageError};
use crate::run::kernel::{load_symbols, KernelFileError};
use clap::Parser;

use crate::config::options::{
    BootArgs, Command, GuestOptions, ImageAction, InterceptOptions, OptionsError, ScenarioAction,
    SoakArgs, TraceOptions,
};
use crate::machine::vm::RunObserver;
use crate::report::{render_text, table, write_json, ReportError};
use crate::watch::trace::{TraceError, Tracer};
use soak::{SoakError, SoakPlan};

/// Exit status of a run whose guest succeeded but whose handover was not verified.
pub const EXIT_NOT_VERIFIED: u8 = 4;

/// Why a command could not run to its end.
#[derive(Debug, Error)]
pub enum CommandError {
    /// Bad options (found before anything ran).
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The reference image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Running a guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Running a handover.
    #[error(transparent)]
    Handover(#[from] HandoverRunError),
    /// Reading or writing a report.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// `boot --trace`.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The kernel named for `--trace` has no symbols, or cannot be read.
    #[error("--trace needs an ELF vmlinux with symbols: {0}")]
    TraceKernel(KernelFileError),
    /// `soak`.
    #[error(transparent)]
    Soak(#[from] SoakError),
    /// `scenario`.
    #[error(transparent)]
    Scenario(#[from] crate::commands::scenario::ScenarioError),
    /// `explore`.
    #[error(transparent)]
    Explore(#[from] crate::commands::explore::ExploreError),
    /// `explore merge`.
    #[error(transparent)]
    ExploreMerge(#[from] crate::commands::explore_merge::MergeCommandError),
    /// `host`: /dev/kvm cannot be opened (missing, no permission).
    #[error(transparent)]
    Kvm(crate::machine::vm::VmError),
    /// `host`: KVM cannot create a VM, or `LUO_VMM_HIDE_CAPS` is wrong.
    #[error(transparent)]
    HostCheck(crate::machine::host::HostError),
    /// Standard output could not be written.
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
    /// `compat`.
    #[error(transparent)]
    Compat(#[from] compat::CompatError),
    /// `soak -- ARGS`: the arguments for `boot` do not parse.
    #[error("soak: the arguments after -- are not `luo-vmm boot` arguments: {0}")]
    SoakBootArgs(String),
}

/// Runs `command`; returns the process exit status.
pub fn run(command: Command) -> Result<u8, CommandError> {
    match command {
        Command::Boot(BootArgs { guest, trace }) => boot(&guest, &trace),
        Command::Soak(args) => soak(&args),
        Command::Host => host::run(),
        Command::Compat(args) => Ok(compat::run(&args)?),
        Command::Explore(args) => match &args.action {
            Some(crate::config::options::ExploreAction::Merge(m)) => Ok(explore_merge::run(m)?),
            None => match explore::run(&args) {
                // Stopped by the user before the search: said, not an error.
                Err(explore::ExploreError::Interrupted(why)) => {
                    eprintln!("luo-vmm: {why}");
                    Ok(explore::EXIT_INTERRUPTED)
                }
                r => Ok(r?),
            },
        },
        Command::Handover(args) => intercepted(&args.guest, &args.intercept, || args.workload()),
        Command::Selftest(args) => intercepted(&args.guest, &args.intercept, || args.workload()),
        Command::Report(args) => {
            let runs = table::load(&args.reports)?;
            print!("{}", table::table(&runs));
            table::write_svg(&args.svg, &table::svg(&runs, &args.title))?;
            eprintln!("luo-vmm: picture written to {}", args.svg.display());
            Ok(0)
        }
        Command::Scenario { action } => match action {
            ScenarioAction::List => {
                print!("{}", crate::commands::scenario::list());
                Ok(0)
            }
            ScenarioAction::Run(args) => Ok(crate::commands::scenario::run(&args)?),
            ScenarioAction::Check(args) => Ok(crate::commands::scenario::check(&args)?),
        },
        Command::Image {
            action: ImageAction::Build { variant, source },
        } => {
            let image = ensure_image(&ImageSpec { variant, source })?;
            println!("{}", image.dir.display());
            Ok(0)
        }
    }
}

/// `luo-vmm handover` and `luo-vmm selftest`: the guest's options, then the workload,
/// then the interception's options checked (in that order, before anything boots), then
/// the run and its report.
fn intercepted(
    guest: &GuestOptions,
    intercept: &InterceptOptions,
    workload: impl FnOnce() -> Result<Workload, OptionsError>,
) -> Result<u8, CommandError> {
    guest.validate()?;
    let workload = workload()?;
    intercept.validate(&workload)?;
    run_and_report(guest, intercept, workload)
}

/// `luo-vmm boot`: the reference guest's agent only reports and reboots; a user's
/// kernel gets no agent parameters. `--trace` arms its diagnostic hooks.
fn boot(opts: &GuestOptions, trace: &TraceOptions) -> Result<u8, CommandError> {
    opts.validate()?;
    let guest = ResolvedGuest::resolve(opts)?;
    let tracer: Option<Arc<Tracer>> = if trace.trace.is_empty() {
        None
    } else {
        let symbols = load_symbols(&guest.kernel).map_err(CommandError::TraceKernel)?;
        Some(Arc::new(Tracer::new(
            &symbols,
            &trace.trace,
            trace.peek.clone(),
            trace.trace_max,
        )?))
    };
    let params = if guest.image.is_some() {
        Workload::Boot.kernel_params()
    } else {
        String::new()
    };
    let observer = tracer.clone().map(|t| t as Arc<dyn RunObserver>);
    let outcome = run_guest(opts, &guest, &params, observer, Gates::default())?;
    if let Some(t) = &tracer {
        eprint!("{}", t.summary());
    }
    Ok(exit_status(&outcome))
}

/// `luo-vmm soak`: K boots, P at a time, each a child `luo-vmm boot`.
fn soak(args: &SoakArgs) -> Result<u8, CommandError> {
    let plan = SoakPlan {
        boots: args.boots,
        parallel: args.parallel,
        boot_args: args.boot_args.clone(),
        log_dir: args.log_dir.clone(),
    };
    plan.validate()?;
    // The children's arguments are checked here, once, before any boot.
    let words = ["luo-vmm", "boot"]
        .into_iter()
        .chain(args.boot_args.iter().map(String::as_str));
    let boot = match crate::config::options::Cli::try_parse_from(words).map(|c| c.command) {
        Ok(Command::Boot(boot)) => boot,
        Ok(_) => unreachable!("parsed as `boot`"),
        Err(e) => return Err(CommandError::SoakBootArgs(e.to_string())),
    };
    boot.guest.validate()?;
    // Build (or find) the image once, not in every child at the same time.
    if boot.guest.kernel.is_none() {
        ensure_image(&boot.guest.image_spec())?;
    }
    // This very binary, even if a rebuild has replaced the file since it started.
    let results = soak::run(std::path::Path::new("/proc/self/exe"), &plan)?;
    print!("{}", soak::summary(&results));
    Ok(u8::from(results.iter().any(|r| r.failure.is_some())))
}

/// `luo-vmm handover` and `luo-vmm selftest`.
fn run_and_report(
    opts: &GuestOptions,
    intercept: &InterceptOptions,
    workload: Workload,
) -> Result<u8, CommandError> {
    let next = intercept.next.spec(workload.handovers())?;
    let guest = ResolvedGuest::resolve(opts)?;
    let (outcome, report) = run_workload(opts, &guest, intercept, next.as_ref(), workload)?;
    let status = exit_status(&outcome);
    print!("{}", render_text(&report));
    if let Some(path) = &intercept.json {
        write_json(&report, path)?;
        eprintln!("luo-vmm: JSON report written to {}", path.display());
    }
    Ok(match (status, report.verified) {
        (0, true) => 0,
        (0, false) => EXIT_NOT_VERIFIED,
        (failed, _) => failed,
    })
}
