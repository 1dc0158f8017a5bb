//! The Intel MultiProcessor Specification 1.4 table: how a kernel without ACPI learns
//! about the vCPUs, the IO-APIC and the ISA interrupt routing. Built by a pure function
//! from typed structures (the spec's chapter 4; Linux's
//! `arch/x86/include/asm/mpspec_def.h`); the caller writes the bytes at
//! `layout::EBDA_START`, where Linux's mpparse looks first.
//!
//! Layout: the 16-byte floating pointer, then the configuration table right after it
//! (header, one processor entry per vCPU, the ISA bus, the IO-APIC, one I/O interrupt
//! entry per ISA IRQ, and the two local interrupt entries).

use thiserror::Error;
use vm_memory::ByteValued;

use crate::machine::layout::{APIC_DEFAULT_BASE, EBDA_START, IOAPIC_DEFAULT_BASE, LOW_RAM_END};

/// Most vCPUs we describe (one APIC ID each, and the IO-APIC takes the next).
pub const MAX_VCPUS: u8 = 8;
/// ISA IRQs routed through the IO-APIC.
const ISA_IRQS: u8 = 16;
const SPEC_REV_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const IOAPIC_USABLE: u8 = 1;
/// Family 6 signature, FPU + APIC feature flags (what the MP spec wants to see).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
/// Interrupt types of I/O and local interrupt entries.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to the bus".
const MP_IRQ_CONFORMING: u16 = 0;
/// A local interrupt entry for every local APIC.
const MP_ALL_APICS: u8 = 0xff;
/// The ISA bus's ID, the only bus.
const ISA_BUS_ID: u8 = 0;
/// Length of the floating pointer, in 16-byte paragraphs.
const MPF_PARAGRAPHS: u8 = 1;

/// Entry types of the configuration table.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

/// The MP floating pointer structure (`struct mpf_intel`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpfIntel {
    /// `_MP_`.
    pub signature: [u8; 4],
    /// Physical address of the configuration table.
    pub physptr: u32,
    /// Length in paragraphs (1).
    pub length: u8,
    /// Specification revision (4 for 1.4).
    pub specification: u8,
    /// Makes the structure's bytes sum to 0.
    pub checksum: u8,
    /// 0: a configuration table is present (no default configuration).
    pub feature1: u8,
    /// Bit 7: IMCR present (PIC mode); 0: virtual wire mode.
    pub feature2: u8,
    /// Reserved.
    pub feature3: [u8; 3],
}

/// The configuration table header (`struct mpc_table`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpcTable {
    /// `PCMP`.
    pub signature: [u8; 4],
    /// Base table length: this header and every entry.
    pub length: u16,
    /// Specification revision.
    pub spec: u8,
    /// Makes the base table's bytes sum to 0.
    pub checksum: u8,
    /// OEM ID.
    pub oem: [u8; 8],
    /// Product ID.
    pub productid: [u8; 12],
    /// OEM table pointer (0: none).
    pub oemptr: u32,
    /// OEM table size (0: none).
    pub oemsize: u16,
    /// Number of entries in the base table.
    pub oemcount: u16,
    /// Local APIC MMIO address.
    pub lapic: u32,
    /// Extended table length (no extended entries).
    pub ext_length: u16,
    /// Extended table checksum.
    pub ext_checksum: u8,
    /// Reserved.
    pub reserved: u8,
}

/// A processor entry (`struct mpc_cpu`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpcCpu {
    /// [`MP_PROCESSOR`].
    pub kind: u8,
    /// Local APIC ID.
    pub apicid: u8,
    /// Local APIC version.
    pub apicver: u8,
    /// [`CPU_ENABLED`], [`CPU_BSP`].
    pub cpuflag: u8,
    /// CPU signature (family, model, stepping).
    pub cpufeature: u32,
    /// CPUID feature flags.
    pub featureflag: u32,
    /// Reserved.
    pub reserved: [u32; 2],
}

