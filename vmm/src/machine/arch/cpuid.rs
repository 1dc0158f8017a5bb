//! The CPUID table each vCPU gets: KVM's supported table (`KVM_GET_SUPPORTED_CPUID`)
//! normalized for one vCPU by one pure function, [`normalize`], as Firecracker
//! (`cpu_config/x86_64/cpuid/`) and Cloud Hypervisor (`arch/src/x86_64`) do.
//!
//! The topology is always one socket of `vcpus` cores, one thread per core, so a vCPU's
//! x2APIC ID (and initial APIC ID) is its index, which is also what the MP table says
//! (`mptable.rs`). What the guest kernel reads it with: `arch/x86/kernel/cpu/
//! topology_common.c` (leaf 1, leaf 4), `topology_ext.c` (leaves 0xb/0x1f) and
//! `topology_amd.c` (0x8000_0008, 0x8000_001e).
//!
//! The instruction-emulating `/dev/kvm` of the development machines (`kvm_pvm`) accepts
//! `KVM_SET_CPUID2` but ignores it (its guests see the host's CPUID), so on those machines
//! only the unit tests below show what this table holds; a hardware KVM hands it to the
//! guest as is.

// The kernel's UAPI header spells it SIGNIFCANT.
use kvm_bindings::{
    kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX as KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
};
use thiserror::Error;

/// Errors of this module (public: a vCPU's error carries it, and the VM's error the
/// vCPU's).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CpuidError {
    /// KVM's table lacks a leaf every x86 CPU has.
    #[error("KVM's supported CPUID table has no leaf {0:#x}")]
    MissingLeaf(u32),
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU {vcpu} of {vcpus}: no such vCPU")]
    NoSuchVcpu {
        /// The index asked for.
        vcpu: u8,
        /// The count.
        vcpus: u8,
    },
}

/// Facts about the host's KVM that change the table, found once per VM by the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuidHost {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: KVM's local APIC timer has the TSC-deadline mode.
    /// KVM emulates it in software and offers it through this capability, not through
    /// `KVM_GET_SUPPORTED_CPUID` (arch/x86/kvm/cpuid.c; QEMU's
    /// `kvm_arch_get_supported_cpuid()` sets the bit the same way), so the VMM sets it.
    pub tsc_deadline: bool,
}

/// The CPU vendor, from the vendor string of leaf 0 (EBX, EDX, ECX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`, or Hygon's `HygonGenuine` (the same topology leaves).
    Amd,
    /// Anything else: only the vendor-neutral leaves are normalized.
    Other,
}

