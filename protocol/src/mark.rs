//! The marks of a handover: the one `Mark` type of the project.
//!
//! Three marks come from the guest agent over the probe port
//! ([`crate::message::Message::mark`]), three from hardware breakpoints the VMM arms.

use std::fmt;
use std::str::FromStr;

/// The marks of one handover, in the order they must occur.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mark {
    /// The guest agent is about to call `reboot(LINUX_REBOOT_CMD_KEXEC)` (probe).
    RebootRequested,
    /// The old kernel entered `liveupdate_reboot` (breakpoint).
    SerializeStart,
    /// The old kernel entered `machine_kexec` (breakpoint).
    PointOfNoReturn,
    /// The next kernel entered `start_kernel` (breakpoint).
    NextKernelStart,
    /// The guest agent runs in the next kernel (probe).
    UserspaceUp,
    /// The agent retrieved its sessions and verified them (probe).
    WorkloadResumed,
}

/// Who reports a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkSource {
    /// The guest agent, over the probe port.
    Agent,
    /// A hardware breakpoint on a kernel symbol.
    Breakpoint,
}

impl Mark {
    /// Every mark, in handover order.
    pub const ALL: [Mark; 6] = [
        Mark::RebootRequested,
        Mark::SerializeStart,
        Mark::PointOfNoReturn,
        Mark::NextKernelStart,
        Mark::UserspaceUp,
        Mark::WorkloadResumed,
    ];

    /// The kebab-case name used in reports and JSON (`point-of-no-return`).
    pub const fn name(self) -> &'static str {
        match self {
            Mark::RebootRequested => "reboot-requested",
            Mark::SerializeStart => "serialize-start",
            Mark::PointOfNoReturn => "point-of-no-return",
            Mark::NextKernelStart => "next-kernel-start",
            Mark::UserspaceUp => "userspace-up",
            Mark::WorkloadResumed => "workload-resumed",
        }
    }

    /// Name of the phase that starts at this mark and ends at the next one.
    pub const fn phase_name(self) -> &'static str {
        match self {
            Mark::RebootRequested => "reboot-syscall",
            Mark::SerializeStart => "serialize",
            Mark::PointOfNoReturn => "kexec-jump",
            Mark::NextKernelStart => "kernel-boot",
            Mark::UserspaceUp => "workload-restore",
            Mark::WorkloadResumed => "resumed",
        }
    }

    /// Position in [`Mark::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Who reports this mark.
    pub const fn source(self) -> MarkSource {
        match self {
            Mark::RebootRequested | Mark::UserspaceUp | Mark::WorkloadResumed => MarkSource::Agent,
            Mark::SerializeStart | Mark::PointOfNoReturn | Mark::NextKernelStart => {
                MarkSource::Breakpoint
            }
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no mark's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMark(pub String);

impl fmt::Display for UnknownMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a handover mark", self.0)
    }
}

impl std::error::Error for UnknownMark {}

impl FromStr for Mark {
    type Err = UnknownMark;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mark::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMark(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_order() {
        for (i, m) in Mark::ALL.into_iter().enumerate() {
            assert_eq!(m.index(), i);
            assert_eq!(m.name().parse::<Mark>(), Ok(m));
        }
        assert!(Mark::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            "kexec".parse::<Mark>(),
            Err(UnknownMark("kexec".to_owned()))
        );
    }

    #[test]
    fn sources() {
        let agent: Vec<Mark> = Mark::ALL
            .into_iter()
            .filter(|m| m.source() == MarkSource::Agent)
            .collect();
        assert_eq!(
            agent,
            [
                Mark::RebootRequested,
                Mark::UserspaceUp,
                Mark::WorkloadResumed
            ]
        );
    }
}
