//! The WASI conformance test guest: raw `wasi_snapshot_preview1` calls, so that what it prints is
//! exactly what the runtime answered (no libc or std translation in between). It runs unchanged
//! as a job (`vmgrid run`, a pool job) and as an SSI process, so one script can be compared across
//! both modes. Each argument is one action, run in order; each prints one line,
//! `ACTION => RESULT`, where RESULT is `ok`, a value, or the WASI errno's name (`ENOENT`, …).
//! Paths are passed to the runtime as given, relative to the base directory: the preopen named
//! `/` (or, without one, the first preopen).
//!   preopens              the preopened directories: `3=/job 4=. 5=/`
//!   base:NAME             use the preopen named NAME as the base from here on
//!   symlink:TARGET:LINK   path_symlink            readlink:PATH   path_readlink
//!   link:OLD:NEW          path_link (no follow)   linkf:OLD:NEW   path_link, following OLD
//!   stat:PATH             path_filestat_get, following: `file 5`, `dir`, `link 3`
//!   lstat:PATH            path_filestat_get without following
//!   read:PATH             open (following) and read: the text
//!   readnf:PATH           open with O_NOFOLLOW and read
//!   opendir:PATH          open with O_DIRECTORY   opendirnf:PATH  the same with O_NOFOLLOW
//!   write:PATH:TEXT       open (create, truncate), write, close
//!   excl:PATH             open with O_CREAT|O_EXCL
//!   mkdir:PATH  rmdir:PATH  unlink:PATH  rename:FROM:TO
//!   ls:PATH               fd_readdir: `name/` (dir), `name@` (link), `name` (file), sorted
//!   shutdown:FD           sock_shutdown(FD, SHUT_RD)
//!   close:FD              fd_close

#[cfg(target_arch = "wasm32")]
mod wasi {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        pub fn fd_prestat_get(fd: u32, out: *mut u8) -> u16;
        pub fn fd_prestat_dir_name(fd: u32, buf: *mut u8, len: usize) -> u16;
        pub fn fd_close(fd: u32) -> u16;
        pub fn fd_read(fd: u32, iovs: *const u32, n: usize, nread: *mut usize) -> u16;
        pub fn fd_write(fd: u32, iovs: *const u32, n: usize, nwritten: *mut usize) -> u16;
        pub fn fd_readdir(fd: u32, buf: *mut u8, len: usize, cookie: u64, used: *mut usize) -> u16;
        pub fn path_open(
            fd: u32,
            dirflags: u32,
            path: *const u8,
            path_len: usize,
            oflags: u32,
            rights: u64,
            inheriting: u64,
            fdflags: u32,
            out: *mut u32,
        ) -> u16;
        pub fn path_symlink(old: *const u8, old_len: usize, fd: u32, new: *const u8, new_len: usize) -> u16;
        pub fn path_readlink(fd: u32, p: *const u8, p_len: usize, buf: *mut u8, len: usize, used: *mut usize) -> u16;
        pub fn path_link(fd: u32, flags: u32, old: *const u8, old_len: usize, fd2: u32, new: *const u8, new_len: usize) -> u16;
        pub fn path_filestat_get(fd: u32, flags: u32, p: *const u8, p_len: usize, out: *mut u8) -> u16;
        pub fn path_create_directory(fd: u32, p: *const u8, p_len: usize) -> u16;
        pub fn path_remove_directory(fd: u32, p: *const u8, p_len: usize) -> u16;
        pub fn path_unlink_file(fd: u32, p: *const u8, p_len: usize) -> u16;
        pub fn path_rename(fd: u32, old: *const u8, old_len: usize, fd2: u32, new: *const u8, new_len: usize) -> u16;
        pub fn sock_shutdown(fd: u32, how: u32) -> u16;
    }
}

const FOLLOW: u32 = 1;
const O_CREAT: u32 = 1;
const O_DIRECTORY: u32 = 2;
const O_EXCL: u32 = 4;
const O_TRUNC: u32 = 8;
const R_READ: u64 = 1 << 1;
const R_WRITE: u64 = 1 << 6;
const R_READDIR: u64 = 1 << 14;

type Res = Result<String, u16>;

