//! The SQLite store's tests, against a private PostgreSQL cluster each, and the active lock.

use postgres::NoTls;
use vmgrid_proto::{DagState, JobState};

use super::*;
use crate::engine::{Engine, Principal, Timing, hash_token};
use crate::store::{DagNodeRow, DagRow, NodeRun, StoredUser};
use vmgrid_testkit::TestDb;

/// What the engine put in the store comes back as the same pool after a restart.
#[test]
fn acknowledged_state_survives_a_restart() {
    let db = TestDb::start();
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
    let mut store = PgStore::open(&db.url()).unwrap();
    store.commit(&e.take_effects().ops).unwrap();
    drop(store);

    let mut store = PgStore::open(&db.url()).unwrap();
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
    let db = TestDb::start();
    crate::engine::replica_tests::votes_and_reputations_survive(|e| {
        PgStore::open(&db.url()).unwrap().commit(&e.take_effects().ops).unwrap();
        Engine::load(PgStore::open(&db.url()).unwrap().load().unwrap(), crate::engine::tests::TIMING, 6)
    });
}

/// A job id names one job for good, across retention and a restart.
#[test]
fn ids_of_jobs_dropped_by_retention_are_not_reused_after_a_restart() {
    let db = TestDb::start();
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
    let mut store = PgStore::open(&db.url()).unwrap();
    store.commit(&e.take_effects().ops).unwrap();

    let mut e = Engine::load(store.load().unwrap(), timing, 5000);
    let next = e.submit(&alice, crate::engine::tests::spec(0), 1, 5000).unwrap();
    assert!(next[0] > first[1], "job id {} was given again after a restart", next[0]);
    store.commit(&e.take_effects().ops).unwrap();
    assert!(store.load().unwrap().specs.iter().all(|(id, _, _)| *id > 1), "a spec id was given again");
}

#[test]
fn users_read_back_with_usage_and_settings() {
    let db = TestDb::start();
    let mut store = PgStore::open(&db.url()).unwrap();
    assert!(store.load().unwrap().users.is_empty());
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
    let db = TestDb::start();
    let mut store = PgStore::open(&db.url()).unwrap();
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
    assert_eq!((l.next_job, l.next_spec), (12, 5));
    let ended = DagRow { state: DagState::Failed, reason: Some("why".into()), finished_ms: Some(3), ..row };
    assert_eq!(l.dags, [(ended, vec![released, node(1, NodeRun::Skipped)])]);
    store.commit(&[Op::DeleteDag { id: 7 }]).unwrap();
    let l = store.load().unwrap();
    assert!(l.dags.is_empty());
    assert_eq!(l.last_dag_id, 7, "a forgotten workflow's id is not given again");
}

#[test]
fn a_job_in_an_unknown_state_is_held_with_the_reason() {
    let db = TestDb::start();
    let mut store = PgStore::open(&db.url()).unwrap();
    store
        .client
        .execute(
            "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms) VALUES (1, 1, 0, 'a', 'weird', 0)",
            &[],
        )
        .unwrap();
    let row = store.load().unwrap().jobs.remove(0).row;
    assert_eq!(row.state, JobState::Held);
    assert!(row.reason.unwrap().contains("\"weird\""));
}

/// A failing commit leaves nothing of its operations: one transaction each.
#[test]
fn a_commit_is_all_or_nothing() {
    let db = TestDb::start();
    let mut store = PgStore::open(&db.url()).unwrap();
    let spec = Op::Spec { id: 1, owner: "a".into(), json: "{}".into() };
    store.commit(std::slice::from_ref(&spec)).unwrap();
    let jobs = Op::Jobs { spec_id: 1, first_id: 1, count: 3, owner: "a".into(), submitted_ms: 0 };
    assert!(store.commit(&[jobs, spec]).is_err(), "a second spec 1 is refused");
    assert!(store.load().unwrap().jobs.is_empty(), "the jobs of a failed commit were kept");
}

#[test]
fn schema_is_versioned_and_a_newer_one_is_refused() {
    let db = TestDb::start();
    drop(PgStore::open(&db.url()).unwrap());
    drop(PgStore::open(&db.url()).unwrap());
    let mut c = postgres::Client::connect(&db.url(), NoTls).unwrap();
    let v: i64 = c.query_one("SELECT version FROM schema_version", &[]).unwrap().get(0);
    assert_eq!(v, SCHEMA_VERSION);
    c.execute("UPDATE schema_version SET version = $1", &[&(SCHEMA_VERSION + 1)]).unwrap();
    let e = PgStore::open(&db.url()).err().expect("a newer schema is refused");
    assert!(e.0.contains("newer than this vmgrid"), "{}", e.0);
}

