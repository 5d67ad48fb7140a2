//! Workflows (`vmgrid dag`): DAGs of jobs that live in the engine. A node's jobs are queued
//! (released) once all its parents are done (every job completed with exit 0), with the parents'
//! matching outputs as inputs, by their blobs; a node that fails is run again, as a whole, while
//! its `retries` last, then fails the workflow: the nodes after it are skipped, and the final node
//! runs once all others have ended. Progress is a function of the jobs' stored states
//! ([`Engine::advance_dag`] is idempotent), so a restart (`Engine::load`) picks it up where the
//! store left it, and a node's release is one store operation ([`Op::DagRelease`]): no node is
//! released twice.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use vmgrid_proto::*;

use super::{ApiError, Engine, Principal, cluster_of};
use crate::store::{DagNodeRow, DagRow, NodeRun, Op};

/// A workflow in memory.
pub(super) struct Dag {
    owner: Arc<str>,
    spec: DagSpec,
    index: HashMap<String, usize>,
    nodes: Vec<DagNode>,
    state: DagState,
    reason: Option<String>,
    submitted_ms: u64,
    finished_ms: Option<u64>,
    rescue_of: Option<u64>,
}

/// Where one node is: its runs so far and the jobs of the latest.
#[derive(Debug, Clone, PartialEq)]
struct DagNode {
    run: NodeRun,
    tries: u32,
    spec_id: Option<u64>,
    first_job: Option<u64>,
    reason: Option<String>,
    /// How many of the latest run's jobs, from the first, are known to have completed with exit
    /// code 0 (final, so never looked at again): a sweep's settling costs each job once.
    settled: Cell<u64>,
}

fn waiting() -> DagNode {
    DagNode { run: NodeRun::Waiting, tries: 0, spec_id: None, first_job: None, reason: None, settled: Cell::new(0) }
}

/// What a scan found to do for one node.
enum Step {
    Done(usize),
    Failed(usize, String),
    Release(usize),
    Skip(usize, String),
}

impl Dag {
    fn new(owner: Arc<str>, spec: DagSpec, nodes: Vec<DagNode>, now: u64, rescue_of: Option<u64>) -> Dag {
        let index = spec.nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
        Dag {
            owner,
            spec,
            index,
            nodes,
            state: DagState::Running,
            reason: None,
            submitted_ms: now,
            finished_ms: None,
            rescue_of,
        }
    }

    fn node_row(&self, dag_id: u64, i: usize) -> DagNodeRow {
        let n = &self.nodes[i];
        DagNodeRow {
            dag_id,
            idx: i as u32,
            state: n.run,
            tries: n.tries,
            spec_id: n.spec_id,
            first_job: n.first_job,
            reason: n.reason.clone(),
        }
    }

    fn jobs_of(&self, i: usize) -> std::ops::Range<u64> {
        match self.nodes[i].first_job {
            Some(first) => first..first + self.spec.nodes[i].count,
            None => 0..0,
        }
    }
}

