//! Which guest image a command runs: the reference, one of its kernel variants
//! (guest-images/variants/NAME), or a kernel built from a developer's source tree. Checked
//! before anything is built or booted; building it is [`crate::run::image`]'s job.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// An image that cannot be asked for.
#[derive(Debug, Error)]
pub enum ImageSpecError {
    /// `--variant NAME` names no folder of guest-images/variants.
    #[error("no kernel variant {name:?} (known: {known}); see guest-images/variants/README.md")]
    UnknownVariant { name: String, known: String },
    /// `--source DIR` is not a kernel source tree.
    #[error("--source {}: {why}", path.display())]
    NotASourceTree { path: PathBuf, why: &'static str },
    /// `--next-variant NAME` names no folder of guest-images/variants.
    #[error("--next-variant: {0}")]
    NextVariant(Box<ImageSpecError>),
    /// `--next-source DIR` is not a kernel source tree.
    #[error("--next-source {}: {why}", path.display())]
    NextSource { path: PathBuf, why: &'static str },
    /// `--next-kernel FILE` is not a kernel luo-vmm can kexec and watch.
    #[error("--next-kernel {}: {why}", path.display())]
    NextKernel { path: PathBuf, why: String },
}

/// Which guest image: the reference, one of its kernel variants, or a kernel built from
/// a user's source tree (with a variant's config fragment, if one is named too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ImageSpec {
    /// A variant of guest-images/variants.
    pub variant: Option<String>,
    /// A kernel source tree, built out of tree (never written to).
    pub source: Option<PathBuf>,
}

impl ImageSpec {
    /// The build script's arguments for this image.
    pub(crate) fn script_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(v) = &self.variant {
            args.extend(["--variant".into(), v.into()]);
        }
        if let Some(s) = &self.source {
            args.extend(["--source".into(), s.into()]);
        }
        args
    }

    /// How luo-vmm names this guest in its messages: `reference guest`,
    /// `reference guest, variant V`, `guest from source tree DIR[, variant V]`.
    pub fn describe(&self) -> String {
        let base = match &self.source {
            Some(s) => format!("guest from source tree {}", s.display()),
            None => "reference guest".to_owned(),
        };
        match &self.variant {
            Some(v) => format!("{base}, variant {v}"),
            None => base,
        }
    }

    /// Checks the variant and the source tree, before anything is built.
    pub fn check(&self) -> Result<(), ImageSpecError> {
        if let Some(name) = &self.variant {
            check_variant(name)?;
        }
        if let Some(dir) = &self.source {
            if let Some(why) = source_tree_problem(dir) {
                return Err(ImageSpecError::NotASourceTree {
                    path: dir.clone(),
                    why,
                });
            }
        }
        Ok(())
    }
}

/// Why `dir` cannot be a kernel source tree for `--source`, or `None` when it can be: it
/// must be a directory with a top-level `Makefile` and `kernel/`. (Whether kbuild accepts
/// it for an out-of-tree build, and whether it has LUO, the build script checks.)
pub(crate) fn source_tree_problem(dir: &Path) -> Option<&'static str> {
    if !dir.exists() {
        Some("no such directory")
    } else if !dir.is_dir() {
        Some("not a directory")
    } else if !dir.join("Makefile").is_file() {
        Some("not a kernel source tree (no Makefile at its top)")
    } else if !dir.join("kernel").is_dir() {
        Some("not a kernel source tree (no kernel/ at its top)")
    } else {
        None
    }
}

/// What an image file is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelFileKind {
    /// An ELF file (`\x7fELF`): a vmlinux.
    Elf,
    /// An x86 bzImage: the boot protocol's `HdrS` magic at offset 0x202
    /// (`arch/x86/boot/header.S`, `Documentation/arch/x86/boot.rst`).
    BzImage,
}

/// Bytes of a file [`kernel_file_kind`] needs.
pub(crate) const KIND_PROBE_BYTES: usize = 0x206;

/// What `head` (the first [`KIND_PROBE_BYTES`] bytes of a file, or fewer) says the file is:
/// an ELF vmlinux, a bzImage, or neither (`None`).
pub(crate) fn kernel_file_kind(head: &[u8]) -> Option<KernelFileKind> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelFileKind::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFileKind::BzImage)
    } else {
        None
    }
}

/// The pair a cross-kernel handover needs of a user's next kernel: the bzImage the agent
/// kexecs (x86 `kexec_file_load` loads only bzImages) and the ELF vmlinux whose symbols
/// luo-vmm breaks at. One is named, the other is found beside it: `bzImage` or
/// `arch/x86/boot/bzImage` next to a vmlinux (a cached image's kernel directory, a kernel
/// build tree), `vmlinux` next to a bzImage (or two levels up from `arch/x86/boot/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPair {
    /// The ELF vmlinux (symbols).
    pub vmlinux: PathBuf,
    /// The bzImage (what the agent kexecs).
    pub bzimage: PathBuf,
}

