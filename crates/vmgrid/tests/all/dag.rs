//! Workflows (`vmgrid dag`) end to end: a real coordinator and nodes on loopback running DAGs of
//! wasm guests (`probe` and `wordcount`), whose outputs flow from node to node by their blobs.

use std::path::Path;

use vmgrid_proto::{DagNodeState, DagState, DagView, JobState};

use crate::util::*;

fn status(pool: &Pool, id: u64) -> DagView {
    let out = pool.cli().args(["dag", "status", &id.to_string(), "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn probe(args: &[&str]) -> String {
    let args = args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    format!("vm = {{ type = \"wasm\", image = {}, args = [{args}] }}\n", toml_path(&guest_wasm("probe")))
}

fn write_flow(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("flow.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn stdout_of_job(pool: &Pool, id: u64) -> String {
    let out = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
    stdout_of(&out)
}

#[test]
fn a_diamond_flows_outputs_from_node_to_node_by_their_blobs() {
    let mut pool = Pool::start();
    pool.start_node("n1", 2);
    pool.start_node("n2", 2);
    let d = JobDir::new();
    // b is a job file of its own; a, c and d are written inline. c is a sweep of two.
    d.write(
        "jobs/count.toml",
        format!(
            "[vm]\ntype = \"wasm\"\nimage = {}\nargs = [\"a/out/a.txt\", \"out/b.txt\"]\n[files]\noutputs = [\"out/*.txt\"]\n",
            toml_path(&guest_wasm("wordcount"))
        ),
    );
    let flow = format!(
        "[jobs.a]\n{}files = {{ outputs = [\"out/*.txt\"] }}\n\n\
         [jobs.b]\nfile = \"jobs/count.toml\"\nafter = [\"a\"]\ninputs_from = {{ a = [\"out/*.txt\"] }}\n\n\
         [jobs.c]\nafter = [\"a\"]\ncount = 2\ninputs_from = {{ a = [\"out/a.txt\"] }}\n\
         vm = {{ type = \"wasm\", image = {}, args = [\"a/out/a.txt\", \"out/c.txt\", \"{{index}}\"] }}\n\
         files = {{ outputs = [\"out/*.txt\"] }}\n\n\
         [jobs.d]\nafter = [\"b\", \"c\"]\ninputs_from = {{ b = [\"out/*.txt\"], c = [\"out/c.txt\"] }}\n{}\
         files = {{ outputs = [\"out/*.txt\"] }}\n",
        probe(&["write:out/a.txt:alpha beta beta"]),
        toml_path(&guest_wasm("wordcount")),
        probe(&["read:b/out/b.txt", "read:c/0/out/c.txt", "read:c/1/out/c.txt", "write:out/d.txt:read 3"]),
    );
    let flow = write_flow(d.path(), &flow);
    let out = pool.cli().args(["dag", "submit"]).arg(&flow).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id: u64 = stdout_of(&out).trim().parse().unwrap();

    let v = status(&pool, id);
    assert_eq!((v.state, v.done, v.total), (DagState::Completed, 4, 4));
    for n in &v.nodes {
        assert_eq!((n.state, n.tries, n.jobs.len() as u64, n.jobs_done), (DagNodeState::Done, 1, n.count, n.count));
    }
    let [a, b, c, dd] = [0, 1, 2, 3].map(|i| &v.nodes[i]);
    assert_eq!(c.count, 2);
    // Each child was released only after its parents completed.
    let finished = |id: u64| pool.job(id).finished_ms.unwrap();
    let submitted = |id: u64| pool.job(id).submitted_ms;
    assert!(submitted(b.jobs[0]) >= finished(a.jobs[0]));
    assert!(submitted(dd.jobs[0]) >= finished(b.jobs[0]).max(finished(c.jobs[1])));

    assert_eq!(
        stdout_of_job(&pool, dd.jobs[0]),
        "words\t3\ndistinct\t2\nbeta\t2\nalpha\t1\n\nwords\t3\ndistinct\t2\n\nwords\t3\ndistinct\t2\nbeta\t2\n\n"
    );
    let fetched = d.path().join("fetched");
    pool.cli().args(["fetch", &dd.jobs[0].to_string(), "--out"]).arg(&fetched).assert().success();
    assert_eq!(std::fs::read_to_string(fetched.join("out/d.txt")).unwrap(), "read 3");

    let out = pool.cli().args(["dag", "status", &id.to_string()]).output().unwrap();
    let text = stdout_of(&out);
    assert!(text.contains(&format!("workflow {id} (flow) of admin: completed, 4/4 nodes done")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("c ") && l.contains("done") && l.contains("2/2")), "{text}");
    let out = pool.cli().args(["dag", "status", "--json"]).output().unwrap();
    let list: Vec<vmgrid_proto::DagSummary> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list.iter().map(|s| (s.id, s.state, s.done, s.total)).collect::<Vec<_>>(),
        [(id, DagState::Completed, 4, 4)]
    );
}

#[test]
fn a_failed_middle_node_fails_the_flow_and_its_rescue_runs_only_what_did_not_complete() {
    let mut pool = Pool::start();
    pool.start_node("n1", 2);
    let d = JobDir::new();
    let flow_with = |b: &[&str]| {
        format!(
            "[jobs.a]\n{}files = {{ outputs = [\"out/*.txt\"] }}\n\n\
             [jobs.b]\nafter = [\"a\"]\nretries = 1\ninputs_from = {{ a = [\"out/*.txt\"] }}\n{}files = {{ outputs = [\"out/*.txt\"] }}\n\n\
             [jobs.c]\nafter = [\"b\"]\ninputs_from = {{ b = [\"out/*.txt\"] }}\n{}\n\
             [jobs.z]\nfinal = true\n{}",
            probe(&["write:out/a.txt:from a"]),
            probe(b),
            probe(&["read:b/out/b.txt"]),
            probe(&["args", "final"]),
        )
    };
    let flow = write_flow(d.path(), &flow_with(&["read:a/out/a.txt", "exit:3"]));
    let out = pool.cli().args(["dag", "submit"]).arg(&flow).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let id: u64 = stdout_of(&out).trim().parse().unwrap();
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("workflow {id} failed: job `b` failed: job ")) && err.contains("exited with 3"),
        "{err}"
    );
    let v = status(&pool, id);
    assert_eq!(v.state, DagState::Failed);
    let states: Vec<(DagNodeState, u32)> = v.nodes.iter().map(|n| (n.state, n.tries)).collect();
    use DagNodeState::*;
    assert_eq!(states, [(Done, 1), (Failed, 2), (Skipped, 0), (Done, 1)], "b ran twice (one retry), z ran last");
    assert_eq!(v.nodes[2].reason.as_deref(), Some("`b` failed"));
    assert_eq!(stdout_of_job(&pool, v.nodes[3].jobs[0]), "final\n");
    let a_job = v.nodes[0].jobs[0];

    // Fixed, the flow is rescued: a is not run again, and its output still reaches b.
    std::fs::write(&flow, flow_with(&["read:a/out/a.txt", "write:out/b.txt:b saw a"])).unwrap();
    let out =
        pool.cli().args(["dag", "submit"]).arg(&flow).args(["--rescue", &id.to_string(), "--wait"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let rescue: u64 = stdout_of(&out).trim().parse().unwrap();
    let r = status(&pool, rescue);
    assert_eq!((r.state, r.rescue_of), (DagState::Completed, Some(id)));
    assert_eq!(r.nodes[0].jobs, [a_job], "a keeps the job that completed in workflow {id}");
    assert_eq!(r.nodes[0].reason.as_deref(), Some(&*format!("done in workflow {id}")));
    assert_eq!(pool.job(a_job).attempts, 1);
    assert_eq!(stdout_of_job(&pool, r.nodes[1].jobs[0]), "from a\n");
    assert_eq!(stdout_of_job(&pool, r.nodes[2].jobs[0]), "b saw a\n");
    let jobs = pool.admin().jobs().unwrap();
    let named = |n: &str| jobs.iter().filter(|j| j.name == n).count();
    assert_eq!((named("a"), named("b"), named("c"), named("z")), (1, 3, 1, 2), "only what did not complete ran again");
    assert!(jobs.iter().all(|j| j.attempts == 1), "no job ran twice: {jobs:#?}");
}

#[test]
fn a_coordinator_killed_mid_flow_restarts_and_the_flow_completes_with_no_node_run_twice() {
    let mut pool = Pool::start();
    pool.start_node("n1", 2);
    let d = JobDir::new();
    let flow = format!(
        "[jobs.a]\n{}files = {{ outputs = [\"out/*.txt\"] }}\n\n\
         [jobs.b]\nafter = [\"a\"]\ncount = 4\ninputs_from = {{ a = [\"out/*.txt\"] }}\n{}files = {{ outputs = [\"out/*.txt\"] }}\n\n\
         [jobs.c]\nafter = [\"b\"]\ninputs_from = {{ b = [\"out/*.txt\"] }}\n{}",
        probe(&["sleep:300", "write:out/a.txt:a"]),
        probe(&["sleep:700", "read:a/out/a.txt", "write:out/b{index}.txt:b{index}"]),
        probe(&["read:b/0/out/b0.txt", "read:b/3/out/b3.txt"]),
    );
    let flow = write_flow(d.path(), &flow);
    // One flow submitted without --wait: its client is gone, the pool runs it.
    let out = pool.cli().args(["dag", "submit"]).arg(&flow).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let gone: u64 = stdout_of(&out).trim().parse().unwrap();
    // The other with --wait: its client waits across the restart.
    let mut waiting = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(["dag", "submit", "--wait"])
        .arg(&flow)
        .env("VMGRID_CONFIG", pool.data_dir().join("client.toml"))
        .env_remove("VMGRID_POOL")
        .env_remove("VMGRID_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(waiting.stdout.take().unwrap()), &mut line).unwrap();
    let waited: u64 = line.trim().parse().unwrap();
    pool.wait_for("b to run", |p| status(p, gone).nodes[1].state == DagNodeState::Running);
    pool.kill_coordinator();
    pool.start_coordinator();
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    pool.wait_for("the flow to end", |p| status(p, gone).state != DagState::Running);
    for id in [gone, waited] {
        let v = status(&pool, id);
        assert_eq!(v.state, DagState::Completed, "{v:#?}");
        assert!(v.nodes.iter().all(|n| n.tries == 1), "no node was released twice: {v:#?}");
        assert_eq!(stdout_of_job(&pool, v.nodes[2].jobs[0]), "b0\nb3\n");
    }
    // No node was released twice: one job per instance, each completed once. (A job whose lease
    // reply died with the coordinator, or whose lease expired meanwhile, may count a second
    // attempt: the pool's fencing requeues it and accepts one result.)
    let jobs = pool.admin().jobs().unwrap();
    assert_eq!(jobs.len(), 12, "one job per instance: {jobs:#?}");
    assert!(jobs.iter().all(|j| j.state == JobState::Completed && j.exit_code == Some(0)), "{jobs:#?}");
}

#[test]
fn a_cyclic_flow_or_an_unknown_dependency_is_refused_with_the_names_and_nothing_is_submitted() {
    let pool = Pool::start();
    let d = JobDir::new();
    let job = probe(&["args", "x"]);
    let cases = [
        (
            format!("[jobs.a]\nafter = [\"c\"]\n{job}[jobs.b]\nafter = [\"a\"]\n{job}[jobs.c]\nafter = [\"b\"]\n{job}"),
            "the flow has a cycle: a -> b -> c -> a",
        ),
        (format!("[jobs.a]\nafter = [\"nope\"]\n{job}"), "job `a` runs after `nope`, which is not a job of this flow"),
        ("[jobs.a]\nfile = \"missing.toml\"\n".to_string(), "job `a`: cannot read its job file"),
    ];
    for (text, want) in cases {
        let flow = write_flow(d.path(), &text);
        let out = pool.cli().args(["dag", "submit"]).arg(&flow).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = stderr_of(&out);
        assert!(err.contains(want) && err.contains("flow.toml:"), "{err}");
    }
    assert!(pool.admin().jobs().unwrap().is_empty());
    let out = pool.cli().args(["dag", "status", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("no workflow 1"), "{}", stderr_of(&out));
}

#[test]
fn only_its_owner_or_an_admin_removes_a_workflow_and_rm_removes_its_queued_jobs() {
    let pool = Pool::start();
    let d = JobDir::new();
    let user = |name: &str| {
        let token = pool.admin().add_token(vmgrid_proto::Role::User, name, None).unwrap().token;
        let mut c = vmgrid();
        c.env("VMGRID_POOL", &pool.url)
            .env("VMGRID_TOKEN", token)
            .env("VMGRID_CA_FILE", pool.data_dir().join("ca.pem"));
        c
    };
    let job = probe(&["args", "x"]);
    let flow = write_flow(d.path(), &format!("[jobs.a]\n{job}[jobs.b]\nafter = [\"a\"]\n{job}"));
    // No node yet: a stays idle.
    let out = user("alice").args(["dag", "submit"]).arg(&flow).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = stdout_of(&out).trim().to_string();
    for args in [["dag", "rm", &id], ["dag", "status", &id]] {
        let out = user("bob").args(args).output().unwrap();
        // Alice's workflow is, to bob, no workflow at all (neither its existence nor its owner):
        // the same exit code and words as for an id no workflow has.
        let none = user("bob").args([args[0], args[1], "999999"]).output().unwrap();
        assert_eq!(out.status.code(), none.status.code());
        assert_eq!(stderr_of(&out).replace(&id, "N"), stderr_of(&none).replace("999999", "N"));
        assert!(stderr_of(&out).contains(&format!("no workflow {id}")), "{}", stderr_of(&out));
    }
    let out = user("bob").args(["dag", "status", "--json"]).output().unwrap();
    assert_eq!(stdout_of(&out).trim(), "[]", "bob does not see alice's workflow");
    let out = user("alice").args(["dag", "rm", &id]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), format!("workflow {id}: removed\n"));
    let v = status(&pool, id.parse().unwrap());
    assert_eq!(v.state, DagState::Removed);
    assert_eq!(v.reason.as_deref(), Some("removed by alice"));
    assert_eq!(v.nodes.iter().map(|n| n.state).collect::<Vec<_>>(), [DagNodeState::Failed, DagNodeState::Skipped]);
    assert_eq!(pool.job(v.nodes[0].jobs[0]).state, JobState::Removed);
    let out = user("alice").args(["dag", "rm", &id]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("is removed already"), "{}", stderr_of(&out));
}
