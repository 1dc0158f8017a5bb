//! Thin wrappers around the system calls the agent needs that `std` does not offer.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `mount(source, target, fstype, 0, NULL)`; an already mounted target (EBUSY) is fine.
pub fn mount(source: &CStr, target: &CStr, fstype: &CStr) -> io::Result<()> {
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data is NULL.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    match check(ret.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        r => r.map(drop),
    }
}

/// `memfd_create(name, 0)`.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), 0) }.into())?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `close(fd)`, with its error (which std's drop of a descriptor ignores). The descriptor
/// is gone either way: Linux releases it before reporting an error.
pub(crate) fn close(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: `into_raw_fd` gives up ownership, so this is the one close of a descriptor
    // this process owned.
    let ret = unsafe { libc::close(fd.into_raw_fd()) };
    check(ret.into()).map(drop)
}

/// `kexec_file_load(kernel, initrd, cmdline, flags = 0)`: loads the next kernel.
pub fn kexec_file_load(
    kernel: BorrowedFd<'_>,
    initrd: BorrowedFd<'_>,
    cmdline: &str,
) -> io::Result<()> {
    let cmdline = CString::new(cmdline).map_err(io::Error::other)?;
    let len = cmdline.as_bytes_with_nul().len();
    // SAFETY: the descriptors are open; the command line pointer and its length (which
    // includes the NUL, as the syscall requires) describe a live buffer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd.as_raw_fd(),
            len,
            cmdline.as_ptr(),
            0u64,
        )
    };
    check(ret).map(drop)
}

/// `reboot(cmd)`; returns only on failure.
pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: reboot takes no pointers; on success it does not return.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// `sync()`.
pub fn sync() {
    // SAFETY: no arguments, no memory touched.
    unsafe { libc::sync() };
}

/// `CLOCK_MONOTONIC` in seconds (comparable to the kernel's printk timestamps).
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Number of CPUs this process may run on (`sched_getaffinity`).
pub fn affinity_cpus() -> Option<u32> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if ret != 0 {
        return None;
    }
    // SAFETY: `set` was filled in by the kernel.
    u32::try_from(unsafe { libc::CPU_COUNT(&set) }).ok()
}

/// Pins the calling thread to `cpu` (`sched_setaffinity`).
pub fn pin_to_cpu(cpu: u16) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; cpu <= MAX_CPU (63) < CPU_SETSIZE.
    unsafe { libc::CPU_SET(usize::from(cpu), &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fallocate(fd, 0, 0, len)`.
pub fn fallocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate only reads its integer arguments; `fd` is open.
    let ret = unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Maps `len` bytes of `fd` shared and writable, lets `f` write them, unmaps.
pub fn with_shared_mapping(
    fd: BorrowedFd<'_>,
    len: u64,
    f: impl FnOnce(&mut [u8]),
) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a fresh shared mapping of an open file; the result is checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` maps `len` writable bytes that nothing else in this process aliases
    // until the munmap below.
    f(unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) });
    // SAFETY: unmaps exactly the mapping made above; the slice is gone.
    unsafe { libc::munmap(addr, len) };
    Ok(())
}

/// Allocates `len` bytes of anonymous memory (faulted in by the kernel at once,
/// `MAP_POPULATE`), writes one byte per page, frees it.
pub fn touch_anonymous(len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let mapping = Populated::new(len)?;
    for off in (0..len).step_by(4096) {
        // SAFETY: `off < len`: inside the mapping, which lives until the end of this
        // function and which nothing else aliases.
        unsafe { mapping.addr.cast::<u8>().add(off).write_volatile(1) };
    }
    Ok(())
}

/// Private anonymous memory faulted in at once (`MAP_POPULATE`), unmapped when dropped.
pub struct Populated {
    addr: *mut libc::c_void,
    len: usize,
}

impl Populated {
    /// Maps and faults in `len` bytes.
    pub fn new(len: usize) -> io::Result<Populated> {
        // SAFETY: a fresh private anonymous mapping; the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Populated { addr, len })
    }
}

impl Drop for Populated {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing borrows it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
