//! The pool's totals for `/metrics` and the dashboard's overview, read without walking the jobs:
//! the engine counts jobs by state as they change (each change of a job is persisted, and
//! [`Engine::persist`] brings the count up to date), so a call costs O(nodes), not O(jobs).
//! [`Engine::check_invariants`] recounts them from the jobs.

use vmgrid_proto::{JobState, NodeState};

use super::Engine;
use crate::history::{MINUTES, Sample};
use crate::store::Op;

/// The job states in the order `JobState as usize` indexes them.
pub const STATES: [JobState; 5] =
    [JobState::Idle, JobState::Running, JobState::Completed, JobState::Held, JobState::Removed];

/// Counts for `/metrics` and the overview, read from the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub jobs: [(JobState, u64); 5],
    pub nodes: [(NodeState, u64); 3],
    pub leases: u64,
}

impl Engine {
    pub fn counts(&self) -> Counts {
        let jobs = STATES.map(|s| (s, self.by_state[s as usize]));
        let nodes = [NodeState::Ready, NodeState::Draining, NodeState::Lost]
            .map(|st| (st, self.nodes.values().filter(|n| n.state == st).count() as u64));
        let leases = self.nodes.values().map(|n| n.jobs.len() as u64).sum();
        Counts { jobs, nodes, leases }
    }

    /// Offers the pool's counters to the last hour's history (from the tick loop); the minutes
    /// it closes are stored, and those older than the hour forgotten.
    pub fn sample_history(&mut self, now: u64) {
        let (completed, idle) = (self.metrics.jobs_completed, self.by_state[JobState::Idle as usize]);
        let closed = self.history.offer(now, completed, idle);
        if let Some(last) = closed.last() {
            let before_ms = last.minute_ms.saturating_sub(MINUTES as u64 * 60_000);
            for s in closed {
                self.store(Op::Sample(s));
            }
            self.store(Op::PruneSamples { before_ms });
        }
    }

    /// The last hour, a sample a minute, oldest first; the last is the current minute so far.
    pub fn history_samples(&self) -> Vec<Sample> {
        self.history.samples(self.metrics.jobs_completed, self.by_state[JobState::Idle as usize])
    }

    /// Counts job `id` in its current state (after a change of it).
    pub(super) fn recount(&mut self, id: u64) {
        let Some(j) = self.jobs.get_mut(&id) else { return };
        if j.counted != j.state {
            self.by_state[j.counted as usize] -= 1;
            self.by_state[j.state as usize] += 1;
            j.counted = j.state;
        }
    }

    /// The counts by state against the jobs themselves.
    pub(super) fn check_state_counts(&self) -> Result<(), String> {
        let mut actual = [0u64; 5];
        for j in self.jobs.values() {
            if j.counted != j.state {
                return Err(format!("job {} is {} but counted as {}", j.id, j.state.as_str(), j.counted.as_str()));
            }
            actual[j.state as usize] += 1;
        }
        if actual != self.by_state {
            return Err(format!("jobs by state are counted as {:?}, and are {actual:?}", self.by_state));
        }
        Ok(())
    }
}
