//! A scenario's guest workload: for each stage, threads pinned to CPUs, each a list of
//! steps (the LUO uAPI, memfd set-up, kexec, gates, memory pressure). One renderer
//! ([`StageScript`]'s `Display`, on the VMM's side) and one parser ([`StageScript::parse`],
//! on the agent's and wherever a scenario file is read).
//!
//! On the kernel command line a stage is one parameter, `luo.script1=` or `luo.script2=`:
//! threads separated by `;`, each `CPU@STEP,STEP,...`; a step is words joined by `:`
//! (scenario files write them with spaces, which [`Step::parse`] accepts too):
//!
//! ```text
//! luo.script1=0@create:0,memfd:0.0:1M,fill:0.0:write,preserve:0.0,kexec-load,reboot;1@gate:2,close:0
//! ```
//!
//! | step | what the agent does | announced as |
//! | --- | --- | --- |
//! | `create S` | `LIVEUPDATE_IOCTL_CREATE_SESSION` of session S (name [`Memfds::session_name`](crate::workload::Memfds::session_name)) | `create-session` S |
//! | `memfd S.F SIZE` | `memfd_create` and `ftruncate` of file F of session S | `memfd` token |
//! | `fill S.F write\|fallocate\|mmap` | fills it with its pattern (`pwrite`), or allocates it (`fallocate`, no pattern), or writes the pattern through a shared mapping | `fill` token |
//! | `preserve S.F` | `LIVEUPDATE_SESSION_PRESERVE_FD` with token [`Memfds::token`](crate::workload::Memfds::token) | `preserve-fd` token |
//! | `truncate S.F SIZE` | `ftruncate` of memfd S.F to SIZE bytes | `truncate` token |
//! | `close-fd S.F` | `close()` of memfd S.F's descriptor (later steps on it fail with `EBADF`) | `close-fd` token |
//! | `retrieve S` | `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` | `retrieve-session` S |
//! | `retrieve-fd S.F` | `LIVEUPDATE_SESSION_RETRIEVE_FD`, then checks size and pattern | `retrieve-fd`, then `check-data` token |
//! | `finish S` | `LIVEUPDATE_SESSION_FINISH` | `finish-session` S |
//! | `close S` | `close()` of the session fd | `close-session` S |
//! | `kexec-load` | `kexec_file_load` of the next kernel, stage-2 command line | `kexec-load` |
//! | `reboot` | `reboot(LINUX_REBOOT_CMD_KEXEC)` (marks `reboot-requested` first) | `reboot` |
//! | `gate N` | waits until the VMM opens gate N | `gate-wait`/`gate-passed` |
//! | `if N` | runs the thread's next step only if gate N is open now (else skips it); the VMM chooses a step after a snapshot (`luo-vmm explore`) | not announced |
//! | `pressure SIZE` | allocates and touches SIZE bytes of anonymous memory, then frees it | `pressure` bytes |
//!
//! Steps of one thread run in order; a failed step is reported (its errno) and the thread
//! goes on, since a scenario may expect the failure.

use std::fmt;

use crate::probe::Gate;
use crate::session::{parse_size, MAX_FILES, MAX_MEMFD_SIZE, MAX_SESSIONS, TOKENS_PER_SESSION};

/// Most threads in one stage.
pub const MAX_THREADS: usize = 8;
/// Most steps in one thread.
pub const MAX_STEPS: usize = 64;
/// Highest CPU a thread may be pinned to.
pub const MAX_CPU: u16 = 63;
/// Kernel parameter of stage 1's script (without `luo.`).
pub const SCRIPT1_KEY: &str = "script1";
/// Kernel parameter of stage 2's script (without `luo.`).
pub const SCRIPT2_KEY: &str = "script2";

/// A memfd of the scenario: file `file` of session `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    /// Session index.
    pub session: u32,
    /// File index in the session.
    pub file: u32,
}

