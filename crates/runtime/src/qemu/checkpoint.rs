//! Checkpoints of a running QEMU job, and resuming one.
//!
//! A checkpoint saves the VM's RAM and device state with QEMU's migration to a file (`migrate` to
//! `file:`), live: the VM runs while its memory is written, and QEMU pauses it only for the last
//! pages (at most [`DOWNTIME_MS`] when it can). Paused, its disks are copied while they are
//! flushed and inactive (the image's qcow2 overlay and the job directory's disk,
//! [`super::jobdisk`]) with the console so far, and the VM goes on (`cont`). The files go to the
//! [`CheckpointSink`] (the node agent compresses them and stores them in the pool); the VM runs
//! meanwhile. A run's last checkpoint (it is vacated) pauses the VM first and does not go on.
//!
//! A resume starts QEMU with the same devices and `-incoming defer`, on the checkpoint's disks,
//! loads the state (`migrate-incoming` from the file) and lets it go on. The guest sees a jump
//! of its wall clock; its virtual time did not advance while it was saved.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde_json::json;

use super::qmp::Qmp;
use crate::capture::CaptureSink;

/// How long saving or loading a VM's state may take before it is given up.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
/// The pause QEMU aims at for the last pages of a live checkpoint.
const DOWNTIME_MS: u64 = 100;
/// Writing a checkpoint to a local file is not throttled (QEMU's default is 128 MiB/s).
const MAX_BANDWIDTH: u64 = 64 << 30;

/// A run with checkpoints: how often, where they go, and what to resume from.
pub struct Checkpointing {
    pub every: Duration,
    pub sink: Arc<dyn CheckpointSink>,
    pub resume: Option<ResumeFrom>,
    /// Set to take a final checkpoint, stop the VM, and end the run as [`crate::Outcome::Vacated`].
    pub vacate: Arc<AtomicBool>,
}

/// A checkpoint taken: its files, in a directory of its own that the sink now owns.
pub struct TakenCheckpoint {
    pub seq: u64,
    pub dir: tempfile::TempDir,
    /// `state` (QEMU's migration stream), `job.qcow2`, `overlay.qcow2` if the job has an image,
    /// and `console` (the guest's stdout so far).
    pub state: PathBuf,
    pub job_disk: PathBuf,
    pub overlay: Option<PathBuf>,
    pub console: PathBuf,
    pub accel: &'static str,
    /// Seconds the guest had run, over all its attempts.
    pub guest_s: f64,
    /// How long the VM was paused for it.
    pub pause: Duration,
    /// How long it took, from the start of the save to the VM going on (it runs meanwhile but
    /// for `pause`).
    pub took: Duration,
    /// The run's last: the VM is stopped, and the run ends once it is stored.
    pub last: bool,
}

/// Where a run's checkpoints go.
pub trait CheckpointSink: Send + Sync {
    /// Stores `ck`. A periodic checkpoint may be stored in the background: `busy` then says so
    /// until it is done, and the runtime skips the checkpoints due meanwhile. The last one is
    /// stored before this returns; an error fails the run (another node resumes from the latest
    /// checkpoint that was stored).
    fn store(&self, ck: TakenCheckpoint) -> Result<(), String>;
    fn busy(&self) -> bool;
    /// The VM resumed from checkpoint `seq` and runs; `took` is from starting QEMU to then.
    fn resumed(&self, seq: u64, took: Duration) {
        tracing::info!(seq, resume_ms = took.as_millis() as u64, "resumed from a checkpoint");
    }
}

/// A checkpoint to resume from, fetched to local files.
pub struct ResumeFrom {
    pub seq: u64,
    pub state: PathBuf,
    pub job_disk: PathBuf,
    pub overlay: Option<PathBuf>,
    pub console: Vec<u8>,
    pub accel: String,
    pub guest_s: f64,
}

/// The disks of a checkpointed VM, as they are attached.
pub(crate) struct Disks<'a> {
    pub overlay: Option<&'a Path>,
    pub job_disk: &'a Path,
}

/// Polls `query-migrate` until the migration completes (then its status); its error if it fails.
fn wait_migrated(qmp: &mut Qmp, what: &str) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let st = qmp.execute("query-migrate", json!({})).map_err(|e| format!("{what}: {e}"))?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(st),
            Some("failed" | "cancelled") => {
                let why = st.get("error-desc").and_then(|s| s.as_str()).unwrap_or("no reason given");
                return Err(format!("{what} failed: {why}"));
            }
            _ if Instant::now() > deadline => return Err(format!("{what} took over {} s", MIGRATE_TIMEOUT.as_secs())),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A checkpoint's directory, ours, holding an empty `state` that QEMU (after it dropped root, as
