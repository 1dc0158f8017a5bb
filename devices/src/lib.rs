//! Port-I/O devices of luo-vmm.
//!
//! Every port access a vCPU makes goes through one [`PioBus`]; the devices behind it are
//! the 8250 serial console and the i8042 controller from `vm-superio`, the [`probe`]
//! window through which the guest agent talks to the VMM (protocol: `luo-protocol`), and a
//! sink that answers the legacy ports Linux probes without claiming them.

pub mod bus;
pub mod console;
pub mod i8042;
pub mod legacy;
pub mod probe;
pub mod serial;

pub use bus::{BusError, PioBus, PioDevice};
pub use console::ConsoleOutput;
pub use i8042::{ResetDevice, I8042_LEN, I8042_PORT};
pub use legacy::{Sink, LEGACY_SINK_RANGES};
pub use probe::{
    Gates, ProbeEvent, ProbeListener, ProbePort, ProbeReceiver, ProbeState, PROBE_PORT, PROBE_PORTS,
};
pub use serial::{SerialConsole, COM1_IRQ, COM1_PORT};
pub use vm_superio::serial::SerialState;

/// A `vm-superio` trigger that signals an `EventFd`: the UART's interrupt line (an
/// irqfd) or the i8042's reset line.
pub struct EventFdTrigger(pub vmm_sys_util::eventfd::EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
