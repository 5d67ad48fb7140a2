//! `vmgrid run`: one job, here, in its VM, without a pool.

use std::path::PathBuf;

use vmgrid_runtime::{Outcome, RunRequest, Runtime, RuntimeConfig, jobdir};

use crate::CliError;

/// Run one job here, inside its VM, without a pool.
///
/// The job's stdout and stderr are shown as they arrive, its output files are copied to --out, and
/// vmgrid exits with the job's own exit code. A job that does not finish (time or memory limit,
/// trap, kernel panic, no exit status) exits 1 with the reason on stderr; a bad job file, image or
/// input exits 2.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  vmgrid run examples/wordcount/job.toml --out results/\n  \
VMGRID_ACCEL=tcg vmgrid run examples/qemu-hello/job.toml\n\nEnvironment:\n  \
VMGRID_CACHE_DIR  compiled modules and the accelerator probe (default ~/.cache/vmgrid)\n  \
VMGRID_ACCEL      kvm or tcg, to skip the accelerator probe\n  \
VMGRID_QEMU       the qemu-system binary (default qemu-system-<arch> on PATH)")]
pub struct RunArgs {
    /// The job file (TOML).
    job: PathBuf,
    /// Where the job's output files go, keeping their paths relative to the job directory.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Bytes of stdout and of stderr kept; the rest is dropped and the cut is marked.
    #[arg(long, default_value_t = RuntimeConfig::DEFAULT_OUTPUT_CAP, value_name = "BYTES")]
    output_cap: usize,
    /// Keep the job directory after the run and print where it is.
    #[arg(long)]
    keep: bool,
}

pub fn run(args: RunArgs) -> Result<i32, CliError> {
    let job = vmgrid_job::load_job(&args.job)?;
    if job.vm.network == vmgrid_job::Network::Grid {
        eprintln!(
            "vmgrid: `network = \"grid\"` is the pool's overlay, which a VM run here is not on: it runs without a NIC (submit it to a pool with `vmgrid submit`)"
        );
    }
    // `vmgrid-run-`: no job name can make it look like a scratch directory (`runtime::scratch`).
    let job_dir = tempfile::Builder::new()
        .prefix(&format!("vmgrid-run-{}-", job.name))
        .tempdir()
        .map_err(|e| CliError::Failed(format!("cannot create a job directory: {e}")))?;
    jobdir::stage_inputs(&job, job_dir.path())?;
    let config = RuntimeConfig {
        output_cap: args.output_cap,
        echo: true,
        wasm_worker: vmgrid_runtime::wasm::worker::this_program(),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(config);
    // A local run has no job id: a deterministic job's random numbers are seeded with 0.
    let result = runtime.run(&RunRequest {
        job: &job,
        job_dir: job_dir.path(),
        cancel: None,
        ssi: None,
        checkpoint: None,
        seed: 0,
        // `network = "grid"` needs a pool's overlay: run here, the VM has no NIC.
        net: None,
        empty_dir: job.files.inputs.is_empty(),
    });
    // Outputs are collected whatever happened, so a failed job's partial results are kept, but
    // not past the disk limit.
    let collected = match &result {
        Ok(r) if !r.keeps_outputs() => Ok(jobdir::Collected::default()),
        _ => jobdir::collect_outputs(&job, job_dir.path(), &args.out),
    };
    if args.keep {
        let kept = job_dir.keep();
        eprintln!("vmgrid: the job directory is kept at {}", kept.display());
    }
    let result = result?;
    let collected = collected?;
    for (path, why) in &collected.skipped {
        eprintln!("vmgrid: output {} was not collected: {why}", path.display());
    }
    for (name, c) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
        if let Some(note) = c.truncation_note() {
            eprintln!("vmgrid: the job's {name} was cut: {note}");
        }
    }
    match &result.outcome {
        Outcome::Exited(code) if (0..=255).contains(code) => Ok(*code),
        Outcome::Exited(code) => {
            eprintln!("vmgrid: the job exited with {code}, which a shell cannot show; exiting 1");
            Ok(1)
        }
        Outcome::Failed(f) => {
            eprintln!("vmgrid: the job failed: {}", f.reason);
            Ok(1)
        }
        // `vmgrid run` takes no checkpoints, so nothing can vacate its VM.
        Outcome::Vacated { seq } => Err(CliError::Failed(format!("the VM was stopped after checkpoint {seq}"))),
    }
}
