//! `/v1/blobs/{hash}`: content-addressed files, uploaded once and read by hash. A store failure
//! is the coordinator's (500, or 507 when its disk is full), never the caller's bad input.

use axum::body::Body as HttpBody;
use axum::extract::State as AxState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::{Auth, Error, Path, Query, Result, S, forbidden};
use crate::blobs::CommitError;
use crate::engine::Principal;
use axum::Json;
use vmgrid_proto::{PeersResponse, Pieces, is_blob_ref};

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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadQuery {
    /// The size of an upload the caller means to make: the answer is then the refusal that upload
    /// would get (413, 403, 507), before any byte of it is sent.
    size: Option<u64>,
}

/// 200 when the pool has the blob; else 404, or with `?size=N` the refusal an upload would get.
pub async fn head(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Path(hash): Path<String>,
    Query(q): Query<HeadQuery>,
) -> Result<Response> {
    blob_caller(&p)?;
    if shared.blobs.has(&hash) {
        // The caller may refer to it next, instead of uploading it: it is not collected meanwhile.
        shared.peek_mut(|e| e.reuse_blob(&hash, vmgrid_proto::now_ms()));
        // Its size, as a GET would send it, and that a GET takes a range.
        let len = shared.blobs.path(&hash).and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len());
        let mut resp = StatusCode::OK.into_response();
        if let Some(len) = len {
            resp.headers_mut().insert(header::CONTENT_LENGTH, len.into());
        }
        resp.headers_mut().insert(header::ACCEPT_RANGES, axum::http::HeaderValue::from_static("bytes"));
        return Ok(resp);
    }
    if let Some(n) = q.size {
        admit(&shared, &p, Some(n))?;
    }
    Ok(StatusCode::NOT_FOUND.into_response())
}

/// Whether an upload of `declared` bytes (unknown: `None`) may start: the size limit, the
/// caller's quota and the coordinator's free space.
fn admit(shared: &S, p: &Principal, declared: Option<u64>) -> Result<()> {
    let limit = shared.max_blob_bytes;
    if let Some(n) = declared {
        if n > limit {
            return Err(too_big(limit));
        }
        // Nodes upload results (bounded by each job's disk_mb); users are charged for what they send.
        if !matches!(p, Principal::Node(_)) {
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
    Ok(())
}

fn too_big(limit: u64) -> Error {
    Error(StatusCode::PAYLOAD_TOO_LARGE, format!("a file sent to the pool may be at most {} MiB", limit >> 20))
}

/// A refusal sent before the body was read: the connection is closed after it, so that no client
/// sends its next request on a connection the server will not read further.
fn refused_early(e: Error) -> Response {
    let mut resp = e.into_response();
    resp.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    resp
}

/// A single byte range of a `Range` header (`bytes=A-B`, `bytes=A-`, `bytes=-N`) in a blob of
/// `len` bytes: the first and last byte, or `Err` when it is valid but no byte of it is in the
/// blob (416: it starts past the end, or asks for the last 0 bytes). `Ok(None)`: the whole blob,
/// as RFC 9110 says for no range, a malformed one, several, or a tail of an empty blob.
fn range(headers: &axum::http::HeaderMap, len: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let spec = spec.trim();
    let Some((unit, set)) = spec.split_once('=') else { return Ok(None) };
    let Some((first, last)) = set.split_once('-') else { return Ok(None) };
    let number = |t: &str| -> Option<u64> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) { None } else { t.parse().ok() }
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return Ok(None);
    }
    if first.trim().is_empty() {
        // The last N bytes.
        return match number(last) {
            None => Ok(None),
            Some(0) => Err(()),
            Some(_) if len == 0 => Ok(None),
            Some(n) => Ok(Some((len.saturating_sub(n), len - 1))),
        };
    }
    let Some(first) = number(first) else { return Ok(None) };
    let last = if last.trim().is_empty() { Some(u64::MAX) } else { number(last) };
    match last {
        None => Ok(None),
        Some(last) if last < first => Ok(None),
        Some(_) if first >= len => Err(()),
        Some(last) => Ok(Some((first, last.min(len - 1)))),
    }
}

/// What a blob is served as: bytes, never a page a browser would render (with `nosniff`).
const OCTETS: &str = "application/octet-stream";

