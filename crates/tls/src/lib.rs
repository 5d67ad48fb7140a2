//! The pool's TLS. A pool has its own certificate authority, made on the coordinator's first
//! start; it signs the coordinator's server certificate and each `vmgrid ssi` console's, and
//! clients and nodes trust it alone (it travels in `client.toml`, next to `pool.token` as
//! `ca.pem`, and on the appliance's config disk). Nothing here trusts on first use.
//!
//! [`Ca`] makes and loads the authority and issues certificates, [`server_config`] is a server's
//! rustls configuration, and [`Incoming`] accepts TLS connections for an HTTP server. ring is
//! the crypto provider throughout. This crate does no HTTP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make a certificate: {0}")]
    Generate(String),
    #[error("{what} is not valid PEM: {why}")]
    Pem { what: String, why: String },
    #[error("cannot use the certificate and key: {0}")]
    Config(String),
}

fn generate(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// The authority's name; it is rebuilt from this on load, so certificates it issues later name
/// the same issuer.
const CA_NAME: &str = "vmgrid pool CA";
/// How long issued certificates last. A coordinator issues its own at every start, a console at
/// every registration.
const LEAF_DAYS: i64 = 397;
/// How long a node's certificate for serving blobs to other nodes lasts.
pub const PEER_HOURS: i64 = 24;

/// A pool's certificate authority: its certificate (public) and its key (secret).
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    params: CertificateParams,
}

/// A certificate with its key, as PEM: the certificate chain (leaf, then the CA) and the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("cert_pem", &self.cert_pem).field("key_pem", &"(secret)").finish()
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "vmgrid");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

impl Ca {
    /// A new authority, valid for ten years.
    pub fn generate() -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = ca_params();
        let now = time_now();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(generate)?;
        Ok(Ca { cert_pem: cert.pem(), key, params: ca_params() })
    }

    /// The authority from its certificate and key, as [`Ca::generate`] wrote them.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        certs(cert_pem, "the CA certificate")?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem { what: "the CA key".into(), why: e.to_string() })?;
        Ok(Ca { cert_pem: cert_pem.to_string(), key, params: ca_params() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The key, to be kept in a file only its owner can read.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this authority.
    pub fn issue(&self, names: &[String]) -> Result<Identity, TlsError> {
        self.issue_for(names, &[ExtendedKeyUsagePurpose::ServerAuth], time::Duration::days(LEAF_DAYS))
    }

    /// A certificate for a node that serves blobs to other nodes at `names`, and shows it to the
    /// nodes it fetches from (servers and clients both), valid for [`PEER_HOURS`]: the node gets
    /// a new one before, and a node that left keeps its own only that long.
    pub fn issue_peer(&self, names: &[String]) -> Result<Identity, TlsError> {
        let usages = [ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_for(names, &usages, time::Duration::hours(PEER_HOURS))
    }

    fn issue_for(
        &self,
        names: &[String],
        usages: &[ExtendedKeyUsagePurpose],
        valid: time::Duration,
    ) -> Result<Identity, TlsError> {
        let key = KeyPair::generate().map_err(generate)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("vmgrid"));
        p.distinguished_name = dn;
        p.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = usages.to_vec();
        let now = time_now();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + valid;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(generate)?;
        Ok(Identity { cert_pem: format!("{}{}", cert.pem(), self.cert_pem), key_pem: key.serialize_pem() })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn san(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name.to_string().try_into().map_err(|e: rcgen::Error| TlsError::Generate(format!("`{name}`: {e}")))?;
    Ok(SanType::DnsName(dns))
}

/// The certificates in `pem` (at least one), as rustls takes them.
pub fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { what: what.into(), why: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what: what.into(), why: "no certificate in it".into() });
    }
    Ok(certs)
}

/// A short fingerprint of a PEM certificate (blake3 of its first certificate), for people to
/// compare.
pub fn fingerprint(pem: &str) -> Result<String, TlsError> {
    let der = certs(pem, "the certificate")?.remove(0);
    Ok(blake3::hash(&der).to_hex()[..16].to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration of a server presenting `identity`.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(&identity.cert_pem, "the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "the server key".into(), why: e.to_string() })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The rustls configuration of a node serving blobs to other nodes: it presents `identity`, and
/// takes only clients with a certificate from the CA `ca_pem` (the pool's nodes).
pub fn peer_server_config(identity: &Identity, ca_pem: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(&identity.cert_pem, "the node's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem { what: "the node's key".into(), why: e.to_string() })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "the pool's CA")? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The crypto provider clients use (for ureq's `unversioned_rustls_crypto_provider`).
pub fn client_provider() -> Arc<rustls::crypto::CryptoProvider> {
    provider()
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS connections accepted on a listener: each handshake runs on its own task, so a slow or
/// hostile client delays nobody else; failed handshakes are logged and dropped.
pub struct Incoming {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl Incoming {
    /// Starts accepting on `listener` (call inside a tokio runtime).
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Incoming> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                // Once the server drops its end, the listening socket closes with this task (a
                // standby coordinator listens again on the same address when it becomes active).
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Incoming { rx, local })
    }

    /// The next connection whose handshake completed.
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.rx.recv().await
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Whether an address is this host's loopback, where plain HTTP may be allowed.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn a_loaded_ca_issues_certificates_that_chain_to_it() {
        let ca = Ca::generate().unwrap();
        let again = Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        let id = again.issue(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let chain = certs(&id.cert_pem, "chain").unwrap();
        assert_eq!(chain.len(), 2, "leaf, then the CA");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certs(ca.cert_pem(), "ca").unwrap().remove(0)).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).unwrap();
        let other = Ca::generate().unwrap();
        let mut wrong = rustls::RootCertStore::empty();
        wrong.add(certs(other.cert_pem(), "ca").unwrap().remove(0)).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(wrong), provider()).build().unwrap();
        assert!(verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).is_err());
        assert!(server_config(&id).is_ok());
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        assert!(certs("hello", "the CA").unwrap_err().to_string().contains("the CA"));
        assert!(Ca::load("x", "y").is_err());
        assert_eq!(fingerprint(Ca::generate().unwrap().cert_pem()).unwrap().len(), 16);
    }
}
