//! The shadowed `wasi_snapshot_preview1` calls of an SSI process: each does its part at the home
//! (validate or fetch on open, the namespace change itself), then runs wasmtime-wasi's own call
//! on the mirror. Nothing here follows a path out of the mirror: paths resolve against the
//! process's own directory descriptors, and the mirror's host paths refuse links.

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::{ROOT_FD, SsiFs, Writer, imports, stamp};
use crate::ssi::{Errno, FsOp, errno};
use crate::wasm::GuestState;

const OFLAGS_CREAT: i32 = 1;
const OFLAGS_EXCL: i32 = 4;
const OFLAGS_TRUNC: i32 = 8;
const RIGHT_FD_WRITE: i64 = 1 << 6;
const ERRNO_NOTSUP: Errno = 58;
const ERRNO_NOTCAPABLE: Errno = 76;
const W: &str = "wasi_snapshot_preview1";

pub(super) type R = wasmtime::Result<i32>;

fn memory(caller: &mut Caller<'_, GuestState>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("the module exports no memory"))
}

pub(super) fn read_bytes(caller: &mut Caller<'_, GuestState>, ptr: i32, len: i32) -> wasmtime::Result<Option<Vec<u8>>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    Ok(mem.data(&caller).get(ptr..ptr.saturating_add(len)).map(|b| b.to_vec()))
}

fn read_str(caller: &mut Caller<'_, GuestState>, ptr: i32, len: i32) -> wasmtime::Result<Option<String>> {
    Ok(read_bytes(caller, ptr, len)?.and_then(|b| String::from_utf8(b).ok()))
}

pub(super) fn write_bytes(caller: &mut Caller<'_, GuestState>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<bool> {
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

pub(super) fn ssi<'a>(caller: &'a mut Caller<'_, GuestState>) -> &'a mut SsiFs {
    caller.data_mut().ssi.as_mut().expect("the SSI linker only runs SSI processes")
}

pub(super) fn fail(e: Errno) -> R {
    Ok(e as i32)
}

/// Adds the SSI calls to a linker that already has WASI preview 1.
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(W, "path_open", path_open)?;
    linker.func_wrap(W, "fd_close", fd_close)?;
    linker.func_wrap(W, "fd_renumber", fd_renumber)?;
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
    linker.func_wrap(W, "path_filestat_get", path_filestat_get)?;
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
    linker.func_wrap(W, "path_rename", path_rename)?;
    imports::add(linker)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `path_open`: the mirror's copy is brought up to date first (or, for `O_CREAT|O_EXCL`, the
/// home creates the file), then wasmtime-wasi opens it; a descriptor that may write is tracked.
#[allow(clippy::too_many_arguments)]
fn path_open(
    mut c: Caller<'_, GuestState>,
    dirfd: i32,
    dirflags: i32,
    path_ptr: i32,
    path_len: i32,
    oflags: i32,
    rights_base: i64,
    rights_inheriting: i64,
    fdflags: i32,
    fd_out: i32,
) -> R {
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
    let (creat, excl, trunc) = (oflags & OFLAGS_CREAT != 0, oflags & OFLAGS_EXCL != 0, oflags & OFLAGS_TRUNC != 0);
    if let Err(e) = prepare_open(ssi(&mut c), &p, creat, excl, trunc) {
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
    if r != 0 {
        return Ok(r);
    }
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
    Ok(r)
}

fn prepare_open(s: &mut SsiFs, p: &str, creat: bool, excl: bool, trunc: bool) -> Result<(), Errno> {
    if creat && excl {
        // Exclusive across the machine: the home creates it, or says it exists.
        s.sync(p).and_then(|()| s.ensure_parent(p)).and_then(|()| s.host.fs_op(&FsOp::Create(p.to_string())))
    } else if creat && trunc {
        // Replaced whole: no need to fetch what is there.
        s.ensure_parent(p)
    } else {
        s.sync(p).and_then(|()| s.ensure_parent(p))
    }
}

fn fd_close(mut c: Caller<'_, GuestState>, fd: i32) -> R {
    let r = real(&mut c, |w, m| in_tokio(abi::fd_close(w, m, fd)))??;
    if r != 0 {
        return Ok(r);
    }
    match ssi(&mut c).closed(fd as u32) {
        Ok(()) => Ok(0),
        Err(e) => fail(e),
    }
}

fn fd_renumber(mut c: Caller<'_, GuestState>, from: i32, to: i32) -> R {
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
}

fn path_filestat_get(
    mut c: Caller<'_, GuestState>,
    dirfd: i32,
    flags: i32,
    path_ptr: i32,
    path_len: i32,
    out: i32,
) -> R {
    if let Some(path) = read_str(&mut c, path_ptr, path_len)? {
        let Some(p) = ssi(&mut c).resolve(dirfd as u32, &path) else { return fail(ERRNO_NOTCAPABLE) };
        if let Err(e) = ssi(&mut c).sync(&p) {
            return fail(e);
        }
    }
    real(&mut c, |w, m| in_tokio(abi::path_filestat_get(w, m, dirfd, flags, path_ptr, path_len, out)))?
}

/// Namespace changes: at the home first (it decides), then in the mirror.
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

/// `path_rename`: what is being written under the old name goes home first, so the home can move
/// it; the mirror needs the source (and the target's directory) to move it locally.
fn path_rename(
    mut c: Caller<'_, GuestState>,
    fd: i32,
    old_ptr: i32,
    old_len: i32,
    new_fd: i32,
    new_ptr: i32,
    new_len: i32,
) -> R {
    let call_local = |c: &mut Caller<'_, GuestState>| {
        real(c, |w, m| in_tokio(abi::path_rename(w, m, fd, old_ptr, old_len, new_fd, new_ptr, new_len)))?
    };
    let (Some(old), Some(new)) = (read_str(&mut c, old_ptr, old_len)?, read_str(&mut c, new_ptr, new_len)?) else {
        return call_local(&mut c);
    };
    let s = ssi(&mut c);
    let (Some(old), Some(new)) = (s.resolve(fd as u32, &old), s.resolve(new_fd as u32, &new)) else {
        return fail(ERRNO_NOTCAPABLE);
    };
    if old.is_empty() || new.is_empty() {
        return fail(errno::PERM);
    }
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
}
