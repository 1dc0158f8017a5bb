//! `luo.mode=scenario`: runs one stage of a scenario's script (`luo_protocol::script`):
//! its threads start together, each pinned to its CPU, and run their steps in order. Every
//! step is announced to the VMM before it starts and its result (errno) sent after it
//! ends; a failed step does not stop its thread (the scenario may expect the failure).
//!
//! The threads share the sessions and memfds by index; a step takes what it needs out of
//! the shared tables under a short lock and makes its system call without the lock, so a
//! thread blocked in the kernel (a session close that waits for the kexec) never blocks
//! the others.

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
    files: Mutex<HashMap<FileId, Arc<File>>>,
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

impl World<'_> {
    fn session(&self, s: u32) -> io::Result<Arc<luo::Session>> {
        lock(&self.sessions)
            .get(&s)
            .cloned()
            .ok_or_else(|| missing(format!("no session {s} in this stage")))
    }

    fn file(&self, id: FileId) -> io::Result<Arc<File>> {
        lock(&self.files)
            .get(&id)
            .cloned()
            .ok_or_else(|| missing(format!("no memfd {id} in this stage")))
    }

    /// How stage 1 made memfd `id`: its size and whether it holds its pattern.
    fn made(&self, id: FileId) -> (Option<u64>, bool) {
        let steps = || self.script.stage1.threads.iter().flat_map(|t| &t.steps);
        let size = steps().find_map(|s| match s {
            Step::Memfd(f, size) if *f == id => Some(*size),
            _ => None,
        });
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
                lock(&self.files).insert(id, Arc::new(file));
            }
            Step::Fill(id, how) => {
                // Filled for the handover that follows this boot.
                let seed = pattern::seed(self.round + 1, id.session, id.file);
                p.action(Action::Fill, id.token(), || {
                    fill(&*self.file(id)?, how, seed)
                })?;
            }
            Step::Preserve(id) => {
                // Announced even when the session or file is missing here (another thread
                // closed it): every step that is a call gets a result.
                p.action(Action::PreserveFd, id.token(), || {
                    let session = self.session(id.session)?;
                    let file = self.file(id)?;
                    session.preserve_fd(file.as_fd(), id.token())
                })?;
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
                lock(&self.files).insert(id, Arc::new(file));
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
        println!("luo-agent: size {len}, stage 1 made {size:?}");
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
        files: Mutex::new(HashMap::new()),
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
