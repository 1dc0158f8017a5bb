//! The `luo-vmm` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use std::sync::Arc;

use luo_handover::symbols::KernelSymbols;
use luo_vmm::guest::{report_exit, run_guest, with_reference_image, GuestRequest, Profile};
use luo_vmm::handover::report::render_text;
use luo_vmm::handover::{
    run_handover, write_json, Fault, HandoverError, HandoverRequest, InterceptOptions, Workload,
};
use luo_vmm::image::{ensure_image, ensure_reference_image};
use luo_vmm::memory::parse_size;
use luo_vmm::soak::{self, SoakPlan};
use luo_vmm::summary;
use luo_vmm::trace::{PeekSpec, TraceSpec, Tracer};
use luo_vmm::vm::RunObserver;

#[derive(Parser)]
#[command(
    name = "luo-vmm",
    version,
    about = "Run Linux guests through Live Update handovers on /dev/kvm and show what happens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the reference guest unless --kernel is given) until it reboots.
    Boot {
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Boot a guest K times, P at a time, and count clean runs and distinct failures.
    Soak(SoakArgs),
    /// Run a LUO live update in the guest, intercept it, and report every phase.
    Handover(HandoverArgs),
    /// Run one of the kernel's own LUO selftests across a real handover; its result is
    /// the exit status.
    Selftest(SelftestArgs),
    /// Turn handover JSON reports into a table and an SVG of blackout per phase.
    Report {
        /// JSON reports written by `handover --json`.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Where to write the SVG picture.
        #[arg(long, default_value = "handover-phases.svg")]
        svg: PathBuf,
        /// Title of the picture.
        #[arg(long, default_value = "luo-vmm: blackout per phase")]
        title: String,
    },
    /// The reference guest image.
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
}

#[derive(Subcommand)]
enum ImageAction {
    /// Build the reference guest (kernel, selftests, initramfs) unless it is cached.
    Build {
        /// A kernel variant of guest-images/variants instead of the reference kernel.
        #[arg(long)]
        variant: Option<String>,
    },
}

#[derive(Args)]
struct GuestArgs {
    /// Kernel image: ELF vmlinux or bzImage. Default: the reference guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (uncompressed cpio recommended on an emulating KVM).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel parameters, after luo-vmm's console/reboot ones.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory, e.g. 512M or 8G.
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Give up after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Also write the guest console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Guest profile: auto picks the emulation-safe one only on an emulating KVM.
    #[arg(long, value_enum, default_value_t = Profile::Auto)]
    profile: Profile,
    /// Enter an ELF vmlinux through the 64-bit boot protocol even if it has a PVH entry.
    #[arg(long)]
    no_pvh: bool,
    /// Do not echo the guest console to stdout.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct SoakArgs {
    /// How many boots.
    #[arg(long, default_value_t = 10)]
    boots: u32,
    /// How many boots run at a time (2 oversubscribes a 2-core host with 2-vCPU guests).
    #[arg(long, default_value_t = 1)]
    parallel: u32,
    /// Where each boot's logs go: boot-NNN.log (console), boot-NNN.vmm.log (luo-vmm).
    #[arg(long, default_value = "soak-logs")]
    log_dir: PathBuf,
    /// Arguments for every `luo-vmm boot`, after `--`: e.g. `-- --vcpus 2 --timeout 600`.
    #[arg(last = true)]
    boot_args: Vec<String>,
}

#[derive(Args)]
struct TraceArgs {
    /// Stop a vCPU each time it reaches this kernel address (SYMBOL or SYMBOL+OFFSET, at
    /// most four), print its registers, MSRs and peeks, and let it go on.
    #[arg(long, value_name = "SYMBOL[+OFFSET]")]
    trace: Vec<TraceSpec>,
    /// With --trace: also print guest memory at BASE[+|-OFFSET][:LEN], BASE a register
    /// (rax..r15, rsp, rip), fs, gs, an address, or [BASE+-OFFSET] (the u64 stored
    /// there); read through the vCPU's page tables.
    #[arg(long, value_name = "BASE[+-OFFSET][:LEN]", requires = "trace")]
    peek: Vec<PeekSpec>,
    /// With --trace: print at most this many hits of each traced address.
    #[arg(long, default_value_t = 20, requires = "trace")]
    trace_max: u32,
}

