//! luo-agent: `/init` (PID 1) of luo-vmm's reference guest.
//!
//! It mounts the pseudo file systems, sends `userspace-up` with the online CPU count over
//! the probe device (see [`probe`] and the luo-protocol crate), then does what the `luo.*`
//! parameters of the kernel command line ask (`luo_protocol::workload`):
//!
//! - `boot`: nothing more; reboot (the VMM sees an i8042 reset with `reboot=k`).
//! - `handover`: stage 1 creates `luo.sessions` LUO sessions with `luo.files` memfds of
//!   `luo.memfd_size` bytes each, filled with a checkable pattern, preserves them, sends
//!   the inventory of what it preserved and kexecs the next kernel (`/boot/bzImage`, or luo-vmm's `/boot/next/N` in a cross-kernel run; this
//!   initramfs, this command line with `luo.stage=2`). Stage 2 retrieves and checks every
//!   byte, finishes the sessions, and either chains another handover (`luo.round` <
//!   `luo.repeat`) or passes.
//! - `scenario`: runs this stage's script (`luo.script1`/`luo.script2`, see
//!   [`scenario`]): threads pinned to CPUs, each step announced with its result.
//! - `selftest:NAME`: runs the kernel's LUO selftest `/selftests/NAME`: once for a
//!   single-stage test; with `--stage 1`, a kexec, and `--stage 2` for a two-stage one.
//!   Its exit status and TAP counts go to the VMM.
//!
//! Every LUO call is announced and its result (errno) sent; the agent's verdict is the
//! last message before its reboot. The console lines are for people: the VMM reads
//! nothing from them. PID 1 must never exit (the kernel would panic): every failure ends
//! in a failing verdict and a reboot.

mod luo;
mod pattern;
mod probe;
mod scenario;
mod stretch;
mod sys;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;

use luo_protocol::message::{
    Action, AgentVerdict, ExitStatus, FailedStep, Message, SelftestResult,
};
use luo_protocol::probe::Gate;
use luo_protocol::tap::TapTally;
use luo_protocol::workload::{
    next_cmdline, AgentConfig, Memfds, Progress, Selftest, Stage, Workload,
};
use probe::Probe;

/// Size of the buffer used to fill and check memfds.
pub(crate) const CHUNK: usize = 64 << 10;

/// Longest wait at a gate; the VMM's own timeout is the real bound.
pub(crate) const GATE_LIMIT: Duration = Duration::from_secs(3600);

/// A failure: the step it happened in, the errno if a system call failed, and words.
#[derive(Debug)]
struct Failure {
    step: FailedStep,
    errno: i32,
    what: String,
}

impl Failure {
    fn new(step: FailedStep, what: String) -> Self {
        Failure {
            step,
            errno: 0,
            what,
        }
    }

    fn verdict(&self) -> AgentVerdict {
        AgentVerdict::fail(self.step, self.errno)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (step {})", self.what, self.step.name())
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// Adds the step and "what failed" to an error.
trait Context<T> {
    fn at(self, step: FailedStep, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn at(self, step: FailedStep, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Failure {
            step,
            errno: e.raw_os_error().unwrap_or(0),
            what: format!("{}: {e}", what()),
        })
    }
}

/// The console log (for people): each line ends with `[t=<CLOCK_MONOTONIC> s, +<since
/// last line> s]`.
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

    fn send(&self, msg: Message) {
        self.probe.send(&msg);
    }
}

fn main() {
    let start = sys::monotonic();
    mount_filesystems();
    let mut agent = Agent {
        probe: Probe::open(),
        last: start,
    };
    let cpus = online_cpus();
    agent.log(&format!("userspace up ({cpus} CPUs online)"));
    agent.send(Message::UserspaceUp {
        cpus_online: u16::try_from(cpus).unwrap_or(u16::MAX),
    });

    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut agent)));
    let result = outcome.unwrap_or_else(|_| {
        Err(Failure::new(
            FailedStep::Panic,
            "panic in the agent (see above)".into(),
        ))
    });
    let verdict = match &result {
        Ok(()) => {
            agent.log("all done, rebooting");
            AgentVerdict::PASS
        }
        Err(e) => {
            println!("luo-agent: FAILED: {e}");
            e.verdict()
        }
    };
    agent.send(Message::Verdict(verdict));
    sys::sync();
    let err = sys::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    println!("luo-agent: reboot failed: {err}");
    // PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
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
        .and_then(|s| count_cpu_list(&s))
        .or_else(sys::affinity_cpus)
        .unwrap_or(0)
}

/// Counts the CPUs of a sysfs CPU list such as `0-3,5`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(n)
}

