//! Replicated jobs in the engine: a job with `replicas` runs on that many distinct nodes, one
//! after another; its result is the one `quorum` of them agree on; the nodes that disagreed lose
//! reputation, which requirements can use; a banned node cannot come back.

use super::tests::{TIMING, ad, exited, spec};
use super::*;
use crate::store::Trust;

fn alice() -> Principal {
    Principal::User("alice".into())
}

fn admin() -> Principal {
    Principal::Admin("root".into())
}

/// A pool of nodes `a`…`d` (1 cpu each).
fn pool(names: &[&str]) -> Engine {
    let mut e = Engine::new(TIMING);
    for n in names {
        e.register(ad(n, 1), None, false, hash_token(n), 0).unwrap();
    }
    e
}

/// A report of `lease` with stdout `out` (inline) and exit code 0.
fn result(lease: &Lease, out: &str) -> Report {
    let mut r = exited(lease, 0);
    r.stdout = Some(FileRef::inline_text("stdout", out));
    r
}

/// Runs job 1's next replica: placed, leased by its node, reported with stdout `out`. Returns the
/// node it ran on.
fn run_replica(e: &mut Engine, now: u64, out: impl Fn(&str) -> String) -> String {
    run_replica_of(e, 1, now, out)
}

/// Runs job `id`'s next replica, as [`run_replica`].
fn run_replica_of(e: &mut Engine, id: u64, now: u64, out: impl Fn(&str) -> String) -> String {
    e.schedule(now);
    let node = e.job_result(&admin(), id).unwrap().job.node.expect("placed");
    let lease = e.take_leases(&node, 1, 1, now).pop().unwrap();
    e.report(&node, vec![result(&lease, &out(&node))], now).unwrap();
    node
}

fn replicated(replicas: u32, quorum: u32) -> JobSpec {
    JobSpec { replicas: Some(replicas), quorum: Some(quorum), ..spec(0) }
}

#[test]
fn the_result_two_of_three_distinct_nodes_agree_on_is_accepted_and_the_other_loses_reputation() {
    let mut e = pool(&["a", "b", "c", "d"]);
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    // Node "b" tampers with what it returns.
    let out = |n: &str| if n == "b" { "tampered\n".to_string() } else { "42\n".to_string() };
    let mut ran = Vec::new();
    for now in 1..=3 {
        ran.push(run_replica(&mut e, now, out));
        if now < 3 {
            let j = e.job_result(&admin(), 1).unwrap().job;
            assert_eq!(j.state, JobState::Idle, "it runs {} more times", 3 - now);
        }
    }
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), 3, "three distinct nodes: {ran:?}");
    let r = e.job_result(&admin(), 1).unwrap();
    assert_eq!(r.job.state, JobState::Completed);
    assert_eq!(r.stdout.as_ref().and_then(|f| f.inline.as_deref()), Some("42\n"));
    assert!(r.job.reason.unwrap_or_default().contains("2 of its 3 replicas agreed"));
    assert_eq!(r.history.len(), 3, "each replica is an attempt");
    if ran.contains(&"b".to_string()) {
        assert_eq!((e.trust("b").agree, e.trust("b").disagree), (0, 1));
        assert!(e.reputation("b") < 0.5, "{}", e.reputation("b"));
    }
    for n in ran.iter().filter(|n| *n != "b") {
        assert_eq!(e.trust(n).agree, 1, "{n}");
        assert!(e.reputation(n) > 0.5);
    }
    e.check_invariants().unwrap();
}

#[test]
fn replicas_that_never_agree_run_up_to_twice_and_then_the_job_is_held() {
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    let mut e = pool(&names);
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    for now in 1..=6 {
        run_replica(&mut e, now, |n| format!("{n}\n"));
    }
    let r = e.job_result(&admin(), 1).unwrap();
    assert_eq!(r.job.state, JobState::Held);
    assert!(r.job.reason.unwrap_or_default().contains("no result that 2 of its 6 replicas agree on"));
    assert_eq!(e.trust("a"), Trust::default(), "no result was agreed on, so nobody is judged");
    // Released, its replicas run again from none.
    e.action(&alice(), JobAction::Release, &[1], 7);
    assert_eq!(e.job_result(&admin(), 1).unwrap().job.state, JobState::Idle);
}

