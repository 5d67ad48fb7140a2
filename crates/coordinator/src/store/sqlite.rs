//! The embedded store: the pool's state in one SQLite file (WAL, `synchronous = FULL`), the
//! schema, and the translation of [`Op`]s into statements.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use vmgrid_proto::{DagState, JobState, NodeState};

use super::{
    DagNodeRow, DagRow, JobRow, Loaded, NodeRun, Op, Store, StoreError, StoredBlob, StoredJob, StoredNode,
    StoredResult, StoredUser, TokenRole, TokenRow, Trust, checkpoint_column, checkpoint_from_column, history_column,
    history_from_column, votes_column, votes_from_column,
};

/// The schema as it was first released (version 1); [`MIGRATIONS`] take it to the current one.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, role TEXT NOT NULL, owner TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS specs (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY, spec_id INTEGER NOT NULL, idx INTEGER NOT NULL, owner TEXT NOT NULL,
  state TEXT NOT NULL, node TEXT, epoch INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  retries INTEGER NOT NULL DEFAULT 0, losses INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, reason TEXT,
  submitted_ms INTEGER NOT NULL, finished_ms INTEGER, result TEXT);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, ad TEXT NOT NULL, cred_hash TEXT NOT NULL, state TEXT NOT NULL);
";

/// Each migration takes the schema from version N (its index + 1) to N + 1, in one transaction.
const MIGRATIONS: &[&str] = &[
    // 2: tokens get a short id (to list and revoke them), a creation time, an expiry, and detail.
    "ALTER TABLE tokens ADD COLUMN id TEXT;
     ALTER TABLE tokens ADD COLUMN created_ms INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tokens ADD COLUMN expires_ms INTEGER;
     ALTER TABLE tokens ADD COLUMN detail TEXT;
     UPDATE tokens SET id = substr(hash, 1, 12) WHERE id IS NULL;",
    // 3: who each blob is charged to.
    "CREATE TABLE blobs (hash TEXT PRIMARY KEY, owner TEXT NOT NULL, size INTEGER NOT NULL, created_ms INTEGER NOT NULL);",
    // 4: the next job and spec ids, so that the ids of jobs dropped by retention are never given
    // again after a restart.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (key, value) SELECT 'next_job', COALESCE(MAX(id), 0) + 1 FROM jobs;
     INSERT INTO meta (key, value) SELECT 'next_spec', COALESCE(MAX(id), 0) + 1 FROM specs;",
    // 5: fair share: each user's decayed usage and what an admin set (factor, quota); when each
    // job last started.
    "CREATE TABLE users (name TEXT PRIMARY KEY, usage_cpu_s REAL NOT NULL DEFAULT 0, usage_at_ms INTEGER NOT NULL DEFAULT 0,
       factor REAL NOT NULL DEFAULT 1, max_cpus INTEGER);
     ALTER TABLE jobs ADD COLUMN started_ms INTEGER;",
    // 6: workflows (`vmgrid dag`): each DAG with its spec, and each of its nodes' runs and latest jobs.
    // (AUTOINCREMENT: sqlite_sequence keeps the highest id ever stored, so an id is never reused
    // after its workflow was forgotten.)
    "CREATE TABLE dags (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, json TEXT NOT NULL, state TEXT NOT NULL,
       reason TEXT, submitted_ms INTEGER NOT NULL, finished_ms INTEGER, rescue_of INTEGER);
     CREATE TABLE dag_nodes (dag_id INTEGER NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL,
       tries INTEGER NOT NULL DEFAULT 0, spec_id INTEGER, first_job INTEGER, reason TEXT,
       PRIMARY KEY (dag_id, idx));",
    // 7: each job's attempts that ended before its latest one (JSON; NULL when there are none).
    "ALTER TABLE jobs ADD COLUMN history TEXT;",
    // 8: the last hour of the pool, a row a minute (the dashboard's chart).
    "CREATE TABLE samples (minute_ms INTEGER PRIMARY KEY, completed INTEGER NOT NULL, queued INTEGER NOT NULL);",
    // 9: a QEMU job's latest complete checkpoint, and what its current attempt resumed from (JSON).
    "ALTER TABLE jobs ADD COLUMN checkpoint TEXT;",
    // 10: a replicated job's replicas' results until one is agreed on (JSON); each node's record of
    // agreements and whether it is banned.
    "ALTER TABLE jobs ADD COLUMN votes TEXT;
     CREATE TABLE node_trust (name TEXT PRIMARY KEY, agree INTEGER NOT NULL, disagree INTEGER NOT NULL, banned INTEGER NOT NULL);",
];

