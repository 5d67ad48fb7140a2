//! The QEMU runtime: one job in a system VM, started as a `qemu-system-*` process.
//!
//! The job directory is shared over virtio-9p (tag `vmgrid`), the serial console is the job's
//! stdout, and the exit code comes from `/job/.vmgrid-exit`. Disk images are attached through a
//! qcow2 overlay in a scratch directory, so the base image is never written. The VM has no
//! network unless the job asks for `user`, runs under QEMU's seccomp sandbox, and is always
//! reaped: on timeout it is told to quit over QMP and then killed.

pub mod accel;
pub mod caps;
pub mod checkpoint;
mod ckrun;
pub mod image;
pub mod jobdisk;
pub mod launch;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmgrid_job::Job;

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::{Failure, FailureKind, Outcome, RunError, RunRequest, RunResult, RuntimeConfig, tools};

pub use accel::Accel;
pub use caps::{Caps, DropRoot};
pub use launch::Launcher;

/// A job VM's NIC on the pool's overlay (`network = "grid"`): QEMU's end of a connected
/// `SOCK_DGRAM` socket pair (one datagram is one Ethernet frame) whose other end the node's
/// virtual switch holds, and the MAC the switch expects the guest to use. The socket is inherited
/// by QEMU alone (it is never a path on the host), so no other process can reach the VM's NIC.
#[derive(Debug)]
pub struct NetAttach {
    pub fd: std::os::fd::OwnedFd,
    pub mac: [u8; 6],
}

impl NetAttach {
    /// QEMU's `-netdev` and `-device` values for it.
    pub fn qemu_args(&self) -> [String; 4] {
        use std::os::fd::AsRawFd;
        let m = self.mac;
        let mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
        [
            "-netdev".into(),
            format!("dgram,id=grid,local.type=fd,local.str={}", self.fd.as_raw_fd()),
            "-device".into(),
            format!("virtio-net-pci,netdev=grid,mac={mac}"),
        ]
    }

