//! The kernels of a cross-kernel run: kernel A (the one that boots) and kernel B (the one
//! the agent kexecs), each with its name (release and cache key), and the initramfs that
//! carries B's image into A's guest.
//!
//! B reaches the guest in its initramfs: luo-vmm appends a second newc cpio archive to A's
//! (the kernel unpacks concatenated archives in order, `init/initramfs.c`) holding the
//! cycle of next kernels as `/boot/next/0`, `/1` (`luo_protocol::kexec`); the agent kexecs
//! `/boot/next/(round % N)`, and hands the same retained initramfs to every next kernel.
//! The combined archive is cached in `~/.cache/luo-vmm/next-initramfs/`, keyed by its
//! inputs' paths, sizes and modification times (cached images never change in place).

use std::path::{Path, PathBuf};

use luo_protocol::kexec::{cycle_entry, MAX_CYCLE};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::image::{KernelPair, NextSpec};
use crate::run::image::{ensure_image, GuestImage, ImageError};

/// Errors of this module.
#[derive(Debug, Error)]
pub enum NextKernelError {
    /// Building or finding the next kernel's image.
    #[error("the next kernel: {0}")]
    Image(#[from] ImageError),
    /// A file of the combined initramfs could not be read or written.
    #[error("the cross-kernel initramfs: {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A cpio entry too large for the newc format (4 GiB).
    #[error("the cross-kernel initramfs: {0} is too large for a cpio archive")]
    TooLarge(String),
    /// More kernels in the cycle than the agent looks for.
    #[error("at most {MAX_CYCLE} kernels in a cycle")]
    TooManyKernels,
}

/// A kernel as the report names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelId {
    /// Its release (`uname -r`): `7.2.13`, `7.2.13-luo-control`.
    pub release: String,
    /// Its cache key (`~/.cache/luo-vmm/kernels/<key>`), or `file:<path>` for a user's
    /// kernel file.
    pub key: String,
}

impl KernelId {
    /// `7.2.13 (7.2.13-1-62b2...)`: how the text report names it.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.release, self.key)
    }
}

/// The id of a cached image's kernel: the image's release, and its kernel directory's name
/// (the image's `vmlinux` links into `kernels/<key>/`).
pub(crate) fn image_kernel_id(image: &GuestImage) -> KernelId {
    let key = std::fs::canonicalize(&image.vmlinux)
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("file:{}", image.vmlinux.display()));
    KernelId {
        release: image.kernel_version.clone(),
        key,
    }
}

/// The release a bzImage states in its setup header: `kernel_version` (offset 0x20e) is
/// the offset, minus 0x200, of a NUL-terminated string whose first word is the release
/// (`Documentation/arch/x86/boot.rst`). `None` when the header has none.
pub(crate) fn bzimage_release(image: &[u8]) -> Option<String> {
    let at = u16::from_le_bytes(image.get(0x20e..0x210)?.try_into().ok()?);
    if at == 0 {
        return None;
    }
    let text = image.get(usize::from(at) + 0x200..)?;
    let end = text.iter().take(256).position(|&b| b == 0)?;
    let s = std::str::from_utf8(&text[..end]).ok()?;
    s.split_whitespace().next().map(str::to_owned)
}

/// The id of a user's kernel file: the bzImage's own release, keyed by the vmlinux's path.
pub(crate) fn file_kernel_id(pair: &KernelPair) -> KernelId {
    let head = std::fs::read(&pair.bzimage).unwrap_or_default();
    KernelId {
        release: bzimage_release(&head).unwrap_or_else(|| "unknown".to_owned()),
        key: format!("file:{}", pair.vmlinux.display()),
    }
}

/// A kernel of the run: what the agent kexecs, what luo-vmm reads symbols from, its name.
#[derive(Debug, Clone)]
pub(crate) struct RunKernel {
    /// The ELF vmlinux (symbols).
    pub vmlinux: PathBuf,
    /// The bzImage the agent kexecs.
    pub bzimage: PathBuf,
    /// Its release and key.
    pub id: KernelId,
}

