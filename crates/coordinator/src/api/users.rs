//! `/v1/users`: each user's fair share (usage, running and idle jobs, factor, quota, effective
//! priority), seen by the user themself or an admin, and the settings only an admin changes.

use axum::Json;
use axum::extract::State as AxState;
use vmgrid_proto::*;

use super::{Auth, Body, Result, S, admin, user};

/// An admin sees every user; a user sees themself.
pub async fn list(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<UserView>>> {
    user(&p, "list users")?;
    let (views, pending) = shared.call(|e| e.user_views(&p, now_ms()));
    shared.finish(pending).await?;
    Ok(Json(views))
}

/// Sets a user's priority factor and quota (admin only); answers with the user's view.
pub async fn settings(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<UserSettingsRequest>,
) -> Result<Json<UserView>> {
    admin(&p, "set users' quotas or priority factors")?;
    let (r, pending) = shared.call(|e| e.set_user(&p, &req, now_ms()));
    shared.finish(pending).await?;
    Ok(Json(r?))
}
