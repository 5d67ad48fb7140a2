//! The job calls: submit, rm/hold/release, and the results nodes report, with the retry and hold
//! rules and the requeue of a job whose node failed it.

use std::sync::Arc;

use vmgrid_proto::*;

use super::{ApiError, Engine, Event, Job, MAX_NODE_LOSSES, Principal, SpecEntry, cluster_of};
use crate::store::{JobRow, Op, StoredResult};

/// The most jobs one submit may create.
pub const MAX_COUNT: u64 = 1_000_000;

impl Engine {
    /// Queues `count` instances of `spec` for the caller; returns their ids. Only a console
    /// submits SSI processes, and their home is the one the pool gave that console.
    pub fn submit(&mut self, p: &Principal, mut spec: JobSpec, count: u64, now: u64) -> Result<Vec<u64>, ApiError> {
        match (p, spec.ssi.as_mut()) {
            (Principal::Console { home, .. }, Some(ssi)) => ssi.home = home.clone(),
            (Principal::Console { .. }, None) => {
                return Err(ApiError::BadRequest("a console's credential submits only its SSI processes".into()));
            }
            (_, Some(_)) => {
                return Err(ApiError::BadRequest(
                    "`ssi` is set by the pool, for the processes of a `vmgrid ssi` console; a job cannot set it".into(),
                ));
            }
            (_, None) => {}
        }
        spec.check().map_err(ApiError::BadRequest)?;
        if count == 0 || count > MAX_COUNT {
            return Err(ApiError::BadRequest(format!("count is {count}; it must be between 1 and {MAX_COUNT}")));
        }
        if let Some(n) = spec.group
            && u64::from(n) != count
        {
            return Err(ApiError::BadRequest(format!(
                "a job group is the whole submit: `group` is {n} and the count {count}"
            )));
        }
        let owner = p.owner();
        let queued = self.queued_and_reserved(owner);
        if queued + count > self.limits.max_queued_per_user {
            return Err(ApiError::Forbidden(format!(
                "{owner} has {queued} jobs queued (counting those of running workflows) and may have at most {}: wait for some to finish, or `vmgrid rm` some",
                self.limits.max_queued_per_user
            )));
        }
        let cluster = cluster_of(&spec).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let json = serde_json::to_string(&spec).expect("a spec serializes");
        let (spec_id, first) = self.add_jobs(&Arc::from(owner), spec, cluster, count, now);
        self.store(Op::Spec { id: spec_id, owner: owner.into(), json });
        self.store(Op::Jobs { spec_id, first_id: first, count, owner: owner.into(), submitted_ms: now });
        Ok((first..first + count).collect())
    }

    /// Queues `count` idle jobs of a new spec in memory; returns (spec id, first job id). The
    /// caller stores them.
    pub(super) fn add_jobs(
        &mut self,
        owner: &Arc<str>,
        spec: JobSpec,
        cluster: vmgrid_scheduler::Cluster,
        count: u64,
        now: u64,
    ) -> (u64, u64) {
        let spec_id = self.next_spec;
        self.next_spec += 1;
        self.specs.insert(spec_id, Arc::new(SpecEntry { spec, cluster }));
        let first = self.next_job;
        self.next_job += count;
        *self.queued.entry(owner.clone()).or_default() += count;
        if count > 0 {
            self.owners.add(owner, first, first + count - 1);
        }
        *self.spec_jobs.entry(spec_id).or_default() += count;
        self.by_state[JobState::Idle as usize] += count;
        for i in 0..count {
            let id = first + i;
            self.jobs.insert(id, Job::new(id, spec_id, i, owner.clone(), now));
            self.set_idle(id);
        }
        self.dirty = true;
        self.wake_nodes();
        (spec_id, first)
    }

    pub(super) fn set_idle(&mut self, id: u64) {
        if let Some(j) = self.jobs.get(&id) {
            self.idle_by_spec.entry(j.spec_id).or_default().insert(id);
        }
    }

    pub(super) fn unset_idle(&mut self, id: u64) {
        let Some(spec_id) = self.jobs.get(&id).map(|j| j.spec_id) else { return };
        if let Some(ids) = self.idle_by_spec.get_mut(&spec_id) {
            ids.remove(&id);
            if ids.is_empty() {
                self.idle_by_spec.remove(&spec_id);
            }
        }
    }

