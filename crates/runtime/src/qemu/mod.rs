//! The QEMU runtime: one job in a system VM, started as a `qemu-system-*` process.
//!
//! The job directory is shared over virtio-9p (tag `vmgrid`), the serial console is the job's
//! stdout, and the exit code comes from `/job/.vmgrid-exit`. Disk images are attached through a
//! qcow2 overlay in a scratch directory, so the base image is never written. The VM has no
//! network unless the job asks for `user`, runs under QEMU's seccomp sandbox, and is always
//! reaped: on timeout it is told to quit over QMP and then killed.

pub mod accel;
pub mod caps;
pub mod qmp;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmgrid_job::{Job, Network};

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::{Failure, FailureKind, Outcome, RunError, RunRequest, RunResult, RuntimeConfig};

pub use accel::Accel;
pub use caps::{Caps, DropRoot};

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

/// The QEMU binary and what it accepts, if this host can run QEMU jobs: QEMU is installed, is a
/// version vmgrid supports, and (when vmgrid is root) can drop root.
pub fn usable() -> Result<(PathBuf, Caps), RunError> {
    let qemu = find_qemu()?;
    let caps = caps::of(&qemu)?;
    if effective_uid() == 0 && caps.drop_root.is_none() {
        return Err(cannot_drop_root(&qemu, &caps));
    }
    Ok((qemu, caps))
}

fn cannot_drop_root(qemu: &Path, caps: &Caps) -> RunError {
    RunError::Host(format!(
        "vmgrid runs as root, and QEMU {} at {} cannot switch to another user (it has neither -runas nor -run-with user=); run vmgrid as an unprivileged user",
        caps.version,
        qemu.display()
    ))
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

/// Everything the QEMU command line depends on, found beforehand, so that building the line is a
/// pure function (and is tested for both QEMU generations without running either).
pub(crate) struct Launch<'a> {
    pub job: &'a Job,
    /// The job directory, canonical.
    pub job_dir: &'a Path,
    pub overlay: Option<&'a Path>,
    pub qmp: &'a Path,
    pub accel: Accel,
    pub caps: &'a Caps,
    /// The unprivileged user QEMU switches to before the guest runs (when vmgrid is root).
    pub run_as: Option<(&'a str, DropRoot)>,
}

/// QEMU's arguments for one job VM.
pub(crate) fn args(l: &Launch<'_>) -> Vec<OsString> {
    let job = l.job;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(OsString::from));
    // Commas are doubled in every value QEMU splits at commas, so no value can add options.
    push(&["-name", &format!("vmgrid-{}", job.name.replace(',', ",,"))]);
    push(&["-machine", "pc", "-accel", l.accel.as_str()]);
    push(&["-m", &job.resources.memory_mb.to_string(), "-smp", &job.resources.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt_path(l.qmp))]);
    if l.caps.sandbox {
        // Dropping root is one setuid, which the filter must then allow; nobody cannot elevate again.
        let elevate = if l.run_as.is_some() { "allow" } else { "deny" };
        push(&["-sandbox", &format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")]);
    }
    push(&[
        "-fsdev",
        &format!("local,id=job,path={},security_model=mapped-xattr,multidevs=remap", opt_path(l.job_dir)),
    ]);
    push(&["-device", &format!("virtio-9p-pci,fsdev=job,mount_tag={MOUNT_TAG}")]);
    if let Some((user, how)) = l.run_as {
        let [opt, val] = how.args(user);
        push(&[&opt, &val]);
    }
    if l.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    if let Some(o) = l.overlay {
        push(&["-drive", &format!("file={},format=qcow2,if=virtio", opt_path(o))]);
    }
    if let Some(k) = &job.vm.kernel {
        a.push("-kernel".into());
        a.push(k.into());
        if let Some(i) = &job.vm.initrd {
            a.push("-initrd".into());
            a.push(i.into());
        }
        a.push("-append".into());
        a.push(kernel_cmdline(job).into());
    }
    match job.vm.network {
        Network::None => a.extend(["-nic".into(), "none".into()]),
        Network::User => a.extend(["-nic".into(), "user,model=virtio-net-pci".into()]),
    }
    a
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
    let caps = caps::of(qemu)?;
    // QEMU never runs as root: as root, vmgrid hands the job directory to `nobody` and has QEMU
    // drop to it (after it has opened the kernel, initrd and disks, and before the guest runs).
    let run_as = if effective_uid() == 0 {
        let how = caps.drop_root.ok_or_else(|| cannot_drop_root(qemu, &caps))?;
        Some((hand_to_nobody(&job_dir)?, how))
    } else {
        None
    };
    let launch = Launch { job, job_dir: &job_dir, overlay, qmp, accel, caps: &caps, run_as };
    let qemu_args = args(&launch);
    if run_as.is_some() {
        if let Some(unshare) = find_tool("VMGRID_UNSHARE", "unshare").filter(|_| Path::new(SH).is_file()) {
            let mut cmd = Command::new(unshare);
            cmd.args(in_own_pid_namespace(qemu, &qemu_args));
            return Ok(cmd);
        }
        tracing::warn!("`unshare` was not found: a QEMU that dropped root may outlive a killed vmgrid");
    }
    let mut cmd = Command::new(qemu);
    cmd.args(qemu_args);
    Ok(cmd)
}

const SH: &str = "/bin/sh";

/// Changing its uid (`-runas`, `-run-with user=`) clears QEMU's parent-death signal, so a node
/// killed with SIGKILL would leave it running. As root, QEMU therefore runs in a PID namespace of
/// its own whose init is a shell that keeps the death signal (it never changes uid): when vmgrid
/// dies, or kills the namespace on a timeout, the init dies and the kernel kills everything in the
/// namespace with it. These are `unshare`'s arguments for that; without util-linux's `unshare`
/// (every Debian has it), QEMU runs as before, with a warning.
fn in_own_pid_namespace(qemu: &Path, qemu_args: &[OsString]) -> Vec<OsString> {
    // The shell must not exec QEMU in its place (it would become the init and lose the signal).
    let mut a: Vec<OsString> =
        ["--pid", "--fork", "--kill-child=SIGKILL", "--", SH, "-c", "\"$@\"; exit $?", "sh"].map(OsString::from).into();
    a.push(qemu.into());
    a.extend(qemu_args.iter().cloned());
    a
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The unprivileged user QEMU runs as when vmgrid is root.
const UNPRIVILEGED_USER: &str = "nobody";

/// Gives the job directory (and everything in it) to `nobody`, so QEMU can serve it after
/// dropping root. Returns the user name QEMU is to switch to.
fn hand_to_nobody(job_dir: &Path) -> Result<&'static str, RunError> {
    let (uid, gid) = user_ids(UNPRIVILEGED_USER)?.ok_or_else(|| {
        RunError::Host(format!("vmgrid runs as root but there is no `{UNPRIVILEGED_USER}` user for QEMU to run as"))
    })?;
    for entry in walkdir::WalkDir::new(job_dir) {
        let entry = entry.map_err(|e| RunError::host("cannot read the job directory", e))?;
        std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))
            .map_err(|e| RunError::host(format!("cannot hand {} to {UNPRIVILEGED_USER}", entry.path().display()), e))?;
    }
    Ok(UNPRIVILEGED_USER)
}

