//! What the calls vmgrid shadows share: bounds-checked access to guest memory, and running
//! wasmtime-wasi's own implementation of a call, either on the guest's memory or on a scratch
//! memory that holds a path vmgrid chose (a path with its trailing slash taken off, or one that
//! the SSI home resolved). A bad guest pointer is an errno (`EFAULT`) or wasmtime-wasi's own
//! answer, never a trap of ours; nothing here decides what a path may reach.

use wasmtime::{AsContextMut, Caller};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1;
use wasmtime_wasi::runtime::in_tokio;

use crate::ssi::Errno;
use crate::wasm::GuestState;

pub(crate) use wiggle::GuestMemory;

pub(crate) const W: &str = "wasi_snapshot_preview1";
pub(crate) const LOOKUP_FOLLOW: i32 = 1;
pub(crate) const O_CREAT: i32 = 1;
pub(crate) const O_DIRECTORY: i32 = 2;
pub(crate) const O_EXCL: i32 = 4;
pub(crate) const O_TRUNC: i32 = 8;
pub(crate) const RIGHT_FD_WRITE: i64 = 1 << 6;
pub(crate) const FILETYPE_DIRECTORY: u8 = 3;
pub(crate) const FILETYPE_SYMBOLIC_LINK: u8 = 7;
/// The size of a `filestat`, and where its type and size are.
pub(crate) const FILESTAT_LEN: usize = 64;
pub(crate) const FILESTAT_TYPE: usize = 16;
pub(crate) const FILESTAT_SIZE: usize = 32;

pub(crate) type R = wasmtime::Result<i32>;

pub(crate) fn fail(e: Errno) -> R {
    Ok(e as i32)
}

fn memory(caller: &mut Caller<'_, GuestState>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("the module exports no memory"))
}

pub(crate) fn read_bytes(caller: &mut Caller<'_, GuestState>, ptr: i32, len: i32) -> wasmtime::Result<Option<Vec<u8>>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    Ok(mem.data(&caller).get(ptr..ptr.saturating_add(len)).map(|b| b.to_vec()))
}

/// A string argument; `None` if it is out of bounds or not UTF-8 (wasmtime-wasi then answers).
pub(crate) fn read_str(caller: &mut Caller<'_, GuestState>, ptr: i32, len: i32) -> wasmtime::Result<Option<String>> {
    Ok(read_bytes(caller, ptr, len)?.and_then(|b| String::from_utf8(b).ok()))
}

pub(crate) fn write_bytes(caller: &mut Caller<'_, GuestState>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<bool> {
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

/// Runs wasmtime-wasi's own implementation of a call on the guest's memory. As wiggle's own
/// linker does, it first gives the call the store's hostcall fuel (the bytes it may copy in from
/// the guest); without it a call that copies finds none left and answers `ENOMEM`.
pub(crate) fn real<T>(
    caller: &mut Caller<'_, GuestState>,
    f: impl FnOnce(&mut WasiP1Ctx, &mut GuestMemory<'_>) -> T,
) -> wasmtime::Result<T> {
    let mem = memory(caller)?;
    let fuel = caller.as_context_mut().hostcall_fuel();
    let (data, state) = mem.data_and_store_mut(caller);
    state.wasi.set_hostcall_fuel(fuel);
    let mut gm = GuestMemory::Unshared(data);
    Ok(f(&mut state.wasi, &mut gm))
}

/// Runs wasmtime-wasi's implementation of a call on a scratch memory holding `strs` (given to
/// `f` as (pointer, length) pairs) and `out_len` bytes of output at the pointer `f` gets last;
/// returns what `f` returned and those bytes, for the caller to copy where the guest wants them.
pub(crate) fn scratch<T>(
    wasi: &mut WasiP1Ctx,
    strs: &[&str],
    out_len: usize,
    f: impl FnOnce(&mut WasiP1Ctx, &mut GuestMemory<'_>, &[(i32, i32)], i32) -> T,
) -> (T, Vec<u8>) {
    // Offset 0 stays unused; everything is 8-aligned.
    let mut buf = vec![0u8; 8];
    let mut ptrs = Vec::with_capacity(strs.len());
    for s in strs {
        ptrs.push((buf.len() as i32, s.len() as i32));
        buf.extend_from_slice(s.as_bytes());
        buf.resize(buf.len().next_multiple_of(8), 0);
    }
    let out = buf.len();
    buf.resize(out + out_len.max(8), 0);
    // The call copies in at most the whole scratch memory.
    wasi.set_hostcall_fuel(buf.len());
    let r = {
        let mut gm = GuestMemory::Unshared(&mut buf);
        f(wasi, &mut gm, &ptrs, out as i32)
    };
    (r, buf[out..out + out_len].to_vec())
}

/// `path_filestat_get` of wasmtime-wasi on a path of ours: the `filestat`, or the errno.
pub(crate) fn filestat(
    wasi: &mut WasiP1Ctx,
    dirfd: i32,
    flags: i32,
    path: &str,
) -> wasmtime::Result<Result<Vec<u8>, Errno>> {
    let (r, st) = scratch(wasi, &[path], FILESTAT_LEN, |w, m, p, out| {
        in_tokio(abi::path_filestat_get(w, m, dirfd, flags, p[0].0, p[0].1, out))
    });
    Ok(match r? {
        0 => Ok(st),
        e => Err(e as Errno),
    })
}

/// The guest's `GuestState.wasi`.
pub(crate) fn wasi<'a>(caller: &'a mut Caller<'_, GuestState>) -> &'a mut WasiP1Ctx {
    &mut caller.data_mut().wasi
}
