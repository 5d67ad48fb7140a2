//! The matchmaker: a pure engine. A snapshot of the pool's ready nodes, its users' shares and the
//! idle jobs go in; placements, and for each job left idle a reason, come out. Users take turns by
//! fair share ([`fair`]). No IO, no async, no clock, no
//! locks: the coordinator is the runtime around it, and tests call it directly.
//!
//! Requirements and rank are CEL expressions over the node ad (`node.cpus`, `"wasm" in
//! node.vm_types`, `node.labels.site == "a"`, …). Jobs that share a spec form a *cluster* (as in
//! HTCondor's autoclusters): its expressions are compiled once and evaluated once per node, so a
//! sweep of a million jobs costs one evaluation per node, not a million.

pub mod fair;
mod node;
/// The bounds on an expression, checked before it is parsed (kept with the job's other rules).
pub use vmgrid_job::expr as limits;
pub use vmgrid_job::expr::ExprError;

pub use fair::UserShare;
pub use node::MatchAd;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program, Value};
use node::{ATTRS, Seen, attr_hash, node_value};
use vmgrid_proto::VmType;

/// A ready node with the resources it has free right now. Its ad is shared, not copied, by each
/// pass.
#[derive(Debug, Clone)]
pub struct NodeSlot {
    pub ad: Arc<MatchAd>,
    pub free_cpus: u32,
    pub free_memory_mb: u64,
    pub running_jobs: u32,
    /// The node's reputation (0 to 1) from replicated jobs' agreed results.
    pub reputation: f64,
}

/// A compiled expression and the node attributes it reads, if that can be told from its text.
#[derive(Clone)]
struct Expr {
    program: Arc<Program>,
    /// Indices into [`ATTRS`]; `None` when the expression uses `node` other than as `node.NAME`,
    /// in which case it is evaluated for every node.
    reads: Option<Vec<usize>>,
}

/// Which `node.NAME` attributes an expression reads; `None` if it uses `node` any other way (or
/// is written in a way this small lexer does not follow, such as triple-quoted strings).
fn reads_of(src: &str) -> Option<Vec<usize>> {
    if src.contains("\"\"\"") || src.contains("'''") {
        return None;
    }
    let chars: Vec<char> = src.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut reads = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            // Skip the string literal, with its escapes.
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after_dot = start > 0 && chars[start - 1] == '.';
            if word == "node" && !after_dot {
                if chars.get(i) != Some(&'.') {
                    return None;
                }
                let name_start = i + 1;
                let mut j = name_start;
                while j < chars.len() && ident(chars[j]) {
                    j += 1;
                }
                let name: String = chars[name_start..j].iter().collect();
                let idx = ATTRS.iter().position(|a| *a == name)?;
                if !reads.contains(&idx) {
                    reads.push(idx);
                }
                i = j;
            }
            continue;
        }
        i += 1;
    }
    reads.sort_unstable();
    Some(reads)
}

/// What a set of identical jobs asks for. Compile it once with [`Cluster::compile`].
#[derive(Clone)]
pub struct Cluster {
    pub vm_type: VmType,
    pub cpus: u32,
    pub memory_mb: u64,
    requirements: Option<Expr>,
    rank: Option<Expr>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("vm_type", &self.vm_type)
            .field("cpus", &self.cpus)
            .field("memory_mb", &self.memory_mb)
            .finish()
    }
}

impl Cluster {
    pub fn compile(
        vm_type: VmType,
        cpus: u32,
        memory_mb: u64,
        requirements: Option<&str>,
        rank: Option<&str>,
    ) -> Result<Cluster, ExprError> {
        let compile = |which: &'static str, src: Option<&str>| -> Result<Option<Expr>, ExprError> {
            match src.map(str::trim).filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(s) => Ok(Some(Expr { program: limits::compiled(which, s)?, reads: reads_of(s) })),
            }
        };
        Ok(Cluster {
            vm_type,
            cpus,
            memory_mb,
            requirements: compile("requirements", requirements)?,
            rank: compile("rank", rank)?,
        })
    }
}

