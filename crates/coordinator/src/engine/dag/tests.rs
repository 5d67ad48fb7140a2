//! Workflows driven by plain calls: release in dependency order with the parents' outputs as
//! inputs, retries of a node as a whole, failure, the final node, rescue, removal, and a restart
//! from the store at any point without a node released twice.

use std::collections::BTreeMap;

use super::*;
use crate::engine::tests::{ad, spec};
use crate::engine::{Timing, hash_token};
use crate::store::{Op, Store, sqlite::SqliteStore};

pub(super) const TIMING: Timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 1000, heartbeat_ms: 200 };

pub(super) fn alice() -> Principal {
    Principal::User("alice".into())
}

pub(super) fn blob(c: char) -> String {
    c.to_string().repeat(64)
}

pub(super) fn node(name: &str, after: &[&str], inputs_from: &[(&str, &str)]) -> DagNodeSpec {
    let mut job = spec(0);
    job.name = name.into();
    job.outputs = vec!["out/*.txt".into()];
    let mut from: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, g) in inputs_from {
        from.entry(p.to_string()).or_default().push(g.to_string());
    }
    DagNodeSpec {
        name: name.into(),
        job,
        count: 1,
        after: after.iter().map(|s| s.to_string()).collect(),
        inputs_from: from,
        retries: 0,
        final_node: false,
    }
}

pub(super) fn diamond() -> DagSpec {
    DagSpec {
        name: "diamond".into(),
        nodes: vec![
            node("a", &[], &[]),
            node("b", &["a"], &[("a", "out/*.txt")]),
            node("c", &["a"], &[]),
            node("d", &["b", "c"], &[("b", "out/*.txt"), ("c", "out/*.txt")]),
        ],
    }
}

pub(super) fn pool() -> Engine {
    let mut e = Engine::new(TIMING);
    e.register(ad("n1", 8), None, false, hash_token("n1"), 0).unwrap();
    e
}

/// Runs every job that can run now; each reports `code(job name)` and one output named after it.
pub(super) fn run_all(e: &mut Engine, now: u64, code: impl Fn(&str) -> i32) -> Vec<Lease> {
    e.schedule(now);
    let leases = e.take_leases("n1", 100, 100, now);
    let reports = leases
        .iter()
        .map(|l| Report {
            lease: LeaseId { job_id: l.job_id, epoch: l.epoch },
            run: RunReport::Exited { code: code(&l.spec.name) },
            stdout: None,
            stderr: None,
            stdout_dropped: 0,
            stderr_dropped: 0,
            outputs: vec![FileRef {
                path: format!("out/{}.txt", l.spec.name),
                blob: blob(l.spec.name.chars().next().unwrap()),
                size: 1,
                inline: None,
            }],
        })
        .collect();
    e.report("n1", reports, now).unwrap();
    e.check_invariants().unwrap();
    leases
}

pub(super) fn states(e: &Engine, id: u64) -> Vec<(String, DagNodeState)> {
    e.check_invariants().unwrap();
    e.dag_view(&alice(), id).unwrap().nodes.into_iter().map(|n| (n.name, n.state)).collect()
}

pub(super) fn names(leases: &[Lease]) -> Vec<String> {
    let mut v: Vec<String> = leases.iter().map(|l| l.spec.name.clone()).collect();
    v.sort();
    v
}

#[test]
fn a_diamond_runs_in_dependency_order_with_the_parents_outputs_as_inputs() {
    let mut e = pool();
    e.take_effects();
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    let ops = e.take_effects().ops;
    assert!(matches!(&ops[0], Op::Dag { nodes, .. } if nodes.len() == 4));
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::DagRelease { .. })).count(), 1, "only `a` has no parent");
    use DagNodeState::*;
    assert_eq!(states(&e, id)[..2], [("a".into(), Idle), ("b".into(), Waiting)]);

    assert_eq!(names(&run_all(&mut e, 2, |_| 0)), ["a"]);
    let second = run_all(&mut e, 3, |_| 0);
    assert_eq!(names(&second), ["b", "c"]);
    let b = second.iter().find(|l| l.spec.name == "b").unwrap();
    assert_eq!(b.spec.inputs, [FileRef { path: "a/out/a.txt".into(), blob: blob('a'), size: 1, inline: None }]);
    assert!(second.iter().find(|l| l.spec.name == "c").unwrap().spec.inputs.is_empty(), "c takes no inputs");
    let third = run_all(&mut e, 4, |_| 0);
    assert_eq!(names(&third), ["d"]);
    let paths: Vec<&str> = third[0].spec.inputs.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["b/out/b.txt", "c/out/c.txt"]);
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!((v.state, v.done, v.total), (DagState::Completed, 4, 4));
    assert!(v.nodes.iter().all(|n| n.tries == 1 && n.jobs.len() == 1));
    assert!(e.take_effects().ops.iter().any(|o| matches!(o, Op::DagState { state: DagState::Completed, .. })));
}

