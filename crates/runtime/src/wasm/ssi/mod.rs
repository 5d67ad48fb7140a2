//! The WASI layer of an SSI process: its `/` is a local mirror of the home's files, kept by
//! whole-file caching with close-to-open consistency (see [`crate::ssi`]), and the `vmgrid`
//! import module gives it `spawn`, `wait` and `getpid`.
//!
//! The calls of `wasi_snapshot_preview1` that take a path are shadowed: the home resolves the
//! path (it alone knows the links, and never follows one out of the root) and does its part, and
//! then wasmtime-wasi's own implementation runs on the mirror with the resolved path, so
//! everything else (reads, writes, seeks, directory listings) stays local and exact.
//!
//! The mirror never holds a symbolic link. A link the home has is an empty placeholder file at
//! the link's place, recorded here with its target: the calls that do not follow a link (`lstat`,
//! `readlink`, `fd_readdir`'s types) answer from that record, and every other call is given the
//! resolved path, which names no link. Hard links made by this process are hard links in its
//! mirror too; a file reached by two names elsewhere is two cached copies of the one file.
//! This module is the mirror's state; `calls` shadows the open, stat and descriptor calls,
//! `names` the namespace changes, `imports` is `vmgrid`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::ssi::{At, DirEntry, Errno, Found, Kind, Lookup, Payload, SsiHost, errno};

mod calls;
mod imports;
mod names;

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
    /// The home's links as this mirror knows them, by SSI path: their targets.
    pub(super) links: HashMap<String, String>,
}

