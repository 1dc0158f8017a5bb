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
//! A frame is at most [`MAX_FRAME`] bytes, the size of the window. The VMM's [`Decoder`]
//! reassembles frames from `(offset, byte)` pairs: a byte at offset 0 always starts a new
//! frame (an unfinished one is reported as truncated), a byte at any other offset must be
//! the next one expected. It keeps one fixed buffer, never allocates for a frame and
//! never panics, whatever the guest writes. Writers in the guest must not interleave
//! frames (the agent holds a lock around each `pwrite`).
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

use crate::message::{DecodeError, Message};

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

/// What one byte fed to the [`Decoder`] completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// The frame is not complete yet.
    Pending,
    /// A frame ended: the message, or why it is not one.
    Done(Result<Message, DecodeError>),
}

/// Reassembles frames from the bytes written to the window and decodes them. Bounded:
/// one [`MAX_FRAME`] buffer, no allocation per byte, no panic on any input.
#[derive(Clone)]
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder waiting for the first byte of a frame.
    pub const fn new() -> Self {
        Decoder {
            buf: [0; MAX_FRAME],
            len: 0,
        }
    }

    /// Whether a frame has begun and not ended.
    pub fn in_frame(&self) -> bool {
        self.len > 0
    }

    /// Feeds the byte the guest wrote at window `offset`. A byte at offset 0 starts a new
    /// frame; if one was unfinished, it is reported as [`DecodeError::Truncated`] and the
    /// new frame begins with this byte.
    pub fn feed(&mut self, offset: u16, byte: u8) -> Feed {
        let offset = usize::from(offset);
        if offset == 0 {
            let unfinished = self.unfinished();
            self.buf[0] = byte;
            self.len = 1;
            return match unfinished {
                Some(e) => Feed::Done(Err(e)),
                None => Feed::Pending,
            };
        }
        if offset != self.len || offset >= MAX_FRAME {
            let e = DecodeError::OutOfSequence {
                offset,
                expected: self.len,
            };
            self.len = 0;
            return Feed::Done(Err(e));
        }
        self.buf[offset] = byte;
        self.len += 1;
        if self.len < FRAME_HEADER {
            return Feed::Pending;
        }
        let want = FRAME_HEADER + usize::from(self.buf[1]);
        if want > MAX_FRAME {
            self.len = 0;
            return Feed::Done(Err(DecodeError::TooLong {
                kind: self.buf[0],
                len: usize::from(self.buf[1]),
            }));
        }
        if self.len < want {
            return Feed::Pending;
        }
        self.len = 0;
        Feed::Done(Message::decode(self.buf[0], &self.buf[FRAME_HEADER..want]))
    }

    fn unfinished(&self) -> Option<DecodeError> {
        (self.len > 0).then(|| DecodeError::Truncated {
            kind: self.buf[0],
            got: self.len,
        })
    }

    /// Feeds a whole buffer written at offset 0 (tests, and `pwrite`-like callers);
    /// returns every result it completed.
    pub fn feed_frame(&mut self, bytes: &[u8]) -> Vec<Result<Message, DecodeError>> {
        let mut out = Vec::new();
        for (i, &b) in bytes.iter().enumerate() {
            let Ok(offset) = u16::try_from(i) else {
                break;
            };
            if let Feed::Done(r) = self.feed(offset, b) {
                out.push(r);
            }
        }
        out
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

    #[test]
    fn a_new_frame_reports_the_unfinished_one() {
        let mut d = Decoder::new();
        let frame = Message::RebootRequested.encode();
        // Only the kind byte of a frame, then a whole frame.
        assert_eq!(d.feed(0, frame.kind()), Feed::Pending);
        let got = d.feed_frame(frame.as_bytes());
        assert_eq!(
            got,
            vec![
                Err(DecodeError::Truncated {
                    kind: frame.kind(),
                    got: 1
                }),
                Ok(Message::RebootRequested)
            ]
        );
        assert!(!d.in_frame());
    }

    #[test]
    fn bytes_out_of_sequence_are_errors_and_resync_at_offset_zero() {
        let mut d = Decoder::new();
        assert_eq!(
            d.feed(5, 1),
            Feed::Done(Err(DecodeError::OutOfSequence {
                offset: 5,
                expected: 0
            }))
        );
        assert_eq!(
            d.feed(u16::MAX, 1),
            Feed::Done(Err(DecodeError::OutOfSequence {
                offset: usize::from(u16::MAX),
                expected: 0
            }))
        );
        let up = Message::UserspaceUp { cpus_online: 2 };
        assert_eq!(d.feed_frame(up.encode().as_bytes()), vec![Ok(up)]);
    }

    #[test]
    fn a_length_past_the_window_is_refused() {
        let mut d = Decoder::new();
        assert_eq!(d.feed(0, 0x01), Feed::Pending);
        assert_eq!(
            d.feed(1, 0xff),
            Feed::Done(Err(DecodeError::TooLong {
                kind: 0x01,
                len: 0xff
            }))
        );
        assert!(!d.in_frame());
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic noise at random offsets, plus whole random frames.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut d = Decoder::new();
        let (mut ok, mut err) = (0, 0);
        for _ in 0..200_000 {
            let [b0, b1, b2, ..] = next().to_le_bytes();
            // Mostly in-sequence bytes, sometimes a jump, sometimes a frame start.
            let offset = match b0 % 8 {
                0 => 0,
                1 => u16::from(b1) * 2,
                _ => u16::try_from(d.len).unwrap_or(0),
            };
            if let Feed::Done(res) = d.feed(offset, b2) {
                match res {
                    Ok(_) => ok += 1,
                    Err(_) => err += 1,
                }
            }
        }
        assert!(err > 0, "noise must produce errors");
        // Whether noise forms valid messages is luck; the decoder must just survive it.
        let _ = ok;
    }
}
