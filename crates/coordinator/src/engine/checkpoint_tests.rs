//! Checkpoints in the engine: recorded only under the job's lease and only when complete; a job
//! that goes back to the pool resumes from its latest; `vacate` moves a job off its node without
//! counting a loss; a finished job's checkpoint blobs are collectable.

use super::tests::{TIMING, ad, exited, spec};
use super::*;
use crate::engine::checkpoints::UNRESUMABLE_MS;

fn alice() -> Principal {
    Principal::User("alice".into())
}

fn admin() -> Principal {
    Principal::Admin("root".into())
}

/// A pool of nodes `a` and `b` (1 cpu each) with one checkpointed job, placed and leased on the
/// first node the matchmaker picks; returns the engine, the lease and its node.
fn running_job() -> (Engine, Lease, String) {
    running_job_on(true)
}

/// Like [`running_job`], with an image or with a kernel only.
fn running_job_on(image: bool) -> (Engine, Lease, String) {
    let (mut e, node) = placed_job(image);
    let lease = e.take_leases(&node, 1, 1, 2).pop().unwrap();
    (e, lease, node)
}

/// Nodes `a` and `b` (1 cpu each, QEMU) and one checkpointed job placed on one of them, not yet
/// collected; returns the engine and that node.
fn placed_job(image: bool) -> (Engine, String) {
    let mut e = Engine::new(TIMING);
    for n in ["a", "b"] {
        e.register(qemu_ad(n, "10.0.2"), None, false, hash_token(n), 0).unwrap();
    }
    let mut s = spec(0);
    (s.vm_type, s.checkpoint_s) = (VmType::Qemu, Some(60));
    s.args.clear();
    if !image {
        s.image = None;
        s.kernel = Some(FileRef { path: "vmlinuz".into(), blob: "ab".repeat(32), size: 1, inline: None });
    }
    e.submit(&alice(), s, 1, 0).unwrap();
    e.schedule(1);
    let node = job_node(&e, 1).unwrap();
    (e, node)
}

/// A node with 1 cpu that runs QEMU `version` under TCG.
fn qemu_ad(name: &str, version: &str) -> NodeAd {
    let mut ad = ad(name, 1);
    ad.vm_types.push(VmType::Qemu);
    ad.accelerators = vec!["tcg".into()];
    ad.qemu = Some(version.into());
    ad
}

fn job_node(e: &Engine, id: u64) -> Option<String> {
    e.job_result(&admin(), id).unwrap().job.node
}

fn blob(e: &mut Engine, n: u8) -> FileRef {
    let hash = format!("{n:02x}").repeat(32);
    e.add_blob(&hash, "node:a", 10, 0);
    FileRef { path: format!("part-{n}"), blob: hash, size: 10, inline: None }
}

/// A chunked file of one chunk, blob `n`.
fn file(e: &mut Engine, n: u8) -> ChunkedFile {
    ChunkedFile { size: 10, chunks: vec![blob(e, n)] }
}

fn checkpoint(e: &mut Engine, seq: u64) -> Checkpoint {
    Checkpoint {
        seq,
        state: file(e, 1),
        job_disk: file(e, 2),
        overlay: Some(file(e, 5)),
        console: Some(blob(e, 3)),
        accel: "tcg".into(),
        guest_s: seq as f64,
    }
}

fn id(l: &Lease) -> LeaseId {
    LeaseId { job_id: l.job_id, epoch: l.epoch }
}

