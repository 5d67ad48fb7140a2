//! The pool's scale: simulated node agents against a real coordinator.
//!
//! A real `vmgrid coordinator` process (the release binary, HTTPS under the pool's own CA, its
//! state in SQLite) serves N **simulated node agents**, all in this one process: each registers
//! with the pool token and gets its own credential, long-polls for leases on its own connection
//! (as `vmgrid node` does: at most its free cpus, waiting up to `LEASE_WAIT_MS` for work), and
//! "runs" each job it gets in no time: its results ride on its next lease call, as `vmgrid node`
//! sends the results that are ready with its call for more work. That is a node's best case: one
//! call per lease of up to its cpus' jobs (a real node also leases ahead, asks again as each cpu
//! frees, and sends results in a report call of their own while its lease call waits). Heartbeats go at the interval
//! the pool gives at registration, each under its node's credential, sent by threads that each
//! serve 5 nodes over one connection (a pool of 10,000 agents with two connections each would pass
//! this machine's 20,000 open files). They are real HTTP clients of a real coordinator; only the
//! jobs are not run.
//!
//! Measured at each pool size: the coordinator's CPU (utime + stime from /proc) while the pool is
//! idle and over a sweep of trivial jobs, jobs/s (until the coordinator counts every job of the
//! sweep completed), the round trips of leases (calls that got work, carrying the results of the
//! last, their long-poll wait included) and heartbeats, and submit-to-lease of single jobs on
//! the idle pool with the coordinator's CPU per such job. `rows.rs` makes them rows with targets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmgrid_client::{Client, Trust};
use vmgrid_proto::*;

use crate::pool::{completed_of, percentile, until_done, vmgrid_bin};

mod rows;
pub use rows::figures;

/// Cpus each simulated node offers (this machine's size): the most jobs it takes in one lease.
const NODE_CPUS: u32 = 2;
/// How many nodes' heartbeats one thread sends, over one connection.
const NODES_PER_HEARTBEAT_THREAD: usize = 5;
/// Single jobs submitted one at a time on the idle pool, for submit-to-lease.
const PROBES: usize = 100;
/// How long the idle pool is watched: a few heartbeat intervals, and two of a node's lease
/// calls waiting for work (each ends only when its wait is up).
const IDLE: Duration = Duration::from_millis(2 * LEASE_WAIT_MS);

/// One pool size's figures.
#[derive(Debug, Clone)]
pub struct FleetFigures {
    pub nodes: usize,
    pub jobs: u64,
    pub register_s: f64,
    pub heartbeat_ms: u64,
    /// The coordinator's CPU while the pool idles, in % of one core.
    pub idle_cpu_pct: f64,
    pub jobs_per_s: f64,
    /// The coordinator's CPU over the sweep: seconds, and per job.
    pub sweep_cpu_s: f64,
    pub cpu_ms_per_job: f64,
    /// This process's CPU over the sweep (the simulated agents' share of the machine).
    pub agents_cpu_s: f64,
    pub lease_ms: (f64, f64),
    pub heartbeat_rtt_ms: (f64, f64),
    /// Heartbeats sent against those due at the pool's interval, over the idle phase and sweep.
    pub heartbeats_kept: f64,
    pub submit_to_lease_ms: (f64, f64),
    /// The coordinator's CPU per single job on the idle pool, above what the idle pool takes.
    pub probe_cpu_ms: f64,
    /// Failed calls by kind (register, lease, heartbeat; retried), results refused ("report"),
    /// and the first one.
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub first_error: Option<String>,
}

/// A `vmgrid coordinator` in a temporary directory, stopped on drop.
struct Coordinator {
    child: Child,
    dir: PathBuf,
}

