//! A checkpointed QEMU job on this node: its checkpoints stored in the pool as blobs, then recorded
//! by the coordinator under the job's lease; and the checkpoint a lease resumes from, fetched and
//! unpacked. The RAM and the disks go in content-defined chunks, compressed
//! ([`vmgrid_client::chunked`]): a chunk of the job's latest recorded checkpoint is not sent
//! again, so each checkpoint sends only what changed. The console goes as it is, so that its
//! owner can read it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmgrid_client::Client;
use vmgrid_client::chunked::{self, Known, Unpack};
use vmgrid_proto::*;
use vmgrid_runtime::RunError;
use vmgrid_runtime::qemu::checkpoint::{CheckpointSink, Checkpointing, ResumeFrom, TakenCheckpoint};

use crate::cache::BlobCache;

/// Test-only: names a file; while it exists, the node uploads each checkpoint's parts and then
/// stalls before recording it (leaving `FILE.stalled-N` beside it), so that a test can kill it
/// mid-checkpoint. Never set outside tests.
const TEST_ONLY_STALL: &str = "VMGRID_TEST_ONLY_STALL_CHECKPOINT";

/// Stores a job's checkpoints in the pool under its lease.
pub(crate) struct PoolSink {
    client: Client,
    lease: LeaseId,
    busy: Arc<AtomicBool>,
    /// Set when the run ended: a checkpoint still being stored is given up.
    ended: AtomicBool,
    /// The chunks of the job's latest recorded checkpoint (and its number): the pool keeps them
    /// while that checkpoint is the latest, so the next one need not send them again.
    recorded: Mutex<(u64, Known)>,
}

impl PoolSink {
    fn store_now(&self, ck: &TakenCheckpoint) -> Result<(), String> {
        let started = std::time::Instant::now();
        let known = self.recorded.lock().unwrap_or_else(|e| e.into_inner()).1.clone();
        let (mut chunks, mut new_bytes) = (Known::new(), 0);
        let given_up = || self.ended.load(Ordering::SeqCst) && !ck.last;
        let mut upload = |path: &Path, name: &str| -> Result<ChunkedFile, String> {
            let stored = self
                .client
                .upload_chunked(path, name, &known, given_up)
                .map_err(|e| format!("cannot store the {name} of checkpoint {}: {e}", ck.seq))?;
            chunks.extend(stored.chunks);
            new_bytes += stored.new_bytes;
            Ok(stored.file)
        };
        let console = std::fs::metadata(&ck.console).is_ok_and(|m| m.len() > 0);
        let checkpoint = Checkpoint {
            seq: ck.seq,
            state: upload(&ck.state, "state")?,
            job_disk: upload(&ck.job_disk, "job.qcow2")?,
            overlay: ck.overlay.as_deref().map(|o| upload(o, "overlay.qcow2")).transpose()?,
            console: console
                .then(|| self.client.upload_file(&ck.console, "console"))
                .transpose()
                .map_err(|e| format!("cannot upload the console: {e}"))?,
            accel: ck.accel.to_string(),
            guest_s: ck.guest_s,
        };
        if let Some(file) = std::env::var_os(TEST_ONLY_STALL).filter(|f| Path::new(f).exists()) {
            let mut marker = file.clone();
            marker.push(format!(".stalled-{}", ck.seq));
            let _ = std::fs::write(&marker, "");
            tracing::warn!(seq = ck.seq, "test-only: stalling before recording this checkpoint");
            while !self.ended.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        if let Err(e) = self.client.checkpoint(&CheckpointRequest { lease: self.lease, checkpoint: checkpoint.clone() })
        {
            // Whether it was recorded is not known (the answer may be what was lost), so which
            // chunks the pool keeps is not either: the next checkpoint sends every chunk the pool
            // does not hold, asking for each.
            *self.recorded.lock().unwrap_or_else(|e| e.into_inner()) = (ck.seq, Known::new());
            return Err(format!("the pool did not record checkpoint {}: {e}", ck.seq));
        }
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if recorded.0 < ck.seq {
            *recorded = (ck.seq, chunks);
        }
        let bytes: u64 = checkpoint.parts().map(|f| f.size).sum();
        tracing::info!(
            job = self.lease.job_id,
            seq = ck.seq,
            pause_ms = ck.pause.as_millis() as u64,
            stored_ms = started.elapsed().as_millis() as u64,
            compressed_bytes = bytes,
            sent_bytes = new_bytes,
            "checkpoint stored"
        );
        Ok(())
    }
}

/// The runtime's handle on a [`PoolSink`].
struct Sink(Arc<PoolSink>);

impl CheckpointSink for Sink {
    fn store(&self, ck: TakenCheckpoint) -> Result<(), String> {
        if ck.last {
            // A periodic checkpoint still being stored is given up (at its next chunk): the pool
            // would refuse it after this newer one anyway.
            self.0.ended.store(true, Ordering::SeqCst);
            return self.0.store_now(&ck);
        }
        self.0.busy.store(true, Ordering::SeqCst);
        let me = self.0.clone();
        let worker = std::thread::Builder::new().name("vmgrid-checkpoint".into()).spawn(move || {
            if let Err(e) = me.store_now(&ck) {
                tracing::warn!(job = me.lease.job_id, "{e}");
            }
            drop(ck);
            me.busy.store(false, Ordering::SeqCst);
        });
        match worker {
            // Its own thread: it ends by itself, and removes its files.
            Ok(_) => Ok(()),
            Err(e) => {
                self.0.busy.store(false, Ordering::SeqCst);
                Err(format!("cannot start a thread to store the checkpoint: {e}"))
            }
        }
    }

