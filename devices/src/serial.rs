//! The 8250 UART at COM1, backed by `vm-superio`, raising IRQ 4 through an irqfd.

use std::io;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;
use crate::console::ConsoleOutput;
use crate::EventFdTrigger;

/// The receive FIFO of vm-superio's UART, in bytes.
const UART_FIFO: usize = 64;

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// The serial console device.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOutput>,
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

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Puts the UART back in `state`, keeping its interrupt line and output; raises the
    /// interrupt again if `state` has one pending (as vm-superio's `Serial::from_state`).
    /// Errors: a FIFO longer than the UART's, or an interrupt that cannot be signalled.
    pub fn restore(&mut self, state: &SerialState) -> io::Result<()> {
        // Checked here, before the output is moved: vm-superio refuses the same.
        if state.in_buffer.len() > UART_FIFO {
            return Err(io::Error::other(format!(
                "serial state: {} bytes in a FIFO of {UART_FIFO}",
                state.in_buffer.len()
            )));
        }
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        let out = self.take_output();
        let uart = Serial::from_state(state, EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        self.uart = uart;
        Ok(())
    }

    /// Sends the guest's console bytes to `out` from now on (a new run's log and
    /// observer); returns the old output.
    pub fn set_output(&mut self, out: ConsoleOutput) -> ConsoleOutput {
        std::mem::replace(self.uart.writer_mut(), out)
    }

    fn take_output(&mut self) -> ConsoleOutput {
        self.set_output(ConsoleOutput::new(false, None, None))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_fifo_survive_a_restore_and_the_output_stays() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut a = SerialConsole::new(
            irq.try_clone().unwrap(),
            ConsoleOutput::new(false, None, None),
        );
        // Scratch register, then two input bytes.
        a.write(7, &[0x5a]);
        a.enqueue_input(b"xy").unwrap();
        let state = a.state();
        let mut b = SerialConsole::new(irq, ConsoleOutput::new(false, None, None));
        b.restore(&state).unwrap();
        let mut byte = [0u8];
        b.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        b.read(0, &mut byte);
        assert_eq!(byte[0], b'x');
        assert_eq!(b.state().in_buffer, b"y");
        // A FIFO longer than the UART's is refused, not truncated.
        let mut huge = state.clone();
        huge.in_buffer = vec![0; 4096];
        assert!(b.restore(&huge).is_err());
    }
}
