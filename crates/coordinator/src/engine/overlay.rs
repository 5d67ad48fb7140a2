//! The pool's virtual network as the engine sees it: the groups of a node's running grid jobs
//! and where their other members run. Addresses are a function of job ids
//! ([`vmgrid_proto::overlay::addr_of`]), so nothing here is stored beyond the jobs themselves.

use vmgrid_proto::overlay::{OverlayGroup, OverlayMember, addr_of, group_of};
use vmgrid_proto::{JobState, Network};

use super::Engine;

impl Engine {
    /// For each grid job running on `node`: the members of its group that run now, and where.
    pub fn overlay_groups(&self, node: &str) -> Vec<OverlayGroup> {
        let Some(n) = self.nodes.get(node) else { return Vec::new() };
        let mut groups = Vec::new();
        for &id in &n.jobs {
            let Some(job) = self.jobs.get(&id) else { continue };
            let Some(entry) = self.specs.get(&job.spec_id) else { continue };
            if entry.spec.network != Network::Grid {
                continue;
            }
            let members = group_of(id, job.index, entry.spec.group)
                .into_iter()
                .filter_map(|m| {
                    let j = self.jobs.get(&m)?;
                    let at = j.node.as_deref().filter(|_| j.state == JobState::Running && j.spec_id == job.spec_id)?;
                    Some(OverlayMember { job_id: m, addr: addr_of(m), node: at.to_string() })
                })
                .collect();
            groups.push(OverlayGroup { job_id: id, members });
        }
        groups
    }
}
