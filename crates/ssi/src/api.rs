//! The home's HTTP API, which the nodes of its processes call. Every call carries the process's
//! own token; a token whose process has ended (or was killed, or lost with its node) is refused,
//! so a stray copy of a process cannot touch the files or spawn.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use vmgrid_proto::ssi::*;

use crate::fs::{Errno, Node, Payload};
use crate::{Home, ProcState};

type S = Arc<Home>;

/// The longest a long poll waits before answering "not yet".
const MAX_WAIT: Duration = Duration::from_secs(30);

pub fn router(home: Arc<Home>) -> Router {
    Router::new()
        .route("/ssi/v1/spawn", post(spawn))
        .route("/ssi/v1/wait", post(wait))
        .route("/ssi/v1/started", post(started))
        .route("/ssi/v1/exit", post(exit))
        .route("/ssi/v1/output", post(output))
        .route("/ssi/v1/signal", get(signal))
        .route("/ssi/v1/fs", get(fetch).put(store))
        .route("/ssi/v1/fsop", post(fsop))
        .layer(DefaultBodyLimit::max(1 << 30))
        .with_state(home)
}

/// The calling process, from its token.
struct Caller(u64);

impl FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, home: &S) -> Result<Caller, Response> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        match home.pid_of_token(token.trim()) {
            Some(pid) => Ok(Caller(pid)),
            None => Err((StatusCode::UNAUTHORIZED, "no live process holds this token").into_response()),
        }
    }
}

fn errno(e: Errno) -> Response {
    let mut r = (StatusCode::UNPROCESSABLE_ENTITY, crate::fs::describe(e)).into_response();
    r.headers_mut().insert(ERRNO_HEADER, HeaderValue::from(e));
    r
}

async fn spawn(State(home): State<S>, Caller(pid): Caller, Json(req): Json<SpawnRequest>) -> Response {
    let h = home.clone();
    match tokio::task::spawn_blocking(move || h.spawn(pid, req.argv)).await {
        Ok(Ok(child)) => Json(SpawnResponse { pid: child }).into_response(),
        Ok(Err(e)) => errno(e.errno),
        Err(_) => errno(crate::errno::IO),
    }
}

