//! The home of a single-system image: the deputy, as in MOSIX. It owns the process table (global
//! PIDs), the console's output and the one filesystem; the processes themselves run as pool jobs
//! on whatever nodes the matchmaker picks, and call back here (nodes connect outward only).
//!
//! A process is a wasm job whose spec carries [`vmgrid_proto::SsiSpec`]: this home's URL and a
//! token for that process alone. Its node validates files here on open and writes them back on
//! close (whole-file caching, close-to-open), sends its output, asks to spawn and wait, and
//! reports its exit. The pool tells the home what the node cannot: that a job failed to start or
//! was lost with its node.

pub mod api;
pub mod fs;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmgrid_client::Client;
use vmgrid_proto::{JobAction, JobSpec, JobState, JobView, Network, SsiSpec, SubmitRequest, VmType};

pub use fs::{Errno, Root, errno};

pub use vmgrid_proto::ssi::{STATUS_FAILED, STATUS_KILLED};

/// The pool job's name for process `pid` of program `prog`: `ssi-PID-PROG`, with whatever a job
/// name may not hold (the pool's rules: letters, digits, `-`, `_`, `.`) made `_`.
fn job_name(pid: u64, prog: &str) -> String {
    let prog: String = prog
        .trim_end_matches(".wasm")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .take(100)
        .collect();
    format!("ssi-{pid}-{prog}")
}

/// How long a process may run, at most (a pool job's `timeout_s`).
pub const PROCESS_TIMEOUT_S: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcState {
    /// Submitted; the matchmaker has not started it yet.
    Placing,
    Running,
    Exited(i32),
    /// Ended without exiting on its own, with the status its parent sees and why.
    Failed(i32, String),
    Killed,
}

impl ProcState {
    pub fn ended(&self) -> bool {
        !matches!(self, ProcState::Placing | ProcState::Running)
    }

