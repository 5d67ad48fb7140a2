//! Checkpoints of QEMU jobs (the guest kit under this host's accelerator), through the runtime
//! the node agent uses: for a 256 MiB and a 1 GiB guest, idle and with most of its memory
//! written (60% of it: random bytes in a tmpfs), the pause of one checkpoint (from `stop` to
//! `cont`: the guest's vCPUs do not run meanwhile, and its clocks do not advance), its size as
//! QEMU writes it and as the node stores it (zstd, level 1), and the resume in another QEMU
//! process (start to running from the checkpoint) as another node does it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Unpacking the stored parts, as the resuming node does.
    pub unpack_s: f64,
    pub resume_s: f64,
}

/// A checkpoint's pause, its whole time, its bytes saved and stored, and the times to compress
/// and to unpack.
type Measured = (Duration, Duration, u64, u64, Duration, Duration);

/// Keeps the measured checkpoint (the first taken once the guest said `ready`), then asks for a
/// last one and keeps it to resume from.
#[derive(Default)]
struct Sink {
    vacate: Arc<AtomicBool>,
    measured: Mutex<Option<Measured>>,
    last: Mutex<Option<TakenCheckpoint>>,
    resumed: Mutex<Option<Duration>>,
}

/// The parts' bytes as saved and as stored (zstd, level 1, as the node does), and the times to
/// compress them and to unpack them again.
fn sizes(ck: &TakenCheckpoint) -> Result<(u64, u64, Duration, Duration), String> {
    let (mut raw, mut packed) = (0, Vec::new());
    let started = Instant::now();
    for p in [Some(&ck.state), Some(&ck.job_disk), ck.overlay.as_ref()].into_iter().flatten() {
        let input = std::fs::File::open(p).map_err(|e| e.to_string())?;
        raw += input.metadata().map_err(|e| e.to_string())?.len();
        packed.push(zstd::stream::encode_all(input, 1).map_err(|e| e.to_string())?);
    }
    let compress = started.elapsed();
    let started = Instant::now();
    for part in &packed {
        zstd::stream::copy_decode(part.as_slice(), std::io::sink()).map_err(|e| e.to_string())?;
    }
    Ok((raw, packed.iter().map(|p| p.len() as u64).sum(), compress, started.elapsed()))
}

impl CheckpointSink for Sink {
    fn store(&self, ck: TakenCheckpoint) -> Result<(), String> {
        if ck.last {
            *self.last.lock().unwrap() = Some(ck);
            return Ok(());
        }
        let ready = std::fs::read_to_string(&ck.console).unwrap_or_default().contains("ready");
        let mut measured = self.measured.lock().unwrap();
        if ready && measured.is_none() {
            let (raw, stored, compress, unpack) = sizes(&ck)?;
            *measured = Some((ck.pause, ck.took, raw, stored, compress, unpack));
            self.vacate.store(true, Ordering::SeqCst);
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
        let req = RunRequest { job: &job, job_dir, cancel: None, ssi: None, checkpoint: Some(plan) };
        match runtime.run(&req).map_err(|e| e.to_string())?.outcome {
            Outcome::Vacated { .. } => Ok(()),
            other => Err(format!("the guest ended without being vacated: {other:?}")),
        }
    };
    run(&first, &plan)?;
    let (pause, took, raw, stored, compress, unpack) =
        sink.measured.lock().unwrap().ok_or("no checkpoint was measured")?;
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
        raw_mib: mib(raw),
        stored_mib: mib(stored),
        compress_s: compress.as_secs_f64(),
        unpack_s: unpack.as_secs_f64(),
        resume_s,
    })
}
