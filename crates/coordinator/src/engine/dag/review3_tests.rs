//! Review 3 findings: what settling a node costs when many of its jobs are held.

use super::bounds_tests::{report, sweep_running};
use super::tests::alice;
use super::*;

/// Half a sweep is held first, then the other half completes one job at a time: each end
/// looked again at every held job before going on (quadratic, under the engine lock).
#[test]
fn a_sweep_with_many_held_jobs_settles_in_linear_time() {
    const N: u64 = 2000;
    let (mut e, id, leases) = sweep_running(N);
    let before = e.dags[&id].work.get();
    let half = N as usize / 2;
    for l in &leases[..half] {
        e.report("big", vec![report(l, RunReport::BadJob { reason: "no".into() })], 3).unwrap();
    }
    for l in &leases[half..] {
        e.report("big", vec![report(l, RunReport::Exited { code: 0 })], 4).unwrap();
    }
    let work = e.dags[&id].work.get() - before;
    assert!(work < 8 * N, "settling {N} jobs, {half} of them held, took {work} looks");
    let v = e.dag_view(&alice(), id).unwrap();
    assert_eq!(v.nodes[0].state, DagNodeState::Failed, "a held job fails its node once the rest ended");
    let first = leases[0].job_id;
    let why = v.nodes[0].reason.clone().unwrap_or_default();
    assert!(why.starts_with(&format!("job {first} is held")), "{why}");
    e.check_invariants().unwrap();
}
