//! luo-agent: `/init` (PID 1) of luo-vmm's reference guest.
//!
//! It mounts the pseudo file systems, reports `userspace up` on the console and the probe
//! port (see [`probe`]), then does what `luo.mode=` on the kernel command line asks:
//!
//! - `boot`: nothing more; reboot (the VMM sees an i8042 reset with `reboot=k`).
//! - `handover`: stage 1 creates `luo.sessions` LUO sessions with `luo.files` memfds of
//!   `luo.memfd_size` bytes each, filled with a checkable pattern, preserves them and kexecs
//!   the next kernel (`/boot/bzImage`, this initramfs, this command line with `luo.stage=2`).
//!   Stage 2 retrieves and checks every byte, finishes the sessions, and either chains
//!   another handover (`luo.round` < `luo.repeat`) or reports success and reboots.
//! - `selftest:NAME`: runs the kernel's LUO selftest `/selftests/NAME` with `--stage 1`,
//!   kexecs, and runs it with `--stage 2` in the next kernel.
//!
//! PID 1 must never exit (the kernel would panic): every failure ends in
//! `luo-agent: FAILED: ...`, the agent-failure mark and a reboot.

mod config;
mod luo;
mod pattern;
mod probe;
mod sys;

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::process::Command;

use config::{Config, Mode, TOKENS_PER_SESSION};
use probe::{Mark, Probe};

/// Selftests that run in one stage (no `--stage`, no kexec).
const SINGLE_STAGE_TESTS: &[&str] = &["liveupdate"];

/// Size of the buffer used to fill and check memfds.
const CHUNK: usize = 64 << 10;

/// A failure, with where it happened.
#[derive(Debug)]
struct Failure(String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// Adds "what failed" to an I/O error.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Failure(format!("{}: {e}", what())))
    }
}

/// The console log: each line ends with `[t=<CLOCK_MONOTONIC> s, +<since last line> s]`.
struct Agent {
    probe: Probe,
    last: f64,
}

impl Agent {
    fn log(&mut self, msg: &str) {
        let now = sys::monotonic();
        println!("luo-agent: {msg} [t={now:.3}s +{:.3}s]", now - self.last);
        self.last = now;
    }

    fn mark(&self, mark: Mark) {
        self.probe.mark(mark);
    }
}

fn main() {
    let start = sys::monotonic();
    mount_filesystems();
    let mut agent = Agent {
        probe: Probe::open(),
        last: start,
    };
    agent.log(&format!("userspace up (cpus={})", online_cpus()));
    agent.mark(Mark::UserspaceUp);

    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut agent)));
    let result = match outcome {
        Ok(result) => result,
        Err(_) => Err(Failure("panic in the agent (see above)".into())),
    };
    match result {
        Ok(()) => {
            agent.log("all done, rebooting");
            agent.mark(Mark::AgentSuccess);
        }
        Err(e) => {
            println!("luo-agent: FAILED: {e}");
            agent.mark(Mark::AgentFailure);
        }
    }
    sys::sync();
    let err = sys::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    println!("luo-agent: reboot failed: {err}");
    // PID 1 must not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Mounts proc, sysfs, devtmpfs, debugfs and tmpfs; a failure is reported, not fatal.
fn mount_filesystems() {
    let mounts: [(&std::ffi::CStr, &std::ffi::CStr, &std::ffi::CStr); 5] = [
        (c"proc", c"/proc", c"proc"),
        (c"sysfs", c"/sys", c"sysfs"),
        (c"devtmpfs", c"/dev", c"devtmpfs"),
        (c"debugfs", c"/sys/kernel/debug", c"debugfs"),
        (c"tmpfs", c"/tmp", c"tmpfs"),
    ];
    for (source, target, fstype) in mounts {
        if let Err(e) = sys::mount(source, target, fstype) {
            println!("luo-agent: warning: mount {fstype:?} on {target:?}: {e}");
        }
    }
}

/// Online CPUs from sysfs, else from the affinity mask, else 0.
fn online_cpus() -> u32 {
    fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| config::count_cpu_list(&s))
        .or_else(sys::affinity_cpus)
        .unwrap_or(0)
}