#[derive(Args)]
struct InterceptArgs {
    /// vmlinux of the next kernel, for its symbols (default: the first kernel's).
    #[arg(long)]
    next_kernel: Option<PathBuf>,
    /// Also compare SHA-256 digests of every preserved extent at point-of-no-return and
    /// next-kernel-start (copies guest RAM at point-of-no-return).
    #[arg(long)]
    verify_digest: bool,
    /// Do not log dirty pages during the kexec (no in-place proof; measures the cost of
    /// the interception).
    #[arg(long)]
    no_dirty_log: bool,
    /// Save the KHO pages read at the first next-kernel-start, and what was parsed from
    /// them, as a luo-handover test fixture in this directory.
    #[arg(long)]
    capture_fixture: Option<PathBuf>,
    /// Arm no breakpoints and log no dirty pages: only the guest agent's marks are timed.
    #[arg(long)]
    no_intercept: bool,
    /// Inject a fault into the handover metadata at next-kernel-start.
    #[arg(long, value_enum)]
    inject: Option<Fault>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct HandoverArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    intercept: InterceptArgs,
    /// LUO sessions to preserve.
    #[arg(long, default_value_t = 1)]
    sessions: u32,
    /// memfds per session.
    #[arg(long, default_value_t = 1)]
    files: u32,
    /// Size of each memfd, e.g. 1M.
    #[arg(long, default_value = "1M", value_parser = parse_size_arg)]
    memfd_size: u64,
    /// Consecutive handovers in one VM.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

#[derive(Args)]
struct SelftestArgs {
    /// Selftest name: luo_kexec_simple, luo_multi_session, luo_stress_sessions,
    /// luo_stress_files.
    name: String,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    intercept: InterceptArgs,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_mem(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

impl GuestArgs {
    fn request(&self) -> GuestRequest {
        GuestRequest {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_size: self.mem,
            vcpus: self.vcpus,
            timeout: self.timeout.map(Duration::from_secs),
            console_log: self.console_log.clone(),
            profile: self.profile,
            prefer_64bit: self.no_pvh,
            echo_console: !self.quiet,
        }
    }
}

fn handover(
    guest: &GuestArgs,
    intercept: &InterceptArgs,
    workload: Workload,
) -> Result<i32, HandoverError> {
    let req = HandoverRequest {
        guest: guest.request(),
        next_vmlinux: intercept.next_kernel.clone(),
        workload,
        intercept: InterceptOptions {
            verify_digest: intercept.verify_digest,
            no_dirty_log: intercept.no_dirty_log,
            no_intercept: intercept.no_intercept,
            capture_fixture: intercept.capture_fixture.clone(),
            inject: intercept.inject,
        },
    };
    let (outcome, report) = run_handover(&req)?;
    let guest_status = report_exit(&outcome);
    print!("{}", render_text(&report));
    if let Some(path) = &intercept.json {
        write_json(&report, path)?;
        eprintln!("luo-vmm: JSON report written to {}", path.display());
    }
    Ok(if report.first.verified && guest_status == 0 {
        0
    } else if guest_status != 0 {
        guest_status
    } else {
        4
    })
}

fn soak(a: &SoakArgs) -> Result<i32, Box<dyn std::error::Error>> {
    let plan = SoakPlan {
        boots: a.boots,
        parallel: a.parallel,
        boot_args: a.boot_args.clone(),
        log_dir: a.log_dir.clone(),
    };
    plan.validate()?;
    // This very binary, even if a rebuild has replaced the file since it started.
    let exe = PathBuf::from("/proc/self/exe");
    // Build (or find) the reference image once, not in every child at the same time.
    if !a.boot_args.iter().any(|x| x == "--kernel") {
        ensure_reference_image()?;
    }
    let results = soak::run(&exe, &plan)?;
    print!("{}", soak::summary(&results));
    Ok(i32::from(results.iter().any(|r| r.failure.is_some())))
}

fn boot(args: &GuestArgs, trace: &TraceArgs) -> Result<i32, Box<dyn std::error::Error>> {
    let mode = if args.kernel.is_none() {
        "luo.mode=boot"
    } else {
        ""
    };
    let (req, _) = with_reference_image(&args.request())?;
    let observer: Option<Arc<dyn RunObserver>> = if trace.trace.is_empty() {
        None
    } else {
        let kernel = req.kernel.clone().unwrap_or_default();
        let data = std::fs::read(&kernel)
            .map_err(|e| format!("--trace: cannot read {}: {e}", kernel.display()))?;
        let symbols = KernelSymbols::from_elf(&data).map_err(|e| {
            format!(
                "--trace needs an ELF vmlinux with symbols ({}): {e}",
                kernel.display()
            )
        })?;
        Some(Arc::new(Tracer::new(
            &symbols,
            &trace.trace,
            trace.peek.clone(),
            trace.trace_max,
        )?))
    };
    let outcome = run_guest(&req, mode, observer)?;
    let status = report_exit(&outcome);
    if status != 0 || args.kernel.is_some() {
        return Ok(status);
    }
    // The reference guest's agent reports how many CPUs its kernel brought up.
    match outcome.agent.cpus_online.first() {
        Some(&n) if n == u32::from(args.vcpus) => Ok(0),
        Some(&n) => {
            eprintln!("luo-vmm: the guest brought up {n} of {} CPUs", args.vcpus);
            Ok(1)
        }
        None => {
            eprintln!("luo-vmm: the guest reset before its agent reported");
            Ok(1)
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result: Result<i32, Box<dyn std::error::Error>> = match cli.command {
        Command::Boot { guest, trace } => boot(&guest, &trace),
        Command::Soak(a) => soak(&a),
        Command::Handover(a) => {
            let workload = Workload::Memfds {
                sessions: a.sessions,
                files: a.files,
                memfd_size: a.memfd_size,
                repeat: a.repeat,
            };
            handover(&a.guest, &a.intercept, workload).map_err(Into::into)
        }
        Command::Selftest(a) => {
            handover(&a.guest, &a.intercept, Workload::Selftest(a.name.clone())).map_err(Into::into)
        }
        Command::Report {
            reports,
            svg,
            title,
        } => summary::load(&reports)
            .and_then(|runs| {
                print!("{}", summary::table(&runs));
                summary::write_svg(&svg, &summary::svg(&runs, &title))?;
                eprintln!("luo-vmm: picture written to {}", svg.display());
                Ok(0)
            })
            .map_err(Into::into),
        Command::Image {
            action: ImageAction::Build { variant },
        } => ensure_image(variant.as_deref())
            .map(|img| {
                println!("{}", img.dir.display());
                0
            })
            .map_err(Into::into),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("luo-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}
