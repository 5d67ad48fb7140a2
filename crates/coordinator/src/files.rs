//! The data directory's files. The directory is its owner's alone (0700), and so are the secrets
//! in it (0600): the tokens, the CA's key, the job store. Every file is written whole and renamed
//! into place, and the rename is made durable with an fsync of the directory.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) if needed, and makes it its owner's alone.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    write_file(path, contents, 0o600)
}

/// Writes a file anyone may read (the CA certificate).
pub fn write_public(path: &Path, contents: &str) -> std::io::Result<()> {
    write_file(path, contents, 0o644)
}

/// Reads a secret, refusing one that other accounts could have read or changed.
pub fn read_private(path: &Path) -> std::io::Result<String> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is open to other users (mode {:o}): `chmod 600` it, and replace the secret if they may have read it",
            path.display(),
            mode & 0o777
        )));
    }
    std::fs::read_to_string(path)
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_private_and_an_open_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let f = d.join("admin.token");
        write_private(&f, "secret\n").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_private(&f).unwrap(), "secret\n");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_private(&f).unwrap_err().to_string().contains("open to other users"));
    }
}
