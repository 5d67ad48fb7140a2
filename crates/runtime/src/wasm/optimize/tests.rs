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
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// What `wat` prints as a job on a runtime with `optimizer` (`deterministic` or not).
fn stdout_with(optimizer: Option<Optimizer>, wat: &str, deterministic: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig { cache_dir: dir.path().join("cache"), output_cap: 1 << 20, ..RuntimeConfig::default() };
    let rt = WasmRuntime::new(&config, true).unwrap().with_optimizer(optimizer);
    let policy = Policy { deterministic, ..Policy::default() };
    let (job, job_dir) = job(dir.path(), wat, Resources { timeout_s: 60, ..Resources::default() }, policy);
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
    let optimized = optimizer.optimize(&module).expect("wasm-opt optimizes a valid module");
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
    let tool =
        mock_tool(tools.path(), "mock-wasm-opt", &format!("for a; do out=$a; done\nprintf '{octal}' > \"$out\""));
    let optimizer = Optimizer::at(&tool).unwrap();
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
        ("mock-wasm-opt-lies", "for a; do out=$a; done\necho 'not a module' > \"$out\"", "wasmtime refused"),
        ("mock-wasm-opt-silent", "exit 0", "left no module"),
    ];
    for (name, body, why) in cases {
        let tool = mock_tool(tools.path(), name, body);
        let optimizer = Optimizer::at(&tool).unwrap().with_base_limit(Duration::from_secs(1));
        let start = Instant::now();
        let got = optimizer.optimize(&module).and_then(|b| {
            wasmtime::Module::new(&wasmtime::Engine::default(), &b)
                .map(drop)
                .map_err(|e| format!("wasmtime refused: {e}"))
        });
        let err = got.expect_err(name);
        assert!(err.contains(why), "{name}: {err}");
        assert!(start.elapsed() < Duration::from_secs(20), "{name} took {:?}", start.elapsed());
        assert_eq!(stdout_with(Some(optimizer), &printer("original"), false), "original\n", "{name}");
    }
}

#[test]
fn the_optimizer_runs_without_root_or_the_hosts_files() {
    let tools = tempfile::tempdir().unwrap();
    let body = "echo \"uid=$(id -u) sees=$(ls / | tr '\\n' ' ')\" >&2; exit 1";
    let optimizer = Optimizer::at(&mock_tool(tools.path(), "mock-wasm-opt-looks", body)).unwrap();
    let err = optimizer.optimize(&wat::parse_str(printer("x")).unwrap()).unwrap_err();
    assert!(!err.contains("uid=0 "), "{err}");
    let seen: Vec<&str> = err.split("sees=").nth(1).unwrap().split_whitespace().collect();
    for entry in &seen {
        assert!(["bin", "dev", "lib", "lib64", "tmp", "usr", "work"].contains(entry), "{entry} is visible: {err}");
    }
    assert!(seen.contains(&"work"), "{err}");
}