/// One idle job: its id, the cluster it belongs to, its user (an index into the `users` given to
/// [`place`]) and its own priority, which orders it among its user's jobs (higher first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleJob {
    pub id: u64,
    pub cluster: u64,
    pub user: u32,
    pub priority: i32,
    /// Nodes (indices into the `nodes` given to [`place`]) this job must not go to, though its
    /// cluster matches them: a replicated job's nodes that ran it, a checkpoint's nodes that
    /// cannot resume it.
    pub exclude: Option<std::sync::Arc<[usize]>>,
}

impl IdleJob {
    /// A job of user 0 with priority 0.
    pub fn new(id: u64, cluster: u64) -> IdleJob {
        IdleJob { id, cluster, user: 0, priority: 0, exclude: None }
    }

    /// Whether this job may go to node `i`.
    fn allows(&self, i: usize) -> bool {
        self.exclude.as_ref().is_none_or(|x| !x.contains(&i))
    }
}

/// Where [`place`] finds a job's cluster: a map, or any lookup the caller keeps.
pub trait Clusters<'c> {
    fn cluster(&self, id: u64) -> Option<&'c Cluster>;
}

impl<'c> Clusters<'c> for &'c HashMap<u64, Cluster> {
    fn cluster(&self, id: u64) -> Option<&'c Cluster> {
        self.get(&id)
    }
}

impl<'c, F: Fn(u64) -> Option<&'c Cluster>> Clusters<'c> for F {
    fn cluster(&self, id: u64) -> Option<&'c Cluster> {
        self(id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub job: u64,
    /// Index into the `nodes` slice given to [`place`].
    pub node: usize,
}

#[derive(Debug, Default)]
pub struct Decision {
    pub placements: Vec<Placement>,
    /// Why the jobs of a cluster that were left idle are waiting.
    pub waiting: HashMap<u64, String>,
    /// The clusters this pass looked at (a pass that stops early, on a full pool, sees fewer).
    pub evaluated: Vec<u64>,
}

/// Places idle jobs, each on the matching node of highest rank that has room. Users take turns
/// by fair share ([`fair`]): the next slot goes to the user with the lowest effective priority,
/// counting what this pass already gave them, and a user at their quota gets no more; within a
/// user, jobs go by their own priority, then oldest first. `nodes` is updated with the resources
/// the placements take. The pass stops as soon as no node has a free cpu.
pub fn place<'c, C: Clusters<'c>, J: std::borrow::Borrow<IdleJob>>(
    nodes: &mut [NodeSlot],
    clusters: C,
    users: &[UserShare],
    jobs: impl IntoIterator<Item = J>,
) -> Decision {
    let mut pass = Pass::new(nodes);
    let (mut queues, unknown) = fair::Queues::new(users, jobs);
    for j in unknown {
        pass.decision.waiting.entry(j.cluster).or_insert_with(|| "the job's user is unknown to the matchmaker".into());
    }
    while let Some((u, job)) = queues.pop() {
        let Some(cluster) = clusters.cluster(job.cluster) else {
            pass.decision
                .waiting
                .entry(job.cluster)
                .or_insert_with(|| "the job's spec is unknown to the matchmaker".into());
            queues.done(u, 0);
            continue;
        };
        // A full pool ends the pass, except for time-shared jobs (cpus = 0), which need no slot.
        if pass.free_cpus == 0 && !pass.nodes.is_empty() && cluster.cpus > 0 {
            break;
        }
        let (user, given) = (&queues.users[u], queues.given[u]);
        let over_quota = user.over_quota(given, cluster.cpus).then_some((user, given));
        let placed = pass.try_place(&job, cluster, over_quota);
        queues.done(u, if placed { cluster.cpus } else { 0 });
    }
    pass.decision
}