/// One active coordinator per database: the lock is taken by one store's session only, and
/// passes on when that session ends; the watchdog of the first then says it lost it.
#[test]
fn the_active_lock_is_held_by_one_session_at_a_time() {
    let db = TestDb::start();
    let mut a = PgStore::open(&db.url()).unwrap();
    assert!(a.try_lock().unwrap(), "the first takes the lock");
    assert!(a.try_lock().unwrap(), "taking it again on the same session is harmless");
    let mut b = PgStore::open(&db.url()).unwrap();
    assert!(!b.try_lock().unwrap(), "a second coordinator took the lock too");
    a.set_active("https://a.example:7800", "dir-1").unwrap();
    assert_eq!(b.active_url().unwrap().as_deref(), Some("https://a.example:7800"));
    b.check_data_id("dir-1").unwrap();
    let e = b.check_data_id("dir-2").expect_err("another data dir is refused");
    assert!(e.0.contains("not the one the pool's coordinators use"), "{}", e.0);

    let (tx, rx) = std::sync::mpsc::channel();
    let pid = a.backend_pid().unwrap();
    watch_lock(&db.url(), pid, std::time::Duration::from_millis(50), move |why| tx.send(why).unwrap()).unwrap();
    assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "the holder was told it lost the lock");
    drop(a);
    let why = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the watchdog saw the session end");
    assert!(why.contains("no longer holds the lock"), "{why}");
    assert!(b.try_lock().unwrap(), "the lock did not pass on");
    let e = watch_lock(&db.url(), pid, std::time::Duration::from_millis(50), |_| {}).err().unwrap();
    assert!(e.0.contains("does not hold"), "{}", e.0);
}

#[test]
fn passwords_are_not_shown_and_remote_hosts_without_verified_tls_are_refused() {
    assert_eq!(redact("postgres://vm:s3cret@localhost/pool"), "postgres://vm:***@localhost/pool");
    assert_eq!(redact("postgres://localhost/pool?password=s3cret&x=1"), "postgres://localhost/pool?password=***&x=1");
    let e = config("postgres://vm:s3cret@db.example.org/pool").err().unwrap();
    assert!(e.0.contains("another machine") && e.0.contains("verify-full") && !e.0.contains("s3cret"), "{}", e.0);
    let e = config("postgres://vm:s3cret@db.example.org/pool?sslmode=require").err().unwrap();
    assert!(e.0.contains("another machine"), "sslmode=require does not verify the server: {}", e.0);
    let e = config("postgres://db.example.org/pool?sslmode=verify-full").err().unwrap();
    assert!(e.0.contains("needs sslrootcert"), "{}", e.0);
    let e = config("postgres://db.example.org/pool?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").err().unwrap();
    assert!(e.0.contains("cannot read sslrootcert /nonexistent/ca.pem"), "{}", e.0);
    let (_, tls) = config("postgres://vm:s3cret@127.0.0.1:5432/pool").unwrap();
    assert!(tls.is_none(), "loopback needs no TLS");
    let (_, tls) = config("host=/run/postgresql dbname=pool").unwrap();
    assert!(tls.is_none());
    let e = config("postgres://vm:s3cret@localhost:notaport/pool").err().unwrap();
    assert!(!e.0.contains("s3cret"), "{}", e.0);
}

/// A TLS connection is verified against the CA given, and refused with another CA.
#[test]
fn a_tls_connection_is_verified_against_the_ca_given() {
    let ca = vmgrid_tls::Ca::generate().unwrap();
    let id = ca.issue(&["127.0.0.1".to_string()]).unwrap();
    let db = TestDb::start_tls(&id.cert_pem, &id.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&good, ca.cert_pem()).unwrap();
    std::fs::write(&bad, vmgrid_tls::Ca::generate().unwrap().cert_pem()).unwrap();
    let url = |ca: &std::path::Path| {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
            db.port().unwrap(),
            ca.display()
        )
    };
    let mut store = PgStore::open(&url(&good)).unwrap();
    let ssl: bool =
        store.client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap().get(0);
    assert!(ssl, "the session is TLS");
    assert!(store.try_lock().unwrap());
    let e = PgStore::open(&url(&bad)).err().expect("a server the CA did not sign is refused");
    assert!(e.0.contains("TLS handshake") && e.0.contains("invalid peer certificate"), "{}", e.0);
}

