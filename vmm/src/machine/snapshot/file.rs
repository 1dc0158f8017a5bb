//! A snapshot on disk: one directory of three files, written into a temporary sibling and
//! renamed into place (a reader never sees half of one).
//!
//! - `header.json`: the format and its version, the identity of what the snapshot runs
//!   on ([`Identity`]: luo-vmm's version, the guest image's cache key, memory size, vCPU
//!   count, a digest of KVM's CPUID), and the length and XXH3-128 of the two others;
//! - `state.json`: every vCPU, the VM, the devices, which guest pages `memory.bin` holds,
//!   and the caller's record of the run so far (opaque here);
//! - `memory.bin`: the bytes of every guest page that was not all zero, in order (zero
//!   pages are not written: the file is as large as the RAM the guest used).
//!
//! Reading checks, before anything is built from it, in this order: the header parses and
//! is this format and version; the identity is the one expected; both files have the
//! lengths and digests the header gives; the state parses; the page layout fits this VM.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use super::memory::{MemoryImage, RegionLayout};
use super::state::{VcpuState, VmState};
use super::{DeviceState, MachineSnapshot};

/// The format's name in `header.json`.
pub const FORMAT: &str = "luo-vmm snapshot";
/// The format's version: bumped by any change a reader of the old one would misread.
pub const VERSION: u32 = 1;
const HEADER: &str = "header.json";
const STATE: &str = "state.json";
const MEMORY: &str = "memory.bin";
/// Largest `header.json` read.
const MAX_HEADER: u64 = 64 << 10;
/// Largest `state.json` read (vCPU states are ~30 KiB each; the page list and the run's
/// record take the rest).
const MAX_STATE: u64 = 256 << 20;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum FileError {
    /// A file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a snapshot of this format or version.
    #[error("snapshot {dir}: {why}")]
    Format {
        /// The directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
    /// A snapshot of something else than this run.
    #[error("snapshot {dir} {why}")]
    Mismatch {
        /// The directory.
        dir: PathBuf,
        /// What differs, both values.
        why: String,
    },
    /// A file whose length or digest is not the header's, or whose content is invalid.
    #[error("snapshot {dir}: {file} is corrupt: {why}")]
    Corrupt {
        /// The directory.
        dir: PathBuf,
        /// Which file.
        file: &'static str,
        /// How.
        why: String,
    },
}

/// What a snapshot runs on; a snapshot is used only where all of it is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// luo-vmm's version.
    pub luo_vmm: String,
    /// The guest image: its cache key, or the kernel and initramfs paths given.
    pub image: String,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// XXH3-64 of KVM's supported CPUID table, hex: the same host CPU and KVM.
    pub cpuid: String,
    /// XXH3-64 of the full kernel command line, hex: the same workload (a scenario's
    /// steps travel on it) and options.
    pub cmdline: String,
}

impl Identity {
    /// The first difference between `self` (the snapshot's) and `want` (this run's), as
    /// "was taken with X; this run has Y", or `None`.
    pub fn mismatch(&self, want: &Identity) -> Option<String> {
        let differ = |what: &str, have: String, want: String| {
            Some(format!(
                "was taken with {what} {have}; this run has {what} {want}"
            ))
        };
        if self.luo_vmm != want.luo_vmm {
            return differ("luo-vmm", self.luo_vmm.clone(), want.luo_vmm.clone());
        }
        if self.image != want.image {
            return differ("the guest image", self.image.clone(), want.image.clone());
        }
        if self.mem != want.mem {
            return differ(
                "--mem",
                format!("{} MiB", self.mem >> 20),
                format!("{} MiB", want.mem >> 20),
            );
        }
        if self.vcpus != want.vcpus {
            return differ("--vcpus", self.vcpus.to_string(), want.vcpus.to_string());
        }
        if self.cmdline != want.cmdline {
            return Some(format!(
                "was taken with another kernel command line (digest {}; this run's is {}): \
                 another scenario or workload",
                self.cmdline, want.cmdline
            ));
        }
        if self.cpuid != want.cpuid {
            return Some(format!(
                "was taken on another host CPU or KVM (CPUID digest {}; this host's is {})",
                self.cpuid, want.cpuid
            ));
        }
        None
    }
}

/// Length and XXH3-128 of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Part {
    bytes: u64,
    xxh3: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    identity: Identity,
    state: Part,
    memory: Part,
}

/// `state.json`, as written (borrowing the snapshot).
#[derive(Serialize)]
struct StateOut<'a> {
    vcpus: &'a [VcpuState],
    vm: &'a VmState,
    devices: &'a DeviceState,
    memory: &'a [RegionLayout],
    run: serde_json::Value,
}

