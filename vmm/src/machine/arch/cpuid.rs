//! Per-vCPU adjustments of the CPUID table KVM reports as supported.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Makes `entries` describe vCPU `id` of `count`: its initial APIC ID in leaf 1 and the
/// x2APIC ID in the topology leaves 0xb/0x1f, the logical processor count, and the
/// hypervisor bit.
pub fn adjust_for_vcpu(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_apic_ids_and_hypervisor_bit() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 0x1234,
                ..Default::default()
            },
        ];
        adjust_for_vcpu(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx, 0x0304_0800);
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(entries[1].edx, 3);
        assert_eq!(entries[2].ebx, 0x1234);
    }
}