#[test]
fn a_failed_node_is_retried_whole_then_fails_the_workflow_skips_its_children_and_runs_the_final_node() {
    let mut e = pool();
    let mut flow = diamond();
    flow.nodes[1].retries = 1;
    flow.nodes[1].count = 2;
    let mut fin = node("z", &[], &[]);
    fin.final_node = true;
    flow.nodes.push(fin);
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    run_all(&mut e, 2, |_| 0);
    let fails = |n: &str| if n == "b" { 3 } else { 0 };
    assert_eq!(names(&run_all(&mut e, 3, fails)), ["b", "b", "c"]);
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!((v.nodes[1].state, v.nodes[1].tries), (DagNodeState::Idle, 2), "b runs again, both instances");
    assert!(v.nodes[1].reason.as_deref().unwrap().contains("retry 1 of 1"), "{:?}", v.nodes[1].reason);
    assert_eq!(names(&run_all(&mut e, 4, fails)), ["b", "b"]);
    use DagNodeState::*;
    let s: Vec<DagNodeState> = states(&e, id).into_iter().map(|(_, s)| s).collect();
    assert_eq!(s, [Done, Failed, Done, Skipped, Idle], "d is skipped, the final node z released");
    assert_eq!(names(&run_all(&mut e, 5, |_| 0)), ["z"]);
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!(v.state, DagState::Failed);
    let reason = v.reason.unwrap();
    assert!(reason.starts_with("job `b` failed: job ") && reason.contains("exited with 3 (after 2 runs)"), "{reason}");
    assert_eq!(v.nodes[3].reason.as_deref(), Some("`b` failed"));
}

#[test]
fn a_rescue_runs_only_what_did_not_complete_and_reuses_the_done_nodes_outputs() {
    let mut e = pool();
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    run_all(&mut e, 2, |_| 0);
    run_all(&mut e, 3, |n| if n == "c" { 1 } else { 0 });
    assert_eq!(e.dag_view(&alice(), id).unwrap().state, DagState::Failed);
    let a_job = e.dag_view(&alice(), id).unwrap().nodes[0].jobs.clone();
    let bob = Principal::User("bob".into());
    assert!(matches!(e.submit_dag(&bob, diamond(), Some(id), 4), Err(ApiError::NotFound(_))));
    let rescue = e.submit_dag(&alice(), diamond(), Some(id), 4).unwrap();
    let v = e.dag_view(&alice(), rescue).unwrap();
    assert_eq!(v.rescue_of, Some(id));
    assert_eq!(v.nodes[0].jobs, a_job, "a is done with its old job");
    assert_eq!(v.nodes[0].reason.as_deref(), Some(&*format!("done in workflow {id}")));
    assert_eq!(names(&run_all(&mut e, 5, |_| 0)), ["c"], "only c runs; a and b were done");
    let d = run_all(&mut e, 6, |_| 0);
    assert_eq!(d[0].spec.inputs.iter().map(|f| f.blob.clone()).collect::<Vec<_>>(), [blob('b'), blob('c')]);
    assert_eq!(e.dag_view(&alice(), rescue).unwrap().state, DagState::Completed);
    let Err(ApiError::Conflict(m)) = e.submit_dag(&alice(), diamond(), Some(id), 7) else { panic!("rescued twice") };
    assert_eq!(
        m,
        format!("workflow {id} was rescued already, by workflow {rescue}: rescue {rescue} if it did not complete")
    );
    assert!(matches!(e.submit_dag(&alice(), diamond(), Some(rescue + 1), 7), Err(ApiError::NotFound(_))));
}