/// `state.json`, as read.
#[derive(Deserialize)]
struct StateFile {
    vcpus: Vec<VcpuState>,
    vm: VmState,
    devices: DeviceState,
    memory: Vec<RegionLayout>,
    run: serde_json::Value,
}

fn digest(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// Whether `dir` holds a snapshot (its `header.json`): what [`write`] may replace.
pub fn is_snapshot(dir: &Path) -> bool {
    dir.join(HEADER).is_file()
}

/// Writes `snap`, with the caller's `run` record, as the snapshot directory `dir`. An
/// existing snapshot there is replaced; anything else there is refused. Returns the bytes
/// written.
pub fn write(
    dir: &Path,
    identity: &Identity,
    snap: &MachineSnapshot,
    run: serde_json::Value,
) -> Result<u64, FileError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| FileError::Io { path, source }
    };
    if dir.exists() && !is_snapshot(dir) {
        return Err(FileError::Format {
            dir: dir.to_owned(),
            why: "exists and is not a luo-vmm snapshot; not overwritten".into(),
        });
    }
    let state = StateOut {
        vcpus: &snap.vcpus,
        vm: &snap.vm,
        devices: &snap.devices,
        memory: &snap.memory.layout,
        run,
    };
    let state = serde_json::to_vec(&state).map_err(|e| io(dir)(std::io::Error::other(e)))?;
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        identity: identity.clone(),
        state: Part {
            bytes: state.len() as u64,
            xxh3: digest(&state),
        },
        memory: Part {
            bytes: snap.memory.data.len() as u64,
            xxh3: digest(&snap.memory.data),
        },
    };
    let header =
        serde_json::to_vec_pretty(&header).map_err(|e| io(dir)(std::io::Error::other(e)))?;
    let name = dir
        .file_name()
        .map_or("snapshot".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for (file, bytes) in [
        (MEMORY, &snap.memory.data[..]),
        (STATE, &state[..]),
        (HEADER, &header[..]),
    ] {
        let path = tmp.join(file);
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(bytes).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
    }
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io(dir))?;
    Ok((header.len() + state.len() + snap.memory.data.len()) as u64)
}