/// `run_as`) may write but cannot replace: the directory is not its to change.
fn checkpoint_dir(run_as: Option<&str>) -> Result<(tempfile::TempDir, PathBuf), String> {
    let dir = crate::scratch::dir("ckpt").map_err(|e| format!("cannot create a checkpoint directory: {e}"))?;
    let state = dir.path().join("state");
    std::fs::write(&state, b"").map_err(|e| format!("cannot create the state file: {e}"))?;
    if let Some(user) = run_as {
        super::launch::give(&state, user).map_err(|e| e.to_string())?;
        super::launch::traversable(dir.path()).map_err(|e| e.to_string())?;
    }
    Ok((dir, state))
}

/// Takes checkpoint `seq` of the running VM behind `qmp`. Unless `last`, the VM runs on after
/// it; with `last`, it stays paused (the caller stops it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn take(
    qmp: &mut Qmp,
    seq: u64,
    disks: &Disks<'_>,
    console: &CaptureSink,
    accel: super::Accel,
    guest_s: f64,
    last: bool,
    run_as: Option<&str>,
) -> Result<TakenCheckpoint, String> {
    let (dir, state) = checkpoint_dir(run_as)?;
    let console_file = dir.path().join("console");
    let stopped = Instant::now();
    if last {
        qmp.execute("stop", json!({})).map_err(|e| e.to_string())?;
    }
    // QEMU's measure of the pause until the state was saved, and when we saw that.
    let mut paused = (Duration::ZERO, Instant::now());
    let saved = (|| {
        let params = json!({ "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_MS });
        qmp.execute("migrate-set-parameters", params).map_err(|e| e.to_string())?;
        qmp.execute("migrate", json!({ "uri": format!("file:{}", state.display()) })).map_err(|e| e.to_string())?;
        let st = wait_migrated(qmp, "saving the VM's state")?;
        // From here the VM is paused; QEMU measured how long it has been.
        let downtime = st.get("downtime").and_then(|d| d.as_u64()).unwrap_or(0);
        paused = (Duration::from_millis(downtime), Instant::now());
        let copy = |from: &Path, name: &str| {
            let to = dir.path().join(name);
            std::fs::copy(from, &to).map(|_| to).map_err(|e| format!("cannot copy {}: {e}", from.display()))
        };
        let overlay = disks.overlay.map(|o| copy(o, "overlay.qcow2")).transpose()?;
        let job_disk = copy(disks.job_disk, "job.qcow2")?;
        std::fs::write(&console_file, settled(console)).map_err(|e| format!("cannot save the console: {e}"))?;
        Ok::<_, String>((overlay, job_disk))
    })();
    if saved.is_err() {
        // A save that failed or timed out must not stay under way: the next would be refused.
        let _ = qmp.execute("migrate_cancel", json!({}));
    }
    // The VM goes on whatever happened, unless this was its last checkpoint.
    if !last || saved.is_err() {
        qmp.execute("cont", json!({})).map_err(|e| format!("cannot resume the VM after a checkpoint: {e}"))?;
    }
    let pause = if last { stopped.elapsed() } else { paused.0 + paused.1.elapsed() };
    let (overlay, job_disk) = saved?;
    Ok(TakenCheckpoint {
        seq,
        state,
        job_disk,
        overlay,
        console: console_file,
        dir,
        accel: accel.as_str(),
        guest_s,
        pause,
        took: stopped.elapsed(),
        last,
    })
}

/// The console once the bytes the paused guest wrote have all been read from QEMU's pipe: it has
/// not grown for 10 ms (at most 200 ms).
fn settled(console: &CaptureSink) -> Vec<u8> {
    let until = Instant::now() + Duration::from_millis(200);
    let mut seen = console.snapshot().bytes;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = console.snapshot().bytes;
        if now.len() == seen.len() || Instant::now() > until {
            return now;
        }
        seen = now;
    }
}

/// Loads the checkpoint's state into a QEMU started with `-incoming defer`, and lets it run.
pub(crate) fn resume(qmp: &mut Qmp, seq: u64, state: &Path) -> Result<(), String> {
    qmp.execute("migrate-incoming", json!({ "uri": format!("file:{}", state.display()) }))
        .map_err(|e| format!("cannot load checkpoint {seq}: {e}"))?;
    wait_migrated(qmp, &format!("loading checkpoint {seq}"))?;
    qmp.execute("cont", json!({})).map_err(|e| format!("cannot start the VM from checkpoint {seq}: {e}"))?;
    Ok(())
}
