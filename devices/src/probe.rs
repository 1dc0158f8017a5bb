//! The probe device: the VMM's end of the window of I/O ports through which the guest
//! agent talks to luo-vmm. The protocol is `luo_protocol::probe` (frames, registers,
//! gates) and `luo_protocol::message` (messages and their decoder); this device
//! reassembles frames from port writes, timestamps each message with the host's monotonic
//! clock when its first byte arrives (so the guest's own, possibly emulated, clock plays
//! no part), and answers register reads.
//!
//! The guest is hostile: the decoder keeps one fixed buffer, and messages go to the VMM
//! through a bounded channel; when it is full they are counted as dropped, never queued
//! without bound, and the vCPU never blocks on it. An optional `EventFd`
//! ([`ProbePort::with_notifier`]) is signalled after each message queued, so the VMM can
//! wait for messages in an event loop instead of polling the channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use luo_protocol::message::{DecodeError, Decoder, Feed, Message};
use luo_protocol::probe::{
    Gate, GATE_CLOSED, GATE_OPEN, MAX_FRAME, REG_SIGNATURE, REG_VERSION, SIGNATURE, VERSION,
};
pub use luo_protocol::probe::{PROBE_PORT, PROBE_PORTS};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;

/// Messages the channel holds before the probe drops new ones (the VMM drains it each
/// time the notifier wakes it).
pub const PROBE_QUEUE: usize = 4096;

/// A message (or why bytes were not one) with the host-monotonic instant its frame began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeEvent {
    /// What the guest said.
    pub item: Result<Message, DecodeError>,
    /// When the first byte of its frame arrived.
    pub at: Instant,
}

/// The gates, shared by the device (which answers their registers) and the VMM (which
/// opens and closes them). Every gate starts open.
#[derive(Debug, Clone, Default)]
pub struct Gates {
    /// Bit g set: gate g is closed.
    closed: Arc<AtomicU64>,
}

impl Gates {
    /// Closes `gate`: the agent will wait there.
    pub fn close(&self, gate: Gate) {
        self.closed.fetch_or(1 << gate.id(), Ordering::SeqCst);
    }

    /// Opens `gate`: an agent waiting there goes on at its next poll.
    pub fn open(&self, gate: Gate) {
        self.closed.fetch_and(!(1 << gate.id()), Ordering::SeqCst);
    }

    /// Whether `gate` is open.
    pub fn is_open(&self, gate: Gate) -> bool {
        self.closed.load(Ordering::SeqCst) & (1 << gate.id()) == 0
    }

    /// Every gate at once: bit g set when gate g is closed (what a snapshot keeps).
    pub fn closed_bits(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sets every gate at once from [`Gates::closed_bits`].
    pub fn set_closed_bits(&self, bits: u64) {
        self.closed.store(bits, Ordering::SeqCst);
    }
}

/// What the probe device holds besides its gates: the frame begun and not ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// The bytes of the unfinished frame ([`Decoder::pending`]); empty between frames.
    pub pending: Vec<u8>,
}

/// The probe's receiving end, kept by the VMM.
pub struct ProbeReceiver {
    /// Messages in arrival order.
    pub events: Receiver<ProbeEvent>,
    /// Messages dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
}

/// Hears each message on the vCPU thread that wrote its last byte, before the guest
/// instruction that wrote it completes: what it does happens-before anything the guest
/// does next.
pub type ProbeListener = Arc<dyn Fn(&ProbeEvent) + Send + Sync>;

/// The probe device.
pub struct ProbePort {
    listener: Option<ProbeListener>,
    decoder: Decoder,
    frame_start: Instant,
    events: SyncSender<ProbeEvent>,
    notifier: Option<EventFd>,
    dropped: Arc<AtomicU64>,
    gates: Gates,
}

