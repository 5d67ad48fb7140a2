//! Workflows as `vmgrid dag status` shows them: one with its nodes, or the list.

use vmgrid_proto::*;

use super::{Dag, NodeRun};
use crate::engine::{ApiError, Engine, Principal};

impl Engine {
    /// The workflows `p` may see, in id order.
    pub fn dag_list(&self, p: &Principal) -> Vec<DagSummary> {
        let visible = self.dags.iter().filter(|(_, d)| p.may_see(&d.owner));
        visible
            .map(|(&id, d)| DagSummary {
                id,
                name: d.spec.name.clone(),
                owner: d.owner.to_string(),
                state: d.state,
                reason: d.reason.clone(),
                done: d.nodes.iter().filter(|n| n.run == NodeRun::Done).count() as u64,
                total: d.nodes.len() as u64,
                rescue_of: d.rescue_of,
                submitted_ms: d.submitted_ms,
                finished_ms: d.finished_ms,
            })
            .collect()
    }

    /// Workflow `id` as `vmgrid dag status` shows it, if `p` may see it.
    pub fn dag_view(&self, p: &Principal, id: u64) -> Result<DagView, ApiError> {
        let d = self.dags.get(&id).filter(|d| p.may_see(&d.owner));
        let d = d.ok_or_else(|| ApiError::NotFound(format!("no workflow {id}")))?;
        let nodes: Vec<DagNodeView> = (0..d.nodes.len()).map(|i| self.node_view(d, i)).collect();
        Ok(DagView {
            id,
            name: d.spec.name.clone(),
            owner: d.owner.to_string(),
            state: d.state,
            reason: d.reason.clone(),
            done: nodes.iter().filter(|n| n.state == DagNodeState::Done).count() as u64,
            total: nodes.len() as u64,
            nodes,
            rescue_of: d.rescue_of,
            submitted_ms: d.submitted_ms,
            finished_ms: d.finished_ms,
        })
    }

    fn node_view(&self, d: &Dag, i: usize) -> DagNodeView {
        let (n, s) = (&d.nodes[i], &d.spec.nodes[i]);
        let jobs: Vec<u64> = d.jobs_of(i).collect();
        let states: Vec<&crate::engine::Job> = jobs.iter().filter_map(|j| self.jobs.get(j)).collect();
        let state = match n.run {
            NodeRun::Waiting => DagNodeState::Waiting,
            NodeRun::Released if states.iter().any(|j| j.state == JobState::Running) => DagNodeState::Running,
            NodeRun::Released => DagNodeState::Idle,
            NodeRun::Done => DagNodeState::Done,
            NodeRun::Failed => DagNodeState::Failed,
            NodeRun::Skipped => DagNodeState::Skipped,
        };
        DagNodeView {
            name: s.name.clone(),
            state,
            tries: n.tries,
            retries: s.retries,
            count: s.count,
            jobs_done: states.iter().filter(|j| j.state == JobState::Completed && j.exit_code == Some(0)).count()
                as u64,
            jobs,
            after: s.after.clone(),
            final_node: s.final_node,
            reason: n.reason.clone(),
        }
    }
}
