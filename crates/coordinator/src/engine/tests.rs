//! The state machine driven by plain calls, without IO: each test compares replies, views and the
//! [`Effects`] the calls produced (store operations, wake-ups, events).

use super::*;
use crate::store::{JobRow, Loaded, StoredJob, StoredNode, TokenRow};

pub(crate) const TIMING: Timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 1000, heartbeat_ms: 200 };

fn engine() -> Engine {
    Engine::new(TIMING)
}

pub(crate) fn spec(max_retries: u32) -> JobSpec {
    JobSpec {
        name: "t".into(),
        vm_type: VmType::Wasm,
        image: Some(FileRef { path: "a.wasm".into(), blob: "ab".repeat(32), size: 1, inline: None }),
        args: vec!["{index}".into()],
        env: Default::default(),
        kernel: None,
        initrd: None,
        append: None,
        network: Network::None,
        cpus: 1,
        memory_mb: 16,
        timeout_s: 10,
        disk_mb: 1,
        inputs: vec![],
        outputs: vec![],
        requirements: None,
        rank: None,
        max_retries,
        priority: 0,
        checkpoint_s: None,
        replicas: None,
        quorum: None,
        deterministic: false,
        ssi: None,
        group: None,
    }
}

fn ssi_spec(pid: u64) -> JobSpec {
    let mut p = spec(0);
    p.cpus = 0;
    p.ssi = Some(SsiSpec { home: "http://127.0.0.1:1".into(), token: "t".into(), pid });
    p
}

pub(crate) fn ad(name: &str, cpus: u32) -> NodeAd {
    NodeAd {
        name: name.into(),
        arch: "x86_64".into(),
        os: "linux".into(),
        cpus,
        memory_mb: 1024,
        disk_mb: 1024,
        vm_types: vec![VmType::Wasm],
        accelerators: vec![],
        labels: Default::default(),
        appliance: false,
        qemu: None,
        peer: None,
        overlay: None,
    }
}

pub(crate) fn exited(l: &Lease, code: i32) -> Report {
    Report::exited(LeaseId { job_id: l.job_id, epoch: l.epoch }, code)
}

fn alice() -> Principal {
    Principal::User("alice".into())
}

fn console() -> Principal {
    Principal::Console { owner: "alice".into(), home: "https://127.0.0.1:7900".into() }
}

fn admin() -> Principal {
    Principal::Admin("root".into())
}

fn job(e: &Engine, id: u64) -> JobView {
    e.job_result(&admin(), id).unwrap().job
}

fn node_state(e: &Engine, name: &str) -> NodeState {
    e.node_views().into_iter().find(|n| n.ad.name == name).unwrap().state
}

fn register(e: &mut Engine, name: &str, cpus: u32, now: u64) {
    e.register(ad(name, cpus), None, false, hash_token(name), now).unwrap();
}

fn lease_all(e: &mut Engine, node: &str, now: u64) -> Vec<Lease> {
    e.schedule(now);
    e.take_leases(node, 100, 100, now)
}

/// The job rows among `ops`, as (id, state, node, epoch).
fn job_rows(ops: &[Op]) -> Vec<(u64, JobState, Option<String>, u64)> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Job(r) => Some((r.id, r.state, r.node.clone(), r.epoch)),
            _ => None,
        })
        .collect()
}

#[test]
fn registering_stores_the_credential_and_the_node_and_wakes_everyone() {
    let mut e = engine();
    e.register(ad("n1", 2), None, false, "h1".into(), 5).unwrap();
    assert_eq!(
        e.take_effects(),
        Effects {
            ops: vec![
                Op::Token(TokenRow {
                    hash: "h1".into(),
                    id: "node-h1".into(),
                    role: TokenRole::Node,
                    owner: "n1".into(),
                    created_ms: 5,
                    expires_ms: None,
                    detail: None
                }),
                Op::Node {
                    name: "n1".into(),
                    ad_json: serde_json::to_string(&ad("n1", 2)).unwrap(),
                    cred_hash: "h1".into(),
                    state: NodeState::Ready
                },
            ],
            wake_nodes: true,
            end_calls: vec![],
            wake_waiters: true,
            events: vec![],
        }
    );
    assert!(e.take_effects().is_empty(), "effects are taken once");
}