impl Engine {
    /// Queues a workflow for the caller; returns its id. With `rescue`, the nodes (by name, with
    /// the same `count`) that were done in that ended workflow of the caller's are done here
    /// too, with their jobs and outputs, and are not run again; the final node runs again.
    pub fn submit_dag(&mut self, p: &Principal, spec: DagSpec, rescue: Option<u64>, now: u64) -> Result<u64, ApiError> {
        if matches!(p, Principal::Console { .. }) {
            return Err(ApiError::BadRequest("a console's credential submits only its SSI processes".into()));
        }
        spec.check().map_err(ApiError::BadRequest)?;
        for n in &spec.nodes {
            cluster_of(&n.job).map_err(|e| ApiError::BadRequest(format!("job `{}`: {e}", n.name)))?;
        }
        let owner = p.owner();
        let total: u64 = spec.nodes.iter().map(|n| n.count).sum();
        let queued = self.queued.get(owner).copied().unwrap_or(0);
        if queued + total > self.limits.max_queued_per_user {
            return Err(ApiError::Forbidden(format!(
                "{owner} has {queued} jobs queued and may have at most {}; this workflow has {total}",
                self.limits.max_queued_per_user
            )));
        }
        let mut nodes = vec![waiting(); spec.nodes.len()];
        if let Some(old_id) = rescue {
            self.rescued_nodes(p, old_id, &spec, &mut nodes)?;
        }
        let id = self.next_dag;
        self.next_dag += 1;
        let dag = Dag::new(Arc::from(owner), spec, nodes, now, rescue);
        let row = DagRow {
            id,
            owner: owner.into(),
            json: serde_json::to_string(&dag.spec).expect("a workflow serializes"),
            state: DagState::Running,
            reason: None,
            submitted_ms: now,
            finished_ms: None,
            rescue_of: rescue,
        };
        let rows = (0..dag.nodes.len()).map(|i| dag.node_row(id, i)).collect();
        self.store(Op::Dag { row, nodes: rows });
        self.dags.insert(id, dag);
        self.advance_dag(id, now);
        Ok(id)
    }

    /// Marks done, in `nodes`, what was done in workflow `old_id`.
    fn rescued_nodes(&self, p: &Principal, old_id: u64, spec: &DagSpec, nodes: &mut [DagNode]) -> Result<(), ApiError> {
        let old = self.dags.get(&old_id).ok_or_else(|| ApiError::NotFound(format!("no workflow {old_id}")))?;
        if !p.may_see(&old.owner) {
            return Err(ApiError::Forbidden(format!("workflow {old_id} belongs to {}", old.owner)));
        }
        if old.state == DagState::Running {
            return Err(ApiError::Conflict(format!(
                "workflow {old_id} is still running: wait for it to end, or `vmgrid dag rm {old_id}`, before rescuing it"
            )));
        }
        // Two rescues of one workflow would run its unfinished nodes twice.
        if let Some((by, _)) = self.dags.iter().find(|(_, d)| d.rescue_of == Some(old_id)) {
            return Err(ApiError::Conflict(format!(
                "workflow {old_id} was rescued already, by workflow {by}: rescue {by} if it did not complete"
            )));
        }
        for (i, n) in spec.nodes.iter().enumerate() {
            let Some(&j) = old.index.get(&n.name) else { continue };
            // The final node runs at the end of every workflow, a rescue included.
            if old.nodes[j].run == NodeRun::Done && old.spec.nodes[j].count == n.count && !n.final_node {
                nodes[i] = DagNode {
                    reason: Some(format!("done in workflow {old_id}")),
                    settled: Cell::new(0),
                    ..old.nodes[j].clone()
                };
            }
        }
        Ok(())
    }

    /// Called when job `id` changed state: its workflow, if it has one, moves on. Only the end
    /// of its node's run can change anything, so until then this costs one look at that node.
    pub(super) fn job_changed(&mut self, id: u64, now: u64) {
        let Some(j) = self.jobs.get(&id) else { return };
        if !matches!(j.state, JobState::Completed | JobState::Held | JobState::Removed) {
            return;
        }
        let Some(&(dag, i)) = self.dag_specs.get(&j.spec_id) else { return };
        let Some(d) = self.dags.get(&dag) else { return };
        let current = d.nodes[i].run == NodeRun::Released && d.nodes[i].spec_id == Some(j.spec_id);
        if d.state == DagState::Running && current && self.settle(d, i).is_some() {
            self.advance_dag(dag, now);
        }
    }

    /// Takes every step workflow `id` can take now: nodes whose jobs ended are done, retried or
    /// failed; nodes whose parents are done are released, those after a failure skipped; the
    /// final node is released once all others ended; and the workflow ends when every node has.
    pub(super) fn advance_dag(&mut self, id: u64, now: u64) {
        loop {
            let steps = match self.dags.get(&id) {
                Some(d) if d.state == DagState::Running => self.steps(d),
                _ => return,
            };
            if steps.is_empty() {
                break;
            }
            for s in steps {
                self.take_step(id, s, now);
            }
        }
        self.end_if_over(id, now);
    }

