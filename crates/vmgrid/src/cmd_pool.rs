//! `vmgrid coordinator`, `vmgrid node` and `vmgrid up`: the pool's long-running processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmgrid_coordinator::{Config, Limits, Timing, Tls};
use vmgrid_node::NodeConfig;

use crate::CliError;
use crate::pool_config::{ca_beside, default_data_dir, read_ca_file, read_token_file};

/// What a node or client trusts: the pool's CA when there is one, else the public web PKI.
pub(crate) fn trust_of(ca_pem: Option<String>) -> Result<vmgrid_client::Trust, CliError> {
    match ca_pem {
        Some(pem) => vmgrid_client::Trust::pool_ca(&pem).map_err(|e| CliError::BadInput(e.to_string())),
        None => Ok(vmgrid_client::Trust::default()),
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Where the job queue, the blobs and the tokens live (default: ~/.local/share/vmgrid).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The address to serve the API on.
    #[arg(long, default_value = "127.0.0.1:7800", value_name = "ADDR")]
    listen: SocketAddr,
    /// A lease not renewed by its node's heartbeat for this long expires; its job runs again.
    #[arg(long, default_value_t = 15_000, value_name = "MS")]
    lease_ttl_ms: u64,
    /// A node not heard from for this long is lost.
    #[arg(long, default_value_t = 15_000, value_name = "MS")]
    node_ttl_ms: u64,
    /// Serve plain HTTP instead of HTTPS (only on a loopback address).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_name"])]
    insecure_http: bool,
    /// Serve this certificate chain (PEM) instead of one from the pool's own CA; with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Another name or address clients reach the coordinator by, for its certificate; repeatable
    /// (this host's name and addresses are always in it).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_name: Vec<String>,
    /// Jobs a user may have queued (idle, running or held) at once.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    max_queued_per_user: u64,
    /// The largest file (image, input, output) one upload may be, in MiB.
    #[arg(long, default_value_t = 8192, value_name = "MIB")]
    max_blob_mb: u64,
    /// The files a user may hold in the pool, in MiB.
    #[arg(long, default_value_t = 65_536, value_name = "MIB")]
    max_blob_mb_per_user: u64,
    /// Completed and removed jobs (and their files) are forgotten this many days after they end.
    #[arg(long, default_value_t = 7, value_name = "DAYS")]
    retain_days: u64,
    /// Fair share: users' usage (cpu-seconds of their running jobs) decays by half in this long,
    /// as HTCondor's PRIORITY_HALFLIFE: 90s, 45m, 12h, 1d, 1w. Shorter forgets past use sooner.
    #[arg(long, default_value = "1d", value_name = "DURATION", value_parser = half_life)]
    usage_half_life: u64,
    /// Where the pool's state lives: `sqlite` (the default: pool.sqlite in the data dir) or a
    /// `postgres://` URL (also read from VMGRID_STORE). Several coordinators may share one
    /// PostgreSQL database: one is active, the others stand by (answering 503 with the active
    /// one's URL) and take over within a second or two of its end. They must share the data dir
    /// too (its tokens, CA and blobs: shared storage), and clients and nodes are given every
    /// coordinator's URL: --pool URL1,URL2.
    #[arg(long, env = "VMGRID_STORE", hide_env_values = true, value_name = "sqlite|postgres://…")]
    store: Option<String>,
    /// The URL other machines reach this coordinator at, which standbys tell their callers when
    /// this one is active [default: the URL it listens on].
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
}

/// A half-life in seconds: at least a second, at most ten years.
fn half_life(s: &str) -> Result<u64, String> {
    let secs = crate::cmd_token::parse_duration(s)?;
    if secs > 10 * 365 * 86_400 {
        return Err(format!("`{s}` is longer than ten years"));
    }
    Ok(secs)
}

impl CoordinatorArgs {
    fn config(&self) -> Config {
        let heartbeat_ms = (self.lease_ttl_ms.min(self.node_ttl_ms) / 5).clamp(50, 2_000);
        let tls = match (&self.tls_cert, &self.tls_key) {
            _ if self.insecure_http => Tls::InsecureHttp,
            (Some(cert), Some(key)) => Tls::Files { cert: cert.clone(), key: key.clone() },
            _ => Tls::PoolCa { names: self.tls_name.clone() },
        };
        Config {
            data_dir: self.data_dir.clone().unwrap_or_else(default_data_dir),
            listen: self.listen,
            timing: Timing { lease_ttl_ms: self.lease_ttl_ms, node_ttl_ms: self.node_ttl_ms, heartbeat_ms },
            limits: Limits {
                max_queued_per_user: self.max_queued_per_user,
                max_blob_bytes_per_user: self.max_blob_mb_per_user << 20,
                retain_finished_ms: self.retain_days.saturating_mul(86_400_000),
            },
            tls,
            max_blob_bytes: self.max_blob_mb << 20,
            usage_half_life_ms: self.usage_half_life * 1000,
            store_url: self.store.clone().filter(|s| s != "sqlite"),
            advertise_url: self.advertise.clone(),
        }
    }
}

fn start(config: Config, signals: bool) -> Result<vmgrid_coordinator::Running, CliError> {
    vmgrid_coordinator::start(config, signals).map_err(|e| CliError::Failed(e.to_string()))
}

/// `vmgrid coordinator`: serves the pool until SIGINT or SIGTERM.
pub fn coordinator(args: CoordinatorArgs) -> Result<i32, CliError> {
    let running = start(args.config(), true)?;
    eprintln!("vmgrid: coordinator listening on {}", running.url);
    eprintln!(
        "vmgrid: data in {}; nodes join with --token-file {} (and trust {} beside it)",
        running.data_dir.display(),
        running.data_dir.join(vmgrid_coordinator::POOL_TOKEN_FILE).display(),
        vmgrid_coordinator::CA_CERT_FILE
    );
    if let Some(ca) = &running.ca_pem {
        eprintln!("vmgrid: the pool's CA fingerprint is {}", vmgrid_tls::fingerprint(ca).unwrap_or_default());
    }
    eprintln!(
        "vmgrid: clients: export VMGRID_CONFIG={}",
        running.data_dir.join(vmgrid_coordinator::CLIENT_CONFIG_FILE).display()
    );
    running.join();
    Ok(0)
}

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// The pool's URL, or every coordinator's, comma-separated (an active coordinator and its
    /// standbys on a shared PostgreSQL store: the node moves on to the one that answers).
    #[arg(long, value_name = "URL[,URL…]", env = "VMGRID_POOL")]
    pool: String,
    /// The pool token (the coordinator's pool.token).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The pool's CA certificate (the coordinator's ca.pem) [default: ca.pem beside --token-file].
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// This node's name in the pool (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// CPUs to offer (default: all).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory to offer in MiB (default: all).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Where images, inputs and compiled modules are cached (default: ~/.cache/vmgrid/node-NAME).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The cache's size bound in MiB.
    #[arg(long, default_value_t = 4096)]
    cache_max_mb: u64,
    /// A label for requirements (`node.labels.KEY`), as KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Advertise `appliance = true` (set by the grid appliance).
    #[arg(long)]
    appliance: bool,
    /// Take `jvm` jobs. A JVM has no sandbox of its own: each job runs confined by bubblewrap
    /// (no host files beyond its directory, no network, as `nobody` when the node is root). Off
    /// by default; the node refuses to start with it when java or bwrap is missing.
    #[arg(long)]
    jvm: bool,
    /// On SIGTERM, wait this long for running jobs before handing them back.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// Where to serve large blobs (images, inputs of 16 MiB and up) to the pool's other nodes,
    /// over TLS with a certificate from the pool's CA, to nodes only; they then fetch from each
    /// other instead of all from the coordinator. `0.0.0.0:PORT` listens everywhere and tells
    /// the pool the address this host reaches it from.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    peer_listen: std::net::SocketAddr,
    /// Serve no blobs to other nodes, and fetch every blob from the coordinator.
    #[arg(long)]
    no_peers: bool,
    /// The most MiB a second this node sends to other nodes.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    peer_upload_mib_s: u64,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

pub(crate) fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::BadInput(format!("label `{l}` is not KEY=VALUE")))
        })
        .collect()
}

