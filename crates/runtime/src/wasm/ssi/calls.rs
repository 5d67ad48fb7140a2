//! The shadowed `wasi_snapshot_preview1` calls of an SSI process that open, stat or hold
//! descriptors: each has the home resolve its path and brings the mirror up to date (validate or
//! fetch on open), then runs wasmtime-wasi's own call on the mirror with the resolved path. A
//! link that is not followed is answered from the mirror's record of it. Nothing here follows a
//! path out of the mirror: the home resolves beneath the descriptor's directory, and what comes
//! back names no link.

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::{SsiFs, Writer, imports, join, names, rel, stamp};
use crate::ssi::{At, Errno, Found, FsOp, Kind, Payload, errno};
use crate::wasm::GuestState;
use crate::wasm::abi::{
    FILESTAT_LEN, FILESTAT_SIZE, FILESTAT_TYPE, FILETYPE_SYMBOLIC_LINK, LOOKUP_FOLLOW, O_CREAT, O_DIRECTORY, O_EXCL,
    O_TRUNC, R, RIGHT_FD_WRITE, W, fail, read_bytes, read_str, real, scratch, wasi, write_bytes,
};

pub(super) fn ssi<'a>(caller: &'a mut Caller<'_, GuestState>) -> &'a mut SsiFs {
    caller.data_mut().ssi.as_mut().expect("the SSI linker only runs SSI processes")
}

/// The SSI path of directory descriptor `fd`, if it is one of ours.
pub(super) fn base(caller: &mut Caller<'_, GuestState>, fd: i32) -> Option<String> {
    ssi(caller).dirs.get(&(fd as u32)).cloned()
}

/// Adds the SSI calls to a linker that already has WASI preview 1.
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(W, "path_open", path_open)?;
    linker.func_wrap(W, "fd_close", fd_close)?;
    linker.func_wrap(W, "fd_renumber", fd_renumber)?;
    linker.func_wrap(W, "fd_readdir", fd_readdir)?;
    linker.func_wrap(W, "path_filestat_get", path_filestat_get)?;
    linker.func_wrap(W, "path_filestat_set_times", path_filestat_set_times)?;
    linker.func_wrap(W, "path_readlink", path_readlink)?;
    names::add(linker)?;
    imports::add(linker)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// What an open names, the mirror made ready for it: the home creates the file first for
/// `O_CREAT|O_EXCL`.
fn prepare_open(s: &mut SsiFs, at: At, follow: bool, oflags: i32) -> Result<Found, Errno> {
    let (creat, excl, trunc) = (oflags & O_CREAT != 0, oflags & O_EXCL != 0, oflags & O_TRUNC != 0);
    if creat && at.path.ends_with('/') {
        return Err(errno::ISDIR);
    }
    if creat && excl {
        // Exclusive across the machine: the home creates it, or says it exists.
        let moved = s.host.fs_op(&FsOp::Create { at })?;
        let found = Found { path: moved.path, kind: Kind::Missing, payload: Payload::None };
        s.apply(&found)?;
        return Ok(found);
    }
    // A file replaced whole (`O_CREAT|O_TRUNC`) is resolved, not fetched: a directory on its
    // way may have become a link since this mirror last looked.
    s.lookup(at, follow, !(creat && trunc))
}

