//! `PATH=VALUE`: a change to one field of the handover, parsed from the command line
//! ([`InjectSpec::parse`], syntax only, before any guest boots) and resolved against the
//! fields of a parsed handover ([`resolve`], at next-kernel-start) into the bytes to write.
//!
//! Paths are those of [`crate::fields`]. Values:
//!
//! | form | meaning |
//! | --- | --- |
//! | `42`, `0x1234`, `0b101` | that number (`_` allowed between digits) |
//! | `+N`, `-N` | the current value plus or minus `N`, modulo 2^bits of the field |
//! | `@PATH`, `@PATH+N`, `@PATH-N` | the guest address of a record or field (plus/minus `N`) |
//! | `$PATH`, `$PATH+N`, `$PATH-N` | another integer field's current value (plus/minus `N`) |
//! | `self`, `self+N`, `self-N` | the field's own guest address (plus/minus `N`) |
//! | `bytes:de ad be ef` | these bytes (hex; spaces, `:` and `,` ignored), NUL-padded to the field |
//! | `"text"`, `'text'` | the string's bytes (escapes `\\ \" \' \n \0 \xNN`), NUL-padded |
//!
//! A number must fit in the field (a 52-bit `pfn`, a 32-bit `seals`, ...); bytes and strings
//! must not be longer than it; a byte-array field (a name, a `compatible`) takes only bytes or
//! a string, a bit field (`pfn`, a folio's `flags`) only numbers.
//!
//! Short names ([`ALIASES`]) stand for a whole path (`compatible` is
//! `luo.session[0].file[0].compatible`); `corrupt-kho-fdt` alone (no `=VALUE`) is the
//! original fault: the KHO FDT's `magic` and `totalsize` become `de ad be ef ff ff ff ff`.

use std::collections::HashMap;

use thiserror::Error;

use crate::fields::{Field, FieldList, Layout, Value};
use crate::mem::c_string;

/// Longest spec accepted, in bytes.
pub const MAX_SPEC_LEN: usize = 4096;
/// Most suggestions in an unknown-path error.
const MAX_SUGGESTIONS: usize = 3;
/// Most distinct path shapes compared for suggestions (a hostile FDT may have thousands).
const MAX_SHAPES: usize = 4096;

/// The name of the original fault, a whole injection by itself.
pub const CORRUPT_KHO_FDT: &str = "corrupt-kho-fdt";

/// Short names for the fields most often corrupted: `(short name, path)`.
pub const ALIASES: &[(&str, &str)] = &[
    ("fdt-magic", "kho.fdt.header.magic"),
    ("fdt-totalsize", "kho.fdt.header.totalsize"),
    ("memory-map", "kho.fdt.preserved-memory-map"),
    ("luo-blob", "kho.fdt.node[LUO].preserved-data"),
    ("luo-compatible", "luo.compatible"),
    ("sessions", "luo.sessions_pa"),
    ("session-block-next", "luo.session_block[0].next"),
    ("session-block-count", "luo.session_block[0].count"),
    ("session-name", "luo.session[0].name"),
    ("file-set", "luo.session[0].files"),
    ("file-count", "luo.session[0].count"),
    ("block-next", "luo.session[0].file_block[0].next"),
    ("block-count", "luo.session[0].file_block[0].count"),
    ("compatible", "luo.session[0].file[0].compatible"),
    ("token", "luo.session[0].file[0].token"),
    ("file-data", "luo.session[0].file[0].data"),
    ("memfd-size", "memfd[s0.f0].size"),
    ("folio-count", "memfd[s0.f0].nr_folios"),
    ("folio-array", "memfd[s0.f0].folios.first"),
    ("folio-pfn", "memfd[s0.f0].folio[0].pfn"),
    ("folio-flags", "memfd[s0.f0].folio[0].flags"),
];

