//! What runs inside the appliance (`vmgrid appliance agent`, started by appliance/init): the node
//! agent, configured from the config disk, with `appliance = true` in its ad. It also writes the
//! client configuration that the console's `vmgrid` CLI uses. SIGTERM drains and deregisters.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmgrid_node::NodeConfig;

use crate::Error;
use crate::config::{ApplianceConfig, Network};
use crate::{MARKER, tools};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The configuration (the config disk's vmgrid.toml, copied by the init).
    pub config: PathBuf,
    /// Where the node keeps its cache and credential (in the appliance's memory).
    pub state_dir: PathBuf,
    /// Where to write the console CLI's client.toml (default: next to `config`).
    pub client_config: Option<PathBuf>,
}

fn say(msg: impl std::fmt::Display) {
    println!("{MARKER}{msg}");
}

/// Runs the agent; a failure is also said on the console in the form `appliance start` reports.
pub fn run(args: AgentOptions) -> Result<i32, Error> {
    match serve(args) {
        Ok(code) => Ok(code),
        Err(e) => {
            say(format!("the node agent failed: {e}"));
            Ok(e.exit_code())
        }
    }
}

fn read_config(path: &Path) -> Result<ApplianceConfig, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::BadInput(format!("cannot read {}: {e}", path.display())))?;
    ApplianceConfig::parse(&text).map_err(|e| {
        Error::BadInput(format!(
            "the appliance configuration is invalid: {e}; write a new config disk with `vmgrid appliance config`"
        ))
    })
}

fn serve(args: AgentOptions) -> Result<i32, Error> {
    let config = read_config(&args.config)?;
    let name = config.name.clone().unwrap_or_else(|| format!("appliance-{}", tools::hex(&tools::random_bytes::<3>())));
    set_host_name(&name);
    let client_config = args
        .client_config
        .clone()
        .unwrap_or_else(|| args.config.parent().unwrap_or(Path::new("/")).join("client.toml"));
    write_client_config(&client_config, &config)?;
    std::fs::create_dir_all(&args.state_dir)
        .map_err(tools::io(format!("cannot create {}", args.state_dir.display())))?;
    // Each boot is a new node: an old credential would name a registration that is gone.
    let credential = args.state_dir.join("credential");
    let _ = std::fs::remove_file(&credential);
    let memory_mb = memory_mb();
    let trust = match &config.ca {
        Some(pem) => vmgrid_client::Trust::pool_ca(pem).map_err(|e| Error::BadInput(e.to_string()))?,
        None => vmgrid_client::Trust::default(),
    };
    let node = NodeConfig {
        pool: config.pool.clone(),
        trust,
        token: config.token.trim().to_string(),
        name: name.clone(),
        cpus: None,
        memory_mb: None,
        labels: config.labels.clone(),
        appliance: true,
        // The appliance image carries no JVM.
        allow_jvm: false,
        cache_dir: args.state_dir.clone(),
        // The cache lives in RAM: a quarter of it at most.
        cache_max_mb: (memory_mb / 4).clamp(64, 4096),
        drain_timeout: Duration::from_secs(config.drain_timeout_s.unwrap_or(30)),
        // The appliance fetches from the pool alone (its network may not reach other nodes).
        peer_listen: None,
        peer_upload_bytes_s: 0,
        overlay_host: (config.network == Network::Grid).then_some(crate::netdev::configure),
        wasm_worker: vmgrid_runtime::wasm::worker::this_program(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::Failed(format!("cannot handle signals: {e}")))?;
    }
    say(format!("joining {} as {name}", config.pool));
    let agent = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vmgrid-node".into())
            .spawn(move || vmgrid_node::run(node, stop))
            .map_err(tools::io("cannot start the node agent"))?
    };
    // The agent writes its credential when the pool has accepted it.
    let (mut joined, mut draining) = (false, false);
    while !agent.is_finished() {
        if !joined && credential.is_file() {
            joined = true;
            say(format!("joined {} as {name}", config.pool));
        }
        if !draining && stop.load(Ordering::Relaxed) {
            draining = true;
            say("draining: running jobs finish or go back to the pool, then this node leaves it");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match agent.join() {
        Ok(Ok(())) => {
            say(format!("left the pool as {name}"));
            Ok(0)
        }
        Ok(Err(e)) => Err(Error::Failed(format!("the node agent failed: {e}"))),
        Err(_) => Err(Error::Failed("the node agent crashed".into())),
    }
}

fn set_host_name(name: &str) {
    let _ = std::fs::write("/proc/sys/kernel/hostname", name);
}

fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .map_or(1024, |kb: u64| kb / 1024)
}

/// The console's CLI finds the pool here (the init points VMGRID_CONFIG at it); with no user
/// token it knows the pool but says a token is missing.
fn write_client_config(path: &Path, config: &ApplianceConfig) -> Result<(), Error> {
    #[derive(serde::Serialize)]
    struct ClientToml<'a> {
        pool: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ca: Option<&'a str>,
    }
    let toml =
        ClientToml { pool: &config.pool, token: config.user_token.as_deref().map(str::trim), ca: config.ca.as_deref() };
    let text = toml::to_string(&toml).expect("a client.toml serializes");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(tools::io(format!("cannot create {}", parent.display())))?;
    }
    std::fs::write(path, text).map_err(tools::io(format!("cannot write {}", path.display())))
}
