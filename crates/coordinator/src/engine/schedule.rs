//! A scheduling pass, in three steps so that no user expression is evaluated while the engine is
//! locked: [`Engine::snapshot`] copies what the pass needs (the ready nodes' free resources, the
//! fair share of each user with idle work, and per spec the oldest idle jobs that could possibly
//! fit), [`Snapshot::decide`] runs the pure matchmaker (`vmgrid-scheduler`, which evaluates the
//! CEL and takes users in turn by fair share) on that copy, and [`Engine::apply`] makes each
//! placement that still holds — job still idle, node still ready with room, user within quota — a
//! running job queued on its node. Anything that changed meanwhile is left for the next pass.

use std::collections::HashMap;
use std::sync::Arc;

use vmgrid_proto::*;
use vmgrid_scheduler::{Decision, IdleJob, NodeSlot, UserShare};

use super::{Engine, SpecEntry};

/// Time-shared jobs (SSI processes, cpus = 0) taken per spec into one pass.
const SHARED_PER_PASS: usize = 256;

/// What one pass decides on: a copy, so deciding needs no lock.
#[derive(Default)]
pub struct Snapshot {
    /// The ready nodes; each shares its node's ad (an `Arc`), not a copy of it.
    pub(super) slots: Vec<NodeSlot>,
    /// Idle jobs asking for cpus, oldest first, and time-shared ones.
    pub(super) batch: Vec<IdleJob>,
    pub(super) shared: Vec<IdleJob>,
    clusters: HashMap<u64, Arc<SpecEntry>>,
    /// The users of those jobs (`IdleJob::user` indexes this).
    users: Vec<UserShare>,
    /// Per slot, the cpus and memory its lease-ahead can still take beyond its free cpus.
    ahead: Vec<(u32, u64)>,
}

impl Snapshot {
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.shared.is_empty()
    }

    /// The matchmaker's decision (this is where requirements and rank are evaluated). Batch jobs
    /// first, users in turn by fair share, until the pool is full; time-shared jobs need no cpu,
    /// so they get a pass of their own over what is left.
    pub fn decide(&mut self) -> Decision {
        let clusters = &self.clusters;
        let lookup = |c: u64| clusters.get(&c).map(|s| &s.cluster);
        let mut d = vmgrid_scheduler::place(&mut self.slots, lookup, &self.users, self.batch.iter());
        let batch_placed = d.placements.len();
        // Lease-ahead, only for what no free cpu took: a job is queued behind a busy node's
        // running jobs only when no node that matches it has a cpu free now.
        if self.ahead.iter().any(|&(c, _)| c > 0) && batch_placed < self.batch.len() {
            let placed: std::collections::HashSet<u64> = d.placements.iter().map(|p| p.job).collect();
            // On the slots themselves, their numbers put back after: time-shared jobs below
            // start at once, so they see only free memory (a copy would take an `Arc` per node).
            let kept: Vec<(u32, u64, u32)> =
                self.slots.iter().map(|s| (s.free_cpus, s.free_memory_mb, s.running_jobs)).collect();
            for (slot, &(cpus, memory)) in self.slots.iter_mut().zip(&self.ahead) {
                slot.free_cpus = cpus;
                slot.free_memory_mb = memory;
            }
            // The users as the first step left them: what it gave counts toward share and quota.
            let mut users = self.users.clone();
            for j in self.batch.iter().filter(|j| placed.contains(&j.id)) {
                if let (Some(u), Some(c)) = (users.get_mut(j.user as usize), lookup(j.cluster)) {
                    u.running_cpus += u64::from(c.cpus);
                }
            }
            let rest = self.batch.iter().filter(|j| !placed.contains(&j.id));
            let more = vmgrid_scheduler::place(&mut self.slots, lookup, &users, rest);
            for (slot, &(cpus, memory, running)) in self.slots.iter_mut().zip(&kept) {
                (slot.free_cpus, slot.free_memory_mb, slot.running_jobs) = (cpus, memory, running);
            }
            d.placements.extend(more.placements);
            d.evaluated.extend(more.evaluated);
            d.waiting.extend(more.waiting);
        }
        if !self.shared.is_empty() {
            let more = vmgrid_scheduler::place(&mut self.slots, lookup, &self.users, self.shared.iter());
            d.placements.extend(more.placements);
            d.evaluated.extend(more.evaluated);
            d.waiting.extend(more.waiting);
        }
        d
    }
}

impl Engine {
    /// Runs a whole pass at once (snapshot, decide, apply), if anything changed since the last;
    /// returns how many jobs it placed.
    pub fn schedule(&mut self, now: u64) -> usize {
        match self.snapshot(now) {
            Some(mut s) => {
                let d = s.decide();
                let placed = self.apply(&s, d, now).len();
                self.recycle(&mut s);
                placed
            }
            None => 0,
        }
    }

    /// Whether something changed since the last pass that may allow new placements.
    pub fn needs_pass(&self) -> bool {
        self.dirty
    }

