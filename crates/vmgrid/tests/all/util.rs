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
