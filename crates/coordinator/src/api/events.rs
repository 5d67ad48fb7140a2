//! `GET /v1/events`: server-sent events that tell the dashboard the pool changed, so it reloads
//! what it shows instead of polling. The stream is under the same sign-in as the API (a Bearer
//! token, read by the page with fetch(), never a token in a URL) and carries no data of any job:
//! each event is a tick (`event: changed`, `data: {"seq":N}`); the page then asks the API, whose
//! role checks decide what it sees. Memory is bounded: the streams wait on one watch channel
//! (only the latest count is kept, so a slow stream skips ticks), ticks are coalesced
//! ([`COALESCE`]), and at most [`MAX_STREAMS`] streams are open (more get a 503), at most
//! [`MAX_STREAMS_PER_OWNER`] of one owner (more get a 429). A stream ends when its token is
//! revoked or expires.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::watch;

use super::{Auth, Error, Result, S, bearer, user};

/// Ticks closer together than this are sent as one.
pub const COALESCE: Duration = Duration::from_millis(300);

/// One event of the stream, as the OpenAPI document describes it (the event's fields).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ChangedEvent {
    /// Always `changed`.
    event: String,
    /// JSON `{"seq":N}`: the pool's change count.
    data: String,
}

/// How many event streams may be open at once, in all; more are refused (503).
pub const MAX_STREAMS: usize = 256;
/// How many one owner (a user, an admin) may hold open; more are refused (429), so one user's
/// tabs or scripts cannot take every stream of the pool.
pub const MAX_STREAMS_PER_OWNER: usize = 8;
/// How often an open stream checks its token again when nothing changed (an expiry is no change).
pub const RECHECK: Duration = if cfg!(test) { Duration::from_millis(300) } else { Duration::from_secs(30) };

/// The open event streams, counted per owner.
pub struct Streams {
    open: Mutex<(usize, HashMap<String, usize>)>,
    /// Set when the server stops: every stream ends, so the graceful shutdown does not wait on
    /// dashboards that would keep their streams open for ever.
    closing: watch::Sender<bool>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams { open: Mutex::default(), closing: watch::Sender::new(false) }
    }
}

/// One open stream: counted until it is dropped.
struct Slot {
    streams: Arc<Streams>,
    owner: String,
}

impl Streams {
    /// Ends every stream, open or opened from now on.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn open(self: &Arc<Self>, owner: &str) -> Result<Slot> {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per) = &mut *guard;
        if *total >= MAX_STREAMS {
            return Err(Error(StatusCode::SERVICE_UNAVAILABLE, "too many event streams are open; retry later".into()));
        }
        let mine = per.entry(owner.to_string()).or_default();
        if *mine >= MAX_STREAMS_PER_OWNER {
            return Err(Error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "`{owner}` has {MAX_STREAMS_PER_OWNER} event streams open, the most one owner may; close a dashboard tab"
                ),
            ));
        }
        *mine += 1;
        *total += 1;
        Ok(Slot { streams: self.clone(), owner: owner.to_string() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per) = &mut *guard;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.owner);
            }
        }
    }
}

struct Open {
    shared: S,
    closing: watch::Receiver<bool>,
    token: String,
    ticks: watch::Receiver<u64>,
    first: bool,
    _slot: Slot,
}

impl Open {
    /// Waits for the next change to announce; `None` ends the stream: the server is stopping,
    /// or the stream's token was revoked or expired (checked at each change and every [`RECHECK`]).
    async fn next(&mut self) -> Option<u64> {
        if self.first {
            self.first = false;
        } else {
            loop {
                let changed = tokio::select! {
                    // `shared` holds the sender, so this never fails; the server's stop comes
                    // through `closing`.
                    r = self.ticks.changed() => { r.ok()?; true }
                    _ = self.closing.wait_for(|c| *c) => return None,
                    _ = tokio::time::sleep(RECHECK) => false,
                };
                if !self.signed_in() {
                    return None;
                }
                if changed {
                    break;
                }
            }
            tokio::time::sleep(COALESCE).await;
        }
        self.signed_in().then(|| *self.ticks.borrow_and_update())
    }

    fn signed_in(&self) -> bool {
        let now = vmgrid_proto::now_ms();
        self.shared.peek(|e| e.authenticate(&self.token, now).is_some())
    }
}

pub async fn stream(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    user(&p, "follow the pool's events")?;
    let slot = shared.streams.open(p.owner())?;
    let token = bearer(&headers)?.to_string();
    let open = Open {
        ticks: shared.ticks.subscribe(),
        closing: shared.streams.closing.subscribe(),
        shared,
        token,
        first: true,
        _slot: slot,
    };
    let events = futures_util::stream::unfold(open, |mut o| async move {
        let seq = o.next().await?;
        let ev = Event::default().event("changed").data(format!("{{\"seq\":{seq}}}"));
        Some((Ok(ev), o))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
