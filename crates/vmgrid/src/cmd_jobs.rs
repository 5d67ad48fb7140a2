//! The client commands: `submit`, `q`, `status`, `rm`, `hold`, `release`, `wait`, `logs`,
//! `fetch` and `token`. Each talks to the pool through `vmgrid-client`.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmgrid_client::{Client, ClientError};
use vmgrid_proto::*;

use crate::CliError;
use crate::pool_config::PoolArgs;
use crate::term::field;

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Refused { status: 400 | 404 | 422, .. } => CliError::BadInput(e.to_string()),
            ClientError::Refused { status: 401, .. } => {
                CliError::Failed(format!("{e}; check --token-file, VMGRID_TOKEN or client.toml"))
            }
            _ => CliError::Failed(e.to_string()),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The job file (TOML), as for `vmgrid run`.
    job: PathBuf,
    /// Submit N instances, 0..N-1; `{index}` in args and env becomes the instance number.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Make the N instances one job group: QEMU jobs with `network = "grid"` whose VMs start
    /// together and reach each other (and nothing else) on the pool's overlay, wherever they
    /// run. Each VM finds its group's addresses in /job/.vmgrid-peers (`ADDRESS peer-INDEX` a
    /// line) and in $VMGRID_PEERS (comma-separated, by instance), its own in $VMGRID_ADDR.
    #[arg(long)]
    group: bool,
    /// Wait for the jobs to finish, with progress on a terminal; exit as `vmgrid wait` does.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

/// Uploads the job's files (only those the pool lacks) and turns the job into a wire spec.
pub(crate) fn to_spec(client: &Client, job: &vmgrid_job::Job) -> Result<JobSpec, CliError> {
    let upload = |path: &Path, name: &str| -> Result<FileRef, CliError> {
        client.upload_file(path, name).map_err(|e| match e {
            ClientError::Io(io) => CliError::BadInput(format!("cannot read {}: {io}", path.display())),
            other => other.into(),
        })
    };
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let spec_file = |p: &Option<PathBuf>| -> Result<Option<FileRef>, CliError> {
        p.as_ref().map(|p| upload(p, &name_of(p))).transpose()
    };
    let image = spec_file(&job.vm.image)?;
    let kernel = spec_file(&job.vm.kernel)?;
    let initrd = spec_file(&job.vm.initrd)?;
    let mut inputs = Vec::new();
    for i in &job.files.inputs {
        let meta = std::fs::metadata(&i.source)
            .map_err(|e| CliError::BadInput(format!("input `{}` cannot be read: {e}", i.source.display())))?;
        if meta.is_dir() {
            for entry in walkdir::WalkDir::new(&i.source).sort_by_file_name() {
                let entry = entry.map_err(|e| CliError::BadInput(format!("input `{}`: {e}", i.source.display())))?;
                if entry.file_type().is_file() {
                    let rel = entry.path().strip_prefix(&i.source).expect("under its root");
                    inputs.push(upload(entry.path(), &i.dest.join(rel).to_string_lossy())?);
                }
            }
        } else {
            inputs.push(upload(&i.source, &i.dest.to_string_lossy())?);
        }
    }
    Ok(JobSpec::from_job(job, SpecFiles { image, kernel, initrd, inputs }))
}

