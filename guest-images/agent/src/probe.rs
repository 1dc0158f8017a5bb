//! The agent's end of the probe device (luo-protocol has the protocol itself).
//!
//! `/dev/port` turns a `pwrite` of N bytes at offset P into `outb` at ports P..P+N, and a
//! `pread` of one byte at P into one `inb`: each message is one `pwrite` of its frame at
//! the window's first port, each gate poll one `pread` of the gate's register. Frames from
//! several threads must not interleave, so every write holds a lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use luo_protocol::message::{Action, Message};
use luo_protocol::probe::{Gate, GATE_OPEN, PROBE_PORT, REG_SIGNATURE, SIGNATURE};

/// How often a waiting agent reads a closed gate's register.
const GATE_POLL: Duration = Duration::from_millis(2);

/// The open `/dev/port`, or nothing when the kernel or the VMM has no probe.
pub struct Probe {
    port: Option<File>,
    write_lock: Mutex<()>,
    seq: AtomicU32,
}

/// A gate stayed closed for the whole wait.
#[derive(Debug)]
pub struct GateTimeout(pub Gate);

impl Probe {
    /// Opens `/dev/port` and checks the probe's signature; without either, prints a
    /// warning and later sends nothing (gates then read as open).
    pub fn open() -> Self {
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/port")
            .and_then(|port| {
                let mut sig = [0u8];
                port.read_exact_at(&mut sig, u64::from(PROBE_PORT + REG_SIGNATURE))?;
                if sig[0] == SIGNATURE {
                    Ok(port)
                } else {
                    Err(io::Error::other(format!(
                        "port {PROBE_PORT:#x} reads {:#04x}, not the probe's signature",
                        sig[0]
                    )))
                }
            });
        match port {
            Ok(port) => Probe {
                port: Some(port),
                write_lock: Mutex::new(()),
                seq: AtomicU32::new(0),
            },
            Err(e) => {
                println!("luo-agent: warning: no probe device, /dev/port: {e}");
                Probe {
                    port: None,
                    write_lock: Mutex::new(()),
                    seq: AtomicU32::new(0),
                }
            }
        }
    }

    /// Sends `msg` (one frame). A failed write is reported on the console, not fatal.
    pub fn send(&self, msg: &Message) {
        let Some(port) = &self.port else {
            return;
        };
        let frame = msg.encode();
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = port.write_all_at(frame.as_bytes(), u64::from(PROBE_PORT)) {
            println!("luo-agent: warning: probe message {msg:?} not sent: {e}");
        }
    }

    /// Whether `gate` is open now (always, without a probe).
    pub fn gate_open(&self, gate: Gate) -> bool {
        let Some(port) = &self.port else {
            return true;
        };
        let mut b = [0u8];
        match port.read_exact_at(&mut b, u64::from(PROBE_PORT + gate.register())) {
            Ok(()) => b[0] == GATE_OPEN,
            Err(e) => {
                println!("luo-agent: warning: cannot read {gate}: {e}; taking it as open");
                true
            }
        }
    }

    /// Announces the wait at `gate`, polls it until the VMM opens it (at most `limit`
    /// worth of polls), and announces the pass. The polls are counted, not timed: a VMM
    /// resetting to a snapshot taken during this wait may leave the guest's clock hours
    /// ahead (a KVM that cannot put the TSC back), which must not use up the wait.
    pub fn wait_gate(&self, gate: Gate, limit: Duration) -> Result<(), GateTimeout> {
        self.send(&Message::GateWait(gate));
        let polls = limit.as_millis() / GATE_POLL.as_millis().max(1);
        let mut polled = 0u128;
        while !self.gate_open(gate) {
            if polled >= polls {
                return Err(GateTimeout(gate));
            }
            polled += 1;
            std::thread::sleep(GATE_POLL);
        }
        self.send(&Message::GatePassed(gate));
        Ok(())
    }

    /// Runs `f` between the announcement of `action` (with `arg`) and its result: return
    /// value 0 or -1 and the errno of the failure.
    pub fn action<T>(
        &self,
        action: Action,
        arg: u64,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.send(&Message::ActionStart { seq, action, arg });
        let result = f();
        let (ret, errno) = match &result {
            Ok(_) => (0, 0),
            Err(e) => (-1, errno_of(e)),
        };
        self.send(&Message::ActionResult {
            seq,
            action,
            ret,
            errno,
        });
        result
    }

    /// Announces `action` without waiting for a result (a `reboot` that does not return
    /// on success); returns its sequence number for [`Probe::failed`].
    pub fn announce(&self, action: Action, arg: u64) -> u32 {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.send(&Message::ActionStart { seq, action, arg });
        seq
    }

    /// Reports the failure of an announced action.
    pub fn failed(&self, seq: u32, action: Action, err: &io::Error) {
        self.send(&Message::ActionResult {
            seq,
            action,
            ret: -1,
            errno: err.raw_os_error().unwrap_or(0),
        });
    }
}

/// The errno a failed step reports: the system call's, or for a failure of the agent's
/// own (a session or memfd this stage does not have) the one that says so, never 0
/// ("Success").
pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        _ => libc::EIO,
    })
}
