//! The pool's virtual network as the engine sees it: the groups of a node's running grid jobs
//! and where their other members run. Addresses are a function of job ids
//! ([`vmgrid_proto::overlay::addr_of`]), so nothing here is stored beyond the jobs themselves.

use std::collections::{HashMap, HashSet};

use std::net::Ipv4Addr;

use vmgrid_proto::overlay::{
    HOSTS, NODE_ADDRS, OverlayGroup, OverlayHost, OverlayHostMember, OverlayMember, addr_of, group_of, node_addr,
};
use vmgrid_proto::{JobState, Network, NodeAd, NodeState};

use super::Engine;

impl Engine {
    /// Gang placement: the job groups (`JobSpec::group`) of which a pass placed some idle members
    /// but not all. Their placements are dropped, so a group's VMs start together; they wait for
    /// a pass with room for all of them (a change of the pool makes one).
    pub(super) fn groups_short(&self, placements: &[vmgrid_scheduler::Placement]) -> HashSet<u64> {
        let mut placed: HashMap<u64, usize> = HashMap::new();
        for p in placements {
            let Some(j) = self.jobs.get(&p.job) else { continue };
            if self.specs.get(&j.spec_id).is_some_and(|s| s.spec.group.is_some()) {
                *placed.entry(j.spec_id).or_default() += 1;
            }
        }
        placed
            .into_iter()
            .filter(|(spec, n)| self.idle_by_spec.get(spec).map_or(0, |ids| ids.len()) > *n)
            .map(|(spec, _)| spec)
            .collect()
    }

    /// The groups of which a member the pass placed could not start at once. The placements are
    /// walked in the order they will be made, each charged to its node's free room: a member
    /// that does not fit in what is left (it would be queued in the node's lease-ahead, behind
    /// other jobs), or whose address a running job or an earlier placement has, keeps its whole
    /// group waiting.
    pub(super) fn groups_unstartable(
        &self,
        snap: &super::Snapshot,
        placements: &[vmgrid_scheduler::Placement],
    ) -> HashSet<u64> {
        let mut free: HashMap<&str, (u32, u64)> = HashMap::new();
        let mut addrs = HashSet::new();
        let mut short = HashSet::new();
        for p in placements {
            let Some(j) = self.jobs.get(&p.job) else { continue };
            let Some(entry) = self.specs.get(&j.spec_id) else { continue };
            let (name, need) = (snap.slots[p.node].ad.name.as_str(), &entry.spec);
            let room = free.entry(name).or_insert_with(|| self.nodes.get(name).map_or((0, 0), |n| n.free()));
            let fits = room.0 >= need.cpus && room.1 >= need.memory_mb;
            if fits {
                *room = (room.0 - need.cpus, room.1 - need.memory_mb);
            }
            let fresh_address = need.network != Network::Grid || addrs.insert(addr_of(p.job));
            let startable = fits && fresh_address && !self.address_taken(p.job) && self.still_fits(p.job, name, false);
            if need.group.is_some() && !startable {
                short.insert(j.spec_id);
            }
        }
        short
    }

    /// Whether grid job `id` would share its overlay address with a grid job that runs now (ids
    /// [`HOSTS`] apart share one): it then waits until that one ends. There are `next_job /
    /// HOSTS` candidates: none below four million jobs.
    pub(super) fn address_taken(&self, id: u64) -> bool {
        if !self.jobs.get(&id).and_then(|j| self.specs.get(&j.spec_id)).is_some_and(|s| s.spec.network == Network::Grid)
        {
            return false;
        }
        let grid = |j: u64| {
            self.jobs.get(&j).is_some_and(|job| {
                job.state == JobState::Running
                    && self.specs.get(&job.spec_id).is_some_and(|s| s.spec.network == Network::Grid)
            })
        };
        (id % HOSTS..self.next_job).step_by(HOSTS as usize).any(|other| other != id && grid(other))
    }
}

