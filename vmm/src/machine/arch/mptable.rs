//! The Intel MultiProcessor Specification 1.4 table: how a kernel without ACPI learns
//! about the vCPUs, the IO-APIC and the ISA interrupt routing. Built as bytes by a pure
//! function; the caller writes them at `layout::EBDA_START`, where Linux's mpparse
//! looks first.

use thiserror::Error;

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
/// Family 6 signature, FPU + APIC feature flags (what the MP spec wants to see).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors of this module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero or too many vCPUs.
    #[error("{0} vCPUs requested: luo-vmm supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for `vcpus`
/// processors with APIC IDs 0..vcpus (0 is the bootstrap processor).
pub fn build_mptable(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    // The EBDA is below 1 MiB.
    #[allow(clippy::cast_possible_truncation)]
    let table_addr = EBDA_START as u32 + 16;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // type, irqtype, irqflag (conforming), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is ExtINT (the 8259 path), LINT1 the NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    // At most MAX_VCPUS processors and a few fixed entries: a few hundred bytes.
    #[allow(clippy::cast_possible_truncation)]
    let length = (44 + entries.len()) as u16;
    table.extend_from_slice(&length.to_le_bytes());
    table.push(SPEC_REV_1_4);
    table.push(0); // checksum, below
    table.extend_from_slice(b"LUO-VMM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV_1_4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    debug_assert!(EBDA_START + out.len() as u64 <= LOW_RAM_END);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
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