    pub fn status(&self) -> Option<i32> {
        match self {
            ProcState::Exited(c) => Some(*c),
            ProcState::Failed(c, _) => Some(*c),
            ProcState::Killed => Some(STATUS_KILLED),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        match self {
            ProcState::Placing => "placing".into(),
            ProcState::Running => "running".into(),
            ProcState::Exited(c) => format!("exit({c})"),
            ProcState::Failed(..) => "failed".into(),
            ProcState::Killed => "killed".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u64,
    /// 0 for processes the console started.
    pub ppid: u64,
    pub argv: Vec<String>,
    /// Its environment: given by the console's `run KEY=VALUE …`, inherited by its children.
    pub env: BTreeMap<String, String>,
    pub job: Option<u64>,
    pub node: Option<String>,
    pub state: ProcState,
    pub spawned: Instant,
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
    /// Waited for by its parent (or shown by the console): it leaves the table.
    pub reaped: bool,
    kill: bool,
}

impl Proc {
    /// Time running, so far or in all.
    pub fn cpu_time(&self) -> Duration {
        match (self.started, self.ended) {
            (Some(s), Some(e)) => e.saturating_duration_since(s),
            (Some(s), None) => s.elapsed(),
            _ => Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Table {
    next_pid: u64,
    procs: HashMap<u64, Proc>,
    by_token: HashMap<String, u64>,
    /// Module blobs the pool has, by hash.
    uploaded: std::collections::HashSet<String>,
    closing: bool,
}

pub type OutputSink = Box<dyn Fn(u64, u32, &[u8]) + Send + Sync>;

pub struct HomeConfig {
    pub root: Root,
    /// Where the home listens; nodes must be able to reach it.
    pub listen: SocketAddr,
    /// Linear memory each process may use.
    pub process_memory_mb: u64,
    /// Receives each process's stdout (1) and stderr (2).
    pub output: OutputSink,
}

pub struct Home {
    pub root: Root,
    url: String,
    pool: Client,
    memory_mb: u64,
    output: OutputSink,
    table: Mutex<Table>,
    /// Wakes console threads waiting on the table.
    changed: Condvar,
    /// Wakes API handlers waiting on the table.
    notify: tokio::sync::Notify,
    runtime: tokio::runtime::Runtime,
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the pool would not open a console: {0}")]
    Pool(vmgrid_client::ClientError),
    #[error("cannot serve TLS: {0}")]
    Tls(String),
    #[error("cannot start the home's runtime: {0}")]
    Runtime(std::io::Error),
}

/// Why a spawn failed: the errno a process gets, and a sentence for the console.
#[derive(Debug, Clone)]
pub struct SpawnError {
    pub errno: Errno,
    pub message: String,
}

impl Home {
    /// Starts the home's API on `config.listen` and opens a console with the pool: the pool gives
    /// the home its URL (the address it connected from, with the port it listens on), its
    /// credential, with which it submits its processes, and its TLS certificate (signed by the
    /// pool's CA, which the nodes trust).
    pub fn start(config: HomeConfig, pool: Client) -> Result<Arc<Home>, HomeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmgrid-ssi-home")
            .enable_all()
            .build()
            .map_err(HomeError::Runtime)?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(config.listen))
            .map_err(|source| HomeError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| HomeError::Listen { addr: config.listen, source })?;
        let console = pool.open_console(addr.port()).map_err(HomeError::Pool)?;
        let tls = match (&console.cert_pem, &console.key_pem) {
            (Some(cert_pem), Some(key_pem)) => {
                let identity = vmgrid_tls::Identity { cert_pem: cert_pem.clone(), key_pem: key_pem.clone() };
                Some(vmgrid_tls::server_config(&identity).map_err(|e| HomeError::Tls(e.to_string()))?)
            }
            _ => None,
        };
        let pool = pool.with_token(&console.credential);
        let home = Arc::new(Home {
            root: config.root,
            url: console.home.clone(),
            pool,
            memory_mb: config.process_memory_mb,
            output: config.output,
            table: Mutex::new(Table { next_pid: 1, ..Default::default() }),
            changed: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            runtime,
        });
        let app = api::router(home.clone());
        home.runtime.spawn(async move {
            let served = match tls {
                Some(config) => match vmgrid_tls::Incoming::new(listener, config) {
                    Ok(incoming) => axum::serve(api::TlsListener(incoming), app).await,
                    Err(e) => Err(e),
                },
                None => axum::serve(listener, app).await,
            };
            if let Err(e) = served {
                tracing::error!("the SSI home's API stopped: {e}");
            }
        });
        Ok(home)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &Client {
        &self.pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    /// The live pid that holds `token`.
    pub(crate) fn pid_of_token(&self, token: &str) -> Option<u64> {
        let t = self.lock();
        let pid = *t.by_token.get(token)?;
        t.procs.get(&pid).filter(|p| !p.state.ended()).map(|p| p.pid)
    }

    /// Starts a process from `argv` (its first element is the module's path in the SSI
    /// filesystem) as a child of `ppid` (0: the console), with its parent's environment.
    /// Returns its PID.
    pub fn spawn(self: &Arc<Self>, ppid: u64, argv: Vec<String>) -> Result<u64, SpawnError> {
        let env = self.lock().procs.get(&ppid).map(|p| p.env.clone()).unwrap_or_default();
        self.spawn_with_env(ppid, argv, env)
    }

    /// Starts a process as [`Home::spawn`] does, with the environment `env`.
    pub fn spawn_with_env(
        self: &Arc<Self>,
        ppid: u64,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
    ) -> Result<u64, SpawnError> {
        let err = |errno: Errno, message: String| SpawnError { errno, message };
        let prog = argv.first().cloned().unwrap_or_default();
        let (name, image) = self.program(&prog)?;
        let mut secret = [0u8; 24];
        getrandom::fill(&mut secret).expect("the kernel's random source is readable");
        let token = hex::encode(secret);
        let pid = self.enter(ppid, &argv, &env, &token)?;
        let spec = self.process_spec(pid, &name, image, (argv, env), token);
        let job = match self.pool.submit(&SubmitRequest { spec, count: 1 }) {
            Ok(r) if r.ids.len() == 1 => r.ids[0],
            Ok(_) => {
                self.end(pid, ProcState::Failed(STATUS_FAILED, "the pool did not take the process".into()));
                return Err(err(errno::IO, "the pool did not take the process".into()));
            }
            Err(e) => {
                self.end(pid, ProcState::Failed(STATUS_FAILED, format!("the pool refused the process: {e}")));
                return Err(err(errno::IO, format!("the pool refused the process: {e}")));
            }
        };
        let killed = {
            let mut t = self.lock();
            let p = t.procs.get_mut(&pid).expect("inserted above");
            p.job = Some(job);
            p.kill
        };
        if killed {
            let _ = self.pool.action(JobAction::Rm, &[job]);
        }
        let home = self.clone();
        let watcher =
            std::thread::Builder::new().name(format!("vmgrid-ssi-watch-{pid}")).spawn(move || home.watch(pid, job));
        if let Err(e) = watcher {
            tracing::error!("cannot watch process {pid}: {e}");
        }
        Ok(pid)
    }

    /// The program at SSI path `prog`, checked to be a preview-1 module and in the pool (uploaded
    /// once per hash): its file name and blob.
    fn program(&self, prog: &str) -> Result<(String, vmgrid_proto::FileRef), SpawnError> {
        let err = |errno: Errno, message: String| SpawnError { errno, message };
        let path = Root::normalize(prog).map_err(|e| err(e, format!("{prog}: {}", fs::describe(e))))?;
        let bytes = match self.root.fetch(&path, None) {
            Ok(fs::Fetch::File { bytes, .. }) => bytes,
            Ok(_) => return Err(err(errno::ISDIR, format!("{prog}: is a directory"))),
            Err(e) => return Err(err(e, format!("{prog}: {}", fs::describe(e)))),
        };
        fs::check_module(&bytes).map_err(|why| err(errno::NOEXEC, format!("{prog}: {why}")))?;
        let name = path.rsplit('/').next().unwrap_or("main.wasm").to_string();
        let hash = blake3_hex(&bytes);
        let image = if self.lock().uploaded.contains(&hash) {
            vmgrid_proto::FileRef { path: name.clone(), blob: hash, size: bytes.len() as u64, inline: None }
        } else {
            let f = self
                .pool
                .upload_bytes(&bytes, &name)
                .map_err(|e| err(errno::IO, format!("cannot send {prog} to the pool: {e}")))?;
            self.lock().uploaded.insert(f.blob.clone());
            f
        };
        Ok((name, image))
    }

    /// A new entry in the process table, holding `token`; its PID.
    fn enter(
        &self,
        ppid: u64,
        argv: &[String],
        env: &BTreeMap<String, String>,
        token: &str,
    ) -> Result<u64, SpawnError> {
        {
            let mut t = self.lock();
            if t.closing {
                return Err(SpawnError { errno: errno::INTR, message: "the console is closing".into() });
            }
            let pid = t.next_pid;
            t.next_pid += 1;
            t.by_token.insert(token.to_string(), pid);
            t.procs.insert(
                pid,
                Proc {
                    pid,
                    ppid,
                    argv: argv.to_vec(),
                    env: env.clone(),
                    job: None,
                    node: None,
                    state: ProcState::Placing,
                    spawned: Instant::now(),
                    started: None,
                    ended: None,
                    reaped: false,
                    kill: false,
                },
            );
            Ok(pid)
        }
    }

    /// The pool job of process `pid`: time-shared (no cpu slot), never rerun, with its home.
    fn process_spec(
        &self,
        pid: u64,
        name: &str,
        image: vmgrid_proto::FileRef,
        (argv, env): (Vec<String>, BTreeMap<String, String>),
        token: String,
    ) -> JobSpec {
        JobSpec {
            name: job_name(pid, name),
            vm_type: VmType::Wasm,
            image: Some(image),
            args: argv,
            env,
            kernel: None,
            initrd: None,
            append: None,
            network: Network::None,
            cpus: 0,
            memory_mb: self.memory_mb,
            timeout_s: PROCESS_TIMEOUT_S,
            disk_mb: 1 << 20,
            inputs: vec![],
            outputs: vec![],
            requirements: None,
            rank: None,
            max_retries: 0,
            priority: 0,
            checkpoint_s: None,
            replicas: None,
            quorum: None,
            deterministic: false,
            ssi: Some(SsiSpec { home: self.url.clone(), token, pid }),
            group: None,
        }
    }

    /// Follows the process's job in the pool until it ends there; tells the table what only the
    /// pool knows (a lost node, a module that would not start).
    /// An unreachable pool (a coordinator restarting) ends nothing: the process may well be
    /// running, and its node tells the home itself when it exits.
    fn watch(&self, pid: u64, job: u64) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.pool.wait(job, Duration::from_secs(30)) {
                Ok(v) if v.state.is_final() || v.state == JobState::Held => {
                    self.job_ended(pid, &v);
                    return;
                }
                Ok(_) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(pid, job, "cannot follow the process in the pool: {e}; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            if self.lock().closing {
                return;
            }
        }
    }

    fn job_ended(&self, pid: u64, v: &JobView) {
        let state = match v.state {
            JobState::Completed => ProcState::Exited(v.exit_code.unwrap_or(STATUS_FAILED)),
            JobState::Removed => ProcState::Killed,
            _ => ProcState::Failed(
                STATUS_FAILED,
                v.reason.clone().unwrap_or_else(|| "the process ended without a status".into()),
            ),
        };
        self.end(pid, state);
        if v.state == JobState::Held {
            // Nothing will release it: the process is over. Take it out of the queue.
            let _ = self.pool.action(JobAction::Rm, &[v.id]);
        }
    }

    /// Records the end of a process, once: the first report of it wins.
    pub(crate) fn end(&self, pid: u64, state: ProcState) {
        let notice = {
            let mut t = self.lock();
            let Some(p) = t.procs.get_mut(&pid) else { return };
            if p.state.ended() {
                return;
            }
            p.state = state;
            p.ended = Some(Instant::now());
            if p.started.is_none() {
                p.started = p.ended;
            }
            let ppid = p.ppid;
            let p = p.clone();
            // Orphans are reaped, as init reaps them: the ended children of the process that
            // ended, and this process if its parent is gone.
            let parent_gone = ppid != 0 && t.procs.get(&ppid).is_none_or(|q| q.state.ended());
            for q in t.procs.values_mut() {
                if (q.ppid == pid && q.state.ended()) || (q.pid == pid && parent_gone) {
                    q.reaped = true;
                }
            }
            // The console is the machine's console: an abnormal end of a process the console did
            // not start itself is told there, as a kernel would log it.
            match &p.state {
                ProcState::Failed(status, why) if ppid != 0 => Some(format!(
                    "vmgrid ssi: process {pid} ({}), child of {}, failed on {} (status {status}): {why}\n",
                    p.argv.join(" "),
                    p.ppid,
                    p.node.as_deref().unwrap_or("no node"),
                )),
                _ => None,
            }
        };
        if let Some(n) = notice {
            (self.output)(pid, 2, n.as_bytes());
        }
        self.wake();
    }

    pub(crate) fn started(&self, pid: u64, node: String) {
        {
            let mut t = self.lock();
            let Some(p) = t.procs.get_mut(&pid) else { return };
            p.node = Some(node);
            if p.state == ProcState::Placing {
                p.state = ProcState::Running;
                p.started = Some(Instant::now());
            }
        }
        self.wake();
    }

    pub(crate) fn output(&self, pid: u64, fd: u32, bytes: &[u8]) {
        (self.output)(pid, fd, bytes);
    }

    /// Stops a process wherever it runs. Its parent sees [`STATUS_KILLED`].
    pub fn kill(&self, pid: u64) -> Result<(), String> {
        let job = {
            let mut t = self.lock();
            let Some(p) = t.procs.get_mut(&pid) else { return Err(format!("{pid}: no such process")) };
            if p.state.ended() {
                return Err(format!("{pid}: the process has already ended ({})", p.state.name()));
            }
            p.kill = true;
            p.job
        };
        self.end(pid, ProcState::Killed);
        if let Some(job) = job {
            self.pool
                .action(JobAction::Rm, &[job])
                .map_err(|e| format!("cannot remove job {job} from the pool: {e}"))?;
        }
        Ok(())
    }

    /// Whether `kill` was asked for this process. (A process that simply ended is not killed:
    /// its node may still be reporting it to the pool.)
    pub(crate) fn kill_requested(&self, pid: u64) -> bool {
        self.lock().procs.get(&pid).is_none_or(|p| p.kill)
    }

    pub(crate) fn ended(&self, pid: u64) -> bool {
        self.lock().procs.get(&pid).is_none_or(|p| p.state.ended())
    }

    /// The child `pid` of `ppid`, once it has ended; reaps it. `Err(CHILD)` if there is no such
    /// unreaped child; `Ok(None)` if it is still running.
    pub(crate) fn try_reap(&self, ppid: u64, pid: u64) -> Result<Option<i32>, Errno> {
        let mut t = self.lock();
        let Some(p) = t.procs.get_mut(&pid).filter(|p| p.ppid == ppid && !p.reaped) else { return Err(errno::CHILD) };
        match p.state.status() {
            Some(s) => {
                p.reaped = true;
                Ok(Some(s))
            }
            None => Ok(None),
        }
    }

    /// Blocks until process `pid` has ended (the console's wait); returns its final state.
    pub fn wait_ended(&self, pid: u64, timeout: Option<Duration>) -> Option<ProcState> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut t = self.lock();
        loop {
            let state = t.procs.get(&pid)?.state.clone();
            if state.ended() {
                return Some(state);
            }
            let wait = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(1),
            };
            t = self.changed.wait_timeout(t, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Marks a process of the console as reaped.
    pub fn reap(&self, pid: u64) {
        if let Some(p) = self.lock().procs.get_mut(&pid) {
            p.reaped = true;
        }
    }

    /// The process table: every process not yet reaped, or with `all`, every one.
    pub fn ps(&self, all: bool) -> Vec<Proc> {
        let t = self.lock();
        let mut v: Vec<Proc> = t.procs.values().filter(|p| all || !p.reaped).cloned().collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    pub fn process(&self, pid: u64) -> Option<Proc> {
        self.lock().procs.get(&pid).cloned()
    }

    /// Ends the session: every process still alive is killed, so none is left running without
    /// its home.
    pub fn shutdown(&self) -> usize {
        let live: Vec<u64> = {
            let mut t = self.lock();
            t.closing = true;
            t.procs.values().filter(|p| !p.state.ended()).map(|p| p.pid).collect()
        };
        for pid in &live {
            let _ = self.kill(*pid);
        }
        live.len()
    }

    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