/// One pass's view of the nodes and what it decided so far.
struct Pass<'n> {
    nodes: &'n mut [NodeSlot],
    /// The nodes as the pass found them: expressions see these, not what the pass placed since.
    start: Vec<Seen>,
    /// Each of those as CEL sees it, built the first time an expression is evaluated on it.
    values: Vec<Option<Value>>,
    free_cpus: u64,
    /// Per cluster: matching nodes, best first, and a cursor past the ones that are full for it.
    candidates: HashMap<u64, (Vec<usize>, usize)>,
    decision: Decision,
}

impl<'n> Pass<'n> {
    fn new(nodes: &'n mut [NodeSlot]) -> Pass<'n> {
        Pass {
            start: nodes.iter().map(Seen::of).collect(),
            values: vec![None; nodes.len()],
            free_cpus: nodes.iter().map(|n| n.free_cpus as u64).sum(),
            nodes,
            candidates: HashMap::new(),
            decision: Decision::default(),
        }
    }

    /// Places `job` if a matching node has room and its user is not `over_quota`; whether it did.
    fn try_place(&mut self, job: &IdleJob, cluster: &Cluster, over_quota: Option<(&UserShare, u64)>) -> bool {
        let (nodes, decision) = (&mut *self.nodes, &mut self.decision);
        let (list, cursor) = self.candidates.entry(job.cluster).or_insert_with(|| {
            decision.evaluated.push(job.cluster);
            let (list, why) = match_nodes(nodes, &self.start, &mut self.values, cluster);
            if let Some(why) = why {
                decision.waiting.insert(job.cluster, why);
            }
            (list, 0)
        });
        if list.is_empty() {
            return false;
        }
        if let Some((user, given)) = over_quota {
            decision.waiting.entry(job.cluster).or_insert_with(|| user.quota_reason(given));
            return false;
        }
        if cluster.cpus == 0 {
            return place_shared(nodes, list, cluster, job, decision);
        }
        let fits = |n: &NodeSlot| n.free_cpus >= cluster.cpus && n.free_memory_mb >= cluster.memory_mb;
        // The cursor moves past nodes full for every job of the cluster; a job's own exclusions
        // only skip nodes, for it.
        while *cursor < list.len() && !fits(&nodes[list[*cursor]]) {
            *cursor += 1;
        }
        let pick = list[*cursor..].iter().copied().find(|&i| job.allows(i) && fits(&nodes[i]));
        let Some(idx) = pick else {
            decision.waiting.entry(job.cluster).or_insert_with(|| {
                format!(
                    "waiting for {} cpu(s) and {} MiB free on one of the {} matching node(s)",
                    cluster.cpus,
                    cluster.memory_mb,
                    list.len()
                )
            });
            return false;
        };
        let n = &mut nodes[idx];
        n.free_cpus -= cluster.cpus;
        n.free_memory_mb -= cluster.memory_mb;
        n.running_jobs += 1;
        self.free_cpus -= cluster.cpus as u64;
        decision.placements.push(Placement { job: job.id, node: idx });
        true
    }
}

/// Time-shared jobs (SSI processes) use no cpu slot, so no node ever fills up for them: they are
/// spread instead, least loaded first, rank breaking ties.
fn place_shared(
    nodes: &mut [NodeSlot],
    list: &[usize],
    cluster: &Cluster,
    job: &IdleJob,
    decision: &mut Decision,
) -> bool {
    let best = list
        .iter()
        .copied()
        .filter(|&i| job.allows(i) && nodes[i].free_memory_mb >= cluster.memory_mb)
        .min_by_key(|&i| nodes[i].running_jobs);
    match best {
        Some(idx) => {
            let n = &mut nodes[idx];
            n.free_memory_mb -= cluster.memory_mb;
            n.running_jobs += 1;
            decision.placements.push(Placement { job: job.id, node: idx });
            true
        }
        None => {
            decision.waiting.entry(job.cluster).or_insert_with(|| {
                format!("waiting for {} MiB free on one of the {} matching node(s)", cluster.memory_mb, list.len())
            });
            false
        }
    }
}

/// CEL's standard library, registered once (a `Context::default()` registers it anew each time).
fn stdlib() -> Arc<Env> {
    static STDLIB: OnceLock<Arc<Env>> = OnceLock::new();
    STDLIB.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// Evaluates `e` for node `i`, once per distinct value of what it reads.
fn eval(
    e: &Expr,
    i: usize,
    (nodes, start): (&[NodeSlot], &[Seen]),
    values: &mut [Option<Value>],
    memo: &mut HashMap<u64, Result<Value, String>>,
) -> Result<Value, String> {
    let mut run = || {
        let node = values[i].get_or_insert_with(|| node_value(&nodes[i].ad, &start[i])).clone();
        let mut ctx = Context::with_env(stdlib());
        ctx.add_variable_from_value("node", node);
        e.program.execute(&ctx).map_err(|err| err.to_string())
    };
    let Some(reads) = &e.reads else { return run() };
    let key = reads.iter().fold(0xcbf2_9ce4_8422_2325u64, |k, &a| {
        (k ^ attr_hash(&nodes[i].ad, &start[i], a)).wrapping_mul(0x100_0000_01b3).rotate_left(17)
    });
    memo.entry(key).or_insert_with(run).clone()
}

/// The nodes that match `cluster`, best rank first. A node's ad is the same as when the pass
/// began; what expressions see of the rest is `start`.
fn match_nodes(
    nodes: &[NodeSlot],
    start: &[Seen],
    values: &mut [Option<Value>],
    cluster: &Cluster,
) -> (Vec<usize>, Option<String>) {
    if nodes.is_empty() {
        return (Vec::new(), Some("no ready nodes in the pool".into()));
    }
    let mut matched: Vec<(f64, usize)> = Vec::new();
    let mut no_vm = 0;
    let mut too_small = 0;
    let mut rejected = 0;
    let mut eval_error: Option<String> = None;
    let (mut req_memo, mut rank_memo) = (HashMap::new(), HashMap::new());
    for (i, n) in nodes.iter().enumerate() {
        if !n.ad.vm_types.contains(&cluster.vm_type) {
            no_vm += 1;
            continue;
        }
        if n.ad.cpus < cluster.cpus || n.ad.memory_mb < cluster.memory_mb {
            too_small += 1;
            continue;
        }
        if let Some(req) = &cluster.requirements {
            match eval(req, i, (nodes, start), values, &mut req_memo) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    rejected += 1;
                    continue;
                }
                Ok(other) => {
                    eval_error.get_or_insert(format!("requirements gave {other:?}, not a bool"));
                    continue;
                }
                Err(e) => {
                    eval_error.get_or_insert(format!("requirements failed: {e}"));
                    continue;
                }
            }
        }
        let rank = match &cluster.rank {
            None => 0.0,
            Some(r) => match eval(r, i, (nodes, start), values, &mut rank_memo) {
                Ok(Value::Int(x)) => x as f64,
                Ok(Value::UInt(x)) => x as f64,
                Ok(Value::Float(x)) => x,
                Ok(Value::Bool(b)) => b as u8 as f64,
                _ => 0.0,
            },
        };
        matched.push((rank, i));
    }
    // Highest rank first; ties keep the pool's order, which spreads work by name.
    matched.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    let list: Vec<usize> = matched.into_iter().map(|(_, i)| i).collect();
    if !list.is_empty() {
        return (list, None);
    }
    let total = nodes.len();
    let mut why = format!("no node matches ({total} ready):");
    if no_vm > 0 {
        why.push_str(&format!(" {no_vm} do not run {} jobs;", cluster.vm_type));
    }
    if too_small > 0 {
        why.push_str(&format!(" {too_small} have fewer than {} cpu(s) or {} MiB;", cluster.cpus, cluster.memory_mb));
    }
    if rejected > 0 {
        why.push_str(&format!(" {rejected} fail the requirements;"));
    }
    if let Some(e) = eval_error {
        why.push_str(&format!(" {e};"));
    }
    why.pop();
    (list, Some(why))
}

#[cfg(test)]
mod tests;
