//! QEMU jobs' checkpoints: a node records each complete one under the job's lease; a job that
//! goes back to the pool (its node lost, drained or told to vacate) resumes from its latest on
//! the next node. A checkpoint is recorded only when every part of it is a blob the pool holds,
//! so one cut off mid-upload is never used; the blobs of older checkpoints are then collected as
//! unreferenced.

use std::sync::Arc;

use vmgrid_proto::*;

use super::{ApiError, Engine};
use crate::store::MAX_RESUME_FAILURES;

/// How long a vacated job keeps away from the node it left, if another node can take it.
pub const AVOID_MS: u64 = 30_000;
/// How long a job waits for a ready node that can resume its checkpoint before it is given up
/// (the job then starts afresh): an hour.
pub const UNRESUMABLE_MS: u64 = 3_600_000;
/// How far past a job's latest checkpoint the next may be numbered (a node numbers the ones it
/// could not store too).
const MAX_SEQ_STEP: u64 = 1_000_000;

impl Engine {
    /// Records a node's checkpoint of a job it runs under `req.lease`.
    pub fn checkpoint(&mut self, name: &str, req: &CheckpointRequest, now: u64) -> Result<(), ApiError> {
        self.live_node(name, now)?;
        let l = req.lease;
        if let Some(why) = self.stale_lease(name, l) {
            return Err(ApiError::Conflict(format!("checkpoint of job {} refused: {why}", l.job_id)));
        }
        let ck = &req.checkpoint;
        let j = &self.jobs[&l.job_id];
        if self.specs.get(&j.spec_id).is_none_or(|s| s.spec.checkpoint_s.is_none()) {
            return Err(ApiError::BadRequest(format!("job {} does not ask for checkpoints (checkpoint_s)", l.job_id)));
        }
        let latest = j.ck.as_ref().and_then(|c| c.latest.as_ref()).map_or(0, |c| c.seq);
        if ck.seq <= latest {
            return Err(ApiError::Conflict(format!(
                "checkpoint {} of job {} is not newer than its latest, {latest}",
                ck.seq, l.job_id
            )));
        }
        if ck.accel != "tcg" && ck.accel != "kvm" {
            return Err(ApiError::BadRequest(format!("unknown accelerator {:?}: tcg or kvm", ck.accel)));
        }
        let spec = &self.specs[&j.spec_id].spec;
        if !ck.guest_s.is_finite() || ck.guest_s < 0.0 || ck.guest_s > spec.timeout_s as f64 + 60.0 {
            return Err(ApiError::BadRequest(format!(
                "guest_s must be a number of seconds from 0 to the job's timeout_s ({})",
                spec.timeout_s
            )));
        }
        if ck.seq > latest.saturating_add(MAX_SEQ_STEP) {
            return Err(ApiError::BadRequest(format!("checkpoint {} is too far past the latest, {latest}", ck.seq)));
        }
        if spec.image.is_some() != ck.overlay.is_some() {
            return Err(ApiError::BadRequest(format!(
                "checkpoint {}: an overlay goes with a job that has an image, and only then",
                ck.seq
            )));
        }
        for (name, file) in ck.files() {
            file.check().map_err(|e| ApiError::BadRequest(format!("checkpoint {}'s {name}: {e}", ck.seq)))?;
            if let Some(c) =
                file.chunks.iter().find(|c| self.blob_size(&c.blob).is_some_and(|n| n > MAX_PACKED_CHUNK_BYTES))
            {
                return Err(ApiError::BadRequest(format!(
                    "checkpoint {}'s {name}: chunk `{}` is a blob larger than a chunk can be ({MAX_PACKED_CHUNK_BYTES} bytes)",
                    ck.seq, c.path
                )));
            }
        }
        for f in ck.parts() {
            if f.inline.is_some() || !is_blob_ref(&f.blob) {
                return Err(ApiError::BadRequest(format!("checkpoint part `{}` must be a blob reference", f.path)));
            }
            if !self.knows_blob(&f.blob) {
                return Err(ApiError::BadRequest(format!(
                    "checkpoint part `{}` ({}) is not in the pool: upload every part first",
                    f.path, f.blob
                )));
            }
        }
        let taken_with = self.nodes.get(name).and_then(|n| n.ad.qemu.clone());
        let j = self.jobs.get_mut(&l.job_id).expect("checked above");
        let stored = j.ck.get_or_insert_with(Box::default);
        let old = stored.latest.replace(ck.clone());
        stored.taken_with = taken_with;
        for f in ck.parts() {
            self.released.remove(&f.blob);
        }
        // The VM resumed well enough to be checkpointed again.
        stored.failed_on.clear();
        self.release(old, Some(ck), now);
        self.persist(l.job_id, false);
        Ok(())
    }