/// A blob, whole or one byte range of it (`Range`: a dashboard reads an output's tail, a client
/// can resume a cut download).
pub async fn get(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Path(hash): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response> {
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
    let Ok(part) = range(&headers, len) else {
        let mut resp =
            Error(StatusCode::RANGE_NOT_SATISFIABLE, format!("the range is outside blob {hash} of {len} bytes"))
                .into_response();
        resp.headers_mut().insert(header::CONTENT_RANGE, format!("bytes */{len}").parse().expect("ascii"));
        return Ok(resp);
    };
    shared.blobs.served(part.map_or(len, |(first, last)| last - first + 1));
    let Some((first, last)) = part else {
        let headers = [
            (header::CONTENT_TYPE, OCTETS.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::ACCEPT_RANGES, "bytes".into()),
        ];
        return Ok((headers, HttpBody::from_stream(chunks(file))).into_response());
    };
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = file;
    file.seek(std::io::SeekFrom::Start(first)).await.map_err(|e| storage("cannot read a blob", &e))?;
    let body = HttpBody::from_stream(chunks_of(file.take(last - first + 1)));
    let headers = [
        (header::CONTENT_TYPE, OCTETS.to_string()),
        (header::CONTENT_LENGTH, (last - first + 1).to_string()),
        (header::CONTENT_RANGE, format!("bytes {first}-{last}/{len}")),
        (header::ACCEPT_RANGES, "bytes".into()),
    ];
    Ok((StatusCode::PARTIAL_CONTENT, headers, body).into_response())
}

/// Streams a file in 256 KiB chunks.
fn chunks(file: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    chunks_of(file)
}

/// Streams a reader in 256 KiB chunks.
fn chunks_of<R: tokio::io::AsyncRead + Unpin + Send>(
    file: R,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
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
) -> std::result::Result<StatusCode, Response> {
    blob_caller(&p).map_err(refused_early)?;
    if !vmgrid_proto::is_blob_ref(&hash) {
        return Err(refused_early(Error(
            StatusCode::BAD_REQUEST,
            format!("`{hash}` is not a blob hash (64 hex digits of blake3)"),
        )));
    }
    if shared.blobs.has(&hash) {
        shared.peek_mut(|e| e.reuse_blob(&hash, vmgrid_proto::now_ms()));
        return Ok(StatusCode::OK);
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    admit(&shared, &p, declared).map_err(refused_early)?;
    store(&shared, &p, &hash, body).await.map_err(refused_early)
}

/// Streams an admitted upload into the store, checking its size, the quota and its hash.
async fn store(shared: &S, p: &Principal, hash: &str, body: HttpBody) -> Result<StatusCode> {
    let charged = !matches!(p, Principal::Node(_));
    let limit = shared.max_blob_bytes;
    let mut up = shared.blobs.begin(hash).map_err(|e| storage("cannot start storing a blob", &e))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        if up.size() + chunk.len() as u64 > limit {
            return Err(too_big(limit));
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
            let ((), pending) = shared.call(|e| e.add_blob(hash, &owner, size, vmgrid_proto::now_ms()));
            shared.finish(pending).await?;
            Ok(StatusCode::CREATED)
        }
        Err(CommitError::Mismatch(why)) => Err(Error(StatusCode::BAD_REQUEST, why)),
        Err(CommitError::Io(e)) => Err(storage("cannot store a blob", &e)),
    }
}

#[cfg(test)]
#[path = "blobs_tests.rs"]
mod tests;

/// The nodes that share a blob, for a node that needs it (node credentials only).
pub async fn peers(
    AxState(shared): AxState<S>,
    Auth(p): Auth,
    Path(hash): Path<String>,
) -> Result<Json<PeersResponse>> {
    let name = super::node(&p)?;
    if !is_blob_ref(&hash) {
        return Err(Error(StatusCode::BAD_REQUEST, "not a blob hash".into()));
    }
    Ok(Json(PeersResponse { peers: shared.peek(|e| e.peers_of(&hash, name)) }))
}

/// A blob's pieces and the hash of each, for a node that fetches it from other nodes and checks
/// each piece it gets (node credentials only).
pub async fn pieces(AxState(shared): AxState<S>, Auth(p): Auth, Path(hash): Path<String>) -> Result<Json<Pieces>> {
    let name = super::node(&p)?;
    if !shared.blobs.has(&hash) {
        return Err(Error(StatusCode::NOT_FOUND, format!("no blob {hash}")));
    }
    // It serves the pieces it gets from now on: the nodes after it may ask it.
    shared.peek_mut(|e| e.started_fetching(name, &hash));
    let blobs = shared.blobs.clone();
    let pieces = tokio::task::spawn_blocking(move || blobs.pieces(&hash))
        .await
        .map_err(|e| Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| storage("cannot read a blob", &e))?;
    Ok(Json((*pieces).clone()))
}
