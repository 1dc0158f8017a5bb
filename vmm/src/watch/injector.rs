//! `--inject` at next-kernel-start: list every field of the handover luo-vmm just parsed
//! ([`FieldList::of`]), resolve the `PATH=VALUE` specs against them
//! ([`luo_handover::inject`]), and write the result into guest memory before the next kernel
//! reads it. All specs resolve or none is written; what was written, or why nothing was,
//! goes into the round's report. Without specs nothing is listed here (the report lists the
//! fields after the run), so the hook costs nothing more.

use luo_handover::fields::{FieldList, Value};
use luo_handover::inject::{InjectError, InjectSpec, Write};
use luo_handover::Handover;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Why nothing (or not everything) was injected.
#[derive(Debug, Error)]
pub enum InjectApplyError {
    /// A spec names no field of this handover, or a value that does not fit.
    #[error("nothing injected: {0}")]
    Resolve(#[from] InjectError),
    /// The KHO state could not be parsed, so no field has an address.
    #[error("nothing injected: the KHO state could not be read")]
    NoState,
    /// A write into guest memory failed (the writes before it were made).
    #[error("{path} at {gpa:#x}: cannot write guest memory: {source}")]
    Write {
        /// The field.
        path: String,
        /// Its address.
        gpa: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// One write made by `--inject`, as the JSON report lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedWrite {
    /// The `--inject` argument it came from.
    pub spec: String,
    /// The field.
    pub path: String,
    /// Guest-physical address of the first byte written.
    pub gpa: u64,
    /// The bytes written, in hex.
    pub bytes: String,
    /// The field's value before.
    pub old: Value,
    /// Its value after.
    pub new: Value,
}

/// What `--inject` did in one round.
#[derive(Debug, Default)]
pub struct Injection {
    /// The writes made.
    pub writes: Vec<InjectedWrite>,
    /// One line for the text report (`injected: ...`), if anything was written.
    pub summary: Option<String>,
    /// Why nothing was written.
    pub error: Option<InjectApplyError>,
}

/// `specs` applied to `memory`, whose handover parsed as `handover` (or did not: `None`).
pub(crate) fn at_next_kernel_start(
    memory: &GuestMemoryMmap,
    handover: Option<&Handover>,
    specs: &[InjectSpec],
) -> Injection {
    if specs.is_empty() {
        return Injection::default();
    }
    let Some(h) = handover else {
        return Injection {
            error: Some(InjectApplyError::NoState),
            ..Injection::default()
        };
    };
    let list = FieldList::of(h);
    let mut out = Injection::default();
    match resolve_each(&list, specs) {
        Ok(planned) => {
            let mut lines = Vec::new();
            for (spec, writes) in planned {
                if let Err(e) = write_all(memory, &writes) {
                    out.error = Some(e);
                    break;
                }
                lines.push(describe(spec, &writes));
                out.writes.extend(writes.into_iter().map(|w| InjectedWrite {
                    spec: spec.given.clone(),
                    path: w.path,
                    gpa: w.gpa,
                    bytes: w.bytes.iter().map(|b| format!("{b:02x}")).collect(),
                    old: w.old,
                    new: w.new,
                }));
            }
            out.summary = (!lines.is_empty()).then(|| lines.join("; "));
        }
        Err(e) => out.error = Some(e.into()),
    }
    out
}

/// Every spec's writes, all resolved before any is made.
fn resolve_each<'s>(
    list: &FieldList,
    specs: &'s [InjectSpec],
) -> Result<Vec<(&'s InjectSpec, Vec<Write>)>, InjectError> {
    specs.iter().map(|s| Ok((s, s.resolve(list)?))).collect()
}

fn write_all(memory: &GuestMemoryMmap, writes: &[Write]) -> Result<(), InjectApplyError> {
    for w in writes {
        memory
            .write_slice(&w.bytes, GuestAddress(w.gpa))
            .map_err(|source| InjectApplyError::Write {
                path: w.path.clone(),
                gpa: w.gpa,
                source,
            })?;
    }
    Ok(())
}

/// The text report's words for one spec's writes: for `corrupt-kho-fdt` the line it has
/// always had, else `PATH at GPA: OLD -> NEW` per field.
fn describe(spec: &InjectSpec, writes: &[Write]) -> String {
    if spec.is_corrupt_kho_fdt() {
        let at = writes.first().map_or(0, |w| w.gpa);
        let bytes: Vec<u8> = writes
            .iter()
            .flat_map(|w| w.bytes.iter().copied())
            .collect();
        return format!("overwrote the KHO FDT header at {at:#x} with {bytes:02x?}");
    }
    writes
        .iter()
        .map(|w| format!("{} at {:#x}: {} -> {}", w.path, w.gpa, w.old, w.new))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use luo_handover::fields::Field;
    use luo_handover::mem::SparseMemory;
    use vm_memory::GuestMemoryMmap;

    /// The handover captured from a real guest (`handover/tests/fixtures`), parsed, and an
    /// empty guest memory of its size to inject into.
    pub(crate) fn captured() -> (Handover, GuestMemoryMmap) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../handover/tests/fixtures/linux-7.2.13-memfd-1MiB");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
        let num = |k: &str| meta[k].as_u64().unwrap();
        let pages = std::fs::read(dir.join("pages.bin")).unwrap();
        let mem = SparseMemory::from_page_dump(0, num("guest_size"), &pages).unwrap();
        let h = Handover::read(&mem, num("zero_page_gpa")).unwrap();
        let size = usize::try_from(num("guest_size")).unwrap();
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        (h, ram)
    }