/// Errors of an injection spec: its syntax, or, against a handover, its path or value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InjectError {
    /// Not `PATH=VALUE` nor a whole-injection short name.
    #[error("--inject {0:?}: expected PATH=VALUE (see docs/faults.md) or {CORRUPT_KHO_FDT}")]
    NoValue(String),
    /// A whole-injection short name given a value.
    #[error("--inject {0:?}: {CORRUPT_KHO_FDT} takes no =VALUE (it writes the FDT header's magic and totalsize)")]
    NoValueWanted(String),
    /// A one-segment path that is no short name (every field path has two or more).
    #[error("--inject: {0:?} is not a short name ({names}) nor a field path (PART.FIELD...; see docs/faults.md)", names = short_names())]
    UnknownShortName(String),
    /// The spec is longer than [`MAX_SPEC_LEN`].
    #[error("--inject: spec of {0} bytes is longer than {MAX_SPEC_LEN}")]
    TooLong(usize),
    /// The path is not a path.
    #[error("--inject: bad path {path:?}: {why}")]
    BadPath {
        /// The path given.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The value is not one of the forms.
    #[error("--inject: bad value {value:?}: {why}")]
    BadValue {
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// No field has this path in this handover.
    #[error("no field {path} in this handover{}", did_you_mean(.suggestions))]
    UnknownPath {
        /// The path.
        path: String,
        /// Paths that exist and look like it.
        suggestions: Vec<String>,
    },
    /// `@PATH` names no record or field of this handover.
    #[error("no record or field {path} (in @{path}) in this handover{}", did_you_mean(.suggestions))]
    UnknownAddress {
        /// The path after `@`.
        path: String,
        /// Paths that exist and look like it.
        suggestions: Vec<String>,
    },
    /// The value does not fit in the field.
    #[error("{path}: {value:#x} does not fit in its {bits} bits")]
    DoesNotFit {
        /// The field.
        path: String,
        /// The value.
        value: u128,
        /// The field's bits.
        bits: u32,
    },
    /// Bytes longer than the field.
    #[error("{path}: {len} bytes do not fit in its {width}")]
    BytesTooLong {
        /// The field.
        path: String,
        /// Bytes given.
        len: usize,
        /// The field's width.
        width: u32,
    },
    /// A value of the wrong kind for the field.
    #[error("{path}: {why}")]
    WrongKind {
        /// The field.
        path: String,
        /// What it takes.
        why: &'static str,
    },
}

fn did_you_mean(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", s.join(" or "))
    }
}

/// `+N` or `-N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// `-N`.
    pub negative: bool,
    /// `N`.
    pub by: u64,
}

impl Offset {
    const ZERO: Offset = Offset {
        negative: false,
        by: 0,
    };

    /// `base` moved by this offset, as a 128-bit value (so that nothing wraps silently).
    fn apply(self, base: u64) -> i128 {
        let by = i128::from(self.by);
        i128::from(base) + if self.negative { -by } else { by }
    }
}

/// The right-hand side of `PATH=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSpec {
    /// A number.
    Absolute(u64),
    /// The current value plus or minus a number, modulo the field's size.
    Relative(Offset),
    /// `@PATH[+-N]`: a record's or field's address.
    Address {
        /// The record or field.
        path: String,
        /// Added to its address.
        offset: Offset,
    },
    /// `$PATH[+-N]`: another integer field's value.
    Copy {
        /// The field.
        path: String,
        /// Added to its value.
        offset: Offset,
    },
    /// `self[+-N]`: the field's own address.
    SelfAddress(Offset),
    /// Bytes or a string, NUL-padded to the field.
    Bytes(Vec<u8>),
}

/// One `PATH=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The field, short names expanded.
    pub path: String,
    /// Its new value.
    pub value: ValueSpec,
}

/// One `--inject` argument: what was given, and the assignments it stands for (one, or two
/// for [`CORRUPT_KHO_FDT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSpec {
    /// The argument as given.
    pub given: String,
    /// What it assigns.
    pub assignments: Vec<Assignment>,
}

/// One write into guest memory, and what it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The field.
    pub path: String,
    /// Guest-physical address of the first byte written.
    pub gpa: u64,
    /// The bytes (the whole field; for a bit field, its whole `u64`).
    pub bytes: Vec<u8>,
    /// The field's value before.
    pub old: Value,
    /// Its value after.
    pub new: Value,
}

impl std::str::FromStr for InjectSpec {
    type Err = InjectError;
    fn from_str(s: &str) -> Result<Self, InjectError> {
        Self::parse(s)
    }
}

impl InjectSpec {
    /// Parses `PATH=VALUE` (or a whole-injection short name), checking the syntax of path
    /// and value; whether the path exists is known only against a handover ([`resolve`]).
    pub fn parse(s: &str) -> Result<Self, InjectError> {
        if s.len() > MAX_SPEC_LEN {
            return Err(InjectError::TooLong(s.len()));
        }
        let given = s.to_owned();
        if s.trim() == CORRUPT_KHO_FDT {
            let assign = |path: &str, v| Assignment {
                path: path.to_owned(),
                value: ValueSpec::Absolute(v),
            };
            return Ok(InjectSpec {
                given,
                assignments: vec![
                    assign("kho.fdt.header.magic", 0xdead_beef),
                    assign("kho.fdt.header.totalsize", 0xffff_ffff),
                ],
            });
        }
        let (path, value) = s
            .split_once('=')
            .ok_or_else(|| InjectError::NoValue(given.clone()))?;
        let path = path.trim();
        let alias = ALIASES.iter().find(|(short, _)| *short == path);
        let one_name = !path.is_empty()
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if path == CORRUPT_KHO_FDT {
            return Err(InjectError::NoValueWanted(given));
        }
        if alias.is_none() && one_name {
            return Err(InjectError::UnknownShortName(path.to_owned()));
        }
        let path = alias.map_or(path, |(_, long)| long);
        check_path(path)?;
        Ok(InjectSpec {
            given,
            assignments: vec![Assignment {
                path: path.to_owned(),
                value: parse_value(value.trim())?,
            }],
        })
    }

