//! What the agent is asked to do: `luo.*` parameters of the kernel command line.
//!
//! Parameters with a dot are not passed to init's argv or environment, but they stay in
//! `/proc/cmdline`, which is where the agent reads them. They are also how a stage-1 agent
//! tells its stage-2 successor what to do: it kexecs the next kernel with its own command
//! line, rewritten by [`next_cmdline`].

use std::fmt;

/// The agent's mode (`luo.mode=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `boot` (default): report userspace-up and reboot.
    Boot,
    /// `handover`: preserve memfds in LUO sessions, kexec, verify them in the next kernel.
    Handover,
    /// `selftest:NAME`: run `/selftests/NAME --stage 1`, kexec, run it with `--stage 2`.
    Selftest(String),
}

/// Everything `luo.*` on the command line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `luo.mode`.
    pub mode: Mode,
    /// `luo.stage` (1 before the handover, 2 after it).
    pub stage: u32,
    /// `luo.sessions`: number of LUO sessions.
    pub sessions: u32,
    /// `luo.files`: memfds per session.
    pub files: u32,
    /// `luo.memfd_size`: bytes per memfd (a `K`, `M` or `G` suffix is accepted).
    pub memfd_size: u64,
    /// `luo.repeat`: number of handovers to chain.
    pub repeat: u32,
    /// `luo.round`: number of handovers done before this boot (0 on the first boot).
    pub round: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Boot,
            stage: 1,
            sessions: 1,
            files: 1,
            memfd_size: 1 << 20,
            repeat: 1,
            round: 0,
        }
    }
}

/// Tokens per session: a memfd's LUO token is `session * TOKENS_PER_SESSION + file`.
pub const TOKENS_PER_SESSION: u64 = 1000;

/// A bad `luo.*` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad kernel command line: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

fn bad(msg: String) -> ConfigError {
    ConfigError(msg)
}

fn number(key: &str, value: &str) -> Result<u32, ConfigError> {
    value
        .parse()
        .map_err(|_| bad(format!("{key}={value}: not a number")))
}

/// Parses a byte count with an optional `K`, `M` or `G` (binary) suffix.
pub fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 10),
        b'm' | b'M' => (&value[..value.len() - 1], 20),
        b'g' | b'G' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

/// Parses the `luo.*` parameters of a kernel command line (e.g. `/proc/cmdline`).
/// Other parameters are ignored; an unknown `luo.*` key or a bad value is an error.
pub fn parse(cmdline: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    for token in cmdline.split_whitespace() {
        let Some(rest) = token.strip_prefix("luo.") else {
            continue;
        };
        let (key, value) = rest
            .split_once('=')
            .ok_or_else(|| bad(format!("{token}: missing '='")))?;
        match key {
            "mode" => {
                cfg.mode = match value {
                    "boot" => Mode::Boot,
                    "handover" => Mode::Handover,
                    _ => match value.strip_prefix("selftest:") {
                        Some(name) if is_test_name(name) => Mode::Selftest(name.to_string()),
                        _ => return Err(bad(format!("luo.mode={value}: unknown mode"))),
                    },
                }
            }
            "stage" => cfg.stage = number(token, value)?,
            "sessions" => cfg.sessions = number(token, value)?,
            "files" => cfg.files = number(token, value)?,
            "memfd_size" => {
                cfg.memfd_size =
                    parse_size(value).ok_or_else(|| bad(format!("{token}: not a size")))?
            }
            "repeat" => cfg.repeat = number(token, value)?,
            "round" => cfg.round = number(token, value)?,
            _ => return Err(bad(format!("{token}: unknown luo.* parameter"))),
        }
    }
    if cfg.stage != 1 && cfg.stage != 2 {
        return Err(bad(format!("luo.stage={}: must be 1 or 2", cfg.stage)));
    }
    if cfg.sessions == 0 || cfg.files == 0 || u64::from(cfg.files) > TOKENS_PER_SESSION - 1 {
        return Err(bad(format!(
            "luo.sessions={} luo.files={}: need at least 1 of each and at most 999 files",
            cfg.sessions, cfg.files
        )));
    }
    Ok(cfg)
}

/// A selftest name must be a plain file name under /selftests.
fn is_test_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The command line for the next kernel: `cmdline` without its `luo.stage=` and
/// `luo.round=` parameters, followed by `luo.stage=<stage> luo.round=<round>`.
pub fn next_cmdline(cmdline: &str, stage: u32, round: u32) -> String {
    let mut out: Vec<String> = cmdline
        .split_whitespace()
        .filter(|t| !t.starts_with("luo.stage=") && !t.starts_with("luo.round="))
        .map(str::to_string)
        .collect();
    out.push(format!("luo.stage={stage}"));
    out.push(format!("luo.round={round}"));
    out.join(" ")
}

/// Counts the CPUs of a sysfs CPU list such as `0-3,5` (`/sys/devices/system/cpu/online`).
pub fn count_cpu_list(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_luo_parameters() {
        let cfg = parse("console=ttyS0 reboot=k panic=-1 retain_initrd luo_emulation\n").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn all_parameters() {
        let cfg = parse(
            "console=ttyS0 luo.mode=handover luo.stage=2 luo.sessions=3 luo.files=4 \
             luo.memfd_size=2M luo.repeat=5 luo.round=2",
        )
        .unwrap();
        assert_eq!(
            cfg,
            Config {
                mode: Mode::Handover,
                stage: 2,
                sessions: 3,
                files: 4,
                memfd_size: 2 << 20,
                repeat: 5,
                round: 2,
            }
        );
    }

    #[test]
    fn selftest_mode() {
        let cfg = parse("luo.mode=selftest:luo_kexec_simple").unwrap();
        assert_eq!(cfg.mode, Mode::Selftest("luo_kexec_simple".into()));
        assert!(parse("luo.mode=selftest:").is_err());
        assert!(parse("luo.mode=selftest:../bin/sh").is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse("luo.mode=fast").is_err());
        assert!(parse("luo.stage=3").is_err());
        assert!(parse("luo.sessions=x").is_err());
        assert!(parse("luo.sessions=0").is_err());
        assert!(parse("luo.files=1000").is_err());
        assert!(parse("luo.memfd_size=1Q").is_err());
        assert!(parse("luo.colour=blue").is_err());
        assert!(parse("luo.stage").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn next_cmdline_replaces_stage_and_round() {
        assert_eq!(
            next_cmdline("console=ttyS0 luo.mode=handover luo.stage=1\n", 2, 1),
            "console=ttyS0 luo.mode=handover luo.stage=2 luo.round=1"
        );
        assert_eq!(
            next_cmdline("a luo.round=1 luo.stage=2 b luo.repeat=3", 2, 2),
            "a b luo.repeat=3 luo.stage=2 luo.round=2"
        );
        // The rewritten line parses back to what it says.
        let line = next_cmdline("luo.mode=handover luo.repeat=2", 2, 1);
        let cfg = parse(&line).unwrap();
        assert_eq!((cfg.stage, cfg.round, cfg.repeat), (2, 1, 2));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0,2-3,7"), Some(4));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }
}
