//! Durable state behind a [`Store`] trait, with SQLite ([`sqlite::SqliteStore`]) as the embedded
//! implementation. One writer thread applies operations in order and commits them in groups:
//! every operation queued while a commit runs goes into the next transaction, so a burst of
//! submits or reports costs one fsync, not one each. Callers wait for the commit of their ticket
//! before they acknowledge anything.

mod hold;
pub mod postgres;
pub mod sqlite;

pub use hold::{HOLD_MAX, Hold};

use std::sync::{Arc, Mutex, mpsc};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vmgrid_proto::{DagState, FileRef, JobState, NodeState};

/// The role a token grants, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    Pool,
    Node,
    User,
    Admin,
    /// A `vmgrid ssi` console: the home of the processes it submits.
    Console,
}

impl TokenRole {
    pub const ALL: [TokenRole; 5] =
        [TokenRole::Pool, TokenRole::Node, TokenRole::User, TokenRole::Admin, TokenRole::Console];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Pool => "pool",
            TokenRole::Node => "node",
            TokenRole::User => "user",
            TokenRole::Admin => "admin",
            TokenRole::Console => "console",
        }
    }

    pub fn parse(s: &str) -> Option<TokenRole> {
        TokenRole::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A token as stored: its hash (never the token), what it grants and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: String,
    /// A short name for listing and revoking.
    pub id: String,
    pub role: TokenRole,
    pub owner: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    /// For a console: the home URL the pool gave it.
    pub detail: Option<String>,
}

/// A finished run's files: what `logs` and `fetch` read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    pub stdout: Option<FileRef>,
    pub stderr: Option<FileRef>,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub outputs: Vec<FileRef>,
}

/// One durable change.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Token(TokenRow),
    RevokeToken {
        hash: String,
    },
    Spec {
        id: u64,
        owner: String,
        json: String,
    },
    Jobs {
        spec_id: u64,
        first_id: u64,
        count: u64,
        owner: String,
        submitted_ms: u64,
    },
    Job(Box<JobRow>),
    Node {
        name: String,
        ad_json: String,
        cred_hash: String,
        state: NodeState,
    },
    DeleteNode {
        name: String,
    },
    /// A finished job past its retention, and a spec no job uses any more.
    DeleteJob {
        id: u64,
    },
    DeleteSpec {
        id: u64,
    },
    /// A blob and the user charged for it.
    Blob {
        hash: String,
        owner: String,
        size: u64,
        created_ms: u64,
    },
    DeleteBlob {
        hash: String,
    },
    /// A workflow and its nodes, as submitted.
    Dag {
        row: DagRow,
        nodes: Vec<DagNodeRow>,
    },
    DagState {
        id: u64,
        state: DagState,
        reason: Option<String>,
        finished_ms: Option<u64>,
    },
    DagNode(DagNodeRow),
    /// An ended workflow past its retention, with its nodes.
    DeleteDag {
        id: u64,
    },
    /// A workflow node released: its spec, its jobs (`node.first_job`, `count` of them) and the
    /// node's row, in one operation so that no commit holds the jobs without the node knowing
    /// them (a node is never released twice, even across a crash).
    DagRelease {
        node: DagNodeRow,
        spec_id: u64,
        owner: String,
        json: String,
        count: u64,
        submitted_ms: u64,
    },
    /// A user's decayed usage (cpu-seconds) as of `at_ms`.
    UserUsage {
        user: String,
        usage_cpu_s: f64,
        at_ms: u64,
    },
    /// What an admin set for a user.
    UserSettings {
        user: String,
        factor: f64,
        max_cpus: Option<u64>,
    },
    /// A closed minute of the pool's last hour (the dashboard's chart), replacing any stored one.
    Sample(crate::history::Sample),
    /// Forgets the minutes before this one.
    PruneSamples {
        before_ms: u64,
    },
    /// A node's record of agreements and whether it is banned, replacing any stored one.
    Trust {
        name: String,
        trust: Trust,
    },
}

/// A workflow's row: its spec (JSON of a `DagSpec`) and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct DagRow {
    pub id: u64,
    pub owner: String,
    pub json: String,
    pub state: DagState,
    pub reason: Option<String>,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
    pub rescue_of: Option<u64>,
}

/// Where a workflow node is, as stored; idle and running are read from its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRun {
    Waiting,
    Released,
    Done,
    Failed,
    Skipped,
}

