//! A pass's ready nodes are refreshed in place from the last pass's (`Engine::slot_cache`): what
//! it sees must be what a copy of every ready node would give, whatever joined, left, registered
//! again, drained or took work since.

use super::tests::{TIMING, ad, exited, spec};
use super::*;

/// Name, free cpus, free memory, running jobs and reputation of each slot.
type Seen = Vec<(String, u32, u64, u32, u64)>;

/// Every ready node, in order, as a copy of each would give.
fn fresh(e: &Engine) -> Seen {
    let ready = e.nodes.values().filter(|n| n.state == NodeState::Ready && !n.silent);
    ready
        .map(|n| {
            let (cpus, memory) = n.free();
            (n.ad.name.clone(), cpus, memory, n.jobs.len() as u32, e.reputation(&n.ad.name).to_bits())
        })
        .collect()
}

fn seen(snap: &Snapshot) -> Seen {
    let slot = |s: &vmgrid_scheduler::NodeSlot| {
        (s.ad.name.clone(), s.free_cpus, s.free_memory_mb, s.running_jobs, s.reputation.to_bits())
    };
    snap.slots.iter().map(slot).collect()
}

/// Submits a job (so that the pass copies the nodes), checks what the pass sees, runs it and
/// gives its slots back; returns the names it saw.
fn pass(e: &mut Engine, now: u64) -> Vec<String> {
    e.submit(&Principal::User("alice".into()), spec(0), 1, now).unwrap();
    let mut snap = e.snapshot(now).expect("a submit calls for a pass");
    let saw = seen(&snap);
    assert_eq!(saw, fresh(e), "the pass at {now} sees the ready nodes as they are");
    let decision = snap.decide();
    e.apply(&snap, decision, now);
    e.recycle(&mut snap);
    e.check_invariants().unwrap();
    saw.into_iter().map(|s| s.0).collect()
}

/// Every node collects its leases and reports them done: cpus free up between passes.
fn finish_all(e: &mut Engine, now: u64) {
    let names: Vec<String> = e.nodes.keys().cloned().collect();
    for n in names {
        let done: Vec<Report> = e.take_leases(&n, 100, 100, now).iter().map(|l| exited(l, 0)).collect();
        if !done.is_empty() {
            e.report(&n, done, now).unwrap();
        }
    }
}

#[test]
fn a_pass_sees_the_ready_nodes_as_they_are_after_joins_leaves_and_placements() {
    let mut e = Engine::new(TIMING);
    for n in ["b", "d", "f"] {
        e.register(ad(n, 2), None, false, hash_token(n), 0).unwrap();
    }
    assert_eq!(pass(&mut e, 1), ["b", "d", "f"]);
    // The same nodes: refreshed in place, with the first job's node busy, then free again.
    pass(&mut e, 2);
    finish_all(&mut e, 2);
    pass(&mut e, 3);
    e.set_ahead("f", 2, 3);
    pass(&mut e, 3);
    assert_eq!(e.slot_cache.len(), 3, "the slots are given back");
    // A pass with nothing to place takes no slots and keeps the cache.
    e.dirty = true;
    let mut nothing = e.snapshot(3).expect("dirty");
    assert!(nothing.is_empty() && nothing.slots.is_empty());
    e.recycle(&mut nothing);
    assert_eq!(e.slot_cache.len(), 3, "a pass with nothing to place leaves the cache as it was");
    // Joins before, between and after the others.
    for (n, cpus) in [("a", 1), ("e", 4), ("g", 2)] {
        e.register(ad(n, cpus), None, false, hash_token(n), 4).unwrap();
    }
    assert_eq!(pass(&mut e, 5), ["a", "b", "d", "e", "f", "g"]);
    // One leaves; one registers again (a new ad under the same name, in the same place).
    e.deregister("d", 6);
    e.register(ad("b", 3), Some("b"), false, hash_token("b2"), 6).unwrap();
    assert_eq!(pass(&mut e, 7), ["a", "b", "e", "f", "g"]);
    assert_eq!(e.slot_cache[1].ad.cpus, 3, "b's slot has its new ad");
    // One drains: it takes no new work and leaves the pass.
    e.heartbeat("e", &[], true, 8).unwrap();
    assert_eq!(pass(&mut e, 9), ["a", "b", "f", "g"]);
    // The last one goes: the cache is cut short.
    e.deregister("g", 10);
    assert_eq!(pass(&mut e, 11), ["a", "b", "f"]);
}

#[test]
fn the_lease_ahead_step_leaves_the_slots_as_the_first_step_left_them() {
    // One cpu and room for two more ahead: the first step takes the cpu, the second queues two.
    let mut e = Engine::new(TIMING);
    e.register(ad("a", 1), None, false, hash_token("a"), 0).unwrap();
    e.set_ahead("a", 2, 0);
    e.submit(&Principal::User("alice".into()), spec(0), 3, 1).unwrap();
    let mut snap = e.snapshot(1).expect("a submit calls for a pass");
    let before = seen(&snap);
    let decision = snap.decide();
    assert_eq!(decision.placements.len(), 3, "one on the free cpu, two queued ahead");
    // Time-shared jobs, placed after the lease-ahead step, see these: one job's worth taken.
    let after = seen(&snap);
    let memory = spec(0).memory_mb;
    assert_eq!(
        (after[0].1, after[0].2, after[0].3),
        (before[0].1 - 1, before[0].2 - memory, before[0].3 + 1),
        "the slots as the first step left them"
    );
}
