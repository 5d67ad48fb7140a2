//! binaryen's optimizer: a real `wasm-opt` run confined, and stand-in tools (named `mock-`) that
//! fail, hang, lie or look around, each of which must leave the job running its module as
//! submitted.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmgrid_job::{Policy, Resources};

use super::Optimizer;
use crate::wasm::WasmRuntime;
use crate::wasm::testing::job;
use crate::{Outcome, RunRequest, RuntimeConfig};

/// A guest that prints `text` (with a newline), with a function nothing calls.
fn printer(text: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{text}\n")
  (func $unused (result i32) (i32.add (i32.const 40) (i32.const 2)))
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const {len}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
        len = text.len() + 1
    )
}

/// A stand-in for `wasm-opt`: a shell script with `body`, in `dir` (made searchable: the tool
/// runs as nobody when the tests run as root).
fn mock_tool(dir: &Path, name: &str, body: &str) -> PathBuf {
    mock_script(dir, name, &format!("#!/bin/sh\n{body}\n"))
}

/// A stand-in for `wasm-opt`: `script`, in `dir`.
fn mock_script(dir: &Path, name: &str, script: &str) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// What `wat` prints as a job on a runtime with `optimizer` (`deterministic` or not).
fn stdout_with(optimizer: Option<Optimizer>, wat: &str, deterministic: bool) -> String {
    run_in(tempfile::tempdir().unwrap().path(), optimizer, wat, deterministic)
}

/// What `wat` prints as a job on a runtime with `optimizer`, its image, job directory and cache
/// (`cache/`) in `dir`.
fn run_in(dir: &Path, optimizer: Option<Optimizer>, wat: &str, deterministic: bool) -> String {
    let config = RuntimeConfig { cache_dir: dir.join("cache"), output_cap: 1 << 20, ..RuntimeConfig::default() };
    let rt = WasmRuntime::new(&config, true).unwrap().with_optimizer(optimizer);
    let policy = Policy { deterministic, ..Policy::default() };
    let (job, job_dir) = job(dir, wat, Resources { timeout_s: 60, ..Resources::default() }, policy);
    let req = RunRequest {
        job: &job,
        job_dir: &job_dir,
        cancel: None,
        ssi: None,
        checkpoint: None,
        seed: 1,
        net: None,
        empty_dir: true,
    };
    let r = rt.run(&req, &config).expect("the job runs");
    assert!(matches!(r.outcome, Outcome::Exited(0)), "{:?}", r.outcome);
    String::from_utf8(r.stdout.bytes).unwrap()
}

#[test]
fn binaryen_optimizes_a_validated_module_and_it_runs_the_same() {
    let optimizer = Optimizer::find().expect("binaryen and bubblewrap are installed (scripts/setup)");
    let module = wat::parse_str(printer("same")).unwrap();
    let optimized = optimizer.optimize(&module).map_err(|e| e.why).expect("wasm-opt optimizes a valid module");
    wasmtime::Module::validate(&wasmtime::Engine::default(), &optimized).expect("what it made is valid");
    assert!(
        optimized.len() < module.len(),
        "the unused function is gone: {} -> {} bytes",
        module.len(),
        optimized.len()
    );
    assert_eq!(stdout_with(Some(optimizer), &printer("same"), false), "same\n");
}

#[test]
fn what_the_optimizer_makes_is_what_runs_and_deterministic_jobs_skip_it() {
    let tools = tempfile::tempdir().unwrap();
    let made = wat::parse_str(printer("optimized")).unwrap();
    let octal: String = made.iter().map(|b| format!("\\{b:03o}")).collect();
    let tool = mock_tool(tools.path(), "mock-wasm-opt", &format!("printf '{octal}'"));
    let optimizer = Optimizer::at(&tool).unwrap();
    let original = wat::parse_str(printer("original")).unwrap();
    optimizer
        .compile(&wasmtime::Engine::default(), &original)
        .map_err(|e| e.why)
        .expect("the stand-in's module is taken");
    assert_eq!(stdout_with(Some(optimizer.clone()), &printer("original"), false), "optimized\n");
    assert_eq!(stdout_with(Some(optimizer), &printer("original"), true), "original\n");
    assert_eq!(stdout_with(None, &printer("original"), false), "original\n");
}

