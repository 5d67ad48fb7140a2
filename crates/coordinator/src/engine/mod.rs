//! The pool's state machine as a pure engine, in openraft's manner: calls go in (submit, lease,
//! report, tick, …), their replies come back as return values, and everything else the call
//! causes comes out as typed [`Effects`]: durable store operations, wake-ups of waiting callers,
//! and events worth a log line. The engine does no IO, makes no random numbers, reads no
//! clock (`now` is an argument) and never awaits; the runtime around it (`crate::core`) queues the
//! store operations, waits for them to be durable before it answers, and wakes whoever waits.
//!
//! idle → running → completed | held | removed; a failed run goes back to idle while retries last.

pub(crate) mod attempts;
mod checkpoints;
mod counts;
pub use counts::Counts;
mod dag;
mod fair;
mod invariants;
pub(crate) mod jobs;
mod load;
mod nodes;
mod overlay;
mod pages;
mod replicas;
mod retention;
mod schedule;
mod sharing;

pub use fair::{DEFAULT_HALF_LIFE_MS, USAGE_SAVE_MS};
pub use schedule::Snapshot;
#[cfg(test)]
mod ahead_tests;
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod page_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod replica_tests;
#[cfg(test)]
mod slot_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use vmgrid_proto::*;
use vmgrid_scheduler::{Cluster, MatchAd};

use crate::store::{Op, StoredResult, TokenRole, TokenRow};

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
    /// A `vmgrid ssi` console of user `owner`, at the home URL the pool gave it.
    Console {
        owner: String,
        home: String,
    },
}

impl Principal {
    pub fn owner(&self) -> &str {
        match self {
            Principal::Pool => "pool",
            Principal::Node(n) | Principal::User(n) | Principal::Admin(n) => n,
            Principal::Console { owner, .. } => owner,
        }
    }

    pub fn role(&self) -> TokenRole {
        match self {
            Principal::Pool => TokenRole::Pool,
            Principal::Node(_) => TokenRole::Node,
            Principal::User(_) => TokenRole::User,
            Principal::Admin(_) => TokenRole::Admin,
            Principal::Console { .. } => TokenRole::Console,
        }
    }

    /// The principal of a stored token; `None` for a console token without its home.
    pub fn from_row(role: TokenRole, owner: String, detail: Option<String>) -> Option<Principal> {
        Some(match role {
            TokenRole::Pool => Principal::Pool,
            TokenRole::Node => Principal::Node(owner),
            TokenRole::User => Principal::User(owner),
            TokenRole::Admin => Principal::Admin(owner),
            TokenRole::Console => Principal::Console { owner, home: detail? },
        })
    }

    fn detail(&self) -> Option<String> {
        match self {
            Principal::Console { home, .. } => Some(home.clone()),
            _ => None,
        }
    }

    /// Whether this caller may see and manage a job of `owner`: its owner (or the owner's
    /// console) or an admin.
    fn may_see(&self, owner: &str) -> bool {
        match self {
            Principal::Admin(_) => true,
            Principal::User(u) | Principal::Console { owner: u, .. } => owner == u,
            _ => false,
        }
    }
}

