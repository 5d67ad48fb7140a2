//! One scheduling pass: the ready nodes' free resources and the idle jobs go into the pure
//! matchmaker (`vmgrid-scheduler`), and its placements become running jobs queued on their nodes.

use std::collections::HashSet;
use std::sync::Arc;

use vmgrid_proto::*;
use vmgrid_scheduler::{Decision, IdleJob, NodeSlot};

use super::Engine;

impl Engine {
    /// Runs the matchmaker over ready nodes and idle jobs, if anything changed since last time.
    /// Returns how many jobs it placed.
    pub fn schedule(&mut self, now: u64) -> usize {
        if !self.dirty {
            return 0;
        }
        self.dirty = false;
        // A node whose leases just expired is not given new work until it heartbeats again.
        let names: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Ready && !n.silent)
            .map(|(k, _)| k.clone())
            .collect();
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
        let decision = self.decide(&mut slots);
        for c in &decision.evaluated {
            self.waiting.remove(c);
        }
        self.waiting.extend(decision.waiting);
        let placed = decision.placements.len();
        for p in decision.placements {
            self.place(p.job, &names[p.node], now);
        }
        placed
    }

    /// The matchmaker's decision. Idle jobs are read lazily, oldest first, and the pass stops when
    /// the pool is full; time-shared jobs need no cpu, so they get a pass of their own over what
    /// is left.
    fn decide(&self, slots: &mut [NodeSlot]) -> Decision {
        let (jobs, specs) = (&self.jobs, &self.specs);
        let clusters = |c: u64| specs.get(&c).map(|s| &s.cluster);
        let idle = self.idle.iter().map(|id| IdleJob { id: *id, cluster: jobs[id].spec_id });
        let mut d = vmgrid_scheduler::place(slots, clusters, idle);
        if !self.shared_idle.is_empty() {
            let placed: HashSet<u64> = d.placements.iter().map(|p| p.job).collect();
            let shared = self
                .shared_idle
                .iter()
                .filter(|id| !placed.contains(id))
                .map(|id| IdleJob { id: *id, cluster: jobs[id].spec_id });
            let more = vmgrid_scheduler::place(slots, clusters, shared);
            d.placements.extend(more.placements);
            d.evaluated.extend(more.evaluated);
            d.waiting.extend(more.waiting);
        }
        d
    }

    /// Job `id` runs on node `name` under a new epoch, queued there until the node collects it.
    fn place(&mut self, id: u64, name: &str, now: u64) {
        let (cpus, mem) = {
            let spec = &self.specs[&self.jobs[&id].spec_id].spec;
            (spec.cpus, spec.memory_mb)
        };
        let j = self.jobs.get_mut(&id).expect("placed jobs exist");
        j.state = JobState::Running;
        j.node = Some(Arc::from(name));
        j.epoch += 1;
        j.attempts += 1;
        j.reason = None;
        j.lease_deadline_ms = now + self.timing.lease_ttl_ms;
        self.unset_idle(id);
        let n = self.nodes.get_mut(name).expect("placed on a known node");
        n.pending.push_back(id);
        n.jobs.insert(id);
        n.used_cpus += cpus;
        n.used_memory_mb += mem;
        self.persist(id, false);
    }
}
