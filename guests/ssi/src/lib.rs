//! Processes of a vmgrid single-system image (`vmgrid ssi`) start other processes through the
//! `vmgrid` import module. This crate wraps its three calls safely:
//!
//! ```no_run
//! let child = vmgrid_ssi::spawn(&["/bin/worker.wasm", "--part", "3"])?;  // placed on some node
//! let status = vmgrid_ssi::wait(child)?;                                  // its exit status
//! println!("I am {} and my child {child} exited with {status}", vmgrid_ssi::getpid());
//! # Ok::<(), vmgrid_ssi::Errno>(())
//! ```
//!
//! PIDs are global: the same on every node. A child is placed by the pool's matchmaker, usually
//! on another node, and sees the same filesystem (`/` is the SSI root) and the same PID space.
//! A child that did not exit on its own reports 137 if it was killed and 134 if it failed (a trap,
//! a limit, a lost node).
//!
//! Built for any target other than wasm32, every call fails with [`Errno::NOSYS`].

use std::fmt;

/// A global process id.
pub type Pid = i64;

/// A WASI errno, as the `vmgrid` calls return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u16);

impl Errno {
    pub const CHILD: Errno = Errno(12);
    pub const INTR: Errno = Errno(27);
    pub const INVAL: Errno = Errno(28);
    pub const IO: Errno = Errno(29);
    pub const ISDIR: Errno = Errno(31);
    pub const NOENT: Errno = Errno(44);
    pub const NOEXEC: Errno = Errno(45);
    pub const NOSYS: Errno = Errno(52);
    pub const PERM: Errno = Errno(63);

    pub fn name(self) -> &'static str {
        match self {
            Errno::CHILD => "ECHILD: no such child",
            Errno::INTR => "EINTR: interrupted",
            Errno::INVAL => "EINVAL: invalid argument",
            Errno::IO => "EIO: input/output error",
            Errno::ISDIR => "EISDIR: is a directory",
            Errno::NOENT => "ENOENT: no such file",
            Errno::NOEXEC => "ENOEXEC: not a WASI preview-1 module",
            Errno::NOSYS => "ENOSYS: not running in a vmgrid single-system image",
            Errno::PERM => "EPERM: not permitted",
            _ => "unknown errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "errno {} ({})", self.0, self.name())
    }
}

impl std::error::Error for Errno {}

#[cfg(target_arch = "wasm32")]
mod sys {
    #[link(wasm_import_module = "vmgrid")]
    unsafe extern "C" {
        pub fn spawn(argv_ptr: *const u8, argv_len: i32, pid_out: *mut i64) -> i32;
        pub fn wait(pid: i64, status_out: *mut i32) -> i32;
        pub fn getpid(pid_out: *mut i64) -> i32;
    }
}

fn check(r: i32) -> Result<(), Errno> {
    if r == 0 { Ok(()) } else { Err(Errno(r as u16)) }
}

/// Starts a process. `argv[0]` is the module's path in the SSI filesystem; the rest are its
/// arguments. Returns the child's PID, or the errno: `NOENT` for a missing module, `NOEXEC` for
/// one that is not a valid WASI preview-1 module.
pub fn spawn<S: AsRef<str>>(argv: &[S]) -> Result<Pid, Errno> {
    let mut buf = Vec::new();
    for a in argv {
        let a = a.as_ref();
        if a.contains('\0') {
            return Err(Errno::INVAL);
        }
        buf.extend_from_slice(a.as_bytes());
        buf.push(0);
    }
    if argv.is_empty() {
        return Err(Errno::INVAL);
    }
    let len = i32::try_from(buf.len()).map_err(|_| Errno::INVAL)?;
    #[cfg(target_arch = "wasm32")]
    {
        let mut pid: i64 = 0;
        // SAFETY: the host reads `len` bytes at `buf` and writes one i64 at `pid`; both are
        // valid, live allocations of this module for the duration of the call.
        check(unsafe { sys::spawn(buf.as_ptr(), len, &mut pid) })?;
        Ok(pid)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (len, check(0));
        Err(Errno::NOSYS)
    }
}

/// Waits for child `pid` to end and returns its exit status. `CHILD` if `pid` is not an unwaited
/// child of this process.
pub fn wait(pid: Pid) -> Result<i32, Errno> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut status: i32 = 0;
        // SAFETY: the host writes one i32 at `status`, a live local.
        check(unsafe { sys::wait(pid, &mut status) })?;
        Ok(status)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = pid;
        Err(Errno::NOSYS)
    }
}

/// This process's global PID (0 outside a single-system image).
pub fn getpid() -> Pid {
    #[cfg(target_arch = "wasm32")]
    {
        let mut pid: i64 = 0;
        // SAFETY: the host writes one i64 at `pid`, a live local.
        match unsafe { sys::getpid(&mut pid) } {
            0 => pid,
            _ => 0,
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}
