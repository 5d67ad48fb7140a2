//! `vmgrid glidein`: a Slurm cluster lends nodes to the pool. `glidein slurm` submits pilot jobs
//! with `sbatch`; each pilot runs `vmgrid node` on its Slurm node until its time is nearly up,
//! then drains and exits, releasing the allocation. `glidein status` joins `squeue` with the
//! pool's nodes by their `slurm.job_id` label.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::CliError;
use crate::pool_config::{PoolArgs, ca_beside, default_data_dir, read_ca_file, read_token_file};

#[derive(clap::Args, Debug)]
#[command(after_help = "A site lends a Slurm cluster to the pool by submitting pilots: each pilot is a
Slurm batch job that runs a node agent (`vmgrid node`) labelled slurm.job_id and slurm.partition.
It takes pool jobs until its Slurm time is nearly up (--time minus --margin-s), then drains (no
new jobs; running ones finish or are handed back) and exits, releasing the allocation. `scancel`
makes it drain at once; jobs it cannot finish are run again elsewhere. A pilot that cannot reach
the pool exits at once with the reason in its Slurm output file.

The pool token and CA are copied into a private directory (mode 0700, files 0600) and the batch
script names them by path: they never appear on a command line (`ps`, `squeue`). The directory
must be readable where the pilots run (a shared home, as on most clusters).

Examples:
  vmgrid glidein slurm --nodes 4 --time 2:00:00 --partition batch --pool https://grid:7800 \\
      --token-file /srv/vmgrid/pool.token -- --account=physics
  vmgrid glidein status                 pilots: Slurm state, pool node state, running jobs
  scancel --name vmgrid-pilot           all pilots drain and leave")]
pub struct GlideinArgs {
    #[command(subcommand)]
    action: GlideinAction,
}

#[derive(clap::Subcommand, Debug)]
enum GlideinAction {
    /// Submit N pilot jobs to Slurm with sbatch; prints their Slurm job ids.
    Slurm(SlurmArgs),
    /// The pilots: Slurm job id and state, pool node and state, running jobs.
    Status(StatusArgs),
    /// (Run by a pilot.) Check that the pool answers; exit 1 with the reason if it does not.
    #[command(hide = true)]
    Preflight(PreflightArgs),
}

#[derive(clap::Args, Debug)]
struct SlurmArgs {
    /// How many pilots (Slurm jobs) to submit.
    #[arg(long)]
    nodes: u32,
    /// Each pilot's Slurm time limit: MM, MM:SS, HH:MM:SS or D-HH:MM:SS.
    #[arg(long)]
    time: String,
    /// The Slurm partition (default: the cluster's default).
    #[arg(long)]
    partition: Option<String>,
    /// The pool's URL.
    #[arg(long, value_name = "URL", env = "VMGRID_POOL")]
    pool: String,
    /// The pool token nodes join with [default: pool.token in the data dir].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The pool's CA certificate [default: ca.pem beside the token file].
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Stop taking jobs and drain this long before the Slurm time limit.
    #[arg(long, default_value_t = 300)]
    margin_s: u64,
    /// How long a draining pilot waits for running jobs before handing them back
    /// [default: the margin minus 30 s].
    #[arg(long)]
    drain_timeout_s: Option<u64>,
    /// The Slurm job name (`glidein status` finds pilots by it).
    #[arg(long, default_value = "vmgrid-pilot")]
    job_name: String,
    /// Where the batch script, the token, the CA and the pilots' output files go (private)
    /// [default: glidein/ in the data dir].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The vmgrid binary pilots run [default: this one].
    #[arg(long, value_name = "PATH")]
    vmgrid: Option<PathBuf>,
    /// More sbatch options, after `--`.
    #[arg(last = true)]
    sbatch: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// The Slurm job name pilots were submitted with.
    #[arg(long, default_value = "vmgrid-pilot")]
    job_name: String,
    #[command(flatten)]
    pool: PoolArgs,
}