    /// Whether this is the original `corrupt-kho-fdt` fault.
    pub fn is_corrupt_kho_fdt(&self) -> bool {
        self.given.trim() == CORRUPT_KHO_FDT
    }

    /// The writes this spec makes in the handover whose fields are `fields`.
    pub fn resolve(&self, fields: &FieldList) -> Result<Vec<Write>, InjectError> {
        self.assignments.iter().map(|a| a.resolve(fields)).collect()
    }
}

/// The writes of all `specs`, all resolved against the same, unchanged `fields` (so one
/// spec's write does not move another's target): every spec resolves, or none is applied.
pub fn resolve(fields: &FieldList, specs: &[InjectSpec]) -> Result<Vec<Write>, InjectError> {
    let mut out = Vec::new();
    for s in specs {
        out.extend(s.resolve(fields)?);
    }
    Ok(out)
}

impl Assignment {
    /// The write this assignment makes in `fields`' handover.
    pub fn resolve(&self, fields: &FieldList) -> Result<Write, InjectError> {
        let f = fields
            .field(&self.path)
            .ok_or_else(|| InjectError::UnknownPath {
                path: self.path.clone(),
                suggestions: suggest(fields, &self.path),
            })?;
        let number = |v: i128| fit(f, v);
        let (bytes, new) = match &self.value {
            ValueSpec::Absolute(v) => number(i128::from(*v))?,
            ValueSpec::SelfAddress(o) => number(o.apply(f.gpa))?,
            ValueSpec::Address { path, offset } => {
                let at = fields
                    .address(path)
                    .ok_or_else(|| InjectError::UnknownAddress {
                        path: path.clone(),
                        suggestions: suggest(fields, path),
                    })?;
                number(offset.apply(at))?
            }
            ValueSpec::Copy { path, offset } => {
                let from = fields.field(path).ok_or_else(|| InjectError::UnknownPath {
                    path: path.clone(),
                    suggestions: suggest(fields, path),
                })?;
                let Value::Int(v) = from.value else {
                    return Err(wrong(from, "is a byte array: $PATH copies integer fields"));
                };
                number(offset.apply(v))?
            }
            ValueSpec::Relative(o) => {
                let Value::Int(cur) = f.value else {
                    return Err(wrong(
                        f,
                        "a byte array has no +N/-N: give bytes:... or \"...\"",
                    ));
                };
                let bits = f.bits();
                let modulus = 1i128 << bits;
                number(o.apply(cur).rem_euclid(modulus))?
            }
            ValueSpec::Bytes(b) => padded(f, b)?,
        };
        Ok(Write {
            path: f.path.clone(),
            gpa: f.gpa,
            bytes,
            old: f.value.clone(),
            new,
        })
    }
}

fn wrong(f: &Field, why: &'static str) -> InjectError {
    InjectError::WrongKind {
        path: f.path.clone(),
        why,
    }
}

/// The bytes that store number `v` in `f`, and the value it then has.
fn fit(f: &Field, v: i128) -> Result<(Vec<u8>, Value), InjectError> {
    const NOT_A_NUMBER: &str = "a byte array takes bytes:... or \"...\", not a number";
    let bits = f.bits();
    if bits == 0 {
        return Err(wrong(f, NOT_A_NUMBER));
    }
    let v = u64::try_from(v)
        .ok()
        .filter(|&v| bits >= 64 || v >> bits == 0)
        .ok_or(InjectError::DoesNotFit {
            path: f.path.clone(),
            value: v.unsigned_abs(),
            bits,
        })?;
    let width = usize::try_from(f.width).unwrap_or(8).min(8);
    let bytes = match f.layout {
        Layout::Le => v.to_le_bytes().get(..width).unwrap_or_default().to_vec(),
        Layout::Be => v
            .to_be_bytes()
            .get(8 - width..)
            .unwrap_or_default()
            .to_vec(),
        Layout::Bits { shift, bits, word } => {
            // Checked shifts: a deserialized layout may say anything.
            let ones = 1u64.checked_shl(bits.into()).map_or(u64::MAX, |m| m - 1);
            let shl = |x: u64| x.checked_shl(shift.into()).unwrap_or(0);
            (word & !shl(ones) | shl(v)).to_le_bytes().to_vec()
        }
        Layout::Bytes => return Err(wrong(f, NOT_A_NUMBER)),
    };
    Ok((bytes, Value::Int(v)))
}

