//! A checkpointed QEMU job on this node: its checkpoints compressed (zstd; the console as it is,
//! so that its owner can read it) and stored in the pool as blobs, then recorded by the coordinator under the job's lease (a part that did not change
//! has the same blob, which the pool already holds, so it is not sent again); and the checkpoint
//! a lease resumes from, fetched and unpacked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmgrid_client::Client;
use vmgrid_proto::*;
use vmgrid_runtime::RunError;
use vmgrid_runtime::qemu::checkpoint::{CheckpointSink, Checkpointing, ResumeFrom, TakenCheckpoint};

use crate::cache::BlobCache;

/// zstd's level for checkpoints: fast (a checkpoint is taken every interval, while the job runs).
const LEVEL: i32 = 1;

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
}

impl PoolSink {
    fn store_now(&self, ck: &TakenCheckpoint) -> Result<(), String> {
        let started = std::time::Instant::now();
        let upload = |path: &Path, name: &str| -> Result<FileRef, String> {
            if self.ended.load(Ordering::SeqCst) && !ck.last {
                return Err("the run ended".into());
            }
            let packed = path.with_extension("zst");
            let given_up = || self.ended.load(Ordering::SeqCst) && !ck.last;
            compress(path, &packed, given_up).map_err(|e| format!("cannot compress {name}: {e}"))?;
            self.client.upload_file(&packed, name).map_err(|e| format!("cannot upload {name}: {e}"))
        };
        let console = std::fs::metadata(&ck.console).is_ok_and(|m| m.len() > 0);
        let checkpoint = Checkpoint {
            seq: ck.seq,
            state: upload(&ck.state, "state.zst")?,
            job_disk: upload(&ck.job_disk, "job.qcow2.zst")?,
            overlay: ck.overlay.as_deref().map(|o| upload(o, "overlay.qcow2.zst")).transpose()?,
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
        self.client
            .checkpoint(&CheckpointRequest { lease: self.lease, checkpoint: checkpoint.clone() })
            .map_err(|e| format!("the pool did not record checkpoint {}: {e}", ck.seq))?;
        let bytes: u64 = checkpoint.parts().map(|f| f.size).sum();
        tracing::info!(
            job = self.lease.job_id,
            seq = ck.seq,
            pause_ms = ck.pause.as_millis() as u64,
            stored_ms = started.elapsed().as_millis() as u64,
            compressed_bytes = bytes,
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

/// Compresses a part, a MiB at a time, stopping when `given_up` says so.
fn compress(from: &Path, to: &Path, given_up: impl Fn() -> bool) -> std::io::Result<()> {
    let mut input = std::fs::File::open(from)?;
    let mut out = zstd::stream::Encoder::new(std::fs::File::create(to)?, LEVEL)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if given_up() {
            return Err(std::io::Error::other("the run ended"));
        }
        let n = std::io::Read::read(&mut input, &mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.finish()?.flush()
}

fn decompress(from: &Path, to: &Path, limit: u64) -> std::io::Result<()> {
    let input = zstd::stream::Decoder::new(std::fs::File::open(from)?)?;
    let mut out = std::fs::File::create(to)?;
    let n = std::io::copy(&mut std::io::Read::take(input, limit + 1), &mut out)?;
    if n > limit {
        return Err(std::io::Error::other(format!("it unpacks to more than {limit} bytes")));
    }
    Ok(())
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
    let sink = Arc::new(PoolSink {
        client: client.clone(),
        lease: LeaseId { job_id: lease.job_id, epoch: lease.epoch },
        busy: Arc::default(),
        ended: AtomicBool::new(false),
    });
    let plan = Checkpointing {
        every: std::time::Duration::from_secs(every),
        sink: Arc::new(Sink(sink.clone())),
        resume,
        vacate,
    };
    Ok(Some((plan, sink)))
}

/// Fetches checkpoint `ck`'s parts (through the cache) and unpacks them into `dir/resume`.
fn fetch(
    client: &Client,
    cache: &BlobCache,
    spec: &JobSpec,
    ck: &Checkpoint,
    dir: &Path,
) -> Result<ResumeFrom, RunError> {
    let into = dir.join("resume");
    std::fs::create_dir_all(&into).map_err(|e| RunError::host("cannot create the resume directory", e))?;
    // RAM, and disks no larger than the job's directory and its image allow.
    let image = spec.image.as_ref().map_or(0, |f| f.size);
    let limit = (spec.memory_mb << 20) + ((spec.disk_mb + 64) << 20) * 2 + image * 2 + (64 << 20);
    let unpack = |f: &FileRef, name: &str| -> Result<PathBuf, RunError> {
        let packed = cache
            .get(client, &f.blob)
            .map_err(|e| RunError::Host(format!("cannot fetch checkpoint {} ({name}): {e}", ck.seq)))?;
        let to = into.join(name);
        decompress(&packed, &to, limit)
            .map_err(|e| RunError::BadCheckpoint(format!("checkpoint {}'s {name} cannot be unpacked: {e}", ck.seq)))?;
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
    Ok(ResumeFrom {
        seq: ck.seq,
        state: unpack(&ck.state, "state")?,
        job_disk: unpack(&ck.job_disk, "job.qcow2")?,
        overlay: ck.overlay.as_ref().map(|f| unpack(f, "overlay.qcow2")).transpose()?,
        console,
        accel: ck.accel.clone(),
        guest_s: ck.guest_s,
    })
}
