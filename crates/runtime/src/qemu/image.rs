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
    let info = info(image)?;
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

/// `qemu-img info` of a job's image (the job's own file, checked by the validator): a file QEMU
/// cannot read is the job's fault ([`RunError::BadJob`]).
fn info(image: &Path) -> Result<serde_json::Value, RunError> {
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
    serde_json::from_slice(&out.stdout)
        .map_err(|e| RunError::Host(format!("qemu-img info printed something unexpected: {e}")))
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

/// Why a disk a checkpoint (or a guest) brought is not used.
#[derive(Debug)]
pub enum Untrusted {
    /// The disk is not what it may be.
    Refused(String),
    /// This host could not tell (`qemu-img` would not run).
    Host(String),
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Untrusted::Refused(s) | Untrusted::Host(s) => f.write_str(s),
        }
    }
}

/// A disk a checkpoint brought (written by a guest and a node, so as untrusted as they are) must
/// be a qcow2 with no external data file, no larger than `max_virtual` bytes, and (unless
/// `backing_ok`, for an overlay that is put back on the image) without a backing file, which
/// could name any file of this host. Its header is read here first, so that no QEMU tool opens a
/// file it names (`qemu-img info` before QEMU 9.1 opened an external data file); then `qemu-img
/// info` must agree.
pub fn check_untrusted_qcow2(disk: &Path, max_virtual: u64, backing_ok: bool) -> Result<(), Untrusted> {
    qcow2_header(disk, max_virtual, backing_ok).map_err(Untrusted::Refused)?;
    let qemu_img = find_qemu_img().map_err(|e| Untrusted::Host(e.to_string()))?;
    let out = Command::new(&qemu_img)
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(disk)
        .output()
        .map_err(|e| Untrusted::Host(format!("cannot run {}: {e}", qemu_img.display())))?;
    let refused = |s: String| Err(Untrusted::Refused(s));
    if !out.status.success() {
        return refused(format!("not a qcow2 disk: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Untrusted::Host(format!("qemu-img info printed something unexpected: {e}")))?;
    if info.get("format").and_then(|f| f.as_str()) != Some("qcow2") {
        return refused("not a qcow2 disk".into());
    }
    if !backing_ok && (info.get("backing-filename").is_some() || info.get("full-backing-filename").is_some()) {
        return refused("it names a backing file".into());
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return refused("it names an external data file".into());
    }
    match info.get("virtual-size").and_then(|v| v.as_u64()) {
        Some(v) if v <= max_virtual => Ok(()),
        Some(v) => refused(format!("its size, {v} bytes, is over the {max_virtual} it may have")),
        None => refused("qemu-img info gave no size".into()),
    }
}

/// The qcow2 header's promises, read by hand (QEMU's docs/interop/qcow2.txt): the magic, version
/// 2 or 3, no backing file unless allowed, the size, and no external data file (incompatible
/// feature bit 2, header extension 0x44415441).
fn qcow2_header(disk: &Path, max_virtual: u64, backing_ok: bool) -> Result<(), String> {
    let mut head = Vec::new();
    let file = std::fs::File::open(disk).map_err(|e| format!("cannot be read: {e}"))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(file, 64 << 10), &mut head)
        .map_err(|e| format!("cannot be read: {e}"))?;
    let u32_at = |at: usize| head.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let u64_at = |at: usize| head.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    if head.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return Err("not a qcow2 disk".into());
    }
    let version = u32_at(4).unwrap_or(0);
    if version != 2 && version != 3 {
        return Err(format!("qcow2 version {version}, not 2 or 3"));
    }
    if !backing_ok && u64_at(8) != Some(0) {
        return Err("it names a backing file".into());
    }
    match u64_at(24) {
        Some(size) if size <= max_virtual => {}
        Some(size) => return Err(format!("its size, {size} bytes, is over the {max_virtual} it may have")),
        None => return Err("its header is cut short".into()),
    }
    if version == 2 {
        return Ok(());
    }
    if u64_at(72).is_none_or(|incompatible| incompatible & (1 << 2) != 0) {
        return Err("it names an external data file".into());
    }
    // The header extensions: type, length, data padded to 8 bytes, until type 0.
    let mut at = u32_at(100).ok_or("its header is cut short")? as usize;
    while let (Some(kind), Some(len)) = (u32_at(at), u32_at(at + 4)) {
        match kind {
            0 => return Ok(()),
            0x4441_5441 => return Err("it names an external data file".into()),
            _ => at = at + 8 + (len as usize).div_ceil(8) * 8,
        }
    }
    Err("its header extensions run past the first 64 KiB".into())
}

/// The virtual size of a disk image, in bytes.
pub fn virtual_size(image: &Path) -> Result<u64, RunError> {
    info(image)?
        .get("virtual-size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| RunError::BadJob(format!("the image `{}` has no size", image.display())))
}
