//! The job directory of a checkpointed QEMU job, as a disk: an ext4 filesystem on a virtio disk
//! with serial [`SERIAL`], which the guest mounts at `/job` in place of the 9p share.
//!
//! Why not 9p: QEMU refuses to migrate (so to checkpoint) a VM while a 9p share is mounted
//! ("Migration is disabled when VirtFS export path ... is mounted in the guest"), because the
//! share's open files live in the host's QEMU process and cannot move. A disk's blocks can: the
//! checkpoint saves them at the same instant as the guest's RAM, so the directory and the guest's
//! page cache agree on resume.
//!
//! The disk is made with `mke2fs -d` from the staged directory and converted to qcow2 (compact
//! to copy). After the VM ends, its files are read back with `ext4-view`, a read-only ext4
//! reader in safe Rust (the guest wrote this filesystem and may have crafted it): regular files
//! and directories only, never a symlink or device, names that are plain components, and no more
//! bytes than the disk holds.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::find_qemu_img;
use crate::{Failure, FailureKind, RunError, tools};

/// The serial of the job directory's disk (`/sys/block/vdX/serial` in the guest).
pub const SERIAL: &str = "vmgrid-job";

/// `mke2fs`: `$VMGRID_MKE2FS`, or on `PATH` (Debian's e2fsprogs).
fn find_mke2fs() -> Result<PathBuf, RunError> {
    tools::require(Some("VMGRID_MKE2FS"), "mke2fs", "e2fsprogs")
}

