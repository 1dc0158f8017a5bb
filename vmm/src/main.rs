//! The `luo-vmm` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use luo_vmm::guest::{report_exit, run_guest, GuestRequest, Profile};
use luo_vmm::image::ensure_reference_image;
use luo_vmm::memory::parse_size;

#[derive(Parser)]
#[command(name = "luo-vmm", version, about = "Run Linux guests through Live Update handovers on /dev/kvm and show what happens")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the reference guest unless --kernel is given) until it reboots.
    Boot(GuestArgs),
    /// The reference guest image.
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
}

#[derive(Subcommand)]
enum ImageAction {
    /// Build the reference guest (kernel, selftests, initramfs) unless it is cached.
    Build,
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result: Result<i32, Box<dyn std::error::Error>> = match cli.command {
        Command::Boot(args) => {
            let mode = if args.kernel.is_none() { "luo.mode=boot" } else { "" };
            run_guest(&args.request(), mode)
                .map(|outcome| report_exit(&outcome))
                .map_err(Into::into)
        }
        Command::Image { action: ImageAction::Build } => ensure_reference_image()
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