impl CpuVendor {
    /// The vendor of a leaf 0 entry: its EBX, EDX, ECX spell the vendor string (Intel SDM
    /// Vol. 2A, CPUID, leaf 00H; AMD APM Vol. 3, CPUID Fn0000_0000).
    pub(crate) fn from_leaf0(leaf0: &kvm_cpuid_entry2) -> CpuVendor {
        let mut s = [0u8; 12];
        s[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        s[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        s[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &s {
            b"GenuineIntel" => CpuVendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
            _ => CpuVendor::Other,
        }
    }
}

// Leaf 1 (Intel SDM Vol. 2A, CPUID, Table 3-10/3-11; AMD APM Vol. 3, Fn0000_0001).
/// ECX bit 5: VMX.
const L1_ECX_VMX: u32 = 1 << 5;
/// ECX bit 24: TSC-deadline mode of the local APIC timer.
const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// ECX bit 31: running under a hypervisor.
const L1_ECX_HYPERVISOR: u32 = 1 << 31;
/// EDX bit 28: HTT, EBX[23:16] is valid (more than one logical processor per package).
const L1_EDX_HTT: u32 = 1 << 28;

// Leaf 0x8000_0001 ECX (AMD APM Vol. 3, Fn8000_0001_ECX).
/// Bit 1: CmpLegacy, leaf 1 EBX[23:16] counts cores (with HTT set).
const E1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Bit 2: SVM.
const E1_ECX_SVM: u32 = 1 << 2;
/// Bit 22: TopologyExtensions, Fn8000_001D and Fn8000_001E are valid.
const E1_ECX_TOPOEXT: u32 = 1 << 22;

/// Level types of leaves 0xb/0x1f ECX[15:8] (Intel SDM Vol. 2A, CPUID, leaf 0BH/1FH).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// `value` into `reg[lo + width - 1 : lo]`, saturated at the field's largest value.
fn set_field(reg: &mut u32, lo: u32, width: u32, value: u32) {
    let max = (1u32 << width) - 1;
    *reg = (*reg & !(max << lo)) | (value.min(max) << lo);
}

/// Bits of an APIC ID that number `n` things: ceil(log2(n)), 0 for one.
fn id_bits(n: u8) -> u32 {
    u32::from(n).next_power_of_two().trailing_zeros()
}

/// The cache level of a deterministic cache parameters entry (leaf 4, Fn8000_001D),
/// EAX[7:5], with its type EAX[4:0] (0: no more caches).
fn cache_level(eax: u32) -> Option<u32> {
    (eax & 0x1f != 0).then_some((eax >> 5) & 0x7)
}

/// Leaf 4 / Fn8000_001D EAX[25:14]: logical processors sharing this cache - 1. With
/// one thread per core, L1 and L2 are each one vCPU's own, L3 is every vCPU's.
fn set_cache_sharing(eax: &mut u32, vcpus: u8) {
    if let Some(level) = cache_level(*eax) {
        let sharing = if level >= 3 { u32::from(vcpus) - 1 } else { 0 };
        set_field(eax, 14, 12, sharing);
    }
}

/// The two subleaves of leaf 0xb or 0x1f for vCPU `vcpu` of `vcpus` (Intel SDM Vol. 2A,
/// CPUID, leaf 0BH "Extended Topology Enumeration" and 1FH "V2 Extended Topology"; Vol. 3A
/// §10.9 "Programming Considerations for Hardware Multi-Threading Capable Processors"):
/// subleaf 0 the SMT level (one thread, shift 0), subleaf 1 the core level (`vcpus`
/// cores, shift by the bits that number them: the package). Subleaves above 1 are
/// answered by KVM as invalid levels with ECX[7:0] and the x2APIC ID in EDX
/// (`kvm_cpuid()` in arch/x86/kvm/cpuid.c, once subleaf 1 exists).
fn topology_subleaves(function: u32, vcpu: u8, vcpus: u8) -> [kvm_cpuid_entry2; 2] {
    let entry = |index: u32, shift: u32, count: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: (level << 8) | index,
        edx: u32::from(vcpu),
        ..Default::default()
    };
    [
        entry(0, 0, 1, LEVEL_SMT),
        entry(1, id_bits(vcpus), u32::from(vcpus), LEVEL_CORE),
    ]
}

/// The CPUID table of vCPU `vcpu` of `vcpus`, from KVM's supported table `supported`
/// (one socket, `vcpus` cores, one thread per core; APIC ID = x2APIC ID = `vcpu`):
///
/// - leaf 1 (Intel SDM Vol. 2A, CPUID, Table 3-10/3-11): EBX[31:24] initial APIC ID,
///   EBX[23:16] logical processors per package (`vcpus`), EDX.HTT when `vcpus` > 1,
///   ECX.hypervisor set, ECX.TSC-deadline as `host` says, ECX.VMX clear;
/// - leaf 4 (Intel): EAX[31:26] cores per package - 1, EAX[25:14] sharing per cache level;
/// - leaves 0xb and 0x1f, where KVM lists them: see [`topology_subleaves`];
/// - 0x8000_0001 ECX (AMD APM Vol. 3, Fn8000_0001_ECX): SVM clear; on AMD, CmpLegacy when
///   `vcpus` > 1 (leaf 1's count is of cores), TopologyExtensions only with a
///   0x8000_001e to describe;
/// - AMD 0x8000_0008 ECX (Fn8000_0008_ECX): NC = `vcpus` - 1, ApicIdSize = the APIC ID
///   bits that number the cores;
/// - AMD 0x8000_001e (Fn8000_001E): EAX extended APIC ID, EBX core ID and threads per
///   core - 1 (0), ECX node 0 of one node per socket;
/// - AMD 0x8000_001d (Fn8000_001D): EAX[25:14] sharing per cache level, as leaf 4.
///
/// Every other leaf is KVM's, unchanged.
pub(crate) fn normalize(
    supported: &[kvm_cpuid_entry2],
    vcpu: u8,
    vcpus: u8,
    host: CpuidHost,
) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    if vcpu >= vcpus {
        return Err(CpuidError::NoSuchVcpu { vcpu, vcpus });
    }
    let find = |function: u32| {
        supported
            .iter()
            .find(|e| e.function == function && e.index == 0)
    };
    let leaf0 = find(0).ok_or(CpuidError::MissingLeaf(0))?;
    if find(1).is_none() {
        return Err(CpuidError::MissingLeaf(1));
    }
    let vendor = CpuVendor::from_leaf0(leaf0);
    let max_basic = leaf0.eax;
    let max_extended = find(0x8000_0000).map_or(0, |e| e.eax);
    let has_8000_001e = max_extended >= 0x8000_001e && find(0x8000_001e).is_some();
    let id = u32::from(vcpu);
    let several = vcpus > 1;

    let mut out = Vec::with_capacity(supported.len() + 2);
    let mut topology_done = [false; 2];
    for e in supported {
        let mut e = *e;
        match e.function {
            0x1 => {
                set_field(&mut e.ebx, 24, 8, id);
                set_field(&mut e.ebx, 16, 8, u32::from(vcpus));
                set_bit(&mut e.edx, L1_EDX_HTT, several);
                set_bit(&mut e.ecx, L1_ECX_HYPERVISOR, true);
                set_bit(&mut e.ecx, L1_ECX_TSC_DEADLINE, host.tsc_deadline);
                set_bit(&mut e.ecx, L1_ECX_VMX, false);
            }
            0x4 if vendor == CpuVendor::Intel && cache_level(e.eax).is_some() => {
                set_field(&mut e.eax, 26, 6, u32::from(vcpus) - 1);
                set_cache_sharing(&mut e.eax, vcpus);
            }
            f @ (0xb | 0x1f) if f <= max_basic => {
                let slot = usize::from(f == 0x1f);
                if !topology_done[slot] {
                    topology_done[slot] = true;
                    out.extend(topology_subleaves(f, vcpu, vcpus));
                }
                continue;
            }
            0x8000_0001 => {
                set_bit(&mut e.ecx, E1_ECX_SVM, false);
                if vendor == CpuVendor::Amd {
                    set_bit(&mut e.ecx, E1_ECX_CMP_LEGACY, several);
                    if !has_8000_001e {
                        set_bit(&mut e.ecx, E1_ECX_TOPOEXT, false);
                    }
                }
            }
            0x8000_0008 if vendor == CpuVendor::Amd => {
                set_field(&mut e.ecx, 0, 8, u32::from(vcpus) - 1);
                set_field(&mut e.ecx, 12, 4, id_bits(vcpus));
            }
            0x8000_001d if vendor == CpuVendor::Amd => set_cache_sharing(&mut e.eax, vcpus),
            0x8000_001e if vendor == CpuVendor::Amd => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    Ok(out)
}

fn set_bit(reg: &mut u32, bit: u32, on: bool) {
    if on {
        *reg |= bit;
    } else {
        *reg &= !bit;
    }
}

/// The digest of the CPU model and the features a guest sees: the vendor (leaf 0), the
/// family/model/stepping and feature flags (leaf 1 EAX, ECX, EDX), the structured
/// extended features (leaf 7.0 EBX, ECX, EDX) and the extended ones (leaf 0x80000001 ECX,
/// EDX). Nothing that names the CPU the process runs on (leaf 1 EBX's APIC ID, the
/// topology leaves' x2APIC ID): an emulating KVM passes the host's through, and two
/// processes on two cores of one host must agree. Pure.
pub(crate) fn identity(entries: &[kvm_cpuid_entry2]) -> String {
    let mut picked: Vec<[u32; 5]> = entries
        .iter()
        .filter_map(|e| match (e.function, e.index) {
            (0, _) => Some([e.function, e.eax, e.ebx, e.ecx, e.edx]),
            (1, _) => Some([e.function, e.eax, 0, e.ecx, e.edx]),
            (7, 0) => Some([e.function, 0, e.ebx, e.ecx, e.edx]),
            (0x8000_0001, _) => Some([e.function, 0, 0, e.ecx, e.edx]),
            _ => None,
        })
        .collect();
    picked.sort_unstable();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for words in picked {
        for w in words {
            h.update(&w.to_le_bytes());
        }
    }
    format!("{:016x}", h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn indexed(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            flags: KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
            ..leaf(function, index, regs)
        }
    }

    /// An Intel table: a subset of what `KVM_GET_SUPPORTED_CPUID` gave on this project's
    /// development machine (a Xeon, "GenuineIntel", through `kvm_pvm`), changed where
    /// that emulator differs from a hardware KVM: the maximum basic leaf raised to 0x1f and
    /// leaf 0x1f added as a Sapphire Rapids host has it (2 threads per core, 56 cores, a
    /// die level), leaf 1 with VMX (offered with nested=1) and without TSC-deadline (which
    /// upstream KVM leaves to the VMM).
    fn intel_table() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0x0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(0x1, 0, [0x000c_06f2, 0x0002_0800, 0x8020_2020, 0x0f8b_fbff]),
            indexed(0x4, 0, [0x0400_0121, 0x02c0_003f, 0x0000_003f, 0]),
            indexed(0x4, 1, [0x0400_0122, 0x01c0_003f, 0x0000_003f, 0]),
            indexed(0x4, 2, [0x0400_0143, 0x03c0_003f, 0x0000_07ff, 0]),
            indexed(0x4, 3, [0x0400_4163, 0x04c0_003f, 0x0003_3fff, 0]),
            indexed(0x4, 4, [0, 0, 0, 0]),
            indexed(0x7, 0, [0x2, 0x0180_2852, 0x1a01_0104, 0x2001_0000]),
            indexed(0xb, 0, [0, 0, 0, 0]),
            indexed(0xd, 0, [0xe7, 0xa80, 0xa80, 0]),
            indexed(0xd, 1, [0, 0, 0, 0]),
            indexed(0x1f, 0, [0x1, 0x2, 0x100, 0x7]),
            indexed(0x1f, 1, [0x7, 0x70, 0x201, 0x7]),
            indexed(0x1f, 2, [0x8, 0xe0, 0x502, 0x7]),
            leaf(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0x0000_0101, 0x2010_0800]),
            leaf(0x8000_0008, 0, [0x3930, 0, 0, 0]),
        ]
    }

