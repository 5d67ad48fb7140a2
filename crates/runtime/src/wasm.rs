//! The WebAssembly runtime: a WASI preview-1 command module in wasmtime, in this process.
//!
//! The guest gets the job directory (preopened as `/job`, `.` and `/`), its args and env, and
//! bounded stdout/stderr; nothing else. Where wasmtime-wasi's answers differ from Linux's
//! (trailing slashes, `O_NOFOLLOW`), `posix` gives Linux's. Memory is bounded by a store limiter.
//! Time is bounded by epoch interruption in this process, or, in a worker process (`worker`), by
//! the parent killing the worker: its code then has no epoch checks and runs at full speed.
//! A `[policy] deterministic` job runs on a second engine, made for the first such job, with
//! `determinism`'s settings and calls: the same outputs on every node.
//! A module is optimized by binaryen (`optimize`), confined, before Cranelift compiles it, unless
//! the job is deterministic or there is no `wasm-opt` here. Compiled modules are cached on disk,
//! keyed by the module's blake3, the engine's compatibility hash and the optimizer's identity;
//! this module holds vmgrid's only `unsafe` wasm code, the cache load.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::capture::CaptureSink;
use crate::{Failure, FailureKind, Outcome, RunError, RunRequest, RunResult, RuntimeConfig};

mod abi;
mod determinism;
pub mod optimize;
mod posix;
mod sleep;
mod ssi;
mod stream;
#[cfg(test)]
mod testing;
pub mod worker;

/// One epoch tick. Time limits are enforced to within about this much.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// How much of a pooled table stays resident when its instance ends, zeroed by hand.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;
/// Table elements a guest may allocate (8 bytes each).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

pub struct WasmRuntime {
    /// Whether guests are compiled with epoch checks (the time limit in this process).
    epochs: bool,
    plain: Flavor,
    /// For `[policy] deterministic` jobs (see `determinism`), made for the first one.
    deterministic: OnceLock<Result<Flavor, String>>,
    cache_dir: PathBuf,
    /// binaryen's optimizer, run over a module before it is compiled (none if this host has
    /// none); never for the deterministic engine.
    optimizer: Option<optimize::Optimizer>,
    /// Linked modules by (path, size, mtime, ssi, deterministic): a node running a sweep links its
    /// module once.
    ready: Mutex<HashMap<ReadyKey, InstancePre<GuestState>>>,
    /// In a worker: the files its guests' kept stdout and stderr are copied to as they come.
    mirrors: Option<(Arc<std::fs::File>, Arc<std::fs::File>)>,
}

type ReadyKey = (PathBuf, u64, SystemTime, bool, bool);

/// An engine and the linkers bound to it.
struct Flavor {
    engine: Engine,
    linker: Linker<GuestState>,
    /// WASI with the SSI mirror and the `vmgrid` import module, for processes of an SSI; none
    /// for the deterministic engine (an SSI process is never deterministic).
    ssi_linker: Option<Linker<GuestState>>,
    /// The deterministic engine, whose modules are compiled as submitted (see `optimize`).
    deterministic: bool,
}

impl Flavor {
    fn new(cfg: &Config, deterministic: bool, epochs: bool) -> wasmtime::Result<Flavor> {
        let engine = Engine::new(cfg)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut GuestState| &mut s.wasi)?;
        posix::add_to_linker(&mut linker)?;
        sleep::add_to_linker(&mut linker)?;
        let ssi_linker = if deterministic {
            determinism::add_to_linker(&mut linker)?;
            None
        } else {
            let mut ssi_linker = linker.clone();
            ssi::add_to_linker(&mut ssi_linker)?;
            Some(ssi_linker)
        };
        if epochs {
            // The ticker only holds a weak handle, so it ends when the engine does.
            let weak = engine.weak();
            std::thread::Builder::new().name("vmgrid-epoch".into()).spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        }
        Ok(Flavor { engine, linker, ssi_linker, deterministic })
    }
}

/// Linked modules kept in memory; past this, the map starts over.
const READY_MODULES: usize = 64;

