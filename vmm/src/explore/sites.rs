//! Lock-acquisition sites: the hold points inside a function, found by decoding its code.
//!
//! A hold at a function's entry stops CPU 0 *before* anything the function does. The order
//! that makes a racing call on another CPU block is the other one: CPU 0 stopped while it
//! *holds* a lock the call needs. A *lock site* is the return address of a direct call
//! (`call rel32`, `e8`) to one of the kernel's lock-acquiring functions
//! ([`LOCK_FUNCTIONS`]): when CPU 0 gets there, the callee has returned, so the lock is
//! held (a sleeping acquisition cannot return without it). Its point name is
//! `FUNCTION+0xOFF`, the offset in bytes from the function's entry (its ELF symbol), which
//! is what [`crate::config::trace::TraceSpec`] parses.
//!
//! The code is decoded with `iced-x86`, linearly from the entry (the symbol's address: with
//! IBT its first instruction is `endbr64`, with `CALL_PADDING` the `__pfx_` nops lie before
//! it) to its end (ELF `st_size`). Kernel functions keep their jump tables and data out of
//! `.text` (objtool refuses data in a function), so a linear sweep sees every instruction.
//! The bytes are the file's, before boot-time patching (alternatives, static calls, call
//! thunks): those keep a direct `call`'s length, so its return address does not move.
//! Nothing here panics on any bytes: the kernel image is input.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use luo_handover::symbols::{function_code, FunctionCode, KernelSymbols, MAX_FUNCTION_SIZE};

use crate::config::trace::TraceSpec;

/// The functions that acquire a lock and return holding it, by name, as `vmlinux` defines
/// them on x86-64 (Linux 7.2: kernel/locking/{mutex,rwsem,spinlock}.c). `mutex_lock` and
/// friends become the `_nested` functions with `CONFIG_DEBUG_LOCK_ALLOC` (the `debug`
/// variant), `mutex_lock_killable` there is `_mutex_lock_killable`; the `_raw_*` spinlock
/// functions are the out-of-line `spin_lock()` (x86 does not inline them). Not the
/// `trylock`s: they return without the lock when it is taken, so a hold after them does
/// not mean "held".
pub(crate) const LOCK_FUNCTIONS: &[&str] = &[
    // Mutexes (kernel/locking/mutex.c).
    "mutex_lock",
    "mutex_lock_interruptible",
    "mutex_lock_killable",
    "mutex_lock_io",
    "mutex_lock_nested",
    "mutex_lock_interruptible_nested",
    "mutex_lock_killable_nested",
    "_mutex_lock_killable",
    "mutex_lock_io_nested",
    "_mutex_lock_nest_lock",
    // Read-write semaphores (kernel/locking/rwsem.c).
    "down_read",
    "down_write",
    "down_read_killable",
    "down_write_killable",
    "down_read_interruptible",
    "down_read_nested",
    "down_write_nested",
    "down_read_killable_nested",
    "down_write_killable_nested",
    // Spinlocks and rwlocks (kernel/locking/spinlock.c).
    "_raw_spin_lock",
    "_raw_spin_lock_irq",
    "_raw_spin_lock_irqsave",
    "_raw_spin_lock_bh",
    "_raw_spin_lock_nested",
    "_raw_spin_lock_irqsave_nested",
    "_raw_spin_lock_nest_lock",
    "_raw_read_lock",
    "_raw_read_lock_irq",
    "_raw_read_lock_irqsave",
    "_raw_read_lock_bh",
    "_raw_write_lock",
    "_raw_write_lock_irq",
    "_raw_write_lock_irqsave",
    "_raw_write_lock_bh",
    "_raw_write_lock_nested",
];

/// One function's code as decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// The offset (bytes from the entry) of every instruction decoded, in order.
    pub starts: Vec<u64>,
    /// Every direct near call (`call rel32`): (offset of the instruction after it, target
    /// address).
    pub calls: Vec<(u64, u64)>,
    /// Where decoding stopped before the end: the offset of bytes that do not decode (or
    /// an instruction cut by the end). `None`: the whole function decoded.
    pub stopped_at: Option<u64>,
}

/// A lock site of a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockSite {
    /// Bytes from the function's entry to the return address of the call.
    pub offset: u64,
    /// The lock function called ([`LOCK_FUNCTIONS`]).
    pub lock: String,
}