    fn specs(s: &[&str]) -> Vec<InjectSpec> {
        s.iter().map(|s| InjectSpec::parse(s).unwrap()).collect()
    }

    #[test]
    fn writes_land_in_guest_memory_or_none_does() {
        let (h, ram) = captured();
        let i = at_next_kernel_start(&ram, Some(&h), &specs(&["block-next=self", "token=7"]));
        assert!(i.error.is_none(), "{:?}", i.error);
        assert_eq!(i.writes.len(), 2);
        let next = &i.writes[0];
        assert_eq!(next.path, "luo.session[0].file_block[0].next");
        assert_eq!(
            ram.read_obj::<u64>(GuestAddress(next.gpa)).unwrap(),
            next.gpa
        );
        assert_eq!(next.bytes, format!("{:016x}", next.gpa.swap_bytes()));
        assert_eq!(
            i.summary.as_deref(),
            Some(
                "luo.session[0].file_block[0].next at 0x276000: 0x0 -> 0x276000; \
                 luo.session[0].file[0].token at 0x276048: 0x0 -> 0x7"
            )
        );
        // One unknown path: nothing written, and the error says what exists.
        let (h, ram) = captured();
        let i = at_next_kernel_start(&ram, Some(&h), &specs(&["token=7", "luo.sesion[0].name=1"]));
        assert!(i.writes.is_empty() && i.summary.is_none());
        let e = i.error.unwrap().to_string();
        assert!(e.contains("did you mean luo.session[0].name"), "{e}");
        assert_eq!(ram.read_obj::<u64>(GuestAddress(0x276048)).unwrap(), 0);
        // No state, no injection; no spec, nothing at all.
        let i = at_next_kernel_start(&ram, None, &specs(&["token=7"]));
        assert!(matches!(i.error, Some(InjectApplyError::NoState)));
        let i = at_next_kernel_start(&ram, Some(&h), &[]);
        assert!(i.error.is_none() && i.writes.is_empty());
    }

    fn field(path: &str, gpa: u64, value: u64) -> Field {
        Field {
            path: path.into(),
            gpa,
            width: 4,
            layout: luo_handover::fields::Layout::Be,
            value: Value::Int(value),
        }
    }

    #[test]
    fn corrupt_kho_fdt_keeps_its_line_and_others_say_what_changed() {
        let list = FieldList {
            fields: vec![
                field("kho.fdt.header.magic", 0x221000, 0xd00d_feed),
                field("kho.fdt.header.totalsize", 0x221004, 0x11d),
            ],
            records: vec![],
        };
        let spec = InjectSpec::parse("corrupt-kho-fdt").unwrap();
        let w = spec.resolve(&list).unwrap();
        assert_eq!(
            describe(&spec, &w),
            "overwrote the KHO FDT header at 0x221000 with [de, ad, be, ef, ff, ff, ff, ff]"
        );
        let spec = InjectSpec::parse("fdt-totalsize=+1").unwrap();
        let w = spec.resolve(&list).unwrap();
        assert_eq!(
            describe(&spec, &w),
            "kho.fdt.header.totalsize at 0x221004: 0x11d -> 0x11e"
        );
        let bad = [spec, InjectSpec::parse("luo.nope=1").unwrap()];
        assert!(resolve_each(&list, &bad).is_err());
    }
}