struct GuestState {
    wasi: WasiP1Ctx,
    limits: MemoryLimit,
    ssi: Option<ssi::SsiFs>,
    /// When a sleeping guest must wake to be stopped (see `sleep`).
    stop: sleep::Stop,
    /// The guest called one of the calls that make a file, directory or link (see `posix`).
    created: bool,
}

/// Bounds linear memory to `memory_mb`. A denied growth makes `memory.grow` return -1, as the spec
/// says, and is remembered so that a guest that then dies is reported as out of memory.
struct MemoryLimit {
    max_bytes: usize,
    denied: Option<usize>,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// What both engines share: Cranelift's speed and, with `epochs`, epoch interruption for the
/// time limit (a check at every loop header and function entry).
fn base_config(epochs: bool) -> Config {
    let mut cfg = Config::new();
    cfg.epoch_interruption(epochs);
    cfg.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // No wasm backtrace on errors: a reason never shows one, and every guest that calls
    // `proc_exit` ends with such an error, whose backtrace cost a trivial job more than its run.
    cfg.wasm_backtrace_max_frames(None);
    cfg
}

/// What the wasm runtime needs of a job: what a worker process is sent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Task {
    image: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    job_dir: PathBuf,
    memory_mb: u64,
    timeout_s: u64,
    deterministic: bool,
    seed: u64,
}

impl Task {
    pub(crate) fn of(req: &RunRequest<'_>) -> Result<Task, RunError> {
        let job = req.job;
        let image = job.vm.image.clone().ok_or_else(|| RunError::BadJob("a wasm job needs `image`".into()))?;
        Ok(Task {
            image,
            args: job.vm.args.clone(),
            env: job.vm.env.clone(),
            job_dir: req.job_dir.to_path_buf(),
            memory_mb: job.resources.memory_mb,
            timeout_s: job.resources.timeout_s,
            deterministic: job.policy.deterministic,
            seed: req.seed,
        })
    }

    pub(crate) fn image(&self) -> &Path {
        &self.image
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }
}