#[test]
fn submit_place_lease_report_complete() {
    let mut e = engine();
    register(&mut e, "n1", 2, 0);
    e.take_effects();
    let ids = e.submit(&alice(), spec(0), 3, 0).unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
    let fx = e.take_effects();
    assert!(matches!(&fx.ops[..], [Op::Spec { id: 1, .. }, Op::Jobs { spec_id: 1, first_id: 1, count: 3, .. }]));
    assert!(fx.wake_nodes);
    assert_eq!(e.schedule(1), 2, "two cpus, two placements");
    assert_eq!(
        job_rows(&e.take_effects().ops),
        vec![(1, JobState::Running, Some("n1".into()), 1), (2, JobState::Running, Some("n1".into()), 1)]
    );
    let leases = e.take_leases("n1", 100, 100, 1);
    assert_eq!(leases.len(), 2);
    assert_eq!(leases[1].spec.args, vec!["1"], "{{index}} substituted");
    assert!(e.take_effects().ops.is_empty(), "handing over placed jobs stores nothing");
    assert_eq!(job(&e, 3).state, JobState::Idle);
    let resp = e.report("n1", vec![exited(&leases[0], 0), exited(&leases[1], 3)], 2).unwrap();
    assert_eq!(resp.accepted.len(), 2);
    let fx = e.take_effects();
    assert_eq!(
        job_rows(&fx.ops),
        vec![(1, JobState::Completed, Some("n1".into()), 1), (2, JobState::Completed, Some("n1".into()), 1)]
    );
    assert!(fx.wake_nodes && fx.wake_waiters);
    assert_eq!((job(&e, 1).exit_code, job(&e, 2).exit_code), (Some(0), Some(3)));
    // The freed cpus take the last job.
    assert_eq!(lease_all(&mut e, "n1", 3).len(), 1);
}

#[test]
fn a_result_under_a_stale_epoch_is_refused_and_changes_nothing() {
    let mut e = engine();
    register(&mut e, "n1", 1, 0);
    register(&mut e, "n2", 1, 0);
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    let first = lease_all(&mut e, "n1", 0);
    let first = if first.is_empty() { lease_all(&mut e, "n2", 0) } else { first };
    let holder = job(&e, 1).node.unwrap();
    let other = if holder == "n1" { "n2" } else { "n1" };
    // The holder goes silent; the other node keeps heartbeating.
    e.heartbeat(other, &[], false, 1500).unwrap();
    e.take_effects();
    e.tick(1500);
    let fx = e.take_effects();
    assert_eq!(fx.events, vec![Event::NodeLost { node: holder.clone() }]);
    assert_eq!(fx.end_calls, vec![holder.clone()], "its waiting lease call ends, to say it is lost");
    assert_eq!(job_rows(&fx.ops), vec![(1, JobState::Idle, None, 1)]);
    assert_eq!(node_state(&e, &holder), NodeState::Lost);
    let second = lease_all(&mut e, other, 1600);
    assert_eq!(second[0].epoch, first[0].epoch + 1);
    e.take_effects();
    // The lost node's late result: refused, because the node is lost.
    assert!(matches!(e.report(&holder, vec![exited(&first[0], 9)], 1700), Err(ApiError::Conflict(_))));
    // A stale epoch from a live node: refused too, and nothing is stored.
    let resp = e.report(other, vec![exited(&first[0], 9)], 1700).unwrap();
    assert_eq!(resp.refused.len(), 1);
    let fx = e.take_effects();
    assert!(fx.ops.is_empty());
    assert!(matches!(&fx.events[..], [Event::ResultRefused { job: 1, epoch: 1, .. }]));
    assert_eq!(job(&e, 1).state, JobState::Running);
    let resp = e.report(other, vec![exited(&second[0], 0)], 1800).unwrap();
    assert_eq!(resp.accepted.len(), 1);
    let v = job(&e, 1);
    assert_eq!((v.state, v.exit_code, v.attempts), (JobState::Completed, Some(0), 2));
    assert_eq!(e.metrics().results_refused, 2);
}

