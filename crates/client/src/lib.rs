//! A typed, blocking client of the pool's HTTP API: one method per call, one error type that
//! says whether the pool refused, was unreachable, or answered something unexpected.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

pub mod chunked;
mod failover;
mod overlay;

use failover::Coordinators;
pub use failover::FAILOVER_WINDOW;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmgrid_proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The pool answered with an error status and a sentence.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    /// The pool could not be reached.
    #[error("cannot reach the pool at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("unexpected reply from the pool: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

type Response = ureq::http::Response<ureq::Body>;

#[derive(Clone)]
pub struct Client {
    /// The pool's coordinators (one, or an active one and its standbys), shared by the clients
    /// made from this one so that they all go on to the one that answers.
    pool: std::sync::Arc<Coordinators>,
    auth: String,
    agent: ureq::Agent,
    trust: Trust,
}

const JSON_LIMIT: u64 = 1 << 30;

/// Which certificates a client accepts from the servers it talks to.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// The pool's CA (PEM): only certificates it signed. `None`: the public web PKI's roots, for
    /// a pool serving a certificate from a public CA.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ca_pem {
            Some(pem) => write!(f, "Trust(pool CA {})", vmgrid_tls::fingerprint(pem).unwrap_or_else(|_| "?".into())),
            None => f.write_str("Trust(web PKI)"),
        }
    }
}

impl Trust {
    pub fn pool_ca(ca_pem: &str) -> Result<Trust> {
        vmgrid_tls::certs(ca_pem, "the pool's CA certificate").map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Trust { ca_pem: Some(ca_pem.to_string()) })
    }

    fn tls_config(&self) -> ureq::tls::TlsConfig {
        let mut b = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(vmgrid_tls::client_provider());
        if let Some(pem) = &self.ca_pem {
            let roots: Vec<ureq::tls::Certificate<'static>> = vmgrid_tls::certs(pem, "the pool's CA")
                .unwrap_or_default()
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c).to_owned())
                .collect();
            b = b.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)));
        }
        b.build()
    }

    /// An HTTP agent that checks servers against this trust, with vmgrid's timeouts: a connect
    /// gives up after 5 s, and an answer after `recv` (long polls wait at most a minute).
    pub fn agent(&self, recv: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(recv))
            .tls_config(self.tls_config())
            .build()
            .into()
    }
}

/// A transport error in words a person can act on: a certificate the client does not trust says
/// so, and what to check.
pub fn describe(url: &str, e: &ureq::Error) -> String {
    let text = e.to_string();
    let tls = ["UnknownIssuer", "certificate", "NotValidForName", "BadSignature", "invalid peer"];
    if tls.iter().any(|t| text.contains(t)) {
        return format!(
            "{text}: the server's TLS certificate is not one this client trusts; check that `ca` (client.toml), --ca-file or the node's ca.pem is this pool's CA, and that {url} is an address the certificate names"
        );
    }
    text
}

impl Client {
    /// A client of the pool at `pool` (https with the public web PKI, or plain http): one URL, or
    /// several coordinators' comma-separated (see [`FAILOVER_WINDOW`]).
    pub fn new(pool: &str, token: &str) -> Client {
        Client::with_trust(pool, token, Trust::default())
    }

    /// A client that trusts what `trust` says.
    pub fn with_trust(pool: &str, token: &str, trust: Trust) -> Client {
        // Long polls wait at most a minute; a pool that accepts and never answers is dead.
        let agent = trust.agent(Duration::from_secs(90));
        let pool = std::sync::Arc::new(Coordinators::parse(pool));
        Client { pool, auth: format!("Bearer {}", token.trim()), agent, trust }
    }

