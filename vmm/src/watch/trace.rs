//! `luo-vmm boot --trace SYMBOL[+OFFSET]`: a diagnostic hook. Each time a vCPU reaches a
//! traced kernel address, luo-vmm stops that vCPU, prints its registers, the MSRs a
//! kernel developer asks for first (FS/GS bases, EFER, STAR/LSTAR, the KVM steal-time
//! area) and any `--peek` of guest memory, then lets it go on as if nothing happened.
//!
//! The addresses come from the kernel's ELF symbol table; a peek is read through the
//! stopped vCPU's own page tables (CR3), so `fs-0xa8` reads what a user-mode
//! `mov %fs:-0xa8` of the interrupted task would read if its translation were current.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use kvm_bindings::{kvm_msr_entry, Msrs};
use luo_devices::ProbeEvent;
use luo_handover::symbols::KernelSymbols;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::config::trace::{PeekSpec, TraceSpec};
use crate::machine::arch::paging::translate;
use crate::machine::vcpu::format_regs;
use crate::machine::vcpu::run::HookAction;
use crate::machine::vm::{RunObserver, StoppedVcpu};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The symbol is not in the kernel's symbol table.
    #[error("--trace {0}: {1}")]
    Symbol(String, luo_handover::symbols::SymbolError),
    /// `SYMBOL+OFFSET` lands outside the kernel image.
    #[error("--trace {0}: the offset takes the address outside the kernel image")]
    OffsetOutside(String),
    /// More traced addresses than debug registers.
    #[error("--trace: at most {max} addresses (x86 has four debug registers)", max = crate::machine::debug::MAX_BREAKPOINTS)]
    TooMany,
}

/// MSRs read at every hit, with their names.
const TRACE_MSRS: [(u32, &str); 8] = [
    (0xc000_0100, "FS_BASE"),
    (0xc000_0101, "GS_BASE"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0080, "EFER"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0x0000_0010, "TSC"),
    (0x4b56_4d03, "KVM_STEAL_TIME"),
];

/// Offset of `preempted` in the guest's `struct kvm_steal_time`
/// (arch/x86/include/uapi/asm/kvm_para.h: steal u64, version u32, flags u32, preempted u8).
const STEAL_TIME_PREEMPTED: u64 = 16;

/// The `--trace` observer: arms the traced addresses and prints a dump at each hit.
pub struct Tracer {
    points: Vec<(String, u64)>,
    peeks: Vec<PeekSpec>,
    /// Stop printing a point's hits after this many (the guest still runs).
    max_hits: u32,
    /// Hits so far, per point.
    hits: Vec<AtomicU32>,
    started: Instant,
    out: Mutex<()>,
}

impl Tracer {
    /// Resolves `specs` in `symbols`. Errors: an unknown symbol, more than four specs.
    pub fn new(
        symbols: &KernelSymbols,
        specs: &[TraceSpec],
        peeks: Vec<PeekSpec>,
        max_hits: u32,
    ) -> Result<Self, TraceError> {
        if specs.len() > crate::machine::debug::MAX_BREAKPOINTS {
            return Err(TraceError::TooMany);
        }
        let points = specs
            .iter()
            .map(|s| {
                let addr = symbols
                    .address(&s.symbol)
                    .map_err(|e| TraceError::Symbol(s.symbol.clone(), e))?;
                let name = if s.offset == 0 {
                    s.symbol.clone()
                } else {
                    format!("{}+{:#x}", s.symbol, s.offset)
                };
                // The address must stay inside the kernel image the symbol is in.
                let at = addr
                    .checked_add(s.offset)
                    .filter(|&a| symbols.virt_to_phys(a).is_ok())
                    .ok_or_else(|| TraceError::OffsetOutside(name.clone()))?;
                Ok((name, at))
            })
            .collect::<Result<_, TraceError>>()?;
        Ok(Self {
            hits: specs.iter().map(|_| AtomicU32::new(0)).collect(),
            points,
            peeks,
            max_hits,
            started: Instant::now(),
            out: Mutex::new(()),
        })
    }