impl WasmRuntime {
    /// A runtime whose guests check epochs (`epochs`, the time limit in this process) or not (in
    /// a worker process, whose parent enforces the limit).
    pub fn new(config: &RuntimeConfig, epochs: bool) -> wasmtime::Result<WasmRuntime> {
        let mut cfg = base_config(epochs);
        if !epochs {
            // A worker process, one per running job: each compiling on all cpus would start
            // that many threads per worker.
            cfg.parallel_compilation(false);
        }
        if config.pooled_instances > 0 {
            let n = config.pooled_instances;
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_core_instances(n).total_memories(n).total_tables(n).total_stacks(n);
            // A finished instance's table is zeroed by hand, not given back with `madvise` (a
            // TLB flush on every cpu of the node, per job). Its linear memory still is: a
            // trivial Rust guest leaves about 0.5 MiB resident, and zeroing that by hand cost
            // more than the `madvise` and the page faults (measured: 7,000-9,000 against
            // 8,000-10,800 jobs/s).
            pool.table_keep_resident(TABLE_KEEP_RESIDENT);
            cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        Ok(WasmRuntime {
            epochs,
            plain: Flavor::new(&cfg, false, epochs)?,
            deterministic: OnceLock::new(),
            cache_dir: config.cache_dir.join("wasm"),
            optimizer: optimize::Optimizer::find().ok(),
            ready: Mutex::new(HashMap::new()),
            mirrors: None,
        })
    }

    /// The same runtime with `optimizer` instead of the one found on this host (tests).
    #[cfg(test)]
    pub(crate) fn with_optimizer(mut self, optimizer: Option<optimize::Optimizer>) -> WasmRuntime {
        self.optimizer = optimizer;
        self
    }

    /// Copies each guest's kept stdout and stderr to `out` and `err` as well, as they come.
    pub(crate) fn mirror_output(&mut self, out: std::fs::File, err: std::fs::File) {
        self.mirrors = Some((Arc::new(out), Arc::new(err)));
    }

    /// The engine for a job: the deterministic one is made on first use, and allocates each
    /// instance on demand (a second pool would reserve as much address space again, for the
    /// few deterministic jobs).
    fn flavor(&self, deterministic: bool) -> Result<&Flavor, RunError> {
        if !deterministic {
            return Ok(&self.plain);
        }
        self.deterministic
            .get_or_init(|| {
                let mut cfg = base_config(self.epochs);
                determinism::configure(&mut cfg);
                Flavor::new(&cfg, true, self.epochs).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| RunError::Host(format!("cannot start the deterministic wasm engine: {e}")))
    }

    /// A linked module, from memory if this image was linked before.
    fn prepared(&self, image: &Path, for_ssi: bool, deterministic: bool) -> Result<InstancePre<GuestState>, RunError> {
        let key = std::fs::metadata(image)
            .ok()
            .and_then(|m| Some((image.to_path_buf(), m.len(), m.modified().ok()?, for_ssi, deterministic)));
        if let Some(k) = &key
            && let Some(pre) = self.ready.lock().unwrap_or_else(|p| p.into_inner()).get(k)
        {
            return Ok(pre.clone());
        }
        let pre = self.prepare(self.flavor(deterministic)?, image, for_ssi)?;
        if let Some(k) = key {
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            if ready.len() >= READY_MODULES {
                ready.clear();
            }
            ready.insert(k, pre.clone());
        }
        Ok(pre)
    }

    /// Loads and compiles (or fetches from the cache) a module, ready to instantiate.
    fn prepare(&self, flavor: &Flavor, image: &Path, for_ssi: bool) -> Result<InstancePre<GuestState>, RunError> {
        let bytes = std::fs::read(image)
            .map_err(|e| RunError::BadJob(format!("cannot read the wasm image `{}`: {e}", image.display())))?;
        if bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] != [1, 0, 0, 0] {
            return Err(RunError::BadJob(format!(
                "`{}` is a WebAssembly component; vmgrid runs WASI preview-1 command modules (build for wasm32-wasip1)",
                image.display()
            )));
        }
        let module = self.load_module(flavor, image, &bytes)?;
        let linker = match (for_ssi, &flavor.ssi_linker) {
            (false, _) => &flavor.linker,
            (true, Some(ssi_linker)) => ssi_linker,
            (true, None) => return Err(RunError::BadJob("an SSI process cannot be deterministic".into())),
        };
        linker.instantiate_pre(&module).map_err(|e| {
            let hint = if !for_ssi && module.imports().any(|i| i.module() == "vmgrid") {
                " (it imports `vmgrid`, so it is a process for `vmgrid ssi`, not a job)"
            } else {
                ""
            };
            RunError::BadJob(format!("`{}` cannot be linked as a WASI preview-1 command: {e:#}{hint}", image.display()))
        })
    }

    fn load_module(&self, flavor: &Flavor, image: &Path, bytes: &[u8]) -> Result<Module, RunError> {
        let engine = &flavor.engine;
        let optimizer = self.optimizer.as_ref().filter(|_| !flavor.deterministic);
        let path = self.cache_path(engine, bytes, optimizer.map(optimize::Optimizer::identity));
        if path.exists() {
            // SAFETY: `deserialize_file` trusts the file to be a module that this engine
            // serialized. The file lives in vmgrid's own cache directory, is written only by
            // `store_in_cache` below from `Module::serialize` (atomically, by rename), and its
            // name carries the engine's compatibility hash, so a different wasmtime or different
            // settings (the deterministic engine's) use a different file. Jobs cannot write
            // there: guests only see their job directory. wasmtime still checks the header and
            // version and fails cleanly on a mismatch, in which case we recompile.
            match unsafe { Module::deserialize_file(engine, &path) } {
                Ok(m) => return Ok(m),
                Err(e) => tracing::warn!(path = %path.display(), "ignoring unusable cached module: {e:#}"),
            }
        }
        let invalid =
            |e: String| RunError::BadJob(format!("`{}` is not a valid WebAssembly module: {e}", image.display()));
        let module = match optimizer {
            None => Module::new(engine, bytes).map_err(|e| invalid(format!("{e:#}")))?,
            Some(optimizer) => {
                // binaryen only sees what wasmtime has validated (a WAT image as its binary).
                let binary = wat::parse_bytes(bytes).map_err(|e| invalid(e.to_string()))?;
                Module::validate(engine, &binary).map_err(|e| invalid(format!("{e:#}")))?;
                match optimizer.compile(engine, &binary) {
                    Ok(m) => m,
                    Err(no) => {
                        let why = &no.why;
                        tracing::warn!(image = %image.display(), "binaryen did not optimize the module, so it is compiled as submitted: {why}");
                        let module = Module::new(engine, &binary).map_err(|e| invalid(format!("{e:#}")))?;
                        if !no.lasting {
                            // Not cached on disk: a later process tries binaryen again (this one
                            // keeps the module it linked).
                            return Ok(module);
                        }
                        module
                    }
                }
            }
        };
        if let Err(e) = self.store_in_cache(&module, &path) {
            tracing::warn!(path = %path.display(), "cannot cache the compiled module: {e:#}");
        }
        Ok(module)
    }

    fn cache_path(&self, engine: &Engine, bytes: &[u8], optimizer: Option<u64>) -> PathBuf {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        optimizer.hash(&mut h);
        let engine_hash = h.finish();
        self.cache_dir.join(format!("{}-{engine_hash:016x}.cwasm", blake3::hash(bytes).to_hex()))
    }

    fn store_in_cache(&self, module: &Module, path: &Path) -> wasmtime::Result<()> {
        std::fs::create_dir_all(&self.cache_dir)?;
        let tmp = tempfile::NamedTempFile::new_in(&self.cache_dir)?;
        std::fs::write(tmp.path(), module.serialize()?)?;
        tmp.persist(path)?;
        Ok(())
    }

    /// Loads (or compiles) `task`'s module, ready to run.
    pub(crate) fn ready(&self, task: &Task) -> Result<(), RunError> {
        self.prepared(&task.image, false, task.deterministic).map(drop)
    }

    pub fn run(&self, req: &RunRequest<'_>, config: &RuntimeConfig) -> Result<RunResult, RunError> {
        self.run_task(&Task::of(req)?, req.ssi.clone(), req.cancel.clone(), config)
    }

    /// Runs `task`; an SSI process's streams and files go to its home `ssi`. Only a runtime with
    /// epochs stops a computing guest at its time limit or when `cancel` is set; a sleeping one
    /// is stopped by either runtime.
    pub(crate) fn run_task(
        &self,
        task: &Task,
        ssi: Option<Arc<dyn crate::ssi::SsiHost>>,
        cancel: Option<Arc<AtomicBool>>,
        config: &RuntimeConfig,
    ) -> Result<RunResult, RunError> {
        let pre = self.prepared(&task.image, ssi.is_some(), task.deterministic)?;
        let start = Instant::now();
        let (stdout, stderr) = CaptureSink::pair(config);
        if let Some((out, err)) = &self.mirrors {
            stdout.mirror_to(out.clone());
            stderr.mirror_to(err.clone());
        }
        let mut state = guest_state(task, ssi, &stdout, &stderr)?;
        // No deadline: a time limit past what an `Instant` holds.
        let deadline = start.checked_add(task.timeout());
        state.stop = sleep::Stop { deadline, cancel: cancel.clone() };
        let mut store = Store::new(&self.flavor(task.deterministic)?.engine, state);
        store.limiter(|s| &mut s.limits);
        let cancelled = move || cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        if self.epochs {
            // Every tick checks the time limit and the cancel flag.
            let cancelled = cancelled.clone();
            let due = move || deadline.is_some_and(|d| Instant::now() >= d) || cancelled();
            store.epoch_deadline_callback(move |_| match due() {
                true => Err(Trap::Interrupt.into()),
                false => Ok(wasmtime::UpdateDeadline::Continue(1)),
            });
            store.set_epoch_deadline(1);
        }

        let ended = pre.instantiate(&mut store).and_then(|instance| {
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call(&mut store, ())
        });
        // Exit closes the process's descriptors: what it wrote goes home.
        let written_back = store.data_mut().ssi.as_mut().map_or(Ok(()), |s| s.close_all());
        let mut outcome = match ended {
            Ok(()) => Outcome::Exited(0),
            Err(_) if cancelled() => Outcome::Failed(crate::cancelled_failure()),
            Err(e) => classify(e, &store, task.memory_mb, task.timeout_s),
        };
        if let (Err(errno), Outcome::Exited(_)) = (written_back, &outcome) {
            outcome = Outcome::Failed(Failure {
                kind: FailureKind::GuestError,
                reason: format!("the files the process wrote could not be written back to its home (errno {errno})"),
            });
        }
        // An SSI process's file calls are its own (`ssi`), and not followed.
        let created = store.data().created || store.data().ssi.is_some();
        drop(store);
        Ok(RunResult { outcome, stdout: stdout.take(), stderr: stderr.take(), wall: start.elapsed(), created })
    }
}

/// The guest's WASI context (args, env, stdout and stderr, the preopened job directory and, for
/// a deterministic job, its seeded random numbers) and its limits.
fn guest_state(
    task: &Task,
    ssi: Option<Arc<dyn crate::ssi::SsiHost>>,
    stdout: &CaptureSink,
    stderr: &CaptureSink,
) -> Result<GuestState, RunError> {
    let (out_stream, err_stream) = match &ssi {
        Some(host) => (stream::CapturedStream::Home(host.clone(), 1), stream::CapturedStream::Home(host.clone(), 2)),
        None => (stream::CapturedStream::Capture(stdout.clone()), stream::CapturedStream::Capture(stderr.clone())),
    };
    let argv0 = task.image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "main.wasm".into());
    // An SSI process's args are its whole argv: argv[0] is its path in the SSI filesystem.
    let argv = if ssi.is_some() {
        task.args.clone()
    } else {
        std::iter::once(argv0).chain(task.args.iter().cloned()).collect()
    };
    let mut wasi = WasiCtxBuilder::new();
    wasi.args(&argv).stdout(out_stream).stderr(err_stream).allow_blocking_current_thread(true);
    for (k, v) in &task.env {
        wasi.env(k, v);
    }
    if task.deterministic {
        determinism::seed_random(&mut wasi, task.seed);
    }
    // An SSI process sees the one filesystem as `/`; a job sees its job directory as `/job`,
    // `.` and `/` (descriptors 3, 4 and 5), as `wasmtime --dir DIR::/` would give it.
    let guest_paths: &[&str] = if ssi.is_some() { &["/"] } else { &["/job", ".", "/"] };
    for guest_path in guest_paths {
        wasi.preopened_dir(&task.job_dir, guest_path, FsPerms::ReadWrite)
            .map_err(|e| RunError::host(format!("cannot open the job directory {}", task.job_dir.display()), e))?;
    }
    Ok(GuestState {
        wasi: wasi.build_p1(),
        limits: MemoryLimit { max_bytes: (task.memory_mb as usize) << 20, denied: None },
        ssi: ssi.map(|h| ssi::SsiFs::new(h, task.job_dir.clone())),
        stop: sleep::Stop::default(),
        created: false,
    })
}

