//! `GET /v1/events`: server-sent events that tell the dashboard the pool changed, so it reloads
//! what it shows instead of polling. The stream is under the same sign-in as the API (a Bearer
//! token, read by the page with fetch(), never a token in a URL) and carries no data of any job:
//! each event is a tick (`event: changed`, `data: {"seq":N}`); the page then asks the API, whose
//! role checks decide what it sees. Memory is bounded: the streams wait on one watch channel
//! (only the latest count is kept, so a slow stream skips ticks), ticks are coalesced
//! ([`COALESCE`]), and at most [`crate::core::MAX_STREAMS`] streams are open (more get a 503).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::{Auth, Error, Result, S, user};

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

struct Open {
    ticks: watch::Receiver<u64>,
    first: bool,
    _permit: OwnedSemaphorePermit,
}

pub async fn stream(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    user(&p, "follow the pool's events")?;
    let permit =
        shared.streams.clone().try_acquire_owned().map_err(|_| {
            Error(StatusCode::SERVICE_UNAVAILABLE, "too many event streams are open; retry later".into())
        })?;
    let open = Open { ticks: shared.ticks.subscribe(), first: true, _permit: permit };
    let events = futures_util::stream::unfold(open, |mut o| async move {
        if !o.first {
            // The sender lives as long as the server: an error means it is shutting down.
            o.ticks.changed().await.ok()?;
            tokio::time::sleep(COALESCE).await;
        }
        o.first = false;
        let seq = *o.ticks.borrow_and_update();
        let ev = Event::default().event("changed").data(format!("{{\"seq\":{seq}}}"));
        Some((Ok(ev), o))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
