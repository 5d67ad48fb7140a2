//! The node agent: joins a pool, leases work, runs each job in its VM through `vmgrid-runtime`,
//! and reports results. It only connects outward (so nodes behind NAT work): register with the
//! pool token, then long-poll for leases, heartbeat them, and report in batches.
//!
//! It never decides a job's fate: it reports what happened and the coordinator's state machine
//! decides. A lease the coordinator revokes is cancelled here; a result it refuses is dropped.

mod cache;
mod fingerprint;
mod ssi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmgrid_client::{Client, ClientError};
use vmgrid_proto::*;
use vmgrid_runtime::{Outcome, RunError, RunRequest, Runtime, RuntimeConfig, jobdir};

pub use fingerprint::fingerprint;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub pool: String,
    /// The pool token (node role): it only registers; the node then uses its own credential.
    pub token: String,
    pub name: String,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub appliance: bool,
    /// Images and inputs by hash, shared across jobs, bounded by `cache_max_mb`.
    pub cache_dir: PathBuf,
    pub cache_max_mb: u64,
    /// How long a stopping node waits for its running jobs before handing them back.
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot join the pool: {0}")]
    Register(ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct Running {
    cancel: Arc<AtomicBool>,
    cpus: u32,
}

struct Agent {
    config: NodeConfig,
    ad: NodeAd,
    client: Mutex<Client>,
    runtime: Runtime,
    cache: cache::BlobCache,
    running: Mutex<HashMap<LeaseId, Running>>,
    /// Signalled when a job ends and its cpus are free again.
    slot_freed: Condvar,
    reports: mpsc::Sender<Report>,
    work_dir: PathBuf,
    heartbeat: Duration,
    /// Set when leaving: the reporter sends what is queued and ends.
    closing: AtomicBool,
}

/// Runs the agent until `stop` is set; then it drains and leaves the pool.
pub fn run(config: NodeConfig, stop: Arc<AtomicBool>) -> Result<(), NodeError> {
    let ad = fingerprint(&config);
    std::fs::create_dir_all(&config.cache_dir)?;
    let work_dir = config.cache_dir.join("jobs");
    let _ = std::fs::remove_dir_all(&work_dir);
    std::fs::create_dir_all(&work_dir)?;
    let (client, reg) = register(&config, &ad, &stop)?;
    let Some(reg) = reg else { return Ok(()) };
    let (tx, rx) = mpsc::channel();
    let agent = Arc::new(Agent {
        cache: cache::BlobCache::new(config.cache_dir.join("blobs"), config.cache_max_mb << 20)?,
        runtime: Runtime::new(RuntimeConfig {
            cache_dir: config.cache_dir.join("runtime"),
            // At most one instance per cpu runs at a time; the pool has room to spare.
            pooled_instances: (ad.cpus * 2).clamp(16, 1000),
            ..RuntimeConfig::default()
        }),
        config,
        ad,
        client: Mutex::new(client),
        running: Mutex::new(HashMap::new()),
        slot_freed: Condvar::new(),
        reports: tx,
        work_dir,
        heartbeat: Duration::from_millis(reg.heartbeat_ms.max(100)),
        closing: AtomicBool::new(false),
    });
    tracing::info!(node = %agent.ad.name, pool = %agent.config.pool, "joined the pool");
    let reporter = {
        let a = agent.clone();
        std::thread::Builder::new().name("vmgrid-report".into()).spawn(move || a.report_loop(rx))?
    };
    let hb_stop = Arc::new(AtomicBool::new(false));
    let heartbeater = {
        let (a, s) = (agent.clone(), hb_stop.clone());
        std::thread::Builder::new().name("vmgrid-heartbeat".into()).spawn(move || a.heartbeat_loop(&s))?
    };
    agent.lease_loop(&stop);

    // Drain: tell the pool, let running jobs finish (or hand them back), then leave.
    tracing::info!(node = %agent.ad.name, "draining");
    agent.send_heartbeat(true);
    let deadline = Instant::now() + agent.config.drain_timeout;
    while !agent.running.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in agent.running.lock().unwrap().values() {
        r.cancel.store(true, Ordering::Relaxed);
    }
    while !agent.running.lock().unwrap().is_empty() && Instant::now() < deadline + Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    hb_stop.store(true, Ordering::Relaxed);
    let _ = heartbeater.join();
    agent.closing.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    let client = agent.client();
    if let Err(e) = client.deregister() {
        tracing::warn!("could not deregister: {e}");
    }
    tracing::info!("left the pool");
    Ok(())
}

/// Registers, retrying while the pool is unreachable (it may be starting or restarting).
fn register(
    config: &NodeConfig,
    ad: &NodeAd,
    stop: &AtomicBool,
) -> Result<(Client, Option<RegisterResponse>), NodeError> {
    let joiner = Client::new(&config.pool, &config.token);
    let saved = config.cache_dir.join("credential");
    let mut wait = Duration::from_millis(50);
    loop {
        let previous = std::fs::read_to_string(&saved).ok().map(|c| c.trim().to_string());
        match joiner.register(ad, previous) {
            Ok(reg) => {
                let client = Client::new(&config.pool, &reg.credential);
                let _ = std::fs::write(config.cache_dir.join("credential"), &reg.credential);
                return Ok((client, Some(reg)));
            }
            Err(ClientError::Refused { status: 409, message }) if !stop.load(Ordering::Relaxed) => {
                // Our name is still held by a registration the pool has not declared lost.
                tracing::warn!("{message}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e @ ClientError::Refused { .. }) => return Err(NodeError::Register(e)),
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok((joiner, None));
                }
                tracing::warn!("{e}; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl Agent {
    fn client(&self) -> Client {
        self.client.lock().unwrap().clone()
    }

    /// Waits (briefly) until some cpus are free; returns how many.
    fn wait_for_free_cpus(&self) -> u32 {
        let mut running = self.running.lock().unwrap();
        for _ in 0..10 {
            let used: u32 = running.values().map(|r| r.cpus).sum();
            if used < self.ad.cpus {
                return self.ad.cpus - used;
            }
            running = self.slot_freed.wait_timeout(running, Duration::from_millis(10)).unwrap().0;
        }
        0
    }

    /// A refused call from a node that was declared lost or replaced: it registers again.
    fn rejoin(&self, stop: &AtomicBool) {
        tracing::warn!(node = %self.ad.name, "the pool no longer knows this node; stopping its jobs and registering again");
        for r in self.running.lock().unwrap().values() {
            r.cancel.store(true, Ordering::Relaxed);
        }
        match register(&self.config, &self.ad, stop) {
            Ok((c, Some(_))) => *self.client.lock().unwrap() = c,
            Ok((_, None)) => {}
            Err(e) => {
                tracing::error!("{e}; trying again in 2 s");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }

    fn lease_loop(self: &Arc<Self>, stop: &AtomicBool) {
        let mut backoff = Duration::from_millis(50);
        while !stop.load(Ordering::Relaxed) {
            let free = self.wait_for_free_cpus();
            // With every cpu busy, the node still collects time-shared jobs (SSI processes need
            // no cpu slot), without waiting, so that a freed cpu is put to work at once.
            let req = if free == 0 {
                LeaseRequest { max_jobs: 64, max_cpus: 0, wait_ms: 0 }
            } else {
                LeaseRequest { max_jobs: free, max_cpus: free, wait_ms: 1000 }
            };
            match self.client().lease(&req) {
                Ok(resp) => {
                    backoff = Duration::from_millis(50);
                    for lease in resp.leases {
                        self.start_job(lease);
                    }
                }
                Err(ClientError::Refused { status: 409 | 401, .. }) => self.rejoin(stop),
                Err(e) => {
                    tracing::warn!("lease: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn start_job(self: &Arc<Self>, lease: Lease) {
        let id = LeaseId { job_id: lease.job_id, epoch: lease.epoch };
        let cancel = Arc::new(AtomicBool::new(false));
        self.running.lock().unwrap().insert(id, Running { cancel: cancel.clone(), cpus: lease.spec.cpus });
        let agent = self.clone();
        let spawned = std::thread::Builder::new().name(format!("vmgrid-job-{}", lease.job_id)).spawn(move || {
            let report = agent.run_job(&lease, cancel);
            let _ = agent.reports.send(report);
            agent.running.lock().unwrap().remove(&id);
            agent.slot_freed.notify_all();
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a job thread: {e}");
            self.running.lock().unwrap().remove(&id);
        }
    }

    /// Runs one leased job and builds its report.
    fn run_job(&self, lease: &Lease, cancel: Arc<AtomicBool>) -> Report {
        let id = LeaseId { job_id: lease.job_id, epoch: lease.epoch };
        let dir = self.work_dir.join(format!("job-{}-{}", lease.job_id, lease.epoch));
        let report = |run: RunReport| Report {
            lease: id,
            run,
            stdout: None,
            stderr: None,
            stdout_dropped: 0,
            stderr_dropped: 0,
            outputs: Vec::new(),
        };
        let mut home_gone = false;
        let result = (|| -> Result<Report, RunError> {
            let client = self.client();
            let files =
                lease.spec.image.iter().chain(&lease.spec.kernel).chain(&lease.spec.initrd).chain(&lease.spec.inputs);
            let mut located = HashMap::new();
            for f in files {
                let p = self
                    .cache
                    .get(&client, &f.blob)
                    .map_err(|e| RunError::Host(format!("cannot fetch `{}`: {e}", f.path)))?;
                located.insert(f.blob.clone(), p);
            }
            let job = lease
                .spec
                .to_job(Path::new(&format!("job-{}", lease.job_id)), |f| located[&f.blob].clone())
                .map_err(RunError::BadJob)?;
            let job_dir = dir.join("job");
            std::fs::create_dir_all(&job_dir).map_err(|e| RunError::host("cannot create the job directory", e))?;
            jobdir::stage_inputs(&job, &job_dir)?;
            // An SSI process runs against its home: its job directory is the mirror of the
            // home's files, and the home hears of its start, output and end first.
            let home = lease.spec.ssi.clone().map(|spec| ssi::HomeLink::start(spec, cancel.clone()));
            if let Some(h) = &home {
                h.started(&self.ad.name);
            }
            let host = home.clone().map(|h| h as Arc<dyn vmgrid_runtime::ssi::SsiHost>);
            let run =
                self.runtime.run(&RunRequest { job: &job, job_dir: &job_dir, cancel: Some(cancel.clone()), ssi: host });
            if let Some(h) = &home {
                match &run {
                    Ok(r) => h.finish(Some(&r.outcome), None),
                    Err(e) => h.finish(None, Some(&e.to_string())),
                }
            }
            home_gone = home.as_ref().is_some_and(|h| h.home_gone());
            let result = run?;
            let out_dir = dir.join("out");
            let collected = jobdir::collect_outputs(&job, &job_dir, &out_dir)?;
            let upload = |bytes: &[u8], name: &str| {
                client.upload_bytes(bytes, name).map_err(|e| RunError::Host(format!("cannot upload {name}: {e}")))
            };
            let mut r = report(match &result.outcome {
                Outcome::Exited(code) => RunReport::Exited { code: *code },
                Outcome::Failed(f) => {
                    RunReport::GuestFailed { failure: f.kind.as_str().into(), reason: f.reason.clone() }
                }
            });
            if !result.stdout.bytes.is_empty() {
                r.stdout = Some(upload(&result.stdout.bytes, "stdout")?);
            }
            if !result.stderr.bytes.is_empty() {
                r.stderr = Some(upload(&result.stderr.bytes, "stderr")?);
            }
            r.stdout_dropped = result.stdout.dropped;
            r.stderr_dropped = result.stderr.dropped;
            for rel in &collected.files {
                let name = rel.to_string_lossy().into_owned();
                let f = client
                    .upload_file(&out_dir.join(rel), &name)
                    .map_err(|e| RunError::Host(format!("cannot upload output {name}: {e}")))?;
                r.outputs.push(f);
            }
            Ok(r)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        if cancel.load(Ordering::Relaxed) {
            // Still reported: the coordinator, not the node, decides what a result is worth, and
            // it refuses one whose lease is gone.
            tracing::info!(job = lease.job_id, epoch = lease.epoch, "stopped: the lease was revoked");
        }
        match result {
            // An SSI process whose console went away is over: nothing would take its output.
            Ok(r) if home_gone => Report {
                run: RunReport::GuestFailed {
                    failure: "cancelled".into(),
                    reason: "the process's home (its `vmgrid ssi` console) is gone".into(),
                },
                ..r
            },
            // A run this node stopped (drain timeout, revoked lease) says nothing about the job:
            // it goes back to the pool, which refuses it anyway if the lease is gone.
            Ok(r) if cancel.load(Ordering::Relaxed) => {
                Report { run: RunReport::HostFailed { reason: "stopped by its node".into() }, ..r }
            }
            Ok(r) => r,
            Err(RunError::BadJob(reason)) => report(RunReport::BadJob { reason }),
            Err(RunError::Host(reason)) => report(RunReport::HostFailed { reason }),
        }
    }

    /// Sends reports in batches: whatever is queued goes in one call.
    fn report_loop(&self, rx: mpsc::Receiver<Report>) {
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) if !self.closing.load(Ordering::Relaxed) => continue,
                Err(_) => break,
            };
            let mut batch = vec![first];
            while let Ok(r) = rx.try_recv() {
                batch.push(r);
                if batch.len() >= 1000 {
                    break;
                }
            }
            let req = ReportRequest { reports: batch };
            let mut wait = Duration::from_millis(50);
            loop {
                match self.client().report(&req) {
                    Ok(resp) => {
                        for (l, why) in resp.refused {
                            tracing::warn!(job = l.job_id, epoch = l.epoch, "the pool refused a result: {why}");
                        }
                        break;
                    }
                    Err(ClientError::Refused { status, message }) => {
                        tracing::warn!("the pool refused {} result(s) (HTTP {status}): {message}", req.reports.len());
                        break;
                    }
                    Err(e) if self.closing.load(Ordering::Relaxed) && wait >= Duration::from_secs(2) => {
                        tracing::error!("report: {e}; leaving with {} result(s) unsent", req.reports.len());
                        break;
                    }
                    Err(e) => {
                        // The pool is unreachable: keep the results and try again.
                        tracing::warn!("report: {e}; retrying");
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    fn send_heartbeat(&self, draining: bool) {
        let leases: Vec<LeaseId> = self.running.lock().unwrap().keys().copied().collect();
        match self.client().heartbeat(&HeartbeatRequest { leases, draining }) {
            Ok(resp) => {
                let running = self.running.lock().unwrap();
                for l in resp.revoked {
                    if let Some(r) = running.get(&l) {
                        tracing::info!(job = l.job_id, "lease revoked; stopping the job");
                        r.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
            Err(ClientError::Refused { status: 409 | 401, .. }) => {
                for r in self.running.lock().unwrap().values() {
                    r.cancel.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!("heartbeat: {e}"),
        }
    }

    fn heartbeat_loop(&self, stop: &AtomicBool) {
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            if last.elapsed() >= self.heartbeat {
                self.send_heartbeat(false);
                last = Instant::now();
            }
        }
    }
}