fn stop_on_signals() -> Result<Arc<AtomicBool>, CliError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")))?;
    }
    Ok(stop)
}

/// `vmgrid node`: runs a node agent until SIGINT or SIGTERM, then drains and leaves.
pub fn node(args: NodeArgs) -> Result<i32, CliError> {
    let token = read_token_file(&args.token_file)?;
    let ca = match &args.ca_file {
        Some(f) => Some(read_ca_file(f)?),
        None => ca_beside(&args.token_file)?,
    };
    if ca.is_none() && args.pool.starts_with("https://") {
        eprintln!(
            "vmgrid: no CA given (--ca-file, or ca.pem beside the token file): the pool's certificate must come from a public CA"
        );
    }
    let trust = trust_of(ca)?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| vmgrid_runtime::RuntimeConfig::default_cache_dir().join(format!("node-{name}")));
    let config = NodeConfig {
        pool: args.pool.clone(),
        trust,
        token,
        name,
        cpus: args.cpus,
        memory_mb: args.memory_mb,
        labels: parse_labels(&args.labels)?,
        appliance: args.appliance,
        allow_jvm: jvm_opt_in(args.jvm)?,
        cache_dir,
        cache_max_mb: args.cache_max_mb,
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        peer_listen: (!args.no_peers).then_some(args.peer_listen),
        peer_upload_bytes_s: args.peer_upload_mib_s.max(1) << 20,
        overlay_host: None,
        wasm_worker: vmgrid_runtime::wasm::worker::this_program(),
    };
    let stop = stop_on_signals()?;
    eprintln!("vmgrid: node {} joining {}", config.name, config.pool);
    vmgrid_node::run(config, stop).map_err(|e| CliError::Failed(e.to_string()))?;
    Ok(0)
}

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// How many node agents to run in this process. They share the host: its cpus and memory
    /// are split among them (the remainder to the first ones; each gets at least 1 cpu, so with
    /// more nodes than cpus the pool offers more cpus than the host has).
    #[arg(long, default_value_t = 2)]
    nodes: u32,
    /// CPUs each local node offers, instead of its share of the host's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    cpus: Option<u32>,
    /// Memory each local node offers in MiB, instead of its share of the host's.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    memory_mb: Option<u64>,
    /// Let the local nodes take `jvm` jobs, confined by bubblewrap (see `vmgrid node --help`).
    #[arg(long)]
    jvm: bool,
    #[command(flatten)]
    coordinator: CoordinatorArgs,
}

