//! Content-addressed blobs on disk: `blobs/ab/abcdef…`, named by the blake3 of their bytes. An
//! upload is hashed as it streams to a temporary file and kept only if the hash matches its name.

use std::io::Write;
use std::path::PathBuf;

use vmgrid_proto::{MAX_PIECE_BYTES, PIECE_BYTES, Piece, Pieces, is_blob_ref};

#[derive(Clone)]
pub struct Blobs {
    dir: PathBuf,
    /// Bytes sent by `GET /v1/blobs/{hash}` (what nodes fetching from each other spare the pool).
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The pieces of the blobs nodes fetched from each other lately, by hash (a few).
    pieces: std::sync::Arc<std::sync::Mutex<PiecesKept>>,
}

/// Blobs' pieces, the oldest forgotten first, and a gate per blob being read (so that nodes
/// asking at once wait for one reading).
#[derive(Default)]
struct PiecesKept {
    by_hash: std::collections::HashMap<String, std::sync::Arc<Pieces>>,
    order: std::collections::VecDeque<String>,
    reading: std::collections::HashMap<String, std::sync::Arc<std::sync::Mutex<()>>>,
}

/// The most blobs whose pieces are kept in memory.
const PIECES_KEPT: usize = 64;

impl Blobs {
    pub fn new(dir: PathBuf) -> std::io::Result<Blobs> {
        crate::files::private_dir(&dir)?;
        Ok(Blobs { dir, served: Default::default(), pieces: Default::default() })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, PiecesKept> {
        self.pieces.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts bytes sent of a blob.
    pub fn served(&self, bytes: u64) {
        self.served.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes sent of blobs so far.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A blob's pieces, cut where its content says (FastCDC, about [`PIECE_BYTES`]), and the hash
    /// of each, read once and then kept (for the last [`PIECES_KEPT`] blobs asked for). Blocks
    /// while it reads the blob.
    pub fn pieces(&self, hash: &str) -> std::io::Result<std::sync::Arc<Pieces>> {
        let gate = {
            let mut k = self.kept();
            if let Some(p) = k.by_hash.get(hash) {
                return Ok(p.clone());
            }
            k.reading.entry(hash.to_string()).or_default().clone()
        };
        let _one_reading = gate.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.kept().by_hash.get(hash) {
            return Ok(p.clone());
        }
        let read = self.read_pieces(hash);
        let mut k = self.kept();
        k.reading.remove(hash);
        let pieces = std::sync::Arc::new(read?);
        if k.order.len() >= PIECES_KEPT
            && let Some(oldest) = k.order.pop_front()
        {
            k.by_hash.remove(&oldest);
        }
        k.order.push_back(hash.to_string());
        k.by_hash.insert(hash.to_string(), pieces.clone());
        Ok(pieces)
    }

    /// A blob's pieces, read from its file.
    fn read_pieces(&self, hash: &str) -> std::io::Result<Pieces> {
        let path = self.path(hash).ok_or_else(|| std::io::Error::other("not a blob hash"))?;
        let file = std::fs::File::open(path)?;
        let (min, max) = ((PIECE_BYTES / 4) as u32, MAX_PIECE_BYTES as u32);
        let mut list = Vec::new();
        for c in fastcdc::v2020::StreamCDC::new(file, min, PIECE_BYTES as u32, max) {
            let c = c.map_err(|e| std::io::Error::other(e.to_string()))?;
            list.push(Piece {
                first: c.offset,
                len: c.length as u64,
                hash: blake3::hash(&c.data).to_hex().to_string(),
            });
        }
        let size = list.last().map_or(0, |p| p.first + p.len);
        Ok(Pieces { size, pieces: list })
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn path(&self, hash: &str) -> Option<PathBuf> {
        is_blob_ref(hash).then(|| self.dir.join(&hash[..2]).join(hash))
    }

    pub fn has(&self, hash: &str) -> bool {
        self.path(hash).is_some_and(|p| p.is_file())
    }

    /// Starts an upload; finish it with [`Upload::commit`].
    pub fn begin(&self, hash: &str) -> std::io::Result<Upload> {
        let dest = self.path(hash).ok_or_else(|| std::io::Error::other("not a blob hash"))?;
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        Ok(Upload { dest, tmp, hasher: blake3::Hasher::new(), expected: hash.to_string(), size: 0 })
    }
}

pub struct Upload {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    hasher: blake3::Hasher,
    expected: String,
    size: u64,
}

impl Upload {
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        self.tmp.write_all(chunk)
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Keeps the blob if its bytes hash to its name.
    pub fn commit(self) -> Result<(), CommitError> {
        let got = self.hasher.finalize().to_hex().to_string();
        if got != self.expected {
            return Err(CommitError::Mismatch(format!("the uploaded bytes hash to {got}, not {}", self.expected)));
        }
        self.tmp.as_file().sync_all()?;
        if let Some(parent) = self.dest.parent() {
            crate::files::private_dir(parent)?;
        }
        self.tmp.persist(&self.dest).map_err(|e| e.error)?;
        crate::files::sync_dir(self.dest.parent().unwrap_or(&self.dest))?;
        Ok(())
    }
}

/// Why an upload was not kept: the caller's bytes, or this host's disk.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Bytes free on the filesystem holding `dir`, for an unprivileged writer.
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; `c` is a NUL-terminated path that
    // outlives the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above: valid pointers for the duration of the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Room the coordinator keeps free on its disk for the job store: uploads that would eat into it
/// are refused (507), so blobs cannot fill the disk under the store.
pub fn reserve(dir: &std::path::Path) -> u64 {
    let total = {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok();
        c.and_then(|c| {
            // SAFETY: as in `free_bytes`.
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: as in `free_bytes`.
            (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0).then(|| s.f_blocks as u64 * s.f_frsize as u64)
        })
        .unwrap_or(0)
    };
    (total / 50).clamp(64 << 20, 1 << 30)
}

/// How long an uploaded blob waits for a job to refer to it before it may be collected.
const GRACE_MS: u64 = 3600 * 1000;
/// How often unreferenced blobs are collected.
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Released checkpoint parts past this many bytes are collected at once, not at the next round.
const RELEASED_COLLECT_BYTES: u64 = 256 << 20;
/// When such an early collection last started (ms).
static LAST_EARLY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Collects replaced checkpoints' parts now if they add up (at most every 10 s): a job
/// checkpointed every few seconds would otherwise leave gigabytes until the next round.
pub fn collect_released_soon(shared: &std::sync::Arc<crate::core::Shared>) {
    use std::sync::atomic::Ordering;
    let now = vmgrid_proto::now_ms();
    let last = LAST_EARLY.load(Ordering::Relaxed);
    if now < last + 10_000 || shared.peek(|e| e.released_bytes()) < RELEASED_COLLECT_BYTES {
        return;
    }
    if LAST_EARLY.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        let shared = shared.clone();
        tokio::spawn(async move { collect(&shared).await });
    }
}

/// Deletes the blobs no spec and no result refers to any more (after a grace period), and stops
/// charging their owners for them.
pub async fn collect_loop(shared: std::sync::Arc<crate::core::Shared>) {
    let mut every = tokio::time::interval(COLLECT_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        collect(&shared).await;
    }
}

pub async fn collect(shared: &crate::core::Shared) -> usize {
    let now = vmgrid_proto::now_ms();
    let (garbage, pending) = shared.call(|e| e.unreferenced_blobs(now.saturating_sub(GRACE_MS), now));
    if shared.finish(pending).await.is_err() {
        return 0;
    }
    let mut gone = Vec::new();
    for hash in garbage {
        if let Some(p) = shared.blobs.path(&hash) {
            match std::fs::remove_file(&p) {
                Ok(()) => gone.push(hash),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone.push(hash),
                Err(e) => tracing::warn!(blob = %hash, "cannot delete an unreferenced blob: {e}"),
            }
        }
    }
    let n = gone.len();
    if n > 0 {
        let ((), pending) = shared.call(|e| gone.iter().for_each(|h| e.drop_blob(h)));
        let _ = shared.finish(pending).await;
        tracing::info!(blobs = n, "collected unreferenced blobs");
    }
    n
}