    fn steps(&self, d: &Dag) -> Vec<Step> {
        let others_ended = d.nodes.iter().zip(&d.spec.nodes).all(|(n, s)| s.final_node || n.run.ended());
        let mut steps = Vec::new();
        for (i, (n, s)) in d.nodes.iter().zip(&d.spec.nodes).enumerate() {
            match n.run {
                NodeRun::Released => match self.settle(d, i) {
                    Some(Ok(())) => steps.push(Step::Done(i)),
                    Some(Err(why)) => steps.push(Step::Failed(i, why)),
                    None => {}
                },
                NodeRun::Waiting if s.final_node && others_ended => steps.push(Step::Release(i)),
                NodeRun::Waiting if s.final_node => {}
                NodeRun::Waiting => {
                    let parents = s.after.iter().map(|a| (a, d.nodes[d.index[a]].run));
                    let mut all_done = true;
                    for (name, run) in parents {
                        match run {
                            NodeRun::Failed | NodeRun::Skipped => {
                                let was = if run == NodeRun::Failed { "failed" } else { "was skipped" };
                                steps.push(Step::Skip(i, format!("`{name}` {was}")));
                                all_done = false;
                                break;
                            }
                            NodeRun::Done => {}
                            _ => all_done = false,
                        }
                    }
                    if all_done {
                        steps.push(Step::Release(i));
                    }
                }
                _ => {}
            }
        }
        steps
    }

    /// Whether node `i`'s latest run is over: `None` while a job is idle or running, else
    /// whether every job completed with exit code 0 (and, if not, the first that did not).
    fn settle(&self, d: &Dag, i: usize) -> Option<Result<(), String>> {
        let mut failure = None;
        let settled = &d.nodes[i].settled;
        let jobs = d.jobs_of(i);
        for job in jobs.start + settled.get()..jobs.end {
            let why = match self.jobs.get(&job) {
                None => format!("job {job} is no longer in the pool"),
                Some(j) => match j.state {
                    JobState::Idle | JobState::Running => return None,
                    JobState::Completed if j.exit_code == Some(0) => {
                        if failure.is_none() && job == jobs.start + settled.get() {
                            settled.set(settled.get() + 1);
                        }
                        continue;
                    }
                    JobState::Completed => format!("job {job} exited with {}", j.exit_code.unwrap_or(-1)),
                    JobState::Held => {
                        format!("job {job} is held: {}", j.reason.as_deref().unwrap_or("no reason given"))
                    }
                    JobState::Removed => format!("job {job} was removed"),
                },
            };
            failure.get_or_insert(why);
        }
        Some(failure.map_or(Ok(()), Err))
    }

    fn take_step(&mut self, id: u64, step: Step, now: u64) {
        let (i, run, reason) = match step {
            Step::Done(i) => (i, NodeRun::Done, None),
            Step::Skip(i, why) => (i, NodeRun::Skipped, Some(why)),
            Step::Release(i) => {
                if let Err(why) = self.release_node(id, i, None, now) {
                    self.set_node(id, i, NodeRun::Failed, Some(why));
                }
                return;
            }
            Step::Failed(i, why) => {
                // What is left of the run (held jobs) goes, so it cannot run beside the next one.
                let leftovers: Vec<u64> = self.dags[&id].jobs_of(i).collect();
                for job in leftovers {
                    self.remove_job(job, format!("its workflow {id} node failed"), now);
                }
                let d = &self.dags[&id];
                let (tries, retries) = (d.nodes[i].tries, d.spec.nodes[i].retries);
                if tries <= retries {
                    let note = format!("run {tries} failed ({why}); retry {tries} of {retries}");
                    if let Err(e) = self.release_node(id, i, Some(note), now) {
                        self.set_node(id, i, NodeRun::Failed, Some(e));
                    }
                    return;
                }
                let why = if retries > 0 { format!("{why} (after {tries} runs)") } else { why };
                (i, NodeRun::Failed, Some(why))
            }
        };
        self.set_node(id, i, run, reason);
    }

