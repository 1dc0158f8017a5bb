//! Longer kselftest harness timeouts, without rebuilding the selftests.
//!
//! The kselftest harness (`tools/testing/selftests/kselftest_harness.h`, Linux 7.2) runs each
//! test case in a child and waits for it with `poll(pidfd, 1, t->timeout * 1000)`; the timeout
//! is compiled in (`TEST_TIMEOUT_DEFAULT`, 30 s, or `TEST_F_TIMEOUT`) and no option or
//! environment variable changes it. On an instruction-emulating KVM a case that takes a
//! second on hardware takes minutes, so the harness kills healthy tests. The VMM passes
//! `luo.timeout_scale=N` there; the agent then runs the harness process under `ptrace` and
//! multiplies the timeout of every `poll(2)` that process makes by N. It forks and execs
//! the harness itself (not through `std::process`), so that nothing but plain system calls
//! runs between `fork` and `execve`, and a child that cannot be traced still runs. Its children (the test
//! cases themselves) are not traced and run at full speed. On hardware N is 1 and nothing
//! is traced.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};

/// What `wait`'s status says, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

fn check(ret: libc::c_long, what: &str) -> io::Result<libc::c_long> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(ret)
    }
}

/// `waitpid(pid, __WALL)`, retried on EINTR.
fn wait(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid, writable int; no other memory is passed.
        let ret = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if ret >= 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The new timeout of a `poll` that asked for `ms` milliseconds (negative: forever).
pub fn scaled_timeout(ms: i32, scale: u32) -> i32 {
    if ms <= 0 {
        return ms;
    }
    i32::try_from(i64::from(ms) * i64::from(scale)).unwrap_or(i32::MAX)
}

/// A child process started by [`spawn`].
#[derive(Debug)]
pub struct Traced {
    /// Its pid.
    pub pid: libc::pid_t,
    /// The read end of its stdout.
    pub stdout: File,
    /// Whether it is traced (`ptrace(PTRACE_TRACEME)` worked in the child).
    pub traced: bool,
}

/// What the child reports on its error pipe before it `exec`s, or instead.
const TRACEME_FAILED: u8 = 1;
const EXEC_FAILED: u8 = 2;

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    check(ret.into(), "pipe2")?;
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(io::Error::other)
}

/// Starts `path` with `args` and `env` (`NAME=value`), its stdout a pipe; with `trace`,
/// stopped for this thread to trace it (see [`run`]). If the child cannot be traced it
/// runs untraced (`traced` is false, and a warning says why); a failed `execve` is an
/// error.
pub fn spawn(path: &str, args: &[&str], env: &[String], trace: bool) -> io::Result<Traced> {
    // Everything the child needs is prepared before fork: after it, only system calls.
    let path_c = cstring(path)?;
    let argv_c: Vec<CString> = std::iter::once(path)
        .chain(args.iter().copied())
        .map(cstring)
        .collect::<io::Result<_>>()?;
    let env_c: Vec<CString> = env.iter().map(|e| cstring(e)).collect::<io::Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // SAFETY: the child runs only async-signal-safe system calls (dup2, ptrace, write,
    // execve, _exit) on memory prepared before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            child(
                &path_c,
                &argv,
                &envp,
                (out_w.as_raw_fd(), err_w.as_raw_fd()),
                trace,
            )
        }
    }
    check(pid.into(), "fork")?;
    drop((out_w, err_w));
    // EOF when the child's execve closed the (close-on-exec) error pipe.
    let mut report = Vec::new();
    (&err_r).read_to_end(&mut report)?;
    let errno = |r: &[u8]| {
        i32::from_ne_bytes(
            r.get(1..5)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 4]),
        )
    };
    let mut traced = trace;
    let mut rest = report.as_slice();
    while let Some(&tag) = rest.first() {
        match tag {
            TRACEME_FAILED => {
                traced = false;
                println!(
                    "luo-agent: warning: {path} runs with upstream harness timeouts: \
                     PTRACE_TRACEME: {}",
                    io::Error::from_raw_os_error(errno(rest))
                );
            }
            _ => {
                let e = io::Error::from_raw_os_error(errno(rest));
                // Reap it: it exited with 127.
                let _ = wait(pid);
                return Err(io::Error::new(e.kind(), format!("execve {path}: {e}")));
            }
        }
        rest = rest.get(5..).unwrap_or_default();
    }
    Ok(Traced {
        pid,
        stdout: out_r,
        traced,
    })
}

/// The forked child: stdout to the pipe `fds.0`, ask to be traced (with `trace`), exec;
/// failures are reported on the pipe `fds.1`. Never returns.
///
/// # Safety
///
/// Only between `fork` and `execve`: every pointer is valid and NUL-terminated (`argv`
/// and `envp` end with a null pointer).
// SAFETY: the contract is the `# Safety` section above; `spawn` is the one caller.
unsafe fn child(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    (out, err): (libc::c_int, libc::c_int),
    trace: bool,
) -> ! {
    let report = |tag: u8| {
        // SAFETY: errno location of this (only) thread; a 5-byte buffer on the stack.
        let e = unsafe { *libc::__errno_location() }.to_ne_bytes();
        let msg = [tag, e[0], e[1], e[2], e[3]];
        // SAFETY: writes the 5 bytes of `msg` to the error pipe.
        unsafe { libc::write(err, msg.as_ptr().cast(), msg.len()) };
    };
    // SAFETY: see the function's contract; all of these are plain system calls.
    unsafe {
        libc::dup2(out, 1);
        if trace && libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            report(TRACEME_FAILED);
        }
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        report(EXEC_FAILED);
        libc::_exit(127)
    }
}