/// A bus entry (`struct mpc_bus`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpcBus {
    /// [`MP_BUS`].
    pub kind: u8,
    /// Bus ID.
    pub busid: u8,
    /// Bus type, space-padded (`ISA   `).
    pub bustype: [u8; 6],
}

/// An IO-APIC entry (`struct mpc_ioapic`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpcIoapic {
    /// [`MP_IOAPIC`].
    pub kind: u8,
    /// IO-APIC ID.
    pub apicid: u8,
    /// IO-APIC version.
    pub apicver: u8,
    /// [`IOAPIC_USABLE`].
    pub flags: u8,
    /// IO-APIC MMIO address.
    pub apicaddr: u32,
}

/// An I/O interrupt assignment entry (`struct mpc_intsrc`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpcIntsrc {
    /// [`MP_INTSRC`].
    pub kind: u8,
    /// Interrupt type ([`MP_INT`], ...).
    pub irqtype: u8,
    /// Polarity and trigger mode.
    pub irqflag: u16,
    /// Source bus ID.
    pub srcbus: u8,
    /// IRQ on the source bus.
    pub srcbusirq: u8,
    /// Destination IO-APIC ID.
    pub dstapic: u8,
    /// Destination IO-APIC pin.
    pub dstirq: u8,
}

/// A local interrupt assignment entry (`struct mpc_lintsrc`).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MpcLintsrc {
    /// [`MP_LINTSRC`].
    pub kind: u8,
    /// Interrupt type ([`MP_EXTINT`], [`MP_NMI`], ...).
    pub irqtype: u8,
    /// Polarity and trigger mode.
    pub irqflag: u16,
    /// Source bus ID.
    pub srcbusid: u8,
    /// IRQ on the source bus.
    pub srcbusirq: u8,
    /// Destination local APIC ID ([`MP_ALL_APICS`]: every one).
    pub destapic: u8,
    /// Destination LINTn pin.
    pub destapiclint: u8,
}

// SAFETY: each of these is `repr(C, packed)` with only integer and integer-array fields:
// no padding, and every byte pattern is a valid value.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}
// SAFETY: as above.
unsafe impl ByteValued for MpcLintsrc {}

// The sizes the specification gives.
const _: () = assert!(std::mem::size_of::<MpfIntel>() == 16);
const _: () = assert!(std::mem::size_of::<MpcTable>() == 44);
const _: () = assert!(std::mem::size_of::<MpcCpu>() == 20);
const _: () = assert!(std::mem::size_of::<MpcBus>() == 8);
const _: () = assert!(std::mem::size_of::<MpcIoapic>() == 8);
const _: () = assert!(std::mem::size_of::<MpcIntsrc>() == 8);
const _: () = assert!(std::mem::size_of::<MpcLintsrc>() == 8);

/// Errors of this module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero or too many vCPUs.
    #[error("{0} vCPUs requested: luo-vmm supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
}