pub(super) fn stamp(p: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::symlink_metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

pub(super) fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || dir.is_empty() || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// `base/path` with `.` and `..` applied as text (`None` if that climbs above `base`): where the
/// path is if no link is on its way, as the home computes it too.
pub(super) fn lexical(at: &At) -> Option<String> {
    let mut parts: Vec<&str> = at.base.split('/').filter(|c| !c.is_empty()).collect();
    let floor = parts.len();
    for c in at.path.split('/') {
        match c {
            "" | "." => {}
            ".." if parts.len() == floor => return None,
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// A resolved SSI path relative to the directory `base` it was resolved beneath.
pub(super) fn rel(base: &str, path: &str) -> Result<String, Errno> {
    let r = if base.is_empty() {
        path
    } else if path == base {
        ""
    } else {
        path.strip_prefix(base).and_then(|r| r.strip_prefix('/')).ok_or(errno::IO)?
    };
    Ok(if r.is_empty() { ".".into() } else { r.into() })
}

impl SsiFs {
    pub(crate) fn new(host: Arc<dyn SsiHost>, root: PathBuf) -> SsiFs {
        SsiFs {
            host,
            root,
            dirs: HashMap::from([(ROOT_FD, String::new())]),
            versions: HashMap::new(),
            written: HashMap::new(),
            links: HashMap::new(),
        }
    }

    /// The mirror's host path for an SSI path. The mirror holds no links, and host-side code
    /// here uses plain `std::fs`, so it checks anyway: a link anywhere on the path is refused.
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

    fn writing_under(&self, dir: &str) -> bool {
        self.written.values().any(|w| under(&w.path, dir))
    }

    /// Whether a link the mirror knows of is on `path` (or is `path`).
    pub(super) fn link_on(&self, path: &str) -> bool {
        let mut at = String::new();
        path.split('/').filter(|c| !c.is_empty()).any(|c| {
            at = join(&at, c);
            self.links.contains_key(&at)
        })
    }

    /// Looks `at` up at the home (the open of close-to-open) and brings the mirror up to date
    /// with what it names.
    pub(super) fn lookup(&mut self, at: At, follow: bool, content: bool) -> Result<Found, Errno> {
        let lex = lexical(&at);
        // This process is writing it: its own copy is the newest, and is not replaced.
        let writing = lex.as_deref().is_some_and(|p| self.open_for_writing(p));
        let have = match &lex {
            Some(p) if content && !self.link_on(p) => {
                self.versions.get(p).filter(|_| self.local(p).is_ok_and(|l| l.is_file())).cloned()
            }
            _ => None,
        };
        let found = self.host.fetch(&Lookup { at, follow, content: content && !writing }, have.as_deref())?;
        self.apply(&found)?;
        Ok(found)
    }

    /// Makes the mirror hold what the home said is at `found.path`.
    pub(super) fn apply(&mut self, found: &Found) -> Result<(), Errno> {
        let path = found.path.as_str();
        if !matches!(found.kind, Kind::Link(_)) {
            self.links.remove(path);
        }
        match (&found.kind, &found.payload) {
            (Kind::Link(target), _) => self.placeholder(path, target),
            (Kind::File, Payload::File { bytes, version }) if !self.open_for_writing(path) => {
                self.mirror_dirs(parent_of(path))?;
                let local = self.local(path)?;
                if local.is_dir() && !self.writing_under(path) {
                    let _ = std::fs::remove_dir_all(&local);
                }
                // A new file, not a rewrite: a hard link in the mirror keeps the other name's copy.
                let _ = std::fs::remove_file(&local);
                std::fs::write(&local, bytes).map_err(|_| errno::IO)?;
                self.versions.insert(path.to_string(), version.clone());
                Ok(())
            }
            // Looked up without its content (an open that truncates it, or one this process is
            // writing): its directories are the home's all the same, so the open finds them.
            (Kind::File, _) => self.mirror_dirs(parent_of(path)),
            (Kind::Dir, Payload::Dir(entries)) => {
                self.mirror_dirs(path)?;
                self.reconcile(path, entries)
            }
            (Kind::Dir, _) => self.mirror_dirs(path),
            (Kind::Missing, _) => {
                self.remove_local(path);
                self.mirror_dirs(parent_of(path))
            }
        }
    }

    /// Makes every component of `path` a real directory in the mirror (the home said they are).
    pub(super) fn mirror_dirs(&mut self, path: &str) -> Result<(), Errno> {
        let mut p = self.root.clone();
        let mut at = String::new();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            p.push(c);
            at = join(&at, c);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => continue,
                Ok(m) if m.file_type().is_symlink() => return Err(errno::ACCES),
                Ok(_) if self.open_for_writing(&at) => return Err(errno::IO),
                Ok(_) => {
                    let _ = std::fs::remove_file(&p);
                    self.versions.remove(&at);
                    self.links.remove(&at);
                }
                Err(_) => {}
            }
            std::fs::create_dir(&p).map_err(|_| errno::IO)?;
        }
        Ok(())
    }

    /// The mirror's copy of a directory, to the home's entries: entries the home no longer has
    /// go; new ones appear (files as empty stand-ins until opened, which fetches them; links as
    /// placeholders).
    fn reconcile(&mut self, path: &str, entries: &[DirEntry]) -> Result<(), Errno> {
        // The home is another machine: a listing whose names are not each one plain path
        // component (`/etc/x`, `..`, `a/b`) is refused whole, before anything touches the mirror.
        if let Some(bad) = entries.iter().find(|e| !is_plain_name(&e.name)) {
            tracing::warn!(name = ?bad.name, "the home listed an entry that is not one plain name; refusing the listing");
            return Err(errno::IO);
        }
        let local = self.local(path)?;
        let names: std::collections::HashSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        if let Ok(rd) = std::fs::read_dir(&local) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let child = join(path, &name);
                if !names.contains(name.as_str()) && !self.writing_under(&child) {
                    self.remove_local(&child);
                }
            }
        }
        for e in entries {
            let child = join(path, &e.name);
            let p = local.join(&e.name);
            let is_dir = std::fs::symlink_metadata(&p).map(|m| m.is_dir());
            if let Some(target) = &e.link {
                let _ = self.placeholder(&child, target);
                continue;
            }
            self.links.remove(&child);
            if e.dir {
                if is_dir.is_ok_and(|d| !d) && !self.open_for_writing(&child) {
                    self.remove_local(&child);
                }
                let _ = std::fs::create_dir(&p);
            } else if is_dir.is_err() {
                let _ = std::fs::File::create(&p);
            } else if is_dir.is_ok_and(|d| d) && !self.writing_under(&child) {
                self.remove_local(&child);
                let _ = std::fs::File::create(&p);
            }
        }
        Ok(())
    }

    /// A link at `path`: an empty placeholder file in the mirror, and its target recorded.
    pub(super) fn placeholder(&mut self, path: &str, target: &str) -> Result<(), Errno> {
        if self.writing_under(path) {
            return Ok(());
        }
        self.mirror_dirs(parent_of(path))?;
        let local = self.local(path)?;
        if self.links.get(path).is_none_or(|t| t != target) || !local.is_file() {
            self.remove_local(path);
            std::fs::File::create(&local).map_err(|_| errno::IO)?;
        }
        self.versions.remove(path);
        self.links.insert(path.to_string(), target.to_string());
        Ok(())
    }

    /// Takes `path` (and what is under it) out of the mirror, unless this process is writing there.
    pub(super) fn remove_local(&mut self, path: &str) {
        if path.is_empty() || self.writing_under(path) {
            return;
        }
        if let Ok(p) = self.local(path) {
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
        self.forget_under(path);
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
        self.links.remove(path);
        self.written.retain(|_, w| w.path != path);
    }

    /// What the mirror knows of `path` and everything under it goes.
    fn forget_under(&mut self, path: &str) {
        self.versions.retain(|k, _| !under(k, path));
        self.links.retain(|k, _| !under(k, path));
    }

    /// `old` was renamed to `new`: what the mirror knows of it (and under it) moves along.
    pub(super) fn moved(&mut self, old: &str, new: &str) {
        if old == new {
            return;
        }
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
        self.forget_under(new);
        self.versions = self.versions.drain().map(|(k, v)| (re(&k).unwrap_or(k), v)).collect();
        self.links = self.links.drain().map(|(k, v)| (re(&k).unwrap_or(k), v)).collect();
    }

    /// Files being written at or under `path`, written back now (before a rename moves them).
    pub(super) fn flush_under(&mut self, path: &str) -> Result<(), Errno> {
        let mut paths: Vec<String> =
            self.written.values().filter(|w| under(&w.path, path)).map(|w| w.path.clone()).collect();
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

/// One plain path component: not empty, not `.` or `..`, no `/` and no NUL.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

#[cfg(test)]
mod name_tests {
    use super::is_plain_name;

    #[test]
    fn only_plain_names_enter_the_mirror() {
        assert!(is_plain_name("data.txt") && is_plain_name(".hidden") && is_plain_name("a b"));
        for bad in ["", ".", "..", "/etc/passwd", "../../planted", "a/b", "x\0y"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }
}