/// Runs a child from [`spawn`] to its end, multiplying its `poll` timeouts by `scale` if
/// it is traced; returns how it ended. Call from the thread that spawned it (its tracer).
pub fn run(child: &Traced, scale: u32) -> io::Result<Ended> {
    if child.traced {
        trace_pid(child.pid, scale)
    } else {
        let status = wait(child.pid)?;
        ended(status)
            .ok_or_else(|| io::Error::other("waitpid: the child neither exited nor was killed"))
    }
}

/// Traces `pid`, which asked for it (`PTRACE_TRACEME`) and then stops (at its `execve`, or
/// by a signal), to its end.
fn trace_pid(pid: libc::pid_t, scale: u32) -> io::Result<Ended> {
    // Its first stop.
    let status = wait(pid)?;
    if let Some(end) = ended(status) {
        return Ok(end);
    }
    let options = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;
    // SAFETY: PTRACE_SETOPTIONS on our stopped tracee; `data` is a flag word, not a pointer.
    let ret = unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, options) };
    check(ret, "PTRACE_SETOPTIONS")?;
    let mut inject = 0;
    loop {
        // SAFETY: resumes our stopped tracee until its next syscall stop; `data` is a
        // signal number, not a pointer.
        let ret = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, 0, inject) };
        check(ret, "PTRACE_SYSCALL")?;
        inject = 0;
        let status = wait(pid)?;
        if let Some(end) = ended(status) {
            return Ok(end);
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        match libc::WSTOPSIG(status) {
            s if s == libc::SIGTRAP | 0x80 => stretch_poll(pid, scale)?,
            // The exec's own SIGTRAP: nothing to deliver.
            libc::SIGTRAP => {}
            // A real signal: deliver it.
            s => inject = s,
        }
    }
}

fn ended(status: libc::c_int) -> Option<Ended> {
    if libc::WIFEXITED(status) {
        Some(Ended::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(Ended::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// At a syscall stop: if it is the entry of `poll(fds, n, timeout)`, scales the timeout.
fn stretch_poll(pid: libc::pid_t, scale: u32) -> io::Result<()> {
    // SAFETY: an all-zero user_regs_struct is valid plain data.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes one user_regs_struct to the pointer given, which
    // points to ours.
    let ret = unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs) };
    check(ret, "PTRACE_GETREGS")?;
    // At syscall entry x86-64 reports rax = -ENOSYS; at exit, the result.
    let entry = regs.rax == u64::from_ne_bytes((-i64::from(libc::ENOSYS)).to_ne_bytes());
    if !entry || i64::from_ne_bytes(regs.orig_rax.to_ne_bytes()) != libc::SYS_poll {
        return Ok(());
    }
    // The timeout is the int in the low 32 bits of the third argument.
    let ms = i32::from_ne_bytes(regs.rdx.to_ne_bytes()[..4].try_into().unwrap_or([0; 4]));
    let new = scaled_timeout(ms, scale);
    if new == ms {
        return Ok(());
    }
    regs.rdx = u64::from(u32::from_ne_bytes(new.to_ne_bytes()));
    // SAFETY: PTRACE_SETREGS reads one user_regs_struct from the pointer given, ours.
    let ret = unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid, 0, &regs) };
    check(ret, "PTRACE_SETREGS").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn timeouts_scale_and_saturate() {
        assert_eq!(scaled_timeout(30_000, 20), 600_000);
        assert_eq!(scaled_timeout(-1, 20), -1);
        assert_eq!(scaled_timeout(0, 20), 0);
        assert_eq!(scaled_timeout(i32::MAX / 2, 20), i32::MAX);
    }

    /// A real traced process: a forked child polls for 50 ms on its only thread; stretched
    /// 20 times by its tracer, that takes a second.
    #[test]
    fn a_traced_poll_waits_longer() {
        let start = Instant::now();
        // SAFETY: the child (a copy of this thread only) makes nothing but system calls
        // (ptrace, raise, poll, _exit), all async-signal-safe, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: as above; poll with no descriptors only sleeps for its timeout.
            unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
                let ret = libc::poll(std::ptr::null_mut(), 0, 50);
                libc::_exit(ret);
            }
        }
        assert_eq!(trace_pid(pid, 20).unwrap(), Ended::Exited(0));
        assert!(
            start.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn spawned_children_run_traced_or_not_and_report_their_end() {
        let env = vec!["PATH=/usr/bin:/bin".to_owned()];
        for trace in [true, false] {
            let child = spawn("/bin/sh", &["-c", "echo out; exit 3"], &env, trace).unwrap();
            assert_eq!(child.traced, trace);
            let mut out = String::new();
            let mut stdout = child.stdout.try_clone().unwrap();
            assert_eq!(run(&child, 20).unwrap(), Ended::Exited(3));
            stdout.read_to_string(&mut out).unwrap();
            assert_eq!(out, "out\n");
        }
        let e = spawn("/nonexistent", &[], &env, true).unwrap_err();
        assert!(e.to_string().starts_with("execve /nonexistent"), "{e}");
    }
}
