//! Checkpoints of QEMU jobs (the guest kit under this host's accelerator), through the runtime
//! the node agent uses: for a 256 MiB and a 1 GiB guest, idle and with most of its memory
//! written (60% of it: random bytes in a tmpfs), the pause of one checkpoint (from `stop` to
//! `cont`: the guest's vCPUs do not run meanwhile, and its clocks do not advance), its size as
//! QEMU writes it and as the node stores it (in chunks, zstd level 1), what the next checkpoint
//! adds (its chunks that are new), and the resume in another QEMU process (start to running from
//! the checkpoint) as another node does it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmgrid_client::chunked;
use vmgrid_runtime::qemu::checkpoint::{CheckpointSink, Checkpointing, ResumeFrom, TakenCheckpoint};
use vmgrid_runtime::{Outcome, RunRequest, Runtime, RuntimeConfig};

/// One guest's figures.
pub struct CheckpointFigures {
    pub memory_mb: u64,
    pub pause_s: f64,
    pub took_s: f64,
    pub raw_mib: f64,
    pub stored_mib: f64,
    pub compress_s: f64,
    /// What the next checkpoint (one interval later) adds: its chunks the first did not have.
    pub next_mib: f64,
    /// Unpacking the stored parts, as the resuming node does.
    pub unpack_s: f64,
    pub resume_s: f64,
}

/// A checkpoint as the node stores it: its chunks (by the hash of their bytes, with their size
/// compressed), the bytes saved, and the times to chunk and compress them and to unpack them.
struct Chunked {
    chunks: HashMap<blake3::Hash, u64>,
    raw: u64,
    compress: Duration,
    unpack: Duration,
}

impl Chunked {
    /// The bytes stored: each distinct chunk once, compressed.
    fn stored(&self) -> u64 {
        self.chunks.values().sum()
    }
}

