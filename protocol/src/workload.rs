//! What the agent is asked to do, with its bounds, and its form on the kernel command
//! line: one renderer ([`Workload::kernel_params`]) on the VMM's side, one parser
//! ([`AgentConfig::parse`]) on the agent's (and wherever a saved report is read back).
//!
//! `luo.*` parameters have a dot, so the kernel passes them neither to init's argv nor to
//! its environment; they stay in `/proc/cmdline`, where the agent reads them. A stage-1
//! agent tells its stage-2 successor what to do by kexecing the next kernel with its own
//! command line, rewritten by [`next_cmdline`].
//!
//! | parameter | values | default |
//! | --- | --- | --- |
//! | `luo.mode` | `boot`, `handover`, `selftest:NAME`, `scenario` | `boot` |
//! | `luo.sessions` | 1 ..= [`MAX_SESSIONS`] | 1 |
//! | `luo.files` | memfds per session, 1 ..= [`MAX_FILES`] | 1 |
//! | `luo.memfd_size` | bytes per memfd (`K`/`M`/`G`/`T` suffix), 1 ..= [`MAX_MEMFD_SIZE`] | 1M |
//! | `luo.repeat` | handovers in a row, 1 ..= [`MAX_REPEAT`] | 1 |
//! | `luo.stage` | 1 before the handover, 2 after it | 1 |
//! | `luo.round` | handovers done before this boot | 0 |
//! | `luo.timeout_scale` | factor for the kselftest harness's per-test timeouts, 1 ..= [`MAX_TIMEOUT_SCALE`] | 1 |
//! | `luo.script1`, `luo.script2` | a scenario's steps per stage ([`crate::script`]) | none |

use std::fmt;

use crate::script::{Script, StageScript, SCRIPT1_KEY, SCRIPT2_KEY};
use crate::session::{SessionName, MAX_FILES, MAX_MEMFD_SIZE, MAX_SESSIONS};
// Its old path: luo-vmm parses sizes through `luo_protocol::workload::parse_size`.
pub use crate::session::parse_size;

/// Most handovers in a row.
pub const MAX_REPEAT: u32 = 1000;
/// Largest factor for the kselftest harness's timeouts.
pub const MAX_TIMEOUT_SCALE: u32 = 1000;
/// The factor luo-vmm asks for on an instruction-emulating KVM, where guest code runs
/// about 1000 times slower: the harness's 30 s per case become 10 minutes.
pub const EMULATED_TIMEOUT_SCALE: u32 = 20;

/// The parameter that asks for harness timeouts `scale` times upstream's.
pub fn timeout_scale_param(scale: u32) -> String {
    format!("luo.timeout_scale={scale}")
}

/// Which side of a handover a boot is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Before the handover: set up, preserve, kexec.
    One,
    /// In the next kernel: retrieve and check.
    Two,
}

impl Stage {
    /// 1 or 2.
    pub const fn number(self) -> u8 {
        match self {
            Stage::One => 1,
            Stage::Two => 2,
        }
    }

    /// The stage numbered `n`.
    pub const fn from_number(n: u32) -> Option<Stage> {
        match n {
            1 => Some(Stage::One),
            2 => Some(Stage::Two),
            _ => None,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// The agent's own handover workload: sessions of memfds filled with a checkable pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memfds {
    /// LUO sessions, 1 ..= [`MAX_SESSIONS`].
    pub sessions: u32,
    /// memfds per session, 1 ..= [`MAX_FILES`].
    pub files: u32,
    /// Bytes per memfd, 1 ..= [`MAX_MEMFD_SIZE`].
    pub memfd_size: u64,
    /// Handovers in a row, 1 ..= [`MAX_REPEAT`].
    pub repeat: u32,
}

impl Default for Memfds {
    fn default() -> Self {
        Memfds {
            sessions: 1,
            files: 1,
            memfd_size: 1 << 20,
            repeat: 1,
        }
    }
}

impl Memfds {
    /// Checks every bound.
    pub fn validate(self) -> Result<Self, WorkloadError> {
        let check = |what, value: u64, max: u64| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err(WorkloadError::OutOfRange { what, value, max })
            }
        };
        check(
            "sessions",
            u64::from(self.sessions),
            u64::from(MAX_SESSIONS),
        )?;
        check("files", u64::from(self.files), u64::from(MAX_FILES))?;
        check("memfd_size", self.memfd_size, MAX_MEMFD_SIZE)?;
        check("repeat", u64::from(self.repeat), u64::from(MAX_REPEAT))?;
        Ok(self)
    }

