//! The WASI layer of an SSI process: its `/` is a local mirror of the home's files, kept by
//! whole-file caching with close-to-open consistency (see [`crate::ssi`]), and the `vmgrid`
//! import module gives it `spawn`, `wait` and `getpid`.
//!
//! The namespace calls of `wasi_snapshot_preview1` that open, stat or change paths are shadowed:
//! each first does its part at the home, then calls wasmtime-wasi's own implementation on the
//! mirror, so everything else (reads, writes, seeks, directory listings) stays local and exact.
//! This module is the mirror's state; `calls` shadows the WASI calls, `imports` is `vmgrid`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::ssi::{Errno, Fetched, SsiHost, errno};

mod calls;
mod imports;

pub(crate) use calls::add_to_linker;

/// The one preopened directory, the SSI root, is the first descriptor after stdio.
const ROOT_FD: u32 = 3;

/// A descriptor that may write a file: closing it writes the file back if it changed.
pub(super) struct Writer {
    pub(super) path: String,
    /// The file's (mtime, length) in the mirror when it was opened, if the home has it; `None`
    /// means the home does not have it yet, so it is written back whatever happens.
    pub(super) before: Option<(std::time::SystemTime, u64)>,
}

/// Per-process state of the mirror.
pub(crate) struct SsiFs {
    pub(crate) host: Arc<dyn SsiHost>,
    root: PathBuf,
    /// Directory descriptors, by their SSI path ("" is the root).
    pub(super) dirs: HashMap<u32, String>,
    /// Files held in the mirror, with the version the home gave them.
    pub(super) versions: HashMap<String, String>,
    pub(super) written: HashMap<u32, Writer>,
}

