//! The HTTP API, one module per resource (`jobs`, `dags`, `nodes`, `blobs`, `tokens`, `users`), and
//! the web dashboard that reads it (`dashboard`): each handler checks
//! its caller's role first, makes its change through the engine ([`Shared::call`]), and answers
//! only once that change is durable ([`Shared::finish`]).

mod blobs;
mod dags;
mod dashboard;
mod events;
mod jobs;
mod nodes;
mod openapi;
mod overlay;
mod overview;
mod tokens;
mod users;

use std::sync::Arc;

pub(crate) use events::Streams;

use axum::extract::{DefaultBodyLimit, FromRequestParts, State as AxState};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};

use crate::core::Shared;
use crate::engine::{ApiError, Principal};
use crate::metrics;

type S = Arc<Shared>;

/// Every route: a path and its handlers. The OpenAPI document (`openapi.rs`) describes each; a
/// test checks that the two list the same paths and methods.
pub(crate) fn routes() -> Vec<(&'static str, MethodRouter<S>)> {
    vec![
        ("/v1/jobs", post(jobs::submit).get(jobs::list)),
        ("/v1/jobs/actions", post(jobs::actions)),
        ("/v1/jobs/{id}", get(jobs::result)),
        ("/v1/jobs/{id}/wait", get(jobs::wait)),
        ("/v1/dags", post(dags::submit).get(dags::list)),
        ("/v1/dags/{id}", get(dags::get)),
        ("/v1/dags/{id}/rm", post(dags::rm)),
        ("/v1/nodes", get(nodes::list)),
        ("/v1/nodes/register", post(nodes::register)),
        ("/v1/nodes/lease", post(nodes::lease)),
        ("/v1/nodes/heartbeat", post(nodes::heartbeat)),
        ("/v1/nodes/report", post(nodes::report)),
        ("/v1/nodes/checkpoint", post(nodes::checkpoint)),
        ("/v1/nodes/deregister", post(nodes::deregister)),
        ("/v1/nodes/ban", post(nodes::ban)),
        ("/v1/overlay", post(overlay::hello)),
        ("/v1/overlay/relay", post(overlay::relay_send).get(overlay::relay_recv)),
        ("/v1/net", get(overlay::net)),
        ("/v1/blobs/{hash}", get(blobs::get).head(blobs::head).put(blobs::put)),
        ("/v1/blobs/{hash}/peers", get(blobs::peers)),
        ("/v1/blobs/{hash}/pieces", get(blobs::pieces)),
        ("/v1/tokens", post(tokens::add).get(tokens::list)),
        ("/v1/tokens/revoke", post(tokens::revoke)),
        ("/v1/consoles", post(tokens::console)),
        ("/v1/users", get(users::list)),
        ("/v1/users/settings", post(users::settings)),
        ("/v1/events", get(events::stream)),
        ("/v1/overview", get(overview::get)),
        ("/metrics", get(get_metrics)),
        ("/openapi.json", get(openapi::serve)),
        ("/", get(dashboard::index)),
        ("/dashboard/app.js", get(dashboard::script)),
        ("/dashboard/app-pages.js", get(dashboard::pages)),
        ("/dashboard/app.css", get(dashboard::style)),
    ]
}

pub fn router(shared: S) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (path, handlers)| r.route(path, handlers))
        .method_not_allowed_fallback(|| async {
            Error(
                StatusCode::METHOD_NOT_ALLOWED,
                "this path does not take that method; the `Allow` header lists the ones it takes".into(),
            )
        })
        .fallback(|| async { Error(StatusCode::NOT_FOUND, "no such API call; see `vmgrid --help`".into()) })
        .layer(DefaultBodyLimit::max(16 << 20))
        .layer(axum::middleware::map_response(locked_down))
        .with_state(shared)
}

