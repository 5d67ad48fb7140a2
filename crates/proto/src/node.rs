//! What node agents and the pool say to each other: leases (with lease-ahead), heartbeats,
//! hand-backs, and reports of how runs ended.

use serde::{Deserialize, Serialize};

use crate::{FailureKind, FileRef, JobSpec, unbounded};

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// At most this many jobs in the reply.
    pub max_jobs: u32,
    /// And at most this many cpus among them (the node's free cpus, and what its lease-ahead has
    /// room for).
    #[serde(default = "unbounded")]
    pub max_cpus: u32,
    /// Wait up to this long for work before replying with none.
    pub wait_ms: u64,
    /// Lease-ahead: how many cpus' worth of jobs beyond its free cpus the node will queue and
    /// start as its cpus free up, without a call per job. The pool bounds it
    /// ([`MAX_AHEAD_PER_CPU`] per cpu) and places jobs there only when no node has a free cpu for
    /// them. 0 (the default): only what the node's free cpus can run now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ahead: u32,
    /// Results to apply before leasing: a node reports and asks for more in one call, and the
    /// pool commits both together. Judged as `POST /v1/nodes/report` judges them; the verdicts
    /// come back in the reply's `report`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<Report>,
}

/// The most lease-ahead a node may hold, in cpus per cpu it has.
pub const MAX_AHEAD_PER_CPU: u32 = 128;

/// How long a node's lease call waits for work (`wait_ms`) in a pool with none. Work placed on
/// the node ends the wait at once, and so does anything else the node must act on: its drain
/// (its heartbeat says it drains) or the pool declaring it lost (it registers again). An idle
/// node makes one call per wait: at 1,000 nodes, a 1 s wait was 1,000 calls a second, most of the
/// idle coordinator's CPU.
pub const LEASE_WAIT_MS: u64 = 10_000;

/// A job handed to a node under a lease. The epoch fences results: only a report carrying the
/// current epoch of a running job is accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub job_id: u64,
    pub epoch: u64,
    pub index: u64,
    /// The spec with `{index}` already substituted.
    pub spec: JobSpec,
    /// The checkpoint to resume from instead of starting the VM afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Checkpoint>,
}

/// A complete checkpoint of a QEMU job, as blobs in the pool: everything a node needs to resume
/// the VM where it was. The RAM and the disks go in content-defined chunks ([`ChunkedFile`]), so
/// a checkpoint sends and stores only the chunks that changed since the job's last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// 1 for the job's first checkpoint, then up by one across all its attempts.
    pub seq: u64,
    /// The VM's RAM and device state: QEMU's migration stream.
    pub state: ChunkedFile,
    /// The job directory's disk (ext4 in qcow2), as the guest left it at the checkpoint.
    pub job_disk: ChunkedFile,
    /// The copy-on-write overlay of the job's image, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<ChunkedFile>,
    /// The guest's console (its stdout) up to the checkpoint, uncompressed (its owner reads it
    /// while the job runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<FileRef>,
    /// The accelerator the VM ran under (`tcg` or `kvm`): a VM resumes only under the same one,
    /// so the pool places the job only on a node that lists it.
    pub accel: String,
    /// Seconds the guest had run when the checkpoint was taken, over all its attempts.
    pub guest_s: f64,
}

impl Checkpoint {
    /// Its blobs, each of which must be in the pool for the checkpoint to be usable: every
    /// chunk of its files, and its console.
    pub fn parts(&self) -> impl Iterator<Item = &FileRef> {
        self.files().flat_map(|(_, f)| f.chunks.iter()).chain(self.console.as_ref())
    }

    /// Its chunked files, by name.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &ChunkedFile)> {
        [("state", Some(&self.state)), ("job disk", Some(&self.job_disk)), ("overlay", self.overlay.as_ref())]
            .into_iter()
            .filter_map(|(name, f)| Some((name, f?)))
    }
}

/// A large file in content-defined chunks (FastCDC: a change moves only the chunk boundaries near
/// it), each compressed with zstd and stored as its own blob. A chunk that did not change since
/// the last time the file was stored has the same blob, which the pool holds already.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkedFile {
    /// The file's size, unpacked.
    pub size: u64,
    /// Its chunks in order, each unpacking to at most [`MAX_CHUNK_BYTES`]; each `size` is that
    /// of its blob (compressed).
    pub chunks: Vec<FileRef>,
}

