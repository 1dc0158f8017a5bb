//! The guest image a [`ImageSpec`] names (the reference, one of its variants, or a kernel
//! developer's own source tree built the same way): found in the cache, or built by
//! guest-images/build.sh (which owns the cache and its keys) on first use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::config::image::{build_script, ImageSpec, ImageSpecError};

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
    /// The image asked for does not exist.
    #[error(transparent)]
    Spec(#[from] ImageSpecError),
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

/// Finds the `LUO_IMAGE_DIR=` line in the script's stdout.
pub fn parse_image_dir(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("LUO_IMAGE_DIR="))
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
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
