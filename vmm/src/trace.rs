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

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use luo_devices::ProbeEvent;
use luo_handover::symbols::KernelSymbols;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::paging::translate;
use crate::vcpu::format_regs;
use crate::vcpu::run::HookAction;
use crate::vm::{RunObserver, StoppedVcpu};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum TraceError {
    /// A `--trace` spec that is not `SYMBOL` or `SYMBOL+OFFSET`.
    #[error("--trace {0}: expected SYMBOL or SYMBOL+OFFSET (offset in hex with 0x, or decimal)")]
    Spec(String),
    /// A `--peek` spec that is not `BASE[+-OFFSET][:LEN]`.
    #[error("--peek {0}: expected BASE[+|-OFFSET][:LEN], BASE a register (rax..r15, rsp, rip), fs, gs, an address, or [BASE+-OFFSET] (the u64 stored there); LEN at most 256")]
    Peek(String),
    /// The symbol is not in the kernel's symbol table.
    #[error("--trace {0}: {1}")]
    Symbol(String, luo_handover::symbols::SymbolError),
    /// `SYMBOL+OFFSET` lands outside the kernel image.
    #[error("--trace {0}: the offset takes the address outside the kernel image")]
    OffsetOutside(String),
    /// More traced addresses than debug registers.
    #[error("--trace: at most {max} addresses (x86 has four debug registers)", max = crate::debug::MAX_BREAKPOINTS)]
    TooMany,
}

/// `SYMBOL[+OFFSET]` as parsed from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSpec {
    /// Kernel symbol.
    pub symbol: String,
    /// Bytes after the symbol's address.
    pub offset: u64,
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl std::str::FromStr for TraceSpec {
    type Err = TraceError;

    fn from_str(s: &str) -> Result<Self, TraceError> {
        let (symbol, offset) = match s.split_once('+') {
            Some((sym, off)) => (sym, parse_number(off).ok_or(TraceError::Spec(s.into()))?),
            None => (s, 0),
        };
        let valid = !symbol.is_empty()
            && symbol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid {
            return Err(TraceError::Spec(s.into()));
        }
        Ok(Self {
            symbol: symbol.into(),
            offset,
        })
    }
}

/// Where a peek's address comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeekBase {
    /// A general-purpose register or RIP, by its index in [`REG_NAMES`].
    Reg(usize),
    /// The FS segment base (the user TLS pointer while a user task is interrupted).
    Fs,
    /// The GS segment base (the per-CPU area in the kernel).
    Gs,
    /// A guest-virtual address.
    Addr(u64),
    /// The u64 stored at another base plus an offset: `[rdi+0x80]` (one level).
    Deref(Box<PeekBase>, i64),
}

/// Names a peek may start from, in the order [`reg_value`] reads them.
pub const REG_NAMES: [&str; 17] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip",
];

fn reg_value(r: &kvm_regs, i: usize) -> u64 {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip,
    ][i]
}

/// `BASE[+|-OFFSET][:LEN]`: `LEN` guest bytes (8 by default, at most 256) at a
/// register-relative or absolute guest-virtual address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekSpec {
    /// The text as given, for the output.
    pub text: String,
    /// Where the address starts.
    pub base: PeekBase,
    /// Signed offset from the base.
    pub offset: i64,
    /// Bytes to read.
    pub len: usize,
}

impl std::str::FromStr for PeekSpec {
    type Err = TraceError;

    fn from_str(s: &str) -> Result<Self, TraceError> {
        let err = || TraceError::Peek(s.into());
        let (addr, len) = match s.rsplit_once(':') {
            Some((a, l)) => (a, parse_number(l).ok_or_else(err)?),
            None => (s, 8),
        };
        if len == 0 || len > 256 {
            return Err(err());
        }
        let (base, offset) = match addr.strip_prefix('[') {
            Some(rest) => {
                let (inner, off) = rest.split_once(']').ok_or_else(err)?;
                let (ib, ioff) = parse_base_offset(inner).ok_or_else(err)?;
                if matches!(ib, PeekBase::Deref(..)) {
                    return Err(err());
                }
                (
                    PeekBase::Deref(Box::new(ib), ioff),
                    parse_offset(off).ok_or_else(err)?,
                )
            }
            None => parse_base_offset(addr).ok_or_else(err)?,
        };
        Ok(Self {
            text: s.into(),
            base,
            offset,
            len: usize::try_from(len).map_err(|_| err())?,
        })
    }
}

