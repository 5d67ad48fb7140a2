//! The pool's wire types, shared by the CLI, the coordinator and the node agents. Plain serde
//! structs: no IO, no HTTP client or server, no SQLite.
//!
//! Files travel as content addresses: a [`BlobRef`] is the blake3 hash (hex) of the bytes, which
//! are uploaded once to `/v1/blobs/{hash}` and cached by hash on nodes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod dag;
mod jobs;
pub use dag::*;
pub use jobs::*;
pub use vmgrid_job::check::{is_confined_path, matches_output};
pub use vmgrid_job::{FailureKind, Network, VmType};

mod node;
pub use node::*;
pub mod overlay;
mod peers;
pub use peers::*;
mod users;
pub use users::{
    MAX_TOKEN_TTL_S, RevokeRequest, Role, TokenRequest, TokenResponse, TokenView, UserSettingsRequest, UserView,
};

/// The blake3 hash of a blob, as 64 lowercase hex digits.
pub type BlobRef = String;

pub fn is_blob_ref(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A job as submitted to a pool: the job file with its files replaced by blob references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub vm_type: VmType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<FileRef>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    #[serde(default)]
    pub network: Network,
    pub cpus: u32,
    pub memory_mb: u64,
    pub timeout_s: u64,
    pub disk_mb: u64,
    /// Inputs: their destination in the job directory and their content.
    #[serde(default)]
    pub inputs: Vec<FileRef>,
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<String>,
    #[serde(default)]
    pub max_retries: u32,
    /// Orders this user's idle jobs: higher first, then oldest first (fair share orders users).
    #[serde(default, skip_serializing_if = "users::is_zero")]
    pub priority: i32,
    /// QEMU jobs: seconds between checkpoints of the running VM; a job whose node is lost (or
    /// that is vacated) resumes from its latest complete checkpoint on another node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_s: Option<u64>,
    /// Run on this many distinct nodes, one after another, and accept the result `quorum` of
    /// them agree on (exit code, and the hashes of stdout and of each output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How many replicas must agree (a majority of them; the smallest by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// wasm jobs: the same run on every node (canonical NaNs, no threads, random numbers seeded
    /// from the job's id, clocks refused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deterministic: bool,
    /// Set when the job is a process of a single-system image (`vmgrid ssi`): the node runs it
    /// against its home instead of a job directory of its own, and `args` is the whole argv
    /// (argv[0] is the module's path in the SSI filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssi: Option<SsiSpec>,
    /// `network = "grid"` jobs: the submit's instances 0..group-1 are one job group (`vmgrid
    /// submit --count N --group`), whose VMs reach each other on the overlay; it equals the
    /// submit's count. Without it, each grid job is a group of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

/// Where an SSI process's home (the console that owns its files and process table) is, and the
/// capability that lets this one process talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SsiSpec {
    /// The home's URL, which nodes connect to (outward, as they connect to the pool).
    pub home: String,
    /// A secret for this process alone; the home checks it on every call.
    pub token: String,
    /// The global PID.
    pub pid: u64,
}

/// A file by name and content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    /// For inputs, the relative destination in the job directory; for images, the file name.
    pub path: String,
    pub blob: BlobRef,
    pub size: u64,
    /// A job's short stdout or stderr, kept in its result instead of as a blob (no upload, no
    /// file): UTF-8 text of at most [`MAX_INLINE_BYTES`] whose blake3 is `blob`. Never in a spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
}

/// The longest stdout or stderr a node may send inline in its report.
pub const MAX_INLINE_BYTES: usize = 8192;

impl FileRef {
    /// `text` kept inline under the name `path`, with its hash and size.
    pub fn inline_text(path: &str, text: &str) -> FileRef {
        let blob = blake3::hash(text.as_bytes()).to_hex().to_string();
        FileRef { path: path.to_string(), blob, size: text.len() as u64, inline: Some(text.to_string()) }
    }

    /// Why an inline file is not what it says (too long, another hash or size), if it is not.
    pub fn check_inline(&self) -> Result<(), String> {
        let Some(text) = &self.inline else { return Ok(()) };
        if text.len() > MAX_INLINE_BYTES {
            return Err(format!("`{}` is {} bytes inline; at most {MAX_INLINE_BYTES} may be", self.path, text.len()));
        }
        if text.len() as u64 != self.size || blake3::hash(text.as_bytes()).to_hex().as_str() != self.blob {
            return Err(format!("`{}`'s inline text does not match its size and hash", self.path));
        }
        Ok(())
    }
}

