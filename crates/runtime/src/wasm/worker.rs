//! Wasm jobs in worker processes: guests compiled without epoch checks, so they run at full
//! speed, and a time limit still kept: the parent kills the worker at the deadline (or when the
//! job is cancelled) and starts another for the next job.
//!
//! A worker is the vmgrid binary started as `vmgrid __wasm-worker` (see [`COMMAND`]) with one end
//! of a socket pair as its descriptor 3, and two memfds as 4 and 5 that it copies its guest's
//! kept stdout and stderr to as they come ([`OUT_FD`]). It reads its configuration, then runs one
//! task at a time and answers each with its outcome and captured output. A task it is killed in
//! keeps what the memfds hold (but not a count of what was dropped past the cap); each write the
//! guest makes below the cap costs one more system call. Its stdout and stderr are its
//! parent's, so `vmgrid run` echoes a guest's output as it comes. It exits when its parent closes
//! the socket or dies, even in the middle of a guest; it ignores the signals a terminal or a
//! service manager sends a whole group (SIGINT, SIGTERM, SIGHUP), which are the node's. Workers are kept and reused: a node running
//! a sweep starts one per cpu, not one per job.
//!
//! A module whose last run here was shorter than [`SHORT_RUN`] runs in the caller's process,
//! with epoch checks, instead: for so short a run, the round trip to a worker (two processes
//! woken) costs more than the checks, which cost in proportion to the guest's compute. A run of
//! either kind keeps the time limit, a sleeping guest's too (`wasm::sleep`); only its speed
//! differs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmgrid_job::FailureKind;

use super::{Task, WasmRuntime};
use crate::{Captured, Failure, Outcome, RunError, RunResult, RuntimeConfig};

/// The hidden first argument that makes the vmgrid binary a wasm worker.
pub const COMMAND: &str = "__wasm-worker";
/// The worker's end of its socket.
const FD: i32 = 3;
/// The memfds a worker copies its guest's kept stdout and stderr to as they come: what its parent
/// reads, should it kill the worker at a time limit or a cancel, to keep the output so far.
const OUT_FD: i32 = 4;
const ERR_FD: i32 = 5;
/// How often a waiting parent looks at the job's cancel flag.
const POLL: Duration = Duration::from_millis(10);
/// A frame's largest header; output bytes follow it and are bounded by the output cap. A task's
/// args and env are at most 1 MiB (the job's validator), up to 6x that as escaped JSON.
const MAX_HEADER: usize = 16 << 20;
/// The longest reason a worker sends (a guest's trap or link error can name long strings).
const MAX_REASON: usize = 8 << 10;
/// How long a worker may take to load or compile a module before the time limit starts.
const LOAD_BOUND: Duration = Duration::from_secs(600);
/// A module that last ran shorter than this runs in the caller's process (see the module doc).
pub const SHORT_RUN: Duration = Duration::from_millis(1);
/// Modules whose last run is remembered; past this, the memory starts over.
const REMEMBERED: usize = 1024;

/// This program, to start as a worker: `/proc/self/exe`, which still names it after its file was
/// replaced or removed (an upgrade in place), else its path.
pub fn this_program() -> Option<PathBuf> {
    let proc = PathBuf::from("/proc/self/exe");
    match proc.exists() {
        true => Some(proc),
        false => std::env::current_exe().ok(),
    }
}

/// How a task ended, as a worker says it; its stdout and stderr follow as two byte frames.
#[derive(Serialize, Deserialize)]
enum Ended {
    Exited(i32),
    Failed { kind: FailureKind, reason: String },
    BadJob(String),
    Host(String),
}

#[derive(Serialize, Deserialize)]
struct Answer {
    ended: Ended,
    stdout_dropped: u64,
    stderr_dropped: u64,
    wall_us: u64,
    /// See [`RunResult::created`].
    created: bool,
}

/// What a worker sends for a task: `Started` once its module is loaded (the time limit starts
/// then, as in process), then its `Answer`.
#[derive(Serialize, Deserialize)]
enum Msg {
    Started,
    Answer(Answer),
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("a frame over 4 GiB"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)
}

