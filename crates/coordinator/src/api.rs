//! The HTTP API: one handler per call, each checking its caller's role first. State changes are
//! made under the state lock, then the handler waits for them to be durable before it answers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State as AxState};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use vmgrid_proto::*;

use crate::state::{ApiError, Principal, State};
use crate::{Shared, metrics, store};

type S = Arc<Shared>;

pub fn router(shared: S) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/actions", post(actions))
        .route("/v1/jobs/{id}", get(job_result))
        .route("/v1/jobs/{id}/wait", get(wait_job))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/register", post(register))
        .route("/v1/nodes/lease", post(lease))
        .route("/v1/nodes/heartbeat", post(heartbeat))
        .route("/v1/nodes/report", post(report))
        .route("/v1/nodes/deregister", post(deregister))
        .route("/v1/blobs/{hash}", get(get_blob).head(head_blob).put(put_blob))
        .route("/v1/tokens", post(add_token))
        .route("/metrics", get(get_metrics))
        .fallback(|| async { Error(StatusCode::NOT_FOUND, "no such API call; see `vmgrid --help`".into()) })
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(shared)
}

/// An error reply: a status and a sentence, as JSON.
pub struct Error(StatusCode, String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.0, Json(vmgrid_proto::ApiError { error: self.1 })).into_response()
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        };
        Error(code, e.to_string())
    }
}

type Result<T> = std::result::Result<T, Error>;

/// The caller, from its bearer token. Every call but the fallback needs one.
pub struct Auth(Principal);

impl FromRequestParts<S> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, shared: &S) -> Result<Self> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Error(StatusCode::UNAUTHORIZED, "missing `Authorization: Bearer <token>`".into()))?;
        let p = shared.lock().authenticate(token.trim()).cloned();
        p.map(Auth).ok_or_else(|| Error(StatusCode::UNAUTHORIZED, "the token is not valid for this pool".into()))
    }
}

fn forbidden(p: &Principal, what: &str) -> Error {
    Error(
        StatusCode::FORBIDDEN,
        format!(
            "a {} token cannot {what}",
            match p {
                Principal::Pool => "pool",
                Principal::Node(_) => "node",
                Principal::User(_) => "user",
                Principal::Admin(_) => "admin",
            }
        ),
    )
}

fn user(p: &Principal, what: &str) -> Result<()> {
    match p {
        Principal::User(_) | Principal::Admin(_) => Ok(()),
        _ => Err(forbidden(p, what)),
    }
}

fn node(p: &Principal) -> Result<&str> {
    match p {
        Principal::Node(n) => Ok(n),
        _ => Err(forbidden(p, "act as a node; nodes register with the pool token first")),
    }
}

/// JSON bodies whose errors are 400s with a sentence.
pub struct Body_<T>(T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body_<T> {
    type Rejection = Error;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body_(v)),
            Err(e) => Err(Error(StatusCode::BAD_REQUEST, format!("bad request body: {}", e.body_text()))),
        }
    }
}

async fn durable(shared: &S, ticket: u64) {
    store::durable(shared.committed.clone(), ticket).await;
}

async fn submit(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<SubmitRequest>,
) -> Result<Json<SubmitResponse>> {
    user(&p, "submit jobs")?;
    for f in req.spec.image.iter().chain(&req.spec.kernel).chain(&req.spec.initrd).chain(&req.spec.inputs) {
        if !shared.blobs.has(&f.blob) {
            return Err(Error(
                StatusCode::BAD_REQUEST,
                format!("file `{}` (blob {}) has not been uploaded", f.path, f.blob),
            ));
        }
    }
    let (ids, ticket) = shared.lock().submit(p.owner(), req.spec, req.count, now_ms())?;
    durable(&shared, ticket).await;
    shared.work.notify_waiters();
    Ok(Json(SubmitResponse { ids }))
}

