//! Ports that Linux probes and that must answer harmlessly: the other three legacy
//! UARTs (an all-ones read would look like a present 16550 to some probes; zero reads
//! make the 8250 driver decide there is no UART), and the debug port 0x80.

use crate::bus::PioDevice;

/// Port ranges answered by [`Sink`]: COM2, COM3, COM4 and the POST/delay port 0x80.
pub const LEGACY_SINK_RANGES: [(u16, u16); 4] = [(0x2f8, 8), (0x3e8, 8), (0x2e8, 8), (0x80, 1)];

/// Reads zero, ignores writes.
#[derive(Debug, Default)]
pub struct Sink;

impl PioDevice for Sink {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u16, _data: &[u8]) {}
}