fn read_frame(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::other(format!("a frame of {len} bytes, over {max}")));
    }
    let mut bytes = vec![0; len];
    r.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn send<T: Serialize>(w: &mut impl Write, value: &T) -> std::io::Result<()> {
    write_frame(w, &serde_json::to_vec(value).map_err(std::io::Error::other)?)
}

fn receive<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<T> {
    serde_json::from_slice(&read_frame(r, MAX_HEADER)?).map_err(std::io::Error::other)
}

/// The worker's main: serves tasks on descriptor 3 until the parent goes away. Returns the
/// process's exit code.
pub fn serve() -> i32 {
    // SAFETY: descriptor 3 is the socket the parent passed (`Workers::start` puts it there); we
    // take ownership of it once, here, and nothing else in this process uses descriptor 3.
    let mut sock = unsafe { UnixStream::from_raw_fd(FD) };
    if let Err(e) = sock.peer_addr() {
        eprintln!("vmgrid: `{COMMAND}` is started by vmgrid itself, with a socket as descriptor 3 ({e})");
        return 2;
    }
    // A terminal's Ctrl-C or a service manager's SIGTERM to the whole group is for the node,
    // which drains: its running jobs finish. The worker ends with its parent, through the socket.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to ignored, before this process starts a thread.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    exit_with_parent(FD);
    // The descriptors came across exec with close-on-exec cleared (dup2 clears it); nothing this
    // worker starts (binaryen's optimizer) may inherit its socket to the node or its output copies.
    for fd in [FD, OUT_FD, ERR_FD] {
        // SAFETY: fcntl on a descriptor number; one that is not open only gives EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // Its runtime's configuration, sent once (`Workers::start`).
    let config: RuntimeConfig = match receive(&mut sock) {
        Ok(c) => c,
        Err(_) => return 0,
    };
    let mut runtime = WasmRuntime::new(&config, false).map_err(|e| format!("cannot start the wasm engine: {e:#}"));
    if let Ok(rt) = &mut runtime {
        // SAFETY: descriptors 4 and 5 are the memfds the parent passed (`Workers::start`); they
        // are taken once, here, and nothing else in this process uses them.
        let (out, err) = unsafe { (std::fs::File::from_raw_fd(OUT_FD), std::fs::File::from_raw_fd(ERR_FD)) };
        rt.mirror_output(out, err);
    }
    while let Ok(task) = receive::<Task>(&mut sock) {
        let runtime = runtime.as_ref().map_err(|e| RunError::Host(e.clone()));
        let result = match runtime.and_then(|rt| rt.ready(&task).map(|()| rt)) {
            Ok(rt) => {
                if send(&mut Unpiped(&sock), &Msg::Started).is_err() {
                    break;
                }
                rt.run_task(&task, None, None, &config)
            }
            Err(e) => Err(e),
        };
        if answer(&mut sock, result).is_err() {
            break;
        }
    }
    0
}

/// Ends this process as soon as the parent's end of `fd` closes, even while a guest runs.
fn exit_with_parent(fd: i32) {
    let watch = move || {
        let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        loop {
            // SAFETY: one valid pollfd, which outlives the call.
            let n = unsafe { libc::poll(&mut p, 1, -1) };
            let interrupted = n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
            if (n < 0 && !interrupted) || (n > 0 && p.revents & gone != 0) {
                // SAFETY: ending the process at once; nothing of ours needs to be flushed.
                unsafe { libc::_exit(0) };
            }
        }
    };
    if std::thread::Builder::new().name("vmgrid-worker-watch".into()).spawn(watch).is_err() {
        // SAFETY: as above: without the watch, a guest could outlive a killed node.
        unsafe { libc::_exit(1) };
    }
}

/// `s` cut to at most [`MAX_REASON`] bytes, on a character boundary.
fn bounded(mut s: String) -> String {
    if s.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [...]");
    }
    s
}

