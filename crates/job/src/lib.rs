//! The vmgrid job file: TOML in, a validated [`Job`] out.
//!
//! This crate reads the job file (and a workflow file, [`flow`], with the job files it names) and
//! nothing else: it does not check that images exist, it does not
//! touch the job directory and it starts no process. Its rules ([`check`]) are the one validator of
//! jobs: the coordinator applies them to submitted specs too. Every error in a job file names the
//! file, the line and the column.

pub mod check;
pub mod expr;
pub mod flow;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use flow::{Flow, FlowNode, load_flow, parse_flow};
pub use validate::parse_job;

/// A validated job, with every path resolved against the job file's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The job file this job was read from.
    pub source: PathBuf,
    pub name: String,
    pub vm: Vm,
    pub resources: Resources,
    pub files: Files,
    pub policy: Policy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmType {
    Wasm,
    Qemu,
    Jvm,
}

impl VmType {
    pub fn as_str(self) -> &'static str {
        match self {
            VmType::Wasm => "wasm",
            VmType::Qemu => "qemu",
            VmType::Jvm => "jvm",
        }
    }
}

impl std::str::FromStr for VmType {
    type Err = String;

    fn from_str(s: &str) -> Result<VmType, String> {
        match s {
            "wasm" => Ok(VmType::Wasm),
            "qemu" => Ok(VmType::Qemu),
            "jvm" => Ok(VmType::Jvm),
            other => Err(format!("unknown vm type `{other}`, expected one of `wasm`, `qemu`, `jvm`")),
        }
    }
}

impl fmt::Display for VmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    None,
    User,
    /// An address on the pool's overlay: the VM reaches the other VMs of its job group, wherever
    /// they run, and nothing else.
    Grid,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "none" => Ok(Network::None),
            "user" => Ok(Network::User),
            "grid" => Ok(Network::Grid),
            other => Err(format!(
                "unknown network `{other}`, expected `none` (no NIC), `user` (QEMU's NAT to the outside) or `grid` (the pool's overlay, reaching the VMs of the job's group)"
            )),
        }
    }
}

/// How a guest that ran can fail to finish: what a node reports and what a held job says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    TimeLimit,
    MemoryLimit,
    DiskLimit,
    /// A trap, a kernel panic, a guest that powered off without an exit status.
    GuestError,
    /// Stopped by its host (a revoked lease, a drain, a console that is gone).
    Cancelled,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::TimeLimit => "time limit exceeded",
            FailureKind::MemoryLimit => "memory limit exceeded",
            FailureKind::DiskLimit => "disk limit exceeded",
            FailureKind::GuestError => "guest failed",
            FailureKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub vm_type: VmType,
    /// wasm: the module; jvm: the jar; qemu: the disk image (optional with `kernel`).
    pub image: Option<PathBuf>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub network: Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mb: u64,
    pub timeout_s: u64,
    pub disk_mb: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cpus: 1, memory_mb: 256, timeout_s: 600, disk_mb: 1024 }
    }
}

/// One input: where it is on the submitting machine and where it goes in the job directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub source: PathBuf,
    /// A relative path with only normal components: it cannot leave the job directory.
    pub dest: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Files {
    pub inputs: Vec<Input>,
    /// Glob patterns relative to the job directory; none is absolute or contains `..`.
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub requirements: Option<String>,
    pub rank: Option<String>,
    pub max_retries: u32,
    /// Orders this user's jobs: higher first, then oldest first.
    pub priority: i32,
    /// QEMU jobs: seconds between checkpoints; a job whose node is lost resumes from its latest.
    pub checkpoint_s: Option<u64>,
    /// Run on this many distinct nodes and accept the result `quorum` of them agree on (exit
    /// code, and the hashes of stdout and of each output); `None` for one run.
    pub replicas: Option<u32>,
    /// How many replicas must agree: a majority, by default the smallest.
    pub quorum: Option<u32>,
    /// wasm jobs: the same run on every node (canonical NaNs, no threads, random numbers seeded
    /// from the job, clocks refused).
    pub deterministic: bool,
}

/// Upper bounds checked before anything runs.
pub mod limits {
    pub const MAX_CPUS: u32 = 256;
    pub const MAX_MEMORY_MB: u64 = 1 << 20;
    /// wasm32 linear memory cannot exceed 4 GiB.
    pub const MAX_WASM_MEMORY_MB: u64 = 4096;
    pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
    pub const MAX_DISK_MB: u64 = 1 << 20;
    pub const MAX_RETRIES: u32 = 100;
    /// The shortest interval between a QEMU job's checkpoints.
    pub const MIN_CHECKPOINT_S: u64 = 2;
    /// `[policy] replicas` is at most this.
    pub const MAX_REPLICAS: u32 = 7;
    /// `[policy] priority` is between -MAX_PRIORITY and MAX_PRIORITY.
    pub const MAX_PRIORITY: i64 = 1000;
    /// A user's priority factor (`vmgrid users set --factor`).
    pub const MIN_FACTOR: f64 = 0.01;
    pub const MAX_FACTOR: f64 = 1_000_000.0;
    /// A user's quota of running cpus (`vmgrid users set --max-cpus`).
    pub const MAX_QUOTA_CPUS: u64 = 1_000_000;
    /// Jobs (nodes) in one workflow, and instances of one node's sweep.
    pub const MAX_DAG_NODES: usize = 10_000;
    pub const MAX_DAG_COUNT: u64 = 100_000;
    /// Dependencies (`after` entries) of all the jobs of a workflow together.
    pub const MAX_DAG_EDGES: usize = 100_000;
    pub const MAX_ARGS: usize = 4096;
    /// The most VMs in one job group (`vmgrid submit --count N --group`).
    pub const MAX_GROUP: u32 = 256;
    pub const MAX_ENV: usize = 4096;
    /// Args and env together, in bytes (each with its separator), as an exec would count them.
    pub const MAX_ARGV_ENV_BYTES: usize = 1 << 20;
    /// A `requirements` or `rank` expression, in bytes.
    pub const MAX_EXPRESSION_LEN: usize = 4096;
    pub const MAX_NAME_LEN: usize = 128;
    /// The x86 kernel command line is at most 2048 bytes; vmgrid keeps room for its own options.
    pub const MAX_KERNEL_CMDLINE: usize = 1900;
    /// Linux passes at most 32 argv entries to init, one of which is init's own name.
    pub const MAX_KERNEL_INIT_ARGS: usize = 30;
    /// Linux passes at most 32 envp entries to init and sets `HOME` and `TERM` itself.
    pub const MAX_KERNEL_INIT_ENV: usize = 28;
}

/// A job file that cannot be used, with the place that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobFileError {
    #[error("{path}: cannot read the job file: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
}

impl JobFileError {
    pub fn path(&self) -> &Path {
        match self {
            JobFileError::Read { path, .. } | JobFileError::Invalid { path, .. } => path,
        }
    }
}

/// Reads and validates a job file from disk. Relative paths in it resolve against its directory.
pub fn load_job(path: &Path) -> Result<Job, JobFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobFileError::Read { path: path.to_path_buf(), message: e.to_string() })?;
    parse_job(path, &text)
}

impl Job {
    /// The job's args with `{index}` replaced by the instance number of a `--count` sweep.
    pub fn with_index(&self, index: u64) -> Job {
        let mut job = self.clone();
        let idx = index.to_string();
        for a in &mut job.vm.args {
            *a = a.replace("{index}", &idx);
        }
        for v in job.vm.env.values_mut() {
            *v = v.replace("{index}", &idx);
        }
        job
    }
}