/// Decodes `bytes`, a function's code whose first byte is at kernel virtual address
/// `start`, as 64-bit x86, from its first byte to its last; stops at the first bytes that
/// are not an instruction, or an instruction the end cuts.
pub(crate) fn decode(bytes: &[u8], start: u64) -> Decoded {
    let mut out = Decoded::default();
    let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        let at = decoder.position() as u64;
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            out.stopped_at = Some(at);
            break;
        }
        out.starts.push(at);
        if instr.code() == Code::Call_rel32_64 {
            let after = at.saturating_add(instr.len() as u64);
            out.calls.push((after, instr.near_branch_target()));
        }
    }
    out
}

/// The lock sites of a function (its code `bytes`, its entry at `start`): every direct
/// call to an address `locks` names (address of a [`LOCK_FUNCTIONS`] function → its
/// name), as the offset of the instruction after the call; sorted by offset, each once.
/// A call whose return address is the function's end (a call the compiler knows does not
/// return) is no site: nothing of the function runs after it.
pub(crate) fn lock_sites(bytes: &[u8], start: u64, locks: &BTreeMap<u64, String>) -> Vec<LockSite> {
    let end = bytes.len() as u64;
    let sites: BTreeMap<u64, &String> = decode(bytes, start)
        .calls
        .into_iter()
        .filter(|&(after, _)| after < end)
        .filter_map(|(after, target)| locks.get(&target).map(|name| (after, name)))
        .collect();
    sites
        .into_iter()
        .map(|(offset, lock)| LockSite {
            offset,
            lock: lock.clone(),
        })
        .collect()
}

/// Why `offset` cannot be a hold point in a function of code `bytes`; `None` when it is
/// the start of an instruction the decoder reached.
pub(crate) fn check_offset(bytes: &[u8], start: u64, offset: u64) -> Option<String> {
    let size = bytes.len() as u64;
    if offset >= size {
        return Some(format!("past its end (it is {size} bytes)"));
    }
    let d = decode(bytes, start);
    if d.starts.binary_search(&offset).is_ok() {
        return None;
    }
    Some(match d.stopped_at {
        Some(at) if offset > at => format!(
            "after {at:#x}, where its code stops decoding: not known to be an instruction boundary"
        ),
        _ => {
            let before = d.starts.iter().rev().find(|&&s| s < offset).copied();
            format!(
                "not an instruction boundary (inside the instruction at {:#x})",
                before.unwrap_or(0)
            )
        }
    })
}

/// The kernel a hold point (`FUNCTION` or `FUNCTION+0xOFF`: an explore point, a scenario
/// hook's `at`) is checked against before a guest boots: its symbols, the code of the
/// functions named (from an ELF vmlinux; a bzImage's symbols come from System.map, which
/// does not tell code from data).
pub(crate) struct PointCheck<'a> {
    syms: &'a KernelSymbols,
    kernel: &'a Path,
    /// Whether `kernel` is an ELF vmlinux.
    elf: bool,
    codes: HashMap<String, FunctionCode>,
}

impl<'a> PointCheck<'a> {
    /// Reads the code of `functions` from `kernel` (none when it cannot be read as ELF).
    pub(crate) fn new(kernel: &'a Path, syms: &'a KernelSymbols, functions: &[String]) -> Self {
        let data = std::fs::read(kernel).ok();
        let elf = data.as_ref().is_some_and(|d| d.starts_with(b"\x7fELF"));
        let wanted: Vec<(String, u64)> = functions
            .iter()
            .filter_map(|n| syms.address(n).ok().map(|a| (n.clone(), a)))
            .collect();
        let codes = data
            .and_then(|d| function_code(&d, &wanted).ok())
            .unwrap_or_default();
        PointCheck {
            syms,
            kernel,
            elf,
            codes,
        }
    }

    /// The code of `function`, if it was read.
    pub(crate) fn code(&self, function: &str) -> Option<&FunctionCode> {
        self.codes.get(function)
    }

