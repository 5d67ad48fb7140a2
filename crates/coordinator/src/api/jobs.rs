//! `/v1/jobs`: submit, list, one job's results, wait, and rm/hold/release.

use std::time::Duration;

use axum::Json;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use serde::Deserialize;
use vmgrid_proto::*;

use super::{Auth, Body, Error, Path, Query, Result, S, user};

pub async fn submit(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<SubmitRequest>,
) -> Result<Json<SubmitResponse>> {
    user(&p, "submit jobs")?;
    // While the store cannot commit, new work is refused before anything is queued: unlike a
    // change already waiting on the store, it will not be saved later.
    if let Some(f) = shared.store_failing() {
        return Err(Error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the pool cannot save changes right now ({}); nothing was submitted: retry later", f.0),
        ));
    }
    for f in req.spec.image.iter().chain(&req.spec.kernel).chain(&req.spec.initrd).chain(&req.spec.inputs) {
        if !shared.blobs.has(&f.blob) {
            return Err(Error(
                StatusCode::BAD_REQUEST,
                format!("file `{}` (blob {}) has not been uploaded", f.path, f.blob),
            ));
        }
    }
    let (ids, pending) = shared.call(|e| e.submit(&p, req.spec, req.count, now_ms()));
    shared.finish(pending).await?;
    Ok(Json(SubmitResponse { ids: ids? }))
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_page")]
    limit: usize,
    state: Option<String>,
    /// Only this owner's jobs.
    owner: Option<String>,
    /// Only jobs whose name contains this (case folded).
    name: Option<String>,
    #[serde(default)]
    order: Order,
}

/// The order of a job list: by id, oldest (smallest id) or newest first.
#[derive(Deserialize, Default, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Oldest,
    Newest,
}

/// The longest `owner` or `name` a job list may filter by.
const MAX_FILTER_CHARS: usize = 256;

fn default_page() -> usize {
    1000
}

/// One page of the jobs the caller may see: `?after=ID&limit=N&state=idle&owner=alice&name=sweep`.
pub async fn list(AxState(shared): AxState<S>, Auth(p): Auth, Query(q): Query<ListQuery>) -> Result<Json<JobPage>> {
    user(&p, "list jobs")?;
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            Error(StatusCode::BAD_REQUEST, format!("unknown state `{s}`: idle, running, completed, held or removed"))
        })?),
    };
    for (what, v) in [("owner", &q.owner), ("name", &q.name)] {
        if v.as_ref().is_some_and(|v| v.chars().count() > MAX_FILTER_CHARS) {
            return Err(Error(
                StatusCode::BAD_REQUEST,
                format!("`{what}` is longer than {MAX_FILTER_CHARS} characters"),
            ));
        }
    }
    let filter = crate::engine::JobFilter {
        state,
        owner: q.owner.filter(|o| !o.is_empty()),
        name: q.name.filter(|n| !n.is_empty()),
        newest_first: q.order == Order::Newest,
    };
    let (page, pending) = shared.call(|e| e.job_page(&p, q.after, q.limit, &filter));
    shared.finish(pending).await?;
    Ok(Json(page))
}

pub async fn result(AxState(shared): AxState<S>, Auth(p): Auth, Path(id): Path<u64>) -> Result<Json<JobResult>> {
    user(&p, "read jobs")?;
    let (r, pending) = shared.call(|e| e.job_result(&p, id));
    // Show only what is on disk: wait for any change not yet committed.
    shared.finish(pending).await?;
    Ok(Json(r?))
}

#[derive(Deserialize)]
pub struct WaitQuery {
    #[serde(default)]
    timeout_ms: u64,
}

/// Answers when the job is completed, removed or held, or when the timeout passes.
pub async fn wait(
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
        let (r, pending) = shared.call(|e| e.job_result(&p, id));
        let job = r?.job;
        if job.state.is_final() || job.state == JobState::Held || tokio::time::Instant::now() >= deadline {
            shared.finish(pending).await?;
            return Ok(Json(job));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

pub async fn actions(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<ActionRequest>,
) -> Result<Json<ActionResponse>> {
    user(&p, "manage jobs")?;
    if req.ids.len() > MAX_ACTION_IDS {
        let why = format!("at most {MAX_ACTION_IDS} job ids a request; this one has {}", req.ids.len());
        return Err(Error(StatusCode::BAD_REQUEST, why));
    }
    let (resp, pending) = shared.call(|e| e.action(&p, req.action, &req.ids, now_ms()));
    shared.finish(pending).await?;
    Ok(Json(resp))
}
