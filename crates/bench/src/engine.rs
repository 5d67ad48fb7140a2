//! The coordinator's engine figures: the pure matchmaker with 1M jobs of 100 users (fair share on:
//! users take turns by effective priority, some at a quota) and 10k nodes, and the coordinator's
//! memory with 1M jobs queued, and how fast the dashboard's job list pages through them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use vmgrid_client::Client;
use vmgrid_proto::*;

use crate::pool::{client_of, trivial_spec, vmgrid_bin};

pub fn scheduler_engine() -> (f64, usize) {
    use vmgrid_scheduler::*;
    let nodes: Vec<NodeSlot> = (0..10_000)
        .map(|i| NodeSlot {
            ad: MatchAd::new(NodeAd {
                name: format!("n{i:05}"),
                arch: "x86_64".into(),
                os: "linux".into(),
                cpus: 128,
                memory_mb: 1 << 20,
                disk_mb: 1 << 20,
                vm_types: vec![VmType::Wasm, VmType::Qemu],
                accelerators: vec!["tcg".into()],
                labels: BTreeMap::from([("rack".to_string(), (i % 40).to_string())]),
                appliance: i % 10 == 0,
                qemu: None,
                peer: None,
                overlay: None,
            })
            .into(),
            free_cpus: 128,
            free_memory_mb: 1 << 20,
            running_jobs: 0,
            reputation: 0.5,
        })
        .collect();
    let clusters: std::collections::HashMap<u64, Cluster> = (0..100)
        .map(|k| {
            let req = format!(
                "node.memory_mb >= {} && \"wasm\" in node.vm_types && node.labels.rack != \"{}\"",
                512 * (k % 4 + 1),
                k % 40
            );
            (k, Cluster::compile(VmType::Wasm, 1, 64, Some(&req), Some("node.free_cpus")).unwrap())
        })
        .collect();
    // 100 users with different usage, factors and running cpus; every tenth has a quota.
    let users: Vec<UserShare> = (0..100u64)
        .map(|u| UserShare {
            name: format!("user{u}").into(),
            running_cpus: u * 10,
            recent_cpus: (u % 7) as f64 * 3.5,
            factor: 1.0 + (u % 3) as f64,
            max_cpus: (u % 10 == 0).then_some(5_000),
        })
        .collect();
    // Each user's jobs span the clusters, with a few job priorities.
    let jobs: Vec<IdleJob> = (0..1_000_000u64)
        .map(|id| IdleJob {
            id,
            cluster: (id / 100) % 100,
            user: (id % 100) as u32,
            priority: (id % 3) as i32,
            exclude: None,
        })
        .collect();
    let mut slots = nodes.clone();
    let start = Instant::now();
    let d = place(&mut slots, &clusters, &users, &jobs);
    let secs = start.elapsed().as_secs_f64();
    (d.placements.len() as f64 / secs, d.placements.len())
}

/// A `vmgrid coordinator` on a free loopback port with its data in `dir`, and an admin client.
pub fn coordinator(root: &Path, dir: &Path) -> Result<(Child, Client), String> {
    let child = Command::new(vmgrid_bin(root))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the coordinator: {e}"))?;
    Ok((child, client_of(dir)))
}

/// The coordinator with 1M jobs queued: its RSS (MiB), the submit's seconds, and the job list's
/// pages as the dashboard asks for them, each with its median time over 5 asks (ms).
pub type Queued = (f64, f64, Vec<(&'static str, f64)>);

/// The pages: the first and the newest, one deep in the queue, and two filters that match
/// nothing, which read the most a page may read (100,000 jobs) before answering with a cursor.
const PAGES: [(&str, &str); 5] = [
    ("first page", "after=0&limit=50"),
    ("newest first", "after=0&limit=50&order=newest"),
    ("page after job 900,000", "after=900000&limit=50"),
    ("state filter matching none", "after=0&limit=50&state=held"),
    ("name filter matching none", "after=0&limit=50&name=no-such-name"),
];

fn page_times(client: &Client) -> Result<Vec<(&'static str, f64)>, String> {
    PAGES
        .iter()
        .map(|(what, query)| {
            let mut ms = Vec::new();
            for _ in 0..5 {
                let start = Instant::now();
                client.jobs_query(query).map_err(|e| format!("{what}: {e}"))?;
                ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
            ms.sort_by(f64::total_cmp);
            Ok((*what, ms[2]))
        })
        .collect()
}

pub fn coordinator_rss(root: &Path) -> Result<Queued, String> {
    let dir = std::env::temp_dir().join(format!("vmgrid-bench-rss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut child, client) = coordinator(root, &dir)?;
    let spec = trivial_spec(&client, root);
    let start = Instant::now();
    let r = client.submit(&SubmitRequest { spec, count: 1_000_000 });
    let submit_s = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let pages = if r.is_ok() { page_times(&client) } else { Ok(Vec::new()) };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    r.map_err(|e| e.to_string())?;
    Ok((rss_kb / 1024.0, submit_s, pages?))
}