/// The uid and gid of a user, from the system's user database (thread-safe `getpwnam_r`).
fn user_ids(name: &str) -> Result<Option<(u32, u32)>, RunError> {
    let cname = std::ffi::CString::new(name).map_err(|_| RunError::Host(format!("bad user name {name:?}")))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter (plain integers and null pointers).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the record, the
    // buffer with its true length, and the result pointer; the strings the record points to live
    // in `buf`, which outlives the call, and only the two integer fields are read afterwards.
    let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 {
        return Err(RunError::host(format!("cannot look up the user {name}"), std::io::Error::from_raw_os_error(rc)));
    }
    Ok((!found.is_null()).then_some((pw.pw_uid, pw.pw_gid)))
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
    use crate::qemu::caps::tests::{QEMU_7_2_HELP, QEMU_7_2_VERSION, QEMU_10_HELP, QEMU_10_VERSION};

    fn kit_job(name: &str, network: &str) -> Job {
        let text = format!(
            "name = \"{name}\"\n[vm]\ntype = \"qemu\"\nkernel = \"vmlinuz\"\ninitrd = \"initrd.gz\"\nnetwork = \"{network}\"\nargs = [\"sh\", \"-c\", \"echo hi\"]\n[resources]\nmemory_mb = 128\ncpus = 2\n"
        );
        vmgrid_job::parse_job(Path::new("/jobs/j.toml"), &text).unwrap()
    }

    fn line(job: &Job, caps: &Caps, run_as: Option<(&str, DropRoot)>) -> Vec<String> {
        let launch = Launch {
            job,
            job_dir: Path::new("/work/job,dir"),
            overlay: Some(Path::new("/tmp/s/overlay.qcow2")),
            qmp: Path::new("/tmp/s/qmp.sock"),
            accel: Accel::Tcg,
            caps,
            run_as,
        };
        args(&launch).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    /// The value that follows `opt`, which must appear exactly once.
    fn value<'a>(line: &'a [String], opt: &str) -> &'a str {
        let at: Vec<usize> = line.iter().enumerate().filter(|(_, a)| *a == opt).map(|(i, _)| i).collect();
        assert_eq!(at.len(), 1, "{opt} in {line:?}");
        &line[at[0] + 1]
    }

    #[test]
    fn as_root_qemu_7_2_drops_to_nobody_with_runas() {
        let caps = Caps::parse(QEMU_7_2_VERSION, QEMU_7_2_HELP).unwrap();
        let l = line(&kit_job("k", "none"), &caps, Some(("nobody", caps.drop_root.unwrap())));
        assert_eq!(value(&l, "-runas"), "nobody");
        assert!(!l.iter().any(|a| a == "-run-with"), "{l:?}");
        assert!(value(&l, "-sandbox").contains("elevateprivileges=allow"), "{l:?}");
    }

    #[test]
    fn as_root_qemu_10_drops_to_nobody_with_run_with_user() {
        let caps = Caps::parse(QEMU_10_VERSION, QEMU_10_HELP).unwrap();
        let l = line(&kit_job("k", "none"), &caps, Some(("nobody", caps.drop_root.unwrap())));
        assert_eq!(value(&l, "-run-with"), "user=nobody");
        assert!(!l.iter().any(|a| a == "-runas"), "{l:?}");
        assert!(value(&l, "-sandbox").contains("elevateprivileges=allow"), "{l:?}");
    }

    #[test]
    fn the_rest_of_the_line_is_the_same_for_both_generations() {
        let old = Caps::parse(QEMU_7_2_VERSION, QEMU_7_2_HELP).unwrap();
        let new = Caps::parse(QEMU_10_VERSION, QEMU_10_HELP).unwrap();
        for network in ["none", "user"] {
            let job = kit_job("k", network);
            assert_eq!(line(&job, &old, None), line(&job, &new, None));
        }
        let l = line(&kit_job("k", "none"), &new, None);
        let expected: Vec<String> = [
            "-name",
            "vmgrid-k",
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-qmp",
            "unix:/tmp/s/qmp.sock,server=on,wait=off",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-fsdev",
            "local,id=job,path=/work/job,,dir,security_model=mapped-xattr,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=job,mount_tag=vmgrid",
            "-drive",
            "file=/tmp/s/overlay.qcow2,format=qcow2,if=virtio",
            "-kernel",
            "/jobs/vmlinuz",
            "-initrd",
            "/jobs/initrd.gz",
            "-append",
            "console=ttyS0 panic=-1 -- sh -c \"echo hi\"",
            "-nic",
            "none",
        ]
        .map(String::from)
        .into();
        assert_eq!(l, expected);
        assert_eq!(value(&line(&kit_job("k", "user"), &new, None), "-nic"), "user,model=virtio-net-pci");
    }

    #[test]
    fn without_seccomp_there_is_no_sandbox_option_and_a_name_cannot_add_options() {
        let mut caps = Caps::parse(QEMU_10_VERSION, QEMU_10_HELP).unwrap();
        caps.sandbox = false;
        let mut job = kit_job("k", "none");
        job.name = "x,process=evil".into();
        let l = line(&job, &caps, None);
        assert!(!l.iter().any(|a| a == "-sandbox"), "{l:?}");
        assert_eq!(value(&l, "-name"), "vmgrid-x,,process=evil");
    }

    #[test]
    fn qemu_as_root_runs_under_a_shell_init_in_its_own_pid_namespace() {
        let a: Vec<String> = in_own_pid_namespace(Path::new("/usr/bin/qemu"), &["-m".into(), "64".into()])
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            a,
            [
                "--pid",
                "--fork",
                "--kill-child=SIGKILL",
                "--",
                "/bin/sh",
                "-c",
                "\"$@\"; exit $?",
                "sh",
                "/usr/bin/qemu",
                "-m",
                "64"
            ]
        );
    }

    #[test]
    fn nobody_is_found_in_the_user_database() {
        let (uid, _) = user_ids("nobody").unwrap().expect("Debian has nobody");
        assert_eq!(uid, 65534);
        assert_eq!(user_ids("no-such-user-vmgrid").unwrap(), None);
    }

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