fn run(agent: &mut Agent) -> Result<()> {
    let cmdline = fs::read_to_string("/proc/cmdline").context(|| "read /proc/cmdline".into())?;
    let cmdline = cmdline.trim();
    let cfg = config::parse(cmdline).context(|| "parse /proc/cmdline".into())?;
    agent.log(&format!(
        "mode {:?} stage {} round {}/{} ({} sessions x {} memfds x {} bytes)",
        cfg.mode, cfg.stage, cfg.round, cfg.repeat, cfg.sessions, cfg.files, cfg.memfd_size
    ));
    match (&cfg.mode, cfg.stage) {
        (Mode::Boot, _) => Ok(()),
        (Mode::Handover, 1) => {
            let luo = open_luo(agent)?;
            handover_stage1(agent, &cfg, cmdline, &luo)
        }
        (Mode::Handover, _) => {
            let luo = open_luo(agent)?;
            handover_stage2(agent, &cfg, &luo)?;
            if cfg.round < cfg.repeat {
                handover_stage1(agent, &cfg, cmdline, &luo)
            } else {
                Ok(())
            }
        }
        (Mode::Selftest(name), _) if SINGLE_STAGE_TESTS.contains(&name.as_str()) => {
            run_selftest(agent, name, None)
        }
        (Mode::Selftest(name), 1) => {
            run_selftest(agent, name, Some(1))?;
            kexec_next(agent, &cfg, cmdline)
        }
        (Mode::Selftest(name), _) => {
            run_selftest(agent, name, Some(2))?;
            agent.mark(Mark::WorkloadResumed);
            Ok(())
        }
    }
}

/// Opens `/dev/liveupdate`, with a log line.
fn open_luo(agent: &mut Agent) -> Result<luo::Luo> {
    let luo = luo::Luo::open()
        .context(|| "open /dev/liveupdate (is liveupdate=1 on the kernel command line?)".into())?;
    agent.log("opened /dev/liveupdate");
    Ok(luo)
}

fn session_name(session: u32) -> String {
    format!("luo-vmm-s{session}")
}

fn token(session: u32, file: u32) -> u64 {
    u64::from(session) * TOKENS_PER_SESSION + u64::from(file)
}

/// Stage 1: create, fill and preserve the memfds, then kexec (does not return on success).
fn handover_stage1(agent: &mut Agent, cfg: &Config, cmdline: &str, luo: &luo::Luo) -> Result<()> {
    // The pattern of this round's files is seeded by the round they will be checked in.
    let round = cfg.round + 1;
    let mut sessions = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for s in 0..cfg.sessions {
        let name = session_name(s);
        let session = luo
            .create_session(&name)
            .context(|| format!("create session {name}"))?;
        for f in 0..cfg.files {
            let memfd = sys::memfd_create(&format!("{name}-f{f}"))
                .context(|| format!("memfd_create for session {s} file {f}"))?;
            let file = File::from(memfd);
            file.set_len(cfg.memfd_size)
                .context(|| format!("ftruncate session {s} file {f}"))?;
            let seed = pattern::seed(round, s, f);
            let mut offset = 0u64;
            while offset < cfg.memfd_size {
                let n = CHUNK.min((cfg.memfd_size - offset) as usize);
                pattern::fill(seed, offset, &mut buf[..n]);
                file.write_all_at(&buf[..n], offset)
                    .context(|| format!("write session {s} file {f} offset {offset}"))?;
                offset += n as u64;
            }
            session
                .preserve_fd(file.as_fd(), token(s, f))
                .context(|| format!("preserve session {s} file {f} (token {})", token(s, f)))?;
        }
        sessions.push(session);
    }
    agent.log(&format!(
        "preserved {} sessions, {} memfds, {} bytes",
        cfg.sessions,
        u64::from(cfg.sessions) * u64::from(cfg.files),
        u64::from(cfg.sessions) * u64::from(cfg.files) * cfg.memfd_size
    ));
    // The session fds stay open (in `sessions`) through the kexec: that is what preserves them.
    let result = kexec_next(agent, cfg, cmdline);
    drop(sessions);
    result
}

