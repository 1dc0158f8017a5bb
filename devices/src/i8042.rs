//! The i8042 keyboard controller, only for its "pulse reset line" command: that is how a
//! Linux guest with `reboot=k` asks for a reset, and luo-vmm turns it into a clean exit.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::PioDevice;
use crate::EventFdTrigger;

/// Base port of the i8042 (data 0x60, command/status 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Ports covered by the i8042: 0x60..=0x64. Port 0x61 is the PIT speaker port, which
/// KVM's in-kernel PIT answers before the exit reaches us.
pub const I8042_LEN: u16 = 5;

/// The i8042 device.
pub struct ResetDevice(I8042Device<EventFdTrigger>);

impl ResetDevice {
    /// An i8042 whose CPU-reset command signals `reset`.
    pub fn new(reset: EventFd) -> Self {
        Self(I8042Device::new(EventFdTrigger(reset)))
    }
}

impl PioDevice for ResetDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.0.read(o));
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(off, *byte) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_reset() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = ResetDevice::new(evt.try_clone().unwrap());
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "a data-port write must not reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
