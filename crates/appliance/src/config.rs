//! The appliance's configuration, as the 2008 Grid Appliance's floppy carried it: a 1.44 MB FAT
//! floppy image holding one file, `vmgrid.toml`. The appliance's init mounts any FAT disk or floppy
//! that has it, so one image serves every pool.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::tools::{self, io};

/// The file on the config disk.
pub const FILE_NAME: &str = "vmgrid.toml";
/// The config disk's FAT volume label.
pub const LABEL: &str = "VMGRIDCFG";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// The pool's URL as the appliance reaches it.
    pub pool: String,
    /// The pool token (the node role), with which the node agent joins.
    pub token: String,
    /// A user token for the `vmgrid` CLI at the appliance's console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_token: Option<String>,
    /// The node's name in the pool (default: `appliance-` and random hex, new at each boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels for requirements (`node.labels.KEY`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// On power-off, how long running jobs get to finish before they are handed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_s: Option<u64>,
    /// The pool's CA certificate (PEM), which the appliance trusts for the pool's TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// `grid`: the appliance is on the pool's overlay itself (`vmgrid0`, an address in
    /// 100.127.0.0/16), reaching the pool's other appliances that are; `user` (the default):
    /// only its own NIC, to the pool.
    #[serde(default, skip_serializing_if = "Network::is_user")]
    pub network: Network,
}

/// The appliance's networks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    User,
    Grid,
}

impl Network {
    fn is_user(&self) -> bool {
        *self == Network::User
    }

    pub fn parse(s: &str) -> Result<Network, String> {
        match s {
            "user" => Ok(Network::User),
            "grid" => Ok(Network::Grid),
            _ => Err(format!(
                "--network is `user` (the default: the appliance's NIC to the pool) or `grid` (also on the pool's overlay), not `{s}`"
            )),
        }
    }
}