/// Raises a counter of the `meta` table to at least `value`.
const RAISE: &str =
    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)";

/// The schema version this coordinator writes.
pub const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// Brings the database to [`SCHEMA_VERSION`]; a database from a newer vmgrid is refused.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let mut version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        conn.execute_batch(SCHEMA_V1)?;
        version = 1;
    }
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the job store has schema version {version}, newer than this vmgrid's {SCHEMA_VERSION}: upgrade vmgrid"
        )));
    }
    while version < SCHEMA_VERSION {
        let tx = conn.transaction()?;
        tx.execute_batch(MIGRATIONS[(version - 1) as usize])?;
        version += 1;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    Ok(())
}

pub struct SqliteStore {
    conn: Connection,
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        create_private(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        // FULL: a commit is on disk when it returns, so an acknowledged change survives a crash.
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        migrate(&mut conn).map_err(err)?;
        Ok(SqliteStore { conn })
    }
}

/// The database (and so its WAL and shared-memory files, which SQLite creates with the
/// database's mode) is readable by its owner only: it holds every spec and the SSI processes'
/// tokens.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", path.display());
        if Path::new(&p).exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        load(&self.conn).map_err(err)
    }

    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let t = self.conn.transaction().map_err(err)?;
        for op in ops {
            apply(&t, op).map_err(err)?;
        }
        t.commit().map_err(err)
    }
}

/// A node in a state this version does not know must register again.
fn node_state(s: &str) -> NodeState {
    match s {
        "ready" => NodeState::Ready,
        "draining" => NodeState::Draining,
        _ => NodeState::Lost,
    }
}

/// Each node's record of agreements, and bans.
fn load_trust(conn: &Connection) -> rusqlite::Result<Vec<(String, Trust)>> {
    let mut st = conn.prepare("SELECT name, agree, disagree, banned FROM node_trust")?;
    st.query_map([], |r| {
        let (agree, disagree) = (r.get::<_, i64>(1)?.max(0) as u64, r.get::<_, i64>(2)?.max(0) as u64);
        Ok((r.get(0)?, Trust { agree, disagree, banned: r.get(3)? }))
    })?
    .collect()
}

