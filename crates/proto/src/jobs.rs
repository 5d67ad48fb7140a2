//! Jobs as the API shows them: a job's view, a page of them, its results and attempts, and the
//! actions on jobs.

use serde::{Deserialize, Serialize};
use vmgrid_job::VmType;

use crate::{FileRef, JobSpec, JobState};

/// One job as `q` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub state: JobState,
    pub node: Option<String>,
    pub exit_code: Option<i32>,
    pub attempts: u32,
    pub reason: Option<String>,
    pub vm_type: VmType,
    pub index: u64,
    pub submitted_ms: u64,
    /// When it last started: placed on its node (its cpus are held from then).
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
}

/// One page of the job list, in id order: `GET /v1/jobs?after=ID&limit=N&state=S`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `after` for the next page; `None` on the last one. A page looks at a bounded
    /// number of jobs, so under a filter it may hold fewer than asked (even none) and still have
    /// a next one.
    pub next_after: Option<u64>,
}

/// The most jobs one page holds.
pub const MAX_PAGE: usize = 10_000;

/// A finished job's results: what `logs` and `fetch` read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    pub job: JobView,
    pub stdout: Option<FileRef>,
    pub stderr: Option<FileRef>,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub outputs: Vec<FileRef>,
    /// Its attempts, oldest first: where each ran and how it ended; the last is the current or
    /// latest one. At most [`MAX_PAST_ATTEMPTS`] ended attempts before it are kept.
    #[serde(default)]
    pub history: Vec<AttemptView>,
    /// The job as submitted (an SSI process's capability token left out); none if its spec
    /// could not be read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
    /// A QEMU job's latest complete checkpoint (`checkpoint_s`): its number, and the seconds the
    /// guest had run when it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointView {
    pub seq: u64,
    pub guest_s: f64,
    /// The guest's console (its stdout) up to the checkpoint: a running job's output so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<FileRef>,
}

/// One attempt of a job: the node it ran on and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// Its number: 1 for the job's first run.
    pub attempt: u32,
    pub node: String,
    pub started_ms: Option<u64>,
    /// `None` while it runs.
    pub ended_ms: Option<u64>,
    /// How it ended (`running` while it runs): `exited with 0`, the node lost, held by a user...
    pub outcome: String,
    /// The checkpoint this attempt resumed from (its `seq`), if it did not start from the
    /// beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
}

/// The most ended attempts of one job the pool keeps (the oldest are forgotten first).
pub const MAX_PAST_ATTEMPTS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobAction {
    Rm,
    Hold,
    Release,
    /// A running job with checkpoints: checkpoint it now and resume it on another node.
    Vacate,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: JobAction,
    /// At most [`MAX_ACTION_IDS`] (the client sends more in several requests).
    #[schema(max_items = 10000)]
    pub ids: Vec<u64>,
}

/// The most job ids one `POST /v1/jobs/actions` acts on (the engine's lock is held meanwhile).
pub const MAX_ACTION_IDS: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActionResponse {
    pub changed: Vec<JobView>,
    /// Ids that could not be changed, with why.
    pub refused: Vec<(u64, String)>,
}