#[test]
fn a_node_whose_lease_expired_gets_no_new_work_before_it_is_declared_lost() {
    // The node's last call was later than its last heartbeat, so its lease expires before the
    // node does: the job must not be placed back on the silent node meanwhile.
    let mut e = engine();
    register(&mut e, "n1", 1, 0);
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    lease_all(&mut e, "n1", 0);
    e.live_node("n1", 900).unwrap();
    register(&mut e, "n2", 1, 900);
    e.tick(1001);
    assert_eq!(job(&e, 1).state, JobState::Idle, "the lease expired");
    assert_eq!(node_state(&e, "n1"), NodeState::Ready, "the node is not lost yet");
    e.live_node("n2", 1001).unwrap();
    e.schedule(1001);
    assert_eq!(job(&e, 1).node.as_deref(), Some("n2"), "placed on the node that is heard from");
    // Once the silent node heartbeats again it takes work again.
    e.heartbeat("n1", &[], false, 1100).unwrap();
    e.submit(&alice(), spec(0), 1, 1100).unwrap();
    e.schedule(1100);
    assert_eq!(job(&e, 2).node.as_deref(), Some("n1"));
}

#[test]
fn retries_then_completion_or_hold() {
    let mut e = engine();
    register(&mut e, "n1", 1, 0);
    e.submit(&alice(), spec(1), 1, 0).unwrap();
    let l = lease_all(&mut e, "n1", 0);
    e.report("n1", vec![exited(&l[0], 2)], 1).unwrap();
    assert_eq!(job(&e, 1).state, JobState::Idle);
    assert!(job(&e, 1).reason.unwrap().contains("retry 1 of 1"));
    let l = lease_all(&mut e, "n1", 2);
    e.report("n1", vec![exited(&l[0], 2)], 3).unwrap();
    assert_eq!((job(&e, 1).state, job(&e, 1).exit_code), (JobState::Completed, Some(2)));

    e.submit(&alice(), spec(0), 1, 4).unwrap();
    let l = lease_all(&mut e, "n1", 4);
    let mut r = exited(&l[0], 0);
    r.run = RunReport::GuestFailed {
        failure: FailureKind::TimeLimit,
        reason: "the time limit of 10 s was exceeded".into(),
    };
    e.report("n1", vec![r], 5).unwrap();
    assert_eq!(job(&e, 2).state, JobState::Held);
    assert_eq!(job(&e, 2).reason.unwrap(), "time limit exceeded: the time limit of 10 s was exceeded");
}

#[test]
fn owners_manage_only_their_jobs() {
    let mut e = engine();
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    e.take_effects();
    let resp = e.action(&Principal::User("bob".into()), JobAction::Rm, &[1], 1);
    assert!(resp.changed.is_empty() && resp.refused[0].1 == "no such job", "alice's job is none of bob's");
    assert!(e.take_effects().is_empty(), "a refused action changes nothing");
    assert!(e.job_views(&Principal::User("bob".into())).is_empty());
    let resp = e.action(&admin(), JobAction::Hold, &[1], 1);
    assert_eq!(resp.changed[0].state, JobState::Held);
    let resp = e.action(&Principal::User("alice".into()), JobAction::Release, &[1, 99], 1);
    assert_eq!((resp.changed.len(), resp.refused.len()), (1, 1));
}

