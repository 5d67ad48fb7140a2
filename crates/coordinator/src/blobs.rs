//! Content-addressed blobs on disk: `blobs/ab/abcdef…`, named by the blake3 of their bytes. An
//! upload is hashed as it streams to a temporary file and kept only if the hash matches its name.

use std::io::Write;
use std::path::PathBuf;

use vmgrid_proto::is_blob_ref;

#[derive(Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub fn new(dir: PathBuf) -> std::io::Result<Blobs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Blobs { dir })
    }

    pub fn path(&self, hash: &str) -> Option<PathBuf> {
        is_blob_ref(hash).then(|| self.dir.join(&hash[..2]).join(hash))
    }

    pub fn has(&self, hash: &str) -> bool {
        self.path(hash).is_some_and(|p| p.is_file())
    }

    /// Starts an upload; finish it with [`Upload::commit`].
    pub fn begin(&self, hash: &str) -> std::io::Result<Upload> {
        let dest = self.path(hash).ok_or_else(|| std::io::Error::other("not a blob hash"))?;
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        Ok(Upload { dest, tmp, hasher: blake3::Hasher::new(), expected: hash.to_string() })
    }
}

pub struct Upload {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    hasher: blake3::Hasher,
    expected: String,
}

impl Upload {
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.tmp.write_all(chunk)
    }

    /// Keeps the blob if its bytes hash to its name.
    pub fn commit(self) -> Result<(), CommitError> {
        let got = self.hasher.finalize().to_hex().to_string();
        if got != self.expected {
            return Err(CommitError::Mismatch(format!("the uploaded bytes hash to {got}, not {}", self.expected)));
        }
        self.tmp.as_file().sync_all()?;
        if let Some(parent) = self.dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        self.tmp.persist(&self.dest).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Why an upload was not kept: the caller's bytes, or this host's disk.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