    /// One line per traced point: how many times it was hit in the whole run (printed
    /// or not), so a point that was never reached says so.
    pub fn summary(&self) -> String {
        self.points
            .iter()
            .zip(&self.hits)
            .map(|((name, _), hits)| {
                format!(
                    "luo-vmm: trace: {name} hit {} times\n",
                    hits.load(Ordering::Relaxed)
                )
            })
            .collect()
    }

    fn dump(&self, at: &StoppedVcpu<'_>, name: &str, hit: u32) -> String {
        let vcpu = at.vcpu;
        let mut out = format!(
            "luo-vmm: trace #{hit} {name} on vCPU {} at {:.3} s\n",
            vcpu.id,
            self.started.elapsed().as_secs_f64()
        );
        let (Ok(r), Ok(s)) = (vcpu.fd.get_regs(), vcpu.fd.get_sregs()) else {
            out.push_str("  registers unavailable\n");
            return out;
        };
        let _ = writeln!(
            out,
            "  {}",
            format_regs(vcpu.id, &r, &s).replace('\n', "\n  ")
        );
        let _ = writeln!(
            out,
            "    r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x} rbp={:#x}",
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rbp
        );
        let _ = writeln!(
            out,
            "  segment bases: fs={:#x} gs={:#x} (fs sel {:#x}, gs sel {:#x})",
            s.fs.base, s.gs.base, s.fs.selector, s.gs.selector
        );
        let entries: Vec<kvm_msr_entry> = TRACE_MSRS
            .iter()
            .map(|&(index, _)| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut steal_time = None;
        if let Ok(mut msrs) = Msrs::from_entries(&entries) {
            let n = vcpu.fd.get_msrs(&mut msrs).unwrap_or(0);
            let mut line = String::from("  msrs:");
            for e in msrs.as_slice().iter().take(n) {
                let name = TRACE_MSRS
                    .iter()
                    .find(|(i, _)| *i == e.index)
                    .map_or("?", |(_, n)| n);
                let _ = write!(line, " {name}={:#x}", e.data);
                if e.index == 0x4b56_4d03 && e.data & 1 == 1 {
                    steal_time = Some(e.data & !0x3f);
                }
            }
            let _ = writeln!(out, "{line}");
        }
        if let Some(gpa) = steal_time {
            let preempted = vcpu
                .memory()
                .read_obj::<u8>(GuestAddress(gpa + STEAL_TIME_PREEMPTED))
                .ok();
            let _ = writeln!(
                out,
                "  steal time at gpa {gpa:#x}: preempted={}",
                preempted.map_or("unreadable".into(), |p| format!("{p:#x}"))
            );
        }
        for p in &self.peeks {
            let read_u64 = |va| {
                let b = vcpu.bytes_at(&s, va, 8)?;
                Some(u64::from_le_bytes(b.try_into().ok()?))
            };
            let Some(va) = p.address(&r, &s, read_u64) else {
                let _ = writeln!(
                    out,
                    "  peek {}: the pointer it starts from is not mapped",
                    p.text
                );
                continue;
            };
            let gpa = translate(&s, va, |pa| {
                vcpu.memory().read_obj::<u64>(GuestAddress(pa)).ok()
            });
            let bytes = vcpu.bytes_at(&s, va, p.len);
            let _ = writeln!(
                out,
                "  peek {} = va {va:#x} -> gpa {}: {}",
                p.text,
                gpa.map_or("<not mapped>".into(), |g| format!("{g:#x}")),
                bytes.map_or("<unreadable>".into(), |b| hex_dump(&b))
            );
        }
        out
    }
}

/// Little-endian u64 words (and a tail of bytes), as a developer reads memory; for up to
/// 32 bytes also the bytes in order (instruction bytes, strings).
fn hex_dump(b: &[u8]) -> String {
    let words = hex_words(b);
    if b.len() > 32 || b.len() < 8 {
        return words;
    }
    let bytes: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{words} (bytes {})", bytes.join(" "))
}

/// Little-endian u64 words (and a tail of bytes).
fn hex_words(b: &[u8]) -> String {
    let mut words: Vec<String> = b
        .chunks(8)
        .map(|c| {
            if c.len() == 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                format!("{:#018x}", u64::from_le_bytes(w))
            } else {
                c.iter().map(|x| format!("{x:02x}")).collect()
            }
        })
        .collect();
    if words.len() > 1 {
        words.insert(0, "[".into());
        words.push("]".into());
    }
    words.join(" ")
}

