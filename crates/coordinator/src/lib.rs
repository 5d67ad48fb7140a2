//! The coordinator: the pool's durable job queue, its node registry, its blob store and its
//! HTTP API (`/v1/…`, `/metrics`). The job state machine is a pure [`engine`]; `core` is the
//! runtime around it (the lock, the store's writer, durability and wake-ups), `store` keeps the
//! state (SQLite), and `api` is the HTTP glue. Matching is delegated to the pure
//! `vmgrid-scheduler`.

mod api;
mod blobs;
mod core;
pub mod engine;
mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use engine::Timing;
use engine::{Engine, Principal, hash_token};
use store::Store;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub timing: Timing,
}

pub const POOL_TOKEN_FILE: &str = "pool.token";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const CLIENT_CONFIG_FILE: &str = "client.toml";

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
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let t = new_token();
            write_private(&path, &format!("{t}\n")).map_err(|e| StartError::DataDir(path.clone(), e.to_string()))?;
            Ok(t)
        }
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        std::io::Write::write_all(&mut f, contents.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

/// A new secret: 24 random bytes from the kernel, in hex.
pub fn new_token() -> String {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).expect("the kernel's random source is readable");
    hex::encode(b)
}

/// Starts the coordinator on its own thread and runtime; returns once it is listening.
pub fn start(config: Config, handle_signals: bool) -> Result<Running, StartError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    let db_path = dir.join("pool.sqlite");
    let mut db =
        store::sqlite::SqliteStore::open(&db_path).map_err(|e| StartError::Store(db_path.clone(), e.to_string()))?;
    let loaded = db.load().map_err(|e| StartError::Store(db_path.clone(), e.to_string()))?;
    let pool_token = read_or_create_token(&dir, POOL_TOKEN_FILE)?;
    let admin_token = read_or_create_token(&dir, ADMIN_TOKEN_FILE)?;
    let blobs = blobs::Blobs::new(dir.join("blobs")).map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;
    let mut engine = Engine::load(loaded, config.timing, vmgrid_proto::now_ms());
    // The token files are the source of truth for the two built-in tokens.
    engine.ensure_token(hash_token(&pool_token), Principal::Pool);
    engine.ensure_token(hash_token(&admin_token), Principal::Admin("admin".into()));
    let shared = Arc::new(core::Shared::new(engine, store::Writer::start(Box::new(db)), blobs));
    // What loading changed (jobs requeued because their node is gone) is queued like any call's.
    let ((), loaded) = shared.call(|_| ());

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
    let url = format!("http://{addr}");
    write_private(
        &dir.join(CLIENT_CONFIG_FILE),
        &format!("# Written by the vmgrid coordinator: the pool's URL and its admin token.\npool = \"{url}\"\ntoken = \"{admin_token}\"\n"),
    )
    .map_err(|e| StartError::DataDir(dir.clone(), e.to_string()))?;

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(shared.clone());
    let thread = std::thread::Builder::new()
        .name("vmgrid-coordinator-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                shared.finish(loaded).await;
                let ticker = tokio::spawn(tick_loop(shared.clone()));
                let shutdown = async move {
                    if handle_signals {
                        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("SIGTERM handler");
                        tokio::select! {
                            _ = rx => {}
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    } else {
                        let _ = rx.await;
                    }
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                    tracing::error!("the API server failed: {e}");
                }
                ticker.abort();
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(|e| StartError::Listen(config.listen, e.to_string()))?;
    tracing::info!(%url, data_dir = %dir.display(), "coordinator listening");
    Ok(Running { addr, url, data_dir: dir, shutdown: Some(tx), thread: Some(thread) })
}

/// Expires leases and nodes, and wakes whoever may care.
async fn tick_loop(shared: Arc<core::Shared>) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        every.tick().await;
        let ((), pending) = shared.call(|e| e.tick(vmgrid_proto::now_ms()));
        shared.finish(pending).await;
    }
}
