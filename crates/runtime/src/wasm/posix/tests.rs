//! Which calls count as making something in the job directory (`RunResult::created`): a guest
//! that made nothing leaves its directory to be reused unlooked-at, so every call that can make
//! a file, directory or link must count, and a disk limit is still kept when one did.

use vmgrid_job::Resources;

use crate::wasm::testing::run_with;
use crate::{FailureKind, Outcome};

/// A command module doing `body`; the names "a" and "b" are at 200 and 208, and "." at 216.
fn guest(body: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory" (func $mkdir (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func $symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_link" (func $link (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_rename" (func $rename (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_filestat_get" (func $stat (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 64)
  (data (i32.const 200) "a") (data (i32.const 208) "b") (data (i32.const 216) ".")
  (func (export "_start") {body}))"#
    )
}

/// Opens "a" at 200 in the job directory (descriptor 3) with `oflags`; its descriptor goes to 300.
fn open(oflags: u32) -> String {
    format!(
        "(drop (call $open (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 1) (i32.const {oflags}) (i64.const 536870911) (i64.const 536870911) (i32.const 0) (i32.const 300)))"
    )
}

fn created(body: &str) -> bool {
    let (r, _) = run_with(&guest(body), Resources::default(), None);
    let r = r.unwrap();
    assert_eq!(r.outcome, Outcome::Exited(0), "{body}");
    r.created
}

#[test]
fn every_call_that_makes_something_counts_and_reads_do_not() {
    let reads = [
        open(0),
        "(drop (call $open (i32.const 3) (i32.const 0) (i32.const 216) (i32.const 1) (i32.const 2) (i64.const 536870911) (i64.const 536870911) (i32.const 0) (i32.const 300)))".to_string(),
        "(drop (call $stat (i32.const 3) (i32.const 0) (i32.const 216) (i32.const 1) (i32.const 400)))".to_string(),
    ];
    assert!(!created(""), "a guest that does nothing made nothing");
    assert!(!created(&reads.concat()), "opening without O_CREAT and stat make nothing");
    let makers = [
        ("path_open with O_CREAT", open(1)),
        ("path_create_directory", "(drop (call $mkdir (i32.const 3) (i32.const 200) (i32.const 1)))".to_string()),
        ("path_symlink", "(drop (call $symlink (i32.const 208) (i32.const 1) (i32.const 3) (i32.const 200) (i32.const 1)))".to_string()),
        ("path_link", "(drop (call $link (i32.const 3) (i32.const 0) (i32.const 200) (i32.const 1) (i32.const 3) (i32.const 208) (i32.const 1)))".to_string()),
        ("path_rename", "(drop (call $rename (i32.const 3) (i32.const 200) (i32.const 1) (i32.const 3) (i32.const 208) (i32.const 1)))".to_string()),
    ];
    for (call, body) in makers {
        assert!(created(&body), "{call} did not count");
    }
}

#[test]
fn a_guest_that_made_a_file_over_the_disk_limit_still_fails_for_it() {
    // "a", created, then 2 MiB written to it (an iovec at 500: 1 MiB at 1 MiB, written twice).
    let body = format!(
        "{} (i32.store (i32.const 500) (i32.const 1048576)) (i32.store (i32.const 504) (i32.const 1048576))
         (drop (call $fd_write (i32.load (i32.const 300)) (i32.const 500) (i32.const 1) (i32.const 508)))
         (drop (call $fd_write (i32.load (i32.const 300)) (i32.const 500) (i32.const 1) (i32.const 508)))",
        open(1)
    );
    let (r, _) = run_with(&guest(&body), Resources { disk_mb: 1, ..Resources::default() }, None);
    match r.unwrap().outcome {
        Outcome::Failed(f) => assert_eq!(f.kind, FailureKind::DiskLimit, "{}", f.reason),
        other => panic!("not stopped at the disk limit: {other:?}"),
    }
}
