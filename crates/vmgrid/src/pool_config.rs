//! Where the pool is, which token to use and which CA to trust, found in this order: `--pool`,
//! `--token-file` and `--ca-file`; `VMGRID_POOL`, `VMGRID_TOKEN` and `VMGRID_CA_FILE`; the
//! `client.toml` that `VMGRID_CONFIG` names; the user's `~/.config/vmgrid/client.toml`; the
//! `client.toml` of the default `vmgrid up` data directory. A token file with a `ca.pem` beside it
//! (as a coordinator's data dir has) brings its CA along.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmgrid_client::Client;

use crate::CliError;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct PoolArgs {
    /// The pool's URL, e.g. https://grid.example.org:7800, or every coordinator's, comma-separated,
    /// for a pool with standbys (default: from VMGRID_POOL or client.toml).
    #[arg(long, value_name = "URL")]
    pub pool: Option<String>,
    /// A file holding the token to use (default: VMGRID_TOKEN or client.toml).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The pool's CA certificate (PEM) to trust (default: VMGRID_CA_FILE, client.toml's `ca`, or
    /// `ca.pem` beside --token-file).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientToml {
    pool: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    /// The pool's CA certificate, PEM.
    ca: Option<String>,
    ca_file: Option<PathBuf>,
}

/// Reads a CA certificate file.
pub fn read_ca_file(path: &Path) -> Result<String, CliError> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| CliError::BadInput(format!("cannot read the CA certificate {}: {e}", path.display())))?;
    vmgrid_client::Trust::pool_ca(&pem).map_err(|e| CliError::BadInput(format!("{}: {e}", path.display())))?;
    Ok(pem)
}

/// The CA beside a token file (`ca.pem` in a coordinator's data dir), if there is one.
pub fn ca_beside(token_file: &Path) -> Result<Option<String>, CliError> {
    let ca = token_file.parent().unwrap_or(Path::new(".")).join(vmgrid_coordinator::CA_CERT_FILE);
    if ca.is_file() { read_ca_file(&ca).map(Some) } else { Ok(None) }
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
    warn_if_shared(path);
    Ok(t)
}

/// A secret others can read is one others can use: say so, as ssh does of a key.
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "vmgrid: warning: {} can be read by other accounts (mode {:04o}); anyone who reads it can act as you: chmod 600 {}",
            path.display(),
            m.permissions().mode() & 0o7777,
            path.display()
        );
    }
}

/// The pool, token and CA a client.toml names.
fn read_client_toml(path: &Path) -> Result<(String, Option<String>, Option<String>), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::BadInput(format!("cannot read {}: {e}", path.display())))?;
    let c: ClientToml =
        toml::from_str(&text).map_err(|e| CliError::BadInput(format!("{}: {}", path.display(), e.message())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let token = match (c.token, c.token_file) {
        (Some(t), _) => {
            warn_if_shared(path);
            Some(t)
        }
        (None, Some(f)) => Some(read_token_file(&dir.join(f))?),
        (None, None) => None,
    };
    let ca = match (c.ca, c.ca_file) {
        (Some(pem), _) => Some(pem),
        (None, Some(f)) => Some(read_ca_file(&dir.join(f))?),
        (None, None) => None,
    };
    Ok((c.pool, token, ca))
}

impl PoolArgs {
    pub fn client(&self) -> Result<Client, CliError> {
        let mut pool = self.pool.clone().or_else(|| std::env::var("VMGRID_POOL").ok());
        let mut token = match &self.token_file {
            Some(f) => Some(read_token_file(f)?),
            None => std::env::var("VMGRID_TOKEN").ok(),
        };
        let ca_file = self.ca_file.clone().or_else(|| std::env::var_os("VMGRID_CA_FILE").map(PathBuf::from));
        let mut ca = ca_file.as_deref().map(read_ca_file).transpose()?;
        if ca.is_none()
            && let Some(f) = &self.token_file
        {
            ca = ca_beside(f)?;
        }
        if pool.is_none() || token.is_none() {
            let candidates = [
                std::env::var_os("VMGRID_CONFIG").map(PathBuf::from),
                user_config(),
                Some(default_data_dir().join(vmgrid_coordinator::CLIENT_CONFIG_FILE)),
            ];
            let explicit = std::env::var_os("VMGRID_CONFIG").is_some();
            for (i, c) in candidates.into_iter().flatten().enumerate() {
                if c.is_file() || (i == 0 && explicit) {
                    let (p, t, c) = read_client_toml(&c)?;
                    pool = pool.or(Some(p));
                    token = token.or(t);
                    ca = ca.or(c);
                    break;
                }
            }
        }
        match (pool, token) {
            (Some(p), Some(t)) => {
                let trust = match ca {
                    Some(pem) => vmgrid_client::Trust::pool_ca(&pem).map_err(|e| CliError::BadInput(e.to_string()))?,
                    None => vmgrid_client::Trust::default(),
                };
                Ok(Client::with_trust(&p, &t, trust))
            }
            (None, _) => Err(CliError::BadInput(
                "no pool is configured: start one with `vmgrid up`, or pass --pool and --token-file, or set VMGRID_CONFIG to a client.toml".into(),
            )),
            (Some(p), None) => Err(CliError::BadInput(format!("no token for the pool at {p}: pass --token-file or set VMGRID_TOKEN"))),
        }
    }
}