#[test]
fn a_draining_node_hands_back_unclaimed_placements_without_touching_other_nodes() {
    let mut e = engine();
    register(&mut e, "n1", 2, 0);
    e.submit(&alice(), spec(0), 2, 0).unwrap();
    e.schedule(0);
    assert!(e.has_pending("n1"));
    e.take_effects();
    e.heartbeat("n1", &[], true, 1).unwrap();
    assert_eq!(node_state(&e, "n1"), NodeState::Draining);
    assert_eq!(e.take_effects().end_calls, vec!["n1".to_string()], "its waiting lease call ends");
    assert!(e.draining("n1"));
    e.heartbeat("n1", &[], true, 2).unwrap();
    assert!(e.take_effects().end_calls.is_empty(), "said once, when it starts to drain");
    let n1 = &e.node_views()[0];
    assert_eq!((n1.running_jobs, n1.free_cpus), (0, 2));
    assert_eq!(job(&e, 1).state, JobState::Idle);
    assert_eq!(job(&e, 1).attempts, 0, "a placement never collected is not an attempt");
    register(&mut e, "n2", 2, 2);
    let l = e.take_leases("n2", 100, 100, 3);
    assert!(l.is_empty(), "nothing is placed on n2 until a scheduling pass");
    assert_eq!(lease_all(&mut e, "n2", 3).len(), 2);
    e.deregister("n1", 4);
    let n2 = &e.node_views()[0];
    assert_eq!((n2.ad.name.as_str(), n2.running_jobs, n2.free_cpus), ("n2", 2, 0), "n2's accounting is intact");
    assert!(e.job_views(&admin()).iter().all(|j| j.state == JobState::Running && j.node.as_deref() == Some("n2")));
}

#[test]
fn a_live_nodes_name_cannot_be_taken_over() {
    let mut e = engine();
    e.register(ad("n1", 1), None, false, hash_token("c1"), 0).unwrap();
    assert!(matches!(e.register(ad("n1", 1), None, false, hash_token("x"), 1), Err(ApiError::Conflict(_))));
    assert!(matches!(e.register(ad("n1", 1), Some("wrong"), false, hash_token("x"), 1), Err(ApiError::Conflict(_))));
    // The node itself, restarting, proves who it is; an admin may replace it.
    e.take_effects();
    e.register(ad("n1", 1), Some("c1"), false, hash_token("c2"), 2).unwrap();
    let fx = e.take_effects();
    assert!(fx.ops.contains(&Op::RevokeToken { hash: hash_token("c1") }) && fx.end_calls == ["n1"]);
    assert!(e.same_registration("n1", &hash_token("c1")).is_err(), "the old one's lease call takes nothing");
    assert!(e.same_registration("n1", &hash_token("c2")).is_ok());
    assert!(e.authenticate("c1", 2).is_none(), "the old credential is revoked");
    e.register(ad("n1", 1), None, true, hash_token("c3"), 3).unwrap();
    assert!(e.authenticate("c2", 3).is_none());
    // Once lost, anyone with the pool token may take the name.
    e.tick(10_000);
    assert_eq!(node_state(&e, "n1"), NodeState::Lost);
    e.register(ad("n1", 1), None, false, hash_token("c4"), 10_001).unwrap();
}

#[test]
fn jobs_never_handed_to_a_node_are_not_counted_as_lost() {
    let mut e = engine();
    register(&mut e, "n1", 1, 0);
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    e.schedule(0);
    e.tick(5_000);
    let v = job(&e, 1);
    assert_eq!((v.state, v.attempts), (JobState::Idle, 0));
}

#[test]
fn an_ssi_process_on_a_lost_node_ends_held_with_the_reason_and_is_not_rerun() {
    let mut e = engine();
    register(&mut e, "n1", 1, 0);
    e.submit(&console(), ssi_spec(7), 2, 0).unwrap();
    // Time-shared: both placed on a one-cpu node; only the first is handed over.
    e.schedule(0);
    let leases = e.take_leases("n1", 1, 1, 0);
    assert_eq!(leases.len(), 1);
    e.tick(10_000);
    let lost = job(&e, leases[0].job_id);
    assert_eq!(lost.state, JobState::Held);
    assert!(lost.reason.as_deref().unwrap().contains("lost with its node n1"), "{:?}", lost.reason);
    // The one never delivered had no effects yet: it waits for another node.
    let other = if leases[0].job_id == 1 { 2 } else { 1 };
    assert_eq!(job(&e, other).state, JobState::Idle);
}

