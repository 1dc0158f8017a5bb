//! The probe port: how the agent tells the VMM where the guest is.
//!
//! Protocol (the VMM side lives in `devices/`): the agent opens `/dev/port` and, for each
//! mark, writes exactly ONE byte at file offset [`PROBE_PORT`] (`pwrite(fd, &[code], 0x600)`);
//! the kernel's `/dev/port` driver turns that into `outb code, 0x600`, which the VMM sees as
//! a port-I/O exit and timestamps. Codes:
//!
//! | code | mark | when |
//! | --- | --- | --- |
//! | `0x01` | userspace-up | every boot, right after the `luo-agent: userspace up` banner |
//! | `0x02` | reboot-requested | just before `reboot(LINUX_REBOOT_CMD_KEXEC)` |
//! | `0x03` | workload-resumed | stage 2, after every check passed |
//! | `0x10` | agent-success | just before the final reboot, when everything passed |
//! | `0x11` | agent-failure | just before the reboot that follows any failure |
//!
//! Without `/dev/port` the agent prints a warning and carries on without marks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// The I/O port the VMM's probe device listens on.
pub const PROBE_PORT: u64 = 0x600;

/// A mark the agent sends to the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mark {
    /// The agent runs (sent on every boot).
    UserspaceUp = 0x01,
    /// The agent is about to call `reboot(LINUX_REBOOT_CMD_KEXEC)`.
    RebootRequested = 0x02,
    /// Stage 2 retrieved and verified everything it preserved.
    WorkloadResumed = 0x03,
    /// Everything passed; the final reboot follows.
    AgentSuccess = 0x10,
    /// Something failed; a reboot follows.
    AgentFailure = 0x11,
}

/// The open `/dev/port`, or nothing when the kernel has none.
pub struct Probe {
    port: Option<File>,
}

impl Probe {
    /// Opens `/dev/port`; prints a warning (and sends nothing later) when it is missing.
    pub fn open() -> Self {
        match OpenOptions::new().write(true).open("/dev/port") {
            Ok(port) => Probe { port: Some(port) },
            Err(e) => {
                println!("luo-agent: warning: no probe port, /dev/port: {e}");
                Probe { port: None }
            }
        }
    }

    /// Sends `mark` (one `outb` to [`PROBE_PORT`]). A failed write is reported, not fatal.
    pub fn mark(&self, mark: Mark) {
        if let Some(port) = &self.port {
            if let Err(e) = port.write_at(&[mark as u8], PROBE_PORT) {
                println!("luo-agent: warning: probe mark {mark:?} not sent: {e}");
            }
        }
    }
}
