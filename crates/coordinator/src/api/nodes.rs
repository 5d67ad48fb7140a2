//! `/v1/nodes`: the node registry and the calls node agents make (register, lease, heartbeat,
//! report, deregister).

use std::time::Duration;

use axum::Json;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use vmgrid_proto::*;

use super::{Auth, Body, Error, Result, S, admin, forbidden, node, user};
use crate::engine::{Principal, hash_token};

pub async fn list(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<NodeView>>> {
    user(&p, "list nodes")?;
    Ok(Json(shared.peek(|e| e.node_views())))
}

pub async fn register(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<RegisterRequest>,
) -> Result<Json<RegisterResponse>> {
    if !matches!(p, Principal::Pool | Principal::Admin(_)) {
        return Err(forbidden(&p, "register nodes; use the pool token"));
    }
    let mut ad = req.ad;
    ad.check().map_err(|e| Error(StatusCode::BAD_REQUEST, e))?;
    // A node serves blobs to other nodes only with a certificate from the pool's peer CA;
    // without one (a pool with certificates of its own), it is not offered as a peer.
    let peer_identity = ad.peer.as_deref().map(|addr| peer_identity(&shared, addr)).transpose()?.flatten();
    if peer_identity.is_none() {
        ad.peer = None;
    }
    let credential = crate::new_token();
    let admin = matches!(p, Principal::Admin(_));
    let (r, pending) = shared.call(|e| {
        e.register(ad, req.previous_credential.as_deref(), admin, hash_token(&credential), now_ms())?;
        Ok::<_, crate::engine::ApiError>(e.timing())
    });
    shared.finish(pending).await?;
    let timing = r?;
    Ok(Json(RegisterResponse {
        credential,
        lease_ttl_ms: timing.lease_ttl_ms,
        heartbeat_ms: timing.heartbeat_ms,
        peer_identity,
    }))
}

/// A certificate from the pool's peer CA for a node serving blobs at `addr` (`ip:port`), if the
/// pool has that CA. It names only the address the node says: the peer CA is trusted by nodes
/// for each other's blobs alone, whose pieces they check by hash anyway.
fn peer_identity(shared: &S, addr: &str) -> Result<Option<PeerIdentity>> {
    let Some(ca) = shared.peer_ca() else { return Ok(None) };
    let ip = addr.parse::<std::net::SocketAddr>().map(|a| a.ip().to_string()).unwrap_or_default();
    let id = ca.issue_peer(&[ip]).map_err(|e| Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Some(PeerIdentity { cert_pem: id.cert_pem, key_pem: id.key_pem, ca_pem: ca.cert_pem().to_string() }))
}

pub async fn lease(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    headers: axum::http::HeaderMap,
    Body(mut req): Body<LeaseRequest>,
) -> Result<Json<LeaseResponse>> {
    let name = node(&p)?.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(60_000));
    // The results the call carries are applied first; they are committed with the placements
    // the call makes, or before it waits for work.
    let (bad, good) = split_reports(&shared, std::mem::take(&mut req.reports));
    let carried = !bad.is_empty() || !good.is_empty();
    let (judged, first) = shared.call(|e| {
        e.set_ahead(&name, req.ahead, now_ms());
        if !carried {
            return Ok(None);
        }
        e.count_refused(bad.len() as u64);
        e.report(&name, good, now_ms()).map(Some)
    });
    let mut report = match judged {
        Ok(r) => r,
        Err(e) => {
            shared.finish(first).await?;
            return Err(e.into());
        }
    };
    if let Some(r) = &mut report {
        r.refused.extend(bad);
    }
    let mut first = Some(first);
    let parked = shared.parked.park(&name);
    // The registration this call was made under (its credential): a later one ends it.
    let registration = hash_token(super::bearer(&headers)?);
    let mut first_look = true;
    loop {
        // Woken because a pass placed work here: enabled now, so that a wake-up during this look
        // is not missed (`notify_waiters` keeps no permit).
        let mine = parked.notify.notified();
        tokio::pin!(mine);
        mine.as_mut().enable();
        // The pass's placements are durable with this call's reply, and their tick tells the
        // dashboards that jobs started to run.
        let (placed, scheduled) = shared.schedule();
        let (r, pending) = shared.call(|e| look(e, &name, &req, &registration, std::mem::take(&mut first_look)));
        let pending = pending.after(scheduled).after(first.take());
        // Only the nodes this pass placed work on (their replies wait for it to be durable).
        for other in placed.iter().filter(|n| **n != name) {
            shared.parked.wake(other);
        }
        let (leases, draining) = match r {
            Ok(v) => v,
            Err(e) => {
                shared.finish(pending).await?;
                return Err(e.into());
            }
        };
        // A draining node gets nothing more: its call ends, and the node gets on with its drain.
        // A server that stops ends every call (its graceful shutdown waits for them).
        let over = draining || shared.parked.closed() || tokio::time::Instant::now() >= deadline;
        if !leases.is_empty() || over {
            shared.finish(pending).await?;
            return Ok(Json(LeaseResponse { leases, report: report.take() }));
        }
        if pending.changed() {
            // Placements for other nodes: durable, and told to the dashboards, before waiting.
            shared.finish(pending).await?;
        }
        shared.wait_for_work(mine.as_mut(), deadline).await;
    }
}

