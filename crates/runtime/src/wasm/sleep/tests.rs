//! Sleeping guests in real wasmtime, with WAT guests: a clock poll sleeps as long as asked and
//! reports the clocks due, and the time limit and a cancel end a sleep that would outlast them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::wasm::testing::run;
use crate::{FailureKind, Outcome, RunError, RunResult};

/// A command module whose `_start` fills in `subs` subscriptions at 128 (each 48 bytes, set by
/// `setup`), polls them with events at 1024 and their count at 64, then prints the count and the
/// events (4 + 32 per event bytes) and exits with the poll's errno.
fn poller(setup: &str, subs: u32) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $now (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $errno i32)
    {setup}
    (local.set $errno (call $poll (i32.const 128) (i32.const 1024) (i32.const {subs}) (i32.const 1020)))
    (i32.store (i32.const 0) (i32.const 1020))
    (i32.store (i32.const 4) (i32.add (i32.const 4) (i32.mul (i32.load (i32.const 1020)) (i32.const 32))))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (local.get $errno))))"#
    )
}

/// The WAT that fills subscription `i` as a clock: its userdata, clock id, timeout (ns) and
/// flags (1: an absolute time).
fn clock(i: u32, userdata: u64, id: u32, timeout_ns: &str, flags: u32) -> String {
    let at = 128 + 48 * i;
    format!(
        "(i64.store (i32.const {at}) (i64.const {userdata})) (i32.store8 (i32.const {}) (i32.const 0))
         (i32.store (i32.const {}) (i32.const {id})) (i64.store (i32.const {}) {timeout_ns})
         (i32.store16 (i32.const {}) (i32.const {flags}))",
        at + 8,
        at + 16,
        at + 24,
        at + 40
    )
}

fn ms(n: u64) -> String {
    format!("(i64.const {})", n * 1_000_000)
}

/// The events a poller printed: (userdata, errno, type) of each.
fn events(r: Result<RunResult, RunError>) -> Vec<(u64, u16, u8)> {
    let r = r.unwrap();
    assert_eq!(r.outcome, Outcome::Exited(0), "stderr: {}", String::from_utf8_lossy(&r.stderr.bytes));
    let out = r.stdout.bytes;
    let n = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
    assert_eq!(out.len(), 4 + 32 * n);
    out[4..]
        .chunks(32)
        .map(|e| (u64::from_le_bytes(e[..8].try_into().unwrap()), u16::from_le_bytes([e[8], e[9]]), e[10]))
        .collect()
}

#[test]
fn a_clock_poll_sleeps_as_long_as_asked_and_reports_the_clocks_due() {
    // One relative monotonic clock, as `sleep` asks.
    let (r, wall) = run(&poller(&clock(0, 7, 1, &ms(50), 0), 1), 60, None);
    assert_eq!(events(r), [(7, 0, 0)]);
    assert!(wall >= Duration::from_millis(50), "{wall:?}");
    // Two clocks: the first due is reported, the later one is not.
    let two = [clock(0, 9, 1, &ms(3_000), 0), clock(1, 8, 0, &ms(30), 0)].concat();
    let (r, wall) = run(&poller(&two, 2), 60, None);
    assert_eq!(events(r), [(8, 0, 0)]);
    assert!(wall >= Duration::from_millis(30) && wall < Duration::from_millis(2_000), "{wall:?}");
    // An absolute time on the guest's monotonic clock: 40 ms after it read the clock.
    let abs = format!(
        "(drop (call $now (i32.const 1) (i64.const 1) (i32.const 64))) {}",
        clock(0, 5, 1, &format!("(i64.add (i64.load (i32.const 64)) {})", ms(40)), 1)
    );
    let (r, wall) = run(&poller(&abs, 1), 60, None);
    assert_eq!(events(r), [(5, 0, 0)]);
    assert!(wall >= Duration::from_millis(40) && wall < Duration::from_millis(2_000), "{wall:?}");
    // An absolute real time already past: due at once.
    let (r, wall) = run(&poller(&clock(0, 4, 0, &ms(1), 1), 1), 60, None);
    assert_eq!(events(r), [(4, 0, 0)]);
    assert!(wall < Duration::from_millis(2_000), "{wall:?}");
}

#[test]
fn the_time_limit_and_a_cancel_end_a_sleep_in_process() {
    let hour = clock(0, 1, 1, &ms(3_600_000), 0);
    let (r, wall) = run(&poller(&hour, 1), 1, None);
    let reason = "the time limit of 1 s was exceeded (timeout_s)".to_string();
    assert_eq!(r.unwrap().outcome, Outcome::Failed(crate::Failure { kind: FailureKind::TimeLimit, reason }));
    assert!(wall < Duration::from_secs(30), "the sleep went on past the limit: {wall:?}");
    // A wait too long for an `Instant`: still ended by the stop.
    let forever = clock(0, 1, 1, "(i64.const -1)", 0);
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // The user's `rm`, arriving while the guest sleeps (most likely; a cancel that came before
    // the sleep began ends the guest the same way, so no timing is asserted).
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        flag.store(true, Ordering::Relaxed);
    });
    let (r, wall) = run(&poller(&forever, 1), 3_600, Some(cancel));
    canceller.join().unwrap();
    assert_eq!(r.unwrap().outcome, Outcome::Failed(crate::cancelled_failure()));
    assert!(wall < Duration::from_secs(30), "{wall:?}");
}

#[test]
fn a_poll_that_cannot_be_slept_on_is_an_errno_at_once() {
    let exit = |wat: &str| {
        let (r, wall) = run(wat, 60, None);
        assert!(wall < Duration::from_secs(30), "it waited: {wall:?}");
        r.unwrap().outcome
    };
    // A lone relative cpu-time clock (id 2, then 3) for an hour: EINVAL, not an hour's sleep.
    for id in [2, 3] {
        assert_eq!(exit(&poller(&clock(0, 1, id, &ms(3_600_000), 0), 1)), Outcome::Exited(28), "clock {id}");
    }
    // No subscriptions (EINVAL), unknown flags (EINVAL), more than a poll may copy (ENOMEM), and
    // subscriptions out of bounds (EFAULT).
    assert_eq!(exit(&poller("", 0)), Outcome::Exited(28));
    assert_eq!(exit(&poller(&clock(0, 1, 1, &ms(1), 2), 1)), Outcome::Exited(28));
    assert_eq!(exit(&poller("", 100_000)), Outcome::Exited(48));
    assert_eq!(exit(&poller("", 1_400)), Outcome::Exited(21));
}