/// Every answer that is not one of the dashboard's files (which set their own, looser policy)
/// may load, run and frame nothing, and is never content-sniffed: JSON, errors, blobs, the
/// event stream, `/metrics` and this API's 404s alike.
async fn locked_down(mut resp: Response) -> Response {
    use axum::http::HeaderValue;
    let h = resp.headers_mut();
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; base-uri 'none'"));
    h.entry(header::X_CONTENT_TYPE_OPTIONS).or_insert(HeaderValue::from_static("nosniff"));
    resp
}

/// An error reply: a status and a sentence, as JSON.
pub struct Error(StatusCode, String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        // The reason also goes in a header, for answers without a body (HEAD).
        let visible: String = self.1.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
        let mut resp = (self.0, Json(vmgrid_proto::ApiError { error: self.1 })).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&visible) {
            resp.headers_mut().insert(vmgrid_proto::ERROR_HEADER, v);
        }
        resp
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

impl From<crate::store::Failing> for Error {
    fn from(f: crate::store::Failing) -> Self {
        Error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the pool cannot save changes right now ({}); this change is not acknowledged: it is saved when the store can, so look (`vmgrid q`) before you retry",
                f.0
            ),
        )
    }
}

type Result<T> = std::result::Result<T, Error>;

/// The caller, from its bearer token. Every call but the fallback needs one.
pub struct Auth(Principal);

impl FromRequestParts<S> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, shared: &S) -> Result<Self> {
        let token = bearer(&parts.headers)?;
        let now = vmgrid_proto::now_ms();
        let p = shared.peek(|e| e.authenticate(token, now).cloned());
        p.map(Auth).ok_or_else(|| {
            Error(StatusCode::UNAUTHORIZED, "the token is not valid for this pool (unknown, revoked or expired)".into())
        })
    }
}

/// The request's bearer token.
fn bearer(headers: &axum::http::HeaderMap) -> Result<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Error(StatusCode::UNAUTHORIZED, "missing `Authorization: Bearer <token>`".into()))
}

fn forbidden(p: &Principal, what: &str) -> Error {
    Error(StatusCode::FORBIDDEN, format!("a {} token cannot {what}", p.role().as_str()))
}

/// Users, admins, and the consoles users open.
fn user(p: &Principal, what: &str) -> Result<()> {
    match p {
        Principal::User(_) | Principal::Admin(_) | Principal::Console { .. } => Ok(()),
        _ => Err(forbidden(p, what)),
    }
}

fn admin(p: &Principal, what: &str) -> Result<()> {
    match p {
        Principal::Admin(_) => Ok(()),
        _ => Err(forbidden(p, what)),
    }
}

/// A node's own credential: the node's name.
fn node(p: &Principal) -> Result<&str> {
    match p {
        Principal::Node(n) => Ok(n),
        _ => Err(forbidden(p, "act as a node; nodes register with the pool token first")),
    }
}

/// JSON bodies whose errors are 400s with a sentence.
pub struct Body<T>(T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Error;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(Error(StatusCode::BAD_REQUEST, format!("bad request body: {}", e.body_text()))),
        }
    }
}

/// Path parameters whose errors are 400s with a sentence, as JSON like every other error.
pub struct Path<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(Error(StatusCode::BAD_REQUEST, format!("bad path: {}", e.body_text()))),
        }
    }
}

/// Query strings whose errors are 400s with a sentence, as JSON like every other error.
pub struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(Error(StatusCode::BAD_REQUEST, format!("bad query string: {}", e.body_text()))),
        }
    }
}

async fn get_metrics(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Response> {
    if matches!(p, Principal::Pool) {
        return Err(forbidden(&p, "read metrics"));
    }
    let mut text = shared.peek(metrics::render);
    text.push_str(&format!(
        "# HELP vmgrid_lease_calls_open Nodes with a lease call open (most wait for work).\n# TYPE vmgrid_lease_calls_open gauge\nvmgrid_lease_calls_open {}\n",
        shared.parked.len()
    ));
    text.push_str(&format!(
        "# HELP vmgrid_blob_bytes_served_total Bytes of blobs the coordinator sent.\n# TYPE vmgrid_blob_bytes_served_total counter\nvmgrid_blob_bytes_served_total {}\n",
        shared.blobs.served_bytes()
    ));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