/// A token the pool knows, by the hash of its secret.
#[derive(Debug, Clone)]
struct TokenEntry {
    id: String,
    principal: Principal,
    created_ms: u64,
    expires_ms: Option<u64>,
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
    /// Nodes whose lease calls must end now, work or not: a node that drains, or was declared
    /// lost (its call then answers that it must register again).
    pub end_calls: Vec<String>,
    /// Jobs changed state: callers waiting on jobs look again.
    pub wake_waiters: bool,
    /// What an operator wants in the log.
    pub events: Vec<Event>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
            && !self.wake_nodes
            && !self.wake_waiters
            && self.events.is_empty()
            && self.end_calls.is_empty()
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
    /// A stored workflow could not be read back at start; it is left out (its jobs stay).
    UnreadableDag { dag: u64, why: String },
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
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
    lease_deadline_ms: u64,
    result: Option<Box<StoredResult>>,
    /// Attempts that ended before the latest one (`attempts.rs`), at most [`MAX_PAST_ATTEMPTS`].
    history: Vec<AttemptView>,
    /// The state `Engine::by_state` counts this job in (brought up to `state` on each persist).
    counted: JobState,
    /// A QEMU job's latest complete checkpoint, and what its current attempt resumed from.
    ck: Option<Box<crate::store::StoredCheckpoint>>,
    /// A replicated job's results so far, until one is agreed on (`replicas.rs`).
    votes: Vec<crate::store::Vote>,
    /// `vmgrid vacate` asked for a checkpoint and a move; its node hears it with its heartbeat.
    vacating: bool,
    /// A vacated job is not placed on the node it left until this time (ms), if another can
    /// take it meanwhile (kept in memory only).
    avoid: Option<(Arc<str>, u64)>,
}

struct SpecEntry {
    spec: JobSpec,
    cluster: Cluster,
}

struct Node {
    /// Shared with each scheduling pass, which reads it as CEL built once, at registration.
    ad: Arc<MatchAd>,
    /// Its ad's cpus and memory (MiB), kept here too: a pass reads every ready node's free room,
    /// and the ad behind its `Arc` would be a cache miss per node.
    size: (u32, u64),
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
    /// Lease-ahead: cpus' worth of jobs it may hold beyond its cpus, queued on the node until a
    /// cpu frees up (as its last lease call asked, bounded; kept in memory, each call says it).
    ahead: u32,
    /// The cpus of its jobs that accrue their users' usage: at most its cpus.
    charged_cpus: u32,
    /// Its jobs placed beyond its cpus, in order: not charged until jobs before them end (the
    /// node starts its queue in order as cpus free up).
    uncharged: VecDeque<u64>,
    /// Its blob cache, as its last heartbeat said.
    cache: Option<CacheStats>,
}

impl Node {
    fn new(ad: NodeAd, state: NodeState, cred_hash: String, now: u64) -> Node {
        Node {
            size: (ad.cpus, ad.memory_mb),
            ad: Arc::new(MatchAd::new(ad)),
            state,
            cred_hash,
            last_seen_ms: now,
            silent: false,
            jobs: BTreeSet::new(),
            pending: VecDeque::new(),
            used_cpus: 0,
            used_memory_mb: 0,
            ahead: 0,
            charged_cpus: 0,
            uncharged: VecDeque::new(),
            cache: None,
        }
    }

    /// Free cpus and memory now: what its cpus can run at once.
    fn free(&self) -> (u32, u64) {
        let (cpus, memory_mb) = self.size;
        (cpus.saturating_sub(self.used_cpus), memory_mb.saturating_sub(self.used_memory_mb))
    }

    /// What its lease-ahead can still take beyond its cpus: `ahead` cpus, and memory in
    /// proportion but never more than the node has (a queued job holds no memory until it
    /// starts, and then must fit in the node's whole memory; the node starts it only when it does).
    fn ahead_room(&self) -> (u32, u64) {
        let (ad_cpus, ad_memory_mb) = self.size;
        let cpus = ad_cpus.max(1);
        let memory = ad_memory_mb + ad_memory_mb / u64::from(cpus) * u64::from(self.ahead);
        (
            (ad_cpus + self.ahead).saturating_sub(self.used_cpus.max(ad_cpus)),
            memory.saturating_sub(self.used_memory_mb.max(ad_memory_mb)).min(ad_memory_mb),
        )
    }

