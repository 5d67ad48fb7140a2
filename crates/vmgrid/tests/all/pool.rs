//! The pool, end to end: a real coordinator and real node agents as processes on loopback.

use vmgrid_proto::{JobState, LeaseId, Report, ReportRequest};

use crate::util::*;

#[test]
fn a_two_node_pool_runs_a_sweep_keeps_exit_codes_and_fetches_outputs() {
    let mut pool = Pool::start();
    pool.start_node("n1", 2);
    pool.start_node("n2", 2);
    let d = JobDir::new();
    // Instance i writes out/i.txt, prints i, and exits with i.
    let job = probe_job_file(
        d.path(),
        "sweep",
        &["write:out/{index}.txt:result {index}", "stderr:err {index}", "env:IDX", "exit:{index}"],
        "env = { IDX = \"i{index}\" }\n[files]\noutputs = [\"out/*.txt\"]\n[policy]\nrequirements = '\"wasm\" in node.vm_types'\n",
    );
    let out = pool.cli().arg("submit").arg(&job).args(["--count", "6"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let ids = ids_of(&out);
    assert_eq!(ids.len(), 6);
    // wait exits with the first non-zero exit code among the jobs: instance 1 exits 1.
    let out = pool.cli().arg("wait").args(ids.iter().map(|i| i.to_string())).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));

    let out = pool.cli().args(["q", "--json"]).output().unwrap();
    let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.len(), 6);
    let mut nodes_used = std::collections::BTreeSet::new();
    for (i, j) in jobs.iter().enumerate() {
        assert_eq!(j["state"], "completed", "{j}");
        assert_eq!(j["exit_code"], i as i64, "{j}");
        assert_eq!(j["owner"], "admin");
        for key in ["id", "name", "node", "attempts", "reason"] {
            assert!(j.get(key).is_some(), "q --json lacks {key}");
        }
        nodes_used.insert(j["node"].as_str().unwrap().to_string());
    }
    assert_eq!(nodes_used.len(), 2, "both nodes ran jobs: {nodes_used:?}");

    let out = pool.cli().args(["logs", &ids[4].to_string()]).output().unwrap();
    assert_eq!(stdout_of(&out), "i4\n");
    let out = pool.cli().args(["logs", &ids[4].to_string(), "--stderr"]).output().unwrap();
    assert_eq!(stdout_of(&out), "err 4\n");
    let fetched = d.path().join("fetched");
    pool.cli().args(["fetch", &ids[5].to_string(), "--out"]).arg(&fetched).assert().success();
    assert_eq!(std::fs::read_to_string(fetched.join("out/5.txt")).unwrap(), "result 5");

    let out = pool.cli().args(["status", "--json"]).output().unwrap();
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.len(), 2);
    for key in [
        "name",
        "state",
        "arch",
        "os",
        "cpus",
        "memory_mb",
        "disk_mb",
        "vm_types",
        "accelerators",
        "labels",
        "appliance",
    ] {
        assert!(nodes[0].get(key).is_some(), "status --json lacks {key}");
    }
    let metrics = pool.admin().metrics().unwrap();
    assert!(metrics.contains("vmgrid_jobs{state=\"completed\"} 6"), "{metrics}");
    assert!(metrics.contains("vmgrid_nodes{state=\"ready\"} 2"), "{metrics}");
    assert!(metrics.contains("vmgrid_dispatch_latency_ms_count 6"), "{metrics}");
}