impl FileId {
    /// The LUO token it is preserved under ([`crate::session::token`]).
    pub fn token(self) -> u64 {
        crate::session::token(self.session, self.file)
    }

    /// The file whose token is `token`.
    pub fn from_token(token: u64) -> Option<FileId> {
        let per = TOKENS_PER_SESSION;
        Some(FileId {
            session: u32::try_from(token / per).ok()?,
            file: u32::try_from(token % per).ok()?,
        })
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.session, self.file)
    }
}

/// How a memfd is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// `pwrite` of the pattern.
    Write,
    /// `fallocate` of the whole size (zeroes; no pattern to check).
    Fallocate,
    /// The pattern written through a `MAP_SHARED` mapping.
    Mmap,
}

impl Fill {
    const fn name(self) -> &'static str {
        match self {
            Fill::Write => "write",
            Fill::Fallocate => "fallocate",
            Fill::Mmap => "mmap",
        }
    }
}

/// One step of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `create S`.
    Create(u32),
    /// `memfd S.F SIZE`.
    Memfd(FileId, u64),
    /// `fill S.F HOW`.
    Fill(FileId, Fill),
    /// `preserve S.F`.
    Preserve(FileId),
    /// `truncate S.F SIZE`: `ftruncate` of the memfd to SIZE bytes (1 ..=
    /// [`MAX_MEMFD_SIZE`]).
    Truncate(FileId, u64),
    /// `close-fd S.F`: `close()` of the memfd's descriptor.
    CloseFd(FileId),
    /// `retrieve S`.
    Retrieve(u32),
    /// `retrieve-fd S.F`.
    RetrieveFd(FileId),
    /// `finish S`.
    Finish(u32),
    /// `close S`.
    Close(u32),
    /// `kexec-load`.
    KexecLoad,
    /// `reboot`.
    Reboot,
    /// `gate N`.
    Gate(Gate),
    /// `if N`: the next step runs only if gate N is open when this step is reached.
    If(Gate),
    /// `pressure SIZE`.
    Pressure(u64),
}

/// Why a script does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError(pub String);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

fn err<T>(msg: String) -> Result<T, ScriptError> {
    Err(ScriptError(msg))
}

fn session(text: &str) -> Result<u32, ScriptError> {
    match text.parse::<u32>() {
        Ok(s) if s < MAX_SESSIONS => Ok(s),
        _ => err(format!(
            "{text:?}: not a session index (0 to {})",
            MAX_SESSIONS - 1
        )),
    }
}

fn file_id(text: &str) -> Result<FileId, ScriptError> {
    let Some((s, f)) = text.split_once('.') else {
        return err(format!("{text:?}: not a file (SESSION.FILE, e.g. 0.1)"));
    };
    let session = session(s)?;
    match f.parse::<u32>() {
        Ok(file) if file < MAX_FILES => Ok(FileId { session, file }),
        _ => err(format!("{text:?}: file index not 0 to {}", MAX_FILES - 1)),
    }
}

fn size(text: &str) -> Result<u64, ScriptError> {
    match parse_size(text) {
        Some(n) if (1..=MAX_MEMFD_SIZE).contains(&n) => Ok(n),
        _ => err(format!("{text:?}: not a size from 1 to 1T (e.g. 4K, 1M)")),
    }
}

fn gate(text: &str) -> Result<Gate, ScriptError> {
    text.parse::<u8>()
        .ok()
        .and_then(Gate::new)
        .ok_or_else(|| ScriptError(format!("{text:?}: not a gate (0 to 63)")))
}

