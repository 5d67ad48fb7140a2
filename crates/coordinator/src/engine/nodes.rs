//! The node calls: register, lease, heartbeat, deregister, and the clock's tick that expires
//! leases and declares silent nodes lost. Fencing lives here: a node that registers again, or is
//! lost, loses its credential and its jobs.

use vmgrid_proto::*;

use super::{ApiError, DISPATCH_BUCKETS, Engine, Event, Node, Principal, hash_token};
use crate::store::Op;

impl Engine {
    /// Registers a node under the hash of the credential the runtime made for it. A name already
    /// held by a registration that is not lost is refused, unless the caller proves it is that
    /// node (its previous credential) or is an admin.
    pub fn register(
        &mut self,
        mut ad: NodeAd,
        previous: Option<&str>,
        admin: bool,
        cred_hash: String,
        now: u64,
    ) -> Result<(), ApiError> {
        let name = ad.name.clone();
        if self.banned(&name) {
            return Err(ApiError::Forbidden(format!("node {name} is banned from this pool by an admin")));
        }
        // Before anything changes: a node that cannot join changes nothing.
        self.give_node_address(&mut ad).map_err(ApiError::Conflict)?;
        if let Some(old) = self.nodes.get(&name) {
            let same_node = previous.is_some_and(|c| hash_token(c) == old.cred_hash);
            if old.state != NodeState::Lost && !same_node && !admin {
                return Err(ApiError::Conflict(format!(
                    "a node named {name} is already in the pool (heard from {} ms ago); use another --name, or wait until it is declared lost",
                    now.saturating_sub(old.last_seen_ms)
                )));
            }
            // A node that registers again is a new incarnation: whatever the old one ran is
            // fenced off and runs again.
            let old_hash = old.cred_hash.clone();
            let jobs: Vec<u64> = old.jobs.iter().copied().collect();
            for id in jobs {
                self.requeue(id, now, format!("node {name} restarted"));
            }
            // A lease call of the old registration still waiting ends, taking nothing.
            self.end_calls_of(&name);
            self.tokens.remove(&old_hash);
            self.store(Op::RevokeToken { hash: old_hash });
        }
        let id = format!("node-{}", cred_hash.get(..8).unwrap_or(&cred_hash));
        self.add_token(cred_hash.clone(), id, Principal::Node(name.clone()), now, None);
        let node = Node::new(ad, NodeState::Ready, cred_hash, now);
        self.store(node.store_op(&name));
        self.nodes.insert(name, node);
        self.dirty = true;
        self.wake_nodes();
        self.wake_waiters();
        Ok(())
    }

    /// Whether a lease call made under registration `cred` (its credential's hash) of node
    /// `name` may still take its work: the node is not lost and has not registered again since.
    /// (A call waiting for work is not the node being heard from: only the call's first look
    /// counts, in `live_node`.)
    pub fn same_registration(&self, name: &str, cred: &str) -> Result<(), ApiError> {
        if self.in_pool(name)?.cred_hash != cred {
            return Err(ApiError::Conflict(format!("node {name} registered again since this call began")));
        }
        Ok(())
    }

    /// The node `name`, if it is still part of the pool; it counts as heard from.
    pub fn live_node(&mut self, name: &str, now: u64) -> Result<(), ApiError> {
        self.in_pool(name)?;
        self.nodes.get_mut(name).expect("in the pool").last_seen_ms = now;
        Ok(())
    }

    /// The node `name`, if it is registered and not lost; else why it must register again.
    fn in_pool(&self, name: &str) -> Result<&Node, ApiError> {
        match self.nodes.get(name) {
            None => Err(ApiError::Conflict(format!("node {name} is not registered; register again"))),
            Some(n) if n.state == NodeState::Lost => Err(ApiError::Conflict(format!(
                "node {name} was declared lost and its jobs given to others; register again"
            ))),
            Some(n) => Ok(n),
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
            let spec = &self.specs[&j.spec_id].spec;
            let resume = j.ck.as_ref().and_then(|c| c.latest.clone());
            out.push(Lease { job_id: id, epoch: j.epoch, index: j.index, spec: spec.with_index(j.index), resume });
            self.count_dispatch(latency);
        }
        out
    }

    fn count_dispatch(&mut self, latency: u64) {
        let m = &mut self.metrics;
        m.leases_granted += 1;
        m.dispatch_count += 1;
        m.dispatch_sum_ms += latency;
        for (i, b) in DISPATCH_BUCKETS.iter().enumerate() {
            if latency <= *b {
                m.dispatch_buckets[i] += 1;
            }
        }
    }

    /// How far ahead node `name` will queue (its lease call says, each time), bounded by
    /// [`MAX_AHEAD_PER_CPU`] per cpu. More room may allow placements: a pass runs. Less may leave
    /// jobs placed there that the node will not collect: those beyond the new bound go back to
    /// the pool (newest first; not counted as attempts).
    pub fn set_ahead(&mut self, name: &str, ahead: u32, now: u64) {
        let Some(n) = self.nodes.get_mut(name) else { return };
        let ahead = ahead.min(n.ad.cpus.saturating_mul(MAX_AHEAD_PER_CPU));
        if ahead > n.ahead {
            self.dirty = true;
        }
        n.ahead = ahead;
        if n.used_cpus <= n.ad.cpus + ahead {
            return;
        }
        let uncollected: Vec<u64> = n.pending.iter().rev().copied().collect();
        for id in uncollected {
            if self.nodes.get(name).is_none_or(|n| n.used_cpus <= n.ad.cpus + n.ahead) {
                return;
            }
            if self.jobs.get(&id).and_then(|j| self.specs.get(&j.spec_id)).is_some_and(|s| s.spec.cpus > 0) {
                self.requeue(id, now, format!("node {name} asked for fewer jobs ahead before collecting it"));
            }
        }
    }

