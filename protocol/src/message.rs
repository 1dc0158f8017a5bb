//! What the agent tells the VMM: one [`Message`] per frame, its kind byte and payload.
//!
//! Payload fields are little-endian and fixed-size, except a session name, which is the
//! rest of its payload. Each kind has exactly one payload length (a name: a range); a
//! frame of the wrong length, an unknown kind, or a field value outside its enum is a
//! [`DecodeError`], never a panic. The table of docs/protocol.md lists every kind. The
//! VMM's [`Decoder`] reassembles frames from the bytes written to the probe window
//! ([`crate::probe`]) and decodes them.

use std::fmt;

use crate::mark::Mark;
use crate::probe::{Frame, Gate, FRAME_HEADER, MAX_FRAME, MAX_PAYLOAD};
use crate::tap::TapCounts;
use crate::workload::Stage;
// Its old path: luo-vmm names it `luo_protocol::message::SessionName`.
pub use crate::session::SessionName;

/// Message kinds (the first byte of a frame).
pub mod kind {
    /// [`super::Message::UserspaceUp`].
    pub const USERSPACE_UP: u8 = 0x01;
    /// [`super::Message::RebootRequested`].
    pub const REBOOT_REQUESTED: u8 = 0x02;
    /// [`super::Message::WorkloadResumed`].
    pub const WORKLOAD_RESUMED: u8 = 0x03;
    /// [`super::Message::Boot`].
    pub const BOOT: u8 = 0x04;
    /// [`super::Message::Verdict`].
    pub const VERDICT: u8 = 0x10;
    /// [`super::Message::Verified`].
    pub const VERIFIED: u8 = 0x11;
    /// [`super::Message::Selftest`].
    pub const SELFTEST: u8 = 0x12;
    /// [`super::Message::InventorySession`].
    pub const INVENTORY_SESSION: u8 = 0x20;
    /// [`super::Message::InventoryFile`].
    pub const INVENTORY_FILE: u8 = 0x21;
    /// [`super::Message::InventoryEnd`].
    pub const INVENTORY_END: u8 = 0x22;
    /// [`super::Message::ActionStart`].
    pub const ACTION_START: u8 = 0x30;
    /// [`super::Message::ActionResult`].
    pub const ACTION_RESULT: u8 = 0x31;
    /// [`super::Message::GateWait`].
    pub const GATE_WAIT: u8 = 0x40;
    /// [`super::Message::GatePassed`].
    pub const GATE_PASSED: u8 = 0x41;
    /// [`super::Message::DataFound`].
    pub const DATA_FOUND: u8 = 0x13;
}

/// Whose bytes a page of a retrieved memfd held, when they were not its own (found by
/// matching the page against every memfd pattern of the workload: the patterns are
/// unique per round, session, file and offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// Another (or the same) memfd's bytes: that memfd's pattern at `offset`.
    Pattern {
        /// Handovers done when that memfd was written.
        round: u32,
        /// Its session's index in the workload.
        session: u32,
        /// Its file's index in the session.
        file: u32,
        /// The byte offset in it where the page's bytes belong.
        offset: u64,
    },
    /// Zeros.
    Zeros,
    /// Bytes of no memfd of the workload.
    Unknown,
}

impl fmt::Display for Whose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Whose::Pattern {
                round,
                session,
                file,
                offset,
            } => write!(
                f,
                "session {session} file {file} offset {offset:#x} (as written for handover {round})"
            ),
            Whose::Zeros => f.write_str("zeros"),
            Whose::Unknown => f.write_str("bytes of no memfd of the workload"),
        }
    }
}

/// Whether the agent's work passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything the agent was asked to do passed.
    Pass,
    /// Something failed; [`AgentVerdict::step`] says what.
    Fail,
}

/// Where the agent's work failed (or [`FailedStep::None`] when it passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedStep {
    /// Nothing failed.
    None,
    /// The `luo.*` command line is wrong.
    Config,
    /// `open("/dev/liveupdate")`.
    OpenLuo,
    /// `LIVEUPDATE_IOCTL_CREATE_SESSION`.
    CreateSession,
    /// `memfd_create` or `ftruncate`.
    Memfd,
    /// Writing a memfd's pattern.
    Write,
    /// `LIVEUPDATE_SESSION_PRESERVE_FD`.
    Preserve,
    /// `kexec_file_load`.
    KexecLoad,
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)` returned.
    Reboot,
    /// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`.
    RetrieveSession,
    /// `LIVEUPDATE_SESSION_RETRIEVE_FD`.
    RetrieveFd,
    /// A retrieved memfd has the wrong size.
    Size,
    /// A retrieved memfd's bytes differ from the pattern.
    Data,
    /// `LIVEUPDATE_SESSION_FINISH`.
    Finish,
    /// A selftest failed or could not run.
    Selftest,
    /// A gate stayed closed past the agent's limit.
    Gate,
    /// The agent panicked.
    Panic,
}