fn run(agent: &mut Agent) -> Result<()> {
    let cmdline = fs::read_to_string("/proc/cmdline")
        .at(FailedStep::Config, || "read /proc/cmdline".into())?;
    let cmdline = cmdline.trim();
    let cfg = AgentConfig::parse(cmdline)
        .map_err(|e| Failure::new(FailedStep::Config, format!("bad kernel command line: {e}")))?;
    let Progress { stage, round } = cfg.progress;
    agent.send(Message::Boot { stage, round });
    agent.log(&format!("{:?}, stage {stage}, round {round}", cfg.workload));
    match (cfg.workload, stage) {
        (Workload::Boot, _) => Ok(()),
        (Workload::Handover(m), Stage::One) => {
            let luo = open_luo(agent)?;
            handover_stage1(agent, &m, round, cmdline, &luo)
        }
        (Workload::Handover(m), Stage::Two) => {
            let luo = match open_luo(agent) {
                Ok(luo) => luo,
                Err(e) => {
                    leak_pressure(agent);
                    return Err(e);
                }
            };
            let mut held = Retrieved::default();
            if let Err(e) = handover_stage2(agent, &m, round, &luo, &mut held) {
                // What was retrieved stays open under the pressure: only the kernel's own
                // handling of the failure can free preserved memory (closing a retrieved
                // session or file is user space discarding it).
                leak_pressure(agent);
                drop(held);
                return Err(e);
            }
            drop(held);
            if round < m.repeat {
                handover_stage1(agent, &m, round, cmdline, &luo)
            } else {
                Ok(())
            }
        }
        (Workload::Scenario, _) => {
            // Opened by the first step that needs it: in stage 2 after the threads' first
            // gates, where a VMM keeps its snapshot, so every run from it deserializes.
            let luo = luo::LazyLuo::default();
            let script = &cfg.script;
            let this = match stage {
                Stage::One => &script.stage1,
                Stage::Two => &script.stage2,
            };
            scenario::run_stage(&agent.probe, &luo, script, this, round, cmdline);
            if stage == Stage::Two {
                agent.send(Message::WorkloadResumed);
            }
            Ok(())
        }
        (Workload::Selftest(t), _) if !t.two_stage() => {
            run_selftest(agent, t, None, cfg.timeout_scale)
        }
        (Workload::Selftest(t), Stage::One) => {
            run_selftest(agent, t, Some(Stage::One), cfg.timeout_scale)?;
            kexec_next(agent, round, cmdline)
        }
        (Workload::Selftest(t), Stage::Two) => {
            run_selftest(agent, t, Some(Stage::Two), cfg.timeout_scale)?;
            agent.send(Message::WorkloadResumed);
            Ok(())
        }
    }
}

/// Opens `/dev/liveupdate`, with a log line.
fn open_luo(agent: &mut Agent) -> Result<luo::Luo> {
    let opened = luo::Luo::open();
    let absent = matches!(&opened, Err(e) if e.kind() == io::ErrorKind::NotFound);
    let luo = opened.at(FailedStep::OpenLuo, || {
        if absent {
            "open /dev/liveupdate (is liveupdate=1 on the kernel command line?)".into()
        } else {
            "open /dev/liveupdate".into()
        }
    })?;
    agent.log("opened /dev/liveupdate");
    Ok(luo)
}

/// Stage 1: create, fill and preserve the memfds, send the inventory, then kexec (does
/// not return on success). `round` is the number of handovers done before this boot.
fn handover_stage1(
    agent: &mut Agent,
    m: &Memfds,
    round: u32,
    cmdline: &str,
    luo: &luo::Luo,
) -> Result<()> {
    // The pattern of this round's files is seeded by the round they will be checked in.
    let check_round = round + 1;
    let mut sessions = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for s in 0..m.sessions {
        let name = Memfds::session_name(s);
        let session = agent
            .probe
            .action(Action::CreateSession, u64::from(s), || {
                luo.create_session(name.as_str())
            })
            .at(FailedStep::CreateSession, || {
                format!("create session {name}")
            })?;
        agent.send(Message::InventorySession {
            session: s,
            name: name.clone(),
        });
        for f in 0..m.files {
            let token = Memfds::token(s, f);
            let memfd = sys::memfd_create(&format!("{name}-f{f}")).at(FailedStep::Memfd, || {
                format!("memfd_create for session {s} file {f}")
            })?;
            let file = File::from(memfd);
            file.set_len(m.memfd_size).at(FailedStep::Memfd, || {
                format!("ftruncate session {s} file {f}")
            })?;
            let seed = pattern::seed(check_round, s, f);
            let mut offset = 0u64;
            while offset < m.memfd_size {
                let n = chunk_len(m.memfd_size - offset);
                pattern::fill(seed, offset, &mut buf[..n]);
                file.write_all_at(&buf[..n], offset)
                    .at(FailedStep::Write, || {
                        format!("write session {s} file {f} offset {offset}")
                    })?;
                offset += n as u64;
            }
            agent
                .probe
                .action(Action::PreserveFd, token, || {
                    session.preserve_fd(file.as_fd(), token)
                })
                .at(FailedStep::Preserve, || {
                    format!("preserve session {s} file {f} (token {token})")
                })?;
            agent.send(Message::InventoryFile {
                session: s,
                token,
                size: m.memfd_size,
            });
        }
        sessions.push(session);
    }
    agent.send(Message::InventoryEnd {
        sessions: m.sessions,
        files: u32::try_from(m.total_files()).unwrap_or(u32::MAX),
        bytes: m.total_bytes(),
    });
    agent.log(&format!(
        "preserved {} sessions, {} memfds, {} bytes",
        m.sessions,
        m.total_files(),
        m.total_bytes()
    ));
    // The session fds stay open (in `sessions`) through the kexec: that is what preserves them.
    let result = kexec_next(agent, round, cmdline);
    drop(sessions);
    result
}

