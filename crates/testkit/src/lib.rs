//! Services the tests need, each private to one test: [`TestDb`], a PostgreSQL cluster made by
//! `initdb` in a temporary directory, listening only on a unix socket under it (no TCP port),
//! stopped and removed on drop. As root, the server runs as the `postgres` user (initdb refuses
//! root). Only tests and the benchmark suite depend on this crate (tidy lets it start processes for
//! that reason).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestDb {
    dir: tempfile::TempDir,
    as_root: bool,
}

fn bin(name: &str) -> PathBuf {
    for v in ["17", "16", "15"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}"));
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

impl TestDb {
    pub fn start() -> TestDb {
        let dir = tempfile::Builder::new().prefix("vmgrid-pg").tempdir_in("/tmp").expect("a temp dir");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_root = unsafe { libc::geteuid() } == 0;
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        if as_root {
            let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).status().unwrap();
            assert!(st.success(), "chown of the test cluster's directory failed");
        }
        let data = dir.path().join("data");
        let db = TestDb { dir, as_root };
        db.run(Command::new(bin("initdb")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data));
        let opts = format!("-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=on", db.sock().display());
        db.run(
            Command::new(bin("pg_ctl"))
                .args(["-w", "-s", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(db.dir.path().join("log"))
                .args(["-o", &opts, "start"]),
        );
        db
    }

    fn run(&self, cmd: &mut Command) {
        let mut c = if self.as_root {
            let mut r = Command::new("runuser");
            r.args(["-u", "postgres", "--"]).arg(cmd.get_program()).args(cmd.get_args());
            r
        } else {
            std::mem::replace(cmd, Command::new("true"))
        };
        let out = c.output().expect("PostgreSQL's tools are installed (scripts/setup)");
        assert!(out.status.success(), "{:?}: {}", c, String::from_utf8_lossy(&out.stderr));
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for the cluster's `postgres` database, over the unix socket.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// A URL for the database `name` of the cluster (see [`TestDb::create`]).
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres:///{name}?host={}&user=postgres", self.sock().display())
    }

    /// Makes a new, empty database `name` (letters, digits and `_`) and returns its URL.
    pub fn create(&self, name: &str) -> String {
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "a plain database name: {name}");
        self.run(Command::new(bin("createdb")).args(["-h"]).arg(self.sock()).args(["-U", "postgres", name]));
        self.url_of(name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut c = if self.as_root {
            let mut r = Command::new("runuser");
            r.args(["-u", "postgres", "--"]).arg(bin("pg_ctl"));
            r
        } else {
            Command::new(bin("pg_ctl"))
        };
        let _ = c.args(["-s", "-m", "immediate", "-D"]).arg(&data).arg("stop").output();
    }
}
