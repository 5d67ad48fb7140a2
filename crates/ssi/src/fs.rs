//! The SSI filesystem: one directory tree (the home's `--root`) that every process sees as `/`.
//! Paths come from untrusted processes, so each is checked to be relative, free of `.`/`..`, and
//! to pass through no symbolic link, before it touches the disk.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vmgrid_proto::ssi::DirEntry;

pub use vmgrid_proto::ssi::{Errno, errno};

pub fn errno_of(e: &std::io::Error) -> Errno {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound => errno::NOENT,
        PermissionDenied => errno::ACCES,
        AlreadyExists => errno::EXIST,
        IsADirectory => errno::ISDIR,
        NotADirectory => errno::NOTDIR,
        DirectoryNotEmpty => errno::NOTEMPTY,
        InvalidInput => errno::INVAL,
        _ => errno::IO,
    }
}

pub use errno::describe;

#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

pub enum Fetch {
    File { bytes: Vec<u8>, version: String },
    Dir(Vec<DirEntry>),
    Unchanged,
}

impl Root {
    pub fn new(dir: &Path) -> std::io::Result<Root> {
        std::fs::create_dir_all(dir)?;
        Ok(Root { dir: dir.canonicalize()? })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `path` (as a process or the console gives it: `/a/b`, `a/b`, `.`) as an SSI path.
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

    /// The host path of an SSI path, refusing any symbolic link on the way.
    pub fn host_path(&self, path: &str) -> Result<PathBuf, Errno> {
        let path = Self::normalize(path)?;
        let mut p = self.dir.clone();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            p.push(c);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => return Err(errno::ACCES),
                _ => {}
            }
        }
        Ok(p)
    }

    pub fn version(m: &std::fs::Metadata) -> String {
        format!("{}.{}-{}-{}", m.mtime(), m.mtime_nsec(), m.len(), m.ino())
    }

    pub fn fetch(&self, path: &str, have: Option<&str>) -> Result<Fetch, Errno> {
        let p = self.host_path(path)?;
        let m = std::fs::metadata(&p).map_err(|e| errno_of(&e))?;
        if m.is_dir() {
            return self.list(path).map(Fetch::Dir);
        }
        let version = Self::version(&m);
        if have == Some(version.as_str()) {
            return Ok(Fetch::Unchanged);
        }
        let bytes = std::fs::read(&p).map_err(|e| errno_of(&e))?;
        // Read the version again after: a file replaced meanwhile is seen as the newer one.
        let version = std::fs::metadata(&p).map(|m| Self::version(&m)).unwrap_or(version);
        Ok(Fetch::File { bytes, version })
    }

    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>, Errno> {
        let p = self.host_path(path)?;
        let mut out = Vec::new();
        for e in std::fs::read_dir(&p).map_err(|e| errno_of(&e))? {
            let e = e.map_err(|e| errno_of(&e))?;
            let Ok(name) = e.file_name().into_string() else { continue };
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_symlink() {
                continue;
            }
            out.push(DirEntry { name, dir: ft.is_dir() });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Replaces the whole file atomically; returns its new version.
    pub fn store(&self, path: &str, bytes: &[u8]) -> Result<String, Errno> {
        let p = self.host_path(path)?;
        if p == self.dir {
            return Err(errno::ISDIR);
        }
        if p.is_dir() {
            return Err(errno::ISDIR);
        }
        let parent = p.parent().ok_or(errno::INVAL)?;
        if !parent.is_dir() {
            return Err(errno::NOENT);
        }
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

    /// Creates an empty file; `EXIST` if anything is there.
    pub fn create_new(&self, path: &str) -> Result<(), Errno> {
        let p = self.non_root(path)?;
        std::fs::OpenOptions::new().write(true).create_new(true).open(p).map(|_| ()).map_err(|e| errno_of(&e))
    }

    pub fn mkdir(&self, path: &str) -> Result<(), Errno> {
        std::fs::create_dir(self.non_root(path)?).map_err(|e| errno_of(&e))
    }

    pub fn rmdir(&self, path: &str) -> Result<(), Errno> {
        std::fs::remove_dir(self.non_root(path)?).map_err(|e| errno_of(&e))
    }

    pub fn unlink(&self, path: &str) -> Result<(), Errno> {
        let p = self.non_root(path)?;
        if p.is_dir() {
            return Err(errno::ISDIR);
        }
        std::fs::remove_file(p).map_err(|e| errno_of(&e))
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        std::fs::rename(self.non_root(from)?, self.non_root(to)?).map_err(|e| errno_of(&e))
    }

    fn non_root(&self, path: &str) -> Result<PathBuf, Errno> {
        let p = self.host_path(path)?;
        if p == self.dir { Err(errno::PERM) } else { Ok(p) }
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

    #[test]
    fn paths_stay_in_the_root_and_never_follow_links() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        assert_eq!(Root::normalize("/a//b/./c").unwrap(), "a/b/c");
        assert_eq!(Root::normalize("../etc/passwd"), Err(errno::PERM));
        assert_eq!(Root::normalize("a/../../b"), Err(errno::PERM));
        std::os::unix::fs::symlink("/etc", d.path().join("out")).unwrap();
        assert_eq!(root.fetch("out/passwd", None).err(), Some(errno::ACCES));
        assert_eq!(root.store("out/x", b"x").err(), Some(errno::ACCES));
        assert!(root.list("").unwrap().is_empty(), "links are not listed");
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
        root.mkdir("d").unwrap();
        assert_eq!(root.unlink("d").err(), Some(errno::ISDIR));
        assert_eq!(root.rmdir("").err(), Some(errno::PERM));
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