/// Page size of the memfds' pages.
const PAGE: u64 = 4096;

/// Memory pressure after a failed restore: 8 MiB at a time, up to three quarters of
/// `MemAvailable` or for at most this long (an instruction-emulating KVM faults in about
/// 1 MiB/s; on hardware KVM the full amount should take well under the limit).
const PRESSURE_LIMIT: Duration = Duration::from_secs(30);
const PRESSURE_CHUNK: usize = 8 << 20;

/// After a failed restore, puts the kernel under memory pressure (up to three quarters
/// of `MemAvailable`, faulted in and held, then freed; bounded by [`PRESSURE_LIMIT`]), so
/// that preserved pages the kernel wrongly handed back to its allocator get written where
/// luo-vmm's dirty log sees them ("leak, never reuse"). Announced afterwards as
/// `pressure` with the bytes it reached.
fn leak_pressure(agent: &mut Agent) {
    let available = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| meminfo_kib(&t, "MemAvailable:"))
        .unwrap_or(0);
    let target = usize::try_from(available.saturating_mul(1024) / 4 * 3).unwrap_or(usize::MAX);
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    let mut reached = 0usize;
    let mut error = None;
    while reached < target && started.elapsed() < PRESSURE_LIMIT {
        match sys::Populated::new(PRESSURE_CHUNK.min(target - reached)) {
            Ok(m) => {
                held.push(m);
                reached += PRESSURE_CHUNK.min(target - reached);
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    drop(held);
    let bytes = u64::try_from(reached).unwrap_or(u64::MAX);
    let _ = agent.probe.action(Action::Pressure, bytes, || Ok(()));
    agent.log(&format!(
        "memory pressure after the failed restore: {} of {} MiB in {:.1} s{}",
        reached >> 20,
        target >> 20,
        started.elapsed().as_secs_f64(),
        error.map_or(String::new(), |e| format!(" (stopped: {e})"))
    ));
}

/// The value in KiB of `field` (e.g. `MemAvailable:`) in /proc/meminfo's text.
fn meminfo_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Bytes of the next chunk when `left` bytes remain.
pub(crate) fn chunk_len(left: u64) -> usize {
    usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK))
}

/// The sessions and memfds stage 2 retrieved, open until dropped.
#[derive(Default)]
struct Retrieved {
    sessions: Vec<luo::Session>,
    files: Vec<File>,
}