fn name(e: u16) -> String {
    let n = match e {
        2 => "EACCES",
        8 => "EBADF",
        20 => "EEXIST",
        21 => "EFAULT",
        28 => "EINVAL",
        29 => "EIO",
        31 => "EISDIR",
        32 => "ELOOP",
        34 => "EMLINK",
        37 => "ENAMETOOLONG",
        44 => "ENOENT",
        52 => "ENOSYS",
        54 => "ENOTDIR",
        55 => "ENOTEMPTY",
        57 => "ENOTSOCK",
        58 => "ENOTSUP",
        63 => "EPERM",
        75 => "EXDEV",
        76 => "ENOTCAPABLE",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn check(e: u16) -> Result<(), u16> {
    if e == 0 { Ok(()) } else { Err(e) }
}

#[cfg(target_arch = "wasm32")]
mod calls {
    use super::*;

    /// The preopens, scanned from 3 up to the first descriptor that is not one.
    pub fn preopens() -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for fd in 3.. {
            let mut stat = [0u8; 8];
            // SAFETY: `stat` is 8 bytes, the size of a prestat.
            if unsafe { wasi::fd_prestat_get(fd, stat.as_mut_ptr()) } != 0 {
                break;
            }
            let len = u32::from_le_bytes([stat[4], stat[5], stat[6], stat[7]]) as usize;
            let mut buf = vec![0u8; len];
            // SAFETY: `buf` holds `len` bytes.
            if unsafe { wasi::fd_prestat_dir_name(fd, buf.as_mut_ptr(), len) } != 0 {
                break;
            }
            out.push((fd, String::from_utf8_lossy(&buf).into_owned()));
        }
        out
    }

    pub fn open(base: u32, path: &str, dirflags: u32, oflags: u32, rights: u64) -> Result<u32, u16> {
        let mut fd = 0u32;
        // SAFETY: the path is live for the call and `fd` is a valid out pointer.
        check(unsafe { wasi::path_open(base, dirflags, path.as_ptr(), path.len(), oflags, rights, rights, 0, &mut fd) })?;
        Ok(fd)
    }

    pub fn read_all(fd: u32) -> Result<Vec<u8>, u16> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let iov = [buf.as_mut_ptr() as u32, buf.len() as u32];
            let mut n = 0usize;
            // SAFETY: one iovec over `buf`, and a valid out pointer.
            check(unsafe { wasi::fd_read(fd, iov.as_ptr(), 1, &mut n) })?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    pub fn write_all(fd: u32, bytes: &[u8]) -> Result<(), u16> {
        let mut done = 0;
        while done < bytes.len() {
            let iov = [bytes[done..].as_ptr() as u32, (bytes.len() - done) as u32];
            let mut n = 0usize;
            // SAFETY: one iovec over the rest of `bytes`, and a valid out pointer.
            check(unsafe { wasi::fd_write(fd, iov.as_ptr(), 1, &mut n) })?;
            done += n;
        }
        Ok(())
    }

    pub fn close(fd: u32) -> Result<(), u16> {
        // SAFETY: no pointers.
        check(unsafe { wasi::fd_close(fd) })
    }

    pub fn stat(base: u32, path: &str, flags: u32) -> Res {
        let mut st = [0u8; 64];
        // SAFETY: `st` is 64 bytes, the size of a filestat.
        check(unsafe { wasi::path_filestat_get(base, flags, path.as_ptr(), path.len(), st.as_mut_ptr()) })?;
        let size = u64::from_le_bytes(st[32..40].try_into().unwrap());
        let nlink = u64::from_le_bytes(st[24..32].try_into().unwrap());
        Ok(match st[16] {
            3 => "dir".to_string(),
            4 if nlink > 1 => format!("file {size} nlink {nlink}"),
            4 => format!("file {size}"),
            7 => format!("link {size}"),
            t => format!("type {t}"),
        })
    }

    pub fn readlink(base: u32, path: &str) -> Res {
        let mut buf = [0u8; 1024];
        let mut used = 0usize;
        // SAFETY: `buf` holds 1024 bytes; `used` is a valid out pointer.
        check(unsafe { wasi::path_readlink(base, path.as_ptr(), path.len(), buf.as_mut_ptr(), buf.len(), &mut used) })?;
        Ok(String::from_utf8_lossy(&buf[..used]).into_owned())
    }

    pub fn symlink(base: u32, target: &str, link: &str) -> Result<(), u16> {
        // SAFETY: both strings are live for the call.
        check(unsafe { wasi::path_symlink(target.as_ptr(), target.len(), base, link.as_ptr(), link.len()) })
    }

    pub fn link(base: u32, flags: u32, old: &str, new: &str) -> Result<(), u16> {
        // SAFETY: both strings are live for the call.
        check(unsafe { wasi::path_link(base, flags, old.as_ptr(), old.len(), base, new.as_ptr(), new.len()) })
    }

    pub fn path_call(base: u32, verb: &str, path: &str) -> Result<(), u16> {
        let f = match verb {
            "mkdir" => wasi::path_create_directory,
            "rmdir" => wasi::path_remove_directory,
            _ => wasi::path_unlink_file,
        };
        // SAFETY: the path is live for the call.
        check(unsafe { f(base, path.as_ptr(), path.len()) })
    }

    pub fn rename(base: u32, from: &str, to: &str) -> Result<(), u16> {
        // SAFETY: both strings are live for the call.
        check(unsafe { wasi::path_rename(base, from.as_ptr(), from.len(), base, to.as_ptr(), to.len()) })
    }

    pub fn ls(base: u32, path: &str) -> Res {
        let fd = open(base, path, FOLLOW, O_DIRECTORY, R_READ | R_READDIR)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut used = 0usize;
        // SAFETY: `buf` is as long as given; `used` is a valid out pointer.
        let r = check(unsafe { wasi::fd_readdir(fd, buf.as_mut_ptr(), buf.len(), 0, &mut used) });
        close(fd)?;
        r?;
        let mut names = Vec::new();
        let mut at = 0;
        while at + 24 <= used {
            let len = u32::from_le_bytes(buf[at + 16..at + 20].try_into().unwrap()) as usize;
            let kind = buf[at + 20];
            let n = String::from_utf8_lossy(&buf[at + 24..(at + 24 + len).min(used)]).into_owned();
            at += 24 + len;
            if n == "." || n == ".." {
                continue;
            }
            names.push(match kind {
                3 => format!("{n}/"),
                7 => format!("{n}@"),
                _ => n,
            });
        }
        names.sort();
        Ok(names.join(" "))
    }

    pub fn shutdown(fd: u32) -> Result<(), u16> {
        // SAFETY: no pointers.
        check(unsafe { wasi::sock_shutdown(fd, 1) })
    }
}

#[cfg(target_arch = "wasm32")]
fn act(base: &mut u32, verb: &str, rest: &str) -> Res {
    use calls::*;
    let ok = |r: Result<(), u16>| r.map(|()| "ok".to_string());
    let two = || rest.split_once(':').ok_or(28u16);
    match verb {
        "preopens" => Ok(preopens().iter().map(|(fd, n)| format!("{fd}={n}")).collect::<Vec<_>>().join(" ")),
        "base" => {
            *base = preopens().into_iter().find(|(_, n)| n == rest).map(|(fd, _)| fd).ok_or(8u16)?;
            Ok(base.to_string())
        }
        "symlink" => two().and_then(|(t, l)| ok(symlink(*base, t, l))),
        "readlink" => readlink(*base, rest),
        "link" => two().and_then(|(o, n)| ok(link(*base, 0, o, n))),
        "linkf" => two().and_then(|(o, n)| ok(link(*base, FOLLOW, o, n))),
        "stat" => stat(*base, rest, FOLLOW),
        "lstat" => stat(*base, rest, 0),
        "read" | "readnf" => {
            let fd = open(*base, rest, if verb == "read" { FOLLOW } else { 0 }, 0, R_READ)?;
            let bytes = read_all(fd);
            close(fd)?;
            Ok(String::from_utf8_lossy(&bytes?).into_owned())
        }
        "opendir" | "opendirnf" => {
            let fd = open(*base, rest, if verb == "opendir" { FOLLOW } else { 0 }, O_DIRECTORY, R_READ | R_READDIR)?;
            ok(close(fd))
        }
        "write" => {
            let (p, text) = two()?;
            let fd = open(*base, p, FOLLOW, O_CREAT | O_TRUNC, R_READ | R_WRITE)?;
            let w = write_all(fd, text.as_bytes());
            close(fd)?;
            ok(w)
        }
        "excl" => open(*base, rest, FOLLOW, O_CREAT | O_EXCL, R_READ | R_WRITE).and_then(|fd| ok(close(fd))),
        "mkdir" | "rmdir" | "unlink" => ok(path_call(*base, verb, rest)),
        "rename" => two().and_then(|(f, t)| ok(rename(*base, f, t))),
        "ls" => ls(*base, rest),
        "shutdown" => ok(shutdown(rest.parse().map_err(|_| 28u16)?)),
        "close" => ok(close(rest.parse().map_err(|_| 28u16)?)),
        _ => Err(52),
    }
}

#[cfg(target_arch = "wasm32")]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pre = calls::preopens();
    let mut base = pre.iter().find(|(_, n)| n == "/").or(pre.first()).map_or(3, |(fd, _)| *fd);
    for action in &args[1..] {
        let (verb, rest) = action.split_once(':').unwrap_or((action.as_str(), ""));
        let result = match act(&mut base, verb, rest) {
            Ok(v) => v,
            Err(e) => name(e),
        };
        println!("{action} => {result}");
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let _ = (FOLLOW, O_CREAT, O_DIRECTORY, O_EXCL, O_TRUNC, R_READ, R_WRITE, R_READDIR, name(0), check(0));
    eprintln!("wasi-probe makes raw WASI calls: build it for wasm32-wasip1");
    std::process::exit(2);
}
