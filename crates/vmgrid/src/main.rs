//! The `vmgrid` command: argument parsing and the sentences people read. The work is done by the
//! library crates; this binary turns their typed errors into messages and exit codes.

mod cli_error;
mod cmd_run;

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
    after_help = "Examples:\n  vmgrid run examples/wordcount/job.toml --out results/\n  \
vmgrid run examples/qemu-hello/job.toml\n\nExit codes: 0 success; the job's own code for `run`; \
2 bad input (job file, image, inputs); 1 other failures.\nSet VMGRID_LOG=debug for more detail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(cmd_run::RunArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMGRID_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cmd_run::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vmgrid: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
