//! Where the pool is and which token to use, found in this order: `--pool` and `--token-file`;
//! `VMGRID_POOL` and `VMGRID_TOKEN`; the `client.toml` that `VMGRID_CONFIG` names; the user's
//! `~/.config/vmgrid/client.toml`; the `client.toml` of the default `vmgrid up` data directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmgrid_client::Client;

use crate::CliError;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct PoolArgs {
    /// The pool's URL, e.g. http://127.0.0.1:7800 (default: from VMGRID_POOL or client.toml).
    #[arg(long, value_name = "URL")]
    pub pool: Option<String>,
    /// A file holding the token to use (default: VMGRID_TOKEN or client.toml).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientToml {
    pool: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// `$VMGRID_DATA_DIR`, else `$XDG_DATA_HOME/vmgrid`, else `~/.local/share/vmgrid`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMGRID_DATA_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("vmgrid");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/vmgrid"),
        None => PathBuf::from(".vmgrid"),
    }
}

fn user_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("vmgrid/client.toml"))
}

pub fn read_token_file(path: &Path) -> Result<String, CliError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| CliError::BadInput(format!("cannot read the token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(CliError::BadInput(format!("the token file {} is empty", path.display())));
    }
    Ok(t)
}

fn read_client_toml(path: &Path) -> Result<(String, Option<String>), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::BadInput(format!("cannot read {}: {e}", path.display())))?;
    let c: ClientToml =
        toml::from_str(&text).map_err(|e| CliError::BadInput(format!("{}: {}", path.display(), e.message())))?;
    let token = match (c.token, c.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(read_token_file(&path.parent().unwrap_or(Path::new(".")).join(f))?),
        (None, None) => None,
    };
    Ok((c.pool, token))
}

impl PoolArgs {
    pub fn client(&self) -> Result<Client, CliError> {
        let mut pool = self.pool.clone().or_else(|| std::env::var("VMGRID_POOL").ok());
        let mut token = match &self.token_file {
            Some(f) => Some(read_token_file(f)?),
            None => std::env::var("VMGRID_TOKEN").ok(),
        };
        if pool.is_none() || token.is_none() {
            let candidates = [
                std::env::var_os("VMGRID_CONFIG").map(PathBuf::from),
                user_config(),
                Some(default_data_dir().join(vmgrid_coordinator::CLIENT_CONFIG_FILE)),
            ];
            let explicit = std::env::var_os("VMGRID_CONFIG").is_some();
            for (i, c) in candidates.into_iter().flatten().enumerate() {
                if c.is_file() || (i == 0 && explicit) {
                    let (p, t) = read_client_toml(&c)?;
                    pool = pool.or(Some(p));
                    token = token.or(t);
                    break;
                }
            }
        }
        match (pool, token) {
            (Some(p), Some(t)) => Ok(Client::new(&p, &t)),
            (None, _) => Err(CliError::BadInput(
                "no pool is configured: start one with `vmgrid up`, or pass --pool and --token-file, or set VMGRID_CONFIG to a client.toml".into(),
            )),
            (Some(p), None) => Err(CliError::BadInput(format!("no token for the pool at {p}: pass --token-file or set VMGRID_TOKEN"))),
        }
    }
}