/// The most bytes one chunk of a [`ChunkedFile`] unpacks to.
pub const MAX_CHUNK_BYTES: u64 = 4 << 20;
/// The largest blob a chunk may be: what [`MAX_CHUNK_BYTES`] compress to at worst.
pub const MAX_PACKED_CHUNK_BYTES: u64 = MAX_CHUNK_BYTES + (64 << 10);
/// The most chunks one [`ChunkedFile`] has (128 GiB at the average chunk, 1 MiB).
pub const MAX_CHUNKS: usize = 1 << 17;

impl ChunkedFile {
    /// Whether its size and number of chunks are within bounds and agree.
    pub fn check(&self) -> Result<(), String> {
        if self.chunks.len() > MAX_CHUNKS {
            return Err(format!("{} chunks, and at most {MAX_CHUNKS} are allowed", self.chunks.len()));
        }
        if self.size > self.chunks.len() as u64 * MAX_CHUNK_BYTES || (self.size == 0) != self.chunks.is_empty() {
            return Err(format!("{} chunks cannot make {} bytes", self.chunks.len(), self.size));
        }
        Ok(())
    }
}

/// A node's checkpoint of a job it runs, sent once all its parts are uploaded.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    pub lease: LeaseId,
    pub checkpoint: Checkpoint,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseResponse {
    pub leases: Vec<Lease>,
    /// The verdicts on the request's `reports`, when it carried some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportResponse>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseId {
    pub job_id: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub leases: Vec<LeaseId>,
    #[serde(default)]
    pub draining: bool,
    /// The node's blob cache, as it says (shown on the dashboard's nodes table).
    #[serde(default)]
    pub cache: Option<CacheStats>,
    /// Leases the node hands back without having started them (jobs it queued ahead, when it
    /// drains or when they waited too long behind longer jobs): they return to the pool at once,
    /// as if never handed over (not counted as an attempt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returned: Vec<LeaseId>,
    /// The large blobs ([`crate::PEER_MIN_BYTES`] and up) it holds, whole or in part, and serves
    /// to other nodes: at most [`crate::MAX_SHARING`]; `None` leaves what it said before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<Vec<String>>,
    /// The node's certificate for serving blobs ([`crate::PeerIdentity`]) is due to be renewed:
    /// the answer carries the next.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renew_peer: bool,
}

/// A node's blob cache: images and inputs kept by hash. Fields it does not know are ignored, so
/// later versions may add some (it only informs the dashboard).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheStats {
    pub blobs: u64,
    pub bytes: u64,
    /// The bound it is kept under (least recently used blobs are evicted past it).
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    /// Leases the node must stop: the job was removed, held or given to another node.
    pub revoked: Vec<LeaseId>,
    /// Leases whose jobs the node must checkpoint now, stop and report as vacated, so that they
    /// resume on another node (`vmgrid vacate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vacate: Vec<LeaseId>,
    /// The node's next certificate for serving blobs, when it asked (`renew_peer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<crate::PeerIdentity>,
}

/// How a run ended, as a node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunReport {
    /// The guest exited with this code.
    Exited { code: i32 },
    /// The guest ran and did not finish (time or memory limit, trap, panic, no exit status).
    GuestFailed { failure: FailureKind, reason: String },
    /// The job cannot run anywhere: a bad image or input.
    BadJob { reason: String },
    /// This node could not run it; another may.
    HostFailed { reason: String },
    /// The checkpoint it was to resume from cannot be used (a part refused or unreadable, or
    /// QEMU could not load it): after two nodes say so, the job starts afresh.
    BadCheckpoint { reason: String },
    /// The node stopped the VM right after its checkpoint `seq` (sent before this report), to
    /// resume elsewhere: the node drains, or the job was vacated. Not a failure of the job.
    Vacated { seq: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub lease: LeaseId,
    pub run: RunReport,
    pub stdout: Option<FileRef>,
    pub stderr: Option<FileRef>,
    #[serde(default)]
    pub stdout_dropped: u64,
    #[serde(default)]
    pub stderr_dropped: u64,
    #[serde(default)]
    pub outputs: Vec<FileRef>,
}

impl Report {
    /// A run that exited with `code` and left no output (what a test or a simulated node sends).
    pub fn exited(lease: LeaseId, code: i32) -> Report {
        Report {
            lease,
            run: RunReport::Exited { code },
            stdout: None,
            stderr: None,
            stdout_dropped: 0,
            stderr_dropped: 0,
            outputs: vec![],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    pub reports: Vec<Report>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportResponse {
    pub accepted: Vec<LeaseId>,
    /// Reports refused because their lease expired or was given to another node.
    pub refused: Vec<(LeaseId, String)>,
}

/// (Left out when 0, so that a node asking for no lease-ahead speaks to a coordinator of before.)
fn is_zero(n: &u32) -> bool {
    *n == 0
}