fn run(cmd: &mut Command, what: &str) -> Result<(), RunError> {
    let out = cmd.output().map_err(|e| RunError::host(format!("cannot run {what}"), e))?;
    if !out.status.success() {
        return Err(RunError::Host(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// The size of the disk for a job directory holding `used` bytes and allowed `disk_mb` MiB: room
/// for both, and for ext4's own tables.
pub fn size_mb(used: u64, disk_mb: u64) -> u64 {
    let data = disk_mb + used.div_ceil(1 << 20);
    data + (data / 16).max(4)
}

/// Makes `scratch/job.qcow2`, an ext4 filesystem holding `job_dir`'s files; returns its path.
pub fn build(job_dir: &Path, scratch: &Path, disk_mb: u64) -> Result<PathBuf, RunError> {
    let raw = scratch.join("job.raw");
    let size = size_mb(crate::disk::usage(job_dir), disk_mb);
    run(
        Command::new(find_mke2fs()?)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-E",
                "root_owner=0:0",
                "-L",
                "vmgrid-job",
            ])
            .arg("-d")
            .arg(job_dir)
            .arg(&raw)
            .arg(format!("{size}M")),
        "mke2fs (making the job directory's disk)",
    )?;
    let disk = scratch.join("job.qcow2");
    run(
        Command::new(find_qemu_img()?).args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&disk),
        "qemu-img convert",
    )?;
    let _ = std::fs::remove_file(&raw);
    Ok(disk)
}

/// Replaces `job_dir`'s contents with the files of the disk `disk` (qcow2), as the guest left
/// them. Every entry costs [`crate::disk::ENTRY_COST`], and a file its bytes too, against `limit`.
/// What the guest made unreadable (a broken or crafted filesystem, one that holds more than the
/// job may keep, one that nests too deep) is the guest's failure, not this host's: `Ok(Some(_))`.
pub fn extract(disk: &Path, job_dir: &Path, scratch: &Path, limit: u64) -> Result<Option<Failure>, RunError> {
    let guest = |kind, reason: String| Ok(Some(Failure { kind, reason }));
    // QEMU has exited: what it left is checked before qemu-img opens it as a disk.
    let most = (size_mb(0, limit.div_ceil(1 << 20)) + 16) << 20;
    match super::image::check_untrusted_qcow2(disk, most, false) {
        Ok(()) => {}
        Err(super::image::Untrusted::Refused(why)) => {
            return guest(FailureKind::GuestError, format!("the job directory's disk is refused: {why}"));
        }
        Err(super::image::Untrusted::Host(e)) => return Err(RunError::Host(e)),
    }
    let raw = scratch.join("job-out.raw");
    run(
        Command::new(find_qemu_img()?).args(["convert", "-q", "-f", "qcow2", "-O", "raw"]).arg(disk).arg(&raw),
        "qemu-img convert",
    )?;
    let fs = match ext4_view::Ext4::load_from_path(&raw) {
        Ok(fs) => fs,
        Err(e) => {
            return guest(
                FailureKind::GuestError,
                format!("the job directory's disk is not a readable ext4 filesystem: {e}"),
            );
        }
    };
    for entry in std::fs::read_dir(job_dir).map_err(|e| RunError::host("cannot read the job directory", e))? {
        let p = entry.map_err(|e| RunError::host("cannot read the job directory", e))?.path();
        let gone = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        gone.map_err(|e| RunError::host(format!("cannot clear {}", p.display()), e))?;
    }
    let mut left = limit;
    let copied = copy_dir(&fs, ext4_view::PathBuf::new("/"), job_dir, &mut left, 0);
    let _ = std::fs::remove_file(&raw);
    match copied {
        Ok(()) => Ok(None),
        Err(Bad::Host(e)) => Err(e),
        Err(Bad::Guest(kind, reason)) => guest(kind, reason),
    }
}

/// How deep the guest's directories may nest.
const MAX_DEPTH: usize = 64;

enum Bad {
    Host(RunError),
    Guest(FailureKind, String),
}

fn copy_dir(
    fs: &ext4_view::Ext4,
    from: ext4_view::PathBuf,
    to: &Path,
    left: &mut u64,
    depth: usize,
) -> Result<(), Bad> {
    let unreadable = |e: ext4_view::Ext4Error| {
        Bad::Guest(FailureKind::GuestError, format!("the job directory's disk cannot be read: {e}"))
    };
    if depth > MAX_DEPTH {
        let why = format!("the job directory nests deeper than {MAX_DEPTH} directories");
        return Err(Bad::Guest(FailureKind::GuestError, why));
    }
    for entry in fs.read_dir(from.as_path()).map_err(unreadable)? {
        // Every entry costs something, those skipped too, so a tree of empty files, of names
        // skipped or of directories linked into themselves ends as well.
        *left = left.checked_sub(crate::disk::ENTRY_COST).ok_or_else(over)?;
        let entry = entry.map_err(unreadable)?;
        let name = entry.file_name();
        let Ok(name) = name.as_str() else { continue };
        if name == "." || name == ".." || (depth == 0 && name == "lost+found") || name.contains('/') {
            continue;
        }
        let dest = to.join(name);
        let kind = entry.file_type().map_err(unreadable)?;
        if kind.is_dir() {
            std::fs::create_dir(&dest).map_err(|e| made(&dest, e))?;
            copy_dir(fs, entry.path(), &dest, left, depth + 1)?;
        } else if kind.is_regular_file() {
            let file = fs.open(entry.path().as_path()).map_err(unreadable)?;
            let out = std::fs::File::create(&dest).map_err(|e| made(&dest, e))?;
            *left = copy_file(file, out, *left, name)?;
        }
        // Symlinks, devices, fifos and sockets stay in the guest.
    }
    Ok(())
}

fn over() -> Bad {
    Bad::Guest(FailureKind::DiskLimit, "the job directory's disk holds more than the job may keep (disk_mb)".into())
}

/// Why a file or directory of the guest's could not be made here: a name the guest gave twice,
/// or too long, is the guest's doing; anything else is this host's.
fn made(dest: &Path, e: std::io::Error) -> Bad {
    use std::io::ErrorKind::*;
    let guest = |what: &str| Bad::Guest(FailureKind::GuestError, format!("the job directory's disk {what}: {e}"));
    match e.kind() {
        AlreadyExists | IsADirectory | NotADirectory | InvalidFilename => guest("names a file twice or badly"),
        _ if e.raw_os_error() == Some(libc::ENAMETOOLONG) => guest("has a name too long"),
        _ => Bad::Host(RunError::host(format!("cannot create {}", dest.display()), e)),
    }
}

/// Copies one of the guest's files, reading and writing apart so that each side's failure is
/// told for whose it is; returns what is left of the budget.
fn copy_file(mut from: ext4_view::File, mut to: std::fs::File, left: u64, name: &str) -> Result<u64, Bad> {
    use std::io::Write;
    let mut left = left;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut from, &mut buf).map_err(|e| {
            Bad::Guest(FailureKind::GuestError, format!("cannot read {name} from the job directory's disk: {e}"))
        })?;
        if n == 0 {
            return Ok(left);
        }
        left = left.checked_sub(n as u64).ok_or_else(over)?;
        to.write_all(&buf[..n]).map_err(|e| Bad::Host(RunError::host(format!("cannot write {name}"), e)))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_goes_through_the_disk_and_back() {
        if find_mke2fs().is_err() || find_qemu_img().is_err() {
            panic!("mke2fs and qemu-img are needed (e2fsprogs, qemu-utils); `scripts/setup` installs them");
        }
        let (dir, scratch) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "alpha\n").unwrap();
        std::fs::write(dir.path().join("sub/deeper/b.bin"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let disk = build(dir.path(), scratch.path(), 4).unwrap();
        std::fs::write(dir.path().join("stale"), "removed by the extraction").unwrap();
        assert_eq!(extract(&disk, dir.path(), scratch.path(), 1 << 20).unwrap(), None);
        assert_eq!(std::fs::read_to_string(dir.path().join("a.txt")).unwrap(), "alpha\n");
        assert_eq!(std::fs::read(dir.path().join("sub/deeper/b.bin")).unwrap(), vec![7u8; 300_000]);
        assert!(!dir.path().join("link").exists() && !dir.path().join("link").is_symlink(), "no symlink comes out");
        assert!(!dir.path().join("stale").exists() && !dir.path().join("lost+found").exists());
        let over = extract(&disk, dir.path(), scratch.path(), 100_000).unwrap().expect("over its limit");
        assert_eq!(over.kind, FailureKind::DiskLimit, "{}", over.reason);
        std::fs::write(scratch.path().join("junk.qcow2"), vec![0u8; 4096]).unwrap();
        let junk = extract(&scratch.path().join("junk.qcow2"), dir.path(), scratch.path(), 1 << 20).unwrap().unwrap();
        assert_eq!(junk.kind, FailureKind::GuestError, "{}", junk.reason);
    }

    #[test]
    fn a_disk_naming_a_host_file_or_too_large_is_refused_before_it_is_opened() {
        let scratch = tempfile::tempdir().unwrap();
        let secret = scratch.path().join("secret");
        std::fs::write(&secret, vec![b's'; 1 << 20]).unwrap();
        let evil = scratch.path().join("evil.qcow2");
        let made = Command::new(find_qemu_img().unwrap())
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&evil)
            .status()
            .unwrap();
        assert!(made.success());
        let refused = super::super::image::check_untrusted_qcow2(&evil, 1 << 30, false).unwrap_err().to_string();
        assert!(refused.contains("backing file"), "{refused}");
        let dir = tempfile::tempdir().unwrap();
        let failed = extract(&evil, dir.path(), scratch.path(), 1 << 20).unwrap().expect("the guest's failure");
        assert!(failed.reason.contains("backing file"), "{}", failed.reason);
        assert!(!scratch.path().join("job-out.raw").exists(), "qemu-img never read it");
        let big = scratch.path().join("big.qcow2");
        let made =
            Command::new(find_qemu_img().unwrap()).args(["create", "-q", "-f", "qcow2"]).arg(&big).arg("1T").status();
        assert!(made.unwrap().success());
        let refused = super::super::image::check_untrusted_qcow2(&big, 1 << 30, false).unwrap_err().to_string();
        assert!(refused.contains("is over"), "{refused}");
    }
}