    /// An AMD table, constructed after an EPYC 9004 (Zen 4, family 0x19) as KVM reports it
    /// with nested=1: SVM, CmpLegacy and TopologyExtensions offered, the host's leaf 0xb
    /// (two threads per core), 0x8000_0008 NC and ApicIdSize of a 32-core socket, and the
    /// host thread's 0x8000_001e.
    fn amd_table() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0x0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(0x1, 0, [0x00a1_0f11, 0x0040_0800, 0xf6f8_3203, 0x178b_fbff]),
            indexed(0xb, 0, [0x1, 0x2, 0x100, 0x5]),
            indexed(0xb, 1, [0x6, 0x40, 0x201, 0x5]),
            indexed(0xd, 0, [0x2e7, 0x980, 0x988, 0]),
            leaf(
                0x8000_0000,
                0,
                [0x8000_0021, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            ),
            leaf(
                0x8000_0001,
                0,
                [0x00a1_0f11, 0x4000_0000, 0x7540_37ff, 0x2fd3_fbff],
            ),
            leaf(0x8000_0008, 0, [0x3030, 0x0, 0x0000_603f, 0]),
            indexed(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
            indexed(0x8000_001d, 1, [0x0000_4143, 0x01c0_003f, 0x7ff, 0]),
            indexed(0x8000_001d, 2, [0x0003_c163, 0x03c0_003f, 0x7fff, 0x1]),
            indexed(0x8000_001d, 3, [0, 0, 0, 0]),
            leaf(0x8000_001e, 0, [0x5, 0x0000_0102, 0x0000_0000, 0]),
        ]
    }