fn load(conn: &Connection) -> rusqlite::Result<Loaded> {
    let mut l = Loaded::default();
    let mut st = conn.prepare("SELECT hash, role, owner, id, created_ms, expires_ms, detail FROM tokens")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(1)?,
            TokenRow {
                hash: r.get(0)?,
                role: TokenRole::Pool,
                owner: r.get(2)?,
                id: r.get(3)?,
                created_ms: r.get::<_, i64>(4)? as u64,
                expires_ms: r.get::<_, Option<i64>>(5)?.map(|x| x as u64),
                detail: r.get(6)?,
            },
        ))
    })?;
    for row in rows {
        let (role, mut t) = row?;
        // A token of a role this version does not know grants nothing.
        if let Some(role) = TokenRole::parse(&role) {
            t.role = role;
            l.tokens.push(t);
        }
    }
    let mut st = conn.prepare("SELECT id, owner, json FROM specs")?;
    l.specs =
        st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    let mut st = conn.prepare(
        "SELECT id, spec_id, idx, owner, state, node, epoch, attempts, retries, losses, exit_code, reason, submitted_ms, finished_ms, result, started_ms, history, checkpoint, votes FROM jobs ORDER BY id",
    )?;
    l.jobs = st.query_map([], stored_job)?.collect::<Result<_, _>>()?;
    l.trust = load_trust(conn)?;
    let mut st = conn.prepare("SELECT hash, owner, size, created_ms FROM blobs")?;
    l.blobs = st
        .query_map([], |r| {
            Ok(StoredBlob {
                hash: r.get(0)?,
                owner: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
                created_ms: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    let counter = |key: &str| -> rusqlite::Result<u64> {
        let v: Option<i64> =
            conn.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0)).optional()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    };
    l.next_job = counter("next_job")?;
    l.next_spec = counter("next_spec")?;
    let mut st = conn.prepare("SELECT name, usage_cpu_s, usage_at_ms, factor, max_cpus FROM users")?;
    l.users = st
        .query_map([], |r| {
            Ok(StoredUser {
                user: r.get(0)?,
                usage_cpu_s: r.get(1)?,
                usage_at_ms: r.get::<_, i64>(2)? as u64,
                factor: r.get(3)?,
                max_cpus: r.get::<_, Option<i64>>(4)?.map(|x| x as u64),
            })
        })?
        .collect::<Result<_, _>>()?;
    l.samples = load_samples(conn)?;
    let mut st = conn.prepare("SELECT name, ad, cred_hash, state FROM nodes")?;
    l.nodes = st
        .query_map([], |r| {
            Ok(StoredNode {
                name: r.get(0)?,
                ad_json: r.get(1)?,
                cred_hash: r.get(2)?,
                state: node_state(&r.get::<_, String>(3)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    (l.dags, l.last_dag_id) = load_dags(conn)?;
    Ok(l)
}

/// Workflows with their nodes, and the highest workflow id ever stored.
type LoadedDags = (Vec<(DagRow, Vec<DagNodeRow>)>, u64);

/// Workflows with their nodes. A state this version does not know reads as failed (a workflow)
/// or failed (a node), with the reason.
fn load_dags(conn: &Connection) -> rusqlite::Result<LoadedDags> {
    let mut st = conn
        .prepare("SELECT id, owner, json, state, reason, submitted_ms, finished_ms, rescue_of FROM dags ORDER BY id")?;
    let seq: Option<i64> =
        conn.query_row("SELECT seq FROM sqlite_sequence WHERE name = 'dags'", [], |r| r.get(0)).optional()?;
    let mut dags: Vec<(DagRow, Vec<DagNodeRow>)> = st
        .query_map([], |r| {
            let state: String = r.get(3)?;
            let (state, reason) = match DagState::parse(&state) {
                Some(s) => (s, r.get(4)?),
                None => {
                    (DagState::Failed, Some(format!("the store held an unknown state {state:?} for this workflow")))
                }
            };
            Ok(DagRow {
                id: r.get::<_, i64>(0)? as u64,
                owner: r.get(1)?,
                json: r.get(2)?,
                state,
                reason,
                submitted_ms: r.get::<_, i64>(5)? as u64,
                finished_ms: r.get::<_, Option<i64>>(6)?.map(|x| x as u64),
                rescue_of: r.get::<_, Option<i64>>(7)?.map(|x| x as u64),
            })
        })?
        .map(|row| row.map(|d| (d, Vec::new())))
        .collect::<Result<_, _>>()?;
    let at: std::collections::HashMap<u64, usize> = dags.iter().enumerate().map(|(i, (d, _))| (d.id, i)).collect();
    let mut st = conn
        .prepare("SELECT dag_id, idx, state, tries, spec_id, first_job, reason FROM dag_nodes ORDER BY dag_id, idx")?;
    let rows = st.query_map([], |r| {
        let state: String = r.get(2)?;
        let (state, reason) = match NodeRun::parse(&state) {
            Some(s) => (s, r.get(6)?),
            None => (NodeRun::Failed, Some(format!("the store held an unknown state {state:?} for this node"))),
        };
        Ok(DagNodeRow {
            dag_id: r.get::<_, i64>(0)? as u64,
            idx: r.get(1)?,
            state,
            tries: r.get(3)?,
            spec_id: r.get::<_, Option<i64>>(4)?.map(|x| x as u64),
            first_job: r.get::<_, Option<i64>>(5)?.map(|x| x as u64),
            reason,
        })
    })?;
    for row in rows {
        let row = row?;
        if let Some(&i) = at.get(&row.dag_id) {
            dags[i].1.push(row);
        }
    }
    Ok((dags, seq.unwrap_or(0) as u64))
}

fn stored_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredJob> {
    // A result that does not parse is dropped, not fatal: the job keeps its state. A state this
    // version does not know holds the job, with the reason.
    let result: Option<String> = r.get(14)?;
    let state: String = r.get(4)?;
    let (state, reason) = match JobState::parse(&state) {
        Some(s) => (s, r.get(11)?),
        None => (JobState::Held, Some(format!("the store held an unknown state {state:?} for this job"))),
    };
    Ok(StoredJob {
        spec_id: r.get::<_, i64>(1)? as u64,
        index: r.get::<_, i64>(2)? as u64,
        owner: r.get(3)?,
        submitted_ms: r.get::<_, i64>(12)? as u64,
        row: JobRow {
            id: r.get::<_, i64>(0)? as u64,
            state,
            node: r.get(5)?,
            epoch: r.get::<_, i64>(6)? as u64,
            attempts: r.get(7)?,
            retries: r.get(8)?,
            losses: r.get(9)?,
            exit_code: r.get(10)?,
            reason,
            started_ms: r.get::<_, Option<i64>>(15)?.map(|x| x as u64),
            finished_ms: r.get::<_, Option<i64>>(13)?.map(|x| x as u64),
            result: result.and_then(|j| serde_json::from_str::<StoredResult>(&j).ok()),
            set_result: false,
            history: history_from_column(r.get(16)?),
            checkpoint: checkpoint_from_column(r.get(17)?),
            votes: votes_from_column(r.get(18)?),
        },
    })
}

fn apply(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Token(t) => {
            tx.execute(
                "INSERT OR REPLACE INTO tokens (hash, role, owner, id, created_ms, expires_ms, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.hash,
                    t.role.as_str(),
                    t.owner,
                    t.id,
                    t.created_ms as i64,
                    t.expires_ms.map(|x| x as i64),
                    t.detail
                ],
            )?;
        }
        Op::RevokeToken { hash } => {
            tx.execute("DELETE FROM tokens WHERE hash = ?1", params![hash])?;
        }
        Op::Spec { id, owner, json } => insert_spec(tx, *id, owner, json)?,
        Op::Jobs { spec_id, first_id, count, owner, submitted_ms } => {
            insert_jobs(tx, *spec_id, *first_id, *count, owner, *submitted_ms)?
        }
        Op::Job(j) => update_job(tx, j)?,
        Op::Node { name, ad_json, cred_hash, state } => {
            tx.execute(
                "INSERT OR REPLACE INTO nodes (name, ad, cred_hash, state) VALUES (?1, ?2, ?3, ?4)",
                params![name, ad_json, cred_hash, state.as_str()],
            )?;
        }
        Op::Trust { name, trust: t } => {
            tx.execute(
                "INSERT OR REPLACE INTO node_trust (name, agree, disagree, banned) VALUES (?1, ?2, ?3, ?4)",
                params![name, t.agree as i64, t.disagree as i64, t.banned],
            )?;
        }
        Op::DeleteNode { name } => {
            tx.execute("DELETE FROM nodes WHERE name = ?1", params![name])?;
        }
        Op::DeleteJob { id } => {
            tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?.execute(params![*id as i64])?;
        }
        Op::DeleteSpec { id } => {
            tx.execute("DELETE FROM specs WHERE id = ?1", params![*id as i64])?;
        }
        Op::Blob { hash, owner, size, created_ms } => {
            tx.execute(
                "INSERT OR IGNORE INTO blobs (hash, owner, size, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![hash, owner, *size as i64, *created_ms as i64],
            )?;
        }
        Op::DeleteBlob { hash } => {
            tx.execute("DELETE FROM blobs WHERE hash = ?1", params![hash])?;
        }
        Op::Dag { .. } | Op::DagState { .. } | Op::DagNode(_) | Op::DeleteDag { .. } | Op::DagRelease { .. } => {
            apply_dag(tx, op)?
        }
        Op::UserUsage { .. } | Op::UserSettings { .. } => apply_user(tx, op)?,
        Op::Sample(_) | Op::PruneSamples { .. } => apply_sample(tx, op)?,
    }
    Ok(())
}

/// A minute of the last hour stored, or the older ones forgotten.
fn apply_sample(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Sample(s) => {
            tx.prepare_cached("INSERT OR REPLACE INTO samples (minute_ms, completed, queued) VALUES (?1, ?2, ?3)")?
                .execute(params![s.minute_ms as i64, s.completed as i64, s.queued as i64])?;
        }
        Op::PruneSamples { before_ms } => {
            tx.prepare_cached("DELETE FROM samples WHERE minute_ms < ?1")?.execute(params![*before_ms as i64])?;
        }
        _ => {}
    }
    Ok(())
}

/// The last hour's minutes, oldest first.
fn load_samples(conn: &Connection) -> rusqlite::Result<Vec<crate::history::Sample>> {
    let mut st = conn.prepare("SELECT minute_ms, completed, queued FROM samples ORDER BY minute_ms")?;
    let rows = st.query_map([], |r| {
        let u = |i| r.get::<_, i64>(i).map(|x| x.max(0) as u64);
        Ok(crate::history::Sample { minute_ms: u(0)?, completed: u(1)?, queued: u(2)? })
    })?;
    rows.collect()
}

/// A user's usage or settings: each updates its own columns of the user's row.
fn apply_user(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::UserUsage { user, usage_cpu_s, at_ms } => {
            tx.prepare_cached(
                "INSERT INTO users (name, usage_cpu_s, usage_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET usage_cpu_s = ?2, usage_at_ms = ?3",
            )?
            .execute(params![user, usage_cpu_s, *at_ms as i64])?;
        }
        Op::UserSettings { user, factor, max_cpus } => {
            tx.execute(
                "INSERT INTO users (name, factor, max_cpus) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET factor = ?2, max_cpus = ?3",
                params![user, factor, max_cpus.map(|x| x as i64)],
            )?;
        }
        _ => {}
    }
    Ok(())
}

/// The workflow operations.
fn apply_dag(tx: &rusqlite::Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Dag { row, nodes } => {
            tx.execute(
                "INSERT INTO dags (id, owner, json, state, reason, submitted_ms, finished_ms, rescue_of) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    row.id as i64,
                    row.owner,
                    row.json,
                    row.state.as_str(),
                    row.reason,
                    row.submitted_ms as i64,
                    row.finished_ms.map(|x| x as i64),
                    row.rescue_of.map(|x| x as i64)
                ],
            )?;
            for n in nodes {
                put_dag_node(tx, n)?;
            }
        }
        Op::DagState { id, state, reason, finished_ms } => {
            tx.execute(
                "UPDATE dags SET state = ?2, reason = ?3, finished_ms = ?4 WHERE id = ?1",
                params![*id as i64, state.as_str(), reason, finished_ms.map(|x| x as i64)],
            )?;
        }
        Op::DagNode(n) => put_dag_node(tx, n)?,
        Op::DeleteDag { id } => {
            tx.execute("DELETE FROM dag_nodes WHERE dag_id = ?1", params![*id as i64])?;
            tx.execute("DELETE FROM dags WHERE id = ?1", params![*id as i64])?;
        }
        Op::DagRelease { node, spec_id, owner, json, count, submitted_ms } => {
            insert_spec(tx, *spec_id, owner, json)?;
            let first = node.first_job.expect("a released node has its jobs");
            insert_jobs(tx, *spec_id, first, *count, owner, *submitted_ms)?;
            put_dag_node(tx, node)?;
        }
        _ => unreachable!("only workflow operations come here"),
    }
    Ok(())
}

