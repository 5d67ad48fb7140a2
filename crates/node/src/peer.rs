//! Blobs between nodes, the node's side. A large blob ([`PEER_MIN_BYTES`] and up) is fetched in
//! pieces cut where its content says (about [`PIECE_BYTES`]), each checked against the hash the
//! pool gives for it: from this node's own cache when another blob it holds has the same piece
//! (an image changed in place or by an insertion shares most of its pieces with the old one),
//! from the nodes the pool says share it, and from the pool for a piece none of them serves. The
//! download goes to `partial/HASH` and resumes from the pieces already there after a cut; the
//! whole blob is checked against its hash before it enters the cache. Meanwhile the node serves the pieces
//! it has, whole blobs and partial ones, to the pool's other nodes: over TLS with the certificate
//! the pool's CA issued it, to clients that show one from that CA too, at a bounded rate.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmgrid_client::Client;
use vmgrid_proto::*;

/// Connections served at once; more are closed at once (their callers try another node).
const MAX_SERVING: usize = 16;
/// How long a peer has to send a request, or to take a piece.
const PEER_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How many nodes a piece is asked of before the pool is.
const TRIES_PER_PIECE: usize = 3;
/// How long a caller has for its TLS handshake and request; a node asked for a piece, to answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// A node renews its certificate for serving blobs when it is this old (it lasts a day).
const RENEW_AFTER: Duration = Duration::from_secs(12 * 3600);
/// A partial download not touched for this long is dropped when the node starts.
const PARTIAL_KEPT: Duration = Duration::from_secs(24 * 3600);

/// This node's part in sharing blobs.
pub struct Peering {
    /// The blob cache's directory (whole blobs, by hash) and where partial downloads go.
    blobs: PathBuf,
    partial_dir: PathBuf,
    /// The pieces of the blobs it fetched this way (`pieces/HASH`, JSON), to reuse them.
    pieces_dir: PathBuf,
    partial: Mutex<HashMap<String, Arc<Partial>>>,
    /// Talks to other nodes (trusts the pool's peer CA and shows this node's certificate), the
    /// TLS it serves them with, and when its certificate was issued; renewed together.
    tls: Mutex<(ureq::Agent, Arc<rustls::ServerConfig>, Instant)>,
    upload: RateLimit,
    serving: AtomicUsize,
    /// Where to start in a blob's pieces (so that nodes fetching one blob start apart).
    seed: u64,
}

/// A download in progress: which of its pieces are here (and checked).
struct Partial {
    path: PathBuf,
    pieces: Pieces,
    have: Mutex<Vec<bool>>,
}

impl Peering {
    /// Sharing for a node whose cache is `blobs`, with `identity` from the pool, sending at most
    /// `upload_bytes_s` to other nodes.
    pub fn new(identity: &PeerIdentity, blobs: &Path, name: &str, upload_bytes_s: u64) -> Result<Peering, String> {
        let partial_dir = blobs.with_file_name("partial");
        let pieces_dir = blobs.with_file_name("pieces");
        for d in [&partial_dir, &pieces_dir] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        prune(&partial_dir);
        Ok(Peering {
            blobs: blobs.to_path_buf(),
            partial_dir,
            pieces_dir,
            partial: Mutex::default(),
            tls: Mutex::new(tls_of(identity)?),
            upload: RateLimit::new(upload_bytes_s),
            serving: AtomicUsize::new(0),
            seed: u64::from_le_bytes(blake3::hash(name.as_bytes()).as_bytes()[..8].try_into().expect("8 bytes")),
        })
    }

    /// Whether this node's certificate is due to be renewed.
    pub fn renew_due(&self) -> bool {
        lock(&self.tls).2.elapsed() >= RENEW_AFTER
    }

    /// Serves and fetches with `identity` from now on.
    pub fn renew(&self, identity: &PeerIdentity) {
        match tls_of(identity) {
            Ok(tls) => *lock(&self.tls) = tls,
            Err(e) => tracing::warn!("cannot use the pool's new certificate for serving blobs: {e}"),
        }
    }