impl ProbePort {
    /// A probe answering gate registers from `gates`; the VMM reads what it decodes from
    /// the returned receiver.
    pub fn new(gates: Gates) -> (Self, ProbeReceiver) {
        let (tx, rx) = sync_channel(PROBE_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let probe = ProbePort {
            listener: None,
            decoder: Decoder::new(),
            frame_start: Instant::now(),
            events: tx,
            notifier: None,
            dropped: dropped.clone(),
            gates,
        };
        (
            probe,
            ProbeReceiver {
                events: rx,
                dropped,
            },
        )
    }

    /// Adds a listener that hears every message synchronously (besides the receiver).
    pub fn with_listener(mut self, listener: ProbeListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Signals `notifier` after each message queued on the receiver (not for one
    /// dropped: the queue is full, so the VMM has been signalled already and not drained
    /// yet).
    pub fn with_notifier(mut self, notifier: EventFd) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// The device's state for a snapshot.
    pub fn state(&self) -> ProbeState {
        ProbeState {
            pending: self.decoder.pending().to_vec(),
        }
    }

    /// Puts the decoder back in `state`: its unfinished frame fed again (nothing is
    /// emitted: a frame that was unfinished stays unfinished; bytes beyond one frame are
    /// dropped, as the decoder would).
    pub fn restore(&mut self, state: &ProbeState) {
        self.decoder = Decoder::new();
        let frame = &state.pending[..state.pending.len().min(MAX_FRAME - 1)];
        for (offset, &b) in (0u16..).zip(frame) {
            if let Feed::Done(_) = self.decoder.feed(offset, b) {
                // A complete frame was not pending: start clean.
                self.decoder = Decoder::new();
            }
        }
        self.frame_start = Instant::now();
    }

    fn register(&self, offset: u16) -> u8 {
        match offset {
            REG_SIGNATURE => SIGNATURE,
            REG_VERSION => VERSION,
            _ => match Gate::at_register(offset) {
                Some(g) if self.gates.is_open(g) => GATE_OPEN,
                Some(_) => GATE_CLOSED,
                None => 0,
            },
        }
    }

    fn emit(&self, item: Result<Message, DecodeError>, at: Instant) {
        let event = ProbeEvent { item, at };
        if let Some(l) = &self.listener {
            l(&event);
        }
        match self.events.try_send(event) {
            Ok(()) => {
                if let Some(n) = &self.notifier {
                    // Only fails when the counter would overflow: the VMM is woken anyway.
                    let _ = n.write(1);
                }
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The VMM is shutting down; messages are moot.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl PioDevice for ProbePort {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (port, b) in (offset..).zip(data.iter_mut()) {
            *b = self.register(port);
        }
    }

    /// A wider access (`outw`, `outl`) writes its bytes at consecutive offsets, as
    /// `/dev/port` does.
    fn write(&mut self, offset: u16, data: &[u8]) {
        let now = Instant::now();
        for (port, &b) in (offset..).zip(data) {
            if port == 0 {
                self.frame_start = now;
            }
            if let Feed::Done(item) = self.decoder.feed(port, b) {
                let at = if item.is_ok() { self.frame_start } else { now };
                self.emit(item, at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_frame(probe: &mut ProbePort, msg: &Message) {
        for (i, &b) in (0u16..).zip(msg.encode().as_bytes()) {
            probe.write(i, &[b]);
        }
    }

    #[test]
    fn an_unfinished_frame_survives_a_state_round_trip() {
        let msg = Message::UserspaceUp { cpus_online: 3 };
        let frame = msg.encode();
        let bytes = frame.as_bytes();
        let (mut probe, rx) = ProbePort::new(Gates::default());
        // Half a frame, then a snapshot.
        let half = bytes.len() / 2;
        for (i, &b) in (0u16..).zip(&bytes[..half]) {
            probe.write(i, &[b]);
        }
        let state = probe.state();
        assert_eq!(state.pending, bytes[..half]);
        // Another device, restored, gets the rest and completes the same message.
        let (mut other, rx2) = ProbePort::new(Gates::default());
        other.restore(&state);
        for (i, &b) in (0u16..).zip(bytes).skip(half) {
            other.write(i, &[b]);
        }
        assert_eq!(rx2.events.try_recv().unwrap().item, Ok(msg));
        assert!(rx.events.try_recv().is_err());
        // Between frames the state is empty, and a hostile oversized state is cut.
        assert!(other.state().pending.is_empty());
        other.restore(&ProbeState {
            pending: vec![0; 10 * MAX_FRAME],
        });
        assert!(other.state().pending.len() < MAX_FRAME);
    }

    #[test]
    fn gates_round_trip_as_bits() {
        let g = Gates::default();
        g.close(Gate::BEFORE_REBOOT);
        let bits = g.closed_bits();
        let h = Gates::default();
        h.set_closed_bits(bits);
        assert!(!h.is_open(Gate::BEFORE_REBOOT));
        h.set_closed_bits(0);
        assert!(h.is_open(Gate::BEFORE_REBOOT));
    }

    #[test]
    fn messages_arrive_decoded_and_in_order() {
        let (mut probe, rx) = ProbePort::new(Gates::default());
        let sent = [
            Message::UserspaceUp { cpus_online: 2 },
            Message::RebootRequested,
            Message::WorkloadResumed,
        ];
        for m in &sent {
            write_frame(&mut probe, m);
        }
        // Garbage: a byte out of sequence.
        probe.write(9, &[1]);
        let got: Vec<_> = rx.events.try_iter().map(|e| e.item).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[..3], sent.map(Ok));
        assert!(matches!(got[3], Err(DecodeError::OutOfSequence { .. })));
    }

    #[test]
    fn registers_and_gates() {
        let gates = Gates::default();
        let (mut probe, _rx) = ProbePort::new(gates.clone());
        let mut b = [0u8; 2];
        probe.read(REG_SIGNATURE, &mut b);
        assert_eq!(b, [SIGNATURE, VERSION]);
        let g = Gate::new(5).unwrap();
        let mut r = [0u8];
        probe.read(g.register(), &mut r);
        assert_eq!(r, [GATE_OPEN], "gates start open");
        gates.close(g);
        probe.read(g.register(), &mut r);
        assert_eq!(r, [GATE_CLOSED]);
        assert!(gates.is_open(Gate::BEFORE_REBOOT));
        gates.open(g);
        probe.read(g.register(), &mut r);
        assert_eq!(r, [GATE_OPEN]);
        probe.read(0x3f, &mut r);
        assert_eq!(r, [0]);
    }

    #[test]
    fn a_flood_is_dropped_not_queued() {
        let (mut probe, rx) = ProbePort::new(Gates::default());
        for _ in 0..PROBE_QUEUE + 10 {
            write_frame(&mut probe, &Message::RebootRequested);
        }
        assert_eq!(rx.events.try_iter().count(), PROBE_QUEUE);
        assert_eq!(rx.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn the_notifier_is_signalled_for_each_message_queued() {
        let ready = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let (probe, rx) = ProbePort::new(Gates::default());
        let mut probe = probe.with_notifier(ready.try_clone().unwrap());
        assert!(ready.read().is_err(), "nothing sent yet");
        write_frame(&mut probe, &Message::RebootRequested);
        write_frame(&mut probe, &Message::WorkloadResumed);
        assert_eq!(ready.read().unwrap(), 2);
        assert_eq!(rx.events.try_iter().count(), 2);
        // A flood: the notifier counts what was queued, not what was dropped.
        for _ in 0..PROBE_QUEUE + 3 {
            write_frame(&mut probe, &Message::RebootRequested);
        }
        assert_eq!(ready.read().unwrap(), PROBE_QUEUE as u64);
        assert_eq!(rx.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn wide_writes_fill_consecutive_offsets() {
        let (mut probe, rx) = ProbePort::new(Gates::default());
        let frame = Message::UserspaceUp { cpus_online: 7 }.encode();
        // outl at 0 carries the whole 4-byte frame.
        probe.write(0, frame.as_bytes());
        let got: Vec<_> = rx.events.try_iter().map(|e| e.item).collect();
        assert_eq!(got, vec![Ok(Message::UserspaceUp { cpus_online: 7 })]);
    }
}