/// The parts in chunks, compressed (zstd, level 1), as the node stores them, then unpacked again.
fn chunked(ck: &TakenCheckpoint) -> Result<Chunked, String> {
    let (mut raw, mut packed, mut chunks) = (0, Vec::new(), HashMap::new());
    let started = Instant::now();
    for p in [Some(&ck.state), Some(&ck.job_disk), ck.overlay.as_ref()].into_iter().flatten() {
        chunked::split(p, |data| {
            raw += data.len() as u64;
            if let std::collections::hash_map::Entry::Vacant(v) = chunks.entry(blake3::hash(data)) {
                let bytes = chunked::pack(data)?;
                v.insert(bytes.len() as u64);
                packed.push(bytes);
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    }
    let compress = started.elapsed();
    let started = Instant::now();
    for chunk in &packed {
        zstd::bulk::decompress(chunk, vmgrid_proto::MAX_CHUNK_BYTES as usize).map_err(|e| e.to_string())?;
    }
    Ok(Chunked { chunks, raw, compress, unpack: started.elapsed() })
}

/// Keeps the measured checkpoint (the first taken once the guest said `ready`) and what the one
/// after it adds, then asks for a last one and keeps it to resume from.
#[derive(Default)]
struct Sink {
    vacate: Arc<AtomicBool>,
    measured: Mutex<Option<(Duration, Duration, Chunked)>>,
    next: Mutex<Option<u64>>,
    last: Mutex<Option<TakenCheckpoint>>,
    resumed: Mutex<Option<Duration>>,
}

impl CheckpointSink for Sink {
    fn store(&self, ck: TakenCheckpoint) -> Result<(), String> {
        if ck.last {
            *self.last.lock().unwrap() = Some(ck);
            return Ok(());
        }
        let ready = std::fs::read_to_string(&ck.console).unwrap_or_default().contains("ready");
        let mut measured = self.measured.lock().unwrap();
        match measured.as_ref() {
            None if ready => *measured = Some((ck.pause, ck.took, chunked(&ck)?)),
            Some((_, _, first)) => {
                let next = chunked(&ck)?;
                let added = next.chunks.iter().filter(|(h, _)| !first.chunks.contains_key(h)).map(|(_, n)| n).sum();
                *self.next.lock().unwrap() = Some(added);
                self.vacate.store(true, Ordering::SeqCst);
            }
            None => {}
        }
        Ok(())
    }

    fn busy(&self) -> bool {
        false
    }

    fn resumed(&self, _seq: u64, took: Duration) {
        *self.resumed.lock().unwrap() = Some(took);
        self.vacate.store(true, Ordering::SeqCst);
    }
}

fn job(root: &Path, dir: &Path, memory_mb: u64, dirty: bool) -> Result<vmgrid_job::Job, String> {
    let fill = match dirty {
        true => format!(
            "mkdir -p /fill && mount -t tmpfs -o size=90% tmpfs /fill && dd if=/dev/urandom of=/fill/x bs=1M count={} 2>/dev/null || exit 9; ",
            memory_mb * 6 / 10
        ),
        false => String::new(),
    };
    let kit = root.join("guest-kit/out");
    let text = format!(
        "name = \"ckpt\"\n[vm]\ntype = \"qemu\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 quiet\"\nargs = [\"sh\", \"-c\", \"{fill}echo ready; while true; do sleep 1; done\"]\n[resources]\nmemory_mb = {memory_mb}\ntimeout_s = 900\ndisk_mb = 16\n[policy]\ncheckpoint_s = 2\n",
        kit.join("vmlinuz").display().to_string(),
        kit.join("initrd.gz").display().to_string(),
    );
    vmgrid_job::parse_job(&dir.join("job.toml"), &text).map_err(|e| e.to_string())
}

/// Runs the guest until its measured checkpoint and its last one; then resumes it from the last
/// in a new QEMU and stops it again.
pub fn measure(root: &Path, memory_mb: u64, dirty: bool) -> Result<CheckpointFigures, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let job = job(root, dir.path(), memory_mb, dirty)?;
    let runtime = Runtime::new(RuntimeConfig { cache_dir: dir.path().join("cache"), ..RuntimeConfig::default() });
    let sink = Arc::new(Sink::default());
    let first = dir.path().join("first");
    std::fs::create_dir_all(&first).map_err(|e| e.to_string())?;
    let plan =
        Checkpointing { every: Duration::from_secs(2), sink: sink.clone(), resume: None, vacate: sink.vacate.clone() };
    let run = |job_dir: &Path, plan: &Checkpointing| {
        let req = RunRequest {
            job: &job,
            job_dir,
            cancel: None,
            ssi: None,
            checkpoint: Some(plan),
            seed: 0,
            net: None,
            empty_dir: false,
        };
        match runtime.run(&req).map_err(|e| e.to_string())?.outcome {
            Outcome::Vacated { .. } => Ok(()),
            other => Err(format!("the guest ended without being vacated: {other:?}")),
        }
    };
    run(&first, &plan)?;
    let (pause, took, first) = sink.measured.lock().unwrap().take().ok_or("no checkpoint was measured")?;
    let next = sink.next.lock().unwrap().ok_or("no second checkpoint was measured")?;
    let last = sink.last.lock().unwrap().take().ok_or("no last checkpoint")?;
    sink.vacate.store(false, Ordering::SeqCst);
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second).map_err(|e| e.to_string())?;
    let resume = ResumeFrom {
        seq: last.seq,
        state: last.state.clone(),
        job_disk: last.job_disk.clone(),
        overlay: last.overlay.clone(),
        console: std::fs::read(&last.console).unwrap_or_default(),
        accel: last.accel.to_string(),
        guest_s: last.guest_s,
    };
    let plan = Checkpointing { resume: Some(resume), ..plan };
    run(&second, &plan)?;
    let resume_s = sink.resumed.lock().unwrap().ok_or("the VM did not resume")?.as_secs_f64();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(CheckpointFigures {
        memory_mb,
        pause_s: pause.as_secs_f64(),
        took_s: took.as_secs_f64(),
        raw_mib: mib(first.raw),
        stored_mib: mib(first.stored()),
        compress_s: first.compress.as_secs_f64(),
        next_mib: mib(next),
        unpack_s: first.unpack.as_secs_f64(),
        resume_s,
    })
}