impl Step {
    /// Parses one step, its words separated by `:` or spaces.
    pub fn parse(text: &str) -> Result<Step, ScriptError> {
        let words: Vec<&str> = text
            .split(|c: char| c == ':' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .collect();
        let want = |n: usize| {
            if words.len() == n + 1 {
                Ok(())
            } else {
                err(format!(
                    "{text:?}: `{}` takes {n} argument{}",
                    words.first().copied().unwrap_or(""),
                    if n == 1 { "" } else { "s" }
                ))
            }
        };
        let Some(&verb) = words.first() else {
            return err("an empty step".into());
        };
        let step = match verb {
            "create" => want(1).and_then(|()| Ok(Step::Create(session(words[1])?))),
            "memfd" => want(2).and_then(|()| Ok(Step::Memfd(file_id(words[1])?, size(words[2])?))),
            "fill" => want(2).and_then(|()| {
                let how = match words[2] {
                    "write" => Fill::Write,
                    "fallocate" => Fill::Fallocate,
                    "mmap" => Fill::Mmap,
                    other => return err(format!("{other:?}: fill with write, fallocate or mmap")),
                };
                Ok(Step::Fill(file_id(words[1])?, how))
            }),
            "preserve" => want(1).and_then(|()| Ok(Step::Preserve(file_id(words[1])?))),
            "truncate" => {
                want(2).and_then(|()| Ok(Step::Truncate(file_id(words[1])?, size(words[2])?)))
            }
            "close-fd" => want(1).and_then(|()| Ok(Step::CloseFd(file_id(words[1])?))),
            "retrieve" => want(1).and_then(|()| Ok(Step::Retrieve(session(words[1])?))),
            "retrieve-fd" => want(1).and_then(|()| Ok(Step::RetrieveFd(file_id(words[1])?))),
            "finish" => want(1).and_then(|()| Ok(Step::Finish(session(words[1])?))),
            "close" => want(1).and_then(|()| Ok(Step::Close(session(words[1])?))),
            "kexec-load" => want(0).map(|()| Step::KexecLoad),
            "reboot" => want(0).map(|()| Step::Reboot),
            "gate" => want(1).and_then(|()| Ok(Step::Gate(gate(words[1])?))),
            "if" => want(1).and_then(|()| Ok(Step::If(gate(words[1])?))),
            "pressure" => want(1).and_then(|()| Ok(Step::Pressure(size(words[1])?))),
            other => err(format!(
                "{other:?}: unknown step (create, memfd, fill, preserve, truncate, close-fd, \
                 retrieve, retrieve-fd, finish, close, kexec-load, reboot, gate, if, pressure)"
            )),
        }?;
        Ok(step)
    }
}

impl fmt::Display for Step {
    /// The wire form (`:`-separated).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Create(s) => write!(f, "create:{s}"),
            Step::Memfd(id, size) => write!(f, "memfd:{id}:{size}"),
            Step::Fill(id, how) => write!(f, "fill:{id}:{}", how.name()),
            Step::Preserve(id) => write!(f, "preserve:{id}"),
            Step::Truncate(id, size) => write!(f, "truncate:{id}:{size}"),
            Step::CloseFd(id) => write!(f, "close-fd:{id}"),
            Step::Retrieve(s) => write!(f, "retrieve:{s}"),
            Step::RetrieveFd(id) => write!(f, "retrieve-fd:{id}"),
            Step::Finish(s) => write!(f, "finish:{s}"),
            Step::Close(s) => write!(f, "close:{s}"),
            Step::KexecLoad => f.write_str("kexec-load"),
            Step::Reboot => f.write_str("reboot"),
            Step::Gate(g) => write!(f, "gate:{}", g.id()),
            Step::If(g) => write!(f, "if:{}", g.id()),
            Step::Pressure(n) => write!(f, "pressure:{n}"),
        }
    }
}

/// One thread of a stage: the CPU it is pinned to and its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    /// CPU number, 0 ..= [`MAX_CPU`].
    pub cpu: u16,
    /// Steps, in order; 1 ..= [`MAX_STEPS`].
    pub steps: Vec<Step>,
}

/// What the agent does in one stage: its threads, started together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StageScript {
    /// 0 ..= [`MAX_THREADS`] threads.
    pub threads: Vec<Thread>,
}

