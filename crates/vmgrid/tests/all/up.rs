//! `vmgrid up`'s local nodes share the host: their cpus and memory add up to the host's, unless
//! each is given its size.

use vmgrid_proto::NodeView;

use crate::util::*;

/// The local nodes of a `vmgrid up --nodes N` started with `extra`, once all N joined.
fn local_nodes(nodes: usize, extra: &[&str]) -> Vec<NodeView> {
    let d = JobDir::new();
    let data = d.path().join("pool");
    let mut up = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(["up", "--nodes", &nodes.to_string(), "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(extra)
        .env("VMGRID_ACCEL", "tcg")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let config = data.join("client.toml");
    wait_until("vmgrid up to write client.toml", || config.exists());
    let mut seen = Vec::new();
    wait_until("the local nodes to join", || {
        let out = vmgrid().env("VMGRID_CONFIG", &config).args(["status", "--json"]).output().unwrap();
        seen = serde_json::from_slice::<Vec<NodeView>>(&out.stdout).unwrap_or_default();
        out.status.success() && seen.len() == nodes
    });
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert!(up.wait().unwrap().success());
    seen
}

fn host_memory_mb() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches("kB");
    kb.trim().parse::<u64>().unwrap() / 1024
}

#[test]
fn vmgrid_up_splits_the_hosts_cpus_and_memory_among_its_nodes() {
    let host_cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let nodes = local_nodes(2, &[]);
    let cpus: u64 = nodes.iter().map(|n| u64::from(n.ad.cpus)).sum();
    let memory: u64 = nodes.iter().map(|n| n.ad.memory_mb).sum();
    let expected_cpus = host_cpus.max(2); // each node gets at least one
    assert_eq!(cpus, expected_cpus, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.ad.cpus >= 1 && n.ad.cpus as u64 <= host_cpus.div_ceil(2).max(1)));
    let host = host_memory_mb();
    assert!(memory.abs_diff(host) <= 2, "the nodes offer {memory} MiB in all; the host has {host} MiB");
}

#[test]
fn vmgrid_up_nodes_told_their_size_offer_it() {
    let nodes = local_nodes(2, &["--cpus", "3", "--memory-mb", "700"]);
    for n in &nodes {
        assert_eq!((n.ad.cpus, n.ad.memory_mb), (3, 700), "{}", n.ad.name);
    }
    let out = vmgrid().args(["up", "--nodes", "2", "--cpus", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--cpus 0 is refused: {}", stderr_of(&out));
}
