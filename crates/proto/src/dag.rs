//! Workflows on the wire: a DAG of jobs as submitted (`POST /v1/dags`), checked by the one
//! validator (each job by [`JobSpec::check`], the shape by `vmgrid_job::check::check_dag`), and
//! as `vmgrid dag status` shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::JobSpec;

/// One node of a workflow: a job (a sweep of `count` instances) and how it joins the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DagNodeSpec {
    pub name: String,
    pub job: JobSpec,
    #[serde(default = "one")]
    pub count: u64,
    #[serde(default)]
    pub after: Vec<String>,
    /// Parent → globs over its outputs; the matching files (by their blobs in the pool) become
    /// inputs of this node's jobs, at `PARENT/PATH` (`PARENT/INDEX/PATH` for a sweep).
    #[serde(default)]
    pub inputs_from: BTreeMap<String, Vec<String>>,
    /// Runs of the node as a whole after a failed one.
    #[serde(default)]
    pub retries: u32,
    /// Runs once every other node has ended, on success or failure.
    #[serde(default, rename = "final")]
    pub final_node: bool,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DagSpec {
    pub name: String,
    pub nodes: Vec<DagNodeSpec>,
}

impl DagSpec {
    /// Every job passes the rules of jobs, and the workflow the rules of workflows; each refusal
    /// names its node.
    pub fn check(&self) -> Result<(), String> {
        vmgrid_job::check::check_name(&self.name).map_err(|m| format!("the workflow's {m}"))?;
        vmgrid_job::check::check_dag(&self.shapes()).map_err(|inv| inv.message)?;
        for n in &self.nodes {
            if n.job.ssi.is_some() {
                return Err(format!("job `{}`: `ssi` is set by the pool; a workflow's job cannot set it", n.name));
            }
            if n.job.group.is_some() {
                return Err(format!(
                    "job `{}`: a workflow's job cannot be a job group (`group`): submit a group with `vmgrid submit --count N --group`",
                    n.name
                ));
            }
            n.job.check().map_err(|m| format!("job `{}`: {m}", n.name))?;
        }
        Ok(())
    }

    fn shapes(&self) -> Vec<vmgrid_job::check::DagNode<'_>> {
        self.nodes
            .iter()
            .map(|n| vmgrid_job::check::DagNode {
                name: &n.name,
                after: &n.after,
                count: i64::try_from(n.count).unwrap_or(i64::MAX),
                inputs_from: &n.inputs_from,
                retries: n.retries.into(),
                final_node: n.final_node,
                inputs: n.job.inputs.iter().map(|f| f.path.as_str()).collect(),
            })
            .collect()
    }
}

/// `POST /v1/dags`. With `rescue`, the nodes that completed in that (ended) workflow are not
/// run again: they count as done, with their jobs and outputs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DagSubmitRequest {
    pub dag: DagSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescue: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DagState {
    Running,
    Completed,
    Failed,
    Removed,
}

impl DagState {
    pub fn as_str(self) -> &'static str {
        match self {
            DagState::Running => "running",
            DagState::Completed => "completed",
            DagState::Failed => "failed",
            DagState::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<DagState> {
        [DagState::Running, DagState::Completed, DagState::Failed, DagState::Removed]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DagNodeState {
    /// Its parents have not all completed yet.
    Waiting,
    /// Released: its jobs are queued, none running.
    Idle,
    Running,
    Done,
    Failed,
    /// Not run: a node it depends on failed, or the workflow was removed.
    Skipped,
}

impl DagNodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            DagNodeState::Waiting => "waiting",
            DagNodeState::Idle => "idle",
            DagNodeState::Running => "running",
            DagNodeState::Done => "done",
            DagNodeState::Failed => "failed",
            DagNodeState::Skipped => "skipped",
        }
    }
}

/// One node as `vmgrid dag status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DagNodeView {
    pub name: String,
    pub state: DagNodeState,
    /// Runs of the node so far (0 before it is released); at most 1 + `retries`.
    pub tries: u32,
    pub retries: u32,
    pub count: u64,
    /// The jobs of its latest run (or, for a node done in the workflow it rescues, of that run).
    pub jobs: Vec<u64>,
    /// Of those, how many completed with exit code 0.
    pub jobs_done: u64,
    pub after: Vec<String>,
    #[serde(rename = "final")]
    pub final_node: bool,
    pub reason: Option<String>,
}

/// A workflow in the list `vmgrid dag status` (without an id) prints: `GET /v1/dags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DagSummary {
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub state: DagState,
    pub reason: Option<String>,
    pub done: u64,
    pub total: u64,
    pub rescue_of: Option<u64>,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
}

/// A workflow as `vmgrid dag status ID --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DagView {
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub state: DagState,
    /// Why it failed or was removed.
    pub reason: Option<String>,
    /// Nodes done, of all nodes.
    pub done: u64,
    pub total: u64,
    pub nodes: Vec<DagNodeView>,
    /// The workflow this one rescues, if any.
    pub rescue_of: Option<u64>,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
}
