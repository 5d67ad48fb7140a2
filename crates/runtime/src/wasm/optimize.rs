//! binaryen's optimizer (`wasm-opt -O2`) over a module before Cranelift compiles it.
//!
//! Cranelift compiles quickly but allocates registers poorly in large functions. On the compute
//! benchmark's sieve, which rustc inlines into `main`, it kept the loop's values in stack slots
//! and spilled or reloaded three of them on every round: 1.2-1.3x the native build's time. After
//! binaryen's passes, the same loop compiles with no stack traffic, and the program runs at
//! native speed. The optimizer runs once per module on a node: the compiled module is cached,
//! under a name that also carries the optimizer's identity.
//!
//! A module is untrusted input to a C++ program, so `wasm-opt` only sees modules that wasmtime
//! has validated, and runs confined: bubblewrap with new namespaces (no network), the host's
//! `/usr` read-only, the module as one read-only file, and nothing else of the host's filesystem
//! (and the tool itself, with a `lib` beside its `bin`, when it is outside `/usr`), and no
//! descriptor of ours but a pipe for its output; never as root (a root node runs it as a user id
//! of its own, picked at random, so that no other process can reach into it or be reached);
//! binaryen on one thread; limits on its time, address space, output, open files and (with its
//! own id) processes.
//! Whatever goes wrong compiles the module as submitted, with a warning in the log. So does an
//! output that wasmtime refuses or whose imports differ (binaryen drops unused imports, which
//! would make a module link on a node with binaryen and not on one without). Deterministic jobs
//! are never optimized: binaryen may fold float operations while optimizing, and a NaN it folds
//! is not canonicalized as one computed at run time would be.

