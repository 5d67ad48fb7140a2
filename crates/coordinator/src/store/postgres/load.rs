//! Reading the pool back: the same [`Loaded`] the SQLite store gives.

use std::collections::HashMap;

use postgres::{Row, Transaction};
use vmgrid_proto::{DagState, JobState, NodeState};

use crate::store::{
    DagNodeRow, DagRow, JobRow, Loaded, NodeRun, StoredBlob, StoredJob, StoredNode, StoredResult, StoredUser,
    TokenRole, TokenRow,
};

/// A u64 stored as BIGINT, read back bit for bit (as the SQLite store does): values past
/// `i64::MAX` were stored negative.
fn u(r: &Row, i: usize) -> u64 {
    r.get::<_, i64>(i) as u64
}

fn ou(r: &Row, i: usize) -> Option<u64> {
    r.get::<_, Option<i64>>(i).map(|x| x as u64)
}

/// A node in a state this version does not know must register again.
fn node_state(s: &str) -> NodeState {
    match s {
        "ready" => NodeState::Ready,
        "draining" => NodeState::Draining,
        _ => NodeState::Lost,
    }
}

pub fn load(tx: &mut Transaction<'_>) -> Result<Loaded, postgres::Error> {
    let mut l = Loaded::default();
    for r in tx.query("SELECT hash, role, owner, id, created_ms, expires_ms, detail FROM tokens", &[])? {
        // A token of a role this version does not know grants nothing.
        if let Some(role) = TokenRole::parse(r.get(1)) {
            l.tokens.push(TokenRow {
                hash: r.get(0),
                role,
                owner: r.get(2),
                id: r.get::<_, Option<String>>(3).unwrap_or_default(),
                created_ms: u(&r, 4),
                expires_ms: ou(&r, 5),
                detail: r.get(6),
            });
        }
    }
    l.specs =
        tx.query("SELECT id, owner, json FROM specs", &[])?.iter().map(|r| (u(r, 0), r.get(1), r.get(2))).collect();
    l.jobs = tx
        .query(
            "SELECT id, spec_id, idx, owner, state, node, epoch, attempts, retries, losses, exit_code, reason, submitted_ms, finished_ms, result, started_ms, history, checkpoint, votes FROM jobs ORDER BY id",
            &[],
        )?
        .iter()
        .map(stored_job)
        .collect();
    l.blobs = tx
        .query("SELECT hash, owner, size, created_ms FROM blobs", &[])?
        .iter()
        .map(|r| StoredBlob { hash: r.get(0), owner: r.get(1), size: u(r, 2), created_ms: u(r, 3) })
        .collect();
    let mut meta = HashMap::new();
    for r in tx.query("SELECT key, value FROM meta", &[])? {
        meta.insert(r.get::<_, String>(0), u(&r, 1));
    }
    l.next_job = meta.get("next_job").copied().unwrap_or(0);
    l.next_spec = meta.get("next_spec").copied().unwrap_or(0);
    l.last_dag_id = meta.get("last_dag").copied().unwrap_or(0);
    l.users = tx
        .query("SELECT name, usage_cpu_s, usage_at_ms, factor, max_cpus FROM users", &[])?
        .iter()
        .map(|r| StoredUser {
            user: r.get(0),
            usage_cpu_s: r.get(1),
            usage_at_ms: u(r, 2),
            factor: r.get(3),
            max_cpus: ou(r, 4),
        })
        .collect();
    l.samples = tx
        .query("SELECT minute_ms, completed, queued FROM samples ORDER BY minute_ms", &[])?
        .iter()
        .map(|r| crate::history::Sample { minute_ms: u(r, 0), completed: u(r, 1), queued: u(r, 2) })
        .collect();
    l.nodes = tx
        .query("SELECT name, ad, cred_hash, state FROM nodes", &[])?
        .iter()
        .map(|r| StoredNode { name: r.get(0), ad_json: r.get(1), cred_hash: r.get(2), state: node_state(r.get(3)) })
        .collect();
    l.trust = tx
        .query("SELECT name, agree, disagree, banned FROM node_trust", &[])?
        .iter()
        .map(|r| (r.get(0), crate::store::Trust { agree: u(r, 1), disagree: u(r, 2), banned: r.get(3) }))
        .collect();
    l.dags = load_dags(tx)?;
    Ok(l)
}

fn load_dags(tx: &mut Transaction<'_>) -> Result<Vec<(DagRow, Vec<DagNodeRow>)>, postgres::Error> {
    let mut dags: Vec<(DagRow, Vec<DagNodeRow>)> = tx
        .query(
            "SELECT id, owner, json, state, reason, submitted_ms, finished_ms, rescue_of FROM dags ORDER BY id",
            &[],
        )?
        .iter()
        .map(|r| {
            let state: String = r.get(3);
            let (state, reason) = match DagState::parse(&state) {
                Some(s) => (s, r.get(4)),
                None => {
                    (DagState::Failed, Some(format!("the store held an unknown state {state:?} for this workflow")))
                }
            };
            let row = DagRow {
                id: u(r, 0),
                owner: r.get(1),
                json: r.get(2),
                state,
                reason,
                submitted_ms: u(r, 5),
                finished_ms: ou(r, 6),
                rescue_of: ou(r, 7),
            };
            (row, Vec::new())
        })
        .collect();
    let at: HashMap<u64, usize> = dags.iter().enumerate().map(|(i, (d, _))| (d.id, i)).collect();
    let rows = tx.query(
        "SELECT dag_id, idx, state, tries, spec_id, first_job, reason FROM dag_nodes ORDER BY dag_id, idx",
        &[],
    )?;
    for r in rows {
        let state: String = r.get(2);
        let (state, reason) = match NodeRun::parse(&state) {
            Some(s) => (s, r.get(6)),
            None => (NodeRun::Failed, Some(format!("the store held an unknown state {state:?} for this node"))),
        };
        let row = DagNodeRow {
            dag_id: u(&r, 0),
            idx: u(&r, 1) as u32,
            state,
            tries: u(&r, 3) as u32,
            spec_id: ou(&r, 4),
            first_job: ou(&r, 5),
            reason,
        };
        if let Some(&i) = at.get(&row.dag_id) {
            dags[i].1.push(row);
        }
    }
    Ok(dags)
}

fn stored_job(r: &Row) -> StoredJob {
    // A result that does not parse is dropped, not fatal: the job keeps its state. A state this
    // version does not know holds the job, with the reason.
    let result: Option<String> = r.get(14);
    let state: String = r.get(4);
    let (state, reason) = match JobState::parse(&state) {
        Some(s) => (s, r.get(11)),
        None => (JobState::Held, Some(format!("the store held an unknown state {state:?} for this job"))),
    };
    StoredJob {
        spec_id: u(r, 1),
        index: u(r, 2),
        owner: r.get(3),
        submitted_ms: u(r, 12),
        row: JobRow {
            id: u(r, 0),
            state,
            node: r.get(5),
            epoch: u(r, 6),
            attempts: u(r, 7) as u32,
            retries: u(r, 8) as u32,
            losses: u(r, 9) as u32,
            exit_code: r.get(10),
            reason,
            started_ms: ou(r, 15),
            finished_ms: ou(r, 13),
            result: result.and_then(|j| serde_json::from_str::<StoredResult>(&j).ok()),
            set_result: false,
            history: crate::store::history_from_column(r.get(16)),
            checkpoint: crate::store::checkpoint_from_column(r.get(17)),
            votes: crate::store::votes_from_column(r.get(18)),
        },
    }
}
