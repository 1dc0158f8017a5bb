//! A bus that routes port I/O to the device that owns the port.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device that answers port I/O. `offset` is relative to the base of its range.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors of building the bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range that is already claimed.
    #[error("port range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// First port of the new range.
        base: u16,
        /// Its length.
        len: u16,
    },
    /// A range of zero length, or one that runs past port 0xffff.
    #[error("invalid port range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First port of the range.
        base: u16,
        /// Its length.
        len: u16,
    },
}

type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// Port-I/O bus: a sorted map of non-overlapping `[base, base + len)` ranges.
#[derive(Default, Clone)]
pub struct PioBus {
    ranges: BTreeMap<u16, (u16, SharedDevice)>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on the bus at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u16, len: u16) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::InvalidRange { base, len });
        }
        let overlaps_prev = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(b, (l, _))| u32::from(*b) + u32::from(*l) > u32::from(base));
        let overlaps_next = self
            .ranges
            .range(base..)
            .next()
            .is_some_and(|(b, _)| u32::from(*b) < end);
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=port).next_back()?;
        (u32::from(port) < u32::from(*base) + u32::from(*len)).then_some((port - base, dev))
    }

    /// Routes a guest read. Unclaimed ports read as all ones, as on a real ISA bus.
    /// Returns whether a device claimed the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a guest write. Returns whether a device claimed the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A poisoned device lock only means another vCPU thread panicked mid-access; the device
/// state is still the best we have, so keep serving it.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn PioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlap() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x3fc, 8),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x3f0, 9),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        bus.insert(dev.clone(), 0x3f0, 8).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0xfff0, 0x20),
            Err(BusError::InvalidRange {
                base: 0xfff0,
                len: 0x20
            })
        );

        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.read(0x80, &mut buf));
        assert_eq!(buf, [0xff]);
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![9])]);
    }
}
