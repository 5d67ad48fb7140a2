//! Runs one vmgrid job inside a virtual machine, on this host, and reports what happened.
//!
//! The runtime is a library with a typed request ([`RunRequest`]) and a typed result
//! ([`RunResult`] or [`RunError`]). It is the only part of vmgrid that starts guest code or
//! processes (`qemu-system-*`, `qemu-img`, `java`); it knows nothing of pools, HTTP or SQLite.
//! One module per VM type: [`wasm`] (wasmtime, in process or in worker processes), [`qemu`] (a system VM) and [`jvm`].

pub mod capture;
pub mod disk;
pub mod jobdir;
pub mod jvm;
pub mod process;
pub mod qemu;
pub mod scratch;
pub mod ssi;
pub mod tools;
pub mod wasm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use capture::Captured;
pub use vmgrid_job::FailureKind;
use vmgrid_job::{Job, VmType};

/// How a runtime is set up on this host (sent whole to a wasm worker).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuntimeConfig {
    /// Compiled wasm modules, the accelerator probe's answer and other rebuildable state.
    pub cache_dir: PathBuf,
    /// Bytes of stdout (and, separately, of stderr) kept per job; the rest is dropped and counted.
    pub output_cap: usize,
    /// Echo the guest's stdout and stderr to ours as they arrive (up to the cap).
    pub echo: bool,
    /// With N > 0, wasm instances come from a pool of N preallocated slots (wasmtime's pooling
    /// allocator), which a node running many short jobs reuses; 0 allocates each on demand.
    pub pooled_instances: u32,
    /// The vmgrid binary: wasm jobs then run in worker processes it starts (`wasm::worker`),
    /// compiled without epoch checks and killed at their time limit. None runs them in this
    /// process, with epoch interruption. SSI processes always run in this process.
    pub wasm_worker: Option<PathBuf>,
}

impl RuntimeConfig {
    pub const DEFAULT_OUTPUT_CAP: usize = 16 << 20;

    /// `$VMGRID_CACHE_DIR`, else `$XDG_CACHE_HOME/vmgrid`, else `~/.cache/vmgrid`.
    pub fn default_cache_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("VMGRID_CACHE_DIR") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("vmgrid");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/vmgrid"),
            None => std::env::temp_dir().join("vmgrid-cache"),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: Self::default_cache_dir(),
            output_cap: Self::DEFAULT_OUTPUT_CAP,
            echo: false,
            pooled_instances: 0,
            wasm_worker: None,
        }
    }
}

/// One job to run: the validated job and the directory it runs in (already holding its inputs).
#[derive(Clone)]
pub struct RunRequest<'a> {
    pub job: &'a Job,
    pub job_dir: &'a Path,
    /// Set to stop the job early (its lease was revoked); it then fails as `Cancelled`.
    pub cancel: Option<Arc<AtomicBool>>,
    /// For a process of a single-system image: its home. The job directory is then the mirror of
    /// the home's files, preopened as `/`, and stdout and stderr go to the home's console.
    pub ssi: Option<Arc<dyn ssi::SsiHost>>,
    /// A QEMU job's checkpoints: taken while it runs, and the one it resumes from.
    pub checkpoint: Option<&'a qemu::checkpoint::Checkpointing>,
    /// The job's id: a deterministic job's random numbers are seeded from it.
    pub seed: u64,
    /// A `network = "grid"` QEMU job's NIC: the node's end of it is the overlay's switch.
    pub net: Option<&'a qemu::NetAttach>,
    /// The job directory was empty when the run began (no inputs staged): if the guest made
    /// nothing in it (`RunResult::created`), it is not measured again when the guest ends.
    pub empty_dir: bool,
}

impl RunRequest<'_> {
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest ran to the end and reported this exit code.
    Exited(i32),
    /// The guest did not finish properly; the job, not the host, is at fault.
    Failed(Failure),
    /// The VM was stopped right after its checkpoint `seq` (stored), to resume elsewhere.
    Vacated { seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// A sentence a person can act on.
    pub reason: String,
}

pub(crate) fn cancelled_failure() -> Failure {
    Failure { kind: FailureKind::Cancelled, reason: "the job was stopped by its node".into() }
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub outcome: Outcome,
    pub stdout: Captured,
    pub stderr: Captured,
    pub wall: Duration,
    /// Whether the guest may have made something in its job directory. Only a wasm guest, whose
    /// every file call vmgrid sees, is known not to have (it made no file, directory or link);
    /// a directory it found empty is then still empty.
    pub created: bool,
}

