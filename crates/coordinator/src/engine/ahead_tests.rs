//! Lease-ahead: a node may hold jobs beyond its cpus, queued until a cpu frees up, but only what
//! no free cpu in the pool could take; jobs it hands back unstarted return as if never handed
//! over, and its queued jobs go back to the pool when it is lost.

use super::tests::{TIMING, ad, exited, spec};
use super::*;

fn alice() -> Principal {
    Principal::User("alice".into())
}

fn admin() -> Principal {
    Principal::Admin("root".into())
}

fn engine_with(nodes: &[(&str, u32)]) -> Engine {
    let mut e = Engine::new(TIMING);
    for (name, cpus) in nodes {
        e.register(ad(name, *cpus), None, false, hash_token(name), 0).unwrap();
    }
    e
}

/// The nodes the jobs run on, in id order (`-` for none).
fn placement(e: &Engine) -> Vec<String> {
    e.job_views(&admin()).into_iter().map(|j| j.node.unwrap_or_else(|| "-".into())).collect()
}

#[test]
fn a_job_is_queued_ahead_only_when_no_node_has_a_free_cpu_for_it() {
    let mut e = engine_with(&[("a", 1), ("b", 1)]);
    e.set_ahead("a", 3, 0);
    e.submit(&alice(), spec(0), 2, 0).unwrap();
    e.schedule(1);
    let mut nodes = placement(&e);
    nodes.sort();
    assert_eq!(nodes, ["a", "b"], "b's free cpu is taken before a queues anything");
    e.submit(&alice(), spec(0), 5, 2).unwrap();
    e.schedule(3);
    let held = |e: &Engine, n: &str| placement(e).iter().filter(|p| *p == n).count();
    assert_eq!((held(&e, "a"), held(&e, "b")), (4, 1), "a holds its cpu and 3 ahead; b asked for none");
    assert_eq!(placement(&e).iter().filter(|p| *p == "-").count(), 2, "the rest wait in the pool");
    // The node collects its queue in one call; the views count only its real cpus as used.
    assert_eq!(e.take_leases("a", 100, 100, 4).len(), 4);
    let a = e.node_views().into_iter().find(|n| n.ad.name == "a").unwrap();
    assert_eq!((a.free_cpus, a.running_jobs), (0, 4));
    e.check_invariants().unwrap();
}

#[test]
fn lease_ahead_is_bounded_per_cpu() {
    let mut e = engine_with(&[("a", 2)]);
    e.set_ahead("a", 10_000, 0);
    // Small jobs: the queue's memory is bounded too (by the node's), and here it does not bind.
    let mut small = spec(0);
    small.memory_mb = 1;
    e.submit(&alice(), small, u64::from(2 * MAX_AHEAD_PER_CPU) + 50, 0).unwrap();
    e.schedule(1);
    let placed = placement(&e).iter().filter(|p| *p == "a").count() as u32;
    assert_eq!(placed, 2 + 2 * MAX_AHEAD_PER_CPU);
    e.check_invariants().unwrap();
}

#[test]
fn a_job_handed_back_unstarted_returns_to_the_pool_as_never_handed_over() {
    let mut e = engine_with(&[("a", 1)]);
    e.set_ahead("a", 2, 0);
    e.submit(&alice(), spec(0), 3, 0).unwrap();
    e.schedule(1);
    let leases = e.take_leases("a", 100, 100, 1);
    assert_eq!(leases.len(), 3);
    let id = |l: &Lease| LeaseId { job_id: l.job_id, epoch: l.epoch };
    // Draining, the node hands back the two it had not started; a lease that is no longer its
    // own (a stale epoch) is ignored.
    let stale = LeaseId { job_id: leases[0].job_id, epoch: leases[0].epoch + 5 };
    e.hand_back("a", &[id(&leases[1]), id(&leases[2]), stale], 2);
    let views = e.job_views(&admin());
    assert_eq!(views.iter().map(|j| j.state).collect::<Vec<_>>(), [JobState::Running, JobState::Idle, JobState::Idle]);
    for j in &views[1..] {
        let r = e.job_result(&admin(), j.id).unwrap();
        assert!(r.history.is_empty(), "no attempt recorded: {:?}", r.history);
        assert_eq!(r.job.attempts, 0);
        assert!(r.job.reason.as_deref().unwrap_or("").contains("handed it back unstarted"), "{:?}", r.job.reason);
    }
    // A result for a handed-back lease is refused; the running job's is accepted.
    let resp = e.report("a", vec![exited(&leases[1], 0), exited(&leases[0], 0)], 3).unwrap();
    assert_eq!(resp.accepted, vec![id(&leases[0])]);
    assert_eq!(resp.refused.len(), 1);
    e.check_invariants().unwrap();
}

