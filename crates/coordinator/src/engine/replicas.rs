//! Results checked by agreement (`[policy] replicas`, `quorum`): a job runs on `replicas`
//! distinct nodes, one after another, and its result is the one `quorum` of them agree on: the
//! same exit code, stdout and outputs (by name and content). Until then each run's result is a
//! vote (`Job::votes`, durable). Each node's agreements and disagreements with the agreed results
//! make its reputation (`node.reputation` in CEL, shown by `vmgrid status`); an admin can ban a
//! node, which then cannot join the pool again under that name.

use std::collections::HashMap;

use vmgrid_proto::*;

use super::{ApiError, Engine};
use crate::store::{Op, StoredResult, Trust, Vote};

/// A replicated job is held once it ran on this many times its `replicas` nodes with no result
/// that `quorum` of them agree on.
pub const MAX_RUNS_PER_REPLICA: u32 = 2;

/// How a replica's run ended: it exited with a code, or it failed (the kind of failure, and why).
pub enum Ended {
    Exited(i32),
    Failed { kind: String, reason: String },
}

/// What replicas agree on: how the run ended (an exit code, or a kind of failure: its words may
/// differ from node to node), stdout (its hash, and how much was cut), and each output's name
/// and content (in name order). stderr is left out: a run's diagnostics may differ.
pub fn digest(ended: &Ended, r: &StoredResult) -> String {
    let mut h = blake3::Hasher::new();
    match ended {
        Ended::Exited(code) => h.update(format!("exit {code}\n").as_bytes()),
        Ended::Failed { kind, .. } => h.update(format!("failed {kind}\n").as_bytes()),
    };
    let stdout = r.stdout.as_ref().map_or("", |f| f.blob.as_str());
    h.update(format!("stdout {stdout} {}\n", r.stdout_dropped).as_bytes());
    let mut outputs: Vec<(&str, &str)> = r.outputs.iter().map(|f| (f.path.as_str(), f.blob.as_str())).collect();
    outputs.sort_unstable();
    for (path, blob) in outputs {
        h.update(format!("output {} {path} {blob}\n", path.len()).as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The result `quorum` of the votes agree on, if one is: the first to get there, in vote order.
fn agreed(votes: &[Vote], quorum: u32) -> Option<String> {
    let mut counts: HashMap<&str, u32> = HashMap::new();
    votes.iter().find_map(|v| {
        let n = counts.entry(&v.digest).or_default();
        *n += 1;
        (*n >= quorum).then(|| v.digest.clone())
    })
}

impl Engine {
    /// A run of job `id` that ended as `run` as a vote, if the job has replicas: every run that
    /// ended is one, a failure too (a node cannot escape being judged by failing the job); not a
    /// host's failure, a cancel (a drain, a revoked lease) or a vacate, which are no outcome of
    /// the job's.
    pub(super) fn ended_as_vote(&self, id: u64, run: &RunReport) -> Option<Ended> {
        let spec = &self.specs.get(&self.jobs.get(&id)?.spec_id)?.spec;
        if spec.replicas.unwrap_or(1) <= 1 {
            return None;
        }
        match run {
            RunReport::Exited { code } => Some(Ended::Exited(*code)),
            RunReport::GuestFailed { failure, reason } if *failure != FailureKind::Cancelled => {
                Some(Ended::Failed { kind: failure.to_string(), reason: reason.clone() })
            }
            RunReport::BadJob { reason } => Some(Ended::Failed { kind: "bad job".into(), reason: reason.clone() }),
            _ => None,
        }
    }

    /// A replicated job's run on node `node` ended (`ended`, with `result`): a vote. Once
    /// `replicas` have run, the result `quorum` of them agree on is the job's; until then, or
    /// while none is agreed on, the job runs again on a node that has not run it, up to
    /// [`MAX_RUNS_PER_REPLICA`] times `replicas` runs; then it is held.
    pub(super) fn vote(&mut self, id: u64, node: &str, ended: Ended, result: StoredResult, now: u64) {
        let spec = &self.specs[&self.jobs[&id].spec_id].spec;
        let replicas = spec.replicas.unwrap_or(1);
        // The validator's default, for a spec that did not say.
        let quorum = spec.quorum.unwrap_or(replicas / 2 + 1);
        let digest = digest(&ended, &result);
        self.release_resources(id, now);
        let j = self.jobs.get_mut(&id).expect("reported jobs exist");
        let short = &digest[..12];
        let (exit_code, failure) = match ended {
            Ended::Exited(code) => (code, None),
            Ended::Failed { kind, reason } => (0, Some(format!("{kind}: {reason}"))),
        };
        let how = failure.clone().unwrap_or_else(|| format!("exited with {exit_code}"));
        j.end_attempt(now, format!("{how}; result {short}"));
        j.votes.push(Vote { node: node.to_string(), exit_code, failure, digest: digest.clone(), result });
        j.node = None;
        let ran = j.votes.len() as u32;
        let winner = (ran >= replicas).then(|| agreed(&j.votes, quorum)).flatten();
        if let Some(winner) = winner {
            return self.accept(id, &winner, now);
        }
        if ran < replicas * MAX_RUNS_PER_REPLICA {
            j.state = JobState::Idle;
            j.reason = Some(match ran < replicas {
                true => format!("{ran} of its {replicas} replicas ran; the next runs on a node that has not run it"),
                false => format!(
                    "its {ran} replicas gave no result that {quorum} agree on; one more runs on a node that has not run it"
                ),
            });
            self.set_idle(id);
            self.wake_nodes();
        } else {
            let mut results: Vec<&str> = j.votes.iter().map(|v| &v.digest[..12]).collect();
            results.sort_unstable();
            results.dedup();
            j.state = JobState::Held;
            j.finished_ms = Some(now);
            j.reason = Some(format!(
                "no result that {quorum} of its {ran} replicas agree on (results {}); `vmgrid release` runs them again",
                results.join(", ")
            ));
            j.votes.clear();
        }
        self.persist(id, false);
        self.job_changed(id, now);
    }

    /// Job `id`'s result is the one with digest `winner`: the job completes with it, and each
    /// node that voted is credited with an agreement or a disagreement.
    fn accept(&mut self, id: u64, winner: &str, now: u64) {
        let j = self.jobs.get_mut(&id).expect("voted jobs exist");
        let votes = std::mem::take(&mut j.votes);
        let agreeing = votes.iter().filter(|v| v.digest == winner).count();
        let won = votes.iter().find(|v| v.digest == winner).expect("the winner is a vote");
        j.result = Some(Box::new(won.result.clone()));
        j.finished_ms = Some(now);
        let agreed = format!("{agreeing} of its {} replicas agreed", votes.len());
        match &won.failure {
            // The replicas agree that the job fails: it is held, as one failed run would be.
            Some(failure) => {
                j.state = JobState::Held;
                j.reason = Some(format!("{failure} ({agreed} on this failure)"));
            }
            None => {
                j.exit_code = Some(won.exit_code);
                j.state = JobState::Completed;
                j.reason = Some(format!("{agreed} on this result"));
                self.metrics.jobs_completed += 1;
                self.finished(id);
            }
        }
        for v in &votes {
            let t = self.trust.entry(v.node.clone()).or_default();
            match v.digest == winner {
                true => t.agree += 1,
                false => t.disagree += 1,
            }
            let op = Op::Trust { name: v.node.clone(), trust: *t };
            self.store(op);
        }
        self.dirty = true;
        self.persist(id, true);
        self.job_changed(id, now);
    }

    /// Whether one of the ready nodes with ads `ads` that runs job `id`'s vm type has not run
    /// one of its replicas yet (true for a job without replicas, and when no node is ready).
    pub(super) fn untried_node<'a>(&self, id: u64, ads: impl IntoIterator<Item = &'a NodeAd>) -> bool {
        let Some(j) = self.jobs.get(&id).filter(|j| !j.votes.is_empty()) else { return true };
        let Some(vm) = self.specs.get(&j.spec_id).map(|s| s.spec.vm_type) else { return true };
        let mut ads = ads.into_iter().filter(|ad| ad.vm_types.contains(&vm)).peekable();
        ads.peek().is_none() || ads.any(|ad| !j.votes.iter().any(|v| v.node == ad.name))
    }

    /// The names of the nodes that ran one of job `id`'s replicas.
    pub(super) fn voters(&self, id: u64) -> impl Iterator<Item = &str> {
        self.jobs.get(&id).into_iter().flat_map(|j| j.votes.iter().map(|v| v.node.as_str()))
    }

    /// A node's reputation: the share of its results that agreed with the result its job's
    /// replicas agreed on, counting one agreement and one disagreement before any (so a node
    /// never checked is 0.5, and one check moves it only so far).
    pub fn reputation(&self, node: &str) -> f64 {
        // A pool that never judged a replicated result knows nothing of anyone: no lookup (a
        // scheduling pass asks for every ready node's).
        let t =
            if self.trust.is_empty() { Trust::default() } else { self.trust.get(node).copied().unwrap_or_default() };
        (t.agree + 1) as f64 / (t.agree + t.disagree + 2) as f64
    }

    /// What the pool knows of node `name`'s honesty.
    pub fn trust(&self, node: &str) -> Trust {
        self.trust.get(node).copied().unwrap_or_default()
    }

    /// An admin bans node `name` (or lifts its ban): a banned node leaves the pool at once (its
    /// jobs go back, its credential is revoked), cannot register again under that name, and its
    /// results not yet judged no longer count (they run again elsewhere).
    pub fn ban(&mut self, name: &str, banned: bool, now: u64) -> Result<(), ApiError> {
        check_node_name(name).map_err(ApiError::BadRequest)?;
        let t = self.trust.entry(name.to_string()).or_default();
        t.banned = banned;
        let op = Op::Trust { name: name.to_string(), trust: *t };
        self.store(op);
        if banned {
            self.deregister(name, now);
            let voted: Vec<u64> =
                self.jobs.values().filter(|j| j.votes.iter().any(|v| v.node == name)).map(|j| j.id).collect();
            for id in voted {
                let j = self.jobs.get_mut(&id).expect("listed above");
                j.votes.retain(|v| v.node != name);
                self.persist(id, false);
                self.job_changed(id, now);
            }
            self.dirty = true;
        }
        Ok(())
    }

    /// Whether node `name` is banned from the pool.
    pub fn banned(&self, name: &str) -> bool {
        self.trust.get(name).is_some_and(|t| t.banned)
    }
}