impl NodeRun {
    pub const ALL: [NodeRun; 5] =
        [NodeRun::Waiting, NodeRun::Released, NodeRun::Done, NodeRun::Failed, NodeRun::Skipped];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeRun::Waiting => "waiting",
            NodeRun::Released => "released",
            NodeRun::Done => "done",
            NodeRun::Failed => "failed",
            NodeRun::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<NodeRun> {
        NodeRun::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Done, failed or skipped: it will not run (again) in this workflow.
    pub fn ended(self) -> bool {
        matches!(self, NodeRun::Done | NodeRun::Failed | NodeRun::Skipped)
    }
}

/// One node of a workflow (`idx` in its spec's order), its runs so far and its latest jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct DagNodeRow {
    pub dag_id: u64,
    pub idx: u32,
    pub state: NodeRun,
    pub tries: u32,
    pub spec_id: Option<u64>,
    pub first_job: Option<u64>,
    pub reason: Option<String>,
}

/// A user's fair-share state as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUser {
    pub user: String,
    pub usage_cpu_s: f64,
    pub usage_at_ms: u64,
    pub factor: f64,
    pub max_cpus: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub hash: String,
    pub owner: String,
    pub size: u64,
    pub created_ms: u64,
}

/// A job's mutable columns.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: u64,
    pub state: JobState,
    pub node: Option<String>,
    pub epoch: u64,
    pub attempts: u32,
    pub retries: u32,
    pub losses: u32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub result: Option<StoredResult>,
    /// Write `result` as it is (clearing it when None); otherwise leave the column alone.
    pub set_result: bool,
    /// The attempts that ended before the latest one, oldest first (stored as JSON, NULL when none).
    pub history: Vec<vmgrid_proto::AttemptView>,
    /// A replicated job's replicas' results until its result is decided (JSON, NULL when none).
    pub votes: Vec<Vote>,
    /// Its latest complete checkpoint and what its current attempt resumed from (JSON, NULL
    /// when it has neither).
    pub checkpoint: Option<Box<StoredCheckpoint>>,
}

/// A QEMU job's checkpoints as the pool keeps them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    /// The latest complete checkpoint (all its parts were in the pool when it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<vmgrid_proto::Checkpoint>,
    /// The QEMU version of the node that took `latest`, as its ad says: `latest` resumes only
    /// under that QEMU or a newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_with: Option<String>,
    /// The checkpoint the job's current attempt resumed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
    /// The nodes that found `latest` unusable (`RunReport::BadCheckpoint`): once
    /// [`MAX_RESUME_FAILURES`] different nodes have, it is dropped and the job starts afresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_on: Vec<String>,
}

/// One replica's result of a job with `replicas` (its vote), kept until the job's result is
/// decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    pub node: String,
    pub exit_code: i32,
    /// How the run failed (its kind and reason), if it did not exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// What replicas agree on: a hash of the exit code, of stdout, and of each output's name and
    /// content.
    pub digest: String,
    pub result: StoredResult,
}

/// A job's votes as the stores keep them: JSON, or NULL when there are none.
pub fn votes_column(v: &[Vote]) -> Option<String> {
    (!v.is_empty()).then(|| serde_json::to_string(v).expect("votes serialize"))
}

/// Stored votes read back; votes that do not parse are dropped (the job's replicas then run
/// again, which is always correct, only slower), and logged.
pub fn votes_from_column(c: Option<String>) -> Vec<Vote> {
    c.and_then(|s| {
        serde_json::from_str(&s)
            .inspect_err(|e| tracing::warn!("a job's stored votes do not read back ({e}); its replicas run again"))
            .ok()
    })
    .unwrap_or_default()
}

/// What the pool knows of a node's honesty: how often its results agreed with, or differed from,
/// the result its job's replicas agreed on; and whether an admin banned it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trust {
    pub agree: u64,
    pub disagree: u64,
    pub banned: bool,
}

/// How many different nodes must find a checkpoint unusable before it is given up.
pub const MAX_RESUME_FAILURES: usize = 2;

/// A job's checkpoint as the stores keep it: JSON, or NULL.
pub fn checkpoint_column(c: &Option<Box<StoredCheckpoint>>) -> Option<String> {
    c.as_ref().map(|c| serde_json::to_string(c).expect("a checkpoint serializes"))
}

/// A stored checkpoint read back; one that does not parse is dropped (the job then starts over,
/// which is always correct, only slower).
pub fn checkpoint_from_column(c: Option<String>) -> Option<Box<StoredCheckpoint>> {
    let text = c?;
    serde_json::from_str(&text)
        .inspect_err(|e| tracing::warn!("a stored checkpoint does not read back ({e}); its job starts afresh"))
        .ok()
}

/// A job's past attempts as the stores keep them: JSON, or NULL when there are none.
pub fn history_column(h: &[vmgrid_proto::AttemptView]) -> Option<String> {
    (!h.is_empty()).then(|| serde_json::to_string(h).expect("attempts serialize"))
}