/// `b` NUL-padded to `f`'s width, and the value `f` then has.
fn padded(f: &Field, b: &[u8]) -> Result<(Vec<u8>, Value), InjectError> {
    let width = usize::try_from(f.width).unwrap_or(usize::MAX);
    if b.len() > width {
        return Err(InjectError::BytesTooLong {
            path: f.path.clone(),
            len: b.len(),
            width: f.width,
        });
    }
    let mut bytes = b.to_vec();
    bytes.resize(width, 0);
    let int = |bytes: &[u8], be: bool| {
        let mut w = [0u8; 8];
        let n = bytes.len().min(8);
        if be {
            w[8 - n..].copy_from_slice(&bytes[..n]);
            u64::from_be_bytes(w)
        } else {
            w[..n].copy_from_slice(&bytes[..n]);
            u64::from_le_bytes(w)
        }
    };
    let new = match f.layout {
        Layout::Bytes => Value::Text(c_string(&bytes)),
        Layout::Le => Value::Int(int(&bytes, false)),
        Layout::Be => Value::Int(int(&bytes, true)),
        Layout::Bits { .. } => return Err(wrong(f, "a bit field takes a number, not bytes")),
    };
    Ok((bytes, new))
}

/// Checks the syntax of a path: segments `name` or `name[index]`, separated by `.`.
/// The short names, comma-separated (for error messages).
fn short_names() -> String {
    let mut names: Vec<&str> = ALIASES.iter().map(|(short, _)| *short).collect();
    names.push(CORRUPT_KHO_FDT);
    names.join(", ")
}

fn check_path(path: &str) -> Result<(), InjectError> {
    let bad = |why| InjectError::BadPath {
        path: path.to_owned(),
        why,
    };
    if path.is_empty() {
        return Err(bad("empty"));
    }
    let name_byte = |b: u8| b.is_ascii_alphanumeric() || b"_,+@-".contains(&b);
    let mut bytes = path.bytes().peekable();
    loop {
        let mut name = 0;
        while bytes.next_if(|&b| name_byte(b)).is_some() {
            name += 1;
        }
        if name == 0 {
            return Err(bad(
                "a segment has no name (segments are NAME or NAME[INDEX])",
            ));
        }
        if bytes.next_if_eq(&b'[').is_some() {
            let mut index = 0;
            while bytes.next_if(|&b| name_byte(b) || b == b'.').is_some() {
                index += 1;
            }
            if index == 0 || bytes.next() != Some(b']') {
                return Err(bad("an [INDEX] is empty or not closed"));
            }
        }
        match bytes.next() {
            None => return Ok(()),
            Some(b'.') => {}
            Some(_) => {
                return Err(bad(
                    "unexpected character (segments are NAME or NAME[INDEX])",
                ))
            }
        }
    }
}

fn bad_value(value: &str, why: impl Into<String>) -> InjectError {
    InjectError::BadValue {
        value: value.to_owned(),
        why: why.into(),
    }
}

/// `42`, `0x2a`, `0b101010`, with `_` between digits.
fn parse_number(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if let Some(b) = s.strip_prefix("0b") {
        (b, 2)
    } else {
        (s, 10)
    };
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || digits.starts_with('_') || !clean.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(&clean, radix).ok()
}

/// `+N` / `-N` at the end of `s` (the last `+` or `-` followed by a number), if any.
fn split_offset(s: &str) -> (&str, Offset) {
    if let Some(i) = s.rfind(['+', '-']) {
        let (base, rest) = s.split_at(i);
        if let Some(by) = rest.get(1..).and_then(parse_number) {
            return (
                base,
                Offset {
                    negative: rest.starts_with('-'),
                    by,
                },
            );
        }
    }
    (s, Offset::ZERO)
}

