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

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::find_qemu_img;
use crate::{RunError, tools};

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
/// them. Reading stops at `limit` bytes in all.
pub fn extract(disk: &Path, job_dir: &Path, scratch: &Path, limit: u64) -> Result<(), RunError> {
    let raw = scratch.join("job-out.raw");
    run(
        Command::new(find_qemu_img()?).args(["convert", "-q", "-f", "qcow2", "-O", "raw"]).arg(disk).arg(&raw),
        "qemu-img convert",
    )?;
    let fs = ext4_view::Ext4::load_from_path(&raw)
        .map_err(|e| RunError::Host(format!("the job directory's disk is not a readable ext4 filesystem: {e}")))?;
    for entry in std::fs::read_dir(job_dir).map_err(|e| RunError::host("cannot read the job directory", e))? {
        let p = entry.map_err(|e| RunError::host("cannot read the job directory", e))?.path();
        let gone = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        gone.map_err(|e| RunError::host(format!("cannot clear {}", p.display()), e))?;
    }
    let mut left = limit;
    copy_dir(&fs, ext4_view::PathBuf::new("/"), job_dir, &mut left, 0)?;
    let _ = std::fs::remove_file(&raw);
    Ok(())
}

/// How deep the guest's directories may nest.
const MAX_DEPTH: usize = 64;

fn copy_dir(
    fs: &ext4_view::Ext4,
    from: ext4_view::PathBuf,
    to: &Path,
    left: &mut u64,
    depth: usize,
) -> Result<(), RunError> {
    let bad = |e: ext4_view::Ext4Error| RunError::Host(format!("cannot read the job directory's disk: {e}"));
    if depth > MAX_DEPTH {
        return Err(RunError::Host(format!("the job directory nests deeper than {MAX_DEPTH} directories")));
    }
    for entry in fs.read_dir(from.as_path()).map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let name = entry.file_name();
        let Ok(name) = name.as_str() else { continue };
        if name == "." || name == ".." || (depth == 0 && name == "lost+found") || name.contains('/') {
            continue;
        }
        let dest = to.join(name);
        let kind = entry.file_type().map_err(bad)?;
        if kind.is_dir() {
            std::fs::create_dir(&dest).map_err(|e| RunError::host(format!("cannot create {}", dest.display()), e))?;
            copy_dir(fs, entry.path(), &dest, left, depth + 1)?;
        } else if kind.is_regular_file() {
            let mut file = fs.open(entry.path().as_path()).map_err(bad)?;
            let mut out = std::fs::File::create(&dest)
                .map_err(|e| RunError::host(format!("cannot create {}", dest.display()), e))?;
            let copied = std::io::copy(&mut (&mut file).take(*left + 1), &mut out)
                .map_err(|e| RunError::host(format!("cannot copy {name} from the job directory's disk"), e))?;
            if copied > *left {
                return Err(RunError::Host("the job directory's disk holds more than it can".into()));
            }
            *left -= copied;
        }
        // Symlinks, devices, fifos and sockets stay in the guest.
    }
    Ok(())
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
        extract(&disk, dir.path(), scratch.path(), 1 << 20).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("a.txt")).unwrap(), "alpha\n");
        assert_eq!(std::fs::read(dir.path().join("sub/deeper/b.bin")).unwrap(), vec![7u8; 300_000]);
        assert!(!dir.path().join("link").exists() && !dir.path().join("link").is_symlink(), "no symlink comes out");
        assert!(!dir.path().join("stale").exists() && !dir.path().join("lost+found").exists());
        let err = extract(&disk, dir.path(), scratch.path(), 1000).unwrap_err();
        assert!(err.to_string().contains("more than it can"), "{err}");
    }
}
