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
