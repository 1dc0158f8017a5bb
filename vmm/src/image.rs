//! The reference guest image (or one of its variants, or a kernel developer's own source
//! tree built the same way): found in the cache, or built by guest-images/build.sh (which
//! owns the cache and its keys) on first use.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The build script could not be started.
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    /// The build script failed.
    #[error("building the {what} failed ({status}); its messages are above")]
    BuildFailed {
        what: String,
        status: std::process::ExitStatus,
    },
    /// The build script did not say where the image is.
    #[error("the guest image build printed no LUO_IMAGE_DIR= line")]
    NoImageDir,
    /// A file the image must have is missing.
    #[error("the guest image at {dir} lacks {file}")]
    Incomplete { dir: PathBuf, file: &'static str },
    /// `--variant NAME` names no folder of guest-images/variants.
    #[error("no kernel variant {name:?} (known: {known}); see guest-images/variants/README.md")]
    UnknownVariant { name: String, known: String },
    /// `--source DIR` is not a kernel source tree.
    #[error("--source {}: {why}", path.display())]
    NotASourceTree { path: PathBuf, why: &'static str },
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
    fn script_args(&self) -> Vec<OsString> {
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
    pub fn check(&self) -> Result<(), ImageError> {
        if let Some(name) = &self.variant {
            check_variant(name)?;
        }
        if let Some(dir) = &self.source {
            if let Some(why) = source_tree_problem(dir) {
                return Err(ImageError::NotASourceTree {
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

/// The files of the reference guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The image directory.
    pub dir: PathBuf,
    /// ELF vmlinux (booted directly, and the source of symbols).
    pub vmlinux: PathBuf,
    /// The initramfs with the agent.
    pub initramfs: PathBuf,
    /// The kernel release it was built from.
    pub kernel_version: String,
}

impl GuestImage {
    /// Checks a directory produced by the build script.
    pub fn from_dir(dir: &Path) -> Result<Self, ImageError> {
        let file = |name: &'static str| {
            let p = dir.join(name);
            if p.exists() {
                Ok(p)
            } else {
                Err(ImageError::Incomplete {
                    dir: dir.into(),
                    file: name,
                })
            }
        };
        let version_file = file("kernel-version")?;
        let vmlinux = file("vmlinux")?;
        // Not read by luo-vmm, but part of a complete image: the agent kexecs the bzImage
        // (its copy in the initramfs), and people read System.map.
        file("bzImage")?;
        file("System.map")?;
        Ok(Self {
            dir: dir.into(),
            vmlinux,
            initramfs: file("initramfs.cpio")?,
            kernel_version: std::fs::read_to_string(version_file)
                .unwrap_or_default()
                .trim()
                .to_owned(),
        })
    }
}

/// The build script: `$LUO_GUEST_IMAGES/build.sh`, else the one in this source tree.
pub fn build_script() -> PathBuf {
    std::env::var_os("LUO_GUEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images"))
        .join("build.sh")
}

/// Finds the `LUO_IMAGE_DIR=` line in the script's stdout.
pub fn parse_image_dir(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("LUO_IMAGE_DIR="))
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
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
pub fn check_variant(name: &str) -> Result<(), ImageError> {
    let names = variant_names();
    if names.iter().any(|n| n == name) {
        return Ok(());
    }
    Err(ImageError::UnknownVariant {
        name: name.to_owned(),
        known: if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        },
    })
}

/// Returns the reference guest, one of its kernel variants (guest-images/variants/NAME)
/// or the kernel of a source tree, building what the cache lacks. The script shows its
/// progress on stderr; a cached image costs a few seconds of hashing.
pub(crate) fn ensure_image(spec: &ImageSpec) -> Result<GuestImage, ImageError> {
    spec.check()?;
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .args(spec.script_args())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ImageError::Spawn {
            script: script.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::BuildFailed {
            what: spec.describe(),
            status: out.status,
        });
    }
    let dir =
        parse_image_dir(&String::from_utf8_lossy(&out.stdout)).ok_or(ImageError::NoImageDir)?;
    GuestImage::from_dir(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_image_dir_line() {
        let out = "noise\nLUO_IMAGE_DIR=/a\nLUO_IMAGE_DIR=/c/d\n\n";
        assert_eq!(parse_image_dir(out), Some(PathBuf::from("/c/d")));
        assert_eq!(parse_image_dir("LUO_IMAGE_DIR=\n"), None);
        assert_eq!(parse_image_dir("nothing"), None);
    }

    #[test]
    fn variants_of_the_source_tree_are_known() {
        let names = variant_names();
        assert!(
            names.iter().any(|n| n == "luo-reboot-unlocked"),
            "{names:?}"
        );
        assert!(check_variant("luo-no-unfreeze").is_ok());
        match check_variant("no-such-variant") {
            Err(ImageError::UnknownVariant { known, .. }) => {
                assert!(known.contains("luo-reboot-unlocked"))
            }
            other => panic!("unexpected {other:?}"),
        }
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
            Err(ImageError::UnknownVariant { .. })
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

    #[test]
    fn incomplete_dir_names_the_missing_file() {
        let dir = std::env::temp_dir().join(format!("luo-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel-version"), "7.2.13\n").unwrap();
        match GuestImage::from_dir(&dir) {
            Err(ImageError::Incomplete { file, .. }) => assert_eq!(file, "vmlinux"),
            other => panic!("unexpected {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
