//! `luo.mode=scenario`: runs one stage of a scenario's script (`luo_protocol::script`):
//! its threads start together, each pinned to its CPU, and run their steps in order. Every
//! step is announced to the VMM before it starts and its result (errno) sent after it
//! ends; a failed step does not stop its thread (the scenario may expect the failure).
//!
//! The threads share the sessions and memfds by index; a step takes what it needs out of
//! the shared tables under a short lock and makes its system call without the lock, so a
//! thread blocked in the kernel (a session close that waits for the kexec) never blocks
//! the others. A memfd is taken out as a duplicate of its descriptor ([`FdTable`]), so
//! `close-fd` closes the table's descriptor at once, whatever another thread is doing
//! with the file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use luo_protocol::message::{Action, Message};
use luo_protocol::script::{FileId, Fill, Script, StageScript, Step};
use luo_protocol::workload::Memfds;

use crate::probe::Probe;
use crate::{luo, pattern, sys, CHUNK, GATE_LIMIT};

/// What every thread of a stage shares.
struct World<'a> {
    probe: &'a Probe,
    luo: &'a luo::LazyLuo,
    sessions: Mutex<HashMap<u32, Arc<luo::Session>>>,
    files: FdTable,
    /// Handovers done before this boot.
    round: u32,
    /// This boot's command line (the next kernel's is derived from it).
    cmdline: &'a str,
    /// The whole script (stage 2 looks up how stage 1 made each memfd).
    script: &'a Script,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn missing(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, what)
}

/// The memfds of a stage, by file: each one's descriptor, or `None` once `close-fd`
/// closed it (later steps on it fail with `EBADF`, as calls on a closed descriptor do).
///
/// A step never uses the table's descriptor itself: [`FdTable::get`] hands out a
/// duplicate (`dup`), closed when the step drops it. So `close-fd` is the `close()` of
/// that descriptor, made at once, even while another thread's step still uses the file
/// (its duplicate keeps the file open, as the reference a system call in progress holds
/// does); and no step ever makes a call on a closed number the kernel may have handed out
/// again to another file.
#[derive(Default)]
struct FdTable(Mutex<HashMap<FileId, Option<File>>>);

impl FdTable {
    /// Puts `file` in as memfd `id` (replacing an earlier one, open or closed).
    fn insert(&self, id: FileId, file: File) {
        lock(&self.0).insert(id, Some(file));
    }

    /// A duplicate of memfd `id`'s descriptor: `EBADF` once it was closed, not found when
    /// this stage never made or retrieved it.
    fn get(&self, id: FileId) -> io::Result<File> {
        match lock(&self.0).get(&id) {
            Some(Some(file)) => file.try_clone(),
            Some(None) => Err(io::Error::from_raw_os_error(libc::EBADF)),
            None => Err(missing(format!("no memfd {id} in this stage"))),
        }
    }

    /// `close()` of memfd `id`'s descriptor (the lock is not held during the call): its
    /// error if it failed (the descriptor is gone anyway, as Linux's `close` says);
    /// `EBADF` if it was closed already, not found when this stage never had it.
    fn close(&self, id: FileId) -> io::Result<()> {
        let fd = match lock(&self.0).get_mut(&id) {
            Some(slot) => slot
                .take()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?,
            None => return Err(missing(format!("no memfd {id} to close"))),
        };
        sys::close(fd.into())
    }
}