fn insert_spec(tx: &rusqlite::Transaction<'_>, id: u64, owner: &str, json: &str) -> rusqlite::Result<()> {
    tx.execute("INSERT INTO specs (id, owner, json) VALUES (?1, ?2, ?3)", params![id as i64, owner, json])?;
    tx.prepare_cached(RAISE)?.execute(params!["next_spec", (id + 1) as i64])?;
    Ok(())
}

fn insert_jobs(
    tx: &rusqlite::Transaction<'_>,
    spec_id: u64,
    first_id: u64,
    count: u64,
    owner: &str,
    submitted_ms: u64,
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms) VALUES (?1, ?2, ?3, ?4, 'idle', ?5)",
    )?;
    for i in 0..count {
        st.execute(params![(first_id + i) as i64, spec_id as i64, i as i64, owner, submitted_ms as i64])?;
    }
    tx.prepare_cached(RAISE)?.execute(params!["next_job", (first_id + count) as i64])?;
    Ok(())
}

/// A job's mutable columns written.
fn update_job(tx: &rusqlite::Transaction<'_>, j: &JobRow) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "UPDATE jobs SET state = ?2, node = ?3, epoch = ?4, attempts = ?5, retries = ?6, losses = ?7, exit_code = ?8, reason = ?9, finished_ms = ?10, result = CASE WHEN ?12 THEN ?11 ELSE result END, started_ms = ?13, history = ?14, checkpoint = ?15, votes = ?16 WHERE id = ?1",
    )?;
    let result = j.result.as_ref().map(|r| serde_json::to_string(r).expect("a result serializes"));
    st.execute(params![
        j.id as i64,
        j.state.as_str(),
        j.node,
        j.epoch as i64,
        j.attempts,
        j.retries,
        j.losses,
        j.exit_code,
        j.reason,
        j.finished_ms.map(|x| x as i64),
        result,
        j.set_result,
        j.started_ms.map(|x| x as i64),
        history_column(&j.history),
        checkpoint_column(&j.checkpoint),
        votes_column(&j.votes)
    ])?;
    Ok(())
}