#[test]
fn time_shared_jobs_run_on_a_full_pool_and_a_full_node_still_collects_them() {
    let mut e = engine();
    register(&mut e, "n1", 1, 0);
    // A batch job takes the only cpu; more wait behind it.
    e.submit(&alice(), spec(0), 3, 0).unwrap();
    assert_eq!(lease_all(&mut e, "n1", 0).len(), 1);
    let ids = e.submit(&console(), ssi_spec(1), 1, 1).unwrap();
    e.schedule(1);
    assert_eq!(job(&e, ids[0]).state, JobState::Running, "placed although no cpu is free");
    // The node, with no cpu free, asks with max_cpus = 0 and gets only the time-shared job.
    let shared = e.take_leases("n1", 64, 0, 2);
    assert_eq!(shared.iter().map(|l| l.job_id).collect::<Vec<_>>(), ids);
    assert_eq!(job(&e, 2).state, JobState::Idle, "batch jobs still wait for the cpu");
}

#[test]
fn only_a_console_submits_ssi_processes_and_the_pool_sets_their_home() {
    let mut e = engine();
    // A user (or admin) cannot set `ssi`: a node would call whatever URL it names.
    let mut evil = ssi_spec(1);
    evil.ssi.as_mut().unwrap().home = "https://attacker.example:443".into();
    assert!(
        matches!(e.submit(&alice(), evil.clone(), 1, 0), Err(ApiError::BadRequest(m)) if m.contains("set by the pool"))
    );
    assert!(matches!(e.submit(&admin(), evil.clone(), 1, 0), Err(ApiError::BadRequest(_))));
    // Without ssi, no job may ask for no cpu (it would escape cpu accounting).
    let mut free = spec(0);
    free.cpus = 0;
    assert!(matches!(e.submit(&alice(), free, 1, 0), Err(ApiError::BadRequest(m)) if m.contains("cpus")));
    // A console's home is the one the pool gave it, whatever the spec says.
    let ids = e.submit(&console(), evil, 1, 0).unwrap();
    register(&mut e, "n1", 1, 0);
    e.schedule(0);
    let l = e.take_leases("n1", 1, 1, 0);
    assert_eq!(l[0].job_id, ids[0]);
    assert_eq!(l[0].spec.ssi.as_ref().unwrap().home, "https://127.0.0.1:7900");
    // The job's page shows its spec, but not the process's capability token.
    let shown = e.job_result(&admin(), ids[0]).unwrap().spec.unwrap();
    assert_eq!((shown.ssi.unwrap().token.as_str(), shown.cpus), ("(not shown)", 0));
    assert_ne!(l[0].spec.ssi.as_ref().unwrap().token, "(not shown)", "the node gets the real one");
    // And a console submits nothing else.
    assert!(matches!(e.submit(&console(), spec(0), 1, 0), Err(ApiError::BadRequest(_))));
}

#[test]
fn a_user_at_their_queue_limit_is_refused_until_jobs_finish() {
    let mut e = engine();
    e.set_limits(Limits { max_queued_per_user: 3, ..Limits::default() });
    e.submit(&alice(), spec(0), 3, 0).unwrap();
    assert!(matches!(e.submit(&alice(), spec(0), 1, 0), Err(ApiError::Forbidden(m)) if m.contains("at most 3")));
    e.submit(&Principal::User("bob".into()), spec(0), 1, 0).unwrap();
    e.action(&alice(), JobAction::Rm, &[1], 1);
    e.submit(&alice(), spec(0), 1, 2).unwrap();
}

#[test]
fn finished_jobs_are_dropped_after_the_retention_with_their_specs() {
    let mut e = engine();
    e.set_limits(Limits { retain_finished_ms: 1000, ..Limits::default() });
    register(&mut e, "n1", 1, 0);
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    let l = lease_all(&mut e, "n1", 0);
    e.report("n1", vec![exited(&l[0], 0)], 10).unwrap();
    e.heartbeat("n1", &[], false, 500).unwrap();
    e.tick(500);
    assert_eq!(job(&e, 1).state, JobState::Completed, "kept for the retention period");
    e.heartbeat("n1", &[], false, 1011).unwrap();
    e.take_effects();
    e.tick(1011);
    let fx = e.take_effects();
    assert!(fx.ops.contains(&Op::DeleteJob { id: 1 }) && fx.ops.contains(&Op::DeleteSpec { id: 1 }), "{fx:?}");
    assert!(e.job_result(&admin(), 1).is_err());
}

