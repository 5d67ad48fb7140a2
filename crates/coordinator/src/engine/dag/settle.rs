//! Whether a workflow node's run is over, and how it ended: each call goes on from where the
//! last stopped, so a sweep's jobs are looked at about once each, however and in whatever order
//! they end (a held job is looked at again until it is released or removed).

use std::collections::BTreeSet;

use vmgrid_proto::JobState;

use super::Dag;
use crate::engine::Engine;

/// A node's run, as far as it was looked at: a sweep's settling costs each job about once,
/// however its jobs end and in whatever order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Progress {
    /// Jobs `first..first + next` have ended (completed or removed), or are in `held`.
    next: u64,
    /// Jobs that were held when passed: each may be released, and run again.
    held: BTreeSet<u64>,
    /// The first (by id) of the ended jobs that failed, and why.
    failure: Option<(u64, String)>,
}

/// One job of a node's run, as its settling sees it.
enum Look {
    Open,
    Ok,
    Failed(String),
    Held(String),
}

impl Engine {
    /// One job of a node's run.
    fn look(&self, job: u64) -> Look {
        let Some(j) = self.jobs.get(&job) else {
            return Look::Failed(format!("job {job} is no longer in the pool"));
        };
        match j.state {
            JobState::Idle | JobState::Running => Look::Open,
            JobState::Completed if j.exit_code == Some(0) => Look::Ok,
            JobState::Completed => Look::Failed(format!("job {job} exited with {}", j.exit_code.unwrap_or(-1))),
            JobState::Held => {
                Look::Held(format!("job {job} is held: {}", j.reason.as_deref().unwrap_or("no reason given")))
            }
            JobState::Removed => Look::Failed(format!("job {job} was removed")),
        }
    }

    /// Whether node `i`'s latest run is over: `None` while a job is idle or running, else
    /// whether every job completed with exit code 0 (and, if not, the first that did not). Each
    /// call goes on from where the last stopped (and rechecks the jobs it saw held).
    pub(super) fn settle(&self, d: &Dag, i: usize) -> Option<Result<(), String>> {
        let jobs = d.jobs_of(i);
        let look = |job| {
            d.work.set(d.work.get() + 1);
            self.look(job)
        };
        let mut guard = d.nodes[i].progress.borrow_mut();
        let p = &mut *guard;
        let note = |failure: &mut Option<(u64, String)>, job: u64, why: String| {
            if failure.as_ref().is_none_or(|(at, _)| job < *at) {
                *failure = Some((job, why));
            }
        };
        while jobs.start + p.next < jobs.end {
            let job = jobs.start + p.next;
            match look(job) {
                Look::Open => return None,
                Look::Ok => {}
                Look::Failed(why) => note(&mut p.failure, job, why),
                Look::Held(_) => {
                    p.held.insert(job);
                }
            }
            p.next += 1;
        }
        // The held jobs only once the scan is through: until then an open job answers, and
        // looking at every held job on each end would cost the held jobs times the others.
        let held: Vec<u64> = p.held.iter().copied().collect();
        for job in held {
            match look(job) {
                Look::Open => return None,
                Look::Held(_) => {}
                Look::Ok => {
                    p.held.remove(&job);
                }
                Look::Failed(why) => {
                    p.held.remove(&job);
                    note(&mut p.failure, job, why);
                }
            }
        }
        let held = p.held.first().and_then(|&job| match look(job) {
            Look::Held(why) => Some((job, why)),
            _ => None,
        });
        let first = p.failure.clone().into_iter().chain(held).min_by_key(|(at, _)| *at);
        Some(first.map_or(Ok(()), |(_, why)| Err(why)))
    }
}