impl World<'_> {
    fn session(&self, s: u32) -> io::Result<Arc<luo::Session>> {
        lock(&self.sessions)
            .get(&s)
            .cloned()
            .ok_or_else(|| missing(format!("no session {s} in this stage")))
    }

    /// How stage 1 made memfd `id`: its size and whether it holds its pattern. The size
    /// is its `memfd` step's, or that of the last `truncate` of it after that step in the
    /// same thread and not behind an `if` (a racing call, which may not run, and which a
    /// preserved memfd refuses: its size is frozen); a check of a file grown by
    /// `truncate` after its fill finds zeros where the pattern was expected.
    fn made(&self, id: FileId) -> (Option<u64>, bool) {
        let steps = || self.script.stage1.threads.iter().flat_map(|t| &t.steps);
        let size = self
            .script
            .stage1
            .threads
            .iter()
            .find(|t| {
                t.steps
                    .iter()
                    .any(|s| matches!(s, Step::Memfd(f, _) if *f == id))
            })
            .and_then(|t| made_size(&t.steps, id));
        let patterned =
            steps().any(|s| matches!(s, Step::Fill(f, Fill::Write | Fill::Mmap) if *f == id));
        (size, patterned)
    }

    /// Runs one step on the calling thread.
    fn step(&self, step: Step) -> io::Result<()> {
        let p = self.probe;
        match step {
            Step::Create(s) => {
                let name = Memfds::session_name(s);
                let session = p.action(Action::CreateSession, u64::from(s), || {
                    self.luo.get()?.create_session(name.as_str())
                })?;
                lock(&self.sessions).insert(s, Arc::new(session));
            }
            Step::Memfd(id, size) => {
                let file = p.action(Action::Memfd, id.token(), || {
                    let file = File::from(sys::memfd_create(&format!("luo-vmm-{id}"))?);
                    file.set_len(size)?;
                    Ok(file)
                })?;
                self.files.insert(id, file);
            }
            Step::Fill(id, how) => {
                // Filled for the handover that follows this boot.
                let seed = pattern::seed(self.round + 1, id.session, id.file);
                p.action(Action::Fill, id.token(), || {
                    fill(&self.files.get(id)?, how, seed)
                })?;
            }
            Step::Preserve(id) => {
                // Announced even when the session or file is missing here (another thread
                // closed it): every step that is a call gets a result.
                p.action(Action::PreserveFd, id.token(), || {
                    let session = self.session(id.session)?;
                    let file = self.files.get(id)?;
                    session.preserve_fd(file.as_fd(), id.token())
                })?;
            }
            Step::Truncate(id, size) => {
                p.action(Action::Truncate, id.token(), || {
                    self.files.get(id)?.set_len(size)
                })?;
            }
            Step::CloseFd(id) => {
                p.action(Action::CloseFd, id.token(), || self.files.close(id))?;
            }
            Step::Retrieve(s) => {
                let name = Memfds::session_name(s);
                let session = p.action(Action::RetrieveSession, u64::from(s), || {
                    self.luo.get()?.retrieve_session(name.as_str())
                })?;
                lock(&self.sessions).insert(s, Arc::new(session));
            }
            Step::RetrieveFd(id) => {
                let fd = p.action(Action::RetrieveFd, id.token(), || {
                    self.session(id.session)?.retrieve_fd(id.token())
                })?;
                let file = File::from(fd);
                let (size, patterned) = self.made(id);
                let seed = patterned.then(|| pattern::seed(self.round, id.session, id.file));
                p.action(Action::CheckData, id.token(), || check(&file, size, seed))?;
                // Checked before it is shared: another thread's `truncate` or `close-fd`
                // of it races what comes after the check, not the check.
                self.files.insert(id, file);
            }
            Step::Finish(s) => {
                p.action(Action::FinishSession, u64::from(s), || {
                    self.session(s)?.finish()
                })?;
            }
            Step::Close(s) => {
                let session = lock(&self.sessions).remove(&s);
                p.action(Action::CloseSession, u64::from(s), || {
                    let session =
                        session.ok_or_else(|| missing(format!("no session {s} to close")))?;
                    // The last reference closes the fd; another thread's step may hold one.
                    Arc::into_inner(session)
                        .map(drop)
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::EBUSY))
                })?;
            }
            Step::KexecLoad => crate::load_next_kernel(p, self.round, self.cmdline)?,
            Step::Reboot => {
                let seq = p.announce(Action::Reboot, 0);
                p.send(&Message::RebootRequested);
                sys::sync();
                let err = sys::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
                p.failed(seq, Action::Reboot, &err);
                return Err(err);
            }
            Step::Gate(g) => {
                p.wait_gate(g, GATE_LIMIT).map_err(|e| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("{} stayed closed", e.0))
                })?;
            }
            Step::Pressure(bytes) => {
                p.action(Action::Pressure, bytes, || sys::touch_anonymous(bytes))?;
            }
            // Decided by the thread's loop (run_stage), which never passes it here.
            Step::If(_) => {}
        }
        Ok(())
    }
}

