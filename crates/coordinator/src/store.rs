//! Durable state in SQLite (WAL). One writer thread applies operations in order and commits them
//! in groups: every operation queued while a commit runs goes into the next transaction, so a
//! burst of submits or reports costs one fsync, not one each. Callers wait for the commit of
//! their ticket before they acknowledge anything.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, params};
use tokio::sync::watch;

/// One durable change.
#[derive(Debug)]
pub enum Op {
    Token { hash: String, role: String, owner: String },
    RevokeToken { hash: String },
    Spec { id: u64, owner: String, json: String },
    Jobs { spec_id: u64, first_id: u64, count: u64, owner: String, submitted_ms: u64 },
    Job(JobRow),
    Node { name: String, ad_json: String, cred_hash: String, state: String },
    DeleteNode { name: String },
}

/// A job's mutable columns.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: u64,
    pub state: String,
    pub node: Option<String>,
    pub epoch: u64,
    pub attempts: u32,
    pub retries: u32,
    pub losses: u32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub finished_ms: Option<u64>,
    pub result: Option<String>,
    /// Write `result` as it is (clearing it when None); otherwise leave the column alone.
    pub set_result: bool,
}

/// Everything loaded at start.
#[derive(Default)]
pub struct Loaded {
    pub tokens: Vec<(String, String, String)>,
    pub specs: Vec<(u64, String, String)>,
    /// (spec_id, index, owner, submitted_ms, row)
    pub jobs: Vec<(u64, u64, String, u64, JobRow)>,
    pub nodes: Vec<(String, String, String, String)>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, role TEXT NOT NULL, owner TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS specs (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY, spec_id INTEGER NOT NULL, idx INTEGER NOT NULL, owner TEXT NOT NULL,
  state TEXT NOT NULL, node TEXT, epoch INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  retries INTEGER NOT NULL DEFAULT 0, losses INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, reason TEXT,
  submitted_ms INTEGER NOT NULL, finished_ms INTEGER, result TEXT);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, ad TEXT NOT NULL, cred_hash TEXT NOT NULL, state TEXT NOT NULL);
";

pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk when it returns, so an acknowledged change survives a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

pub fn load(conn: &Connection) -> rusqlite::Result<Loaded> {
    let mut l = Loaded::default();
    let mut st = conn.prepare("SELECT hash, role, owner FROM tokens")?;
    l.tokens = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let mut st = conn.prepare("SELECT id, owner, json FROM specs")?;
    l.specs =
        st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let mut st = conn.prepare(
        "SELECT id, spec_id, idx, owner, state, node, epoch, attempts, retries, losses, exit_code, reason, submitted_ms, finished_ms, result FROM jobs ORDER BY id",
    )?;
    l.jobs = st
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get(3)?,
                r.get::<_, i64>(12)? as u64,
                JobRow {
                    id: r.get::<_, i64>(0)? as u64,
                    state: r.get(4)?,
                    node: r.get(5)?,
                    epoch: r.get::<_, i64>(6)? as u64,
                    attempts: r.get(7)?,
                    retries: r.get(8)?,
                    losses: r.get(9)?,
                    exit_code: r.get(10)?,
                    reason: r.get(11)?,
                    finished_ms: r.get::<_, Option<i64>>(13)?.map(|x| x as u64),
                    result: r.get(14)?,
                    set_result: false,
                },
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut st = conn.prepare("SELECT name, ad, cred_hash, state FROM nodes")?;
    l.nodes = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect::<Result<_, _>>()?;
    Ok(l)
}

fn apply(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Token { hash, role, owner } => {
            tx.execute(
                "INSERT OR REPLACE INTO tokens (hash, role, owner) VALUES (?1, ?2, ?3)",
                params![hash, role, owner],
            )?;
        }
        Op::RevokeToken { hash } => {
            tx.execute("DELETE FROM tokens WHERE hash = ?1", params![hash])?;
        }
        Op::Spec { id, owner, json } => {
            tx.execute("INSERT INTO specs (id, owner, json) VALUES (?1, ?2, ?3)", params![*id as i64, owner, json])?;
        }
        Op::Jobs { spec_id, first_id, count, owner, submitted_ms } => {
            let mut st = tx.prepare_cached(
                "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms) VALUES (?1, ?2, ?3, ?4, 'idle', ?5)",
            )?;
            for i in 0..*count {
                st.execute(params![(first_id + i) as i64, *spec_id as i64, i as i64, owner, *submitted_ms as i64])?;
            }
        }
        Op::Job(j) => {
            let mut st = tx.prepare_cached(
                "UPDATE jobs SET state = ?2, node = ?3, epoch = ?4, attempts = ?5, retries = ?6, losses = ?7, exit_code = ?8, reason = ?9, finished_ms = ?10, result = CASE WHEN ?12 THEN ?11 ELSE result END WHERE id = ?1",
            )?;
            st.execute(params![
                j.id as i64,
                j.state,
                j.node,
                j.epoch as i64,
                j.attempts,
                j.retries,
                j.losses,
                j.exit_code,
                j.reason,
                j.finished_ms.map(|x| x as i64),
                j.result,
                j.set_result
            ])?;
        }
        Op::Node { name, ad_json, cred_hash, state } => {
            tx.execute(
                "INSERT OR REPLACE INTO nodes (name, ad, cred_hash, state) VALUES (?1, ?2, ?3, ?4)",
                params![name, ad_json, cred_hash, state],
            )?;
        }
        Op::DeleteNode { name } => {
            tx.execute("DELETE FROM nodes WHERE name = ?1", params![name])?;
        }
    }
    Ok(())
}

/// The queue into the writer thread and the sequence number of the last durable operation.
pub struct Writer {
    tx: mpsc::Sender<(u64, Op)>,
    next: u64,
    pub committed: watch::Receiver<u64>,
}

impl Writer {
    /// Starts the writer thread on `conn`. A failed commit is fatal: the process exits rather
    /// than acknowledge changes that are not on disk.
    pub fn start(mut conn: Connection) -> Writer {
        let (tx, rx) = mpsc::channel::<(u64, Op)>();
        let (done_tx, committed) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("vmgrid-store".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < 50_000 {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    let last = batch.last().map(|(s, _)| *s).unwrap_or(0);
                    let result = (|| -> rusqlite::Result<()> {
                        let t = conn.transaction()?;
                        for (_, op) in &batch {
                            apply(&t, op)?;
                        }
                        t.commit()
                    })();
                    if let Err(e) = result {
                        tracing::error!(
                            "the job store cannot commit: {e}; stopping so nothing unsaved is acknowledged"
                        );
                        eprintln!("vmgrid coordinator: the job store cannot commit: {e}");
                        std::process::exit(1);
                    }
                    let _ = done_tx.send(last);
                }
            })
            .expect("spawn the store thread");
        Writer { tx, next: 0, committed }
    }

    /// Queues an operation; returns its ticket. Call under the state lock so tickets follow the
    /// order of the state changes.
    pub fn push(&mut self, op: Op) -> u64 {
        self.next += 1;
        let _ = self.tx.send((self.next, op));
        self.next
    }

    pub fn last_ticket(&self) -> u64 {
        self.next
    }
}

/// Waits until the operation with `ticket` (and every one before it) is on disk.
pub async fn durable(mut committed: watch::Receiver<u64>, ticket: u64) {
    if ticket == 0 {
        return;
    }
    let _ = committed.wait_for(|c| *c >= ticket).await;
}