impl KernelPair {
    /// The pair of the kernel file `path`, checked before anything boots. Errors (one
    /// line each): no such file, not a kernel, the other half not found beside it.
    pub(crate) fn of(path: &Path) -> Result<Self, ImageSpecError> {
        let err = |why: String| ImageSpecError::NextKernel {
            path: path.to_owned(),
            why,
        };
        let kind = |p: &Path| -> Result<Option<KernelFileKind>, String> {
            let mut head = vec![0u8; KIND_PROBE_BYTES];
            let mut f = std::fs::File::open(p).map_err(|e| e.to_string())?;
            let n = read_up_to(&mut f, &mut head).map_err(|e| e.to_string())?;
            Ok(kernel_file_kind(&head[..n]))
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let beside = |names: &[&str], want: KernelFileKind| {
            names
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file() && kind(p).ok().flatten() == Some(want))
        };
        match kind(path).map_err(err)? {
            Some(KernelFileKind::Elf) => {
                let bzimage = beside(&["bzImage", "arch/x86/boot/bzImage"], KernelFileKind::BzImage)
                    .ok_or_else(|| {
                        err(format!(
                            "no bzImage beside this vmlinux (looked for bzImage and arch/x86/boot/bzImage in {}): the agent kexecs a bzImage",
                            dir.display()
                        ))
                    })?;
                Ok(KernelPair {
                    vmlinux: path.to_owned(),
                    bzimage,
                })
            }
            Some(KernelFileKind::BzImage) => {
                let vmlinux = beside(&["vmlinux", "../../../vmlinux"], KernelFileKind::Elf)
                    .ok_or_else(|| {
                        err(format!(
                            "no vmlinux beside this bzImage (in {}): luo-vmm needs its symbols to watch the next kernel",
                            dir.display()
                        ))
                    })?;
                Ok(KernelPair {
                    vmlinux,
                    bzimage: path.to_owned(),
                })
            }
            None => Err(err(
                "not a kernel (neither an ELF vmlinux nor an x86 bzImage)".to_owned(),
            )),
        }
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(f: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The kernel a handover kexecs into, as asked for: the first kernel itself (no option), a
/// variant of the reference, a source tree's kernel, or a user's kernel file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NextSpec {
    /// An image of guest-images (a variant, or a source tree with an optional variant):
    /// built like the first kernel's, and its vmlinux and bzImage used.
    Image(ImageSpec),
    /// A user's kernel file and the other half found beside it.
    File(KernelPair),
}

/// Checks `--next-variant`, `--next-source` and `--next-kernel` (at most one of the last
/// and the first two, which clap enforces) before anything is built or booted, and
/// returns what they name; `None` when none is given (the kernel kexecs itself).
pub(crate) fn next_spec(
    variant: Option<&str>,
    source: Option<&Path>,
    kernel: Option<&Path>,
) -> Result<Option<NextSpec>, ImageSpecError> {
    if let Some(path) = kernel {
        return KernelPair::of(path).map(|p| Some(NextSpec::File(p)));
    }
    if variant.is_none() && source.is_none() {
        return Ok(None);
    }
    if let Some(name) = variant {
        check_variant(name).map_err(|e| ImageSpecError::NextVariant(Box::new(e)))?;
    }
    if let Some(dir) = source {
        if let Some(why) = source_tree_problem(dir) {
            return Err(ImageSpecError::NextSource {
                path: dir.to_owned(),
                why,
            });
        }
    }
    Ok(Some(NextSpec::Image(ImageSpec {
        variant: variant.map(str::to_owned),
        source: source.map(Path::to_owned),
    })))
}

/// The build script: `$LUO_GUEST_IMAGES/build.sh`, else the one in this source tree.
pub fn build_script() -> PathBuf {
    std::env::var_os("LUO_GUEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images"))
        .join("build.sh")
}

/// The kernel variants that guest-images/variants holds (one folder each), sorted.
pub fn variant_names() -> Vec<String> {
    let dir = build_script().with_file_name("variants");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Checks that `name` is a variant of guest-images/variants, before anything is built.
pub fn check_variant(name: &str) -> Result<(), ImageSpecError> {
    let names = variant_names();
    if names.iter().any(|n| n == name) {
        return Ok(());
    }
    Err(ImageSpecError::UnknownVariant {
        name: name.to_owned(),
        known: if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_of_the_source_tree_are_known() {
        let names = variant_names();
        assert!(
            names.iter().any(|n| n == "luo-reboot-unlocked"),
            "{names:?}"
        );
        assert!(check_variant("luo-no-unfreeze").is_ok());
        match check_variant("no-such-variant") {
            Err(ImageSpecError::UnknownVariant { known, .. }) => {
                assert!(known.contains("luo-reboot-unlocked"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn kernel_files_are_told_by_their_magic() {
        let mut bz = vec![0u8; KIND_PROBE_BYTES];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_file_kind(&bz), Some(KernelFileKind::BzImage));
        assert_eq!(
            kernel_file_kind(b"\x7fELF\x02\x01"),
            Some(KernelFileKind::Elf)
        );
        assert_eq!(kernel_file_kind(b"#!/bin/sh\n"), None);
        assert_eq!(kernel_file_kind(&bz[..0x204]), None, "cut short");
        assert_eq!(kernel_file_kind(&[]), None);
    }

    #[test]
    fn next_kernels_are_checked_up_front() {
        let dir = std::env::temp_dir().join(format!("luo-next-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.txt");
        std::fs::write(&text, "not a kernel").unwrap();
        let msg = |r: Result<Option<NextSpec>, ImageSpecError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(next_spec(None, None, Some(&text))),
            format!(
                "--next-kernel {}: not a kernel (neither an ELF vmlinux nor an x86 bzImage)",
                text.display()
            )
        );
        assert!(msg(next_spec(None, None, Some(&dir.join("none"))))
            .starts_with(&format!("--next-kernel {}: ", dir.join("none").display())));
        let vmlinux = dir.join("vmlinux");
        std::fs::write(&vmlinux, b"\x7fELF rest").unwrap();
        assert!(
            msg(next_spec(None, None, Some(&vmlinux))).contains("no bzImage beside this vmlinux")
        );
        let mut bz = vec![0u8; 4096];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(dir.join("bzImage"), &bz).unwrap();
        let pair = KernelPair {
            vmlinux: vmlinux.clone(),
            bzimage: dir.join("bzImage"),
        };
        assert_eq!(
            next_spec(None, None, Some(&vmlinux)).unwrap(),
            Some(NextSpec::File(pair.clone()))
        );
        assert_eq!(
            next_spec(None, None, Some(&dir.join("bzImage"))).unwrap(),
            Some(NextSpec::File(pair))
        );
        assert_eq!(next_spec(None, None, None).unwrap(), None);
        assert_eq!(
            msg(next_spec(Some("no-such-variant"), None, None))
                .split(" (known")
                .next()
                .unwrap(),
            "--next-variant: no kernel variant \"no-such-variant\""
        );
        assert_eq!(
            msg(next_spec(None, Some(&text), None)),
            format!("--next-source {}: not a directory", text.display())
        );
        assert_eq!(
            next_spec(Some("abi-control"), None, None).unwrap(),
            Some(NextSpec::Image(ImageSpec {
                variant: Some("abi-control".into()),
                source: None
            }))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn source_trees_are_checked_up_front() {
        let dir = std::env::temp_dir().join(format!("luo-source-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(source_tree_problem(&dir), Some("no such directory"));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            source_tree_problem(&dir),
            Some("not a kernel source tree (no Makefile at its top)")
        );
        std::fs::write(dir.join("Makefile"), "").unwrap();
        assert_eq!(
            source_tree_problem(&dir),
            Some("not a kernel source tree (no kernel/ at its top)")
        );
        assert_eq!(
            source_tree_problem(&dir.join("Makefile")),
            Some("not a directory")
        );
        std::fs::create_dir(dir.join("kernel")).unwrap();
        assert_eq!(source_tree_problem(&dir), None);
        let spec = ImageSpec {
            variant: None,
            source: Some(dir.clone()),
        };
        assert!(spec.check().is_ok());
        assert_eq!(
            spec.script_args(),
            [OsString::from("--source"), dir.clone().into()]
        );
        assert!(spec.describe().starts_with("guest from source tree /"));
        let bad = ImageSpec {
            variant: Some("no-such-variant".into()),
            source: Some(dir.clone()),
        };
        assert!(matches!(
            bad.check(),
            Err(ImageSpecError::UnknownVariant { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        let err = spec.check().unwrap_err().to_string();
        assert_eq!(
            err,
            format!("--source {}: no such directory", dir.display())
        );
        assert_eq!(ImageSpec::default().describe(), "reference guest");
        assert!(ImageSpec::default().script_args().is_empty());
    }
}
