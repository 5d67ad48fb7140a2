//! The host tools the appliance commands run, found on PATH, with install hints when missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::CliError;

/// A tool on PATH (or the Debian sbin directories, which a user's PATH may lack).
pub fn find(name: &str, package: &str) -> Result<PathBuf, CliError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path).chain(extra).map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
        CliError::Failed(format!("`{name}` was not found; install it (Debian: `apt-get install {package}`)"))
    })
}

/// Runs a command to completion; a failure names the command and quotes its stderr.
pub fn run(cmd: &mut Command) -> Result<Output, CliError> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| CliError::Failed(format!("cannot run {name}: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let msg = if msg.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { msg };
        return Err(CliError::Failed(format!("{name} failed ({}): {msg}", out.status)));
    }
    Ok(out)
}

/// An IO error as a CLI failure that says what was being done.
pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CliError {
    move |e| CliError::Failed(format!("{what}: {e}"))
}

/// `qemu-img info` of an image: its format, or a bad-input error when QEMU cannot read it.
pub fn image_format(image: &Path) -> Result<String, CliError> {
    let qemu_img = find("qemu-img", "qemu-utils")?;
    let out = Command::new(&qemu_img)
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .map_err(|e| CliError::Failed(format!("cannot run {}: {e}", qemu_img.display())))?;
    if !out.status.success() {
        return Err(CliError::BadInput(format!(
            "`{}` is not a disk image QEMU can read: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CliError::Failed(format!("qemu-img info printed something unexpected: {e}")))?;
    Ok(info.get("format").and_then(|f| f.as_str()).unwrap_or("raw").to_string())
}

/// Random bytes from the kernel, for names and MAC addresses.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    if b.iter().all(|&x| x == 0) {
        // No /dev/urandom: the clock and the pid still tell two appliances apart.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seed = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed[i % seed.len()];
        }
    }
    b
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
