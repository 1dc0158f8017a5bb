//! The Live Update Orchestrator's user API: `/dev/liveupdate` and session file descriptors.
//!
//! Structures and ioctl numbers transcribed from `include/uapi/linux/liveupdate.h`
//! (Linux 7.2). Every argument starts with a `size` field, set to the structure's size, which
//! the kernel uses to tell ABI versions apart. The ioctls are `_IO(0xBA, nr)`: no direction
//! or size bits.

use std::ffi::c_ulong;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `LIVEUPDATE_IOCTL_TYPE`.
const LIVEUPDATE_IOCTL_TYPE: c_ulong = 0xba;
/// `LIVEUPDATE_SESSION_NAME_LENGTH`, including the terminating NUL.
pub const SESSION_NAME_LENGTH: usize = 64;

/// `_IO(type, nr)` of `<asm-generic/ioctl.h>`.
const fn io(nr: c_ulong) -> c_ulong {
    (LIVEUPDATE_IOCTL_TYPE << 8) | nr
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION` (on `/dev/liveupdate`).
const IOCTL_CREATE_SESSION: c_ulong = io(0x00);
/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` (on `/dev/liveupdate`).
const IOCTL_RETRIEVE_SESSION: c_ulong = io(0x01);
/// `LIVEUPDATE_SESSION_PRESERVE_FD` (on a session).
const SESSION_PRESERVE_FD: c_ulong = io(0x40);
/// `LIVEUPDATE_SESSION_RETRIEVE_FD` (on a session).
const SESSION_RETRIEVE_FD: c_ulong = io(0x41);
/// `LIVEUPDATE_SESSION_FINISH` (on a session).
const SESSION_FINISH: c_ulong = io(0x42);

/// `struct liveupdate_ioctl_create_session` and `struct liveupdate_ioctl_retrieve_session`
/// (same layout): in `size`, `name`; out `fd`.
#[repr(C)]
struct SessionArg {
    size: u32,
    fd: i32,
    name: [u8; SESSION_NAME_LENGTH],
}

/// `struct liveupdate_session_preserve_fd` and `struct liveupdate_session_retrieve_fd`
/// (same layout; `token` is an `__aligned_u64`).
#[repr(C)]
struct FdArg {
    size: u32,
    fd: i32,
    token: u64,
}

/// `struct liveupdate_session_finish`.
#[repr(C)]
struct FinishArg {
    size: u32,
    reserved: u32,
}

const _: () = assert!(std::mem::size_of::<SessionArg>() == 72);
const _: () = assert!(std::mem::size_of::<FdArg>() == 16);
const _: () = assert!(std::mem::align_of::<FdArg>() == 8);
const _: () = assert!(std::mem::size_of::<FinishArg>() == 8);

/// `size_of::<T>()` as the `u32` the uAPI's `size` field holds.
const fn arg_size<T>() -> u32 {
    let n = std::mem::size_of::<T>();
    assert!(n <= u32::MAX as usize);
    // Checked just above (the structures are tens of bytes).
    #[allow(clippy::cast_possible_truncation)]
    let n = n as u32;
    n
}

/// Issues `cmd` on `fd` with a pointer to `arg`.
fn ioctl<T>(fd: BorrowedFd<'_>, cmd: c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor, `arg` points to a live, writable `T`, and every
    // `cmd` used in this module takes a pointer to exactly the `T` its caller passes (the
    // layouts are checked against the uapi sizes above).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), cmd, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes ownership of a descriptor the kernel returned in an ioctl argument.
fn owned(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::other(format!("kernel returned fd {fd}")));
    }
    // SAFETY: the kernel just installed `fd` for this process and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn session_arg(name: &str) -> io::Result<SessionArg> {
    let bytes = name.as_bytes();
    if bytes.len() >= SESSION_NAME_LENGTH || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad session name {name:?}"),
        ));
    }
    let mut arg = SessionArg {
        size: arg_size::<SessionArg>(),
        fd: -1,
        name: [0; SESSION_NAME_LENGTH],
    };
    arg.name[..bytes.len()].copy_from_slice(bytes);
    Ok(arg)
}

