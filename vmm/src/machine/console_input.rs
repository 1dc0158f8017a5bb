//! Host terminal input to the guest's serial console, through an event loop on
//! `event-manager`.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use luo_devices::SerialConsole;
use vmm_sys_util::epoll::EventSet;

/// Reads stdin when it is readable and queues the bytes on the UART.
struct StdinToSerial {
    serial: Arc<Mutex<SerialConsole>>,
    done: bool,
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n: usize = std::io::stdin().lock().read(&mut buf).unwrap_or_default();
        // EOF (or a closed stdin): stop watching, or epoll would report it forever.
        if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(Events::new(&std::io::stdin(), EventSet::IN));
            self.done = true;
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
            self.done = true;
        }
    }
}

/// Starts the input loop on its own thread when stdin is a terminal. Returns whether it
/// was started.
pub fn spawn(serial: Arc<Mutex<SerialConsole>>) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(std::io::stdin().as_raw_fd()) } != 1 {
        return false;
    }
    thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let Ok(mut em) = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            else {
                return;
            };
            let sub = Arc::new(Mutex::new(StdinToSerial {
                serial,
                done: false,
            }));
            em.add_subscriber(sub.clone());
            while !sub.lock().map(|s| s.done).unwrap_or(true) {
                if em.run_with_timeout(500).is_err() {
                    break;
                }
            }
        })
        .is_ok()
}
