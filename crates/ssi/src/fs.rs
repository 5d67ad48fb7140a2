//! The SSI filesystem: one directory tree (the home's `--root`) that every process sees as `/`.
//! Paths come from untrusted processes: each is resolved by the home itself (`resolve`), its
//! symbolic links followed only while they stay beneath the directory the path is relative to,
//! before anything touches the disk. Links and hard links that processes make are real ones in
//! `--root`; the kernel is only ever given paths whose directories are real, and last components
//! it does not follow (`O_EXCL`, `mkdir`, `unlink`, `rename`, `symlink`, `link`). One lock keeps a
//! resolution and the change it leads to together: changes to the namespace take it alone.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmgrid_proto::ssi::{At, DirEntry};

pub use vmgrid_proto::ssi::{Errno, errno};

mod resolve;

pub use resolve::{Node, Parent, Resolved, lexical};

/// The WASI errno for a host error, by its Linux errno where it has one.
pub fn errno_of(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(1) => errno::PERM,
        Some(2) => errno::NOENT,
        Some(13) => errno::ACCES,
        Some(17) => errno::EXIST,
        Some(18) => errno::XDEV,
        Some(20) => errno::NOTDIR,
        Some(21) => errno::ISDIR,
        Some(22) => errno::INVAL,
        Some(27) => errno::FBIG,
        Some(28) => errno::NOSPC,
        Some(30) => errno::ROFS,
        Some(31) => errno::MLINK,
        Some(36) => errno::NAMETOOLONG,
        Some(39) => errno::NOTEMPTY,
        Some(40) => errno::LOOP,
        Some(95) => errno::NOTSUP,
        Some(_) => errno::IO,
        None => match e.kind() {
            std::io::ErrorKind::NotFound => errno::NOENT,
            std::io::ErrorKind::PermissionDenied => errno::ACCES,
            std::io::ErrorKind::AlreadyExists => errno::EXIST,
            std::io::ErrorKind::InvalidInput => errno::INVAL,
            _ => errno::IO,
        },
    }
}

pub use errno::describe;

#[derive(Debug, Clone)]
pub struct Root {
    dir: std::path::PathBuf,
    /// Read: a lookup or a store (which changes no directory). Write: a namespace change.
    lock: Arc<RwLock<()>>,
}

/// What the console gets for a path.
pub enum Fetch {
    File { bytes: Vec<u8>, version: String },
    Dir(Vec<DirEntry>),
    Unchanged,
}

/// What came with a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload {
    None,
    File { bytes: Vec<u8>, version: String },
    Dir(Vec<DirEntry>),
}

/// The answer to a process's lookup.
#[derive(Debug)]
pub struct Found {
    pub resolved: Resolved,
    pub payload: Payload,
}

