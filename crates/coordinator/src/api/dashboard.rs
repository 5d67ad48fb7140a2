//! The web dashboard: `GET /` and its script and style sheet, compiled into the binary
//! (`crates/coordinator/dashboard/`). The page holds no data: it signs in with a token kept in
//! the browser session and reads the API with it (`Authorization: Bearer`, never in a URL), so
//! every role check is the API's own. Every answer sets a strict Content-Security-Policy (no
//! inline script, no eval, nothing from elsewhere, no framing).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../dashboard/index.html");
const SCRIPT: &str = include_str!("../../dashboard/app.js");
const PAGES: &str = include_str!("../../dashboard/app-pages.js");
const STYLE: &str = include_str!("../../dashboard/app.css");

/// The policy of every dashboard answer.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn pages() -> Response {
    asset("text/javascript; charset=utf-8", PAGES)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
