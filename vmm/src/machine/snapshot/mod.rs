//! Snapshots of a running VM: every vCPU, the VM's in-kernel devices and clock, luo-vmm's
//! own devices, and guest RAM, taken with every vCPU stopped at an instruction boundary
//! (its pending port I/O completed), and put back either in the same process (a reset:
//! only the pages written since, from the dirty log) or in a new VM (from a file:
//! [`file`]). Firecracker's persist.rs and vstate are the reference for what a KVM VMM
//! must save; docs/snapshots.md says what the guest sees.

pub(crate) mod file;
pub(crate) mod memory;
pub(crate) mod state;

use luo_devices::{ProbeState, SerialState};
use serde::{Deserialize, Serialize};

use memory::MemoryImage;
use state::{VcpuState, VmState};

/// The 8250 UART's registers and receive FIFO (vm-superio's `SerialState`, which has no
/// serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR, in that order.
    pub registers: [u8; 9],
    /// Bytes received and not read yet.
    pub fifo: Vec<u8>,
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer.clone(),
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(u: &UartState) -> Self {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = u.registers;
        SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: u.fifo.clone(),
        }
    }
}

/// luo-vmm's devices: the UART, the probe's unfinished frame and its gates. (The i8042
/// keeps nothing between accesses; the sinks keep nothing.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1.
    pub uart: UartState,
    /// The probe's unfinished frame (empty between frames).
    pub probe_pending: Vec<u8>,
    /// Bit g set: gate g closed.
    pub gates_closed: u64,
}

impl DeviceState {
    /// The probe device's part.
    pub fn probe(&self) -> ProbeState {
        ProbeState {
            pending: self.probe_pending.clone(),
        }
    }
}

/// A whole VM at one instant.
#[derive(Debug)]
pub struct MachineSnapshot {
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The VM's in-kernel state.
    pub vm: VmState,
    /// luo-vmm's devices.
    pub devices: DeviceState,
    /// Guest RAM.
    pub memory: MemoryImage,
}

/// What a reset or a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreStats {
    /// Pages written back into guest memory.
    pub pages: usize,
    /// Wall time of the whole reset, in nanoseconds.
    pub nanos: u64,
    /// How far the guest's clock (its TSC, on the vCPU furthest off) runs ahead of the
    /// snapshot's after the reset, in nanoseconds: 0 where KVM put every TSC back (within
    /// a millisecond); else about the host time since the snapshot (a KVM that ignores the
    /// TSC writes and offsets, as the `kvm_pvm` emulator does: docs/snapshots.md).
    pub clock_ahead_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_state_round_trips() {
        let s = SerialState {
            scratch: 7,
            line_control: 3,
            in_buffer: b"ab".to_vec(),
            ..SerialState::default()
        };
        let back = SerialState::from(&UartState::from(&s));
        assert_eq!(back.scratch, 7);
        assert_eq!(back.line_control, 3);
        assert_eq!(back.in_buffer, b"ab");
        assert_eq!(UartState::from(&back), UartState::from(&s));
    }
}