    /// The same pool and trust with another token (a node's credential after it registers).
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            pool: self.pool.clone(),
            auth: format!("Bearer {}", token.trim()),
            agent: self.agent.clone(),
            trust: self.trust.clone(),
        }
    }

    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The URL of the coordinator that answered last.
    pub fn url(&self) -> &str {
        self.pool.current().1
    }

    /// Every coordinator's URL, comma-separated, as given.
    pub fn urls(&self) -> String {
        self.pool.spec()
    }

    /// Makes a call with `call(base URL)`. With several coordinators, a standby's answer or an
    /// unreachable coordinator sends it to the next one, for up to [`FAILOVER_WINDOW`]; a call
    /// that is not `repeatable` moves on only if it never reached a server.
    fn exchange(
        &self,
        repeatable: bool,
        call: impl Fn(&str) -> std::result::Result<Response, ureq::Error>,
    ) -> Result<Response> {
        let n = self.pool.len();
        let deadline = std::time::Instant::now() + FAILOVER_WINDOW;
        let mut tries = 0usize;
        loop {
            let (i, base) = self.pool.current();
            let outcome = call(base);
            let move_on = n > 1
                && match &outcome {
                    Ok(resp) => failover::is_standby(resp),
                    Err(e) => repeatable || failover::never_sent(e),
                };
            if !move_on || std::time::Instant::now() >= deadline {
                return outcome
                    .map_err(|e| ClientError::Unreachable { url: base.to_string(), message: describe(base, &e) });
            }
            self.pool.next_after(i);
            tries += 1;
            if tries.is_multiple_of(n) {
                std::thread::sleep(failover::ROUND_PAUSE);
            }
        }
    }

    fn call_get(&self, path: &str) -> Result<Response> {
        self.exchange(true, |base| self.agent.get(format!("{base}{path}")).header("Authorization", &self.auth).call())
    }

    fn check(&self, mut resp: Response) -> Result<Response> {
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&text).map(|e| e.error).unwrap_or(text);
        Err(ClientError::Refused { status, message })
    }

    fn json<T: DeserializeOwned>(&self, resp: Response) -> Result<T> {
        let mut resp = self.check(resp)?;
        resp.body_mut().with_config().limit(JSON_LIMIT).read_json().map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.exchange(false, |base| {
            self.agent.post(format!("{base}{path}")).header("Authorization", &self.auth).send_json(body)
        })?;
        self.json(resp)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.call_get(path)?;
        self.json(resp)
    }

    pub fn submit(&self, req: &SubmitRequest) -> Result<SubmitResponse> {
        self.post("/v1/jobs", req)
    }

    /// Every job the token may see, page by page.
    pub fn jobs(&self) -> Result<Vec<JobView>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.jobs_page(after, MAX_PAGE, None)?;
            all.extend(page.jobs);
            match page.next_after {
                Some(n) => after = n,
                None => return Ok(all),
            }
        }
    }

    /// One page of jobs after id `after`, in `state` if given.
    pub fn jobs_page(&self, after: u64, limit: usize, state: Option<JobState>) -> Result<JobPage> {
        let state = state.map(|s| format!("&state={}", s.as_str())).unwrap_or_default();
        self.jobs_query(&format!("after={after}&limit={limit}{state}"))
    }

    /// One page of jobs for a query string of `GET /v1/jobs` (`after`, `limit`, `state`, `owner`,
    /// `name`, `order`), as the dashboard asks for it.
    pub fn jobs_query(&self, query: &str) -> Result<JobPage> {
        self.get(&format!("/v1/jobs?{query}"))
    }

    pub fn job(&self, id: u64) -> Result<JobResult> {
        self.get(&format!("/v1/jobs/{id}"))
    }

    pub fn wait(&self, id: u64, timeout: Duration) -> Result<JobView> {
        self.get(&format!("/v1/jobs/{id}/wait?timeout_ms={}", timeout.as_millis()))
    }

    /// Acts on `ids`, [`MAX_ACTION_IDS`] at a time.
    pub fn action(&self, action: JobAction, ids: &[u64]) -> Result<ActionResponse> {
        let mut all = ActionResponse { changed: Vec::new(), refused: Vec::new() };
        for ids in ids.chunks(MAX_ACTION_IDS) {
            let resp: ActionResponse = self.post("/v1/jobs/actions", &ActionRequest { action, ids: ids.to_vec() })?;
            all.changed.extend(resp.changed);
            all.refused.extend(resp.refused);
        }
        Ok(all)
    }

    pub fn submit_dag(&self, req: &DagSubmitRequest) -> Result<DagView> {
        self.post("/v1/dags", req)
    }

    pub fn dags(&self) -> Result<Vec<DagSummary>> {
        self.get("/v1/dags")
    }

    pub fn dag(&self, id: u64) -> Result<DagView> {
        self.get(&format!("/v1/dags/{id}"))
    }

    pub fn dag_rm(&self, id: u64) -> Result<DagView> {
        self.post(&format!("/v1/dags/{id}/rm"), &())
    }

    pub fn nodes(&self) -> Result<Vec<NodeView>> {
        self.get("/v1/nodes")
    }

    pub fn register(&self, ad: &NodeAd, previous_credential: Option<String>) -> Result<RegisterResponse> {
        self.post("/v1/nodes/register", &RegisterRequest { ad: ad.clone(), previous_credential })
    }

    pub fn lease(&self, req: &LeaseRequest) -> Result<LeaseResponse> {
        self.post("/v1/nodes/lease", req)
    }

    pub fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse> {
        self.post("/v1/nodes/heartbeat", req)
    }

    pub fn report(&self, req: &ReportRequest) -> Result<ReportResponse> {
        self.post("/v1/nodes/report", req)
    }

    /// Records a checkpoint of a job this node runs (every part uploaded first).
    pub fn checkpoint(&self, req: &CheckpointRequest) -> Result<()> {
        let resp = self.exchange(false, |base| {
            self.agent.post(format!("{base}/v1/nodes/checkpoint")).header("Authorization", &self.auth).send_json(req)
        })?;
        self.check(resp).map(|_| ())
    }

    /// Bans node `node` from the pool, or lifts its ban (admin only).
    pub fn ban(&self, node: &str, banned: bool) -> Result<()> {
        let req = BanRequest { node: node.to_string(), banned };
        let resp = self.exchange(true, |base| {
            self.agent.post(format!("{base}/v1/nodes/ban")).header("Authorization", &self.auth).send_json(&req)
        })?;
        self.check(resp).map(|_| ())
    }

    pub fn deregister(&self) -> Result<()> {
        let resp = self.exchange(false, |base| {
            self.agent.post(format!("{base}/v1/nodes/deregister")).header("Authorization", &self.auth).send_empty()
        })?;
        self.check(resp).map(|_| ())
    }

    pub fn add_token(&self, role: Role, owner: &str, ttl_s: Option<u64>) -> Result<TokenResponse> {
        self.post("/v1/tokens", &TokenRequest { role, owner: owner.into(), ttl_s })
    }

    /// Each user's fair share: every user for an admin, the caller alone for a user.
    pub fn users(&self) -> Result<Vec<UserView>> {
        self.get("/v1/users")
    }

    /// Sets a user's priority factor and quota (admin only).
    pub fn set_user(&self, req: &UserSettingsRequest) -> Result<UserView> {
        self.post("/v1/users/settings", req)
    }

    pub fn tokens(&self) -> Result<Vec<TokenView>> {
        self.get("/v1/tokens")
    }

    pub fn revoke_token(&self, id: &str) -> Result<()> {
        let resp = self.exchange(false, |base| {
            self.agent
                .post(format!("{base}/v1/tokens/revoke"))
                .header("Authorization", &self.auth)
                .send_json(RevokeRequest { id: id.into() })
        })?;
        self.check(resp).map(|_| ())
    }

    /// Opens a `vmgrid ssi` console listening on `port`: its credential, URL and certificate.
    pub fn open_console(&self, port: u16) -> Result<ConsoleResponse> {
        self.post("/v1/consoles", &ConsoleRequest { port })
    }

    pub fn metrics(&self) -> Result<String> {
        let resp = self.call_get("/metrics")?;
        let mut resp = self.check(resp)?;
        resp.body_mut().read_to_string().map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Whether the pool has a blob, asking too whether an upload of `size` bytes would be taken:
    /// a refusal (too big, over quota, the pool's disk full) comes back before a byte is sent.
    fn needs_upload(&self, hash: &str, size: u64) -> Result<bool> {
        let resp = self.exchange(true, |base| {
            self.agent.head(format!("{base}/v1/blobs/{hash}?size={size}")).header("Authorization", &self.auth).call()
        })?;
        match resp.status().as_u16() {
            200 => Ok(false),
            404 => Ok(true),
            status => {
                let message = resp.headers().get(vmgrid_proto::ERROR_HEADER).and_then(|v| v.to_str().ok());
                let message = message.map_or_else(|| format!("the pool answered {status}"), str::to_string);
                Err(ClientError::Refused { status, message })
            }
        }
    }

    /// Uploads a file as a blob unless the pool has it already; returns its reference.
    pub fn upload_file(&self, path: &Path, name: &str) -> Result<FileRef> {
        let (blob, size) = hash_file(path)?;
        self.upload(&blob, size, || Ok(std::fs::File::open(path)?))?;
        Ok(FileRef { path: name.to_string(), blob, size, inline: None })
    }

    /// Uploads bytes as a blob unless the pool has them already.
    pub fn upload_bytes(&self, bytes: &[u8], name: &str) -> Result<FileRef> {
        let blob = blake3::hash(bytes).to_hex().to_string();
        self.upload(&blob, bytes.len() as u64, || Ok(bytes))?;
        Ok(FileRef { path: name.to_string(), blob, size: bytes.len() as u64, inline: None })
    }

    /// Uploads a blob unless the pool has it. A transport error mid-body is retried after asking
    /// again: the pool answers early and closes the connection when another client stored the same
    /// blob between our question and our upload (the client then sees a broken pipe), and a
    /// content-addressed upload may simply be sent again.
    fn upload<B: ureq::AsSendBody>(&self, blob: &str, size: u64, body: impl Fn() -> Result<B>) -> Result<()> {
        const TRIES: usize = 3;
        let mut attempt = 1;
        loop {
            if !self.needs_upload(blob, size)? {
                return Ok(());
            }
            match self.put_blob(blob, body()?) {
                Err(ClientError::Unreachable { .. }) if attempt < TRIES => attempt += 1,
                other => return other,
            }
        }
    }

    /// One try, at the coordinator that answered last (a body read from a file is not sent twice;
    /// a blob is content-addressed, so the caller may simply upload again).
    fn put_blob(&self, blob: &str, body: impl ureq::AsSendBody) -> Result<()> {
        let (_, base) = self.pool.current();
        let resp = self
            .agent
            .put(format!("{base}/v1/blobs/{blob}"))
            .header("Authorization", &self.auth)
            .send(body)
            .map_err(|e| ClientError::Unreachable { url: base.to_string(), message: describe(base, &e) })?;
        self.check(resp).map(|_| ())
    }

    /// Writes a result file to `dest`: its inline text, or its blob downloaded.
    pub fn fetch_file(&self, f: &FileRef, dest: &Path) -> Result<u64> {
        match &f.inline {
            Some(text) => {
                std::fs::write(dest, text)?;
                Ok(text.len() as u64)
            }
            None => self.download(&f.blob, dest),
        }
    }

    /// A blob's pieces and their hashes (node credentials only).
    pub fn pieces(&self, hash: &str) -> Result<Pieces> {
        self.get(&format!("/v1/blobs/{hash}/pieces"))
    }

    /// The nodes that share a blob (node credentials only).
    pub fn peers(&self, hash: &str) -> Result<Vec<Peer>> {
        self.get::<PeersResponse>(&format!("/v1/blobs/{hash}/peers")).map(|r| r.peers)
    }

    /// `len` bytes of a blob from byte `first` (at most 16 MiB).
    pub fn blob_range(&self, hash: &str, first: u64, len: u64) -> Result<Vec<u8>> {
        let range = format!("bytes={first}-{}", first + len.max(1) - 1);
        let resp = self.exchange(true, |base| {
            self.agent
                .get(format!("{base}/v1/blobs/{hash}"))
                .header("Authorization", &self.auth)
                .header("Range", &range)
                .call()
        })?;
        let mut resp = self.check(resp)?;
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_vec()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if bytes.len() as u64 != len {
            return Err(ClientError::Protocol(format!("asked for {len} bytes of blob {hash}, got {}", bytes.len())));
        }
        Ok(bytes)
    }

    /// Downloads a blob to `dest`, checking its hash; the file appears only when complete.
    pub fn download(&self, hash: &str, dest: &Path) -> Result<u64> {
        let resp = self.call_get(&format!("/v1/blobs/{hash}"))?;
        let resp = self.check(resp)?;
        let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        let mut reader = resp.into_body().into_reader();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut tmp, &buf[..n])?;
            total += n as u64;
        }
        let got = hasher.finalize().to_hex().to_string();
        if got != hash {
            return Err(ClientError::Protocol(format!("blob {hash} arrived with hash {got}")));
        }
        tmp.persist(dest).map_err(|e| ClientError::Io(e.error))?;
        Ok(total)
    }
}

/// The blake3 hash (hex) and size of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}
