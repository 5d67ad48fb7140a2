//! `/v1/tokens` and `/v1/consoles`: tokens made, listed and revoked by an admin, and the
//! credential (and TLS certificate) the pool issues to a `vmgrid ssi` console, whose home URL it
//! decides itself: the address the console connected from, with the port it listens on.

use axum::Json;
use axum::extract::{ConnectInfo, State as AxState};
use axum::http::StatusCode;
use vmgrid_proto::*;

use super::{Auth, Body, Error, Result, S, admin};
use crate::engine::{Principal, hash_token};
use crate::serve::{Peer, home_url, peer_ip};

fn token_id() -> String {
    crate::new_token()[..12].to_string()
}

pub async fn add(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Body(req): Body<TokenRequest>,
) -> Result<Json<TokenResponse>> {
    admin(&p, "create tokens")?;
    req.check().map_err(|e| Error(StatusCode::BAD_REQUEST, e))?;
    let owner = req.owner();
    let principal = match req.role {
        Role::User => Principal::User(owner.into()),
        Role::Admin => Principal::Admin(owner.into()),
        Role::Node => Principal::Pool,
    };
    let (token, id, now) = (crate::new_token(), token_id(), now_ms());
    let expires_ms = req.ttl_s.map(|t| now + t * 1000);
    let ((), pending) = shared.call(|e| e.add_token(hash_token(&token), id.clone(), principal, now, expires_ms));
    shared.finish(pending).await?;
    Ok(Json(TokenResponse { token, id, expires_ms }))
}

pub async fn list(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Vec<TokenView>>> {
    admin(&p, "list tokens")?;
    Ok(Json(shared.peek(|e| e.token_views())))
}

pub async fn revoke(AxState(shared): AxState<S>, Auth(p): Auth, Body(req): Body<RevokeRequest>) -> Result<StatusCode> {
    admin(&p, "revoke tokens")?;
    let (r, pending) = shared.call(|e| e.revoke(req.id.trim(), now_ms()));
    shared.finish(pending).await?;
    r?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn console(
    AxState(shared): AxState<S>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Auth(p): Auth,
    Body(req): Body<ConsoleRequest>,
) -> Result<Json<ConsoleResponse>> {
    if req.port == 0 {
        return Err(Error(StatusCode::BAD_REQUEST, "a console listens on a port other than 0".into()));
    }
    let ip = peer_ip(peer);
    let home = home_url(shared.scheme(), ip, req.port);
    // Its certificate is signed by the pool's CA, which nodes trust, for the address they reach.
    let identity = match shared.ca() {
        Some(ca) => {
            Some(ca.issue(&[ip.to_string()]).map_err(|e| Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?)
        }
        None if shared.server_tls().is_none() => None,
        None => {
            return Err(Error(
                StatusCode::CONFLICT,
                "this pool serves a certificate from files (--tls-cert), so it cannot sign consoles' certificates; start it with its own CA to use `vmgrid ssi`".into(),
            ));
        }
    };
    let (credential, id) = (crate::new_token(), format!("console-{}", token_id()));
    let (r, pending) =
        shared.call(|e| e.register_console(&p, hash_token(&credential), id.clone(), home.clone(), now_ms()));
    shared.finish(pending).await?;
    r?;
    let (cert_pem, key_pem) = identity.map(|i| (i.cert_pem, i.key_pem)).unzip();
    Ok(Json(ConsoleResponse { id, credential, home, cert_pem, key_pem }))
}
