//! The reference guest image: found in the cache, or built by guest-images/build.sh
//! (which owns the cache and its keys) on first use.

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
    #[error("building the reference guest failed ({status}); its messages are above")]
    BuildFailed { status: std::process::ExitStatus },
    /// The build script did not say where the image is.
    #[error("the guest image build printed no LUO_IMAGE_DIR= line")]
    NoImageDir,
    /// A file the image must have is missing.
    #[error("the guest image at {dir} lacks {file}")]
    Incomplete { dir: PathBuf, file: &'static str },
    /// `--variant NAME` names no folder of guest-images/variants.
    #[error("no kernel variant {name:?} (known: {known}); see guest-images/variants/README.md")]
    UnknownVariant { name: String, known: String },
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

/// Returns the reference guest or one of its kernel variants
/// (guest-images/variants/NAME), building what the cache lacks. The script shows its
/// progress on stderr; a cached image costs a few seconds of hashing.
pub fn ensure_image(variant: Option<&str>) -> Result<GuestImage, ImageError> {
    if let Some(name) = variant {
        check_variant(name)?;
    }
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .args(variant.map(|v| ["--variant", v]).into_iter().flatten())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ImageError::Spawn {
            script: script.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::BuildFailed { status: out.status });
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