    fn busy(&self) -> bool {
        self.0.busy.load(Ordering::SeqCst)
    }
}

impl PoolSink {
    /// The run ended: a periodic checkpoint still being stored is given up at its next chunk (its
    /// thread ends by itself and removes its files; the job's report does not wait for it).
    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }
}

/// What a lease's job needs to take checkpoints, and to resume from the lease's checkpoint
/// (fetched into `dir`); `None` for a job without `checkpoint_s`.
pub(crate) fn plan(
    client: &Client,
    cache: &BlobCache,
    lease: &Lease,
    vacate: Arc<AtomicBool>,
    dir: &Path,
) -> Result<Option<(Checkpointing, Arc<PoolSink>)>, RunError> {
    let Some(every) = lease.spec.checkpoint_s else { return Ok(None) };
    let resume = lease.resume.as_ref().map(|ck| fetch(client, cache, &lease.spec, ck, dir)).transpose()?;
    // The checkpoint resumed from is the job's latest recorded: its chunks need not be sent again.
    let (resume, recorded) = match resume {
        Some((from, known)) => (Some(from), (lease.resume.as_ref().map_or(0, |c| c.seq), known)),
        None => (None, (0, Known::new())),
    };
    let sink = Arc::new(PoolSink {
        client: client.clone(),
        lease: LeaseId { job_id: lease.job_id, epoch: lease.epoch },
        busy: Arc::default(),
        ended: AtomicBool::new(false),
        recorded: Mutex::new(recorded),
    });
    let plan = Checkpointing {
        every: std::time::Duration::from_secs(every),
        sink: Arc::new(Sink(sink.clone())),
        resume,
        vacate,
    };
    Ok(Some((plan, sink)))
}

/// Fetches checkpoint `ck`'s parts (through the cache) and unpacks them into `dir/resume`; with
/// its chunks, by the hash of their bytes.
fn fetch(
    client: &Client,
    cache: &BlobCache,
    spec: &JobSpec,
    ck: &Checkpoint,
    dir: &Path,
) -> Result<(ResumeFrom, Known), RunError> {
    let into = dir.join("resume");
    std::fs::create_dir_all(&into).map_err(|e| RunError::host("cannot create the resume directory", e))?;
    // RAM, and disks no larger than the job's directory and its image allow.
    let image = spec.image.as_ref().map_or(0, |f| f.size);
    let limit = (spec.memory_mb << 20) + ((spec.disk_mb + 64) << 20) * 2 + image * 2 + (64 << 20);
    let mut known = Known::new();
    let mut unpack = |f: &ChunkedFile, name: &str| -> Result<PathBuf, RunError> {
        let to = into.join(name);
        // A chunk the node cannot fetch is this node's trouble; one that does not unpack as it
        // says is the checkpoint's.
        let read = |c: &FileRef| {
            let path = cache
                .get(client, &c.blob)
                .map_err(|e| Unpack::Host(format!("cannot fetch checkpoint {}'s {name}: {e}", ck.seq)))?;
            read_packed(&path)
        };
        let chunks = chunked::unpack(f, &to, limit, read).map_err(|e| match e {
            Unpack::Host(e) => RunError::Host(e),
            Unpack::Bad(e) => {
                RunError::BadCheckpoint(format!("checkpoint {}'s {name} cannot be unpacked: {e}", ck.seq))
            }
        })?;
        known.extend(chunks);
        Ok(to)
    };
    let console = match &ck.console {
        Some(f) => {
            let path =
                cache.get(client, &f.blob).map_err(|e| RunError::Host(format!("cannot fetch the console: {e}")))?;
            // At most what the runtime keeps of a console.
            let cap = vmgrid_runtime::RuntimeConfig::DEFAULT_OUTPUT_CAP as u64;
            let mut bytes = Vec::new();
            let file = std::fs::File::open(path).map_err(|e| RunError::host("cannot read the console", e))?;
            std::io::Read::read_to_end(&mut std::io::Read::take(file, cap), &mut bytes)
                .map_err(|e| RunError::host("cannot read the console", e))?;
            bytes
        }
        None => Vec::new(),
    };
    let from = ResumeFrom {
        seq: ck.seq,
        state: unpack(&ck.state, "state")?,
        job_disk: unpack(&ck.job_disk, "job.qcow2")?,
        overlay: ck.overlay.as_ref().map(|f| unpack(f, "overlay.qcow2")).transpose()?,
        console,
        accel: ck.accel.clone(),
        guest_s: ck.guest_s,
    };
    Ok((from, known))
}

/// A chunk's blob as fetched: no larger than a chunk compresses to at worst.
fn read_packed(path: &Path) -> Result<Vec<u8>, Unpack> {
    let host = |e: std::io::Error| Unpack::Host(format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(host)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_PACKED_CHUNK_BYTES + 1), &mut bytes).map_err(host)?;
    if bytes.len() as u64 > MAX_PACKED_CHUNK_BYTES {
        return Err(Unpack::Bad(format!("a chunk's blob is larger than {MAX_PACKED_CHUNK_BYTES} bytes")));
    }
    Ok(bytes)
}
