//! `/v1/overlay` and `/v1/net`: the overlay's control plane for nodes (hello and map, the relay)
//! and its view for users (`vmgrid net`). The state is [`crate::overlay::Overlay`]'s.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use vmgrid_proto::overlay::{MAX_RELAY_BODY, NetView, OverlayHello, OverlayMap, parse_key, relay_decode};

use super::{Auth, Body, Error, Query, Result, S, node, user};

/// A node's hello: its key, endpoint and paths; the answer is its map.
pub async fn hello(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(h): Body<OverlayHello>,
) -> Result<Json<OverlayMap>> {
    let name = node(&p)?.to_string();
    h.check().map_err(|e| Error(StatusCode::BAD_REQUEST, e))?;
    let (registered, groups, host, keys) = shared.peek(|e| {
        let (groups, host) = (e.overlay_groups(&name), e.overlay_host(&name));
        let peers = crate::overlay::peers_of(&name, &groups, host.as_ref());
        let keys: HashMap<String, String> =
            peers.into_iter().filter_map(|p| e.overlay_key(&p).map(|k| (p, k))).collect();
        (e.overlay_key(&name), groups, host, keys)
    });
    // The key must be the one the node registered with its credential: a node cannot take
    // another's handshakes by saying its key.
    let same = registered.as_deref().and_then(parse_key).is_some_and(|k| parse_key(&h.key) == Some(k));
    if !same {
        return Err(Error(
            StatusCode::CONFLICT,
            format!("node {name}: this is not the overlay key it registered with; register again"),
        ));
    }
    let mut map = shared.overlay.hello(&name, h, groups, host);
    // Only the keys the peers registered: one that registered again since its last hello is
    // left out until it says hello with its new key.
    map.peers.retain(|p| keys.get(&p.node).and_then(|k| parse_key(k)).is_some_and(|k| parse_key(&p.key) == Some(k)));
    Ok(Json(map))
}

/// Packets from a node for others (a relay body); those it may not send are dropped.
pub async fn relay_send(AxState(shared): AxState<S>, Auth(p): Auth, body: Bytes) -> Result<StatusCode> {
    let name = node(&p)?.to_string();
    let packets = relay_decode(&body).map_err(|e| Error(StatusCode::BAD_REQUEST, e))?;
    // Where it may send now: the nodes that run members of its groups, as the engine says.
    let (groups, host) = shared.peek(|e| (e.overlay_groups(&name), e.overlay_host(&name)));
    let allowed = crate::overlay::peers_of(&name, &groups, host.as_ref());
    shared.overlay.relay(&name, &allowed, packets);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
pub struct Wait {
    #[serde(default)]
    wait_ms: u64,
}

/// The packets waiting for the calling node: at once, or as soon as one comes within `wait_ms`
/// (at most 30 s); an empty body when none did.
pub async fn relay_recv(AxState(shared): AxState<S>, Auth(p): Auth, Query(w): Query<Wait>) -> Result<Vec<u8>> {
    let name = node(&p)?.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(w.wait_ms.min(30_000));
    loop {
        match shared.overlay.take(&name, MAX_RELAY_BODY) {
            Ok(body) => return Ok(body),
            Err(Some(notify)) => {
                if tokio::time::timeout_at(deadline, notify.notified()).await.is_err() {
                    return Ok(Vec::new());
                }
            }
            // A node that said no hello yet has nothing waiting.
            Err(None) => {
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_millis(500))).await;
                if tokio::time::Instant::now() >= deadline {
                    return Ok(Vec::new());
                }
            }
        }
    }
}

/// Every node's end of the overlay and how it reaches the others.
pub async fn net(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<NetView>>> {
    user(&p, "see the pool's network")?;
    Ok(Json(shared.overlay.views()))
}