    fn set_node(&mut self, id: u64, i: usize, run: NodeRun, reason: Option<String>) {
        let d = self.dags.get_mut(&id).expect("a known workflow");
        d.nodes[i].run = run;
        d.nodes[i].reason = reason;
        let row = d.node_row(id, i);
        self.store(Op::DagNode(row));
        self.wake_waiters();
    }

    /// Queues node `i`'s jobs, with its parents' matching outputs as inputs, in one store
    /// operation with the node's new row.
    fn release_node(&mut self, id: u64, i: usize, note: Option<String>, now: u64) -> Result<(), String> {
        let d = &self.dags[&id];
        let n = &d.spec.nodes[i];
        let mut spec = n.job.clone();
        for (parent, globs) in &n.inputs_from {
            let p = d.index[parent];
            let from_sweep = d.spec.nodes[p].count > 1;
            let mut matched = 0;
            for (k, job) in d.jobs_of(p).enumerate() {
                let outputs = match self.jobs.get(&job) {
                    Some(j) => j.result.as_ref().map(|r| r.outputs.as_slice()).unwrap_or_default(),
                    None => return Err(format!("the outputs of `{parent}` are gone: its job {job} was forgotten")),
                };
                for f in outputs.iter().filter(|f| matches_output(globs, &f.path)) {
                    let path =
                        if from_sweep { format!("{parent}/{k}/{}", f.path) } else { format!("{parent}/{}", f.path) };
                    spec.inputs.push(FileRef { path, blob: f.blob.clone(), size: f.size });
                    matched += 1;
                }
            }
            if matched == 0 {
                return Err(format!("no output of `{parent}` matches {}", globs.join(", ")));
            }
        }
        spec.check().map_err(|e| format!("its job with the inputs of its parents: {e}"))?;
        let cluster = cluster_of(&spec).map_err(|e| e.to_string())?;
        let (count, owner) = (n.count, d.owner.clone());
        let json = serde_json::to_string(&spec).expect("a spec serializes");
        let (spec_id, first) = self.add_jobs(&owner, spec, cluster, count, now);
        self.dag_specs.insert(spec_id, (id, i));
        let d = self.dags.get_mut(&id).expect("a known workflow");
        let node = &mut d.nodes[i];
        node.run = NodeRun::Released;
        node.tries += 1;
        node.spec_id = Some(spec_id);
        node.first_job = Some(first);
        node.settled.set(0);
        node.reason = note;
        let row = d.node_row(id, i);
        self.store(Op::DagRelease { node: row, spec_id, owner: owner.to_string(), json, count, submitted_ms: now });
        self.wake_waiters();
        Ok(())
    }

    /// The workflow ends once every node has: completed if all are done, else failed with the
    /// first failure's reason.
    fn end_if_over(&mut self, id: u64, now: u64) {
        let Some(d) = self.dags.get_mut(&id) else { return };
        if d.state != DagState::Running || !d.nodes.iter().all(|n| n.run.ended()) {
            return;
        }
        let failed = d.nodes.iter().zip(&d.spec.nodes).find(|(n, _)| n.run == NodeRun::Failed);
        match failed {
            None => d.state = DagState::Completed,
            Some((n, s)) => {
                d.state = DagState::Failed;
                d.reason =
                    Some(format!("job `{}` failed: {}", s.name, n.reason.as_deref().unwrap_or("no reason given")));
            }
        }
        d.finished_ms = Some(now);
        let op = Op::DagState { id, state: d.state, reason: d.reason.clone(), finished_ms: d.finished_ms };
        self.store(op);
        self.wake_waiters();
    }