impl StageScript {
    /// Checks the bounds and that every `retrieve-fd`/`fill`/`preserve` names a file
    /// of a session index within bounds (done by the step parser).
    pub fn validate(&self) -> Result<(), ScriptError> {
        if self.threads.len() > MAX_THREADS {
            return err(format!(
                "{} threads: at most {MAX_THREADS}",
                self.threads.len()
            ));
        }
        for t in &self.threads {
            if t.cpu > MAX_CPU {
                return err(format!("CPU {}: at most {MAX_CPU}", t.cpu));
            }
            if t.steps.is_empty() || t.steps.len() > MAX_STEPS {
                return err(format!(
                    "a thread of {} steps: 1 to {MAX_STEPS}",
                    t.steps.len()
                ));
            }
            if matches!(t.steps.last(), Some(Step::If(_))) {
                return err(format!(
                    "the thread on CPU {} ends with `if`: it must be followed by the step it guards",
                    t.cpu
                ));
            }
        }
        Ok(())
    }

    /// Parses the wire form (the value of `luo.script1=`/`luo.script2=`).
    pub fn parse(text: &str) -> Result<StageScript, ScriptError> {
        let mut threads = Vec::new();
        for part in text.split(';').filter(|p| !p.is_empty()) {
            if threads.len() == MAX_THREADS {
                return err(format!("more than {MAX_THREADS} threads"));
            }
            let Some((cpu, steps)) = part.split_once('@') else {
                return err(format!("{part:?}: a thread is CPU@STEP,STEP,..."));
            };
            let cpu = cpu
                .parse::<u16>()
                .map_err(|_| ScriptError(format!("{cpu:?}: not a CPU number")))?;
            let steps = steps
                .split(',')
                .take(MAX_STEPS + 1)
                .map(Step::parse)
                .collect::<Result<Vec<_>, _>>()?;
            threads.push(Thread { cpu, steps });
        }
        let script = StageScript { threads };
        script.validate()?;
        Ok(script)
    }

    /// Whether any thread of the stage calls `reboot`.
    pub fn reboots(&self) -> bool {
        self.threads.iter().any(|t| t.steps.contains(&Step::Reboot))
    }
}

impl fmt::Display for StageScript {
    /// The wire form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.threads.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{}@", t.cpu)?;
            for (j, s) in t.steps.iter().enumerate() {
                if j > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{s}")?;
            }
        }
        Ok(())
    }
}

/// A whole scenario workload: stage 1 (before the handover) and stage 2 (in the next
/// kernel).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    /// Before the handover.
    pub stage1: StageScript,
    /// In the next kernel.
    pub stage2: StageScript,
}

