//! How the coordinator serves: HTTPS with the pool's own CA (made on the first start, in the data
//! dir) or with a certificate from files, or plain HTTP on loopback when asked. A pool CA signs a
//! new server certificate at every start, for the names and addresses clients may use, and the
//! SSI consoles' certificates as they register.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmgrid_tls::{Ca, Identity};

use crate::files::{read_private, write_private};

/// The coordinator's transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// HTTPS, with the pool's CA (`ca.pem`, `ca.key` in the data dir): its server certificate
    /// names `names`, this host's name and addresses, and `10.0.2.2` (the host as a QEMU
    /// user-network guest such as the appliance sees it).
    PoolCa { names: Vec<String> },
    /// HTTPS with a certificate chain and key from files (from a CA the clients already trust).
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP; only on a loopback address.
    InsecureHttp,
}

/// What serving needs, found at start.
pub(crate) struct Transport {
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// The pool's CA, when the pool has its own (it then signs consoles' certificates).
    pub ca: Option<Arc<Ca>>,
    /// The CA of the certificates nodes serve each other blobs with, apart from the pool's: a
    /// node's certificate names the address it says it serves at, which the coordinator cannot
    /// check, so no client or node trusts it for anything but another node's blobs.
    pub peer_ca: Option<Arc<Ca>>,
}

impl Transport {
    pub fn scheme(&self) -> &'static str {
        if self.server.is_some() { "https" } else { "http" }
    }
}

pub const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const PEER_CA_CERT_FILE: &str = "peer-ca.pem";
const PEER_CA_KEY_FILE: &str = "peer-ca.key";

pub(crate) fn transport(tls: &Tls, dir: &Path, listen: SocketAddr) -> Result<Transport, String> {
    match tls {
        Tls::InsecureHttp => {
            if !listen.ip().is_loopback() {
                return Err(format!(
                    "plain HTTP is only for a loopback address, and {listen} is not one: drop --insecure-http to serve HTTPS"
                ));
            }
            Ok(Transport { server: None, ca: None, peer_ca: None })
        }
        Tls::Files { cert, key } => {
            let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
            let identity = Identity { cert_pem: read(cert)?, key_pem: read(key)? };
            let server = vmgrid_tls::server_config(&identity).map_err(|e| e.to_string())?;
            Ok(Transport { server: Some(server), ca: None, peer_ca: None })
        }
        Tls::PoolCa { names } => {
            let ca = load_or_make_ca(dir, CA_CERT_FILE, CA_KEY_FILE)?;
            let identity = ca.issue(&server_names(names, listen)).map_err(|e| e.to_string())?;
            let server = vmgrid_tls::server_config(&identity).map_err(|e| e.to_string())?;
            let peer_ca = load_or_make_ca(dir, PEER_CA_CERT_FILE, PEER_CA_KEY_FILE)?;
            Ok(Transport { server: Some(server), ca: Some(Arc::new(ca)), peer_ca: Some(Arc::new(peer_ca)) })
        }
    }
}

/// A CA of the pool's from the data dir, made (and written, the key readable by its owner only) on
/// the first start.
fn load_or_make_ca(dir: &Path, cert_file: &str, key_file: &str) -> Result<Ca, String> {
    let (cert, key) = (dir.join(cert_file), dir.join(key_file));
    if cert.is_file() && key.is_file() {
        let cert_pem = std::fs::read_to_string(&cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
        let key_pem = read_private(&key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
        return Ca::load(&cert_pem, &key_pem).map_err(|e| format!("{}: {e}", dir.display()));
    }
    let ca = Ca::generate().map_err(|e| e.to_string())?;
    write_private(&key, &ca.key_pem()).map_err(|e| format!("cannot write {}: {e}", key.display()))?;
    // The CA certificate is public: nodes and clients copy it.
    crate::files::write_public(&cert, ca.cert_pem()).map_err(|e| format!("cannot write {}: {e}", cert.display()))?;
    Ok(ca)
}

/// The names a client may reach the coordinator by: those asked for, the listen address (or, if
/// it is a wildcard, every address of this host), this host's name, and loopback.
fn server_names(extra: &[String], listen: SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = extra.to_vec();
    let ip = listen.ip();
    if ip.is_unspecified() {
        names.extend(local_addresses().into_iter().map(|a| a.to_string()));
    } else {
        names.push(ip.to_string());
    }
    names.extend(["localhost", "127.0.0.1", "::1", "10.0.2.2"].map(String::from));
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// This host's interface addresses.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates, or fails and leaves it alone.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, which stays valid until
        // freeifaddrs below; `ifa_addr` is null or points to a sockaddr of the family it names,
        // read as the matching sockaddr_in/sockaddr_in6.
        unsafe {
            let a = (*cur).ifa_addr;
            if !a.is_null() {
                match (*a).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The URL a console at `peer` listening on `port` is reached at.
pub(crate) fn home_url(scheme: &str, peer: IpAddr, port: u16) -> String {
    match peer {
        IpAddr::V4(v4) => format!("{scheme}://{v4}:{port}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("{scheme}://{v4}:{port}"),
            None => format!("{scheme}://[{v6}]:{port}"),
        },
    }
}

/// The address a peer connected from, with an IPv4-mapped IPv6 address as plain IPv4.
pub(crate) fn peer_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The address a connection came from, for handlers (`ConnectInfo<Peer>`), over TLS or not.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// TLS connections for axum.
pub(crate) struct TlsListener(pub vmgrid_tls::Incoming);

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.next().await {
            Some(c) => c,
            // The acceptor ended (the server is stopping): wait for the shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback_and_a_pool_ca_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = transport(&Tls::InsecureHttp, dir.path(), "0.0.0.0:7800".parse().unwrap()).err().unwrap();
        assert!(err.contains("only for a loopback address"), "{err}");
        assert!(transport(&Tls::InsecureHttp, dir.path(), "127.0.0.1:7800".parse().unwrap()).is_ok());
        let tls = Tls::PoolCa { names: vec!["grid.example.org".into()] };
        let first = transport(&tls, dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let ca_pem = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        let second = transport(&tls, dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(first.ca.unwrap().cert_pem(), second.ca.unwrap().cert_pem());
        assert_eq!(std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap(), ca_pem, "the CA stays");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn names_cover_the_listen_address_and_loopback() {
        let n = server_names(&["grid.example.org".into()], "0.0.0.0:7800".parse().unwrap());
        assert!(n.contains(&"grid.example.org".to_string()) && n.contains(&"127.0.0.1".to_string()), "{n:?}");
        assert!(n.contains(&"10.0.2.2".to_string()));
        assert_eq!(home_url("https", "::ffff:10.1.2.3".parse().unwrap(), 7900), "https://10.1.2.3:7900");
        assert_eq!(home_url("https", "fd00::1".parse().unwrap(), 7900), "https://[fd00::1]:7900");
    }
}
