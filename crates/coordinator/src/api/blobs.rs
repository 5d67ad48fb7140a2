//! `/v1/blobs/{hash}`: content-addressed files, uploaded once and read by hash. A store failure
//! is the coordinator's (500, or 507 when its disk is full), never the caller's bad input.

use axum::body::Body as HttpBody;
use axum::extract::{Path, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::{Auth, Error, Result, S, forbidden};
use crate::blobs::CommitError;
use crate::engine::Principal;

fn blob_caller(p: &Principal) -> Result<()> {
    match p {
        Principal::Pool => Err(forbidden(p, "read or write blobs")),
        _ => Ok(()),
    }
}

/// The coordinator could not store a blob: its own fault, with the disk-full case said so.
fn storage(what: &str, e: &std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::StorageFull {
        return Error(StatusCode::INSUFFICIENT_STORAGE, format!("{what}: the coordinator's disk is full"));
    }
    Error(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"))
}

pub async fn head(AxState(shared): AxState<S>, Auth(p): Auth, Path(hash): Path<String>) -> Result<StatusCode> {
    blob_caller(&p)?;
    Ok(if shared.blobs.has(&hash) { StatusCode::OK } else { StatusCode::NOT_FOUND })
}

pub async fn get(AxState(shared): AxState<S>, Auth(p): Auth, Path(hash): Path<String>) -> Result<Response> {
    blob_caller(&p)?;
    let path = shared.blobs.path(&hash).ok_or_else(|| Error(StatusCode::BAD_REQUEST, "not a blob hash".into()))?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error(StatusCode::NOT_FOUND, format!("no blob {hash}")));
        }
        Err(e) => return Err(storage(&format!("cannot read blob {hash}"), &e)),
    };
    let len = file.metadata().await.map(|m| m.len()).map_err(|e| storage("cannot read a blob", &e))?;
    Ok(([(header::CONTENT_LENGTH, len.to_string())], HttpBody::from_stream(chunks(file))).into_response())
}

/// Streams a file in 256 KiB chunks.
fn chunks(file: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}

pub async fn put(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Path(hash): Path<String>,
    headers: axum::http::HeaderMap,
    body: HttpBody,
) -> Result<StatusCode> {
    blob_caller(&p)?;
    if !vmgrid_proto::is_blob_ref(&hash) {
        return Err(Error(StatusCode::BAD_REQUEST, format!("`{hash}` is not a blob hash (64 hex digits of blake3)")));
    }
    if shared.blobs.has(&hash) {
        return Ok(StatusCode::OK);
    }
    // Nodes upload results (bounded by each job's disk_mb); users are charged for what they send.
    let charged = !matches!(p, Principal::Node(_));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let limit = shared.max_blob_bytes;
    let too_big =
        || Error(StatusCode::PAYLOAD_TOO_LARGE, format!("a file sent to the pool may be at most {} MiB", limit >> 20));
    if let Some(n) = declared {
        if n > limit {
            return Err(too_big());
        }
        if charged {
            shared.peek(|e| e.check_blob_quota(p.owner(), n))?;
        }
    }
    let dir = shared.blobs.dir();
    let free = crate::blobs::free_bytes(dir).map_err(|e| storage("cannot tell the free disk space", &e))?;
    let reserve = crate::blobs::reserve(dir);
    if free < reserve + declared.unwrap_or(0) {
        return Err(Error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "the coordinator's disk has {} MiB free, and keeps {} MiB for its job store",
                free >> 20,
                reserve >> 20
            ),
        ));
    }
    let mut up = shared.blobs.begin(&hash).map_err(|e| storage("cannot start storing a blob", &e))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        if up.size() + chunk.len() as u64 > limit {
            return Err(too_big());
        }
        up.write(&chunk).map_err(|e| storage("cannot store a blob", &e))?;
    }
    let size = up.size();
    if charged {
        shared.peek(|e| e.check_blob_quota(p.owner(), size))?;
    }
    let committed = tokio::task::spawn_blocking(move || up.commit())
        .await
        .map_err(|e| Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match committed {
        Ok(()) => {
            let owner = if charged { p.owner().to_string() } else { format!("node:{}", p.owner()) };
            let ((), pending) = shared.call(|e| e.add_blob(&hash, &owner, size, vmgrid_proto::now_ms()));
            shared.finish(pending).await?;
            Ok(StatusCode::CREATED)
        }
        Err(CommitError::Mismatch(why)) => Err(Error(StatusCode::BAD_REQUEST, why)),
        Err(CommitError::Io(e)) => Err(storage("cannot store a blob", &e)),
    }
}
