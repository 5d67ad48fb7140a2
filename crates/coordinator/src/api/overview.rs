//! `GET /v1/overview`: the dashboard's overview of the pool: nodes by state, cpus used of total,
//! jobs by state, and the last hour's throughput and queue length ([`crate::history`]). These are
//! the pool's totals, as `/metrics` gives them to the same callers; no job of another user is named.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State as AxState;
use serde::Serialize;
use vmgrid_proto::{NodeState, now_ms};

use super::{Auth, Result, S, user};
use crate::history::Sample;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// Nodes by state (ready, draining, lost).
    pub nodes: BTreeMap<&'static str, u64>,
    /// Cpus of the nodes not lost.
    pub cpus_total: u64,
    pub cpus_used: u64,
    /// Jobs by state (idle, running, held, completed, removed).
    pub jobs: BTreeMap<&'static str, u64>,
    /// One sample a minute, oldest first; the last is the current minute so far.
    pub history: Vec<Sample>,
    pub now_ms: u64,
}

pub async fn get(AxState(shared): AxState<S>, Auth(p): Auth) -> Result<Json<Overview>> {
    user(&p, "read the pool's overview")?;
    let (counts, history, nodes) = shared.peek(|e| (e.counts(), e.history_samples(), e.node_views()));
    let live = nodes.iter().filter(|n| n.state != NodeState::Lost);
    let (total, free) = live.fold((0u64, 0u64), |(t, f), n| (t + u64::from(n.ad.cpus), f + u64::from(n.free_cpus)));
    let jobs: BTreeMap<_, _> = counts.jobs.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    Ok(Json(Overview {
        nodes: counts.nodes.iter().map(|(s, n)| (s.as_str(), *n)).collect(),
        cpus_total: total,
        cpus_used: total - free,
        jobs,
        history,
        now_ms: now_ms(),
    }))
}