    /// memfds over all sessions.
    pub fn total_files(&self) -> u64 {
        u64::from(self.sessions) * u64::from(self.files)
    }

    /// Bytes preserved per handover (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.total_files().saturating_mul(self.memfd_size)
    }

    /// The LUO token of memfd `file` of session `session`.
    pub fn token(session: u32, file: u32) -> u64 {
        crate::session::token(session, file)
    }

    /// The LUO name of session `session` (`luo-vmm-s<N>`, always a valid name).
    pub fn session_name(session: u32) -> SessionName {
        // "luo-vmm-s" and at most 10 digits: 19 bytes, no NUL, a valid name.
        SessionName(format!("luo-vmm-s{session}"))
    }
}

/// The kernel's LUO selftests (tools/testing/selftests/liveupdate) in the reference image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selftest {
    /// `liveupdate`: the ioctl interface, single-stage (no kexec).
    Liveupdate,
    /// `luo_kexec_simple`: one session across a kexec.
    KexecSimple,
    /// `luo_multi_session`: several sessions across a kexec.
    MultiSession,
    /// `luo_stress_sessions`: many sessions across a kexec.
    StressSessions,
    /// `luo_stress_files`: many files across a kexec.
    StressFiles,
}

impl Selftest {
    /// Every selftest, in the order the image lists them.
    pub const ALL: [Selftest; 5] = [
        Selftest::Liveupdate,
        Selftest::KexecSimple,
        Selftest::MultiSession,
        Selftest::StressSessions,
        Selftest::StressFiles,
    ];

    /// The binary's name under `/selftests`.
    pub const fn name(self) -> &'static str {
        match self {
            Selftest::Liveupdate => "liveupdate",
            Selftest::KexecSimple => "luo_kexec_simple",
            Selftest::MultiSession => "luo_multi_session",
            Selftest::StressSessions => "luo_stress_sessions",
            Selftest::StressFiles => "luo_stress_files",
        }
    }

    /// The selftest called `name`.
    pub fn from_name(name: &str) -> Result<Selftest, WorkloadError> {
        Selftest::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| WorkloadError::UnknownSelftest(name.to_owned()))
    }

    /// Whether it runs across a handover (`--stage 1`, kexec, `--stage 2`); otherwise it
    /// runs once, without kexec.
    pub const fn two_stage(self) -> bool {
        !matches!(self, Selftest::Liveupdate)
    }

    /// `name, name, ...` of every selftest.
    pub fn names() -> String {
        Selftest::ALL.map(Selftest::name).join(", ")
    }
}

/// What the agent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// Report `userspace-up` and reboot.
    #[default]
    Boot,
    /// Preserve memfds in LUO sessions, kexec, verify them in the next kernel.
    Handover(Memfds),
    /// Run a kernel selftest (across a handover if it has two stages).
    Selftest(Selftest),
    /// Run a scenario's script ([`AgentConfig::script`]).
    Scenario,
}

impl Workload {
    /// Checks the bounds.
    pub fn validate(self) -> Result<Self, WorkloadError> {
        if let Workload::Handover(m) = self {
            m.validate()?;
        }
        Ok(self)
    }

    /// Whether the workload ends in at least one handover.
    pub fn hands_over(&self) -> bool {
        match self {
            Workload::Boot => false,
            Workload::Handover(_) => true,
            Workload::Selftest(t) => t.two_stage(),
            Workload::Scenario => true,
        }
    }