#[test]
fn bad_tokens_and_wrong_roles_are_refused() {
    let pool = Pool::start();
    let d = JobDir::new();
    let bad = d.write("bad.token", "not-a-token");
    let out = vmgrid()
        .args(["q", "--pool", &pool.url, "--token-file"])
        .arg(&bad)
        .arg("--ca-file")
        .arg(pool.data_dir().join("ca.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("not valid for this pool"), "{}", stderr_of(&out));
    // The pool token only registers nodes.
    let out = vmgrid()
        .args(["q", "--pool", &pool.url, "--token-file"])
        .arg(pool.data_dir().join("pool.token"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("a pool token cannot list jobs"), "{}", stderr_of(&out));
    // Garbage bodies get a 4xx with a sentence.
    let err = pool
        .client_with(&std::fs::read_to_string(pool.data_dir().join("pool.token")).unwrap())
        .register(
            &vmgrid_proto::NodeAd {
                name: "bad name!".into(),
                arch: "x".into(),
                os: "y".into(),
                cpus: 1,
                memory_mb: 1,
                disk_mb: 1,
                vm_types: vec![],
                accelerators: vec![],
                labels: Default::default(),
                appliance: false,
                qemu: None,
                peer: None,
                overlay: None,
            },
            None,
        )
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}

#[test]
fn a_user_cannot_remove_another_users_job() {
    let pool = Pool::start();
    let alice = pool.admin().add_token(vmgrid_proto::Role::User, "alice", None).unwrap().token;
    let bob = pool.admin().add_token(vmgrid_proto::Role::User, "bob", None).unwrap().token;
    let d = JobDir::new();
    let a_tok = d.write("alice.token", &alice);
    let b_tok = d.write("bob.token", &bob);
    let job = probe_job_file(d.path(), "mine", &["exit:0"], "");
    let mut c = vmgrid();
    c.env("VMGRID_POOL", &pool.url).env("VMGRID_TOKEN", &alice).env("VMGRID_CA_FILE", pool.data_dir().join("ca.pem"));
    let out = c.arg("submit").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];

    let out = vmgrid()
        .env("VMGRID_POOL", &pool.url)
        .env("VMGRID_CA_FILE", pool.data_dir().join("ca.pem"))
        .arg("rm")
        .arg(id.to_string())
        .arg("--token-file")
        .arg(&b_tok)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // To bob, alice's job is no job at all: he learns neither that it exists nor whose it is.
    assert!(stderr_of(&out).contains("no such job") && !stderr_of(&out).contains("alice"), "{}", stderr_of(&out));
    // Bob does not even see it.
    let out = vmgrid()
        .env("VMGRID_POOL", &pool.url)
        .env("VMGRID_CA_FILE", pool.data_dir().join("ca.pem"))
        .args(["q", "--json"])
        .arg("--token-file")
        .arg(&b_tok)
        .output()
        .unwrap();
    assert_eq!(stdout_of(&out).trim(), "[]");
    assert_eq!(pool.job(id).state, JobState::Idle);
    // Alice can, and the admin can see it removed.
    let out = vmgrid()
        .env("VMGRID_POOL", &pool.url)
        .env("VMGRID_CA_FILE", pool.data_dir().join("ca.pem"))
        .arg("rm")
        .arg(id.to_string())
        .arg("--token-file")
        .arg(&a_tok)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(pool.job(id).state, JobState::Removed);
}

#[test]
fn unmatchable_jobs_stay_idle_with_a_reason_and_hold_release_work() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "picky", &["exit:0"], "[policy]\nrequirements = 'node.labels.gpu == \"yes\"'\n");
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    let id = ids_of(&out)[0];
    pool.wait_for("a reason", |p| p.job(id).reason.is_some());
    let v = pool.job(id);
    assert_eq!(v.state, JobState::Idle);
    assert!(v.reason.as_deref().unwrap().contains("no node matches"), "{:?}", v.reason);
    let out = pool.cli().arg("q").output().unwrap();
    assert!(stdout_of(&out).contains("no node matches"), "{}", stdout_of(&out));

    // A bad CEL expression is refused at submit time, with exit 2.
    let bad = probe_job_file(d.path(), "bad", &["exit:0"], "[policy]\nrequirements = 'node.cpus >>> 1'\n");
    let out = pool.cli().arg("submit").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("requirements is not a valid CEL expression"), "{}", stderr_of(&out));

    // Hold and release.
    let ok = probe_job_file(d.path(), "ok", &["sleep:300", "exit:0"], "");
    pool.cli().arg("hold").arg(id.to_string()).assert().success();
    assert_eq!(pool.job(id).state, JobState::Held);
    assert!(pool.job(id).reason.unwrap().contains("held by admin"));
    pool.cli().arg("release").arg(id.to_string()).assert().success();
    assert_eq!(pool.job(id).state, JobState::Idle);
    pool.cli().arg("release").arg(id.to_string()).assert().code(1);
    let out = pool.cli().arg("submit").arg(&ok).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    // A held job makes wait exit 1.
    pool.cli().arg("hold").arg(id.to_string()).assert().success();
    let out = pool.cli().arg("wait").arg(id.to_string()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("is held"), "{}", stderr_of(&out));
}

