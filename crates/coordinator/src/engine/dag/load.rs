//! Workflows rebuilt from the store at start (each running one then takes the steps it can),
//! and their invariants, part of [`Engine::check_invariants`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use vmgrid_proto::*;

use super::{Dag, DagNode, waiting};
use crate::engine::{Engine, Event};
use crate::store::{DagRow, NodeRun};

impl Engine {
    /// A workflow's invariants (part of [`Engine::check_invariants`]): a released node's run is
    /// filed under its spec and all its jobs exist with that spec; a waiting node has no run; a
    /// running workflow has a node that has not ended, an ended one has none.
    pub(in crate::engine) fn check_dags(&self) -> Result<(), String> {
        for (&id, d) in &self.dags {
            if d.nodes.len() != d.spec.nodes.len() || id >= self.next_dag {
                return Err(format!("workflow {id} has {} node rows for {} nodes", d.nodes.len(), d.spec.nodes.len()));
            }
            for (i, n) in d.nodes.iter().enumerate() {
                let name = &d.spec.nodes[i].name;
                match (n.run, n.spec_id, n.first_job) {
                    (NodeRun::Released, Some(spec), Some(_)) => {
                        if self.dag_specs.get(&spec) != Some(&(id, i)) {
                            return Err(format!("workflow {id} node {name}: its spec {spec} is not filed under it"));
                        }
                        if let Some(job) = d.jobs_of(i).find(|j| self.jobs.get(j).is_none_or(|j| j.spec_id != spec)) {
                            return Err(format!(
                                "workflow {id} node {name}: job {job} is missing or not of spec {spec}"
                            ));
                        }
                    }
                    (NodeRun::Released, _, _) => {
                        return Err(format!("workflow {id} node {name} is released without jobs"));
                    }
                    (NodeRun::Waiting, Some(_), _) => {
                        return Err(format!("workflow {id} node {name} waits with a run"));
                    }
                    _ => {}
                }
            }
            let all_ended = d.nodes.iter().all(|n| n.run.ended());
            if (d.state == DagState::Running) == all_ended {
                return Err(format!("workflow {id} is {} with all its nodes ended: {all_ended}", d.state.as_str()));
            }
            // What is derived from the runs agrees with them.
            let fresh = Dag::new(d.owner.clone(), d.spec.clone(), d.nodes.clone(), 0, None);
            if (&fresh.children, &fresh.pending, fresh.open) != (&d.children, &d.pending, d.open) {
                return Err(format!("workflow {id}: its parents' counts or open nodes disagree with its nodes"));
            }
            if d.state != DagState::Running && self.kept_for_dags.contains_key(&id) {
                return Err(format!("workflow {id} ended but holds finished jobs out of retention"));
            }
        }
        let mut reserved: HashMap<&str, u64> = HashMap::new();
        for d in self.dags.values().filter(|d| d.state == DagState::Running) {
            *reserved.entry(&d.owner).or_default() += d.reserved();
        }
        reserved.retain(|_, r| *r > 0);
        let held: HashMap<&str, u64> = self.dag_reserved.iter().map(|(o, r)| (&**o, *r)).collect();
        if reserved != held {
            return Err(format!("workflows reserve {reserved:?} of their owners' queues, the engine counts {held:?}"));
        }
        Ok(())
    }

    /// Workflows from the store; each running one then takes the steps it can (what happened
    /// to its jobs while the coordinator was down, or between two of its commits).
    pub(in crate::engine) fn load_dags(&mut self, dags: Vec<(DagRow, Vec<crate::store::DagNodeRow>)>, now: u64) {
        let mut running = Vec::new();
        for (row, rows) in dags {
            self.next_dag = self.next_dag.max(row.id + 1);
            let spec = match serde_json::from_str::<DagSpec>(&row.json) {
                Ok(s) => s,
                Err(e) => {
                    self.event(Event::UnreadableDag { dag: row.id, why: e.to_string() });
                    continue;
                }
            };
            let mut nodes = vec![waiting(); spec.nodes.len()];
            for r in rows {
                if let Some(n) = nodes.get_mut(r.idx as usize) {
                    *n = DagNode {
                        run: r.state,
                        tries: r.tries,
                        spec_id: r.spec_id,
                        first_job: r.first_job,
                        reason: r.reason,
                        progress: RefCell::default(),
                    };
                    if r.state == NodeRun::Released
                        && let Some(spec_id) = r.spec_id
                    {
                        self.dag_specs.insert(spec_id, (row.id, r.idx as usize));
                    }
                }
            }
            let mut d = Dag::new(Arc::from(row.owner.as_str()), spec, nodes, row.submitted_ms, row.rescue_of);
            (d.state, d.reason, d.finished_ms) = (row.state, row.reason, row.finished_ms);
            if d.state == DagState::Running {
                running.push(row.id);
                let reserve = d.reserved();
                self.reserve(&d.owner.clone(), reserve, true);
            }
            self.dags.insert(row.id, d);
        }
        for id in running {
            self.advance_dag(id, now);
        }
    }
}
