//! The pool's state machine as a pure engine, in openraft's manner: calls go in (submit, lease,
//! report, tick, …), their replies come back as return values, and everything else the call
//! causes comes out as typed [`Effects`]: durable store operations, wake-ups of waiting callers,
//! and events worth a log line. The engine does no IO, makes no random numbers, reads no
//! clock (`now` is an argument) and never awaits; the runtime around it (`crate::core`) queues the
//! store operations, waits for them to be durable before it answers, and wakes whoever waits.
//!
//! idle → running → completed | held | removed; a failed run goes back to idle while retries last.

mod jobs;
mod load;
mod nodes;
mod schedule;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use vmgrid_proto::*;
use vmgrid_scheduler::Cluster;

use crate::store::{Op, StoredResult, TokenRole};

/// How often a job may lose its node (or have its node fail to run it) before it is held.
pub const MAX_NODE_LOSSES: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A lease not renewed by a heartbeat for this long expires and its job goes back to idle.
    pub lease_ttl_ms: u64,
    /// A node not heard from for this long is lost.
    pub node_ttl_ms: u64,
    pub heartbeat_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { lease_ttl_ms: 15_000, node_ttl_ms: 15_000, heartbeat_ms: 2_000 }
    }
}

/// Who is calling, as their token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The pool token: may only register nodes.
    Pool,
    Node(String),
    User(String),
    Admin(String),
}

impl Principal {
    pub fn owner(&self) -> &str {
        match self {
            Principal::Pool => "pool",
            Principal::Node(n) | Principal::User(n) | Principal::Admin(n) => n,
        }
    }

    pub fn role(&self) -> TokenRole {
        match self {
            Principal::Pool => TokenRole::Pool,
            Principal::Node(_) => TokenRole::Node,
            Principal::User(_) => TokenRole::User,
            Principal::Admin(_) => TokenRole::Admin,
        }
    }

    pub fn from_role(role: TokenRole, owner: String) -> Principal {
        match role {
            TokenRole::Pool => Principal::Pool,
            TokenRole::Node => Principal::Node(owner),
            TokenRole::User => Principal::User(owner),
            TokenRole::Admin => Principal::Admin(owner),
        }
    }

    /// Whether this caller may see and manage job `j`: its owner or an admin.
    fn may_see(&self, owner: &str) -> bool {
        match self {
            Principal::Admin(_) => true,
            Principal::User(u) => owner == u,
            _ => false,
        }
    }
}

/// The hash under which a token is stored and looked up; the token itself is never kept.
pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// What calls caused besides their replies: plain data that tests compare.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Durable changes, in order: a caller's reply waits until they are committed.
    pub ops: Vec<Op>,
    /// There may be work for nodes that wait in a lease call.
    pub wake_nodes: bool,
    /// Jobs changed state: callers waiting on jobs look again.
    pub wake_waiters: bool,
    /// What an operator wants in the log.
    pub events: Vec<Event>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && !self.wake_nodes && !self.wake_waiters && self.events.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A node stopped heartbeating and was declared lost; its jobs went back to the pool.
    NodeLost { node: String },
    /// A report came under a lease that is no longer the job's.
    ResultRefused { job: u64, epoch: u64, node: String, why: String },
    /// A stored spec could not be read back at start; its jobs are held.
    UnreadableSpec { spec: u64, why: String },
}

#[derive(Debug)]
struct Job {
    id: u64,
    spec_id: u64,
    index: u64,
    owner: Arc<str>,
    state: JobState,
    node: Option<Arc<str>>,
    epoch: u64,
    attempts: u32,
    retries: u32,
    losses: u32,
    exit_code: Option<i32>,
    reason: Option<String>,
    submitted_ms: u64,
    finished_ms: Option<u64>,
    lease_deadline_ms: u64,
    result: Option<Box<StoredResult>>,
}

struct SpecEntry {
    spec: JobSpec,
    cluster: Cluster,
}

struct Node {
    ad: NodeAd,
    state: NodeState,
    cred_hash: String,
    last_seen_ms: u64,
    /// Set when a lease of this node expired: it has not heartbeated for a lease's lifetime, so
    /// it gets no new work until it heartbeats again (or is declared lost).
    silent: bool,
    /// Jobs running here under a lease.
    jobs: BTreeSet<u64>,
    /// Placed here and not yet handed over in a lease reply.
    pending: VecDeque<u64>,
    used_cpus: u32,
    used_memory_mb: u64,
}

impl Node {
    fn new(ad: NodeAd, state: NodeState, cred_hash: String, now: u64) -> Node {
        Node {
            ad,
            state,
            cred_hash,
            last_seen_ms: now,
            silent: false,
            jobs: BTreeSet::new(),
            pending: VecDeque::new(),
            used_cpus: 0,
            used_memory_mb: 0,
        }
    }

