//! What moving a workflow on costs, and what it may hold: a sweep settles in time linear in
//! its jobs however they end, a failure skips a long chain in one step, the jobs a workflow will
//! queue count against its owner's queue, a rescue reruns a done node whose jobs are gone, and a
//! running workflow's old jobs wait out of the retention index until it ends.

use super::tests::{TIMING, alice, diamond, node, pool, run_all, states};
use super::*;
use crate::engine::{Limits, hash_token, tests::ad};

pub(super) fn report(l: &Lease, run: RunReport) -> Report {
    Report {
        lease: LeaseId { job_id: l.job_id, epoch: l.epoch },
        run,
        stdout: None,
        stderr: None,
        stdout_dropped: 0,
        stderr_dropped: 0,
        outputs: vec![],
    }
}

/// A diamond whose first node is a sweep of `n`, all of it running on one big node "big".
pub(super) fn sweep_running(n: u64) -> (Engine, u64, Vec<Lease>) {
    let mut e = Engine::new(TIMING);
    let big = NodeAd { memory_mb: 1 << 20, disk_mb: 1 << 20, ..ad("big", n as u32) };
    e.register(big, None, false, hash_token("big"), 0).unwrap();
    let mut flow = diamond();
    flow.nodes[0].count = n;
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    let mut leases = Vec::new();
    while (leases.len() as u64) < n {
        e.schedule(2);
        let more = e.take_leases("big", n as u32, n as u32, 2);
        assert!(!more.is_empty(), "all {n} run at once");
        leases.extend(more);
    }
    (e, id, leases)
}

#[test]
fn a_sweep_settles_in_time_linear_in_its_jobs_with_an_early_failure_and_a_held_job() {
    const N: u64 = 4000;
    let (mut e, id, leases) = sweep_running(N);
    let before = e.dags[&id].work.get();
    // The first job fails and the second is held before any other ends; then the rest complete,
    // one report each, in order.
    e.report("big", vec![report(&leases[0], RunReport::Exited { code: 7 })], 3).unwrap();
    e.report("big", vec![report(&leases[1], RunReport::BadJob { reason: "no".into() })], 3).unwrap();
    for l in &leases[2..] {
        e.report("big", vec![report(l, RunReport::Exited { code: 0 })], 4).unwrap();
    }
    let work = e.dags[&id].work.get() - before;
    assert!(work < 4 * N, "settling {N} jobs took {work} looks");
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!(v.nodes[0].state, DagNodeState::Failed);
    let first = leases[0].job_id;
    assert_eq!(v.nodes[0].reason.as_deref(), Some(&*format!("job {first} exited with 7")), "the first failure");
    let held = e.job_result(&alice(), leases[1].job_id).unwrap().job;
    assert_eq!(held.state, JobState::Removed, "what was left of the failed run went");
    e.check_invariants().unwrap();
}

#[test]
fn a_held_job_released_and_completed_lets_its_node_finish() {
    let mut e = pool();
    let mut flow = diamond();
    flow.nodes[0].count = 3;
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    e.schedule(2);
    let leases = e.take_leases("n1", 3, 3, 2);
    e.report("n1", vec![report(&leases[0], RunReport::BadJob { reason: "no".into() })], 3).unwrap();
    e.report("n1", vec![report(&leases[1], RunReport::Exited { code: 0 })], 3).unwrap();
    e.action(&alice(), JobAction::Release, &[leases[0].job_id], 4);
    e.report("n1", vec![report(&leases[2], RunReport::Exited { code: 0 })], 5).unwrap();
    assert_eq!(
        e.dag_view(&alice(), id).unwrap().nodes[0].state,
        DagNodeState::Idle,
        "the released job is queued again"
    );
    e.schedule(6);
    let again = e.take_leases("n1", 3, 3, 6);
    assert_eq!(again.iter().map(|l| l.job_id).collect::<Vec<_>>(), [leases[0].job_id]);
    e.report("n1", vec![report(&again[0], RunReport::Exited { code: 0 })], 7).unwrap();
    assert_eq!(e.dag_view(&alice(), id).unwrap().nodes[0].state, DagNodeState::Done);
    e.check_invariants().unwrap();
}

#[test]
fn a_failure_at_the_root_of_a_long_chain_skips_it_all_at_once() {
    const N: usize = 10_000;
    let mut e = pool();
    let names: Vec<String> = (0..N).map(|i| format!("n{i}")).collect();
    let nodes = (0..N)
        .map(|i| {
            let parent = if i == 0 { vec![] } else { vec![names[i - 1].as_str()] };
            node(&names[i], &parent, &[])
        })
        .collect();
    let id = e.submit_dag(&alice(), DagSpec { name: "chain".into(), nodes }, None, 1).unwrap();
    let before = e.dags[&id].work.get();
    run_all(&mut e, 2, |_| 1);
    let work = e.dags[&id].work.get() - before;
    assert!(work < 3 * N as u64, "skipping {N} nodes took {work} looks");
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!(v.state, DagState::Failed);
    assert!(v.nodes[1..].iter().all(|n| n.state == DagNodeState::Skipped));
    assert_eq!(v.nodes[N - 1].reason.as_deref(), Some(&*format!("`n{}` was skipped", N - 2)));
}