    fn agent(&self) -> ureq::Agent {
        lock(&self.tls).0.clone()
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        lock(&self.tls).1.clone()
    }
    /// The large blobs this node holds, whole or in part: what it tells the pool it shares.
    pub fn sharing(&self) -> Vec<String> {
        let mut out: Vec<String> = lock(&self.partial).keys().cloned().collect();
        if let Ok(dir) = std::fs::read_dir(&self.blobs) {
            for e in dir.filter_map(Result::ok) {
                let big = e.metadata().is_ok_and(|m| m.is_file() && m.len() >= PEER_MIN_BYTES);
                match e.file_name().into_string() {
                    Ok(name) if big && is_blob_ref(&name) => out.push(name),
                    _ => {}
                }
                if out.len() >= MAX_SHARING {
                    break;
                }
            }
        }
        out
    }

    /// Fetches blob `f` into `dest`: its pieces from other nodes where they have them, else
    /// from the pool, each checked; then the whole, checked against its hash.
    pub fn fetch(&self, client: &Client, f: &FileRef, dest: &Path) -> Result<(), String> {
        let pieces = client.pieces(&f.blob).map_err(|e| e.to_string())?;
        // The pool's size, not the one the job's spec says: the whole is checked by its hash.
        pieces.check().map_err(|e| format!("the pool's pieces of blob {}: {e}", f.blob))?;
        let part = self.start(&f.blob, pieces)?;
        let result = self.fill(client, &f.blob, &part);
        lock(&self.partial).remove(&f.blob);
        result?;
        let (got, _) = vmgrid_client::hash_file(&part.path).map_err(|e| e.to_string())?;
        if got != f.blob {
            let _ = std::fs::remove_file(&part.path);
            return Err(format!("blob {} put together from its pieces has hash {got}", f.blob));
        }
        // Its pieces, for a later blob that shares some.
        let _ = serde_json::to_vec(&part.pieces).map(|j| std::fs::write(self.pieces_dir.join(&f.blob), j));
        std::fs::rename(&part.path, dest).map_err(|e| format!("cannot move blob {} into the cache: {e}", f.blob))
    }