async fn list_jobs(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<JobView>>> {
    user(&p, "list jobs")?;
    let s = shared.lock();
    Ok(Json(s.jobs.values().filter(|j| State::may_see(&p, j)).map(|j| s.view(j)).collect()))
}

fn result_of(s: &State, p: &Principal, id: u64) -> Result<JobResult> {
    let j = s.jobs.get(&id).ok_or_else(|| Error(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    if !State::may_see(p, j) {
        return Err(Error(StatusCode::FORBIDDEN, format!("job {id} belongs to {}", j.owner)));
    }
    let r = j.result.as_deref().cloned().unwrap_or_default();
    Ok(JobResult {
        job: s.view(j),
        stdout: r.stdout,
        stderr: r.stderr,
        stdout_dropped: r.stdout_dropped,
        stderr_dropped: r.stderr_dropped,
        outputs: r.outputs,
    })
}

async fn job_result(AxState(shared): AxState<S>, Auth(p): Auth, Path(id): Path<u64>) -> Result<Json<JobResult>> {
    user(&p, "read jobs")?;
    let (r, ticket) = {
        let s = shared.lock();
        (result_of(&s, &p, id)?, s.writer.last_ticket())
    };
    // Show only what is on disk: wait for any change not yet committed.
    durable(&shared, ticket).await;
    Ok(Json(r))
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(default)]
    timeout_ms: u64,
}

/// Answers when the job is completed, removed or held, or when the timeout passes.
async fn wait_job(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Path(id): Path<u64>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<JobView>> {
    user(&p, "wait for jobs")?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.timeout_ms.min(600_000));
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let answer = {
            let s = shared.lock();
            let r = result_of(&s, &p, id)?;
            let done =
                r.job.state.is_final() || r.job.state == JobState::Held || tokio::time::Instant::now() >= deadline;
            done.then(|| (r.job, s.writer.last_ticket()))
        };
        if let Some((job, ticket)) = answer {
            durable(&shared, ticket).await;
            return Ok(Json(job));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn actions(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<ActionRequest>,
) -> Result<Json<ActionResponse>> {
    user(&p, "manage jobs")?;
    let (resp, ticket) = shared.lock().action(&p, req.action, &req.ids, now_ms());
    durable(&shared, ticket).await;
    shared.work.notify_waiters();
    shared.changed.notify_waiters();
    Ok(Json(resp))
}

async fn list_nodes(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<NodeView>>> {
    user(&p, "list nodes")?;
    Ok(Json(shared.lock().node_views()))
}

async fn register(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<RegisterRequest>,
) -> Result<Json<RegisterResponse>> {
    if !matches!(p, Principal::Pool | Principal::Admin(_)) {
        return Err(forbidden(&p, "register nodes; use the pool token"));
    }
    let ad = req.ad.clone();
    if ad.name.is_empty()
        || ad.name.len() > 128
        || !ad.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error(StatusCode::BAD_REQUEST, "a node name is 1 to 128 letters, digits, `-`, `_` or `.`".into()));
    }
    if ad.cpus == 0 || ad.memory_mb == 0 {
        return Err(Error(StatusCode::BAD_REQUEST, "a node needs at least one cpu and some memory".into()));
    }
    let (credential, ticket, timing) = {
        let mut s = shared.lock();
        let (c, t) = s.register(ad, req.previous_credential.as_deref(), matches!(p, Principal::Admin(_)), now_ms())?;
        (c, t, s.timing)
    };
    durable(&shared, ticket).await;
    shared.work.notify_waiters();
    shared.changed.notify_waiters();
    Ok(Json(RegisterResponse { credential, lease_ttl_ms: timing.lease_ttl_ms, heartbeat_ms: timing.heartbeat_ms }))
}

async fn lease(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<LeaseRequest>,
) -> Result<Json<LeaseResponse>> {
    let name = node(&p)?.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(60_000));
    loop {
        let notified = shared.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (leases, ticket, placed_elsewhere) = {
            let mut s = shared.lock();
            let now = now_ms();
            s.live_node(&name, now)?;
            let placed = s.schedule(now) > 0;
            let leases = s.take_leases(&name, req.max_jobs.max(1), req.max_cpus, now);
            // Wake the other nodes only when this pass placed work that they may collect.
            let others = placed && s.nodes.keys().any(|n| *n != name && s.has_pending(n));
            (leases, s.writer.last_ticket(), others)
        };
        if placed_elsewhere {
            shared.work.notify_waiters();
        }
        if !leases.is_empty() || tokio::time::Instant::now() >= deadline {
            durable(&shared, ticket).await;
            return Ok(Json(LeaseResponse { leases }));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn heartbeat(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>> {
    let name = node(&p)?;
    let (revoked, ticket) = shared.lock().heartbeat(name, &req.leases, req.draining, now_ms())?;
    durable(&shared, ticket).await;
    if ticket > 0 {
        shared.work.notify_waiters();
        shared.changed.notify_waiters();
    }
    Ok(Json(HeartbeatResponse { revoked }))
}

async fn report(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<ReportRequest>,
) -> Result<Json<ReportResponse>> {
    let name = node(&p)?;
    // A report with a bad file is refused alone; the rest of the batch stands.
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for r in req.reports {
        let wrong = r
            .stdout
            .iter()
            .chain(&r.stderr)
            .chain(&r.outputs)
            .find(|f| !is_confined_path(&f.path) || !shared.blobs.has(&f.blob));
        match wrong {
            Some(f) => {
                bad.push((r.lease, format!("result file `{}` is not confined or its blob is not uploaded", f.path)))
            }
            None => good.push(r),
        }
    }
    let (mut resp, ticket) = {
        let mut s = shared.lock();
        s.metrics.results_refused += bad.len() as u64;
        let (resp, _) = s.report(name, good, now_ms())?;
        (resp, s.writer.last_ticket())
    };
    resp.refused.extend(bad);
    // Even a fully refused batch waits: an earlier copy of it may still be committing.
    durable(&shared, ticket).await;
    shared.work.notify_waiters();
    shared.changed.notify_waiters();
    Ok(Json(resp))
}

async fn deregister(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<StatusCode> {
    let name = node(&p)?;
    let ticket = shared.lock().deregister(name, now_ms());
    durable(&shared, ticket).await;
    shared.work.notify_waiters();
    shared.changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

fn blob_caller(p: &Principal) -> Result<()> {
    match p {
        Principal::Pool => Err(forbidden(p, "read or write blobs")),
        _ => Ok(()),
    }
}

async fn head_blob(AxState(shared): AxState<S>, Auth(p): Auth, Path(hash): Path<String>) -> Result<StatusCode> {
    blob_caller(&p)?;
    Ok(if shared.blobs.has(&hash) { StatusCode::OK } else { StatusCode::NOT_FOUND })
}

async fn get_blob(AxState(shared): AxState<S>, Auth(p): Auth, Path(hash): Path<String>) -> Result<Response> {
    blob_caller(&p)?;
    let path = shared.blobs.path(&hash).ok_or_else(|| Error(StatusCode::BAD_REQUEST, "not a blob hash".into()))?;
    let file =
        tokio::fs::File::open(&path).await.map_err(|_| Error(StatusCode::NOT_FOUND, format!("no blob {hash}")))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util_stream(file);
    Ok(([(header::CONTENT_LENGTH, len.to_string())], Body::from_stream(stream)).into_response())
}

/// Streams a file in 256 KiB chunks.
fn tokio_util_stream(file: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

async fn put_blob(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Path(hash): Path<String>,
    body: Body,
) -> Result<StatusCode> {
    blob_caller(&p)?;
    if shared.blobs.has(&hash) {
        return Ok(StatusCode::OK);
    }
    let mut up = shared.blobs.begin(&hash).map_err(|e| Error(StatusCode::BAD_REQUEST, format!("blob {hash}: {e}")))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        up.write(&chunk).map_err(|e| Error(StatusCode::INSUFFICIENT_STORAGE, format!("cannot store blob: {e}")))?;
    }
    tokio::task::spawn_blocking(move || up.commit())
        .await
        .map_err(|e| Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| Error(StatusCode::BAD_REQUEST, e))?;
    Ok(StatusCode::CREATED)
}

async fn add_token(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body_(req): Body_<TokenRequest>,
) -> Result<Json<TokenResponse>> {
    if !matches!(p, Principal::Admin(_)) {
        return Err(forbidden(&p, "create tokens"));
    }
    let owner = req.owner.trim();
    if owner.is_empty() || owner.len() > 64 || !owner.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        return Err(Error(StatusCode::BAD_REQUEST, "an owner is 1 to 64 letters, digits, `-`, `_`, `.` or `@`".into()));
    }
    let principal = match req.role {
        Role::User => Principal::User(owner.into()),
        Role::Admin => Principal::Admin(owner.into()),
        Role::Node => Principal::Pool,
    };
    let (token, ticket) = shared.lock().add_token(principal);
    durable(&shared, ticket).await;
    Ok(Json(TokenResponse { token }))
}

async fn get_metrics(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Response> {
    if matches!(p, Principal::Pool) {
        return Err(forbidden(&p, "read metrics"));
    }
    let text = metrics::render(&shared.lock());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
