//! The probe device: a window of I/O ports through which the agent talks to the VMM.
//!
//! # Writes: frames
//!
//! The agent writes one *frame* per message with ONE `pwrite(fd("/dev/port"), frame,
//! PROBE_PORT)`. The kernel's `/dev/port` driver turns that into one `outb` per byte at
//! consecutive ports, so byte `i` of the frame arrives at window offset `i`:
//!
//! ```text
//! offset 0      1        2 .. 2+len
//!        kind   len      payload (little-endian fields, see message.rs)
//! ```
//!
//! A frame is at most [`MAX_FRAME`] bytes, the size of the window. The VMM's decoder
//! ([`crate::message::Decoder`], next to the messages it yields) reassembles frames from
//! `(offset, byte)` pairs: a byte at offset 0 always starts a new frame (an unfinished one
//! is reported as truncated), a byte at any other offset must be the next one expected. It
//! keeps one fixed buffer, never allocates for a frame and never panics, whatever the
//! guest writes. Writers in the guest must not interleave frames (the agent holds a lock
//! around each `pwrite`).
//!
//! # Reads: registers
//!
//! | offset | reads as |
//! | --- | --- |
//! | [`REG_SIGNATURE`] | [`SIGNATURE`] (`'L'`): the device is there |
//! | [`REG_VERSION`] | [`VERSION`] |
//! | [`REG_GATES`] + g | [`GATE_OPEN`] or [`GATE_CLOSED`]: gate g (g < [`MAX_GATES`]) |
//! | any other | 0 |

use std::fmt;

/// First I/O port of the probe window.
pub const PROBE_PORT: u16 = 0x600;
/// Ports in the window (0x600..=0x67f), which is also the longest frame.
pub const PROBE_PORTS: u16 = 128;
/// Longest frame in bytes: header and payload.
pub const MAX_FRAME: usize = PROBE_PORTS as usize;
/// Bytes before the payload: kind and payload length.
pub const FRAME_HEADER: usize = 2;
/// Longest payload in bytes.
pub const MAX_PAYLOAD: usize = MAX_FRAME - FRAME_HEADER;

/// Register: reads as [`SIGNATURE`].
pub const REG_SIGNATURE: u16 = 0x00;
/// Register: reads as [`VERSION`].
pub const REG_VERSION: u16 = 0x01;
/// First gate register: gate g reads at `REG_GATES + g`.
pub const REG_GATES: u16 = 0x40;
/// What the signature register reads ('L' for luo-vmm).
pub const SIGNATURE: u8 = 0x4c;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// A gate register's value when the agent may pass.
pub const GATE_OPEN: u8 = 1;
/// A gate register's value when the agent must wait.
pub const GATE_CLOSED: u8 = 0;
/// Number of gates.
pub const MAX_GATES: u8 = 64;

const _: () = assert!(REG_GATES as usize + MAX_GATES as usize <= PROBE_PORTS as usize);

/// A place in the agent's work where it can be made to wait until the VMM opens it.
/// Gates are open unless the VMM closes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gate(u8);

impl Gate {
    /// Just before the agent marks `reboot-requested` and calls `reboot(KEXEC)`.
    pub const BEFORE_REBOOT: Gate = Gate(0);

    /// Gate `id`, if `id < MAX_GATES`.
    pub const fn new(id: u8) -> Option<Gate> {
        if id < MAX_GATES {
            Some(Gate(id))
        } else {
            None
        }
    }

    /// The gate's number.
    pub const fn id(self) -> u8 {
        self.0
    }

    /// Window offset of the gate's register.
    pub const fn register(self) -> u16 {
        REG_GATES + self.0 as u16
    }

    /// The gate whose register is at window offset `offset`, if any.
    pub const fn at_register(offset: u16) -> Option<Gate> {
        if offset >= REG_GATES && offset < REG_GATES + MAX_GATES as u16 {
            // The range check above keeps the difference below MAX_GATES (64).
            #[allow(clippy::cast_possible_truncation)]
            Some(Gate((offset - REG_GATES) as u8))
        } else {
            None
        }
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gate {}", self.0)
    }
}

/// One encoded message: what the agent writes in one `pwrite`.
#[derive(Clone, Copy)]
pub struct Frame {
    bytes: [u8; MAX_FRAME],
    len: usize,
}

impl Frame {
    /// A frame of `kind` with `payload`; `None` if the payload is longer than
    /// [`MAX_PAYLOAD`].
    pub fn new(kind: u8, payload: &[u8]) -> Option<Frame> {
        (payload.len() <= MAX_PAYLOAD).then(|| Frame::truncating(kind, payload))
    }

    /// A frame of `kind` with the first [`MAX_PAYLOAD`] bytes of `payload`.
    pub(crate) fn truncating(kind: u8, payload: &[u8]) -> Frame {
        let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
        let mut bytes = [0u8; MAX_FRAME];
        bytes[0] = kind;
        // At most MAX_PAYLOAD (126): always fits.
        bytes[1] = u8::try_from(payload.len()).unwrap_or(u8::MAX);
        bytes[FRAME_HEADER..FRAME_HEADER + payload.len()].copy_from_slice(payload);
        Frame {
            bytes,
            len: FRAME_HEADER + payload.len(),
        }
    }

    /// The bytes to write at [`PROBE_PORT`].
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The message kind (first byte).
    pub fn kind(&self) -> u8 {
        self.bytes[0]
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[FRAME_HEADER..self.len]
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({:02x?})", self.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_map_to_registers() {
        assert_eq!(Gate::BEFORE_REBOOT.register(), REG_GATES);
        let last = Gate::new(MAX_GATES - 1).unwrap();
        assert_eq!(Gate::at_register(last.register()), Some(last));
        assert_eq!(Gate::new(MAX_GATES), None);
        assert_eq!(Gate::at_register(REG_GATES - 1), None);
        assert_eq!(Gate::at_register(REG_GATES + u16::from(MAX_GATES)), None);
        assert!(last.register() < PROBE_PORTS);
    }

    #[test]
    fn frames_are_bounded() {
        assert!(Frame::new(1, &[0; MAX_PAYLOAD]).is_some());
        assert!(Frame::new(1, &[0; MAX_PAYLOAD + 1]).is_none());
        let f = Frame::new(7, &[1, 2, 3]).unwrap();
        assert_eq!(f.as_bytes(), &[7, 3, 1, 2, 3]);
        assert_eq!((f.kind(), f.payload()), (7, &[1u8, 2, 3][..]));
    }
}