    /// Jobs a node queued and hands back unstarted: each returns to the pool as a placement never
    /// handed over would (no attempt counted, no loss). A lease that is no longer this node's is
    /// ignored: the job moved on already.
    pub fn hand_back(&mut self, name: &str, leases: &[LeaseId], now: u64) {
        for l in leases {
            if self.stale_lease(name, *l).is_some() {
                continue;
            }
            if let Some(n) = self.nodes.get_mut(name) {
                n.pending.push_back(l.job_id);
            }
            self.requeue(l.job_id, now, format!("node {name} handed it back unstarted"));
        }
    }

    /// Whether jobs are placed on `name` and waiting to be collected.
    pub fn has_pending(&self, name: &str) -> bool {
        self.nodes.get(name).is_some_and(|n| !n.pending.is_empty())
    }

    /// Renews the leases a node still holds and lists those it must drop. A draining node takes
    /// no new work and hands back what it has not collected.
    pub fn heartbeat(
        &mut self,
        name: &str,
        leases: &[LeaseId],
        draining: bool,
        now: u64,
    ) -> Result<HeartbeatResponse, ApiError> {
        self.live_node(name, now)?;
        let node = self.nodes.get_mut(name).expect("live");
        if node.silent {
            node.silent = false;
            self.dirty = true;
        }
        if draining && node.state == NodeState::Ready {
            node.state = NodeState::Draining;
            let pending: Vec<u64> = node.pending.iter().copied().collect();
            let op = node.store_op(name);
            self.store(op);
            self.end_calls_of(name);
            for id in pending {
                self.requeue(id, now, format!("node {name} is draining"));
            }
        }
        let ttl = self.timing.lease_ttl_ms;
        let (mut revoked, mut vacate) = (Vec::new(), Vec::new());
        for l in leases {
            match self.jobs.get_mut(&l.job_id) {
                Some(j) if j.state == JobState::Running && j.epoch == l.epoch && j.node.as_deref() == Some(name) => {
                    j.lease_deadline_ms = now + ttl;
                    if j.vacating {
                        vacate.push(*l);
                    }
                }
                _ => revoked.push(*l),
            }
        }
        Ok(HeartbeatResponse { revoked, vacate, peer_identity: None })
    }

    /// Whether node `name` drains (its lease calls then wait for nothing).
    pub fn draining(&self, name: &str) -> bool {
        self.nodes.get(name).is_some_and(|n| n.state == NodeState::Draining)
    }

    /// Node `name`'s ad, if it is in the pool.
    pub fn node_ad(&self, name: &str) -> Option<NodeAd> {
        self.nodes.get(name).map(|n| n.ad.ad().clone())
    }

    /// What node `name` says of its blob cache (kept in memory: each heartbeat says it again).
    pub fn set_cache(&mut self, name: &str, cache: Option<CacheStats>) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.cache = cache;
        }
    }

    /// Expires leases that were not renewed and nodes that went silent, drops finished jobs past
    /// their retention, and saves users' usage every [`super::USAGE_SAVE_MS`].
    pub fn tick(&mut self, now: u64) {
        self.expire_finished(now);
        self.give_up_unresumable(now);
        // Vacated jobs may go back to the nodes they left: a pass looks again.
        while self.avoid_ends.first().is_some_and(|&t| t <= now) {
            self.avoid_ends.pop_first();
            self.dirty = true;
            self.wake_nodes();
        }
        self.save_usage(now);
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state != NodeState::Lost && now.saturating_sub(n.last_seen_ms) > self.timing.node_ttl_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for name in silent {
            self.event(Event::NodeLost { node: name.clone() });
            // A lease call it has waiting answers now that it must register again.
            self.end_calls_of(&name);
            let n = self.nodes.get_mut(&name).expect("listed above");
            n.state = NodeState::Lost;
            let jobs: Vec<u64> = n.jobs.iter().copied().collect();
            let op = n.store_op(&name);
            self.store(op);
            for id in jobs {
                self.requeue(id, now, format!("node {name} was lost"));
            }
            self.wake_waiters();
        }
        let expired: Vec<u64> = self
            .nodes
            .values()
            .flat_map(|n| n.jobs.iter().copied())
            .filter(|id| self.jobs.get(id).is_some_and(|j| j.state == JobState::Running && j.lease_deadline_ms < now))
            .collect();
        for id in expired {
            let node = self.jobs[&id].node.as_deref().unwrap_or("?").to_string();
            // The node has not heartbeated for a lease's lifetime: until it does, it gets no new
            // work (its jobs would only expire again), even before it is declared lost.
            if let Some(n) = self.nodes.get_mut(&node) {
                n.silent = true;
            }
            self.requeue(id, now, format!("its lease on node {node} expired"));
        }
    }

    /// A node leaving the pool: its jobs go back at once and its credential is revoked.
    pub fn deregister(&mut self, name: &str, now: u64) {
        let Some(n) = self.nodes.get(name) else { return };
        let jobs: Vec<u64> = n.jobs.iter().copied().collect();
        let hash = n.cred_hash.clone();
        for id in jobs {
            self.requeue(id, now, format!("node {name} left the pool"));
        }
        // Its lease call still waiting, if any (a banned node, a revoked token), ends now.
        self.end_calls_of(name);
        self.nodes.remove(name);
        self.sharing.forget(name);
        self.tokens.remove(&hash);
        self.store(Op::RevokeToken { hash });
        self.store(Op::DeleteNode { name: name.into() });
        self.dirty = true;
        self.wake_nodes();
        self.wake_waiters();
    }
}
