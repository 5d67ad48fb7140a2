//! Two coordinators on one PostgreSQL store: the standby answers with where the active one is,
//! and takes over when the active one is killed, while nodes and a waiting client, given both
//! URLs, carry on without a restart.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmgrid_proto::JobState;

use crate::util::*;

/// A `vmgrid coordinator` process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a second coordinator on the pool's data dir and store, listening on `port`.
fn start_standby(pool: &Pool, port: u16) -> Proc {
    let child = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(pool.data_dir())
        .args(["--lease-ttl-ms", &LEASE_TTL_MS.to_string(), "--node-ttl-ms", &LEASE_TTL_MS.to_string()])
        .args(pool.coordinator_flags())
        .stderr(std::fs::File::create(pool.dir.path().join("standby.log")).unwrap())
        .spawn()
        .unwrap();
    Proc(child)
}

#[test]
fn a_standby_takes_over_from_a_killed_coordinator_and_every_job_completes_once() {
    let mut pool = Pool::start_on_postgres(&[]);
    let url_a = pool.url.clone();
    let port_b = free_port();
    let url_b = format!("https://127.0.0.1:{port_b}");
    let _standby = start_standby(&pool, port_b);

    // The standby answers every call with 503 and the active coordinator's URL.
    let only_b = vmgrid_client::Client::with_trust(&url_b, "whatever", pool.admin().trust().clone());
    wait_until("the standby to answer", || {
        matches!(only_b.nodes(), Err(vmgrid_client::ClientError::Refused { status: 503, .. }))
    });
    let e = only_b.nodes().unwrap_err().to_string();
    assert!(e.contains("standby") && e.contains(&url_a), "{e}");

    // A third coordinator on another data dir (its blobs, CA and tokens not the pool's) is refused.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(other.path())
        .args(pool.coordinator_flags())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("not the one the pool's coordinators use"), "{}", stderr_of(&out));

    // Nodes and clients are given both URLs, the standby's first.
    let both = format!("{url_b},{url_a}");
    pool.url = both.clone();
    pool.start_node("n1", 2);
    pool.start_node("n2", 2);
    let node_pids = [pool.node_pid("n1"), pool.node_pid("n2")];
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "sweep", &["sleep:20", "args", "{index}"], "");
    let admin_token = pool.data_dir().join("admin.token");
    let pool_args = |cmd: &mut Command| {
        cmd.args(["--pool", &both, "--token-file"])
            .arg(&admin_token)
            .arg("--ca-file")
            .arg(pool.data_dir().join("ca.pem"));
    };
    let mut submit = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"));
    submit.arg("submit").arg(&job).args(["--count", "300"]);
    pool_args(&mut submit);
    let out = submit.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let ids = ids_of(&out);
    assert_eq!(ids.len(), 300);
    let mut wait = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"));
    wait.arg("wait").args(ids.iter().map(|i| i.to_string()));
    pool_args(&mut wait);
    let waiting = Proc(wait.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());

    pool.wait_for("some jobs to complete", |p| {
        p.admin().jobs().unwrap().iter().filter(|j| j.state == JobState::Completed).count() >= 30
    });
    let killed_at = std::time::Instant::now();
    pool.kill_coordinator();
    // The same client, given both URLs, finds the new active coordinator by itself.
    let log = pool.dir.path().join("standby.log");
    let took_over = poll_until(Duration::from_secs(60), || pool.admin().nodes().is_ok());
    assert!(took_over, "the standby did not take over:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(10), "the standby took {took:?} to take over");
    eprintln!("the standby took over {took:?} after the active coordinator was killed");

    let mut waiting = waiting;
    let status = (0..1200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            waiting.0.try_wait().unwrap()
        })
        .expect("`vmgrid wait` ended within two minutes");
    let mut err = String::new();
    std::io::Read::read_to_string(waiting.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "the waiting client carried on through the failover: {status}: {err}");

    let admin = pool.admin();
    let jobs = admin.jobs().unwrap();
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids, "every acknowledged job is there, once");
    for (i, j) in jobs.iter().enumerate() {
        assert_eq!((j.state, j.exit_code), (JobState::Completed, Some(0)), "job {}", j.id);
        let r = admin.job(j.id).unwrap();
        let tmp = d.path().join(format!("stdout-{}", j.id));
        admin.fetch_file(&r.stdout.expect("a completed job has its stdout"), &tmp).unwrap();
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), format!("{i}\n"), "job {} has its own result", j.id);
    }
    // The nodes were not restarted: the same processes, ready under the new coordinator.
    assert_eq!([pool.node_pid("n1"), pool.node_pid("n2")], node_pids);
    for (name, child) in &mut pool.nodes {
        assert!(child.try_wait().unwrap().is_none(), "node {name} is still running");
    }
    let nodes = admin.nodes().unwrap();
    assert!(nodes.iter().all(|n| n.state == vmgrid_proto::NodeState::Ready), "{nodes:?}");
    assert_eq!(nodes.len(), 2);
}
