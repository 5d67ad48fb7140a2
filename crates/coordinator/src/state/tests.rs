//! The job state machine, driven by plain calls: no HTTP, no runtime. The store is a real SQLite
//! file, and the last test reloads it to check that what was acknowledged is what comes back.

use super::*;
use crate::store;

const TIMING: Timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 1000, heartbeat_ms: 200 };

fn fresh(dir: &std::path::Path) -> State {
    let conn = store::open(&dir.join("pool.sqlite")).unwrap();
    let loaded = store::load(&conn).unwrap();
    State::new(loaded, Writer::start(conn), TIMING, 0)
}

fn spec(max_retries: u32) -> JobSpec {
    JobSpec {
        name: "t".into(),
        vm_type: "wasm".into(),
        image: Some(FileRef { path: "a.wasm".into(), blob: "ab".repeat(32), size: 1 }),
        args: vec!["{index}".into()],
        env: Default::default(),
        kernel: None,
        initrd: None,
        append: None,
        network: "none".into(),
        cpus: 1,
        memory_mb: 16,
        timeout_s: 10,
        disk_mb: 1,
        inputs: vec![],
        outputs: vec![],
        requirements: None,
        rank: None,
        max_retries,
        ssi: None,
    }
}

fn ad(name: &str, cpus: u32) -> NodeAd {
    NodeAd {
        name: name.into(),
        arch: "x86_64".into(),
        os: "linux".into(),
        cpus,
        memory_mb: 1024,
        disk_mb: 1024,
        vm_types: vec!["wasm".into()],
        accelerators: vec![],
        labels: Default::default(),
        appliance: false,
    }
}

fn exited(l: &Lease, code: i32) -> Report {
    Report {
        lease: LeaseId { job_id: l.job_id, epoch: l.epoch },
        run: RunReport::Exited { code },
        stdout: None,
        stderr: None,
        stdout_dropped: 0,
        stderr_dropped: 0,
        outputs: vec![],
    }
}

fn lease_all(s: &mut State, node: &str, now: u64) -> Vec<Lease> {
    s.schedule(now);
    s.take_leases(node, 100, 100, now)
}

#[test]
fn submit_place_lease_report_complete() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 2), None, false, 0).unwrap();
    let (ids, _) = s.submit("alice", spec(0), 3, 0).unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
    let leases = lease_all(&mut s, "n1", 1);
    assert_eq!(leases.len(), 2, "two cpus, two leases");
    assert_eq!(leases[1].spec.args, vec!["1"], "{{index}} substituted");
    assert_eq!(s.jobs[&3].state, JobState::Idle);
    let (resp, _) = s.report("n1", vec![exited(&leases[0], 0), exited(&leases[1], 3)], 2).unwrap();
    assert_eq!(resp.accepted.len(), 2);
    assert_eq!((s.jobs[&1].state, s.jobs[&1].exit_code), (JobState::Completed, Some(0)));
    assert_eq!((s.jobs[&2].state, s.jobs[&2].exit_code), (JobState::Completed, Some(3)));
    // The freed cpus take the last job.
    assert_eq!(lease_all(&mut s, "n1", 3).len(), 1);
}

#[test]
fn a_result_under_a_stale_epoch_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 1), None, false, 0).unwrap();
    s.register(ad("n2", 1), None, false, 0).unwrap();
    s.submit("alice", spec(0), 1, 0).unwrap();
    let first = lease_all(&mut s, "n1", 0);
    let first = if first.is_empty() { lease_all(&mut s, "n2", 0) } else { first };
    let holder = s.jobs[&1].node.as_deref().unwrap().to_string();
    let other = if holder == "n1" { "n2" } else { "n1" };
    // The holder goes silent; the other node keeps heartbeating.
    s.heartbeat(other, &[], false, 1500).unwrap();
    s.tick(1500);
    assert_eq!(s.nodes[&holder].state, NodeState::Lost);
    assert_eq!(s.jobs[&1].state, JobState::Idle);
    let second = lease_all(&mut s, other, 1600);
    assert_eq!(second[0].epoch, first[0].epoch + 1);
    // The lost node's late result: refused, because the node is lost.
    assert!(matches!(s.report(&holder, vec![exited(&first[0], 9)], 1700), Err(ApiError::Conflict(_))));
    // A stale epoch from a live node: refused too.
    let (resp, _) = s.report(other, vec![exited(&first[0], 9)], 1700).unwrap();
    assert_eq!(resp.refused.len(), 1);
    assert_eq!(s.jobs[&1].state, JobState::Running);
    let (resp, _) = s.report(other, vec![exited(&second[0], 0)], 1800).unwrap();
    assert_eq!(resp.accepted.len(), 1);
    assert_eq!((s.jobs[&1].state, s.jobs[&1].exit_code, s.jobs[&1].attempts), (JobState::Completed, Some(0), 2));
    assert_eq!(s.metrics.results_refused, 2);
}