    /// What a pass needs at `now`, if anything changed since the last one (and then it counts as
    /// done).
    pub fn snapshot(&mut self, now: u64) -> Option<Snapshot> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        if self.idle_by_spec.is_empty() {
            // Nothing to place (a result came in, a node joined): no copy of every node.
            return Some(Snapshot::default());
        }
        // A node whose leases just expired is not given new work until it heartbeats again.
        // The last pass's slots are refreshed in place while the ready nodes stay the same ones.
        let mut slots = std::mem::take(&mut self.slot_cache);
        let mut ahead = Vec::with_capacity(slots.len());
        for n in self.nodes.values().filter(|n| n.state == NodeState::Ready && !n.silent) {
            let (free_cpus, free_memory_mb) = n.free();
            let (running_jobs, reputation) = (n.jobs.len() as u32, self.reputation(&n.ad.name));
            let i = ahead.len();
            match slots.get_mut(i).filter(|s| Arc::ptr_eq(&s.ad, &n.ad)) {
                Some(s) => {
                    (s.free_cpus, s.free_memory_mb) = (free_cpus, free_memory_mb);
                    (s.running_jobs, s.reputation) = (running_jobs, reputation);
                }
                None => {
                    slots.truncate(i);
                    slots.push(NodeSlot { ad: n.ad.clone(), free_cpus, free_memory_mb, running_jobs, reputation });
                }
            }
            ahead.push(n.ahead_room());
        }
        slots.truncate(ahead.len());
        #[cfg(test)]
        self.check_slots(&slots);
        let free_cpus: u64 =
            slots.iter().map(|s| s.free_cpus as u64).sum::<u64>() + ahead.iter().map(|a| a.0 as u64).sum::<u64>();
        let mut snap = Snapshot { slots, ahead, ..Snapshot::default() };
        let mut owners: HashMap<Arc<str>, u32> = HashMap::new();
        // Jobs whose checkpoint no ready node can resume, and replicated jobs every ready node has
        // run, take no place in the pass.
        let mut stuck = Vec::new();
        for (&spec_id, ids) in &self.idle_by_spec {
            let Some(entry) = self.specs.get(&spec_id) else { continue };
            let Some(owner) = ids.first().and_then(|id| self.jobs.get(id)).map(|j| &j.owner) else { continue };
            let take = self.take_per_pass(entry, owner, free_cpus, snap.slots.is_empty());
            if take == 0 {
                continue;
            }
            let next = owners.len() as u32;
            let user = *owners.entry(owner.clone()).or_insert(next);
            let priority = entry.spec.priority;
            let into = if entry.spec.cpus == 0 { &mut snap.shared } else { &mut snap.batch };
            let slots = &snap.slots;
            let resumable = ids.iter().filter(|&&id| {
                let ads = || slots.iter().map(|s| s.ad.ad());
                let ok = self.resumable(id, ads()) && self.untried_node(id, ads());
                if !ok {
                    stuck.push(id);
                }
                ok
            });
            into.extend(resumable.take(take).map(|&id| IdleJob {
                id,
                cluster: spec_id,
                user,
                priority,
                exclude: None,
            }));
            snap.clusters.insert(spec_id, entry.clone());
        }
        for id in stuck {
            self.blocked(id, now);
        }
        self.set_exclusions(&mut snap, now);
        let mut by_index: Vec<(&Arc<str>, u32)> = owners.iter().map(|(k, &v)| (k, v)).collect();
        by_index.sort_unstable_by_key(|&(_, v)| v);
        snap.users = self.shares(by_index.into_iter().map(|(k, _)| k), now);
        Some(snap)
    }

    /// How many idle jobs of a spec one pass may place: no more than could fit in the whole pool's
    /// free cpus, nor than the owner's quota leaves room for (plus one, to say why the rest wait);
    /// with no node at all, one, to say why it waits.
    fn take_per_pass(&self, entry: &SpecEntry, owner: &str, free_cpus: u64, no_nodes: bool) -> usize {
        let c = entry.spec.cpus as u64;
        if c == 0 {
            return SHARED_PER_PASS;
        }
        if no_nodes {
            return 1;
        }
        let mut take = free_cpus / c;
        if let Some((running, max)) = self.users.get(owner).and_then(|u| Some((u.running_cpus, u.max_cpus?))) {
            take = take.min(max.saturating_sub(running) / c + 1);
        }
        take as usize
    }

    /// Makes the decision's placements that still hold; returns the node of each (the nodes to
    /// wake). A placement that no longer holds (the job was removed, the node lost or filled
    /// meanwhile) is dropped, and the next pass looks again.
    pub fn apply<'s>(&mut self, snap: &'s Snapshot, decision: Decision, now: u64) -> Vec<&'s str> {
        for c in &decision.evaluated {
            self.waiting.remove(c);
        }
        self.waiting.extend(decision.waiting);
        let mut placed = Vec::new();
        let mut short = self.groups_short(&decision.placements);
        short.extend(self.groups_unstartable(snap, &decision.placements));
        for p in decision.placements {
            // A group waits for room for all its VMs; a grid VM, for its address to be free.
            let Some(j) = self.jobs.get(&p.job) else { continue };
            let grouped = self.specs.get(&j.spec_id).is_some_and(|s| s.spec.group.is_some());
            if short.contains(&j.spec_id) || self.address_taken(p.job) {
                continue;
            }
            // A node is filed under its ad's name.
            let name = &snap.slots[p.node].ad.name;
            if self.still_fits(p.job, name, !grouped) {
                self.place(p.job, name, now);
                placed.push(name.as_str());
            } else {
                self.dirty = true;
            }
        }
        placed
    }

    /// Takes back a pass's slots once it is applied, for the next pass to refresh (the rest of
    /// the snapshot is the caller's to drop, after the engine's lock). A snapshot with nothing to
    /// place took no slots (the cache still has them).
    pub fn recycle(&mut self, snap: &mut Snapshot) {
        if self.slot_cache.is_empty() {
            self.slot_cache = std::mem::take(&mut snap.slots);
        }
    }

    /// That a pass's slots, refreshed from the last pass's, are what a copy of every ready node
    /// would give (every snapshot the engine's unit and property tests take is checked).
    #[cfg(test)]
    fn check_slots(&self, slots: &[NodeSlot]) {
        let ready = self.nodes.values().filter(|n| n.state == NodeState::Ready && !n.silent);
        let fresh: Vec<_> = ready
            .map(|n| {
                let (cpus, memory) = n.free();
                (Arc::as_ptr(&n.ad), cpus, memory, n.jobs.len() as u32, self.reputation(&n.ad.name).to_bits())
            })
            .collect();
        let seen: Vec<_> = slots
            .iter()
            .map(|s| (Arc::as_ptr(&s.ad), s.free_cpus, s.free_memory_mb, s.running_jobs, s.reputation.to_bits()))
            .collect();
        assert_eq!(seen, fresh, "a pass's slots are the ready nodes as they are");
    }

    /// Whether job `id` is still idle and node `name` still ready, heard from, and with room (free,
    /// or lease-ahead if `ahead`).
    pub(super) fn still_fits(&self, id: u64, name: &str, ahead: bool) -> bool {
        let Some(j) = self.jobs.get(&id).filter(|j| j.state == JobState::Idle) else { return false };
        let Some(spec) = self.specs.get(&j.spec_id) else { return false };
        let Some(n) = self.nodes.get(name).filter(|n| n.state == NodeState::Ready && !n.silent) else { return false };
        // Its free cpus and memory, or its lease-ahead (the pass used that only for what no free
        // cpu took); a time-shared job starts at once, in free memory.
        let ((cpus, memory), (ahead_cpus, ahead_memory)) = (n.free(), n.ahead_room());
        let need = &spec.spec;
        let fits = if need.cpus == 0 {
            memory >= need.memory_mb
        } else {
            (cpus >= need.cpus && memory >= need.memory_mb)
                || (ahead && ahead_cpus >= need.cpus && ahead_memory >= need.memory_mb)
        };
        fits && self.within_quota(&j.owner, spec.spec.cpus)
    }

    /// Job `id` runs on node `name` under a new epoch, queued there until the node collects it.
    fn place(&mut self, id: u64, name: &str, now: u64) {
        let (cpus, mem, owner) = {
            let j = &self.jobs[&id];
            let spec = &self.specs[&j.spec_id].spec;
            (spec.cpus, spec.memory_mb, j.owner.clone())
        };
        // Charged from now if its node can run it now; else once the jobs before it end.
        let n = &self.nodes[name];
        let charged = cpus == 0 || n.charged_cpus + cpus <= n.ad.cpus;
        self.user_started(&owner, cpus, charged, now);
        let j = self.jobs.get_mut(&id).expect("placed jobs exist");
        j.state = JobState::Running;
        j.started_ms = Some(now);
        j.node = Some(Arc::from(name));
        j.epoch += 1;
        j.attempts += 1;
        j.reason = None;
        j.avoid = None;
        self.blocked_since.remove(&id);
        // Its new attempt resumes from its latest checkpoint, if it has one.
        if let Some(ck) = j.ck.as_deref_mut() {
            ck.resumed_from = ck.latest.as_ref().map(|c| c.seq);
        }
        j.lease_deadline_ms = now + self.timing.lease_ttl_ms;
        self.unset_idle(id);
        let n = self.nodes.get_mut(name).expect("placed on a known node");
        n.pending.push_back(id);
        n.jobs.insert(id);
        n.used_cpus += cpus;
        n.used_memory_mb += mem;
        if charged {
            n.charged_cpus += cpus;
        } else {
            n.uncharged.push_back(id);
        }
        self.persist(id, false);
    }
}
