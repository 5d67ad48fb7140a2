//! A short hold on the next commit, so that a scheduling pass joins the commit of the change
//! that woke it. A result or a submit that may allow placements wakes a pass; without the hold
//! the writer commits the change at once and the pass's placements wait for the next commit, two
//! fsyncs in series before a node hears of its new work. With it, the writer waits (at most
//! [`HOLD_MAX`]) for the pass to finish, and one group commit makes both durable. Nothing is
//! acknowledged earlier by this; a commit, and the replies waiting for it, wait at most
//! [`HOLD_MAX`] longer.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a commit waits for a pass: a pass over a few thousand nodes takes well under
/// this, and a pass that was never run (no lease call to run it) costs no more than this.
pub const HOLD_MAX: Duration = Duration::from_millis(1);

#[derive(Default)]
pub struct Hold {
    /// Since when a pass is awaited, if one is.
    since: Mutex<Option<Instant>>,
    released: Condvar,
}

impl Hold {
    fn lock(&self) -> MutexGuard<'_, Option<Instant>> {
        self.since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pass is coming: the commit that takes the change about to be queued waits for it.
    pub fn set(&self) {
        let mut since = self.lock();
        if since.is_none() {
            *since = Some(Instant::now());
        }
    }

    /// The pass is done (its placements are queued): the writer may commit.
    pub fn release(&self) {
        if self.lock().take().is_some() {
            self.released.notify_all();
        }
    }

    /// Waits until the awaited pass is done, at most `max` after it was awaited (a hold set
    /// again meanwhile, for a later change, does not extend the wait); a hold that ran out is
    /// dropped, so that a pass that never comes delays one commit only.
    pub fn wait(&self, max: Duration) {
        let mut since = self.lock();
        let Some(from) = *since else { return };
        let end = from + max;
        while since.is_some() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if since.is_some_and(|s| s <= from) {
                    *since = None;
                }
                return;
            }
            since = self.released.wait_timeout(since, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_commit_waits_for_the_pass_and_no_longer_than_the_bound() {
        let hold = Arc::new(Hold::default());
        // Nothing awaited: no wait.
        let t = Instant::now();
        hold.wait(Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
        // The writer waits on another thread; the pass releases it: the wait ends then, not
        // before, and long before its bound.
        hold.set();
        let h = hold.clone();
        let (started, waiting) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            started.send(()).unwrap();
            let t = Instant::now();
            h.wait(Duration::from_secs(30));
            (Instant::now(), t.elapsed())
        });
        waiting.recv().unwrap();
        let released = Instant::now();
        hold.release();
        let (ended, waited) = writer.join().unwrap();
        assert!(ended >= released, "the wait ended before the pass released it");
        assert!(waited < Duration::from_secs(20), "{waited:?}");
        // A pass that never comes: the bound, then the hold is dropped for the next commit.
        hold.set();
        let t = Instant::now();
        hold.wait(Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(20));
        let t = Instant::now();
        hold.wait(Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(1), "a hold that ran out delays the next commit");
        // Released and set again (the next change) before the writer woke: the first wait's
        // bound holds; the new hold stays for the next commit.
        hold.set();
        let (h, done) = (hold.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let over = done.clone();
        let churn = std::thread::spawn(move || {
            while !over.load(std::sync::atomic::Ordering::Acquire) {
                h.release();
                h.set();
                std::thread::yield_now();
            }
        });
        let t = Instant::now();
        hold.wait(Duration::from_millis(50));
        let waited = t.elapsed();
        done.store(true, std::sync::atomic::Ordering::Release);
        churn.join().unwrap();
        assert!(waited < Duration::from_millis(150), "a wait outlived its bound: {waited:?}");
    }
}