impl Engine {
    /// Gives a registering node that is on the overlay itself (`overlay.host`) the address its
    /// previous registration had, if no other node holds it now, else the lowest address of
    /// [`vmgrid_proto::overlay::NODE_NET`] no other node in the pool holds (a lost node's is free
    /// again); any other node gets none, whatever its ad said.
    pub(super) fn give_node_address(&self, ad: &mut NodeAd) -> Result<(), String> {
        let Some(o) = ad.overlay.as_mut() else { return Ok(()) };
        o.addr = None;
        if !o.host {
            return Ok(());
        }
        let held: HashSet<Ipv4Addr> = self
            .nodes
            .iter()
            .filter(|(name, n)| **name != ad.name && n.state != NodeState::Lost)
            .filter_map(|(_, n)| n.ad.ad().overlay.as_ref()?.addr)
            .collect();
        let previous = self.nodes.get(&ad.name).and_then(|n| n.ad.ad().overlay.as_ref()?.addr);
        let free = previous.into_iter().chain((0..NODE_ADDRS).map(node_addr)).find(|a| !held.contains(a));
        o.addr =
            Some(free.ok_or_else(|| format!("the pool's overlay has no address left for a node ({NODE_ADDRS} held)"))?);
        Ok(())
    }

    /// The WireGuard key `node` registered with, if it is in the pool with one.
    pub fn overlay_key(&self, node: &str) -> Option<String> {
        let n = self.nodes.get(node).filter(|n| n.state != NodeState::Lost)?;
        Some(n.ad.ad().overlay.as_ref()?.key.clone())
    }

    /// For a node on the overlay itself: its address and every such node in the pool now.
    pub fn overlay_host(&self, node: &str) -> Option<OverlayHost> {
        let n = self.nodes.get(node).filter(|n| n.state != NodeState::Lost)?;
        let addr = n.ad.ad().overlay.as_ref()?.addr?;
        let members = self
            .nodes
            .iter()
            .filter(|(_, m)| m.state != NodeState::Lost)
            .filter_map(|(name, m)| {
                Some(OverlayHostMember { addr: m.ad.ad().overlay.as_ref()?.addr?, node: name.clone() })
            })
            .collect();
        Some(OverlayHost { addr, members })
    }

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

#[cfg(test)]
mod tests {
    use super::super::tests::{TIMING, ad, spec};
    use super::*;
    use crate::engine::{Principal, hash_token};

    #[test]
    fn a_job_groups_vms_are_placed_together_or_not_at_all() {
        let mut e = Engine::new(TIMING);
        let mut s = spec(0);
        s.vm_type = vmgrid_proto::VmType::Qemu;
        s.network = Network::Grid;
        s.group = Some(3);
        s.args.clear();
        let qemu_ad = |n: &str| vmgrid_proto::NodeAd { vm_types: vec![vmgrid_proto::VmType::Qemu], ..ad(n, 1) };
        let user = Principal::User("alice".into());
        let ids = e.submit(&user, s, 3, 0).unwrap();
        for n in ["a", "b"] {
            e.register(qemu_ad(n), None, false, hash_token(n), 0).unwrap();
        }
        e.schedule(1);
        assert!(ids.iter().all(|id| e.jobs[id].state == JobState::Idle), "two cpus for a group of three: none starts");
        e.register(qemu_ad("c"), None, false, hash_token("c"), 2).unwrap();
        e.schedule(3);
        assert!(ids.iter().all(|id| e.jobs[id].state == JobState::Running), "room for all three: all start");
        let groups = e.overlay_groups(e.jobs[&ids[0]].node.as_deref().unwrap());
        assert_eq!(groups.len(), 1);
        let members: Vec<u64> = groups[0].members.iter().map(|m| m.job_id).collect();
        assert_eq!(members, ids, "the map names every member, each on its node");
        assert_eq!(groups[0].members[2].addr, vmgrid_proto::overlay::addr_of(ids[2]));
    }

    /// A node with one free cpu and room ahead: the pass puts one member in the free cpu and the
    /// other in the lease-ahead; neither starts, for the second could not start at once.
    #[test]
    fn a_group_does_not_start_with_a_member_queued_ahead() {
        let mut e = Engine::new(TIMING);
        let qemu_ad = |n: &str| vmgrid_proto::NodeAd { vm_types: vec![vmgrid_proto::VmType::Qemu], ..ad(n, 2) };
        e.register(qemu_ad("a"), None, false, hash_token("a"), 0).unwrap();
        e.set_ahead("a", 1, 0);
        let user = Principal::User("alice".into());
        let mut busy = spec(0);
        busy.vm_type = vmgrid_proto::VmType::Qemu;
        busy.args.clear();
        let first = e.submit(&user, busy.clone(), 1, 0).unwrap()[0];
        e.schedule(1);
        assert_eq!(e.jobs[&first].state, JobState::Running);
        let mut s = busy;
        s.network = Network::Grid;
        s.group = Some(2);
        let ids = e.submit(&user, s, 2, 2).unwrap();
        e.schedule(3);
        assert!(
            ids.iter().all(|id| e.jobs[id].state == JobState::Idle),
            "one free cpu for a group of two: none starts"
        );
        e.check_invariants().unwrap();
    }

