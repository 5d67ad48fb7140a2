//! Workflows (`vmgrid dag`): DAGs of jobs that live in the engine. A node's jobs are queued
//! (released) once all its parents are done (every job completed with exit 0), with the parents'
//! matching outputs as inputs, by their blobs; a node that fails is run again, as a whole, while
//! its `retries` last, then fails the workflow: the nodes after it are skipped, and the final node
//! runs once all others have ended. Progress is a function of the jobs' stored states
//! ([`Engine::advance_dag`] is idempotent), so a restart (`Engine::load`) picks it up where the
//! store left it, and a node's release is one store operation ([`Op::DagRelease`]): no node is
//! released twice.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use vmgrid_proto::*;

use super::{ApiError, Engine, Principal, cluster_of};
use crate::store::{DagNodeRow, DagRow, NodeRun, Op};
use settle::Progress;

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
    // Derived from the spec and the nodes' runs (rebuilt, never stored), so that a node's end
    // costs its children, not a look at every node:
    /// Each node's children (the nodes with it in `after`), each once.
    children: Vec<Vec<usize>>,
    /// How many of each node's distinct parents are not done.
    pending: Vec<usize>,
    final_idx: Option<usize>,
    /// How many nodes other than the final one have not ended.
    open: usize,
    /// Looks at nodes and jobs taken so far: what moving it on cost (its bounds are tested).
    work: std::cell::Cell<u64>,
}

/// Where one node is: its runs so far and the jobs of the latest.
#[derive(Debug, Clone, PartialEq)]
struct DagNode {
    run: NodeRun,
    tries: u32,
    spec_id: Option<u64>,
    first_job: Option<u64>,
    reason: Option<String>,
    /// How far the latest run's jobs were looked at (not stored: a restart looks again).
    progress: RefCell<Progress>,
}

