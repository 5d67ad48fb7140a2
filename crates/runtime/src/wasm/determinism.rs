//! A `[policy] deterministic` job: the same outputs on every node, for replicas to compare.
//! Its engine canonicalizes NaNs, makes relaxed SIMD deterministic and has no threads (no shared
//! memory, no atomics); `random_get` returns a ChaCha20 stream keyed by the job's id; the clocks
//! (`clock_time_get`, `clock_res_get`, a clock in `poll_oneoff`) are refused, ending the job with
//! [`Refused`] as its reason; the times in a `filestat` are zero. What stays the node's own: the
//! order of `fd_readdir`, inode and device numbers, link counts and a directory's size.

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use wasmtime::{Caller, Config, Linker, WasmFeatures};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::abi::{FILESTAT_LEN, R, W, read_bytes, real, write_bytes};
use super::posix;
use crate::wasm::GuestState;

/// Where a `filestat`'s `atim`, `mtim` and `ctim` are (8 bytes each).
const FILESTAT_TIMES: usize = 40;
/// The size of a `subscription`, and where its tag is (0 is a clock).
const SUBSCRIPTION_LEN: u64 = 48;
const SUBSCRIPTION_TAG: usize = 8;
const EVENTTYPE_CLOCK: u8 = 0;
/// Keys the random numbers: a job id gives the same stream here and nowhere else.
const RANDOM_CONTEXT: &str = "vmgrid deterministic wasm job: random_get from the job id";

/// A call a deterministic job may not make. Returned as the call's error, it ends the guest, and
/// the job fails with it as the reason.
#[derive(Debug)]
pub(crate) struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "deterministic job: {} is refused (clocks differ between nodes)", self.0)
    }
}

impl std::error::Error for Refused {}

/// The engine settings: NaNs canonical, relaxed SIMD deterministic, no threads.
pub(crate) fn configure(cfg: &mut Config) {
    cfg.cranelift_nan_canonicalization(true);
    cfg.relaxed_simd_deterministic(true);
    // `wasm_threads` exists only with wasmtime's `threads` feature (off here, so the proposal is
    // off already); say so anyway, should that feature ever come in.
    cfg.wasm_features(WasmFeatures::THREADS | WasmFeatures::SHARED_EVERYTHING_THREADS, false);
}

/// Every random number generator of the guest, seeded from `seed` (the job's id).
pub(crate) fn seed_random(wasi: &mut WasiCtxBuilder, seed: u64) {
    let key = blake3::derive_key(RANDOM_CONTEXT, &seed.to_le_bytes());
    let stream = |n: u64| {
        let mut rng = ChaCha20Rng::from_seed(key);
        rng.set_stream(n);
        rng
    };
    let mut seeds = stream(2);
    let insecure_seed = (u128::from(seeds.next_u64()) << 64) | u128::from(seeds.next_u64());
    wasi.secure_random(stream(0)).insecure_random(stream(1)).insecure_random_seed(insecure_seed);
}

/// Shadows the clocks and the stats in a linker that has WASI preview 1 and `posix`'s calls.
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(W, "clock_time_get", |_: Caller<'_, GuestState>, _id: i32, _precision: i64, _out: i32| -> R {
        Err(wasmtime::Error::new(Refused("clock_time_get")))
    })?;
    linker.func_wrap(W, "clock_res_get", |_: Caller<'_, GuestState>, _id: i32, _out: i32| -> R {
        Err(wasmtime::Error::new(Refused("clock_res_get")))
    })?;
    linker.func_wrap(W, "poll_oneoff", poll_oneoff)?;
    linker.func_wrap(W, "fd_filestat_get", |mut c: Caller<'_, GuestState>, fd: i32, out: i32| -> R {
        let r = real(&mut c, |w, m| in_tokio(abi::fd_filestat_get(w, m, fd, out)))??;
        zero_times(&mut c, r, out)
    })?;
    linker.func_wrap(
        W,
        "path_filestat_get",
        |mut c: Caller<'_, GuestState>, fd: i32, flags: i32, ptr: i32, len: i32, out: i32| -> R {
            let r = posix::path_filestat_get(&mut c, fd, flags, ptr, len, out)?;
            zero_times(&mut c, r, out)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `poll_oneoff` without clocks: one clock subscription refuses the call; the rest is WASI's.
fn poll_oneoff(mut c: Caller<'_, GuestState>, subs: i32, events: i32, n: i32, nevents: i32) -> R {
    let len = u64::from(n as u32) * SUBSCRIPTION_LEN;
    // Out of bounds, WASI answers (`EFAULT`); nothing it answers then reads a clock.
    if let Ok(len) = u32::try_from(len)
        && let Some(bytes) = read_bytes(&mut c, subs, len as i32)?
        && bytes.chunks(SUBSCRIPTION_LEN as usize).any(|s| s[SUBSCRIPTION_TAG] == EVENTTYPE_CLOCK)
    {
        return Err(wasmtime::Error::new(Refused("poll_oneoff with a clock subscription")));
    }
    real(&mut c, |w, m| in_tokio(abi::poll_oneoff(w, m, subs, events, n, nevents)))?
}

/// After a `filestat` call that answered `r` and wrote its `filestat` at `out`: its times zeroed.
fn zero_times(c: &mut Caller<'_, GuestState>, r: i32, out: i32) -> R {
    if r == 0 {
        let at = out.wrapping_add(FILESTAT_TIMES as i32);
        write_bytes(c, at, &[0; FILESTAT_LEN - FILESTAT_TIMES])?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests;