/// `path_open`: the path resolved at the home and the mirror brought up to date, then
/// wasmtime-wasi opens the resolved path; a descriptor that may write is tracked.
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
    let (Some(path), Some(base)) = (read_str(&mut c, path_ptr, path_len)?, base(&mut c, dirfd)) else {
        return real(&mut c, |w, m| {
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
        })?;
    };
    let follow = dirflags & LOOKUP_FOLLOW != 0;
    let s = ssi(&mut c);
    let found = match prepare_open(s, At { base: base.clone(), path }, follow, oflags) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    match found.kind {
        // A link that is not to be followed, as Linux answers for one.
        Kind::Link(_) => return fail(if oflags & O_DIRECTORY != 0 { errno::NOTDIR } else { errno::LOOP }),
        Kind::Missing if oflags & O_CREAT == 0 => return fail(errno::NOENT),
        _ => {}
    }
    let p = found.path;
    let Ok(rel) = rel(&base, &p) else { return fail(errno::IO) };
    let before = if oflags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL {
        None
    } else {
        s.versions.get(&p).and(s.local(&p).ok()).and_then(|l| stamp(&l))
    };
    let (r, out) = scratch(wasi(&mut c), &[&rel], 4, |w, m, ptrs, out| {
        let (ptr, len) = ptrs[0];
        in_tokio(abi::path_open(w, m, dirfd, dirflags, ptr, len, oflags, rights_base, rights_inheriting, fdflags, out))
    });
    let r = r?;
    if r != 0 {
        return Ok(r);
    }
    let fd = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
    if !write_bytes(&mut c, fd_out, &out)? {
        let _ = real(&mut c, |w, m| in_tokio(abi::fd_close(w, m, fd as i32)))?;
        return fail(errno::FAULT);
    }
    let s = ssi(&mut c);
    if s.local(&p).is_ok_and(|l| l.is_dir()) {
        s.dirs.insert(fd, p);
    } else if rights_base & RIGHT_FD_WRITE != 0 || oflags & (O_CREAT | O_TRUNC) != 0 {
        // After an exclusive create the home has the empty file already.
        let before =
            if before.is_none() && oflags & O_EXCL != 0 { s.local(&p).ok().and_then(|l| stamp(&l)) } else { before };
        s.written.insert(fd, Writer { path: p, before });
    }
    Ok(r)
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
    let r = real(&mut c, |w, m| in_tokio(abi::fd_renumber(w, m, from, to)))??;
    if r != 0 {
        return Ok(r);
    }
    match ssi(&mut c).renumbered(from as u32, to as u32) {
        Ok(()) => Ok(0),
        Err(e) => fail(e),
    }
}

/// `fd_readdir` of the mirror, with the entries that are the home's links typed as links.
fn fd_readdir(mut c: Caller<'_, GuestState>, fd: i32, buf: i32, buf_len: i32, cookie: i64, used_out: i32) -> R {
    let r = real(&mut c, |w, m| in_tokio(abi::fd_readdir(w, m, fd, buf, buf_len, cookie, used_out)))??;
    let Some(dir) = base(&mut c, fd).filter(|d| r == 0 && ssi(&mut c).links.keys().any(|l| super::parent_of(l) == d))
    else {
        return Ok(r);
    };
    let Some(used) = read_bytes(&mut c, used_out, 4)? else { return Ok(r) };
    let used = u32::from_le_bytes([used[0], used[1], used[2], used[3]]) as usize;
    let Some(bytes) = read_bytes(&mut c, buf, used as i32)? else { return Ok(r) };
    // Each entry: next (8), ino (8), name length (4), type (1), padding (3), then the name.
    let mut at = 0;
    while at + 24 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[at + 16], bytes[at + 17], bytes[at + 18], bytes[at + 19]]) as usize;
        let Some(name) = bytes.get(at + 24..at + 24 + len).and_then(|n| std::str::from_utf8(n).ok()) else { break };
        if ssi(&mut c).links.contains_key(&join(&dir, name)) {
            write_bytes(&mut c, buf.wrapping_add((at + 20) as i32), &[FILETYPE_SYMBOLIC_LINK])?;
        }
        at += 24 + len;
    }
    Ok(r)
}

/// The lookup for a call on an existing path, and its resolved path relative to `base`.
fn existing(c: &mut Caller<'_, GuestState>, base: &str, path: String, follow: bool) -> Result<(Found, String), Errno> {
    let found = ssi(c).lookup(At { base: base.to_string(), path }, follow, true)?;
    if found.kind == Kind::Missing {
        return Err(errno::NOENT);
    }
    let rel = rel(base, &found.path)?;
    Ok((found, rel))
}

