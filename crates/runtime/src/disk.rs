//! The `disk_mb` limit, enforced while a job runs: a watchdog measures the job directory a few
//! times a second and stops the VM once it holds more than the limit, so a guest that fills its
//! directory is stopped long before it fills the host's disk.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::RunRequest;

/// How often the caller's cancel flag is passed on, and the shortest time between two measures.
const TICK: Duration = Duration::from_millis(50);
/// A measure may take at most this share of the watchdog's time (a directory of many files is
/// measured less often).
const MEASURE_SHARE: u32 = 10;

/// What a directory or a link costs at least, whatever the file system says it takes.
pub const ENTRY_COST: u64 = 4096;

/// Runs `run` with a request whose cancel flag the watchdog also sets, and returns its result
/// with the bytes the directory held when the watchdog stopped the VM for holding too much.
pub(crate) fn watched<T>(req: &RunRequest<'_>, run: impl FnOnce(&RunRequest<'_>) -> T) -> (T, Option<u64>) {
    let cap = req.job.resources.disk_mb.saturating_mul(1 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, finished) = mpsc::channel::<()>();
    let caller = req.cancel.clone();
    let dir = req.job_dir;
    std::thread::scope(|s| {
        let stop_vm = stop.clone();
        let watchdog = s.spawn(move || {
            let mut next_measure = Instant::now() + 2 * TICK;
            loop {
                if !matches!(finished.recv_timeout(TICK), Err(RecvTimeoutError::Timeout)) {
                    return None;
                }
                if caller.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                    stop_vm.store(true, Ordering::Relaxed);
                }
                let now = Instant::now();
                if now < next_measure {
                    continue;
                }
                let used = usage(dir);
                if used > cap {
                    stop_vm.store(true, Ordering::Relaxed);
                    return Some(used);
                }
                next_measure = Instant::now() + TICK.max(now.elapsed() * MEASURE_SHARE);
            }
        });
        let inner = RunRequest { cancel: Some(stop), ..req.clone() };
        let out = run(&inner);
        drop(done);
        (out, watchdog.join().unwrap_or(None))
    })
}

/// The bytes a directory takes: each file at its length or its allocated blocks, whichever is
/// more (a sparse file is charged what copying it out would cost), and each directory or link
/// its blocks but at least [`ENTRY_COST`] (so millions of empty directories count too).
pub fn usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| if m.is_file() { m.len().max(m.blocks() * 512) } else { ENTRY_COST.max(m.blocks() * 512) })
        .fold(0u64, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_files_are_charged_their_length_and_directories_their_blocks() {
        let d = tempfile::tempdir().unwrap();
        let empty = usage(d.path());
        let f = std::fs::File::create(d.path().join("sparse")).unwrap();
        f.set_len(5 << 30).unwrap();
        assert!(usage(d.path()) >= empty + (5 << 30));
        for i in 0..10 {
            std::fs::create_dir(d.path().join(format!("d{i}"))).unwrap();
        }
        assert!(usage(d.path()) >= empty + (5 << 30) + 10 * ENTRY_COST, "empty directories cost too");
    }
}
