//! `--trace SYMBOL[+OFFSET]` and `--peek BASE[+-OFFSET][:LEN]` as the command line gives
//! them, parsed before any guest boots; the hook that uses them is
//! [`crate::watch::trace::Tracer`].

use kvm_bindings::{kvm_regs, kvm_sregs};
use thiserror::Error;

/// A `--trace` or `--peek` spec that does not parse.
#[derive(Debug, Error)]
pub enum TraceSpecError {
    /// A `--trace` spec that is not `SYMBOL` or `SYMBOL+OFFSET`.
    #[error("--trace {0}: expected SYMBOL or SYMBOL+OFFSET (offset in hex with 0x, or decimal)")]
    Spec(String),
    /// A `--peek` spec that is not `BASE[+-OFFSET][:LEN]`.
    #[error("--peek {0}: expected BASE[+|-OFFSET][:LEN], BASE a register (rax..r15, rsp, rip), fs, gs, an address, or [BASE+-OFFSET] (the u64 stored there); LEN at most 256")]
    Peek(String),
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
    type Err = TraceSpecError;

    fn from_str(s: &str) -> Result<Self, TraceSpecError> {
        let (symbol, offset) = match s.split_once('+') {
            Some((sym, off)) => (
                sym,
                parse_number(off).ok_or(TraceSpecError::Spec(s.into()))?,
            ),
            None => (s, 0),
        };
        let valid = !symbol.is_empty()
            && symbol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid {
            return Err(TraceSpecError::Spec(s.into()));
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
    type Err = TraceSpecError;

    fn from_str(s: &str) -> Result<Self, TraceSpecError> {
        let err = || TraceSpecError::Peek(s.into());
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
}
