//! A typed, blocking client of the pool's HTTP API: one method per call, one error type that
//! says whether the pool refused, was unreachable, or answered something unexpected.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

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

#[derive(Clone)]
pub struct Client {
    base: String,
    auth: String,
    agent: ureq::Agent,
}

const JSON_LIMIT: u64 = 1 << 30;

impl Client {
    pub fn new(pool: &str, token: &str) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            // Long polls wait at most a minute; a pool that accepts and never answers is dead.
            .timeout_recv_response(Some(Duration::from_secs(90)))
            .build()
            .into();
        Client { base: pool.trim_end_matches('/').to_string(), auth: format!("Bearer {}", token.trim()), agent }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: ureq::Error) -> ClientError {
        ClientError::Unreachable { url: self.base.clone(), message: e.to_string() }
    }

    fn check(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<ureq::http::Response<ureq::Body>> {
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&text).map(|e| e.error).unwrap_or(text);
        Err(ClientError::Refused { status, message })
    }

    fn json<T: DeserializeOwned>(&self, resp: ureq::http::Response<ureq::Body>) -> Result<T> {
        let mut resp = self.check(resp)?;
        resp.body_mut().with_config().limit(JSON_LIMIT).read_json().map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        self.json(resp)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.json(resp)
    }

    pub fn submit(&self, req: &SubmitRequest) -> Result<SubmitResponse> {
        self.post("/v1/jobs", req)
    }

    pub fn jobs(&self) -> Result<Vec<JobView>> {
        self.get("/v1/jobs")
    }

    pub fn job(&self, id: u64) -> Result<JobResult> {
        self.get(&format!("/v1/jobs/{id}"))
    }

    pub fn wait(&self, id: u64, timeout: Duration) -> Result<JobView> {
        self.get(&format!("/v1/jobs/{id}/wait?timeout_ms={}", timeout.as_millis()))
    }

    pub fn action(&self, action: JobAction, ids: &[u64]) -> Result<ActionResponse> {
        self.post("/v1/jobs/actions", &ActionRequest { action, ids: ids.to_vec() })
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

    pub fn deregister(&self) -> Result<()> {
        let resp = self
            .agent
            .post(format!("{}/v1/nodes/deregister", self.base))
            .header("Authorization", &self.auth)
            .send_empty()
            .map_err(|e| self.unreachable(e))?;
        self.check(resp).map(|_| ())
    }

    pub fn add_token(&self, role: Role, owner: &str) -> Result<String> {
        let r: TokenResponse = self.post("/v1/tokens", &TokenRequest { role, owner: owner.into() })?;
        Ok(r.token)
    }

    pub fn metrics(&self) -> Result<String> {
        let resp = self
            .agent
            .get(format!("{}/metrics", self.base))
            .header("Authorization", &self.auth)
            .call()
            .map_err(|e| self.unreachable(e))?;
        let mut resp = self.check(resp)?;
        resp.body_mut().read_to_string().map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn has_blob(&self, hash: &str) -> Result<bool> {
        let resp = self
            .agent
            .head(format!("{}/v1/blobs/{hash}", self.base))
            .header("Authorization", &self.auth)
            .call()
            .map_err(|e| self.unreachable(e))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => self.check(resp).map(|_| false),
        }
    }

    /// Uploads a file as a blob unless the pool has it already; returns its reference.
    pub fn upload_file(&self, path: &Path, name: &str) -> Result<FileRef> {
        let (blob, size) = hash_file(path)?;
        if !self.has_blob(&blob)? {
            self.put_blob(&blob, std::fs::File::open(path)?)?;
        }
        Ok(FileRef { path: name.to_string(), blob, size })
    }

    /// Uploads bytes as a blob unless the pool has them already.
    pub fn upload_bytes(&self, bytes: &[u8], name: &str) -> Result<FileRef> {
        let blob = blake3::hash(bytes).to_hex().to_string();
        if !self.has_blob(&blob)? {
            self.put_blob(&blob, bytes)?;
        }
        Ok(FileRef { path: name.to_string(), blob, size: bytes.len() as u64 })
    }

    fn put_blob(&self, blob: &str, body: impl ureq::AsSendBody) -> Result<()> {
        let resp = self
            .agent
            .put(format!("{}/v1/blobs/{blob}", self.base))
            .header("Authorization", &self.auth)
            .send(body)
            .map_err(|e| self.unreachable(e))?;
        self.check(resp).map(|_| ())
    }

    /// Downloads a blob to `dest`, checking its hash; the file appears only when complete.
    pub fn download(&self, hash: &str, dest: &Path) -> Result<u64> {
        let resp = self
            .agent
            .get(format!("{}/v1/blobs/{hash}", self.base))
            .header("Authorization", &self.auth)
            .call()
            .map_err(|e| self.unreachable(e))?;
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
