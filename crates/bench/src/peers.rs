//! Large blobs between nodes: the time for N node processes to get one 1 GiB input (each runs a
//! job that needs it), from the coordinator alone (`--no-peers`) and from each other, with the
//! bytes the coordinator sent.

use std::path::Path;
use std::time::{Duration, Instant};

use vmgrid_proto::{JobSpec, JobState, SubmitRequest};

use crate::pool::{self, Pool};

/// One way of fetching: seconds until every node had the input (and ran its job), and MiB the
/// coordinator sent.
pub struct Fetch {
    pub seconds: f64,
    pub served_mib: f64,
}

fn served(pool: &Pool) -> u64 {
    let m = pool.client.metrics().unwrap_or_default();
    m.lines()
        .find_map(|l| l.strip_prefix("vmgrid_blob_bytes_served_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `nodes` nodes each get a `mib` MiB input, from the coordinator alone or from each other.
pub fn measure(root: &Path, nodes: u32, mib: u64, peers: bool) -> Result<Fetch, String> {
    let extra: &[&str] = if peers { &[] } else { &["--no-peers"] };
    let pool = Pool::separate_with(root, nodes, extra);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("big.bin");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
    drop(bytes);
    let input = pool.client.upload_file(&path, "big.bin").map_err(|e| e.to_string())?;
    let spec = pool::trivial_spec(&pool.client, root);
    let before = served(&pool);
    let start = Instant::now();
    let mut ids = Vec::new();
    for i in 1..=nodes {
        let spec = JobSpec {
            inputs: vec![input.clone()],
            disk_mb: mib + 64,
            timeout_s: 600,
            requirements: Some(format!("node.name == \"sep-{i}\"")),
            ..spec.clone()
        };
        ids.extend(pool.client.submit(&SubmitRequest { spec, count: 1 }).map_err(|e| e.to_string())?.ids);
    }
    for id in ids {
        let v = pool.client.wait(id, Duration::from_secs(600)).map_err(|e| e.to_string())?;
        if v.state != JobState::Completed {
            return Err(format!("job {id} ended {}: {:?}", v.state.as_str(), v.reason));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Fetch { seconds, served_mib: (served(&pool) - before) as f64 / (1 << 20) as f64 })
}