#[test]
fn a_checkpoint_is_recorded_only_under_the_jobs_lease_complete_and_newer() {
    let (mut e, lease, node) = running_job();
    let other = if node == "a" { "b" } else { "a" };
    let ck = checkpoint(&mut e, 1);
    let req = |ck: &Checkpoint, lease: LeaseId| CheckpointRequest { lease, checkpoint: ck.clone() };
    assert!(matches!(e.checkpoint(other, &req(&ck, id(&lease)), 3), Err(ApiError::Conflict(_))), "not its node");
    let stale = LeaseId { epoch: lease.epoch + 1, ..id(&lease) };
    assert!(matches!(e.checkpoint(&node, &req(&ck, stale), 3), Err(ApiError::Conflict(_))), "a stale epoch");
    let mut missing = ck.clone();
    missing.state.chunks[0].blob = "ee".repeat(32);
    let err = e.checkpoint(&node, &req(&missing, id(&lease)), 3).unwrap_err();
    assert!(err.to_string().contains("is not in the pool"), "{err}");
    let mut bad = ck.clone();
    bad.job_disk.size = MAX_CHUNK_BYTES + 1;
    let err = e.checkpoint(&node, &req(&bad, id(&lease)), 3).unwrap_err();
    assert!(err.to_string().contains("job disk: 1 chunks cannot make"), "{err}");
    bad.job_disk = ChunkedFile { size: 1, chunks: vec![] };
    assert!(e.checkpoint(&node, &req(&bad, id(&lease)), 3).is_err(), "bytes from no chunks");
    bad = ck.clone();
    bad.guest_s = 1e30;
    assert!(e.checkpoint(&node, &req(&bad, id(&lease)), 3).unwrap_err().to_string().contains("timeout_s"));
    bad = ck.clone();
    bad.seq = u64::MAX;
    assert!(e.checkpoint(&node, &req(&bad, id(&lease)), 3).unwrap_err().to_string().contains("too far past"));
    bad = ck.clone();
    bad.overlay = None;
    assert!(e.checkpoint(&node, &req(&bad, id(&lease)), 3).unwrap_err().to_string().contains("overlay"));
    e.checkpoint(&node, &req(&ck, id(&lease)), 3).unwrap();
    assert!(matches!(e.checkpoint(&node, &req(&ck, id(&lease)), 4), Err(ApiError::Conflict(_))), "not newer");
    assert_eq!(e.job_result(&admin(), 1).unwrap().checkpoint.map(|c| c.seq), Some(1));
    // A job that did not ask for checkpoints gets none.
    e.submit(&alice(), spec(0), 1, 5).unwrap();
    e.schedule(6);
    let plain_node = job_node(&e, 2).unwrap();
    let plain = e.take_leases(&plain_node, 1, 1, 7).pop().unwrap();
    let ck = checkpoint(&mut e, 1);
    let err = e.checkpoint(&plain_node, &req(&ck, id(&plain)), 8).unwrap_err();
    assert!(err.to_string().contains("does not ask for checkpoints"), "{err}");
    e.check_invariants().unwrap();
}

#[test]
fn a_job_whose_node_is_lost_resumes_from_its_latest_checkpoint_elsewhere() {
    let (mut e, lease, node) = running_job();
    let ck = checkpoint(&mut e, 2);
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: ck.clone() }, 3).unwrap();
    let other = if node == "a" { "b" } else { "a" };
    // Only the other node heartbeats: the first is lost and its job placed again.
    e.heartbeat(other, &[], false, TIMING.node_ttl_ms).unwrap();
    e.tick(TIMING.node_ttl_ms + 10);
    e.schedule(TIMING.node_ttl_ms + 11);
    assert_eq!(job_node(&e, 1).as_deref(), Some(other));
    let next = e.take_leases(other, 1, 1, TIMING.node_ttl_ms + 12).pop().unwrap();
    assert_eq!(next.resume, Some(ck), "the lease carries the checkpoint");
    e.report(other, vec![exited(&next, 0)], TIMING.node_ttl_ms + 20).unwrap();
    let r = e.job_result(&admin(), 1).unwrap();
    assert_eq!(r.history.iter().map(|a| a.resumed_from).collect::<Vec<_>>(), [None, Some(2)]);
    assert_eq!(r.checkpoint, None, "a finished job keeps no checkpoint");
    e.check_invariants().unwrap();
}

