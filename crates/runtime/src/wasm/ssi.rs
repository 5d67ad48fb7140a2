//! The WASI layer of an SSI process: its `/` is a local mirror of the home's files, kept by
//! whole-file caching with close-to-open consistency (see [`crate::ssi`]), and the `vmgrid`
//! import module gives it `spawn`, `wait` and `getpid`.
//!
//! The namespace calls of `wasi_snapshot_preview1` that open, stat or change paths are shadowed:
//! each first does its part at the home, then calls wasmtime-wasi's own implementation on the
//! mirror, so everything else (reads, writes, seeks, directory listings) stays local and exact.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::GuestState;
use crate::ssi::{Errno, Fetched, FsOp, SsiHost, errno};

/// The one preopened directory, the SSI root, is the first descriptor after stdio.
const ROOT_FD: u32 = 3;
const OFLAGS_CREAT: i32 = 1;
const OFLAGS_EXCL: i32 = 4;
const OFLAGS_TRUNC: i32 = 8;
const RIGHT_FD_WRITE: i64 = 1 << 6;
const ERRNO_NOTSUP: Errno = 58;
const ERRNO_NOTCAPABLE: Errno = 76;

/// The longest argv a process may pass to `spawn`.
const MAX_ARGV_BYTES: usize = 64 * 1024;

/// A descriptor that may write a file: closing it writes the file back if it changed.
struct Writer {
    path: String,
    /// The file's (mtime, length) in the mirror when it was opened, if the home has it; `None`
    /// means the home does not have it yet, so it is written back whatever happens.
    before: Option<(std::time::SystemTime, u64)>,
}

/// Per-process state of the mirror.
pub(crate) struct SsiFs {
    pub(crate) host: Arc<dyn SsiHost>,
    root: PathBuf,
    /// Directory descriptors, by their SSI path ("" is the root).
    dirs: HashMap<u32, String>,
    /// Files held in the mirror, with the version the home gave them.
    versions: HashMap<String, String>,
    written: HashMap<u32, Writer>,
}

