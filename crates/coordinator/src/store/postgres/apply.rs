//! The translation of [`Op`]s into statements, as the SQLite store applies them.

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Statement, Transaction};

use crate::store::{DagNodeRow, JobRow, Op};

type R = Result<(), postgres::Error>;

/// A commit's transaction, with the connection's prepared statements: each statement is parsed
/// once per connection, and each operation is then one round trip, not two.
pub struct Tx<'a, 'b> {
    pub tx: &'a mut Transaction<'b>,
    pub prepared: &'a mut HashMap<&'static str, Statement>,
}

impl Tx<'_, '_> {
    fn exec(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let st = match self.prepared.get(sql) {
            Some(st) => st.clone(),
            None => {
                let st = self.tx.prepare(sql)?;
                self.prepared.insert(sql, st.clone());
                st
            }
        };
        self.tx.execute(&st, params)
    }

    /// A statement planned for its parameters each time (an unnamed statement: one more round
    /// trip). A prepared statement's plan is kept once PostgreSQL finds a generic one as cheap;
    /// for a batch given as arrays, a generic plan made while the table was small joins by
    /// scanning the whole table, every batch after.
    fn exec_planned(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        self.tx.execute(sql, params)
    }
}

/// Raises a counter of the `meta` table to at least `value`.
const RAISE: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)";

fn opt(x: Option<u64>) -> Option<i64> {
    x.map(|x| x as i64)
}

/// Applies a commit's operations in order, except that job updates wait and go together in one
/// statement (a sweep's placements and results are thousands of them, each a round trip
/// otherwise). They are applied before an operation that adds or deletes one of their jobs, and
/// at the end: no other operation reads or writes the `jobs` table, so the rows come out as
/// applying each operation in turn would leave them.
pub fn apply_all(tx: &mut Tx<'_, '_>, ops: &[Op]) -> R {
    let mut rows: Vec<Update<'_>> = Vec::new();
    let mut at: HashMap<u64, usize> = HashMap::new();
    for op in ops {
        match op {
            Op::Job(j) => match at.get(&j.id) {
                Some(&i) => rows[i].then(j),
                None => {
                    at.insert(j.id, rows.len());
                    rows.push(Update { row: j, result: j });
                }
            },
            Op::Jobs { .. } | Op::DeleteJob { .. } | Op::DagRelease { .. } if touches(op, &at) => {
                update_jobs(tx, &rows)?;
                rows.clear();
                at.clear();
                apply(tx, op)?;
            }
            _ => apply(tx, op)?,
        }
    }
    update_jobs(tx, &rows)
}

/// Whether `op` adds or deletes a job that has updates waiting (`at`): they must go first, as
/// they came first. Other jobs' updates may wait past it.
fn touches(op: &Op, at: &HashMap<u64, usize>) -> bool {
    let (first, count) = match op {
        Op::Jobs { first_id, count, .. } => (*first_id, *count),
        Op::DagRelease { node, count, .. } => (node.first_job.unwrap_or(0), *count),
        Op::DeleteJob { id } => (*id, 1),
        _ => return false,
    };
    if count < at.len() as u64 {
        (first..first.saturating_add(count)).any(|id| at.contains_key(&id))
    } else {
        at.keys().any(|&id| id >= first && id - first < count)
    }
}

/// One job's updates in a commit, as one: every column as the last update has it, but the
/// result as the last update that wrote it has it (an update may leave the result alone).
struct Update<'a> {
    row: &'a JobRow,
    result: &'a JobRow,
}

impl<'a> Update<'a> {
    fn then(&mut self, later: &'a JobRow) {
        self.row = later;
        if later.set_result || !self.result.set_result {
            self.result = later;
        }
    }
}

