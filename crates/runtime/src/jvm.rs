//! The JVM runtime: `java -Xmx<memory_mb>m -jar image args…` in the job directory, on hosts with
//! a `java` on PATH (or `$VMGRID_JAVA`). Same stdout, exit code and time rules as the other VMs.
//!
//! The JVM is a process VM without a sandbox of its own: it runs with the host user's authority.
//! Nodes advertise `jvm` only when they have a JVM, and pools that take untrusted jars should run
//! their nodes inside the grid appliance or another system VM.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::{Failure, FailureKind, Outcome, RunError, RunRequest, RunResult, RuntimeConfig};

/// The JVM on this host, if there is one.
pub fn find_java() -> Option<std::path::PathBuf> {
    crate::tools::find(Some("VMGRID_JAVA"), "java")
}

pub fn run(req: &RunRequest<'_>, config: &RuntimeConfig) -> Result<RunResult, RunError> {
    let job = req.job;
    let jar = job.vm.image.as_deref().ok_or_else(|| RunError::BadJob("a jvm job needs `image` (a .jar)".into()))?;
    let jar = std::fs::canonicalize(jar)
        .map_err(|e| RunError::BadJob(format!("the jar `{}` cannot be read: {e}", jar.display())))?;
    let java = find_java().ok_or_else(|| {
        RunError::Host(
            "no `java` on PATH; install a JVM (Debian: `apt-get install default-jre-headless`) or set VMGRID_JAVA"
                .into(),
        )
    })?;
    let mut cmd = Command::new(&java);
    cmd.arg(format!("-Xmx{}m", job.resources.memory_mb))
        .arg(format!("-XX:ActiveProcessorCount={}", job.resources.cpus))
        .arg("-jar")
        .arg(&jar)
        .args(&job.vm.args)
        .current_dir(req.job_dir)
        .env_clear()
        .envs(&job.vm.env);
    let (stdout, stderr) = CaptureSink::pair(config);
    let start = Instant::now();
    let mut vm = Supervised::spawn(&mut cmd, stdout.clone(), stderr.clone())
        .map_err(|e| RunError::host(format!("cannot start {}", java.display()), e))?;
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
    Ok(RunResult { outcome, stdout: stdout.take(), stderr, wall: start.elapsed() })
}
