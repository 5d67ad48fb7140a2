//! The pool in memory: jobs, specs, nodes and tokens, and every transition of the job state
//! machine. Each method changes memory and queues the matching durable [`Op`]s, returning the
//! ticket to wait for before answering; it does no IO itself and never awaits.
//!
//! idle → running → completed | held | removed; a failed run goes back to idle while retries last.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmgrid_proto::*;
use vmgrid_scheduler::{Cluster, IdleJob, NodeSlot};

use crate::store::{JobRow, Loaded, Op, Writer};

/// How often a job may lose its node (or have its node fail to run it) before it is held.
pub const MAX_NODE_LOSSES: u32 = 5;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A lease not renewed by a heartbeat for this long expires and its job goes back to idle.
    pub lease_ttl_ms: u64,
    /// A node not heard from for this long is lost.
    pub node_ttl_ms: u64,
    pub heartbeat_ms: u64,
}

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

    fn role_str(&self) -> &'static str {
        match self {
            Principal::Pool => "pool",
            Principal::Node(_) => "node",
            Principal::User(_) => "user",
            Principal::Admin(_) => "admin",
        }
    }

    fn from_row(role: &str, owner: String) -> Option<Principal> {
        Some(match role {
            "pool" => Principal::Pool,
            "node" => Principal::Node(owner),
            "user" => Principal::User(owner),
            "admin" => Principal::Admin(owner),
            _ => return None,
        })
    }
}

pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

pub fn new_token() -> String {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).expect("the kernel's random source is readable");
    hex::encode(b)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredResult {
    pub stdout: Option<FileRef>,
    pub stderr: Option<FileRef>,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub outputs: Vec<FileRef>,
}

#[derive(Debug)]
pub struct Job {
    pub id: u64,
    pub spec_id: u64,
    pub index: u64,
    pub owner: Arc<str>,
    pub state: JobState,
    pub node: Option<Arc<str>>,
    pub epoch: u64,
    pub attempts: u32,
    pub retries: u32,
    pub losses: u32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
    pub lease_deadline_ms: u64,
    pub result: Option<Box<StoredResult>>,
}

pub struct SpecEntry {
    pub spec: JobSpec,
    pub cluster: Cluster,
}

pub struct Node {
    pub ad: NodeAd,
    pub state: NodeState,
    pub cred_hash: String,
    pub last_seen_ms: u64,
    /// Jobs running here under a lease.
    pub jobs: BTreeSet<u64>,
    /// Placed here and not yet handed over in a lease reply.
    pub pending: VecDeque<u64>,
    pub used_cpus: u32,
    pub used_memory_mb: u64,
}

#[derive(Default)]
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

#[derive(Debug, thiserror::Error)]
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

pub struct State {
    pub jobs: BTreeMap<u64, Job>,
    pub idle: BTreeSet<u64>,
    /// The idle jobs that ask for no cpus (SSI processes): placed even when the pool is full.
    pub shared_idle: BTreeSet<u64>,
    pub specs: HashMap<u64, Arc<SpecEntry>>,
    pub nodes: BTreeMap<String, Node>,
    pub tokens: HashMap<String, Principal>,
    pub waiting: HashMap<u64, String>,
    pub next_job: u64,
    pub next_spec: u64,
    /// Something changed that may allow new placements.
    pub dirty: bool,
    pub writer: Writer,
    pub timing: Timing,
    pub metrics: Metrics,
}

fn cluster_of(spec: &JobSpec) -> Result<Cluster, vmgrid_scheduler::ExprError> {
    Cluster::compile(&spec.vm_type, spec.cpus, spec.memory_mb, spec.requirements.as_deref(), spec.rank.as_deref())
}

