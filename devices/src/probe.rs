//! The handover probe: a one-port paravirtual device through which the guest agent
//! tells the VMM where it is.
//!
//! # Protocol
//!
//! The guest writes one byte to I/O port [`PROBE_PORT`] (0x600) per mark; from user space
//! the agent does `pwrite(fd("/dev/port"), [code], 0x600)`, which the kernel turns into
//! `outb code, 0x600`. The VMM timestamps each write on arrival with the host's monotonic
//! clock, so the guest's own (possibly emulated, possibly paused) clock plays no part.
//! Reads of the port return [`PROBE_SIGNATURE`] so a guest can tell the device is there.
//!
//! | code | mark | sent |
//! | --- | --- | --- |
//! | 0x01 | `userspace-up` | every boot, right after the agent's banner |
//! | 0x02 | `reboot-requested` | just before `reboot(LINUX_REBOOT_CMD_KEXEC)` |
//! | 0x03 | `workload-resumed` | in the next kernel, once every session and memfd is verified |
//! | 0x10 | `agent-success` | before the final reboot when everything passed |
//! | 0x11 | `agent-failure` | before the reboot after any failure |
//!
//! Unknown codes are reported as [`ProbeMark::Unknown`], never dropped silently.

use std::sync::mpsc::Sender;
use std::time::Instant;

use crate::bus::PioDevice;

/// The probe's I/O port.
pub const PROBE_PORT: u16 = 0x600;
/// What a read of the probe port returns ('L' for luo-vmm).
pub const PROBE_SIGNATURE: u8 = 0x4c;

/// A mark the guest agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMark {
    /// The agent runs (any boot).
    UserspaceUp,
    /// The agent is about to call `reboot(KEXEC)`.
    RebootRequested,
    /// The agent has retrieved and verified all preserved state in the next kernel.
    WorkloadResumed,
    /// Everything the agent was asked to do passed.
    AgentSuccess,
    /// Something the agent was asked to do failed.
    AgentFailure,
    /// A code this VMM does not know.
    Unknown(u8),
}

impl From<u8> for ProbeMark {
    fn from(code: u8) -> Self {
        match code {
            0x01 => Self::UserspaceUp,
            0x02 => Self::RebootRequested,
            0x03 => Self::WorkloadResumed,
            0x10 => Self::AgentSuccess,
            0x11 => Self::AgentFailure,
            other => Self::Unknown(other),
        }
    }
}

/// A mark with the host-monotonic instant it arrived.
#[derive(Debug, Clone, Copy)]
pub struct ProbeEvent {
    /// What the guest said.
    pub mark: ProbeMark,
    /// When the VMM saw it.
    pub at: Instant,
}

/// The probe device: forwards every mark to a channel.
pub struct ProbePort {
    events: Sender<ProbeEvent>,
}

impl ProbePort {
    /// A probe that sends what it sees to `events`.
    pub fn new(events: Sender<ProbeEvent>) -> Self {
        Self { events }
    }
}

impl PioDevice for ProbePort {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(PROBE_SIGNATURE);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        let at = Instant::now();
        // A wider write carries its mark in the low byte.
        if let Some(&code) = data.first() {
            // The receiver may be gone while the VM shuts down; marks are then moot.
            let _ = self.events.send(ProbeEvent {
                mark: ProbeMark::from(code),
                at,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn decodes_marks_in_order() {
        let (tx, rx) = channel();
        let mut probe = ProbePort::new(tx);
        for code in [0x01, 0x02, 0x03, 0x10, 0x11, 0x7f] {
            probe.write(0, &[code]);
        }
        let marks: Vec<_> = rx.try_iter().map(|e| e.mark).collect();
        assert_eq!(
            marks,
            vec![
                ProbeMark::UserspaceUp,
                ProbeMark::RebootRequested,
                ProbeMark::WorkloadResumed,
                ProbeMark::AgentSuccess,
                ProbeMark::AgentFailure,
                ProbeMark::Unknown(0x7f),
            ]
        );
        let mut b = [0u8];
        probe.read(0, &mut b);
        assert_eq!(b, [PROBE_SIGNATURE]);
    }
}