impl Coordinator {
    fn start(root: &Path, tag: &str) -> Result<Coordinator, String> {
        let dir = std::env::temp_dir().join(format!("vmgrid-fleet-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(vmgrid_bin(root))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the coordinator: {e}"))?;
        let mut c = Coordinator { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.dir.join("client.toml").exists() {
            if Instant::now() > deadline || c.child.try_wait().ok().flatten().is_some() {
                return Err("the coordinator did not start (no client.toml within 60 s)".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(c)
    }

    /// utime + stime, in seconds.
    fn cpu_s(&self) -> f64 {
        cpu_s_of(&format!("/proc/{}/stat", self.child.id()))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process's utime + stime in seconds, from its /proc stat file.
fn cpu_s_of(stat: &str) -> f64 {
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    cpu_ticks(&std::fs::read_to_string(stat).unwrap_or_default()) as f64 / hz as f64
}

/// utime + stime in clock ticks, from the text of a /proc/PID/stat file.
fn cpu_ticks(text: &str) -> u64 {
    // The fields after the command name (which may hold spaces) in parentheses: state is the
    // 3rd field of the line, utime the 14th and stime the 15th.
    let fields: Vec<&str> =
        text.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    [11, 12].iter().filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok())).sum()
}

/// What the simulated agents share with the bench: the figures they collect.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    registered: AtomicU64,
    /// The heartbeat interval the pool gave at registration.
    interval_ms: AtomicU64,
    heartbeats: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    first_error: Mutex<Option<String>>,
    lease_ms: Mutex<Vec<f64>>,
    heartbeat_ms: Mutex<Vec<f64>>,
    /// When the sweep began: a lease call made before it (waiting in the idle pool) is not
    /// counted among the round trips.
    sweep_began: Mutex<Option<Instant>>,
    /// When a node got each job's lease, by job id.
    leased_at: Mutex<HashMap<u64, Instant>>,
    leased: Condvar,
}

impl Shared {
    fn error(&self, what: &'static str, e: impl std::fmt::Display) {
        *self.errors.lock().unwrap().entry(what).or_default() += 1;
        let mut first = self.first_error.lock().unwrap();
        first.get_or_insert_with(|| format!("{what}: {e}"));
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// p50 and p99 of `samples`, emptied for the next phase; zeros when there are none.
fn take_percentiles(samples: &Mutex<Vec<f64>>) -> (f64, f64) {
    let mut v = std::mem::take(&mut *samples.lock().unwrap());
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// A simulated node: its credential once registered.
struct SimNode {
    credential: OnceLock<String>,
}

fn ad(name: String) -> NodeAd {
    NodeAd {
        name,
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        cpus: NODE_CPUS,
        memory_mb: 4096,
        disk_mb: 10_240,
        vm_types: vec![VmType::Wasm],
        accelerators: vec![],
        labels: Default::default(),
        appliance: false,
        qemu: None,
        peer: None,
        overlay: None,
    }
}

/// One simulated agent: registers, then asks for leases until told to stop, each call carrying
/// the results of the jobs the last one got.
fn agent(pool: &str, token: &str, trust: Trust, name: String, node: &SimNode, shared: &Shared) {
    let joiner = Client::with_trust(pool, token, trust);
    let client = loop {
        match joiner.register(&ad(name.clone()), None) {
            Ok(reg) => {
                let _ = node.credential.set(reg.credential.clone());
                shared.interval_ms.store(reg.heartbeat_ms, Ordering::Relaxed);
                break joiner.with_token(&reg.credential);
            }
            Err(e) if !shared.stopping() => {
                shared.error("register", e);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(_) => return,
        }
    };
    shared.registered.fetch_add(1, Ordering::Relaxed);
    // The results of the jobs it got last, sent with its next call (again, if a call failed: a
    // result already taken is then refused as stale, and counted as a "report" error). Those of
    // the last call before the stop are never sent: the coordinator is stopped with them.
    let mut done: Vec<LeaseId> = Vec::new();
    while !shared.stopping() {
        let reports = done.iter().map(|&lease| Report::exited(lease, 0)).collect();
        let req = LeaseRequest { max_jobs: NODE_CPUS, max_cpus: NODE_CPUS, wait_ms: LEASE_WAIT_MS, ahead: 0, reports };
        let asked = Instant::now();
        let leases = match client.lease(&req) {
            Ok(r) => {
                done.clear();
                if let Some((l, why)) = r.report.as_ref().and_then(|r| r.refused.first()) {
                    shared.error("report", format!("job {} refused: {why}", l.job_id));
                }
                if r.leases.is_empty() {
                    continue;
                }
                r.leases
            }
            Err(e) => {
                shared.error("lease", e);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let got = Instant::now();
        // A call made before the sweep began waited in the idle pool: not a round trip.
        if shared.sweep_began.lock().unwrap().is_none_or(|b| asked >= b) {
            shared.lease_ms.lock().unwrap().push(ms(asked));
        }
        let ids: Vec<LeaseId> = leases.iter().map(|l| LeaseId { job_id: l.job_id, epoch: l.epoch }).collect();
        {
            let mut at = shared.leased_at.lock().unwrap();
            at.extend(ids.iter().map(|l| (l.job_id, got)));
            shared.leased.notify_all();
        }
        // "Run" in no time: a real node names a job's lease in its heartbeats while the job runs
        // or is queued, and this one's are done before its next heartbeat could name them.
        done = ids;
    }
}

/// Sends the heartbeats of `nodes` at `interval`, their due times spread evenly over it.
fn heartbeats(base: Client, nodes: &[Arc<SimNode>], interval: Duration, shared: &Shared) {
    let clients: Vec<Client> =
        nodes.iter().map(|n| base.with_token(n.credential.get().map_or("", |c| c.as_str()))).collect();
    let step = interval / nodes.len().max(1) as u32;
    let mut due = Instant::now();
    let mut i = 0;
    while !shared.stopping() {
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(200)));
            continue;
        }
        let sent = Instant::now();
        match clients[i].heartbeat(&HeartbeatRequest {
            leases: vec![],
            draining: false,
            cache: None,
            returned: vec![],
            sharing: None,
            renew_peer: false,
        }) {
            Ok(_) => {
                shared.heartbeat_ms.lock().unwrap().push(ms(sent));
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.error("heartbeat", e),
        }
        i = (i + 1) % nodes.len();
        due += step;
    }
}

/// A spec for trivial jobs: the simulated nodes never fetch its image (a minimal wasm module).
fn trivial_spec(client: &Client) -> Result<JobSpec, String> {
    let image = client.upload_bytes(b"\0asm\x01\0\0\0", "empty.wasm").map_err(|e| format!("upload: {e}"))?;
    // No requirement or rank: the pass measured is the pool's, not CEL's.
    Ok(JobSpec {
        name: "fleet".into(),
        args: vec![],
        requirements: None,
        rank: None,
        ..crate::pool::trivial_spec_of(image)
    })
}

/// The simulated agents of one pool and the threads that run them.
struct Fleet {
    shared: Arc<Shared>,
    nodes: Vec<Arc<SimNode>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Fleet {
    /// Starts `n` agents and waits until all registered; returns how long that took.
    fn join(admin: &Client, token: &str, n: usize) -> Result<(Fleet, f64), String> {
        let shared = Arc::new(Shared::default());
        let mut fleet = Fleet { shared: shared.clone(), nodes: Vec::new(), threads: Vec::new() };
        let start = Instant::now();
        for i in 0..n {
            let node = Arc::new(SimNode { credential: OnceLock::new() });
            fleet.nodes.push(node.clone());
            let (pool, token, trust, s) =
                (admin.url().to_string(), token.to_string(), admin.trust().clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("sim-{i}"))
                .stack_size(512 << 10)
                .spawn(move || agent(&pool, &token, trust, format!("sim-{i:05}"), &node, &s))
                .map_err(|e| format!("cannot start agent thread {i}: {e}"))?;
            fleet.threads.push(t);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while shared.registered.load(Ordering::Relaxed) < n as u64 {
            if Instant::now() > deadline {
                let got = shared.registered.load(Ordering::Relaxed);
                return Err(format!("{got} of {n} simulated nodes registered in 300 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((fleet, start.elapsed().as_secs_f64()))
    }

    /// Starts the heartbeat threads, each for a slice of the nodes.
    fn heartbeat(&mut self, admin: &Client, interval: Duration) -> Result<(), String> {
        for (k, slice) in self.nodes.chunks(NODES_PER_HEARTBEAT_THREAD).enumerate() {
            let (nodes, s) = (slice.to_vec(), self.shared.clone());
            // A client of its own: one connection for the slice's heartbeats.
            let base = Client::with_trust(admin.url(), "", admin.trust().clone());
            let t = std::thread::Builder::new()
                .name(format!("sim-hb-{k}"))
                .stack_size(512 << 10)
                .spawn(move || heartbeats(base, &nodes, interval, &s))
                .map_err(|e| format!("cannot start heartbeat thread {k}: {e}"))?;
            self.threads.push(t);
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Submits `jobs` in one batch and waits until the coordinator counts them all completed and
/// durable ([`crate::pool::until_done`], the gauge read every 10 ms): jobs/s, the coordinator's
/// CPU and this process's over it.
fn sweep(
    coord: &Coordinator,
    admin: &Client,
    spec: &JobSpec,
    jobs: u64,
    s: &Shared,
) -> Result<(f64, f64, f64), String> {
    let before = completed_of(admin)?;
    let (cpu0, own0) = (coord.cpu_s(), cpu_s_of("/proc/self/stat"));
    let start = Instant::now();
    *s.sweep_began.lock().unwrap() = Some(start);
    let ids = admin.submit(&SubmitRequest { spec: spec.clone(), count: jobs }).map_err(|e| format!("submit: {e}"))?.ids;
    let last = *ids.last().ok_or("submit returned no job id")?;
    let deadline = start + Duration::from_secs(900);
    until_done(admin, before, jobs, last, Duration::from_millis(10), deadline).map_err(|e| format!("{e} (900 s)"))?;
    let rate = jobs as f64 / start.elapsed().as_secs_f64();
    Ok((rate, coord.cpu_s() - cpu0, cpu_s_of("/proc/self/stat") - own0))
}

/// Submit to lease of single jobs, one at a time, on the idle pool: p50 and p99 in ms, and the
/// coordinator's CPU per job above `idle_cpu_pct` (how much a placement costs with all the pool's
/// long polls parked).
fn probe(
    coord: &Coordinator,
    admin: &Client,
    spec: &JobSpec,
    s: &Shared,
    idle_cpu_pct: f64,
) -> Result<((f64, f64), f64), String> {
    let mut samples = Vec::with_capacity(PROBES);
    let (cpu0, began) = (coord.cpu_s(), Instant::now());
    for _ in 0..PROBES {
        let start = Instant::now();
        let ids =
            admin.submit(&SubmitRequest { spec: spec.clone(), count: 1 }).map_err(|e| format!("submit: {e}"))?.ids;
        let id = *ids.first().ok_or("submit returned no job id")?;
        let mut at = s.leased_at.lock().unwrap();
        let deadline = start + Duration::from_secs(30);
        while !at.contains_key(&id) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("job {id} was not leased within 30 s"));
            }
            at = s.leased.wait_timeout(at, left).unwrap().0;
        }
        samples.push((at[&id] - start).as_secs_f64() * 1000.0);
        drop(at);
        // Let its result land before the next one, so that each job meets an idle pool.
        std::thread::sleep(Duration::from_millis(10));
    }
    let idle_s = began.elapsed().as_secs_f64() * idle_cpu_pct / 100.0;
    let cpu_ms = (coord.cpu_s() - cpu0 - idle_s).max(0.0) * 1000.0 / PROBES as f64;
    samples.sort_by(f64::total_cmp);
    Ok(((percentile(&samples, 0.5), percentile(&samples, 0.99)), cpu_ms))
}

/// Raises this process's open-file limit to its hard limit (the coordinator inherits it): each
/// simulated node holds a connection.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit on a zeroed struct of the right type.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// One pool size: a fresh coordinator, `nodes` simulated agents, an idle spell, a sweep of
/// `jobs`, then single-job probes.
pub fn measure(root: &Path, nodes: usize, jobs: u64) -> Result<FleetFigures, String> {
    raise_open_files();
    let coord = Coordinator::start(root, &nodes.to_string())?;
    let admin = crate::pool::client_of(&coord.dir);
    let token = std::fs::read_to_string(coord.dir.join("pool.token")).map_err(|e| format!("pool.token: {e}"))?;
    let spec = trivial_spec(&admin)?;
    let (mut fleet, register_s) = Fleet::join(&admin, token.trim(), nodes)?;
    let heartbeat_ms = fleet.shared.interval_ms.load(Ordering::Relaxed).max(100);
    let interval = Duration::from_millis(heartbeat_ms);
    fleet.heartbeat(&admin, interval)?;
    let s = fleet.shared.clone();
    let hb_start = Instant::now();
    // One interval for the heartbeat threads' connections to be made, then the idle pool.
    std::thread::sleep(interval);
    let cpu0 = coord.cpu_s();
    std::thread::sleep(IDLE);
    let idle_cpu_pct = (coord.cpu_s() - cpu0) / IDLE.as_secs_f64() * 100.0;
    take_percentiles(&s.lease_ms);
    let (jobs_per_s, sweep_cpu_s, agents_cpu_s) = sweep(&coord, &admin, &spec, jobs, &s)?;
    let lease_ms = take_percentiles(&s.lease_ms);
    let heartbeat_rtt_ms = take_percentiles(&s.heartbeat_ms);
    let due = nodes as f64 * hb_start.elapsed().as_secs_f64() / interval.as_secs_f64();
    let heartbeats_kept = s.heartbeats.load(Ordering::Relaxed) as f64 / due.max(1.0);
    let (submit_to_lease_ms, probe_cpu_ms) = probe(&coord, &admin, &spec, &s, idle_cpu_pct)?;
    drop(fleet);
    let first_error = s.first_error.lock().unwrap().clone();
    Ok(FleetFigures {
        nodes,
        jobs,
        register_s,
        heartbeat_ms,
        idle_cpu_pct,
        jobs_per_s,
        sweep_cpu_s,
        cpu_ms_per_job: sweep_cpu_s * 1000.0 / jobs as f64,
        agents_cpu_s,
        lease_ms,
        heartbeat_rtt_ms,
        heartbeats_kept,
        submit_to_lease_ms,
        probe_cpu_ms,
        errors: s.errors.lock().unwrap().clone(),
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::cpu_ticks;

    #[test]
    fn cpu_time_is_utime_plus_stime_after_a_command_name_with_spaces() {
        let stat = "4242 (vmgrid (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 350 27 0 0 20 0 9 0 1 2 3";
        assert_eq!(cpu_ticks(stat), 377);
        assert_eq!(cpu_ticks(""), 0);
    }
}
