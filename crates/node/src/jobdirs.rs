//! The directories jobs run in. Making and removing two directories per job is a few hundred
//! microseconds of file-system journal work on the path from a lease to its result (measured:
//! about 0.1 ms to make, 0.3 ms to remove on ext4), so neither happens there for a short job:
//! a wasm job that left its directory as it found it (empty) gives it back for the next job,
//! and any other directory is removed by a cleaner thread after its report is queued. At most
//! [`BACKLOG`] directories wait for the cleaner; past that, the job's own thread removes its
//! directory, so a node whose jobs write faster than it can delete does not fill its disk.
//!
//! A directory is reused only after a wasm job: WASI gives a guest no way to change the
//! directory's own mode, owner or attributes, so an empty directory is as good as a new one. A
//! QEMU or JVM guest might change them, so its directory is always removed. Whether a wasm job
//! left it empty is looked at (two listings and a `stat`), unless the job is known to have left
//! it as it was: nothing was staged or collected in it, and the guest called none of the calls
//! that make a file, directory or link (the runtime sees every call, `RunResult::created`).
//!
//! A node that stops with directories not yet removed removes them at its next start (the
//! whole `jobs` directory is emptied then).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// The most directories waiting for the cleaner.
pub const BACKLOG: usize = 256;
/// The most empty directories kept for reuse (one per job that ran at once is enough).
const SPARE: usize = 64;

/// What may become of a job's directory once its job is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Removed.
    No,
    /// Reused if it is as it was made; removed otherwise.
    IfAsMade,
    /// Reused: nothing was made in it (see the module doc).
    Untouched,
}

/// A job's directory: `path` holds the job directory proper (`job`) and whatever the node puts
/// beside it (collected outputs, a checkpoint to resume from).
pub struct JobDir {
    pub path: PathBuf,
    /// The job directory's size when it was made: a directory that grew (ext4 never shrinks one)
    /// is not reused, so no job is charged, or learns, what an earlier one wrote.
    made_size: u64,
}

impl JobDir {
    /// The directory the job's VM sees as its own.
    pub fn job(&self) -> PathBuf {
        self.path.join("job")
    }
}

pub struct JobDirs {
    root: PathBuf,
    next: AtomicU64,
    /// Empty job directories, ready for the next job.
    spare: Mutex<Vec<JobDir>>,
    cleaner: mpsc::SyncSender<PathBuf>,
}

impl JobDirs {
    /// Job directories under `root` (which exists and is empty), with the cleaner thread.
    pub fn new(root: PathBuf) -> std::io::Result<JobDirs> {
        let (cleaner, backlog) = mpsc::sync_channel::<PathBuf>(BACKLOG);
        std::thread::Builder::new().name("vmgrid-jobdirs".into()).spawn(move || {
            for dir in backlog {
                remove(&dir);
            }
        })?;
        Ok(JobDirs { root, next: AtomicU64::new(0), spare: Mutex::default(), cleaner })
    }

    /// An empty job directory: a spare one, or a new one.
    pub fn take(&self) -> std::io::Result<JobDir> {
        if let Some(d) = crate::lock(&self.spare).pop() {
            return Ok(d);
        }
        // A name left over by an earlier run of the node (not removed at its start) is skipped.
        let path = loop {
            let path = self.root.join(format!("d{}", self.next.fetch_add(1, Ordering::Relaxed)));
            match std::fs::create_dir(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                made => break made.map(|()| path)?,
            }
        };
        let job = path.join("job");
        std::fs::create_dir(&job)?;
        Ok(JobDir { made_size: std::fs::metadata(&job)?.len(), path })
    }

    /// Done with `dir`: kept for the next job as `reuse` says, else removed (by the cleaner, or
    /// here when its backlog is full).
    pub fn give_back(&self, dir: JobDir, reuse: Reuse) {
        let reusable = match reuse {
            Reuse::No => false,
            Reuse::IfAsMade => as_made(&dir),
            Reuse::Untouched => true,
        };
        if reusable && reset_times(&dir.job()).is_ok() {
            let mut spare = crate::lock(&self.spare);
            if spare.len() < SPARE {
                spare.push(dir);
                return;
            }
        }
        if let Err(mpsc::TrySendError::Full(path) | mpsc::TrySendError::Disconnected(path)) =
            self.cleaner.try_send(dir.path)
        {
            remove(&path);
        }
    }
}

