//! Where wasmtime-wasi's preview-1 calls answer differently from Linux, a job gets Linux's
//! answer: trailing slashes (`unlink("file/")` is `ENOTDIR` and `unlink("link-to-dir/")` too,
//! `rmdir("dir/")` removes it, `symlink(t, "file/")` is `EEXIST`, `lstat("link/")` follows), and
//! `O_DIRECTORY|O_NOFOLLOW` on a link is `ENOTDIR`. `sock_shutdown` answers without a socket layer
//! (`EBADF` for a descriptor that is not open, `ENOTSOCK` for one that is). Each call still goes
//! through wasmtime-wasi's own implementation, which alone decides what a path can reach: these
//! only take a trailing slash off or look at what the path names first, never widen access.
//!
//! The calls that make something in the job directory (a file by `path_open` with `O_CREAT`, a
//! directory, a symlink, a hard link, a rename's new name) are noted in `GuestState::created`,
//! before they run: a guest that made none left a directory it found empty as it was.

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::abi::{
    FILESTAT_TYPE, FILETYPE_DIRECTORY, FILETYPE_SYMBOLIC_LINK, LOOKUP_FOLLOW, O_CREAT, O_DIRECTORY, R, W, fail,
    filestat, read_str, real, scratch, wasi,
};
use crate::ssi::errno;
use crate::wasm::GuestState;