    #[test]
    fn nodes_on_the_overlay_get_addresses_from_the_pool_and_a_lost_ones_is_given_again() {
        use vmgrid_proto::overlay::{NodeOverlay, key_hex, node_addr};
        let mut e = Engine::new(TIMING);
        // Each claims an address: the pool ignores it.
        let on = |n: &str, host: bool| vmgrid_proto::NodeAd {
            overlay: Some(NodeOverlay { key: key_hex(&[n.as_bytes()[0]; 32]), host, addr: Some(node_addr(77)) }),
            ..ad(n, 1)
        };
        for (n, host) in [("a", true), ("b", true), ("c", false)] {
            e.register(on(n, host), None, false, hash_token(n), 0).unwrap();
        }
        assert_eq!(e.overlay_host("a").map(|h| h.addr), Some(node_addr(0)));
        assert_eq!(e.overlay_host("b").map(|h| h.addr), Some(node_addr(1)));
        assert_eq!(e.overlay_host("c"), None, "a node not on the overlay itself has no address");
        let members: Vec<(String, Ipv4Addr)> =
            e.overlay_host("a").unwrap().members.into_iter().map(|m| (m.node, m.addr)).collect();
        assert_eq!(members, vec![("a".into(), node_addr(0)), ("b".into(), node_addr(1))]);
        assert_eq!(e.overlay_key("c"), Some(key_hex(&[b'c'; 32])), "every node's key is registered");
        // The address is kept with the node's registration.
        let stored = e.take_effects().ops.iter().any(|op| {
            matches!(op, crate::store::Op::Node { name, ad_json, .. } if name == "b" && ad_json.contains("100.127.0.2"))
        });
        assert!(stored, "b's address is stored with it");
        // a is lost: its address is free, and the next node on the overlay gets it.
        e.live_node("b", 1500).unwrap();
        e.live_node("c", 1500).unwrap();
        e.tick(1500);
        assert_eq!(e.overlay_host("a"), None);
        assert_eq!(e.overlay_key("a"), None, "a lost node's key is no longer registered");
        e.register(on("d", true), None, false, hash_token("d"), 1500).unwrap();
        assert_eq!(e.overlay_host("d").map(|h| h.addr), Some(node_addr(0)));
        assert_eq!(e.overlay_host("b").unwrap().members.len(), 2, "b and d, not the lost a");
        // A node that registers again keeps its address while no other node holds it...
        e.register(on("b", true), Some("b"), false, hash_token("b2"), 1600).unwrap();
        assert_eq!(e.overlay_host("b").map(|h| h.addr), Some(node_addr(1)), "b keeps its address");
        // ...and gets another when one does (d took the lost a's).
        e.register(on("a", true), None, false, hash_token("a2"), 1600).unwrap();
        assert_eq!(e.overlay_host("a").map(|h| h.addr), Some(node_addr(2)));
        e.check_invariants().unwrap();
    }

    #[test]
    fn a_grid_job_waits_while_another_with_its_address_runs() {
        let mut e = Engine::new(TIMING);
        let mut s = spec(0);
        s.vm_type = vmgrid_proto::VmType::Qemu;
        s.network = Network::Grid;
        s.args.clear();
        let user = Principal::User("alice".into());
        let qemu_ad = |n: &str| vmgrid_proto::NodeAd { vm_types: vec![vmgrid_proto::VmType::Qemu], ..ad(n, 1) };
        for n in ["a", "b"] {
            e.register(qemu_ad(n), None, false, hash_token(n), 0).unwrap();
        }
        let first = e.submit(&user, s.clone(), 1, 0).unwrap()[0];
        e.schedule(1);
        assert_eq!(e.jobs[&first].state, JobState::Running);
        e.next_job = first + HOSTS;
        let twin = e.submit(&user, s, 1, 2).unwrap()[0];
        assert_eq!(addr_of(twin), addr_of(first));
        e.schedule(3);
        assert_eq!(e.jobs[&twin].state, JobState::Idle, "a free node, but the address is taken");
    }
}