    /// Where this node's cached blobs hold each piece it knows of (from the pieces of the blobs
    /// it fetched in pieces, still in its cache): piece hash, then file, first byte and length.
    fn local_pieces(&self) -> HashMap<String, (PathBuf, u64, u64)> {
        let mut out = HashMap::new();
        let Ok(dir) = std::fs::read_dir(&self.pieces_dir) else { return out };
        for e in dir.filter_map(Result::ok).take(64) {
            let blob = self.blobs.join(e.file_name());
            if !blob.is_file() {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Ok(pieces) = std::fs::read(e.path()).map(|b| serde_json::from_slice::<Pieces>(&b)) else { continue };
            for p in pieces.into_iter().flat_map(|p| p.pieces) {
                out.insert(p.hash, (blob.clone(), p.first, p.len));
            }
        }
        out
    }

    /// The download of `hash` into `partial/HASH`, with the pieces a cut one left there (checked
    /// again) counted as here; it is served as it fills.
    fn start(&self, hash: &str, pieces: Pieces) -> Result<Arc<Partial>, String> {
        let path = self.partial_dir.join(hash);
        let io = |e: std::io::Error| format!("cannot keep a partial download of blob {hash}: {e}");
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let resumed = file.metadata().map_err(io)?.len() == pieces.size;
        file.set_len(pieces.size).map_err(io)?;
        let mut have = vec![false; pieces.pieces.len()];
        if resumed {
            let mut buf = vec![0u8; MAX_PIECE_BYTES as usize];
            for (i, p) in pieces.pieces.iter().enumerate() {
                let chunk = &mut buf[..p.len as usize];
                file.seek(SeekFrom::Start(p.first)).and_then(|_| file.read_exact(chunk)).map_err(io)?;
                have[i] = blake3::hash(chunk).to_hex().as_str() == p.hash;
            }
            let kept = have.iter().filter(|h| **h).count();
            tracing::info!(blob = hash, pieces = kept, of = have.len(), "resuming a cut download");
        }
        let part = Arc::new(Partial { path, pieces, have: Mutex::new(have) });
        lock(&self.partial).insert(hash.to_string(), part.clone());
        Ok(part)
    }

    /// Fetches the pieces of `part` it lacks, starting at a place of this node's own: from its
    /// own cache, from other nodes, from the pool.
    fn fill(&self, client: &Client, hash: &str, part: &Partial) -> Result<(), String> {
        let n = part.pieces.pieces.len();
        let start = (self.seed as usize) % n.max(1);
        let mut file = std::fs::OpenOptions::new().write(true).open(&part.path).map_err(|e| e.to_string())?;
        let local = self.local_pieces();
        // A node that failed once (unreachable, no answer in time, a piece that does not match)
        // is not asked again during this fetch.
        let mut bad: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut peers: Vec<Peer> = Vec::new();
        let (mut here, mut from_peers, mut from_pool, mut fetched) = (0u64, 0u64, 0u64, 0usize);
        for k in 0..n {
            let i = (start + k) % n;
            if lock(&part.have)[i] {
                continue;
            }
            if fetched % 8 == 0 {
                peers = client.peers(hash).unwrap_or_default();
                peers.retain(|p| !bad.contains(&p.node));
            }
            fetched += 1;
            let p = &part.pieces.pieces[i];
            let ok = |b: &Vec<u8>| b.len() as u64 == p.len && blake3::hash(b).to_hex().as_str() == p.hash;
            let bytes = if let Some(b) =
                local.get(&p.hash).and_then(|(f, first, len)| read_range(f, *first, *len)).filter(ok)
            {
                here += p.len;
                b
            } else if let Some(b) = self.ask_peers(&mut peers, &mut bad, k, |peer| {
                // A piece that does not match its hash marks the node that sent it.
                self.piece_of(peer, hash, p.first, p.len).and_then(|b| match b {
                    Some(b) if !ok(&b) => Err(()),
                    b => Ok(b),
                })
            }) {
                from_peers += p.len;
                b
            } else {
                let b = client.blob_range(hash, p.first, p.len).map_err(|e| e.to_string())?;
                if !ok(&b) {
                    return Err(format!("a piece of blob {hash} from the pool does not match its hash"));
                }
                from_pool += p.len;
                b
            };
            file.seek(SeekFrom::Start(p.first)).and_then(|_| file.write_all(&bytes)).map_err(|e| e.to_string())?;
            lock(&part.have)[i] = true;
        }
        file.sync_all().map_err(|e| e.to_string())?;
        tracing::info!(blob = hash, here, from_peers, from_pool, "fetched a blob in pieces");
        Ok(())
    }

    /// A piece from one of `peers`, asked in turn from the `k`th on, at most
    /// [`TRIES_PER_PIECE`] of them; one that fails is marked `bad` and dropped. A node that does
    /// not have the piece (yet) is not a failure.
    fn ask_peers(
        &self,
        peers: &mut Vec<Peer>,
        bad: &mut std::collections::HashSet<String>,
        k: usize,
        get: impl Fn(&Peer) -> Result<Option<Vec<u8>>, ()>,
    ) -> Option<Vec<u8>> {
        for t in 0..TRIES_PER_PIECE.min(peers.len()) {
            let peer = &peers[(k + t) % peers.len()];
            match get(peer) {
                Ok(Some(b)) => {
                    peers.retain(|p| !bad.contains(&p.node));
                    return Some(b);
                }
                Ok(None) => {}
                Err(()) => {
                    bad.insert(peer.node.clone());
                }
            }
        }
        peers.retain(|p| !bad.contains(&p.node));
        None
    }

    /// The piece of `hash` at `first` of `len` bytes from node `p`: `Ok(None)` if it does not
    /// have it, `Err` if it did not answer well.
    fn piece_of(&self, p: &Peer, hash: &str, first: u64, len: u64) -> Result<Option<Vec<u8>>, ()> {
        let resp = self.agent().get(format!("https://{}/pieces/{hash}/{first}/{len}", p.endpoint)).call();
        match resp {
            Ok(mut r) if r.status() == 200 => {
                r.body_mut().with_config().limit(MAX_PIECE_BYTES).read_to_vec().map(Some).map_err(|_| ())
            }
            Ok(r) if r.status() == 404 => Ok(None),
            Ok(_) => Err(()),
            Err(e) => {
                tracing::debug!(peer = %p.node, "cannot fetch a piece: {e}");
                Err(())
            }
        }
    }

    /// Where the piece of blob `hash` at `first` of `len` bytes is, if this node has it: any
    /// range of a whole blob in its cache, or a piece of a partial download it has checked.
    fn piece(&self, hash: &str, first: u64, len: u64) -> Option<PathBuf> {
        if !is_blob_ref(hash) || len == 0 || len > MAX_PIECE_BYTES {
            return None;
        }
        let path = match lock(&self.partial).get(hash) {
            Some(part) => {
                let i = part.pieces.pieces.iter().position(|p| p.first == first && p.len == len)?;
                lock(&part.have)[i].then(|| part.path.clone())?
            }
            None => self.blobs.join(hash),
        };
        let size = std::fs::metadata(&path).ok().filter(|m| m.is_file())?.len();
        (first.checked_add(len)? <= size).then_some(path)
    }
}

/// What serving and fetching with `identity` need: an agent that trusts the pool's peer CA and
/// shows the node's certificate, the server's TLS, and now.
fn tls_of(identity: &PeerIdentity) -> Result<(ureq::Agent, Arc<rustls::ServerConfig>, Instant), String> {
    let id = vmgrid_tls::Identity { cert_pem: identity.cert_pem.clone(), key_pem: identity.key_pem.clone() };
    let server = vmgrid_tls::peer_server_config(&id, &identity.ca_pem).map_err(|e| e.to_string())?;
    let certs = |pem: &str| -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
        Ok(vmgrid_tls::certs(pem, "a peer certificate")
            .map_err(|e| e.to_string())?
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c).to_owned())
            .collect())
    };
    let key = ureq::tls::PrivateKey::from_pem(identity.key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(vmgrid_tls::client_provider())
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs(&identity.ca_pem)?)))
        .client_cert(Some(ureq::tls::ClientCert::new_with_certs(&certs(&identity.cert_pem)?, key)))
        .build();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_global(Some(PEER_IO_TIMEOUT))
        .tls_config(tls)
        .build()
        .into();
    Ok((agent, server, Instant::now()))
}