    /// The job's row as the store keeps it; the result column only when `with_result`.
    pub(super) fn persist(&mut self, id: u64, with_result: bool) {
        self.recount(id);
        let j = &self.jobs[&id];
        let row = JobRow {
            id,
            state: j.state,
            node: j.node.as_deref().map(str::to_string),
            epoch: j.epoch,
            attempts: j.attempts,
            retries: j.retries,
            losses: j.losses,
            exit_code: j.exit_code,
            reason: j.reason.clone(),
            started_ms: j.started_ms,
            finished_ms: j.finished_ms,
            result: if with_result { j.result.as_deref().cloned() } else { None },
            set_result: with_result,
            history: j.history.clone(),
            checkpoint: j.ck.clone(),
            votes: j.votes.clone(),
        };
        self.store(Op::Job(Box::new(row)));
        self.wake_waiters();
    }

    /// rm, hold or release of the jobs `ids`, each only by its owner or an admin.
    pub fn action(&mut self, p: &Principal, action: JobAction, ids: &[u64], now: u64) -> ActionResponse {
        let mut resp = ActionResponse { changed: Vec::new(), refused: Vec::new() };
        for &id in ids {
            match self.act(p, action, id, now) {
                Ok(view) => resp.changed.push(view),
                Err(why) => resp.refused.push((id, why)),
            }
        }
        resp
    }

    fn act(&mut self, p: &Principal, action: JobAction, id: u64, now: u64) -> Result<JobView, String> {
        // Another user's job is refused as a missing one (its owner is not the caller's to learn).
        let j = self.jobs.get(&id).filter(|j| p.may_see(&j.owner)).ok_or("no such job")?;
        if action == JobAction::Vacate {
            return self.vacate(id, now);
        }
        let state = j.state;
        let allowed = match (action, state) {
            (JobAction::Vacate, _) => false,
            (JobAction::Rm, s) => !s.is_final(),
            (JobAction::Hold, s) => matches!(s, JobState::Idle | JobState::Running),
            (JobAction::Release, s) => s == JobState::Held,
        };
        if !allowed {
            return Err(format!("job {id} is {}", state.as_str()));
        }
        if state == JobState::Running {
            self.release_resources(id, now);
        }
        self.unset_idle(id);
        let j = self.jobs.get_mut(&id).expect("checked above");
        let outcome = match (state, action) {
            (JobState::Running, JobAction::Rm) => format!("removed by {} while it ran", p.owner()),
            (JobState::Running, _) => format!("held by {} while it ran", p.owner()),
            _ => j.reason.clone().unwrap_or_else(|| state.as_str().to_string()),
        };
        j.end_attempt(now, outcome);
        j.node = None;
        j.vacating = false;
        match action {
            JobAction::Vacate => unreachable!("vacate is handled above"),
            JobAction::Rm => {
                let old = j.ck.take().and_then(|c| c.latest);
                // Its replicas' results are let go (their files are collected).
                j.votes.clear();
                j.state = JobState::Removed;
                j.reason = Some(format!("removed by {}", p.owner()));
                j.finished_ms = Some(now);
                self.finished(id);
                self.release(old, None, now);
            }
            JobAction::Hold => {
                j.state = JobState::Held;
                j.reason = Some(format!("held by {}", p.owner()));
            }
            JobAction::Release => {
                j.state = JobState::Idle;
                j.reason = None;
                j.result = None;
                j.losses = 0;
                j.retries = 0;
                j.finished_ms = None;
                self.set_idle(id);
                self.dirty = true;
                self.wake_nodes();
            }
        }
        self.blocked_since.remove(&id);
        self.persist(id, action == JobAction::Release);
        self.job_changed(id, now);
        Ok(self.view(&self.jobs[&id]))
    }

    /// Back to idle after a node failed the job, without consuming the job's retries; held after
    /// [`MAX_NODE_LOSSES`]. A process of a single-system image that reached its node is held
    /// instead: a rerun would repeat what it did.
    pub(super) fn requeue(&mut self, id: u64, now: u64, why: String) {
        // A job placed but never handed to its node has not been lost by anyone.
        let delivered = match self.jobs.get(&id).and_then(|j| j.node.clone()) {
            Some(node) => !self.nodes.get(&*node).is_some_and(|n| n.pending.contains(&id)),
            None => false,
        };
        self.release_resources(id, now);
        let Some(j) = self.jobs.get_mut(&id) else { return };
        if j.state != JobState::Running {
            return;
        }
        if delivered {
            j.losses += 1;
        } else {
            // A placement its node never collected was not an attempt.
            j.attempts = j.attempts.saturating_sub(1);
        }
        if delivered {
            j.end_attempt(now, why.clone());
        }
        let lost_node = j.node.take();
        // A job vacated before it started keeps away from that node for a while too.
        let avoid = std::mem::take(&mut j.vacating).then(|| lost_node.clone()).flatten();
        let ssi = self.specs.get(&j.spec_id).is_some_and(|s| s.spec.ssi.is_some());
        if delivered && ssi {
            j.state = JobState::Held;
            j.reason = Some(format!(
                "{why}: the process was lost with its node {}",
                lost_node.as_deref().unwrap_or("(unknown)")
            ));
            j.finished_ms = Some(now);
        } else if j.losses > MAX_NODE_LOSSES {
            j.state = JobState::Held;
            j.reason = Some(format!(
                "{why}; the job lost its node {} times, so it is held: `vmgrid release {id}` to try again",
                j.losses
            ));
            j.finished_ms = Some(now);
        } else {
            j.state = JobState::Idle;
            j.reason = Some(format!("requeued: {why}"));
            self.set_idle(id);
            self.dirty = true;
            self.wake_nodes();
        }
        if let Some(node) = avoid {
            self.avoid_for_a_while(id, &node, now);
        }
        self.persist(id, false);
        self.job_changed(id, now);
    }

