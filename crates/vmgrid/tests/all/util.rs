//! Helpers shared by the integration tests: the binary, the guest programs, the guest kit, and
//! job directories written on the fly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The `vmgrid` binary with a cache directory shared by all tests (the module cache and the
/// accelerator probe are what a real user's would be).
pub fn vmgrid() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("vmgrid").unwrap();
    cmd.env("VMGRID_CACHE_DIR", repo_root().join("target/test-cache"));
    cmd.env_remove("VMGRID_ACCEL");
    cmd
}

/// A guest program from `guests/`, built for wasm32-wasip1 once per test run.
pub fn guest_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = repo_root();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
            .arg(root.join("guests/Cargo.toml"))
            // Where this reads them from, even under a CARGO_TARGET_DIR meant for the workspace.
            .arg("--target-dir")
            .arg(root.join("guests/target"))
            .status()
            .expect("run cargo to build the guest programs");
        assert!(status.success(), "building guests/ for wasm32-wasip1 failed (rustup target add wasm32-wasip1?)");
        root.join("guests/target/wasm32-wasip1/release")
    });
    dir.join(format!("{name}.wasm"))
}

/// The guest kit (kernel and initramfs), built once per test run by guest-kit/build.sh.
pub fn guest_kit() -> (PathBuf, PathBuf) {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let root = repo_root();
        let out = root.join("target/guest-kit");
        let status = Command::new("bash")
            .arg(root.join("guest-kit/build.sh"))
            .arg(&out)
            .status()
            .expect("run guest-kit/build.sh");
        assert!(status.success(), "guest-kit/build.sh failed");
        out
    });
    (out.join("vmlinuz"), out.join("initrd.gz"))
}

/// A temporary directory holding a job file and whatever else a test puts there.
pub struct JobDir {
    pub dir: tempfile::TempDir,
}

impl JobDir {
    pub fn new() -> JobDir {
        JobDir { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Writes `job.toml` and returns its path.
    pub fn job(&self, toml: &str) -> PathBuf {
        self.write("job.toml", toml)
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out-dir")
    }
}

/// A TOML string literal for a path.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

pub fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A pool of real processes on loopback: one `vmgrid coordinator` and any number of
/// `vmgrid node`s, all killed when the pool is dropped. Its store is SQLite, or a private
/// PostgreSQL cluster when `VMGRID_TEST_STORE=postgres` (scripts/test runs the pool's tests with
/// both) or when made by [`Pool::start_on_postgres`].
pub struct Pool {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub coordinator: Option<std::process::Child>,
    pub nodes: Vec<(String, std::process::Child)>,
    listen: String,
    /// More `vmgrid coordinator` flags, passed at every (re)start.
    extra: Vec<String>,
    /// The PostgreSQL cluster holding the pool's state (dropped after the processes).
    _pg: Option<vmgrid_testkit::TestDb>,
}

/// Whether pools in this test run keep their state in PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("VMGRID_TEST_STORE").is_ok_and(|s| s == "postgres")
}

pub const LEASE_TTL_MS: u64 = 1500;

impl Pool {
    pub fn start() -> Pool {
        Pool::start_with(&[])
    }

    /// A pool whose coordinator also gets `extra` flags.
    pub fn start_with(extra: &[&str]) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        Pool::start_in(dir, extra)
    }

