//! Review 3 findings: what settling a node costs when many of its jobs are held.

use super::tests::{TIMING, alice, diamond};
use super::*;
use crate::engine::{hash_token, tests::ad};

fn report(l: &Lease, run: RunReport) -> Report {
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

/// Half a sweep is held first, then the other half completes one job at a time: each end
/// looked again at every held job before going on (quadratic, under the engine lock).
#[test]
fn a_sweep_with_many_held_jobs_settles_in_linear_time() {
    const N: u64 = 2000;
    let mut e = Engine::new(TIMING);
    let big = NodeAd { memory_mb: 1 << 20, disk_mb: 1 << 20, ..ad("big", N as u32) };
    e.register(big, None, false, hash_token("big"), 0).unwrap();
    let mut flow = diamond();
    flow.nodes[0].count = N;
    let id = e.submit_dag(&alice(), flow, None, 1).unwrap();
    let mut leases = Vec::new();
    while (leases.len() as u64) < N {
        e.schedule(2);
        let more = e.take_leases("big", N as u32, N as u32, 2);
        assert!(!more.is_empty(), "all {N} run at once");
        leases.extend(more);
    }
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
