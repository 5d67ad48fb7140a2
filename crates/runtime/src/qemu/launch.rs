//! How QEMU is started here, for job VMs and for the grid appliance alike ([`Launcher`]), and the
//! command line of a job VM ([`args`], a pure function tested for both QEMU generations).
//!
//! QEMU never runs as root: as root, vmgrid has QEMU drop to `nobody` (after it has opened its
//! disks and sockets, before the guest runs) with the option this QEMU accepts. Changing its uid
//! clears QEMU's parent-death signal, so such a QEMU runs in a PID namespace of its own whose init
//! is a shell that keeps the signal: when vmgrid dies, the init dies and the kernel kills QEMU.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmgrid_job::{Job, Network};

use super::{Accel, Caps, DropRoot, MOUNT_TAG, caps, find_qemu, kernel_cmdline};
use crate::{RunError, tools};

/// The fw_cfg file in which a checkpointed job's guest finds the checkpoint it last resumed from
/// (`/sys/firmware/qemu_fw_cfg/by_name/opt/vmgrid/resumed/raw` in Linux): it is set by each
/// QEMU, not saved with the VM, so it changes when the VM moves.
pub const RESUMED_FW_CFG: &str = "opt/vmgrid/resumed";

/// The machine type of a checkpointed VM: the first of QEMU 8.2, which migrates to files.
pub const CHECKPOINT_MACHINE: &str = "pc-i440fx-8.2";

/// The unprivileged user QEMU runs as when vmgrid is root.
pub const UNPRIVILEGED_USER: &str = "nobody";

const SH: &str = "/bin/sh";

/// The QEMU binary, what it accepts, and whether it drops root.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub qemu: PathBuf,
    pub caps: Caps,
    /// The user QEMU switches to, and how, when vmgrid is root.
    pub run_as: Option<(&'static str, DropRoot)>,
}

impl Launcher {
    /// The QEMU of this host, if it is a version vmgrid supports and (when vmgrid is root) can
    /// drop root.
    pub fn new() -> Result<Launcher, RunError> {
        let qemu = find_qemu()?;
        let caps = caps::of(&qemu)?;
        let run_as = if effective_uid() == 0 {
            let how = caps.drop_root.ok_or_else(|| {
                RunError::Host(format!(
                    "vmgrid runs as root, and QEMU {} at {} cannot switch to another user (it has neither -runas nor -run-with user=); run vmgrid as an unprivileged user",
                    caps.version,
                    qemu.display()
                ))
            })?;
            Some((UNPRIVILEGED_USER, how))
        } else {
            None
        };
        Ok(Launcher { qemu, caps, run_as })
    }

    /// `-sandbox` and its value, if this QEMU has seccomp: obsolete calls, spawning and resource
    /// control denied; privilege changes allowed only for the one setuid that drops root.
    pub fn sandbox_args(&self) -> Vec<String> {
        if !self.caps.sandbox {
            return Vec::new();
        }
        let elevate = if self.run_as.is_some() { "allow" } else { "deny" };
        vec!["-sandbox".into(), format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")]
    }

    /// The option that makes QEMU switch to the unprivileged user, if it must.
    pub fn drop_root_args(&self) -> Vec<String> {
        self.run_as.map(|(user, how)| how.args(user).to_vec()).unwrap_or_default()
    }

    /// The command that starts QEMU with `args`: as root, inside a PID namespace of its own
    /// (`unshare`) under a shell init that keeps the parent-death signal. Without util-linux's
    /// `unshare` (every Debian has it), QEMU runs as before, with a warning.
    pub fn command(&self, args: &[OsString]) -> Command {
        if self.run_as.is_some() {
            if let Some(unshare) = tools::find(Some("VMGRID_UNSHARE"), "unshare").filter(|_| Path::new(SH).is_file()) {
                let mut cmd = Command::new(unshare);
                cmd.args(in_own_pid_namespace(&self.qemu, args));
                return cmd;
            }
            tracing::warn!("`unshare` was not found: a QEMU that dropped root may outlive a killed vmgrid");
        }
        let mut cmd = Command::new(&self.qemu);
        cmd.args(args);
        cmd
    }
}

/// `unshare`'s arguments for QEMU in its own PID namespace. The shell must not exec QEMU in its
/// place (it would become the init and lose the signal).
fn in_own_pid_namespace(qemu: &Path, qemu_args: &[OsString]) -> Vec<OsString> {
    let mut a: Vec<OsString> =
        ["--pid", "--fork", "--kill-child=SIGKILL", "--", SH, "-c", "\"$@\"; exit $?", "sh"].map(OsString::from).into();
    a.push(qemu.into());
    a.extend(qemu_args.iter().cloned());
    a
}

/// QEMU's option syntax doubles commas inside values.
pub fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Everything a job VM's command line depends on, found beforehand.
pub(crate) struct Launch<'a> {
    pub job: &'a Job,
    /// The job directory, canonical.
    pub job_dir: &'a Path,
    pub overlay: Option<&'a Path>,
    /// A checkpointed job's directory, as a disk ([`super::jobdisk`]) in place of the 9p share.
    pub job_disk: Option<&'a Path>,
    /// Wait for a checkpoint's state (`-incoming defer`) instead of booting.
    pub incoming: bool,
    /// For a checkpointed job: the checkpoint this run resumes from (0 for a fresh start), which
    /// the guest reads from fw_cfg (`opt/vmgrid/resumed`, ten digits).
    pub resumed: u64,
    pub qmp: &'a Path,
    pub accel: Accel,
    pub launcher: &'a Launcher,
    /// The NIC on the pool's overlay, for a `network = "grid"` job.
    pub net: Option<&'a super::NetAttach>,
}