fn put_dag_node(tx: &rusqlite::Transaction<'_>, n: &DagNodeRow) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO dag_nodes (dag_id, idx, state, tries, spec_id, first_job, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        n.dag_id as i64,
        n.idx,
        n.state.as_str(),
        n.tries,
        n.spec_id.map(|x| x as i64),
        n.first_job.map(|x| x as i64),
        n.reason
    ])?;
    Ok(())
}

#[cfg(test)]
#[path = "sqlite_migrate_tests.rs"]
pub(crate) mod migrate_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, Principal, Timing, hash_token};

    /// What the engine put in the store comes back as the same pool after a restart.
    #[test]
    fn acknowledged_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sqlite");
        let timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 1000, heartbeat_ms: 200 };
        let mut e = Engine::new(timing);
        e.add_token(hash_token("admin-secret"), "a1".into(), Principal::Admin("admin".into()), 0, None);
        e.register(crate::engine::tests::ad("n1", 1), None, false, hash_token("cred"), 0).unwrap();
        e.submit(&Principal::User("alice".into()), crate::engine::tests::spec(0), 2, 0).unwrap();
        e.schedule(0);
        let l = e.take_leases("n1", 10, 10, 0);
        e.report("n1", vec![crate::engine::tests::exited(&l[0], 5)], 1).unwrap();
        e.schedule(2);
        // Job 2 held while it runs and released: its first attempt goes into its history.
        crate::engine::attempts::tests::hold_and_release(&mut e, 2, 3);
        let attempts = crate::engine::attempts::tests::histories(&e);
        // A minute of the last hour closed: its sample is kept.
        e.sample_history(300_000);
        e.sample_history(360_000);
        let hour = e.history_samples();
        assert_eq!(hour.len(), 2, "minute 5 closed, minute 6 being counted");
        assert_eq!(attempts[1].len(), 2);
        let before = e.job_views(&Principal::Admin("admin".into()));
        let mut store = SqliteStore::open(&path).unwrap();
        store.commit(&e.take_effects().ops).unwrap();
        drop(store);

        let mut store = SqliteStore::open(&path).unwrap();
        let e = Engine::load(store.load().unwrap(), timing, 10);
        let admin = Principal::Admin("admin".into());
        assert_eq!(e.job_views(&admin), before);
        assert_eq!(e.job_views(&admin)[0].exit_code, Some(5));
        assert_eq!(e.job_views(&admin)[1].state, JobState::Running, "a running job keeps its lease across a restart");
        assert_eq!(e.node_views()[0].running_jobs, 1);
        assert_eq!(crate::engine::attempts::tests::histories(&e), attempts, "each job's attempts read back");
        assert_eq!(e.history_samples(), hour[..1], "the closed minute read back");
        assert_eq!(e.authenticate("admin-secret", 10), Some(&admin));
        assert_eq!(e.authenticate("cred", 10), Some(&Principal::Node("n1".into())));
    }

    #[test]
    fn votes_and_reputations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sqlite");
        crate::engine::replica_tests::votes_and_reputations_survive(|e| {
            SqliteStore::open(&path).unwrap().commit(&e.take_effects().ops).unwrap();
            Engine::load(SqliteStore::open(&path).unwrap().load().unwrap(), crate::engine::tests::TIMING, 6)
        });
    }

    /// A job id names one job for good: the newest jobs dropped by retention, then a restart, do
    /// not hand their ids to the next submit (a client holding the old id would see another job).
    #[test]
    fn ids_of_jobs_dropped_by_retention_are_not_reused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sqlite");
        let timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 100_000, heartbeat_ms: 200 };
        let limits = crate::engine::Limits { retain_finished_ms: 1000, ..Default::default() };
        let (alice, admin) = (Principal::User("alice".into()), Principal::Admin("admin".into()));
        let mut e = Engine::new(timing);
        e.set_limits(limits);
        e.register(crate::engine::tests::ad("n1", 4), None, false, hash_token("cred"), 0).unwrap();
        let first = e.submit(&alice, crate::engine::tests::spec(0), 2, 0).unwrap();
        e.schedule(0);
        for l in e.take_leases("n1", 10, 10, 0) {
            e.report("n1", vec![crate::engine::tests::exited(&l, 0)], 1).unwrap();
        }
        e.tick(5000);
        assert!(e.job_views(&admin).is_empty(), "retention dropped both jobs");
        let mut store = SqliteStore::open(&path).unwrap();
        store.commit(&e.take_effects().ops).unwrap();

        let mut e = Engine::load(store.load().unwrap(), timing, 5000);
        let next = e.submit(&alice, crate::engine::tests::spec(0), 1, 5000).unwrap();
        assert!(next[0] > first[1], "job id {} was given again after a restart", next[0]);
        store.commit(&e.take_effects().ops).unwrap();
        assert!(store.load().unwrap().specs.iter().all(|(id, _, _)| *id > 1), "a spec id was given again");
    }

    /// A store written by the previous version (schema 3) is migrated: its jobs keep their rows
    /// (with no start time yet) and users start with no usage, factor 1 and no quota.
    #[test]
    fn a_version_3_store_gains_users_and_start_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.sqlite");
        let conn = super::migrate_tests::at_version(&path, 3);
        conn.execute(
            "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms) VALUES (7, 1, 0, 'a', 'idle', 5)",
            [],
        )
        .unwrap();
        drop(conn);
        let mut store = SqliteStore::open(&path).unwrap();
        let version: i64 = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let loaded = store.load().unwrap();
        assert_eq!((loaded.jobs[0].row.id, loaded.jobs[0].row.started_ms), (7, None));
        assert!(loaded.users.is_empty());
        store.commit(&[Op::UserSettings { user: "a".into(), factor: 2.0, max_cpus: Some(3) }]).unwrap();
        store.commit(&[Op::UserUsage { user: "a".into(), usage_cpu_s: 12.5, at_ms: 9 }]).unwrap();
        let users = store.load().unwrap().users;
        assert_eq!(
            users,
            vec![StoredUser { user: "a".into(), usage_cpu_s: 12.5, usage_at_ms: 9, factor: 2.0, max_cpus: Some(3) }]
        );
    }

    #[test]
    fn a_workflow_reads_back_with_its_nodes_and_goes_with_its_delete() {
        use crate::store::{DagNodeRow, DagRow, NodeRun};
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("pool.sqlite")).unwrap();
        let row = DagRow {
            id: 7,
            owner: "alice".into(),
            json: "{}".into(),
            state: DagState::Running,
            reason: None,
            submitted_ms: 1,
            finished_ms: None,
            rescue_of: Some(3),
        };
        let node =
            |idx, state| DagNodeRow { dag_id: 7, idx, state, tries: 0, spec_id: None, first_job: None, reason: None };
        store
            .commit(&[Op::Dag { row: row.clone(), nodes: vec![node(0, NodeRun::Waiting), node(1, NodeRun::Waiting)] }])
            .unwrap();
        let released = DagNodeRow { tries: 1, spec_id: Some(4), first_job: Some(10), ..node(0, NodeRun::Released) };
        let release = Op::DagRelease {
            node: released.clone(),
            spec_id: 4,
            owner: "alice".into(),
            json: "{}".into(),
            count: 2,
            submitted_ms: 2,
        };
        let end = Op::DagState { id: 7, state: DagState::Failed, reason: Some("why".into()), finished_ms: Some(3) };
        store.commit(&[release, Op::DagNode(node(1, NodeRun::Skipped)), end]).unwrap();
        let l = store.load().unwrap();
        assert_eq!(l.jobs.iter().map(|j| (j.row.id, j.spec_id, j.index)).collect::<Vec<_>>(), [(10, 4, 0), (11, 4, 1)]);
        let ended = DagRow { state: DagState::Failed, reason: Some("why".into()), finished_ms: Some(3), ..row };
        assert_eq!(l.dags, [(ended, vec![released, node(1, NodeRun::Skipped)])]);
        store.commit(&[Op::DeleteDag { id: 7 }]).unwrap();
        let l = store.load().unwrap();
        assert!(l.dags.is_empty());
        assert_eq!(l.last_dag_id, 7, "a forgotten workflow's id is not given again");
    }

    #[test]
    fn a_job_in_an_unknown_state_is_held_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("pool.sqlite")).unwrap();
        store
            .conn
            .execute(
                "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms) VALUES (1, 1, 0, 'a', 'weird', 0)",
                [],
            )
            .unwrap();
        let row = store.load().unwrap().jobs.remove(0).row;
        assert_eq!(row.state, JobState::Held);
        assert!(row.reason.unwrap().contains("\"weird\""));
    }
}
