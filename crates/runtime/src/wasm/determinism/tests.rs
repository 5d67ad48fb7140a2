//! Deterministic jobs in real wasmtime, with WAT guests: the same seed gives the same bytes on
//! two runtimes (two nodes), NaNs come out canonical, and the clocks are refused.

use std::path::Path;

use vmgrid_job::{Policy, Resources};

use crate::wasm::testing::run_on;
use crate::{FailureKind, Outcome, RunError, RunResult, Runtime, RuntimeConfig};

const IMPORTS: &str = r#"
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_res_get" (func $clock_res_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_get" (func $fd_filestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_filestat_get" (func $path_filestat_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; Writes `len` bytes at `ptr` to stdout; a failed write exits with 99.
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
      (then (call $proc_exit (i32.const 99)))))
  ;; Exits with a call's errno if it is not 0.
  (func $check (param $errno i32)
    (if (local.get $errno) (then (call $proc_exit (local.get $errno)))))
"#;

/// A command module: the imports above, `data`, and `_start` doing `body`.
fn module(data: &str, body: &str) -> String {
    format!("(module {IMPORTS} {data} (func (export \"_start\") {body}))")
}

/// 32 random bytes, then four NaNs that differ between CPUs unless canonicalized: f32 0/0 (x86
/// gives a negative NaN), f32 signalling NaN + 1 (keeps its payload), f64 sqrt(-1), f64 0/0.
/// The operands come from memory, so that the compiler cannot fold them.
fn random_and_nans() -> String {
    module(
        r#"(data (i32.const 260) "\01\00\a0\7f") (data (i32.const 264) "\00\00\00\00\00\00\f0\bf")"#,
        r#"
        (call $check (call $random_get (i32.const 64) (i32.const 32)))
        (f32.store (i32.const 96) (f32.div (f32.load (i32.const 256)) (f32.load (i32.const 256))))
        (f32.store (i32.const 100) (f32.add (f32.load (i32.const 260)) (f32.const 1)))
        (f64.store (i32.const 104) (f64.sqrt (f64.load (i32.const 264))))
        (f64.store (i32.const 112) (f64.div (f64.load (i32.const 272)) (f64.load (i32.const 272))))
        (call $print (i32.const 64) (i32.const 56))"#,
    )
}

/// Reads the real-time clock and prints it (8 bytes, little-endian nanoseconds).
fn clock_reader() -> String {
    module(
        "",
        "(call $check (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 64))) (call $print (i32.const 64) (i32.const 8))",
    )
}

/// One `poll_oneoff` subscription of type `tag` (0 a clock: monotonic, timeout 0; 2 writing to
/// stdout) at 128; exits with the call's errno.
fn poller(tag: u8) -> String {
    module(
        "",
        &format!(
            "(i32.store8 (i32.const 136) (i32.const {tag})) (i32.store (i32.const 144) (i32.const 1))
             (call $check (call $poll_oneoff (i32.const 128) (i32.const 192) (i32.const 1) (i32.const 64)))"
        ),
    )
}

fn runtime(cache: &Path, pooled_instances: u32) -> Runtime {
    Runtime::new(RuntimeConfig {
        cache_dir: cache.into(),
        output_cap: 1 << 20,
        echo: false,
        pooled_instances,
        wasm_worker: None,
    })
}

/// Runs `wat` as a wasm job in a fresh job directory.
fn run(rt: &Runtime, wat: &str, deterministic: bool, seed: u64) -> Result<RunResult, RunError> {
    let dir = tempfile::tempdir().unwrap();
    let resources = Resources { timeout_s: 60, ..Resources::default() };
    run_on(rt, dir.path(), wat, resources, Policy { deterministic, ..Policy::default() }, seed, None)
}

fn stdout_of_success(r: Result<RunResult, RunError>) -> Vec<u8> {
    let r = r.unwrap();
    assert_eq!(r.outcome, Outcome::Exited(0), "stderr: {}", String::from_utf8_lossy(&r.stderr.bytes));
    r.stdout.bytes
}

fn refused(r: Result<RunResult, RunError>, call: &str) {
    let r = r.unwrap();
    let reason = format!("deterministic job: {call} is refused (clocks differ between nodes)");
    assert_eq!(r.outcome, Outcome::Failed(crate::Failure { kind: FailureKind::GuestError, reason }));
}

