//! The Slurm glide-in against a real single-node Slurm (scripts/slurm-up): pilots join the pool
//! labelled with their Slurm job, run a sweep, and leave when `scancel`led or when their time ends.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmgrid_proto::{JobState, NodeState};

use crate::util::*;

/// A Slurm cluster started by scripts/slurm-up in a temporary state dir; stopped on drop.
struct Slurm {
    dir: tempfile::TempDir,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts").join(name)
}

impl Slurm {
    fn start() -> Slurm {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script("slurm-up")).arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/slurm-up failed (scripts/setup installs slurm-wlm and munge): {}",
            stderr_of(&out)
        );
        Slurm { dir }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new("scancel").args(["--name", "vmgrid-pilot"]).status();
        let _ = Command::new(script("slurm-down")).arg(self.dir.path()).status();
    }
}

fn pilots_in_squeue() -> Vec<String> {
    let out = Command::new("squeue").args(["--noheader", "--name", "vmgrid-pilot", "--format", "%i"]).output().unwrap();
    assert!(out.status.success(), "squeue: {}", stderr_of(&out));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[test]
fn slurm_pilots_join_run_a_sweep_and_leave_when_cancelled_or_out_of_time() {
    let pool = Pool::start();
    let _slurm = Slurm::start();
    let glidein_dir = pool.dir.path().join("glidein");
    // A pilot told of a pool that does not answer fails fast, saying why in its Slurm output.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bad_dir = pool.dir.path().join("glidein-bad");
    let out = pool
        .cli()
        .args(["glidein", "slurm", "--nodes", "1", "--time", "0:03:00", "--margin-s", "60"])
        .args(["--job-name", "vmgrid-badpilot", "--pool", &format!("https://127.0.0.1:{dead_port}")])
        .arg("--token-file")
        .arg(pool.data_dir().join("pool.token"))
        .arg("--dir")
        .arg(&bad_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let bad_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let submitted = std::time::Instant::now();
    // 3 minutes of Slurm time: 2 of them taking jobs, then up to 20 s of draining.
    let out = pool
        .cli()
        .args(["glidein", "slurm", "--nodes", "2", "--time", "0:03:00", "--margin-s", "60", "--drain-timeout-s", "20"])
        .args(["--pool", &pool.url])
        .arg("--token-file")
        .arg(pool.data_dir().join("pool.token"))
        .arg("--dir")
        .arg(&glidein_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let slurm_ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(slurm_ids.len(), 2, "two Slurm job ids: {slurm_ids:?}");
    // The token reaches the pilots as a private file, never on a command line.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(glidein_dir.join("pool.token")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the token file is private");
    let token = std::fs::read_to_string(pool.data_dir().join("pool.token")).unwrap();
    assert!(!std::fs::read_to_string(glidein_dir.join("pilot.sh")).unwrap().contains(token.trim()));

    pool.wait_for("both pilots to join, labelled", |p| {
        let nodes = p.admin().nodes().unwrap();
        slurm_ids.iter().all(|id| {
            nodes.iter().any(|n| {
                n.state == NodeState::Ready
                    && n.ad.name == format!("slurm-{id}")
                    && n.ad.labels.get("slurm.job_id") == Some(id)
                    && n.ad.labels.get("slurm.partition").map(String::as_str) == Some("main")
            })
        })
    });
    let status = pool.cli().args(["glidein", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    for id in &slurm_ids {
        assert!(
            text.lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING") && l.contains(&format!("slurm-{id}"))),
            "{text}"
        );
    }

    let d = JobDir::new();
    let job = probe_job_file(d.path(), "sweep", &["sleep:3000", "args", "{index}"], "");
    let out = pool.cli().arg("submit").arg(&job).args(["--count", "12"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let ids = ids_of(&out);
    let (cancelled, timed) = (&slurm_ids[0], &slurm_ids[1]);
    pool.wait_for("the first pilot to run a job", |p| {
        p.admin()
            .jobs()
            .unwrap()
            .iter()
            .any(|j| j.state == JobState::Running && j.node.as_deref() == Some(&format!("slurm-{cancelled}")))
    });
    assert!(Command::new("scancel").arg(cancelled).status().unwrap().success());
    pool.wait_for("the cancelled pilot to leave the pool", |p| {
        !p.admin().nodes().unwrap().iter().any(|n| n.ad.labels.get("slurm.job_id") == Some(cancelled))
    });
    pool.wait_for("the sweep to complete", |p| {
        p.admin().jobs().unwrap().iter().filter(|j| j.state == JobState::Completed).count() == ids.len()
    });
    let admin = pool.admin();
    for (i, id) in ids.iter().enumerate() {
        let r = admin.job(*id).unwrap();
        assert_eq!((r.job.state, r.job.exit_code), (JobState::Completed, Some(0)));
        let tmp = d.path().join(format!("stdout-{id}"));
        admin.fetch_file(&r.stdout.expect("stdout"), &tmp).unwrap();
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), format!("{i}\n"), "job {id} ran to completion once");
    }

    // The other pilot stops taking jobs 60 s before its Slurm time ends, drains and exits.
    assert!(
        poll_until(Duration::from_secs(240), || !pilots_in_squeue().contains(timed)),
        "the timed pilot did not end: squeue {:?}",
        pilots_in_squeue()
    );
    assert!(
        !pool.admin().nodes().unwrap().iter().any(|n| n.ad.labels.get("slurm.job_id") == Some(timed)),
        "it left the pool"
    );
    // It drained before Slurm's limit (3 min) would have killed it.
    assert!(submitted.elapsed() < Duration::from_secs(180), "the timed pilot ended at {:?}", submitted.elapsed());
    let log = std::fs::read_to_string(glidein_dir.join(format!("pilot-{timed}.out"))).unwrap();
    assert!(log.contains("node agent exited (0)"), "the pilot drained and exited 0 before its limit:\n{log}");
    let bad_log = bad_dir.join(format!("pilot-{bad_id}.out"));
    let log = std::fs::read_to_string(&bad_log).unwrap_or_default();
    assert!(log.contains("did not answer") && log.contains(&dead_port.to_string()), "the bad pilot's output:\n{log}");
    assert!(!log.contains("node agent exited"), "the bad pilot never started a node agent:\n{log}");
    let listed = Command::new("squeue").args(["-h", "-j", &bad_id]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).trim().is_empty(), "the bad pilot ended and left Slurm");
}