fn parse_value(v: &str) -> Result<ValueSpec, InjectError> {
    if v.is_empty() {
        return Err(bad_value(v, "empty"));
    }
    if let Some(rest) = v.strip_prefix('@') {
        let (path, offset) = split_offset(rest);
        check_path(path)?;
        return Ok(ValueSpec::Address {
            path: path.to_owned(),
            offset,
        });
    }
    if let Some(rest) = v.strip_prefix('$') {
        let (path, offset) = split_offset(rest);
        check_path(path)?;
        return Ok(ValueSpec::Copy {
            path: path.to_owned(),
            offset,
        });
    }
    if let Some(rest) = v.strip_prefix("self") {
        let (base, offset) = split_offset(rest);
        if !base.is_empty() {
            return Err(bad_value(v, "expected self, self+N or self-N"));
        }
        return Ok(ValueSpec::SelfAddress(offset));
    }
    if let Some(hex) = v.strip_prefix("bytes:") {
        return parse_hex(hex)
            .map(ValueSpec::Bytes)
            .map_err(|why| bad_value(v, why));
    }
    if v.starts_with('"') || v.starts_with('\'') {
        return parse_quoted(v)
            .map(ValueSpec::Bytes)
            .map_err(|why| bad_value(v, why));
    }
    if let Some(n) = v.strip_prefix('+').or_else(|| v.strip_prefix('-')) {
        let by = parse_number(n).ok_or_else(|| bad_value(v, "expected +N or -N, N a number"))?;
        return Ok(ValueSpec::Relative(Offset {
            negative: v.starts_with('-'),
            by,
        }));
    }
    parse_number(v).map(ValueSpec::Absolute).ok_or_else(|| {
        bad_value(
            v,
            "expected a number (42, 0x2a), +N, -N, @PATH, $PATH, self, bytes:HEX or a quoted string",
        )
    })
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !matches!(b, b' ' | b':' | b',' | b'\t'))
        .collect();
    if digits.len() % 2 != 0 {
        return Err("an odd number of hex digits".into());
    }
    digits
        .chunks_exact(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{:?} is not a hex byte", String::from_utf8_lossy(p)))
        })
        .collect()
}

fn parse_quoted(s: &str) -> Result<Vec<u8>, String> {
    let quote = s.chars().next().unwrap_or('"');
    let inner = s
        .get(1..)
        .and_then(|r| r.strip_suffix(quote))
        .ok_or("an unterminated string")?;
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == quote {
            return Err(format!("an unescaped {quote} inside the string"));
        }
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('\\') => out.push(b'\\'),
            Some('"') => out.push(b'"'),
            Some('\'') => out.push(b'\''),
            Some('n') => out.push(b'\n'),
            Some('0') => out.push(0),
            Some('x') => {
                let h: String = chars.by_ref().take(2).collect();
                let b = u8::from_str_radix(&h, 16)
                    .ok()
                    .filter(|_| h.len() == 2)
                    .ok_or_else(|| format!("\\x{h} is not \\xNN"))?;
                out.push(b);
            }
            other => {
                return Err(format!(
                    "unknown escape \\{}",
                    other.map_or(String::new(), String::from)
                ))
            }
        }
    }
    Ok(out)
}

/// A path with every `[index]` emptied: `luo.session[].file[].compatible`.
fn shape(path: &str) -> (String, Vec<&str>) {
    let mut shape = String::with_capacity(path.len());
    let mut indices = Vec::new();
    let mut rest = path;
    while let Some(open) = rest.find('[') {
        shape.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let close = after.find(']').unwrap_or(after.len());
        indices.push(&after[..close]);
        rest = &after[close..];
    }
    shape.push_str(rest);
    (shape, indices)
}