    /// Frees what a job held on its node (its cpus and memory, its place in the node's queue) and
    /// in its user's running cpus.
    pub(super) fn release_resources(&mut self, id: u64, now: u64) {
        let Some(j) = self.jobs.get(&id) else { return };
        let (Some(node), Some(spec)) = (j.node.clone(), self.specs.get(&j.spec_id)) else { return };
        let (cpus, mem, owner) = (spec.spec.cpus, spec.spec.memory_mb, j.owner.clone());
        if let Some(n) = self.nodes.get_mut(&*node) {
            let held = n.jobs.remove(&id);
            let mut charged = false;
            if held {
                n.used_cpus = n.used_cpus.saturating_sub(cpus);
                n.used_memory_mb = n.used_memory_mb.saturating_sub(mem);
                let queued = n.uncharged.iter().position(|u| *u == id).and_then(|i| n.uncharged.remove(i));
                charged = queued.is_none();
                if charged {
                    n.charged_cpus = n.charged_cpus.saturating_sub(cpus);
                }
            }
            n.pending.retain(|p| *p != id);
            if held {
                self.user_stopped(&owner, cpus, charged, now);
                self.charge_queued(&node, now);
            }
        }
        self.dirty = true;
        self.wake_nodes();
    }

    /// Charges the jobs queued ahead on node `name` that its freed cpus can now run, in order.
    fn charge_queued(&mut self, name: &str, now: u64) {
        loop {
            let Some(n) = self.nodes.get(name) else { return };
            let Some(&id) = n.uncharged.front() else { return };
            let Some((cpus, owner)) =
                self.jobs.get(&id).and_then(|j| Some((self.specs.get(&j.spec_id)?.spec.cpus, j.owner.clone())))
            else {
                return;
            };
            if n.charged_cpus + cpus > n.ad.cpus {
                return;
            }
            let n = self.nodes.get_mut(name).expect("looked up above");
            n.uncharged.pop_front();
            n.charged_cpus += cpus;
            self.user_charged(&owner, cpus, now);
        }
    }

    /// Applies a node's reports; each is accepted only under the job's current lease.
    pub fn report(&mut self, name: &str, reports: Vec<Report>, now: u64) -> Result<ReportResponse, ApiError> {
        if let Err(e) = self.live_node(name, now) {
            self.metrics.results_refused += reports.len() as u64;
            return Err(e);
        }
        let mut resp = ReportResponse { accepted: Vec::new(), refused: Vec::new() };
        for r in reports {
            let l = r.lease;
            match self.stale_lease(name, l) {
                Some(why) => {
                    self.metrics.results_refused += 1;
                    self.event(Event::ResultRefused {
                        job: l.job_id,
                        epoch: l.epoch,
                        node: name.into(),
                        why: why.clone(),
                    });
                    resp.refused.push((l, why));
                }
                None => {
                    self.metrics.results_accepted += 1;
                    self.finish_run(l.job_id, plain_reason(r), now);
                    resp.accepted.push(l);
                }
            }
        }
        Ok(resp)
    }

    /// Why `l` is not the current lease of a job running on node `name`, if it is not.
    pub(super) fn stale_lease(&self, name: &str, l: LeaseId) -> Option<String> {
        match self.jobs.get(&l.job_id) {
            None => Some("no such job".to_string()),
            Some(j) if j.state == JobState::Running && j.epoch == l.epoch && j.node.as_deref() == Some(name) => None,
            Some(j) if j.epoch != l.epoch => {
                Some(format!("lease epoch {} is stale; the job is at epoch {}", l.epoch, j.epoch))
            }
            Some(j) => Some(format!("the job is {} on {}", j.state.as_str(), j.node.as_deref().unwrap_or("no node"))),
        }
    }