#[test]
fn a_replica_waits_for_a_node_that_has_not_run_the_job() {
    let mut e = pool(&["a", "b"]);
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    run_replica(&mut e, 1, |_| "x\n".into());
    run_replica(&mut e, 2, |_| "x\n".into());
    e.schedule(3);
    let j = e.job_result(&admin(), 1).unwrap().job;
    assert_eq!(j.state, JobState::Idle);
    let reason = j.reason.unwrap_or_default();
    assert!(reason.contains("waits for a node that has not run one of its replicas (they ran on"), "{reason}");
    e.register(ad("c", 1), None, false, hash_token("c"), 4).unwrap();
    assert_eq!(run_replica(&mut e, 5, |_| "x\n".into()), "c");
    assert_eq!(e.job_result(&admin(), 1).unwrap().job.state, JobState::Completed);
}

#[test]
fn a_requirement_on_reputation_keeps_a_node_that_disagreed_away_and_a_banned_node_cannot_return() {
    let mut e = pool(&["a", "b", "c"]);
    // "c" disagrees with "a" and "b" on a first job.
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    for now in 1..=3 {
        run_replica(&mut e, now, |n| if n == "c" { "bad\n".into() } else { "ok\n".into() });
    }
    assert!(e.reputation("c") < 0.5 && e.reputation("a") > 0.5);
    let views = e.node_views();
    let c = views.iter().find(|v| v.ad.name == "c").unwrap();
    assert_eq!((c.agreements, c.disagreements), (0, 1));
    // Jobs that require a reputation above one half go only to "a" and "b".
    let picky = JobSpec { requirements: Some("node.reputation > 0.5".into()), ..spec(0) };
    let ids = e.submit(&alice(), picky, 3, 4).unwrap();
    e.schedule(5);
    for id in &ids {
        let node = e.job_result(&admin(), *id).unwrap().job.node;
        assert_ne!(node.as_deref(), Some("c"), "job {id}");
    }
    // Banned, "c" leaves the pool and cannot register again.
    e.ban("c", true, 6).unwrap();
    assert!(e.node_views().iter().all(|v| v.ad.name != "c"));
    let err = e.register(ad("c", 1), None, true, hash_token("c2"), 7).unwrap_err();
    assert!(err.to_string().contains("node c is banned from this pool by an admin"), "{err}");
    assert!(matches!(e.ban("bad name!", true, 8), Err(ApiError::BadRequest(_))));
    e.ban("c", false, 9).unwrap();
    e.register(ad("c", 1), None, true, hash_token("c3"), 10).unwrap();
    assert_eq!(e.trust("c").disagree, 1, "lifting a ban keeps the record");
    e.check_invariants().unwrap();
}

/// A spec sent without `quorum` gets the validator's default, a majority: one node's result does
/// not decide it.
#[test]
fn a_spec_without_quorum_needs_a_majority() {
    let mut e = pool(&["a", "b", "c"]);
    e.submit(&alice(), JobSpec { replicas: Some(3), quorum: None, ..spec(0) }, 1, 0).unwrap();
    let first = run_replica(&mut e, 1, |_| "first\n".into());
    for now in 2..=3 {
        run_replica(&mut e, now, |n| if n == first { "first\n".into() } else { "ok\n".into() });
    }
    let r = e.job_result(&admin(), 1).unwrap();
    assert_eq!(r.stdout.as_ref().and_then(|f| f.inline.as_deref()), Some("ok\n"));
    assert_eq!(e.trust(&first).disagree, 1);
}

