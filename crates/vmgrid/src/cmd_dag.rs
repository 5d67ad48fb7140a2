//! `vmgrid dag`: workflows. `submit` reads and checks a flow file (`vmgrid-job`'s `load_flow`),
//! uploads each job's files as `vmgrid submit` does, and hands the DAG to the pool, which runs it
//! on its own (the client may go); `status` shows each node; `rm` removes what is still queued.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use vmgrid_proto::*;

use crate::CliError;
use crate::cmd_jobs::{print_json, to_spec};
use crate::pool_config::PoolArgs;
use crate::term::field;

#[derive(clap::Args, Debug)]
#[command(
    about = "Workflows: DAGs of jobs that the pool runs in dependency order",
    after_help = "A flow file names jobs and how they depend on each other:\n\n  \
[jobs.prepare]\n  \
file = \"prepare.toml\"                      # a job file, relative to the flow file\n\n  \
[jobs.count]\n  \
file = \"count.toml\"\n  \
after = [\"prepare\"]                        # runs once `prepare` completed with exit 0\n  \
count = 10                                 # a sweep: instances 0..9, `{index}` in args and env\n  \
retries = 2                                # the node as a whole runs again after a failure\n  \
inputs_from = { prepare = [\"out/*.txt\"] }  # its matching outputs, as inputs at prepare/PATH\n\n  \
[jobs.report]\n  \
final = true                               # runs last, whether the others succeeded or not\n  \
vm = { type = \"wasm\", image = \"r.wasm\" }   # a job written inline: the keys of a job file\n\n\
Examples:\n  \
vmgrid dag submit flow.toml --wait      submit and follow it; exit 0 when it completed\n  \
vmgrid dag status 3                     each node: state, runs, jobs, reason\n  \
vmgrid dag status                       every workflow: id, name, owner, state, nodes done\n  \
vmgrid dag submit flow.toml --rescue 3  run again only what did not complete in workflow 3\n  \
vmgrid dag rm 3                         remove its queued and running jobs"
)]
pub struct DagArgs {
    #[command(subcommand)]
    command: DagCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DagCommand {
    /// Check a flow file, upload its jobs' files and submit it; prints the workflow's id.
    Submit(SubmitArgs),
    /// A workflow's state, progress and each node's state (waiting, idle, running, done, failed,
    /// skipped); without an id, every workflow this token may see.
    Status(StatusArgs),
    /// Remove a running workflow: its queued and running jobs are removed, the rest not run.
    Rm(IdArgs),
}

#[derive(clap::Args, Debug)]
struct SubmitArgs {
    /// The flow file (TOML).
    flow: PathBuf,
    /// Wait for the workflow to end; exit 0 if it completed, 1 if it failed or was removed (a
    /// coordinator that restarts meanwhile is waited for, up to two minutes).
    #[arg(long)]
    wait: bool,
    /// Rescue workflow ID (ended): the nodes that were done in it are not run again; their jobs
    /// and outputs serve this one.
    #[arg(long, value_name = "ID")]
    rescue: Option<u64>,
    #[command(flatten)]
    pool: PoolArgs,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// The workflow; without it, the list of workflows.
    id: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

#[derive(clap::Args, Debug)]
struct IdArgs {
    id: u64,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn run(args: DagArgs) -> Result<i32, CliError> {
    match args.command {
        DagCommand::Submit(a) => submit(a),
        DagCommand::Status(a) => status(a),
        DagCommand::Rm(a) => {
            let v = a.pool.client()?.dag_rm(a.id)?;
            println!("workflow {}: {}", v.id, v.state.as_str());
            Ok(0)
        }
    }
}

fn submit(args: SubmitArgs) -> Result<i32, CliError> {
    let flow = vmgrid_job::load_flow(&args.flow)?;
    let client = args.pool.client()?;
    let mut nodes = Vec::with_capacity(flow.nodes.len());
    for n in flow.nodes {
        let job = to_spec(&client, &n.job).map_err(|e| match e {
            CliError::BadInput(m) => CliError::BadInput(format!("job `{}`: {m}", n.name)),
            other => other,
        })?;
        nodes.push(DagNodeSpec {
            name: n.name,
            job,
            count: n.count,
            after: n.after,
            inputs_from: n.inputs_from,
            retries: n.retries,
            final_node: n.final_node,
        });
    }
    let dag = DagSpec { name: flow.name, nodes };
    let view = client.submit_dag(&DagSubmitRequest { dag, rescue: args.rescue })?;
    println!("{}", view.id);
    if !args.wait {
        return Ok(0);
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(view.total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} nodes done {msg}",
            )
            .expect("a valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut pause = Duration::from_millis(20);
    let mut unreachable_since = None;
    let v = loop {
        // The workflow goes on in the pool while its coordinator restarts: keep asking a while.
        let v = match client.dag(view.id) {
            Ok(v) => v,
            Err(e @ vmgrid_client::ClientError::Unreachable { .. }) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(120) {
                    return Err(e.into());
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        unreachable_since = None;
        if let Some(b) = &bar {
            b.set_position(v.done);
            let running = v.nodes.iter().filter(|n| n.state == DagNodeState::Running).count();
            b.set_message(format!("({running} running)"));
        }
        if v.state != DagState::Running {
            break v;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if v.state == DagState::Completed {
        return Ok(0);
    }
    eprintln!(
        "vmgrid: workflow {} {}: {}",
        v.id,
        v.state.as_str(),
        field(v.reason.as_deref().unwrap_or("no reason given"))
    );
    Ok(1)
}

fn list(args: StatusArgs) -> Result<i32, CliError> {
    let dags = args.pool.client()?.dags()?;
    if args.json {
        print_json(&dags)?;
        return Ok(0);
    }
    println!("{:>6}  {:<16} {:<10} {:<9} {:>9}  REASON", "ID", "NAME", "OWNER", "STATE", "DONE");
    for d in &dags {
        println!(
            "{:>6}  {:<16} {:<10} {:<9} {:>9}  {}",
            d.id,
            field(&d.name),
            field(&d.owner),
            d.state.as_str(),
            format!("{}/{}", d.done, d.total),
            field(d.reason.as_deref().unwrap_or(""))
        );
    }
    Ok(0)
}

fn status(args: StatusArgs) -> Result<i32, CliError> {
    let Some(id) = args.id else { return list(args) };
    let v = args.pool.client()?.dag(id)?;
    if args.json {
        print_json(&v)?;
        return Ok(0);
    }
    println!(
        "workflow {} ({}) of {}: {}, {}/{} nodes done{}",
        v.id,
        field(&v.name),
        field(&v.owner),
        v.state.as_str(),
        v.done,
        v.total,
        v.rescue_of.map(|r| format!(", rescues workflow {r}")).unwrap_or_default()
    );
    if let Some(r) = &v.reason {
        println!("reason: {}", field(r));
    }
    println!("{:<16} {:<8} {:>4} {:>9}  {:<16} REASON", "NODE", "STATE", "RUNS", "JOBS_DONE", "JOBS");
    for n in &v.nodes {
        let jobs = match (n.jobs.first(), n.jobs.last()) {
            (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
            (Some(a), _) => a.to_string(),
            _ => "-".into(),
        };
        println!(
            "{:<16} {:<8} {:>4} {:>9}  {:<16} {}",
            field(&format!("{}{}", n.name, if n.final_node { " (final)" } else { "" })),
            n.state.as_str(),
            format!("{}/{}", n.tries, n.retries + 1),
            format!("{}/{}", n.jobs_done, n.count),
            jobs,
            field(n.reason.as_deref().unwrap_or(""))
        );
    }
    Ok(0)
}
