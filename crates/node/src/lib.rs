//! The node agent: joins a pool, leases work, runs each job in its VM through `vmgrid-runtime`,
//! and reports results. It only connects outward (so nodes behind NAT work): register with the
//! pool token, then long-poll for leases, heartbeat them, and report in batches.
//!
//! It never decides a job's fate: it reports what happened and the coordinator's state machine
//! decides. A lease the coordinator revokes is cancelled here; a result it refuses is dropped.

mod cache;
mod checkpoint;
mod drain;
mod fingerprint;
mod job;
mod jobdirs;
use jobdirs::Reuse;
mod overlay;
mod peer;
mod queue;
mod ssi;
mod workers;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmgrid_client::{Client, ClientError};
use vmgrid_proto::*;
use vmgrid_runtime::{Runtime, RuntimeConfig};

pub use fingerprint::{fingerprint, host_cpus, host_memory_mb};

/// Writes a secret only its owner can read, whole (a crash leaves the old one or the new one).
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A lock that a panicked holder left poisoned is still the agent's to use: what it guards
/// (running jobs, the client) stays consistent at every await-free step.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub pool: String,
    /// Which certificates the pool's (and SSI homes') may be: the pool's CA.
    pub trust: vmgrid_client::Trust,
    /// The pool token (node role): it only registers; the node then uses its own credential.
    pub token: String,
    pub name: String,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub appliance: bool,
    /// Offer `jvm` jobs (the operator opted in with `--jvm`); they run confined by bubblewrap.
    pub allow_jvm: bool,
    /// Images and inputs by hash, shared across jobs, bounded by `cache_max_mb`.
    pub cache_dir: PathBuf,
    pub cache_max_mb: u64,
    /// How long a stopping node waits for its running jobs before handing them back.
    pub drain_timeout: Duration,
    /// Where to serve the pieces of large blobs to the pool's other nodes (`None`: it does not,
    /// and fetches from the pool alone). An unspecified IP (`0.0.0.0`) listens everywhere and
    /// says the address this host reaches the pool from.
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The most bytes a second it sends to other nodes.
    pub peer_upload_bytes_s: u64,
    /// Put this machine itself on the pool's overlay (the appliance with `--network grid`): a
    /// TAP device `vmgrid0`, configured by this with the address the pool gives, reaching the
    /// pool's other nodes that are on it too.
    pub overlay_host: Option<ConfigureDevice>,
    /// The vmgrid binary, to run wasm jobs in worker processes at full speed (see
    /// `vmgrid_runtime::wasm::worker`); None runs them in the node's process, with epoch checks.
    pub wasm_worker: Option<PathBuf>,
}