/// Levenshtein distance of `a` and `b`, or `None` if more than `max`.
fn distance(a: &str, b: &str, max: usize) -> Option<usize> {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        if cur.iter().min().is_some_and(|&m| m > max) {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev.last().copied().filter(|&d| d <= max)
}

/// Paths of `fields` that look like `path`: of the nearest shapes (the path with indices
/// emptied, by edit distance), the path that shares most indices with `path`.
fn suggest(fields: &FieldList, path: &str) -> Vec<String> {
    let (want, want_idx) = shape(path);
    let max = (want.len() / 3).max(3);
    // Each shape's distance, computed once: its entry in `near`, if near enough.
    let mut shapes: HashMap<String, Option<usize>> = HashMap::new();
    // (distance, best path, indices it shares with `path`), in first-seen order.
    let mut near: Vec<(usize, &str, usize)> = Vec::new();
    for p in fields.paths() {
        let (sh, idx) = shape(p);
        let shared = idx.iter().zip(&want_idx).filter(|(a, b)| a == b).count();
        let slot = match shapes.get(&sh) {
            Some(&slot) => slot,
            None if shapes.len() >= MAX_SHAPES => continue,
            None => {
                let slot = distance(&sh, &want, max).map(|d| {
                    near.push((d, p, shared));
                    near.len() - 1
                });
                shapes.insert(sh, slot);
                slot
            }
        };
        if let Some(e) = slot.and_then(|i| near.get_mut(i)) {
            if shared > e.2 {
                (e.1, e.2) = (p, shared);
            }
        }
    }
    near.sort_by_key(|e| (e.0, usize::MAX - e.2));
    let nearest = near.first().map_or(0, |e| e.0);
    near.into_iter()
        .take_while(|e| e.0 == nearest)
        .take(MAX_SUGGESTIONS)
        .map(|e| e.1.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::tests::fixture;
    use crate::fixture::{read_field, WriteMem};
    use crate::luo::LuoError;
    use crate::mem::SparseMemory;
    use crate::{Handover, HandoverError};

    fn parse(s: &str) -> InjectSpec {
        InjectSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn value(s: &str) -> ValueSpec {
        parse(&format!("luo.liveupdate_num={s}")).assignments[0]
            .value
            .clone()
    }

    fn writes(list: &FieldList, s: &str) -> Result<Vec<Write>, InjectError> {
        parse(s).resolve(list)
    }

    fn apply(mem: &mut SparseMemory, w: &[Write]) {
        for w in w {
            mem.put(w.gpa, &w.bytes).unwrap();
        }
    }

    #[test]
    fn value_forms() {
        let off = |negative, by| Offset { negative, by };
        assert_eq!(value("42"), ValueSpec::Absolute(42));
        assert_eq!(value("0x1_234"), ValueSpec::Absolute(0x1234));
        assert_eq!(value("0b101"), ValueSpec::Absolute(5));
        assert_eq!(value("+1"), ValueSpec::Relative(off(false, 1)));
        assert_eq!(value("-0x8"), ValueSpec::Relative(off(true, 8)));
        assert_eq!(value("self"), ValueSpec::SelfAddress(Offset::ZERO));
        assert_eq!(value("self+16"), ValueSpec::SelfAddress(off(false, 16)));
        assert_eq!(
            value("@luo.session[2]"),
            ValueSpec::Address {
                path: "luo.session[2]".into(),
                offset: Offset::ZERO
            }
        );
        // A name with '-' is part of the path unless a number follows.
        assert_eq!(
            value("@kho.fdt.node[kexec-metadata].blob-size-8"),
            ValueSpec::Address {
                path: "kho.fdt.node[kexec-metadata].blob-size".into(),
                offset: off(true, 8)
            }
        );
        assert_eq!(
            value("@kho.fdt.preserved-memory-map"),
            ValueSpec::Address {
                path: "kho.fdt.preserved-memory-map".into(),
                offset: Offset::ZERO
            }
        );
        assert_eq!(
            value("bytes:de ad:be,ef"),
            ValueSpec::Bytes(vec![0xde, 0xad, 0xbe, 0xef])
        );
        assert_eq!(value("bytes:"), ValueSpec::Bytes(vec![]));
        assert_eq!(
            value("$memfd[s1.f0].folio[0].pfn+1"),
            ValueSpec::Copy {
                path: "memfd[s1.f0].folio[0].pfn".into(),
                offset: off(false, 1)
            }
        );
        assert_eq!(
            value(r#""memfd-v3\x01\0""#),
            ValueSpec::Bytes(b"memfd-v3\x01\0".to_vec())
        );
        assert_eq!(value("'a\"b'"), ValueSpec::Bytes(b"a\"b".to_vec()));
        // Short names, and the original fault.
        assert_eq!(
            parse("compatible=\"x\"").assignments[0].path,
            "luo.session[0].file[0].compatible"
        );
        let c = parse("corrupt-kho-fdt");
        assert!(c.is_corrupt_kho_fdt());
        assert_eq!(c.assignments.len(), 2);
        assert!(ALIASES.iter().all(|(_, p)| check_path(p).is_ok()));
    }

    #[test]
    fn bad_syntax_is_refused_before_any_guest() {
        let err = |s: &str| InjectSpec::parse(s).unwrap_err().to_string();
        assert!(err("luo.session[0].name").contains("expected PATH=VALUE"));
        assert!(err("corrupt-kho").contains("expected PATH=VALUE"));
        assert!(err("=1").contains("bad path"));
        assert!(err("luo..x=1").contains("bad path"));
        assert!(err("luo.session[0=1").contains("not closed"));
        assert!(err("luo.session[]=1").contains("not closed"));
        assert!(err("luo session=1").contains("unexpected character"));
        assert!(err("luo.x=").contains("empty"));
        assert!(err("luo.x=12z").contains("expected a number"));
        assert!(err("luo.x=+").contains("+N or -N"));
        assert!(err("luo.x=0x1_0000_0000_0000_0000").contains("expected a number"));
        assert!(err("luo.x=bytes:abc").contains("odd number"));
        assert!(err("luo.x=bytes:zz").contains("not a hex byte"));
        assert!(err("luo.x=\"abc").contains("unterminated"));
        assert!(err("luo.x=\"a\"b\"").contains("unescaped"));
        assert!(err("luo.x=\"\\q\"").contains("unknown escape"));
        assert!(err("luo.x=selfish").contains("self+N"));
        assert!(err("luo.x=@a..b").contains("bad path"));
        assert!(err(&"x".repeat(MAX_SPEC_LEN + 1)).contains("longer than"));
        // A misspelt short name is refused here, not after a boot.
        assert!(err("nosuch=1").contains("is not a short name (fdt-magic"));
        assert!(err("corrupt-kho-fdt=1").contains("takes no =VALUE"));
        assert!(InjectSpec::parse("token=+1").is_ok());
    }

    #[test]
    fn corrupt_kho_fdt_writes_what_it_always_wrote() {
        let (_, fx, _, list) = fixture();
        let w = resolve(&list, &[parse("corrupt-kho-fdt")]).unwrap();
        let bytes: Vec<u8> = w.iter().flat_map(|w| w.bytes.clone()).collect();
        assert_eq!(w[0].gpa, fx.kho.fdt_addr);
        assert_eq!(w[1].gpa, fx.kho.fdt_addr + 4);
        assert_eq!(bytes, [0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn writes_land_in_the_field_and_the_parser_sees_them() {
        let (mut mem, fx, _, list) = fixture();
        let check = |mem: &SparseMemory, w: &[Write]| {
            for w in w {
                let f = list.field(&w.path).unwrap();
                assert_eq!(read_field(mem, f).unwrap(), w.new, "{}", w.path);
            }
        };
        // Numbers, relative, addresses, strings.
        let specs: Vec<InjectSpec> = [
            "luo.session[0].file[0].token=0x99",
            "luo.liveupdate_num=-2",
            "memfd[s1.f0].seals=+0x10",
            "kho.fdt.header.version=+1",
            "memfd[s0.f0].folio[3].pfn=@memfd[s1.f0].folio[0]",
            "memfd[s0.f0].folio[4].flags=0xfff",
            "luo.session[1].name='renamed'",
            "luo.flb[0].data=self-8",
            "memfd[s0.f0].folios.order=bytes:01",
        ]
        .into_iter()
        .map(parse)
        .collect();
        let w = resolve(&list, &specs).unwrap();
        apply(&mut mem, &w);
        check(&mem, &w);
        assert_eq!(w[1].new, Value::Int(u64::MAX), "1 - 2 wraps in 64 bits");
        assert_eq!(w[2].new, Value::Int(0x10));
        assert_eq!(w[3].bytes, 18u32.to_be_bytes());
        let pfn_target = list.address("memfd[s1.f0].folio[0]").unwrap();
        assert_eq!(w[4].new, Value::Int(pfn_target));
        assert_eq!(
            w[4].bytes,
            (pfn_target | 3 << 52).to_le_bytes(),
            "flags kept"
        );
        assert_eq!(
            w[5].bytes,
            ((0x2004u64) | 0xfff << 52).to_le_bytes(),
            "pfn kept"
        );
        assert_eq!(w[6].bytes.len(), 64);
        assert_eq!(
            w[7].new,
            Value::Int(list.field("luo.flb[0].data").unwrap().gpa - 8)
        );
        assert_eq!(w[8].new, Value::Int(1));
        let h = Handover::read(&mem, fx.zero_page);
        let h = h.map(|h| h.luo.unwrap()).map_err(|e| e.to_string());
        assert!(h.is_err(), "order 1 no longer fits: {h:?}");
    }

    #[test]
    fn a_folio_of_another_session_is_a_page_reached_twice() {
        let (mut mem, fx, _, list) = fixture();
        let w = writes(
            &list,
            "memfd[s0.f0].folio[3].pfn=$memfd[s1.f0].folio[0].pfn",
        )
        .unwrap();
        assert_eq!(w[0].new, Value::Int(0x3000));
        apply(&mut mem, &w);
        assert_eq!(
            Handover::read(&mem, fx.zero_page),
            Err(HandoverError::Luo(LuoError::PageReachedTwice {
                page: 0x3000 << 12,
                first: "memfd folio",
                second: "memfd folio"
            }))
        );
        assert!(writes(&list, "token=$luo.session[0].name")
            .unwrap_err()
            .to_string()
            .contains("copies integer fields"));
        assert!(writes(&list, "token=$luo.sesion[0].count")
            .unwrap_err()
            .to_string()
            .contains("did you mean luo.session[0].count"));
    }

    #[test]
    fn a_block_pointing_at_itself_is_a_cycle() {
        let (mut mem, fx, _, list) = fixture();
        let w = writes(&list, "block-next=self").unwrap();
        assert_eq!(w[0].path, "luo.session[0].file_block[0].next");
        assert_eq!(w[0].new, Value::Int(w[0].gpa));
        apply(&mut mem, &w);
        assert!(matches!(
            Handover::read(&mem, fx.zero_page),
            Err(HandoverError::Luo(LuoError::Cycle {
                what: "file block",
                ..
            }))
        ));
    }

    #[test]
    fn a_longer_folio_count_and_a_wrong_compatible_are_seen_by_the_parser() {
        // One more folio still fits in the array's two pages: read as a hole.
        let (mut mem, fx, _, list) = fixture();
        apply(&mut mem, &writes(&list, "folio-count=+1").unwrap());
        let luo = Handover::read(&mem, fx.zero_page).unwrap().luo.unwrap();
        let m = luo.sessions[0].files[0].memfd.clone().unwrap();
        assert_eq!((m.folios.len(), m.folios[300].pfn), (301, 0));
        // More than the array holds.
        let (mut mem, fx, _, list) = fixture();
        apply(&mut mem, &writes(&list, "folio-count=513").unwrap());
        assert!(matches!(
            Handover::read(&mem, fx.zero_page),
            Err(HandoverError::Luo(LuoError::Memfd { .. }))
        ));
        let (mut mem, fx, _, list) = fixture();
        apply(&mut mem, &writes(&list, "compatible=\"memfd-v3\"").unwrap());
        let luo = Handover::read(&mem, fx.zero_page).unwrap().luo.unwrap();
        assert_eq!(luo.unknown_compatibles[0].compatible, "memfd-v3");
        assert!(luo.sessions[0].files[0].memfd.is_none());
    }

    #[test]
    fn bad_targets_are_clear_errors() {
        let (_, _, _, list) = fixture();
        let err = |s: &str| writes(&list, s).unwrap_err().to_string();
        assert_eq!(
            err("luo.sesion[1].name=\"x\""),
            "no field luo.sesion[1].name in this handover; did you mean luo.session[1].name?"
        );
        assert!(
            err("luo.session[7].name=\"x\"").contains("did you mean luo.session["),
            "{}",
            err("luo.session[7].name=\"x\"")
        );
        assert!(err("memfd[s0.f0].folio[3].pnf=1").contains("memfd[s0.f0].folio[3].pfn"));
        assert!(err("no.such.thing=1").starts_with("no field no.such.thing"));
        assert!(err("token=@luo.sesion[1]").contains("did you mean luo.session[1]"));
        assert_eq!(
            err("memfd[s0.f0].folio[0].pfn=0x10000000000000"),
            "memfd[s0.f0].folio[0].pfn: 0x10000000000000 does not fit in its 52 bits"
        );
        assert!(err("memfd[s0.f0].seals=0x1_0000_0000").contains("32 bits"));
        assert!(err("luo.liveupdate_num=@luo-4000000000").contains("does not fit"));
        assert!(err("session-name=1").contains("not a number"));
        assert!(err("session-name=+1").contains("no +N/-N"));
        assert!(err("folio-pfn=bytes:01").contains("takes a number"));
        assert_eq!(
            err(&format!("compatible=\"{}\"", "x".repeat(49))),
            "luo.session[0].file[0].compatible: 49 bytes do not fit in its 48"
        );
        // 48 bytes (no NUL) fit.
        assert!(writes(&list, &format!("compatible=\"{}\"", "x".repeat(48))).is_ok());
        // One bad spec among good ones: nothing is resolved.
        let specs = [parse("token=1"), parse("luo.nope=1")];
        assert!(resolve(&list, &specs).is_err());
    }

    #[test]
    fn suggestions_are_bounded() {
        assert_eq!(distance("kitten", "sitting", 3), Some(3));
        assert_eq!(distance("kitten", "sitting", 2), None);
        assert_eq!(distance("", "abcd", 3), None);
        assert_eq!(
            shape("memfd[s0.f1].folio[3].pfn"),
            ("memfd[].folio[].pfn".into(), vec!["s0.f1", "3"])
        );
        assert!(suggest(&FieldList::default(), "x").is_empty());
    }
}
