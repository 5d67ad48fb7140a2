//! The `disk_mb` limit, enforced while a job runs: a watchdog measures the job directory a few
//! times a second and stops the VM once it holds more than the limit, so a guest that fills its
//! directory is stopped long before it fills the host's disk.
//!
//! A job is first measured [`FIRST_MEASURE`] after it starts; most jobs of a sweep are over by
//! then. Until then one thread for all jobs ([`Ticker`]) only passes their cancel flags on, so
//! a short job starts no thread of its own (a thread per job was a visible share of a node's
//! cpu on trivial jobs); a job still running at its first measure gets its own watchdog, so a
//! large directory measured slowly delays no other job's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::RunRequest;

/// How often the caller's cancel flag is passed on, and the shortest time between two measures.
const TICK: Duration = Duration::from_millis(50);
/// When a job's directory is first measured.
const FIRST_MEASURE: Duration = Duration::from_millis(100);
/// A measure may take at most this share of the watchdog's time (a directory of many files is
/// measured less often).
const MEASURE_SHARE: u32 = 10;

/// What a directory or a link costs at least, whatever the file system says it takes.
pub const ENTRY_COST: u64 = 4096;

/// Runs `run` with a request whose cancel flag the watchdog also sets, and returns its result
/// with the bytes the directory held when the watchdog stopped the VM for holding too much.
pub(crate) fn watched<T>(req: &RunRequest<'_>, run: impl FnOnce(&RunRequest<'_>) -> T) -> (T, Option<u64>) {
    let Some(ticker) = ticker() else {
        // No watchdog (no thread could start): the directory is measured when the run ends.
        return (run(req), None);
    };
    let watch = Arc::new(Watch {
        dir: req.job_dir.to_path_buf(),
        cap: req.job.resources.disk_mb.saturating_mul(1 << 20),
        caller: req.cancel.clone(),
        stop: Arc::default(),
        started: Instant::now(),
        state: Mutex::default(),
        ended_cv: Condvar::new(),
    });
    ticker.add(watch.clone());
    let inner = RunRequest { cancel: Some(watch.stop.clone()), ..req.clone() };
    let out = run(&inner);
    ticker.remove(&watch);
    (out, watch.end())
}

/// One running job's watch.
struct Watch {
    dir: PathBuf,
    cap: u64,
    caller: Option<Arc<AtomicBool>>,
    /// The VM's cancel flag: the caller's, passed on, or set for holding too much.
    stop: Arc<AtomicBool>,
    started: Instant,
    /// Held by a watchdog while it measures, so the end of a run waits for a measure under way.
    state: Mutex<WatchState>,
    ended_cv: Condvar,
}