fn stamp(p: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
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
    fn resolve(&self, dirfd: u32, path: &str) -> Option<String> {
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
    fn local(&self, path: &str) -> Result<PathBuf, Errno> {
        let mut p = self.root.clone();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            p.push(c);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(errno::ACCES);
            }
        }
        Ok(p)
    }

    fn open_for_writing(&self, path: &str) -> bool {
        self.written.values().any(|w| w.path == path)
    }

    /// Brings the mirror's copy of `path` up to date with the home (open of close-to-open).
    fn sync(&mut self, path: &str) -> Result<(), Errno> {
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
    fn ensure_parent(&mut self, path: &str) -> Result<(), Errno> {
        let Some((parent, _)) = path.rsplit_once('/') else { return Ok(()) };
        if self.local(parent)?.is_dir() {
            return Ok(());
        }
        self.ensure_parent(parent)?;
        self.sync(parent)
    }

    /// Writes `path` back to the home (close of close-to-open).
    fn write_back(&mut self, path: &str) -> Result<(), Errno> {
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
    fn closed(&mut self, fd: u32) -> Result<(), Errno> {
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
    fn renumbered(&mut self, from: u32, to: u32) -> Result<(), Errno> {
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
    fn forget(&mut self, path: &str) {
        self.versions.remove(path);
        self.written.retain(|_, w| w.path != path);
    }

    /// `old` was renamed to `new`: what the mirror knows of it (and under it) moves along.
    fn moved(&mut self, old: &str, new: &str) {
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
    fn flush_under(&mut self, path: &str) -> Result<(), Errno> {
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

type R = wasmtime::Result<i32>;

fn memory(caller: &mut Caller<'_, GuestState>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("the module exports no memory"))
}

fn read_bytes(caller: &mut Caller<'_, GuestState>, ptr: i32, len: i32) -> wasmtime::Result<Option<Vec<u8>>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    Ok(mem.data(&caller).get(ptr..ptr.saturating_add(len)).map(|b| b.to_vec()))
}

fn read_str(caller: &mut Caller<'_, GuestState>, ptr: i32, len: i32) -> wasmtime::Result<Option<String>> {
    Ok(read_bytes(caller, ptr, len)?.and_then(|b| String::from_utf8(b).ok()))
}

fn write_bytes(caller: &mut Caller<'_, GuestState>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<bool> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    match mem.data_mut(caller).get_mut(ptr..ptr.saturating_add(bytes.len())) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Runs wasmtime-wasi's own implementation of a call.
fn real<T>(
    caller: &mut Caller<'_, GuestState>,
    f: impl FnOnce(&mut wasmtime_wasi::p1::WasiP1Ctx, &mut wiggle::GuestMemory<'_>) -> T,
) -> wasmtime::Result<T> {
    let mem = memory(caller)?;
    let (data, state) = mem.data_and_store_mut(caller);
    let mut gm = wiggle::GuestMemory::Unshared(data);
    Ok(f(&mut state.wasi, &mut gm))
}

fn ssi<'a>(caller: &'a mut Caller<'_, GuestState>) -> &'a mut SsiFs {
    caller.data_mut().ssi.as_mut().expect("the SSI linker only runs SSI processes")
}

fn fail(e: Errno) -> R {
    Ok(e as i32)
}

/// Adds the SSI calls to a linker that already has WASI preview 1.
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    linker.allow_shadowing(true);
    linker.func_wrap(
        W,
        "path_open",
        |mut c: Caller<'_, GuestState>,
         dirfd: i32,
         dirflags: i32,
         path_ptr: i32,
         path_len: i32,
         oflags: i32,
         rights_base: i64,
         rights_inheriting: i64,
         fdflags: i32,
         fd_out: i32|
         -> R {
            let open = |c: &mut Caller<'_, GuestState>| {
                real(c, |w, m| {
                    in_tokio(abi::path_open(
                        w,
                        m,
                        dirfd,
                        dirflags,
                        path_ptr,
                        path_len,
                        oflags,
                        rights_base,
                        rights_inheriting,
                        fdflags,
                        fd_out,
                    ))
                })
            };
            let Some(path) = read_str(&mut c, path_ptr, path_len)? else { return open(&mut c)? };
            let Some(p) = ssi(&mut c).resolve(dirfd as u32, &path) else { return fail(ERRNO_NOTCAPABLE) };
            let (creat, excl, trunc) =
                (oflags & OFLAGS_CREAT != 0, oflags & OFLAGS_EXCL != 0, oflags & OFLAGS_TRUNC != 0);
            let s = ssi(&mut c);
            let prepared = if creat && excl {
                // Exclusive across the machine: the home creates it, or says it exists.
                s.sync(&p).and_then(|()| s.ensure_parent(&p)).and_then(|()| s.host.fs_op(&FsOp::Create(p.clone())))
            } else if creat && trunc {
                // Replaced whole: no need to fetch what is there.
                s.ensure_parent(&p)
            } else {
                s.sync(&p).and_then(|()| s.ensure_parent(&p))
            };
            if let Err(e) = prepared {
                return fail(e);
            }
            let before = if creat && excl {
                // Created empty at the home just now.
                None
            } else {
                let s = ssi(&mut c);
                s.versions.get(&p).and(s.local(&p).ok()).and_then(|l| stamp(&l))
            };
            let r = open(&mut c)??;
            if r == 0 {
                let fd = read_bytes(&mut c, fd_out, 4)?.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                if let Some(fd) = fd {
                    let s = ssi(&mut c);
                    if s.local(&p).is_ok_and(|l| l.is_dir()) {
                        s.dirs.insert(fd, p);
                    } else if rights_base & RIGHT_FD_WRITE != 0 || creat || trunc {
                        // After an exclusive create the home has the empty file already.
                        let before = if creat && excl { s.local(&p).ok().and_then(|l| stamp(&l)) } else { before };
                        s.written.insert(fd, Writer { path: p, before });
                    }
                }
            }
            Ok(r)
        },
    )?;
    linker.func_wrap(W, "fd_close", |mut c: Caller<'_, GuestState>, fd: i32| -> R {
        let r = real(&mut c, |w, m| in_tokio(abi::fd_close(w, m, fd)))??;
        if r != 0 {
            return Ok(r);
        }
        match ssi(&mut c).closed(fd as u32) {
            Ok(()) => Ok(0),
            Err(e) => fail(e),
        }
    })?;
    linker.func_wrap(W, "fd_renumber", |mut c: Caller<'_, GuestState>, from: i32, to: i32| -> R {
        if to as u32 == ROOT_FD || from as u32 == ROOT_FD {
            // The root stays where it is: everything resolves against it.
            return fail(ERRNO_NOTSUP);
        }
        let r = real(&mut c, |w, m| in_tokio(abi::fd_renumber(w, m, from, to)))??;
        if r != 0 {
            return Ok(r);
        }
        match ssi(&mut c).renumbered(from as u32, to as u32) {
            Ok(()) => Ok(0),
            Err(e) => fail(e),
        }
    })?;
    // Links would make the mirror differ from the home (which has none) and could point out of it.
    linker.func_wrap(
        W,
        "path_symlink",
        |_c: Caller<'_, GuestState>, _a: i32, _b: i32, _fd: i32, _d: i32, _e: i32| -> R { fail(ERRNO_NOTSUP) },
    )?;
    linker.func_wrap(
        W,
        "path_link",
        |_c: Caller<'_, GuestState>, _fd: i32, _fl: i32, _a: i32, _b: i32, _fd2: i32, _d: i32, _e: i32| -> R {
            fail(ERRNO_NOTSUP)
        },
    )?;
    linker.func_wrap(
        W,
        "path_filestat_get",
        |mut c: Caller<'_, GuestState>, dirfd: i32, flags: i32, path_ptr: i32, path_len: i32, out: i32| -> R {
            if let Some(path) = read_str(&mut c, path_ptr, path_len)? {
                let Some(p) = ssi(&mut c).resolve(dirfd as u32, &path) else { return fail(ERRNO_NOTCAPABLE) };
                if let Err(e) = ssi(&mut c).sync(&p) {
                    return fail(e);
                }
            }
            real(&mut c, |w, m| in_tokio(abi::path_filestat_get(w, m, dirfd, flags, path_ptr, path_len, out)))?
        },
    )?;
    // Namespace changes: at the home first (it decides), then in the mirror.
    fn namespace_op(
        c: &mut Caller<'_, GuestState>,
        dirfd: i32,
        path_ptr: i32,
        path_len: i32,
        op: fn(String) -> FsOp,
        local: impl FnOnce(&mut Caller<'_, GuestState>) -> R,
    ) -> R {
        let Some(path) = read_str(c, path_ptr, path_len)? else { return local(c) };
        let Some(p) = ssi(c).resolve(dirfd as u32, &path) else { return fail(ERRNO_NOTCAPABLE) };
        if p.is_empty() {
            return fail(errno::PERM);
        }
        let s = ssi(c);
        let op = op(p.clone());
        if matches!(op, FsOp::Unlink(_)) && s.open_for_writing(&p) && !s.versions.contains_key(&p) {
            // Created here and not yet sent: the home has nothing to remove.
            s.forget(&p);
        } else if let Err(e) = s.host.fs_op(&op) {
            return fail(e);
        }
        let s = ssi(c);
        if let FsOp::Unlink(_) | FsOp::Rmdir(_) = op {
            s.forget(&p);
        }
        if let Err(e) = s.ensure_parent(&p) {
            return fail(e);
        }
        let _ = local(c)?;
        // The home's answer is the one that counts; the mirror may simply not have held it.
        Ok(0)
    }
    linker.func_wrap(W, "path_unlink_file", |mut c: Caller<'_, GuestState>, fd: i32, ptr: i32, len: i32| -> R {
        namespace_op(&mut c, fd, ptr, len, FsOp::Unlink, |c| {
            real(c, |w, m| in_tokio(abi::path_unlink_file(w, m, fd, ptr, len)))?
        })
    })?;
    linker.func_wrap(
        W,
        "path_remove_directory",
        |mut c: Caller<'_, GuestState>, fd: i32, ptr: i32, len: i32| -> R {
            namespace_op(&mut c, fd, ptr, len, FsOp::Rmdir, |c| {
                real(c, |w, m| in_tokio(abi::path_remove_directory(w, m, fd, ptr, len)))?
            })
        },
    )?;
    linker.func_wrap(
        W,
        "path_create_directory",
        |mut c: Caller<'_, GuestState>, fd: i32, ptr: i32, len: i32| -> R {
            namespace_op(&mut c, fd, ptr, len, FsOp::Mkdir, |c| {
                real(c, |w, m| in_tokio(abi::path_create_directory(w, m, fd, ptr, len)))?
            })
        },
    )?;
    linker.func_wrap(
        W,
        "path_rename",
        |mut c: Caller<'_, GuestState>,
         fd: i32,
         old_ptr: i32,
         old_len: i32,
         new_fd: i32,
         new_ptr: i32,
         new_len: i32|
         -> R {
            let call_local = |c: &mut Caller<'_, GuestState>| {
                real(c, |w, m| in_tokio(abi::path_rename(w, m, fd, old_ptr, old_len, new_fd, new_ptr, new_len)))?
            };
            let (Some(old), Some(new)) = (read_str(&mut c, old_ptr, old_len)?, read_str(&mut c, new_ptr, new_len)?)
            else {
                return call_local(&mut c);
            };
            let s = ssi(&mut c);
            let (Some(old), Some(new)) = (s.resolve(fd as u32, &old), s.resolve(new_fd as u32, &new)) else {
                return fail(ERRNO_NOTCAPABLE);
            };
            if old.is_empty() || new.is_empty() {
                return fail(errno::PERM);
            }
            // What is being written under the old name goes home first, so the home can move
            // it; the mirror needs the source (and the target's directory) to move it locally.
            let prepared = s
                .flush_under(&old)
                .and_then(|()| s.sync(&old))
                .and_then(|()| s.ensure_parent(&new))
                .and_then(|()| s.host.fs_op(&FsOp::Rename(old.clone(), new.clone())));
            if let Err(e) = prepared {
                return fail(e);
            }
            s.moved(&old, &new);
            let _ = call_local(&mut c)?;
            Ok(0)
        },
    )?;

    // The `vmgrid` import module, as DESIGN.md gives it.
    linker.func_wrap(
        "vmgrid",
        "spawn",
        |mut c: Caller<'_, GuestState>, argv_ptr: i32, argv_len: i32, pid_out: i32| -> R {
            if argv_len as u32 as usize > MAX_ARGV_BYTES {
                return fail(errno::INVAL);
            }
            let Some(bytes) = read_bytes(&mut c, argv_ptr, argv_len)? else { return fail(errno::FAULT) };
            let mut argv = Vec::new();
            for part in bytes.strip_suffix(&[0]).unwrap_or(&bytes).split(|b| *b == 0) {
                match std::str::from_utf8(part) {
                    Ok(s) => argv.push(s.to_string()),
                    Err(_) => return fail(errno::INVAL),
                }
            }
            if argv.first().is_none_or(|a| a.is_empty()) {
                return fail(errno::INVAL);
            }
            let host = ssi(&mut c).host.clone();
            match host.spawn(argv) {
                Ok(pid) => {
                    if !write_bytes(&mut c, pid_out, &(pid as i64).to_le_bytes())? {
                        return fail(errno::FAULT);
                    }
                    Ok(0)
                }
                Err(e) => fail(e),
            }
        },
    )?;
    linker.func_wrap("vmgrid", "wait", |mut c: Caller<'_, GuestState>, pid: i64, status_out: i32| -> R {
        let host = ssi(&mut c).host.clone();
        match host.wait(pid) {
            Ok(status) => {
                if !write_bytes(&mut c, status_out, &status.to_le_bytes())? {
                    return fail(errno::FAULT);
                }
                Ok(0)
            }
            Err(e) => fail(e),
        }
    })?;
    linker.func_wrap("vmgrid", "getpid", |mut c: Caller<'_, GuestState>, pid_out: i32| -> R {
        let pid = ssi(&mut c).host.pid() as i64;
        if !write_bytes(&mut c, pid_out, &pid.to_le_bytes())? {
            return fail(errno::FAULT);
        }
        Ok(0)
    })?;
    linker.allow_shadowing(false);
    Ok(())
}