pub fn submit(args: SubmitArgs) -> Result<i32, CliError> {
    let job = vmgrid_job::load_job(&args.job)?;
    if args.count == 0 {
        return Err(CliError::BadInput("--count must be at least 1".into()));
    }
    let group = match args.group {
        true => {
            let n = u32::try_from(args.count).unwrap_or(u32::MAX);
            vmgrid_job::check::grid::group(job.vm.vm_type, job.vm.network, n)
                .map_err(|e| CliError::BadInput(format!("--group: {e}")))?;
            Some(n)
        }
        false => None,
    };
    let client = args.pool.client()?;
    let spec = JobSpec { group, ..to_spec(&client, &job)? };
    let resp = client.submit(&SubmitRequest { spec, count: args.count })?;
    let mut out = String::with_capacity(resp.ids.len() * 8);
    for id in &resp.ids {
        out.push_str(&id.to_string());
        out.push('\n');
    }
    print!("{out}");
    if args.wait {
        return wait_for(&client, &resp.ids);
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// Job ids.
    #[arg(required = true)]
    ids: Vec<u64>,
    #[command(flatten)]
    pool: PoolArgs,
}

/// `vmgrid wait`: 0 when all completed with 0; else the first non-zero exit code, or 1 for a
/// held or removed job.
pub fn wait(args: WaitArgs) -> Result<i32, CliError> {
    let client = args.pool.client()?;
    wait_for(&client, &args.ids)
}

fn done(v: &JobView) -> bool {
    v.state.is_final() || v.state == JobState::Held
}

fn wait_for(client: &Client, ids: &[u64]) -> Result<i32, CliError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(ids.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} done {msg}")
                .expect("a valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut finished: BTreeMap<u64, JobView> = BTreeMap::new();
    if ids.len() == 1 {
        loop {
            let v = client.wait(ids[0], Duration::from_secs(30))?;
            if done(&v) {
                finished.insert(v.id, v);
                break;
            }
        }
    } else {
        let wanted: HashSet<u64> = ids.iter().copied().collect();
        let mut pause = Duration::from_millis(20);
        loop {
            let all = client.jobs()?;
            let mut seen = 0;
            let mut running = 0;
            for v in all {
                if !wanted.contains(&v.id) {
                    continue;
                }
                seen += 1;
                if v.state == JobState::Running {
                    running += 1;
                }
                if done(&v) {
                    finished.insert(v.id, v);
                }
            }
            if seen < wanted.len() {
                let missing = ids.iter().find(|id| !finished.contains_key(id)).copied().unwrap_or(0);
                return Err(CliError::BadInput(format!("no job {missing} that this token can see")));
            }
            if let Some(b) = &bar {
                b.set_position(finished.len() as u64);
                b.set_message(format!("({running} running)"));
            }
            if finished.len() == wanted.len() {
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut code = 0;
    for id in ids {
        let v = &finished[id];
        let this = match v.state {
            JobState::Completed => v.exit_code.unwrap_or(1),
            _ => {
                eprintln!(
                    "vmgrid: job {id} is {}: {}",
                    v.state.as_str(),
                    v.reason.as_deref().unwrap_or("no reason given")
                );
                1
            }
        };
        if code == 0 && this != 0 {
            code = this;
        }
    }
    Ok(code)
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Failed(e.to_string()))?;
    println!("{s}");
    Ok(())
}

/// `vmgrid q`: the jobs this token can see.
pub fn q(args: ListArgs) -> Result<i32, CliError> {
    let jobs = args.pool.client()?.jobs()?;
    if args.json {
        print_json(&jobs)?;
        return Ok(0);
    }
    println!(
        "{:>8}  {:<16} {:<10} {:<9} {:<12} {:>4} {:>3}  REASON",
        "ID", "NAME", "OWNER", "STATE", "NODE", "EXIT", "RUN"
    );
    for j in &jobs {
        println!(
            "{:>8}  {:<16} {:<10} {:<9} {:<12} {:>4} {:>3}  {}",
            j.id,
            field(&j.name),
            field(&j.owner),
            j.state.as_str(),
            field(j.node.as_deref().unwrap_or("-")),
            j.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            j.attempts,
            field(j.reason.as_deref().unwrap_or(""))
        );
    }
    let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
    println!(
        "{} jobs: {} idle, {} running, {} completed, {} held, {} removed",
        jobs.len(),
        count(JobState::Idle),
        count(JobState::Running),
        count(JobState::Completed),
        count(JobState::Held),
        count(JobState::Removed)
    );
    Ok(0)
}

/// `vmgrid status`: the pool's nodes and their ads.
pub fn status(args: ListArgs) -> Result<i32, CliError> {
    let nodes = args.pool.client()?.nodes()?;
    if args.json {
        print_json(&nodes)?;
        return Ok(0);
    }
    println!(
        "{:<16} {:<9} {:>4} {:>4} {:>8} {:>4}  {:<16} {:<8} {:<10} {:<9} APPLIANCE",
        "NAME", "STATE", "CPUS", "FREE", "MEM_MB", "JOBS", "VM_TYPES", "ACCEL", "REPUTATION", "AGREED"
    );
    for n in &nodes {
        println!(
            "{:<16} {:<9} {:>4} {:>4} {:>8} {:>4}  {:<16} {:<8} {:<10.2} {:<9} {}",
            field(&n.ad.name),
            n.state.as_str(),
            n.ad.cpus,
            n.free_cpus,
            n.ad.memory_mb,
            n.running_jobs,
            n.ad.vm_types.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(","),
            n.ad.accelerators.join(","),
            n.reputation,
            format!("{}/{}", n.agreements, n.agreements + n.disagreements),
            n.ad.appliance
        );
    }
    let ready: Vec<_> = nodes.iter().filter(|n| n.state == NodeState::Ready).collect();
    println!("{} nodes ({} ready), {} cpus", nodes.len(), ready.len(), ready.iter().map(|n| n.ad.cpus).sum::<u32>());
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct BanArgs {
    /// Node names.
    #[arg(required = true)]
    nodes: Vec<String>,
    /// Lift the ban instead: the nodes may join again.
    #[arg(long)]
    lift: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

/// `vmgrid ban`: an admin bans nodes (each leaves at once, its jobs go back, and it cannot join
/// again under its name), or lifts their bans.
pub fn ban(args: BanArgs) -> Result<i32, CliError> {
    let client = args.pool.client()?;
    for n in &args.nodes {
        client.ban(n, !args.lift)?;
        match args.lift {
            true => println!("node {n}: ban lifted"),
            false => println!("node {n}: banned (it left the pool, and cannot join again under this name)"),
        }
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct ActionArgs {
    /// Job ids.
    #[arg(required = true)]
    ids: Vec<u64>,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn action(action: JobAction, args: ActionArgs) -> Result<i32, CliError> {
    let resp = args.pool.client()?.action(action, &args.ids)?;
    for v in &resp.changed {
        match action {
            JobAction::Vacate => {
                println!("job {}: vacating (its node checkpoints it, then it resumes elsewhere)", v.id)
            }
            _ => println!("job {}: {}", v.id, v.state.as_str()),
        }
    }
    for (id, why) in &resp.refused {
        eprintln!("vmgrid: job {id} not changed: {why}");
    }
    Ok(if resp.refused.is_empty() { 0 } else { 1 })
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    id: u64,
    /// Show the job's stderr instead of its stdout.
    #[arg(long)]
    stderr: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn logs(args: LogsArgs) -> Result<i32, CliError> {
    let client = args.pool.client()?;
    let r = client.job(args.id)?;
    let (file, dropped) = if args.stderr { (r.stderr, r.stderr_dropped) } else { (r.stdout, r.stdout_dropped) };
    if let Some(f) = file {
        let tmp = tempfile::NamedTempFile::new().map_err(|e| CliError::Failed(e.to_string()))?;
        client.fetch_file(&f, tmp.path())?;
        let bytes = std::fs::read(tmp.path()).map_err(|e| CliError::Failed(e.to_string()))?;
        // On a terminal the output's control characters are shown, not obeyed.
        let bytes = if crate::term::stdout_is_terminal() { crate::term::output(&bytes) } else { bytes };
        std::io::Write::write_all(&mut std::io::stdout(), &bytes).map_err(|e| CliError::Failed(e.to_string()))?;
    } else if !r.job.state.is_final() && r.job.state != JobState::Held {
        eprintln!("vmgrid: job {} is {}; its output arrives when it finishes", args.id, r.job.state.as_str());
    }
    if dropped > 0 {
        eprintln!("vmgrid: the job's output was cut; {dropped} more bytes were dropped");
    }
    Ok(0)
}

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    id: u64,
    /// Where the output files go, keeping their paths.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn fetch(args: FetchArgs) -> Result<i32, CliError> {
    let client = args.pool.client()?;
    let r = client.job(args.id)?;
    if r.job.state != JobState::Completed && r.outputs.is_empty() {
        return Err(CliError::BadInput(format!("job {} is {} and has no outputs yet", args.id, r.job.state.as_str())));
    }
    for f in &r.outputs {
        if !is_confined_path(&f.path) {
            eprintln!("vmgrid: skipping output `{}`: it would land outside {}", f.path, args.out.display());
            continue;
        }
        let dest = args.out.join(&f.path);
        client.download(&f.blob, &dest)?;
        println!("{}", dest.display());
    }
    Ok(0)
}