/// Stage 2: retrieve every session and memfd (into `held`), check every byte, finish the
/// sessions. `round` is the number of handovers done before this boot (the one just done
/// included).
fn handover_stage2(
    agent: &mut Agent,
    m: &Memfds,
    round: u32,
    luo: &luo::Luo,
    held: &mut Retrieved,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    for s in 0..m.sessions {
        let name = Memfds::session_name(s);
        let session = agent
            .probe
            .action(Action::RetrieveSession, u64::from(s), || {
                luo.retrieve_session(name.as_str())
            })
            .at(FailedStep::RetrieveSession, || {
                format!("retrieve session {name}")
            })?;
        held.sessions.push(session);
        let Some(session) = held.sessions.last() else {
            continue;
        };
        for f in 0..m.files {
            let token = Memfds::token(s, f);
            let fd: OwnedFd = agent
                .probe
                .action(Action::RetrieveFd, token, || session.retrieve_fd(token))
                .at(FailedStep::RetrieveFd, || {
                    format!("retrieve session {s} file {f} (token {token})")
                })?;
            held.files.push(File::from(fd));
            let Some(file) = held.files.last_mut() else {
                continue;
            };
            let len = file
                .metadata()
                .at(FailedStep::Size, || format!("fstat session {s} file {f}"))?
                .len();
            if len != m.memfd_size {
                return Err(Failure::new(
                    FailedStep::Size,
                    format!(
                        "session {s} file {f}: size {len}, expected {}",
                        m.memfd_size
                    ),
                ));
            }
            let seed = pattern::seed(round, s, f);
            let mut offset = 0u64;
            while offset < len {
                let n = chunk_len(len - offset);
                file.read_exact(&mut buf[..n]).at(FailedStep::Data, || {
                    format!("read session {s} file {f} offset {offset}")
                })?;
                if let Some(bad) = pattern::check(seed, offset, &buf[..n]) {
                    let page_at = bad.offset & !(PAGE - 1);
                    let from = usize::try_from(page_at - offset).unwrap_or(0);
                    let page = buf.get(from..n.min(from + 4096)).unwrap_or_default();
                    let whose = pattern::whose(
                        page,
                        round.saturating_sub(1)..=round.saturating_add(1),
                        m.sessions,
                        m.files,
                        m.memfd_size,
                    );
                    agent.send(Message::DataFound {
                        session: s,
                        file: f,
                        offset: page_at,
                        whose,
                    });
                    return Err(Failure::new(
                        FailedStep::Data,
                        format!(
                            "data mismatch: session {s}, file {f}, offset {}, expected {:#04x}, got {:#04x}",
                            bad.offset, bad.expected, bad.got
                        ),
                    ));
                }
                offset += n as u64;
            }
            bytes += len;
        }
        agent
            .probe
            .action(Action::FinishSession, u64::from(s), || session.finish())
            .at(FailedStep::Finish, || format!("finish session {name}"))?;
    }
    agent.send(Message::WorkloadResumed);
    agent.send(Message::Verified {
        sessions: m.sessions,
        files: u32::try_from(m.total_files()).unwrap_or(u32::MAX),
        bytes,
    });
    agent.log(&format!(
        "checked {} sessions, {} memfds, {bytes} bytes",
        m.sessions,
        m.total_files()
    ));
    Ok(())
}

/// Loads the next kernel, waits at the before-reboot gate, marks reboot-requested and
/// reboots into it. Returns only on failure. `round` is the number of handovers done
/// before this boot.
fn kexec_next(agent: &mut Agent, round: u32, cmdline: &str) -> Result<()> {
    load_next_kernel(&agent.probe, round, cmdline).at(FailedStep::KexecLoad, || {
        format!("kexec_file_load({})", next_kernel_image(round))
    })?;
    agent
        .probe
        .wait_gate(Gate::BEFORE_REBOOT, GATE_LIMIT)
        .map_err(|e| Failure::new(FailedStep::Gate, format!("{} stayed closed", e.0)))?;
    let seq = agent.probe.announce(Action::Reboot, 0);
    agent.send(Message::RebootRequested);
    sys::sync();
    let err = sys::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    agent.probe.failed(seq, Action::Reboot, &err);
    Err(Failure {
        step: FailedStep::Reboot,
        errno: err.raw_os_error().unwrap_or(0),
        what: format!("reboot(LINUX_REBOOT_CMD_KEXEC): {err}"),
    })
}

/// The image handover `round` kexecs: `/boot/next/(round % N)` when luo-vmm put a cycle
/// of N next kernels into the initramfs (a cross-kernel run), else `/boot/bzImage`
/// (`luo_protocol::kexec`).
fn next_kernel_image(round: u32) -> String {
    let count = (0..luo_protocol::kexec::MAX_CYCLE)
        .take_while(|&i| std::path::Path::new(&luo_protocol::kexec::cycle_entry(i)).exists())
        .count();
    luo_protocol::kexec::kernel_for_round(round, count)
}

