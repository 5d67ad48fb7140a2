//! The pool's state in PostgreSQL: the same tables and the same translation of [`Op`]s as the
//! embedded SQLite store, versioned migrations in a `schema_version` table, one transaction per
//! commit. Several coordinators may share one database: the one whose store holds the advisory
//! lock ([`PgStore::try_lock`]) is active, and [`watch_lock`] stops it the moment it may not be.

mod apply;
mod load;

use std::time::Duration;

use postgres::config::Host;
use postgres::{Client, Config, NoTls};

use super::{Loaded, Op, Store, StoreError};

/// Each migration takes the schema from version N (its index) to N + 1, in one transaction.
/// Version 1 holds what SQLite's schema version 6 holds; version 2 adds where the active
/// coordinator serves (`active`), which standbys tell their callers, and the id of the data dir
/// the coordinators share; version 3 each job's past attempts (SQLite's version 7); version 4 the
/// last hour's samples (SQLite's version 8).
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE tokens (hash TEXT PRIMARY KEY, role TEXT NOT NULL, owner TEXT NOT NULL, id TEXT,
  created_ms BIGINT NOT NULL DEFAULT 0, expires_ms BIGINT, detail TEXT);
CREATE TABLE specs (id BIGINT PRIMARY KEY, owner TEXT NOT NULL, json TEXT NOT NULL);
CREATE TABLE jobs (
  id BIGINT PRIMARY KEY, spec_id BIGINT NOT NULL, idx BIGINT NOT NULL, owner TEXT NOT NULL,
  state TEXT NOT NULL, node TEXT, epoch BIGINT NOT NULL DEFAULT 0, attempts BIGINT NOT NULL DEFAULT 0,
  retries BIGINT NOT NULL DEFAULT 0, losses BIGINT NOT NULL DEFAULT 0, exit_code INTEGER, reason TEXT,
  submitted_ms BIGINT NOT NULL, finished_ms BIGINT, result TEXT, started_ms BIGINT);
CREATE TABLE nodes (name TEXT PRIMARY KEY, ad TEXT NOT NULL, cred_hash TEXT NOT NULL, state TEXT NOT NULL);
CREATE TABLE blobs (hash TEXT PRIMARY KEY, owner TEXT NOT NULL, size BIGINT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE users (name TEXT PRIMARY KEY, usage_cpu_s DOUBLE PRECISION NOT NULL DEFAULT 0,
  usage_at_ms BIGINT NOT NULL DEFAULT 0, factor DOUBLE PRECISION NOT NULL DEFAULT 1, max_cpus BIGINT);
CREATE TABLE dags (id BIGINT PRIMARY KEY, owner TEXT NOT NULL, json TEXT NOT NULL, state TEXT NOT NULL,
  reason TEXT, submitted_ms BIGINT NOT NULL, finished_ms BIGINT, rescue_of BIGINT);
CREATE TABLE dag_nodes (dag_id BIGINT NOT NULL, idx BIGINT NOT NULL, state TEXT NOT NULL,
  tries BIGINT NOT NULL DEFAULT 0, spec_id BIGINT, first_job BIGINT, reason TEXT, PRIMARY KEY (dag_id, idx));
",
    "
CREATE TABLE active (id INTEGER PRIMARY KEY CHECK (id = 1), url TEXT NOT NULL, since_ms BIGINT NOT NULL,
  data_id TEXT NOT NULL);
",
    "ALTER TABLE jobs ADD COLUMN history TEXT;",
    "CREATE TABLE samples (minute_ms BIGINT PRIMARY KEY, completed BIGINT NOT NULL, queued BIGINT NOT NULL);",
    "ALTER TABLE jobs ADD COLUMN checkpoint TEXT;",
    "ALTER TABLE jobs ADD COLUMN votes TEXT;
     CREATE TABLE node_trust (name TEXT PRIMARY KEY, agree BIGINT NOT NULL, disagree BIGINT NOT NULL, banned BOOLEAN NOT NULL);",
];

/// The schema version this coordinator writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock key the active coordinator holds ("vmgrid" in ASCII).
pub const ACTIVE_LOCK_KEY: i64 = 0x766d_6772_6964;

/// A `postgres://` URL (or `key=value` string) with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    let hide = |part: &str, sep: char| -> String {
        part.split(sep)
            .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
            .collect::<Vec<_>>()
            .join(&sep.to_string())
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        // A quoted value may hold spaces: show none of such a string.
        return if url.contains(['\'', '\\']) { "(a key=value connection string)".into() } else { hide(url, ' ') };
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(hide(q, '&'))),
        None => (rest, None),
    };
    let rest = match rest.rfind('@') {
        Some(at) if rest[..at].contains(':') => {
            format!("{}:***@{}", rest[..at].split(':').next().unwrap_or(""), &rest[at + 1..])
        }
        _ => rest.to_string(),
    };
    match query {
        Some(q) => format!("{scheme}://{rest}?{q}"),
        None => format!("{scheme}://{rest}"),
    }
}

