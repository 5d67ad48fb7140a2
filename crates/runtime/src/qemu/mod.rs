//! The QEMU runtime: one job in a system VM, started as a `qemu-system-*` process.
//!
//! The job directory is shared over virtio-9p (tag `vmgrid`), the serial console is the job's
//! stdout, and the exit code comes from `/job/.vmgrid-exit`. Disk images are attached through a
//! qcow2 overlay in a scratch directory, so the base image is never written. The VM has no
//! network unless the job asks for `user`, runs under QEMU's seccomp sandbox, and is always
//! reaped: on timeout it is told to quit over QMP and then killed.

pub mod accel;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmgrid_job::{Job, Network};

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::{Failure, FailureKind, Outcome, RunError, RunRequest, RunResult, RuntimeConfig};

pub use accel::Accel;

/// The file in which the guest leaves its decimal exit code before it powers off.
pub const EXIT_FILE: &str = ".vmgrid-exit";
/// The 9p mount tag of the job directory.
pub const MOUNT_TAG: &str = "vmgrid";
/// How long QEMU gets to quit after a QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// The `qemu-system-*` binary for this host: `$VMGRID_QEMU`, or `qemu-system-<arch>` on `PATH`.
pub fn find_qemu() -> Result<PathBuf, RunError> {
    let name = format!("qemu-system-{}", std::env::consts::ARCH);
    find_tool("VMGRID_QEMU", &name).ok_or_else(|| {
        RunError::Host(format!(
            "`{name}` was not found on PATH; install QEMU (Debian: `apt-get install qemu-system-x86`) or set VMGRID_QEMU"
        ))
    })
}

fn find_qemu_img() -> Result<PathBuf, RunError> {
    find_tool("VMGRID_QEMU_IMG", "qemu-img").ok_or_else(|| {
        RunError::Host("`qemu-img` was not found on PATH; install it (Debian: `apt-get install qemu-utils`)".into())
    })
}

pub(crate) fn find_tool(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

pub fn run(req: &RunRequest<'_>, config: &RuntimeConfig) -> Result<RunResult, RunError> {
    let job = req.job;
    for (what, p) in [("kernel", &job.vm.kernel), ("initrd", &job.vm.initrd), ("image", &job.vm.image)] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(RunError::BadJob(format!("the {what} `{}` is not a readable file", p.display())));
            }
        }
    }
    let qemu = find_qemu()?;
    let scratch = tempfile::Builder::new()
        .prefix("vmgrid-qemu-")
        .tempdir()
        .map_err(|e| RunError::host("cannot create a scratch directory", e))?;
    let overlay = match &job.vm.image {
        Some(image) => Some(create_overlay(image, scratch.path())?),
        None => None,
    };
    let accel = accel::choose(&qemu, &config.cache_dir);
    let qmp_path = scratch.path().join("qmp.sock");
    let _ = std::fs::remove_file(req.job_dir.join(EXIT_FILE));
    let mut cmd = command(&qemu, job, req.job_dir, overlay.as_deref(), &qmp_path, accel)?;
    tracing::debug!(?cmd, "starting qemu");

    let (stdout, stderr) = CaptureSink::pair(config);
    let start = Instant::now();
    let mut vm = Supervised::spawn(&mut cmd, stdout.clone(), stderr.clone())
        .map_err(|e| RunError::host(format!("cannot start {}", qemu.display()), e))?;
    let deadline = start + Duration::from_secs(job.resources.timeout_s);
    let waited =
        vm.wait_cancellable(deadline, req.cancel.as_deref()).map_err(|e| RunError::host("waiting for qemu", e))?;
    let status = match waited {
        Waited::Exited(st) => Some(st),
        Waited::TimedOut => {
            stop(&mut vm, &qmp_path);
            None
        }
    };
    vm.join_readers();
    let wall = start.elapsed();
    let stdout = stdout.take();
    let stderr = stderr.take();
    let outcome = match status {
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
    };
    Ok(RunResult { outcome, stdout, stderr, wall })
}