#[derive(clap::Args, Debug)]
struct PreflightArgs {
    #[arg(long)]
    pool: String,
    #[arg(long)]
    token_file: PathBuf,
    #[arg(long)]
    ca_file: PathBuf,
    /// Give up after this long.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

pub fn run(args: GlideinArgs) -> Result<i32, CliError> {
    match args.action {
        GlideinAction::Slurm(a) => slurm(a),
        GlideinAction::Status(a) => status(a),
        GlideinAction::Preflight(a) => preflight(a),
    }
}

/// Writes a file only the user may read.
fn write_private(path: &Path, content: &str, mode: u32) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::Failed(format!("cannot write {}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(fail)?;
    f.write_all(content.as_bytes()).map_err(fail)?;
    Ok(())
}

fn slurm(a: SlurmArgs) -> Result<i32, CliError> {
    if a.nodes == 0 {
        return Err(CliError::BadInput("--nodes must be at least 1".into()));
    }
    let time_s = vmgrid_slurm::parse_slurm_time(&a.time).map_err(CliError::BadInput)?;
    if a.margin_s + 30 > time_s {
        return Err(CliError::BadInput(format!(
            "--time {} ({time_s} s) leaves no time to run jobs before the --margin-s {} (and 30 s to start)",
            a.time, a.margin_s
        )));
    }
    let drain_timeout_s = a.drain_timeout_s.unwrap_or(a.margin_s.saturating_sub(30).max(5));
    if drain_timeout_s >= a.margin_s {
        return Err(CliError::BadInput(format!(
            "--drain-timeout-s {drain_timeout_s} must be less than --margin-s {}",
            a.margin_s
        )));
    }
    let token_path =
        a.token_file.clone().unwrap_or_else(|| default_data_dir().join(vmgrid_coordinator::POOL_TOKEN_FILE));
    let token = read_token_file(&token_path)?;
    let ca = match &a.ca_file {
        Some(f) => read_ca_file(f)?,
        None => ca_beside(&token_path)?.ok_or_else(|| {
            CliError::BadInput(format!(
                "no CA: pass --ca-file (the coordinator's ca.pem); none beside {}",
                token_path.display()
            ))
        })?,
    };
    let dir = a.dir.clone().unwrap_or_else(|| default_data_dir().join("glidein"));
    std::fs::create_dir_all(&dir).map_err(|e| CliError::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let dir = dir.canonicalize().map_err(|e| CliError::Failed(format!("{}: {e}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| CliError::Failed(format!("cannot make {} private: {e}", dir.display())))?;
    let vmgrid = match &a.vmgrid {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| CliError::Failed(format!("cannot find this binary: {e}")))?,
    };
    let (tok_file, ca_file, script_file) = (dir.join("pool.token"), dir.join("ca.pem"), dir.join("pilot.sh"));
    write_private(&tok_file, &format!("{token}\n"), 0o600)?;
    write_private(&ca_file, &ca, 0o600)?;
    let script = vmgrid_slurm::pilot_script(&vmgrid_slurm::Pilot {
        vmgrid: &vmgrid.to_string_lossy(),
        pool: &a.pool,
        token_file: &tok_file.to_string_lossy(),
        ca_file: &ca_file.to_string_lossy(),
        lifetime_s: time_s - a.margin_s,
        drain_timeout_s,
    });
    write_private(&script_file, &script, 0o700)?;
    for _ in 0..a.nodes {
        let id = vmgrid_slurm::sbatch(&vmgrid_slurm::Submit {
            job_name: &a.job_name,
            time: &a.time,
            // A second warning, after the pilot's own timer: the script drains on SIGTERM.
            signal_s: (a.margin_s / 2).min(120),
            output_dir: &dir,
            partition: a.partition.as_deref(),
            extra: &a.sbatch,
            script: &script_file,
        })
        .map_err(CliError::Failed)?;
        println!("{id}");
    }
    eprintln!("vmgrid: pilots' output in {}/pilot-JOBID.out; see `vmgrid glidein status`", dir.display());
    Ok(0)
}

fn preflight(a: PreflightArgs) -> Result<i32, CliError> {
    let token = read_token_file(&a.token_file)?;
    let ca = read_ca_file(&a.ca_file)?;
    let trust = vmgrid_client::Trust::pool_ca(&ca).map_err(|e| CliError::BadInput(e.to_string()))?;
    let client = vmgrid_client::Client::with_trust(&a.pool, &token, trust);
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    loop {
        match client.nodes() {
            Ok(_) => return Ok(0),
            // The pool answered over TLS: it is reachable; what the pool token may list is not
            // the pilot's business, but a refused token is.
            Err(e) if e.status() == Some(401) => {
                return Err(CliError::Failed(format!("the pool at {} refused the token: {e}", a.pool)));
            }
            Err(e) if e.status().is_some() => return Ok(0),
            Err(e) if Instant::now() >= deadline => {
                return Err(CliError::Failed(format!(
                    "pilot: the pool at {} did not answer for {} s: {e}",
                    a.pool, a.timeout_s
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

fn status(a: StatusArgs) -> Result<i32, CliError> {
    let jobs = vmgrid_slurm::squeue(&a.job_name).map_err(CliError::Failed)?;
    let nodes = a.pool.client()?.nodes()?;
    println!(
        "{:<10} {:<11} {:<10} {:<14} {:<10} {:<18} {:<10} {:>7}",
        "SLURM_JOB", "SLURM_STATE", "PARTITION", "HOST", "TIME_LEFT", "POOL_NODE", "NODE_STATE", "RUNNING"
    );
    let mut seen = Vec::new();
    for j in &jobs {
        let node = nodes.iter().find(|n| n.ad.labels.get("slurm.job_id") == Some(&j.id));
        seen.push(j.id.clone());
        let (name, state, running) = match node {
            Some(n) => (n.ad.name.clone(), format!("{:?}", n.state).to_lowercase(), n.running_jobs.to_string()),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<10} {:<11} {:<10} {:<14} {:<10} {:<18} {:<10} {:>7}",
            j.id, j.state, j.partition, j.host, j.time_left, name, state, running
        );
    }
    // Pool nodes whose Slurm job has ended (squeue no longer lists it) but are still known.
    for n in &nodes {
        if let Some(id) = n.ad.labels.get("slurm.job_id")
            && !seen.contains(id)
        {
            println!(
                "{:<10} {:<11} {:<10} {:<14} {:<10} {:<18} {:<10} {:>7}",
                id,
                "ENDED",
                n.ad.labels.get("slurm.partition").map_or("-", String::as_str),
                "-",
                "-",
                n.ad.name,
                format!("{:?}", n.state).to_lowercase(),
                n.running_jobs
            );
        }
    }
    Ok(0)
}