impl RunObserver for Tracer {
    fn breakpoints(&self, _vcpu: u8) -> Vec<u64> {
        self.points.iter().map(|(_, a)| *a).collect()
    }

    fn on_breakpoint(&self, at: StoppedVcpu<'_>, slot: usize, _pc: u64) -> HookAction {
        let (Some((name, _)), Some(hits)) = (self.points.get(slot), self.hits.get(slot)) else {
            return HookAction::Continue;
        };
        let hit = hits.fetch_add(1, Ordering::Relaxed) + 1;
        if hit > self.max_hits {
            return HookAction::Continue;
        }
        let text = self.dump(&at, name, hit);
        let _guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
        eprint!("{text}");
        if hit == self.max_hits {
            eprintln!("luo-vmm: trace: {hit} hits of {name} printed; later ones are not");
        }
        HookAction::Continue
    }

    fn on_probe(&self, _ev: &ProbeEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_stay_inside_the_kernel() {
        let map = "ffffffff81000000 T _text\nffffffff812320af T mark_rodata_ro\n";
        let symbols = KernelSymbols::from_system_map(map).unwrap();
        let spec = |s: &str| vec![s.parse::<TraceSpec>().unwrap()];
        let t = Tracer::new(&symbols, &spec("mark_rodata_ro+0x10"), vec![], 1).unwrap();
        assert_eq!(t.breakpoints(0), vec![0xffff_ffff_8123_20bf]);
        assert!(matches!(
            Tracer::new(
                &symbols,
                &spec("mark_rodata_ro+0xffffffffffffff00"),
                vec![],
                1
            ),
            Err(TraceError::OffsetOutside(_))
        ));
        assert!(matches!(
            Tracer::new(&symbols, &spec("nope"), vec![], 1),
            Err(TraceError::Symbol(..))
        ));
    }

    #[test]
    fn the_summary_counts_every_hit_of_each_point() {
        let map = "ffffffff81000000 T _text\nffffffff812320af T mark_rodata_ro\n";
        let symbols = KernelSymbols::from_system_map(map).unwrap();
        let specs = vec![
            "mark_rodata_ro".parse::<TraceSpec>().unwrap(),
            "_text+0x10".parse::<TraceSpec>().unwrap(),
        ];
        let t = Tracer::new(&symbols, &specs, vec![], 1).unwrap();
        // Hits past --trace-max are not printed but still counted.
        t.hits[0].fetch_add(3, Ordering::Relaxed);
        assert_eq!(
            t.summary(),
            "luo-vmm: trace: mark_rodata_ro hit 3 times\nluo-vmm: trace: _text+0x10 hit 0 times\n"
        );
    }

    #[test]
    fn short_dumps_show_bytes_too() {
        assert_eq!(
            hex_dump(&[0x0f, 0x01, 0xd9, 0x5b, 0xc3, 0x55, 0x45, 0x31]),
            "0x314555c35bd9010f (bytes 0f 01 d9 5b c3 55 45 31)"
        );
        assert_eq!(hex_dump(&[0x0f, 0x01, 0xd9]), "0f01d9");
        assert!(!hex_dump(&[0; 64]).contains("bytes"));
    }

    #[test]
    fn words_are_little_endian() {
        assert_eq!(hex_words(&[1, 0, 0, 0, 0, 0, 0, 0]), "0x0000000000000001");
        assert_eq!(hex_words(&[0; 10]), "[ 0x0000000000000000 0000 ]");
    }
}