fn classify(e: wasmtime::Error, store: &Store<GuestState>, memory_mb: u64, timeout_s: u64) -> Outcome {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        if exit.0 != 0
            && let Some(desired) = store.data().limits.denied
        {
            return Outcome::Failed(memory_failure(memory_mb, desired));
        }
        return Outcome::Exited(exit.0);
    }
    if let Some(refused) = e.downcast_ref::<determinism::Refused>() {
        return Outcome::Failed(Failure { kind: FailureKind::GuestError, reason: refused.to_string() });
    }
    if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
        return Outcome::Failed(Failure {
            kind: FailureKind::TimeLimit,
            reason: format!("the time limit of {timeout_s} s was exceeded (timeout_s)"),
        });
    }
    if let Some(desired) = store.data().limits.denied {
        return Outcome::Failed(memory_failure(memory_mb, desired));
    }
    let what = match e.downcast_ref::<Trap>() {
        Some(t) => format!("the guest trapped: {t}"),
        None => format!("the guest failed: {e:#}"),
    };
    Outcome::Failed(Failure { kind: FailureKind::GuestError, reason: first_lines(&what, 12) })
}

fn memory_failure(memory_mb: u64, desired: usize) -> Failure {
    Failure {
        kind: FailureKind::MemoryLimit,
        reason: format!(
            "the memory limit of {memory_mb} MiB was exceeded: the guest asked for {} MiB (memory_mb)",
            desired.div_ceil(1 << 20)
        ),
    }
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().take(n).collect::<Vec<_>>().join("\n")
}