/// Asks QEMU to quit over QMP, then kills it if it has not gone within the grace period.
fn stop(vm: &mut Supervised, qmp_path: &Path) {
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

/// Makes a qcow2 overlay on top of `image`, so the guest's writes never reach the image itself.
fn create_overlay(image: &Path, scratch: &Path) -> Result<PathBuf, RunError> {
    let qemu_img = find_qemu_img()?;
    let image = std::fs::canonicalize(image)
        .map_err(|e| RunError::BadJob(format!("the image `{}` cannot be read: {e}", image.display())))?;
    let out = Command::new(&qemu_img)
        .args(["info", "--output=json"])
        .arg(&image)
        .output()
        .map_err(|e| RunError::host(format!("cannot run {}", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(RunError::BadJob(format!(
            "the image `{}` is not a disk image QEMU can read: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| RunError::Host(format!("qemu-img info printed something unexpected: {e}")))?;
    if info.get("backing-filename").is_some() {
        // A backing file could point anywhere on this host; only self-contained images are run.
        return Err(RunError::BadJob(format!(
            "the image `{}` has a backing file; flatten it first (`qemu-img convert -O qcow2 in out`)",
            image.display()
        )));
    }
    let format = info.get("format").and_then(|f| f.as_str()).unwrap_or("raw").to_string();
    if !["raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"].contains(&format.as_str()) {
        return Err(RunError::BadJob(format!(
            "the image `{}` has format `{format}`, which vmgrid does not run",
            image.display()
        )));
    }
    let overlay = scratch.join("overlay.qcow2");
    let out = Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b"])
        .arg(&image)
        .arg(&overlay)
        .output()
        .map_err(|e| RunError::host(format!("cannot run {}", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(RunError::Host(format!(
            "cannot create an overlay: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(overlay)
}

/// QEMU's option syntax doubles commas inside values.
fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn command(
    qemu: &Path,
    job: &Job,
    job_dir: &Path,
    overlay: Option<&Path>,
    qmp: &Path,
    accel: Accel,
) -> Result<Command, RunError> {
    let job_dir = std::fs::canonicalize(job_dir).map_err(|e| RunError::host("the job directory", e))?;
    // QEMU never runs as root: as root, vmgrid hands the job directory to `nobody` and has QEMU
    // drop to it (after it has opened the kernel, initrd and disks, and before the guest runs).
    // The seccomp filter must then let QEMU make that one setuid; nobody cannot elevate again.
    let run_as = if effective_uid() == 0 { Some(hand_to_nobody(&job_dir)?) } else { None };
    let elevate = if run_as.is_some() { "allow" } else { "deny" };
    let mut cmd = Command::new(qemu);
    cmd.args(["-name", &format!("vmgrid-{}", job.name)])
        .args(["-machine", "pc", "-accel", accel.as_str()])
        .args(["-m", &job.resources.memory_mb.to_string(), "-smp", &job.resources.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", opt_path(qmp))])
        .args(["-sandbox", &format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")])
        .args([
            "-fsdev",
            &format!("local,id=job,path={},security_model=mapped-xattr,multidevs=remap", opt_path(&job_dir)),
        ])
        .args(["-device", &format!("virtio-9p-pci,fsdev=job,mount_tag={MOUNT_TAG}")]);
    if let Some(user) = run_as {
        cmd.args(["-runas", user]);
    }
    if accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    if let Some(o) = overlay {
        cmd.args(["-drive", &format!("file={},format=qcow2,if=virtio", opt_path(o))]);
    }
    if let Some(k) = &job.vm.kernel {
        cmd.arg("-kernel").arg(k);
        if let Some(i) = &job.vm.initrd {
            cmd.arg("-initrd").arg(i);
        }
        cmd.args(["-append", &kernel_cmdline(job)]);
    }
    match job.vm.network {
        Network::None => cmd.args(["-nic", "none"]),
        Network::User => cmd.args(["-nic", "user,model=virtio-net-pci"]),
    };
    if run_as.is_some() {
        return Ok(in_own_pid_namespace(&cmd));
    }
    Ok(cmd)
}

const SH: &str = "/bin/sh";

/// Changing its uid (`-runas`) clears QEMU's parent-death signal, so a node killed with SIGKILL
/// would leave it running. As root, QEMU therefore runs in a PID namespace of its own whose init is
/// a shell that keeps the death signal (it never changes uid): when vmgrid dies, or kills the
/// namespace on a timeout, the init dies and the kernel kills everything in the namespace with it.
/// Without util-linux's `unshare` (every Debian has it), QEMU runs as before, with a warning.
fn in_own_pid_namespace(qemu: &Command) -> Command {
    let Some(unshare) = find_tool("VMGRID_UNSHARE", "unshare").filter(|_| Path::new(SH).is_file()) else {
        tracing::warn!("`unshare` was not found: a QEMU that dropped root may outlive a killed vmgrid");
        let mut cmd = Command::new(qemu.get_program());
        cmd.args(qemu.get_args());
        return cmd;
    };
    let mut cmd = Command::new(unshare);
    // The shell must not exec QEMU in its place (it would become the init and lose the signal).
    cmd.args(["--pid", "--fork", "--kill-child=SIGKILL", "--", SH, "-c", "\"$@\"; exit $?", "sh"])
        .arg(qemu.get_program())
        .args(qemu.get_args());
    cmd
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The unprivileged user QEMU runs as when vmgrid is root.
const UNPRIVILEGED_USER: &str = "nobody";

/// Gives the job directory (and everything in it) to `nobody`, so QEMU can serve it after
/// dropping root. Returns the user name for `-runas`.
fn hand_to_nobody(job_dir: &Path) -> Result<&'static str, RunError> {
    let name = std::ffi::CString::new(UNPRIVILEGED_USER).expect("no NUL in a constant");
    // SAFETY: getpwnam gets a valid C string; the returned record is read at once, before any
    // other call could reuse its static storage, and only its two integer fields are copied.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(RunError::Host(format!(
                "vmgrid runs as root but there is no `{UNPRIVILEGED_USER}` user for QEMU to run as"
            )));
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    for entry in walkdir::WalkDir::new(job_dir) {
        let entry = entry.map_err(|e| RunError::host("cannot read the job directory", e))?;
        std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))
            .map_err(|e| RunError::host(format!("cannot hand {} to {UNPRIVILEGED_USER}", entry.path().display()), e))?;
    }
    Ok(UNPRIVILEGED_USER)
}

/// The job's `append`, then `panic=-1` (so a panic ends the VM at once), then env as `KEY=VALUE`
/// and args after `--`: Linux hands both to init as its environment and argv.
pub fn kernel_cmdline(job: &Job) -> String {
    let mut line = job.vm.append.clone().unwrap_or_else(|| "console=ttyS0".into());
    if !line.split_whitespace().any(|w| w.starts_with("panic=")) {
        line.push_str(" panic=-1");
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
        assert_eq!(kernel_cmdline(&job), "console=ttyS0 quiet panic=-1 MODE=fast -- sh -c \"echo hi there\"");
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
