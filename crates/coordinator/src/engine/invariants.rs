//! The engine's internal consistency, stated once and checked by [`Engine::check_invariants`]:
//! the indexes agree with the jobs (idle sets, node queues, each owner's ids, per-user and per-spec counts, the
//! retention index, each user's running jobs and cpus for fair share), no node holds more
//! than it offers, each job's past attempts are bounded and in order, and workflows agree with their jobs (`dag.rs`'s `check_dags`). The state-machine property test
//! (engine/proptests.rs) and the fuzz targets (fuzz/) call it after every step.

use std::collections::{HashMap, HashSet};

use vmgrid_proto::*;

use super::Engine;

impl Engine {
    /// Every internal invariant, or the first one broken, in words. It walks the whole state
    /// (O(jobs + nodes)): for tests and fuzzing, not for the request path.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_jobs()?;
        self.check_owners()?;
        self.check_replicas()?;
        self.check_nodes()?;
        self.check_counts()?;
        self.check_state_counts()?;
        self.check_users()?;
        self.check_dags()
    }

    fn check_jobs(&self) -> Result<(), String> {
        for (&id, j) in &self.jobs {
            if j.id != id {
                return Err(format!("job {id} is filed under id {}", j.id));
            }
            if id >= self.next_job || j.spec_id >= self.next_spec {
                return Err(format!("job {id} (spec {}) is beyond the next ids", j.spec_id));
            }
            if !self.specs.contains_key(&j.spec_id) {
                return Err(format!("job {id} refers to spec {}, which is gone", j.spec_id));
            }
            let numbers: Vec<u32> = j.history.iter().map(|a| a.attempt).collect();
            if numbers.len() > MAX_PAST_ATTEMPTS
                || numbers.windows(2).any(|w| w[0] >= w[1])
                || numbers.last().is_some_and(|&n| n > j.attempts)
            {
                return Err(format!("job {id} ({} attempts) has the history {numbers:?}", j.attempts));
            }
            let idle = self.idle_by_spec.get(&j.spec_id).is_some_and(|s| s.contains(&id));
            if idle != (j.state == JobState::Idle) {
                return Err(format!(
                    "job {id} is {} but {}in the idle index",
                    j.state.as_str(),
                    if idle { "" } else { "not " }
                ));
            }
            let on: Vec<&str> =
                self.nodes.iter().filter(|(_, n)| n.jobs.contains(&id)).map(|(k, _)| k.as_str()).collect();
            match (j.state, j.node.as_deref()) {
                (JobState::Running, Some(node)) if on == [node] => {}
                (JobState::Running, node) => {
                    return Err(format!("running job {id} names node {node:?} but is held by {on:?}"));
                }
                (_, _) if !on.is_empty() => {
                    return Err(format!("job {id} is {} but still held by {on:?}", j.state.as_str()));
                }
                _ => {}
            }
            let key = (j.finished_ms.unwrap_or(0), id);
            let retained =
                self.final_by_time.contains(&key) || self.kept_for_dags.values().any(|kept| kept.contains(&key));
            if retained != j.state.is_final() {
                return Err(format!(
                    "job {id} is {} and {}in the retention index",
                    j.state.as_str(),
                    if retained { "" } else { "not " }
                ));
            }
        }
        for (spec, ids) in &self.idle_by_spec {
            if ids.is_empty() {
                return Err(format!("spec {spec} has an empty idle set"));
            }
            if let Some(id) = ids.iter().find(|id| !self.jobs.contains_key(id)) {
                return Err(format!("the idle set of spec {spec} holds job {id}, which is gone"));
            }
        }
        let kept: usize = self.kept_for_dags.values().map(Vec::len).sum();
        if self.final_by_time.len() + kept != self.jobs.values().filter(|j| j.state.is_final()).count() {
            return Err("the retention index holds jobs that are gone".into());
        }
        Ok(())
    }

    /// A replicated job's votes come from distinct nodes, fewer than it may ever hold, and a job
    /// that ended holds none; a job set aside as blocked is idle.
    fn check_replicas(&self) -> Result<(), String> {
        for (&id, j) in self.jobs.iter().filter(|(_, j)| !j.votes.is_empty()) {
            let replicas = self.specs.get(&j.spec_id).and_then(|s| s.spec.replicas).unwrap_or(1);
            let mut nodes: Vec<&str> = j.votes.iter().map(|v| v.node.as_str()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            if nodes.len() != j.votes.len() || j.votes.len() as u32 >= replicas * super::replicas::MAX_RUNS_PER_REPLICA
            {
                return Err(format!("job {id} (replicas {replicas}) holds the votes of {nodes:?}"));
            }
            if j.state.is_final() {
                return Err(format!("job {id} is {} but holds {} votes", j.state.as_str(), j.votes.len()));
            }
        }
        if let Some(id) =
            self.blocked_since.keys().find(|id| self.jobs.get(id).is_none_or(|j| j.state != JobState::Idle))
        {
            return Err(format!("job {id} is set aside as blocked but is not an idle job"));
        }
        Ok(())
    }

    fn check_nodes(&self) -> Result<(), String> {
        let mut addrs = HashSet::new();
        for (name, n) in &self.nodes {
            let addr = n.ad.ad().overlay.as_ref().and_then(|o| o.addr).filter(|_| n.state != NodeState::Lost);
            if addr.is_some_and(|a| !addrs.insert(a)) {
                return Err(format!("node {name}'s overlay address {addr:?} is another node's too"));
            }
            if let Some(o) = &n.ad.ad().overlay
                && o.addr.is_some_and(|a| !o.host || !vmgrid_proto::overlay::is_node_addr(a))
            {
                return Err(format!(
                    "node {name} has overlay address {:?} without being on it, or outside its range",
                    o.addr
                ));
            }
            if n.ad.name != *name {
                return Err(format!("node {name} is filed under its ad's name {}", n.ad.name));
            }
            if n.state == NodeState::Lost && !n.jobs.is_empty() {
                return Err(format!("lost node {name} still holds jobs {:?}", n.jobs));
            }
            let pending: HashSet<u64> = n.pending.iter().copied().collect();
            if pending.len() != n.pending.len() || !pending.is_subset(&n.jobs.iter().copied().collect()) {
                return Err(format!("node {name}: queue {:?} is not a set of its jobs {:?}", n.pending, n.jobs));
            }
            let (mut cpus, mut mem) = (0u64, 0u64);
            for id in &n.jobs {
                let spec = &self.specs[&self.jobs[id].spec_id].spec;
                cpus += u64::from(spec.cpus);
                mem += spec.memory_mb;
            }
            if (cpus, mem) != (u64::from(n.used_cpus), n.used_memory_mb) {
                return Err(format!(
                    "node {name} counts {} cpus and {} MiB in use; its jobs hold {cpus} and {mem}",
                    n.used_cpus, n.used_memory_mb
                ));
            }
            // Its cpus and memory, and at most its lease-ahead's bound beyond them (a node that
            // asks for less lease-ahead keeps what was already placed).
            let most = 1 + u64::from(MAX_AHEAD_PER_CPU);
            if u64::from(n.used_cpus) > u64::from(n.ad.cpus) * most || n.used_memory_mb > n.ad.memory_mb * most {
                return Err(format!(
                    "node {name} holds {} cpus and {} MiB, more than {most} times its {} and {}",
                    n.used_cpus, n.used_memory_mb, n.ad.cpus, n.ad.memory_mb
                ));
            }
        }
        Ok(())
    }

    fn check_counts(&self) -> Result<(), String> {
        let mut queued: HashMap<&str, u64> = HashMap::new();
        let mut per_spec: HashMap<u64, u64> = HashMap::new();
        for j in self.jobs.values() {
            if !j.state.is_final() {
                *queued.entry(&j.owner).or_default() += 1;
            }
            *per_spec.entry(j.spec_id).or_default() += 1;
        }
        for (owner, n) in &self.queued {
            if queued.get(&**owner).copied().unwrap_or(0) != *n {
                return Err(format!("{owner} is counted with {n} queued jobs, and has {:?}", queued.get(&**owner)));
            }
        }
        if let Some((owner, _)) = queued.iter().find(|(o, _)| !self.queued.contains_key(**o)) {
            return Err(format!("{owner}'s queued jobs are not counted"));
        }
        let counted: HashMap<u64, u64> = self.spec_jobs.iter().map(|(k, v)| (*k, *v)).collect();
        if counted != per_spec {
            return Err(format!("jobs per spec are counted as {counted:?}, and are {per_spec:?}"));
        }
        if let Some(spec) = self.specs.keys().find(|s| !per_spec.contains_key(s)) {
            return Err(format!("spec {spec} is kept with no job"));
        }
        Ok(())
    }

    /// Each user's running jobs and cpus, which fair share orders users by, are those of the
    /// jobs that nodes hold for them.
    fn check_users(&self) -> Result<(), String> {
        let mut held: HashMap<&str, (u64, u64, u64)> = HashMap::new();
        for (name, n) in &self.nodes {
            let mut node_charged = 0;
            for id in &n.jobs {
                let j = &self.jobs[id];
                let cpus = u64::from(self.specs[&j.spec_id].spec.cpus);
                let e = held.entry(&j.owner).or_default();
                e.0 += 1;
                e.1 += cpus;
                if !n.uncharged.contains(id) {
                    e.2 += cpus;
                    node_charged += cpus;
                }
            }
            if node_charged != u64::from(n.charged_cpus) || n.charged_cpus > n.ad.cpus {
                return Err(format!(
                    "node {name} charges {} cpus; its jobs not queued ahead hold {node_charged}",
                    n.charged_cpus
                ));
            }
            if n.uncharged.iter().any(|id| !n.jobs.contains(id)) {
                return Err(format!("node {name}: jobs queued ahead {:?} are not all its jobs", n.uncharged));
            }
        }
        for (user, u) in &self.users {
            let (jobs, cpus, charged) = held.remove(&**user).unwrap_or_default();
            if (u.running_jobs, u.running_cpus, u.charged_cpus) != (jobs, cpus, charged) {
                return Err(format!(
                    "{user} is counted running {} jobs on {} cpus, {} charged; nodes hold {jobs} on {cpus}, {charged} charged",
                    u.running_jobs, u.running_cpus, u.charged_cpus
                ));
            }
        }
        match held.into_iter().next() {
            Some((user, _)) => Err(format!("{user} runs jobs and is not counted")),
            None => Ok(()),
        }
    }
}
