//! Host terminal input to the guest's serial console: a subscriber of the VMM's
//! `event-manager` loop (`vm::Vm::run`), added only when stdin is a terminal.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use luo_devices::SerialConsole;
use vmm_sys_util::epoll::EventSet;

/// Reads stdin when it is readable and queues the bytes on the UART.
pub(crate) struct StdinToSerial {
    serial: Arc<Mutex<SerialConsole>>,
}

impl StdinToSerial {
    /// The subscriber, when stdin is a terminal (otherwise the guest gets no input).
    pub fn for_terminal(serial: Arc<Mutex<SerialConsole>>) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(std::io::stdin().as_raw_fd()) } != 1 {
            return None;
        }
        Some(StdinToSerial { serial })
    }
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n: usize = std::io::stdin().lock().read(&mut buf).unwrap_or_default();
        // EOF (or a closed stdin): stop watching, or epoll would report it forever.
        if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(Events::new(&std::io::stdin(), EventSet::IN));
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = serial.enqueue_input(&buf[..n]) {
            log::warn!("console input dropped: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            log::debug!("stdin is not pollable ({e:?}); no console input");
        }
    }
}