/// Adds the calls to a linker that already has WASI preview 1 (the SSI linker shadows the path
/// calls again, with its own).
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(W, "path_unlink_file", unlink)?;
    linker.func_wrap(W, "path_remove_directory", rmdir)?;
    linker.func_wrap(W, "path_filestat_get", |mut c: Caller<'_, GuestState>, fd, flags, ptr, len, out| {
        path_filestat_get(&mut c, fd, flags, ptr, len, out)
    })?;
    linker.func_wrap(W, "path_symlink", symlink)?;
    linker.func_wrap(W, "path_open", path_open)?;
    linker.func_wrap(W, "sock_shutdown", sock_shutdown)?;
    linker.func_wrap(W, "path_create_directory", |mut c: Caller<'_, GuestState>, fd: i32, p: i32, n: i32| -> R {
        c.data_mut().created = true;
        real(&mut c, |w, m| in_tokio(abi::path_create_directory(w, m, fd, p, n)))?
    })?;
    linker.func_wrap(
        W,
        "path_link",
        |mut c: Caller<'_, GuestState>,
         fd: i32,
         flags: i32,
         old: i32,
         old_len: i32,
         fd2: i32,
         new: i32,
         new_len: i32|
         -> R {
            c.data_mut().created = true;
            real(&mut c, |w, m| in_tokio(abi::path_link(w, m, fd, flags, old, old_len, fd2, new, new_len)))?
        },
    )?;
    linker.func_wrap(
        W,
        "path_rename",
        |mut c: Caller<'_, GuestState>, fd: i32, old: i32, old_len: i32, fd2: i32, new: i32, new_len: i32| -> R {
            c.data_mut().created = true;
            real(&mut c, |w, m| in_tokio(abi::path_rename(w, m, fd, old, old_len, fd2, new, new_len)))?
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `path` without its trailing slashes, if it had some (and is more than slashes).
pub(crate) fn strip_slash(path: &str) -> Option<&str> {
    let s = path.trim_end_matches('/');
    (s.len() < path.len() && !s.is_empty()).then_some(s)
}

fn unlink(mut c: Caller<'_, GuestState>, fd: i32, ptr: i32, len: i32) -> R {
    if let Some(path) = read_str(&mut c, ptr, len)?
        && let Some(name) = strip_slash(&path)
    {
        // Linux looks at what the name is without following it: a directory is `EISDIR`,
        // anything else `ENOTDIR`.
        return match filestat(wasi(&mut c), fd, 0, name)? {
            Ok(st) if st[FILESTAT_TYPE] == FILETYPE_DIRECTORY => fail(errno::ISDIR),
            Ok(_) => fail(errno::NOTDIR),
            Err(e) => fail(e),
        };
    }
    real(&mut c, |w, m| in_tokio(abi::path_unlink_file(w, m, fd, ptr, len)))?
}

fn rmdir(mut c: Caller<'_, GuestState>, fd: i32, ptr: i32, len: i32) -> R {
    if let Some(path) = read_str(&mut c, ptr, len)?
        && let Some(name) = strip_slash(&path)
    {
        let (r, _) = scratch(wasi(&mut c), &[name], 0, |w, m, p, _| {
            in_tokio(abi::path_remove_directory(w, m, fd, p[0].0, p[0].1))
        });
        return r;
    }
    real(&mut c, |w, m| in_tokio(abi::path_remove_directory(w, m, fd, ptr, len)))?
}

/// `path_filestat_get`, for the linker and for `determinism`, which shadows it again.
pub(crate) fn path_filestat_get(
    c: &mut Caller<'_, GuestState>,
    fd: i32,
    flags: i32,
    ptr: i32,
    len: i32,
    out: i32,
) -> R {
    // A trailing slash asks for what the link names, as `stat` does.
    let slash = read_str(c, ptr, len)?.is_some_and(|p| strip_slash(&p).is_some());
    let flags = if slash { flags | LOOKUP_FOLLOW } else { flags };
    real(c, |w, m| in_tokio(abi::path_filestat_get(w, m, fd, flags, ptr, len, out)))?
}

fn symlink(mut c: Caller<'_, GuestState>, old: i32, old_len: i32, fd: i32, new: i32, new_len: i32) -> R {
    c.data_mut().created = true;
    if let Some(path) = read_str(&mut c, new, new_len)?
        && let Some(name) = strip_slash(&path)
    {
        // Something there is `EEXIST`; nothing, `ENOENT` (a link cannot be a directory).
        return match filestat(wasi(&mut c), fd, 0, name)? {
            Ok(_) => fail(errno::EXIST),
            Err(e) => fail(e),
        };
    }
    real(&mut c, |w, m| in_tokio(abi::path_symlink(w, m, old, old_len, fd, new, new_len)))?
}

#[allow(clippy::too_many_arguments)]
fn path_open(
    mut c: Caller<'_, GuestState>,
    fd: i32,
    dirflags: i32,
    ptr: i32,
    len: i32,
    oflags: i32,
    rights: i64,
    inheriting: i64,
    fdflags: i32,
    fd_out: i32,
) -> R {
    if oflags & O_CREAT != 0 {
        c.data_mut().created = true;
    }
    let r = real(&mut c, |w, m| {
        in_tokio(abi::path_open(w, m, fd, dirflags, ptr, len, oflags, rights, inheriting, fdflags, fd_out))
    })??;
    if r == errno::LOOP as i32
        && oflags & O_DIRECTORY != 0
        && dirflags & LOOKUP_FOLLOW == 0
        && let Some(path) = read_str(&mut c, ptr, len)?
        && let Ok(st) = filestat(wasi(&mut c), fd, 0, &path)?
        && st[FILESTAT_TYPE] == FILETYPE_SYMBOLIC_LINK
    {
        // A link where a directory must be: Linux says it is not one.
        return fail(errno::NOTDIR);
    }
    Ok(r)
}

#[cfg(test)]
mod tests;

fn sock_shutdown(mut c: Caller<'_, GuestState>, fd: i32, how: i32) -> R {
    let (r, _) = scratch(wasi(&mut c), &[], 24, |w, m, _, out| in_tokio(abi::fd_fdstat_get(w, m, fd, out)));
    match r? {
        0 if how & !3 != 0 => fail(errno::INVAL),
        0 => fail(errno::NOTSOCK),
        e => Ok(e),
    }
}
