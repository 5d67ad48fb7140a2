//! A child process under a deadline: its stdout and stderr go to bounded captures, it dies with
//! us, and it is always reaped. Used by the qemu and jvm runtimes and the grid appliance.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::capture::CaptureSink;

pub struct Supervised {
    pid: libc::pid_t,
    exited: mpsc::Receiver<std::io::Result<ExitStatus>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<std::io::Result<ExitStatus>>,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    Exited(ExitStatus),
    TimedOut,
}

impl Supervised {
    /// Starts `cmd` with stdin closed and stdout/stderr drained into the sinks. The child gets
    /// SIGKILL if the thread that started it dies, so a killed vmgrid leaves no stray VM: callers
    /// must start and wait for the child on the same thread.
    pub fn spawn(cmd: &mut Command, stdout: CaptureSink, stderr: CaptureSink) -> std::io::Result<Supervised> {
        Self::spawn_with(cmd, stdout, stderr, false)
    }

    /// Like [`Supervised::spawn`]; with `new_session`, the child also leads a session of its own,
    /// so a terminal's Ctrl-C reaches us and not it.
    pub fn spawn_with(
        cmd: &mut Command,
        stdout: CaptureSink,
        stderr: CaptureSink,
        new_session: bool,
    ) -> std::io::Result<Supervised> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and calls only prctl, getppid
        // and setsid, all async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    // The parent died before prctl took effect.
                    return Err(std::io::Error::other("parent exited"));
                }
                if new_session {
                    libc::setsid();
                }
                Ok(())
            });
        }
        let mut child: Child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(drain(out, stdout));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(drain(err, stderr));
        }
        let (tx, exited) = mpsc::channel();
        std::thread::Builder::new().name("vmgrid-reaper".into()).spawn(move || {
            let _ = tx.send(child.wait());
        })?;
        Ok(Supervised { pid, exited, readers, status: None })
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits until the child exits, `deadline` passes, or `cancel` is set.
    pub fn wait_cancellable(&mut self, deadline: Instant, cancel: Option<&AtomicBool>) -> std::io::Result<Waited> {
        loop {
            let slice = deadline.min(Instant::now() + Duration::from_millis(50));
            match self.wait_until(slice)? {
                Waited::TimedOut if Instant::now() < deadline && !cancel.is_some_and(|c| c.load(Ordering::Relaxed)) => {
                    continue;
                }
                w => return Ok(w),
            }
        }
    }

    /// Whether the child has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.wait_until(Instant::now())? {
            Waited::Exited(st) => Ok(Some(st)),
            Waited::TimedOut => Ok(None),
        }
    }

    /// Waits until the child exits or `deadline` passes.
    pub fn wait_until(&mut self, deadline: Instant) -> std::io::Result<Waited> {
        if self.status.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.exited.recv_timeout(left) {
                Ok(st) => self.status = Some(st),
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(Waited::TimedOut),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.status = Some(Err(std::io::Error::other("the reaper thread ended")))
                }
            }
        }
        match self.status.as_ref().expect("set above") {
            Ok(st) => Ok(Waited::Exited(*st)),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// SIGKILLs the child (if it has not been reaped) and waits for it and its output.
    pub fn kill_and_reap(&mut self) {
        if self.status.is_none() && self.exited.try_recv().map(|st| self.status = Some(st)).is_err() {
            // SAFETY: kill(2) with a pid we spawned and have not yet seen reaped: the reaper
            // thread sends right after wait() returns, and we checked for that message.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
            let _ = self.wait_until(Instant::now() + Duration::from_secs(30));
        }
        self.join_readers();
    }

    /// Waits for the output readers to reach end of file (after the child has exited).
    pub fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn drain(mut from: impl Read + Send + 'static, to: CaptureSink) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => to.write(&buf[..n]),
            }
        }
    })
}
