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

/// The longest argv a process may pass to `spawn`.
const MAX_ARGV_BYTES: usize = 64 * 1024;

/// Per-process state of the mirror.
pub(crate) struct SsiFs {
    pub(crate) host: Arc<dyn SsiHost>,
    root: PathBuf,
    /// Directory descriptors the process opened, by their SSI path ("" is the root).
    dirs: HashMap<u32, String>,
    /// Files held in the mirror, with the version the home gave them.
    versions: HashMap<String, String>,
    /// Descriptors open for writing, by SSI path: closing one writes the file back.
    written: HashMap<u32, String>,
}

impl SsiFs {
    pub(crate) fn new(host: Arc<dyn SsiHost>, root: PathBuf) -> SsiFs {
        SsiFs { host, root, dirs: HashMap::new(), versions: HashMap::new(), written: HashMap::new() }
    }

    /// The SSI path that `path`, relative to descriptor `dirfd`, names; `None` if it is not one
    /// of ours or leaves the root (wasmtime-wasi then refuses it on its own).
    fn resolve(&self, dirfd: u32, path: &str) -> Option<String> {
        let base = if dirfd == ROOT_FD { "" } else { self.dirs.get(&dirfd)?.as_str() };
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

    fn local(&self, path: &str) -> PathBuf {
        if path.is_empty() { self.root.clone() } else { self.root.join(path) }
    }

    fn open_for_writing(&self, path: &str) -> bool {
        self.written.values().any(|p| p == path)
    }

    /// Brings the mirror's copy of `path` up to date with the home (open of close-to-open).
    fn sync(&mut self, path: &str) -> Result<(), Errno> {
        if self.open_for_writing(path) {
            // This process is writing it: its own copy is the newest.
            return Ok(());
        }
        let local = self.local(path);
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
        if self.local(parent).is_dir() {
            return Ok(());
        }
        self.ensure_parent(parent)?;
        self.sync(parent)
    }

    /// Writes `path` back to the home (close of close-to-open).
    fn write_back(&mut self, path: &str) -> Result<(), Errno> {
        let bytes = std::fs::read(self.local(path)).map_err(|_| errno::IO)?;
        let version = self.host.store(path, bytes)?;
        self.versions.insert(path.to_string(), version);
        Ok(())
    }

    /// At exit the process's descriptors close, so what it wrote goes home.
    pub(crate) fn close_all(&mut self) -> Result<(), Errno> {
        let mut paths: Vec<String> = self.written.drain().map(|(_, p)| p).collect();
        paths.sort();
        paths.dedup();
        let mut result = Ok(());
        for p in paths {
            if let Err(e) = self.write_back(&p) {
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
            let path = read_str(&mut c, path_ptr, path_len)?;
            let target = path.and_then(|p| ssi(&mut c).resolve(dirfd as u32, &p));
            if let Some(p) = &target {
                let fresh = oflags & OFLAGS_CREAT != 0 && oflags & OFLAGS_TRUNC != 0 && oflags & OFLAGS_EXCL == 0;
                let synced = if fresh { ssi(&mut c).ensure_parent(p) } else { ssi(&mut c).sync(p) };
                if let Err(e) = synced.and_then(|()| ssi(&mut c).ensure_parent(p)) {
                    return fail(e);
                }
            }
            let r = real(&mut c, |w, m| {
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
            })??;
            if let (0, Some(p)) = (r, target) {
                let fd = read_bytes(&mut c, fd_out, 4)?.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                if let Some(fd) = fd {
                    let s = ssi(&mut c);
                    if s.local(&p).is_dir() {
                        s.dirs.insert(fd, p);
                    } else if rights_base & RIGHT_FD_WRITE != 0 || oflags & (OFLAGS_CREAT | OFLAGS_TRUNC) != 0 {
                        s.written.insert(fd, p);
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
        let s = ssi(&mut c);
        s.dirs.remove(&(fd as u32));
        if let Some(p) = s.written.remove(&(fd as u32)) {
            if !s.open_for_writing(&p) {
                if let Err(e) = s.write_back(&p) {
                    return fail(e);
                }
            }
        }
        Ok(0)
    })?;
    linker.func_wrap(
        W,
        "path_filestat_get",
        |mut c: Caller<'_, GuestState>, dirfd: i32, flags: i32, path_ptr: i32, path_len: i32, out: i32| -> R {
            let path = read_str(&mut c, path_ptr, path_len)?;
            if let Some(p) = path.and_then(|p| ssi(&mut c).resolve(dirfd as u32, &p)) {
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
        let path = read_str(c, path_ptr, path_len)?;
        let Some(p) = path.and_then(|p| ssi(c).resolve(dirfd as u32, &p)) else { return local(c) };
        if p.is_empty() {
            return fail(errno::PERM);
        }
        if let Err(e) = ssi(c).host.fs_op(&op(p.clone())) {
            return fail(e);
        }
        ssi(c).versions.remove(&p);
        if let Err(e) = ssi(c).ensure_parent(&p) {
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
            let old = read_str(&mut c, old_ptr, old_len)?.and_then(|p| ssi(&mut c).resolve(fd as u32, &p));
            let new = read_str(&mut c, new_ptr, new_len)?.and_then(|p| ssi(&mut c).resolve(new_fd as u32, &p));
            let call_local = |c: &mut Caller<'_, GuestState>| {
                real(c, |w, m| in_tokio(abi::path_rename(w, m, fd, old_ptr, old_len, new_fd, new_ptr, new_len)))?
            };
            let (Some(old), Some(new)) = (old, new) else { return call_local(&mut c) };
            if old.is_empty() || new.is_empty() {
                return fail(errno::PERM);
            }
            // The mirror needs the source to rename it locally.
            if let Err(e) = ssi(&mut c).sync(&old) {
                return fail(e);
            }
            if let Err(e) = ssi(&mut c).host.fs_op(&FsOp::Rename(old.clone(), new.clone())) {
                return fail(e);
            }
            if let Err(e) = ssi(&mut c).ensure_parent(&new) {
                return fail(e);
            }
            let s = ssi(&mut c);
            if let Some(v) = s.versions.remove(&old) {
                s.versions.insert(new, v);
            }
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