#[test]
fn vacate_moves_a_job_to_another_node_from_its_last_checkpoint_without_a_loss() {
    let (mut e, lease, node) = running_job();
    let other = if node == "a" { "b" } else { "a" };
    // Only a running job that takes checkpoints can be vacated.
    e.submit(&alice(), spec(0), 1, 3).unwrap();
    let refused = e.action(&alice(), JobAction::Vacate, &[2], 4);
    assert!(refused.refused[0].1.contains("is idle"), "{refused:?}");
    e.action(&alice(), JobAction::Rm, &[2], 4);
    let changed = e.action(&alice(), JobAction::Vacate, &[1], 4);
    assert_eq!(changed.changed.len(), 1, "{changed:?}");
    // The node hears it with its heartbeat, takes a last checkpoint and reports the job vacated.
    let hb = e.heartbeat(&node, &[id(&lease)], false, 5).unwrap();
    assert_eq!(hb.vacate, [id(&lease)]);
    let ck = checkpoint(&mut e, 4);
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: ck }, 6).unwrap();
    let mut vacated = exited(&lease, 0);
    vacated.run = RunReport::Vacated { seq: 4 };
    let resp = e.report(&node, vec![vacated], 7).unwrap();
    assert_eq!(resp.accepted.len(), 1);
    // Job 1 goes to the other node even though its own is free (in a pass as the coordinator
    // runs it, which skips an empty snapshot).
    let mut snap = e.snapshot(8).unwrap();
    assert!(!snap.is_empty(), "the vacated job is in the pass");
    let decision = snap.decide();
    e.apply(&snap, decision, 8);
    assert_eq!(job_node(&e, 1).as_deref(), Some(other));
    let r = e.job_result(&admin(), 1).unwrap();
    assert_eq!(r.job.attempts, 2);
    assert!(r.history[0].outcome.contains("checkpoint 4 taken and moved off node"), "{:?}", r.history);
    let j = &e.jobs[&1];
    assert_eq!((j.losses, j.retries), (0, 0), "a move is not a failure");
    assert_eq!(e.take_leases(other, 1, 1, 9).pop().unwrap().resume.map(|c| c.seq), Some(4));
    e.check_invariants().unwrap();
}

#[test]
fn a_vacated_report_without_its_checkpoint_recorded_is_a_loss() {
    let (mut e, lease, node) = running_job();
    let mut vacated = exited(&lease, 0);
    vacated.run = RunReport::Vacated { seq: 9 };
    e.report(&node, vec![vacated], 5).unwrap();
    let j = &e.jobs[&1];
    assert_eq!((j.state, j.losses), (JobState::Idle, 1));
    assert!(j.reason.as_deref().unwrap().contains("checkpoint 9 was not recorded"), "{:?}", j.reason);
    e.check_invariants().unwrap();
}

#[test]
fn only_the_latest_checkpoint_of_an_unfinished_job_holds_its_blobs() {
    let (mut e, lease, node) = running_job();
    let first = checkpoint(&mut e, 1);
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: first }, 3).unwrap();
    let mut second = checkpoint(&mut e, 2);
    second.state = file(&mut e, 9);
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: second }, 4).unwrap();
    let unused = e.unreferenced_blobs(u64::MAX, u64::MAX);
    assert_eq!(unused, ["01".repeat(32)], "the first checkpoint's state went; its other parts are the second's too");
    e.report(&node, vec![exited(&lease, 0)], 5).unwrap();
    let mut unused = e.unreferenced_blobs(u64::MAX, u64::MAX);
    unused.sort();
    let mut all: Vec<String> = [1u8, 2, 3, 5, 9].iter().map(|n| format!("{n:02x}").repeat(32)).collect();
    all.sort();
    assert_eq!(unused, all, "a finished job's checkpoint is collectable");
}

