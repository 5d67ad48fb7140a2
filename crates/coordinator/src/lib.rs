//! The coordinator: the pool's durable job queue, its node registry, its blob store and its
//! HTTP API (`/v1/…`, `/metrics`). The job state machine is a pure [`engine`]; `core` is the
//! runtime around it (the lock, the store's writer, durability and wake-ups), `store` keeps the
//! state (SQLite, or PostgreSQL shared by an active coordinator and its standbys: `standby`),
//! and `api` is the HTTP glue. Matching is delegated to the pure
//! `vmgrid-scheduler`.

mod api;
mod blobs;
mod core;
pub mod engine;
mod files;
mod history;
mod metrics;
mod overlay;
mod parked;
mod serve;
mod standby;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use engine::{DEFAULT_HALF_LIFE_MS, Limits, Timing};
use engine::{Engine, Principal, hash_token};
pub use serve::{CA_CERT_FILE, Tls};

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub timing: Timing,
    pub limits: Limits,
    pub tls: Tls,
    /// The largest blob one upload may be.
    pub max_blob_bytes: u64,
    /// Fair share: users' usage decays by half in this long.
    pub usage_half_life_ms: u64,
    /// `None`: the embedded SQLite store in the data dir; `Some(url)`: PostgreSQL at `url`, as
    /// the active coordinator of that database (it waits, as a standby, until it is).
    pub store_url: Option<String>,
    /// The URL other machines reach this coordinator at, which standbys on the same PostgreSQL
    /// store tell their callers (default: the URL it listens on).
    pub advertise_url: Option<String>,
}

pub const POOL_TOKEN_FILE: &str = "pool.token";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const CLIENT_CONFIG_FILE: &str = "client.toml";
/// A random id of the data dir, by which the coordinators of one PostgreSQL store check that
/// they share it.
pub const POOL_ID_FILE: &str = "pool.id";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use the data directory {0}: {1}")]
    DataDir(PathBuf, String),
    #[error("cannot open the job store {0}: {1}")]
    Store(PathBuf, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, String),
}