    /// A checkpoint no longer needed (replaced by `by`, or given up): its parts that `by` does not
    /// share are collected once nothing else refers to them.
    pub(super) fn release(&mut self, old: Option<Checkpoint>, by: Option<&Checkpoint>, now: u64) {
        let Some(old) = old else { return };
        let kept: std::collections::HashSet<&str> =
            by.map(|b| b.parts().map(|f| f.blob.as_str()).collect()).unwrap_or_default();
        for f in old.parts().filter(|f| !kept.contains(&f.blob.as_str())) {
            self.released.insert(f.blob.clone(), now);
        }
    }

    /// Bytes of released checkpoint parts not yet collected.
    pub fn released_bytes(&self) -> u64 {
        self.released.keys().filter_map(|h| self.blob_size(h)).fold(0, u64::saturating_add)
    }

    /// Someone was told the pool has this blob (an upload found it there): a released
    /// checkpoint part it was is not collected early, and the blob's grace period starts again.
    pub fn reuse_blob(&mut self, hash: &str, now: u64) {
        self.released.remove(hash);
        self.refresh_blob(hash, now);
    }

    /// Node `node` found the checkpoint job `id` was to resume from unusable (a part refused or
    /// unreadable, or QEMU could not load it); once [`MAX_RESUME_FAILURES`] different nodes have,
    /// it is given up and the job starts afresh. Returns what the job's reason should add.
    pub(super) fn resume_failed(&mut self, id: u64, node: &str, now: u64) -> Option<String> {
        let j = self.jobs.get_mut(&id)?;
        let ck = j.ck.as_deref_mut()?;
        let latest = ck.latest.as_ref()?.seq;
        if ck.resumed_from != Some(latest) {
            return None;
        }
        if !ck.failed_on.iter().any(|n| n == node) {
            ck.failed_on.push(node.to_string());
        }
        if ck.failed_on.len() < MAX_RESUME_FAILURES {
            return None;
        }
        ck.failed_on.clear();
        ck.taken_with = None;
        let old = ck.latest.take();
        self.release(old, None, now);
        Some(format!("; {MAX_RESUME_FAILURES} nodes could not resume checkpoint {latest}, so the job starts afresh"))
    }

    /// `vmgrid vacate`: a running job with checkpoints is checkpointed by its node and moved.
    pub(super) fn vacate(&mut self, id: u64, now: u64) -> Result<JobView, String> {
        let j = &self.jobs[&id];
        if j.state != JobState::Running {
            return Err(format!("job {id} is {}, not running", j.state.as_str()));
        }
        if self.specs.get(&j.spec_id).is_none_or(|s| s.spec.checkpoint_s.is_none()) {
            return Err(format!(
                "job {id} takes no checkpoints (no `checkpoint_s` in its [policy]), so it cannot move without starting over; `vmgrid hold` and `release` restart it"
            ));
        }
        let node = j.node.clone();
        self.jobs.get_mut(&id).expect("checked above").vacating = true;
        // Placed and not collected by its node yet: it goes back at once (a node that queued it
        // hands it back unstarted when it hears of the vacate).
        if node.as_deref().and_then(|n| self.nodes.get(n)).is_some_and(|n| n.pending.contains(&id)) {
            self.requeue(id, now, "vacated before its node started it".into());
        }
        Ok(self.view(&self.jobs[&id]))
    }

