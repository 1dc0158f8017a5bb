//! Longer kselftest harness timeouts, without rebuilding the selftests.
//!
//! The kselftest harness (`tools/testing/selftests/kselftest_harness.h`, Linux 7.2) runs each
//! test case in a child and waits for it with `poll(pidfd, 1, t->timeout * 1000)`; the timeout
//! is compiled in (`TEST_TIMEOUT_DEFAULT`, 30 s, or `TEST_F_TIMEOUT`) and no option or
//! environment variable changes it. On an instruction-emulating KVM a case that takes a
//! second on hardware takes minutes, so the harness kills healthy tests. The VMM passes
//! `luo.timeout_scale=N` there; the agent then runs the harness process under `ptrace` and
//! multiplies the timeout of every `poll(2)` that process makes by N. Its children (the test
//! cases themselves) are not traced and run at full speed. On hardware N is 1 and nothing
//! is traced.

use std::io;
use std::process::Child;

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

/// Makes the child about to `exec` stop for its parent, its tracer. For
/// `CommandExt::pre_exec`: it only calls `ptrace(2)`, which is async-signal-safe.
pub fn trace_me() -> io::Result<()> {
    // SAFETY: PTRACE_TRACEME takes no pointers; the other arguments are ignored.
    let ret = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    check(ret, "PTRACE_TRACEME").map(drop)
}

/// Runs `child` (spawned with [`trace_me`]) to its end, multiplying its `poll` timeouts by
/// `scale`; returns how it ended. Call from the thread that spawned it (the tracer).
pub fn run_traced(child: &Child, scale: u32) -> io::Result<Ended> {
    trace_pid(
        libc::pid_t::try_from(child.id()).map_err(io::Error::other)?,
        scale,
    )
}

/// [`run_traced`] for a child known by its pid, which calls [`trace_me`] and then stops
/// (at its `execve`, or by a signal).
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
}