/// Configures the node's own overlay device: `(device, address, prefix, MAC)`; it is up and has
/// that address and MAC when this returns `Ok`.
pub type ConfigureDevice = fn(&str, std::net::Ipv4Addr, u8, [u8; 6]) -> std::io::Result<()>;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot join the pool: {0}")]
    Register(ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct Running {
    cancel: Arc<AtomicBool>,
    /// Set to checkpoint a job that takes checkpoints, stop it and report it vacated.
    vacate: Arc<AtomicBool>,
    /// It takes checkpoints (`checkpoint_s`): when the node drains, it moves instead of waiting.
    checkpointed: bool,
    cpus: u32,
    memory_mb: u64,
    started: Instant,
}

impl Running {
    fn new(spec: &JobSpec) -> Running {
        Running {
            cancel: Arc::default(),
            vacate: Arc::default(),
            checkpointed: spec.checkpoint_s.is_some(),
            cpus: spec.cpus,
            memory_mb: spec.memory_mb,
            started: Instant::now(),
        }
    }
}

struct Agent {
    config: NodeConfig,
    ad: NodeAd,
    client: Mutex<Client>,
    /// How many times this node registered again (each time under a new credential).
    rejoins: std::sync::atomic::AtomicU64,
    runtime: Runtime,
    cache: cache::BlobCache,
    running: Mutex<HashMap<LeaseId, Running>>,
    /// Signalled when a job ends and its cpus are free again.
    slot_freed: Condvar,
    /// Leased ahead and not started yet, in order ([`queue`]); locked after `running`.
    queue: Mutex<VecDeque<queue::Queued>>,
    recent: Mutex<queue::Recent>,
    /// Queued jobs to hand back with the next heartbeat.
    returning: Mutex<Vec<LeaseId>>,
    /// The threads jobs run on, reused from job to job.
    workers: Arc<workers::Workers>,
    /// Results not yet sent: the lease loop carries them in its next call, or the reporter
    /// sends them.
    outbox: Mutex<Vec<Report>>,
    outbox_ready: Condvar,
    /// The directories jobs run in: reused when empty, removed off the path to the result.
    dirs: jobdirs::JobDirs,
    heartbeat: Duration,
    /// Set when leaving: the reporter sends what is queued and ends.
    closing: AtomicBool,
    /// The caller's stop flag (set by SIGTERM or SIGINT): once it is, no queued job starts; the
    /// lease loop ends and the drain hands them back.
    stop: Arc<AtomicBool>,
    /// This node's end of the pool's virtual network, for its `network = "grid"` VMs (started
    /// only on a node that runs QEMU jobs or is on the overlay itself).
    overlay: Option<Arc<overlay::Overlay>>,
}

/// Runs the agent until `stop` is set; then it drains and leaves the pool.
pub fn run(config: NodeConfig, stop: Arc<AtomicBool>) -> Result<(), NodeError> {
    let mut ad = fingerprint(&config);
    let peer_listener = peer_listener(&config, &mut ad)?;
    let work_dir = prepare_cache(&config.cache_dir)?;
    // The overlay only on a node that runs QEMU jobs or is on it itself.
    let prepared = match ad.vm_types.contains(&VmType::Qemu) || config.overlay_host.is_some() {
        true => Some(overlay::Prepared::new(&config.cache_dir, config.overlay_host)?),
        false => None,
    };
    ad.overlay = prepared.as_ref().map(overlay::Prepared::ad);
    let (client, reg) = register(&config, &ad, &stop)?;
    let Some(reg) = reg else { return Ok(()) };
    let overlay = prepared.map(|p| overlay::Overlay::start(&config.pool, client.clone(), p)).transpose()?;
    let agent = Arc::new(Agent {
        cache: cache::BlobCache::new(config.cache_dir.join("blobs"), config.cache_max_mb << 20)?,
        runtime: Runtime::new(RuntimeConfig {
            cache_dir: config.cache_dir.join("runtime"),
            // At most one instance per cpu runs at a time; the pool has room to spare.
            pooled_instances: (ad.cpus * 2).clamp(16, 1000),
            wasm_worker: config.wasm_worker.clone(),
            ..RuntimeConfig::default()
        }),
        config,
        ad,
        client: Mutex::new(client),
        rejoins: Default::default(),
        running: Mutex::new(HashMap::new()),
        slot_freed: Condvar::new(),
        queue: Mutex::default(),
        recent: Mutex::default(),
        returning: Mutex::default(),
        workers: Arc::default(),
        outbox: Mutex::default(),
        outbox_ready: Condvar::new(),
        dirs: jobdirs::JobDirs::new(work_dir)?,
        heartbeat: Duration::from_millis(reg.heartbeat_ms.max(100)),
        closing: AtomicBool::new(false),
        stop: stop.clone(),
        overlay,
    });
    tracing::info!(node = %agent.ad.name, pool = %agent.config.pool, "joined the pool");
    if agent.ad.vm_types.contains(&VmType::Wasm) {
        // On a thread: the probe must not hold up the first heartbeat.
        std::thread::spawn(vmgrid_runtime::wasm::optimize::log_availability);
    }
    if let (Some(listener), Some(identity)) = (peer_listener, reg.peer_identity.as_ref()) {
        agent.share_blobs(listener, identity)?;
    }
    let reporter = {
        let a = agent.clone();
        std::thread::Builder::new().name("vmgrid-report".into()).spawn(move || a.report_loop())?
    };
    let hb_stop = Arc::new(AtomicBool::new(false));
    let heartbeater = {
        let (a, s) = (agent.clone(), hb_stop.clone());
        std::thread::Builder::new().name("vmgrid-heartbeat".into()).spawn(move || a.heartbeat_loop(&s))?
    };
    agent.lease_loop(&stop);
    agent.drain();
    hb_stop.store(true, Ordering::Relaxed);
    let _ = heartbeater.join();
    // A hand-back the heartbeat thread took and failed to send is back in the list: one more go
    // now that no other thread sends it.
    if !lock(&agent.returning).is_empty() {
        agent.hand_back_all(Instant::now() + Duration::from_secs(2));
    }
    agent.closing.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    let client = agent.client();
    if let Err(e) = client.deregister() {
        tracing::warn!("could not deregister: {e}");
    }
    if let Some(o) = &agent.overlay {
        o.stop();
    }
    tracing::info!("left the pool");
    Ok(())
}

/// The node's cache directory, its owner's alone (it holds the node's credential and its jobs'
/// files), with an empty directory for its jobs; returns that.
fn prepare_cache(dir: &std::path::Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let work_dir = dir.join("jobs");
    let _ = std::fs::remove_dir_all(&work_dir);
    std::fs::create_dir_all(&work_dir)?;
    Ok(work_dir)
}

/// The listener this node serves large blobs to other nodes on, if it does; `ad` then says where.
/// A node that cannot tell the address others would reach it at fetches from the pool alone.
fn peer_listener(config: &NodeConfig, ad: &mut NodeAd) -> std::io::Result<Option<std::net::TcpListener>> {
    let Some(addr) = config.peer_listen else { return Ok(None) };
    let listener = std::net::TcpListener::bind(addr)?;
    match peer::advertised(&listener, &config.pool) {
        Ok(at) => {
            ad.peer = Some(at.to_string());
            Ok(Some(listener))
        }
        Err(e) => {
            tracing::warn!(
                "serving no blobs to other nodes: cannot tell the address they would reach this one at: {e}"
            );
            Ok(None)
        }
    }
}

impl Agent {
    /// Serves large blobs to the pool's other nodes on `listener`, and fetches them from them.
    fn share_blobs(&self, listener: std::net::TcpListener, identity: &PeerIdentity) -> std::io::Result<()> {
        let blobs = self.config.cache_dir.join("blobs");
        let peering = peer::Peering::new(identity, &blobs, &self.ad.name, self.config.peer_upload_bytes_s)
            .map_err(std::io::Error::other)?;
        let peering = Arc::new(peering);
        peer::serve(listener, peering.clone())?;
        let _ = self.cache.peering.set(peering);
        tracing::info!(peer = ?self.ad.peer, "serving large blobs to the pool's other nodes");
        Ok(())
    }
}

/// Registers, retrying while the pool is unreachable (it may be starting or restarting).
fn register(
    config: &NodeConfig,
    ad: &NodeAd,
    stop: &AtomicBool,
) -> Result<(Client, Option<RegisterResponse>), NodeError> {
    let joiner = Client::with_trust(&config.pool, &config.token, config.trust.clone());
    let saved = config.cache_dir.join("credential");
    let mut wait = Duration::from_millis(50);
    loop {
        let previous = std::fs::read_to_string(&saved).ok().map(|c| c.trim().to_string());
        match joiner.register(ad, previous) {
            Ok(reg) => {
                let client = joiner.with_token(&reg.credential);
                if let Err(e) = write_secret(&saved, &reg.credential) {
                    tracing::warn!("cannot keep the node's credential in {}: {e}", saved.display());
                }
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
        lock(&self.client).clone()
    }

    /// A refused call from a node that was declared lost or replaced: it registers again.
    fn rejoin(&self, stop: &AtomicBool) {
        tracing::warn!(node = %self.ad.name, "the pool no longer knows this node; stopping its jobs and registering again");
        self.fence();
        // A new registration, a new overlay key registered with it.
        let key = match self.overlay.as_ref().map(|_| overlay::new_key(&self.config.cache_dir)).transpose() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!("cannot make a new overlay key: {e}; trying again in 2 s");
                std::thread::sleep(Duration::from_secs(2));
                return;
            }
        };
        let overlay_ad = key.as_ref().map(|k| k.ad(self.config.overlay_host.is_some()));
        let ad = NodeAd { overlay: overlay_ad, ..self.ad.clone() };
        match register(&self.config, &ad, stop) {
            Ok((c, Some(_))) => {
                if let (Some(o), Some(key)) = (&self.overlay, key) {
                    o.rotate(c.clone(), key);
                }
                *lock(&self.client) = c;
                self.rejoins.fetch_add(1, Ordering::SeqCst);
            }
            Ok((_, None)) => {}
            Err(e) => {
                tracing::error!("{e}; trying again in 2 s");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }

    /// The pool no longer knows this lease holder: its running jobs are stopped, its queued ones
    /// dropped (they run elsewhere).
    fn fence(&self) {
        for r in lock(&self.running).values() {
            r.cancel.store(true, Ordering::Relaxed);
        }
        lock(&self.queue).clear();
        lock(&self.returning).clear();
    }

    /// Asks for work as cpus free up (and lease-ahead allows), carrying the results that are
    /// ready in the same call.
    fn lease_loop(self: &Arc<Self>, stop: &AtomicBool) {
        let mut backoff = Duration::from_millis(50);
        let mut eager = false;
        while !stop.load(Ordering::Relaxed) {
            let (room, ahead) = self.wait_for_room(eager);
            // Asked to stop while it waited: no last call for jobs it would only hand back.
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let reports = self.take_outbox();
            // With every cpu busy, the node still collects time-shared jobs (SSI processes need
            // no cpu slot), without waiting, so that a freed cpu is put to work at once.
            // A node with a free cpu waits long for work (the pool ends the wait when there is
            // some); one that only has lease-ahead room asks again within a second, so the pool
            // hears soon when its jobs turn long and it wants none queued.
            let (max_jobs, wait_ms) = match (room, self.room(0)) {
                (0, _) => (64, 0),
                (_, 0) => (room, 1000),
                _ => (room, LEASE_WAIT_MS),
            };
            let req = LeaseRequest { max_jobs, max_cpus: room, wait_ms, ahead, reports };
            match self.client().lease(&req) {
                Ok(resp) => {
                    backoff = Duration::from_millis(50);
                    for (l, why) in resp.report.map(|r| r.refused).unwrap_or_default() {
                        tracing::warn!(job = l.job_id, epoch = l.epoch, "the pool refused a result: {why}");
                    }
                    eager = wait_ms > 0 && resp.leases.len() as u32 >= max_jobs;
                    self.enqueue(resp.leases);
                }
                Err(e) => {
                    self.put_back(req.reports);
                    if let ClientError::Refused { status: 409 | 401, .. } = e {
                        self.rejoin(stop);
                        continue;
                    }
                    tracing::warn!("lease: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Runs a job already counted among the running ones (`start_queued`) on a worker thread.
    fn spawn_job(self: &Arc<Self>, lease: Lease, cancel: Arc<AtomicBool>, vacate: Arc<AtomicBool>) {
        let id = LeaseId { job_id: lease.job_id, epoch: lease.epoch };
        let started = Instant::now();
        let agent = self.clone();
        let spawned = self.workers.run(move || {
            let dir = agent.dirs.take();
            let (report, untouched) = match &dir {
                Ok(dir) => agent.run_job(&lease, &dir.path, cancel, vacate),
                Err(e) => (job::host_failed(id, format!("cannot create the job directory: {e}")), false),
            };
            // What lease-ahead is sized by: runs of jobs that take cpus, not a failure to start.
            if lease.spec.cpus > 0 && !matches!(report.run, RunReport::HostFailed { .. }) {
                lock(&agent.recent).add(started.elapsed());
            }
            // The result is ready before the cpu is free: a lease loop woken by the freed cpu
            // carries it when it asks for more; the reporter, woken last, sends it otherwise.
            lock(&agent.outbox).push(report);
            lock(&agent.running).remove(&id);
            agent.slot_freed.notify_all();
            agent.start_queued();
            agent.outbox_ready.notify_one();
            // Off the path to the result: an empty directory goes to the next job as it is, any
            // other is removed by the cleaner.
            if let Ok(dir) = dir {
                let reuse = match (lease.spec.vm_type, untouched) {
                    (VmType::Wasm, true) => Reuse::Untouched,
                    (VmType::Wasm, false) => Reuse::IfAsMade,
                    _ => Reuse::No,
                };
                agent.dirs.give_back(dir, reuse);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a job thread: {e}");
            lock(&self.running).remove(&id);
            self.slot_freed.notify_all();
        }
    }

    /// The results ready to send (at most 1000).
    fn take_outbox(&self) -> Vec<Report> {
        let mut out = lock(&self.outbox);
        let n = out.len().min(1000);
        out.drain(..n).collect()
    }

    /// Results a call did not deliver, to send first next time.
    fn put_back(&self, reports: Vec<Report>) {
        if !reports.is_empty() {
            lock(&self.outbox).splice(0..0, reports);
            self.outbox_ready.notify_one();
        }
    }

    /// The next batch of results for the reporter (those no lease call carried); `None` once the
    /// node is closing and all are sent.
    fn next_batch(&self) -> Option<Vec<Report>> {
        let mut out = lock(&self.outbox);
        loop {
            if !out.is_empty() {
                let n = out.len().min(1000);
                return Some(out.drain(..n).collect());
            }
            if self.closing.load(Ordering::Relaxed) {
                return None;
            }
            out = self.outbox_ready.wait_timeout(out, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Sends results in batches: whatever is ready goes in one call.
    fn report_loop(&self) {
        while let Some(batch) = self.next_batch() {
            let req = ReportRequest { reports: batch };
            let mut wait = Duration::from_millis(50);
            let mut resent = false;
            loop {
                let rejoins = self.rejoins.load(Ordering::SeqCst);
                match self.client().report(&req) {
                    Ok(resp) => {
                        for (l, why) in resp.refused {
                            tracing::warn!(job = l.job_id, epoch = l.epoch, "the pool refused a result: {why}");
                        }
                        break;
                    }
                    // The credential it went under was replaced: the node registered again
                    // (another thread saw the pool no longer knew it). Sent again, once, under
                    // the new one, so that the pool judges the results, not the credential.
                    Err(ClientError::Refused { status: 401, .. }) if !resent && self.rejoined_since(rejoins) => {
                        resent = true;
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

    /// Whether the node registered again since `rejoins`, waiting up to 5 s for a registration
    /// under way to finish.
    fn rejoined_since(&self, rejoins: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.rejoins.load(Ordering::SeqCst) == rejoins {
            if Instant::now() >= deadline || self.closing.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Renews the leases of the running and queued jobs, and hands back those queued too long.
    fn send_heartbeat(&self, draining: bool) {
        let leases = self.held_leases();
        let mut returned = std::mem::take(&mut *lock(&self.returning));
        returned.extend(self.take_queued(false));
        let peering = self.cache.peering.get();
        let sharing = peering.map(|p| p.sharing());
        let renew_peer = peering.is_some_and(|p| p.renew_due());
        let req = HeartbeatRequest { leases, draining, cache: Some(self.cache.stats()), returned, sharing, renew_peer };
        match self.client().heartbeat(&req) {
            Ok(resp) => {
                if let (Some(p), Some(id)) = (peering, &resp.peer_identity) {
                    p.renew(id);
                }
                self.drop_queued(&resp.revoked);
                let running = lock(&self.running);
                for l in resp.revoked {
                    if let Some(r) = running.get(&l) {
                        tracing::info!(job = l.job_id, "lease revoked; stopping the job");
                        r.cancel.store(true, Ordering::Relaxed);
                    }
                }
                let mut unstarted = Vec::new();
                for l in resp.vacate {
                    match running.get(&l) {
                        Some(r) if r.checkpointed => {
                            tracing::info!(job = l.job_id, "vacate: checkpointing the job to move it");
                            r.vacate.store(true, Ordering::Relaxed);
                        }
                        Some(_) => {}
                        // Queued here and not started: it goes back as it is.
                        None => unstarted.push(l),
                    }
                }
                // Locked after `running`, as everywhere.
                let back = self.drop_queued(&unstarted);
                drop(running);
                lock(&self.returning).extend(back);
            }
            Err(ClientError::Refused { status: 409 | 401, .. }) => self.fence(),
            Err(e) => {
                tracing::warn!("heartbeat: {e}");
                lock(&self.returning).extend(req.returned);
            }
        }
    }

    fn heartbeat_loop(&self, stop: &AtomicBool) {
        let mut last = Instant::now();
        let mut told = false;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            // Asked to stop: the pool hears it at once, places nothing more here, and ends the
            // lease call that waits for work, so the drain starts now, not when the call ends.
            let stopping = self.stop.load(Ordering::Relaxed);
            if last.elapsed() >= self.heartbeat || (stopping && !told) {
                told |= stopping;
                self.send_heartbeat(stopping);
                last = Instant::now();
            }
        }
    }
}