#[test]
fn a_glob_that_matches_no_output_fails_the_node_with_the_reason() {
    let mut e = pool();
    let mut flow = diamond();
    flow.nodes[1].inputs_from.insert("a".into(), vec!["nothing/*".into()]);
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    run_all(&mut e, 2, |_| 0);
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!(v.nodes[1].state, DagNodeState::Failed);
    assert_eq!(v.nodes[1].reason.as_deref(), Some("no output of `a` matches nothing/*"));
    assert_eq!(v.nodes[1].tries, 0, "nothing of it ran");
}

#[test]
fn a_running_workflow_cannot_be_rescued_and_rm_removes_its_jobs_for_its_owner_only() {
    let mut e = pool();
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    assert!(matches!(e.submit_dag(&alice(), diamond(), Some(id), 2), Err(ApiError::Conflict(_))));
    let job = e.dag_view(&alice(), id).unwrap().nodes[0].jobs[0];
    assert!(matches!(e.dag_rm(&Principal::User("bob".into()), id, 2), Err(ApiError::NotFound(_))));
    // Its first job runs on n1 when the workflow is removed: the run is kept in its attempts.
    e.schedule(2);
    assert_eq!(e.take_leases("n1", 8, 8, 2).len(), 1);
    let v = e.dag_rm(&alice(), id, 3).unwrap();
    let tried = e.job_result(&alice(), job).unwrap().history;
    assert!(tried.len() == 1 && tried[0].node == "n1" && tried[0].outcome.ends_with("while it ran"), "{tried:?}");
    assert_eq!(v.state, DagState::Removed);
    use DagNodeState::*;
    assert_eq!(v.nodes.iter().map(|n| n.state).collect::<Vec<_>>(), [Failed, Skipped, Skipped, Skipped]);
    assert_eq!(e.job_result(&alice(), job).unwrap().job.state, JobState::Removed);
    assert!(matches!(e.dag_rm(&alice(), id, 4), Err(ApiError::Conflict(_))));
    assert!(run_all(&mut e, 5, |_| 0).is_empty(), "nothing of it runs");
}

#[test]
fn a_cycle_or_a_job_the_rules_refuse_stores_nothing() {
    let mut e = pool();
    e.take_effects();
    let mut flow = diamond();
    flow.nodes[0].after = vec!["d".into()];
    let Err(ApiError::BadRequest(m)) = e.submit_dag(&alice(), flow, None, 1) else { panic!("accepted a cycle") };
    assert_eq!(m, "the flow has a cycle: a -> b -> d -> a");
    let mut flow = diamond();
    flow.nodes[2].job.cpus = 0;
    let Err(ApiError::BadRequest(m)) = e.submit_dag(&alice(), flow, None, 1) else { panic!("accepted cpus = 0") };
    assert!(m.starts_with("job `c`: `cpus` is 0"), "{m}");
    let mut flow = diamond();
    flow.name = "a b".into();
    let Err(ApiError::BadRequest(m)) = e.submit_dag(&alice(), flow, None, 1) else { panic!("accepted the name") };
    assert!(m.starts_with("the workflow's `name` may use only"), "{m}");
    assert!(e.take_effects().ops.is_empty());
}

#[test]
fn a_restart_at_any_point_goes_on_from_the_store_and_releases_no_node_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.sqlite");
    let mut store = SqliteStore::open(&path).unwrap();
    let mut e = pool();
    let id = e.submit_dag(&alice(), diamond(), None, 1).unwrap();
    store.commit(&e.take_effects().ops).unwrap();
    run_all(&mut e, 2, |_| 0);
    // The store saw a's result but not what it caused (b and c released): a crash between two
    // group commits.
    let ops = e.take_effects().ops;
    let cut = ops.iter().position(|o| matches!(o, Op::DagNode(_) | Op::DagRelease { .. })).unwrap();
    store.commit(&ops[..cut]).unwrap();
    drop(e);
    let mut e = Engine::load(store.load().unwrap(), TIMING, 10);
    use DagNodeState::*;
    let s: Vec<DagNodeState> = states(&e, id).into_iter().map(|(_, s)| s).collect();
    assert_eq!(s, [Done, Idle, Idle, Waiting], "the restart took the steps the crash lost");
    store.commit(&e.take_effects().ops).unwrap();
    // Loading again changes nothing: b and c keep the jobs they were released with.
    let jobs_before = e.job_views(&alice()).len();
    let mut again = Engine::load(store.load().unwrap(), TIMING, 11);
    assert!(again.take_effects().ops.is_empty());
    assert_eq!(again.job_views(&alice()).len(), jobs_before);
    run_all(&mut e, 13, |_| 0);
    run_all(&mut e, 14, |_| 0);
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!(v.state, DagState::Completed);
    assert_eq!(e.job_views(&alice()).len(), 4, "one job per node");
}