    /// The address of point `t` (named `name` in messages), or why no breakpoint there
    /// would fire for it: an unknown symbol, data, one of `taken` (where the interception
    /// breaks on a vCPU the point is armed on: it would share that breakpoint, and the
    /// interception's slot comes first), or an offset that is past the function's end or
    /// not the start of one of its instructions as decoded.
    pub(crate) fn check(&self, name: &str, t: &TraceSpec, taken: &[u64]) -> Result<u64, String> {
        let addr = self
            .syms
            .address(&t.symbol)
            .map_err(|e| format!("unknown point {name:?}: {e}"))?;
        let code = self.codes.get(&t.symbol);
        if self.elf && code.is_none() {
            return Err(format!(
                "{name}: {} is not a function of the kernel (no text symbol with a size in {}): a hold point is where code runs",
                t.symbol,
                self.kernel.display()
            ));
        }
        let at = addr.wrapping_add(t.offset);
        if taken.contains(&at) {
            return Err(format!(
                "{name} is where the interception itself breaks (liveupdate_reboot, machine_kexec, start_kernel), and its breakpoint would take the hit; choose a function it calls instead"
            ));
        }
        if t.offset != 0 {
            let Some(c) = code else {
                return Err(format!(
                    "{name}: no code of {} in {} to check the offset against (not an ELF vmlinux, or a symbol without a size up to {MAX_FUNCTION_SIZE} bytes)",
                    t.symbol,
                    self.kernel.display(),
                ));
            };
            if let Some(why) = check_offset(&c.bytes, c.address, t.offset) {
                return Err(format!(
                    "{name}: offset {:#x} of {}: {why}",
                    t.offset, t.symbol
                ));
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u64 = 0xffff_ffff_8100_0000;
    const MUTEX_LOCK: u64 = 0xffff_ffff_8200_0000;
    const SPIN_LOCK: u64 = 0xffff_ffff_8200_0100;
    const OTHER: u64 = 0xffff_ffff_8200_0200;

    /// `call TARGET` (`e8 rel32`) at `at` bytes from [`START`].
    fn call(at: u64, target: u64) -> Vec<u8> {
        let next = START + at + 5;
        let rel = i32::try_from(target.wrapping_sub(next) as i64).unwrap();
        let mut v = vec![0xe8];
        v.extend_from_slice(&rel.to_le_bytes());
        v
    }

    fn locks() -> BTreeMap<u64, String> {
        [(MUTEX_LOCK, "mutex_lock"), (SPIN_LOCK, "_raw_spin_lock")]
            .into_iter()
            .map(|(a, n)| (a, n.to_owned()))
            .collect()
    }

    /// endbr64; push rbp; mov rdi,rbx; call mutex_lock; call other; mov rdi,rbx;
    /// call _raw_spin_lock; pop rbp; ret.
    fn function() -> (Vec<u8>, Vec<u64>) {
        let mut code = vec![0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xdf];
        let mut sites = vec![];
        let at = code.len() as u64;
        code.extend(call(at, MUTEX_LOCK));
        sites.push(code.len() as u64);
        let at = code.len() as u64;
        code.extend(call(at, OTHER));
        code.extend([0x48, 0x89, 0xdf]);
        let at = code.len() as u64;
        code.extend(call(at, SPIN_LOCK));
        sites.push(code.len() as u64);
        code.extend([0x5d, 0xc3]);
        (code, sites)
    }

    #[test]
    fn calls_to_lock_functions_are_sites_after_the_call() {
        let (code, want) = function();
        let got = lock_sites(&code, START, &locks());
        assert_eq!(got.iter().map(|s| s.offset).collect::<Vec<_>>(), want);
        assert_eq!(got[0].lock, "mutex_lock");
        assert_eq!(got[1].lock, "_raw_spin_lock");
        // The call to another function is no site, and nothing is one without lock names.
        assert!(lock_sites(&code, START, &BTreeMap::new()).is_empty());
        // The same bytes elsewhere call elsewhere (rel32 is relative to the next ip).
        assert!(lock_sites(&code, START + 0x10, &locks()).is_empty());
    }

    #[test]
    fn boundaries_are_decoded_instruction_starts() {
        let (code, sites) = function();
        for off in [0, 4, 5, 8] {
            assert_eq!(check_offset(&code, START, off), None, "{off:#x}");
        }
        for s in &sites {
            assert_eq!(check_offset(&code, START, *s), None);
        }
        // Inside endbr64, inside the mov, inside the call's rel32.
        for off in [1, 3, 6, 9, 12] {
            let why = check_offset(&code, START, off).unwrap();
            assert!(why.contains("not an instruction boundary"), "{off}: {why}");
        }
        let len = code.len() as u64;
        assert!(check_offset(&code, START, len)
            .unwrap()
            .contains("past its end"));
        assert!(check_offset(&code, START, u64::MAX).is_some());
    }

    #[test]
    fn truncated_and_junk_code_stops_safely() {
        let (code, sites) = function();
        // Cut inside the first call: no site, decoding stops at the cut instruction.
        let cut = &code[..10];
        assert!(lock_sites(cut, START, &locks()).is_empty());
        assert_eq!(decode(cut, START).stopped_at, Some(8));
        // Cut right after the first call: it returns to the end, so it is no site.
        let cut = &code[..usize::try_from(sites[0]).unwrap()];
        assert!(lock_sites(cut, START, &locks()).is_empty());
        // Undecodable bytes (0x06 is `push es`, invalid in 64-bit mode) end the sweep:
        // what follows is not known to be code.
        let mut junk = vec![0x55, 0x06];
        junk.extend(&code);
        let d = decode(&junk, START);
        assert_eq!((d.starts.as_slice(), d.stopped_at), (&[0][..], Some(1)));
        assert!(lock_sites(&junk, START, &locks()).is_empty());
        assert!(check_offset(&junk, START, 4)
            .unwrap()
            .contains("stops decoding"));
        // Empty code, and every prefix of the function: no panic.
        assert!(lock_sites(&[], START, &locks()).is_empty());
        assert!(check_offset(&[], START, 0).is_some());
        for n in 0..code.len() {
            let _ = lock_sites(&code[..n], u64::MAX - 3, &locks());
            let _ = check_offset(&code[..n], u64::MAX - 3, 2);
        }
    }

    /// Prints the lock sites of a built kernel's LUO/KHO functions (docs/explore.md's
    /// counts): `LUO_VMLINUX=~/.cache/luo-vmm/kernels/KEY/vmlinux cargo test -p luo-vmm
    /// --lib explore::sites -- --ignored --nocapture`.
    #[test]
    #[ignore = "reads a built kernel: LUO_VMLINUX=.../vmlinux"]
    fn print_the_sites_of_a_built_kernel() {
        let Some(path) = std::env::var_os("LUO_VMLINUX").map(std::path::PathBuf::from) else {
            eprintln!("LUO_VMLINUX not set");
            return;
        };
        let data = std::fs::read(&path).unwrap();
        let syms = luo_handover::symbols::KernelSymbols::from_elf(&data).unwrap();
        let code = crate::explore::code::read_code(path.parent().unwrap()).unwrap();
        let wanted: Vec<(String, u64)> = code
            .iter()
            .filter_map(|f| syms.address(&f.name).ok().map(|a| (f.name.clone(), a)))
            .collect();
        let codes = luo_handover::symbols::function_code(&data, &wanted).unwrap();
        let locks: BTreeMap<u64, String> = LOCK_FUNCTIONS
            .iter()
            .filter_map(|n| syms.address(n).ok().map(|a| (a, (*n).to_owned())))
            .collect();
        let (mut functions, mut with_sites, mut total, mut partial) = (0, 0, 0, 0);
        for (name, _) in &wanted {
            let Some(c) = codes.get(name) else {
                println!("{name}: no code");
                continue;
            };
            functions += 1;
            let d = decode(&c.bytes, c.address);
            if let Some(at) = d.stopped_at {
                partial += 1;
                println!(
                    "{name}: decoding stopped at {at:#x} of {:#x}",
                    c.bytes.len()
                );
            }
            let sites = lock_sites(&c.bytes, c.address, &locks);
            if !sites.is_empty() {
                with_sites += 1;
            }
            for s in &sites {
                total += 1;
                println!("{name}+{:#x} {} (entry {:#x})", s.offset, s.lock, c.address);
            }
        }
        println!(
            "{} functions with an address, {functions} with code, {partial} not decoded to their end, {with_sites} with lock sites, {total} lock sites",
            wanted.len()
        );
    }

    #[test]
    fn every_lock_function_is_listed_once() {
        let mut names = LOCK_FUNCTIONS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), LOCK_FUNCTIONS.len());
        assert!(!LOCK_FUNCTIONS.iter().any(|n| n.contains("trylock")));
    }
}