/// A node's reason holding NUL (which PostgreSQL's text refuses) is kept plain, so the batch
/// commits instead of being retried for ever; a user's quota past i64::MAX reads back unchanged.
#[test]
fn a_hostile_reason_and_huge_values_commit_and_read_back() {
    let db = TestDb::start();
    let timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 1000, heartbeat_ms: 200 };
    let mut e = Engine::new(timing);
    e.register(crate::engine::tests::ad("n1", 1), None, false, hash_token("cred"), 0).unwrap();
    e.submit(&Principal::User("alice".into()), crate::engine::tests::spec(0), 1, 0).unwrap();
    e.schedule(0);
    let l = e.take_leases("n1", 10, 10, 0);
    let mut r = crate::engine::tests::exited(&l[0], 0);
    let long = "x".repeat(crate::engine::jobs::MAX_REASON_CHARS * 2);
    r.run = vmgrid_proto::RunReport::BadJob { reason: format!("bad\0image\u{1b}[31m\n{long}") };
    e.report("n1", vec![r], 1).unwrap();
    let mut store = PgStore::open(&db.url()).unwrap();
    store.commit(&e.take_effects().ops).unwrap();
    store.commit(&[Op::UserSettings { user: "alice".into(), factor: 1.0, max_cpus: Some(u64::MAX) }]).unwrap();
    let loaded = store.load().unwrap();
    let reason = loaded.jobs[0].row.reason.clone().unwrap();
    assert!(reason.starts_with("bad job: bad\u{fffd}image\u{fffd}[31m\n"), "{reason:?}");
    assert!(reason.chars().count() <= crate::engine::jobs::MAX_REASON_CHARS + 10, "the reason is bounded");
    assert_eq!(loaded.users.iter().find(|u| u.user == "alice").unwrap().max_cpus, Some(u64::MAX));
}

#[test]
fn several_hosts_or_a_remote_hostaddr_are_refused() {
    let e = config("postgres://localhost/pool?hostaddr=10.0.0.5").err().unwrap();
    assert!(e.0.contains("another machine"), "a remote hostaddr needs TLS too: {}", e.0);
    let e = config("host=a,b dbname=pool").err().unwrap();
    assert!(e.0.contains("several hosts"), "{}", e.0);
    assert!(config("postgres://127.0.0.2/pool").unwrap().1.is_none(), "all of 127/8 is this machine");
    let e = config("host=/run/postgresql password='a b'").err().unwrap();
    assert!(e.0.contains("quotes") && !e.0.contains("a b"), "{}", e.0);
    assert_eq!(redact("host=x password='a b'"), "(a key=value connection string)");
}

/// A database written by the release before the dashboard (version 2, with jobs in it) opens
/// under this one: its jobs read back with no past attempts, the chart starts empty, and the
/// new column and table take writes.
#[test]
fn a_version_2_database_with_jobs_opens_with_empty_histories_and_no_samples() {
    let db = TestDb::start();
    let mut c = postgres::Client::connect(&db.url(), NoTls).unwrap();
    c.batch_execute("CREATE TABLE schema_version (version BIGINT NOT NULL); INSERT INTO schema_version VALUES (2);")
        .unwrap();
    for m in &MIGRATIONS[..2] {
        c.batch_execute(m).unwrap();
    }
    let spec = serde_json::to_string(&crate::engine::tests::spec(0)).unwrap();
    c.execute("INSERT INTO specs (id, owner, json) VALUES (1, 'alice', $1)", &[&spec]).unwrap();
    c.batch_execute(crate::store::sqlite::migrate_tests::PRE_DASHBOARD_JOBS).unwrap();
    c.batch_execute("INSERT INTO meta (key, value) VALUES ('next_job', 3), ('next_spec', 2);").unwrap();
    drop(c);

    let mut store = PgStore::open(&db.url()).unwrap();
    crate::store::sqlite::migrate_tests::reads_back_as_before_the_dashboard(&mut store);
    let mut c = postgres::Client::connect(&db.url(), NoTls).unwrap();
    let v: i64 = c.query_one("SELECT version FROM schema_version", &[]).unwrap().get(0);
    assert_eq!(v, SCHEMA_VERSION);
}