/// Reads the whole of `path` if it is at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, std::io::Error> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(std::io::Error::other(format!(
            "{len} bytes, more than the {max} a snapshot's file may have"
        )));
    }
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// Reads the snapshot directory `dir` and checks it whole against `want` (see the module's
/// documentation); `regions` are this VM's memory regions. Returns the snapshot and the
/// caller's run record.
pub fn read(
    dir: &Path,
    want: &Identity,
    regions: &[(u64, u64)],
) -> Result<(MachineSnapshot, serde_json::Value), FileError> {
    let format = |why: String| FileError::Format {
        dir: dir.to_owned(),
        why,
    };
    let corrupt = |file: &'static str, why: String| FileError::Corrupt {
        dir: dir.to_owned(),
        file,
        why,
    };
    if !dir.exists() {
        return Err(format("no such snapshot directory".into()));
    }
    if !dir.is_dir() {
        return Err(format("not a directory: a snapshot is a directory".into()));
    }
    let header_path = dir.join(HEADER);
    let header = read_bounded(&header_path, MAX_HEADER).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format(format!("no {HEADER}: not a luo-vmm snapshot")),
        _ => FileError::Io {
            path: header_path.clone(),
            source: e,
        },
    })?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| corrupt(HEADER, format!("not a snapshot header: {e}")))?;
    if header.format != FORMAT {
        return Err(format(format!(
            "format {:?}, not {FORMAT:?}",
            header.format
        )));
    }
    if header.version != VERSION {
        return Err(format(format!(
            "format version {}; this luo-vmm reads version {VERSION}",
            header.version
        )));
    }
    if let Some(why) = header.identity.mismatch(want) {
        return Err(FileError::Mismatch {
            dir: dir.to_owned(),
            why,
        });
    }
    let checked = |file: &'static str, part: &Part, max: u64| -> Result<Vec<u8>, FileError> {
        let path = dir.join(file);
        let len = fs::metadata(&path)
            .map_err(|source| FileError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if len != part.bytes {
            return Err(corrupt(
                file,
                format!(
                    "{len} bytes; its header says {} (truncated or extended)",
                    part.bytes
                ),
            ));
        }
        let bytes = read_bounded(&path, max).map_err(|source| FileError::Io { path, source })?;
        let mut h = Xxh3::new();
        h.update(&bytes);
        let got = format!("{:032x}", h.digest128());
        if got != part.xxh3 {
            return Err(corrupt(
                file,
                format!("XXH3-128 {got}; its header says {}", part.xxh3),
            ));
        }
        Ok(bytes)
    };
    let state = checked(STATE, &header.state, MAX_STATE)?;
    let max_memory = regions.iter().map(|(_, l)| l).sum::<u64>();
    let data = checked(MEMORY, &header.memory, max_memory)?;
    let state: StateFile =
        serde_json::from_slice(&state).map_err(|e| corrupt(STATE, e.to_string()))?;
    if state.vcpus.len() != usize::from(want.vcpus) {
        return Err(corrupt(
            STATE,
            format!("{} vCPU states for {} vCPUs", state.vcpus.len(), want.vcpus),
        ));
    }
    let memory = MemoryImage {
        layout: state.memory,
        data,
    };
    memory
        .check(regions)
        .map_err(|e| corrupt(STATE, e.to_string()))?;
    Ok((
        MachineSnapshot {
            vcpus: state.vcpus,
            vm: state.vm,
            devices: state.devices,
            memory,
        },
        state.run,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::machine::snapshot::memory::regions_of;
    use crate::machine::snapshot::UartState;

    fn identity() -> Identity {
        Identity {
            luo_vmm: "0.1.0".into(),
            image: "ref-abc".into(),
            mem: 2 << 20,
            vcpus: 0,
            cpuid: "00ff".into(),
            cmdline: "11".into(),
        }
    }

    /// A snapshot with no vCPUs (so no KVM is needed) and two kept pages.
    fn snapshot() -> (MachineSnapshot, GuestMemoryMmap) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        m.write_slice(&[7; 64], GuestAddress(0x5000)).unwrap();
        m.write_slice(&[8; 64], GuestAddress(0x9000)).unwrap();
        let snap = MachineSnapshot {
            vcpus: vec![],
            vm: VmState {
                irqchips: vec![],
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: DeviceState {
                uart: UartState {
                    registers: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    fifo: vec![],
                },
                probe_pending: vec![3, 1],
                gates_closed: 2,
            },
            memory: MemoryImage::capture(&m).unwrap(),
        };
        (snap, m)
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("luo-vmm-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let (snap, m) = snapshot();
        let dir = scratch("rt");
        write(&dir, &identity(), &snap, serde_json::json!({"k": 1})).unwrap();
        let (back, run) = read(&dir, &identity(), &regions_of(&m)).unwrap();
        assert_eq!(back.memory, snap.memory);
        assert_eq!(back.devices, snap.devices);
        assert_eq!(run["k"], 1);
        // Written again over itself: replaced, and no temporary left beside it.
        write(&dir, &identity(), &snap, serde_json::Value::Null).unwrap();
        let leftovers = fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .count();
        assert_eq!(leftovers, 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_snapshots_are_refused_with_what_is_wrong() {
        let (snap, m) = snapshot();
        let regions = regions_of(&m);
        let dir = scratch("bad");
        write(&dir, &identity(), &snap, serde_json::Value::Null).unwrap();
        let err = |want: &Identity| read(&dir, want, &regions).unwrap_err().to_string();

        let other_mem = Identity {
            mem: 4 << 20,
            ..identity()
        };
        let e = err(&other_mem);
        assert!(
            e.contains("was taken with --mem 2 MiB; this run has --mem 4 MiB"),
            "{e}"
        );
        let other_image = Identity {
            image: "variant-x".into(),
            ..identity()
        };
        assert!(err(&other_image).contains("the guest image ref-abc"));
        let other_version = Identity {
            luo_vmm: "9.9.9".into(),
            ..identity()
        };
        assert!(err(&other_version).contains("luo-vmm 0.1.0"));

        // One flipped byte in the memory file.
        let mem = dir.join(MEMORY);
        let mut bytes = fs::read(&mem).unwrap();
        bytes[100] ^= 1;
        fs::write(&mem, &bytes).unwrap();
        assert!(err(&identity()).contains("memory.bin is corrupt: XXH3-128"));
        // Truncated.
        bytes.truncate(4096);
        fs::write(&mem, &bytes).unwrap();
        assert!(err(&identity()).contains("truncated"));
        // Not a snapshot at all.
        fs::remove_file(dir.join(HEADER)).unwrap();
        assert!(err(&identity()).contains("not a luo-vmm snapshot"));
        fs::write(dir.join(HEADER), b"{").unwrap();
        assert!(err(&identity()).contains("header.json is corrupt"));
        fs::remove_dir_all(&dir).unwrap();
        assert!(err(&identity()).contains("no such snapshot directory"));
    }

    #[test]
    fn a_directory_that_is_not_a_snapshot_is_not_overwritten() {
        let (snap, _) = snapshot();
        let dir = scratch("other");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("precious"), b"x").unwrap();
        let e = write(&dir, &identity(), &snap, serde_json::Value::Null).unwrap_err();
        assert!(e.to_string().contains("not overwritten"));
        assert!(dir.join("precious").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
