//! Lease-ahead, end to end: a node running short jobs holds more than its cpus can run at once,
//! queued, and starts them without a call per job; when it is killed its queued jobs run
//! elsewhere exactly once (its late results refused), and when it drains it hands them back
//! unstarted.

use vmgrid_proto::{JobState, LeaseId, Report, ReportRequest};

use crate::util::*;

/// Runs `n` short jobs on the pool so that its nodes learn that jobs here are short.
fn warm_up(pool: &Pool, d: &JobDir, n: u32) {
    let job = probe_job_file(d.path(), "warm", &["sleep:2"], "");
    let out = pool.cli().arg("submit").arg(&job).args(["--count", &n.to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let out = pool.cli().arg("wait").args(ids_of(&out).iter().map(|i| i.to_string())).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

/// Submits `n` jobs of `ms` milliseconds each, each printing its index.
fn sweep(pool: &Pool, d: &JobDir, n: u32, ms: u32) -> Vec<u64> {
    let job = probe_job_file(d.path(), "sweep", &[&format!("sleep:{ms}"), "args", "{index}"], "");
    let out = pool.cli().arg("submit").arg(&job).args(["--count", &n.to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    ids_of(&out)
}

/// The jobs node `name` holds now, running or queued ahead.
fn held_by(pool: &Pool, ids: &[u64], name: &str) -> Vec<vmgrid_proto::JobView> {
    let jobs = pool.admin().jobs().unwrap();
    jobs.into_iter()
        .filter(|j| ids.contains(&j.id) && j.state == JobState::Running && j.node.as_deref() == Some(name))
        .collect()
}

/// Stops node `name` (SIGSTOP) at a moment the pool sees it hold at least `n` of `ids`: its
/// running job and, with `n` >= 3, some queued behind it (a job that finished and is not reported
/// yet counts too). Returns what it holds then; the node stays stopped, for the caller to signal
/// and then resume. Each look is one small call to the pool (the node's view), well within the
/// tests' 1.5 s leases; the jobs are listed only once enough are held.
fn stop_holding(pool: &Pool, ids: &[u64], name: &str, n: usize) -> Vec<vmgrid_proto::JobView> {
    let pid = pool.node_pid(name) as i32;
    let mut held = Vec::new();
    let found = poll_until(std::time::Duration::from_secs(60), || {
        // SAFETY: signalling a child process we started (resumed below unless this look finds
        // enough).
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let holds =
            |p: &Pool| p.admin().nodes().unwrap().iter().any(|v| v.ad.name == name && v.running_jobs as usize >= n);
        if holds(pool) {
            held = held_by(pool, ids, name);
        }
        let enough = held.len() >= n;
        if !enough {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        enough
    });
    assert!(found, "{name} never held {n} jobs at once");
    held
}

/// Every job completed once with its own output, and the pool accepted exactly one result each.
fn each_completed_once(pool: &Pool, d: &JobDir, ids: &[u64], accepted: usize) {
    let admin = pool.admin();
    for (i, &id) in ids.iter().enumerate() {
        let r = admin.job(id).unwrap();
        assert_eq!((r.job.state, r.job.exit_code), (JobState::Completed, Some(0)), "job {id}: {:?}", r.job);
        let tmp = d.path().join(format!("stdout-{id}"));
        admin.fetch_file(&r.stdout.expect("a completed job has its stdout"), &tmp).unwrap();
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), format!("{i}\n"), "job {id} has its own result");
    }
    let metrics = admin.metrics().unwrap();
    let line = format!("vmgrid_results_accepted_total {accepted}");
    assert!(metrics.lines().any(|l| l == line), "one result accepted per job ({line}):\n{metrics}");
}

#[test]
fn a_killed_nodes_queued_jobs_run_elsewhere_exactly_once_and_its_late_results_are_refused() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    warm_up(&pool, &d, 8);
    // Short jobs, so that even on a busy machine (where they run slower) the node holds several
    // ahead of its one cpu: about 100 ms of them.
    let ids = sweep(&pool, &d, 200, 5);
    let credential = pool.node_credential("n1");
    // What n1 held when it died: its running job and those queued behind it.
    let held = stop_holding(&pool, &ids, "n1", 3);
    pool.kill_node("n1");
    pool.start_node("n2", 1);
    pool.wait_for("every job to complete", |p| {
        let jobs = p.admin().jobs().unwrap();
        jobs.iter().filter(|j| ids.contains(&j.id) && j.state == JobState::Completed).count() == ids.len()
    });
    // n1's results for what it held, arriving late under its old credential: all refused.
    let late = pool.client_with(&credential);
    let reports = held.iter().map(|j| Report::exited(LeaseId { job_id: j.id, epoch: 1 }, 7)).collect();
    match late.report(&ReportRequest { reports }) {
        Ok(resp) => assert!(resp.accepted.is_empty(), "{resp:?}"),
        Err(e) => assert_eq!(e.status(), Some(409), "{e}"),
    }
    each_completed_once(&pool, &d, &ids, 8 + ids.len());
}

#[test]
fn a_draining_node_hands_back_its_queued_jobs_unstarted() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    warm_up(&pool, &d, 8);
    // 200 jobs of 5 ms: the node keeps some queued behind its one cpu (about 100 ms of them, by
    // their durations). It is stopped while it holds several, and asked to drain then: once it
    // is, it starts none of those it queued.
    let ids = sweep(&pool, &d, 200, 5);
    stop_holding(&pool, &ids, "n1", 4);
    let pid = pool.node_pid("n1") as i32;
    // SAFETY: signalling a child process we started (stopped: the drain begins as it resumes).
    unsafe {
        libc::kill(pid, libc::SIGTERM);
        libc::kill(pid, libc::SIGCONT);
    }
    let (_, mut child) = pool.nodes.remove(0);
    assert!(child.wait().unwrap().success(), "n1 exits 0 after draining");
    let jobs: Vec<_> = pool.admin().jobs().unwrap().into_iter().filter(|j| ids.contains(&j.id)).collect();
    let back: Vec<_> =
        jobs.iter().filter(|j| j.reason.as_deref().is_some_and(|r| r.contains("handed it back unstarted"))).collect();
    assert!(!back.is_empty(), "n1 handed back none of its queued jobs: {jobs:?}");
    for j in &back {
        assert_eq!(
            (j.state, j.attempts),
            (JobState::Idle, 0),
            "a job handed back unstarted is idle, no attempt counted: {j:?}"
        );
    }
    assert!(jobs.iter().all(|j| j.state != JobState::Running), "n1 left nothing running: {jobs:?}");
    pool.start_node("n2", 1);
    pool.wait_for("every job to complete", |p| {
        let jobs = p.admin().jobs().unwrap();
        jobs.iter().filter(|j| ids.contains(&j.id) && j.state == JobState::Completed).count() == ids.len()
    });
    for j in pool.admin().jobs().unwrap().iter().filter(|j| ids.contains(&j.id)) {
        assert_eq!(j.attempts, 1, "each job ran once: {j:?}");
    }
    each_completed_once(&pool, &d, &ids, 8 + ids.len());
}