impl FailedStep {
    const ALL: [FailedStep; 17] = [
        FailedStep::None,
        FailedStep::Config,
        FailedStep::OpenLuo,
        FailedStep::CreateSession,
        FailedStep::Memfd,
        FailedStep::Write,
        FailedStep::Preserve,
        FailedStep::KexecLoad,
        FailedStep::Reboot,
        FailedStep::RetrieveSession,
        FailedStep::RetrieveFd,
        FailedStep::Size,
        FailedStep::Data,
        FailedStep::Finish,
        FailedStep::Selftest,
        FailedStep::Gate,
        FailedStep::Panic,
    ];

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The step with wire code `code`.
    pub fn from_code(code: u8) -> Option<FailedStep> {
        FailedStep::ALL.get(usize::from(code)).copied()
    }

    /// A kebab-case name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            FailedStep::None => "none",
            FailedStep::Config => "config",
            FailedStep::OpenLuo => "open-luo",
            FailedStep::CreateSession => "create-session",
            FailedStep::Memfd => "memfd",
            FailedStep::Write => "write",
            FailedStep::Preserve => "preserve",
            FailedStep::KexecLoad => "kexec-load",
            FailedStep::Reboot => "reboot",
            FailedStep::RetrieveSession => "retrieve-session",
            FailedStep::RetrieveFd => "retrieve-fd",
            FailedStep::Size => "size",
            FailedStep::Data => "data",
            FailedStep::Finish => "finish",
            FailedStep::Selftest => "selftest",
            FailedStep::Gate => "gate",
            FailedStep::Panic => "panic",
        }
    }
}

/// The agent's final word on a boot's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentVerdict {
    /// Pass or fail.
    pub outcome: Outcome,
    /// What failed ([`FailedStep::None`] on a pass).
    pub step: FailedStep,
    /// The errno of the failed call, 0 when there is none.
    pub errno: i32,
}

impl AgentVerdict {
    /// A pass.
    pub const PASS: AgentVerdict = AgentVerdict {
        outcome: Outcome::Pass,
        step: FailedStep::None,
        errno: 0,
    };

    /// A failure at `step` with `errno` (0 when no system call failed).
    pub const fn fail(step: FailedStep, errno: i32) -> AgentVerdict {
        AgentVerdict {
            outcome: Outcome::Fail,
            step,
            errno,
        }
    }

    /// Whether it is a pass.
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Pass
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// Exited with 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit status {c}"),
            ExitStatus::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// One run of a kernel selftest binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelftestResult {
    /// `--stage` it ran with; `None` for a single-stage test.
    pub stage: Option<Stage>,
    /// How it ended.
    pub status: ExitStatus,
    /// Its TAP counts.
    pub tap: TapCounts,
}