/// Stage 2: retrieve every session and memfd, check every byte, finish the sessions.
fn handover_stage2(agent: &mut Agent, cfg: &Config, luo: &luo::Luo) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    for s in 0..cfg.sessions {
        let name = session_name(s);
        let session = luo
            .retrieve_session(&name)
            .context(|| format!("retrieve session {name}"))?;
        for f in 0..cfg.files {
            let fd: OwnedFd = session
                .retrieve_fd(token(s, f))
                .context(|| format!("retrieve session {s} file {f} (token {})", token(s, f)))?;
            let mut file = File::from(fd);
            let len = file
                .metadata()
                .context(|| format!("fstat session {s} file {f}"))?
                .len();
            if len != cfg.memfd_size {
                return Err(Failure(format!(
                    "session {s} file {f}: size {len}, expected {}",
                    cfg.memfd_size
                )));
            }
            let seed = pattern::seed(cfg.round, s, f);
            let mut offset = 0u64;
            while offset < len {
                let n = CHUNK.min((len - offset) as usize);
                file.read_exact(&mut buf[..n])
                    .context(|| format!("read session {s} file {f} offset {offset}"))?;
                if let Some(m) = pattern::check(seed, offset, &buf[..n]) {
                    return Err(Failure(format!(
                        "data mismatch: session {s}, file {f}, offset {}, expected {:#04x}, got {:#04x}",
                        m.offset, m.expected, m.got
                    )));
                }
                offset += n as u64;
            }
            bytes += len;
        }
        session
            .finish()
            .context(|| format!("finish session {name}"))?;
    }
    agent.mark(Mark::WorkloadResumed);
    agent.log(&format!(
        "verified {} sessions, {} memfds, {bytes} bytes",
        cfg.sessions,
        u64::from(cfg.sessions) * u64::from(cfg.files)
    ));
    Ok(())
}

/// Loads `/boot/bzImage` with this initramfs and the stage-2 command line, marks
/// reboot-requested and reboots into it. Returns only on failure.
fn kexec_next(agent: &mut Agent, cfg: &Config, cmdline: &str) -> Result<()> {
    let kernel = File::open("/boot/bzImage").context(|| "open /boot/bzImage".into())?;
    let next = config::next_cmdline(cmdline, 2, cfg.round + 1);
    // This boot's initramfs, kept by `retain_initrd`. kexec_file_load reads the sysfs file
    // directly (one copy, in the kernel): copying it through user space first costs tens of
    // seconds under emulation. A memfd copy is the fallback.
    let initrd = File::open(INITRD)
        .context(|| format!("open {INITRD} (is retain_initrd on the command line?)"))?;
    if let Err(e) = sys::kexec_file_load(kernel.as_fd(), initrd.as_fd(), &next) {
        agent.log(&format!(
            "kexec_file_load with {INITRD}: {e}; retrying with a memfd copy"
        ));
        let copy = copy_initrd()?;
        agent.log(&format!("copied {INITRD} into a memfd"));
        sys::kexec_file_load(kernel.as_fd(), copy.as_fd(), &next)
            .context(|| "kexec_file_load(/boot/bzImage)".into())?;
    }
    agent.log(&format!("kexec_file_load done, next command line: {next}"));
    agent.mark(Mark::RebootRequested);
    sys::sync();
    let err = sys::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    Err(Failure(format!("reboot(LINUX_REBOOT_CMD_KEXEC): {err}")))
}

/// The initramfs of this boot, kept by the `retain_initrd` kernel parameter.
const INITRD: &str = "/sys/firmware/initrd";

/// [`INITRD`] copied into a memfd.
fn copy_initrd() -> Result<File> {
    let data = fs::read(INITRD).context(|| format!("read {INITRD}"))?;
    let memfd = sys::memfd_create("initrd").context(|| "memfd_create for the initrd".into())?;
    let file = File::from(memfd);
    file.write_all_at(&data, 0)
        .context(|| "write the initrd memfd".into())?;
    Ok(file)
}

/// Runs `/selftests/NAME [--stage N]` with the console as its output; fails on a non-zero
/// exit. In stage 1 the test forks a child that holds the sessions; it is left alone.
fn run_selftest(agent: &mut Agent, name: &str, stage: Option<u32>) -> Result<()> {
    let path = format!("/selftests/{name}");
    let mut cmd = Command::new(&path);
    if let Some(stage) = stage {
        cmd.arg("--stage").arg(stage.to_string());
    }
    agent.log(&format!(
        "running {path} {}",
        stage.map_or(String::new(), |s| format!("--stage {s}"))
    ));
    let status = cmd.status().context(|| format!("spawn {path}"))?;
    agent.log(&format!("{path} exited: {status}"));
    if status.success() {
        Ok(())
    } else {
        let stage = stage.map_or(String::new(), |s| format!(" --stage {s}"));
        Err(Failure(format!("{path}{stage}: {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn tokens_and_names() {
        assert_eq!(token(0, 0), 0);
        assert_eq!(token(2, 7), 2007);
        assert_eq!(session_name(3), "luo-vmm-s3");
    }

    #[test]
    fn io_error_context() {
        let r: std::result::Result<(), io::Error> = Err(io::Error::from_raw_os_error(libc::ENOENT));
        let e = r.context(|| "open /x".into()).unwrap_err();
        assert!(e.0.starts_with("open /x: "), "{e}");
    }
}
