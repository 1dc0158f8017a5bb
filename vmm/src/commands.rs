//! The commands of `luo-vmm`, from parsed options to an exit status.
//!
//! Exit statuses: 0 success; 1 a guest failure (kernel panic, the agent's failing
//! verdict) or an error before the guest ran; 2 the VM died (triple fault, emulation
//! failure); 3 timeout; 4 the guest succeeded but the handover could not be verified.

use luo_devices::Gates;
use luo_protocol::workload::Workload;
use thiserror::Error;

use crate::guest::{exit_status, run_guest, GuestError, ResolvedGuest};
use crate::handover::{run_workload, HandoverRunError};
use crate::image::{ensure_reference_image, ImageError};
use crate::options::{Command, GuestOptions, ImageAction, InterceptOptions, OptionsError};
use crate::report::{render_text, table, write_json, ReportError};

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
}

/// Runs `command`; returns the process exit status.
pub fn run(command: Command) -> Result<u8, CommandError> {
    match command {
        Command::Boot(opts) => boot(&opts),
        Command::Handover(args) => {
            args.guest.validate()?;
            let workload = args.workload()?;
            run_and_report(&args.guest, &args.intercept, workload)
        }
        Command::Selftest(args) => {
            args.guest.validate()?;
            let workload = args.workload()?;
            run_and_report(&args.guest, &args.intercept, workload)
        }
        Command::Report(args) => {
            let runs = table::load(&args.reports)?;
            print!("{}", table::table(&runs));
            table::write_svg(&args.svg, &table::svg(&runs, &args.title))?;
            eprintln!("luo-vmm: picture written to {}", args.svg.display());
            Ok(0)
        }
        Command::Image {
            action: ImageAction::Build,
        } => {
            let image = ensure_reference_image()?;
            println!("{}", image.dir.display());
            Ok(0)
        }
    }
}

/// `luo-vmm boot`: the reference guest's agent only reports and reboots; a user's
/// kernel gets no agent parameters.
fn boot(opts: &GuestOptions) -> Result<u8, CommandError> {
    opts.validate()?;
    let guest = ResolvedGuest::resolve(opts)?;
    let params = if guest.image.is_some() {
        Workload::Boot.kernel_params()
    } else {
        String::new()
    };
    let outcome = run_guest(opts, &guest, &params, None, Gates::default())?;
    Ok(exit_status(&outcome))
}

/// `luo-vmm handover` and `luo-vmm selftest`.
fn run_and_report(
    opts: &GuestOptions,
    intercept: &InterceptOptions,
    workload: Workload,
) -> Result<u8, CommandError> {
    let guest = ResolvedGuest::resolve(opts)?;
    let (outcome, report) = run_workload(opts, &guest, intercept, workload)?;
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