/// Something the agent does that the VMM may want to see begin and end (the LUO uAPI,
/// kexec, a selftest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `LIVEUPDATE_IOCTL_CREATE_SESSION`; arg: session index.
    CreateSession,
    /// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`; arg: session index.
    RetrieveSession,
    /// `LIVEUPDATE_SESSION_PRESERVE_FD`; arg: token.
    PreserveFd,
    /// `LIVEUPDATE_SESSION_RETRIEVE_FD`; arg: token.
    RetrieveFd,
    /// `LIVEUPDATE_SESSION_FINISH`; arg: session index.
    FinishSession,
    /// `close()` of a session fd; arg: session index.
    CloseSession,
    /// `kexec_file_load`; arg: 0.
    KexecLoad,
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)`; arg: 0. Its result only comes if it failed.
    Reboot,
    /// `memfd_create` and `ftruncate` of a scenario's memfd; arg: its token.
    Memfd,
    /// Filling a memfd (write, fallocate or mmap writes); arg: its token.
    Fill,
    /// Checking a retrieved memfd's size and bytes against its pattern; arg: its token.
    /// Fails with `EBADMSG` on a wrong byte, `EFBIG` on a wrong size.
    CheckData,
    /// Allocating and touching anonymous memory; arg: bytes.
    Pressure,
    /// `ftruncate` of a scenario's memfd (to the step's size, not sent); arg: its token.
    Truncate,
    /// `close()` of a scenario's memfd's descriptor; arg: its token.
    CloseFd,
}

impl Action {
    /// Every action, in wire-code order: a new action is appended, never inserted (the
    /// codes of the others must not change).
    const ALL: [Action; 14] = [
        Action::CreateSession,
        Action::RetrieveSession,
        Action::PreserveFd,
        Action::RetrieveFd,
        Action::FinishSession,
        Action::CloseSession,
        Action::KexecLoad,
        Action::Reboot,
        Action::Memfd,
        Action::Fill,
        Action::CheckData,
        Action::Pressure,
        Action::Truncate,
        Action::CloseFd,
    ];

    /// The wire code (1-based; 0 is never an action).
    pub const fn code(self) -> u8 {
        self as u8 + 1
    }

    /// The action with wire code `code`.
    pub fn from_code(code: u8) -> Option<Action> {
        Action::ALL.get(usize::from(code.checked_sub(1)?)).copied()
    }

    /// The action named `name` (its [`Action::name`]).
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether its argument is a memfd's token (`S.F` in scenario files), not a session
    /// index or a number.
    pub const fn arg_is_token(self) -> bool {
        matches!(
            self,
            Action::PreserveFd
                | Action::RetrieveFd
                | Action::Memfd
                | Action::Fill
                | Action::CheckData
                | Action::Truncate
                | Action::CloseFd
        )
    }

    /// Every action's name, comma-separated (for error messages).
    pub fn names() -> String {
        Action::ALL.map(Action::name).join(", ")
    }

    /// A kebab-case name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Action::CreateSession => "create-session",
            Action::RetrieveSession => "retrieve-session",
            Action::PreserveFd => "preserve-fd",
            Action::RetrieveFd => "retrieve-fd",
            Action::FinishSession => "finish-session",
            Action::CloseSession => "close-session",
            Action::KexecLoad => "kexec-load",
            Action::Reboot => "reboot",
            Action::Memfd => "memfd",
            Action::Fill => "fill",
            Action::CheckData => "check-data",
            Action::Pressure => "pressure",
            Action::Truncate => "truncate",
            Action::CloseFd => "close-fd",
        }
    }
}

/// One message from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Mark `userspace-up`: the agent runs (every boot), with the online CPU count.
    UserspaceUp {
        /// CPUs online (`/sys/devices/system/cpu/online`).
        cpus_online: u16,
    },
    /// Mark `reboot-requested`: `reboot(KEXEC)` follows.
    RebootRequested,
    /// Mark `workload-resumed`: stage 2 retrieved and verified everything.
    WorkloadResumed,
    /// What this boot is in the agent's work (sent once the command line parsed).
    Boot {
        /// Before (1) or after (2) a handover.
        stage: Stage,
        /// Handovers done before this boot.
        round: u32,
    },
    /// The agent's verdict, just before its final reboot.
    Verdict(AgentVerdict),
    /// Stage 2 checked every byte it had preserved.
    Verified {
        /// Sessions retrieved.
        sessions: u32,
        /// memfds retrieved, over all sessions.
        files: u32,
        /// Bytes checked.
        bytes: u64,
    },
    /// A selftest binary ended.
    Selftest(SelftestResult),
    /// Stage-1 inventory: a session the agent preserved.
    InventorySession {
        /// The session's index in the workload.
        session: u32,
        /// Its LUO name.
        name: SessionName,
    },
    /// Stage-1 inventory: a file the agent preserved.
    InventoryFile {
        /// Index of its session.
        session: u32,
        /// Its LUO token.
        token: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// Stage-1 inventory complete: totals of what was sent before it.
    InventoryEnd {
        /// Sessions.
        sessions: u32,
        /// Files.
        files: u32,
        /// Bytes.
        bytes: u64,
    },
    /// The agent is about to do `action`.
    ActionStart {
        /// The agent's sequence number, shared by the result.
        seq: u32,
        /// What.
        action: Action,
        /// Its argument (see [`Action`]).
        arg: u64,
    },
    /// `action` returned.
    ActionResult {
        /// Sequence number of its [`Message::ActionStart`].
        seq: u32,
        /// What.
        action: Action,
        /// Return value (-1 on failure for system calls).
        ret: i64,
        /// errno, 0 on success.
        errno: i32,
    },
    /// Stage 2 read a page of a retrieved memfd that is not its pattern.
    DataFound {
        /// Session index of the memfd read.
        session: u32,
        /// File index of the memfd read.
        file: u32,
        /// Byte offset of the page (4 KiB aligned).
        offset: u64,
        /// Whose bytes the page held.
        whose: Whose,
    },
    /// The agent waits at a gate (it polls the gate's register).
    GateWait(Gate),
    /// The agent saw the gate open and went on.
    GatePassed(Gate),
}

/// Why bytes written to the probe are not a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A new frame began before this one was complete.
    Truncated {
        /// Kind byte of the unfinished frame.
        kind: u8,
        /// Bytes it had.
        got: usize,
    },
    /// A byte at an offset that is not the next one.
    OutOfSequence {
        /// Window offset written.
        offset: usize,
        /// Offset expected.
        expected: usize,
    },
    /// A payload length that does not fit the window.
    TooLong {
        /// Kind byte.
        kind: u8,
        /// Declared payload length.
        len: usize,
    },
    /// A kind byte no message has.
    UnknownKind(u8),
    /// A payload of the wrong length for its kind.
    BadLength {
        /// Kind byte.
        kind: u8,
        /// Payload length.
        len: usize,
    },
    /// A field outside its range.
    BadField {
        /// Kind byte.
        kind: u8,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: i64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { kind, got } => {
                write!(f, "frame of kind {kind:#04x} cut after {got} bytes")
            }
            DecodeError::OutOfSequence { offset, expected } => {
                write!(f, "byte at offset {offset}, expected offset {expected}")
            }
            DecodeError::TooLong { kind, len } => {
                write!(
                    f,
                    "kind {kind:#04x}: payload of {len} bytes exceeds {MAX_PAYLOAD}"
                )
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown message kind {k:#04x}"),
            DecodeError::BadLength { kind, len } => {
                write!(
                    f,
                    "kind {kind:#04x}: payload of {len} bytes is the wrong size"
                )
            }
            DecodeError::BadField { kind, field, value } => {
                write!(f, "kind {kind:#04x}: {field} = {value} is out of range")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Little-endian payload builder (payloads are short; a fixed buffer).
struct Writer {
    buf: [u8; MAX_PAYLOAD],
    len: usize,
}

impl Writer {
    fn new() -> Self {
        Writer {
            buf: [0; MAX_PAYLOAD],
            len: 0,
        }
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        // Every message's payload is at most MAX_PAYLOAD (checked by the size test);
        // `min` keeps a mistake from panicking.
        let n = b.len().min(MAX_PAYLOAD - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        self
    }

    fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }

    fn u16(self, v: u16) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn i32(self, v: i32) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn i64(self, v: i64) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn frame(self, kind: u8) -> Frame {
        Frame::truncating(kind, &self.buf[..self.len])
    }
}

/// Little-endian payload reader.
struct Reader<'a> {
    kind: u8,
    rest: &'a [u8],
    len: usize,
}

impl<'a> Reader<'a> {
    fn new(kind: u8, payload: &'a [u8]) -> Self {
        Reader {
            kind,
            rest: payload,
            len: payload.len(),
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::BadLength {
                kind: self.kind,
                len: self.len,
            })?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take().map(u32::from_le_bytes)
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.take().map(i32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.take().map(i64::from_le_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn bad(&self, field: &'static str, value: impl Into<i64>) -> DecodeError {
        DecodeError::BadField {
            kind: self.kind,
            field,
            value: value.into(),
        }
    }

    fn stage(&mut self) -> Result<Stage, DecodeError> {
        let v = self.u8()?;
        Stage::from_number(u32::from(v)).ok_or_else(|| self.bad("stage", v))
    }

    fn gate(&mut self) -> Result<Gate, DecodeError> {
        let v = self.u8()?;
        Gate::new(v).ok_or_else(|| self.bad("gate", v))
    }

    fn action(&mut self) -> Result<Action, DecodeError> {
        let v = self.u8()?;
        Action::from_code(v).ok_or_else(|| self.bad("action", v))
    }

    /// Succeeds only if the whole payload was read.
    fn end(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::BadLength {
                kind: self.kind,
                len: self.len,
            })
        }
    }
}

impl Message {
    /// The handover mark this message is, if it is one.
    pub fn mark(&self) -> Option<Mark> {
        match self {
            Message::UserspaceUp { .. } => Some(Mark::UserspaceUp),
            Message::RebootRequested => Some(Mark::RebootRequested),
            Message::WorkloadResumed => Some(Mark::WorkloadResumed),
            _ => None,
        }
    }

    /// The kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Message::UserspaceUp { .. } => kind::USERSPACE_UP,
            Message::RebootRequested => kind::REBOOT_REQUESTED,
            Message::WorkloadResumed => kind::WORKLOAD_RESUMED,
            Message::Boot { .. } => kind::BOOT,
            Message::Verdict(_) => kind::VERDICT,
            Message::Verified { .. } => kind::VERIFIED,
            Message::Selftest(_) => kind::SELFTEST,
            Message::InventorySession { .. } => kind::INVENTORY_SESSION,
            Message::InventoryFile { .. } => kind::INVENTORY_FILE,
            Message::InventoryEnd { .. } => kind::INVENTORY_END,
            Message::ActionStart { .. } => kind::ACTION_START,
            Message::ActionResult { .. } => kind::ACTION_RESULT,
            Message::GateWait(_) => kind::GATE_WAIT,
            Message::GatePassed(_) => kind::GATE_PASSED,
            Message::DataFound { .. } => kind::DATA_FOUND,
        }
    }

    /// The frame that carries this message.
    pub fn encode(&self) -> Frame {
        let w = Writer::new();
        let w = match self {
            Message::UserspaceUp { cpus_online } => w.u16(*cpus_online),
            Message::RebootRequested | Message::WorkloadResumed => w,
            Message::Boot { stage, round } => w.u8(stage.number()).u32(*round),
            Message::Verdict(v) => w
                .u8(match v.outcome {
                    Outcome::Pass => 0,
                    Outcome::Fail => 1,
                })
                .u8(v.step.code())
                .i32(v.errno),
            Message::Verified {
                sessions,
                files,
                bytes,
            }
            | Message::InventoryEnd {
                sessions,
                files,
                bytes,
            } => w.u32(*sessions).u32(*files).u64(*bytes),
            Message::Selftest(r) => {
                let (status_kind, value) = match r.status {
                    ExitStatus::Exited(c) => (0, c),
                    ExitStatus::Signaled(s) => (1, s),
                };
                let t = r.tap;
                w.u8(r.stage.map_or(0, Stage::number))
                    .u8(status_kind)
                    .i32(value)
                    .u32(t.pass)
                    .u32(t.fail)
                    .u32(t.skip)
                    .u32(t.xfail)
                    .u32(t.xpass)
                    .u32(t.error)
            }
            Message::InventorySession { session, name } => {
                w.u32(*session).bytes(name.as_str().as_bytes())
            }
            Message::InventoryFile {
                session,
                token,
                size,
            } => w.u32(*session).u64(*token).u64(*size),
            Message::ActionStart { seq, action, arg } => w.u32(*seq).u8(action.code()).u64(*arg),
            Message::ActionResult {
                seq,
                action,
                ret,
                errno,
            } => w.u32(*seq).u8(action.code()).i64(*ret).i32(*errno),
            Message::GateWait(g) | Message::GatePassed(g) => w.u8(g.id()),
            Message::DataFound {
                session,
                file,
                offset,
                whose,
            } => {
                let w = w.u32(*session).u32(*file).u64(*offset);
                match *whose {
                    Whose::Pattern {
                        round,
                        session,
                        file,
                        offset,
                    } => w.u8(2).u32(round).u32(session).u32(file).u64(offset),
                    Whose::Zeros => w.u8(1).u32(0).u32(0).u32(0).u64(0),
                    Whose::Unknown => w.u8(0).u32(0).u32(0).u32(0).u64(0),
                }
            }
        };
        w.frame(self.kind())
    }

    /// Decodes the payload of a frame of `kind`. Total: every input gives a message or
    /// an error.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(kind, payload);
        let msg = match kind {
            kind::USERSPACE_UP => Message::UserspaceUp {
                cpus_online: r.u16()?,
            },
            kind::REBOOT_REQUESTED => Message::RebootRequested,
            kind::WORKLOAD_RESUMED => Message::WorkloadResumed,
            kind::BOOT => Message::Boot {
                stage: r.stage()?,
                round: r.u32()?,
            },
            kind::VERDICT => {
                let outcome = match r.u8()? {
                    0 => Outcome::Pass,
                    1 => Outcome::Fail,
                    v => return Err(r.bad("outcome", v)),
                };
                let code = r.u8()?;
                let step = FailedStep::from_code(code).ok_or_else(|| r.bad("step", code))?;
                Message::Verdict(AgentVerdict {
                    outcome,
                    step,
                    errno: r.i32()?,
                })
            }
            kind::VERIFIED | kind::INVENTORY_END => {
                let (sessions, files, bytes) = (r.u32()?, r.u32()?, r.u64()?);
                if kind == kind::VERIFIED {
                    Message::Verified {
                        sessions,
                        files,
                        bytes,
                    }
                } else {
                    Message::InventoryEnd {
                        sessions,
                        files,
                        bytes,
                    }
                }
            }
            kind::SELFTEST => {
                let stage = match r.u8()? {
                    0 => None,
                    v => Some(Stage::from_number(u32::from(v)).ok_or_else(|| r.bad("stage", v))?),
                };
                let status = match (r.u8()?, r.i32()?) {
                    (0, c) => ExitStatus::Exited(c),
                    (1, s) => ExitStatus::Signaled(s),
                    (k, _) => return Err(r.bad("status kind", k)),
                };
                let tap = TapCounts {
                    pass: r.u32()?,
                    fail: r.u32()?,
                    skip: r.u32()?,
                    xfail: r.u32()?,
                    xpass: r.u32()?,
                    error: r.u32()?,
                };
                Message::Selftest(SelftestResult { stage, status, tap })
            }
            kind::INVENTORY_SESSION => {
                let session = r.u32()?;
                let raw = r.rest();
                let name = std::str::from_utf8(raw)
                    .ok()
                    .and_then(SessionName::new)
                    .ok_or_else(|| {
                        r.bad(
                            "session name length",
                            i64::try_from(raw.len()).unwrap_or(-1),
                        )
                    })?;
                Message::InventorySession { session, name }
            }
            kind::INVENTORY_FILE => Message::InventoryFile {
                session: r.u32()?,
                token: r.u64()?,
                size: r.u64()?,
            },
            kind::ACTION_START => Message::ActionStart {
                seq: r.u32()?,
                action: r.action()?,
                arg: r.u64()?,
            },
            kind::ACTION_RESULT => Message::ActionResult {
                seq: r.u32()?,
                action: r.action()?,
                ret: r.i64()?,
                errno: r.i32()?,
            },
            kind::GATE_WAIT => Message::GateWait(r.gate()?),
            kind::GATE_PASSED => Message::GatePassed(r.gate()?),
            kind::DATA_FOUND => {
                let (session, file, offset) = (r.u32()?, r.u32()?, r.u64()?);
                let tag = r.u8()?;
                let (round, s, f, o) = (r.u32()?, r.u32()?, r.u32()?, r.u64()?);
                let whose = match tag {
                    0 => Whose::Unknown,
                    1 => Whose::Zeros,
                    2 => Whose::Pattern {
                        round,
                        session: s,
                        file: f,
                        offset: o,
                    },
                    v => return Err(r.bad("whose", v)),
                };
                Message::DataFound {
                    session,
                    file,
                    offset,
                    whose,
                }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.end()?;
        Ok(msg)
    }
}

/// What one byte fed to the [`Decoder`] completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// The frame is not complete yet.
    Pending,
    /// A frame ended: the message, or why it is not one.
    Done(Result<Message, DecodeError>),
}

/// Reassembles frames from the bytes written to the probe window and decodes them. Bounded:
/// one [`MAX_FRAME`] buffer, no allocation per byte, no panic on any input.
#[derive(Clone)]
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder waiting for the first byte of a frame.
    pub const fn new() -> Self {
        Decoder {
            buf: [0; MAX_FRAME],
            len: 0,
        }
    }

    /// Whether a frame has begun and not ended.
    pub fn in_frame(&self) -> bool {
        self.len > 0
    }

    /// The bytes of the frame begun and not ended (empty between frames): what a
    /// snapshot keeps, and feeds again at offsets 0.. ([`Decoder::feed_frame`]) to put a
    /// new decoder in the same state.
    pub fn pending(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Feeds the byte the guest wrote at window `offset`. A byte at offset 0 starts a new
    /// frame; if one was unfinished, it is reported as [`DecodeError::Truncated`] and the
    /// new frame begins with this byte.
    pub fn feed(&mut self, offset: u16, byte: u8) -> Feed {
        let offset = usize::from(offset);
        if offset == 0 {
            let unfinished = self.unfinished();
            self.buf[0] = byte;
            self.len = 1;
            return match unfinished {
                Some(e) => Feed::Done(Err(e)),
                None => Feed::Pending,
            };
        }
        if offset != self.len || offset >= MAX_FRAME {
            let e = DecodeError::OutOfSequence {
                offset,
                expected: self.len,
            };
            self.len = 0;
            return Feed::Done(Err(e));
        }
        self.buf[offset] = byte;
        self.len += 1;
        if self.len < FRAME_HEADER {
            return Feed::Pending;
        }
        let want = FRAME_HEADER + usize::from(self.buf[1]);
        if want > MAX_FRAME {
            self.len = 0;
            return Feed::Done(Err(DecodeError::TooLong {
                kind: self.buf[0],
                len: usize::from(self.buf[1]),
            }));
        }
        if self.len < want {
            return Feed::Pending;
        }
        self.len = 0;
        Feed::Done(Message::decode(self.buf[0], &self.buf[FRAME_HEADER..want]))
    }

    fn unfinished(&self) -> Option<DecodeError> {
        (self.len > 0).then(|| DecodeError::Truncated {
            kind: self.buf[0],
            got: self.len,
        })
    }

    /// Feeds a whole buffer written at offset 0 (tests, and `pwrite`-like callers);
    /// returns every result it completed.
    pub fn feed_frame(&mut self, bytes: &[u8]) -> Vec<Result<Message, DecodeError>> {
        let mut out = Vec::new();
        for (i, &b) in bytes.iter().enumerate() {
            let Ok(offset) = u16::try_from(i) else {
                break;
            };
            if let Feed::Done(r) = self.feed(offset, b) {
                out.push(r);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::MAX_SESSION_NAME;

    fn samples() -> Vec<Message> {
        let name = SessionName::new(&"n".repeat(MAX_SESSION_NAME)).unwrap();
        vec![
            Message::UserspaceUp { cpus_online: 2 },
            Message::RebootRequested,
            Message::WorkloadResumed,
            Message::Boot {
                stage: Stage::Two,
                round: 7,
            },
            Message::Verdict(AgentVerdict::PASS),
            Message::Verdict(AgentVerdict::fail(FailedStep::Data, 0)),
            Message::Verdict(AgentVerdict::fail(FailedStep::Preserve, 22)),
            Message::Verified {
                sessions: 3,
                files: 6,
                bytes: 48 << 20,
            },
            Message::Selftest(SelftestResult {
                stage: None,
                status: ExitStatus::Exited(1),
                tap: TapCounts {
                    pass: 13,
                    fail: 2,
                    skip: 0,
                    xfail: 0,
                    xpass: 0,
                    error: 0,
                },
            }),
            Message::Selftest(SelftestResult {
                stage: Some(Stage::One),
                status: ExitStatus::Signaled(9),
                tap: TapCounts::default(),
            }),
            Message::InventorySession { session: 4, name },
            Message::InventoryFile {
                session: 4,
                token: 4007,
                size: u64::MAX,
            },
            Message::InventoryEnd {
                sessions: 1,
                files: 1,
                bytes: 1 << 20,
            },
            Message::ActionStart {
                seq: 1,
                action: Action::PreserveFd,
                arg: 4007,
            },
            Message::ActionResult {
                seq: 1,
                action: Action::PreserveFd,
                ret: -1,
                errno: 16,
            },
            Message::DataFound {
                session: 0,
                file: 1,
                offset: 0x3000,
                whose: Whose::Pattern {
                    round: 1,
                    session: 2,
                    file: 0,
                    offset: 0x1000,
                },
            },
            Message::DataFound {
                session: 0,
                file: 0,
                offset: 0,
                whose: Whose::Zeros,
            },
            Message::ActionStart {
                seq: 2,
                action: Action::Truncate,
                arg: 2,
            },
            Message::ActionResult {
                seq: 2,
                action: Action::Truncate,
                ret: -1,
                errno: 1,
            },
            Message::ActionStart {
                seq: u32::MAX,
                action: Action::CloseFd,
                arg: 63_099,
            },
            Message::ActionResult {
                seq: u32::MAX,
                action: Action::CloseFd,
                ret: 0,
                errno: 0,
            },
            Message::GateWait(Gate::BEFORE_REBOOT),
            Message::GatePassed(Gate::new(63).unwrap()),
        ]
    }

    #[test]
    fn every_message_round_trips_through_the_decoder() {
        let mut d = Decoder::new();
        for m in samples() {
            let f = m.encode();
            assert!(f.as_bytes().len() <= MAX_FRAME);
            assert_eq!(f.kind(), m.kind());
            assert_eq!(d.feed_frame(f.as_bytes()), vec![Ok(m.clone())], "{m:?}");
        }
    }

    #[test]
    fn marks_are_the_three_agent_marks() {
        let marks: Vec<Mark> = samples().iter().filter_map(Message::mark).collect();
        assert_eq!(
            marks,
            [
                Mark::UserspaceUp,
                Mark::RebootRequested,
                Mark::WorkloadResumed
            ]
        );
    }

    #[test]
    fn wrong_lengths_kinds_and_fields_are_errors() {
        // One byte short and one byte long, for every sample.
        for m in samples() {
            let f = m.encode();
            let p = f.payload();
            if let Some((_, short)) = p.split_last() {
                if m.kind() != kind::INVENTORY_SESSION || short.len() <= 4 {
                    assert!(Message::decode(m.kind(), short).is_err(), "{m:?} short");
                }
            }
            let mut long = p.to_vec();
            long.push(0);
            assert!(Message::decode(m.kind(), &long).is_err(), "{m:?} long");
        }
        assert_eq!(
            Message::decode(0x7f, &[]),
            Err(DecodeError::UnknownKind(0x7f))
        );
        assert!(matches!(
            Message::decode(kind::BOOT, &[3, 0, 0, 0, 0]),
            Err(DecodeError::BadField { field: "stage", .. })
        ));
        assert!(matches!(
            Message::decode(kind::GATE_WAIT, &[64]),
            Err(DecodeError::BadField { field: "gate", .. })
        ));
        assert!(matches!(
            Message::decode(kind::VERDICT, &[0, 200, 0, 0, 0, 0]),
            Err(DecodeError::BadField { field: "step", .. })
        ));
        assert!(matches!(
            Message::decode(kind::ACTION_START, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::BadField {
                field: "action",
                ..
            })
        ));
        // Session names: not empty, no NUL, valid UTF-8, at most 63 bytes.
        for bad in [&b""[..], b"a\0b", &[0xff, 0xfe], &[b'x'; 64]] {
            let mut p = 0u32.to_le_bytes().to_vec();
            p.extend_from_slice(bad);
            assert!(Message::decode(kind::INVENTORY_SESSION, &p).is_err());
        }
    }

    #[test]
    fn codes_round_trip() {
        for s in FailedStep::ALL {
            assert_eq!(FailedStep::from_code(s.code()), Some(s));
        }
        for a in Action::ALL {
            assert_eq!(Action::from_name(a.name()), Some(a));
            assert_eq!(Action::from_code(a.code()), Some(a));
        }
        assert_eq!(Action::from_code(0), None);
        assert_eq!(Action::from_code(15), None);
        assert_eq!(FailedStep::from_code(17), None);
    }

    #[test]
    fn action_codes_are_stable() {
        // docs/protocol.md's table: a VMM and an agent of different builds must agree, so
        // new actions take new codes and old ones keep theirs.
        let codes: Vec<(u8, &str)> = Action::ALL.iter().map(|a| (a.code(), a.name())).collect();
        assert_eq!(
            codes,
            [
                (1, "create-session"),
                (2, "retrieve-session"),
                (3, "preserve-fd"),
                (4, "retrieve-fd"),
                (5, "finish-session"),
                (6, "close-session"),
                (7, "kexec-load"),
                (8, "reboot"),
                (9, "memfd"),
                (10, "fill"),
                (11, "check-data"),
                (12, "pressure"),
                (13, "truncate"),
                (14, "close-fd"),
            ]
        );
        // The wire bytes of a truncate's start: kind, length, seq, code 13, token.
        let frame = Message::ActionStart {
            seq: 1,
            action: Action::Truncate,
            arg: 2,
        }
        .encode();
        assert_eq!(frame.payload()[4], 13);
        assert!(Action::Truncate.arg_is_token() && Action::CloseFd.arg_is_token());
        assert!(!Action::CloseSession.arg_is_token() && !Action::Pressure.arg_is_token());
    }

    #[test]
    fn a_new_frame_reports_the_unfinished_one() {
        let mut d = Decoder::new();
        let frame = Message::RebootRequested.encode();
        // Only the kind byte of a frame, then a whole frame.
        assert_eq!(d.feed(0, frame.kind()), Feed::Pending);
        let got = d.feed_frame(frame.as_bytes());
        assert_eq!(
            got,
            vec![
                Err(DecodeError::Truncated {
                    kind: frame.kind(),
                    got: 1
                }),
                Ok(Message::RebootRequested)
            ]
        );
        assert!(!d.in_frame());
    }

    #[test]
    fn bytes_out_of_sequence_are_errors_and_resync_at_offset_zero() {
        let mut d = Decoder::new();
        assert_eq!(
            d.feed(5, 1),
            Feed::Done(Err(DecodeError::OutOfSequence {
                offset: 5,
                expected: 0
            }))
        );
        assert_eq!(
            d.feed(u16::MAX, 1),
            Feed::Done(Err(DecodeError::OutOfSequence {
                offset: usize::from(u16::MAX),
                expected: 0
            }))
        );
        let up = Message::UserspaceUp { cpus_online: 2 };
        assert_eq!(d.feed_frame(up.encode().as_bytes()), vec![Ok(up)]);
    }

    #[test]
    fn a_length_past_the_window_is_refused() {
        let mut d = Decoder::new();
        assert_eq!(d.feed(0, 0x01), Feed::Pending);
        assert_eq!(
            d.feed(1, 0xff),
            Feed::Done(Err(DecodeError::TooLong {
                kind: 0x01,
                len: 0xff
            }))
        );
        assert!(!d.in_frame());
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic noise at random offsets, plus whole random frames.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut d = Decoder::new();
        let (mut ok, mut err) = (0, 0);
        for _ in 0..200_000 {
            let [b0, b1, b2, ..] = next().to_le_bytes();
            // Mostly in-sequence bytes, sometimes a jump, sometimes a frame start.
            let offset = match b0 % 8 {
                0 => 0,
                1 => u16::from(b1) * 2,
                _ => u16::try_from(d.len).unwrap_or(0),
            };
            if let Feed::Done(res) = d.feed(offset, b2) {
                match res {
                    Ok(_) => ok += 1,
                    Err(_) => err += 1,
                }
            }
        }
        assert!(err > 0, "noise must produce errors");
        // Whether noise forms valid messages is luck; the decoder must just survive it.
        let _ = ok;
    }
}
