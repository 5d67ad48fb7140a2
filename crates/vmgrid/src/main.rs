//! The `vmgrid` command: argument parsing and the sentences people read. The work is done by the
//! library crates; this binary turns their typed errors into messages and exit codes.

mod cli_error;
mod cmd_appliance;
mod cmd_dag;
mod cmd_glidein;
mod cmd_jobs;
mod cmd_net;
mod cmd_pool;
mod cmd_run;
mod cmd_ssi;
mod cmd_token;
mod cmd_users;
mod pool_config;
mod term;

use clap::{Parser, Subcommand};

use cli_error::CliError;

#[derive(Parser)]
#[command(
    name = "vmgrid",
    version,
    about = "A grid where virtual machines are the unit of work",
    long_about = "vmgrid runs jobs inside virtual machines: WebAssembly modules (wasmtime), \
QEMU system VMs and JVM programs.\n\nA job is described by a TOML job file; see \
examples/ in the source tree and `vmgrid run --help`.",
    after_help = "Examples:\n  vmgrid run examples/wordcount/job.toml --out results/     one job here, no pool\n  \
vmgrid up --nodes 2                                        a local pool (foreground)\n  \
vmgrid submit examples/wordcount/job.toml --count 10 --wait\n  \
vmgrid q; vmgrid status; vmgrid users; vmgrid fetch 3 --out results/\n  \
vmgrid dag submit flow.toml --wait                         a workflow: jobs in dependency order\n\n\
Client commands find the pool with --pool and --token-file, VMGRID_POOL and VMGRID_TOKEN, \
VMGRID_CONFIG (a client.toml), ~/.config/vmgrid/client.toml, or the one `vmgrid up` writes.\n\n\
Exit codes: 0 success; the job's own code for `run` and `wait`; 2 bad input; 1 other failures.\n\
Set VMGRID_LOG=debug for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(cmd_run::RunArgs),
    /// Run a local pool: a coordinator and N node agents in this process (foreground).
    Up(cmd_pool::UpArgs),
    /// Run a pool's coordinator: the durable job queue and the API (foreground).
    Coordinator(cmd_pool::CoordinatorArgs),
    /// Run a node agent that joins a pool and runs its jobs in VMs (foreground; SIGTERM drains).
    Node(cmd_pool::NodeArgs),
    /// Submit a job file to the pool; prints the job ids, one per line.
    Submit(cmd_jobs::SubmitArgs),
    /// List jobs: id, name, owner, state, node, exit code, attempts, reason.
    Q(cmd_jobs::ListArgs),
    /// List the pool's nodes and their ads.
    Status(cmd_jobs::ListArgs),
    /// Remove jobs (a running job is stopped).
    Rm(cmd_jobs::ActionArgs),
    /// Hold jobs: they stay in the queue but do not run until released.
    Hold(cmd_jobs::ActionArgs),
    /// Release held jobs back to idle.
    Release(cmd_jobs::ActionArgs),
    /// Move running QEMU jobs that take checkpoints ([policy] checkpoint_s): each is checkpointed
    /// now, stopped, and resumed from that checkpoint on another node (owner or admin).
    Vacate(cmd_jobs::ActionArgs),
    /// Ban nodes from the pool (admin only): each leaves at once, its jobs go back to the pool,
    /// and it cannot join again under its name; `--lift` lets them back. `status` shows each
    /// node's reputation, from the replicated jobs ([policy] replicas) it ran.
    Ban(cmd_jobs::BanArgs),
    /// The pool's virtual network (`network = "grid"`): each node's overlay key and endpoint, and
    /// whether each pair of nodes reaches the other directly (UDP through their NATs) or through
    /// the pool's relay.
    Net(cmd_net::NetArgs),
    /// Wait for jobs; exit 0 if all completed with 0, else the first non-zero code (1 if held or removed).
    Wait(cmd_jobs::WaitArgs),
    /// Print a finished job's stdout (or stderr).
    Logs(cmd_jobs::LogsArgs),
    /// Download a job's output files.
    Fetch(cmd_jobs::FetchArgs),
    Dag(cmd_dag::DagArgs),
    /// Make a token for a user (printed once), list the pool's tokens, or revoke one (admin only).
    Token(cmd_token::TokenArgs),
    /// Fair share: each user's usage, running and idle jobs, factor, quota and effective priority;
    /// `users set` changes a user's factor or quota (admin only).
    Users(cmd_users::UsersArgs),
    /// The single-system image: one console, process table and filesystem over the whole pool.
    Ssi(cmd_ssi::SsiArgs),
    Appliance(cmd_appliance::ApplianceArgs),
    /// Lend a Slurm cluster to the pool: pilot jobs that run node agents (`glidein slurm`, `glidein status`).
    Glidein(cmd_glidein::GlideinArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VMGRID_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    // A wasm worker (started by this binary's runtime, never by a person): not a command.
    if std::env::args_os().nth(1).is_some_and(|a| a == vmgrid_runtime::wasm::worker::COMMAND) {
        std::process::exit(vmgrid_runtime::wasm::worker::serve());
    }
    let cli = Cli::parse();
    // Commands that print and end behave like other Unix tools when their reader goes away
    // (`vmgrid q | head`): SIGPIPE ends them quietly instead of a failed print panicking. The
    // long-running ones (servers, the console, the appliance) keep Rust's default and see EPIPE.
    if !matches!(
        cli.command,
        Command::Up(_) | Command::Coordinator(_) | Command::Node(_) | Command::Ssi(_) | Command::Appliance(_)
    ) {
        // SAFETY: setting a signal's disposition to the default, before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => cmd_run::run(args),
        Command::Up(args) => cmd_pool::up(args),
        Command::Coordinator(args) => cmd_pool::coordinator(args),
        Command::Node(args) => cmd_pool::node(args),
        Command::Submit(args) => cmd_jobs::submit(args),
        Command::Q(args) => cmd_jobs::q(args),
        Command::Status(args) => cmd_jobs::status(args),
        Command::Rm(args) => cmd_jobs::action(vmgrid_proto::JobAction::Rm, args),
        Command::Hold(args) => cmd_jobs::action(vmgrid_proto::JobAction::Hold, args),
        Command::Release(args) => cmd_jobs::action(vmgrid_proto::JobAction::Release, args),
        Command::Vacate(args) => cmd_jobs::action(vmgrid_proto::JobAction::Vacate, args),
        Command::Ban(args) => cmd_jobs::ban(args),
        Command::Wait(args) => cmd_jobs::wait(args),
        Command::Net(args) => cmd_net::net(args),
        Command::Logs(args) => cmd_jobs::logs(args),
        Command::Fetch(args) => cmd_jobs::fetch(args),
        Command::Dag(args) => cmd_dag::run(args),
        Command::Token(args) => cmd_token::token(args),
        Command::Users(args) => cmd_users::users(args),
        Command::Ssi(args) => cmd_ssi::ssi(args),
        Command::Appliance(args) => cmd_appliance::run(args),
        Command::Glidein(args) => cmd_glidein::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vmgrid: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
