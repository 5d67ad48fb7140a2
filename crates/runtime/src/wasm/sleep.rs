//! `poll_oneoff` that the time limit and `rm` can stop. In this process a guest's time limit is
//! kept by epoch checks in its code, and none runs while it sleeps in a host call: a guest that
//! sleeps would sleep past its limit, and past a cancel. A poll on clocks alone (how `sleep` and
//! `nanosleep` reach WASI) sleeps here instead, in slices that each look at the guest's
//! [`Stop`]; one that cannot be slept on (no subscriptions, a clock other than real time or the
//! monotonic one, unknown flags, too many) is answered here with its errno, never handed on (one
//! relative clock, whatever its id, would make wasmtime-wasi sleep unstoppably). Only a poll with
//! a descriptor goes to wasmtime-wasi, where it does not wait: a guest's descriptors are files, an
//! empty stdin and captured streams, all always ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{Caller, Linker, Trap};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as abi;
use wasmtime_wasi::runtime::in_tokio;

use super::abi::{R, W, read_bytes, real, scratch, wasi, write_bytes};
use crate::wasm::GuestState;

/// A `subscription` (48 bytes): userdata at 0, its tag at 8 (0 is a clock), then for a clock its
/// id at 16, timeout at 24 (ns) and flags at 40.
const SUBSCRIPTION_LEN: usize = 48;
/// An `event` (32 bytes): userdata at 0, errno at 8, type at 10, then what a descriptor has.
const EVENT_LEN: usize = 32;
const EVENTTYPE_CLOCK: u8 = 0;
const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;
const SUBSCRIPTION_CLOCK_ABSTIME: u16 = 1;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOMEM: i32 = 48;
/// The most subscriptions' bytes one poll may copy out of the guest (a few are what a program
/// asks for); past it the poll is `ENOMEM`, as wasmtime-wasi's bound on a call's copies answers.
const MAX_SUBSCRIPTION_BYTES: usize = 1 << 20;
/// How long a sleep goes between looks at its stop; as long as an epoch tick.
const SLICE: Duration = super::EPOCH_TICK;

/// When a guest must stop: at its deadline (none: never), or once its job's cancel flag is set.
#[derive(Default)]
pub(crate) struct Stop {
    pub(crate) deadline: Option<Instant>,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}

impl Stop {
    fn due(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
            || self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Shadows `poll_oneoff` in a linker that has WASI preview 1.
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(W, "poll_oneoff", poll_oneoff)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Sleeps until the first clock is due, then reports every clock due by then, as wasmtime-wasi
/// does; the guest's stop ends the sleep and the guest with [`Trap::Interrupt`], as an epoch
/// check would.
fn poll_oneoff(mut c: Caller<'_, GuestState>, subs: i32, events: i32, n: i32, nevents: i32) -> R {
    let clocks = match clock_waits(&mut c, subs, n)? {
        Poll::Clocks(clocks) => clocks,
        Poll::Errno(e) => return Ok(e),
        Poll::Descriptors => {
            return real(&mut c, |w, m| in_tokio(abi::poll_oneoff(w, m, subs, events, n, nevents)))?;
        }
    };
    let first = clocks.iter().map(|&(_, wait)| wait).min().unwrap_or_default();
    // A wait too long for an `Instant` is one that only the stop ends.
    let until = Instant::now().checked_add(first);
    loop {
        if c.data().stop.due() {
            return Err(Trap::Interrupt.into());
        }
        let left = until.map_or(SLICE, |u| u.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(SLICE));
    }
    let mut out = Vec::with_capacity(clocks.len() * EVENT_LEN);
    for &(userdata, _) in clocks.iter().filter(|&&(_, wait)| wait <= first) {
        let mut event = [0u8; EVENT_LEN];
        event[..8].copy_from_slice(&userdata.to_le_bytes());
        event[10] = EVENTTYPE_CLOCK;
        out.extend_from_slice(&event);
    }
    let count = (out.len() / EVENT_LEN) as u32;
    if !write_bytes(&mut c, events, &out)? || !write_bytes(&mut c, nevents, &count.to_le_bytes())? {
        return Ok(EFAULT);
    }
    Ok(0)
}

/// What a poll asks for.
enum Poll {
    /// Clocks alone: each one's userdata and how long from now it is due.
    Clocks(Vec<(u64, Duration)>),
    /// A descriptor among them: wasmtime-wasi's to answer.
    Descriptors,
    /// Nothing to wait on: this errno at once.
    Errno(i32),
}

fn clock_waits(c: &mut Caller<'_, GuestState>, subs: i32, n: i32) -> wasmtime::Result<Poll> {
    let len = n as u32 as usize * SUBSCRIPTION_LEN;
    if len == 0 {
        // WASI has no indefinite sleep.
        return Ok(Poll::Errno(EINVAL));
    }
    if len > MAX_SUBSCRIPTION_BYTES {
        return Ok(Poll::Errno(ENOMEM));
    }
    let Some(bytes) = read_bytes(c, subs, len as i32)? else {
        return Ok(Poll::Errno(EFAULT));
    };
    if bytes.chunks_exact(SUBSCRIPTION_LEN).any(|s| s[8] != EVENTTYPE_CLOCK) {
        return Ok(Poll::Descriptors);
    }
    let mut waits = Vec::with_capacity(bytes.len() / SUBSCRIPTION_LEN);
    for s in bytes.chunks_exact(SUBSCRIPTION_LEN) {
        let le = |at: usize, width: usize| s[at..at + width].iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b));
        let (id, timeout, flags) = (le(16, 4) as u32, le(24, 8), le(40, 2) as u16);
        if flags & !SUBSCRIPTION_CLOCK_ABSTIME != 0 {
            return Ok(Poll::Errno(EINVAL));
        }
        let wait = match (id, flags & SUBSCRIPTION_CLOCK_ABSTIME != 0) {
            (CLOCK_REALTIME | CLOCK_MONOTONIC, false) => timeout,
            (CLOCK_REALTIME | CLOCK_MONOTONIC, true) => match now(c, id)? {
                Some(now) => timeout.saturating_sub(now),
                None => return Ok(Poll::Errno(EINVAL)),
            },
            // The cpu-time clocks: no sleeping on them (wasmtime-wasi refuses them too, but for
            // a lone relative one, which it sleeps on as if it were the monotonic clock).
            _ => return Ok(Poll::Errno(EINVAL)),
        };
        waits.push((le(0, 8), Duration::from_nanos(wait)));
    }
    Ok(Poll::Clocks(waits))
}

/// The guest's clock `id` now, in ns, as wasmtime-wasi's `clock_time_get` tells it (the
/// monotonic clock counts from a point of the guest's context).
fn now(c: &mut Caller<'_, GuestState>, id: u32) -> wasmtime::Result<Option<u64>> {
    let (r, bytes) = scratch(wasi(c), &[], 8, |w, m, _, out| abi::clock_time_get(w, m, id as i32, 1, out));
    Ok((r? == 0).then(|| bytes.iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b))))
}

#[cfg(test)]
mod tests;
