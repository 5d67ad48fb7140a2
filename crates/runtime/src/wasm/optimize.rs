//! binaryen's optimizer (`wasm-opt -O2`) over a module before Cranelift compiles it.
//!
//! Cranelift compiles quickly but allocates registers poorly in large functions. On the compute
//! benchmark's sieve, which rustc inlines into `main`, it kept the loop's values in stack slots
//! and spilled or reloaded three of them on every round: 1.2-1.3x the native build's time. After
//! binaryen's passes, the same loop compiles to what LLVM makes of it natively, with no stack
//! traffic, and the program runs at native speed. The optimizer runs once per module on a node:
//! the compiled module is cached, under a name that also carries the optimizer's identity.
//!
//! A module is untrusted input to a C++ program, so `wasm-opt` only sees modules that wasmtime
//! has validated, and runs confined: bubblewrap with new namespaces (no network), the host's
//! `/usr` read-only and a private directory holding the module and nothing else of the host's
//! filesystem, never as root (a root node runs it as `nobody`), one thread, and limits on its
//! time, memory, output and open files. Whatever goes wrong (no tool, a crash, a timeout, an
//! output wasmtime rejects) compiles the module as submitted, with a warning in the log.
//! Deterministic jobs are never optimized: binaryen may fold float operations while optimizing,
//! and a NaN it folds is not canonicalized as one computed at run time would be.

