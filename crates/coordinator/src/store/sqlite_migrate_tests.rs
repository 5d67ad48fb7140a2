//! A store written by the release before the dashboard (schema 6, with jobs and workflows in
//! it) opens under this one: its jobs read back with no past attempts, the chart starts empty,
//! and the new columns and table take writes.

use rusqlite::Connection;

use super::{MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION, SqliteStore};
use crate::engine::{Engine, Principal, Timing};
use crate::store::{Op, Store};
use vmgrid_proto::JobState;

/// A store file as a vmgrid of schema `version` left it, empty.
pub(super) fn at_version(path: &std::path::Path, version: i64) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(SCHEMA_V1).unwrap();
    for m in &MIGRATIONS[..(version - 1) as usize] {
        conn.execute_batch(m).unwrap();
    }
    conn.pragma_update(None, "user_version", version).unwrap();
    conn
}

#[test]
fn a_version_6_store_with_jobs_opens_with_empty_histories_and_no_samples() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.sqlite");
    let conn = at_version(&path, 6);
    let spec = serde_json::to_string(&crate::engine::tests::spec(0)).unwrap();
    conn.execute("INSERT INTO specs (id, owner, json) VALUES (1, 'alice', ?1)", [&spec]).unwrap();
    conn.execute_batch(PRE_DASHBOARD_JOBS).unwrap();
    conn.execute_batch(
        "UPDATE meta SET value = 3 WHERE key = 'next_job'; UPDATE meta SET value = 2 WHERE key = 'next_spec';",
    )
    .unwrap();
    drop(conn);

    let mut store = SqliteStore::open(&path).unwrap();
    let version: i64 = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    reads_back_as_before_the_dashboard(&mut store);
}

/// The rows both stores' pre-dashboard databases are given: a spec, an idle and a held job.
pub(crate) const PRE_DASHBOARD_JOBS: &str =
    "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms, attempts) VALUES (1, 1, 0, 'alice', 'idle', 5, 0);
     INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms, attempts, reason)
       VALUES (2, 1, 1, 'alice', 'held', 5, 2, 'held by alice');";

/// A migrated pre-dashboard store (its two jobs as [`PRE_DASHBOARD_JOBS`] put them): the jobs
/// read back with no past attempts, the chart starts empty, and the new table takes a write.
pub(crate) fn reads_back_as_before_the_dashboard(store: &mut impl Store) {
    let loaded = store.load().unwrap();
    assert_eq!(loaded.jobs.len(), 2);
    assert!(loaded.jobs.iter().all(|j| j.row.history.is_empty()), "no attempts were recorded before");
    assert!(loaded.samples.is_empty(), "the chart starts empty");
    let timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 100_000, heartbeat_ms: 200 };
    let e = Engine::load(loaded, timing, 10);
    let views = e.job_views(&Principal::Admin("admin".into()));
    assert_eq!(views.iter().map(|j| (j.id, j.state)).collect::<Vec<_>>(), [(1, JobState::Idle), (2, JobState::Held)]);
    assert_eq!(views[1].reason.as_deref(), Some("held by alice"));
    let minute = crate::history::Sample { minute_ms: 60_000, completed: 4, queued: 1 };
    store.commit(&[Op::Sample(minute)]).unwrap();
    assert_eq!(store.load().unwrap().samples, vec![minute]);
}