fn waiting() -> DagNode {
    DagNode {
        run: NodeRun::Waiting,
        tries: 0,
        spec_id: None,
        first_job: None,
        reason: None,
        progress: RefCell::default(),
    }
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
        let index: HashMap<String, usize> = spec.nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
        let mut children = vec![Vec::new(); nodes.len()];
        let mut pending = vec![0; nodes.len()];
        for (i, s) in spec.nodes.iter().enumerate() {
            let mut parents: Vec<usize> = s.after.iter().filter_map(|a| index.get(a).copied()).collect();
            parents.sort_unstable();
            parents.dedup();
            for p in parents {
                children[p].push(i);
                pending[i] += usize::from(nodes[p].run != NodeRun::Done);
            }
        }
        let final_idx = spec.nodes.iter().position(|s| s.final_node);
        let open = nodes.iter().zip(&spec.nodes).filter(|(n, s)| !s.final_node && !n.run.ended()).count();
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
            children,
            pending,
            final_idx,
            open,
            work: Default::default(),
        }
    }

    /// Node `i`'s run went from `was` to what it is now: its children and the final node learn.
    fn moved(&mut self, i: usize, was: NodeRun) {
        let run = self.nodes[i].run;
        if run == NodeRun::Done && was != NodeRun::Done {
            for &c in &self.children[i] {
                self.pending[c] = self.pending[c].saturating_sub(1);
            }
        }
        if run.ended() && !was.ended() && !self.spec.nodes[i].final_node {
            self.open = self.open.saturating_sub(1);
        }
    }

    /// The jobs of the nodes still waiting: what the workflow will queue (its owner's reserve).
    fn reserved(&self) -> u64 {
        let waiting = self.nodes.iter().zip(&self.spec.nodes).filter(|(n, _)| n.run == NodeRun::Waiting);
        waiting.map(|(_, s)| s.count).sum()
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
        let mut nodes = vec![waiting(); spec.nodes.len()];
        if let Some(old_id) = rescue {
            self.rescued_nodes(p, old_id, &spec, &mut nodes)?;
        }
        let dag = Dag::new(Arc::from(owner), spec, nodes, now, rescue);
        // The jobs a workflow will queue count against its owner's queue from the start (its
        // nodes' jobs are queued later, unchecked), as the jobs of running workflows do.
        let (total, queued) = (dag.reserved(), self.queued_and_reserved(owner));
        if queued + total > self.limits.max_queued_per_user {
            return Err(ApiError::Forbidden(format!(
                "{owner} has {queued} jobs queued (counting those of running workflows) and may have at most {}; this workflow has {total}",
                self.limits.max_queued_per_user
            )));
        }
        self.reserve(&dag.owner, total, true);
        let id = self.next_dag;
        self.next_dag += 1;
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
        let old = self.dags.get(&old_id).filter(|d| p.may_see(&d.owner));
        let old = old.ok_or_else(|| ApiError::NotFound(format!("no workflow {old_id}")))?;
        // The rescue runs as the one who submits it: another's (an admin's) would take the
        // workflow's only rescue from its owner, and run its jobs as someone else.
        if p.owner() != &*old.owner {
            return Err(ApiError::Forbidden(format!(
                "workflow {old_id} belongs to {}: only its owner rescues it",
                old.owner
            )));
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
            // The final node runs at the end of every workflow, a rescue included. A done node
            // whose jobs (its outputs) the pool has forgotten since runs again.
            let intact = || {
                old.jobs_of(j).all(|job| {
                    self.jobs.get(&job).is_some_and(|x| x.state == JobState::Completed && x.exit_code == Some(0))
                })
            };
            if old.nodes[j].run == NodeRun::Done && old.spec.nodes[j].count == n.count && !n.final_node && intact() {
                nodes[i] = DagNode {
                    reason: Some(format!("done in workflow {old_id}")),
                    progress: RefCell::default(),
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
            self.advance(dag, VecDeque::from([(i, None)]), now);
        }
    }

    /// Takes every step workflow `id` can take now: nodes whose jobs ended are done, retried or
    /// failed; nodes whose parents are done are released, those after a failure skipped; the
    /// final node is released once all others ended; and the workflow ends when every node has.
    pub(super) fn advance_dag(&mut self, id: u64, now: u64) {
        let Some(d) = self.dags.get(&id) else { return };
        let all = (0..d.nodes.len()).map(|i| (i, None)).collect();
        self.advance(id, all, now);
    }

    /// Looks at the nodes of `work` (each with the parent whose end put it there), in order;
    /// a node that ends puts its children there, and the final node once all others ended. So
    /// a failure skips a whole chain in one call, and each node and edge costs about once.
    fn advance(&mut self, id: u64, mut work: VecDeque<(usize, Option<usize>)>, now: u64) {
        while let Some((i, cause)) = work.pop_front() {
            let step = match self.dags.get(&id) {
                Some(d) if d.state == DagState::Running => self.step(d, i, cause),
                _ => return,
            };
            let Some(step) = step else { continue };
            self.take_step(id, step, now);
            let d = &self.dags[&id];
            if d.nodes[i].run.ended() {
                work.extend(d.children[i].iter().map(|&c| (c, Some(i))));
                if let Some(f) = d.final_idx.filter(|&f| f != i && d.open == 0) {
                    work.push_back((f, None));
                }
            }
        }
        self.end_if_over(id, now);
    }

    /// What node `i` can do now, if anything. `cause` is the parent whose end asked; without
    /// one, every parent is looked at.
    fn step(&self, d: &Dag, i: usize, cause: Option<usize>) -> Option<Step> {
        d.work.set(d.work.get() + 1);
        let (n, s) = (&d.nodes[i], &d.spec.nodes[i]);
        match n.run {
            NodeRun::Released => match self.settle(d, i)? {
                Ok(()) => Some(Step::Done(i)),
                Err(why) => Some(Step::Failed(i, why)),
            },
            NodeRun::Waiting if s.final_node => (d.open == 0).then_some(Step::Release(i)),
            NodeRun::Waiting => {
                let blocks = |p: &usize| matches!(d.nodes[*p].run, NodeRun::Failed | NodeRun::Skipped);
                let blocked = match cause {
                    Some(p) => Some(p).filter(blocks),
                    None => s.after.iter().map(|a| d.index[a]).find(blocks),
                };
                match blocked {
                    Some(p) => {
                        let was = if d.nodes[p].run == NodeRun::Failed { "failed" } else { "was skipped" };
                        Some(Step::Skip(i, format!("`{}` {was}", d.spec.nodes[p].name)))
                    }
                    None => (d.pending[i] == 0).then_some(Step::Release(i)),
                }
            }
            _ => None,
        }
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
        let was = d.nodes[i].run;
        d.nodes[i].run = run;
        d.nodes[i].reason = reason;
        d.moved(i, was);
        let row = d.node_row(id, i);
        if was == NodeRun::Waiting {
            let (owner, count) = (d.owner.clone(), d.spec.nodes[i].count);
            self.reserve(&owner, count, false);
        }
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
                    spec.inputs.push(FileRef { path, blob: f.blob.clone(), size: f.size, inline: None });
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
        if d.nodes[i].run == NodeRun::Waiting {
            self.reserve(&owner, count, false);
        }
        let json = serde_json::to_string(&spec).expect("a spec serializes");
        let (spec_id, first) = self.add_jobs(&owner, spec, cluster, count, now);
        self.dag_specs.insert(spec_id, (id, i));
        let d = self.dags.get_mut(&id).expect("a known workflow");
        let node = &mut d.nodes[i];
        node.run = NodeRun::Released;
        node.tries += 1;
        node.spec_id = Some(spec_id);
        node.first_job = Some(first);
        *node.progress.get_mut() = Progress::default();
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
        let final_open = d.final_idx.is_some_and(|f| !d.nodes[f].run.ended());
        if d.state != DagState::Running || d.open > 0 || final_open {
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
        self.dag_ended(id);
        self.wake_waiters();
    }

    /// Removes a running workflow (its owner or an admin): its queued and running jobs are
    /// removed, its waiting nodes skipped; the final node does not run.
    pub fn dag_rm(&mut self, p: &Principal, id: u64, now: u64) -> Result<DagView, ApiError> {
        let d = self.dags.get(&id).filter(|d| p.may_see(&d.owner));
        let d = d.ok_or_else(|| ApiError::NotFound(format!("no workflow {id}")))?;
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
        self.dag_ended(id);
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
        let outcome = match state {
            JobState::Running => format!("{reason} while it ran"),
            _ => j.reason.clone().unwrap_or_else(|| state.as_str().to_string()),
        };
        j.end_attempt(now, outcome);
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

    /// The specs of the runs (latest, or done) of running workflows' nodes → the workflow.
    pub(super) fn running_dag_specs(&self) -> HashMap<u64, u64> {
        let running = self.dags.iter().filter(|(_, d)| d.state == DagState::Running);
        running.flat_map(|(&id, d)| d.nodes.iter().filter_map(move |n| n.spec_id.map(|s| (s, id)))).collect()
    }

    /// How many jobs `owner` has queued, and will queue for the nodes of their running workflows.
    pub(super) fn queued_and_reserved(&self, owner: &str) -> u64 {
        self.queued.get(owner).copied().unwrap_or(0) + self.dag_reserved.get(owner).copied().unwrap_or(0)
    }

    /// Adds (`more`) or takes back `count` jobs of `owner`'s workflows' reserve.
    pub(super) fn reserve(&mut self, owner: &Arc<str>, count: u64, more: bool) {
        let r = self.dag_reserved.entry(owner.clone()).or_default();
        *r = if more { *r + count } else { r.saturating_sub(count) };
        if *r == 0 {
            self.dag_reserved.remove(owner);
        }
    }

    /// Workflow `id` ended: the finished jobs kept for it go back to the retention index.
    fn dag_ended(&mut self, id: u64) {
        if let Some(kept) = self.kept_for_dags.remove(&id) {
            self.final_by_time.extend(kept);
        }
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
mod settle;
mod views;

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod review3_tests;
#[cfg(test)]
mod tests;
