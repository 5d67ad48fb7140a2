//! `/v1/dags`: submit a workflow (or its rescue), list them, read one's state, remove it. Owners and admins
//! only, as for jobs.

use axum::Json;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use vmgrid_proto::*;

use super::{Auth, Body, Error, Path, Result, S, user};

pub async fn submit(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<DagSubmitRequest>,
) -> Result<Json<DagView>> {
    user(&p, "submit workflows")?;
    if let Some(f) = shared.store_failing() {
        return Err(Error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the pool cannot save changes right now ({}); nothing was submitted: retry later", f.0),
        ));
    }
    for n in &req.dag.nodes {
        let s = &n.job;
        for f in s.image.iter().chain(&s.kernel).chain(&s.initrd).chain(&s.inputs) {
            if !shared.blobs.has(&f.blob) {
                return Err(Error(
                    StatusCode::BAD_REQUEST,
                    format!("job `{}`: file `{}` (blob {}) has not been uploaded", n.name, f.path, f.blob),
                ));
            }
        }
    }
    let (view, pending) = shared.call(|e| {
        let id = e.submit_dag(&p, req.dag, req.rescue, now_ms())?;
        e.dag_view(&p, id)
    });
    shared.finish(pending).await?;
    Ok(Json(view?))
}

pub async fn list(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<DagSummary>>> {
    user(&p, "list workflows")?;
    let (list, pending) = shared.call(|e| e.dag_list(&p));
    shared.finish(pending).await?;
    Ok(Json(list))
}

pub async fn get(AxState(shared): AxState<S>, Auth(p): Auth, Path(id): Path<u64>) -> Result<Json<DagView>> {
    user(&p, "read workflows")?;
    let (view, pending) = shared.call(|e| e.dag_view(&p, id));
    shared.finish(pending).await?;
    Ok(Json(view?))
}

pub async fn rm(AxState(shared): AxState<S>, Auth(p): Auth, Path(id): Path<u64>) -> Result<Json<DagView>> {
    user(&p, "remove workflows")?;
    let (view, pending) = shared.call(|e| e.dag_rm(&p, id, now_ms()));
    shared.finish(pending).await?;
    Ok(Json(view?))
}