/// A commit's job updates go in one statement: the jobs come out as applying each operation in
/// turn leaves them (the SQLite store does that), also where one job is updated several times, a
/// later update leaves the result alone, a job is deleted between updates, or an update comes
/// before the job's insert.
#[test]
fn batched_job_updates_leave_the_rows_that_updates_in_turn_leave() {
    use crate::store::{JobRow, StoredResult, sqlite::SqliteStore};
    let row = |id: u64, state: JobState, set_result: bool, dropped: Option<u64>, reason: &str| {
        Op::Job(Box::new(JobRow {
            id,
            state,
            node: (!id.is_multiple_of(3)).then(|| format!("n{id}")),
            epoch: id + 1,
            attempts: 1,
            retries: 0,
            losses: 0,
            exit_code: (state == JobState::Completed).then_some(0),
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            started_ms: Some(5),
            finished_ms: None,
            result: dropped.map(|d| StoredResult { stdout_dropped: d, ..Default::default() }),
            set_result,
            history: Vec::new(),
            votes: Vec::new(),
            checkpoint: None,
        }))
    };
    let spec = Op::Spec { id: 1, owner: "a".into(), json: "{}".into() };
    let jobs = |first_id, count| Op::Jobs { spec_id: 1, first_id, count, owner: "a".into(), submitted_ms: 0 };
    let mut first = vec![spec, jobs(1, 3), row(3, JobState::Completed, true, Some(3), ""), jobs(5, 12)];
    // Enough updates in a run to go as one batched statement: each writes a result.
    first.extend((5..17).map(|id| row(id, JobState::Completed, true, Some(id), "")));
    let mut second = vec![
        row(1, JobState::Running, false, None, ""),
        row(1, JobState::Completed, true, Some(7), ""),
        // Leaves the result as the update before it wrote it.
        row(1, JobState::Completed, false, None, "later"),
        row(2, JobState::Running, false, None, ""),
        Op::DeleteJob { id: 2 },
        jobs(4, 1),
        row(4, JobState::Running, false, None, ""),
        // Leaves job 3's result, written by the commit before, alone.
        row(3, JobState::Completed, false, None, "kept"),
        Op::UserUsage { user: "a".into(), usage_cpu_s: 1.5, at_ms: 9 },
        row(4, JobState::Held, true, None, "held"),
    ];
    // A batch again: even jobs leave the stored result alone, odd ones leave it and then write
    // another; a submit of other jobs comes in the middle, and an update before its job's insert.
    for id in 5..17 {
        second.push(row(id, JobState::Running, false, None, "again"));
        if !id.is_multiple_of(2) {
            second.push(row(id, JobState::Completed, true, Some(100 + id), ""));
        }
        if id == 10 {
            second.extend([jobs(17, 2), row(19, JobState::Running, false, None, "too early"), jobs(19, 1)]);
        }
    }
    let db = TestDb::start();
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PgStore::open(&db.url()).unwrap();
    let mut lite = SqliteStore::open(&dir.path().join("jobs.db")).unwrap();
    for ops in [&first, &second] {
        pg.commit(ops).unwrap();
        lite.commit(ops).unwrap();
    }
    let by_id = |mut jobs: Vec<crate::store::StoredJob>| {
        jobs.sort_by_key(|j| j.row.id);
        jobs
    };
    let (pg_jobs, lite_jobs) = (by_id(pg.load().unwrap().jobs), by_id(lite.load().unwrap().jobs));
    assert_eq!(pg_jobs, lite_jobs);
    let ids: Vec<u64> = pg_jobs.iter().map(|j| j.row.id).collect();
    assert_eq!(ids, (1..20).filter(|&i| i != 2).collect::<Vec<u64>>());
    for j in &pg_jobs[3..15] {
        let id = j.row.id;
        let want = if !id.is_multiple_of(2) { 100 + id } else { id };
        assert_eq!(j.row.result.as_ref().map(|r| r.stdout_dropped), Some(want), "job {id}");
    }
    assert_eq!(pg_jobs[17].row.state, JobState::Idle, "an update before its job's insert found no job");
    let one = &pg_jobs[0].row;
    assert_eq!((one.state, one.reason.as_deref()), (JobState::Completed, Some("later")));
    assert_eq!(one.result.as_ref().map(|r| r.stdout_dropped), Some(7), "the result the later update left alone");
    assert_eq!(pg_jobs[1].row.result.as_ref().map(|r| r.stdout_dropped), Some(3));
    assert_eq!((pg_jobs[2].row.state, pg_jobs[2].row.result.is_none()), (JobState::Held, true));
}