pub(super) fn stamp(p: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::symlink_metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl SsiFs {
    pub(crate) fn new(host: Arc<dyn SsiHost>, root: PathBuf) -> SsiFs {
        SsiFs {
            host,
            root,
            dirs: HashMap::from([(ROOT_FD, String::new())]),
            versions: HashMap::new(),
            written: HashMap::new(),
        }
    }

    /// The SSI path that `path`, relative to descriptor `dirfd`, names; `None` if `dirfd` is not
    /// a directory of ours or the path leaves the root.
    pub(super) fn resolve(&self, dirfd: u32, path: &str) -> Option<String> {
        let base = self.dirs.get(&dirfd)?.as_str();
        if path.starts_with('/') {
            return None;
        }
        let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop()?;
                }
                c => parts.push(c),
            }
        }
        Some(parts.join("/"))
    }

    /// The mirror's host path for an SSI path. The guest cannot make links (`path_symlink` and
    /// `path_link` are refused) and the home serves none, but the host-side code here uses plain
    /// `std::fs`, so it checks anyway: a link anywhere on the path is refused.
    pub(super) fn local(&self, path: &str) -> Result<PathBuf, Errno> {
        let mut p = self.root.clone();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            p.push(c);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(errno::ACCES);
            }
        }
        Ok(p)
    }

    pub(super) fn open_for_writing(&self, path: &str) -> bool {
        self.written.values().any(|w| w.path == path)
    }

    /// Brings the mirror's copy of `path` up to date with the home (open of close-to-open).
    pub(super) fn sync(&mut self, path: &str) -> Result<(), Errno> {
        if self.open_for_writing(path) {
            // This process is writing it: its own copy is the newest.
            return Ok(());
        }
        let local = self.local(path)?;
        let have = self.versions.get(path).filter(|_| local.is_file()).cloned();
        match self.host.fetch(path, have.as_deref()) {
            Ok(Fetched::Unchanged) => Ok(()),
            Ok(Fetched::File { bytes, version }) => {
                if local.is_dir() {
                    let _ = std::fs::remove_dir_all(&local);
                }
                if let Some(parent) = local.parent() {
                    std::fs::create_dir_all(parent).map_err(|_| errno::IO)?;
                }
                std::fs::write(&local, bytes).map_err(|_| errno::IO)?;
                self.versions.insert(path.to_string(), version);
                Ok(())
            }
            Ok(Fetched::Dir { entries }) => {
                if local.is_file() {
                    let _ = std::fs::remove_file(&local);
                    self.versions.remove(path);
                }
                std::fs::create_dir_all(&local).map_err(|_| errno::IO)?;
                let names: std::collections::HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
                // Entries the home no longer has go; new ones appear (files as empty stand-ins
                // until opened, which fetches them).
                if let Ok(rd) = std::fs::read_dir(&local) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let child = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
                        if names.contains(name.as_str()) || self.open_for_writing(&child) {
                            continue;
                        }
                        let p = e.path();
                        let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                        self.versions.remove(&child);
                    }
                }
                for e in &entries {
                    let p = local.join(&e.name);
                    if e.dir {
                        if p.is_file() {
                            let _ = std::fs::remove_file(&p);
                        }
                        let _ = std::fs::create_dir_all(&p);
                    } else if !p.exists() {
                        let _ = std::fs::File::create(&p);
                    }
                }
                Ok(())
            }
            Err(errno::NOENT) => {
                if local.is_file() {
                    let _ = std::fs::remove_file(&local);
                } else if local.is_dir() && !path.is_empty() {
                    let _ = std::fs::remove_dir_all(&local);
                }
                self.versions.remove(path);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure the directory holding `path` is in the mirror, as the home has it.
    pub(super) fn ensure_parent(&mut self, path: &str) -> Result<(), Errno> {
        let Some((parent, _)) = path.rsplit_once('/') else { return Ok(()) };
        if self.local(parent)?.is_dir() {
            return Ok(());
        }
        self.ensure_parent(parent)?;
        self.sync(parent)
    }

    /// Writes `path` back to the home (close of close-to-open).
    pub(super) fn write_back(&mut self, path: &str) -> Result<(), Errno> {
        let bytes = std::fs::read(self.local(path)?).map_err(|_| errno::IO)?;
        let version = self.host.store(path, bytes)?;
        self.versions.insert(path.to_string(), version);
        Ok(())
    }

    /// Whether a writer changed its file (a file the home does not have yet always counts).
    fn dirty(&self, w: &Writer) -> bool {
        match (w.before, self.local(&w.path).ok().and_then(|p| stamp(&p))) {
            (None, Some(_)) => true,
            (Some(before), Some(now)) => before != now,
            // Gone from the mirror: unlinked while open; nothing to write back.
            (_, None) => false,
        }
    }

    /// The descriptor `fd` closed: forget it, and write its file back if it was the last writer
    /// and the file changed.
    pub(super) fn closed(&mut self, fd: u32) -> Result<(), Errno> {
        self.dirs.remove(&fd);
        let Some(w) = self.written.remove(&fd) else { return Ok(()) };
        let dirty = self.dirty(&w);
        if let Some(other) = self.written.values_mut().find(|o| o.path == w.path) {
            // Another descriptor still writes it: it goes home with the last one.
            if dirty {
                other.before = None;
            }
            return Ok(());
        }
        if dirty { self.write_back(&w.path) } else { Ok(()) }
    }

    /// `fd_renumber(from, to)` succeeded: `to` closed and then became `from`.
    pub(super) fn renumbered(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        let result = if from != to { self.closed(to) } else { Ok(()) };
        if let Some(d) = self.dirs.remove(&from) {
            self.dirs.insert(to, d);
        }
        if let Some(w) = self.written.remove(&from) {
            self.written.insert(to, w);
        }
        result
    }

    /// `path` was unlinked: nothing of it goes home any more.
    pub(super) fn forget(&mut self, path: &str) {
        self.versions.remove(path);
        self.written.retain(|_, w| w.path != path);
    }

    /// `old` was renamed to `new`: what the mirror knows of it (and under it) moves along.
    pub(super) fn moved(&mut self, old: &str, new: &str) {
        let re = |p: &str| -> Option<String> {
            if p == old {
                Some(new.to_string())
            } else {
                p.strip_prefix(old).filter(|rest| rest.starts_with('/')).map(|rest| format!("{new}{rest}"))
            }
        };
        for w in self.written.values_mut() {
            if let Some(p) = re(&w.path) {
                w.path = p;
            }
        }
        for d in self.dirs.values_mut() {
            if let Some(p) = re(d) {
                *d = p;
            }
        }
        self.versions = self.versions.drain().map(|(k, v)| (re(&k).unwrap_or(k), v)).collect();
    }

    /// Files being written at or under `path`, written back now (before a rename moves them).
    pub(super) fn flush_under(&mut self, path: &str) -> Result<(), Errno> {
        let mut paths: Vec<String> = self
            .written
            .values()
            .filter(|w| w.path == path || w.path.starts_with(&format!("{path}/")))
            .map(|w| w.path.clone())
            .collect();
        paths.sort();
        paths.dedup();
        for p in paths {
            self.write_back(&p)?;
            // The home has it now; later closes compare against what was just sent.
            let now = self.local(&p).ok().and_then(|l| stamp(&l));
            for w in self.written.values_mut().filter(|w| w.path == p) {
                w.before = now;
            }
        }
        Ok(())
    }

    /// At exit the process's descriptors close, so what it wrote goes home.
    pub(crate) fn close_all(&mut self) -> Result<(), Errno> {
        let fds: Vec<u32> = self.written.keys().copied().collect();
        let mut result = Ok(());
        for fd in fds {
            if let Err(e) = self.closed(fd) {
                result = Err(e);
            }
        }
        result
    }
}