/// A failed run is a vote too: a node cannot escape being judged by failing the job, and the
/// replicas may agree that the job fails, which holds it.
#[test]
fn failures_are_votes() {
    let mut e = pool(&["a", "b", "c", "d"]);
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    let fail = |e: &mut Engine, now: u64| {
        e.schedule(now);
        let node = e.job_result(&admin(), 1).unwrap().job.node.expect("placed");
        let lease = e.take_leases(&node, 1, 1, now).pop().unwrap();
        let mut r = exited(&lease, 0);
        r.run = RunReport::GuestFailed { failure: FailureKind::TimeLimit, reason: format!("slow on {node}") };
        e.report(&node, vec![r], now).unwrap();
        node
    };
    let failed = fail(&mut e, 1);
    run_replica(&mut e, 2, |_| "ok\n".into());
    run_replica(&mut e, 3, |_| "ok\n".into());
    assert_eq!(e.job_result(&admin(), 1).unwrap().job.state, JobState::Completed);
    assert_eq!(e.trust(&failed).disagree, 1, "the failing node is judged");
    // Replicas that agree the job fails hold it, with the failure.
    e.submit(&alice(), replicated(3, 2), 1, 4).unwrap();
    let mut now = 5;
    while e.job_result(&admin(), 2).unwrap().job.state == JobState::Idle {
        e.schedule(now);
        let node = e.job_result(&admin(), 2).unwrap().job.node.expect("placed");
        let lease = e.take_leases(&node, 1, 1, now).pop().unwrap();
        let mut r = exited(&lease, 0);
        r.run = RunReport::GuestFailed { failure: FailureKind::TimeLimit, reason: "timed out".into() };
        e.report(&node, vec![r], now).unwrap();
        now += 1;
    }
    let j = e.job_result(&admin(), 2).unwrap().job;
    assert_eq!(j.state, JobState::Held);
    assert!(j.reason.unwrap_or_default().contains("(3 of its 3 replicas agreed on this failure)"));
    e.check_invariants().unwrap();
}

/// A banned node's results not yet judged no longer count: its replica runs again elsewhere.
#[test]
fn a_banned_nodes_pending_result_does_not_count() {
    let mut e = pool(&["c"]);
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    assert_eq!(run_replica(&mut e, 1, |_| "bad\n".into()), "c");
    for n in ["a", "b"] {
        e.register(ad(n, 1), None, false, hash_token(n), 2).unwrap();
    }
    e.ban("c", true, 3).unwrap();
    run_replica(&mut e, 4, |_| "ok\n".into());
    run_replica(&mut e, 5, |_| "ok\n".into());
    e.schedule(6);
    assert_eq!(e.job_result(&admin(), 1).unwrap().job.state, JobState::Idle, "two votes of three");
    e.register(ad("d", 1), None, false, hash_token("d"), 7).unwrap();
    assert_eq!(run_replica(&mut e, 8, |_| "ok\n".into()), "d");
    let r = e.job_result(&admin(), 1).unwrap();
    assert!(r.job.reason.unwrap_or_default().contains("3 of its 3 replicas agreed"));
    assert_eq!(e.trust("c").disagree, 0, "its discarded result is not judged");
}

/// A replicated job's votes and the nodes' records survive a restart: `reload` commits the
/// engine's effects to a store and loads a new engine from it.
pub(crate) fn votes_and_reputations_survive(reload: impl FnOnce(&mut Engine) -> Engine) {
    let mut e = pool(&["a", "b", "c", "d"]);
    e.submit(&alice(), replicated(3, 2), 1, 0).unwrap();
    for now in 1..=3 {
        run_replica(&mut e, now, |n| if n == "c" { "bad\n".into() } else { "ok\n".into() });
    }
    e.submit(&alice(), replicated(3, 2), 1, 4).unwrap();
    let first = run_replica_of(&mut e, 2, 5, |_| "ok\n".into());
    let trust: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| e.trust(n)).collect();
    e.ban("d", true, 6).unwrap();
    let mut e = reload(&mut e);
    assert_eq!(["a", "b", "c", "d"].iter().map(|n| Trust { banned: false, ..e.trust(n) }).collect::<Vec<_>>(), trust);
    assert!(e.banned("d"));
    // Job 2's first vote counts: two more agreeing runs, on the other nodes, decide it.
    let mut others = Vec::new();
    for now in 7..=8 {
        others.push(run_replica_of(&mut e, 2, now, |_| "ok\n".into()));
    }
    assert!(!others.contains(&first), "{first} ran it before the restart: {others:?}");
    let r = e.job_result(&admin(), 2).unwrap();
    assert_eq!(r.job.state, JobState::Completed);
    assert!(r.job.reason.unwrap_or_default().contains("3 of its 3 replicas agreed"));
}
