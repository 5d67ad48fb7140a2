//! Disk images as `qemu-img` sees them: their format, and a qcow2 overlay on top of one, so a
//! guest's writes never reach the image itself. Images with a backing file are refused: it could
//! point anywhere on this host.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::find_qemu_img;
use crate::RunError;

/// The formats vmgrid attaches.
const FORMATS: [&str; 6] = ["raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx"];

/// `qemu-img info` of a self-contained image: its format. A file QEMU cannot read, or one with a
/// backing file or a format vmgrid does not run, is the job's fault ([`RunError::BadJob`]).
pub fn format_of(image: &Path) -> Result<String, RunError> {
    let qemu_img = find_qemu_img()?;
    let out = Command::new(&qemu_img)
        .args(["info", "--output=json"])
        .arg(image)
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
        return Err(RunError::BadJob(format!(
            "the image `{}` has a backing file; flatten it first (`qemu-img convert -O qcow2 in out`)",
            image.display()
        )));
    }
    let format = info.get("format").and_then(|f| f.as_str()).unwrap_or("raw").to_string();
    if !FORMATS.contains(&format.as_str()) {
        return Err(RunError::BadJob(format!(
            "the image `{}` has format `{format}`, which vmgrid does not run",
            image.display()
        )));
    }
    Ok(format)
}

/// Makes `scratch/overlay.qcow2` on top of `image`; returns its path.
pub fn overlay(image: &Path, scratch: &Path) -> Result<PathBuf, RunError> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| RunError::BadJob(format!("the image `{}` cannot be read: {e}", image.display())))?;
    let format = format_of(&image)?;
    let qemu_img = find_qemu_img()?;
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

/// Puts a checkpoint's overlay back on top of this node's copy of the image (the same content,
/// by hash, at another path): only the overlay's header changes.
pub fn rebase(overlay: &Path, image: &Path) -> Result<PathBuf, RunError> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| RunError::BadJob(format!("the image `{}` cannot be read: {e}", image.display())))?;
    let format = format_of(&image)?;
    let qemu_img = find_qemu_img()?;
    let out = Command::new(&qemu_img)
        .args(["rebase", "-q", "-u", "-f", "qcow2", "-F", &format, "-b"])
        .arg(&image)
        .arg(overlay)
        .output()
        .map_err(|e| RunError::host(format!("cannot run {}", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(RunError::Host(format!(
            "cannot put the checkpoint's overlay on the image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(overlay.to_path_buf())
}

/// What `qemu-img info` says of a disk a checkpoint brought (written by a guest and a node, so as
/// untrusted as they are): it must be a qcow2 with no external data file, no larger than
/// `max_virtual` bytes, and (unless `backing_ok`, for an overlay that is put back on the image)
/// without a backing file, which could name any file of this host.
pub fn check_untrusted_qcow2(disk: &Path, max_virtual: u64, backing_ok: bool) -> Result<(), String> {
    let qemu_img = find_qemu_img().map_err(|e| e.to_string())?;
    let out = Command::new(&qemu_img)
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(disk)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", qemu_img.display()))?;
    if !out.status.success() {
        return Err(format!("not a qcow2 disk: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info printed something unexpected: {e}"))?;
    if info.get("format").and_then(|f| f.as_str()) != Some("qcow2") {
        return Err("not a qcow2 disk".into());
    }
    if !backing_ok && (info.get("backing-filename").is_some() || info.get("full-backing-filename").is_some()) {
        return Err("it names a backing file".into());
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err("it names an external data file".into());
    }
    match info.get("virtual-size").and_then(|v| v.as_u64()) {
        Some(v) if v <= max_virtual => Ok(()),
        Some(v) => Err(format!("its size, {v} bytes, is over the {max_virtual} it may have")),
        None => Err("qemu-img info gave no size".into()),
    }
}

/// The virtual size of a disk image, in bytes.
pub fn virtual_size(image: &Path) -> Result<u64, RunError> {
    let qemu_img = find_qemu_img()?;
    let out = Command::new(&qemu_img)
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .map_err(|e| RunError::host(format!("cannot run {}", qemu_img.display()), e))?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| RunError::BadJob(format!("the image `{}` cannot be read: {e}", image.display())))?;
    info.get("virtual-size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| RunError::BadJob(format!("the image `{}` has no size", image.display())))
}
