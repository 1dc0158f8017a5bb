//! Where the guest's console bytes go: the host's stdout (never blocking the vCPU),
//! optionally a log file, and an observer that sees every complete line.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Called with each complete console line (without the line ending).
pub type LineObserver = Arc<dyn Fn(&str) + Send + Sync>;

/// The writer behind the serial device.
pub struct ConsoleOutput {
    stdout: Option<io::Stdout>,
    log: Option<File>,
    observer: Option<LineObserver>,
    line: Vec<u8>,
}

/// Longest line kept for the observer; longer lines are cut (the guest controls them).
const MAX_LINE: usize = 4096;

impl ConsoleOutput {
    /// A console that echoes to stdout when `echo` is set, appends to `log` when given and
    /// hands each complete line to `observer`.
    pub fn new(echo: bool, log: Option<File>, observer: Option<LineObserver>) -> Self {
        let stdout = echo.then(|| {
            set_nonblocking(&io::stdout());
            io::stdout()
        });
        Self {
            stdout,
            log,
            observer,
            line: Vec::new(),
        }
    }

    fn observe(&mut self, buf: &[u8]) {
        let Some(observer) = &self.observer else {
            return;
        };
        for &b in buf {
            match b {
                b'\n' => {
                    let text = String::from_utf8_lossy(&self.line);
                    observer(text.trim_end_matches('\r'));
                    self.line.clear();
                }
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(out) = &mut self.stdout {
            // A full terminal pipe must not stall the guest: drop what does not fit.
            let _ = out.write(buf);
        }
        if let Some(log) = &mut self.log {
            log.write_all(buf)?;
        }
        self.observe(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(out) = &mut self.stdout {
            let _ = out.flush();
        }
        Ok(())
    }
}

fn set_nonblocking(fd: &impl AsRawFd) {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a valid, open descriptor; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn observer_sees_whole_lines_across_writes() {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = seen.clone();
        let mut out = ConsoleOutput::new(
            false,
            None,
            Some(Arc::new(move |l: &str| {
                sink.lock().unwrap().push(l.to_owned())
            })),
        );
        out.write_all(b"hel").unwrap();
        out.write_all(b"lo\r\nwor").unwrap();
        out.write_all(b"ld\n").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["hello", "world"]);
    }
}
