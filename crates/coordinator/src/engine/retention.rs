//! What the pool keeps, and for how long: finished jobs are dropped (with their specs, once no
//! job uses them) after the retention period, as HTCondor's history; every blob has the user
//! who uploaded it first, who is charged for its size against a quota; and the blobs no spec or
//! result (or running workflow) refers to any more can be collected. Ended workflows go after
//! the retention period too.

use std::collections::HashSet;
use std::sync::Arc;

use super::{ApiError, Engine};

/// How long a released checkpoint part waits before it may be collected.
pub const RELEASED_GRACE_MS: u64 = 60_000;
use crate::store::Op;

/// A blob the pool holds: who uploaded it first (and pays for it), its size, when.
#[derive(Debug, Clone)]
pub(super) struct BlobEntry {
    owner: Arc<str>,
    size: u64,
    created_ms: u64,
}

impl Engine {
    /// Job `id` reached a final state (completed or removed): it no longer counts against its
    /// owner's queue, and it is dropped once the retention period has passed.
    pub(super) fn finished(&mut self, id: u64) {
        let Some(j) = self.jobs.get(&id) else { return };
        let (owner, at) = (j.owner.clone(), j.finished_ms.unwrap_or(0));
        if let Some(n) = self.queued.get_mut(&*owner) {
            *n = n.saturating_sub(1);
        }
        self.final_by_time.insert((at, id));
    }

    /// Drops finished jobs older than the retention period, and specs no job uses any more. The
    /// jobs of a running workflow stay (their results are its progress and its nodes' inputs),
    /// set aside until it ends.
    pub(super) fn expire_finished(&mut self, now: u64) {
        let keep_from = now.saturating_sub(self.limits.retain_finished_ms);
        let due = self.final_by_time.first().is_some_and(|&(at, _)| at < keep_from);
        let in_use = if due { self.running_dag_specs() } else { Default::default() };
        while let Some(&(at, id)) = self.final_by_time.first() {
            if at >= keep_from {
                break;
            }
            self.final_by_time.pop_first();
            if let Some(&dag) = self.jobs.get(&id).and_then(|j| in_use.get(&j.spec_id)) {
                self.kept_for_dags.entry(dag).or_default().push((at, id));
                continue;
            }
            let Some(j) = self.jobs.remove(&id) else { continue };
            let jobs = &self.jobs;
            self.owners.removed(&j.owner, id, |first, last| jobs.range(first..=last).next().is_none());
            self.by_state[j.counted as usize] -= 1;
            self.store(Op::DeleteJob { id });
            let left = self.spec_jobs.entry(j.spec_id).or_default();
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.spec_jobs.remove(&j.spec_id);
                self.specs.remove(&j.spec_id);
                self.waiting.remove(&j.spec_id);
                self.store(Op::DeleteSpec { id: j.spec_id });
            }
        }
        self.expire_dags(keep_from);
    }

    /// How many more blob bytes `owner` may upload.
    pub fn blob_allowance(&self, owner: &str) -> u64 {
        let used = self.blob_bytes.get(owner).copied().unwrap_or(0);
        self.limits.max_blob_bytes_per_user.saturating_sub(used)
    }

    /// Checks that `owner` may store `size` more bytes of blobs.
    pub fn check_blob_quota(&self, owner: &str, size: u64) -> Result<(), ApiError> {
        if size > self.blob_allowance(owner) {
            return Err(ApiError::Forbidden(format!(
                "{owner} would hold more than {} MiB of files in the pool: remove old jobs (their files go with them)",
                self.limits.max_blob_bytes_per_user >> 20
            )));
        }
        Ok(())
    }

    /// A blob stored for `owner`, who is charged for it unless someone uploaded it before.
    pub fn add_blob(&mut self, hash: &str, owner: &str, size: u64, now: u64) {
        if self.blobs.contains_key(hash) {
            return;
        }
        let owner: Arc<str> = Arc::from(owner);
        *self.blob_bytes.entry(owner.clone()).or_default() += size;
        self.blobs.insert(hash.to_string(), BlobEntry { owner: owner.clone(), size, created_ms: now });
        self.store(Op::Blob { hash: hash.to_string(), owner: owner.to_string(), size, created_ms: now });
    }

    pub(super) fn load_blob(&mut self, hash: String, owner: String, size: u64, created_ms: u64) {
        let owner: Arc<str> = Arc::from(owner.as_str());
        *self.blob_bytes.entry(owner.clone()).or_default() += size;
        self.blobs.insert(hash, BlobEntry { owner, size, created_ms });
    }

    /// The blobs that no spec and no job's result refers to, uploaded before `before` (so an
    /// upload whose job is still being submitted is not taken).
    pub fn unreferenced_blobs(&self, before: u64, now: u64) -> Vec<String> {
        let mut used: HashSet<&str> = HashSet::new();
        for s in self.specs.values() {
            let spec = &s.spec;
            for f in spec.image.iter().chain(&spec.kernel).chain(&spec.initrd).chain(&spec.inputs) {
                used.insert(&f.blob);
            }
        }
        // A running workflow's nodes not yet released hold their files too.
        used.extend(self.dag_blobs());
        for j in self.jobs.values() {
            if let Some(r) = &j.result {
                for f in r.stdout.iter().chain(&r.stderr).chain(&r.outputs) {
                    used.insert(&f.blob);
                }
            }
            if let Some(ck) = j.ck.as_ref().and_then(|c| c.latest.as_ref()) {
                used.extend(ck.parts().map(|f| f.blob.as_str()));
            }
            for r in j.votes.iter().map(|v| &v.result) {
                used.extend(r.stdout.iter().chain(&r.stderr).chain(&r.outputs).map(|f| f.blob.as_str()));
            }
        }
        // A released checkpoint part needs no long grace period: it was recorded, so it is whole,
        // and an upload that found it since took it out of `released` (`reuse_blob`).
        let released_before = now.saturating_sub(RELEASED_GRACE_MS);
        self.blobs
            .iter()
            .filter(|(h, b)| {
                let released = self.released.get(*h).is_some_and(|&at| at <= released_before);
                (b.created_ms < before || released) && !used.contains(h.as_str())
            })
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// A blob was deleted from disk: nobody pays for it any more.
    pub fn drop_blob(&mut self, hash: &str) {
        self.released.remove(hash);
        if let Some(b) = self.blobs.remove(hash) {
            if let Some(n) = self.blob_bytes.get_mut(&*b.owner) {
                *n = n.saturating_sub(b.size);
            }
            self.store(Op::DeleteBlob { hash: hash.to_string() });
        }
    }

    pub(super) fn blob_size(&self, hash: &str) -> Option<u64> {
        self.blobs.get(hash).map(|b| b.size)
    }

    /// Starts a blob's grace period again (someone is about to refer to it).
    pub(super) fn refresh_blob(&mut self, hash: &str, now: u64) {
        if let Some(b) = self.blobs.get_mut(hash) {
            b.created_ms = b.created_ms.max(now);
        }
    }

    /// Whether the pool knows this blob (uploaded through it, and not collected).
    pub fn knows_blob(&self, hash: &str) -> bool {
        self.blobs.contains_key(hash)
    }
}