/// A job file's files as blobs in the pool: what [`JobSpec::from_job`] puts in the spec.
#[derive(Debug, Clone, Default)]
pub struct SpecFiles {
    pub image: Option<FileRef>,
    pub kernel: Option<FileRef>,
    pub initrd: Option<FileRef>,
    /// Each input file with its destination in the job directory (a directory input is one
    /// entry per file in it).
    pub inputs: Vec<FileRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub spec: JobSpec,
    /// Instances 0..count-1; `{index}` in args and env becomes the instance number.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

pub(crate) fn unbounded() -> u32 {
    u32::MAX
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Idle,
    Running,
    Completed,
    Held,
    Removed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Idle => "idle",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Held => "held",
            JobState::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "idle" => JobState::Idle,
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "held" => JobState::Held,
            "removed" => JobState::Removed,
            _ => return None,
        })
    }

    /// Completed and removed jobs never change again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Removed)
    }
}

/// What a node says about itself; CEL sees it as `node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeAd {
    pub name: String,
    pub arch: String,
    pub os: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub vm_types: Vec<VmType>,
    pub accelerators: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub appliance: bool,
    /// The version of the QEMU that runs its QEMU jobs (`10.0.2`), if it runs any: a checkpoint
    /// resumes only under the same QEMU or a newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<String>,
    /// Where it serves the pieces of the blobs it holds to other nodes (`ip:port`), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Its part of the pool's overlay (`network = "grid"`): its WireGuard key, and whether it is
    /// on the overlay itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<overlay::NodeOverlay>,
}

/// A QEMU version (`10.0.2`) as numbers, to compare; `None` if it is not one.
pub fn qemu_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next().unwrap_or(Some(0))?);
    parts.next().is_none().then_some(version)
}