impl Root {
    pub fn new(dir: &Path) -> std::io::Result<Root> {
        std::fs::create_dir_all(dir)?;
        Ok(Root { dir: dir.canonicalize()?, lock: Arc::new(RwLock::new(())) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn reading(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    fn changing(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|p| p.into_inner())
    }

    /// `path` (as the console gives it: `/a/b`, `a/b`, `.`) as an SSI path.
    pub fn normalize(path: &str) -> Result<String, Errno> {
        let mut parts = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(errno::PERM),
                c if c.contains('\0') => return Err(errno::INVAL),
                c => parts.push(c),
            }
        }
        Ok(parts.join("/"))
    }

    /// The console's path, from the root, following links.
    fn console_at(path: &str) -> Result<At, Errno> {
        let p = Self::normalize(path)?;
        Ok(At { base: String::new(), path: if p.is_empty() { ".".into() } else { p } })
    }

    pub fn version(m: &std::fs::Metadata) -> String {
        format!("{}.{}-{}-{}", m.mtime(), m.mtime_nsec(), m.len(), m.ino())
    }

    /// A file or directory for the console (and the program of a spawn), following links.
    pub fn fetch(&self, path: &str, have: Option<&str>) -> Result<Fetch, Errno> {
        let at = Self::console_at(path)?;
        let found = self.lookup(&at, true, true, have)?;
        match (found.resolved.node, found.payload) {
            (Node::Missing, _) => Err(errno::NOENT),
            (_, Payload::File { bytes, version }) => Ok(Fetch::File { bytes, version }),
            (_, Payload::Dir(entries)) => Ok(Fetch::Dir(entries)),
            (_, Payload::None) => Ok(Fetch::Unchanged),
        }
    }

    /// A process's lookup: `at` resolved, and the file (unless `have` is the version of the copy
    /// at the lexical place of `at`, and that is where it resolved) or the directory's entries.
    pub fn lookup(&self, at: &At, follow: bool, content: bool, have: Option<&str>) -> Result<Found, Errno> {
        let _g = self.reading();
        let resolved = self.resolve(at, follow)?;
        let payload = match &resolved.node {
            Node::File { .. } if content => {
                let host = self.host(&resolved.path);
                let m = std::fs::metadata(&host).map_err(|e| errno_of(&e))?;
                let version = Self::version(&m);
                if have == Some(version.as_str()) && lexical(at).as_deref() == Some(resolved.path.as_str()) {
                    Payload::None
                } else {
                    let bytes = std::fs::read(&host).map_err(|e| errno_of(&e))?;
                    // Read the version again after: a file replaced meanwhile is seen as the newer one.
                    let version = std::fs::metadata(&host).map(|m| Self::version(&m)).unwrap_or(version);
                    Payload::File { bytes, version }
                }
            }
            Node::Dir => Payload::Dir(self.list(&resolved.path)?),
            Node::Other => return Err(errno::ACCES),
            _ => Payload::None,
        };
        Ok(Found { resolved, payload })
    }

    /// The entries of a resolved directory; links are listed as links, with their targets.
    fn list(&self, path: &str) -> Result<Vec<DirEntry>, Errno> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.host(path)).map_err(|e| errno_of(&e))? {
            let e = e.map_err(|e| errno_of(&e))?;
            let Ok(name) = e.file_name().into_string() else { continue };
            let Ok(ft) = e.file_type() else { continue };
            let link = if ft.is_symlink() {
                let Ok(target) = resolve::read_target(&e.path()) else { continue };
                Some(target)
            } else {
                None
            };
            out.push(DirEntry { name, dir: ft.is_dir(), link });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Replaces the whole file at `path` (following a link there, within the root); returns its
    /// new version. A file with other hard links is written in place, so they all see it; any
    /// other is replaced atomically.
    pub fn store(&self, path: &str, bytes: &[u8]) -> Result<String, Errno> {
        let at = Self::console_at(path)?;
        let g = self.reading();
        let r = self.resolve(&at, true)?;
        match r.node {
            Node::Dir => return Err(errno::ISDIR),
            Node::Other | Node::Link(_) => return Err(errno::ACCES),
            Node::File { nlink } if nlink > 1 => {
                drop(g);
                let _g = self.changing();
                let r = self.resolve(&at, true)?;
                if !matches!(r.node, Node::File { .. }) {
                    return Err(errno::ACCES);
                }
                let host = self.host(&r.path);
                std::fs::write(&host, bytes).map_err(|e| errno_of(&e))?;
                return std::fs::metadata(&host).map(|m| Self::version(&m)).map_err(|e| errno_of(&e));
            }
            Node::File { .. } | Node::Missing => {}
        }
        let p = self.host(&r.path);
        let parent = p.parent().ok_or(errno::INVAL)?;
        let name = p.file_name().ok_or(errno::INVAL)?.to_string_lossy().into_owned();
        let tmp = parent
            .join(format!(".{name}.vmgrid-{:016x}", getrandom::u64().expect("the kernel's random source is readable")));
        std::fs::write(&tmp, bytes).map_err(|e| errno_of(&e))?;
        if let Err(e) = std::fs::rename(&tmp, &p) {
            let _ = std::fs::remove_file(&tmp);
            return Err(errno_of(&e));
        }
        std::fs::metadata(&p).map(|m| Self::version(&m)).map_err(|e| errno_of(&e))
    }

    /// A namespace change's target, under the change lock.
    fn target(&self, at: &At) -> Result<Parent, Errno> {
        self.parent(at)
    }

    /// Creates an empty file; `EXIST` if anything is there, a link included (`O_CREAT|O_EXCL`).
    pub fn create_new(&self, at: &At) -> Result<String, Errno> {
        let _g = self.changing();
        let t = self.target(at)?;
        if t.slash || t.dots() {
            return Err(errno::ISDIR);
        }
        let p = t.path();
        std::fs::OpenOptions::new().write(true).create_new(true).open(self.host(&p)).map_err(|e| errno_of(&e))?;
        Ok(p)
    }

    pub fn mkdir(&self, at: &At) -> Result<String, Errno> {
        let _g = self.changing();
        let t = self.target(at)?;
        if t.dots() {
            return Err(errno::EXIST);
        }
        let p = t.path();
        std::fs::create_dir(self.host(&p)).map_err(|e| errno_of(&e))?;
        Ok(p)
    }

    pub fn rmdir(&self, at: &At) -> Result<String, Errno> {
        let _g = self.changing();
        let t = self.target(at)?;
        match t.name.as_str() {
            "." => return Err(errno::INVAL),
            ".." => return Err(errno::NOTEMPTY),
            _ => {}
        }
        let p = t.path();
        std::fs::remove_dir(self.host(&p)).map_err(|e| errno_of(&e))?;
        Ok(p)
    }

    /// Removes a file or a link (never what it points to). `name/` must be a directory, as on
    /// Linux: `ENOTDIR` for anything else, `EISDIR` for one.
    pub fn unlink(&self, at: &At) -> Result<String, Errno> {
        let _g = self.changing();
        let t = self.target(at)?;
        if t.dots() {
            return Err(errno::ISDIR);
        }
        let p = t.path();
        match self.node_at(&p)? {
            Node::Missing => return Err(errno::NOENT),
            Node::Dir => return Err(errno::ISDIR),
            _ if t.slash => return Err(errno::NOTDIR),
            _ => {}
        }
        std::fs::remove_file(self.host(&p)).map_err(|e| errno_of(&e))?;
        Ok(p)
    }

    pub fn rename(&self, from: &At, to: &At) -> Result<(String, String), Errno> {
        let _g = self.changing();
        let (f, t) = (self.target(from)?, self.target(to)?);
        if f.dots() || t.dots() {
            return Err(errno::INVAL);
        }
        let (fp, tp) = (f.path(), t.path());
        if f.slash || t.slash {
            match self.node_at(&fp)? {
                Node::Missing => return Err(errno::NOENT),
                Node::Dir => {}
                _ => return Err(errno::NOTDIR),
            }
        }
        std::fs::rename(self.host(&fp), self.host(&tp)).map_err(|e| errno_of(&e))?;
        Ok((fp, tp))
    }

    /// A symbolic link at `at` to `target`. An absolute target would leave the root: refused
    /// (`EPERM`), as wasmtime refuses it. A relative one is made whatever it names; following it
    /// is where containment is checked, every time.
    pub fn symlink(&self, target: &str, at: &At) -> Result<String, Errno> {
        if target.starts_with('/') {
            return Err(errno::PERM);
        }
        if target.is_empty() {
            return Err(errno::NOENT);
        }
        if target.contains('\0') {
            return Err(errno::INVAL);
        }
        let _g = self.changing();
        let t = self.target(at)?;
        if t.dots() {
            return Err(errno::EXIST);
        }
        let p = t.path();
        if t.slash {
            return Err(if self.node_at(&p)? == Node::Missing { errno::NOENT } else { errno::EXIST });
        }
        std::os::unix::fs::symlink(target, self.host(&p)).map_err(|e| errno_of(&e))?;
        Ok(p)
    }

    /// A hard link at `to` to what `from` names (a link there is linked itself, not followed).
    pub fn link(&self, from: &At, to: &At) -> Result<(String, String), Errno> {
        let _g = self.changing();
        let (f, t) = (self.target(from)?, self.target(to)?);
        if f.dots() {
            return Err(errno::PERM);
        }
        let (fp, tp) = (f.path(), t.path());
        let source = if f.slash { self.resolve(from, true)?.node } else { self.node_at(&fp)? };
        match source {
            Node::Missing => return Err(errno::NOENT),
            Node::Dir => return Err(errno::PERM),
            _ if f.slash => return Err(errno::NOTDIR),
            _ => {}
        }
        if t.dots() {
            return Err(errno::EXIST);
        }
        if t.slash {
            return Err(if self.node_at(&tp)? == Node::Missing { errno::NOENT } else { errno::EXIST });
        }
        std::fs::hard_link(self.host(&fp), self.host(&tp)).map_err(|e| errno_of(&e))?;
        Ok((fp, tp))
    }
}

/// Checks that `bytes` are a WebAssembly module (not a component) that validates.
pub fn check_module(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || bytes[..4] != *b"\0asm" {
        return Err("not a WebAssembly module (no \\0asm header)".into());
    }
    if bytes[4..8] != [1, 0, 0, 0] {
        return Err("a WebAssembly component; SSI processes are WASI preview-1 modules".into());
    }
    wasmparser::Validator::new().validate_all(bytes).map_err(|e| format!("invalid module: {e}"))?;
    // What the node will link it against: WASI preview 1 and the `vmgrid` calls.
    let (mut start, mut memory) = (false, false);
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| format!("invalid module: {e}"))? {
            wasmparser::Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.map_err(|e| format!("invalid module: {e}"))?;
                    let known = match import.module {
                        "wasi_snapshot_preview1" => true,
                        "vmgrid" => ["spawn", "wait", "getpid"].contains(&import.name),
                        _ => false,
                    };
                    if !known {
                        return Err(format!(
                            "it imports `{}.{}`; SSI processes may import WASI preview 1 and vmgrid.spawn/wait/getpid",
                            import.module, import.name
                        ));
                    }
                }
            }
            wasmparser::Payload::ExportSection(exports) => {
                for export in exports {
                    let export = export.map_err(|e| format!("invalid module: {e}"))?;
                    start |= export.name == "_start" && export.kind == wasmparser::ExternalKind::Func;
                    memory |= export.name == "memory" && export.kind == wasmparser::ExternalKind::Memory;
                }
            }
            _ => {}
        }
    }
    if !start || !memory {
        return Err("not a WASI command: it must export `_start` and `memory` (build for wasm32-wasip1)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(path: &str) -> At {
        At { base: String::new(), path: path.into() }
    }

    #[test]
    fn paths_stay_in_the_root_and_links_out_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        assert_eq!(Root::normalize("/a//b/./c").unwrap(), "a/b/c");
        assert_eq!(Root::normalize("../etc/passwd"), Err(errno::PERM));
        assert_eq!(Root::normalize("a/../../b"), Err(errno::PERM));
        std::os::unix::fs::symlink("/etc", d.path().join("out")).unwrap();
        assert_eq!(root.fetch("out/passwd", None).err(), Some(errno::PERM));
        assert_eq!(root.store("out/x", b"x").err(), Some(errno::PERM));
        let listed = root.list("").unwrap();
        assert_eq!(listed, [DirEntry { name: "out".into(), dir: false, link: Some("/etc".into()) }]);
        assert_eq!(root.symlink("/etc/passwd", &at("abs")), Err(errno::PERM));
        // A link made inside works; swapped for one that leaves, it is refused.
        root.store("f", b"inside").unwrap();
        root.symlink("f", &at("l")).unwrap();
        assert!(matches!(root.fetch("l", None), Ok(Fetch::File { bytes, .. }) if bytes == b"inside"));
        root.unlink(&at("l")).unwrap();
        root.symlink("../../../../etc/hostname", &at("l")).unwrap();
        assert_eq!(root.fetch("l", None).err(), Some(errno::PERM));
        assert_eq!(root.store("l", b"x").err(), Some(errno::PERM));
        assert_eq!(std::fs::read_link(d.path().join("l")).unwrap().to_str(), Some("../../../../etc/hostname"));
    }

    #[test]
    fn trailing_slashes_and_hard_links_follow_linux() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        root.store("f", b"one").unwrap();
        root.mkdir(&at("d/")).unwrap();
        root.symlink("d", &at("ld")).unwrap();
        assert_eq!(root.unlink(&at("f/")), Err(errno::NOTDIR));
        assert_eq!(root.unlink(&at("d/")), Err(errno::ISDIR));
        assert_eq!(root.unlink(&at("ld/")), Err(errno::NOTDIR));
        assert_eq!(root.symlink("f", &at("new/")), Err(errno::NOENT));
        assert_eq!(root.symlink("f", &at("f/")), Err(errno::EXIST));
        assert_eq!(root.rename(&at("f/"), &at("g")), Err(errno::NOTDIR));
        assert_eq!(root.rmdir(&at("ld/")), Err(errno::NOTDIR));
        assert_eq!(root.create_new(&at("n/")), Err(errno::ISDIR));
        assert_eq!(root.link(&at("d"), &at("hd")), Err(errno::PERM));
        // A hard link sees what is written through the other name.
        root.link(&at("f"), &at("h")).unwrap();
        root.store("f", b"two").unwrap();
        assert!(matches!(root.fetch("h", None), Ok(Fetch::File { bytes, .. }) if bytes == b"two"));
        root.rmdir(&at("d/")).unwrap();
        assert_eq!(root.fetch("ld", None).err(), Some(errno::NOENT));
    }

    #[test]
    fn versions_change_with_content_and_unchanged_files_are_not_sent() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        let v1 = root.store("f", b"one").unwrap();
        assert!(matches!(root.fetch("f", Some(&v1)), Ok(Fetch::Unchanged)));
        let v2 = root.store("f", b"two!").unwrap();
        assert_ne!(v1, v2);
        match root.fetch("f", Some(&v1)) {
            Ok(Fetch::File { bytes, version }) => assert_eq!((bytes.as_slice(), version), (&b"two!"[..], v2)),
            _ => panic!("expected the new file"),
        }
        assert_eq!(root.store("missing/f", b"x").err(), Some(errno::NOENT));
        root.mkdir(&at("d")).unwrap();
        assert_eq!(root.unlink(&at("d")).err(), Some(errno::ISDIR));
        assert_eq!(root.rmdir(&at(".")).err(), Some(errno::INVAL));
    }

    #[test]
    fn only_valid_modules_pass() {
        assert!(check_module(b"hello world").is_err());
        assert!(check_module(b"\0asm\x0d\0\x01\0").unwrap_err().contains("component"));
        assert!(check_module(b"\0asm\x01\0\0\0\x01\x05garbage").is_err());
        // Valid, but not a command: no _start, no memory.
        assert!(check_module(b"\0asm\x01\0\0\0").unwrap_err().contains("_start"));
    }
}