use std::hash::{Hash, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::qemu::launch::effective_uid;

/// Names the optimizer; `off` turns it off.
pub const ENV: &str = "VMGRID_WASM_OPT";
/// The optimization level: binaryen's usual level for speed (its `-O` is `-Os`). On the compute
/// guest -O1 to -O4 all ran within this machine's noise of each other; -O2 takes about 0.4 s on
/// its 80 KB module.
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
/// module (about 7 s of cpu for 2 MB here), and the job waits for them.
const MAX_MODULE: usize = 8 << 20;
/// The longest a module may take, however large.
const MAX_LIMIT: Duration = Duration::from_secs(120);
/// What a root node drops to the tool's own user id with, inside the sandbox (which has only
/// `/usr`).
const SETPRIV: &str = "/usr/bin/setpriv";
/// Where the module is inside the sandbox.
const WORK: &str = "/work";
/// `close_range`'s flag that marks the descriptors close-on-exec instead of closing them.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Why a module was not optimized, and whether that would happen again: then the module as
/// submitted is cached in the optimized one's place, else it is compiled again on its next load.
#[derive(Debug)]
pub struct NotOptimized {
    pub why: String,
    pub lasting: bool,
}

impl NotOptimized {
    fn lasting(why: impl Into<String>) -> NotOptimized {
        NotOptimized { why: why.into(), lasting: true }
    }

    fn passing(why: impl Into<String>) -> NotOptimized {
        NotOptimized { why: why.into(), lasting: false }
    }
}

/// binaryen's `wasm-opt` and what confines it.
#[derive(Debug, Clone)]
pub struct Optimizer {
    wasm_opt: PathBuf,
    bwrap: PathBuf,
    /// The tool's and its library's paths, sizes and modification times, hashed: a cached module
    /// compiled after a different optimizer (or none) is not reused.
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
        if effective_uid() == 0 {
            if !Path::new(SETPRIV).is_file() {
                return Err(format!("vmgrid runs as root and there is no `{SETPRIV}` to drop root with"));
            }
            for map in ["/proc/self/uid_map", "/proc/self/gid_map"] {
                if !maps_own_ids(&std::fs::read_to_string(map).unwrap_or_default()) {
                    return Err(format!(
                        "this root's user namespace does not map the ids {FIRST_ID}-{} that `wasm-opt` runs as ({map})",
                        FIRST_ID + ID_COUNT - 1
                    ));
                }
            }
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&wasm_opt, meta.len(), meta.modified().ok(), LEVEL, FEATURES).hash(&mut h);
        // Debian's `wasm-opt` is a small program; binaryen itself is its library.
        let bin = wasm_opt.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
        let multiarch = format!("lib/{}-linux-gnu/libbinaryen.so", std::env::consts::ARCH);
        for lib in [bin.join("lib/libbinaryen.so"), bin.join(multiarch)] {
            if let Ok(m) = std::fs::metadata(&lib) {
                (lib, m.len(), m.modified().ok()).hash(&mut h);
            }
        }
        Ok(Optimizer { wasm_opt, bwrap, identity: h.finish(), base_limit: Duration::from_secs(30) })
    }

    /// The same optimizer with `base` seconds allowed per run (tests).
    #[cfg(test)]
    pub(crate) fn with_base_limit(mut self, base: Duration) -> Optimizer {
        self.base_limit = base;
        self
    }

    /// The same optimizer confined by `bwrap` (tests).
    #[cfg(test)]
    pub(crate) fn with_bwrap(mut self, bwrap: PathBuf) -> Optimizer {
        self.bwrap = bwrap;
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

    /// `binary` (validated by the caller) optimized and compiled on `engine`, if wasmtime takes
    /// binaryen's output and it imports what `binary` does.
    pub(crate) fn compile(&self, engine: &wasmtime::Engine, binary: &[u8]) -> Result<wasmtime::Module, NotOptimized> {
        let made = self.optimize(binary)?;
        let refused = |e: String| NotOptimized::lasting(format!("wasmtime refused what it made: {e}"));
        let (mut before, mut after) = (imports(binary).map_err(refused)?, imports(&made).map_err(refused)?);
        before.sort();
        after.sort();
        if before != after {
            return Err(NotOptimized::lasting(format!(
                "it changed the module's imports ({} to {}), which would change where it links",
                before.len(),
                after.len()
            )));
        }
        wasmtime::Module::new(engine, &made).map_err(|e| refused(format!("{e:#}")))
    }

    /// `module` (binary; validated by the caller) optimized, or why not.
    pub fn optimize(&self, module: &[u8]) -> Result<Vec<u8>, NotOptimized> {
        if module.len() > MAX_MODULE {
            return Err(NotOptimized::lasting(format!("the module is over {} MiB", MAX_MODULE >> 20)));
        }
        // Ours alone (0700): no other account can change anything in it. The module is bound into
        // the sandbox read-only, and the output comes on a pipe.
        let dir =
            crate::scratch::dir("wasm-opt").map_err(|e| NotOptimized::passing(format!("no scratch directory: {e}")))?;
        let input = dir.path().join("in.wasm");
        std::fs::write(&input, module)
            .and_then(|()| std::fs::set_permissions(&input, std::os::unix::fs::PermissionsExt::from_mode(0o444)))
            .map_err(|e| NotOptimized::passing(format!("cannot write the module: {e}")))?;
        // A root node runs the tool as a user id of its own, which no other process has: another
        // process of one shared user (QEMU's `nobody`) could reach into it through /proc.
        let run_as = (effective_uid() == 0).then(fresh_id);
        let out_cap = module.len() * 4 + (1 << 20);
        let mut cmd = Command::new(&self.bwrap);
        cmd.args(self.sandbox_args(&input, run_as));
        cmd.arg(&self.wasm_opt).arg(LEVEL).args(FEATURES).arg("--strip-dwarf");
        cmd.arg(format!("{WORK}/in.wasm")).args(["-o", "-"]);
        cmd.env_clear().env("PATH", "/usr/bin:/bin").env("BINARYEN_CORES", "1");
        let limit = self.limit(module.len());
        confine(&mut cmd, module.len() as u64, limit, run_as.is_some());
        let out = CaptureSink::bounded(out_cap);
        let failed = run(&mut cmd, out.clone(), limit, &self.bwrap)?;
        let made = out.take();
        if made.dropped > 0 {
            return Err(NotOptimized::lasting(format!("`wasm-opt` made over {out_cap} bytes")));
        }
        if let Some(failed) = failed {
            return Err(failed);
        }
        if made.bytes.is_empty() {
            return Err(NotOptimized::lasting("`wasm-opt` made no module"));
        }
        Ok(made.bytes)
    }

    /// What a tool outside `/usr` needs of the host, bound read-only at the same paths: the tool,
    /// and a `lib` beside its `bin` (binaryen's release archives find their library there).
    fn tool_paths(&self) -> Vec<PathBuf> {
        if self.wasm_opt.starts_with("/usr") {
            return Vec::new();
        }
        let dir = self.wasm_opt.parent().unwrap_or(Path::new("/"));
        let lib = dir.parent().map(|p| p.join("lib")).filter(|l| dir.ends_with("bin") && l.is_dir());
        std::iter::once(self.wasm_opt.clone()).chain(lib).collect()
    }

    /// bubblewrap's arguments, up to and including the `--` before the tool's argv.
    fn sandbox_args(&self, input: &Path, run_as: Option<u32>) -> Vec<String> {
        let mut a = crate::tools::bwrap_base();
        for path in self.tool_paths() {
            // Its parents are made searchable (bwrap would make them 0700, shut to the tool's user).
            let parents: Vec<&Path> = path.ancestors().skip(1).filter(|p| p.parent().is_some()).collect();
            for p in parents.into_iter().rev() {
                a.extend(["--perms".into(), "0755".into(), "--dir".into(), p.display().to_string()]);
            }
            let p = path.display().to_string();
            a.extend(["--ro-bind".into(), p.clone(), p]);
        }
        a.extend(["--perms".into(), "0755".into(), "--dir".into(), WORK.into()]);
        a.extend(["--ro-bind".into(), input.display().to_string(), format!("{WORK}/in.wasm")]);
        a.extend(["--chdir".into(), WORK.into()]);
        match run_as {
            None => a.extend(["--unshare-user".into(), "--cap-drop".into(), "ALL".into(), "--".into()]),
            Some(id) => {
                a.push("--".into());
                a.extend([SETPRIV.into(), format!("--reuid={id}"), format!("--regid={id}")].into_iter().chain(
                    ["--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"].map(String::from),
                ));
            }
        }
        a
    }
}

/// Logs whether modules compiled here go through binaryen, or why not (a node says so as it
/// starts), having tried it on a small module.
pub fn log_availability() {
    let tried = Optimizer::find().and_then(|o| {
        let probe = wat::parse_str(r#"(module (func (export "_start")))"#).map_err(|e| e.to_string())?;
        o.optimize(&probe).map(|_| o).map_err(|e| format!("it failed on a test module: {}", e.why))
    });
    match tried {
        Ok(o) => {
            tracing::info!(tool = %o.tool().display(), "wasm modules are optimized by binaryen before they are compiled")
        }
        Err(why) => tracing::warn!("wasm modules are compiled as submitted, without binaryen's optimizer: {why}"),
    }
}

/// A module's imports, as (module, name) pairs.
fn imports(binary: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut all = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(binary) {
        if let wasmparser::Payload::ImportSection(s) = payload.map_err(|e| e.to_string())? {
            for i in s.into_imports() {
                let i = i.map_err(|e| e.to_string())?;
                all.push((i.module.to_string(), i.name.to_string()));
            }
        }
    }
    Ok(all)
}

/// The first of the user ids a root node runs the tool as, one picked at random per run from the
/// 2^24 above it: ids no account or container range is given on a normal system.
const FIRST_ID: u32 = 0x7e00_0000;

/// How many ids from [`FIRST_ID`] a run's id is picked from.
const ID_COUNT: u32 = 1 << 24;

/// Whether a `/proc/self/uid_map` (or `gid_map`) maps every id a run may get: not in a user
/// namespace that maps only the usual 65,536 ids, as containers' do.
fn maps_own_ids(map: &str) -> bool {
    map.lines().any(|l| {
        let f: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        f.len() == 3 && f[0] <= FIRST_ID as u64 && f[0] + f[2] >= (FIRST_ID + ID_COUNT) as u64
    })
}

/// A user id for one run of the tool (see [`FIRST_ID`]).
fn fresh_id() -> u32 {
    use std::hash::BuildHasher;
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // RandomState is seeded at random once per process; the pid and the count tell runs apart.
    let h = std::collections::hash_map::RandomState::new().hash_one((std::process::id(), run));
    FIRST_ID + (h as u32 % ID_COUNT)
}

/// Runs the sandboxed tool to its end, its stdout into `out`: what it said if it failed (the last
/// line of its stderr), or an error if it could not be run or was stopped: at `limit`, or at once
/// when it writes past `out`'s cap or floods its stderr.
fn run(
    cmd: &mut Command,
    out: CaptureSink,
    limit: Duration,
    bwrap: &Path,
) -> Result<Option<NotOptimized>, NotOptimized> {
    let err = CaptureSink::bounded(4096);
    let mut child = Supervised::spawn(cmd, out.clone(), err.clone())
        .map_err(|e| NotOptimized::passing(format!("cannot start `{}`: {e}", bwrap.display())))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        let slice = deadline.min(Instant::now() + Duration::from_millis(20));
        match child.wait_until(slice).map_err(|e| NotOptimized::passing(e.to_string()))? {
            Waited::Exited(st) => break st,
            Waited::TimedOut if out.dropped() > 0 || err.dropped() > 1 << 20 => {
                child.kill_and_reap();
                return Err(NotOptimized::lasting("`wasm-opt` wrote past its output's cap"));
            }
            Waited::TimedOut if Instant::now() >= deadline => {
                child.kill_and_reap();
                return Err(NotOptimized::lasting(format!("`wasm-opt` took over {} s", limit.as_secs())));
            }
            Waited::TimedOut => {}
        }
    };
    child.join_readers();
    if status.success() {
        return Ok(None);
    }
    let said = String::from_utf8_lossy(&err.take().bytes).trim().lines().last().unwrap_or("").to_string();
    let why =
        format!("`wasm-opt` failed ({status}){}", if said.is_empty() { String::new() } else { format!(": {said}") });
    // Killed from outside (the kernel's OOM killer, a service manager's stop; bwrap passes a
    // signal's death on as 128 and its number), or a sandbox or program that could not be set up:
    // the module itself may well be fine next time. A crash (SIGSEGV, SIGABRT) or the cpu limit
    // (SIGXCPU) on this module would happen again.
    let outside = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    let signal = std::os::unix::process::ExitStatusExt::signal(&status).or(status.code().map(|c| c - 128));
    let passing = signal.is_some_and(|s| outside.contains(&s))
        || ["bwrap:", "setpriv:"].iter().any(|p| said.starts_with(p))
        || said.contains("error while loading shared libraries");
    Ok(Some(NotOptimized { why, lasting: !passing }))
}

/// Limits for the sandbox and the tool: cpu time, address space (1 GiB and 64 bytes per byte of
/// module), files (it writes none), open files, no core dumps, and with a user id of its own
/// (`own_id`, a root node) 64 processes; and no descriptor of ours but its standard ones (a wasm
/// worker's socket to its node would otherwise pass through bwrap).
fn confine(cmd: &mut Command, len: u64, limit: Duration, own_id: bool) {
    let memory = (1u64 << 30) + len * 64;
    let mut limits = vec![
        (libc::RLIMIT_CPU, limit.as_secs() + 1),
        (libc::RLIMIT_AS, memory),
        (libc::RLIMIT_FSIZE, 1 << 20),
        (libc::RLIMIT_NOFILE, 64),
        (libc::RLIMIT_CORE, 0),
    ];
    if own_id {
        // Counted per real user id: only an id of its own makes this bound the tool alone.
        limits.push((libc::RLIMIT_NPROC, 64));
    }
    // SAFETY: the closure runs in the forked child before exec and calls only close_range,
    // getrlimit, fcntl and setrlimit, all async-signal-safe, with plain integers it owns. Marking
    // descriptors 3 and up close-on-exec (rather than closing them) leaves std's own exec-error
    // pipe working; a kernel without close_range's flag (before 5.11) gets one fcntl per
    // descriptor up to the limit on open files.
    unsafe {
        cmd.pre_exec(move || {
            if libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
                let mut open = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut open) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in 3..open.rlim_cur.min(1 << 20) as i32 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            for &(resource, value) in &limits {
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
