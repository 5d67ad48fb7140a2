//! `/metrics` in the Prometheus text format, rendered from the pool state.

use std::fmt::Write;

use crate::engine::{DISPATCH_BUCKETS, Engine};

pub fn render(e: &Engine) -> String {
    let mut out = String::new();
    let counts = e.counts();
    out.push_str("# HELP vmgrid_jobs Jobs in the queue, by state.\n# TYPE vmgrid_jobs gauge\n");
    for (st, n) in counts.jobs {
        let _ = writeln!(out, "vmgrid_jobs{{state=\"{}\"}} {n}", st.as_str());
    }
    let _ = writeln!(
        out,
        "# HELP vmgrid_leases Jobs running under a lease.\n# TYPE vmgrid_leases gauge\nvmgrid_leases {}",
        counts.leases
    );
    out.push_str("# HELP vmgrid_nodes Nodes, by state.\n# TYPE vmgrid_nodes gauge\n");
    for (st, n) in counts.nodes {
        let _ = writeln!(out, "vmgrid_nodes{{state=\"{}\"}} {n}", st.as_str());
    }
    let m = e.metrics();
    let _ = writeln!(
        out,
        "# HELP vmgrid_leases_granted_total Leases handed to nodes.\n# TYPE vmgrid_leases_granted_total counter\nvmgrid_leases_granted_total {}",
        m.leases_granted
    );
    let _ = writeln!(
        out,
        "# HELP vmgrid_results_accepted_total Results accepted under a current lease.\n# TYPE vmgrid_results_accepted_total counter\nvmgrid_results_accepted_total {}",
        m.results_accepted
    );
    let _ = writeln!(
        out,
        "# HELP vmgrid_results_refused_total Results refused because their lease was stale.\n# TYPE vmgrid_results_refused_total counter\nvmgrid_results_refused_total {}",
        m.results_refused
    );
    out.push_str(
        "# HELP vmgrid_dispatch_latency_ms Submit-to-lease latency.\n# TYPE vmgrid_dispatch_latency_ms histogram\n",
    );
    for (i, b) in DISPATCH_BUCKETS.iter().enumerate() {
        let _ = writeln!(out, "vmgrid_dispatch_latency_ms_bucket{{le=\"{b}\"}} {}", m.dispatch_buckets[i]);
    }
    let _ = writeln!(out, "vmgrid_dispatch_latency_ms_bucket{{le=\"+Inf\"}} {}", m.dispatch_count);
    let _ = writeln!(
        out,
        "vmgrid_dispatch_latency_ms_sum {}\nvmgrid_dispatch_latency_ms_count {}",
        m.dispatch_sum_ms, m.dispatch_count
    );
    out
}