    /// Job `id`'s node stopped it right after checkpoint `seq`: it goes back to the pool and
    /// resumes from there, without counting against its retries or losses. If that checkpoint
    /// was not recorded, the node's stop is a loss like any other.
    pub(super) fn vacated(&mut self, id: u64, seq: u64, now: u64) {
        let j = &self.jobs[&id];
        let node = j.node.clone().unwrap_or_else(|| Arc::from("?"));
        let recorded = j.ck.as_ref().and_then(|c| c.latest.as_ref()).is_some_and(|c| c.seq == seq);
        if !recorded {
            return self.requeue(id, now, format!("node {node} stopped it, but its checkpoint {seq} was not recorded"));
        }
        let vacating = j.vacating;
        self.release_resources(id, now);
        let j = self.jobs.get_mut(&id).expect("checked above");
        j.end_attempt(now, format!("checkpoint {seq} taken and moved off node {node}"));
        j.node = None;
        j.vacating = false;
        j.state = JobState::Idle;
        j.reason = Some(format!("resumes from checkpoint {seq} (moved off node {node})"));
        if vacating {
            self.avoid_for_a_while(id, &node, now);
        }
        self.set_idle(id);
        self.dirty = true;
        self.wake_nodes();
        self.persist(id, false);
        self.job_changed(id, now);
    }

    /// Job `id` keeps away from node `node` for [`AVOID_MS`], if another node can take it.
    pub(super) fn avoid_for_a_while(&mut self, id: u64, node: &str, now: u64) {
        if let Some(j) = self.jobs.get_mut(&id).filter(|j| j.state == JobState::Idle) {
            j.avoid = Some((std::sync::Arc::from(node), now + AVOID_MS));
            self.avoid_ends.insert(now + AVOID_MS);
        }
    }

