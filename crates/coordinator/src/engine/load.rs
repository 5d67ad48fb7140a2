//! The engine rebuilt from what the store held at start: tokens, specs, jobs, nodes and workflows, with
//! running jobs given back to their nodes (and a fresh lease to be heard from), and anything that
//! cannot be read back held with the reason instead of taking the coordinator down.

use std::collections::HashMap;
use std::sync::Arc;

use vmgrid_proto::*;
use vmgrid_scheduler::Cluster;

use super::{Engine, Event, Job, Node, Principal, SpecEntry, Timing, TokenEntry, cluster_of};
use crate::store::{Loaded, StoredJob, StoredNode};

impl Engine {
    /// The engine for a store's contents at `now`.
    pub fn load(loaded: Loaded, timing: Timing, now: u64) -> Engine {
        let mut e = Engine::new(timing);
        e.next_job = e.next_job.max(loaded.next_job);
        e.next_spec = e.next_spec.max(loaded.next_spec);
        for t in loaded.tokens {
            if let Some(principal) = Principal::from_row(t.role, t.owner, t.detail) {
                let entry = TokenEntry { id: t.id, principal, created_ms: t.created_ms, expires_ms: t.expires_ms };
                e.tokens.insert(t.hash, entry);
            }
        }
        // Specs that no longer read back, or whose expressions this version refuses, hold their
        // jobs with the reason instead of failing the start.
        let mut unusable = HashMap::new();
        for (id, _owner, json) in loaded.specs {
            if let Err(why) = e.load_spec(id, &json) {
                unusable.insert(id, why);
            }
        }
        let mut owners: HashMap<String, Arc<str>> = HashMap::new();
        for stored in loaded.jobs {
            let owner = owners.entry(stored.owner.clone()).or_insert_with(|| Arc::from(stored.owner.as_str())).clone();
            e.load_job(stored, owner, now, &unusable);
        }
        for u in loaded.users {
            e.load_user(u);
        }
        for b in loaded.blobs {
            e.load_blob(b.hash, b.owner, b.size, b.created_ms);
        }
        for StoredNode { name, ad_json, cred_hash, state } in loaded.nodes {
            let Ok(ad) = serde_json::from_str::<NodeAd>(&ad_json) else { continue };
            e.nodes.insert(name, Node::new(ad, state, cred_hash, now));
        }
        e.give_running_jobs_back(now);
        e.users_loaded(now);
        e.next_dag = e.next_dag.max(loaded.last_dag_id + 1);
        e.history = crate::history::History::from_stored(loaded.samples);
        e.trust = loaded.trust.into_iter().collect();
        e.load_dags(loaded.dags, now);
        e
    }

    /// Loads spec `id`; a spec that no longer parses, or whose expressions do not compile
    /// under this version's rules, is kept (matching no node) and the reason returned.
    fn load_spec(&mut self, id: u64, json: &str) -> Result<(), String> {
        self.next_spec = self.next_spec.max(id + 1);
        let spec = match serde_json::from_str::<JobSpec>(json) {
            Ok(spec) => spec,
            Err(e) => {
                self.event(Event::UnreadableSpec { spec: id, why: e.to_string() });
                return Err(format!("its spec {id} could not be read back from the store"));
            }
        };
        let (cluster, result) = match cluster_of(&spec) {
            Ok(c) => (c, Ok(())),
            Err(e) => {
                self.event(Event::UnreadableSpec { spec: id, why: e.to_string() });
                let never = Cluster::compile(spec.vm_type, spec.cpus, spec.memory_mb, Some("false"), None)
                    .expect("`false` compiles");
                (never, Err(format!("held at the coordinator's start: {e}")))
            }
        };
        self.specs.insert(id, Arc::new(SpecEntry { spec, cluster }));
        result
    }

    fn load_job(&mut self, s: StoredJob, owner: Arc<str>, now: u64, unusable: &HashMap<u64, String>) {
        let row = s.row;
        let mut state = row.state;
        let mut reason = row.reason;
        if !state.is_final()
            && (state != JobState::Held || reason.is_none())
            && let Some(why) = unusable.get(&s.spec_id)
        {
            state = JobState::Held;
            reason = Some(why.clone());
        }
        let job = Job {
            id: row.id,
            spec_id: s.spec_id,
            index: s.index,
            owner,
            state,
            node: row.node.map(|n| Arc::from(n.as_str())),
            epoch: row.epoch,
            attempts: row.attempts,
            retries: row.retries,
            losses: row.losses,
            exit_code: row.exit_code,
            reason,
            submitted_ms: s.submitted_ms,
            started_ms: row.started_ms,
            finished_ms: row.finished_ms,
            // A restarted coordinator gives running jobs a full lease to be heard from again.
            lease_deadline_ms: now + self.timing.lease_ttl_ms,
            result: row.result.map(Box::new),
            history: row.history,
            counted: state,
            ck: row.checkpoint,
            votes: row.votes,
            vacating: false,
            avoid: None,
        };
        self.by_state[state as usize] += 1;
        self.next_job = self.next_job.max(job.id + 1);
        if job.state.is_final() {
            self.final_by_time.insert((job.finished_ms.unwrap_or(0), job.id));
        } else {
            *self.queued.entry(job.owner.clone()).or_default() += 1;
        }
        *self.spec_jobs.entry(job.spec_id).or_default() += 1;
        let id = job.id;
        self.owners.add(&job.owner, id, id);
        self.jobs.insert(id, job);
        if state == JobState::Idle {
            self.set_idle(id);
        }
    }

    /// Running jobs belong to their nodes again, with their resources; a job whose node is no
    /// longer registered, or was lost (a crash between two commits of one change), runs again.
    fn give_running_jobs_back(&mut self, now: u64) {
        let running: Vec<(u64, String, u32, u64, Arc<str>)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .map(|j| {
                let spec = &self.specs[&j.spec_id].spec;
                (j.id, j.node.as_deref().unwrap_or("").to_string(), spec.cpus, spec.memory_mb, j.owner.clone())
            })
            .collect();
        for (id, node, cpus, mem, owner) in running {
            match self.nodes.get_mut(&node).filter(|n| n.state != NodeState::Lost) {
                Some(n) => {
                    n.jobs.insert(id);
                    n.used_cpus += cpus;
                    n.used_memory_mb += mem;
                    // Jobs beyond its cpus were queued ahead: charged as the ones before end.
                    let charged = cpus == 0 || n.charged_cpus + cpus <= n.ad.cpus;
                    if charged {
                        n.charged_cpus += cpus;
                    } else {
                        n.uncharged.push_back(id);
                    }
                    self.user_runs_at_load(&owner, cpus, charged);
                }
                None => {
                    let j = self.jobs.get_mut(&id).expect("listed above");
                    let why = format!("requeued at restart: its node {node:?} is lost or no longer registered");
                    j.end_attempt(now, why.clone());
                    j.state = JobState::Idle;
                    j.node = None;
                    j.reason = Some(why);
                    j.finished_ms = None;
                    self.set_idle(id);
                    self.persist(id, false);
                }
            }
        }
    }
}
