//! The `vmgrid` import module of an SSI process, as DESIGN.md gives it: `spawn`, `wait` and
//! `getpid`, each answered by the process's home. Guest memory is read and written through the
//! bounds-checked helpers of `wasm::abi`; a bad pointer is `EFAULT`, never a trap of ours.

use wasmtime::{Caller, Linker};

use super::calls::ssi;
use crate::ssi::errno;
use crate::wasm::GuestState;
use crate::wasm::abi::{R, fail, read_bytes, write_bytes};

/// The longest argv a process may pass to `spawn`.
const MAX_ARGV_BYTES: usize = 64 * 1024;

pub(super) fn add(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.func_wrap("vmgrid", "spawn", spawn)?;
    linker.func_wrap("vmgrid", "wait", wait)?;
    linker.func_wrap("vmgrid", "getpid", getpid)?;
    Ok(())
}

/// `spawn(argv_ptr, argv_len, pid_out)`: argv is NUL-separated UTF-8, its first the module's path.
fn spawn(mut c: Caller<'_, GuestState>, argv_ptr: i32, argv_len: i32, pid_out: i32) -> R {
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
}

/// `wait(pid, status_out)`: waits for a child and writes its exit status.
fn wait(mut c: Caller<'_, GuestState>, pid: i64, status_out: i32) -> R {
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
}

fn getpid(mut c: Caller<'_, GuestState>, pid_out: i32) -> R {
    let pid = ssi(&mut c).host.pid() as i64;
    if !write_bytes(&mut c, pid_out, &pid.to_le_bytes())? {
        return fail(errno::FAULT);
    }
    Ok(0)
}