/// The TLS parameters of a connection string, as libpq names them: `sslmode` and `sslrootcert`.
/// They are taken out of the string (the driver knows neither `verify-full` nor `sslrootcert`).
struct TlsParams {
    rest: String,
    mode: Option<String>,
    root_cert: Option<String>,
}

fn tls_params(url: &str) -> TlsParams {
    let (mut mode, mut root_cert) = (None, None);
    let mut keep = |kv: &str| match kv.split_once('=') {
        Some(("sslmode", v)) => {
            mode = Some(v.to_string());
            false
        }
        Some(("sslrootcert", v)) => {
            root_cert = Some(v.to_string());
            false
        }
        _ => true,
    };
    let url_form = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let rest = match url.split_once('?') {
        Some((base, query)) if url_form => {
            let kept: Vec<&str> = query.split('&').filter(|kv| keep(kv)).collect();
            if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) }
        }
        None if url_form => url.to_string(),
        _ => url.split_whitespace().filter(|kv| keep(kv)).collect::<Vec<_>>().join(" "),
    };
    TlsParams { rest, mode, root_cert }
}

/// A connection to a server on another machine is TLS, verified against the CA that signed the
/// server's certificate (`sslmode=verify-full&sslrootcert=FILE`), or refused. A unix socket or a
/// loopback host needs no TLS, but gets it verified the same way when the string asks.
pub fn config(url: &str) -> Result<(Config, Option<rustls::ClientConfig>), StoreError> {
    let shown = redact(url);
    let url_form = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !url_form && (url.contains('\'') || url.contains('\\')) {
        return Err(StoreError(
            "a key=value connection string with quotes or backslashes is not read here: give a postgres:// URL (percent-encode special characters)".into(),
        ));
    }
    let p = tls_params(url);
    let mut cfg: Config = p.rest.parse().map_err(|e| StoreError(format!("{shown}: not a PostgreSQL URL: {e}")))?;
    if cfg.get_hosts().is_empty() {
        return Err(StoreError(format!("{shown}: no host (give host= or a host in the URL)")));
    }
    if cfg.get_hosts().len() > 1 || cfg.get_hostaddrs().len() > 1 {
        return Err(StoreError(format!(
            "{shown}: several hosts: give the one address of the database's primary (the active lock and its watchdog must reach the same server)"
        )));
    }
    let local_name = |n: &str| {
        n == "localhost" || n.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    let remote = cfg
        .get_hosts()
        .iter()
        .find_map(|h| match h {
            Host::Tcp(name) if !local_name(name) => Some(name.clone()),
            _ => None,
        })
        .or_else(|| cfg.get_hostaddrs().iter().find(|a| !a.is_loopback()).map(|a| a.to_string()));
    // A dead peer or a cut network ends the connection (and so the watchdog's query) in seconds,
    // not after the kernel's two hours.
    cfg.connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(15));
    match (p.mode.as_deref(), p.root_cert, remote) {
        (Some("verify-full"), Some(file), _) => {
            let pem = std::fs::read_to_string(&file)
                .map_err(|e| StoreError(format!("{shown}: cannot read sslrootcert {file}: {e}")))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in vmgrid_tls::certs(&pem, "sslrootcert").map_err(|e| StoreError(format!("{shown}: {e}")))? {
                roots.add(c).map_err(|e| StoreError(format!("{shown}: sslrootcert {file}: {e}")))?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(vmgrid_tls::client_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| StoreError(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.ssl_mode(postgres::config::SslMode::Require);
            Ok((cfg, Some(tls)))
        }
        (Some("verify-full"), None, _) => Err(StoreError(format!(
            "{shown}: sslmode=verify-full needs sslrootcert=FILE (the CA of the server's certificate)"
        ))),
        (None | Some("disable"), _, None) => {
            cfg.ssl_mode(postgres::config::SslMode::Disable);
            Ok((cfg, None))
        }
        (Some(mode), _, None) => Err(StoreError(format!(
            "{shown}: sslmode={mode} is not offered: use sslmode=verify-full with sslrootcert=FILE, or no sslmode on this machine"
        ))),
        (_, _, Some(name)) => Err(StoreError(format!(
            "{shown}: host {name} is another machine, so the connection must be TLS with the server verified: add sslmode=verify-full&sslrootcert=FILE (the CA that signed the server's certificate)"
        ))),
    }
}

fn connect(url: &str) -> Result<Client, StoreError> {
    let (cfg, tls) = config(url)?;
    let conn = match tls {
        Some(tls) => cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)),
        None => cfg.connect(NoTls),
    };
    conn.map_err(|e| StoreError(format!("{}: {}", redact(url), with_causes(&e))))
}

/// An error with its causes ("error performing TLS handshake: invalid peer certificate: …").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        err(e)
    }
}

pub(crate) fn err(e: postgres::Error) -> StoreError {
    StoreError(format!("postgresql: {e}"))
}

pub struct PgStore {
    client: Client,
    /// Statements prepared on this connection, by their text.
    prepared: std::collections::HashMap<&'static str, postgres::Statement>,
}