/// Sets `dir`'s times to now, so the next job sees none an earlier one set. One `utimensat` on
/// the path: opening the directory to set them on its descriptor walked the path twice.
fn reset_times(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path that outlives the call; no times given means now for both.
    match unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), std::ptr::null(), 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether `dir` is as [`JobDirs::take`] made it: its job directory alone, empty, and no larger.
fn as_made(dir: &JobDir) -> bool {
    if std::fs::metadata(dir.job()).map(|m| m.len()).ok() != Some(dir.made_size) {
        return false;
    }
    let only = |p: &Path, name: Option<&str>| {
        std::fs::read_dir(p).is_ok_and(|mut entries| {
            let first = entries.next().map(|e| e.map(|e| e.file_name()));
            let expected = match (first, name) {
                (None, None) => true,
                (Some(Ok(n)), Some(name)) => n == name,
                _ => false,
            };
            expected && entries.next().is_none()
        })
    };
    only(&dir.path, Some("job")) && only(&dir.job(), None)
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove the job directory {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, JobDirs) {
        let root = tempfile::tempdir().unwrap();
        let dirs = JobDirs::new(root.path().to_path_buf()).unwrap();
        (root, dirs)
    }

    #[test]
    fn an_empty_directory_is_reused_and_one_a_job_wrote_in_is_not() {
        let (_root, dirs) = dirs();
        let a = dirs.take().unwrap();
        let first = a.path.clone();
        assert!(a.job().is_dir());
        dirs.give_back(a, Reuse::IfAsMade);
        let b = dirs.take().unwrap();
        assert_eq!(b.path, first, "the empty directory is taken again");
        std::fs::write(b.job().join("left"), "x").unwrap();
        dirs.give_back(b, Reuse::IfAsMade);
        let c = dirs.take().unwrap();
        assert_ne!(c.path, first, "a directory with a file in it is not reused");
        assert_eq!(std::fs::read_dir(c.job()).unwrap().count(), 0, "a new directory is empty");
        // Something beside the job directory (collected outputs) is not as made either.
        std::fs::create_dir(c.path.join("out")).unwrap();
        let third = c.path.clone();
        dirs.give_back(c, Reuse::IfAsMade);
        assert_ne!(dirs.take().unwrap().path, third);
    }

    #[test]
    fn a_directory_that_grew_is_not_reused_and_a_reused_ones_times_are_reset() {
        let (_root, dirs) = dirs();
        let a = dirs.take().unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH;
        std::fs::File::open(a.job()).unwrap().set_times(std::fs::FileTimes::new().set_modified(old)).unwrap();
        let first = a.path.clone();
        dirs.give_back(a, Reuse::IfAsMade);
        let b = dirs.take().unwrap();
        assert_eq!(b.path, first);
        let mtime = std::fs::metadata(b.job()).unwrap().modified().unwrap();
        assert!(mtime > old, "the earlier job's times are gone");
        // Many long names grow the directory (ext4 never shrinks it): gone, they leave it larger.
        let names: Vec<_> = (0..2000).map(|i| b.job().join(format!("{i:0>200}"))).collect();
        names.iter().for_each(|n| std::fs::write(n, "").unwrap());
        names.iter().for_each(|n| std::fs::remove_file(n).unwrap());
        let grew = std::fs::metadata(b.job()).unwrap().len() > b.made_size;
        dirs.give_back(b, Reuse::IfAsMade);
        assert_eq!(dirs.take().unwrap().path == first, !grew, "reused only if it did not grow");
    }

    #[test]
    fn a_directory_not_reusable_is_removed_even_if_empty() {
        let (_root, dirs) = dirs();
        let a = dirs.take().unwrap();
        let path = a.path.clone();
        dirs.give_back(a, Reuse::No);
        assert_ne!(dirs.take().unwrap().path, path);
        // The cleaner removes it; its backlog is drained in order, so once a later directory
        // is gone, this one is too.
        let marker = dirs.take().unwrap();
        let marker_path = marker.path.clone();
        dirs.give_back(marker, Reuse::No);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while marker_path.exists() {
            assert!(std::time::Instant::now() < deadline, "the cleaner never removed it");
            std::thread::yield_now();
        }
        assert!(!path.exists());
    }
}
