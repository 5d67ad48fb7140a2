//! What a process of a single-system image (`vmgrid ssi`) needs from its home.
//!
//! The home (the console that owns the process table and the files) is reached over the network
//! by the node, which implements [`SsiHost`]; the runtime only sees this trait, so it stays free
//! of HTTP. Files follow close-to-open consistency with whole-file caching, as AFS does: a file is
//! validated against the home (and fetched whole if it changed) when it is opened, and written
//! back whole when a descriptor that wrote it is closed. Reads and writes in between are local.
//! Paths are resolved at the home, which alone knows the links; what comes back names only real
//! directories and files.

pub use vmgrid_proto::ssi::{At, DirEntry, Errno, FsOpRequest as FsOp, FsOpResponse as Moved, errno};

/// A path to look up at the home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub at: At,
    /// Follow a link in the last component.
    pub follow: bool,
    /// Send a file's bytes (a directory's entries are always sent).
    pub content: bool,
}

/// What a looked-up path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    /// A symbolic link (not followed), and its target.
    Link(String),
    /// Nothing, but its directory exists: where a file would be created.
    Missing,
}

/// What the home sent along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Nothing: not asked for, or the copy held here (whose version was given) is current.
    None,
    /// The whole file, and its version.
    File { bytes: Vec<u8>, version: String },
    /// A directory's entries.
    Dir(Vec<DirEntry>),
}

/// The answer to a [`Lookup`]: the resolved path (an SSI path: no links, no `..`), what is there
/// and what came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: String,
    pub kind: Kind,
    pub payload: Payload,
}

/// The home of one SSI process, as its node reaches it. SSI paths are relative to the SSI root,
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
    /// Looks a path up at the home: `have` is the version of the copy held here at the path's
    /// lexical place (`base/path` with `..` applied), if any.
    fn fetch(&self, lookup: &Lookup, have: Option<&str>) -> Result<Found, Errno>;
    /// Writes the whole file back (an SSI path); returns its new version.
    fn store(&self, path: &str, bytes: Vec<u8>) -> Result<String, Errno>;
    /// Changes the namespace at the home; what it touched, resolved.
    fn fs_op(&self, op: &FsOp) -> Result<Moved, Errno>;
}