    /// Handovers the workload makes.
    pub fn handovers(&self) -> u32 {
        match self {
            Workload::Boot => 0,
            Workload::Handover(m) => m.repeat,
            Workload::Selftest(t) => u32::from(t.two_stage()),
            Workload::Scenario => 1,
        }
    }

    /// The kernel parameters that ask the agent for this workload (with `liveupdate=1`
    /// where LUO is needed). The inverse of [`AgentConfig::parse`].
    pub fn kernel_params(&self) -> String {
        match self {
            Workload::Boot => "luo.mode=boot".to_owned(),
            Workload::Handover(m) => format!(
                "liveupdate=1 luo.mode=handover luo.sessions={} luo.files={} luo.memfd_size={} luo.repeat={}",
                m.sessions, m.files, m.memfd_size, m.repeat
            ),
            Workload::Selftest(t) => format!("liveupdate=1 luo.mode=selftest:{}", t.name()),
            Workload::Scenario => "liveupdate=1 luo.mode=scenario".to_owned(),
        }
    }
}

/// Where a boot is in the agent's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Before or after a handover.
    pub stage: Stage,
    /// Handovers done before this boot.
    pub round: u32,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            stage: Stage::One,
            round: 0,
        }
    }
}

/// Everything `luo.*` on a command line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// What to do.
    pub workload: Workload,
    /// Where this boot is.
    pub progress: Progress,
    /// Factor for the kselftest harness's per-test timeouts (1: upstream's).
    pub timeout_scale: u32,
    /// A scenario's steps (empty stages unless `luo.script1`/`luo.script2` are given).
    pub script: Script,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            workload: Workload::default(),
            progress: Progress::default(),
            timeout_scale: 1,
            script: Script::default(),
        }
    }
}

/// A workload the agent cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadError {
    /// A count or size outside its bounds.
    OutOfRange {
        /// Which parameter (`sessions`, `files`, `memfd_size`, `repeat`).
        what: &'static str,
        /// The value asked for.
        value: u64,
        /// The largest allowed (the smallest is 1).
        max: u64,
    },
    /// A selftest the image does not have.
    UnknownSelftest(String),
    /// A `luo.mode` that is none of the modes.
    UnknownMode(String),
    /// A `luo.*` key the agent does not know.
    UnknownKey(String),
    /// A `luo.*` parameter without `=`.
    MissingValue(String),
    /// A value that is not a number or size.
    NotANumber {
        /// The parameter.
        key: String,
        /// Its value.
        value: String,
    },
    /// `luo.stage` other than 1 or 2.
    BadStage(u32),
    /// A `luo.script1`/`luo.script2` that does not parse.
    BadScript(String),
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::OutOfRange { what, value, max } => {
                write!(f, "{what} {value} is out of range: 1 to {max}")
            }
            WorkloadError::UnknownSelftest(name) => write!(
                f,
                "no selftest {name:?} in the image; the LUO selftests are {}",
                Selftest::names()
            ),
            WorkloadError::UnknownMode(m) => {
                write!(
                    f,
                    "luo.mode={m}: not boot, handover, selftest:NAME or scenario"
                )
            }
            WorkloadError::UnknownKey(k) => write!(f, "{k}: unknown luo.* parameter"),
            WorkloadError::MissingValue(t) => write!(f, "{t}: missing '='"),
            WorkloadError::NotANumber { key, value } => {
                write!(f, "{key}={value}: not a number")
            }
            WorkloadError::BadStage(s) => write!(f, "luo.stage={s}: must be 1 or 2"),
            WorkloadError::BadScript(e) => write!(f, "scenario script: {e}"),
        }
    }
}

impl std::error::Error for WorkloadError {}