#[test]
fn a_checkpoint_two_nodes_cannot_resume_is_given_up() {
    let (mut e, lease, node) = running_job_on(false);
    let mut ck = checkpoint(&mut e, 3);
    ck.overlay = None;
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: ck }, 3).unwrap();
    let fail = |e: &mut Engine, l: &Lease, node: &str, now: u64| {
        let mut r = exited(l, 0);
        r.run = RunReport::BadCheckpoint { reason: "QEMU could not load checkpoint 3".into() };
        e.report(node, vec![r], now).unwrap();
    };
    // Its own node fails (it did not resume from it): the checkpoint stands. Then nodes fail to
    // resume it; it goes once two different nodes did.
    fail(&mut e, &lease, &node, 4);
    let mut now = 5;
    let mut failed_on = std::collections::BTreeSet::new();
    while failed_on.len() < 2 {
        e.schedule(now);
        let n = job_node(&e, 1).unwrap_or_else(|| panic!("{:?}", e.job_result(&admin(), 1).unwrap().job));
        let l = e.take_leases(&n, 1, 1, now + 1).pop().unwrap();
        assert_eq!(l.resume.as_ref().map(|c| c.seq), Some(3), "after {failed_on:?} it still resumes from it");
        fail(&mut e, &l, &n, now + 2);
        failed_on.insert(n.clone());
        // Only one node left to place it on: the same node again counts once.
        if failed_on.len() == 1 {
            e.schedule(now + 3);
            if job_node(&e, 1).as_deref() == Some(n.as_str()) {
                let l = e.take_leases(&n, 1, 1, now + 4).pop().unwrap();
                fail(&mut e, &l, &n, now + 5);
                assert!(e.jobs[&1].ck.as_ref().unwrap().latest.is_some(), "one node twice is one");
            }
        }
        now += 10;
    }
    let j = &e.jobs[&1];
    assert!(
        j.reason.as_deref().unwrap().contains("2 nodes could not resume checkpoint 3, so the job starts afresh"),
        "{:?}",
        j.reason
    );
    e.schedule(now);
    let n = job_node(&e, 1).unwrap();
    assert_eq!(e.take_leases(&n, 1, 1, now + 1).pop().unwrap().resume, None);
    let mut gone = e.unreferenced_blobs(0, u64::MAX);
    gone.sort();
    assert_eq!(gone, ["01".repeat(32), "02".repeat(32), "03".repeat(32)], "its parts are collected soon");
    assert!(e.unreferenced_blobs(0, now).is_empty(), "but not at once: an upload may find them first");
    e.reuse_blob(&"01".repeat(32), now);
    assert_eq!(e.unreferenced_blobs(0, u64::MAX).len(), 2, "one an upload found is kept");
    e.check_invariants().unwrap();
}

#[test]
fn a_vacated_job_goes_back_to_its_node_when_no_other_took_it_in_time() {
    let (mut e, lease, node) = running_job();
    let other = if node == "a" { "b" } else { "a" };
    // The other node is busy with a job of its own.
    e.submit(&alice(), spec(0), 1, 2).unwrap();
    e.schedule(2);
    assert_eq!(job_node(&e, 2).as_deref(), Some(other));
    e.action(&alice(), JobAction::Vacate, &[1], 3);
    let ck = checkpoint(&mut e, 1);
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: ck }, 4).unwrap();
    let mut r = exited(&lease, 0);
    r.run = RunReport::Vacated { seq: 1 };
    e.report(&node, vec![r], 5).unwrap();
    e.schedule(6);
    assert_eq!(job_node(&e, 1), None, "it keeps away from its node while another may free up");
    e.heartbeat(&node, &[], false, 6 + checkpoints::AVOID_MS).unwrap();
    e.heartbeat(other, &[], false, 6 + checkpoints::AVOID_MS).unwrap();
    e.tick(6 + checkpoints::AVOID_MS);
    assert!(e.needs_pass(), "the end of the wait makes a pass");
    e.schedule(7 + checkpoints::AVOID_MS);
    assert_eq!(job_node(&e, 1).as_deref(), Some(node.as_str()));
    e.check_invariants().unwrap();
}

#[test]
fn a_job_vacated_before_its_node_collected_it_goes_back_at_once() {
    let (mut e, node) = placed_job(true);
    let changed = e.action(&alice(), JobAction::Vacate, &[1], 2);
    assert_eq!(changed.changed[0].state, JobState::Idle, "{changed:?}");
    assert_eq!(e.jobs[&1].attempts, 0, "it never started");
    e.schedule(3);
    assert_ne!(job_node(&e, 1), Some(node), "and it goes to the other node");
    e.check_invariants().unwrap();
}