#[test]
fn tokens_expire_and_are_revoked_by_id() {
    let mut e = engine();
    e.add_token(hash_token("t1"), "id1".into(), alice(), 0, Some(1000));
    assert_eq!(e.authenticate("t1", 999), Some(&alice()));
    assert_eq!(e.authenticate("t1", 1000), None, "expired");
    e.add_token(hash_token("t2"), "id2".into(), alice(), 0, None);
    assert_eq!(e.token_views().len(), 2);
    e.take_effects();
    e.revoke("id2", 5).unwrap();
    assert_eq!(e.take_effects().ops, vec![Op::RevokeToken { hash: hash_token("t2") }]);
    assert_eq!(e.authenticate("t2", 6), None);
    assert!(matches!(e.revoke("nope", 7), Err(ApiError::NotFound(_))));
    // Revoking a node's credential takes the node out.
    register(&mut e, "n1", 1, 0);
    let id = e.token_views().into_iter().find(|t| t.role == "node").unwrap().id;
    e.revoke(&id, 8).unwrap();
    assert!(e.node_views().is_empty());
}

#[test]
fn blobs_are_charged_to_their_first_uploader_and_collected_when_unreferenced() {
    let mut e = engine();
    e.set_limits(Limits { max_blob_bytes_per_user: 100, ..Limits::default() });
    e.add_blob(&"ab".repeat(32), "alice", 60, 0);
    e.add_blob(&"ab".repeat(32), "bob", 60, 0);
    assert_eq!(e.blob_allowance("alice"), 40);
    assert_eq!(e.blob_allowance("bob"), 100, "bob sent what was there already: alice pays");
    assert!(e.check_blob_quota("alice", 41).is_err());
    e.add_blob(&"cd".repeat(32), "alice", 10, 0);
    // The spec refers to ab…; cd… is garbage once old enough.
    e.submit(&alice(), spec(0), 1, 0).unwrap();
    assert_eq!(e.unreferenced_blobs(1, 1), vec!["cd".repeat(32)]);
    assert!(e.unreferenced_blobs(0, 0).is_empty(), "too young to collect");
    e.drop_blob(&"cd".repeat(32));
    assert_eq!(e.blob_allowance("alice"), 40);
}

#[test]
fn a_spec_the_api_refuses_stores_nothing() {
    let mut e = engine();
    let mut bad = spec(0);
    bad.name = "x,process=evil".into();
    assert!(matches!(e.submit(&alice(), bad, 1, 0), Err(ApiError::BadRequest(m)) if m.contains("name")));
    let mut bad = spec(0);
    bad.env.insert("A B".into(), "x".into());
    assert!(matches!(e.submit(&alice(), bad, 1, 0), Err(ApiError::BadRequest(m)) if m.contains("A B")));
    assert!(matches!(e.submit(&alice(), spec(0), 0, 0), Err(ApiError::BadRequest(_))));
    assert!(e.take_effects().is_empty());
}

fn stored_job(id: u64, spec_id: u64, state: JobState, node: Option<&str>) -> StoredJob {
    StoredJob {
        spec_id,
        index: 0,
        owner: "alice".into(),
        submitted_ms: 0,
        row: JobRow {
            id,
            state,
            node: node.map(str::to_string),
            epoch: 1,
            attempts: 1,
            retries: 0,
            losses: 0,
            exit_code: None,
            reason: None,
            started_ms: None,
            finished_ms: None,
            result: None,
            set_result: false,
            history: Vec::new(),
            checkpoint: None,
            votes: Vec::new(),
        },
    }
}