/// The byte that makes `bytes` sum to 0 (mod 256).
fn checksum<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u8 {
    bytes
        .into_iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table's entries, in order, and how many there are.
#[derive(Default)]
struct Entries {
    bytes: Vec<u8>,
    count: u16,
}

impl Entries {
    fn push<T: ByteValued>(&mut self, entry: T) {
        self.bytes.extend_from_slice(entry.as_slice());
        self.count += 1;
    }
}

/// Builds the floating pointer followed by the configuration table, for `vcpus`
/// processors with APIC IDs 0..vcpus (0 is the bootstrap processor).
pub fn build_mptable(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;

    let mut entries = Entries::default();
    for id in 0..vcpus {
        entries.push(MpcCpu {
            kind: MP_PROCESSOR,
            apicid: id,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
            cpufeature: CPU_SIGNATURE,
            featureflag: CPU_FEATURES,
            reserved: [0; 2],
        });
    }
    entries.push(MpcBus {
        kind: MP_BUS,
        busid: ISA_BUS_ID,
        bustype: *b"ISA   ",
    });
    entries.push(MpcIoapic {
        kind: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: IOAPIC_USABLE,
        apicaddr: IOAPIC_DEFAULT_BASE,
    });
    // ISA IRQ n on IO-APIC pin n.
    for irq in 0..ISA_IRQS {
        entries.push(MpcIntsrc {
            kind: MP_INTSRC,
            irqtype: MP_INT,
            irqflag: MP_IRQ_CONFORMING,
            srcbus: ISA_BUS_ID,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        });
    }
    // LINT0 is ExtINT (the 8259 path), LINT1 the NMI, on every local APIC.
    for (irqtype, lint) in [(MP_EXTINT, 0), (MP_NMI, 1)] {
        entries.push(MpcLintsrc {
            kind: MP_LINTSRC,
            irqtype,
            irqflag: MP_IRQ_CONFORMING,
            srcbusid: ISA_BUS_ID,
            srcbusirq: 0,
            destapic: MP_ALL_APICS,
            destapiclint: lint,
        });
    }

    // At most MAX_VCPUS processors and a few fixed entries: a few hundred bytes.
    #[allow(clippy::cast_possible_truncation)]
    let length = (std::mem::size_of::<MpcTable>() + entries.bytes.len()) as u16;
    let mut table = MpcTable {
        signature: *b"PCMP",
        length,
        spec: SPEC_REV_1_4,
        checksum: 0,
        oem: *b"LUO-VMM ",
        productid: *b"000000000000",
        oemptr: 0,
        oemsize: 0,
        oemcount: entries.count,
        lapic: APIC_DEFAULT_BASE,
        ext_length: 0,
        ext_checksum: 0,
        reserved: 0,
    };
    table.checksum = checksum(table.as_slice().iter().chain(&entries.bytes));

    // The EBDA is below 1 MiB; the table follows the floating pointer.
    #[allow(clippy::cast_possible_truncation)]
    let table_addr = (EBDA_START as usize + std::mem::size_of::<MpfIntel>()) as u32;
    let mut fp = MpfIntel {
        signature: *b"_MP_",
        physptr: table_addr,
        length: MPF_PARAGRAPHS,
        specification: SPEC_REV_1_4,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    let mut out = Vec::with_capacity(usize::from(MPF_PARAGRAPHS) * 16 + usize::from(length));
    out.extend_from_slice(fp.as_slice());
    out.extend_from_slice(table.as_slice());
    out.extend_from_slice(&entries.bytes);
    debug_assert!(EBDA_START + out.len() as u64 <= LOW_RAM_END);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// The table for one vCPU, byte for byte, as the byte-by-byte builder this module had
    /// before its typed structures produced it (the typed builder was checked against that
    /// one for 1, 2, 4 and 8 vCPUs before it was removed).
    const ONE_VCPU: [&str; 6] = [
        "5f4d505f10fc090001048b000000000050434d50e00004204c554f2d564d4d203030303030303030",
        "3030303000000000000015000000e0fe000000000000140300060000010200000000000000000000",
        "0100495341202020020111010000c0fe030000000000010003000000000101010300000000020102",
        "03000000000301030300000000040104030000000005010503000000000601060300000000070107",
        "0300000000080108030000000009010903000000000a010a03000000000b010b03000000000c010c",
        "03000000000d010d03000000000e010e03000000000f010f040300000000ff00040100000000ff01",
    ];

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn read<T: ByteValued>(t: &[u8], at: usize) -> T {
        T::from_slice(&t[at..at + std::mem::size_of::<T>()])
            .copied()
            .unwrap()
    }

    #[test]
    fn one_vcpu_gives_the_recorded_bytes() {
        assert_eq!(hex(&build_mptable(1).unwrap()), ONE_VCPU.concat());
    }

    #[test]
    fn lengths_and_checksums_are_the_recorded_ones() {
        // (vCPUs, bytes, floating pointer checksum, configuration table checksum), as the
        // byte-by-byte builder produced them.
        for (n, len, fp_sum, table_sum) in [
            (1, 240, 0x8b, 0x20),
            (2, 260, 0x8b, 0xdb),
            (4, 300, 0x8b, 0x4d),
            (8, 380, 0x8b, 0x27),
        ] {
            let t = build_mptable(n).unwrap();
            assert_eq!(t.len(), len, "{n} vCPUs");
            let fp: MpfIntel = read(&t, 0);
            let table: MpcTable = read(&t, 16);
            assert_eq!({ fp.checksum }, fp_sum, "{n} vCPUs");
            assert_eq!({ table.checksum }, table_sum, "{n} vCPUs");
        }
    }

    #[test]
    fn decoded_fields() {
        let t = build_mptable(2).unwrap();
        let fp: MpfIntel = read(&t, 0);
        assert_eq!(fp.signature, *b"_MP_");
        assert_eq!({ fp.physptr }, 0x9fc10);
        assert_eq!((fp.length, fp.specification, fp.feature1), (1, 4, 0));
        let table: MpcTable = read(&t, 16);
        assert_eq!(table.signature, *b"PCMP");
        assert_eq!({ table.length }, 260 - 16);
        assert_eq!({ table.oemcount }, 2 + 1 + 1 + 16 + 2);
        assert_eq!({ table.lapic }, APIC_DEFAULT_BASE);
        assert_eq!(table.oem, *b"LUO-VMM ");
        let mut at = 16 + 44;
        for id in 0..2 {
            let cpu: MpcCpu = read(&t, at);
            assert_eq!(
                (cpu.kind, cpu.apicid, cpu.apicver),
                (MP_PROCESSOR, id, 0x14)
            );
            let bsp = if id == 0 { CPU_BSP } else { 0 };
            assert_eq!(cpu.cpuflag, CPU_ENABLED | bsp);
            assert_eq!(({ cpu.cpufeature }, { cpu.featureflag }), (0x600, 0x201));
            at += 20;
        }
        let bus: MpcBus = read(&t, at);
        assert_eq!((bus.kind, bus.busid, bus.bustype), (MP_BUS, 0, *b"ISA   "));
        let ioapic: MpcIoapic = read(&t, at + 8);
        assert_eq!(
            (ioapic.kind, ioapic.apicid, ioapic.flags),
            (MP_IOAPIC, 2, 1)
        );
        assert_eq!({ ioapic.apicaddr }, IOAPIC_DEFAULT_BASE);
        at += 16;
        for irq in 0..16 {
            let src: MpcIntsrc = read(&t, at);
            assert_eq!(src.kind, MP_INTSRC);
            assert_eq!((src.srcbusirq, src.dstapic, src.dstirq), (irq, 2, irq));
            at += 8;
        }
        let lint0: MpcLintsrc = read(&t, at);
        let lint1: MpcLintsrc = read(&t, at + 8);
        assert_eq!(
            (lint0.irqtype, lint0.destapic, lint0.destapiclint),
            (MP_EXTINT, 0xff, 0)
        );
        assert_eq!(
            (lint1.irqtype, lint1.destapic, lint1.destapiclint),
            (MP_NMI, 0xff, 1)
        );
        assert_eq!(at + 16, t.len());
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for n in 1..=MAX_VCPUS {
            let t = build_mptable(n).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            assert!(EBDA_START + t.len() as u64 <= LOW_RAM_END);
        }
    }

    #[test]
    fn lists_each_cpu_once_with_one_bsp() {
        let t = build_mptable(4).unwrap();
        let cfg = &t[16..];
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        let cpus: Vec<_> = (0..4)
            .map(|i| &cfg[44 + i * 20..44 + (i + 1) * 20])
            .collect();
        assert!(cpus.iter().all(|c| c[0] == 0));
        assert_eq!(
            cpus.iter().map(|c| c[1]).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(cpus.iter().filter(|c| c[3] & CPU_BSP != 0).count(), 1);
    }

    #[test]
    fn refuses_bad_counts() {
        assert_eq!(build_mptable(0), Err(MpTableError::VcpuCount(0)));
        assert_eq!(build_mptable(9), Err(MpTableError::VcpuCount(9)));
    }
}