/// Drops the partial downloads in `dir` not touched for [`PARTIAL_KEPT`].
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if old.is_some_and(|age| age >= PARTIAL_KEPT) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `len` bytes of file `path` from byte `first`, if it has them.
fn read_range(path: &Path, first: u64, len: u64) -> Option<Vec<u8>> {
    let mut file = std::fs::File::open(path).ok()?;
    if file.metadata().ok()?.len() < first.checked_add(len)? {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    file.seek(SeekFrom::Start(first)).and_then(|_| file.read_exact(&mut buf)).ok()?;
    Some(buf)
}

/// The address other nodes reach `listener` at: its own, or, where it listens on every address,
/// the one this host reaches the pool `pool` from (the first of its URLs).
pub fn advertised(listener: &TcpListener, pool: &str) -> std::io::Result<std::net::SocketAddr> {
    let mut addr = listener.local_addr()?;
    if addr.ip().is_unspecified() {
        let url = pool.split(',').next().unwrap_or("").trim();
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
        let host = rest.split('/').next().unwrap_or("");
        // A URL without a port has its scheme's.
        let has_port = host.rsplit_once(':').is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok());
        let host =
            if has_port { host.to_string() } else { format!("{host}:{}", if scheme == "http" { 80 } else { 443 }) };
        let target = std::net::ToSocketAddrs::to_socket_addrs(&host)?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("cannot resolve the pool's address {host}")))?;
        let probe = std::net::UdpSocket::bind((if target.is_ipv4() { "0.0.0.0" } else { "::" }, 0))?;
        probe.connect(target)?;
        addr.set_ip(probe.local_addr()?.ip());
    }
    Ok(addr)
}