impl RunResult {
    /// Whether the job's outputs may be collected: not after it overran its disk limit (copying
    /// them out would move the overrun to the host's other disk, or to the coordinator).
    pub fn keeps_outputs(&self) -> bool {
        !matches!(&self.outcome, Outcome::Failed(f) if f.kind == FailureKind::DiskLimit)
    }

    /// The exit code a shell should see: the guest's own, or 1 when it did not finish.
    pub fn exit_code(&self) -> i32 {
        match &self.outcome {
            Outcome::Exited(c) => *c,
            Outcome::Failed(_) | Outcome::Vacated { .. } => 1,
        }
    }
}

/// Why a job could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job's own fault: a missing or invalid image, a bad input. Rerunning will not help.
    #[error("{0}")]
    BadJob(String),
    /// This host cannot run the job (missing qemu, IO failure). Another host may.
    #[error("{0}")]
    Host(String),
    /// The checkpoint the run was to resume from cannot be used: a part is refused or
    /// unreadable, or QEMU could not load it.
    #[error("{0}")]
    BadCheckpoint(String),
}

impl RunError {
    pub fn host(context: impl std::fmt::Display, e: impl std::fmt::Display) -> RunError {
        RunError::Host(format!("{context}: {e}"))
    }
}

/// All the VM runtimes of one host, created once and reused across jobs.
pub struct Runtime {
    config: RuntimeConfig,
    wasm: std::sync::OnceLock<Result<wasm::WasmRuntime, String>>,
    workers: Option<wasm::worker::Workers>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Runtime {
        let workers = config.wasm_worker.clone().map(|p| wasm::worker::Workers::new(p, &config));
        Runtime { config, wasm: std::sync::OnceLock::new(), workers }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    fn wasm(&self) -> Result<&wasm::WasmRuntime, RunError> {
        self.wasm
            .get_or_init(|| wasm::WasmRuntime::new(&self.config, true).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| RunError::Host(format!("cannot start the wasm engine: {e}")))
    }

    /// A wasm job: in a worker process, unless its module's last run here was short (see
    /// `wasm::worker`), it is an SSI process, or no worker can be started.
    fn run_wasm(&self, req: &RunRequest<'_>) -> Result<RunResult, RunError> {
        let Some(workers) = self.workers.as_ref().filter(|_| req.ssi.is_none()) else {
            return self.wasm()?.run(req, &self.config);
        };
        let task = wasm::Task::of(req)?;
        let short = workers.short(task.image());
        if !short && let Some(result) = workers.run(&task, req.cancel.as_deref()) {
            return result;
        }
        let result = self.wasm()?.run(req, &self.config);
        if short && let Ok(r) = &result {
            workers.ran(task.image(), r.wall);
        }
        result
    }

    /// Runs the job in its VM and waits for it. Outputs stay in the job directory. A job whose
    /// directory grows past its `disk_mb` is stopped as soon as the watchdog sees it, and fails
    /// with [`FailureKind::DiskLimit`].
    pub fn run(&self, req: &RunRequest<'_>) -> Result<RunResult, RunError> {
        if req.ssi.is_some() && req.job.vm.vm_type != VmType::Wasm {
            return Err(RunError::BadJob("an SSI process must be a WASI preview-1 module (vm = \"wasm\")".into()));
        }
        if req.checkpoint.is_some() && req.job.vm.vm_type != VmType::Qemu {
            return Err(RunError::BadJob("only QEMU jobs can be checkpointed (checkpoint_s)".into()));
        }
        let (result, stopped_at) = disk::watched(req, |req| match req.job.vm.vm_type {
            VmType::Wasm => self.run_wasm(req),
            VmType::Qemu => qemu::run(req, &self.config),
            VmType::Jvm => jvm::run(req, &self.config),
        });
        let mut result = result?;
        let cap = req.job.resources.disk_mb.saturating_mul(1 << 20);
        // The watchdog measures between ticks: a job that ended in between is measured once more.
        let over = stopped_at.map(|u| (u, "the VM was stopped")).or_else(|| {
            let untouched = req.empty_dir && !result.created;
            let ended = (matches!(result.outcome, Outcome::Exited(_)) && !untouched).then(|| disk::usage(req.job_dir));
            ended.filter(|&u| u > cap).map(|u| (u, "the VM had ended"))
        });
        if let Some((used, what)) = over {
            result.outcome = Outcome::Failed(Failure {
                kind: FailureKind::DiskLimit,
                reason: format!(
                    "the job directory held {} MiB, over the disk_mb limit of {} MiB; {what} and no outputs were kept",
                    used.div_ceil(1 << 20),
                    req.job.resources.disk_mb
                ),
            });
        }
        Ok(result)
    }
}
