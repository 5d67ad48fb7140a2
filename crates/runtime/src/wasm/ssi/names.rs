//! The shadowed namespace changes of an SSI process (`mkdir`, `rmdir`, `unlink`, `rename`,
//! `symlink`, `link`): the home does each first and decides (it resolves the path, and never
//! follows a link in the last component), then the mirror follows with plain host calls on the
//! resolved paths, which name no link. A link the home made is a placeholder in the mirror, never
//! a host symlink.

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::SsiFs;
use super::calls::{base, ssi};
use crate::ssi::{At, Errno, FsOp, Moved, errno};
use crate::wasm::GuestState;
use crate::wasm::abi::{LOOKUP_FOLLOW, R, W, fail, read_bytes, read_str, real, scratch, wasi};

pub(super) fn add(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.func_wrap(W, "path_create_directory", |mut c: Caller<'_, GuestState>, fd: i32, p: i32, n: i32| -> R {
        match target(&mut c, fd, p, n)? {
            Some(at) => change(ssi(&mut c), &FsOp::Mkdir { at }, |s, m| s.mirror_dirs(&m.path)),
            None => real(&mut c, |w, m| in_tokio(abi::path_create_directory(w, m, fd, p, n)))?,
        }
    })?;
    linker.func_wrap(W, "path_remove_directory", |mut c: Caller<'_, GuestState>, fd: i32, p: i32, n: i32| -> R {
        match target(&mut c, fd, p, n)? {
            Some(at) => change(ssi(&mut c), &FsOp::Rmdir { at }, gone),
            None => real(&mut c, |w, m| in_tokio(abi::path_remove_directory(w, m, fd, p, n)))?,
        }
    })?;
    linker.func_wrap(W, "path_unlink_file", |mut c: Caller<'_, GuestState>, fd: i32, p: i32, n: i32| -> R {
        match target(&mut c, fd, p, n)? {
            Some(at) => unlink(ssi(&mut c), at),
            None => real(&mut c, |w, m| in_tokio(abi::path_unlink_file(w, m, fd, p, n)))?,
        }
    })?;
    linker.func_wrap(W, "path_symlink", path_symlink)?;
    linker.func_wrap(W, "path_rename", path_rename)?;
    linker.func_wrap(W, "path_link", path_link)?;
    Ok(())
}

/// The path argument, relative to one of our directory descriptors; `None` leaves the call to
/// wasmtime-wasi (a descriptor that is not a directory of ours, or a path that is not UTF-8).
fn target(c: &mut Caller<'_, GuestState>, fd: i32, ptr: i32, len: i32) -> wasmtime::Result<Option<At>> {
    let Some(path) = read_str(c, ptr, len)? else { return Ok(None) };
    Ok(base(c, fd).map(|base| At { base, path }))
}

/// Does `op` at the home, then `mirror` locally. The home's answer is the one that counts: the
/// mirror may simply not have held what changed.
fn change(s: &mut SsiFs, op: &FsOp, mirror: impl FnOnce(&mut SsiFs, &Moved) -> Result<(), Errno>) -> R {
    match s.host.fs_op(op) {
        Ok(moved) => {
            let _ = mirror(s, &moved);
            Ok(0)
        }
        Err(e) => fail(e),
    }
}

/// What was at `moved.path` is gone from the home.
fn gone(s: &mut SsiFs, moved: &Moved) -> Result<(), Errno> {
    s.remove_local(&moved.path);
    s.forget(&moved.path);
    Ok(())
}

fn unlink(s: &mut SsiFs, at: At) -> R {
    if let Some(lex) = super::lexical(&at)
        && !at.path.ends_with('/')
        && !s.link_on(&lex)
        && s.open_for_writing(&lex)
        && !s.versions.contains_key(&lex)
    {
        // Created here and not yet sent: the home has nothing to remove.
        s.forget(&lex);
        let _ = s.local(&lex).map(std::fs::remove_file);
        return Ok(0);
    }
    change(s, &FsOp::Unlink { at }, gone)
}