#[test]
fn loading_gives_running_jobs_back_and_requeues_those_whose_node_is_gone_or_lost() {
    let loaded = Loaded {
        tokens: vec![TokenRow {
            hash: hash_token("c1"),
            id: "c1".into(),
            role: TokenRole::Node,
            owner: "n1".into(),
            created_ms: 0,
            expires_ms: None,
            detail: None,
        }],
        specs: vec![(1, "alice".into(), serde_json::to_string(&spec(0)).unwrap())],
        jobs: vec![
            stored_job(1, 1, JobState::Running, Some("n1")),
            stored_job(2, 1, JobState::Running, Some("gone")),
            stored_job(3, 1, JobState::Completed, Some("n1")),
            // Its node's loss was committed, and the coordinator died before its requeue was.
            stored_job(4, 1, JobState::Running, Some("n2")),
        ],
        nodes: vec![
            StoredNode {
                name: "n1".into(),
                ad_json: serde_json::to_string(&ad("n1", 2)).unwrap(),
                cred_hash: hash_token("c1"),
                state: NodeState::Ready,
            },
            StoredNode {
                name: "n2".into(),
                ad_json: serde_json::to_string(&ad("n2", 2)).unwrap(),
                cred_hash: hash_token("c2"),
                state: NodeState::Lost,
            },
        ],
        ..Loaded::default()
    };
    let mut e = Engine::load(loaded, TIMING, 100);
    assert_eq!(e.authenticate("c1", 0), Some(&Principal::Node("n1".into())));
    assert_eq!(job(&e, 1).state, JobState::Running);
    assert_eq!(e.node_views()[0].free_cpus, 1, "the running job holds its cpu again");
    assert_eq!(job_rows(&e.take_effects().ops), vec![(2, JobState::Idle, None, 1), (4, JobState::Idle, None, 1)]);
    assert!(job(&e, 2).reason.unwrap().contains("no longer registered"));
    let tried = e.job_result(&admin(), 2).unwrap().history;
    assert!(
        tried.len() == 1 && tried[0].node == "gone" && tried[0].outcome.contains("requeued at restart"),
        "{tried:?}"
    );
    assert!(job(&e, 4).reason.unwrap().contains("lost"));
    e.check_invariants().unwrap();
    assert_eq!(e.submit(&alice(), spec(0), 1, 200).unwrap(), vec![5], "ids continue after the stored ones");
}

#[test]
fn a_stored_spec_that_cannot_be_read_holds_its_jobs_instead_of_failing_the_start() {
    let loaded = Loaded {
        specs: vec![(1, "alice".into(), "{ not json".into())],
        jobs: vec![stored_job(1, 1, JobState::Idle, None)],
        ..Loaded::default()
    };
    let mut e = Engine::load(loaded, TIMING, 0);
    let fx = e.take_effects();
    assert!(matches!(&fx.events[..], [Event::UnreadableSpec { spec: 1, .. }]));
    let v = job(&e, 1);
    assert_eq!(v.state, JobState::Held);
    assert!(v.reason.unwrap().contains("could not be read back"));
    register(&mut e, "n1", 1, 0);
    assert_eq!(e.schedule(0), 0);
}

#[test]
fn a_stored_spec_with_an_expression_too_deep_to_compile_is_held_and_the_start_survives() {
    // A 4 KB job file of `1+1+…+1 == 0` once overflowed the stack at every start.
    let mut deep = spec(0);
    deep.requirements = Some(format!("{} == 0", vec!["1"; 2000].join("+")));
    let loaded = Loaded {
        specs: vec![(1, "alice".into(), serde_json::to_string(&deep).unwrap())],
        jobs: vec![stored_job(1, 1, JobState::Idle, None), stored_job(2, 1, JobState::Running, Some("n1"))],
        ..Loaded::default()
    };
    let mut e = Engine::load(loaded, TIMING, 0);
    for id in [1, 2] {
        let v = job(&e, id);
        assert_eq!(v.state, JobState::Held, "job {id}");
        assert!(v.reason.unwrap().contains("limit is 256"));
    }
    register(&mut e, "n1", 1, 0);
    assert_eq!(e.schedule(0), 0);
    // And the same spec is refused at submit.
    assert!(matches!(e.submit(&alice(), deep, 1, 0), Err(ApiError::BadRequest(m)) if m.contains("limit is 256")));
}