/// `+N`, `-N` or nothing.
fn parse_offset(s: &str) -> Option<i64> {
    let Some(sign) = s.chars().next() else {
        return Some(0);
    };
    let n = i64::try_from(parse_number(s.get(1..)?)?).ok()?;
    match sign {
        '+' => Some(n),
        '-' => Some(-n),
        _ => None,
    }
}

/// `BASE[+|-OFFSET]` with BASE a register name, `fs`, `gs` or an address.
fn parse_base_offset(s: &str) -> Option<(PeekBase, i64)> {
    // An address may itself start with digits; the sign after it splits.
    let split = s.find(['+', '-']).unwrap_or(s.len());
    let (base, off) = s.split_at(split);
    let base = match base {
        "fs" => PeekBase::Fs,
        "gs" => PeekBase::Gs,
        b => match REG_NAMES.iter().position(|&n| n == b) {
            Some(i) => PeekBase::Reg(i),
            None => PeekBase::Addr(parse_number(b)?),
        },
    };
    Some((base, parse_offset(off)?))
}

impl PeekSpec {
    /// The guest-virtual address this peek reads for a vCPU in state `r`/`s`;
    /// `read_u64` reads guest-virtual memory for a `[...]` base. `None`: a `[...]` base
    /// that is not mapped.
    pub fn address(
        &self,
        r: &kvm_regs,
        s: &kvm_sregs,
        read_u64: impl Fn(u64) -> Option<u64>,
    ) -> Option<u64> {
        let base = match &self.base {
            PeekBase::Deref(inner, off) => {
                read_u64(base_value(inner, r, s)?.wrapping_add_signed(*off))?
            }
            b => base_value(b, r, s)?,
        };
        Some(base.wrapping_add_signed(self.offset))
    }
}

fn base_value(b: &PeekBase, r: &kvm_regs, s: &kvm_sregs) -> Option<u64> {
    match b {
        PeekBase::Reg(i) => Some(reg_value(r, *i)),
        PeekBase::Fs => Some(s.fs.base),
        PeekBase::Gs => Some(s.gs.base),
        PeekBase::Addr(a) => Some(*a),
        PeekBase::Deref(..) => None,
    }
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
        if specs.len() > crate::debug::MAX_BREAKPOINTS {
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
            let gpa = translate(s.cr3, va, |pa| {
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
    fn trace_specs() {
        let s: TraceSpec = "show_signal_msg".parse().unwrap();
        assert_eq!((s.symbol.as_str(), s.offset), ("show_signal_msg", 0));
        let s: TraceSpec = "liveupdate_reboot+0x1a".parse().unwrap();
        assert_eq!((s.symbol.as_str(), s.offset), ("liveupdate_reboot", 0x1a));
        for bad in ["", "+4", "a b", "sym+zz"] {
            assert!(bad.parse::<TraceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn peek_specs_and_addresses() {
        let p: PeekSpec = "fs-0xa8".parse().unwrap();
        assert_eq!((p.base, p.offset, p.len), (PeekBase::Fs, -0xa8, 8));
        let p: PeekSpec = "rdi+16:168".parse().unwrap();
        assert_eq!((p.base, p.offset, p.len), (PeekBase::Reg(5), 16, 168));
        let p: PeekSpec = "0xffffffff82000000:0x20".parse().unwrap();
        assert_eq!(p.base, PeekBase::Addr(0xffff_ffff_8200_0000));
        assert_eq!(p.len, 32);
        for bad in [
            "fs:0",
            "fs:257",
            "nope",
            "rax-",
            "rax+0x8000000000000000",
            "[rdi",
            "[[rdi]]",
            "[rdi]x",
        ] {
            assert!(bad.parse::<PeekSpec>().is_err(), "{bad}");
        }

        let mut r = kvm_regs::default();
        let mut s = kvm_sregs::default();
        r.rdi = 0x1000;
        s.fs.base = 0x7000_0100;
        let mem = |va| (va == 0x1080).then_some(0x5555_0000u64);
        let fs: PeekSpec = "fs-0x100".parse().unwrap();
        assert_eq!(fs.address(&r, &s, mem), Some(0x7000_0000));
        let rdi: PeekSpec = "rdi+8".parse().unwrap();
        assert_eq!(rdi.address(&r, &s, mem), Some(0x1008));
        let deref: PeekSpec = "[rdi+0x80]+0x10:16".parse().unwrap();
        assert_eq!(deref.len, 16);
        assert_eq!(deref.address(&r, &s, mem), Some(0x5555_0010));
        let unmapped: PeekSpec = "[rdi]".parse().unwrap();
        assert_eq!(unmapped.address(&r, &s, mem), None);
    }

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