#[test]
fn retries_then_completion_or_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 1), None, false, 0).unwrap();
    s.submit("alice", spec(1), 1, 0).unwrap();
    let l = lease_all(&mut s, "n1", 0);
    s.report("n1", vec![exited(&l[0], 2)], 1).unwrap();
    assert_eq!(s.jobs[&1].state, JobState::Idle);
    assert!(s.jobs[&1].reason.as_deref().unwrap().contains("retry 1 of 1"));
    let l = lease_all(&mut s, "n1", 2);
    s.report("n1", vec![exited(&l[0], 2)], 3).unwrap();
    assert_eq!((s.jobs[&1].state, s.jobs[&1].exit_code), (JobState::Completed, Some(2)));

    s.submit("alice", spec(0), 1, 4).unwrap();
    let l = lease_all(&mut s, "n1", 4);
    let mut r = exited(&l[0], 0);
    r.run = RunReport::GuestFailed {
        failure: "time limit exceeded".into(),
        reason: "the time limit of 10 s was exceeded".into(),
    };
    s.report("n1", vec![r], 5).unwrap();
    assert_eq!(s.jobs[&2].state, JobState::Held);
    assert!(s.jobs[&2].reason.as_deref().unwrap().starts_with("time limit exceeded"));
}

#[test]
fn owners_manage_only_their_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.submit("alice", spec(0), 1, 0).unwrap();
    let (resp, _) = s.action(&Principal::User("bob".into()), JobAction::Rm, &[1], 1);
    assert!(resp.changed.is_empty() && resp.refused[0].1.contains("belongs to alice"));
    let (resp, _) = s.action(&Principal::Admin("root".into()), JobAction::Hold, &[1], 1);
    assert_eq!(resp.changed[0].state, JobState::Held);
    let (resp, _) = s.action(&Principal::User("alice".into()), JobAction::Release, &[1, 99], 1);
    assert_eq!((resp.changed.len(), resp.refused.len()), (1, 1));
}

#[test]
fn acknowledged_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ticket;
    {
        let mut s = fresh(dir.path());
        s.register(ad("n1", 1), None, false, 0).unwrap();
        s.submit("alice", spec(0), 2, 0).unwrap();
        let l = lease_all(&mut s, "n1", 0);
        let (_, t) = s.report("n1", vec![exited(&l[0], 5)], 1).unwrap();
        lease_all(&mut s, "n1", 2);
        ticket = s.writer.last_ticket().max(t);
        let mut committed = s.writer.committed.clone();
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
            committed.wait_for(|c| *c >= ticket).await.unwrap();
        });
    }
    let s = fresh(dir.path());
    assert_eq!((s.jobs[&1].state, s.jobs[&1].exit_code), (JobState::Completed, Some(5)));
    assert_eq!(s.jobs[&2].state, JobState::Running, "a running job keeps its lease across a restart");
    assert_eq!(s.nodes["n1"].jobs.len(), 1);
    assert_eq!(s.next_job, 3);
}