impl AgentConfig {
    /// Parses the `luo.*` parameters of a kernel command line (e.g. `/proc/cmdline`) and
    /// checks the workload's bounds. Other parameters are ignored; an unknown `luo.*` key
    /// or a bad value is an error.
    pub fn parse(cmdline: &str) -> Result<AgentConfig, WorkloadError> {
        let mut mode: Option<&str> = None;
        let mut memfds = Memfds::default();
        let mut progress = Progress::default();
        let mut timeout_scale = 1;
        let mut script = Script::default();
        for token in cmdline.split_whitespace() {
            let Some(rest) = token.strip_prefix("luo.") else {
                continue;
            };
            let (key, value) = rest
                .split_once('=')
                .ok_or_else(|| WorkloadError::MissingValue(token.to_owned()))?;
            let not_a_number = || WorkloadError::NotANumber {
                key: format!("luo.{key}"),
                value: value.to_owned(),
            };
            let number = || value.parse::<u32>().map_err(|_| not_a_number());
            match key {
                "mode" => mode = Some(value),
                "sessions" => memfds.sessions = number()?,
                "files" => memfds.files = number()?,
                "memfd_size" => memfds.memfd_size = parse_size(value).ok_or_else(not_a_number)?,
                "repeat" => memfds.repeat = number()?,
                "round" => progress.round = number()?,
                "timeout_scale" => {
                    timeout_scale = number()?;
                    if !(1..=MAX_TIMEOUT_SCALE).contains(&timeout_scale) {
                        return Err(WorkloadError::OutOfRange {
                            what: "timeout_scale",
                            value: u64::from(timeout_scale),
                            max: u64::from(MAX_TIMEOUT_SCALE),
                        });
                    }
                }
                SCRIPT1_KEY | SCRIPT2_KEY => {
                    let stage = StageScript::parse(value)
                        .map_err(|e| WorkloadError::BadScript(format!("luo.{key}: {e}")))?;
                    if key == SCRIPT1_KEY {
                        script.stage1 = stage;
                    } else {
                        script.stage2 = stage;
                    }
                }
                "stage" => {
                    let n = number()?;
                    progress.stage = Stage::from_number(n).ok_or(WorkloadError::BadStage(n))?;
                }
                _ => return Err(WorkloadError::UnknownKey(format!("luo.{key}"))),
            }
        }
        let workload = match mode.unwrap_or("boot") {
            "boot" => Workload::Boot,
            "handover" => Workload::Handover(memfds),
            "scenario" => Workload::Scenario,
            other => match other.strip_prefix("selftest:") {
                Some(name) => Workload::Selftest(Selftest::from_name(name)?),
                None => return Err(WorkloadError::UnknownMode(other.to_owned())),
            },
        };
        Ok(AgentConfig {
            workload: workload.validate()?,
            progress,
            timeout_scale,
            script,
        })
    }
}

