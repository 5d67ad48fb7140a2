//! The node's blob cache: images and inputs by hash, shared by every job on the node, bounded in
//! size. A blob is fetched once; concurrent jobs that need the same blob wait for one download.
//! Least recently used blobs are evicted when the cache grows past its bound.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmgrid_client::Client;
use vmgrid_proto::{CacheStats, FileRef, PEER_MIN_BYTES, is_blob_ref};

/// How stale a cached blob's time of use may get: it is brought up to date when older.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
    fetching: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// What it holds, as of its last change (heartbeats report it).
    stats: Mutex<CacheStats>,
    /// Large blobs come from other nodes too, once the pool gave this node a peer identity.
    pub peering: std::sync::OnceLock<Arc<crate::peer::Peering>>,
}

impl BlobCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> std::io::Result<BlobCache> {
        std::fs::create_dir_all(&dir)?;
        let cache = BlobCache {
            dir,
            max_bytes,
            fetching: Mutex::new(HashMap::new()),
            stats: Mutex::default(),
            peering: std::sync::OnceLock::new(),
        };
        cache.evict(None);
        Ok(cache)
    }

    /// How many blobs it holds, their bytes, and its bound.
    pub fn stats(&self) -> CacheStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The local path of a blob, fetched from the pool if it is not here yet.
    pub fn get(&self, client: &Client, hash: &str) -> Result<PathBuf, String> {
        self.get_with(hash, |path| client.download(hash, path).map(|_| ()).map_err(|e| e.to_string()))
    }

    /// The local path of file `f`'s blob: a large one fetched in pieces from the nodes that
    /// share it (and the pool), a small one from the pool.
    pub fn get_file(&self, client: &Client, f: &FileRef) -> Result<PathBuf, String> {
        match self.peering.get().filter(|_| f.size >= PEER_MIN_BYTES) {
            // Whatever stops a fetch in pieces (the pool cannot list them, say), the pool alone
            // serves the whole blob.
            Some(peering) => self.get_with(&f.blob, |path| {
                peering.fetch(client, f, path).or_else(|e| {
                    tracing::warn!(blob = %f.blob, "fetching from the pool alone: {e}");
                    client.download(&f.blob, path).map(|_| ()).map_err(|e| e.to_string())
                })
            }),
            None => self.get(client, &f.blob),
        }
    }

    fn get_with(
        &self,
        hash: &str,
        fetch: impl FnOnce(&std::path::Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        if !is_blob_ref(hash) {
            return Err(format!("`{hash}` is not a blob hash"));
        }
        let path = self.dir.join(hash);
        let gate = self.fetching.lock().unwrap().entry(hash.to_string()).or_default().clone();
        let _one_at_a_time = gate.lock().unwrap();
        if let Some(m) = std::fs::metadata(&path).ok().filter(|m| m.is_file()) {
            // Touch it: eviction takes the least recently used. At most once a minute: the
            // runtime keeps a module it linked by the file's modification time, so touching it at
            // every job would make it load the module again for each (measured: most of a
            // trivial job's cost on the node).
            let now = std::time::SystemTime::now();
            let stale = m.modified().ok().and_then(|t| now.duration_since(t).ok()).is_none_or(|age| age >= TOUCH_EVERY);
            if stale {
                let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(now));
            }
            return Ok(path);
        }
        fetch(&path)?;
        tracing::debug!(blob = hash, "fetched into the cache");
        self.evict(Some(&path));
        Ok(path)
    }

    /// Evicts the least recently used blobs (never `keep`) past the bound, and counts the rest.
    fn evict(&self, keep: Option<&PathBuf>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, p) in files {
            if total <= self.max_bytes {
                break;
            }
            if Some(&p) != keep && std::fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
        let blobs = std::fs::read_dir(&self.dir).map_or(0, |d| d.filter_map(Result::ok).count() as u64);
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) =
            CacheStats { blobs, bytes: total, max_bytes: self.max_bytes };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_used_again_soon_keeps_its_modification_time_and_an_old_one_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().to_path_buf(), 1 << 20).unwrap();
        let hash = "ab".repeat(32);
        let path = dir.path().join(&hash);
        std::fs::write(&path, b"module").unwrap();
        // Never asked for: the blob is here, so no call is made.
        let client = Client::new("http://127.0.0.1:9", "unused");
        let recently = std::time::SystemTime::now() - std::time::Duration::from_secs(5);
        std::fs::File::open(&path).unwrap().set_modified(recently).unwrap();
        assert_eq!(cache.get(&client, &hash).unwrap(), path);
        // The runtime keeps a linked module by this time: a job a moment later must not change it.
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), recently);
        let long_ago = std::time::SystemTime::now() - TOUCH_EVERY * 2;
        std::fs::File::open(&path).unwrap().set_modified(long_ago).unwrap();
        cache.get(&client, &hash).unwrap();
        assert!(std::fs::metadata(&path).unwrap().modified().unwrap() > long_ago + TOUCH_EVERY, "touched for eviction");
    }
}
