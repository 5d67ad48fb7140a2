//! Each job's attempts: where it ran and how each run ended, for the job page and `GET
//! /v1/jobs/{id}`. The latest attempt is described by the job's own fields (node, times, exit
//! code, reason); an attempt is moved to the job's history when it ends without being the job's
//! outcome (its node lost, a retry, a hold or rm while it ran, a release after it failed), so a
//! job that ran once keeps no history at all. At most [`MAX_PAST_ATTEMPTS`] are kept.

use vmgrid_proto::{AttemptView, JobState, MAX_PAST_ATTEMPTS};

use super::{Engine, Job};

impl Job {
    /// Moves the latest attempt, if it has one on a node, into the history, ended `now` (or when
    /// the job finished) for `outcome`. Call before the job's node is cleared.
    pub(super) fn end_attempt(&mut self, now: u64, outcome: String) {
        let Some(node) = self.node.as_deref() else { return };
        let entry = AttemptView {
            attempt: self.attempts,
            node: node.to_string(),
            started_ms: self.started_ms,
            ended_ms: Some(self.finished_ms.unwrap_or(now)),
            outcome,
            resumed_from: self.ck.as_ref().and_then(|c| c.resumed_from),
        };
        if self.history.len() >= MAX_PAST_ATTEMPTS {
            self.history.remove(0);
        }
        self.history.push(entry);
    }
}

impl Engine {
    /// Job `j`'s attempts, oldest first: its history, then its latest attempt if it is on a node.
    pub(super) fn attempt_views(&self, j: &Job) -> Vec<AttemptView> {
        let mut all = j.history.clone();
        if let Some(node) = j.node.as_deref() {
            let running = j.state == JobState::Running;
            let outcome = match (j.state, j.exit_code, &j.reason) {
                (JobState::Running, ..) => "running".to_string(),
                (_, Some(code), _) => format!("exited with {code}"),
                (_, None, Some(reason)) => reason.clone(),
                (state, None, None) => state.as_str().to_string(),
            };
            all.push(AttemptView {
                attempt: j.attempts,
                node: node.to_string(),
                started_ms: j.started_ms,
                ended_ms: if running { None } else { j.finished_ms },
                outcome,
                resumed_from: j.ck.as_ref().and_then(|c| c.resumed_from),
            });
        }
        all
    }
}

#[cfg(test)]
#[path = "attempts_tests.rs"]
pub(crate) mod tests;