/// `s` is 1 to `max` letters, digits, `-`, `_` or `.`.
fn word(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The rule for a node's name.
pub fn check_node_name(name: &str) -> Result<(), String> {
    match word(name, 128) {
        true => Ok(()),
        false => Err("a node name is 1 to 128 letters, digits, `-`, `_` or `.`".into()),
    }
}

impl NodeAd {
    /// Bounds on what a node may say of itself: the coordinator evaluates every job's expressions
    /// over ads, and shows them to users.
    pub fn check(&self) -> Result<(), String> {
        check_node_name(&self.name)?;
        if self.cpus == 0 || self.memory_mb == 0 {
            return Err("a node needs at least one cpu and some memory".into());
        }
        if !word(&self.arch, 32) || !word(&self.os, 32) {
            return Err("arch and os are 1 to 32 letters, digits, `-`, `_` or `.`".into());
        }
        if self.vm_types.len() > 8 || self.accelerators.len() > 8 || !self.accelerators.iter().all(|a| word(a, 32)) {
            return Err("a node lists at most 8 vm types and 8 accelerators (names of up to 32 characters)".into());
        }
        if self.qemu.as_deref().is_some_and(|v| v.len() > 32 || qemu_version(v).is_none()) {
            return Err("qemu is a version of up to 32 characters, such as 10.0.2".into());
        }
        if self.peer.as_deref().is_some_and(|p| p.parse::<std::net::SocketAddr>().is_err()) {
            return Err("peer is the address a node serves blobs on, as ip:port".into());
        }
        if let Some(o) = &self.overlay {
            o.check()?;
        }
        if self.labels.len() > 64 {
            return Err(format!("a node has at most 64 labels, not {}", self.labels.len()));
        }
        for (k, v) in &self.labels {
            if !word(k, 64) || v.len() > 256 || v.chars().any(char::is_control) {
                return Err(format!(
                    "label `{k}`: keys are 1 to 64 letters, digits, `-`, `_` or `.`; values up to 256 printable characters"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Ready,
    Draining,
    Lost,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Lost => "lost",
        }
    }
}

/// One node as `status` shows it: its ad, flattened, and the pool's view of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    #[serde(flatten)]
    pub ad: NodeAd,
    pub state: NodeState,
    /// The jobs it holds under a lease: running, or queued ahead of its cpus (lease-ahead).
    pub running_jobs: u32,
    pub free_cpus: u32,
    pub free_memory_mb: u64,
    pub last_seen_ms: u64,
    /// The node's blob cache, as its last heartbeat said; none before one did.
    #[serde(default)]
    pub cache: Option<CacheStats>,
    /// The share of its results that agreed with what its jobs' replicas agreed on, counting one
    /// agreement and one disagreement before any (0.5 for a node never checked); `node.reputation`
    /// in requirements.
    #[serde(default = "half")]
    pub reputation: f64,
    /// Its results that agreed, and that did not, with what its jobs' replicas agreed on.
    #[serde(default)]
    pub agreements: u64,
    #[serde(default)]
    pub disagreements: u64,
}

fn half() -> f64 {
    0.5
}

/// `POST /v1/nodes/ban` (admin): bans a node from the pool, or lifts its ban.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BanRequest {
    pub node: String,
    /// false lifts the ban.
    #[serde(default = "yes")]
    pub banned: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub ad: NodeAd,
    /// The credential of this node's previous registration, if it had one: it proves that a
    /// restarting node is the same node, so it may replace a registration not yet declared lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_credential: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    /// The node's own credential for every later call; the pool token only registers.
    pub credential: String,
    pub lease_ttl_ms: u64,
    pub heartbeat_ms: u64,
    /// For a node whose ad has a `peer` address, in a pool with its own CA: its certificate to
    /// serve blobs to other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<PeerIdentity>,
}

/// A `vmgrid ssi` console asks to be the home of processes; the pool decides its URL (the
/// address it connected from, and the port it listens on) and issues its credential and TLS
/// certificate.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleRequest {
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsoleResponse {
    pub id: String,
    /// The console's own credential: it submits its processes with it.
    pub credential: String,
    /// The URL nodes reach the console at.
    pub home: String,
    /// The console's certificate chain and key (PEM), signed by the pool's CA, which nodes trust;
    /// absent on a plain-HTTP loopback pool.
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
}

/// The header that repeats an error reply's sentence (printable ASCII), for bodiless replies.
pub const ERROR_HEADER: &str = "x-vmgrid-error";
/// On a standby coordinator's `503`s: the active coordinator's URL (empty while not known).
pub const STANDBY_HEADER: &str = "x-vmgrid-standby";

/// Every error reply: a sentence for a person.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    pub error: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl JobSpec {
    /// The spec of instance `index`: `{index}` in args and env replaced.
    pub fn with_index(&self, index: u64) -> JobSpec {
        let mut spec = self.clone();
        let idx = index.to_string();
        for a in &mut spec.args {
            if a.contains("{index}") {
                *a = a.replace("{index}", &idx);
            }
        }
        for v in spec.env.values_mut() {
            if v.contains("{index}") {
                *v = v.replace("{index}", &idx);
            }
        }
        spec
    }

    /// Checks the spec with the rules every job obeys ([`vmgrid_job::check`]), then what only a
    /// spec has: its files are blob references with confined paths, and an SSI process's home.
    pub fn check(&self) -> Result<(), String> {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let inputs: Vec<&str> = self.inputs.iter().map(|f| f.path.as_str()).collect();
        let shape = vmgrid_job::check::Shape {
            name: &self.name,
            vm_type: self.vm_type,
            image: self.image.is_some(),
            args: &self.args,
            env: &self.env,
            kernel: self.kernel.is_some(),
            initrd: self.initrd.is_some(),
            append: self.append.as_deref(),
            network: (self.network != Network::None).then_some(self.network),
            cpus: self.cpus.into(),
            // An SSI process shares its node's cpus by time slicing, as a process on one machine
            // does, so it may ask for none; the matchmaker spreads such jobs over the least loaded.
            min_cpus: if self.ssi.is_some() { 0 } else { 1 },
            memory_mb: clamp(self.memory_mb),
            timeout_s: clamp(self.timeout_s),
            disk_mb: clamp(self.disk_mb),
            inputs,
            outputs: &self.outputs,
            requirements: self.requirements.as_deref(),
            rank: self.rank.as_deref(),
            max_retries: self.max_retries.into(),
            priority: self.priority.into(),
            checkpoint_s: self.checkpoint_s.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            replicas: self.replicas.map(i64::from),
            quorum: self.quorum.map(i64::from),
            deterministic: self.deterministic,
        };
        vmgrid_job::check::check(&shape).map_err(|inv| inv.message)?;
        if let Some(n) = self.group {
            vmgrid_job::check::grid::group(self.vm_type, self.network, n)?;
        }
        for f in self.image.iter().chain(&self.kernel).chain(&self.initrd) {
            if !is_blob_ref(&f.blob) {
                return Err(format!("`{}` is not a blob reference (64 hex digits of blake3)", f.blob));
            }
            if !is_confined_path(&f.path) {
                return Err(format!("file name `{}` must be relative, without `..`", f.path));
            }
        }
        if let Some(f) = self.inputs.iter().find(|f| !is_blob_ref(&f.blob)) {
            return Err(format!("`{}` is not a blob reference (64 hex digits of blake3)", f.blob));
        }
        if let Some(f) =
            self.image.iter().chain(&self.kernel).chain(&self.initrd).chain(&self.inputs).find(|f| f.inline.is_some())
        {
            return Err(format!(
                "`{}`: a job's files are blobs; only a result's stdout and stderr may be inline",
                f.path
            ));
        }
        if let Some(ssi) = &self.ssi {
            if self.replicas.is_some_and(|n| n > 1) {
                return Err("an SSI process runs once (it acts on its home), so it cannot have replicas".into());
            }
            if self.vm_type != VmType::Wasm {
                return Err("an SSI process must be a wasm job".into());
            }
            if !(ssi.home.starts_with("http://") || ssi.home.starts_with("https://")) || ssi.home.len() > 2048 {
                return Err(format!("the SSI home `{}` is not an http(s) URL", ssi.home));
            }
            if ssi.token.is_empty() || ssi.token.len() > 256 {
                return Err("the SSI process token must be 1 to 256 characters".into());
            }
        }
        Ok(())
    }

    /// The wire spec of a job file's job, given the pool's references for its files (as the
    /// client uploaded them): the one mapping from a job file to what a pool receives.
    pub fn from_job(job: &vmgrid_job::Job, files: SpecFiles) -> JobSpec {
        JobSpec {
            name: job.name.clone(),
            vm_type: job.vm.vm_type,
            image: files.image,
            args: job.vm.args.clone(),
            env: job.vm.env.clone(),
            kernel: files.kernel,
            initrd: files.initrd,
            append: job.vm.append.clone(),
            network: job.vm.network,
            cpus: job.resources.cpus,
            memory_mb: job.resources.memory_mb,
            timeout_s: job.resources.timeout_s,
            disk_mb: job.resources.disk_mb,
            inputs: files.inputs,
            outputs: job.files.outputs.clone(),
            requirements: job.policy.requirements.clone(),
            rank: job.policy.rank.clone(),
            max_retries: job.policy.max_retries,
            priority: job.policy.priority,
            checkpoint_s: job.policy.checkpoint_s,
            replicas: job.policy.replicas,
            quorum: job.policy.quorum,
            deterministic: job.policy.deterministic,
            ssi: None,
            group: None,
        }
    }

    /// Turns the spec back into a runnable job whose files live where `locate` says.
    pub fn to_job(
        &self,
        source: &std::path::Path,
        locate: impl Fn(&FileRef) -> std::path::PathBuf,
    ) -> Result<vmgrid_job::Job, String> {
        use vmgrid_job::*;
        let mut inputs = Vec::new();
        for i in &self.inputs {
            if !is_confined_path(&i.path) {
                return Err(format!("input path `{}` leaves the job directory", i.path));
            }
            inputs.push(Input { source: locate(i), dest: i.path.clone().into() });
        }
        Ok(Job {
            source: source.to_path_buf(),
            name: self.name.clone(),
            vm: Vm {
                vm_type: self.vm_type,
                image: self.image.as_ref().map(&locate),
                args: self.args.clone(),
                env: self.env.clone(),
                kernel: self.kernel.as_ref().map(&locate),
                initrd: self.initrd.as_ref().map(&locate),
                append: self.append.clone(),
                network: self.network,
            },
            resources: Resources {
                cpus: self.cpus,
                memory_mb: self.memory_mb,
                timeout_s: self.timeout_s,
                disk_mb: self.disk_mb,
            },
            files: Files { inputs, outputs: self.outputs.clone() },
            policy: Policy {
                requirements: self.requirements.clone(),
                rank: self.rank.clone(),
                max_retries: self.max_retries,
                priority: self.priority,
                checkpoint_s: self.checkpoint_s,
                replicas: self.replicas,
                quorum: self.quorum,
                deterministic: self.deterministic,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qemu_version_is_two_or_three_numbers() {
        assert_eq!(qemu_version("10.0.2"), Some((10, 0, 2)));
        assert_eq!(qemu_version("9.2"), Some((9, 2, 0)));
        assert!(qemu_version("10.0.2") > qemu_version("9.12.0"), "compared as numbers, not text");
        for bad in ["", "10", "10.0.2.1", "10.x", "-1.0", "10..2", "99999999999.0"] {
            assert_eq!(qemu_version(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn inline_text_must_match_its_hash_and_size_and_never_be_a_jobs_file() {
        let f = FileRef::inline_text("stdout", "hello\n");
        assert_eq!((f.size, f.check_inline()), (6, Ok(())));
        let mut wrong = f.clone();
        wrong.inline = Some("hullo\n".into());
        assert!(wrong.check_inline().unwrap_err().contains("does not match"));
        let long = FileRef::inline_text("stdout", &"x".repeat(MAX_INLINE_BYTES + 1));
        assert!(long.check_inline().unwrap_err().contains("at most 8192"));
        let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "j", "vm_type": "wasm", "image": f, "cpus": 1, "memory_mb": 16, "timeout_s": 1, "disk_mb": 1
        }))
        .unwrap();
        assert!(spec.check().unwrap_err().contains("only a result's stdout and stderr may be inline"));
        spec.image.as_mut().unwrap().inline = None;
        spec.check().unwrap();
    }

    #[test]
    fn blob_refs_are_64_lowercase_hex_digits() {
        assert!(is_blob_ref(&"ab".repeat(32)));
        assert!(!is_blob_ref(&"AB".repeat(32)));
        assert!(!is_blob_ref("abc"));
        assert!(!is_blob_ref(&"../".repeat(22)[..64]));
    }

    #[test]
    fn index_substitution_reaches_args_and_env() {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "s", "vm_type": "wasm", "args": ["x{index}", "y"], "env": {"I": "{index}"},
            "cpus": 1, "memory_mb": 16, "timeout_s": 1, "disk_mb": 1,
            "image": {"path": "a.wasm", "blob": "ab".repeat(32), "size": 1}
        }))
        .unwrap();
        let s = spec.with_index(7);
        assert_eq!(s.args, vec!["x7", "y"]);
        assert_eq!(s.env["I"], "7");
    }

    #[test]
    fn unknown_fields_are_refused_on_the_wire() {
        let r: Result<LeaseRequest, _> = serde_json::from_str(r#"{"max_jobs": 1, "wait_ms": 0, "evil": true}"#);
        assert!(r.is_err());
    }
}

/// The protocol between an SSI process's node and its home (`vmgrid ssi`). Errors are HTTP 422
/// with the WASI errno in [`ssi::ERRNO_HEADER`]; a refused process token is 401.
pub mod ssi {
    use serde::{Deserialize, Serialize};

    /// A WASI preview-1 errno, as the guest sees it and as the home sends it in [`ERRNO_HEADER`].
    pub type Errno = u16;

    /// The WASI preview-1 errno values (preview-1 numbering) that SSI calls return.
    pub mod errno {
        use super::Errno;
        pub const ACCES: Errno = 2;
        pub const AGAIN: Errno = 6;
        pub const BADF: Errno = 8;
        pub const CHILD: Errno = 12;
        pub const EXIST: Errno = 20;
        pub const FAULT: Errno = 21;
        pub const FBIG: Errno = 22;
        pub const ILSEQ: Errno = 25;
        pub const INTR: Errno = 27;
        pub const INVAL: Errno = 28;
        pub const IO: Errno = 29;
        pub const ISDIR: Errno = 31;
        pub const LOOP: Errno = 32;
        pub const MLINK: Errno = 34;
        pub const NAMETOOLONG: Errno = 37;
        pub const NOENT: Errno = 44;
        pub const NOEXEC: Errno = 45;
        pub const NOSPC: Errno = 51;
        pub const NOTDIR: Errno = 54;
        pub const NOTEMPTY: Errno = 55;
        pub const NOTSOCK: Errno = 57;
        pub const NOTSUP: Errno = 58;
        pub const PERM: Errno = 63;
        pub const ROFS: Errno = 69;
        pub const XDEV: Errno = 75;
        pub const NOTCAPABLE: Errno = 76;

        /// Text for an errno, for the console.
        pub fn describe(e: Errno) -> &'static str {
            match e {
                ACCES => "permission denied",
                AGAIN => "resource temporarily unavailable",
                BADF => "bad file descriptor",
                CHILD => "no such child process",
                EXIST => "file exists",
                FAULT => "bad address",
                FBIG => "file too large",
                ILSEQ => "illegal byte sequence",
                INTR => "interrupted",
                INVAL => "invalid argument",
                ISDIR => "is a directory",
                LOOP => "too many levels of symbolic links",
                MLINK => "too many links",
                NAMETOOLONG => "file name too long",
                NOENT => "no such file or directory",
                NOEXEC => "not a WASI preview-1 module",
                NOSPC => "no space left on device",
                NOTDIR => "not a directory",
                NOTEMPTY => "directory not empty",
                NOTSOCK => "not a socket",
                NOTSUP => "not supported",
                PERM => "operation not permitted",
                ROFS => "read-only file system",
                XDEV => "cross-device link",
                NOTCAPABLE => "capabilities insufficient",
                _ => "input/output error",
            }
        }
    }

    /// The status of a process that was killed, as a shell reports SIGKILL.
    pub const STATUS_KILLED: i32 = 137;
    /// The status of a process that did not exit on its own: a trap, a limit, a lost node.
    pub const STATUS_FAILED: i32 = 134;

    pub const ERRNO_HEADER: &str = "x-vmgrid-errno";
    /// What a fetched path names, on answers to a fetch: `file`, `dir`, `link` (the body is the
    /// link's target) or `none` (nothing there, but its directory exists).
    pub const KIND_HEADER: &str = "x-vmgrid-kind";
    /// The path a fetch resolved to (its links followed, `..` applied), [`encode_path`]d.
    pub const PATH_HEADER: &str = "x-vmgrid-path";

    /// An SSI path as a header value: bytes other than ASCII letters, digits and `/._-` as `%XX`.
    pub fn encode_path(path: &str) -> String {
        let mut out = String::with_capacity(path.len());
        for b in path.bytes() {
            if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// The inverse of [`encode_path`]; `None` for a value it cannot have made.
    pub fn decode_path(value: &str) -> Option<String> {
        let bytes = value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct SpawnRequest {
        pub argv: Vec<String>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct SpawnResponse {
        pub pid: u64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct WaitRequest {
        pub pid: i64,
        pub wait_ms: u64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct WaitResponse {
        /// The child's exit status; `None` if it is still running after `wait_ms`.
        pub status: Option<i32>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct StartedRequest {
        pub node: String,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct ExitRequest {
        pub status: i32,
        /// Why, when the process did not exit on its own.
        pub reason: Option<String>,
        /// Output bytes dropped because the home could not take them fast enough.
        pub dropped: u64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct SignalResponse {
        pub kill: bool,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DirEntry {
        pub name: String,
        pub dir: bool,
        /// A symbolic link's target (then `dir` is false): the entry is the link itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub link: Option<String>,
    }

    /// A path as a process names it: `path` (which may hold `..` and pass through links) relative
    /// to the directory `base`, an SSI path. The home resolves it beneath `base`, as a WASI
    /// runtime resolves a path beneath the descriptor it is relative to.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct At {
        #[serde(default)]
        pub base: String,
        pub path: String,
    }

    /// A change to the namespace. The last component of a path is never followed (a link there
    /// is what is removed, renamed or linked), as in POSIX.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "lowercase")]
    pub enum FsOpRequest {
        /// Creates an empty file; `EEXIST` if anything is there (`O_CREAT|O_EXCL`).
        Create {
            #[serde(flatten)]
            at: At,
        },
        Mkdir {
            #[serde(flatten)]
            at: At,
        },
        Rmdir {
            #[serde(flatten)]
            at: At,
        },
        Unlink {
            #[serde(flatten)]
            at: At,
        },
        Rename {
            #[serde(flatten)]
            at: At,
            to: At,
        },
        /// A symbolic link at `at` whose target is `target`.
        Symlink {
            #[serde(flatten)]
            at: At,
            target: String,
        },
        /// A hard link at `to` to what `at` names.
        Link {
            #[serde(flatten)]
            at: At,
            to: At,
        },
    }

    /// What a namespace change touched, resolved: the path it acted on (and the second one of a
    /// rename or a link).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct FsOpResponse {
        pub path: String,
        #[serde(default)]
        pub to: Option<String>,
    }
}