/// The errno for a call vmgrid does not hand to wasmtime-wasi: a string out of bounds (`EFAULT`)
/// or not UTF-8 (`EILSEQ`), or a descriptor that is not one of our directories (`EBADF` if it is
/// not open, else `ENOTDIR`: every directory descriptor of an SSI process is ours).
fn refused(c: &mut Caller<'_, GuestState>, fd: i32, strs: &[(i32, i32)]) -> R {
    for &(ptr, len) in strs {
        match read_bytes(c, ptr, len)? {
            None => return fail(errno::FAULT),
            Some(b) if std::str::from_utf8(&b).is_err() => return fail(errno::ILSEQ),
            Some(_) => {}
        }
    }
    let (r, _) = scratch(wasi(c), &[], 24, |w, m, _, out| in_tokio(abi::fd_fdstat_get(w, m, fd, out)));
    match r? {
        0 => fail(errno::NOTDIR),
        e => Ok(e),
    }
}

/// Files being written at or under what `at` names go home before the home moves or links it.
fn flush(s: &mut SsiFs, at: &At) -> Result<(), Errno> {
    if s.written.is_empty() {
        return Ok(());
    }
    let found = s.lookup(at.clone(), false, false)?;
    s.flush_under(&found.path)
}

fn path_symlink(mut c: Caller<'_, GuestState>, old: i32, old_len: i32, fd: i32, new: i32, new_len: i32) -> R {
    let (Some(target), Some(at)) = (read_str(&mut c, old, old_len)?, target(&mut c, fd, new, new_len)?) else {
        // Never wasmtime-wasi's own: it would make a host symlink in the mirror.
        return refused(&mut c, fd, &[(old, old_len), (new, new_len)]);
    };
    let op = FsOp::Symlink { at, target: target.clone() };
    change(ssi(&mut c), &op, |s, m| s.placeholder(&m.path, &target))
}

fn path_rename(mut c: Caller<'_, GuestState>, fd: i32, old: i32, old_len: i32, fd2: i32, new: i32, new_len: i32) -> R {
    let (Some(from), Some(to)) = (target(&mut c, fd, old, old_len)?, target(&mut c, fd2, new, new_len)?) else {
        return real(&mut c, |w, m| in_tokio(abi::path_rename(w, m, fd, old, old_len, fd2, new, new_len)))?;
    };
    let s = ssi(&mut c);
    if let Err(e) = flush(s, &from) {
        return fail(e);
    }
    change(s, &FsOp::Rename { at: from, to }, |s, m| {
        let to = m.to.as_deref().ok_or(errno::IO)?;
        s.mirror_dirs(super::parent_of(to))?;
        s.remove_local(to);
        let moved = std::fs::rename(s.local(&m.path)?, s.local(to)?);
        s.moved(&m.path, to);
        if moved.is_err() {
            // The mirror did not hold it: the next open fetches it.
            s.remove_local(to);
        }
        Ok(())
    })
}

/// `path_link`: a hard link at the home. Following a link in the source is refused (`EINVAL`),
/// as wasmtime refuses it.
#[allow(clippy::too_many_arguments)]
fn path_link(
    mut c: Caller<'_, GuestState>,
    fd: i32,
    flags: i32,
    old: i32,
    old_len: i32,
    fd2: i32,
    new: i32,
    new_len: i32,
) -> R {
    if flags & LOOKUP_FOLLOW != 0 {
        return fail(errno::INVAL);
    }
    let (Some(from), Some(to)) = (target(&mut c, fd, old, old_len)?, target(&mut c, fd2, new, new_len)?) else {
        return real(&mut c, |w, m| in_tokio(abi::path_link(w, m, fd, flags, old, old_len, fd2, new, new_len)))?;
    };
    let s = ssi(&mut c);
    if let Err(e) = flush(s, &from) {
        return fail(e);
    }
    change(s, &FsOp::Link { at: from, to }, |s, m| {
        let to = m.to.as_deref().ok_or(errno::IO)?;
        if let Some(target) = s.links.get(&m.path).cloned() {
            return s.placeholder(to, &target);
        }
        // The same file under both names here, as at the home, when the mirror holds it.
        let version = s.versions.get(&m.path).cloned().ok_or(errno::NOENT)?;
        s.mirror_dirs(super::parent_of(to))?;
        s.remove_local(to);
        std::fs::hard_link(s.local(&m.path)?, s.local(to)?).map_err(|_| errno::IO)?;
        s.versions.insert(to.to_string(), version);
        Ok(())
    })
}