/// The command line for the next kernel: `cmdline` without its `luo.stage=` and
/// `luo.round=`, followed by those of `next`.
pub fn next_cmdline(cmdline: &str, next: Progress) -> String {
    let mut out: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|t| !t.starts_with("luo.stage=") && !t.starts_with("luo.round="))
        .collect();
    let tail = format!("luo.stage={} luo.round={}", next.stage, next.round);
    out.push(&tail);
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_luo_parameters() {
        let cfg = AgentConfig::parse("console=ttyS0 reboot=k panic=-1 retain_initrd\n").unwrap();
        assert_eq!(cfg, AgentConfig::default());
    }

    #[test]
    fn rendered_workloads_parse_back() {
        let memfds = Memfds {
            sessions: 3,
            files: 4,
            memfd_size: 2 << 20,
            repeat: 5,
        };
        let mut all = vec![
            Workload::Boot,
            Workload::Handover(memfds),
            Workload::Scenario,
        ];
        all.extend(Selftest::ALL.map(Workload::Selftest));
        for w in all {
            let line = format!("console=ttyS0 {} quiet", w.kernel_params());
            assert_eq!(AgentConfig::parse(&line).unwrap().workload, w, "{line}");
        }
        assert_eq!(
            Workload::Handover(memfds).kernel_params(),
            "liveupdate=1 luo.mode=handover luo.sessions=3 luo.files=4 luo.memfd_size=2097152 luo.repeat=5"
        );
    }

    #[test]
    fn progress_and_sizes() {
        let cfg = AgentConfig::parse("luo.mode=handover luo.stage=2 luo.round=2 luo.memfd_size=2M")
            .unwrap();
        assert_eq!(
            cfg.progress,
            Progress {
                stage: Stage::Two,
                round: 2
            }
        );
        assert_eq!(cfg.timeout_scale, 1);
        let line = format!("luo.mode=selftest:liveupdate {}", timeout_scale_param(20));
        assert_eq!(AgentConfig::parse(&line).unwrap().timeout_scale, 20);
        assert!(AgentConfig::parse("luo.timeout_scale=0").is_err());
        assert_eq!(
            cfg.workload,
            Workload::Handover(Memfds {
                memfd_size: 2 << 20,
                ..Memfds::default()
            })
        );
    }

    #[test]
    fn bounds_are_checked() {
        let out = |what: &'static str, value: u64, max: u64| {
            Err(WorkloadError::OutOfRange { what, value, max })
        };
        let parse = |s: &str| AgentConfig::parse(s).map(|c| c.workload);
        assert_eq!(
            parse("luo.mode=handover luo.files=100000"),
            out("files", 100_000, 999)
        );
        assert_eq!(
            parse("luo.mode=handover luo.sessions=0"),
            out("sessions", 0, 1000)
        );
        assert_eq!(
            parse("luo.mode=handover luo.repeat=0"),
            out("repeat", 0, 1000)
        );
        assert_eq!(
            parse("luo.mode=handover luo.memfd_size=0"),
            out("memfd_size", 0, 1 << 40)
        );
        assert_eq!(
            parse("luo.mode=selftest:no_such_test"),
            Err(WorkloadError::UnknownSelftest("no_such_test".into()))
        );
        assert!(parse("luo.mode=selftest:../bin/sh").is_err());
        assert!(parse("luo.mode=fast").is_err());
        assert!(parse("luo.stage=3").is_err());
        assert!(parse("luo.sessions=x").is_err());
        assert!(parse("luo.memfd_size=1Q").is_err());
        assert!(parse("luo.colour=blue").is_err());
        assert!(parse("luo.stage").is_err());
        // Bounds of a workload that is not run are not checked.
        assert_eq!(parse("luo.files=100000"), Ok(Workload::Boot));
    }

    #[test]
    fn next_cmdline_replaces_stage_and_round() {
        let two = |round| Progress {
            stage: Stage::Two,
            round,
        };
        assert_eq!(
            next_cmdline("console=ttyS0 luo.mode=handover luo.stage=1\n", two(1)),
            "console=ttyS0 luo.mode=handover luo.stage=2 luo.round=1"
        );
        assert_eq!(
            next_cmdline("a luo.round=1 luo.stage=2 b luo.repeat=3", two(2)),
            "a b luo.repeat=3 luo.stage=2 luo.round=2"
        );
        let line = next_cmdline("luo.mode=handover luo.repeat=2", two(1));
        let cfg = AgentConfig::parse(&line).unwrap();
        assert_eq!(cfg.progress, two(1));
    }

    #[test]
    fn selftests_and_tokens() {
        for t in Selftest::ALL {
            assert_eq!(Selftest::from_name(t.name()), Ok(t));
        }
        assert!(!Selftest::Liveupdate.two_stage());
        assert!(Selftest::KexecSimple.two_stage());
        assert_eq!(Memfds::token(2, 7), 2007);
        assert_eq!(Memfds::session_name(3).as_str(), "luo-vmm-s3");
        assert_eq!(Workload::Selftest(Selftest::Liveupdate).handovers(), 0);
    }
}
