//! Results checked by replicas, end to end with real node agents and real wasm jobs: three
//! honest nodes and one dishonest (a test-only flag, named as such, makes it add a line to every
//! stdout it reports). Jobs with `replicas` get the honest result; the dishonest node's
//! reputation falls, a requirement on reputation keeps jobs off it, and a banned node is out.

use vmgrid_proto::JobState;

use crate::util::*;

#[test]
fn replicated_jobs_get_the_honest_result_and_a_dishonest_node_is_found_out() {
    let mut pool = Pool::start();
    for n in ["h1", "h2", "h3"] {
        pool.start_node(n, 1);
    }
    pool.start_node_env("cheat", 1, &[], &[("VMGRID_TEST_ONLY_TAMPER_RESULTS", "1")]);
    let d = JobDir::new();
    // Four replicas on four nodes: every job runs on the dishonest one too.
    let job = probe_job_file(d.path(), "verified", &["args", "42"], "[policy]\nreplicas = 4\nquorum = 3\n");
    let out = pool.cli().args(["submit", "--count", "5"]).arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let ids = ids_of(&out);
    pool.wait_for("the replicated jobs to end", |p| ids.iter().all(|&id| p.job(id).state.is_final()));
    for &id in &ids {
        let r = pool.admin().job(id).unwrap();
        assert_eq!(r.job.state, JobState::Completed, "{r:#?}");
        assert!(r.job.reason.as_deref().unwrap_or("").contains("3 of its 4 replicas agreed"), "{r:#?}");
        let mut nodes: Vec<&str> = r.history.iter().map(|a| a.node.as_str()).collect();
        nodes.sort_unstable();
        assert_eq!(nodes, ["cheat", "h1", "h2", "h3"], "four distinct nodes");
        let logs = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
        assert_eq!(stdout_of(&logs), "42\n", "the honest result");
    }
    let nodes = pool.admin().nodes().unwrap();
    let cheat = nodes.iter().find(|n| n.ad.name == "cheat").unwrap();
    assert_eq!((cheat.agreements, cheat.disagreements), (0, 5));
    assert!(cheat.reputation < 0.2, "{}", cheat.reputation);
    for n in nodes.iter().filter(|n| n.ad.name != "cheat") {
        assert_eq!((n.agreements, n.disagreements), (5, 0), "{}", n.ad.name);
        assert!(n.reputation > 0.8);
    }
    let status = pool.cli().arg("status").output().unwrap();
    assert!(stdout_of(&status).lines().any(|l| l.starts_with("cheat") && l.contains("0.14") && l.contains("0/5")));

    // A requirement on reputation keeps jobs off the dishonest node.
    let picky = probe_job_file(d.path(), "picky", &["args", "7"], "[policy]\nrequirements = 'node.reputation > 0.5'\n");
    let out = pool.cli().args(["submit", "--count", "6"]).arg(&picky).output().unwrap();
    let ids = ids_of(&out);
    pool.wait_for("the picky jobs to end", |p| ids.iter().all(|&id| p.job(id).state.is_final()));
    for &id in &ids {
        let r = pool.admin().job(id).unwrap();
        assert_eq!(r.job.state, JobState::Completed);
        assert!(r.history.iter().all(|a| a.node != "cheat"), "{r:#?}");
    }

    // Banned, it leaves the pool and cannot join again; an admin may lift the ban.
    let out = pool.cli().args(["ban", "cheat"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("node cheat: banned"));
    pool.wait_for("the banned node to be gone", |p| p.admin().nodes().unwrap().iter().all(|n| n.ad.name != "cheat"));
    let err = pool.admin().register(&cheat.ad, None).unwrap_err();
    assert!(err.to_string().contains("node cheat is banned from this pool by an admin"), "{err}");
    let token = pool.admin().add_token(vmgrid_proto::Role::User, "alice", None).unwrap().token;
    let err = pool.client_with(&token).ban("h1", true).unwrap_err();
    assert_eq!(err.status(), Some(403), "only an admin bans: {err}");
    let out = pool.cli().args(["ban", "--lift", "cheat"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    pool.admin().register(&cheat.ad, None).unwrap();
}

/// Prints 32 bytes from `random_get` (hex is not needed: stdout is a blob either way).
const RANDOM_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $random_get (i32.const 64) (i32.const 32)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 32))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Reads the real-time clock.
const CLOCK_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 64)))))"#;

/// With `deterministic = true`, a wasm job that draws random numbers gives the same result on
/// every node, so its replicas agree; without it they differ and it waits for another node; a
/// deterministic job that reads the clock is refused on every node, and held for it.
#[test]
fn a_deterministic_job_agrees_on_every_node_and_one_reading_the_clock_is_refused() {
    let mut pool = Pool::start();
    for n in ["d1", "d2", "d3"] {
        pool.start_node(n, 1);
    }
    let d = JobDir::new();
    d.write("rand.wat", RANDOM_WAT);
    d.write("clock.wat", CLOCK_WAT);
    let submit = |image: &str, deterministic: bool| {
        let job = d.job(&format!(
            "name = \"det\"\n[vm]\ntype = \"wasm\"\nimage = \"{image}\"\n[policy]\nreplicas = 3\ndeterministic = {deterministic}\n"
        ));
        let out = pool.cli().arg("submit").arg(job).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        ids_of(&out)[0]
    };
    let same = submit("rand.wat", true);
    let differ = submit("rand.wat", false);
    let clock = submit("clock.wat", true);
    pool.wait_for("the deterministic jobs to end", |p| {
        p.job(same).state.is_final() && p.job(clock).state == JobState::Held
    });
    let r = pool.admin().job(same).unwrap();
    assert_eq!(r.job.state, JobState::Completed);
    assert!(r.job.reason.as_deref().unwrap_or("").contains("3 of its 3 replicas agreed"), "{r:#?}");
    assert_eq!(r.stdout.as_ref().map(|f| f.size), Some(32));
    let r = pool.admin().job(clock).unwrap();
    let reason = r.job.reason.unwrap_or_default();
    assert!(reason.contains("clock_time_get is refused"), "{reason}");
    assert!(reason.contains("3 of its 3 replicas agreed on this failure"), "{reason}");
    // Three different results on the pool's three nodes: it waits for a fourth.
    pool.wait_for("the job to wait for a node", |p| {
        p.job(differ).reason.unwrap_or_default().contains("waits for a node that has not run one of its replicas")
    });
    let r = pool.admin().job(differ).unwrap();
    assert_eq!((r.job.state, r.history.len()), (JobState::Idle, 3));
}