fn answer(sock: &mut UnixStream, result: Result<RunResult, RunError>) -> std::io::Result<()> {
    let none = Captured::default;
    let (ended, out, err, wall, created) = match result {
        Ok(r) => {
            let ended = match r.outcome {
                Outcome::Exited(code) => Ended::Exited(code),
                Outcome::Failed(f) => Ended::Failed { kind: f.kind, reason: bounded(f.reason) },
                Outcome::Vacated { .. } => Ended::Host("a wasm job cannot be vacated".into()),
            };
            (ended, r.stdout, r.stderr, r.wall, r.created)
        }
        Err(RunError::BadJob(m)) => (Ended::BadJob(bounded(m)), none(), none(), Duration::ZERO, true),
        Err(RunError::Host(m) | RunError::BadCheckpoint(m)) => {
            (Ended::Host(bounded(m)), none(), none(), Duration::ZERO, true)
        }
    };
    let wall_us = wall.as_micros() as u64;
    let head = Answer { ended, stdout_dropped: out.dropped, stderr_dropped: err.dropped, wall_us, created };
    let mut w = std::io::BufWriter::new(Unpiped(sock));
    send(&mut w, &Msg::Answer(head))?;
    write_frame(&mut w, &out.bytes)?;
    write_frame(&mut w, &err.bytes)?;
    w.flush()
}

/// Writes to a worker's socket without SIGPIPE: a worker that died is an error to handle, and
/// `vmgrid run` keeps SIGPIPE's default (it would end us).
struct Unpiped<'a>(&'a UnixStream);

impl Write for Unpiped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes for the call; the descriptor is open.
        let n = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One worker process and the parent's end of its socket.
struct Worker {
    child: Child,
    sock: UnixStream,
    /// The parent's ends of the worker's output memfds (see [`OUT_FD`]).
    out: std::fs::File,
    err: std::fs::File,
}

impl Worker {
    /// Empties the output memfds for the next task (their offset is the worker's too); `/dev/null`
    /// in their place (see [`output_copy`]) needs nothing.
    fn clear_output(&self) -> std::io::Result<()> {
        use std::io::Seek;
        for f in [&self.out, &self.err] {
            if !f.metadata()?.is_file() {
                continue;
            }
            f.set_len(0)?;
            (&*f).seek(std::io::SeekFrom::Start(0))?;
        }
        Ok(())
    }

    /// Kills the worker, then reads what its guest had written so far, each stream up to `cap`.
    fn kill_and_collect(mut self, cap: usize) -> (Captured, Captured) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let read = |f: &std::fs::File| {
            let mut bytes = Vec::new();
            let _ = std::io::Read::take(f, cap as u64).read_to_end(&mut bytes);
            Captured { bytes, dropped: 0 }
        };
        use std::io::Seek;
        let _ = (&self.out).seek(std::io::SeekFrom::Start(0));
        let _ = (&self.err).seek(std::io::SeekFrom::Start(0));
        (read(&self.out), read(&self.err))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parent's side: idle workers, and how to start more.
pub(crate) struct Workers {
    program: PathBuf,
    config: RuntimeConfig,
    idle: Mutex<Vec<Worker>>,
    /// How long each module last ran, by its image's path.
    last_run: Mutex<HashMap<PathBuf, Duration>>,
    /// Said once: no worker could be started, so wasm jobs run in this process.
    warned: AtomicBool,
}

impl Workers {
    pub(crate) fn new(program: PathBuf, config: &RuntimeConfig) -> Workers {
        Workers {
            program,
            config: config.clone(),
            idle: Mutex::default(),
            last_run: Mutex::default(),
            warned: AtomicBool::new(false),
        }
    }

    /// Whether `image`'s last run here was shorter than [`SHORT_RUN`] (never run: no).
    pub(crate) fn short(&self, image: &Path) -> bool {
        self.last_run.lock().unwrap_or_else(|p| p.into_inner()).get(image).is_some_and(|&d| d < SHORT_RUN)
    }

    /// `image` ran for `wall`.
    pub(crate) fn ran(&self, image: &Path, wall: Duration) {
        let mut last = self.last_run.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= REMEMBERED && !last.contains_key(image) {
            last.clear();
        }
        last.insert(image.to_path_buf(), wall);
    }