/// The size memfd `id` has after `steps` (one thread's, in order): its `memfd` step's,
/// then each `truncate` of it not behind an `if` and made before its `preserve` (LUO
/// freezes a preserved memfd's size: a later `truncate` fails with `EPERM`); `None`
/// without a `memfd` step.
fn made_size(steps: &[Step], id: FileId) -> Option<u64> {
    let mut size = None;
    let mut guarded = false;
    let mut preserved = false;
    for step in steps {
        match *step {
            Step::Memfd(f, n) if f == id => {
                size = Some(n);
                preserved = false;
            }
            Step::Preserve(f) if f == id => preserved = true,
            Step::Truncate(f, n) if f == id && !guarded && !preserved && size.is_some() => {
                size = Some(n)
            }
            _ => {}
        }
        guarded = matches!(step, Step::If(_));
    }
    size
}

/// Fills `file` (already sized) by `how`, with the pattern of `seed` where there is one.
fn fill(file: &File, how: Fill, seed: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    match how {
        Fill::Fallocate => sys::fallocate(file.as_fd(), len),
        Fill::Write => {
            let mut buf = vec![0u8; CHUNK];
            let mut offset = 0u64;
            while offset < len {
                let n = crate::chunk_len(len - offset);
                pattern::fill(seed, offset, &mut buf[..n]);
                file.write_all_at(&buf[..n], offset)?;
                offset += n as u64;
            }
            Ok(())
        }
        Fill::Mmap => sys::with_shared_mapping(file.as_fd(), len, |bytes| {
            for (k, chunk) in bytes.chunks_mut(CHUNK).enumerate() {
                pattern::fill(seed, (k * CHUNK) as u64, chunk);
            }
        }),
    }
}

/// Checks a retrieved memfd: its size (when stage 1 said it) and its bytes (the pattern
/// of `seed`, or zeroes without one). `EFBIG`: wrong size; `EBADMSG`: a wrong byte.
/// Reads at explicit offsets: a file retrieved twice is one open file (LUO hands out the
/// same `struct file` again), whose shared offset another thread's check moves.
fn check(file: &File, size: Option<u64>, seed: Option<u64>) -> io::Result<()> {
    let len = file.metadata()?.len();
    if size.is_some_and(|s| s != len) {
        let made = size.map_or_else(|| "?".to_owned(), |s| s.to_string());
        println!("luo-agent: size {len}, stage 1 made {made}");
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let n = crate::chunk_len(len - offset);
        file.read_exact_at(&mut buf[..n], offset)?;
        let bad = match seed {
            Some(seed) => pattern::check(seed, offset, &buf[..n]).map(|m| m.offset),
            None => buf[..n]
                .iter()
                .position(|&b| b != 0)
                .map(|i| offset + i as u64),
        };
        if let Some(at) = bad {
            println!("luo-agent: wrong byte at offset {at}");
            return Err(io::Error::from_raw_os_error(libc::EBADMSG));
        }
        offset += n as u64;
    }
    Ok(())
}

