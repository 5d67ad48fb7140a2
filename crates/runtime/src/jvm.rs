//! The JVM runtime: `java -Xmx<memory_mb>m -jar image args…` in the job directory, with the same
//! stdout, exit code and time rules as the other VMs, confined by bubblewrap.
//!
//! The JVM has no sandbox of its own, so every JVM job runs inside a `bwrap` sandbox: new mount,
//! PID, network, IPC and UTS namespaces; the host's `/usr` (and the JVM's home) read-only, the
//! job directory as `/job` (the working directory), the jar as `/vmgrid/image.jar`, a private
//! `/tmp`, and nothing else of the host's filesystem; no network; no capabilities; and never root:
//! a root node hands the job directory to `nobody` and the JVM runs as `nobody` (a non-root node
//! runs it as itself, in a user namespace). Resource limits: the heap (`-Xmx`), metaspace and
//! direct memory from `memory_mb`; file size from `disk_mb` (RLIMIT_FSIZE, besides the disk
//! watchdog); open files and processes (RLIMIT_NOFILE, RLIMIT_NPROC); no core dumps.
//! Nodes offer `jvm` only when their operator asks (`vmgrid node --jvm`) and bubblewrap is there.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::qemu::launch::{UNPRIVILEGED_USER, effective_uid, hand_over, user_ids};
use crate::{Failure, FailureKind, Outcome, RunError, RunRequest, RunResult, RuntimeConfig};

/// Where the jar is inside the sandbox.
const JAR_IN_SANDBOX: &str = "/vmgrid/image.jar";
/// The descriptor the jar is handed to bwrap on.
const JAR_FD: i32 = 3;

/// The JVM on this host, if there is one.
pub fn find_java() -> Option<PathBuf> {
    crate::tools::find(Some("VMGRID_JAVA"), "java")
}

/// The tools a confined JVM job needs: a JVM and bubblewrap (and, as root, setpriv).
#[derive(Debug, Clone)]
pub struct Jvm {
    pub java: PathBuf,
    pub bwrap: PathBuf,
}

/// Whether JVM jobs can run here, confined; the error says what to install.
pub fn usable() -> Result<Jvm, RunError> {
    let java = find_java().ok_or_else(|| {
        RunError::Host(
            "no `java` on PATH; install a JVM (Debian: `apt-get install default-jre-headless`) or set VMGRID_JAVA"
                .into(),
        )
    })?;
    let java = std::fs::canonicalize(&java)
        .map_err(|e| RunError::Host(format!("the JVM `{}` cannot be found: {e}", java.display())))?;
    let bwrap = crate::tools::require(Some("VMGRID_BWRAP"), "bwrap", "bubblewrap")
        .and_then(|b| {
            b.is_file().then_some(b.clone()).ok_or_else(|| {
                RunError::Host(format!(
                    "`{}` is not a file; install bubblewrap (Debian: `apt-get install bubblewrap`)",
                    b.display()
                ))
            })
        })
        .map_err(|e| RunError::Host(format!("JVM jobs run confined by bubblewrap: {e}")))?;
    if effective_uid() == 0 {
        crate::tools::require(None, "setpriv", "util-linux")?;
        user_ids(UNPRIVILEGED_USER)?.ok_or_else(|| {
            RunError::Host(format!(
                "vmgrid runs as root but there is no `{UNPRIVILEGED_USER}` user for the JVM to run as"
            ))
        })?;
    }
    Ok(Jvm { java, bwrap })
}

/// The JVM's home (`…/bin/java` → `…`), bound read-only when it is not under `/usr`.
fn java_home(java: &Path) -> Option<&Path> {
    java.parent().and_then(Path::parent).filter(|h| !h.starts_with("/usr"))
}

/// The sandbox around `java`: everything up to and including the `--` before the JVM's argv.
fn sandbox_args(jvm: &Jvm, job_dir: &Path, as_root: bool) -> Vec<String> {
    let mut a = crate::tools::bwrap_base();
    a.extend(["--hostname", "vmgrid-jvm", "--proc", "/proc"].map(String::from));
    if !as_root {
        // As root, setpriv needs CAP_SETUID to become nobody, and drops every capability itself.
        a.extend(["--unshare-user".into(), "--cap-drop".into(), "ALL".into()]);
    }
    // The JVM's configuration lives under /etc (java.security, the alternatives links); bwrap
    // would make the directories above a bind 0700, which the JVM's user could not enter.
    for dir in ["/etc", "/etc/ssl", "/vmgrid"] {
        a.extend(["--perms".into(), "0755".into(), "--dir".into(), dir.into()]);
    }
    // Debian keeps each JDK's conf/ under /etc/java-N-openjdk.
    let java_etc = std::fs::read_dir("/etc").into_iter().flatten().flatten().filter_map(|e| {
        let name = e.file_name().into_string().ok()?;
        name.starts_with("java-").then(|| format!("/etc/{name}"))
    });
    for dir in ["/etc/alternatives".to_string(), "/etc/ssl/certs".to_string()].into_iter().chain(java_etc) {
        a.extend(["--ro-bind-try".into(), dir.clone(), dir]);
    }
    if let Some(home) = java_home(&jvm.java) {
        let h = home.display().to_string();
        a.extend(["--ro-bind".into(), h.clone(), h]);
    }
    a.extend(["--bind".into(), job_dir.display().to_string(), "/job".into(), "--chdir".into(), "/job".into()]);
    a.extend(["--perms".into(), "0444".into(), "--ro-bind-data".into(), JAR_FD.to_string(), JAR_IN_SANDBOX.into()]);
    a.extend(["--setenv".into(), "HOME".into(), "/job".into(), "--".into()]);
    if as_root {
        // Numeric ids: the sandbox has no /etc/passwd to look a name up in.
        let (uid, gid) = user_ids(UNPRIVILEGED_USER).ok().flatten().unwrap_or((65534, 65534));
        a.extend(
            ["/usr/bin/setpriv".into(), format!("--reuid={uid}"), format!("--regid={gid}")].into_iter().chain(
                ["--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"].map(String::from),
            ),
        );
    }
    a
}