impl RunKernel {
    /// The kernel of a cached image.
    pub(crate) fn of_image(image: &GuestImage) -> Self {
        RunKernel {
            vmlinux: image.vmlinux.clone(),
            bzimage: image.dir.join("bzImage"),
            id: image_kernel_id(image),
        }
    }

    /// The kernel `spec` names, its image built on first use.
    pub(crate) fn resolve(spec: &NextSpec) -> Result<Self, NextKernelError> {
        Ok(match spec {
            NextSpec::Image(image) => {
                let built = ensure_image(image)?;
                eprintln!(
                    "luo-vmm: next kernel: {}: Linux {} ({})",
                    image.describe(),
                    built.kernel_version,
                    built.dir.display()
                );
                Self::of_image(&built)
            }
            NextSpec::File(pair) => RunKernel {
                vmlinux: pair.vmlinux.clone(),
                bzimage: pair.bzimage.clone(),
                id: file_kernel_id(pair),
            },
        })
    }
}

/// Which kernel runs after each handover: boot 0 is the first kernel, boot `k >= 1` is
/// `cycle[(k - 1) % cycle.len()]` (indices into the run's kernels). Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelSequence {
    /// Indices of the kernels the handovers go to, in order, repeated.
    pub cycle: Vec<usize>,
}

impl KernelSequence {
    /// A kernel that kexecs itself: kernel 0 throughout.
    pub(crate) fn same() -> Self {
        KernelSequence { cycle: vec![0] }
    }

    /// A→B→B→... (`alternate` false) or A→B→A→... (true), with A = 0 and B = 1.
    pub(crate) fn cross(alternate: bool) -> Self {
        KernelSequence {
            cycle: if alternate { vec![1, 0] } else { vec![1] },
        }
    }

    /// The kernel of boot `boot` (0: the first boot).
    pub(crate) fn kernel_at(&self, boot: usize) -> usize {
        match boot {
            0 => 0,
            k => self
                .cycle
                .get((k - 1) % self.cycle.len().max(1))
                .copied()
                .unwrap_or(0),
        }
    }

    /// `(outgoing, next)` of handover `round` (0-based).
    pub(crate) fn round(&self, round: usize) -> (usize, usize) {
        (self.kernel_at(round), self.kernel_at(round + 1))
    }
}

/// The kernels of a run and the way its handovers go through them.
#[derive(Debug, Clone)]
pub(crate) struct RunKernels {
    /// Index 0 boots; the others are kexec'd into.
    pub kernels: Vec<RunKernel>,
    /// Which kernel each handover goes from and to.
    pub sequence: KernelSequence,
}

impl RunKernels {
    /// The ids of the kernels, by index.
    pub(crate) fn ids(&self) -> Vec<KernelId> {
        self.kernels.iter().map(|k| k.id.clone()).collect()
    }

    /// The run of `first` (the guest's kernel: `vmlinux`, its image when it is a cached
    /// one) into `next` (`None`: into itself), alternating when asked. For a cross-kernel
    /// run, `initrd` (the guest's initramfs) becomes the one with the cycle appended
    /// ([`cross_initramfs`]). Builds the next kernel's image on first use.
    pub(crate) fn prepare(
        vmlinux: &Path,
        image: Option<&GuestImage>,
        initrd: &mut Option<PathBuf>,
        next: Option<&NextSpec>,
        alternate: bool,
    ) -> Result<Self, NextKernelError> {
        let first = match image {
            Some(image) => RunKernel::of_image(image),
            None => {
                // A user's kernel: its bzImage only matters when the run comes back to it.
                let pair = KernelPair::of(vmlinux).ok();
                RunKernel {
                    vmlinux: vmlinux.to_owned(),
                    bzimage: pair
                        .as_ref()
                        .map_or_else(|| vmlinux.to_owned(), |p| p.bzimage.clone()),
                    id: pair.as_ref().map_or_else(
                        || KernelId {
                            release: "unknown".into(),
                            key: format!("file:{}", vmlinux.display()),
                        },
                        file_kernel_id,
                    ),
                }
            }
        };
        let Some(next) = next else {
            return Ok(RunKernels {
                kernels: vec![first],
                sequence: KernelSequence::same(),
            });
        };
        let second = RunKernel::resolve(next)?;
        let sequence = KernelSequence::cross(alternate);
        let kernels = vec![first, second];
        if let Some(base) = initrd.as_ref() {
            let cycle: Vec<&Path> = sequence
                .cycle
                .iter()
                .filter_map(|&k| kernels.get(k).map(|k| k.bzimage.as_path()))
                .collect();
            *initrd = Some(cross_initramfs(base, &cycle, &cache_dir())?);
        }
        Ok(RunKernels { kernels, sequence })
    }
}