/// Runs `stage` of `script`: every thread, pinned, to its end (a successful `reboot`
/// never returns). Ok when every thread ran its steps, whatever their results.
pub fn run_stage(
    probe: &Probe,
    luo: &luo::LazyLuo,
    script: &Script,
    stage: &StageScript,
    round: u32,
    cmdline: &str,
) {
    let world = World {
        probe,
        luo,
        sessions: Mutex::new(HashMap::new()),
        files: FdTable::default(),
        round,
        cmdline,
        script,
    };
    std::thread::scope(|scope| {
        for (t, thread) in stage.threads.iter().enumerate() {
            let world = &world;
            scope.spawn(move || {
                if let Err(e) = sys::pin_to_cpu(thread.cpu) {
                    println!("luo-agent: [t{t}] cannot pin to CPU {}: {e}", thread.cpu);
                }
                // `if N` decides whether the step after it runs.
                let mut skip = false;
                for &step in &thread.steps {
                    if std::mem::take(&mut skip) {
                        println!("luo-agent: [t{t}/cpu{}] {step}: skipped", thread.cpu);
                        continue;
                    }
                    if let Step::If(gate) = step {
                        skip = !world.probe.gate_open(gate);
                        continue;
                    }
                    let result = world.step(step);
                    let now = sys::monotonic();
                    match result {
                        Ok(()) => println!(
                            "luo-agent: [t{t}/cpu{}] {step}: ok [t={now:.3}s]",
                            thread.cpu
                        ),
                        Err(e) => println!(
                            "luo-agent: [t{t}/cpu{}] {step}: {e} [t={now:.3}s]",
                            thread.cpu
                        ),
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(session: u32, file: u32) -> FileId {
        FileId { session, file }
    }

    fn memfd(size: u64) -> File {
        let file = File::from(sys::memfd_create("luo-agent-test").unwrap());
        file.set_len(size).unwrap();
        file
    }

    fn errno(r: io::Result<impl std::fmt::Debug>) -> Option<i32> {
        r.unwrap_err().raw_os_error()
    }

    #[test]
    fn a_closed_memfd_fails_with_ebadf_and_closes_once() {
        let table = FdTable::default();
        let f = id(0, 0);
        table.insert(f, memfd(64 << 10));
        // A step's duplicate: truncate through it, as the `truncate` step does.
        let held = table.get(f).unwrap();
        table.get(f).unwrap().set_len(32 << 10).unwrap();
        assert_eq!(held.metadata().unwrap().len(), 32 << 10, "the same file");
        table.close(f).unwrap();
        // Later steps on it: EBADF, and a second close too.
        assert_eq!(errno(table.get(f)), Some(libc::EBADF));
        assert_eq!(errno(table.close(f)), Some(libc::EBADF));
        // A step that took the file before the close still has it.
        held.set_len(4096).unwrap();
        assert_eq!(held.metadata().unwrap().len(), 4096);
        // A file never made: not found, no errno.
        assert_eq!(errno(table.get(id(1, 0))), None);
        assert_eq!(errno(table.close(id(1, 0))), None);
        // Made again after the close: open again.
        table.insert(f, memfd(4096));
        assert_eq!(table.get(f).unwrap().metadata().unwrap().len(), 4096);
    }

    #[test]
    fn close_fd_closes_the_tables_descriptor_at_once() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let table = FdTable::default();
        let f = id(2, 1);
        let file = memfd(4096);
        let raw = file.as_raw_fd();
        table.insert(f, file);
        let held = table.get(f).unwrap();
        assert_ne!(held.as_raw_fd(), raw, "steps use a duplicate");
        let inode = held.metadata().unwrap().ino();
        table.close(f).unwrap();
        // While a step still holds its duplicate, the table's number no longer names the
        // file: closed, or (tests run in parallel) reused for another file.
        // SAFETY: an all-zero `stat` is a valid buffer for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes only `st`, a live, writable stat.
        let ret = unsafe { libc::fstat(raw, &mut st) };
        if ret < 0 {
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EBADF));
        } else {
            assert_ne!(st.st_ino, inode, "the closed number still names the memfd");
        }
        assert_eq!(
            held.metadata().unwrap().len(),
            4096,
            "the duplicate still works"
        );
    }

    #[test]
    fn the_size_stage_2_expects_follows_unguarded_truncates() {
        let f = id(0, 0);
        let steps =
            |list: &[&str]| -> Vec<Step> { list.iter().map(|s| Step::parse(s).unwrap()).collect() };
        assert_eq!(made_size(&steps(&["create 0"]), f), None);
        assert_eq!(
            made_size(&steps(&["memfd 0.0 64K", "preserve 0.0"]), f),
            Some(64 << 10)
        );
        assert_eq!(
            made_size(
                &steps(&["memfd 0.0 64K", "truncate 0.0 8K", "truncate 0.1 4K"]),
                f
            ),
            Some(8 << 10)
        );
        // Behind an `if` (a racing call), or before the memfd exists: not counted.
        assert_eq!(
            made_size(&steps(&["memfd 0.0 64K", "if 10", "truncate 0.0 8K"]), f),
            Some(64 << 10)
        );
        assert_eq!(
            made_size(&steps(&["truncate 0.0 8K", "memfd 0.0 64K"]), f),
            Some(64 << 10)
        );
        // After its preserve: refused by the kernel (frozen size), not counted.
        assert_eq!(
            made_size(
                &steps(&["memfd 0.0 64K", "preserve 0.0", "truncate 0.0 32K"]),
                f
            ),
            Some(64 << 10)
        );
    }

    #[test]
    fn agent_failures_never_report_errno_0() {
        assert_eq!(
            crate::probe::errno_of(&missing("no session 0 in this stage".into())),
            libc::ENOENT
        );
        assert_eq!(
            crate::probe::errno_of(&io::Error::from_raw_os_error(libc::EPERM)),
            libc::EPERM
        );
        assert_eq!(crate::probe::errno_of(&io::Error::other("x")), libc::EIO);
    }
}