#[test]
fn a_killed_node_loses_its_job_to_the_other_and_its_late_result_is_refused() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "long", &["sleep:2000", "args", "done"], "");
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    let id = ids_of(&out)[0];
    pool.wait_for("the job to run on n1", |p| p.job(id).state == JobState::Running);
    let first_epoch_cred = pool.node_credential("n1");
    pool.start_node("n2", 1);
    pool.kill_node("n1");
    pool.wait_for("the job to complete", |p| p.job(id).state == JobState::Completed);
    let r = pool.admin().job(id).unwrap();
    assert_eq!((r.job.node.as_deref(), r.job.exit_code), (Some("n2"), Some(0)), "{:?}", r.job);
    lost_by_n1_then_completed_once_on_n2(&r);
    // The dead node's result arrives late, under its expired lease: refused.
    let late = pool.client_with(&first_epoch_cred);
    let r = late.report(&ReportRequest { reports: vec![Report::exited(LeaseId { job_id: id, epoch: 1 }, 99)] });
    match r {
        Ok(resp) => assert!(resp.accepted.is_empty() && resp.refused.len() == 1, "{resp:?}"),
        Err(e) => assert_eq!(e.status(), Some(409), "{e}"),
    }
    assert_eq!(pool.job(id).exit_code, Some(0), "the late result changed nothing");
    let metrics = pool.admin().metrics().unwrap();
    assert!(metrics.lines().any(|l| l == "vmgrid_results_accepted_total 1"), "one result accepted:\n{metrics}");
    let out = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
    assert_eq!(stdout_of(&out), "done\n");
}

/// The job's attempts: the first on n1, the last on n2 and the only one that ended with a
/// result; each before it ended when its node lost the lease (expired, node lost or registered
/// again). Usually that is n1's alone (two attempts), but with the tests' 1.5 s leases a node or
/// the coordinator that does not get to run for that long on a busy machine (n2 while it starts
/// the job, say) loses a lease too, and the job is placed again under a new epoch: one more
/// attempt, the old one fenced (its result refused).
fn lost_by_n1_then_completed_once_on_n2(r: &vmgrid_proto::JobResult) {
    let h = &r.history;
    let numbers: Vec<u32> = h.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, (1..=r.job.attempts).collect::<Vec<_>>(), "every attempt is listed: {h:#?}");
    assert!(h.len() >= 2 && h[0].node == "n1", "the job ran on n1 first: {h:#?}");
    let (last, before) = h.split_last().expect("at least two attempts");
    assert_eq!((last.node.as_str(), last.outcome.as_str()), ("n2", "exited with 0"), "{h:#?}");
    for a in before {
        let n = &a.node;
        let lapsed =
            [format!("its lease on node {n} expired"), format!("node {n} was lost"), format!("node {n} restarted")];
        assert!(lapsed.contains(&a.outcome), "attempt {} ended with its node's lease, not a result: {h:#?}", a.attempt);
    }
}