impl State {
    pub fn new(loaded: Loaded, writer: Writer, timing: Timing, now: u64) -> State {
        let mut s = State {
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
            writer,
            timing,
            metrics: Metrics::default(),
        };
        for (hash, role, owner) in loaded.tokens {
            if let Some(p) = Principal::from_row(&role, owner) {
                s.tokens.insert(hash, p);
            }
        }
        for (id, _owner, json) in loaded.specs {
            match serde_json::from_str::<JobSpec>(&json) {
                Ok(spec) => {
                    let cluster = cluster_of(&spec).unwrap_or_else(|_| {
                        Cluster::compile(&spec.vm_type, spec.cpus, spec.memory_mb, Some("false"), None)
                            .expect("`false` compiles")
                    });
                    s.specs.insert(id, Arc::new(SpecEntry { spec, cluster }));
                }
                Err(e) => tracing::error!(spec = id, "unreadable spec in the store: {e}"),
            }
            s.next_spec = s.next_spec.max(id + 1);
        }
        let mut owners: HashMap<String, Arc<str>> = HashMap::new();
        for (spec_id, index, owner, submitted_ms, row) in loaded.jobs {
            let owner = owners.entry(owner.clone()).or_insert_with(|| Arc::from(owner.as_str())).clone();
            let state = JobState::parse(&row.state).unwrap_or(JobState::Held);
            let job = Job {
                id: row.id,
                spec_id,
                index,
                owner,
                state,
                node: row.node.map(|n| Arc::from(n.as_str())),
                epoch: row.epoch,
                attempts: row.attempts,
                retries: row.retries,
                losses: row.losses,
                exit_code: row.exit_code,
                reason: row.reason,
                submitted_ms,
                finished_ms: row.finished_ms,
                // A restarted coordinator gives running jobs a full lease to be heard from again.
                lease_deadline_ms: now + timing.lease_ttl_ms,
                result: row.result.and_then(|r| serde_json::from_str(&r).ok()).map(Box::new),
            };
            s.next_job = s.next_job.max(job.id + 1);
            let id = job.id;
            s.jobs.insert(id, job);
            if state == JobState::Idle {
                s.set_idle(id);
            }
        }
        for (name, ad_json, cred_hash, state) in loaded.nodes {
            let Ok(ad) = serde_json::from_str::<NodeAd>(&ad_json) else { continue };
            let state = match state.as_str() {
                "draining" => NodeState::Draining,
                "lost" => NodeState::Lost,
                _ => NodeState::Ready,
            };
            s.nodes.insert(
                name,
                Node {
                    ad,
                    state,
                    cred_hash,
                    last_seen_ms: now,
                    jobs: BTreeSet::new(),
                    pending: VecDeque::new(),
                    used_cpus: 0,
                    used_memory_mb: 0,
                },
            );
        }
        // Running jobs belong to their nodes again, with their resources.
        let running: Vec<(u64, String, u64, u32, u64)> = s
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .map(|j| {
                let spec = s.specs.get(&j.spec_id);
                let node = j.node.as_deref().unwrap_or("").to_string();
                (j.id, node, j.epoch, spec.map_or(0, |s| s.spec.cpus), spec.map_or(0, |s| s.spec.memory_mb))
            })
            .collect();
        for (id, node, _epoch, cpus, mem) in running {
            match s.nodes.get_mut(&node) {
                Some(n) => {
                    n.jobs.insert(id);
                    n.used_cpus += cpus;
                    n.used_memory_mb += mem;
                }
                None => {
                    // No node to give it back to: it runs again.
                    let j = s.jobs.get_mut(&id).expect("listed above");
                    j.state = JobState::Idle;
                    j.node = None;
                    j.reason = Some(format!("requeued at restart: its node {node:?} is no longer registered"));
                    s.set_idle(id);
                    s.persist(id, false);
                }
            }
        }
        s
    }

    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        self.tokens.get(&hash_token(token))
    }

    /// Creates a token for a principal, durably. Returns the token and the ticket.
    pub fn add_token(&mut self, p: Principal) -> (String, u64) {
        let token = new_token();
        let hash = hash_token(&token);
        let ticket =
            self.writer.push(Op::Token { hash: hash.clone(), role: p.role_str().into(), owner: p.owner().into() });
        self.tokens.insert(hash, p);
        (token, ticket)
    }

    fn persist(&mut self, id: u64, with_result: bool) -> u64 {
        let j = &self.jobs[&id];
        let row = JobRow {
            id,
            state: j.state.as_str().into(),
            node: j.node.as_deref().map(str::to_string),
            epoch: j.epoch,
            attempts: j.attempts,
            retries: j.retries,
            losses: j.losses,
            exit_code: j.exit_code,
            reason: j.reason.clone(),
            finished_ms: j.finished_ms,
            result: if with_result { j.result.as_ref().and_then(|r| serde_json::to_string(r).ok()) } else { None },
            set_result: with_result,
        };
        self.writer.push(Op::Job(row))
    }

    pub fn view(&self, j: &Job) -> JobView {
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
            vm_type: spec.map(|s| s.spec.vm_type.clone()).unwrap_or_default(),
            index: j.index,
            submitted_ms: j.submitted_ms,
            finished_ms: j.finished_ms,
        }
    }

    pub fn submit(&mut self, owner: &str, spec: JobSpec, count: u64, now: u64) -> Result<(Vec<u64>, u64), ApiError> {
        crate::validate::spec(&spec).map_err(ApiError::BadRequest)?;
        if count == 0 || count > 1_000_000 {
            return Err(ApiError::BadRequest(format!("count is {count}; it must be between 1 and 1000000")));
        }
        let cluster = cluster_of(&spec).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let spec_id = self.next_spec;
        self.next_spec += 1;
        let json = serde_json::to_string(&spec).expect("a spec serializes");
        self.writer.push(Op::Spec { id: spec_id, owner: owner.into(), json });
        self.specs.insert(spec_id, Arc::new(SpecEntry { spec, cluster }));
        let first = self.next_job;
        self.next_job += count;
        let ticket =
            self.writer.push(Op::Jobs { spec_id, first_id: first, count, owner: owner.into(), submitted_ms: now });
        let owner: Arc<str> = Arc::from(owner);
        for i in 0..count {
            let id = first + i;
            self.jobs.insert(
                id,
                Job {
                    id,
                    spec_id,
                    index: i,
                    owner: owner.clone(),
                    state: JobState::Idle,
                    node: None,
                    epoch: 0,
                    attempts: 0,
                    retries: 0,
                    losses: 0,
                    exit_code: None,
                    reason: None,
                    submitted_ms: now,
                    finished_ms: None,
                    lease_deadline_ms: 0,
                    result: None,
                },
            );
            self.set_idle(id);
        }
        self.dirty = true;
        Ok(((first..first + count).collect(), ticket))
    }

    fn set_idle(&mut self, id: u64) {
        self.idle.insert(id);
        let shared = self.jobs.get(&id).and_then(|j| self.specs.get(&j.spec_id)).is_some_and(|s| s.spec.cpus == 0);
        if shared {
            self.shared_idle.insert(id);
        }
    }

    fn unset_idle(&mut self, id: u64) {
        self.idle.remove(&id);
        self.shared_idle.remove(&id);
    }

    /// Runs the matchmaker over ready nodes and idle jobs, if anything changed since last time.
    pub fn schedule(&mut self, now: u64) -> u64 {
        if !self.dirty {
            return 0;
        }
        self.dirty = false;
        let names: Vec<String> =
            self.nodes.iter().filter(|(_, n)| n.state == NodeState::Ready).map(|(k, _)| k.clone()).collect();
        let mut slots: Vec<NodeSlot> = names
            .iter()
            .map(|name| {
                let n = &self.nodes[name];
                NodeSlot {
                    ad: n.ad.clone(),
                    free_cpus: n.ad.cpus.saturating_sub(n.used_cpus),
                    free_memory_mb: n.ad.memory_mb.saturating_sub(n.used_memory_mb),
                    running_jobs: n.jobs.len() as u32,
                }
            })
            .collect();
        // Idle jobs are read lazily, oldest first; the pass stops when the pool is full.
        let decision = {
            let (jobs, specs) = (&self.jobs, &self.specs);
            let idle = self.idle.iter().map(|id| IdleJob { id: *id, cluster: jobs[id].spec_id });
            let mut d = vmgrid_scheduler::place(&mut slots, |c: u64| specs.get(&c).map(|s| &s.cluster), idle);
            // The pass above stops when the pool's cpus are all taken; time-shared jobs need
            // none, so they get a pass of their own over what is left.
            if !self.shared_idle.is_empty() {
                let placed: std::collections::HashSet<u64> = d.placements.iter().map(|p| p.job).collect();
                let shared = self
                    .shared_idle
                    .iter()
                    .filter(|id| !placed.contains(id))
                    .map(|id| IdleJob { id: *id, cluster: jobs[id].spec_id });
                let more = vmgrid_scheduler::place(&mut slots, |c: u64| specs.get(&c).map(|s| &s.cluster), shared);
                d.placements.extend(more.placements);
                d.evaluated.extend(more.evaluated);
                d.waiting.extend(more.waiting);
            }
            d
        };
        for c in &decision.evaluated {
            self.waiting.remove(c);
        }
        self.waiting.extend(decision.waiting);
        let mut ticket = 0;
        for p in decision.placements {
            let name = &names[p.node];
            let (cpus, mem) = {
                let spec = &self.specs[&self.jobs[&p.job].spec_id].spec;
                (spec.cpus, spec.memory_mb)
            };
            let node_name: Arc<str> = Arc::from(name.as_str());
            let j = self.jobs.get_mut(&p.job).expect("placed jobs exist");
            j.state = JobState::Running;
            j.node = Some(node_name);
            j.epoch += 1;
            j.attempts += 1;
            j.reason = None;
            j.lease_deadline_ms = now + self.timing.lease_ttl_ms;
            self.unset_idle(p.job);
            let n = self.nodes.get_mut(name).expect("placed on a known node");
            n.pending.push_back(p.job);
            n.jobs.insert(p.job);
            n.used_cpus += cpus;
            n.used_memory_mb += mem;
            ticket = self.persist(p.job, false);
        }
        ticket
    }

    /// Registers a node. A name already held by a registration that is not lost is refused,
    /// unless the caller proves it is that node (its previous credential) or is an admin.
    pub fn register(
        &mut self,
        ad: NodeAd,
        previous: Option<&str>,
        admin: bool,
        now: u64,
    ) -> Result<(String, u64), ApiError> {
        let name = ad.name.clone();
        if let Some(old) = self.nodes.get(&name) {
            let same_node = previous.is_some_and(|c| hash_token(c) == old.cred_hash);
            if old.state != NodeState::Lost && !same_node && !admin {
                return Err(ApiError::Conflict(format!(
                    "a node named {name} is already in the pool (heard from {} ms ago); use another --name, or wait until it is declared lost",
                    now.saturating_sub(old.last_seen_ms)
                )));
            }
        }
        if let Some(old) = self.nodes.get(&name) {
            // A node that registers again is a new incarnation: whatever the old one ran is
            // fenced off and runs again.
            let old_hash = old.cred_hash.clone();
            let jobs: Vec<u64> = old.jobs.iter().copied().collect();
            for id in jobs {
                self.requeue(id, now, format!("node {name} restarted"));
            }
            self.tokens.remove(&old_hash);
            self.writer.push(Op::RevokeToken { hash: old_hash });
        }
        let credential = new_token();
        let cred_hash = hash_token(&credential);
        self.tokens.insert(cred_hash.clone(), Principal::Node(name.clone()));
        self.writer.push(Op::Token { hash: cred_hash.clone(), role: "node".into(), owner: name.clone() });
        let ticket = self.writer.push(Op::Node {
            name: name.clone(),
            ad_json: serde_json::to_string(&ad).expect("an ad serializes"),
            cred_hash: cred_hash.clone(),
            state: "ready".into(),
        });
        self.nodes.insert(
            name,
            Node {
                ad,
                state: NodeState::Ready,
                cred_hash,
                last_seen_ms: now,
                jobs: BTreeSet::new(),
                pending: VecDeque::new(),
                used_cpus: 0,
                used_memory_mb: 0,
            },
        );
        self.dirty = true;
        Ok((credential, ticket))
    }

    /// The node named by a credential, if it is still part of the pool.
    pub fn live_node(&mut self, name: &str, now: u64) -> Result<&mut Node, ApiError> {
        match self.nodes.get_mut(name) {
            None => Err(ApiError::Conflict(format!("node {name} is not registered; register again"))),
            Some(n) if n.state == NodeState::Lost => Err(ApiError::Conflict(format!(
                "node {name} was declared lost and its jobs given to others; register again"
            ))),
            Some(n) => {
                n.last_seen_ms = now;
                Ok(n)
            }
        }
    }

    /// Hands a node up to `max` of the jobs placed on it, needing at most `max_cpus` in all, in
    /// the order they were placed. A node with no cpu free asks with `max_cpus = 0`: it then gets
    /// only time-shared jobs (cpus = 0), wherever they are in its queue.
    pub fn take_leases(&mut self, name: &str, max: u32, max_cpus: u32, now: u64) -> Vec<Lease> {
        let mut out = Vec::new();
        let mut cpus = 0u32;
        let queued: Vec<u64> = match self.nodes.get(name) {
            Some(n) => n.pending.iter().copied().collect(),
            None => return out,
        };
        for id in queued {
            if out.len() >= max as usize {
                break;
            }
            let need = self.jobs.get(&id).and_then(|j| self.specs.get(&j.spec_id)).map_or(0, |s| s.spec.cpus);
            if need > 0 {
                if max_cpus == 0 {
                    continue;
                }
                if !out.is_empty() && cpus.saturating_add(need) > max_cpus {
                    break;
                }
            }
            self.nodes.get_mut(name).expect("checked above").pending.retain(|p| *p != id);
            let Some(j) = self.jobs.get_mut(&id) else { continue };
            if j.state != JobState::Running || j.node.as_deref() != Some(name) {
                continue;
            }
            cpus = cpus.saturating_add(need);
            j.lease_deadline_ms = now + self.timing.lease_ttl_ms;
            let latency = now.saturating_sub(j.submitted_ms);
            let m = &mut self.metrics;
            m.leases_granted += 1;
            m.dispatch_count += 1;
            m.dispatch_sum_ms += latency;
            for (i, b) in DISPATCH_BUCKETS.iter().enumerate() {
                if latency <= *b {
                    m.dispatch_buckets[i] += 1;
                }
            }
            let spec = &self.specs[&j.spec_id].spec;
            out.push(Lease { job_id: id, epoch: j.epoch, index: j.index, spec: spec.with_index(j.index) });
        }
        out
    }

    pub fn has_pending(&self, name: &str) -> bool {
        self.nodes.get(name).is_some_and(|n| !n.pending.is_empty())
    }

    /// Renews the leases a node still holds and lists those it must drop.
    pub fn heartbeat(
        &mut self,
        name: &str,
        leases: &[LeaseId],
        draining: bool,
        now: u64,
    ) -> Result<(Vec<LeaseId>, u64), ApiError> {
        let ttl = self.timing.lease_ttl_ms;
        let node = self.live_node(name, now)?;
        let mut ticket = 0;
        if draining && node.state == NodeState::Ready {
            node.state = NodeState::Draining;
            let (ad_json, cred_hash) =
                (serde_json::to_string(&node.ad).expect("an ad serializes"), node.cred_hash.clone());
            let pending: Vec<u64> = node.pending.iter().copied().collect();
            ticket = self.writer.push(Op::Node { name: name.into(), ad_json, cred_hash, state: "draining".into() });
            for id in pending {
                ticket = self.requeue(id, now, format!("node {name} is draining"));
            }
        }
        let mut revoked = Vec::new();
        for l in leases {
            match self.jobs.get_mut(&l.job_id) {
                Some(j) if j.state == JobState::Running && j.epoch == l.epoch && j.node.as_deref() == Some(name) => {
                    j.lease_deadline_ms = now + ttl;
                }
                _ => revoked.push(*l),
            }
        }
        Ok((revoked, ticket))
    }

    /// Back to idle after a node failed the job, without consuming the job's retries; held after
    /// [`MAX_NODE_LOSSES`].
    pub fn requeue(&mut self, id: u64, now: u64, why: String) -> u64 {
        // A job placed but never handed to its node has not been lost by anyone.
        let delivered = match self.jobs.get(&id).and_then(|j| j.node.clone()) {
            Some(node) => !self.nodes.get(&*node).is_some_and(|n| n.pending.contains(&id)),
            None => false,
        };
        self.release_resources(id);
        let Some(j) = self.jobs.get_mut(&id) else { return 0 };
        if j.state != JobState::Running {
            return 0;
        }
        if delivered {
            j.losses += 1;
        }
        let lost_node = j.node.take();
        let ssi = self.specs.get(&j.spec_id).is_some_and(|s| s.spec.ssi.is_some());
        if delivered && ssi {
            // A process of a single-system image has had effects (files, children, output) that
            // a rerun would repeat; like a process on a crashed machine, it ends, with the reason.
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
        }
        self.persist(id, false)
    }

    fn release_resources(&mut self, id: u64) {
        let Some(j) = self.jobs.get(&id) else { return };
        let (Some(node), Some(spec)) = (j.node.clone(), self.specs.get(&j.spec_id)) else { return };
        let (cpus, mem) = (spec.spec.cpus, spec.spec.memory_mb);
        if let Some(n) = self.nodes.get_mut(&*node) {
            if n.jobs.remove(&id) {
                n.used_cpus = n.used_cpus.saturating_sub(cpus);
                n.used_memory_mb = n.used_memory_mb.saturating_sub(mem);
            }
            n.pending.retain(|p| *p != id);
        }
        self.dirty = true;
    }

    /// Applies a node's reports; each is accepted only under the job's current lease.
    pub fn report(&mut self, name: &str, reports: Vec<Report>, now: u64) -> Result<(ReportResponse, u64), ApiError> {
        if let Err(e) = self.live_node(name, now) {
            self.metrics.results_refused += reports.len() as u64;
            return Err(e);
        }
        let mut resp = ReportResponse { accepted: Vec::new(), refused: Vec::new() };
        let mut ticket = 0;
        for r in reports {
            let l = r.lease;
            let valid = matches!(self.jobs.get(&l.job_id),
                Some(j) if j.state == JobState::Running && j.epoch == l.epoch && j.node.as_deref() == Some(name));
            if !valid {
                self.metrics.results_refused += 1;
                let why = match self.jobs.get(&l.job_id) {
                    None => "no such job".to_string(),
                    Some(j) if j.epoch != l.epoch => {
                        format!("lease epoch {} is stale; the job is at epoch {}", l.epoch, j.epoch)
                    }
                    Some(j) => format!("the job is {} on {}", j.state.as_str(), j.node.as_deref().unwrap_or("no node")),
                };
                tracing::info!(job = l.job_id, epoch = l.epoch, node = name, "refused a result: {why}");
                resp.refused.push((l, why));
                continue;
            }
            self.metrics.results_accepted += 1;
            ticket = self.finish_run(l.job_id, r, now);
            resp.accepted.push(l);
        }
        Ok((resp, ticket))
    }

    fn finish_run(&mut self, id: u64, r: Report, now: u64) -> u64 {
        let max_retries = self.specs.get(&self.jobs[&id].spec_id).map_or(0, |s| s.spec.max_retries);
        let node_name = self.jobs[&id].node.as_deref().unwrap_or("").to_string();
        if let RunReport::HostFailed { reason } = &r.run {
            return self.requeue(id, now, format!("node {node_name} could not run it: {reason}"));
        }
        self.release_resources(id);
        let j = self.jobs.get_mut(&id).expect("reported jobs exist");
        j.result = Some(Box::new(StoredResult {
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_dropped: r.stdout_dropped,
            stderr_dropped: r.stderr_dropped,
            outputs: r.outputs,
        }));
        let retry = |j: &mut Job, why: String| {
            if j.retries < max_retries {
                j.retries += 1;
                j.state = JobState::Idle;
                j.reason = Some(format!("{why}; retry {} of {max_retries}", j.retries));
                j.node = None;
                true
            } else {
                false
            }
        };
        match r.run {
            RunReport::Exited { code } => {
                if code == 0 || !retry(j, format!("exited with {code}")) {
                    j.state = JobState::Completed;
                    j.exit_code = Some(code);
                    j.reason = None;
                    j.finished_ms = Some(now);
                }
            }
            RunReport::GuestFailed { failure, reason } => {
                if !retry(j, reason.clone()) {
                    j.state = JobState::Held;
                    j.reason = Some(format!("{failure}: {reason}"));
                    j.finished_ms = Some(now);
                }
            }
            RunReport::BadJob { reason } => {
                j.state = JobState::Held;
                j.reason = Some(format!("bad job: {reason}"));
                j.finished_ms = Some(now);
            }
            RunReport::HostFailed { .. } => unreachable!("handled above"),
        }
        if j.state == JobState::Idle {
            self.set_idle(id);
        }
        self.persist(id, true)
    }

    /// Expires leases that were not renewed and nodes that went silent.
    pub fn tick(&mut self, now: u64) -> u64 {
        let mut ticket = 0;
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state != NodeState::Lost && now.saturating_sub(n.last_seen_ms) > self.timing.node_ttl_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for name in silent {
            tracing::warn!(node = %name, "node lost: no heartbeat");
            let n = self.nodes.get_mut(&name).expect("listed above");
            n.state = NodeState::Lost;
            let jobs: Vec<u64> = n.jobs.iter().copied().collect();
            let (ad_json, cred_hash) = (serde_json::to_string(&n.ad).expect("an ad serializes"), n.cred_hash.clone());
            ticket = self.writer.push(Op::Node { name: name.clone(), ad_json, cred_hash, state: "lost".into() });
            for id in jobs {
                ticket = self.requeue(id, now, format!("node {name} was lost"));
            }
        }
        let expired: Vec<u64> = self
            .nodes
            .values()
            .flat_map(|n| n.jobs.iter().copied())
            .filter(|id| self.jobs.get(id).is_some_and(|j| j.state == JobState::Running && j.lease_deadline_ms < now))
            .collect();
        for id in expired {
            let node = self.jobs[&id].node.as_deref().unwrap_or("?").to_string();
            ticket = self.requeue(id, now, format!("its lease on node {node} expired"));
        }
        ticket
    }

    pub fn deregister(&mut self, name: &str, now: u64) -> u64 {
        let Some(n) = self.nodes.get(name) else { return 0 };
        let jobs: Vec<u64> = n.jobs.iter().copied().collect();
        let hash = n.cred_hash.clone();
        for id in jobs {
            self.requeue(id, now, format!("node {name} left the pool"));
        }
        self.nodes.remove(name);
        self.tokens.remove(&hash);
        self.writer.push(Op::RevokeToken { hash });
        self.dirty = true;
        self.writer.push(Op::DeleteNode { name: name.into() })
    }

    pub fn may_see(p: &Principal, j: &Job) -> bool {
        match p {
            Principal::Admin(_) => true,
            Principal::User(u) => *j.owner == **u,
            _ => false,
        }
    }

    pub fn action(&mut self, p: &Principal, action: JobAction, ids: &[u64], now: u64) -> (ActionResponse, u64) {
        let mut resp = ActionResponse { changed: Vec::new(), refused: Vec::new() };
        let mut ticket = 0;
        for &id in ids {
            let Some(j) = self.jobs.get(&id) else {
                resp.refused.push((id, "no such job".into()));
                continue;
            };
            if !Self::may_see(p, j) {
                resp.refused.push((id, format!("job {id} belongs to {}, not {}", j.owner, p.owner())));
                continue;
            }
            let state = j.state;
            let ok = match (action, state) {
                (JobAction::Rm, s) if !s.is_final() => true,
                (JobAction::Hold, JobState::Idle | JobState::Running) => true,
                (JobAction::Release, JobState::Held) => true,
                _ => false,
            };
            if !ok {
                resp.refused.push((id, format!("job {id} is {}", state.as_str())));
                continue;
            }
            if state == JobState::Running {
                self.release_resources(id);
            }
            self.unset_idle(id);
            let j = self.jobs.get_mut(&id).expect("checked above");
            j.node = None;
            match action {
                JobAction::Rm => {
                    j.state = JobState::Removed;
                    j.reason = Some(format!("removed by {}", p.owner()));
                    j.finished_ms = Some(now);
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
                }
            }
            ticket = self.persist(id, action == JobAction::Release);
            resp.changed.push(self.view(&self.jobs[&id]));
        }
        (resp, ticket)
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

#[cfg(test)]
mod tests;
