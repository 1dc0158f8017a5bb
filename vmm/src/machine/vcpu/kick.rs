//! Kicking a vCPU thread out of `KVM_RUN`, as Firecracker does
//! (`src/vmm/src/vstate/vcpu.rs`): one real-time signal, whose handler sets the vCPU's
//! `kvm_run.immediate_exit`. A signal that lands while the thread is in `KVM_RUN` makes
//! the ioctl return `EINTR`; one that lands before (in user space, between two runs) has
//! set `immediate_exit`, so the next `KVM_RUN` returns `EINTR` at once instead of
//! entering the guest. Either way the thread comes back to its loop, which looks at the
//! request the kicker made before it kicked (a stop, a RIP sample). The loop clears
//! `immediate_exit` on `EINTR` ([`super::Vcpu`]'s `VcpuBackend::run`), before it looks
//! at the requests, so no kick is lost: one signal per kick is enough.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::OnceLock;
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::Vcpu;

thread_local! {
    /// The vCPU this thread runs, while it runs it ([`kickable`]); null otherwise.
    static KICK_TARGET: Cell<*mut VcpuFd> = const { Cell::new(ptr::null_mut()) };
}

/// The kick signal.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialized thread-local of a `Copy` type without destructor: reading it is
    // a plain load, safe in a signal handler.
    let fd = KICK_TARGET.with(Cell::get);
    if fd.is_null() {
        return;
    }
    // SAFETY: `fd` was set by `kickable` on this very thread (the handler runs on the
    // thread the signal was sent to, interrupting it), from a `&mut Vcpu` that `kickable`
    // holds for as long as the pointer is set, so the `VcpuFd` is alive and does not move;
    // `kickable` nulls the pointer before that borrow ends. The handler only stores one
    // byte, `immediate_exit`, in the vCPU's `kvm_run` mapping, memory the kernel shares and
    // writes on every `KVM_RUN` anyway, and nothing else reads it in between (as in
    // Firecracker's `Vcpu::register_kick_signal_handler`). SAFETY in short: a live VcpuFd
    // that does not move, one byte written.
    unsafe { (*fd).set_kvm_immediate_exit(1) };
    compiler_fence(Ordering::SeqCst);
}

/// Installs (once per process) the kick signal's handler.
pub(crate) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// Clears this thread's kick target when [`kickable`] ends, also on a panic.
struct ClearOnDrop;

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        KICK_TARGET.with(|c| c.set(ptr::null_mut()));
    }
}

/// Runs `f` (the vCPU's run loop) with `vcpu` as the target of kicks sent to this
/// thread; afterwards a kick does nothing.
pub(crate) fn kickable<R>(vcpu: &mut Vcpu, f: impl FnOnce(&mut Vcpu) -> R) -> R {
    KICK_TARGET.with(|c| c.set(ptr::from_mut(&mut vcpu.fd)));
    let _clear = ClearOnDrop;
    f(vcpu)
}

/// Kicks the vCPU running on `thread`: one signal. The caller has made its request (stop,
/// sample) first. A thread that has already ended is not an error.
pub(crate) fn kick<T>(thread: &JoinHandle<T>) {
    if let Err(e) = thread.kill(kick_signal()) {
        log::debug!("kicking a vCPU thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvm_ioctls::Kvm;
    use luo_devices::PioBus;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::machine::vcpu::run::VcpuBackend;

    /// Sends the kick signal to the calling thread: delivered before this returns.
    fn kick_self() {
        // SAFETY: pthread_self is always valid for the calling thread, and the signal's
        // handler is installed (it only stores into this thread's kick target).
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_kick_before_kvm_run_makes_it_return_at_once() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no usable /dev/kvm: skipped");
            return;
        };
        install_handler().unwrap();
        let vm = kvm.create_vm().unwrap();
        let memory = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        let mut vcpu = Vcpu::new(0, vm.create_vcpu(0).unwrap(), memory);
        // Outside `kickable` a kick changes nothing.
        kick_self();
        assert_eq!(vcpu.fd.get_kvm_run().immediate_exit, 0);
        let (before, run, after) = kickable(&mut vcpu, |v| {
            // The kick lands in user space, before KVM_RUN.
            kick_self();
            let before = v.fd.get_kvm_run().immediate_exit;
            let run = v.run(&PioBus::new()).map(|_| ()).map_err(|e| e.errno());
            (before, run, v.fd.get_kvm_run().immediate_exit)
        });
        assert_eq!(before, 1, "the handler set immediate_exit");
        assert_eq!(
            run,
            Err(libc::EINTR),
            "KVM_RUN returned without entering the guest"
        );
        assert_eq!(after, 0, "the loop consumed the kick");
        // After `kickable`, the thread no longer points at the vCPU.
        kick_self();
        assert_eq!(vcpu.fd.get_kvm_run().immediate_exit, 0);
    }
}