/// `--jvm`: refused at once, with what to install, when JVM jobs cannot run confined here.
fn jvm_opt_in(asked: bool) -> Result<bool, CliError> {
    if asked {
        vmgrid_runtime::jvm::usable().map_err(|e| CliError::Failed(format!("--jvm: {e}")))?;
    }
    Ok(asked)
}

/// What each of `nodes` local nodes offers: `each` when given, else its share of the host's
/// `total`, the remainder going to the first nodes (the shares add up to `total`); at least 1.
fn share(each: Option<u64>, total: u64, nodes: u32) -> Vec<u64> {
    let n = u64::from(nodes.max(1));
    (0..n).map(|i| each.unwrap_or(total / n + u64::from(i < total % n)).max(1)).collect()
}

/// `vmgrid up`: the embedded pool, a coordinator and N node agents in one process.
pub fn up(args: UpArgs) -> Result<i32, CliError> {
    if args.nodes == 0 || args.nodes > 64 {
        return Err(CliError::BadInput("--nodes must be between 1 and 64".into()));
    }
    let allow_jvm = jvm_opt_in(args.jvm)?;
    let stop = stop_on_signals()?;
    let running = start(args.coordinator.config(), false)?;
    let data_dir = running.data_dir.clone();
    let token = read_token_file(&data_dir.join(vmgrid_coordinator::POOL_TOKEN_FILE))?;
    let cpus = share(args.cpus.map(u64::from), u64::from(vmgrid_node::host_cpus()), args.nodes);
    let memory = share(args.memory_mb, vmgrid_node::host_memory_mb(), args.nodes);
    let trust = trust_of(running.ca_pem.clone())?;
    let mut agents = Vec::new();
    for i in 1..=args.nodes {
        let config = NodeConfig {
            pool: running.url.clone(),
            trust: trust.clone(),
            token: token.clone(),
            name: format!("local-{i}"),
            cpus: Some(cpus[i as usize - 1] as u32),
            memory_mb: Some(memory[i as usize - 1]),
            labels: BTreeMap::from([("pool".to_string(), "local".to_string())]),
            appliance: false,
            allow_jvm,
            cache_dir: data_dir.join(format!("node-{i}")),
            cache_max_mb: 4096,
            drain_timeout: Duration::from_secs(30),
            // In one process on one host, nodes share the host's disk: nothing to gain.
            peer_listen: None,
            peer_upload_bytes_s: 0,
            overlay_host: None,
            wasm_worker: vmgrid_runtime::wasm::worker::this_program(),
        };
        let s = stop.clone();
        agents.push(std::thread::spawn(move || {
            if let Err(e) = vmgrid_node::run(config, s) {
                eprintln!("vmgrid: node agent failed: {e}");
            }
        }));
    }
    let config_path = data_dir.join(vmgrid_coordinator::CLIENT_CONFIG_FILE);
    eprintln!(
        "vmgrid: pool up at {} with {} local node(s) offering {} cpus and {} MiB in all; Ctrl-C stops it",
        running.url,
        args.nodes,
        cpus.iter().sum::<u64>(),
        memory.iter().sum::<u64>()
    );
    eprintln!("vmgrid: client config {}", config_path.display());
    eprintln!("vmgrid: try `vmgrid submit examples/wordcount/job.toml --count 10 --wait` from another terminal");
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("vmgrid: stopping: draining the nodes");
    for a in agents {
        let _ = a.join();
    }
    running.stop();
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn local_nodes_split_the_host_unless_told_their_size() {
        assert_eq!(share(None, 2, 2), [1, 1]);
        assert_eq!(share(None, 7, 3), [3, 2, 2]);
        assert_eq!(share(None, 2, 3), [1, 1, 1], "each node gets at least 1 cpu");
        assert_eq!(share(None, 16_001, 2).iter().sum::<u64>(), 16_001);
        assert_eq!(share(Some(4), 2, 2), [4, 4], "an explicit size overrides the split");
    }
}