fn path_filestat_get(
    mut c: Caller<'_, GuestState>,
    dirfd: i32,
    flags: i32,
    path_ptr: i32,
    path_len: i32,
    out: i32,
) -> R {
    let (Some(path), Some(base)) = (read_str(&mut c, path_ptr, path_len)?, base(&mut c, dirfd)) else {
        return real(&mut c, |w, m| in_tokio(abi::path_filestat_get(w, m, dirfd, flags, path_ptr, path_len, out)))?;
    };
    // A trailing slash asks for what a link names, as `stat` does.
    let follow = flags & LOOKUP_FOLLOW != 0 || path.ends_with('/');
    let (found, rel) = match existing(&mut c, &base, path, follow) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let (r, mut st) = scratch(wasi(&mut c), &[&rel], FILESTAT_LEN, |w, m, p, o| {
        in_tokio(abi::path_filestat_get(w, m, dirfd, 0, p[0].0, p[0].1, o))
    });
    let r = r?;
    if r != 0 {
        return Ok(r);
    }
    if let Kind::Link(target) = &found.kind {
        // The placeholder's times, the link's type and size.
        st[FILESTAT_TYPE] = FILETYPE_SYMBOLIC_LINK;
        st[FILESTAT_SIZE..FILESTAT_SIZE + 8].copy_from_slice(&(target.len() as u64).to_le_bytes());
    }
    if !write_bytes(&mut c, out, &st)? {
        return fail(errno::FAULT);
    }
    Ok(0)
}

/// Times are the mirror's own (they do not go home), set on what the path resolves to.
#[allow(clippy::too_many_arguments)]
fn path_filestat_set_times(
    mut c: Caller<'_, GuestState>,
    dirfd: i32,
    flags: i32,
    path_ptr: i32,
    path_len: i32,
    atim: i64,
    mtim: i64,
    fst: i32,
) -> R {
    let (Some(path), Some(base)) = (read_str(&mut c, path_ptr, path_len)?, base(&mut c, dirfd)) else {
        return real(&mut c, |w, m| {
            in_tokio(abi::path_filestat_set_times(w, m, dirfd, flags, path_ptr, path_len, atim, mtim, fst))
        })?;
    };
    let follow = flags & LOOKUP_FOLLOW != 0 || path.ends_with('/');
    let rel = match existing(&mut c, &base, path, follow) {
        Ok((_, rel)) => rel,
        Err(e) => return fail(e),
    };
    let (r, _) = scratch(wasi(&mut c), &[&rel], 0, |w, m, p, _| {
        in_tokio(abi::path_filestat_set_times(w, m, dirfd, 0, p[0].0, p[0].1, atim, mtim, fst))
    });
    r
}

/// `path_readlink`, answered by the home: the target, cut to the buffer as POSIX does.
fn path_readlink(
    mut c: Caller<'_, GuestState>,
    dirfd: i32,
    path_ptr: i32,
    path_len: i32,
    buf: i32,
    buf_len: i32,
    used_out: i32,
) -> R {
    let (Some(path), Some(base)) = (read_str(&mut c, path_ptr, path_len)?, base(&mut c, dirfd)) else {
        return real(&mut c, |w, m| {
            in_tokio(abi::path_readlink(w, m, dirfd, path_ptr, path_len, buf, buf_len, used_out))
        })?;
    };
    let target = match ssi(&mut c).lookup(At { base, path }, false, false) {
        Ok(Found { kind: Kind::Link(t), .. }) => t,
        Ok(Found { kind: Kind::Missing, .. }) => return fail(errno::NOENT),
        Ok(_) => return fail(errno::INVAL),
        Err(e) => return fail(e),
    };
    let n = target.len().min(buf_len as u32 as usize);
    if !write_bytes(&mut c, buf, &target.as_bytes()[..n])? || !write_bytes(&mut c, used_out, &(n as u32).to_le_bytes())?
    {
        return fail(errno::FAULT);
    }
    Ok(0)
}
