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
    port: Option<u16>,
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
    /// A cluster on a unix socket only.
    pub fn start() -> TestDb {
        TestDb::start_with(None)
    }

    /// A cluster that also listens on 127.0.0.1 (port [`TestDb::port`]) with TLS, serving the
    /// certificate chain `cert_pem` with `key_pem`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> TestDb {
        TestDb::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> TestDb {
        let dir = tempfile::Builder::new().prefix("vmgrid-pg").tempdir_in("/tmp").expect("a temp dir");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_root = unsafe { libc::geteuid() } == 0;
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        let mut opts = "-c fsync=on".to_string();
        let mut port = None;
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(dir.path().join("server.crt"), cert).unwrap();
            std::fs::write(dir.path().join("server.key"), key).unwrap();
            let perms = std::fs::Permissions::from_mode(0o600);
            std::fs::set_permissions(dir.path().join("server.key"), perms).unwrap();
            let p = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let d = dir.path().display();
            opts += &format!(
                " -c listen_addresses='127.0.0.1' -c port={p} -c ssl=on -c ssl_cert_file='{d}/server.crt' -c ssl_key_file='{d}/server.key'"
            );
            port = Some(p);
        } else {
            opts += " -c listen_addresses=''";
        }
        opts += &format!(" -c unix_socket_directories='{}'", dir.path().join("sock").display());
        if as_root {
            let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).status().unwrap();
            assert!(st.success(), "chown of the test cluster's directory failed");
        }
        let data = dir.path().join("data");
        let db = TestDb { dir, as_root, port };
        db.run(Command::new(bin("initdb")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data));
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

    /// The TCP port of a cluster started with TLS.
    pub fn port(&self) -> Option<u16> {
        self.port
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