    fn start(&self) -> std::io::Result<Worker> {
        let (mine, theirs) = UnixStream::pair()?;
        let (out, err) = (output_copy("vmgrid-worker-stdout")?, output_copy("vmgrid-worker-stderr")?);
        let fds = [theirs.as_raw_fd(), out.as_raw_fd(), err.as_raw_fd()];
        let mut cmd = Command::new(&self.program);
        // `ps` shows `vmgrid __wasm-worker`, whatever path started it.
        cmd.arg0("vmgrid").arg(COMMAND).stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and calls only fcntl and dup2,
        // both async-signal-safe, on descriptors it owns.
        unsafe {
            cmd.pre_exec(move || {
                // All first to descriptors above the targets (close-on-exec), then each onto its
                // target (which dup2 leaves open across exec): no source is overwritten first.
                let mut high = [0; 3];
                for (h, &fd) in high.iter_mut().zip(&fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, FD + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        let w = Worker { child, sock: mine, out, err };
        // A worker runs one instance at a time, and starts no workers of its own.
        let pooled_instances = self.config.pooled_instances.min(1);
        let config = RuntimeConfig { pooled_instances, wasm_worker: None, ..self.config.clone() };
        send(&mut Unpiped(&w.sock), &config)?;
        Ok(w)
    }

    /// An idle worker that took `task`, or a new one (an idle worker may have died meanwhile);
    /// None when none can be started.
    fn hand(&self, task: &Task) -> Result<Option<Worker>, RunError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(w) = idle
            && send(&mut Unpiped(&w.sock), task).is_ok()
        {
            return Ok(Some(w));
        }
        let w = match self.start() {
            Ok(w) => w,
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    let program = std::fs::read_link(&self.program).unwrap_or(self.program.clone());
                    tracing::error!(
                        "cannot start a wasm worker ({}): {e}; wasm jobs run in this process",
                        program.display()
                    );
                }
                return Ok(None);
            }
        };
        send(&mut Unpiped(&w.sock), task).map_err(|e| RunError::host("cannot send a wasm worker its job", e))?;
        Ok(Some(w))
    }

    /// Runs `task` on a worker; kills it at the time limit (counted from its module's load, as in
    /// process) or once `cancel` is set. None when no worker can be started: the caller runs it.
    pub(crate) fn run(&self, task: &Task, cancel: Option<&AtomicBool>) -> Option<Result<RunResult, RunError>> {
        let start = Instant::now();
        match self.hand(task) {
            Ok(Some(w)) => Some(self.wait(w, task, cancel, start)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn wait(
        &self,
        mut w: Worker,
        task: &Task,
        cancel: Option<&AtomicBool>,
        start: Instant,
    ) -> Result<RunResult, RunError> {
        let (mut deadline, mut started) = (start + LOAD_BOUND, false);
        loop {
            if readable(&w.sock, POLL.min(deadline.saturating_duration_since(Instant::now())))? {
                let head = match receive::<Msg>(&mut w.sock) {
                    Ok(Msg::Started) => {
                        (deadline, started) = (Instant::now() + task.timeout(), true);
                        continue;
                    }
                    Ok(Msg::Answer(head)) => head,
                    Err(e) => return Err(died(&mut w, e)),
                };
                let result = read_answer(&mut w.sock, head, self.config.output_cap).map_err(|e| died(&mut w, e))?;
                // Its copy of the output is emptied now, not when it next gets a task: an idle
                // worker holds none of it (a worker that cannot be emptied is not kept).
                if w.clear_output().is_ok() {
                    self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(w);
                }
                if let Ok(r) = &result {
                    self.ran(task.image(), r.wall);
                }
                return result;
            }
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Ok(stopped(crate::cancelled_failure(), start, w, self.config.output_cap));
            }
            if Instant::now() >= deadline {
                if !started {
                    return Err(RunError::Host(format!("the module took over {} s to load", LOAD_BOUND.as_secs())));
                }
                let reason = format!("the time limit of {} s was exceeded (timeout_s)", task.timeout_s);
                return Ok(stopped(Failure { kind: FailureKind::TimeLimit, reason }, start, w, self.config.output_cap));
            }
        }
    }
}

/// A run the parent stopped: the worker is killed, and what its guest wrote so far is kept (how
/// much was dropped past the cap is not known then).
fn stopped(failure: Failure, start: Instant, w: Worker, cap: usize) -> RunResult {
    let (stdout, stderr) = w.kill_and_collect(cap);
    RunResult { outcome: Outcome::Failed(failure), stdout, stderr, wall: start.elapsed(), created: true }
}

/// Why a worker stopped answering: it died (its answer ended early), or its answer was
/// unusable. It is not used again either way (dropping it kills it).
fn died(w: &mut Worker, e: std::io::Error) -> RunError {
    let ended = match e.kind() {
        std::io::ErrorKind::UnexpectedEof => w.child.wait().ok(),
        _ => None,
    };
    match ended {
        Some(status) => RunError::Host(format!("the wasm worker running the job died ({status})")),
        None => RunError::host("the wasm worker running the job gave an unusable answer", e),
    }
}

/// Where a worker copies one of its streams: a new memfd, or, where none can be made (a seccomp
/// profile, an old kernel), `/dev/null`: the worker still runs, and a job it is killed in keeps
/// no output, as before there were copies.
fn output_copy(name: &str) -> std::io::Result<std::fs::File> {
    memfd(name).or_else(|e| {
        tracing::warn!("cannot make a memfd for a wasm worker's output ({e}); a killed job's output is lost");
        std::fs::OpenOptions::new().write(true).read(true).open("/dev/null")
    })
}

/// A new memfd, close-on-exec, named `name` (as `/proc/PID/fd` shows it).
fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name that outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor, owned by this `File` alone.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Whether `sock` has something to read within `wait`.
fn readable(sock: &UnixStream, wait: Duration) -> Result<bool, RunError> {
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, which outlives the call.
    let n = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
    match n {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => Ok(false),
                _ => Err(RunError::host("cannot wait for the wasm worker", e)),
            }
        }
    }
}

/// The rest of a worker's answer; each stream holds at most `cap` bytes (the capture's bound).
fn read_answer(sock: &mut UnixStream, head: Answer, cap: usize) -> std::io::Result<Result<RunResult, RunError>> {
    let stdout = read_frame(sock, cap)?;
    let stderr = read_frame(sock, cap)?;
    let outcome = match head.ended {
        Ended::Exited(code) => Outcome::Exited(code),
        Ended::Failed { kind, reason } => Outcome::Failed(Failure { kind, reason }),
        Ended::BadJob(m) => return Ok(Err(RunError::BadJob(m))),
        Ended::Host(m) => return Ok(Err(RunError::Host(m))),
    };
    Ok(Ok(RunResult {
        outcome,
        stdout: Captured { bytes: stdout, dropped: head.stdout_dropped },
        stderr: Captured { bytes: stderr, dropped: head.stderr_dropped },
        wall: Duration::from_micros(head.wall_us),
        created: head.created,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_runs_in_process_only_after_a_short_run() {
        let w = Workers::new(PathBuf::from("/nonexistent/vmgrid"), &RuntimeConfig::default());
        let (a, b) = (Path::new("/cache/a.wasm"), Path::new("/cache/b.wasm"));
        assert!(!w.short(a), "a module never run here goes to a worker");
        w.ran(a, SHORT_RUN / 2);
        w.ran(b, SHORT_RUN * 2);
        assert!(w.short(a));
        assert!(!w.short(b), "a long run goes to a worker");
        w.ran(a, Duration::from_secs(1));
        assert!(!w.short(a), "its last run counts: it went long");
        for i in 0..REMEMBERED {
            w.ran(&PathBuf::from(format!("/cache/{i}.wasm")), SHORT_RUN / 2);
        }
        assert!(w.last_run.lock().unwrap().len() <= REMEMBERED, "the memory stays bounded");
    }
}