#[test]
fn the_jobs_a_workflow_will_queue_count_against_its_owners_queue() {
    let mut e = pool();
    e.set_limits(Limits { max_queued_per_user: 10, ..Default::default() });
    let mut flow = diamond();
    flow.nodes[3].count = 3;
    // a is queued, b, c and d's three are not yet: 6 of alice's 10.
    let id = e.submit_dag(&alice(), flow.clone(), None, 1).unwrap();
    let job = crate::engine::tests::spec(0);
    let Err(ApiError::Forbidden(m)) = e.submit(&alice(), job.clone(), 5, 2) else { panic!("over the queue") };
    assert!(m.starts_with("alice has 6 jobs queued (counting those of running workflows)"), "{m}");
    assert!(matches!(e.submit_dag(&alice(), flow.clone(), None, 2), Err(ApiError::Forbidden(_))));
    e.submit(&alice(), job.clone(), 4, 2).unwrap();
    e.check_invariants().unwrap();
    // As the workflow goes, its jobs move from its reserve to the queue; what ended frees room.
    run_all(&mut e, 3, |_| 0);
    assert_eq!(e.queued_and_reserved("alice"), 10 - 1 - 4, "a and 4 of the plain jobs ended");
    for now in 4..8 {
        run_all(&mut e, now, |_| 0);
    }
    assert_eq!(e.dag_view(&alice(), id).unwrap().state, DagState::Completed);
    assert_eq!(e.queued_and_reserved("alice"), 0);
    assert!(e.dag_reserved.is_empty());
    e.submit_dag(&alice(), flow, None, 9).unwrap();
}

#[test]
fn a_removed_workflow_gives_back_its_reserve() {
    let mut e = pool();
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    assert_eq!(e.queued_and_reserved("alice"), 4);
    e.dag_rm(&alice(), id, 2).unwrap();
    assert_eq!(e.queued_and_reserved("alice"), 0);
    e.check_invariants().unwrap();
}

#[test]
fn a_rescue_runs_again_a_done_node_whose_jobs_the_pool_forgot_and_is_its_owners_alone() {
    let mut e = pool();
    e.set_limits(Limits { retain_finished_ms: 10, ..Default::default() });
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    run_all(&mut e, 2, |_| 0);
    run_all(&mut e, 3, |n| if n == "c" { 1 } else { 0 });
    assert_eq!(e.dag_view(&alice(), id).unwrap().state, DagState::Failed);
    // a's job (ended at 2) goes; the workflow (ended at 3) and b's job stay.
    e.tick(13);
    let a_job = e.dag_view(&alice(), id).unwrap().nodes[0].jobs[0];
    assert!(e.job_result(&alice(), a_job).is_err(), "a's job was forgotten");
    let admin = Principal::Admin("root".into());
    let Err(ApiError::Forbidden(m)) = e.submit_dag(&admin, diamond(), Some(id), 14) else { panic!("admin rescued") };
    assert_eq!(m, format!("workflow {id} belongs to alice: only its owner rescues it"));
    let rescue = e.submit_dag(&alice(), diamond(), Some(id), 14).unwrap();
    use DagNodeState::*;
    let s: Vec<DagNodeState> = states(&e, rescue).into_iter().map(|(_, s)| s).collect();
    assert_eq!(s, [Idle, Done, Waiting, Waiting], "a runs again, b's outputs are still there");
    for now in 15..18 {
        run_all(&mut e, now, |_| 0);
    }
    assert_eq!(e.dag_view(&alice(), rescue).unwrap().state, DagState::Completed);
}

#[test]
fn a_running_workflows_old_jobs_wait_out_of_the_retention_index_until_it_ends() {
    let mut e = pool();
    e.set_limits(Limits { retain_finished_ms: 10, ..Default::default() });
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    run_all(&mut e, 2, |_| 0);
    let a_job = e.dag_view(&alice(), id).unwrap().nodes[0].jobs[0];
    e.tick(50);
    assert_eq!(e.kept_for_dags[&id], [(2, a_job)]);
    assert!(e.final_by_time.is_empty(), "not looked at again each tick");
    e.check_invariants().unwrap();
    run_all(&mut e, 51, |_| 0);
    run_all(&mut e, 52, |_| 0);
    assert_eq!(e.dag_view(&alice(), id).unwrap().state, DagState::Completed);
    assert!(e.kept_for_dags.is_empty());
    assert!(e.final_by_time.contains(&(2, a_job)));
    e.check_invariants().unwrap();
    e.tick(53);
    assert!(e.job_result(&alice(), a_job).is_err(), "it goes once its workflow ended");
}