impl PgStore {
    /// Connects and brings the schema to [`SCHEMA_VERSION`]; a database from a newer vmgrid is
    /// refused. Concurrent starts migrate one at a time (a transaction-scoped advisory lock).
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let mut client = connect(url)?;
        migrate(&mut client)?;
        Ok(PgStore { client, prepared: Default::default() })
    }
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(ACTIVE_LOCK_KEY + 1)]).map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)").map_err(err)?;
    let v: Option<i64> = tx.query_opt("SELECT version FROM schema_version", &[]).map_err(err)?.map(|r| r.get(0));
    let mut version = v.unwrap_or(0);
    if v.is_none() {
        tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[]).map_err(err)?;
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "the job store has schema version {version}, newer than this vmgrid's {SCHEMA_VERSION}: upgrade vmgrid"
        )));
    }
    while version < SCHEMA_VERSION {
        tx.batch_execute(MIGRATIONS[version as usize]).map_err(err)?;
        version += 1;
        tx.execute("UPDATE schema_version SET version = $1", &[&version]).map_err(err)?;
    }
    tx.commit().map_err(err)
}

impl Store for PgStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let mut tx = self.client.build_transaction().read_only(true).start().map_err(err)?;
        let l = load::load(&mut tx).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(l)
    }

    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let mut tx = self.client.transaction().map_err(err)?;
        let mut t = apply::Tx { tx: &mut tx, prepared: &mut self.prepared };
        apply::apply_all(&mut t, ops).map_err(err)?;
        tx.commit().map_err(err)
    }
}

impl PgStore {
    /// Takes the active coordinator's lock on this store's own connection, if no other session
    /// holds it. It is held while this connection lives, and this store never reconnects, so
    /// every commit it makes is a commit of the lock's holder: a coordinator whose connection
    /// ended cannot write after another one became active.
    pub fn try_lock(&mut self) -> Result<bool, StoreError> {
        let got: bool =
            self.client.query_one("SELECT pg_try_advisory_lock($1)", &[&ACTIVE_LOCK_KEY]).map_err(err)?.get(0);
        Ok(got)
    }

    /// This connection's server process, by which [`watch_lock`] finds the lock's holder.
    pub fn backend_pid(&mut self) -> Result<i32, StoreError> {
        Ok(self.client.query_one("SELECT pg_backend_pid()", &[]).map_err(err)?.get(0))
    }

    /// Records where the active coordinator serves (its URL), for the standbys to tell callers,
    /// and the id of its data dir.
    pub fn set_active(&mut self, url: &str, data_id: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "INSERT INTO active (id, url, since_ms, data_id) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET url = $1, since_ms = $2, data_id = $3",
                &[&url, &(vmgrid_proto::now_ms() as i64), &data_id],
            )
            .map_err(err)?;
        Ok(())
    }

    /// The URL the active coordinator recorded, if any.
    pub fn active_url(&mut self) -> Result<Option<String>, StoreError> {
        let row = self.client.query_opt("SELECT url FROM active WHERE id = 1", &[]).map_err(err)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Refuses a data dir other than the one the pool's coordinators have used: its blobs (job
    /// files and results), CA and tokens would not be the pool's.
    pub fn check_data_id(&mut self, data_id: &str) -> Result<(), StoreError> {
        let row = self.client.query_opt("SELECT data_id FROM active WHERE id = 1", &[]).map_err(err)?;
        match row.map(|r| r.get::<_, String>(0)) {
            Some(theirs) if theirs != data_id => Err(StoreError(format!(
                "this coordinator's data dir (pool.id {data_id}) is not the one the pool's coordinators use (pool.id {theirs}): the coordinators of one PostgreSQL store share one data dir, which holds the pool's blobs, CA and tokens (mount it here; if the pool's data dir was moved on purpose, copy its pool.id file too)"
            ))),
            _ => Ok(()),
        }
    }
}

/// Whether the session `pid` holds the active lock, asked on `client`.
fn holds_lock(client: &mut Client, pid: i32) -> Result<bool, StoreError> {
    // A bigint advisory key shows in pg_locks as its high and low 32 bits.
    let (high, low) = (ACTIVE_LOCK_KEY >> 32, ACTIVE_LOCK_KEY & 0xffff_ffff);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1
             AND classid::bigint = $2 AND objid::bigint = $3 AND objsubid = 1",
            &[&pid, &high, &low],
        )
        .map_err(err)?;
    Ok(row.get::<_, i64>(0) == 1)
}

/// Watches, on a connection of its own, that the session `pid` still holds the active lock;
/// calls `lost` (which should stop the process) the first time it does not or cannot be asked.
pub fn watch_lock(
    url: &str,
    pid: i32,
    every: Duration,
    lost: impl FnOnce(String) + Send + 'static,
) -> Result<(), StoreError> {
    let mut client = connect(url)?;
    if !holds_lock(&mut client, pid)? {
        return Err(StoreError(format!("session {pid} does not hold the active lock")));
    }
    std::thread::Builder::new()
        .name("vmgrid-active-lock".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                match holds_lock(&mut client, pid) {
                    Ok(true) => {}
                    Ok(false) => return lost("the store's connection no longer holds the lock".into()),
                    Err(e) => return lost(e.0),
                }
            }
        })
        .map_err(|e| StoreError(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
