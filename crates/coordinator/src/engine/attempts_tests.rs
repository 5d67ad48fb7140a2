//! Each job's attempts as the job page shows them: where each ran and how it ended.

use super::super::tests::{TIMING, ad, exited, spec};
use super::super::*;

fn admin() -> Principal {
    Principal::Admin("admin".into())
}

fn alice() -> Principal {
    Principal::User("alice".into())
}

/// Every job's attempts as `GET /v1/jobs/{id}` gives them, in id order.
pub(crate) fn histories(e: &Engine) -> Vec<Vec<AttemptView>> {
    let ids: Vec<u64> = e.job_views(&admin()).iter().map(|j| j.id).collect();
    ids.iter().map(|&id| e.job_result(&admin(), id).unwrap().history).collect()
}

/// Holds job `id` while it runs and releases it, then places it again (on the same node).
pub(crate) fn hold_and_release(e: &mut Engine, id: u64, now: u64) {
    e.action(&admin(), JobAction::Hold, &[id], now);
    e.action(&admin(), JobAction::Release, &[id], now);
    e.schedule(now);
}

/// An attempt as (number, node, started, ended, outcome).
type Row = (u32, String, Option<u64>, Option<u64>, String);

fn attempt(e: &Engine, id: u64) -> Vec<Row> {
    let r = e.job_result(&admin(), id).unwrap();
    r.history.into_iter().map(|a| (a.attempt, a.node, a.started_ms, a.ended_ms, a.outcome)).collect()
}

fn leases(e: &mut Engine, node: &str, now: u64) -> Vec<Lease> {
    e.schedule(now);
    e.take_leases(node, 100, 100, now)
}

#[test]
fn a_job_that_ran_once_has_one_attempt_and_keeps_no_history() {
    let mut e = Engine::new(TIMING);
    e.register(ad("n1", 1), None, false, hash_token("n1"), 0).unwrap();
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    let l = leases(&mut e, "n1", 10);
    assert_eq!(attempt(&e, 1), vec![(1, "n1".into(), Some(10), None, "running".into())]);
    e.report("n1", vec![exited(&l[0], 0)], 20).unwrap();
    assert_eq!(attempt(&e, 1), vec![(1, "n1".into(), Some(10), Some(20), "exited with 0".into())]);
    assert!(e.jobs[&1].history.is_empty(), "the latest attempt is the job's own fields");
    e.check_invariants().unwrap();
}

#[test]
fn a_lost_lease_a_retry_and_the_completion_are_each_an_attempt_with_its_node_and_reason() {
    let mut e = Engine::new(TIMING);
    e.register(ad("n1", 1), None, false, hash_token("n1"), 0).unwrap();
    e.submit(&alice(), spec(1), 1, 0).unwrap();
    leases(&mut e, "n1", 0);
    // n1 goes silent and is lost, its job requeued; n2 takes it and fails once.
    e.register(ad("n2", 1), None, false, hash_token("n2"), 900).unwrap();
    e.tick(1001);
    e.live_node("n2", 1001).unwrap();
    let l = leases(&mut e, "n2", 1001);
    e.report("n2", vec![exited(&l[0], 2)], 1100).unwrap();
    let l = leases(&mut e, "n2", 1200);
    e.report("n2", vec![exited(&l[0], 0)], 1300).unwrap();
    let a = attempt(&e, 1);
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!((a[0].0, a[0].1.as_str(), a[0].2, a[0].3), (1, "n1", Some(0), Some(1001)));
    assert!(a[0].4.contains("n1 was lost"), "{}", a[0].4);
    assert_eq!(a[1], (2, "n2".into(), Some(1001), Some(1100), "exited with 2; retried".into()));
    assert_eq!(a[2], (3, "n2".into(), Some(1200), Some(1300), "exited with 0".into()));
    // What the store got is what a restarted coordinator reads back.
    let stored = e.take_effects().ops.into_iter().rev().find_map(|op| match op {
        crate::store::Op::Job(r) if r.id == 1 => Some(r.history.clone()),
        _ => None,
    });
    assert_eq!(stored.unwrap().len(), 2, "the two ended attempts before the latest");
    e.check_invariants().unwrap();
}

#[test]
fn a_hold_while_running_and_a_release_after_a_failure_end_attempts_and_an_unclaimed_placement_does_not() {
    let mut e = Engine::new(TIMING);
    e.register(ad("n1", 1), None, false, hash_token("n1"), 0).unwrap();
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    leases(&mut e, "n1", 0);
    e.action(&alice(), JobAction::Hold, &[1], 5);
    assert_eq!(attempt(&e, 1), vec![(1, "n1".into(), Some(0), Some(5), "held by alice while it ran".into())]);
    e.action(&alice(), JobAction::Release, &[1], 6);
    let l = leases(&mut e, "n1", 7);
    let mut r = exited(&l[0], 0);
    r.run = RunReport::GuestFailed { failure: FailureKind::TimeLimit, reason: "too slow".into() };
    e.report("n1", vec![r], 8).unwrap();
    e.action(&alice(), JobAction::Release, &[1], 9);
    // Placed on a draining node that never collects it: not an attempt.
    e.schedule(10);
    e.heartbeat("n1", &[], true, 11).unwrap();
    let a = attempt(&e, 1);
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1], (2, "n1".into(), Some(7), Some(8), "time limit exceeded: too slow".into()));
    assert_eq!(e.job_result(&admin(), 1).unwrap().job.attempts, 2);
    e.check_invariants().unwrap();
}

#[test]
fn at_most_the_latest_past_attempts_are_kept() {
    let mut e = Engine::new(TIMING);
    e.register(ad("n1", 1), None, false, hash_token("n1"), 0).unwrap();
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    leases(&mut e, "n1", 0);
    for now in 1..=30 {
        hold_and_release(&mut e, 1, now);
        e.take_leases("n1", 100, 100, now);
    }
    let h = histories(&e).remove(0);
    assert_eq!(h.len(), MAX_PAST_ATTEMPTS + 1, "the kept past attempts and the running one");
    assert_eq!(h.first().unwrap().attempt, 31 - MAX_PAST_ATTEMPTS as u32);
    assert_eq!(h.last().unwrap().attempt, 31);
    e.check_invariants().unwrap();
}
