//! The kernel file a run boots, read once per use: its symbols, for every hook that breaks
//! in it (the interception, a scenario's hooks, `--trace`), and the most CPUs it can bring
//! up, so that `--vcpus` above it is refused before a guest boots.

use std::path::{Path, PathBuf};

use luo_handover::symbols::{initial_u32, KernelSymbols, SymbolError};
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum KernelFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The kernel file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has no usable symbol table.
    #[error("{}: {source}", path.display())]
    Symbols {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong with it.
        source: SymbolError,
    },
}

/// The symbols of the ELF `vmlinux` at `path`: the one loader of kernel symbols.
pub(crate) fn load_symbols(path: &Path) -> Result<KernelSymbols, KernelFileError> {
    let data = std::fs::read(path).map_err(|source| KernelFileError::Read {
        path: path.into(),
        source,
    })?;
    KernelSymbols::from_elf(&data).map_err(|source| KernelFileError::Symbols {
        path: path.into(),
        source,
    })
}

/// The most CPUs a kernel brings up, and where luo-vmm read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuLimit {
    /// `CONFIG_NR_CPUS`.
    pub cpus: u32,
    /// Where it was read, for the message.
    pub from: String,
}

/// The value of `CONFIG_NR_CPUS` in a kernel `.config` text.
pub(crate) fn config_nr_cpus(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("CONFIG_NR_CPUS="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
}

/// The kernel's own CPU limit, where it can be found: the initial value of `nr_cpu_ids`
/// (kernel/smp.c sets it to `CONFIG_NR_CPUS`) in an ELF `vmlinux`, else `CONFIG_NR_CPUS` of
/// a `.config` beside the kernel file (a cached image's kernel directory has one). `None`
/// for a bzImage without a `.config` beside it, or a kernel built without SMP symbols.
pub(crate) fn cpu_limit(kernel: &Path) -> Option<CpuLimit> {
    let data = std::fs::read(kernel).ok()?;
    if let Some(cpus) = initial_u32(&data, "nr_cpu_ids").filter(|&n| n > 0) {
        return Some(CpuLimit {
            cpus,
            from: format!("nr_cpu_ids in {}", kernel.display()),
        });
    }
    let config = std::fs::canonicalize(kernel)
        .ok()?
        .with_file_name(".config");
    let cpus = config_nr_cpus(&std::fs::read_to_string(&config).ok()?)?;
    Some(CpuLimit {
        cpus,
        from: format!("CONFIG_NR_CPUS in {}", config.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nr_cpus_of_a_config() {
        let config = "# CONFIG_X is not set\nCONFIG_NR_CPUS_RANGE_END=512\nCONFIG_NR_CPUS_DEFAULT=64\nCONFIG_NR_CPUS=4\n";
        assert_eq!(config_nr_cpus(config), Some(4));
        assert_eq!(config_nr_cpus("CONFIG_SMP=y\n"), None);
        assert_eq!(config_nr_cpus("CONFIG_NR_CPUS=many\n"), None);
        assert_eq!(config_nr_cpus("CONFIG_NR_CPUS=0\n"), None);
    }

    #[test]
    fn a_config_beside_a_bzimage_gives_the_limit() {
        let dir = std::env::temp_dir().join(format!("luo-cpu-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, b"MZ not an ELF").unwrap();
        assert_eq!(cpu_limit(&kernel), None);
        std::fs::write(dir.join(".config"), "CONFIG_NR_CPUS=4\n").unwrap();
        let limit = cpu_limit(&kernel).unwrap();
        assert_eq!(limit.cpus, 4);
        assert!(
            limit.from.starts_with("CONFIG_NR_CPUS in /"),
            "{}",
            limit.from
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cpu_limit(&kernel), None);
    }

    #[test]
    fn symbols_of_a_missing_file_name_it() {
        let err = load_symbols(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read /nonexistent/vmlinux: "));
    }
}