use std::hash::{Hash, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::qemu::launch::{UNPRIVILEGED_USER, effective_uid, user_ids};

/// Names the optimizer; `off` turns it off.
pub const ENV: &str = "VMGRID_WASM_OPT";
/// The optimization level: binaryen's default (`-O`). On the compute guest -O1 to -O4 all ran
/// within this machine's noise of each other; -O2 takes about 0.4 s on its 80 KB module.
const LEVEL: &str = "-O2";
/// The wasm features binaryen may keep or use: those wasmtime's default engine accepts that
/// binaryen 108 (Debian 12) knows. A module's own `target_features` section adds to these.
const FEATURES: [&str; 9] = [
    "--enable-sign-ext",
    "--enable-mutable-globals",
    "--enable-nontrapping-float-to-int",
    "--enable-bulk-memory",
    "--enable-multivalue",
    "--enable-reference-types",
    "--enable-simd",
    "--enable-tail-call",
    "--enable-extended-const",
];
/// Modules larger than this are compiled as submitted: binaryen's time and memory grow with a
/// module, and the job waits for them.
pub const MAX_MODULE: usize = 32 << 20;
/// The longest a module may take, however large.
const MAX_LIMIT: Duration = Duration::from_secs(120);
/// Where the private directory is inside the sandbox.
const WORK: &str = "/work";

/// binaryen's `wasm-opt` and what confines it.
#[derive(Debug, Clone)]
pub struct Optimizer {
    wasm_opt: PathBuf,
    bwrap: PathBuf,
    /// The tool's path, size and modification time, hashed: a cached module compiled after a
    /// different optimizer (or none) is not reused.
    identity: u64,
    /// Seconds allowed per run, beyond one second per 32 KiB of module.
    base_limit: Duration,
}

impl Optimizer {
    /// The optimizer on this host, or why there is none: `$VMGRID_WASM_OPT` (a path, or `off`),
    /// else `wasm-opt` on `PATH`; bubblewrap to confine it (`$VMGRID_BWRAP`, else `bwrap`).
    pub fn find() -> Result<Optimizer, String> {
        if std::env::var_os(ENV).is_some_and(|v| v == "off") {
            return Err(format!("{ENV}=off"));
        }
        let wasm_opt = crate::tools::find(Some(ENV), "wasm-opt")
            .ok_or_else(|| format!("no `wasm-opt` on PATH (Debian: `apt-get install binaryen`, or set {ENV})"))?;
        Optimizer::at(&wasm_opt)
    }

    /// The optimizer `wasm_opt`, confined as `find`'s is.
    pub(crate) fn at(wasm_opt: &Path) -> Result<Optimizer, String> {
        let wasm_opt = std::fs::canonicalize(wasm_opt)
            .map_err(|e| format!("the optimizer `{}` cannot be found: {e}", wasm_opt.display()))?;
        let meta = std::fs::metadata(&wasm_opt)
            .map_err(|e| format!("the optimizer `{}` cannot be read: {e}", wasm_opt.display()))?;
        if !meta.is_file() {
            return Err(format!("the optimizer `{}` is not a file", wasm_opt.display()));
        }
        let bwrap = crate::tools::find(Some("VMGRID_BWRAP"), "bwrap")
            .filter(|b| b.is_file())
            .ok_or("no `bwrap` to confine `wasm-opt` in (Debian: `apt-get install bubblewrap`)")?;
        if effective_uid() == 0 && crate::tools::find(None, "setpriv").is_none() {
            return Err("vmgrid runs as root and there is no `setpriv` to run `wasm-opt` as nobody".into());
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&wasm_opt, meta.len(), meta.modified().ok(), LEVEL, FEATURES).hash(&mut h);
        Ok(Optimizer { wasm_opt, bwrap, identity: h.finish(), base_limit: Duration::from_secs(30) })
    }

    /// The same optimizer with `base` seconds allowed per run (tests).
    #[cfg(test)]
    pub(crate) fn with_base_limit(mut self, base: Duration) -> Optimizer {
        self.base_limit = base;
        self
    }

    pub fn identity(&self) -> u64 {
        self.identity
    }

    pub fn tool(&self) -> &Path {
        &self.wasm_opt
    }

    /// How long one module may take: the base limit and a second per 32 KiB, at most two
    /// minutes (-O2 took 0.4 s for 80 KB here).
    fn limit(&self, len: usize) -> Duration {
        (self.base_limit + Duration::from_secs((len >> 15) as u64)).min(MAX_LIMIT.max(self.base_limit))
    }

    /// `module` (binary; validated by the caller) optimized, or why not.
    pub fn optimize(&self, module: &[u8]) -> Result<Vec<u8>, String> {
        if module.len() > MAX_MODULE {
            return Err(format!("the module is over {} MiB", MAX_MODULE >> 20));
        }
        let dir = tempfile::Builder::new()
            .prefix("vmgrid-wasm-opt-")
            .tempdir()
            .map_err(|e| format!("cannot make a directory for it: {e}"))?;
        std::fs::write(dir.path().join("in.wasm"), module).map_err(|e| format!("cannot write the module: {e}"))?;
        let run_as = if effective_uid() == 0 {
            let ids = user_ids(UNPRIVILEGED_USER)
                .map_err(|e| e.to_string())?
                .ok_or(format!("vmgrid runs as root and there is no `{UNPRIVILEGED_USER}` user to run it as"))?;
            for p in [dir.path().to_path_buf(), dir.path().join("in.wasm")] {
                std::os::unix::fs::lchown(&p, Some(ids.0), Some(ids.1))
                    .map_err(|e| format!("cannot hand {} to {UNPRIVILEGED_USER}: {e}", p.display()))?;
            }
            Some(ids)
        } else {
            None
        };
        let out_cap = module.len() * 4 + (1 << 20);
        let mut cmd = Command::new(&self.bwrap);
        cmd.args(self.sandbox_args(dir.path(), run_as));
        cmd.arg(&self.wasm_opt).arg(LEVEL).args(FEATURES).arg("--strip-dwarf");
        cmd.arg(format!("{WORK}/in.wasm")).arg("-o").arg(format!("{WORK}/out.wasm"));
        cmd.env_clear().env("PATH", "/usr/bin:/bin").env("BINARYEN_CORES", "1");
        confine(&mut cmd, module.len() as u64, out_cap as u64, self.limit(module.len()));
        let err = CaptureSink::bounded(4096);
        let mut child = Supervised::spawn(&mut cmd, CaptureSink::bounded(4096), err.clone())
            .map_err(|e| format!("cannot start `{}`: {e}", self.bwrap.display()))?;
        let limit = self.limit(module.len());
        let status = match child.wait_until(Instant::now() + limit).map_err(|e| e.to_string())? {
            Waited::Exited(st) => st,
            Waited::TimedOut => {
                child.kill_and_reap();
                return Err(format!("`wasm-opt` took over {} s", limit.as_secs()));
            }
        };
        child.join_readers();
        if !status.success() {
            let said = String::from_utf8_lossy(&err.take().bytes).trim().to_string();
            let said = said.lines().last().unwrap_or("").to_string();
            return Err(format!(
                "`wasm-opt` failed ({status}){}",
                if said.is_empty() { said } else { format!(": {said}") }
            ));
        }
        let out = dir.path().join("out.wasm");
        let len = std::fs::symlink_metadata(&out).map_err(|e| format!("`wasm-opt` left no module: {e}"))?;
        if !len.is_file() || len.len() as usize > out_cap {
            return Err(format!("`wasm-opt` left something other than a module of at most {out_cap} bytes"));
        }
        std::fs::read(&out).map_err(|e| format!("cannot read what `wasm-opt` made: {e}"))
    }

    /// The host directories a tool outside `/usr` needs, bound read-only at the same paths: its
    /// own, and a `lib` beside its `bin` (binaryen's release archives find their library there).
    fn tool_dirs(&self) -> Vec<PathBuf> {
        let Some(dir) = self.wasm_opt.parent().filter(|_| !self.wasm_opt.starts_with("/usr")) else {
            return Vec::new();
        };
        let lib = dir.parent().map(|p| p.join("lib")).filter(|l| dir.ends_with("bin") && l.is_dir());
        std::iter::once(dir.to_path_buf()).chain(lib).collect()
    }

    /// bubblewrap's arguments, up to and including the `--` before the tool's argv.
    fn sandbox_args(&self, dir: &Path, run_as: Option<(u32, u32)>) -> Vec<String> {
        let mut a: Vec<String> = [
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--symlink",
            "usr/bin",
            "/bin",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
        ]
        .map(String::from)
        .to_vec();
        for dir in self.tool_dirs() {
            // Its parents are made searchable (bwrap would make them 0700, shut to nobody).
            let parents: Vec<&Path> = dir.ancestors().skip(1).filter(|p| p.parent().is_some()).collect();
            for p in parents.into_iter().rev() {
                a.extend(["--perms".into(), "0755".into(), "--dir".into(), p.display().to_string()]);
            }
            let d = dir.display().to_string();
            a.extend(["--ro-bind".into(), d.clone(), d]);
        }
        a.extend(["--bind".into(), dir.display().to_string(), WORK.into(), "--chdir".into(), WORK.into()]);
        match run_as {
            None => a.extend(["--unshare-user".into(), "--cap-drop".into(), "ALL".into(), "--".into()]),
            Some((uid, gid)) => {
                a.push("--".into());
                a.extend(
                    ["/usr/bin/setpriv".into(), format!("--reuid={uid}"), format!("--regid={gid}")].into_iter().chain(
                        ["--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
                            .map(String::from),
                    ),
                );
            }
        }
        a
    }
}

/// Logs whether modules compiled here go through binaryen, or why not (a node says so as it
/// starts).
pub fn log_availability() {
    match Optimizer::find() {
        Ok(o) => {
            tracing::info!(tool = %o.tool().display(), "wasm modules are optimized by binaryen before they are compiled")
        }
        Err(why) => tracing::warn!("wasm modules are compiled as submitted, without binaryen's optimizer: {why}"),
    }
}

/// Limits for the sandbox and the tool: cpu time, address space (1 GiB and 64 bytes per byte of
/// module), file size (the output's cap), open files, no core dumps.
fn confine(cmd: &mut Command, len: u64, out_cap: u64, limit: Duration) {
    let memory = (1u64 << 30) + len * 64;
    let limits = [
        (libc::RLIMIT_CPU, limit.as_secs() + 1),
        (libc::RLIMIT_AS, memory),
        (libc::RLIMIT_FSIZE, out_cap),
        (libc::RLIMIT_NOFILE, 64),
        (libc::RLIMIT_CORE, 0),
    ];
    // SAFETY: the closure runs in the forked child before exec and calls only setrlimit, which
    // is async-signal-safe, with plain integers it owns.
    unsafe {
        cmd.pre_exec(move || {
            for (resource, value) in limits {
                let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests;
