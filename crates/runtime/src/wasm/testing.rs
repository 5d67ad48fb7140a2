//! What the wasm runtime's tests share: a WAT guest run as a job, in process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use vmgrid_job::{Files, Job, Network, Policy, Resources, Vm, VmType};

use crate::{RunError, RunRequest, RunResult, Runtime, RuntimeConfig};

/// Runs `wat` as a wasm job in process (no worker), with `timeout_s` and `cancel`.
pub(crate) fn run(
    wat: &str,
    timeout_s: u64,
    cancel: Option<Arc<AtomicBool>>,
) -> (Result<RunResult, RunError>, Duration) {
    run_with(wat, Resources { timeout_s, ..Resources::default() }, cancel)
}

/// Runs `wat` as a wasm job in process in an empty job directory, with `resources`.
pub(crate) fn run_with(
    wat: &str,
    resources: Resources,
    cancel: Option<Arc<AtomicBool>>,
) -> (Result<RunResult, RunError>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig { cache_dir: dir.path().join("cache"), output_cap: 1 << 20, ..RuntimeConfig::default() };
    let rt = Runtime::new(config);
    let start = Instant::now();
    let r = run_on(&rt, dir.path(), wat, resources, Policy::default(), 1, cancel);
    (r, start.elapsed())
}

/// Runs `wat` on `rt` as a wasm job with `resources` and `policy`, seeded with `seed`, its image
/// and its (empty) job directory in `dir`.
pub(crate) fn run_on(
    rt: &Runtime,
    dir: &Path,
    wat: &str,
    resources: Resources,
    policy: Policy,
    seed: u64,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<RunResult, RunError> {
    let (job, job_dir) = job(dir, wat, resources, policy);
    rt.run(&RunRequest {
        job: &job,
        job_dir: &job_dir,
        cancel,
        ssi: None,
        checkpoint: None,
        seed,
        net: None,
        empty_dir: true,
    })
}

/// A wasm job of `wat` with `resources` and `policy`: its image and its (empty) job directory
/// (returned) in `dir`.
pub(crate) fn job(dir: &Path, wat: &str, resources: Resources, policy: Policy) -> (Job, PathBuf) {
    let image = dir.join("guest.wat");
    std::fs::write(&image, wat).unwrap();
    let job_dir = dir.join("job");
    std::fs::create_dir(&job_dir).unwrap();
    let job = Job {
        source: dir.join("job.toml"),
        name: "guest".into(),
        vm: Vm {
            vm_type: VmType::Wasm,
            image: Some(image),
            args: vec![],
            env: BTreeMap::new(),
            kernel: None,
            initrd: None,
            append: None,
            network: Network::None,
        },
        resources,
        files: Files::default(),
        policy,
    };
    (job, job_dir)
}