    fn store_op(&self, name: &str) -> Op {
        Op::Node {
            name: name.into(),
            ad_json: serde_json::to_string(&self.ad).expect("an ad serializes"),
            cred_hash: self.cred_hash.clone(),
            state: self.state,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub results_refused: u64,
    pub results_accepted: u64,
    pub leases_granted: u64,
    /// Submit-to-lease latency histogram (ms buckets) and sum.
    pub dispatch_buckets: [u64; DISPATCH_BUCKETS.len()],
    pub dispatch_sum_ms: u64,
    pub dispatch_count: u64,
}

pub const DISPATCH_BUCKETS: [u64; 8] = [1, 5, 10, 50, 100, 500, 1000, 10_000];

/// Why a call was refused; the API turns each kind into its status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller's view is stale: an expired lease, a lost node.
    #[error("{0}")]
    Conflict(String),
}

/// The pool in memory. Fields are private: every change goes through a call, which says what it
/// did in its [`Effects`].
pub struct Engine {
    jobs: BTreeMap<u64, Job>,
    idle: BTreeSet<u64>,
    /// The idle jobs that ask for no cpus (SSI processes): placed even when the pool is full.
    shared_idle: BTreeSet<u64>,
    specs: HashMap<u64, Arc<SpecEntry>>,
    nodes: BTreeMap<String, Node>,
    tokens: HashMap<String, Principal>,
    /// Why the idle jobs of a spec are waiting, from the last scheduling pass.
    waiting: HashMap<u64, String>,
    next_job: u64,
    next_spec: u64,
    /// Something changed that may allow new placements.
    dirty: bool,
    timing: Timing,
    metrics: Metrics,
    out: Effects,
}

/// Counts for `/metrics`, read from the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub jobs: [(JobState, u64); 5],
    pub nodes: [(NodeState, u64); 3],
    pub leases: u64,
}

impl Engine {
    /// An empty pool.
    pub fn new(timing: Timing) -> Engine {
        Engine {
            jobs: BTreeMap::new(),
            idle: BTreeSet::new(),
            shared_idle: BTreeSet::new(),
            specs: HashMap::new(),
            nodes: BTreeMap::new(),
            tokens: HashMap::new(),
            waiting: HashMap::new(),
            next_job: 1,
            next_spec: 1,
            dirty: true,
            timing,
            metrics: Metrics::default(),
            out: Effects::default(),
        }
    }

    /// What the calls since the last take caused.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.out)
    }

    fn store(&mut self, op: Op) {
        self.out.ops.push(op);
    }

    fn event(&mut self, e: Event) {
        self.out.events.push(e);
    }

    fn wake_nodes(&mut self) {
        self.out.wake_nodes = true;
    }

    fn wake_waiters(&mut self) {
        self.out.wake_waiters = true;
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts a refused report that never reached the state machine (a bad file in it).
    pub fn count_refused(&mut self, n: u64) {
        self.metrics.results_refused += n;
    }

    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        self.tokens.get(&hash_token(token))
    }

    /// Adds a token (by its hash), durably.
    pub fn add_token(&mut self, hash: String, p: Principal) {
        self.store(Op::Token { hash: hash.clone(), role: p.role(), owner: p.owner().into() });
        self.tokens.insert(hash, p);
    }

    /// Adds a token unless it is known already (the built-in pool and admin tokens at start).
    pub fn ensure_token(&mut self, hash: String, p: Principal) {
        if !self.tokens.contains_key(&hash) {
            self.add_token(hash, p);
        }
    }

    pub fn counts(&self) -> Counts {
        let mut jobs = [JobState::Idle, JobState::Running, JobState::Completed, JobState::Held, JobState::Removed]
            .map(|s| (s, 0u64));
        for j in self.jobs.values() {
            jobs[j.state as usize].1 += 1;
        }
        let nodes = [NodeState::Ready, NodeState::Draining, NodeState::Lost]
            .map(|st| (st, self.nodes.values().filter(|n| n.state == st).count() as u64));
        let leases = self.nodes.values().map(|n| n.jobs.len() as u64).sum();
        Counts { jobs, nodes, leases }
    }

    fn view(&self, j: &Job) -> JobView {
        let spec = self.specs.get(&j.spec_id);
        let reason = match j.state {
            JobState::Idle => self.waiting.get(&j.spec_id).cloned().or_else(|| j.reason.clone()),
            _ => j.reason.clone(),
        };
        JobView {
            id: j.id,
            name: spec.map(|s| s.spec.name.clone()).unwrap_or_default(),
            owner: j.owner.to_string(),
            state: j.state,
            node: j.node.as_deref().map(str::to_string),
            exit_code: j.exit_code,
            attempts: j.attempts,
            reason,
            vm_type: spec.map_or(VmType::Wasm, |s| s.spec.vm_type),
            index: j.index,
            submitted_ms: j.submitted_ms,
            finished_ms: j.finished_ms,
        }
    }

    /// The jobs `p` may see, in id order.
    pub fn job_views(&self, p: &Principal) -> Vec<JobView> {
        self.jobs.values().filter(|j| p.may_see(&j.owner)).map(|j| self.view(j)).collect()
    }

    /// One job with its results, if `p` may see it.
    pub fn job_result(&self, p: &Principal, id: u64) -> Result<JobResult, ApiError> {
        let j = self.jobs.get(&id).ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
        if !p.may_see(&j.owner) {
            return Err(ApiError::Forbidden(format!("job {id} belongs to {}", j.owner)));
        }
        let r = j.result.as_deref().cloned().unwrap_or_default();
        Ok(JobResult {
            job: self.view(j),
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_dropped: r.stdout_dropped,
            stderr_dropped: r.stderr_dropped,
            outputs: r.outputs,
        })
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|n| NodeView {
                ad: n.ad.clone(),
                state: n.state,
                running_jobs: n.jobs.len() as u32,
                free_cpus: n.ad.cpus.saturating_sub(n.used_cpus),
                free_memory_mb: n.ad.memory_mb.saturating_sub(n.used_memory_mb),
                last_seen_ms: n.last_seen_ms,
            })
            .collect()
    }
}

fn cluster_of(spec: &JobSpec) -> Result<Cluster, vmgrid_scheduler::ExprError> {
    Cluster::compile(spec.vm_type, spec.cpus, spec.memory_mb, spec.requirements.as_deref(), spec.rank.as_deref())
}
