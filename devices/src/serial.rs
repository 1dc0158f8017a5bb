//! The 8250 UART at COM1, backed by `vm-superio`, raising IRQ 4 through an irqfd.

use std::io;

use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;
use crate::console::ConsoleOutput;
use crate::EventFdTrigger;

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// The serial console device.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOutput>,
}

impl SerialConsole {
    /// A UART that signals `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(input)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), &mut *data) {
            *byte = self.uart.read(off);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *byte) {
                log::warn!("serial: write at offset {off}: {e:?}");
            }
        }
    }
}