#[test]
fn a_failing_hanging_or_lying_optimizer_leaves_the_module_as_submitted() {
    let tools = tempfile::tempdir().unwrap();
    let module = wat::parse_str(printer("original")).unwrap();
    let cases = [
        ("mock-wasm-opt-fails", "echo 'the parser fell over' >&2; exit 3", "the parser fell over"),
        ("mock-wasm-opt-hangs", "exec sleep 600", "took over 1 s"),
        ("mock-wasm-opt-lies", "echo 'not a module'", "wasmtime refused"),
        ("mock-wasm-opt-silent", "exit 0", "made no module"),
        ("mock-wasm-opt-floods", "exec cat /dev/zero", "past its output's cap"),
        ("mock-wasm-opt-shouts", "exec cat /dev/zero >&2", "past its output's cap"),
    ];
    for (name, body, why) in cases {
        let tool = mock_tool(tools.path(), name, body);
        let optimizer = Optimizer::at(&tool).unwrap().with_base_limit(Duration::from_secs(1));
        let start = Instant::now();
        let err = optimizer.compile(&wasmtime::Engine::default(), &module).map(drop).expect_err(name);
        assert!(err.why.contains(why), "{name}: {}", err.why);
        assert!(err.lasting, "{name}: {}", err.why);
        assert!(start.elapsed() < Duration::from_secs(20), "{name} took {:?}", start.elapsed());
        assert_eq!(stdout_with(Some(optimizer), &printer("original"), false), "original\n", "{name}");
    }
}

#[test]
fn the_optimizer_runs_without_root_the_hosts_files_or_our_descriptors() {
    let tools = tempfile::tempdir().unwrap();
    // A descriptor of ours that a child would inherit (as a wasm worker's socket to its node is),
    // placed at 100 or above, clear of the tool's shell's own.
    let ours = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: fcntl on a descriptor this test holds open; F_DUPFD's copy is not close-on-exec.
    let fd = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&ours), libc::F_DUPFD, 100) };
    assert!(fd >= 100);
    let script = format!(
        r#"#!/bin/bash
open=""
true >&{fd} 2>/dev/null && open="$open,{fd}"
(echo x > /work/in.wasm) 2>/dev/null && open="$open,wrote-in"
touch /work/new 2>/dev/null && open="$open,wrote-work"
echo "uid=$(id -u) fds=$open; sees=$(ls / | tr '\n' ' ')" >&2; exit 1
"#
    );
    let optimizer = Optimizer::at(&mock_script(tools.path(), "mock-wasm-opt-looks", &script)).unwrap();
    let err = optimizer.optimize(&wat::parse_str(printer("x")).unwrap()).unwrap_err().why;
    // SAFETY: closing the copy this test made.
    unsafe { libc::close(fd) };
    let uid: u32 = err.split("uid=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    if crate::qemu::launch::effective_uid() == 0 {
        assert!(uid >= super::FIRST_ID, "a root node's tool runs as an id of its own, not {uid}: {err}");
    } else {
        assert_ne!(uid, 0, "{err}");
    }
    assert!(err.contains("fds=;"), "the tool could use descriptors of ours or write its input: {err}");
    let seen: Vec<&str> = err.split("sees=").nth(1).unwrap().split_whitespace().collect();
    for entry in &seen {
        assert!(
            ["bin", "dev", "lib", "lib64", "sbin", "tmp", "usr", "work"].contains(entry),
            "{entry} is visible: {err}"
        );
    }
    assert!(seen.contains(&"work"), "{err}");
}

#[test]
fn binaryen_dropping_an_unused_import_leaves_the_module_as_submitted() {
    // A module with an import it never calls links only where that import exists: binaryen
    // removes it, and the optimized module would link anywhere.
    let wat = printer("original").replacen(
        "(memory",
        r#"(import "wasi_snapshot_preview1" "sched_yield" (func $unused_import (result i32)))
  (memory"#,
        1,
    );
    let module = wat::parse_str(&wat).unwrap();
    let optimizer = Optimizer::find().expect("binaryen and bubblewrap are installed (scripts/setup)");
    let err = optimizer.compile(&wasmtime::Engine::default(), &module).map(drop).unwrap_err();
    assert!(err.why.contains("imports") && err.lasting, "{}", err.why);
    assert_eq!(stdout_with(Some(optimizer), &wat, false), "original\n");
}

#[test]
fn a_lasting_failure_is_cached_and_a_passing_one_is_not() {
    let tools = tempfile::tempdir().unwrap();
    let fails = Optimizer::at(&mock_tool(tools.path(), "mock-wasm-opt-fails", "exit 3")).unwrap();
    let unstartable = fails.clone().with_bwrap(tools.path().join("no-such-bwrap"));
    let killed = Optimizer::at(&mock_tool(tools.path(), "mock-wasm-opt-killed", "kill -9 $$")).unwrap();
    let crashes = Optimizer::at(&mock_tool(tools.path(), "mock-wasm-opt-crashes", "kill -SEGV $$")).unwrap();
    for (optimizer, cached) in [(fails, 1), (unstartable, 0), (killed, 0), (crashes, 1)] {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(run_in(dir.path(), Some(optimizer), &printer("original"), false), "original\n");
        let files = std::fs::read_dir(dir.path().join("cache/wasm")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(files, cached, "cached modules");
    }
}

#[test]
fn a_root_in_a_user_namespace_that_maps_few_ids_has_no_optimizer() {
    assert!(super::maps_own_ids("         0          0 4294967295\n"));
    assert!(!super::maps_own_ids("         0     100000      65536\n"));
    assert!(!super::maps_own_ids(""));
}