/// QEMU's arguments for one job VM.
pub(crate) fn args(l: &Launch<'_>) -> Vec<OsString> {
    let job = l.job;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(OsString::from));
    // Commas are doubled in every value QEMU splits at commas, so no value can add options.
    push(&["-name", &format!("vmgrid-{}", job.name.replace(',', ",,"))]);
    // A checkpointed VM pins its machine type, so that a newer QEMU can load its checkpoints.
    let machine = if l.job_disk.is_some() { CHECKPOINT_MACHINE } else { "pc" };
    push(&["-machine", machine, "-accel", l.accel.as_str()]);
    push(&["-m", &job.resources.memory_mb.to_string(), "-smp", &job.resources.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt_path(l.qmp))]);
    let sandbox = l.launcher.sandbox_args();
    push(&sandbox.iter().map(String::as_str).collect::<Vec<_>>());
    if l.job_disk.is_none() {
        let fsdev = format!("local,id=job,path={},security_model=mapped-xattr,multidevs=remap", opt_path(l.job_dir));
        push(&["-fsdev", &fsdev]);
        push(&["-device", &format!("virtio-9p-pci,fsdev=job,mount_tag={MOUNT_TAG}")]);
    }
    let drop_root = l.launcher.drop_root_args();
    push(&drop_root.iter().map(String::as_str).collect::<Vec<_>>());
    // A checkpointed VM may resume on another host: a CPU model every x86 host has.
    match (l.accel, l.job_disk.is_some()) {
        (_, true) => push(&["-cpu", "qemu64"]),
        (Accel::Kvm, false) => push(&["-cpu", "host"]),
        (Accel::Tcg, false) => {}
    }
    if let Some(o) = l.overlay {
        push(&["-drive", &format!("file={},format=qcow2,if=virtio", opt_path(o))]);
    }
    if let Some(d) = l.job_disk {
        let serial = super::jobdisk::SERIAL;
        push(&["-drive", &format!("file={},format=qcow2,if=none,id=jobdisk", opt_path(d))]);
        push(&["-device", &format!("virtio-blk-pci,drive=jobdisk,serial={serial}")]);
    }
    if l.job_disk.is_some() {
        push(&["-fw_cfg", &format!("name={RESUMED_FW_CFG},string={:010}", l.resumed)]);
    }
    if l.incoming {
        push(&["-incoming", "defer"]);
    }
    if let Some(k) = &job.vm.kernel {
        a.push("-kernel".into());
        a.push(k.into());
        if let Some(i) = &job.vm.initrd {
            a.push("-initrd".into());
            a.push(i.into());
        }
        a.push("-append".into());
        a.push(kernel_cmdline(job, l.job_disk.is_some()).into());
    }
    match job.vm.network {
        Network::None => a.extend(["-nic".into(), "none".into()]),
        Network::User => a.extend(["-nic".into(), "user,model=virtio-net-pci".into()]),
        Network::Grid => match l.net {
            Some(net) => a.extend(net.qemu_args().map(OsString::from)),
            // Without the node's switch (`vmgrid run`), the VM has no NIC at all.
            None => a.extend(["-nic".into(), "none".into()]),
        },
    }
    a
}

pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Gives the job directory (and everything in it) to the user QEMU runs as, so it can serve it
/// after dropping root.
pub(crate) fn hand_over(job_dir: &Path, user: &str) -> Result<(), RunError> {
    let (uid, gid) = user_ids(user)?.ok_or_else(|| {
        RunError::Host(format!("vmgrid runs as root but there is no `{user}` user for QEMU to run as"))
    })?;
    for entry in walkdir::WalkDir::new(job_dir) {
        let entry = entry.map_err(|e| RunError::host("cannot read the job directory", e))?;
        std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))
            .map_err(|e| RunError::host(format!("cannot hand {} to {user}", entry.path().display()), e))?;
    }
    Ok(())
}

/// Gives one file (not following a link) to the user QEMU runs as.
pub(crate) fn give(file: &Path, user: &str) -> Result<(), RunError> {
    let (uid, gid) = user_ids(user)?.ok_or_else(|| {
        RunError::Host(format!("vmgrid runs as root but there is no `{user}` user for QEMU to run as"))
    })?;
    std::os::unix::fs::lchown(file, Some(uid), Some(gid))
        .map_err(|e| RunError::host(format!("cannot hand {} to {user}", file.display()), e))
}

/// Lets other users enter a directory of ours and open the files they own in it, but not list it
/// or add, remove or rename anything (mode 0711).
pub(crate) fn traversable(dir: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| RunError::host(format!("cannot open {} to QEMU", dir.display()), e))
}

/// The uid and gid of a user, from the system's user database (thread-safe `getpwnam_r`).
pub(crate) fn user_ids(name: &str) -> Result<Option<(u32, u32)>, RunError> {
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

#[cfg(test)]
mod tests;
