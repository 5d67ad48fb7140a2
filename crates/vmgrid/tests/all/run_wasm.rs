//! The wasm guest contract, through `vmgrid run`, with real wasmtime and real guest programs.

use std::path::Path;

use crate::util::*;

fn probe_job(d: &JobDir, args: &[&str], extra: &str) -> std::path::PathBuf {
    let args = args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    d.job(&format!(
        "name = \"probe\"\n[vm]\ntype = \"wasm\"\nimage = {}\nargs = [{args}]\n{extra}",
        toml_path(&guest_wasm("probe"))
    ))
}

#[test]
fn args_and_env_reach_the_guest() {
    let d = JobDir::new();
    let job = probe_job(&d, &["env:MODE", "env:HOME", "args", "two words", ""], "env = { MODE = \"fast\" }\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), "fast\n<unset>\ntwo words\n\n");
}

#[test]
fn inputs_and_outputs_keep_subdirectories() {
    let d = JobDir::new();
    d.write("data/in.txt", "input file");
    d.write("tree/a/b.txt", "nested input");
    let job = probe_job(
        &d,
        &[
            "read:data/in.txt",
            "read:/job/tree/a/b.txt",
            "write:out/sub/r.csv:1,2",
            "write:top.txt:top",
            "write:skip.log:no",
        ],
        "[files]\ninputs = [\"data/in.txt\", \"tree\"]\noutputs = [\"top.txt\", \"out/**/*.csv\"]\n",
    );
    let out = vmgrid().arg("run").arg(&job).arg("--out").arg(d.out()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), "input file\nnested input\n");
    assert_eq!(std::fs::read_to_string(d.out().join("out/sub/r.csv")).unwrap(), "1,2");
    assert_eq!(std::fs::read_to_string(d.out().join("top.txt")).unwrap(), "top");
    assert!(!d.out().join("skip.log").exists());
    assert!(!d.out().join("data/in.txt").exists());
}

#[test]
fn exit_codes_pass_through() {
    for code in [0, 3, 42] {
        let d = JobDir::new();
        let job = probe_job(&d, &[&format!("exit:{code}")], "");
        vmgrid().arg("run").arg(&job).assert().code(code);
    }
}

#[test]
fn time_limit_stops_a_spinning_guest() {
    let d = JobDir::new();
    let job = probe_job(&d, &["spin"], "[resources]\ntimeout_s = 1\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("time limit of 1 s"), "{}", stderr_of(&out));
}

#[test]
fn a_guest_runs_in_a_worker_process_that_ends_with_a_killed_vmgrid() {
    let d = JobDir::new();
    let job = probe_job(&d, &["spin"], "[resources]\ntimeout_s = 300\n");
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmgrid"));
    cmd.env("VMGRID_CACHE_DIR", repo_root().join("target/test-cache")).arg("run").arg(&job);
    let mut run = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let worker = wasm_worker_of(run.id());
    // The spinning guest runs in the worker, not in vmgrid run.
    run.kill().unwrap();
    run.wait().unwrap();
    wait_until("the worker to end with its parent, mid-guest", || !running(worker));
}

#[test]
fn a_guest_filling_its_directory_is_stopped_at_its_disk_limit_and_keeps_no_outputs() {
    let d = JobDir::new();
    let job = probe_job(
        &d,
        &["fill:big.bin"],
        "[resources]\ndisk_mb = 4\ntimeout_s = 300\n[files]\noutputs = [\"big.bin\"]\n",
    );
    let out = vmgrid().arg("run").arg(&job).arg("--out").arg(d.out()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("over the disk_mb limit of 4 MiB; the VM was stopped and no outputs were kept"), "{err}");
    assert!(!d.out().join("big.bin").exists(), "an output past the disk limit was collected");
}

#[test]
fn memory_limit_is_enforced() {
    let d = JobDir::new();
    let job = probe_job(&d, &["alloc:8"], "[resources]\nmemory_mb = 32\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), "allocated 8\n");

    let d = JobDir::new();
    let job = probe_job(&d, &["alloc:64"], "[resources]\nmemory_mb = 32\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("memory limit of 32 MiB"), "{err}");
}

/// Runs a command and returns its output and its peak resident memory in KiB (from wait4).
// The child is reaped by wait4 below, which clippy's zombie check does not see.
#[allow(clippy::zombie_processes)]
fn run_measuring_rss(cmd: &mut std::process::Command) -> (std::process::Output, i64) {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut v = Vec::new();
        stderr.read_to_end(&mut v).unwrap();
        v
    });
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).unwrap();
    let err = t.join().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own unreaped child with valid pointers to locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let status = std::os::unix::process::ExitStatusExt::from_raw(status);
    (std::process::Output { status, stdout: out, stderr: err }, usage.ru_maxrss)
}