async fn wait(State(home): State<S>, Caller(pid): Caller, Json(req): Json<WaitRequest>) -> Response {
    let Ok(child) = u64::try_from(req.pid) else { return errno(crate::errno::CHILD) };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    loop {
        let notified = home.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match home.try_reap(pid, child) {
            Ok(Some(status)) => return Json(WaitResponse { status: Some(status) }).into_response(),
            Err(e) => return errno(e),
            Ok(None) if home.kill_requested(pid) => return errno(crate::errno::INTR),
            Ok(None) if tokio::time::Instant::now() >= deadline => {
                return Json(WaitResponse { status: None }).into_response();
            }
            Ok(None) => {}
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn started(State(home): State<S>, Caller(pid): Caller, Json(req): Json<StartedRequest>) -> StatusCode {
    home.started(pid, req.node);
    StatusCode::NO_CONTENT
}

async fn exit(State(home): State<S>, Caller(pid): Caller, Json(req): Json<ExitRequest>) -> StatusCode {
    if req.dropped > 0 {
        let note = format!("vmgrid ssi: process {pid}: {} bytes of output were dropped\n", req.dropped);
        let h = home.clone();
        let _ = tokio::task::spawn_blocking(move || h.output(pid, 2, note.as_bytes())).await;
    }
    let state = match req.reason {
        None => ProcState::Exited(req.status),
        Some(reason) => ProcState::Failed(req.status, reason),
    };
    // Ending may print to the console, which may block (a paused terminal): not on a worker.
    let _ = tokio::task::spawn_blocking(move || home.end(pid, state)).await;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct OutputQuery {
    fd: u32,
}

async fn output(State(home): State<S>, Caller(pid): Caller, Query(q): Query<OutputQuery>, body: Bytes) -> StatusCode {
    if q.fd != 1 && q.fd != 2 {
        return StatusCode::BAD_REQUEST;
    }
    // The console's stdout may block (a paused terminal): not on a worker thread.
    let _ = tokio::task::spawn_blocking(move || home.output(pid, q.fd, &body)).await;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct SignalQuery {
    wait_ms: u64,
}

async fn signal(State(home): State<S>, Caller(pid): Caller, Query(q): Query<SignalQuery>) -> Json<SignalResponse> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    loop {
        let notified = home.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let kill = home.kill_requested(pid);
        if kill || home.ended(pid) || tokio::time::Instant::now() >= deadline {
            return Json(SignalResponse { kill });
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

#[derive(Deserialize)]
struct PathQuery {
    path: String,
}

#[derive(Deserialize)]
struct LookupQuery {
    path: String,
    #[serde(default)]
    base: String,
    #[serde(default = "yes")]
    follow: bool,
    #[serde(default = "yes")]
    content: bool,
}

fn yes() -> bool {
    true
}

/// A lookup: what the path resolves to in [`PATH_HEADER`] and [`KIND_HEADER`]; the body is the
/// file (unless unchanged, 304), the directory's entries, or the link's target.
async fn fetch(State(home): State<S>, _c: Caller, Query(q): Query<LookupQuery>, headers: HeaderMap) -> Response {
    let have = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_string);
    let h = home.clone();
    let at = At { base: q.base, path: q.path };
    let r = tokio::task::spawn_blocking(move || h.root.lookup(&at, q.follow, q.content, have.as_deref())).await;
    let found = match r {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return errno(e),
        Err(_) => return errno(crate::errno::IO),
    };
    let (kind, mut r) = match (found.resolved.node, found.payload) {
        (Node::Missing, _) => ("none", StatusCode::NO_CONTENT.into_response()),
        (Node::Link(target), _) => ("link", target.into_response()),
        (_, Payload::Dir(entries)) => ("dir", Json(entries).into_response()),
        (_, Payload::File { bytes, version }) => {
            let mut r = bytes.into_response();
            if let Ok(v) = HeaderValue::from_str(&version) {
                r.headers_mut().insert(header::ETAG, v);
            }
            ("file", r)
        }
        (Node::Dir, Payload::None) => ("dir", StatusCode::NO_CONTENT.into_response()),
        (_, Payload::None) => ("file", StatusCode::NOT_MODIFIED.into_response()),
    };
    r.headers_mut().insert(KIND_HEADER, HeaderValue::from_static(kind));
    if let Ok(v) = HeaderValue::from_str(&encode_path(&found.resolved.path)) {
        r.headers_mut().insert(PATH_HEADER, v);
    }
    r
}

async fn store(State(home): State<S>, _c: Caller, Query(q): Query<PathQuery>, body: Bytes) -> Response {
    let h = home.clone();
    match tokio::task::spawn_blocking(move || h.root.store(&q.path, &body)).await {
        Ok(Ok(version)) => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            if let Ok(v) = HeaderValue::from_str(&version) {
                r.headers_mut().insert(header::ETAG, v);
            }
            r
        }
        Ok(Err(e)) => errno(e),
        Err(_) => errno(crate::errno::IO),
    }
}

/// A namespace change; the answer names what it touched, resolved.
async fn fsop(State(home): State<S>, _c: Caller, Json(req): Json<FsOpRequest>) -> Response {
    let h = home.clone();
    let one = |r: Result<String, Errno>| r.map(|path| FsOpResponse { path, to: None });
    let two = |r: Result<(String, String), Errno>| r.map(|(path, to)| FsOpResponse { path, to: Some(to) });
    let r = tokio::task::spawn_blocking(move || match &req {
        FsOpRequest::Create { at } => one(h.root.create_new(at)),
        FsOpRequest::Mkdir { at } => one(h.root.mkdir(at)),
        FsOpRequest::Rmdir { at } => one(h.root.rmdir(at)),
        FsOpRequest::Unlink { at } => one(h.root.unlink(at)),
        FsOpRequest::Symlink { at, target } => one(h.root.symlink(target, at)),
        FsOpRequest::Rename { at, to } => two(h.root.rename(at, to)),
        FsOpRequest::Link { at, to } => two(h.root.link(at, to)),
    })
    .await;
    match r {
        Ok(Ok(moved)) => Json(moved).into_response(),
        Ok(Err(e)) => errno(e),
        Err(_) => errno(crate::errno::IO),
    }
}

/// TLS connections for axum.
pub(crate) struct TlsListener(pub vmgrid_tls::Incoming);

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.next().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}