/// `/dev/liveupdate` (only one process may hold it open at a time).
pub struct Luo {
    dev: File,
}

/// `/dev/liveupdate`, opened by the first call that needs it (from any thread). In the
/// next kernel LUO deserializes the sessions the previous one handed over at that first
/// open (`luo_open()` -> `luo_session_deserialize()`, kernel/liveupdate/luo_core.c), so a
/// snapshot a VMM takes before it lets every run from it deserialize again. A failed
/// open fails every call with its errno.
#[derive(Default)]
pub struct LazyLuo(std::sync::OnceLock<Result<Luo, i32>>);

impl LazyLuo {
    /// The device, opened now if no call opened it yet.
    pub fn get(&self) -> io::Result<&Luo> {
        let opened = self.0.get_or_init(|| {
            let r = Luo::open().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
            match &r {
                Ok(_) => println!("luo-agent: opened /dev/liveupdate (first use)"),
                Err(errno) => println!(
                    "luo-agent: open /dev/liveupdate: {}",
                    io::Error::from_raw_os_error(*errno)
                ),
            }
            r
        });
        opened
            .as_ref()
            .map_err(|&errno| io::Error::from_raw_os_error(errno))
    }
}

impl Luo {
    /// Opens `/dev/liveupdate`.
    pub fn open() -> io::Result<Self> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/liveupdate")?;
        Ok(Luo { dev })
    }

    /// Creates a session that will be preserved across the next kexec while its fd is open.
    pub fn create_session(&self, name: &str) -> io::Result<Session> {
        let mut arg = session_arg(name)?;
        ioctl(self.dev.as_fd(), IOCTL_CREATE_SESSION, &mut arg)?;
        Ok(Session { fd: owned(arg.fd)? })
    }

    /// Retrieves a session that the previous kernel preserved.
    pub fn retrieve_session(&self, name: &str) -> io::Result<Session> {
        let mut arg = session_arg(name)?;
        ioctl(self.dev.as_fd(), IOCTL_RETRIEVE_SESSION, &mut arg)?;
        Ok(Session { fd: owned(arg.fd)? })
    }
}

/// A LUO session file descriptor.
pub struct Session {
    fd: OwnedFd,
}

impl Session {
    /// Preserves `file` (e.g. a memfd) in this session under `token`.
    pub fn preserve_fd(&self, file: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut arg = FdArg {
            size: arg_size::<FdArg>(),
            fd: file.as_raw_fd(),
            token,
        };
        ioctl(self.fd.as_fd(), SESSION_PRESERVE_FD, &mut arg)
    }

    /// Retrieves the file preserved under `token` in the previous kernel.
    pub fn retrieve_fd(&self, token: u64) -> io::Result<OwnedFd> {
        let mut arg = FdArg {
            size: arg_size::<FdArg>(),
            fd: -1,
            token,
        };
        ioctl(self.fd.as_fd(), SESSION_RETRIEVE_FD, &mut arg)?;
        owned(arg.fd)
    }

    /// Finishes a retrieved session: its files become ordinary files again.
    pub fn finish(&self) -> io::Result<()> {
        let mut arg = FinishArg {
            size: arg_size::<FinishArg>(),
            reserved: 0,
        };
        ioctl(self.fd.as_fd(), SESSION_FINISH, &mut arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        assert_eq!(IOCTL_CREATE_SESSION, 0xba00);
        assert_eq!(IOCTL_RETRIEVE_SESSION, 0xba01);
        assert_eq!(SESSION_PRESERVE_FD, 0xba40);
        assert_eq!(SESSION_RETRIEVE_FD, 0xba41);
        assert_eq!(SESSION_FINISH, 0xba42);
    }

    #[test]
    fn session_names() {
        let arg = session_arg("luo-vmm-s0").unwrap();
        assert_eq!(arg.size, 72);
        assert_eq!(&arg.name[..11], b"luo-vmm-s0\0");
        assert!(session_arg(&"x".repeat(63)).is_ok());
        assert!(session_arg(&"x".repeat(64)).is_err());
        assert!(session_arg("a\0b").is_err());
    }
}
