//! What a process of a single-system image (`vmgrid ssi`) needs from its home.
//!
//! The home (the console that owns the process table and the files) is reached over the network
//! by the node, which implements [`SsiHost`]; the runtime only sees this trait, so it stays free
//! of HTTP. Files follow close-to-open consistency with whole-file caching, as AFS does: a file is
//! validated against the home (and fetched whole if it changed) when it is opened, and written
//! back whole when a descriptor that wrote it is closed. Reads and writes in between are local.

pub use vmgrid_proto::ssi::{DirEntry, Errno, errno};

/// What the home answered when a file was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The copy held here (whose version was given) is current.
    Unchanged,
    /// The whole file, and its version.
    File { bytes: Vec<u8>, version: String },
    /// A directory, with its entries.
    Dir { entries: Vec<DirEntry> },
}

/// A change to the namespace, done at the home first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    /// Creates an empty file, failing with `EXIST` if there is one (`O_CREAT|O_EXCL`).
    Create(String),
    Mkdir(String),
    Rmdir(String),
    Unlink(String),
    Rename(String, String),
}

/// The home of one SSI process, as its node reaches it. Paths are relative to the SSI root,
/// `/`-separated, without `.` or `..`.
pub trait SsiHost: Send + Sync {
    /// This process's global PID.
    fn pid(&self) -> u64;
    /// Starts a child from `argv` (the first is the module's path); its PID, or an errno.
    fn spawn(&self, argv: Vec<String>) -> Result<u64, Errno>;
    /// Waits for child `pid` to end and returns its exit status.
    fn wait(&self, pid: i64) -> Result<i32, Errno>;
    /// Bytes the process wrote to stdout (1) or stderr (2). Never blocks on the network.
    fn output(&self, fd: u32, bytes: &[u8]);
    /// Opens `path` at the home: `have` is the version of the copy held here, if any.
    fn fetch(&self, path: &str, have: Option<&str>) -> Result<Fetched, Errno>;
    /// Writes the whole file back; returns its new version.
    fn store(&self, path: &str, bytes: Vec<u8>) -> Result<String, Errno>;
    fn fs_op(&self, op: &FsOp) -> Result<(), Errno>;
}