/// A running coordinator.
pub struct Running {
    pub addr: SocketAddr,
    pub url: String,
    pub data_dir: PathBuf,
    /// The pool's CA certificate (PEM), when the pool has its own.
    pub ca_pem: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops serving and waits for the server thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Blocks until the server ends (it ends on SIGINT/SIGTERM when started with signals).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn read_or_create_token(dir: &Path, file: &str) -> Result<String, StartError> {
    let path = dir.join(file);
    if path.exists() {
        let t = files::read_private(&path).map_err(|e| StartError::DataDir(path.clone(), e.to_string()))?;
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let t = new_token();
    files::write_private(&path, &format!("{t}\n")).map_err(|e| StartError::DataDir(path.clone(), e.to_string()))?;
    Ok(t)
}

pub use files::write_private;

/// A new secret: 24 random bytes from the kernel, in hex.
pub fn new_token() -> String {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).expect("the kernel's random source is readable");
    hex::encode(b)
}

/// The SQLite store in the data dir, or PostgreSQL once this coordinator's store holds the
/// database's active lock: a standby answers calls on `listener` with where the active one is
/// until then ([`standby`]). A watchdog then stops this process at once if the store's session
/// might have lost the lock (two coordinators never write one pool). Returns the listener to serve
/// on (a standby listens again on the same address).
fn open_store(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    url: &str,
) -> Result<(Box<dyn store::Store>, PathBuf, tokio::net::TcpListener), StartError> {
    let Some(store_url) = &config.store_url else {
        let db_path = config.data_dir.join("pool.sqlite");
        let db = store::sqlite::SqliteStore::open(&db_path)
            .map_err(|e| StartError::Store(db_path.clone(), e.to_string()))?;
        return Ok((Box::new(db), db_path, listener));
    };
    let shown = PathBuf::from(store::postgres::redact(store_url));
    let serr = |e: store::StoreError| StartError::Store(shown.clone(), e.0);
    let data_id = read_or_create_token(&config.data_dir, POOL_ID_FILE)?;
    let (mut db, listener) = standby::wait_until_active(runtime, store_url, &data_id, listener, tls).map_err(serr)?;
    let pid = db.backend_pid().map_err(serr)?;
    store::postgres::watch_lock(store_url, pid, standby::WATCH_EVERY, |why| {
        eprintln!(
            "vmgrid: this coordinator may no longer be the active one on its PostgreSQL store ({why}): stopping at once"
        );
        std::process::exit(3);
    })
    .map_err(serr)?;
    db.set_active(config.advertise_url.as_deref().unwrap_or(url), &data_id).map_err(serr)?;
    tracing::info!(store = %shown.display(), "active coordinator on PostgreSQL");
    Ok((Box::new(db), shown, listener))
}

/// Starts the coordinator on its own thread and runtime; returns once it is listening. On a
/// PostgreSQL store another coordinator is active on, it returns once this one has taken over.
pub fn start(config: Config, handle_signals: bool) -> Result<Running, StartError> {
    let dir = config.data_dir.clone();
    let data_err = |e: &dyn std::fmt::Display| StartError::DataDir(dir.clone(), e.to_string());
    files::private_dir(&dir).map_err(|e| data_err(&e))?;
    let transport = serve::transport(&config.tls, &dir, config.listen).map_err(|e| data_err(&e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vmgrid-coordinator")
        .enable_all()
        .build()
        .map_err(|e| StartError::Listen(config.listen, e.to_string()))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .map_err(|e| StartError::Listen(config.listen, e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| StartError::Listen(config.listen, e.to_string()))?;
    let url = format!("{}://{}", transport.scheme(), client_addr(addr));
    let (mut db, db_path, listener) = open_store(&config, &runtime, listener, transport.server.clone(), &url)?;
    let loaded = db.load().map_err(|e| StartError::Store(db_path.clone(), e.to_string()))?;
    let pool_token = read_or_create_token(&dir, POOL_TOKEN_FILE)?;
    let admin_token = read_or_create_token(&dir, ADMIN_TOKEN_FILE)?;
    let blobs = blobs::Blobs::new(dir.join("blobs")).map_err(|e| data_err(&e))?;
    let now = vmgrid_proto::now_ms();
    let mut engine = Engine::load(loaded, config.timing, now);
    engine.set_limits(config.limits);
    engine.set_usage_half_life(config.usage_half_life_ms);
    // The token files are the source of truth for the two built-in tokens.
    engine.ensure_token(hash_token(&pool_token), Principal::Pool, now);
    engine.ensure_token(hash_token(&admin_token), Principal::Admin("admin".into()), now);
    let ca_pem = transport.ca.as_ref().map(|c| c.cert_pem().to_string());
    let shared = Arc::new(core::Shared::new(engine, store::Writer::start(db), blobs, transport, config.max_blob_bytes));
    // What loading changed (jobs requeued because their node is gone) is queued like any call's.
    let ((), loaded) = shared.call(|_| ());
    write_client_config(&dir, &url, &admin_token, ca_pem.as_deref()).map_err(|e| data_err(&e))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("vmgrid-coordinator-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                let _ = shared.finish(loaded).await;
                let ticker = tokio::spawn(tick_loop(shared.clone()));
                let collector = tokio::spawn(blobs::collect_loop(shared.clone()));
                // The overlay's reflector, on the API's port number; without it nodes relay.
                let reflector = match tokio::net::UdpSocket::bind(addr).await {
                    Ok(sock) => Some(tokio::spawn(overlay::reflect(sock, shared.clone()))),
                    Err(e) => {
                        tracing::warn!(
                            "no overlay reflector on udp {addr}: {e}; grid VMs on different nodes will relay"
                        );
                        None
                    }
                };
                serve_until_stopped(shared, listener, rx, handle_signals).await;
                ticker.abort();
                collector.abort();
                if let Some(r) = reflector {
                    r.abort();
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(|e| StartError::Listen(config.listen, e.to_string()))?;
    tracing::info!(%url, data_dir = %dir.display(), "coordinator listening");
    Ok(Running { addr, url, data_dir: dir, ca_pem, shutdown: Some(tx), thread: Some(thread) })
}

/// The address clients are told: a wildcard listen address is reached on loopback from here.
fn client_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// `client.toml`: the pool's URL, the admin token and the CA that clients trust.
fn write_client_config(dir: &Path, url: &str, token: &str, ca_pem: Option<&str>) -> std::io::Result<()> {
    let mut text = format!(
        "# Written by the vmgrid coordinator: the pool's URL, its admin token and CA.\npool = \"{url}\"\ntoken = \"{token}\"\n"
    );
    if let Some(ca) = ca_pem {
        text.push_str(&format!("ca = \"\"\"\n{}\"\"\"\n", ca.trim_end_matches('\n').to_string() + "\n"));
    }
    files::write_private(&dir.join(CLIENT_CONFIG_FILE), &text)
}

/// Serves the API on `listener` (TLS or plain) until told to stop, or on a signal.
async fn serve_until_stopped(
    shared: Arc<core::Shared>,
    listener: tokio::net::TcpListener,
    rx: tokio::sync::oneshot::Receiver<()>,
    handle_signals: bool,
) {
    let streams = shared.streams.clone();
    let parked = shared.clone();
    let shutdown = async move {
        if handle_signals {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = rx => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        } else {
            let _ = rx.await;
        }
        // The dashboards' event streams never end by themselves: end them, or the graceful
        // shutdown waits for them. Nor do lease calls waiting for work, before their wait is up.
        streams.close();
        parked.parked.close();
    };
    let tls = shared.server_tls();
    serve_app(api::router(shared), listener, tls, shutdown).await;
}

/// Serves `app` on `listener`, over TLS when given a configuration, until `shutdown` resolves.
async fn serve_app(
    app: axum::Router,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = app.into_make_service_with_connect_info::<serve::Peer>();
    let served = match tls {
        Some(config) => match vmgrid_tls::Incoming::new(listener, config) {
            Ok(incoming) => axum::serve(serve::TlsListener(incoming), app).with_graceful_shutdown(shutdown).await,
            Err(e) => Err(e),
        },
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    };
    if let Err(e) = served {
        tracing::error!("the API server failed: {e}");
    }
}

/// Expires leases and nodes, and wakes whoever may care.
async fn tick_loop(shared: Arc<core::Shared>) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        every.tick().await;
        let now = vmgrid_proto::now_ms();
        let (dirty, pending) = shared.call(|e| {
            e.tick(now);
            e.sample_history(now);
            e.needs_pass()
        });
        // A change no call has scheduled a pass for yet (a node heard from again after it was
        // silent; passes that did not settle): a parked call runs one, rather than the change
        // waiting for the next call to end its wait for work.
        if dirty {
            shared.work.notify_one();
        }
        let _ = shared.finish(pending).await;
    }
}