#[test]
fn a_nodes_wasm_worker_is_killed_at_the_time_limit_on_rm_and_with_its_node() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let submit_as = |pool: &Pool, args: &[&str], timeout_s: u32| {
        let job = probe_job_file(d.path(), "spin", args, &format!("[resources]\ntimeout_s = {timeout_s}\n"));
        ids_of(&pool.cli().arg("submit").arg(&job).output().unwrap())[0]
    };
    let submit = |pool: &Pool, timeout_s: u32| submit_as(pool, &["spin"], timeout_s);
    let limited = |p: &Pool, id: u64| p.job(id).reason.as_deref().is_some_and(|r| r.contains("time limit of 1 s"));
    // The time limit: the node kills the spinning guest's worker and says why, and keeps what
    // the guest wrote before it was killed.
    let id = submit_as(&pool, &["cwd", "stderr:spinning", "spin"], 1);
    pool.wait_for("the time limit", |p| limited(p, id));
    let logs = |args: &[&str]| stdout_of(&pool.cli().arg("logs").arg(id.to_string()).args(args).output().unwrap());
    assert_eq!((logs(&[]), logs(&["--stderr"])), ("/\n".to_string(), "spinning\n".to_string()));
    // A module that ran short once, then sleeps: it runs in the node's process (its last run was
    // short), where epoch checks cannot reach a sleep; the sleep itself wakes for the limit.
    let id = submit_as(&pool, &["exit:0"], 60);
    pool.wait_for("a short run", |p| p.job(id).state == JobState::Completed);
    let id = submit_as(&pool, &["sleep:600000"], 1);
    pool.wait_for("the time limit of a sleeping guest", |p| limited(p, id));
    // rm: the running guest's worker is killed at once.
    let id = submit(&pool, 300);
    pool.wait_for("the job to run", |p| p.job(id).state == JobState::Running);
    let worker = wasm_worker_of(pool.node_pid("n1"));
    pool.cli().args(["rm", &id.to_string()]).assert().success();
    wait_until("the removed job's worker to end", || !running(worker));
    // kill -9 of the node: its worker ends with it, mid-guest.
    let id = submit(&pool, 300);
    pool.wait_for("the job to run", |p| p.job(id).state == JobState::Running);
    let worker = wasm_worker_of(pool.node_pid("n1"));
    pool.kill_node("n1");
    wait_until("the killed node's worker to end", || !running(worker));
}

#[test]
fn a_node_cut_off_and_brought_back_is_fenced() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "fenced", &["sleep:2500", "args", "ran"], "");
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    let id = ids_of(&out)[0];
    pool.wait_for("the job to run on n1", |p| p.job(id).state == JobState::Running);
    pool.start_node("n2", 1);
    // Cut n1 off: it stops heartbeating, its lease expires, and n2 reruns the job.
    let pid = pool.node_pid("n1") as i32;
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    pool.wait_for("the job to complete on n2", |p| {
        let v = p.job(id);
        v.state == JobState::Completed && v.node.as_deref() == Some("n2")
    });
    // Bring n1 back: its result for the old lease is refused, and it rejoins as a new node.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    pool.wait_for("n1's late result to be refused", |p| {
        p.admin()
            .metrics()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("vmgrid_results_refused_total") && !l.ends_with(" 0"))
    });
    pool.wait_for("n1 to rejoin", |p| {
        p.admin().nodes().unwrap().iter().any(|n| n.ad.name == "n1" && n.state == vmgrid_proto::NodeState::Ready)
    });
    let v = pool.job(id);
    assert_eq!((v.state, v.node.as_deref(), v.exit_code), (JobState::Completed, Some("n2"), Some(0)));
}

