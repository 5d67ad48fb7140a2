//! Leaving the pool: a node asked to stop says it drains, hands back the jobs it queued (again
//! until the pool has heard it), lets its running jobs finish within the drain time, then stops
//! them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Agent, lock};

impl Agent {
    /// Tells the pool this node drains, hands back the jobs queued ahead, and lets running jobs
    /// finish (or hands them back) within the drain time.
    pub(crate) fn drain(&self) {
        tracing::info!(node = %self.ad.name, "draining");
        let queued = self.take_queued(true);
        lock(&self.returning).extend(queued);
        // Jobs that take checkpoints move at once: a last checkpoint each, and they resume elsewhere.
        for r in lock(&self.running).values().filter(|r| r.checkpointed) {
            r.vacate.store(true, Ordering::Relaxed);
        }
        let deadline = Instant::now() + self.config.drain_timeout;
        self.hand_back_all(deadline);
        self.wait_until_idle(deadline);
        for r in lock(&self.running).values() {
            r.cancel.store(true, Ordering::Relaxed);
        }
        self.wait_until_idle(deadline + Duration::from_secs(10));
    }

    /// Says the node drains and hands back what it queued, again until the pool has heard it or
    /// `deadline` passes: a hand-back lost to a failed heartbeat would leave those jobs to the
    /// pool's deregistration, which counts them as lost by the node.
    pub(crate) fn hand_back_all(&self, deadline: Instant) {
        let mut wait = Duration::from_millis(50);
        loop {
            self.send_heartbeat(true);
            if lock(&self.returning).is_empty() || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    /// Waits until no job runs (each one that ends wakes `slot_freed`), or until `deadline`.
    fn wait_until_idle(&self, deadline: Instant) {
        let mut running = lock(&self.running);
        while !running.is_empty() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return };
            running = self.slot_freed.wait_timeout(running, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}