    /// A pool kept in `dir` (its data directory is `dir/data`).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Pool {
        Pool::start_store(dir, extra, on_postgres())
    }

    /// A pool kept in `dir` whose state is in SQLite (`dir/data/pool.sqlite`), whatever
    /// `VMGRID_TEST_STORE` says: for tests of that file.
    pub fn start_on_sqlite_in(dir: tempfile::TempDir, extra: &[&str]) -> Pool {
        Pool::start_store(dir, extra, false)
    }

    /// A pool whose state is in a private PostgreSQL cluster, whatever `VMGRID_TEST_STORE` says.
    pub fn start_on_postgres(extra: &[&str]) -> Pool {
        Pool::start_store(tempfile::tempdir().unwrap(), extra, true)
    }

    fn start_store(dir: tempfile::TempDir, extra: &[&str], postgres: bool) -> Pool {
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let pg = postgres.then(vmgrid_testkit::TestDb::start);
        if let Some(db) = &pg {
            extra.extend(["--store".to_string(), db.url()]);
        }
        let mut pool = Pool {
            dir,
            url: String::new(),
            coordinator: None,
            nodes: Vec::new(),
            listen: "127.0.0.1:0".into(),
            extra,
            _pg: pg,
        };
        pool.start_coordinator();
        pool
    }

    /// The `vmgrid coordinator` flags of this pool's coordinator (its store among them).
    pub fn coordinator_flags(&self) -> &[String] {
        &self.extra
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts, on the same address) the coordinator and waits until it answers.
    pub fn start_coordinator(&mut self) {
        let config = self.data_dir().join("client.toml");
        let _ = std::fs::remove_file(&config);
        let child = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
            .args(["coordinator", "--listen", &self.listen])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--lease-ttl-ms", &LEASE_TTL_MS.to_string(), "--node-ttl-ms", &LEASE_TTL_MS.to_string()])
            .args(&self.extra)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
        let mut url = None;
        wait_until("the coordinator to start", || {
            url = std::fs::read_to_string(&config).ok().and_then(|text| {
                text.lines().find_map(|l| l.strip_prefix("pool = \"")).map(|u| u.trim_end_matches('"').to_string())
            });
            url.is_some()
        });
        self.url = url.expect("set when the wait ended");
        self.listen = self.url.trim_start_matches("https://").trim_start_matches("http://").to_string();
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn start_node(&mut self, name: &str, cpus: u32) {
        self.start_node_with(name, cpus, &[]);
    }

    /// Like [`Pool::start_node`], with more `vmgrid node` flags.
    pub fn start_node_with(&mut self, name: &str, cpus: u32, extra: &[&str]) {
        self.start_node_env(name, cpus, extra, &[]);
    }

    /// Like [`Pool::start_node_with`], with more environment variables for the node.
    pub fn start_node_env(&mut self, name: &str, cpus: u32, extra: &[&str], env: &[(&str, &str)]) {
        let child = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
            .args(["node", "--pool", &self.url, "--name", name, "--cpus", &cpus.to_string(), "--drain-timeout-s", "10"])
            // Nodes serve each other large blobs on loopback only.
            .args(["--peer-listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--token-file")
            .arg(self.data_dir().join("pool.token"))
            .arg("--cache-dir")
            .arg(self.dir.path().join(format!("node-{name}")))
            .env("VMGRID_ACCEL", "tcg")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.nodes.push((name.to_string(), child));
        self.wait_for(&format!("node {name} ready"), |p| {
            p.admin().nodes().unwrap().iter().any(|n| n.ad.name == name && n.state == vmgrid_proto::NodeState::Ready)
        });
    }

    pub fn node_pid(&self, name: &str) -> u32 {
        self.nodes.iter().find(|(n, _)| n == name).unwrap().1.id()
    }

    pub fn kill_node(&mut self, name: &str) {
        let i = self.nodes.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.nodes.remove(i);
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn node_credential(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{name}/credential"))).unwrap()
    }

    /// A client of this pool with `token`, trusting the pool's CA.
    pub fn client_with(&self, token: &str) -> vmgrid_client::Client {
        let trust = match std::fs::read_to_string(self.data_dir().join("ca.pem")) {
            Ok(pem) => vmgrid_client::Trust::pool_ca(&pem).unwrap(),
            Err(_) => vmgrid_client::Trust::default(),
        };
        vmgrid_client::Client::with_trust(&self.url, token, trust)
    }

    pub fn admin(&self) -> vmgrid_client::Client {
        let token = std::fs::read_to_string(self.data_dir().join("admin.token")).unwrap();
        self.client_with(&token)
    }

    /// The CLI, pointed at this pool as the admin (through the client.toml it wrote).
    pub fn cli(&self) -> assert_cmd::Command {
        let mut cmd = vmgrid();
        cmd.env("VMGRID_CONFIG", self.data_dir().join("client.toml"));
        cmd.env_remove("VMGRID_POOL").env_remove("VMGRID_TOKEN");
        cmd
    }

    pub fn wait_for(&self, what: &str, cond: impl Fn(&Pool) -> bool) {
        wait_until(what, || cond(self));
    }

    pub fn job(&self, id: u64) -> vmgrid_proto::JobView {
        self.admin().job(id).unwrap().job
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_coordinator();
    }
}

/// A job file for the probe guest, in `dir`.
pub fn probe_job_file(dir: &Path, name: &str, args: &[&str], extra: &str) -> PathBuf {
    let args = args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\n[vm]\ntype = \"wasm\"\nimage = {}\nargs = [{args}]\n{extra}",
            toml_path(&guest_wasm("probe"))
        ),
    )
    .unwrap();
    p
}

pub fn ids_of(out: &std::process::Output) -> Vec<u64> {
    stdout_of(out).lines().map(|l| l.trim().parse().unwrap()).collect()
}

/// Polls `cond` until it holds; fails the test after 60 s, naming what it waited for.
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    assert!(poll_until(std::time::Duration::from_secs(60), cond), "timed out waiting for {what}");
}

/// Polls `cond` until it holds or `limit` passes; the answer is whether it held (for a caller
/// that prints its own diagnostics).
pub fn poll_until(limit: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// The children of process `pid` (all its threads').
pub fn children_of(pid: u32) -> Vec<u32> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    let lists = tasks.iter().filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok());
    lists.flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<_>>()).collect()
}

/// Whether process `pid` is still running (a zombie has ended).
pub fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// The wasm worker process (`vmgrid __wasm-worker`) that process `pid` runs, once it has one.
pub fn wasm_worker_of(pid: u32) -> u32 {
    let mut worker = None;
    wait_until("a wasm worker", || {
        worker = children_of(pid).into_iter().find(|&c| {
            let cmdline = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).nth(1) == Some(b"__wasm-worker".as_slice())
        });
        worker.is_some()
    });
    worker.unwrap()
}

/// `vmgrid args…` inside network namespace `ns` (TCG: no KVM there either), stderr to `log`.
pub fn spawn_vmgrid_in(ns: &str, args: &[&str], log: &Path) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(assert_cmd::cargo::cargo_bin("vmgrid"))
        .args(args)
        .env("VMGRID_ACCEL", "tcg")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}