#[test]
fn a_draining_node_hands_back_unclaimed_placements_without_touching_other_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 2), None, false, 0).unwrap();
    s.submit("alice", spec(0), 2, 0).unwrap();
    s.schedule(0);
    assert_eq!(s.nodes["n1"].pending.len(), 2);
    s.heartbeat("n1", &[], true, 1).unwrap();
    assert_eq!(s.nodes["n1"].state, NodeState::Draining);
    assert_eq!((s.nodes["n1"].jobs.len(), s.nodes["n1"].used_cpus), (0, 0));
    assert_eq!(s.jobs[&1].state, JobState::Idle);
    s.register(ad("n2", 2), None, false, 2).unwrap();
    let l = lease_all(&mut s, "n2", 3);
    assert_eq!(l.len(), 2);
    s.deregister("n1", 4);
    assert_eq!((s.nodes["n2"].jobs.len(), s.nodes["n2"].used_cpus), (2, 2), "n2's accounting is intact");
    assert!(s.jobs.values().all(|j| j.state == JobState::Running && j.node.as_deref() == Some("n2")));
}

#[test]
fn a_live_nodes_name_cannot_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    let (cred, _) = s.register(ad("n1", 1), None, false, 0).unwrap();
    assert!(matches!(s.register(ad("n1", 1), None, false, 1), Err(ApiError::Conflict(_))));
    assert!(matches!(s.register(ad("n1", 1), Some("wrong"), false, 1), Err(ApiError::Conflict(_))));
    // The node itself, restarting, proves who it is; an admin may replace it.
    let (cred2, _) = s.register(ad("n1", 1), Some(&cred), false, 2).unwrap();
    assert!(s.authenticate(&cred).is_none(), "the old credential is revoked");
    s.register(ad("n1", 1), None, true, 3).unwrap();
    assert!(s.authenticate(&cred2).is_none());
    // Once lost, anyone with the pool token may take the name.
    s.tick(10_000);
    assert_eq!(s.nodes["n1"].state, NodeState::Lost);
    s.register(ad("n1", 1), None, false, 10_001).unwrap();
}

#[test]
fn jobs_never_handed_to_a_node_are_not_counted_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 1), None, false, 0).unwrap();
    s.submit("alice", spec(0), 1, 0).unwrap();
    s.schedule(0);
    s.tick(5_000);
    assert_eq!((s.jobs[&1].state, s.jobs[&1].losses), (JobState::Idle, 0));
}

#[test]
fn an_ssi_process_on_a_lost_node_ends_held_with_the_reason_and_is_not_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 1), None, false, 0).unwrap();
    let mut p = spec(0);
    p.cpus = 0;
    p.ssi = Some(SsiSpec { home: "http://127.0.0.1:1".into(), token: "t".into(), pid: 7 });
    s.submit("alice", p, 2, 0).unwrap();
    // Time-shared: both placed on a one-cpu node; only the first is handed over.
    s.schedule(0);
    let leases = s.take_leases("n1", 1, 1, 0);
    assert_eq!(leases.len(), 1);
    s.tick(10_000);
    let lost = &s.jobs[&leases[0].job_id];
    assert_eq!(lost.state, JobState::Held);
    assert!(lost.reason.as_deref().unwrap().contains("lost with its node n1"), "{:?}", lost.reason);
    // The one never delivered had no effects yet: it waits for another node.
    let other = if leases[0].job_id == 1 { 2 } else { 1 };
    assert_eq!(s.jobs[&other].state, JobState::Idle);
}

#[test]
fn time_shared_jobs_run_on_a_full_pool_and_a_full_node_still_collects_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = fresh(dir.path());
    s.register(ad("n1", 1), None, false, 0).unwrap();
    // A batch job takes the only cpu; more wait behind it.
    s.submit("alice", spec(0), 3, 0).unwrap();
    let batch = lease_all(&mut s, "n1", 0);
    assert_eq!(batch.len(), 1);
    let mut p = spec(0);
    p.cpus = 0;
    p.ssi = Some(SsiSpec { home: "http://127.0.0.1:1".into(), token: "t".into(), pid: 1 });
    let (ids, _) = s.submit("alice", p, 1, 1).unwrap();
    s.schedule(1);
    assert_eq!(s.jobs[&ids[0]].state, JobState::Running, "placed although no cpu is free");
    // The node, with no cpu free, asks with max_cpus = 0 and gets only the time-shared job.
    let shared = s.take_leases("n1", 64, 0, 2);
    assert_eq!(shared.iter().map(|l| l.job_id).collect::<Vec<_>>(), ids);
    assert_eq!(s.jobs[&2].state, JobState::Idle, "batch jobs still wait for the cpu");
}