#[test]
fn a_deterministic_job_prints_the_same_random_bytes_and_nans_on_two_nodes_and_other_bytes_for_another_seed() {
    let (cache_a, cache_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Node A pools its plain instances, node B does not: the deterministic engine is the same.
    let (a, b) = (runtime(cache_a.path(), 4), runtime(cache_b.path(), 0));
    let wat = random_and_nans();
    let first = stdout_of_success(run(&a, &wat, true, 7));
    assert_eq!(first.len(), 56);
    assert_ne!(first[..32], [0; 32], "random_get gave nothing");
    assert_eq!(stdout_of_success(run(&b, &wat, true, 7)), first, "two nodes, the same seed");
    assert_eq!(stdout_of_success(run(&a, &wat, true, 7)), first, "the same node again, its module cached");
    let canonical_f32 = 0x7fc0_0000u32.to_le_bytes();
    let canonical_f64 = 0x7ff8_0000_0000_0000u64.to_le_bytes();
    let nans = [&canonical_f32[..], &canonical_f32, &canonical_f64, &canonical_f64].concat();
    assert_eq!(first[32..], nans[..], "NaNs are canonical");

    let other = stdout_of_success(run(&a, &wat, true, 8));
    assert_ne!(other[..32], first[..32], "another seed, other random bytes");
    assert_eq!(other[32..], nans[..]);
    // Without `deterministic`, random_get is the host's: two runs differ.
    let (p, q) = (stdout_of_success(run(&a, &wat, false, 7)), stdout_of_success(run(&a, &wat, false, 7)));
    assert_ne!(p[..32], q[..32]);
}

#[test]
fn a_deterministic_job_that_reads_a_clock_fails_saying_why() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path(), 0);
    refused(run(&rt, &clock_reader(), true, 1), "clock_time_get");
    let res = module("", "(call $check (call $clock_res_get (i32.const 1) (i32.const 64)))");
    refused(run(&rt, &res, true, 1), "clock_res_get");
    refused(run(&rt, &poller(0), true, 1), "poll_oneoff with a clock subscription");
    // A poll on descriptors only is WASI's own.
    assert_eq!(stdout_of_success(run(&rt, &poller(2), true, 1)), b"");
}

#[test]
fn the_same_clock_reader_runs_when_not_deterministic() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path(), 0);
    let out = stdout_of_success(run(&rt, &clock_reader(), false, 1));
    let now = u64::from_le_bytes(out.try_into().unwrap());
    // After 2020-01-01.
    assert!(now > 1_577_836_800 * 1_000_000_000, "{now}");
    assert_eq!(stdout_of_success(run(&rt, &poller(0), false, 1)), b"");
}

#[test]
fn a_deterministic_job_sees_file_times_as_zero() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path(), 0);
    // The job directory's `filestat`, by `path_filestat_get(3, ".")` and `fd_filestat_get(3)`.
    let stats = module(
        r#"(data (i32.const 300) ".")"#,
        "(call $check (call $path_filestat_get (i32.const 3) (i32.const 0) (i32.const 300) (i32.const 1) (i32.const 128)))
         (call $check (call $fd_filestat_get (i32.const 3) (i32.const 192)))
         (call $print (i32.const 128) (i32.const 128))",
    );
    for deterministic in [true, false] {
        let out = stdout_of_success(run(&rt, &stats, deterministic, 1));
        for st in out.chunks(64) {
            assert_eq!(st[16], 3, "a directory");
            let times_zero = st[40..].iter().all(|&b| b == 0);
            assert_eq!(times_zero, deterministic, "{st:?}");
        }
    }
}

#[test]
fn a_deterministic_engine_has_no_shared_memory() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path(), 0);
    let shared = r#"(module (memory (export "memory") 1 1 shared) (func (export "_start")))"#;
    match run(&rt, shared, true, 1) {
        Err(RunError::BadJob(e)) => assert!(e.contains("is not a valid WebAssembly module"), "{e}"),
        other => panic!("a shared memory was accepted: {:?}", other.map(|r| r.outcome)),
    }
}