/// `kexec_file_load` of the next kernel ([`next_kernel_image`]) with this boot's initramfs
/// and the stage-2 command line (announced as `kexec-load`). `round` is the number of
/// handovers done before this boot.
pub(crate) fn load_next_kernel(probe: &Probe, round: u32, cmdline: &str) -> io::Result<()> {
    let image = next_kernel_image(round);
    println!("luo-agent: next kernel {image}");
    let kernel = File::open(&image)?;
    let next = next_cmdline(
        cmdline,
        Progress {
            stage: Stage::Two,
            round: round + 1,
        },
    );
    // This boot's initramfs, kept by `retain_initrd`. kexec_file_load reads the sysfs file
    // directly (one copy, in the kernel): copying it through user space first costs tens of
    // seconds under emulation. A memfd copy is the fallback.
    let initrd = File::open(INITRD)?;
    let loaded = probe.action(Action::KexecLoad, 0, || {
        sys::kexec_file_load(kernel.as_fd(), initrd.as_fd(), &next)
    });
    if let Err(e) = loaded {
        println!("luo-agent: kexec_file_load with {INITRD}: {e}; retrying with a memfd copy");
        let copy = copy_initrd()?;
        probe.action(Action::KexecLoad, 1, || {
            sys::kexec_file_load(kernel.as_fd(), copy.as_fd(), &next)
        })?;
    }
    println!("luo-agent: kexec_file_load done, next command line: {next}");
    Ok(())
}

/// The initramfs of this boot, kept by the `retain_initrd` kernel parameter.
const INITRD: &str = "/sys/firmware/initrd";

/// [`INITRD`] copied into a memfd.
fn copy_initrd() -> io::Result<File> {
    let data = fs::read(INITRD)?;
    let file = File::from(sys::memfd_create("initrd")?);
    file.write_all_at(&data, 0)?;
    Ok(file)
}

/// How long to wait for the rest of a selftest's output after it exited (a stage-1 test
/// leaves a child holding the sessions, and with it the pipe, open).
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// Runs `/selftests/NAME [--stage N]`, echoing its output to the console and counting its
/// TAP lines, with the harness's timeouts `timeout_scale` times upstream's (see
/// [`stretch`]); sends its exit status and counts; fails unless it exited 0.
fn run_selftest(
    agent: &mut Agent,
    test: Selftest,
    stage: Option<Stage>,
    timeout_scale: u32,
) -> Result<()> {
    let path = format!("/selftests/{}", test.name());
    let stage_arg = stage.map(|s| s.to_string());
    let args: Vec<&str> = match &stage_arg {
        Some(s) => vec!["--stage", s],
        None => vec![],
    };
    // The agent's own environment, GLIBC_TUNABLES included on an emulating KVM (luo-vmm
    // puts it on the kernel command line: docs/emulated-kvm.md, "Two vCPUs").
    let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    let shown = format!("{path} {}", args.join(" "));
    let shown = shown.trim_end();
    agent.log(&format!(
        "running {shown} (harness timeouts x{timeout_scale})"
    ));
    let child = stretch::spawn(&path, &args, &env, timeout_scale > 1)
        .at(FailedStep::Selftest, || format!("start {path}"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let out = child
        .stdout
        .try_clone()
        .at(FailedStep::Selftest, || "dup the selftest's stdout".into())?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let status = match stretch::run(&child, timeout_scale)
        .at(FailedStep::Selftest, || format!("wait for {path}"))?
    {
        stretch::Ended::Exited(code) => ExitStatus::Exited(code),
        stretch::Ended::Signaled(sig) => ExitStatus::Signaled(sig),
    };
    drop(child);
    let mut tally = TapTally::new();
    while let Ok(line) = rx.recv_timeout(OUTPUT_DRAIN) {
        tally.line(&line);
    }
    let result = SelftestResult {
        stage,
        status,
        tap: tally.counts(),
    };
    agent.send(Message::Selftest(result));
    let t = result.tap;
    agent.log(&format!(
        "{shown}: {status}; TAP pass {} fail {} skip {}",
        t.pass, t.fail, t.skip
    ));
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(
            FailedStep::Selftest,
            format!("{shown}: {status}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_field_in_kib() {
        let t = "MemTotal:         523896 kB\nMemFree:          300000 kB\nMemAvailable:     310000 kB\n";
        assert_eq!(meminfo_kib(t, "MemAvailable:"), Some(310_000));
        assert_eq!(meminfo_kib(t, "Cached:"), None);
        assert_eq!(meminfo_kib("MemAvailable: lots", "MemAvailable:"), None);
    }

    #[test]
    fn io_errors_keep_their_errno_and_step() {
        let r: io::Result<()> = Err(io::Error::from_raw_os_error(libc::ENOENT));
        let e = r.at(FailedStep::OpenLuo, || "open /x".into()).unwrap_err();
        assert!(e.what.starts_with("open /x: "), "{e}");
        assert_eq!(
            e.verdict(),
            AgentVerdict::fail(FailedStep::OpenLuo, libc::ENOENT)
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0,2-3,7"), Some(4));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn chunks() {
        assert_eq!(chunk_len(1), 1);
        assert_eq!(chunk_len(u64::MAX), CHUNK);
    }
}