#[test]
fn stdout_flood_is_capped_and_memory_stays_bounded() {
    let d = JobDir::new();
    let run = |args: &[&str]| {
        let job = probe_job(&d, args, "[resources]\ntimeout_s = 120\n");
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmgrid"));
        cmd.env("VMGRID_CACHE_DIR", repo_root().join("target/test-cache"));
        cmd.args(["run", "--output-cap", "1048576"]).arg(&job);
        run_measuring_rss(&mut cmd)
    };
    // The same run printing 1 MiB: what vmgrid run itself keeps resident (its binary, wasmtime).
    let (_, baseline_kib) = run(&["flood:1"]);
    let (out, maxrss_kib) = run(&["flood:512"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(out.stdout.len(), 1 << 20);
    let err = stderr_of(&out);
    assert!(err.contains("stdout was cut") && err.contains("535822336 more bytes dropped"), "{err}");
    // 512 MiB went through; far less may stay resident beyond what a 1 MiB run keeps.
    assert!(maxrss_kib < baseline_kib + 64 * 1024, "peak RSS {maxrss_kib} KiB, {baseline_kib} KiB printing 1 MiB");
}

#[test]
fn nothing_outside_the_job_directory_is_reachable() {
    let d = JobDir::new();
    let secret = d.write("secret.txt", "do not read");
    let job = probe_job(
        &d,
        &[
            "read:/etc/hostname",
            &format!("read:{}", secret.display()),
            "read:../secret.txt",
            "read:/job/../secret.txt",
            "ls:/job",
            "write:/tmp/vmgrid-escape-test.txt:x",
            "ls:.",
            "ls:/",
        ],
        "[files]\noutputs = [\"**\"]\n",
    );
    let out = vmgrid().arg("run").arg(&job).arg("--out").arg(d.out()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let stdout = stdout_of(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    for l in &lines[..4] {
        assert!(l.starts_with("denied:"), "{stdout}");
    }
    assert_eq!(lines[4], "", "the job directory starts empty: {stdout}");
    // An absolute path resolves inside the job directory, so "/tmp/..." lands in the job's tmp/.
    assert_eq!(lines[5], "tmp", "{stdout}");
    assert_eq!(lines[6], "tmp", "`/` is the job directory: {stdout}");
    assert!(!Path::new("/tmp/vmgrid-escape-test.txt").exists());
    assert_eq!(std::fs::read_to_string(d.out().join("tmp/vmgrid-escape-test.txt")).unwrap(), "x");
}

#[test]
fn an_invalid_module_is_bad_input() {
    let d = JobDir::new();
    d.write("bad.wasm", b"\0asm\x01\0\0\0garbage");
    let job = d.job("[vm]\ntype = \"wasm\"\nimage = \"bad.wasm\"\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("not a valid WebAssembly module"), "{}", stderr_of(&out));

    d.write("text.wasm", "this is not wasm at all");
    let job = d.job("[vm]\ntype = \"wasm\"\nimage = \"text.wasm\"\n");
    vmgrid().arg("run").arg(&job).assert().code(2);
}

#[test]
fn a_trap_is_a_failure_with_a_reason() {
    let d = JobDir::new();
    let job = probe_job(&d, &["panic"], "");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("the probe was asked to panic"), "{err}");
    assert!(err.contains("the job failed: the guest trapped"), "{err}");
}

#[test]
fn a_deterministic_job_that_sleeps_fails_saying_why_and_a_plain_one_sleeps() {
    for (policy, code) in [("[policy]\ndeterministic = true\n", 1), ("", 0)] {
        let d = JobDir::new();
        let job = probe_job(&d, &["write:a.txt:kept", "read:a.txt", "sleep:1"], policy);
        let out = vmgrid().arg("run").arg(&job).output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", stderr_of(&out));
        // A Rust program runs as usual up to its first clock.
        assert_eq!(stdout_of(&out), "kept\n");
        let refused = "the job failed: deterministic job: poll_oneoff with a clock subscription is refused \
                       (clocks differ between nodes)";
        assert_eq!(stderr_of(&out).contains(refused), code == 1, "{}", stderr_of(&out));
    }
}

#[test]
fn wat_modules_run_and_compiled_modules_are_cached() {
    let d = JobDir::new();
    // A WAT module that writes "hi\n" to stdout and exits 5.
    d.write(
        "hi.wat",
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hi\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 3))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 5))))
"#,
    );
    let cache = d.path().join("cache");
    let job = d.job("[vm]\ntype = \"wasm\"\nimage = \"hi.wat\"\n");
    for _ in 0..2 {
        let out = vmgrid().env("VMGRID_CACHE_DIR", &cache).arg("run").arg(&job).output().unwrap();
        assert_eq!(out.status.code(), Some(5), "{}", stderr_of(&out));
        assert_eq!(stdout_of(&out), "hi\n");
    }
    let cached: Vec<_> = std::fs::read_dir(cache.join("wasm")).unwrap().collect();
    assert_eq!(cached.len(), 1, "one compiled module in the cache");
}

#[test]
fn the_wordcount_example_runs() {
    let root = repo_root();
    let example = root.join("examples/wordcount");
    std::fs::copy(guest_wasm("wordcount"), example.join("wordcount.wasm")).unwrap();
    let d = JobDir::new();
    let out = vmgrid().arg("run").arg(example.join("job.toml")).arg("--out").arg(d.out()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("words"), "{}", stdout_of(&out));
    let report = std::fs::read_to_string(d.out().join("out/report.txt")).unwrap();
    assert!(report.starts_with("words\t272\n"), "{report}");
    assert!(report.contains("that\t13"), "{report}");
}
