//! A coordinator on a shared PostgreSQL store before it is the active one: it serves every call
//! with `503` and the active coordinator's URL (in the `x-vmgrid-standby` header, for clients
//! given several coordinators' URLs to move on by themselves), while it waits to take the store's
//! lock. Once active, a watchdog stops the process the moment it might no longer be: two
//! coordinators never write one pool.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::store::StoreError;
use crate::store::postgres::{self, PgStore};

/// How often a standby tries to take the lock.
const TRY_EVERY: Duration = Duration::from_millis(500);
/// How often the active coordinator checks that its store's session still holds the lock.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

type Active = Arc<Mutex<Option<String>>>;

/// Opens the store at `url` and returns it once it holds the active lock. Meanwhile, `listener`
/// answers every call as a standby; the listener given back listens on the same address.
pub(crate) fn wait_until_active(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    data_id: &str,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(PgStore, TcpListener), StoreError> {
    let mut store = PgStore::open(url)?;
    // A standby on another data dir is refused now, not when it would take over.
    store.check_data_id(data_id)?;
    if store.try_lock()? {
        store.check_data_id(data_id)?;
        return Ok((store, listener));
    }
    let addr = listener.local_addr().map_err(|e| StoreError(e.to_string()))?;
    let active: Active = Arc::new(Mutex::new(store.active_url()?));
    let shown = active.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| "not known yet".into());
    eprintln!("vmgrid: another coordinator is active on {} (at {shown}); standing by", postgres::redact(url));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = Router::new().fallback(answer).with_state(active.clone());
    let server = runtime.spawn(crate::serve_app(app, listener, tls, async move {
        let _ = stopped.await;
    }));
    let got = loop {
        std::thread::sleep(TRY_EVERY);
        match store.try_lock() {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
        if let Ok(now) = store.active_url() {
            *active.lock().unwrap_or_else(|p| p.into_inner()) = now;
        }
    };
    let _ = stop.send(());
    let abort = server.abort_handle();
    if runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await }).is_err() {
        abort.abort();
    }
    got?;
    store.check_data_id(data_id)?;
    // The standby server's accept task lets the socket go on its next turn: try for a while.
    let listener = runtime.block_on(async {
        let mut tries = 0;
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return Ok(l),
                Err(e) if tries < 100 => {
                    tracing::debug!("listening again on {addr}: {e}");
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(StoreError(format!("cannot listen again on {addr} once active: {e}"))),
            }
        }
    })?;
    Ok((store, listener))
}

/// Every call to a standby: 503, where the active coordinator is, and to retry in a second.
async fn answer(State(active): State<Active>) -> Response {
    let at = active.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let error = match &at {
        Some(url) => format!(
            "this coordinator is a standby: the pool's active coordinator is at {url} (give clients and nodes every coordinator's URL, --pool URL1,URL2, and they move on by themselves)"
        ),
        None => "this coordinator is a standby and no active coordinator has said where it serves yet; retry shortly"
            .to_string(),
    };
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(vmgrid_proto::ApiError { error })).into_response();
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    let named = at.as_deref().and_then(|u| HeaderValue::from_str(u).ok()).unwrap_or(HeaderValue::from_static(""));
    h.insert(vmgrid_proto::STANDBY_HEADER, named);
    resp
}