/// Serves pieces to the pool's other nodes on `listener`, each connection on a thread of its
/// own, at most [`MAX_SERVING`] at once.
pub fn serve(listener: TcpListener, peering: Arc<Peering>) -> std::io::Result<()> {
    std::thread::Builder::new().name("vmgrid-peer".into()).spawn(move || {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::debug!("cannot accept a peer: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if peering.serving.fetch_add(1, Ordering::SeqCst) >= MAX_SERVING {
                peering.serving.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let p = peering.clone();
            let spawned = std::thread::Builder::new().name("vmgrid-peer-conn".into()).spawn(move || {
                if let Err(e) = answer(conn, &p) {
                    tracing::debug!("a peer's request failed: {e}");
                }
                p.serving.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                peering.serving.fetch_sub(1, Ordering::SeqCst);
            }
        }
    })?;
    Ok(())
}

/// One request: `GET /pieces/HASH/FIRST/LEN`, answered with the piece or 404, then closed. The
/// handshake and the request must come within [`REQUEST_DEADLINE`], and the answer is taken at
/// no less than a quarter of the upload bound.
fn answer(conn: TcpStream, p: &Peering) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let server = rustls::ServerConnection::new(p.server_config()).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(server, conn);
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
        let Some(left) = left else { return Err(std::io::Error::other("no request in time")) };
        stream.sock.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() + n > 4096 {
            return Err(std::io::Error::other("no request"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let target = line.strip_prefix("GET ").and_then(|l| l.split(' ').next()).unwrap_or("");
    let piece = target.strip_prefix("/pieces/").and_then(|rest| {
        let mut parts = rest.split('/');
        let (hash, first, len) = (parts.next()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
        p.piece(hash, first, len).map(|path| (path, first, len))
    });
    let Some((path, first, len)) = piece else {
        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return close(stream);
    };
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(first))?;
    stream.sock.set_write_timeout(Some(PEER_IO_TIMEOUT))?;
    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")?;
    let mut chunk = vec![0u8; 256 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.read_exact(&mut chunk[..n])?;
        p.upload.take(n as u64);
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    close(stream)
}

fn close(mut stream: rustls::StreamOwned<rustls::ServerConnection, TcpStream>) -> std::io::Result<()> {
    stream.flush()?;
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
    Ok(())
}

/// A bound on bytes a second, shared by every connection.
struct RateLimit {
    bytes_s: f64,
    state: Mutex<(Instant, f64)>,
}

impl RateLimit {
    fn new(bytes_s: u64) -> RateLimit {
        RateLimit { bytes_s: bytes_s.max(1) as f64, state: Mutex::new((Instant::now(), 0.0)) }
    }

    /// Waits until `n` more bytes may go.
    fn take(&self, n: u64) {
        let wait = {
            let mut s = lock(&self.state);
            let now = Instant::now();
            // A second's worth may go at once.
            let tokens = (s.1 + now.duration_since(s.0).as_secs_f64() * self.bytes_s).min(self.bytes_s);
            *s = (now, tokens - n as f64);
            (n as f64 - tokens).max(0.0) / self.bytes_s
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