/// One look of a lease call at what is placed on its node: the leases it takes, and whether the
/// node drains (its call then ends). The call is refused once the node was lost or registered
/// again since the call was made (`registration`, its credential's hash). The node counts as
/// heard from at the call's first look only: a call left waiting by a node that died does not
/// keep it alive.
fn look(
    e: &mut crate::engine::Engine,
    name: &str,
    req: &LeaseRequest,
    registration: &str,
    first: bool,
) -> std::result::Result<(Vec<Lease>, bool), crate::engine::ApiError> {
    let now = now_ms();
    e.same_registration(name, registration)?;
    if first {
        e.live_node(name, now)?;
    }
    let leases = e.take_leases(name, req.max_jobs.max(1), req.max_cpus, now);
    Ok((leases, e.draining(name)))
}

pub async fn heartbeat(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>> {
    let name = node(&p)?;
    let peer = req.renew_peer.then(|| shared.peek(|e| e.node_ad(name).and_then(|ad| ad.peer))).flatten();
    let (resp, pending) = shared.call(|e| {
        let now = now_ms();
        let resp = e.heartbeat(name, &req.leases, req.draining, now);
        if resp.is_ok() {
            e.hand_back(name, &req.returned, now);
            e.set_cache(name, req.cache);
            if let Some(blobs) = req.sharing {
                e.set_sharing(name, blobs);
            }
        }
        resp
    });
    shared.finish(pending).await?;
    let mut resp = resp?;
    // A node's certificate for serving blobs lasts a day: it asks for the next one before.
    // One that cannot be issued now is asked for again with the next heartbeat; the heartbeat
    // itself stands.
    resp.peer_identity = peer.and_then(|addr| match peer_identity(&shared, &addr) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(node = name, "cannot issue a certificate for serving blobs: {}", e.1);
            None
        }
    });
    Ok(Json(resp))
}

/// A node's checkpoint of a job it runs: recorded (durably, before the answer) only under the
/// job's current lease and only when every part is a blob the pool holds.
pub async fn checkpoint(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<CheckpointRequest>,
) -> Result<StatusCode> {
    let name = node(&p)?;
    if let Some(f) = req.checkpoint.parts().find(|f| !is_confined_path(&f.path) || !shared.blobs.has(&f.blob)) {
        return Err(crate::engine::ApiError::BadRequest(format!(
            "checkpoint part `{}` is not confined or its blob is not uploaded",
            f.path
        ))
        .into());
    }
    let (done, pending) = shared.call(|e| e.checkpoint(name, &req, now_ms()));
    shared.finish(pending).await?;
    done?;
    crate::blobs::collect_released_soon(&shared);
    Ok(StatusCode::NO_CONTENT)
}

pub async fn report(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<ReportRequest>,
) -> Result<Json<ReportResponse>> {
    let name = node(&p)?;
    let (bad, good) = split_reports(&shared, req.reports);
    let (resp, pending) = shared.call(|e| {
        e.count_refused(bad.len() as u64);
        e.report(name, good, now_ms())
    });
    // Even a fully refused batch waits: an earlier copy of it may still be committing.
    shared.finish(pending).await?;
    let mut resp = resp?;
    resp.refused.extend(bad);
    Ok(Json(resp))
}

/// A node's reports, those with a bad file (refused alone, with why) apart from the rest (which
/// stand).
fn split_reports(shared: &S, reports: Vec<Report>) -> (Vec<(LeaseId, String)>, Vec<Report>) {
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for r in reports {
        match check_files(shared, &r) {
            Err(why) => bad.push((r.lease, why)),
            Ok(()) => good.push(r),
        }
    }
    (bad, good)
}

/// A report's files: confined paths whose blobs are uploaded, or short stdout and stderr inline
/// (checked against their hash); outputs are always blobs (workflows hand them on as inputs).
fn check_files(shared: &S, r: &Report) -> std::result::Result<(), String> {
    for f in r.stdout.iter().chain(&r.stderr) {
        f.check_inline().map_err(|why| format!("result file {why}"))?;
    }
    let wrong = r.stdout.iter().chain(&r.stderr).chain(&r.outputs).find(|f| {
        let stored = if f.inline.is_some() { is_blob_ref(&f.blob) } else { shared.blobs.has(&f.blob) };
        !is_confined_path(&f.path) || !stored
    });
    if let Some(f) = wrong {
        return Err(format!("result file `{}` is not confined or its blob is not uploaded", f.path));
    }
    if let Some(f) = r.outputs.iter().find(|f| f.inline.is_some()) {
        return Err(format!("output `{}` is inline; outputs are uploaded as blobs", f.path));
    }
    Ok(())
}

/// An admin bans a node (it leaves at once and cannot register again under its name), or lifts
/// its ban.
pub async fn ban(AxState(shared): AxState<S>, Auth(p): Auth, Body(req): Body<BanRequest>) -> Result<StatusCode> {
    admin(&p, "ban nodes")?;
    let (done, pending) = shared.call(|e| e.ban(&req.node, req.banned, now_ms()));
    shared.finish(pending).await?;
    done?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn deregister(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<StatusCode> {
    let name = node(&p)?;
    let ((), pending) = shared.call(|e| e.deregister(name, now_ms()));
    shared.overlay.forget(name);
    shared.finish(pending).await?;
    Ok(StatusCode::NO_CONTENT)
}