    /// Removes a running workflow (its owner or an admin): its queued and running jobs are
    /// removed, its waiting nodes skipped; the final node does not run.
    pub fn dag_rm(&mut self, p: &Principal, id: u64, now: u64) -> Result<DagView, ApiError> {
        let d = self.dags.get(&id).ok_or_else(|| ApiError::NotFound(format!("no workflow {id}")))?;
        if !p.may_see(&d.owner) {
            return Err(ApiError::Forbidden(format!("workflow {id} belongs to {}, not {}", d.owner, p.owner())));
        }
        if d.state != DagState::Running {
            return Err(ApiError::Conflict(format!("workflow {id} is {} already", d.state.as_str())));
        }
        let why = format!("removed by {}", p.owner());
        for i in 0..d.nodes.len() {
            let d = &self.dags[&id];
            match d.nodes[i].run {
                NodeRun::Released => {
                    let jobs: Vec<u64> = d.jobs_of(i).collect();
                    for job in jobs {
                        self.remove_job(job, format!("its workflow {id} was {why}"), now);
                    }
                    self.set_node(id, i, NodeRun::Failed, Some(format!("the workflow was {why}")));
                }
                NodeRun::Waiting => self.set_node(id, i, NodeRun::Skipped, Some(format!("the workflow was {why}"))),
                _ => {}
            }
        }
        let d = self.dags.get_mut(&id).expect("checked above");
        d.state = DagState::Removed;
        d.reason = Some(why);
        d.finished_ms = Some(now);
        let op = Op::DagState { id, state: d.state, reason: d.reason.clone(), finished_ms: d.finished_ms };
        self.store(op);
        self.wake_waiters();
        self.dag_view(p, id)
    }

    /// Removes job `id` if it has not ended (idle, running or held), with `reason`.
    fn remove_job(&mut self, id: u64, reason: String, now: u64) {
        let Some(state) = self.jobs.get(&id).map(|j| j.state) else { return };
        if state.is_final() {
            return;
        }
        if state == JobState::Running {
            self.release_resources(id, now);
        }
        self.unset_idle(id);
        let j = self.jobs.get_mut(&id).expect("checked above");
        j.node = None;
        j.state = JobState::Removed;
        j.reason = Some(reason);
        j.finished_ms = Some(now);
        self.finished(id);
        self.persist(id, false);
    }

    /// The files of running workflows' jobs (their nodes not yet released need them later).
    pub(super) fn dag_blobs(&self) -> impl Iterator<Item = &str> {
        self.dags.values().filter(|d| d.state == DagState::Running).flat_map(|d| {
            d.spec.nodes.iter().flat_map(|n| {
                let s = &n.job;
                s.image.iter().chain(&s.kernel).chain(&s.initrd).chain(&s.inputs).map(|f| f.blob.as_str())
            })
        })
    }

    /// The specs of the runs (latest, or done) of running workflows' nodes.
    pub(super) fn running_dag_specs(&self) -> std::collections::HashSet<u64> {
        let running = self.dags.values().filter(|d| d.state == DagState::Running);
        running.flat_map(|d| d.nodes.iter().filter_map(|n| n.spec_id)).collect()
    }

    /// Drops workflows that ended before `keep_from` (their jobs go by their own retention).
    pub(super) fn expire_dags(&mut self, keep_from: u64) {
        let old: Vec<u64> = self
            .dags
            .iter()
            .filter(|(_, d)| d.state != DagState::Running && d.finished_ms.is_some_and(|f| f < keep_from))
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.dags.remove(&id);
            self.dag_specs.retain(|_, (dag, _)| *dag != id);
            self.store(Op::DeleteDag { id });
        }
    }
}

mod load;
mod views;

#[cfg(test)]
mod tests;
