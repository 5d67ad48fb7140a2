//! `vmgrid appliance build | config | start`: the grid appliance, a VM image that joins the pool
//! when it boots (the `vmgrid-appliance` crate does the work), and the hidden `agent` it runs
//! inside.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmgrid_appliance::config::{self, ApplianceConfig};
use vmgrid_appliance::image::{self, Format};
use vmgrid_appliance::{agent, tools, vm};

use crate::CliError;
use crate::pool_config::{ca_beside, default_data_dir, read_ca_file, read_token_file};

impl From<vmgrid_appliance::Error> for CliError {
    fn from(e: vmgrid_appliance::Error) -> Self {
        match e {
            vmgrid_appliance::Error::BadInput(m) => CliError::BadInput(m),
            vmgrid_appliance::Error::Failed(m) => CliError::Failed(m),
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(
    about = "The grid appliance: a VM image that joins the pool when it boots",
    after_help = "Examples:\n  \
vmgrid appliance build --out appliance/                       all four formats\n  \
vmgrid appliance config --pool http://grid.example.org:7800 --token-file pool.token --out config.img\n  \
vmgrid appliance start --pool http://127.0.0.1:7800 --token-file pool.token --console"
)]
pub struct ApplianceArgs {
    #[command(subcommand)]
    command: ApplianceCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ApplianceCommand {
    /// Build the bootable disk image (raw, qcow2, vmdk, vdi) from this host's Debian packages.
    Build(BuildArgs),
    /// Write a config disk (a FAT floppy image) that tells the appliance which pool to join.
    Config(ConfigArgs),
    /// Boot the appliance under QEMU; SIGTERM or Ctrl-C powers it off (it drains and leaves).
    Start(StartArgs),
    /// Inside the appliance: run the node agent from the config disk's settings.
    #[command(hide = true)]
    Agent(AgentArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct AgentArgs {
    /// The configuration (the config disk's vmgrid.toml, copied by the init).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Where the node keeps its cache and credential (in the appliance's memory).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Where to write the console CLI's client.toml (default: next to --config).
    #[arg(long, value_name = "FILE")]
    client_config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// The directory to write vmgrid-appliance.{img,qcow2,vmdk,vdi} to.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Which formats: raw (QEMU, dd to a USB stick), qcow2 (QEMU/KVM), vmdk (VMware), vdi (VirtualBox).
    #[arg(long, value_name = "LIST", default_value = "raw,qcow2,vmdk,vdi")]
    format: String,
}

/// What goes on a config disk; shared by `config` and `start`.
#[derive(clap::Args, Debug)]
struct PoolSettings {
    /// The pool's URL, as the appliance reaches it.
    #[arg(long, value_name = "URL")]
    pool: String,
    /// The pool token (the coordinator's pool.token): the appliance's node agent joins with it.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The pool's CA certificate (the coordinator's ca.pem) [default: ca.pem beside --token-file].
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// A user token (from `vmgrid token USER`) for the vmgrid CLI at the appliance's console.
    #[arg(long, value_name = "FILE")]
    user_token_file: Option<PathBuf>,
    /// A label for requirements (`node.labels.KEY`), as KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// On power-off, how long running jobs get to finish before they go back to the pool.
    #[arg(long, default_value_t = 30, value_name = "S")]
    drain_timeout_s: u64,
    /// `grid` also puts the appliance on the pool's overlay (device vmgrid0, an address in
    /// 100.127.0.0/16; `ip addr show vmgrid0` at its console): it reaches the pool's other
    /// appliances started so, over WireGuard, through NATs (relayed by the pool when a direct
    /// path fails), and no job's VM. `vmgrid status --json` shows each one's address.
    #[arg(long, default_value = "user", value_name = "user|grid")]
    network: String,
}

#[derive(clap::Args, Debug)]
struct ConfigArgs {
    #[command(flatten)]
    settings: PoolSettings,
    /// The node's name in the pool (default: `appliance-` and random hex, new at each boot).
    #[arg(long)]
    name: Option<String>,
    /// The config disk to write (a 1.44 MB FAT floppy image).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct StartArgs {
    #[command(flatten)]
    settings: PoolSettings,
    /// The node's name in the pool (default: `appliance-` and random hex).
    #[arg(long)]
    name: Option<String>,
    /// The VM's memory in MiB.
    #[arg(long, default_value_t = 1024, value_name = "M")]
    memory_mb: u64,
    /// The VM's CPUs (the node offers them all).
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// The disk image to boot (default: one built on first use in the data dir's appliance/).
    /// It is never written: the VM writes to a temporary overlay.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Join the appliance's serial console to this terminal (stdin and stdout).
    #[arg(long)]
    console: bool,
    /// Where the config disk and the console log go (default: the data dir's appliance/NAME).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

pub fn run(args: ApplianceArgs) -> Result<i32, CliError> {
    match args.command {
        ApplianceCommand::Build(a) => build(a),
        ApplianceCommand::Config(a) => write_config(a),
        ApplianceCommand::Start(a) => start(a),
        ApplianceCommand::Agent(a) => Ok(agent::run(agent::AgentOptions {
            config: a.config,
            state_dir: a.state_dir,
            client_config: a.client_config,
        })?),
    }
}

fn build(args: BuildArgs) -> Result<i32, CliError> {
    let formats = Format::parse_list(&args.format)?;
    let started = std::time::Instant::now();
    let written = image::build(&args.out, &formats, false)?;
    for (format, path) in &written {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("{}", path.display());
        eprintln!(
            "vmgrid: appliance: {:<5} {:>6.1} MiB  {}",
            format.name(),
            size as f64 / (1 << 20) as f64,
            path.display()
        );
    }
    eprintln!(
        "vmgrid: appliance: built in {:.1} s; boot it with `vmgrid appliance start --image {} --pool URL --token-file F`",
        started.elapsed().as_secs_f64(),
        written.last().map(|(_, p)| p.display().to_string()).unwrap_or_default()
    );
    Ok(0)
}

fn appliance_config(settings: &PoolSettings, name: Option<String>) -> Result<ApplianceConfig, CliError> {
    let token = read_token_file(&settings.token_file)?;
    let user_token = settings.user_token_file.as_deref().map(read_token_file).transpose()?;
    let labels: BTreeMap<String, String> = crate::cmd_pool::parse_labels(&settings.labels)?;
    let ca = match &settings.ca_file {
        Some(f) => Some(read_ca_file(f)?),
        None => ca_beside(&settings.token_file)?,
    };
    let c = ApplianceConfig {
        pool: settings.pool.trim_end_matches('/').to_string(),
        token,
        user_token,
        name,
        labels,
        drain_timeout_s: Some(settings.drain_timeout_s),
        ca,
        network: config::Network::parse(&settings.network).map_err(CliError::BadInput)?,
    };
    c.check().map_err(CliError::BadInput)?;
    Ok(c)
}

fn write_config(args: ConfigArgs) -> Result<i32, CliError> {
    let c = appliance_config(&args.settings, args.name)?;
    if config::is_loopback_url(&c.pool) {
        eprintln!(
            "vmgrid: warning: {} is this host's loopback; inside the appliance that is the appliance itself. \
Use an address the VM can reach (under QEMU user networking the host is 10.0.2.2; `vmgrid appliance start` rewrites it for you)",
            c.pool
        );
    }
    config::write_disk(&c, &args.out)?;
    eprintln!(
        "vmgrid: wrote {} for the pool at {}; attach it to the appliance as a second disk or a floppy (it holds the tokens: keep it private)",
        args.out.display(),
        c.pool
    );
    Ok(0)
}

fn start(args: StartArgs) -> Result<i32, CliError> {
    if args.cpus == 0 || args.cpus > 64 {
        return Err(CliError::BadInput("--cpus must be between 1 and 64".into()));
    }
    if args.memory_mb < 256 {
        return Err(CliError::BadInput("--memory-mb must be at least 256 (the appliance runs from memory)".into()));
    }
    let name = args.name.clone().unwrap_or_else(|| format!("appliance-{}", tools::hex(&tools::random_bytes::<3>())));
    let mut c = appliance_config(&args.settings, Some(name.clone()))?;
    // QEMU's user-mode network shows the host to the guest as 10.0.2.2.
    let (pool, rewritten) = config::rewrite_loopback(&c.pool, "10.0.2.2");
    if rewritten {
        eprintln!("vmgrid: the pool at {} is on this host's loopback; the appliance reaches it as {pool}", c.pool);
        c.pool = pool;
    }
    let image = match args.image {
        Some(i) => {
            if !i.is_file() {
                return Err(CliError::BadInput(format!(
                    "the appliance image `{}` does not exist; build one with `vmgrid appliance build --out DIR`",
                    i.display()
                )));
            }
            i
        }
        None => default_image()?,
    };
    let state_dir = args.state_dir.unwrap_or_else(|| default_data_dir().join("appliance").join(&name));
    Ok(vm::start(vm::StartOptions {
        config: c,
        image,
        memory_mb: args.memory_mb,
        cpus: args.cpus,
        state_dir,
        console: args.console,
    })?)
}

/// The image in the data dir, built on first use and again when this vmgrid binary changes.
fn default_image() -> Result<PathBuf, CliError> {
    let dir = default_data_dir().join("appliance/image");
    let image = image::image_path(&dir, Format::Qcow2);
    let stamp_path = dir.join("stamp");
    let stamp = build_stamp()?;
    if image.is_file() && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(image);
    }
    eprintln!("vmgrid: building the appliance image in {} (once for this vmgrid binary)", dir.display());
    image::build(&dir, &[Format::Qcow2], false)?;
    std::fs::write(&stamp_path, stamp).map_err(tools::io(format!("cannot write {}", stamp_path.display())))?;
    Ok(image)
}

/// What the image is made of: this binary (by size and time) and the kernels in /boot.
fn build_stamp() -> Result<String, CliError> {
    let exe = std::env::current_exe().map_err(tools::io("cannot find the running vmgrid binary"))?;
    let id = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| {
                let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                format!("{}:{}:{}", p.display(), m.len(), t.map_or(0, |d| d.as_secs()))
            })
            .unwrap_or_default()
    };
    let mut kernels: Vec<String> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| id(&e.path())).collect())
        .unwrap_or_default();
    kernels.sort();
    Ok(format!("{}\n{}\n", id(&exe), kernels.join("\n")))
}
