//! The `luo-vmm` command.

use std::process::ExitCode;

use clap::Parser;
use luo_vmm::config::options::Cli;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match luo_vmm::commands::run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("luo-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}