fn apply(tx: &mut Tx<'_, '_>, op: &Op) -> R {
    match op {
        Op::Token(t) => {
            tx.exec(
                "INSERT INTO tokens (hash, role, owner, id, created_ms, expires_ms, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (hash) DO UPDATE SET role = $2, owner = $3, id = $4, created_ms = $5, expires_ms = $6, detail = $7",
                &[&t.hash, &t.role.as_str(), &t.owner, &t.id, &(t.created_ms as i64), &opt(t.expires_ms), &t.detail],
            )?;
        }
        Op::RevokeToken { hash } => {
            tx.exec("DELETE FROM tokens WHERE hash = $1", &[hash])?;
        }
        Op::Spec { id, owner, json } => insert_spec(tx, *id, owner, json)?,
        Op::Jobs { spec_id, first_id, count, owner, submitted_ms } => {
            insert_jobs(tx, *spec_id, *first_id, *count, owner, *submitted_ms)?
        }
        Op::Job(j) => update_jobs(tx, &[Update { row: j, result: j }])?,
        Op::Node { name, ad_json, cred_hash, state } => {
            tx.exec(
                "INSERT INTO nodes (name, ad, cred_hash, state) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET ad = $2, cred_hash = $3, state = $4",
                &[name, ad_json, cred_hash, &state.as_str()],
            )?;
        }
        Op::DeleteNode { name } => {
            tx.exec("DELETE FROM nodes WHERE name = $1", &[name])?;
        }
        Op::DeleteJob { id } => {
            tx.exec("DELETE FROM jobs WHERE id = $1", &[&(*id as i64)])?;
        }
        Op::DeleteSpec { id } => {
            tx.exec("DELETE FROM specs WHERE id = $1", &[&(*id as i64)])?;
        }
        Op::Blob { hash, owner, size, created_ms } => {
            tx.exec(
                "INSERT INTO blobs (hash, owner, size, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (hash) DO NOTHING",
                &[hash, owner, &(*size as i64), &(*created_ms as i64)],
            )?;
        }
        Op::DeleteBlob { hash } => {
            tx.exec("DELETE FROM blobs WHERE hash = $1", &[hash])?;
        }
        Op::UserUsage { user, usage_cpu_s, at_ms } => {
            tx.exec(
                "INSERT INTO users (name, usage_cpu_s, usage_at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET usage_cpu_s = $2, usage_at_ms = $3",
                &[user, usage_cpu_s, &(*at_ms as i64)],
            )?;
        }
        Op::Sample(s) => {
            tx.exec(
                "INSERT INTO samples (minute_ms, completed, queued) VALUES ($1, $2, $3)
                 ON CONFLICT (minute_ms) DO UPDATE SET completed = $2, queued = $3",
                &[&(s.minute_ms as i64), &(s.completed as i64), &(s.queued as i64)],
            )?;
        }
        Op::PruneSamples { before_ms } => {
            tx.exec("DELETE FROM samples WHERE minute_ms < $1", &[&(*before_ms as i64)])?;
        }
        Op::Trust { name, trust: t } => {
            tx.exec(
                "INSERT INTO node_trust (name, agree, disagree, banned) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET agree = $2, disagree = $3, banned = $4",
                &[name, &(t.agree as i64), &(t.disagree as i64), &t.banned],
            )?;
        }
        Op::UserSettings { user, factor, max_cpus } => {
            tx.exec(
                "INSERT INTO users (name, factor, max_cpus) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET factor = $2, max_cpus = $3",
                &[user, factor, &opt(*max_cpus)],
            )?;
        }
        Op::Dag { .. } | Op::DagState { .. } | Op::DagNode(_) | Op::DeleteDag { .. } | Op::DagRelease { .. } => {
            apply_dag(tx, op)?
        }
    }
    Ok(())
}

/// Below this many jobs a commit updates them one prepared statement each: planning the batched
/// statement costs more than the round trips it saves.
const BATCH_FROM: usize = 8;

fn update_job(tx: &mut Tx<'_, '_>, u: &Update<'_>) -> R {
    let (j, result) = (u.row, u.result.result.as_ref());
    let result = result.map(|r| serde_json::to_string(r).expect("a result serializes"));
    tx.exec(
        "UPDATE jobs SET state = $2, node = $3, epoch = $4, attempts = $5, retries = $6, losses = $7, exit_code = $8, reason = $9, finished_ms = $10, result = CASE WHEN $12 THEN $11 ELSE result END, started_ms = $13, history = $14, checkpoint = $15, votes = $16 WHERE id = $1",
        &[
            &(j.id as i64),
            &j.state.as_str(),
            &j.node,
            &(j.epoch as i64),
            &(j.attempts as i64),
            &(j.retries as i64),
            &(j.losses as i64),
            &j.exit_code,
            &j.reason,
            &opt(j.finished_ms),
            &result,
            &u.result.set_result,
            &opt(j.started_ms),
            &crate::store::history_column(&j.history),
            &crate::store::checkpoint_column(&j.checkpoint),
            &crate::store::votes_column(&j.votes),
        ],
    )?;
    Ok(())
}