/// Gives the child the jar on [`JAR_FD`] and the job's resource limits, before it becomes bwrap.
fn confine_child(cmd: &mut Command, jar: std::fs::File, fsize: u64) {
    let limits =
        [(libc::RLIMIT_FSIZE, fsize), (libc::RLIMIT_NOFILE, 4096), (libc::RLIMIT_NPROC, 4096), (libc::RLIMIT_CORE, 0)];
    // SAFETY: the closure runs in the forked child before exec and calls only dup2, fcntl
    // and setrlimit, all async-signal-safe, on an fd and plain integers it owns; `jar` is moved in
    // and stays open in the parent until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let fd = jar.as_raw_fd();
            // dup2 onto itself keeps close-on-exec set, so that case clears the flag instead.
            let ok = if fd == JAR_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, JAR_FD) };
            if ok < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (resource, value) in limits {
                let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The JVM's own memory bounds from `memory_mb`: heap, metaspace, direct buffers, thread stacks.
fn memory_args(memory_mb: u64) -> Vec<String> {
    let side = (memory_mb / 4).max(16);
    vec![
        format!("-Xmx{memory_mb}m"),
        format!("-XX:MaxMetaspaceSize={side}m"),
        format!("-XX:MaxDirectMemorySize={side}m"),
        "-Xss1m".into(),
        "-XX:-UsePerfData".into(),
    ]
}

pub fn run(req: &RunRequest<'_>, config: &RuntimeConfig) -> Result<RunResult, RunError> {
    let job = req.job;
    let jar = job.vm.image.as_deref().ok_or_else(|| RunError::BadJob("a jvm job needs `image` (a .jar)".into()))?;
    let jar = std::fs::File::open(jar)
        .map_err(|e| RunError::BadJob(format!("the jar `{}` cannot be read: {e}", jar.display())))?;
    let jvm = usable()?;
    let as_root = effective_uid() == 0;
    if as_root {
        hand_over(req.job_dir, UNPRIVILEGED_USER)?;
    }
    let mut cmd = Command::new(&jvm.bwrap);
    cmd.args(sandbox_args(&jvm, req.job_dir, as_root))
        .arg(&jvm.java)
        .args(memory_args(job.resources.memory_mb))
        .arg(format!("-XX:ActiveProcessorCount={}", job.resources.cpus.max(1)))
        .arg("-jar")
        .arg(JAR_IN_SANDBOX)
        .args(&job.vm.args)
        .env_clear()
        .envs(&job.vm.env);
    confine_child(&mut cmd, jar, job.resources.disk_mb.saturating_mul(1024 * 1024).max(1024 * 1024));
    let (stdout, stderr) = CaptureSink::pair(config);
    let start = Instant::now();
    let mut vm = Supervised::spawn(&mut cmd, stdout.clone(), stderr.clone())
        .map_err(|e| RunError::host(format!("cannot start {}", jvm.bwrap.display()), e))?;
    let waited = vm
        .wait_cancellable(start + Duration::from_secs(job.resources.timeout_s), req.cancel.as_deref())
        .map_err(|e| RunError::host("waiting for java", e))?;
    let outcome = match waited {
        Waited::TimedOut if req.cancelled() => {
            vm.kill_and_reap();
            Outcome::Failed(crate::cancelled_failure())
        }
        Waited::TimedOut => {
            vm.kill_and_reap();
            Outcome::Failed(Failure {
                kind: FailureKind::TimeLimit,
                reason: format!("the time limit of {} s was exceeded (timeout_s)", job.resources.timeout_s),
            })
        }
        Waited::Exited(st) => {
            vm.join_readers();
            match st.code() {
                Some(c) => Outcome::Exited(c),
                None => Outcome::Failed(Failure {
                    kind: FailureKind::GuestError,
                    reason: format!("the JVM was killed: {st}"),
                }),
            }
        }
    };
    let stderr = stderr.take();
    let outcome = match outcome {
        Outcome::Exited(c)
            if c != 0 && String::from_utf8_lossy(&stderr.bytes).contains("java.lang.OutOfMemoryError") =>
        {
            Outcome::Failed(Failure {
                kind: FailureKind::MemoryLimit,
                reason: format!("the JVM ran out of its {} MiB heap (memory_mb)", job.resources.memory_mb),
            })
        }
        o => o,
    };
    Ok(RunResult { outcome, stdout: stdout.take(), stderr, wall: start.elapsed(), created: true })
}