impl Script {
    /// The kernel parameters that carry it (`luo.script1=... luo.script2=...`).
    pub fn kernel_params(&self) -> String {
        format!(
            "luo.{SCRIPT1_KEY}={} luo.{SCRIPT2_KEY}={}",
            self.stage1, self.stage2
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(session: u32, file: u32) -> FileId {
        FileId { session, file }
    }

    #[test]
    fn a_stage_round_trips_through_its_wire_form() {
        let script = StageScript {
            threads: vec![
                Thread {
                    cpu: 0,
                    steps: vec![
                        Step::Create(0),
                        Step::Memfd(id(0, 1), 1 << 20),
                        Step::Fill(id(0, 1), Fill::Mmap),
                        Step::Preserve(id(0, 1)),
                        Step::KexecLoad,
                        Step::Gate(Gate::new(1).unwrap()),
                        Step::Reboot,
                    ],
                },
                Thread {
                    cpu: 1,
                    steps: vec![
                        Step::Gate(Gate::new(2).unwrap()),
                        Step::If(Gate::new(10).unwrap()),
                        Step::Close(0),
                        Step::Pressure(4096),
                        Step::Truncate(id(0, 1), 32 << 10),
                        Step::CloseFd(id(0, 1)),
                    ],
                },
            ],
        };
        let wire = script.to_string();
        assert_eq!(
            wire,
            "0@create:0,memfd:0.1:1048576,fill:0.1:mmap,preserve:0.1,kexec-load,gate:1,reboot;\
             1@gate:2,if:10,close:0,pressure:4096,truncate:0.1:32768,close-fd:0.1"
        );
        assert_eq!(StageScript::parse(&wire).unwrap(), script);
        assert!(script.reboots());
        assert_eq!(StageScript::parse("").unwrap(), StageScript::default());
    }

    #[test]
    fn steps_parse_with_spaces_or_colons() {
        assert_eq!(
            Step::parse("memfd 2.3 64K"),
            Ok(Step::Memfd(id(2, 3), 64 << 10))
        );
        assert_eq!(
            Step::parse("memfd:2.3:64K"),
            Ok(Step::Memfd(id(2, 3), 64 << 10))
        );
        assert_eq!(
            Step::parse("  retrieve-fd   1.0 "),
            Ok(Step::RetrieveFd(id(1, 0)))
        );
        assert_eq!(
            Step::parse("fill 0.0 fallocate"),
            Ok(Step::Fill(id(0, 0), Fill::Fallocate))
        );
        assert_eq!(
            Step::parse("truncate 0.2 32K"),
            Ok(Step::Truncate(id(0, 2), 32 << 10))
        );
        assert_eq!(
            Step::parse("truncate:0.2:32768"),
            Ok(Step::Truncate(id(0, 2), 32 << 10))
        );
        assert_eq!(Step::parse("close-fd 3.1"), Ok(Step::CloseFd(id(3, 1))));
    }

    #[test]
    fn file_operations_round_trip_through_both_forms() {
        for step in [
            Step::Truncate(id(1, 4), 1),
            Step::Truncate(id(0, 0), MAX_MEMFD_SIZE),
            Step::CloseFd(id(2, 7)),
        ] {
            let wire = step.to_string();
            assert_eq!(Step::parse(&wire), Ok(step), "{wire}");
            // A scenario file's form: the words separated by spaces.
            assert_eq!(Step::parse(&wire.replace(':', " ")), Ok(step), "{wire}");
        }
    }

    #[test]
    fn bad_steps_and_scripts_are_refused() {
        for bad in [
            "",
            "create",
            "create x",
            "create 1000",
            "create 1 2",
            "memfd 0 1M",
            "memfd 0.999 1M",
            "memfd 0.0 0",
            "memfd 0.0 2T",
            "fill 0.0 splice",
            "truncate",
            "truncate 0.0",
            "truncate 0.0 0",
            "truncate 0.0 2T",
            "truncate 0 1M",
            "truncate 0.0 1M 2",
            "close-fd",
            "close-fd 0",
            "close-fd 0.999",
            "close-fd 0.0 0.1",
            "gate 64",
            "if",
            "if 64",
            "reboot now",
            "dance",
        ] {
            assert!(Step::parse(bad).is_err(), "{bad:?}");
        }
        assert!(StageScript::parse("create:0").is_err(), "no CPU");
        assert!(StageScript::parse("64@reboot").is_err(), "CPU too high");
        assert!(StageScript::parse("0@").is_err(), "an empty step");
        let many = ["0@reboot"; MAX_THREADS + 1].join(";");
        assert!(StageScript::parse(&many).is_err());
        let long = format!("0@{}", ["reboot"; MAX_STEPS + 1].join(","));
        assert!(StageScript::parse(&long).is_err());
        let dangling = StageScript::parse("1@gate:2,if:10").unwrap_err();
        assert!(dangling.0.contains("ends with `if`"), "{dangling}");
    }

    #[test]
    fn tokens_map_back_to_files() {
        assert_eq!(id(2, 7).token(), 2007);
        assert_eq!(FileId::from_token(2007), Some(id(2, 7)));
    }
}