impl ApplianceConfig {
    pub fn parse(text: &str) -> Result<ApplianceConfig, String> {
        let c: ApplianceConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<(), String> {
        let https = self.pool.starts_with("https://");
        if !https && !self.pool.starts_with("http://") {
            return Err(format!(
                "the pool URL `{}` must start with https:// (or http:// for a plain-HTTP pool)",
                self.pool
            ));
        }
        if let Some(ca) = &self.ca {
            vmgrid_tls::certs(ca, "the pool's CA certificate").map_err(|e| e.to_string())?;
        }
        if self.token.trim().is_empty() {
            return Err("the pool token is empty".into());
        }
        let bad_name = |n: &String| {
            n.is_empty() || n.len() > 63 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if let Some(n) = self.name.as_ref().filter(|n| bad_name(n)) {
            return Err(format!(
                "the name `{n}` must be 1 to 63 letters, digits, `-`, `_` or `.` (it becomes the host name)"
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("the config serializes");
        format!("# The vmgrid grid appliance's configuration (written by `vmgrid appliance config`).\n{body}")
    }
}

/// Whether a URL's host is this machine's loopback (which, inside a VM, is the VM itself).
pub fn is_loopback_url(url: &str) -> bool {
    split_url(url).is_some_and(|(_, host, _)| is_loopback_host(host))
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    h == "localhost"
        || h.ends_with(".localhost")
        || h == "::1"
        || h == "0.0.0.0"
        || h.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// `scheme://`, the host (with brackets for IPv6), and the rest (`:port/path`).
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let hostport = &authority[host_start..];
    let host_len = if hostport.starts_with('[') {
        hostport.find(']').map(|i| i + 1)?
    } else {
        hostport.find(':').unwrap_or(hostport.len())
    };
    let host = &hostport[..host_len];
    let after = &rest[host_start + host_len..];
    Some((&url[..scheme.len() + 3 + host_start], host, after))
}

/// Rewrites a loopback pool URL to `host` (QEMU user networking shows the host as 10.0.2.2);
/// other URLs are returned as they are. The answer says whether it changed.
pub fn rewrite_loopback(url: &str, host: &str) -> (String, bool) {
    match split_url(url) {
        Some((prefix, h, rest)) if is_loopback_host(h) => (format!("{prefix}{host}{rest}"), true),
        _ => (url.to_string(), false),
    }
}

/// Writes the config disk: a 1.44 MB FAT12 floppy image with `vmgrid.toml`, readable by the
/// owner only (it holds the tokens).
pub fn write_disk(config: &ApplianceConfig, out: &Path) -> Result<(), Error> {
    let mkfs = tools::find("mkfs.fat", "dosfstools")?;
    let mcopy = tools::find("mcopy", "mtools")?;
    let dir = tempfile::tempdir().map_err(io("cannot create a temporary directory"))?;
    let staged = dir.path().join("disk.img");
    let file = dir.path().join(FILE_NAME);
    write_private(&file, config.to_toml().as_bytes())?;
    tools::run(
        Command::new(&mkfs).args(["-C", "-n", LABEL, "-i", "766d6763", "--invariant"]).arg(&staged).arg("1440"),
    )?;
    tools::run(
        Command::new(&mcopy)
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("SOURCE_DATE_EPOCH", "946684800")
            .arg("-i")
            .arg(&staged)
            .arg("-o")
            .arg(&file)
            .arg("::/"),
    )?;
    let bytes = std::fs::read(&staged).map_err(io("cannot read the config disk"))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(format!("cannot create {}", parent.display())))?;
    }
    write_private(out, &bytes)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("cannot write {}", path.display())))?;
    std::io::Write::write_all(&mut f, bytes).map_err(io(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_rewritten_and_others_kept() {
        let r = |u| rewrite_loopback(u, "10.0.2.2");
        assert_eq!(r("http://127.0.0.1:7800"), ("http://10.0.2.2:7800".into(), true));
        assert_eq!(r("http://localhost:7800/"), ("http://10.0.2.2:7800/".into(), true));
        assert_eq!(r("http://[::1]:7800"), ("http://10.0.2.2:7800".into(), true));
        assert_eq!(r("http://127.1.2.3"), ("http://10.0.2.2".into(), true));
        assert_eq!(r("http://0.0.0.0:80/x"), ("http://10.0.2.2:80/x".into(), true));
        assert_eq!(r("http://grid.example.org:7800"), ("http://grid.example.org:7800".into(), false));
        assert_eq!(r("http://192.168.1.5:7800"), ("http://192.168.1.5:7800".into(), false));
        assert_eq!(r("http://[2001:db8::1]:7800"), ("http://[2001:db8::1]:7800".into(), false));
        assert!(is_loopback_url("http://localhost"));
        assert!(!is_loopback_url("http://10.0.2.2:1"));
    }

    #[test]
    fn the_config_round_trips_and_refuses_unknown_keys() {
        let c = ApplianceConfig {
            pool: "https://10.0.2.2:7800".into(),
            token: "t".into(),
            user_token: Some("u".into()),
            name: Some("a-1".into()),
            labels: BTreeMap::from([("site".into(), "lab".into())]),
            drain_timeout_s: Some(5),
            ca: Some(vmgrid_tls::Ca::generate().unwrap().cert_pem().to_string()),
            network: Network::Grid,
        };
        assert_eq!(ApplianceConfig::parse(&c.to_toml()).unwrap(), c);
        assert!(c.to_toml().contains("network = \"grid\""));
        let err = ApplianceConfig::parse("pool = \"http://x\"\ntoken = \"t\"\nnetwork = \"none\"\n").unwrap_err();
        assert!(err.contains("expected `user` or `grid`"), "{err}");
        let err = ApplianceConfig::parse("pool = \"http://x\"\ntoken = \"t\"\ncolour = 1\n").unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let err = ApplianceConfig::parse("pool = \"ftp://x\"\ntoken = \"t\"\n").unwrap_err();
        assert!(err.contains("https://"), "{err}");
        let err = ApplianceConfig::parse("pool = \"https://x\"\ntoken = \"t\"\nca = \"not a pem\"\n").unwrap_err();
        assert!(err.contains("CA certificate"), "{err}");
        let err = ApplianceConfig::parse("pool = \"http://x\"\ntoken = \"t\"\nname = \"a b\"\n").unwrap_err();
        assert!(err.contains("host name"), "{err}");
    }
}