#[test]
fn a_killed_coordinator_restarts_and_every_acknowledged_job_completes_once() {
    let mut pool = Pool::start();
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "many", &["sleep:10", "args", "{index}"], "");
    let out = pool.cli().arg("submit").arg(&job).args(["--count", "300"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let ids = ids_of(&out);
    assert_eq!(ids.len(), 300);
    pool.start_node("n1", 2);
    pool.start_node("n2", 2);
    // Killed while the nodes hold jobs queued ahead of their cpus (their 10 ms jobs are short).
    pool.wait_for("some jobs to complete, and a node to hold jobs ahead", |p| {
        let admin = p.admin();
        admin.jobs().unwrap().iter().filter(|j| j.state == JobState::Completed).count() >= 20
            && admin.nodes().unwrap().iter().any(|n| n.running_jobs > n.ad.cpus)
    });
    pool.kill_coordinator();
    pool.start_coordinator();
    pool.wait_for("all jobs to complete", |p| {
        p.admin().jobs().unwrap().iter().filter(|j| j.state == JobState::Completed).count() == 300
    });
    let admin = pool.admin();
    let jobs = admin.jobs().unwrap();
    assert_eq!(jobs.len(), 300);
    for (i, j) in jobs.iter().enumerate() {
        assert_eq!(j.id, ids[i]);
        assert_eq!(j.exit_code, Some(0));
        let r = admin.job(j.id).unwrap();
        let stdout = r.stdout.expect("a completed job has its stdout");
        let tmp = d.path().join(format!("stdout-{}", j.id));
        admin.fetch_file(&stdout, &tmp).unwrap();
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), format!("{i}\n"), "job {} has its own result", j.id);
    }
}

#[test]
fn a_node_asked_to_stop_finishes_its_job_and_leaves() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "drain", &["write:started:yes", "sleep:1500", "args", "finished"], "");
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    let id = ids_of(&out)[0];
    // Started on the node, not only placed there (a job a stopping node has not started yet is
    // handed back): its guest wrote `started` in its job directory.
    let jobs = pool.dir.path().join("node-n1/jobs");
    wait_until("the job to start on n1", || {
        std::fs::read_dir(&jobs)
            .is_ok_and(|mut dirs| dirs.any(|d| d.is_ok_and(|d| d.path().join("job/started").exists())))
    });
    let pid = pool.node_pid("n1") as i32;
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (_, mut child) = pool.nodes.remove(0);
    let status = child.wait().unwrap();
    assert!(status.success(), "the node exits 0 after draining: {status}");
    let v = pool.job(id);
    assert_eq!((v.state, v.node.as_deref(), v.exit_code, v.attempts), (JobState::Completed, Some("n1"), Some(0), 1));
    assert!(pool.admin().nodes().unwrap().is_empty(), "the node left the pool");
}

#[test]
fn an_idle_node_asked_to_stop_leaves_without_waiting_out_its_lease_call() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    pool.wait_for("n1 to join", |p| !p.admin().nodes().unwrap().is_empty());
    // Its lease call waits for work (up to LEASE_WAIT_MS); the pool ends it when the node's
    // heartbeat says it drains.
    pool.wait_for("n1's lease call to wait for work", |p| {
        p.admin().metrics().unwrap().lines().any(|l| l == "vmgrid_lease_calls_open 1")
    });
    let pid = pool.node_pid("n1") as i32;
    let asked = std::time::Instant::now();
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (_, mut child) = pool.nodes.remove(0);
    let status = child.wait().unwrap();
    let took = asked.elapsed();
    assert!(status.success(), "the node exits 0 after draining: {status}");
    let wait = std::time::Duration::from_millis(vmgrid_proto::LEASE_WAIT_MS);
    assert!(took < wait / 2, "the node left in {took:?}, not after its lease call's wait ({wait:?})");
    assert!(pool.admin().nodes().unwrap().is_empty(), "the node left the pool");
}

