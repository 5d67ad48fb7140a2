//! The pool scale's rows: each pool size's figures with their typed targets, then how the figures
//! grow with the pool and how far one coordinator goes.

use std::path::Path;

use super::{FleetFigures, NODE_CPUS, measure};
use crate::report::{Report as Table, Target};

/// A row per figure and pool size, then how the figures grow with it and how far one coordinator
/// goes.
pub fn figures(root: &Path, sizes: &[usize], jobs: u64, rep: &mut Table) {
    let mut measured = Vec::new();
    for &n in sizes {
        match measure(root, n, jobs) {
            Ok(f) => {
                rows(&f, rep);
                if !f.errors.is_empty() {
                    let first = f.first_error.as_deref().unwrap_or("");
                    let kinds: Vec<String> = f.errors.iter().map(|(k, n)| format!("{n} {k}")).collect();
                    rep.note(format!(
                        "pool scale at {n} nodes: failed calls (retried): {}; the first: {first}",
                        kinds.join(", ")
                    ));
                }
                measured.push(f);
            }
            Err(e) => rep.note(format!("pool scale at {n} simulated nodes not measured: {e}")),
        }
    }
    if let Some(note) = growth(&measured) {
        rep.note(note);
    }
}

/// One pool size's rows. The targets are those of the rows of two real nodes (throughput, submit
/// to result), a core for 10,000 idle nodes, and heartbeats on time.
fn rows(f: &FleetFigures, rep: &mut Table) {
    let what = |w: &str| format!("pool scale, {} simulated nodes (HTTPS, 1 process): {w}", f.nodes);
    rep.figure(
        &what(&format!("{} trivial jobs", f.jobs)),
        format!("{:.0} jobs/s", f.jobs_per_s),
        f.jobs_per_s,
        " jobs/s",
        Target::AtLeast(10_000.0),
    );
    let (p50, p99) = f.submit_to_lease_ms;
    rep.figure(&what("submit to lease, idle pool, p50"), format!("{p50:.2} ms"), p50, " ms", Target::AtMost(2.0));
    rep.figure(&what("submit to lease, idle pool, p99"), format!("{p99:.2} ms"), p99, " ms", Target::AtMost(10.0));
    let per_1000 = f.idle_cpu_pct * 1000.0 / f.nodes as f64;
    rep.figure(
        &what("coordinator CPU, idle pool, per 1,000 nodes"),
        format!("{per_1000:.1}% of a core ({:.1}% in all)", f.idle_cpu_pct),
        per_1000,
        "% of a core",
        Target::AtMost(10.0),
    );
    let kept = f.heartbeats_kept * 100.0;
    rep.figure(&what("heartbeats sent on time"), format!("{kept:.0}%"), kept, "%", Target::AtLeast(95.0));
    let (l, h) = (f.lease_ms, f.heartbeat_rtt_ms);
    // No samples (both 0): every job of the sweep went to a call already waiting before it.
    let lease = if l == (0.0, 0.0) {
        "no lease call made during the sweep got work".to_string()
    } else {
        format!("lease that got work (carrying the last results) {:.1}/{:.1} ms", l.0, l.1)
    };
    rep.info(
        &what("round trips p50/p99; coordinator CPU"),
        format!(
            "{lease}, heartbeat {:.1}/{:.1} ms; {:.3} ms per job in a sweep, {:.2} ms per single job; joined in {:.1} s",
            h.0, h.1, f.cpu_ms_per_job, f.probe_cpu_ms, f.register_s
        ),
    );
    let (n, hb, c, a) = (f.nodes, f.heartbeat_ms, f.sweep_cpu_s, f.agents_cpu_s);
    println!(
        "  {n} nodes, a heartbeat every {hb} ms: over the sweep the coordinator took {c:.1} CPU-s, the agents {a:.1}"
    );
}

/// How the figures grow from the smallest pool to the largest, then how far one coordinator goes.
fn growth(measured: &[FleetFigures]) -> Option<String> {
    let (small, big) = (measured.first()?, measured.last()?);
    let mut note = String::new();
    if big.nodes > small.nodes {
        let x = |a: f64, b: f64| if a > 0.0 { b / a } else { f64::NAN };
        // A pool whose sweep went whole to calls already waiting has no lease round trip.
        let lease = match (small.lease_ms.1, big.lease_ms.1) {
            (a, b) if a > 0.0 && b > 0.0 => format!("lease p99 x{:.1}, ", b / a),
            _ => String::new(),
        };
        note = format!(
            "Pool scale from {} to {} simulated nodes (x{:.0}): idle coordinator CPU x{:.1}, CPU per job x{:.1}, CPU per single job x{:.1}, {lease}heartbeat p99 x{:.1}, submit-to-lease p50 x{:.1}, jobs/s x{:.2}. ",
            small.nodes,
            big.nodes,
            x(small.nodes as f64, big.nodes as f64),
            x(small.idle_cpu_pct, big.idle_cpu_pct),
            x(small.cpu_ms_per_job, big.cpu_ms_per_job),
            x(small.probe_cpu_ms, big.probe_cpu_ms),
            x(small.heartbeat_rtt_ms.1, big.heartbeat_rtt_ms.1),
            x(small.submit_to_lease_ms.0, big.submit_to_lease_ms.0),
            x(small.jobs_per_s, big.jobs_per_s),
        );
    }
    note += &reach(measured)?;
    Some(note)
}

/// How far one coordinator goes: from the largest pool whose heartbeats all went on time, the
/// size at which an idle pool alone would take a core (linear in the nodes); and the first pool
/// size at which this machine could not keep up, if one was measured.
fn reach(measured: &[FleetFigures]) -> Option<String> {
    let healthy = measured.iter().filter(|f| f.heartbeats_kept >= 0.95).max_by_key(|f| f.nodes)?;
    let per_node_pct = healthy.idle_cpu_pct / healthy.nodes as f64;
    let one_core = if per_node_pct > 0.0 { 100.0 / per_node_pct } else { f64::INFINITY };
    let mut note = format!(
        "How far one coordinator goes: at {} nodes an idle pool (a heartbeat every {} ms and a lease call waiting up to {} s for work per node) takes {:.1}% of one core, {:.4}% per node; linearly, heartbeats and idle polls alone would fill one core at about {:.0} nodes ({:.0} slots of {NODE_CPUS} cpus; HTCondor pools run 200,000), before any job is placed.",
        healthy.nodes,
        healthy.heartbeat_ms,
        vmgrid_proto::LEASE_WAIT_MS / 1000,
        healthy.idle_cpu_pct,
        per_node_pct,
        one_core,
        one_core * NODE_CPUS as f64
    );
    if let Some(over) = measured.iter().filter(|f| f.heartbeats_kept < 0.95).min_by_key(|f| f.nodes) {
        note += &format!(
            " At {} nodes this machine (the coordinator and the simulated agents on the same cores) does not keep up: {:.0}% of heartbeats went on time, heartbeat p99 {:.0} ms, submit to lease p50 {:.0} ms, {:.0} jobs/s.",
            over.nodes,
            over.heartbeats_kept * 100.0,
            over.heartbeat_rtt_ms.1,
            over.submit_to_lease_ms.0,
            over.jobs_per_s
        );
    }
    Some(note)
}