#[derive(Default)]
struct WatchState {
    ended: bool,
    /// The bytes the directory held when the watchdog stopped the VM.
    over: Option<u64>,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pass_cancel(&self) {
        if self.caller.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// The run ended: its own watchdog, if it has one, stops; returns what it found.
    fn end(&self) -> Option<u64> {
        let mut s = self.lock();
        s.ended = true;
        self.ended_cv.notify_all();
        s.over
    }

    /// A long job's own watchdog: passes the cancel flag on and measures, until the run ends or
    /// the directory holds too much.
    fn watchdog(&self) {
        let mut next_measure = Instant::now();
        let mut s = self.lock();
        while !s.ended {
            self.pass_cancel();
            let now = Instant::now();
            if now >= next_measure {
                let used = usage(&self.dir);
                if used > self.cap {
                    s.over = Some(used);
                    self.stop.store(true, Ordering::Relaxed);
                    return;
                }
                next_measure = Instant::now() + TICK.max(now.elapsed() * MEASURE_SHARE);
            }
            s = self.ended_cv.wait_timeout(s, TICK).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// How long the ticker goes on ticking with no job before it sleeps until the next one (so a
/// node running one short job after another does not wake it for each).
const TICKER_IDLE: Duration = Duration::from_secs(1);

/// The thread that watches jobs until their first measure (started with the first job).
struct Ticker {
    young: Mutex<Young>,
    added: Condvar,
}

#[derive(Default)]
struct Young {
    jobs: Vec<Arc<Watch>>,
    /// The ticker sleeps until a job is added.
    asleep: bool,
}

/// The ticker, started with the first job; None if its thread could not start now (the next
/// job tries again).
fn ticker() -> Option<&'static Ticker> {
    static TICKER: Mutex<Option<&'static Ticker>> = Mutex::new(None);
    let mut ticker = TICKER.lock().unwrap_or_else(|p| p.into_inner());
    if ticker.is_none() {
        let t: &'static Ticker = Box::leak(Box::new(Ticker { young: Mutex::default(), added: Condvar::new() }));
        match std::thread::Builder::new().name("vmgrid-disk".into()).spawn(|| t.run()) {
            Ok(_) => *ticker = Some(t),
            Err(e) => {
                tracing::error!("cannot start the disk watchdog ({e}): this job's directory is measured when it ends")
            }
        }
    }
    *ticker
}

impl Ticker {
    fn lock(&self) -> MutexGuard<'_, Young> {
        self.young.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, w: Arc<Watch>) {
        let mut young = self.lock();
        young.jobs.push(w);
        if young.asleep {
            self.added.notify_one();
        }
    }

    fn remove(&self, w: &Arc<Watch>) {
        self.lock().jobs.retain(|y| !Arc::ptr_eq(y, w));
    }

    /// Every tick, passes the young jobs' cancel flags on and gives a job due for its first
    /// measure its own watchdog; sleeps once no job ran for [`TICKER_IDLE`].
    fn run(&self) {
        let mut young = self.lock();
        let mut last_job = Instant::now();
        loop {
            if !young.jobs.is_empty() {
                last_job = Instant::now();
            }
            young.asleep = last_job.elapsed() >= TICKER_IDLE;
            young = match young.asleep {
                true => self.added.wait(young).unwrap_or_else(|p| p.into_inner()),
                false => self.added.wait_timeout(young, TICK).unwrap_or_else(|p| p.into_inner()).0,
            };
            young.asleep = false;
            young.jobs.retain(|w| {
                w.pass_cancel();
                if w.started.elapsed() < FIRST_MEASURE {
                    return true;
                }
                let own = w.clone();
                // Kept young (and tried again next tick) if no thread can start now.
                std::thread::Builder::new().name("vmgrid-disk-job".into()).spawn(move || own.watchdog()).is_err()
            });
        }
    }
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

    fn watch(dir: &Path, cap: u64, caller: Option<Arc<AtomicBool>>) -> Arc<Watch> {
        Arc::new(Watch {
            dir: dir.to_path_buf(),
            cap,
            caller,
            stop: Arc::default(),
            started: Instant::now(),
            state: Mutex::default(),
            ended_cv: Condvar::new(),
        })
    }

    #[test]
    fn a_watchdog_stops_the_vm_of_a_directory_over_its_cap_and_says_how_much_it_held() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("big"), vec![1u8; 64 << 10]).unwrap();
        let w = watch(d.path(), 16 << 10, None);
        w.watchdog();
        assert!(w.stop.load(Ordering::Relaxed), "the VM is told to stop");
        assert!(w.end().is_some_and(|used| used >= 64 << 10));
    }

    #[test]
    fn a_watchdog_passes_the_cancel_flag_on_and_ends_with_the_run() {
        let d = tempfile::tempdir().unwrap();
        let caller = Arc::new(AtomicBool::new(true));
        let w = watch(d.path(), 1 << 30, Some(caller));
        let dog = std::thread::spawn({
            let w = w.clone();
            move || w.watchdog()
        });
        while !w.stop.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        assert_eq!(w.end(), None, "under its cap");
        dog.join().unwrap();
    }

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