/// Updates of distinct jobs: a few by the prepared statement each, more in one statement that
/// takes each column as an array.
fn update_jobs(tx: &mut Tx<'_, '_>, updates: &[Update<'_>]) -> R {
    if updates.len() < BATCH_FROM {
        return updates.iter().try_for_each(|u| update_job(tx, u));
    }
    let rows: Vec<&JobRow> = updates.iter().map(|u| u.row).collect();
    let col = |f: &dyn Fn(&JobRow) -> i64| rows.iter().map(|j| f(j)).collect::<Vec<i64>>();
    let opt_col = |f: &dyn Fn(&JobRow) -> Option<u64>| rows.iter().map(|j| opt(f(j))).collect::<Vec<_>>();
    let text = |f: &dyn Fn(&JobRow) -> Option<String>| rows.iter().map(|j| f(j)).collect::<Vec<Option<String>>>();
    let (id, epoch) = (col(&|j| j.id as i64), col(&|j| j.epoch as i64));
    let (attempts, retries, losses) =
        (col(&|j| j.attempts as i64), col(&|j| j.retries as i64), col(&|j| j.losses as i64));
    let state: Vec<&str> = rows.iter().map(|j| j.state.as_str()).collect();
    let exit_code: Vec<Option<i32>> = rows.iter().map(|j| j.exit_code).collect();
    let set_result: Vec<bool> = updates.iter().map(|u| u.result.set_result).collect();
    let (finished, started) = (opt_col(&|j| j.finished_ms), opt_col(&|j| j.started_ms));
    let (node, reason) = (text(&|j| j.node.clone()), text(&|j| j.reason.clone()));
    let result: Vec<Option<String>> = updates
        .iter()
        .map(|u| u.result.result.as_ref().map(|r| serde_json::to_string(r).expect("a result serializes")))
        .collect();
    let history = text(&|j| crate::store::history_column(&j.history));
    let checkpoint = text(&|j| crate::store::checkpoint_column(&j.checkpoint));
    let votes = text(&|j| crate::store::votes_column(&j.votes));
    tx.exec_planned(
        "UPDATE jobs SET state = v.state, node = v.node, epoch = v.epoch, attempts = v.attempts, retries = v.retries,
           losses = v.losses, exit_code = v.exit_code, reason = v.reason, finished_ms = v.finished_ms,
           result = CASE WHEN v.set_result THEN v.result ELSE jobs.result END, started_ms = v.started_ms,
           history = v.history, checkpoint = v.checkpoint, votes = v.votes
         FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[],
           $8::INTEGER[], $9::TEXT[], $10::BIGINT[], $11::TEXT[], $12::BOOLEAN[], $13::BIGINT[], $14::TEXT[],
           $15::TEXT[], $16::TEXT[])
           AS v(id, state, node, epoch, attempts, retries, losses, exit_code, reason, finished_ms, result,
             set_result, started_ms, history, checkpoint, votes)
         WHERE jobs.id = v.id",
        &[
            &id,
            &state,
            &node,
            &epoch,
            &attempts,
            &retries,
            &losses,
            &exit_code,
            &reason,
            &finished,
            &result,
            &set_result,
            &started,
            &history,
            &checkpoint,
            &votes,
        ],
    )?;
    Ok(())
}

/// The workflow operations.
fn apply_dag(tx: &mut Tx<'_, '_>, op: &Op) -> R {
    match op {
        Op::Dag { row, nodes } => {
            tx.exec(
                "INSERT INTO dags (id, owner, json, state, reason, submitted_ms, finished_ms, rescue_of) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &(row.id as i64),
                    &row.owner,
                    &row.json,
                    &row.state.as_str(),
                    &row.reason,
                    &(row.submitted_ms as i64),
                    &opt(row.finished_ms),
                    &opt(row.rescue_of),
                ],
            )?;
            // The highest workflow id ever stored (SQLite's AUTOINCREMENT sequence).
            tx.exec(RAISE, &[&"last_dag", &(row.id as i64)])?;
            for n in nodes {
                put_dag_node(tx, n)?;
            }
        }
        Op::DagState { id, state, reason, finished_ms } => {
            tx.exec(
                "UPDATE dags SET state = $2, reason = $3, finished_ms = $4 WHERE id = $1",
                &[&(*id as i64), &state.as_str(), reason, &opt(*finished_ms)],
            )?;
        }
        Op::DagNode(n) => put_dag_node(tx, n)?,
        Op::DeleteDag { id } => {
            tx.exec("DELETE FROM dag_nodes WHERE dag_id = $1", &[&(*id as i64)])?;
            tx.exec("DELETE FROM dags WHERE id = $1", &[&(*id as i64)])?;
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

fn insert_spec(tx: &mut Tx<'_, '_>, id: u64, owner: &str, json: &str) -> R {
    tx.exec("INSERT INTO specs (id, owner, json) VALUES ($1, $2, $3)", &[&(id as i64), &owner, &json])?;
    tx.exec(RAISE, &[&"next_spec", &((id + 1) as i64)])?;
    Ok(())
}

/// A batch of jobs in one statement (a sweep of 10,000 is one round trip, not 10,000).
fn insert_jobs(tx: &mut Tx<'_, '_>, spec_id: u64, first_id: u64, count: u64, owner: &str, submitted_ms: u64) -> R {
    if count > 0 {
        tx.exec(
            "INSERT INTO jobs (id, spec_id, idx, owner, state, submitted_ms)
             SELECT $1::BIGINT + i, $2::BIGINT, i, $3::TEXT, 'idle', $4::BIGINT FROM generate_series(0::BIGINT, $5::BIGINT - 1) AS i",
            &[&(first_id as i64), &(spec_id as i64), &owner, &(submitted_ms as i64), &(count as i64)],
        )?;
    }
    tx.exec(RAISE, &[&"next_job", &((first_id + count) as i64)])?;
    Ok(())
}

fn put_dag_node(tx: &mut Tx<'_, '_>, n: &DagNodeRow) -> R {
    tx.exec(
        "INSERT INTO dag_nodes (dag_id, idx, state, tries, spec_id, first_job, reason) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (dag_id, idx) DO UPDATE SET state = $3, tries = $4, spec_id = $5, first_job = $6, reason = $7",
        &[
            &(n.dag_id as i64),
            &(n.idx as i64),
            &n.state.as_str(),
            &(n.tries as i64),
            &opt(n.spec_id),
            &opt(n.first_job),
            &n.reason,
        ],
    )?;
    Ok(())
}