    /// Lets the QEMU started by `cmd` inherit the socket (it is close-on-exec for every other
    /// child of this process).
    pub fn pass_to(&self, cmd: &mut std::process::Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = self.fd.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and calls only fcntl, which
        // is async-signal-safe, on a descriptor this process holds open for the child's lifetime.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// The file in which the guest leaves its decimal exit code before it powers off.
pub const EXIT_FILE: &str = ".vmgrid-exit";
/// The 9p mount tag of the job directory.
pub const MOUNT_TAG: &str = "vmgrid";
/// How long QEMU gets to quit after a QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// The `qemu-system-*` binary for this host: `$VMGRID_QEMU`, or `qemu-system-<arch>` on `PATH`.
pub fn find_qemu() -> Result<PathBuf, RunError> {
    let name = format!("qemu-system-{}", std::env::consts::ARCH);
    tools::require(Some("VMGRID_QEMU"), &name, "qemu-system-x86")
}

/// `qemu-img`: `$VMGRID_QEMU_IMG`, or on `PATH`.
pub fn find_qemu_img() -> Result<PathBuf, RunError> {
    tools::require(Some("VMGRID_QEMU_IMG"), "qemu-img", "qemu-utils")
}

/// Whether this host can run QEMU jobs: its QEMU is installed, is a version vmgrid supports, and
/// (when vmgrid is root) can drop root.
pub fn usable() -> Result<Launcher, RunError> {
    Launcher::new()
}

pub fn run(req: &RunRequest<'_>, config: &RuntimeConfig) -> Result<RunResult, RunError> {
    if let Some(ck) = req.checkpoint {
        return ckrun::run(req, config, ck);
    }
    let job = req.job;
    for (what, p) in [("kernel", &job.vm.kernel), ("initrd", &job.vm.initrd), ("image", &job.vm.image)] {
        if let Some(p) = p
            && !p.is_file()
        {
            return Err(RunError::BadJob(format!("the {what} `{}` is not a readable file", p.display())));
        }
    }
    let launcher = Launcher::new()?;
    let scratch = crate::scratch::dir("qemu").map_err(|e| RunError::host("cannot create a scratch directory", e))?;
    let overlay = job.vm.image.as_deref().map(|image| image::overlay(image, scratch.path())).transpose()?;
    let job_dir = std::fs::canonicalize(req.job_dir).map_err(|e| RunError::host("the job directory", e))?;
    if let Some((user, _)) = launcher.run_as {
        launch::hand_over(&job_dir, user)?;
    }
    let qmp = scratch.path().join("qmp.sock");
    let _ = std::fs::remove_file(job_dir.join(EXIT_FILE));
    let accel = accel::choose(&launcher.qemu, &config.cache_dir);
    let launch = launch::Launch {
        job,
        job_dir: &job_dir,
        overlay: overlay.as_deref(),
        job_disk: None,
        incoming: false,
        resumed: 0,
        qmp: &qmp,
        accel,
        launcher: &launcher,
        net: req.net,
    };
    let mut cmd = launcher.command(&launch::args(&launch));
    if let Some(net) = req.net {
        net.pass_to(&mut cmd);
    }
    tracing::debug!(?cmd, "starting qemu");

    let (stdout, stderr) = CaptureSink::pair(config);
    let start = Instant::now();
    let mut vm = Supervised::spawn(&mut cmd, stdout.clone(), stderr.clone())
        .map_err(|e| RunError::host(format!("cannot start {}", launcher.qemu.display()), e))?;
    let deadline = start + Duration::from_secs(job.resources.timeout_s);
    let waited =
        vm.wait_cancellable(deadline, req.cancel.as_deref()).map_err(|e| RunError::host("waiting for qemu", e))?;
    let status = match waited {
        Waited::Exited(st) => Some(st),
        Waited::TimedOut => {
            stop(&mut vm, &qmp);
            None
        }
    };
    vm.join_readers();
    let (stdout, stderr, wall) = (stdout.take(), stderr.take(), start.elapsed());
    let outcome = outcome(req, status, &stdout, &stderr)?;
    Ok(RunResult { outcome, stdout, stderr, wall, created: true })
}

/// What a VM's end means: the guest's own outcome, a limit, or QEMU's failure (the job's, when
/// QEMU named one of its files).
pub(crate) fn outcome(
    req: &RunRequest<'_>,
    status: Option<std::process::ExitStatus>,
    stdout: &crate::Captured,
    stderr: &crate::Captured,
) -> Result<Outcome, RunError> {
    let job = req.job;
    Ok(match status {
        None if req.cancelled() => Outcome::Failed(crate::cancelled_failure()),
        None => Outcome::Failed(Failure {
            kind: FailureKind::TimeLimit,
            reason: format!(
                "the time limit of {} s was exceeded (timeout_s); the VM was stopped",
                job.resources.timeout_s
            ),
        }),
        Some(st) if !st.success() => {
            let msg = String::from_utf8_lossy(&stderr.bytes).trim().to_string();
            let msg = if msg.is_empty() { format!("qemu exited with {st}") } else { msg };
            let job_paths = [&job.vm.kernel, &job.vm.initrd, &job.vm.image];
            if job_paths.iter().filter_map(|p| p.as_ref()).any(|p| msg.contains(&*p.to_string_lossy())) {
                return Err(RunError::BadJob(format!("QEMU refused the job's files: {msg}")));
            }
            return Err(RunError::Host(format!("QEMU failed: {msg}")));
        }
        Some(_) => guest_outcome(req.job_dir, &stdout.bytes),
    })
}

/// Asks QEMU to quit over QMP, then kills it if it has not gone within the grace period.
pub(crate) fn stop(vm: &mut Supervised, qmp_path: &Path) {
    let asked =
        qmp::Qmp::connect(qmp_path, Duration::from_secs(1)).and_then(|mut q| q.execute("quit", serde_json::json!({})));
    if let Err(e) = &asked {
        tracing::warn!(pid = vm.pid(), "QMP quit failed, killing qemu: {e}");
    }
    if asked.is_err() || !matches!(vm.wait_until(Instant::now() + QUIT_GRACE), Ok(Waited::Exited(_))) {
        vm.kill_and_reap();
    }
}

/// Reads the guest's exit code after a clean power-off, or explains why there is none.
fn guest_outcome(job_dir: &Path, console: &[u8]) -> Outcome {
    let console = String::from_utf8_lossy(console);
    let panic = console.lines().find(|l| l.contains("Kernel panic - not syncing")).map(|l| l.trim().to_string());
    let exit_file = job_dir.join(EXIT_FILE);
    let text = std::fs::File::open(&exit_file).ok().map(|f| {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::Read::take(f, 64), &mut s);
        s
    });
    match (text, panic) {
        (_, Some(line)) => Outcome::Failed(Failure {
            kind: FailureKind::GuestError,
            reason: format!(
                "the guest kernel panicked: {}",
                line.trim_start_matches(|c: char| c == '[' || c == ']' || c.is_ascii_digit() || c == '.' || c == ' ')
            ),
        }),
        (Some(t), None) => match t.trim().parse::<i32>() {
            Ok(code) => Outcome::Exited(code),
            Err(_) => Outcome::Failed(Failure {
                kind: FailureKind::GuestError,
                reason: format!("the guest wrote {:?} to /job/{EXIT_FILE}, which is not a decimal exit code", t.trim()),
            }),
        },
        (None, None) => {
            let last = console.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(nothing)");
            Outcome::Failed(Failure {
                kind: FailureKind::GuestError,
                reason: format!(
                    "the guest powered off without writing its exit code to /job/{EXIT_FILE}; the console's last line was: {last}"
                ),
            })
        }
    }
}

/// The job's `append`, then `panic=-1` (so a panic ends the VM at once), then (for a job whose
/// directory is a disk, [`jobdisk`]) `vmgrid.job=disk`, then env as `KEY=VALUE` and args after
/// `--`: Linux hands both to init as its environment and argv.
pub fn kernel_cmdline(job: &Job, job_disk: bool) -> String {
    let mut line = job.vm.append.clone().unwrap_or_else(|| "console=ttyS0".into());
    if !line.split_whitespace().any(|w| w.starts_with("panic=")) {
        line.push_str(" panic=-1");
    }
    if job_disk {
        line.push_str(" vmgrid.job=disk");
    }
    let quote = |s: &str| {
        if s.is_empty() || s.contains([' ', '\t']) { format!("\"{s}\"") } else { s.to_string() }
    };
    for (k, v) in &job.vm.env {
        line.push_str(&format!(" {k}={}", quote(v)));
    }
    if !job.vm.args.is_empty() {
        line.push_str(" --");
        for a in &job.vm.args {
            line.push(' ');
            line.push_str(&quote(a));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_carries_env_and_args_and_ends_panics() {
        let text = "[vm]\ntype = \"qemu\"\nkernel = \"k\"\nappend = \"console=ttyS0 quiet\"\nargs = [\"sh\", \"-c\", \"echo hi there\"]\nenv = { MODE = \"fast\" }\n";
        let job = vmgrid_job::parse_job(Path::new("j.toml"), text).unwrap();
        assert_eq!(kernel_cmdline(&job, false), "console=ttyS0 quiet panic=-1 MODE=fast -- sh -c \"echo hi there\"");
    }

    #[test]
    fn exit_file_decides_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            matches!(guest_outcome(dir.path(), b"booted\n"), Outcome::Failed(f) if f.reason.contains("without writing") && f.reason.contains("booted"))
        );
        std::fs::write(dir.path().join(EXIT_FILE), "7\n").unwrap();
        assert_eq!(guest_outcome(dir.path(), b""), Outcome::Exited(7));
        std::fs::write(dir.path().join(EXIT_FILE), "seven").unwrap();
        assert!(matches!(guest_outcome(dir.path(), b""), Outcome::Failed(f) if f.reason.contains("not a decimal")));
        let panic = b"[    1.234] Kernel panic - not syncing: Attempted to kill init!\n";
        assert!(
            matches!(guest_outcome(dir.path(), panic), Outcome::Failed(f) if f.reason == "the guest kernel panicked: Kernel panic - not syncing: Attempted to kill init!")
        );
    }
}