#[test]
fn vmgrid_up_runs_an_embedded_pool_that_the_cli_finds() {
    let d = JobDir::new();
    let data = d.path().join("pool");
    let mut up = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(["up", "--nodes", "2", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("VMGRID_ACCEL", "tcg")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let config = data.join("client.toml");
    wait_until("vmgrid up to write client.toml", || config.exists());
    for f in ["pool.token", "admin.token"] {
        assert!(data.join(f).exists(), "{f}");
    }
    let cli = || {
        let mut c = vmgrid();
        c.env("VMGRID_CONFIG", &config);
        c
    };
    wait_until("the embedded nodes to join", || {
        let out = cli().args(["status", "--json"]).output().unwrap();
        out.status.success()
            && serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).map(|v| v.len()).ok() == Some(2)
    });
    let job = probe_job_file(d.path(), "emb", &["args", "{index}"], "");
    let out = cli().arg("submit").arg(&job).args(["--count", "4", "--wait"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(ids_of(&out).len(), 4);
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert!(up.wait().unwrap().success());
}

#[test]
fn a_qemu_job_runs_through_the_pool_with_its_files() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let (kernel, initrd) = guest_kit();
    let d = JobDir::new();
    d.write("job.sh", "cat in.txt\nmkdir -p out\necho from-the-vm > out/r.txt\n");
    d.write("in.txt", "input via blob");
    let job = d.job(&format!(
        "name = \"pool-qemu\"\n[vm]\ntype = \"qemu\"\nkernel = {}\ninitrd = {}\nappend = \"console=ttyS0 quiet\"\nargs = [\"sh\", \"job.sh\"]\n[resources]\ntimeout_s = 120\n[files]\ninputs = [\"job.sh\", \"in.txt\"]\noutputs = [\"out/*\"]\n[policy]\nrequirements = '\"qemu\" in node.vm_types'\n",
        toml_path(&kernel),
        toml_path(&initrd)
    ));
    let out = pool.cli().arg("submit").arg(&job).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];
    let out = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
    assert!(stdout_of(&out).contains("input via blob"), "{}", stdout_of(&out));
    let fetched = d.path().join("fetched");
    pool.cli().args(["fetch", &id.to_string(), "--out"]).arg(&fetched).assert().success();
    assert_eq!(std::fs::read_to_string(fetched.join("out/r.txt")).unwrap(), "from-the-vm\n");
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_node_killed_mid_qemu_job_leaves_no_qemu_behind() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let (kernel, initrd) = guest_kit();
    let d = JobDir::new();
    d.write("job.sh", "sleep 120\n");
    let name = format!("orphan-check-{}", std::process::id());
    let job = d.job(&format!(
        "name = \"{name}\"\n[vm]\ntype = \"qemu\"\nkernel = {}\ninitrd = {}\nappend = \"console=ttyS0 quiet\"\nargs = [\"sh\", \"job.sh\"]\n[resources]\ntimeout_s = 300\n[files]\ninputs = [\"job.sh\"]\n",
        toml_path(&kernel),
        toml_path(&initrd)
    ));
    pool.cli().arg("submit").arg(&job).assert().success();
    let marker = format!("vmgrid-{name}");
    // Running, and past the point where it drops root (when vmgrid is root).
    let dropped = |pid: &u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) != Some("0"))
    };
    wait_until("QEMU to run the job", || processes_with(&marker).iter().any(dropped));
    pool.kill_node("n1");
    // QEMU dropped root (-runas on QEMU 7.2, -run-with user= on 9.1 and later) when vmgrid is root,
    // which clears a parent-death signal; it must die with its node all the same.
    wait_until("QEMU to die with its node", || processes_with(&marker).is_empty());
}

#[test]
fn clients_uploading_the_same_blob_at_once_all_succeed() {
    // The pool answers an upload of a blob it already has at once, without reading the body, and
    // closes the connection: a client that asked before another stored it then sees its upload
    // cut mid-body. It asks again and finds the blob there (a node once failed a job so).
    let pool = Pool::start();
    for round in 0..4u8 {
        let body: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8 ^ round).collect();
        let barrier = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    let (client, body, barrier) = (pool.admin(), &body, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        client.upload_bytes(body, "same").map(|f| f.blob)
                    })
                })
                .collect();
            let hashes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
            assert!(hashes.iter().all(|h| *h == hashes[0]));
        });
    }
}