    fn store_op(&self, name: &str) -> Op {
        Op::Node {
            name: name.into(),
            ad_json: serde_json::to_string(self.ad.ad()).expect("an ad serializes"),
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
    /// Jobs completed (the overview's throughput; retries and requeues are not counted).
    pub jobs_completed: u64,
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
    /// Idle jobs by spec, oldest first within each: a pass takes from each spec only as many
    /// as could fit.
    idle_by_spec: BTreeMap<u64, BTreeSet<u64>>,
    specs: HashMap<u64, Arc<SpecEntry>>,
    nodes: BTreeMap<String, Node>,
    tokens: HashMap<String, TokenEntry>,
    /// Why the idle jobs of a spec are waiting, from the last scheduling pass.
    waiting: HashMap<u64, String>,
    /// The last pass's ready nodes, given back when it is over ([`Engine::recycle`]): the next
    /// pass refreshes their free room in place, and takes a new `Arc` of a node's ad only where
    /// the ready nodes changed (the counts of a thousand `Arc`s are a cache miss each).
    slot_cache: Vec<vmgrid_scheduler::NodeSlot>,
    next_job: u64,
    next_spec: u64,
    /// Something changed that may allow new placements.
    dirty: bool,
    timing: Timing,
    limits: Limits,
    /// Jobs not yet completed or removed, by owner (what `Limits::max_queued_per_user` bounds).
    queued: HashMap<Arc<str>, u64>,
    /// Every job's id, by owner, as ranges: what a user's page of the job list reads.
    owners: pages::Owners,
    /// Completed and removed jobs by the time they finished, for retention.
    final_by_time: BTreeSet<(u64, u64)>,
    /// How many jobs each spec has (a spec goes when its last job does).
    spec_jobs: HashMap<u64, u64>,
    blobs: HashMap<String, retention::BlobEntry>,
    /// Blob bytes each user is charged for.
    blob_bytes: HashMap<Arc<str>, u64>,
    /// Fair share: each user's usage, running cpus, factor and quota.
    users: HashMap<Arc<str>, fair::UserEntry>,
    half_life_ms: u64,
    /// When users' usage was last saved.
    usage_saved_ms: u64,
    metrics: Metrics,
    /// Workflows, and the spec of each released workflow node's latest run → (workflow, node).
    dags: BTreeMap<u64, dag::Dag>,
    dag_specs: HashMap<u64, (u64, usize)>,
    next_dag: u64,
    /// The jobs each user's running workflows will queue (their waiting nodes'), which count
    /// against `Limits::max_queued_per_user` as queued jobs do.
    dag_reserved: HashMap<Arc<str>, u64>,
    /// Finished jobs past retention that a running workflow still needs, out of
    /// `final_by_time` (so they are not looked at every tick) until the workflow ends.
    kept_for_dags: HashMap<u64, Vec<(u64, u64)>>,
    /// Jobs in each state, indexed by `JobState as usize` (`counts.rs`).
    by_state: [u64; 5],
    /// The last hour, a sample a minute (`crate::history`).
    history: crate::history::History,
    /// Parts of checkpoints that were replaced or given up, and when: collected a short while
    /// after (not after the grace period of a fresh upload) once nothing refers to them
    /// (`retention.rs`).
    released: HashMap<String, u64>,
    /// Each node's agreements with its jobs' agreed results, and bans (`replicas.rs`).
    trust: HashMap<String, crate::store::Trust>,
    /// Which nodes share which large blobs (`sharing.rs`).
    sharing: sharing::Sharing,
    /// When vacated jobs may go back to the nodes they left: a pass runs then.
    avoid_ends: BTreeSet<u64>,
    /// Idle jobs no ready node could take at the pass that looked at them (none could resume
    /// the job's checkpoint, or each ran one of its replicas), and since when (their `reason` says
    /// why; kept in memory only).
    blocked_since: BTreeMap<u64, u64>,
    out: Effects,
}

/// What one user may hold in the pool, and how long it keeps what is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Jobs not yet completed or removed (idle, running or held).
    pub max_queued_per_user: u64,
    /// Bytes of blobs (images, inputs, outputs) a user is charged for.
    pub max_blob_bytes_per_user: u64,
    /// Completed and removed jobs are dropped (with their results) this long after they ended.
    pub retain_finished_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued_per_user: 1_000_000,
            max_blob_bytes_per_user: 64 << 30,
            retain_finished_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl Engine {
    /// An empty pool.
    pub fn new(timing: Timing) -> Engine {
        Engine {
            jobs: BTreeMap::new(),
            idle_by_spec: BTreeMap::new(),
            specs: HashMap::new(),
            nodes: BTreeMap::new(),
            tokens: HashMap::new(),
            waiting: HashMap::new(),
            slot_cache: Vec::new(),
            next_job: 1,
            next_spec: 1,
            dirty: true,
            timing,
            limits: Limits::default(),
            queued: HashMap::new(),
            owners: pages::Owners::default(),
            final_by_time: BTreeSet::new(),
            spec_jobs: HashMap::new(),
            blobs: HashMap::new(),
            blob_bytes: HashMap::new(),
            users: HashMap::new(),
            half_life_ms: DEFAULT_HALF_LIFE_MS,
            usage_saved_ms: 0,
            metrics: Metrics::default(),
            dags: BTreeMap::new(),
            dag_specs: HashMap::new(),
            next_dag: 1,
            dag_reserved: HashMap::new(),
            kept_for_dags: HashMap::new(),
            by_state: [0; 5],
            history: crate::history::History::default(),
            released: HashMap::new(),
            trust: HashMap::new(),
            sharing: Default::default(),
            avoid_ends: BTreeSet::new(),
            blocked_since: BTreeMap::new(),
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

    fn end_calls_of(&mut self, node: &str) {
        self.out.end_calls.push(node.to_string());
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts a refused report that never reached the state machine (a bad file in it).
    pub fn count_refused(&mut self, n: u64) {
        self.metrics.results_refused += n;
    }

    /// Who a token is, if it is known and has not expired at `now`.
    pub fn authenticate(&self, token: &str, now: u64) -> Option<&Principal> {
        let t = self.tokens.get(&hash_token(token))?;
        t.expires_ms.is_none_or(|e| now < e).then_some(&t.principal)
    }

    /// Adds a token (by the hash of its secret), durably; `id` names it for listing and revoking.
    pub fn add_token(&mut self, hash: String, id: String, p: Principal, now: u64, expires_ms: Option<u64>) {
        let row = TokenRow {
            hash: hash.clone(),
            id: id.clone(),
            role: p.role(),
            owner: p.owner().into(),
            created_ms: now,
            expires_ms,
            detail: p.detail(),
        };
        self.store(Op::Token(row));
        self.tokens.insert(hash, TokenEntry { id, principal: p, created_ms: now, expires_ms });
    }

    /// Adds a token unless it is known already (the built-in pool and admin tokens at start).
    pub fn ensure_token(&mut self, hash: String, p: Principal, now: u64) {
        if !self.tokens.contains_key(&hash) {
            let id = hash.get(..12).unwrap_or(&hash).to_string();
            self.add_token(hash, id, p, now, None);
        }
    }

    /// Every token, by id (never a secret), for an admin.
    pub fn token_views(&self) -> Vec<TokenView> {
        let mut v: Vec<TokenView> = self
            .tokens
            .values()
            .map(|t| TokenView {
                id: t.id.clone(),
                role: t.principal.role().as_str().into(),
                owner: t.principal.owner().into(),
                created_ms: t.created_ms,
                expires_ms: t.expires_ms,
            })
            .collect();
        v.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        v
    }

    /// Revokes the token named `id`; a node's credential takes its node out of the pool.
    pub fn revoke(&mut self, id: &str, now: u64) -> Result<(), ApiError> {
        let hash = self
            .tokens
            .iter()
            .find(|(_, t)| t.id == id)
            .map(|(h, _)| h.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no token {id}; `vmgrid token --list` shows them")))?;
        if let Some(TokenEntry { principal: Principal::Node(name), .. }) = self.tokens.get(&hash).cloned() {
            self.deregister(&name, now);
        }
        self.tokens.remove(&hash);
        self.store(Op::RevokeToken { hash });
        Ok(())
    }
    fn view(&self, j: &Job) -> JobView {
        let spec = self.specs.get(&j.spec_id);
        let reason = match j.state {
            JobState::Idle if self.blocked_since.contains_key(&j.id) => j.reason.clone(),
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
            started_ms: j.started_ms,
            finished_ms: j.finished_ms,
        }
    }

    /// The jobs `p` may see, in id order.
    pub fn job_views(&self, p: &Principal) -> Vec<JobView> {
        self.jobs.values().filter(|j| p.may_see(&j.owner)).map(|j| self.view(j)).collect()
    }

    /// Registers a `vmgrid ssi` console of user `p` at `home` (the URL the pool chose for it)
    /// under the hash of the credential the runtime made.
    pub fn register_console(
        &mut self,
        p: &Principal,
        hash: String,
        id: String,
        home: String,
        now: u64,
    ) -> Result<(), ApiError> {
        let owner = match p {
            Principal::User(o) | Principal::Admin(o) => o.clone(),
            other => {
                return Err(ApiError::Forbidden(format!(
                    "a {} token cannot open a console; use a user token",
                    other.role().as_str()
                )));
            }
        };
        self.add_token(hash, id, Principal::Console { owner, home }, now, None);
        Ok(())
    }

    /// One job with its results, if `p` may see it.
    pub fn job_result(&self, p: &Principal, id: u64) -> Result<JobResult, ApiError> {
        // Another user's job is answered as a missing one: its id and owner are not theirs to learn.
        let j = self.jobs.get(&id).filter(|j| p.may_see(&j.owner));
        let j = j.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
        let r = j.result.as_deref().cloned().unwrap_or_default();
        Ok(JobResult {
            job: self.view(j),
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_dropped: r.stdout_dropped,
            stderr_dropped: r.stderr_dropped,
            outputs: r.outputs,
            history: self.attempt_views(j),
            checkpoint: j.ck.as_ref().and_then(|c| c.latest.as_ref()).map(|c| CheckpointView {
                seq: c.seq,
                guest_s: c.guest_s,
                console: c.console.clone(),
            }),
            spec: self.specs.get(&j.spec_id).map(|s| {
                let mut spec = s.spec.clone();
                if let Some(ssi) = &mut spec.ssi {
                    ssi.token = "(not shown)".into();
                }
                spec
            }),
        })
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|n| NodeView {
                ad: n.ad.ad().clone(),
                state: n.state,
                running_jobs: n.jobs.len() as u32,
                free_cpus: n.free().0,
                free_memory_mb: n.free().1,
                last_seen_ms: n.last_seen_ms,
                cache: n.cache,
                reputation: self.reputation(&n.ad.name),
                agreements: self.trust(&n.ad.name).agree,
                disagreements: self.trust(&n.ad.name).disagree,
            })
            .collect()
    }
}

fn cluster_of(spec: &JobSpec) -> Result<Cluster, vmgrid_scheduler::ExprError> {
    Cluster::compile(spec.vm_type, spec.cpus, spec.memory_mb, spec.requirements.as_deref(), spec.rank.as_deref())
}

/// Which jobs a page lists: in a state, of an owner (exactly), whose name contains a text (case
/// folded). Unset fields match every job.
#[derive(Debug, Default, Clone)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub owner: Option<String>,
    pub name: Option<String>,
    /// Largest id first; `after` is then where the previous page ended going down (0: the top).
    pub newest_first: bool,
}

/// The most jobs one page of the job list looks at, matching or not.
pub const MAX_PAGE_SCAN: usize = 100_000;