/// One file of a newc cpio archive.
pub(crate) struct CpioEntry<'a> {
    /// Path in the archive, without the leading `/`.
    pub name: String,
    /// `S_IFDIR | 0755` or `S_IFREG | 0644`.
    pub mode: u32,
    /// Contents (empty for a directory).
    pub data: &'a [u8],
}

/// An uncompressed newc cpio archive of `entries` and its trailer, as `usr/gen_init_cpio`
/// writes it (`Documentation/driver-api/early-userspace/buffer-format.rst`): a 110-byte
/// ASCII header per entry, the name with its NUL padded to 4 bytes, the data padded to 4.
/// Errors: an entry of 4 GiB or more.
pub(crate) fn newc_archive(entries: &[CpioEntry<'_>]) -> Result<Vec<u8>, NextKernelError> {
    let mut out = Vec::new();
    let pad = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(4), 0);
    let trailer = CpioEntry {
        name: "TRAILER!!!".into(),
        mode: 0,
        data: &[],
    };
    for (ino, e) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let size =
            u32::try_from(e.data.len()).map_err(|_| NextKernelError::TooLarge(e.name.clone()))?;
        let nlink = if e.mode & 0o040000 != 0 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let fields = [
            u32::try_from(ino).unwrap_or(0) + 0x4c55_0000,
            e.mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            0,
            0,
            u32::try_from(e.name.len() + 1)
                .map_err(|_| NextKernelError::TooLarge(e.name.clone()))?,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(e.data);
        pad(&mut out);
    }
    Ok(out)
}