#[test]
fn a_running_workflow_keeps_its_files_and_jobs_and_an_ended_one_goes_after_its_retention() {
    let mut e = pool();
    let mut flow = diamond();
    let d_image = FileRef { path: "d.wasm".into(), blob: blob('9'), size: 1, inline: None };
    flow.nodes[3].job.image = Some(d_image);
    e.add_blob(&blob('9'), "alice", 1, 0);
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    assert!(e.unreferenced_blobs(100, 100).is_empty(), "d's image is kept while d waits");
    for now in 2..5 {
        run_all(&mut e, now, |_| 0);
    }
    assert_eq!(e.dag_view(&alice(), id).unwrap().state, DagState::Completed);
    e.set_limits(crate::engine::Limits { retain_finished_ms: 10, ..Default::default() });
    // A running workflow keeps its jobs past their retention: a's outputs are c's inputs later.
    let other = e.submit_dag(&alice(), diamond(), None, 5).unwrap();
    run_all(&mut e, 5, |_| 0);
    e.tick(50);
    assert!(matches!(e.dag_view(&alice(), id), Err(ApiError::NotFound(_))), "the ended one went");
    assert!(e.take_effects().ops.contains(&Op::DeleteDag { id }));
    let a = e.dag_view(&alice(), other).unwrap().nodes[0].jobs[0];
    assert!(e.job_result(&alice(), a).is_ok(), "kept while its workflow runs");
    for now in 51..53 {
        run_all(&mut e, now, |_| 0);
    }
    assert_eq!(e.dag_view(&alice(), other).unwrap().state, DagState::Completed);
    e.take_effects();
    e.tick(53);
    assert!(e.dag_view(&alice(), other).is_ok(), "kept within its retention");
    e.tick(100);
    assert!(matches!(e.dag_view(&alice(), other), Err(ApiError::NotFound(_))));
    assert!(matches!(e.job_result(&alice(), a), Err(ApiError::NotFound(_))), "its jobs go by their own retention");
}

#[test]
fn a_sweep_node_is_done_only_when_its_last_instance_completes_in_whatever_order() {
    let mut e = pool();
    let mut flow = diamond();
    flow.nodes[0].count = 4;
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    e.schedule(2);
    let leases = e.take_leases("n1", 100, 100, 2);
    assert_eq!(leases.len(), 4);
    for (k, at) in [3, 0, 2, 1].into_iter().enumerate() {
        let l = &leases[at];
        let report = Report {
            lease: LeaseId { job_id: l.job_id, epoch: l.epoch },
            run: RunReport::Exited { code: 0 },
            stdout: None,
            stderr: None,
            stdout_dropped: 0,
            stderr_dropped: 0,
            outputs: vec![FileRef { path: format!("out/{at}.txt"), blob: blob('a'), size: 1, inline: None }],
        };
        e.report("n1", vec![report], 3 + k as u64).unwrap();
        let a = &e.dag_view(&alice(), id).unwrap().nodes[0];
        let want = if k == 3 { DagNodeState::Done } else { DagNodeState::Running };
        assert_eq!((a.state, a.jobs_done), (want, k as u64 + 1));
    }
    let b = run_all(&mut e, 10, |_| 0).into_iter().find(|l| l.spec.name == "b").unwrap();
    let paths: Vec<&str> = b.spec.inputs.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["a/0/out/0.txt", "a/1/out/1.txt", "a/2/out/2.txt", "a/3/out/3.txt"],
        "a sweep's outputs by index"
    );
}

/// A job group is a whole submit; a workflow's job cannot be one (its count and its group could
/// disagree, and a group larger than its count would take in other users' jobs' addresses).
#[test]
fn a_workflows_job_cannot_be_a_job_group() {
    let mut e = Engine::new(TIMING);
    let mut d = diamond();
    d.nodes[0].job.group = Some(256);
    let Err(ApiError::BadRequest(m)) = e.submit_dag(&alice(), d, None, 1) else { panic!("a group in a workflow") };
    assert!(m.contains("job `a`: a workflow's job cannot be a job group"), "{m}");
}