    fn get(t: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *t.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    fn subleaves(t: &[kvm_cpuid_entry2], function: u32) -> Vec<u32> {
        t.iter()
            .filter(|e| e.function == function)
            .map(|e| e.index)
            .collect()
    }

    const TSC: CpuidHost = CpuidHost { tsc_deadline: true };
    const NO_TSC: CpuidHost = CpuidHost {
        tsc_deadline: false,
    };

    #[test]
    fn the_vendor_comes_from_leaf_0() {
        assert_eq!(CpuVendor::from_leaf0(&intel_table()[0]), CpuVendor::Intel);
        assert_eq!(CpuVendor::from_leaf0(&amd_table()[0]), CpuVendor::Amd);
        let hygon = leaf(0, 0, [0xd, 0x6f67_7948, 0x656e_6975, 0x6e65_476e]);
        assert_eq!(CpuVendor::from_leaf0(&hygon), CpuVendor::Amd);
        assert_eq!(
            CpuVendor::from_leaf0(&leaf(0, 0, [0xd, 0, 0, 0])),
            CpuVendor::Other
        );
    }

    /// Leaf 1 on either vendor: APIC ID, count, HTT, hypervisor, VMX hidden, the rest kept.
    fn check_leaf1(t: &[kvm_cpuid_entry2], input: &kvm_cpuid_entry2, vcpu: u8, vcpus: u8) {
        let l1 = get(t, 1, 0);
        assert_eq!(l1.ebx >> 24, u32::from(vcpu), "initial APIC ID");
        assert_eq!(
            (l1.ebx >> 16) & 0xff,
            u32::from(vcpus),
            "logical processors"
        );
        assert_eq!(
            l1.ebx & 0xffff,
            input.ebx & 0xffff,
            "CLFLUSH size, brand kept"
        );
        assert_eq!(l1.edx & L1_EDX_HTT != 0, vcpus > 1, "HTT");
        assert_eq!(l1.edx & !L1_EDX_HTT, input.edx & !L1_EDX_HTT);
        assert_ne!(l1.ecx & L1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & L1_ECX_VMX, 0, "VMX hidden");
        assert_eq!(l1.eax, input.eax);
    }

    /// Leaf 0xb or 0x1f: SMT level of one thread, core level of `vcpus` cores.
    fn check_topology(t: &[kvm_cpuid_entry2], function: u32, vcpu: u8, vcpus: u8, shift: u32) {
        assert_eq!(subleaves(t, function), vec![0, 1], "leaf {function:#x}");
        let smt = get(t, function, 0);
        let core = get(t, function, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100), "SMT level");
        assert_eq!(
            (core.eax, core.ebx, core.ecx),
            (shift, u32::from(vcpus), 0x201),
            "core level"
        );
        for e in [smt, core] {
            assert_eq!(e.edx, u32::from(vcpu), "x2APIC ID");
            assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFICANT_INDEX);
        }
        // Every vCPU's x2APIC ID fits below the core level's shift (one package).
        assert!(u32::from(vcpus - 1) >> shift == 0);
    }

    #[test]
    fn intel_for_1_2_and_8_vcpus() {
        let input = intel_table();
        for (vcpus, shift) in [(1u8, 0u32), (2, 1), (8, 3)] {
            for vcpu in [0, vcpus / 2, vcpus - 1] {
                let t = normalize(&input, vcpu, vcpus, TSC).unwrap();
                check_leaf1(&t, &input[1], vcpu, vcpus);
                assert_ne!(get(&t, 1, 0).ecx & L1_ECX_TSC_DEADLINE, 0);
                for index in 0..4 {
                    let eax = get(&t, 4, index).eax;
                    assert_eq!(eax >> 26, u32::from(vcpus) - 1, "leaf 4.{index} cores");
                    let sharing = (eax >> 14) & 0xfff;
                    let want = if index == 3 { u32::from(vcpus) - 1 } else { 0 };
                    assert_eq!(sharing, want, "leaf 4.{index} sharing");
                    assert_eq!(eax & 0x3fff, input[2 + index as usize].eax & 0x3fff);
                }
                assert_eq!(get(&t, 4, 4).eax, 0, "the end of leaf 4 stays");
                check_topology(&t, 0xb, vcpu, vcpus, shift);
                check_topology(&t, 0x1f, vcpu, vcpus, shift);
                assert_eq!(get(&t, 0x8000_0001, 0).ecx, 0x101, "no SVM to hide");
                assert_eq!(get(&t, 0x8000_0008, 0), input[16], "AMD-only leaf kept");
                assert_eq!(get(&t, 0xd, 0), input[9], "XSAVE leaf kept");
                assert_eq!(subleaves(&t, 0xd), vec![0, 1]);
                assert_eq!(t.len(), input.len(), "0xb.1 added, 0x1f.2 dropped");
            }
        }
    }

    #[test]
    fn amd_for_1_2_and_8_vcpus() {
        let input = amd_table();
        for (vcpus, shift) in [(1u8, 0u32), (2, 1), (8, 3)] {
            for vcpu in [0, vcpus / 2, vcpus - 1] {
                let t = normalize(&input, vcpu, vcpus, NO_TSC).unwrap();
                check_leaf1(&t, &input[1], vcpu, vcpus);
                assert_eq!(get(&t, 1, 0).ecx & L1_ECX_TSC_DEADLINE, 0);
                check_topology(&t, 0xb, vcpu, vcpus, shift);
                assert!(subleaves(&t, 0x1f).is_empty(), "no 0x1f where KVM has none");

                let e1 = get(&t, 0x8000_0001, 0);
                assert_eq!(e1.ecx & E1_ECX_SVM, 0, "SVM hidden");
                assert_eq!(e1.ecx & E1_ECX_CMP_LEGACY != 0, vcpus > 1, "CmpLegacy");
                assert_ne!(e1.ecx & E1_ECX_TOPOEXT, 0, "0x8000_001e is there");
                let kept = !(E1_ECX_SVM | E1_ECX_CMP_LEGACY);
                assert_eq!(e1.ecx & kept, input[6].ecx & kept);

                let e8 = get(&t, 0x8000_0008, 0);
                assert_eq!(e8.ecx & 0xff, u32::from(vcpus) - 1, "NC");
                assert_eq!((e8.ecx >> 12) & 0xf, shift, "ApicIdSize");
                assert_eq!(e8.eax, input[7].eax, "address sizes kept");

                let e1e = get(&t, 0x8000_001e, 0);
                assert_eq!(e1e.eax, u32::from(vcpu), "extended APIC ID");
                assert_eq!(e1e.ebx & 0xff, u32::from(vcpu), "core ID");
                assert_eq!((e1e.ebx >> 8) & 0xff, 0, "one thread per core");
                assert_eq!(e1e.ecx, 0, "node 0, one node");

                for (index, level) in [(0u32, 1), (1, 1), (2, 3)] {
                    let eax = get(&t, 0x8000_001d, index).eax;
                    let want = if level == 3 { u32::from(vcpus) - 1 } else { 0 };
                    assert_eq!((eax >> 14) & 0xfff, want, "0x8000_001d.{index}");
                }
                assert_eq!(get(&t, 0xd, 0), input[4], "XSAVE leaf kept");
                assert_eq!(t.len(), input.len());
            }
        }
    }

    #[test]
    fn tsc_deadline_follows_the_capability() {
        for input in [intel_table(), amd_table()] {
            for (host, on) in [(TSC, true), (NO_TSC, false)] {
                let l1 = get(&normalize(&input, 0, 2, host).unwrap(), 1, 0);
                assert_eq!(l1.ecx & L1_ECX_TSC_DEADLINE != 0, on);
            }
        }
        // Clear even where KVM's table had it set.
        let mut input = intel_table();
        input[1].ecx |= L1_ECX_TSC_DEADLINE;
        let l1 = get(&normalize(&input, 0, 1, NO_TSC).unwrap(), 1, 0);
        assert_eq!(l1.ecx & L1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn a_lone_subleaf_0_of_leaf_b_gains_the_core_level() {
        // Upstream KVM (since 6.2, and 5.10.y) reports leaf 0xb subleaf 0 only.
        let mut input = intel_table();
        input.retain(|e| e.function != 0x1f);
        input[0].eax = 0xd;
        let t = normalize(&input, 3, 4, TSC).unwrap();
        check_topology(&t, 0xb, 3, 4, 2);
        // Past the maximum basic leaf a leaf 0xb entry stays as KVM gave it.
        input[0].eax = 0xa;
        let t = normalize(&input, 3, 4, TSC).unwrap();
        assert_eq!(get(&t, 0xb, 0), input[8]);
    }

    #[test]
    fn topology_extensions_are_hidden_without_leaf_8000_001e() {
        let mut input = amd_table();
        input.retain(|e| e.function != 0x8000_001e);
        let t = normalize(&input, 1, 2, TSC).unwrap();
        assert_eq!(get(&t, 0x8000_0001, 0).ecx & E1_ECX_TOPOEXT, 0);
    }

    #[test]
    fn a_vcpu_outside_the_count_or_a_table_without_leaf_0_or_1_is_refused() {
        assert_eq!(
            normalize(&intel_table(), 2, 2, TSC),
            Err(CpuidError::NoSuchVcpu { vcpu: 2, vcpus: 2 })
        );
        let no_leaf0: Vec<_> = intel_table().into_iter().skip(1).collect();
        assert_eq!(
            normalize(&no_leaf0, 0, 1, TSC),
            Err(CpuidError::MissingLeaf(0))
        );
        let mut no_leaf1 = intel_table();
        no_leaf1.remove(1);
        assert_eq!(
            normalize(&no_leaf1, 0, 1, TSC),
            Err(CpuidError::MissingLeaf(1))
        );
    }

    #[test]
    fn fields_saturate_and_ids_count_bits() {
        let mut r = 0xffff_ffff;
        set_field(&mut r, 26, 6, 100);
        assert_eq!(r, 0xffff_ffff);
        set_field(&mut r, 14, 12, 0);
        assert_eq!(r, 0xfc00_3fff);
        assert_eq!(
            [1u8, 2, 3, 4, 5, 8, 9, 64].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 6]
        );
    }

    #[test]
    fn the_cpuid_identity_ignores_which_cpu_asked_and_sees_features() {
        let table = |apic: u32, avx2: bool| {
            vec![
                leaf(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
                leaf(
                    1,
                    0,
                    [0x806f8, (apic << 24) | 0x0800, 0x7ffa_fbff, 0xbfeb_fbff],
                ),
                leaf(7, 0, [0, if avx2 { 1 << 5 } else { 0 }, 0, 0]),
                leaf(0xb, 0, [1, 2, 0x100, apic]),
                leaf(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            ]
        };
        assert_eq!(
            identity(&table(0, true)),
            identity(&table(1, true)),
            "the APIC ID of the CPU the process ran on"
        );
        assert_ne!(identity(&table(0, true)), identity(&table(0, false)));
    }
}
