//! The host tools the appliance commands run, found through the runtime's tool lookup (with
//! install hints), and small helpers for their errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::Error;

/// A tool on PATH (or the Debian sbin directories, which a user's PATH may lack).
pub fn find(name: &str, package: &str) -> Result<PathBuf, Error> {
    Ok(vmgrid_runtime::tools::require(None, name, package)?)
}

/// Runs a command to completion; a failure names the command and quotes its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, Error> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| Error::Failed(format!("cannot run {name}: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let msg = if msg.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { msg };
        return Err(Error::Failed(format!("{name} failed ({}): {msg}", out.status)));
    }
    Ok(out)
}

/// An IO error as a failure that says what was being done.
pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Failed(format!("{what}: {e}"))
}

/// The format of a disk image, as `qemu-img` reads it; a file QEMU cannot read is bad input.
pub fn image_format(image: &Path) -> Result<String, Error> {
    Ok(vmgrid_runtime::qemu::image::format_of(image)?)
}

/// Random bytes from the kernel, for names and MAC addresses.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the kernel's random source is readable");
    b
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