#[test]
fn a_lost_nodes_queued_jobs_go_back_to_the_pool_and_its_late_results_are_refused() {
    let mut e = engine_with(&[("a", 1), ("b", 1)]);
    e.set_ahead("a", 3, 0);
    e.submit(&alice(), spec(0), 5, 0).unwrap();
    e.schedule(1);
    let on_a = e.take_leases("a", 100, 100, 1);
    assert_eq!(on_a.len(), 4);
    let on_b = e.take_leases("b", 100, 100, 1);
    assert_eq!(on_b.len(), 1);
    // b keeps heartbeating its lease; a goes silent and is declared lost.
    let held: Vec<LeaseId> = on_b.iter().map(|l| LeaseId { job_id: l.job_id, epoch: l.epoch }).collect();
    assert!(e.heartbeat("b", &held, false, 900).unwrap().revoked.is_empty());
    assert!(e.heartbeat("b", &held, false, 1500).unwrap().revoked.is_empty());
    e.tick(1500);
    assert!(placement(&e).iter().all(|p| p != "a"));
    assert_eq!(e.report("b", vec![exited(&on_b[0], 0)], 1500).unwrap().accepted.len(), 1);
    // Every job runs on b now, once each; a's late results change nothing.
    let mut done = 1;
    for t in 0..10 {
        e.schedule(1600 + t);
        for l in e.take_leases("b", 100, 100, 1600 + t) {
            assert_eq!(e.report("b", vec![exited(&l, 0)], 1600 + t).unwrap().accepted.len(), 1);
            done += 1;
        }
    }
    assert_eq!(done, 5);
    assert!(e.report("a", on_a.iter().map(|l| exited(l, 1)).collect(), 1700).is_err());
    assert!(e.job_views(&admin()).iter().all(|j| j.state == JobState::Completed && j.exit_code == Some(0)));
    e.check_invariants().unwrap();
}

#[test]
fn jobs_placed_ahead_and_not_collected_go_back_when_the_node_asks_for_less() {
    let mut e = engine_with(&[("a", 1)]);
    e.set_ahead("a", 4, 0);
    e.submit(&alice(), spec(0), 5, 0).unwrap();
    e.schedule(1);
    assert_eq!(placement(&e).iter().filter(|p| *p == "a").count(), 5);
    // Its next call asks for 1 ahead (its jobs got longer): of the 5 placed, 3 go back.
    e.set_ahead("a", 1, 2);
    let views = e.job_views(&admin());
    assert_eq!(views.iter().filter(|j| j.state == JobState::Running).count(), 2);
    for j in views.iter().filter(|j| j.state == JobState::Idle) {
        assert_eq!(j.attempts, 0, "never handed over: not an attempt");
    }
    assert_eq!(e.take_leases("a", 100, 100, 3).len(), 2);
    e.check_invariants().unwrap();
}

#[test]
fn only_jobs_that_can_be_running_accrue_usage() {
    let mut e = engine_with(&[("a", 1)]);
    e.set_ahead("a", 3, 0);
    e.submit(&alice(), spec(0), 4, 0).unwrap();
    e.schedule(0);
    let leases = e.take_leases("a", 100, 100, 0);
    assert_eq!(leases.len(), 4);
    let alice_of = |e: &Engine| e.users.get("alice").map(|u| (u.running_cpus, u.charged_cpus)).unwrap();
    // Four held, one charged: the node runs one at a time.
    assert_eq!(alice_of(&e), (4, 1));
    e.check_invariants().unwrap();
    // The first ends: the next is charged in its place.
    e.report("a", vec![exited(&leases[0], 0)], 100).unwrap();
    assert_eq!(alice_of(&e), (3, 1));
    e.check_invariants().unwrap();
    // A queued one handed back is not charged, and charges nothing when it goes.
    e.hand_back("a", &[LeaseId { job_id: leases[3].job_id, epoch: leases[3].epoch }], 150);
    assert_eq!(alice_of(&e), (2, 1));
    e.check_invariants().unwrap();
}

#[test]
fn lease_ahead_keeps_a_users_quota_in_one_pass() {
    let mut e = engine_with(&[("a", 2)]);
    let req = UserSettingsRequest { user: "alice".into(), factor: None, max_cpus: Some(3), no_max_cpus: false };
    e.set_user(&admin(), &req, 0).unwrap();
    e.set_ahead("a", 4, 0);
    e.submit(&alice(), spec(0), 6, 0).unwrap();
    e.schedule(1);
    // Two on its cpus, one ahead: the quota's three, decided by the pass itself (the second step
    // counts what the first gave), so no placement is refused and no other pass is needed.
    assert_eq!(placement(&e).iter().filter(|p| *p == "a").count(), 3);
    assert!(!e.needs_pass(), "a placement of the pass was refused: another pass was asked for");
    e.check_invariants().unwrap();
}

#[test]
fn the_jobs_queued_ahead_on_a_node_fit_in_its_memory() {
    let mut e = engine_with(&[("a", 2)]);
    e.set_ahead("a", 2 * MAX_AHEAD_PER_CPU, 0);
    let mut big = spec(0);
    big.memory_mb = 256;
    e.submit(&alice(), big, 20, 0).unwrap();
    e.schedule(1);
    // Two run in its 1024 MiB; queued behind them, at most its memory's worth: four.
    assert_eq!(placement(&e).iter().filter(|p| *p == "a").count(), 6);
    e.check_invariants().unwrap();
}