/// A checkpoint resumes only on a node with its accelerator and the same QEMU or a newer one:
/// with no such node ready, the job waits and says why; a node that can joins, and it goes there.
#[test]
fn a_checkpoint_resumes_only_under_its_accelerator_and_the_same_qemu_or_newer() {
    let (mut e, lease, node) = running_job();
    let ck = checkpoint(&mut e, 4);
    e.checkpoint(&node, &CheckpointRequest { lease: id(&lease), checkpoint: ck }, 3).unwrap();
    let now = 4;
    // The other node leaves; one with an older QEMU joins, and one that lists only KVM; then the
    // job's node leaves too.
    e.deregister(if node == "a" { "b" } else { "a" }, now);
    e.register(qemu_ad("old", "9.2.0"), None, false, hash_token("old"), now).unwrap();
    let mut kvm = qemu_ad("k", "10.1.0");
    kvm.accelerators = vec!["kvm".into()];
    e.register(kvm, None, false, hash_token("k"), now).unwrap();
    e.deregister(&node, now);
    e.schedule(now);
    let r = e.job_result(&admin(), 1).unwrap();
    assert_eq!(r.job.state, JobState::Idle);
    let reason = r.job.reason.unwrap_or_default();
    assert!(reason.contains("can resume its checkpoint 4 (tcg and QEMU 10.0.2 or newer)"), "{reason}");
    // A node with a newer QEMU under TCG joins: the job resumes there.
    e.register(qemu_ad("c", "10.1.0"), None, false, hash_token("c"), now).unwrap();
    e.schedule(now + 1);
    assert_eq!(job_node(&e, 1).as_deref(), Some("c"));
    let next = e.take_leases("c", 1, 1, now + 2).pop().unwrap();
    assert_eq!(next.resume.map(|c| c.seq), Some(4));
    e.check_invariants().unwrap();
}

/// A job no ready node can resume takes no place in a pass, so the jobs after it still go to the
/// free nodes; after an hour of that its checkpoint is given up, and it starts afresh.
#[test]
fn a_job_no_node_can_resume_neither_blocks_the_others_nor_waits_for_ever() {
    let mut e = Engine::new(TIMING);
    e.register(qemu_ad("a", "10.0.2"), None, false, hash_token("a"), 0).unwrap();
    let mut s = spec(0);
    (s.vm_type, s.checkpoint_s, s.image) = (VmType::Qemu, Some(60), None);
    s.kernel = Some(FileRef { path: "vmlinuz".into(), blob: "ab".repeat(32), size: 1, inline: None });
    e.submit(&alice(), s, 3, 0).unwrap();
    e.schedule(1);
    let first = e.take_leases("a", 1, 1, 2).pop().unwrap();
    let mut ck = checkpoint(&mut e, 1);
    ck.overlay = None;
    e.checkpoint("a", &CheckpointRequest { lease: id(&first), checkpoint: ck }, 3).unwrap();
    // Older QEMUs join (one takes a second job); the checkpoint's node leaves.
    e.register(qemu_ad("b", "9.2.0"), None, false, hash_token("b"), 4).unwrap();
    e.schedule(5);
    let second = e.take_leases("b", 1, 1, 6).pop().unwrap();
    e.register(qemu_ad("c", "9.2.0"), None, false, hash_token("c"), 7).unwrap();
    e.deregister("a", 8);
    e.schedule(9);
    let third = e.take_leases("c", 1, 1, 10).pop().expect("the third job is not blocked by the first");
    assert_ne!(third.job_id, first.job_id);
    let r = e.job_result(&admin(), first.job_id).unwrap();
    assert!(r.job.reason.unwrap_or_default().contains("waits for a node that can resume its checkpoint 1"));
    // An hour on, with the other nodes alive: the checkpoint is given up.
    let later = 9 + UNRESUMABLE_MS;
    for (n, l) in [("b", &second), ("c", &third)] {
        e.heartbeat(n, &[id(l)], false, later).unwrap();
    }
    e.tick(later);
    e.schedule(later);
    let r = e.job_result(&admin(), first.job_id).unwrap();
    assert!(r.job.reason.unwrap_or_default().contains("for 60 minutes, so it starts afresh"));
    assert_eq!(r.checkpoint, None);
    e.check_invariants().unwrap();
}