    /// Whether one of the ready nodes with ads `ads` can resume job `id`'s latest checkpoint
    /// (true for a job without one, and when no node is ready: the pass then says so).
    pub(super) fn resumable<'a>(&self, id: u64, ads: impl IntoIterator<Item = &'a NodeAd>) -> bool {
        let Some((ck, stored)) =
            self.jobs.get(&id).and_then(|j| j.ck.as_deref()).and_then(|c| Some((c.latest.as_ref()?, c)))
        else {
            return true;
        };
        let mut ads = ads.into_iter().peekable();
        ads.peek().is_none() || ads.any(|ad| can_resume(ad, ck, stored.taken_with.as_deref()))
    }

    /// Marks the nodes each job of a pass must not go to ([`IdleJob::exclude`]): the QEMU nodes
    /// that cannot resume its checkpoint (its accelerator is not theirs, or their QEMU is older
    /// than the one that took it), the nodes that ran one of its replicas, and the node it was
    /// vacated from a moment ago ([`AVOID_MS`]; it may go back there once that is over). The job
    /// keeps its place in the pass (fair share, priority, lease-ahead). Jobs no ready node can
    /// take were left out of the pass ([`Engine::resumable`], [`Engine::untried_node`]).
    ///
    /// [`IdleJob::exclude`]: vmgrid_scheduler::IdleJob::exclude
    pub(super) fn set_exclusions(&mut self, snap: &mut super::Snapshot, now: u64) {
        let mut unstuck = Vec::new();
        for job in snap.batch.iter_mut().chain(snap.shared.iter_mut()) {
            let Some(j) = self.jobs.get(&job.id) else { continue };
            if self.blocked_since.contains_key(&job.id) {
                unstuck.push(job.id);
            }
            let ck = j.ck.as_deref().and_then(|c| Some((c.latest.as_ref()?, c)));
            let avoid = j.avoid.as_ref().filter(|(_, until)| now < *until).map(|(node, _)| node);
            if ck.is_none() && j.votes.is_empty() && avoid.is_none() {
                continue;
            }
            let off: Vec<usize> = (0..snap.slots.len())
                .filter(|&i| {
                    let ad = &snap.slots[i].ad;
                    let unresumable = ck.is_some_and(|(ck, stored)| {
                        ad.vm_types.contains(&VmType::Qemu) && !can_resume(ad, ck, stored.taken_with.as_deref())
                    });
                    unresumable || j.votes.iter().any(|v| v.node == ad.name) || avoid.is_some_and(|n| **n == ad.name)
                })
                .collect();
            job.exclude = (!off.is_empty()).then(|| off.into());
        }
        for id in unstuck {
            self.blocked_since.remove(&id);
            let j = self.jobs.get_mut(&id).expect("looked at above");
            j.reason =
                j.ck.as_ref().and_then(|c| c.latest.as_ref()).map(|ck| format!("resumes from checkpoint {}", ck.seq));
            self.job_changed(id, now);
        }
    }

    /// No ready node can take job `id`: none can resume its latest checkpoint, or (a replicated
    /// job) each has run it. It waits, and says why.
    pub(super) fn blocked(&mut self, id: u64, now: u64) {
        self.blocked_since.entry(id).or_insert(now);
        let voters: Vec<&str> = self.voters(id).collect();
        let ran = (!voters.is_empty()).then(|| {
            format!("waits for a node that has not run one of its replicas (they ran on {})", voters.join(", "))
        });
        let Some(j) = self.jobs.get_mut(&id) else { return };
        let stored = j.ck.as_deref();
        let ck = stored.and_then(|s| Some((s.latest.as_ref()?, s)));
        let reason = match (ran, ck) {
            (Some(reason), _) => reason,
            (None, Some((ck, stored))) => {
                let qemu = stored.taken_with.as_deref().map(|v| format!(" and QEMU {v} or newer")).unwrap_or_default();
                format!("waits for a node that can resume its checkpoint {} ({}{qemu})", ck.seq, ck.accel)
            }
            (None, None) => return,
        };
        if j.reason.as_deref() != Some(reason.as_str()) {
            j.reason = Some(reason);
            self.job_changed(id, now);
        }
    }

    /// Gives up the checkpoints that no ready node could resume for [`UNRESUMABLE_MS`]: their
    /// jobs start afresh. (A job placed, removed or resumable meanwhile is let go.)
    pub(super) fn give_up_unresumable(&mut self, now: u64) {
        let due: Vec<u64> = self
            .blocked_since
            .iter()
            .filter(|&(_, &since)| now.saturating_sub(since) >= UNRESUMABLE_MS)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.blocked_since.remove(&id);
            let ready = self.nodes.values().filter(|n| n.state == NodeState::Ready && !n.silent).map(|n| n.ad.ad());
            let idle = self.jobs.get(&id).is_some_and(|j| j.state == JobState::Idle);
            if !idle || self.resumable(id, ready) {
                continue;
            }
            let j = self.jobs.get_mut(&id).expect("idle above");
            let Some(stored) = j.ck.as_deref_mut() else { continue };
            let old = stored.latest.take();
            let seq = old.as_ref().map_or(0, |c| c.seq);
            (stored.taken_with, stored.failed_on) = (None, Vec::new());
            j.reason = Some(format!(
                "no ready node could resume its checkpoint {seq} for {} minutes, so it starts afresh",
                UNRESUMABLE_MS / 60_000
            ));
            self.release(old, None, now);
            self.dirty = true;
            self.wake_nodes();
            self.persist(id, false);
            self.job_changed(id, now);
        }
    }
}

/// Whether a node with ad `ad` can resume checkpoint `ck`, taken under QEMU `taken_with`.
fn can_resume(ad: &vmgrid_proto::NodeAd, ck: &Checkpoint, taken_with: Option<&str>) -> bool {
    let newer = match taken_with.and_then(qemu_version) {
        Some(needed) => ad.qemu.as_deref().and_then(qemu_version).is_some_and(|v| v >= needed),
        None => true,
    };
    newer && ad.accelerators.contains(&ck.accel)
}