    fn finish_run(&mut self, id: u64, r: Report, now: u64) {
        let max_retries = self.specs.get(&self.jobs[&id].spec_id).map_or(0, |s| s.spec.max_retries);
        let node_name = self.jobs[&id].node.as_deref().unwrap_or("").to_string();
        if let RunReport::HostFailed { reason } = &r.run {
            return self.requeue(id, now, format!("node {node_name} could not run it: {reason}"));
        }
        if let RunReport::BadCheckpoint { reason } = &r.run {
            let given_up = self.resume_failed(id, &node_name, now).unwrap_or_default();
            self.requeue(id, now, format!("node {node_name} could not resume it: {reason}{given_up}"));
            // Another node tries it next, if one can.
            self.avoid_for_a_while(id, &node_name, now);
            return;
        }
        if let RunReport::Vacated { seq } = r.run {
            return self.vacated(id, seq, now);
        }
        if let Some(ended) = self.ended_as_vote(id, &r.run) {
            return self.vote(id, &node_name, ended, split_report(r).1, now);
        }
        self.release_resources(id, now);
        let j = self.jobs.get_mut(&id).expect("reported jobs exist");
        let (run, result) = split_report(r);
        j.result = Some(Box::new(result));
        let (retry, end) = match run {
            RunReport::Exited { code: 0 } => (None, (JobState::Completed, Some(0), None)),
            RunReport::Exited { code } => {
                (Some(format!("exited with {code}")), (JobState::Completed, Some(code), None))
            }
            RunReport::GuestFailed { failure, reason } => {
                (Some(reason.clone()), (JobState::Held, None, Some(format!("{failure}: {reason}"))))
            }
            RunReport::BadJob { reason } => (None, (JobState::Held, None, Some(format!("bad job: {reason}")))),
            RunReport::HostFailed { .. } | RunReport::BadCheckpoint { .. } | RunReport::Vacated { .. } => {
                unreachable!("handled above")
            }
        };
        // A retry is a new run from the beginning; a finished job needs no checkpoint (its last
        // attempt still says what it resumed from).
        let old = j.ck.as_deref_mut().and_then(|ck| ck.latest.take());
        j.vacating = false;
        match retry {
            Some(why) if j.retries < max_retries => {
                j.retries += 1;
                j.state = JobState::Idle;
                j.reason = Some(format!("{why}; retry {} of {max_retries}", j.retries));
                j.end_attempt(now, format!("{why}; retried"));
                j.node = None;
                self.set_idle(id);
                self.wake_nodes();
            }
            _ => {
                let (state, exit_code, reason) = end;
                j.state = state;
                j.exit_code = exit_code;
                j.reason = reason;
                j.finished_ms = Some(now);
                if state == JobState::Completed {
                    self.metrics.jobs_completed += 1;
                    self.finished(id);
                }
            }
        }
        self.release(old, None, now);
        self.persist(id, true);
        self.job_changed(id, now);
    }
}

impl Job {
    fn new(id: u64, spec_id: u64, index: u64, owner: Arc<str>, now: u64) -> Job {
        Job {
            id,
            spec_id,
            index,
            owner,
            state: JobState::Idle,
            node: None,
            epoch: 0,
            attempts: 0,
            retries: 0,
            losses: 0,
            exit_code: None,
            reason: None,
            submitted_ms: now,
            started_ms: None,
            finished_ms: None,
            lease_deadline_ms: 0,
            result: None,
            history: Vec::new(),
            counted: JobState::Idle,
            ck: None,
            votes: Vec::new(),
            vacating: false,
            avoid: None,
        }
    }
}

/// A report's outcome, and its files as the pool keeps them.
fn split_report(r: Report) -> (RunReport, StoredResult) {
    let files = StoredResult {
        stdout: r.stdout,
        stderr: r.stderr,
        stdout_dropped: r.stdout_dropped,
        stderr_dropped: r.stderr_dropped,
        outputs: r.outputs,
    };
    (r.run, files)
}

/// The longest reason a node's report may give; the rest is cut.
pub const MAX_REASON_CHARS: usize = 2000;

/// A node's reason as the pool keeps it: control characters but newlines and tabs (NUL among
/// them, which PostgreSQL's text refuses) as U+FFFD, and at most [`MAX_REASON_CHARS`].
fn plain_reason(mut r: Report) -> Report {
    let odd = |c: char| c.is_control() && c != '\n' && c != '\t';
    let clean = |s: &mut String| {
        if s.chars().count() > MAX_REASON_CHARS || s.chars().any(odd) {
            *s = s.chars().take(MAX_REASON_CHARS).map(|c| if odd(c) { '\u{fffd}' } else { c }).collect();
        }
    };
    match &mut r.run {
        RunReport::GuestFailed { reason, .. }
        | RunReport::BadJob { reason }
        | RunReport::HostFailed { reason }
        | RunReport::BadCheckpoint { reason } => clean(reason),
        RunReport::Exited { .. } | RunReport::Vacated { .. } => {}
    }
    r
}
