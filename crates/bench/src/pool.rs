//! The pool figures: a `vmgrid up` pool, trivial-job throughput and latency through it, and the
//! same sweep as a Slurm job array on the single-node Slurm of `../shared/peers`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmgrid_client::Client;
use vmgrid_proto::*;

pub fn vmgrid_bin(root: &Path) -> PathBuf {
    root.join("target/release/vmgrid")
}

pub fn guest(root: &Path, name: &str) -> PathBuf {
    root.join(format!("guests/target/wasm32-wasip1/release/{name}.wasm"))
}

/// A `vmgrid up` pool in a temporary directory, stopped on drop; its state in SQLite, or in a
/// private PostgreSQL cluster of its own. Or a pool as it runs across machines: a `vmgrid
/// coordinator` process and `vmgrid node` processes talking to it over TCP (`Pool::separate`).
pub struct Pool {
    child: Child,
    /// The node processes of a separate pool (stopped first).
    nodes: Vec<Child>,
    pub client: Client,
    _dir: PathBuf,
    _db: Option<vmgrid_testkit::TestDb>,
}

impl Pool {
    pub fn up(root: &Path, nodes: u32) -> Pool {
        Pool::up_on(root, nodes, false)
    }

    /// The same pool, its state in PostgreSQL when `postgres`.
    pub fn up_on(root: &Path, nodes: u32, postgres: bool) -> Pool {
        let dir = std::env::temp_dir().join(format!("vmgrid-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = postgres.then(vmgrid_testkit::TestDb::start);
        let store = db.as_ref().map_or_else(|| "sqlite".to_string(), |d| d.url());
        let child = Command::new(vmgrid_bin(root))
            .args(["up", "--nodes", &nodes.to_string(), "--listen", "127.0.0.1:0", "--store", &store, "--data-dir"])
            .arg(&dir)
            .stderr(Stdio::null())
            .spawn()
            .expect("start vmgrid up");
        let client = client_of(&dir);
        while client.nodes().map(|n| n.len() as u32).unwrap_or(0) < nodes {
            std::thread::sleep(Duration::from_millis(20));
        }
        Pool { child, nodes: Vec::new(), client, _dir: dir, _db: db }
    }

    /// A coordinator process and `nodes` node processes, each offering its share of the host's
    /// cpus, over TCP on loopback (TLS, the pool's CA), as a real pool runs.
    pub fn separate(root: &Path, nodes: u32) -> Pool {
        Pool::separate_with(root, nodes, &[])
    }

    /// Like [`Pool::separate`], with more `vmgrid node` flags.
    pub fn separate_with(root: &Path, nodes: u32, extra: &[&str]) -> Pool {
        Pool::separate_env(root, nodes, extra, &[])
    }

    /// Like [`Pool::separate_with`], with more environment variables for the nodes.
    pub fn separate_env(root: &Path, nodes: u32, extra: &[&str], env: &[(&str, &str)]) -> Pool {
        let dir = std::env::temp_dir().join(format!("vmgrid-bench-sep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(vmgrid_bin(root))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .stderr(Stdio::null())
            .spawn()
            .expect("start vmgrid coordinator");
        let client = client_of(&dir);
        let cpus = (std::thread::available_parallelism().map_or(1, |n| n.get() as u32) / nodes).max(1);
        let node = |i: u32| {
            Command::new(vmgrid_bin(root))
                .args(["node", "--pool", client.url(), "--name", &format!("sep-{i}"), "--cpus", &cpus.to_string()])
                .args(["--peer-listen", "127.0.0.1:0"])
                .args(extra)
                .envs(env.iter().copied())
                .arg("--token-file")
                .arg(dir.join("pool.token"))
                .arg("--cache-dir")
                .arg(dir.join(format!("node-{i}")))
                .stderr(Stdio::null())
                .spawn()
                .expect("start vmgrid node")
        };
        let children = (1..=nodes).map(node).collect();
        while client.nodes().map(|n| n.len() as u32).unwrap_or(0) < nodes {
            std::thread::sleep(Duration::from_millis(20));
        }
        Pool { child, nodes: children, client, _dir: dir, _db: None }
    }
}

/// Waits until the pool counts `n` more jobs completed than `before` (its `vmgrid_jobs` gauge,
/// read every `every`; a read that fails counts as not yet), then until what it counted is
/// durable: the gauge counts a result once applied, its commit a group commit or two later, and
/// a `wait` call answers only once everything queued before it is on disk. Errs past `deadline`.
pub fn until_done(
    client: &Client,
    before: u64,
    n: u64,
    last: u64,
    every: Duration,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        let done = completed_of(client).map_or(0, |c| c.saturating_sub(before));
        if done >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{done} of {n} results before the deadline"));
        }
        std::thread::sleep(every);
    }
    client.wait(last, Duration::from_secs(60)).map(drop).map_err(|e| format!("wait for job {last}: {e}"))
}

/// How many jobs the pool counts completed (its `vmgrid_jobs` gauge), or why not.
pub fn completed_of(client: &Client) -> Result<u64, String> {
    let m = client.metrics().map_err(|e| format!("metrics: {e}"))?;
    m.lines()
        .find_map(|l| l.strip_prefix("vmgrid_jobs{state=\"completed\"} "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "the metrics give no count of completed jobs".to_string())
}

/// A client for the pool whose data dir is `dir`, once its client.toml appears, trusting the
/// pool's CA (`ca.pem` beside it) when the pool speaks TLS.
pub fn client_of(dir: &Path) -> Client {
    let config = dir.join("client.toml");
    loop {
        if let Ok(text) = std::fs::read_to_string(&config) {
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                    .map(|v| v.trim_end_matches('"').to_string())
            };
            if let (Some(p), Some(t)) = (get("pool"), get("token")) {
                if !p.starts_with("https://") {
                    return Client::new(&p, &t);
                }
                // The coordinator writes its CA (ca.pem) beside client.toml.
                if let Ok(pem) = std::fs::read_to_string(dir.join("ca.pem")) {
                    match vmgrid_client::Trust::pool_ca(&pem) {
                        Ok(trust) => return Client::with_trust(&p, &t, trust),
                        Err(e) => panic!("the pool's CA in {} is unusable: {e}", dir.display()),
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            // SAFETY: signalling our own child, which we have not reaped yet.
            unsafe { libc::kill(n.id() as i32, libc::SIGTERM) };
            let _ = n.wait();
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

pub fn trivial_spec(client: &Client, root: &Path) -> JobSpec {
    let image = client.upload_file(&guest(root, "probe"), "probe.wasm").expect("upload the probe guest");
    trivial_spec_of(image)
}

/// A trivial wasm job of `image`: 1 cpu, 16 MiB, placed on a wasm node with most cpus free.
pub fn trivial_spec_of(image: FileRef) -> JobSpec {
    JobSpec {
        name: "trivial".into(),
        vm_type: VmType::Wasm,
        image: Some(image),
        args: vec!["exit:0".into()],
        env: BTreeMap::new(),
        kernel: None,
        initrd: None,
        append: None,
        network: Network::None,
        cpus: 1,
        memory_mb: 16,
        timeout_s: 60,
        disk_mb: 1,
        inputs: vec![],
        outputs: vec![],
        requirements: Some("\"wasm\" in node.vm_types".into()),
        rank: Some("node.free_cpus".into()),
        max_retries: 0,
        priority: 0,
        checkpoint_s: None,
        replicas: None,
        quorum: None,
        deterministic: false,
        ssi: None,
        group: None,
    }
}

/// Jobs per second from submit to the last durable result.
pub fn vmgrid_throughput(pool: &Pool, spec: &JobSpec, n: u64) -> f64 {
    // A baseline read as 0 (a failed read) would end the sweep at once: a failure is fatal here.
    let before = completed_of(&pool.client).expect("the pool's count of completed jobs");
    let start = Instant::now();
    let ids = pool.client.submit(&SubmitRequest { spec: spec.clone(), count: n }).expect("submit the sweep").ids;
    let last = *ids.last().expect("a sweep has jobs");
    let deadline = start + Duration::from_secs(3600);
    until_done(&pool.client, before, n, last, Duration::from_millis(20), deadline).expect("the sweep's results");
    n as f64 / start.elapsed().as_secs_f64()
}

pub fn slurm(root: &Path, sizes: &[u64]) -> Result<BTreeMap<u64, f64>, String> {
    let peers = root.join("../shared/peers");
    if !peers.join("slurm-up").exists() {
        return Err(format!("{} not found", peers.display()));
    }
    let up = Command::new("bash").arg(peers.join("slurm-up")).output().map_err(|e| e.to_string())?;
    if !up.status.success() {
        return Err(format!("slurm-up failed: {}", String::from_utf8_lossy(&up.stderr).trim()));
    }
    let mut out = BTreeMap::new();
    for &n in sizes {
        let r = Command::new("bash")
            .arg(peers.join("slurm-throughput"))
            .arg(n.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&r.stdout);
        // "slurm: N jobs in X s = Y jobs/s"
        let rate = text.split('=').nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse::<f64>().ok());
        match rate {
            Some(r) => {
                out.insert(n, r);
            }
            None => return Err(format!("slurm-throughput printed {text:?} {}", String::from_utf8_lossy(&r.stderr))),
        }
    }
    let _ = Command::new("bash").arg(peers.join("slurm-down")).status();
    Ok(out)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn latency(pool: &Pool, spec: &JobSpec, runs: usize) -> (f64, f64) {
    let mut ms = Vec::with_capacity(runs);
    for i in 0..runs + 10 {
        let start = Instant::now();
        let ids = pool.client.submit(&SubmitRequest { spec: spec.clone(), count: 1 }).expect("submit").ids;
        let v = pool.client.wait(ids[0], Duration::from_secs(30)).expect("wait");
        assert_eq!(v.state, JobState::Completed);
        if i >= 10 {
            ms.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}