/// FNV-1a 64 of `bytes`: a cache key, not a checksum.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The first kernel's initramfs with the cycle of `kernels` (their bzImages, in cycle
/// order) appended as `/boot/next/0..`: built once and cached in `cache_dir`; returns its
/// path. Errors: an unreadable input, an unwritable cache, more than [`MAX_CYCLE`] kernels.
pub(crate) fn cross_initramfs(
    base: &Path,
    kernels: &[&Path],
    cache_dir: &Path,
) -> Result<PathBuf, NextKernelError> {
    if kernels.len() > MAX_CYCLE {
        return Err(NextKernelError::TooManyKernels);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| NextKernelError::Io { path, source }
    };
    let mut key = String::from("luo-vmm cross-kernel initramfs v1\n");
    for p in std::iter::once(&base).chain(kernels) {
        let real = std::fs::canonicalize(p).map_err(io(p))?;
        let meta = std::fs::metadata(&real).map_err(io(p))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        key.push_str(&format!("{}\0{}\0{mtime}\n", real.display(), meta.len()));
    }
    let out = cache_dir.join(format!("{:016x}.cpio", fnv1a(key.as_bytes())));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let mut combined = std::fs::read(base).map_err(io(base))?;
    combined.resize(combined.len().next_multiple_of(4), 0);
    let images = kernels
        .iter()
        .map(|k| std::fs::read(k).map_err(io(k)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries = vec![
        CpioEntry {
            name: "boot".into(),
            mode: 0o040755,
            data: &[],
        },
        CpioEntry {
            name: cycle_entry(0)
                .trim_start_matches('/')
                .rsplit_once('/')
                .map_or(String::new(), |(d, _)| d.to_owned()),
            mode: 0o040755,
            data: &[],
        },
    ];
    for (i, image) in images.iter().enumerate() {
        entries.push(CpioEntry {
            name: cycle_entry(i).trim_start_matches('/').to_owned(),
            mode: 0o100644,
            data: image,
        });
    }
    combined.extend(newc_archive(&entries)?);
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &combined).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    Ok(out)
}

/// Where [`cross_initramfs`] caches: `${XDG_CACHE_HOME:-$HOME/.cache}/luo-vmm/next-initramfs`
/// (the build script's cache), else the system's temporary directory.
pub(crate) fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("luo-vmm").join("next-initramfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_go_to_b_and_back_when_asked() {
        let same = KernelSequence::same();
        assert_eq!((same.round(0), same.round(3)), ((0, 0), (0, 0)));
        let ab = KernelSequence::cross(false);
        assert_eq!(
            (0..3).map(|r| ab.round(r)).collect::<Vec<_>>(),
            [(0, 1), (1, 1), (1, 1)]
        );
        let aba = KernelSequence::cross(true);
        assert_eq!(
            (0..4).map(|r| aba.round(r)).collect::<Vec<_>>(),
            [(0, 1), (1, 0), (0, 1), (1, 0)]
        );
        let empty = KernelSequence { cycle: Vec::new() };
        assert_eq!(empty.round(2), (0, 0), "no cycle: no panic");
    }

    #[test]
    fn newc_archives_are_what_the_kernel_unpacks() {
        let a = newc_archive(&[
            CpioEntry {
                name: "boot".into(),
                mode: 0o040755,
                data: &[],
            },
            CpioEntry {
                name: "boot/next/0".into(),
                mode: 0o100644,
                data: b"abcde",
            },
        ])
        .unwrap();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        // Header 110 + "boot\0" (5) padded to 116, no data; then the file.
        let second = &a[116..];
        assert!(second.starts_with(b"070701"));
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        assert_eq!(field(second, 1), 0o100644);
        assert_eq!(field(second, 6), 5, "filesize");
        assert_eq!(field(second, 11), 12, "namesize with its NUL");
        // Name at 110..122, padded to 124; data at 124..129, padded to 132.
        assert_eq!(&second[110..122], b"boot/next/0\0");
        assert_eq!(&second[124..129], b"abcde");
        let trailer = &second[132..];
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(trailer.len(), 124);
    }

    #[test]
    fn a_bzimage_states_its_release() {
        let mut img = vec![0u8; 0x400];
        img[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        img[0x300..0x300 + 36].copy_from_slice(b"7.2.13-luo-control (root@h) #1 SMP\0\0");
        assert_eq!(bzimage_release(&img).as_deref(), Some("7.2.13-luo-control"));
        img[0x20e..0x210].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(bzimage_release(&img), None);
        img[0x20e..0x210].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(bzimage_release(&img), None, "out of the file");
        assert_eq!(bzimage_release(&[]), None);
    }

    #[test]
    fn the_cross_initramfs_appends_the_cycle_and_is_cached() {
        let dir = std::env::temp_dir().join(format!("luo-cross-initrd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.cpio");
        std::fs::write(&base, b"07070100").unwrap();
        let (b, a) = (dir.join("b"), dir.join("a"));
        std::fs::write(&b, b"kernel B").unwrap();
        std::fs::write(&a, b"kernel A").unwrap();
        let cache = dir.join("cache");
        let out = cross_initramfs(&base, &[&b, &a], &cache).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"07070100"));
        let text = String::from_utf8_lossy(&bytes);
        let (at_b, at_a) = (
            text.find("kernel B").unwrap(),
            text.find("kernel A").unwrap(),
        );
        assert!(text.find("boot/next/0").unwrap() < at_b && at_b < at_a);
        assert!(text.contains("boot/next/1") && text.ends_with("TRAILER!!!\0\0\0\0"));
        // Cached: the same inputs give the same file, another cycle another one.
        assert_eq!(cross_initramfs(&base, &[&b, &a], &cache).unwrap(), out);
        assert_ne!(cross_initramfs(&base, &[&b], &cache).unwrap(), out);
        let nine: Vec<&Path> = std::iter::repeat_n(b.as_path(), 9).collect();
        assert!(matches!(
            cross_initramfs(&base, &nine, &cache),
            Err(NextKernelError::TooManyKernels)
        ));
        let err = cross_initramfs(&dir.join("none"), &[&b], &cache).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