/// A stored history read back; one that does not parse is dropped (it only describes the past).
pub fn history_from_column(c: Option<String>) -> Vec<vmgrid_proto::AttemptView> {
    c.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// A job as loaded at start.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    pub spec_id: u64,
    pub index: u64,
    pub owner: String,
    pub submitted_ms: u64,
    pub row: JobRow,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredNode {
    pub name: String,
    pub ad_json: String,
    pub cred_hash: String,
    pub state: NodeState,
}

/// Everything loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tokens: Vec<TokenRow>,
    /// (id, owner, JSON of the spec)
    pub specs: Vec<(u64, String, String)>,
    pub jobs: Vec<StoredJob>,
    pub nodes: Vec<StoredNode>,
    pub blobs: Vec<StoredBlob>,
    pub users: Vec<StoredUser>,
    /// The least job and spec ids never given (0 where the store does not say): ids of jobs
    /// dropped by retention are not given again.
    pub next_job: u64,
    pub next_spec: u64,
    /// Workflows, each with its node rows.
    pub dags: Vec<(DagRow, Vec<DagNodeRow>)>,
    /// The highest workflow id ever stored (those forgotten included): ids are never reused.
    pub last_dag_id: u64,
    /// The closed minutes of the last hour, oldest first.
    pub samples: Vec<crate::history::Sample>,
    /// What the pool knows of each node's honesty, by name.
    pub trust: Vec<(String, Trust)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Where the pool's state is kept. `commit` applies the operations in one transaction: all of
/// them are durable when it returns `Ok`, or none.
pub trait Store: Send + 'static {
    fn load(&mut self) -> Result<Loaded, StoreError>;
    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError>;
}

/// The queue into the writer thread and the sequence number of the last durable operation.
pub struct Writer {
    tx: mpsc::Sender<(u64, Op)>,
    hold: Arc<Hold>,
    next: u64,
    committed: watch::Receiver<u64>,
    failing: Arc<Mutex<Option<String>>>,
}

/// The store cannot commit right now; why, in its own words.
#[derive(Debug, Clone)]
pub struct Failing(pub String);

impl Writer {
    /// Starts the writer thread on `store`. A commit that fails (a full disk) is retried, the same
    /// batch, until it succeeds: nothing waiting on it is acknowledged meanwhile, and
    /// [`Writer::failing`] says why.
    pub fn start(mut store: Box<dyn Store>) -> Writer {
        let (tx, rx) = mpsc::channel::<(u64, Op)>();
        let (done_tx, committed) = watch::channel(0u64);
        let failing: Arc<Mutex<Option<String>>> = Arc::default();
        let flag = failing.clone();
        let hold = Arc::new(Hold::default());
        let held = hold.clone();
        std::thread::Builder::new()
            .name("vmgrid-store".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    held.wait(HOLD_MAX);
                    let mut batch = vec![first];
                    while batch.len() < 50_000 {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    let last = batch.last().map(|(s, _)| *s).unwrap_or(0);
                    let ops: Vec<Op> = batch.into_iter().map(|(_, op)| op).collect();
                    commit_until_done(store.as_mut(), &ops, &flag);
                    let _ = done_tx.send(last);
                }
            })
            .expect("spawn the store thread");
        Writer { tx, hold, next: 0, committed, failing }
    }

    /// Why the store cannot commit, while it cannot.
    pub fn failing(&self) -> Option<Failing> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner()).clone().map(Failing)
    }

    /// Queues an operation; returns its ticket. Call under the engine's lock so tickets follow
    /// the order of the state changes.
    pub fn push(&mut self, op: Op) -> u64 {
        self.next += 1;
        let _ = self.tx.send((self.next, op));
        self.next
    }

    /// What holds the next commit for a scheduling pass ([`Hold`]).
    pub fn hold(&self) -> Arc<Hold> {
        self.hold.clone()
    }

    pub fn last_ticket(&self) -> u64 {
        self.next
    }

    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Commits `ops`, retrying (every second, then every ten) while the store refuses.
fn commit_until_done(store: &mut dyn Store, ops: &[Op], failing: &Mutex<Option<String>>) {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        match store.commit(ops) {
            Ok(()) => {
                *failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return;
            }
            Err(e) => {
                tracing::error!("the job store cannot commit: {e}; nothing waiting on it is acknowledged; retrying");
                *failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
        }
    }
}

/// Waits until the operation with `ticket` (and every one before it) is on disk.
pub async fn durable(mut committed: watch::Receiver<u64>, ticket: u64) {
    if ticket == 0 {
        return;
    }
    let _ = committed.wait_for(|c| *c >= ticket).await;
}
