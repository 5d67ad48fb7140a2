//! vmgrid's benchmark suite (`scripts/bench`). Each comparison runs side by side in the same run,
//! so the ratio holds on a noisy machine. It prints a table; the whole suite writes it as
//! BENCHMARKS.md, a part of it (`--only`, `--fleet`) only to a file given with `--out`.
//!
//! It measures: trivial-job throughput through `vmgrid up` (2 nodes) against a single-node Slurm
//! started by `../shared/peers/slurm-up`; single-job latency on a warm pool; wasm against native
//! compute; the pool on PostgreSQL against SQLite; a QEMU job against plain qemu-system; the scheduler engine with 1M jobs (100 users, fair
//! share on) and 10k nodes;
//! the coordinator's memory with 1M jobs queued; the single-system image's fan-out; the appliance;
//! the pool's scale with 100, 1,000 and 10,000 simulated node agents (`--fleet` runs it alone,
//! `--fleet-nodes` picks the sizes).
//! Benchmarks print figures, each with its typed target and whether it is met; they assert nothing.

mod appliance;
mod checkpoint;
mod compute;
mod engine;
mod fleet;
mod overlay;
mod peers;
mod pool;
mod report;
mod ssi;
mod wasm_factors;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use report::{Report, Target};

struct Args {
    root: PathBuf,
    sizes: Vec<u64>,
    slurm: bool,
    /// Where the table goes: BENCHMARKS.md by default for the whole suite; a partial run writes
    /// only to a file given explicitly (it would drop the other rows).
    out: Option<PathBuf>,
    latency_runs: usize,
    quick: bool,
    /// Simulated node agents per pool size of the scale test (fleet.rs), and its sweep's jobs.
    fleet_sizes: Vec<usize>,
    fleet_jobs: u64,
    /// Run only these parts (pool, postgres, slurm, wasm, qemu, checkpoint, scheduler, rss, ssi, appliance,
    /// fleet); all when empty.
    only: Vec<String>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == part)
    }
}

fn parse_args() -> Args {
    let root = std::env::current_dir().expect("a working directory");
    let mut a = Args {
        out: None,
        root,
        sizes: vec![10_000, 100_000],
        slurm: true,
        latency_runs: 300,
        quick: false,
        fleet_sizes: vec![100, 1_000, 10_000],
        fleet_jobs: 10_000,
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.sizes = vec![2_000];
                a.latency_runs = 50;
                a.quick = true;
                a.fleet_sizes = vec![100];
                a.fleet_jobs = 2_000;
            }
            "--no-slurm" => a.slurm = false,
            "--sizes" => a.sizes = numbers("--sizes", it.next()),
            "--fleet" => a.only = vec!["fleet".into()],
            "--fleet-nodes" => a.fleet_sizes = numbers("--fleet-nodes", it.next()),
            "--fleet-jobs" => a.fleet_jobs = numbers("--fleet-jobs", it.next()).into_iter().next().unwrap_or(0),
            "--out" => a.out = Some(PathBuf::from(it.next().unwrap_or_else(|| usage_error("--out needs a file")))),
            "--only" => a.only = it.next().expect("--only PART,PART").split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                println!(
                    "usage: vmgrid-bench [--quick] [--no-slurm] [--sizes 10000,100000] [--only pool,replicas,peers,postgres,slurm,wasm,qemu,checkpoint,scheduler,rss,ssi,appliance,fleet,overlay] [--fleet] [--fleet-nodes 100,1000,10000] [--fleet-jobs 10000] [--out FILE]\n--fleet: only the pool's scale, simulated node agents against a real coordinator.\n--out: where the table is written; the whole suite writes BENCHMARKS.md by default, a part of it (--only, --fleet) nothing.\nRun from the repository root after scripts/bench has built everything."
                );
                std::process::exit(0);
            }
            other => usage_error(&format!("unknown argument {other}")),
        }
    }
    if a.fleet_jobs == 0 || a.fleet_sizes.contains(&0) || a.sizes.contains(&0) {
        usage_error("--sizes, --fleet-nodes and --fleet-jobs take numbers above 0");
    }
    a
}

fn usage_error(why: &str) -> ! {
    eprintln!("vmgrid-bench: {why}; see --help");
    std::process::exit(2);
}

/// `N,M,...` after `flag`, or a usage error that says what is wrong.
fn numbers<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Vec<T> {
    let value = value.unwrap_or_else(|| usage_error(&format!("{flag} needs N or N,M")));
    value
        .split(',')
        .map(|s| s.trim().parse().unwrap_or_else(|_| usage_error(&format!("{flag}: `{s}` is not a number"))))
        .collect()
}

pub fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args = parse_args();
    // Only the scheduler engine runs without the release binary.
    let needs_bin = [
        "pool",
        "replicas",
        "peers",
        "postgres",
        "slurm",
        "wasm",
        "qemu",
        "rss",
        "ssi",
        "appliance",
        "fleet",
        "overlay",
    ]
    .iter()
    .any(|p| args.wants(p));
    if needs_bin && !pool::vmgrid_bin(&args.root).exists() {
        eprintln!("vmgrid-bench: {} is missing; run scripts/bench", pool::vmgrid_bin(&args.root).display());
        std::process::exit(1);
    }
    let mut rep = Report::default();
    let machine = format!(
        "{} cores ({}), {} MiB, Linux {}",
        sh("nproc"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'"),
        sh("awk '/MemTotal/{print int($2/1024)}' /proc/meminfo"),
        sh("uname -r")
    );
    let date = sh("date -u +%Y-%m-%dT%H:%MZ");
    println!("vmgrid benchmarks, {date}\nmachine: {machine}\n");
    let ours = if args.wants("pool") { pool_figures(&args, &mut rep) } else { BTreeMap::new() };
    if args.wants("replicas") {
        replica_figures(&args, &mut rep);
    }
    if args.wants("peers") {
        peer_figures(&args, &mut rep);
    }
    if args.wants("postgres") {
        postgres_figures(&args, &ours, &mut rep);
    }
    if args.slurm && args.wants("slurm") {
        slurm_figures(&args, &ours, &mut rep);
    }
    compute_figures(&args, &mut rep);
    ssi_figures(&args, &mut rep);
    appliance_figures(&args, &mut rep);
    if args.wants("checkpoint") {
        checkpoint_figures(&args, &mut rep);
    }
    if args.wants("overlay") {
        overlay_figures(&args, &mut rep);
    }
    if args.wants("fleet") {
        fleet::figures(&args.root, &args.fleet_sizes, args.fleet_jobs, &mut rep);
    }
    let analysis = std::fs::read_to_string(args.root.join("crates/bench/ANALYSIS.md")).ok();
    let md = rep.markdown(&date, &machine, &sh("git rev-parse --short HEAD"), analysis.as_deref());
    let out = args.out.clone().or_else(|| args.only.is_empty().then(|| args.root.join("BENCHMARKS.md")));
    match out {
        Some(out) => match std::fs::write(&out, md) {
            Ok(()) => println!("\nwrote {}", out.display()),
            Err(e) => {
                eprintln!("vmgrid-bench: cannot write {}: {e}", out.display());
                std::process::exit(1);
            }
        },
        None => println!("\na part of the suite: BENCHMARKS.md is left as it is (--out FILE writes this table)"),
    }
}

/// Throughput and latency, on one warm pool; returns the throughput by sweep size.
fn pool_figures(args: &Args, rep: &mut Report) -> BTreeMap<u64, f64> {
    let mut ours = BTreeMap::new();
    let pool = pool::Pool::up(&args.root, 2);
    let spec = pool::trivial_spec(&pool.client, &args.root);
    pool::vmgrid_throughput(&pool, &spec, 200); // warm up: module cache, connections
    for &n in &args.sizes {
        let rate = pool::vmgrid_throughput(&pool, &spec, n);
        ours.insert(n, rate);
        rep.figure(
            &format!("throughput, {n} trivial wasm jobs, vmgrid up (2 nodes)"),
            format!("{rate:.0} jobs/s"),
            rate,
            " jobs/s",
            Target::AtLeast(10_000.0),
        );
    }
    let (p50, p99) = pool::latency(&pool, &spec, args.latency_runs);
    let what = format!("one trivial job, submit to result, warm pool (n={})", args.latency_runs);
    rep.figure(&format!("{what}, p50"), format!("{p50:.2} ms"), p50, " ms", Target::AtMost(2.0));
    rep.figure(&format!("{what}, p99"), format!("{p99:.2} ms"), p99, " ms", Target::AtMost(10.0));
    drop(pool);
    separate_figures(args, rep);
    ours
}

/// The same sweeps through a coordinator process and two node processes over TCP (TLS).
fn separate_figures(args: &Args, rep: &mut Report) {
    let pool = pool::Pool::separate(&args.root, 2);
    let spec = pool::trivial_spec(&pool.client, &args.root);
    pool::vmgrid_throughput(&pool, &spec, 200);
    for &n in &args.sizes {
        let rate = pool::vmgrid_throughput(&pool, &spec, n);
        rep.figure(
            &format!("throughput, {n} trivial wasm jobs, coordinator + 2 node processes over TCP"),
            format!("{rate:.0} jobs/s"),
            rate,
            " jobs/s",
            Target::AtLeast(10_000.0),
        );
    }
}

/// What `replicas = 3` costs a sweep: the same trivial jobs through a coordinator and three node
/// processes, once as they are and once each run on three distinct nodes (one after another) with
/// the result two of them agree on. The cost is at least 3x by construction.
fn replica_figures(args: &Args, rep: &mut Report) {
    let n = args.sizes[0].min(5_000);
    let pool = pool::Pool::separate(&args.root, 3);
    let spec = pool::trivial_spec(&pool.client, &args.root);
    pool::vmgrid_throughput(&pool, &spec, 200);
    let plain = pool::vmgrid_throughput(&pool, &spec, n);
    let replicated = vmgrid_proto::JobSpec { replicas: Some(3), quorum: Some(2), ..spec };
    let rate = pool::vmgrid_throughput(&pool, &replicated, n);
    let what = format!("{n} trivial wasm jobs, coordinator + 3 node processes");
    rep.figure(&format!("throughput, {what}"), format!("{plain:.0} jobs/s"), plain, " jobs/s", Target::None);
    rep.figure(
        &format!("throughput, {what}, replicas = 3 (quorum 2)"),
        format!("{rate:.0} jobs/s ({:.1}x fewer: each job runs 3 times)", plain / rate),
        rate,
        " jobs/s",
        Target::None,
    );
}

/// Large blobs between nodes: N node processes each getting one 1 GiB input, from the
/// coordinator alone and from each other (`--quick`: 256 MiB).
fn peer_figures(args: &Args, rep: &mut Report) {
    let (nodes, mib) = (4, if args.quick { 256 } else { 1024 });
    for peers in [false, true] {
        let how = if peers { "from each other (and the coordinator)" } else { "from the coordinator alone" };
        let what = format!("{nodes} node processes get one {mib} MiB input, {how}");
        match peers::measure(&args.root, nodes, mib, peers) {
            Ok(f) => rep.figure(
                &what,
                format!(
                    "{:.1} s; the coordinator sent {:.0} MiB ({:.1}x the input)",
                    f.seconds,
                    f.served_mib,
                    f.served_mib / mib as f64
                ),
                f.seconds,
                " s",
                Target::None,
            ),
            Err(e) => rep.note(format!("{what}: not measured: {e}")),
        }
    }
}

/// The same throughput and latency with the pool's state in PostgreSQL (a private cluster on
/// this machine, over its unix socket), against SQLite's of the same run.
fn postgres_figures(args: &Args, ours: &BTreeMap<u64, f64>, rep: &mut Report) {
    let n = args.sizes[0];
    let pool = pool::Pool::up_on(&args.root, 2, true);
    let spec = pool::trivial_spec(&pool.client, &args.root);
    pool::vmgrid_throughput(&pool, &spec, 200);
    let rate = pool::vmgrid_throughput(&pool, &spec, n);
    rep.figure(
        &format!("throughput, {n} trivial wasm jobs, vmgrid up on PostgreSQL"),
        format!("{rate:.0} jobs/s"),
        rate,
        " jobs/s",
        Target::None,
    );
    if let Some(sqlite) = ours.get(&n) {
        let ratio = rate / sqlite;
        let what = format!("PostgreSQL / SQLite throughput, {n} jobs, same run");
        rep.figure(&what, format!("{ratio:.2}x"), ratio, "x", Target::AtLeast(0.5));
    }
    let (p50, p99) = pool::latency(&pool, &spec, args.latency_runs);
    let what = format!("one trivial job on PostgreSQL, submit to result (n={})", args.latency_runs);
    rep.figure(&format!("{what}, p50"), format!("{p50:.2} ms"), p50, " ms", Target::None);
    rep.figure(&format!("{what}, p99"), format!("{p99:.2} ms"), p99, " ms", Target::None);
}

/// The wasm slowdown taken apart: the same guest in this process under wasmtime configurations
/// that each change one setting, against native.
fn wasm_factor_figures(root: &std::path::Path, rep: &mut Report) {
    match wasm_factors::measure(root) {
        Ok((native, variants)) => {
            for (what, s) in variants {
                let ratio = s / native;
                rep.figure(
                    &format!("wasm factor, in-process: {what} / native"),
                    format!("{s:.2} s / {native:.2} s = {ratio:.2}x"),
                    ratio,
                    "x",
                    Target::None,
                );
            }
        }
        Err(e) => rep.note(format!("wasm factors not measured: {e}")),
    }
}

/// Slurm gets the smallest size only: at its rate the larger sweeps would take hours.
fn slurm_figures(args: &Args, ours: &BTreeMap<u64, f64>, rep: &mut Report) {
    let n = args.sizes[0];
    match pool::slurm(&args.root, &[n]) {
        Ok(r) => {
            let theirs = r[&n];
            rep.info(&format!("throughput, {n} trivial jobs, Slurm job array (1 node)"), format!("{theirs:.1} jobs/s"));
            if let Some(o) = ours.get(&n) {
                let ratio = o / theirs;
                let what = format!("vmgrid / Slurm, {n} jobs, same run");
                rep.figure(&what, format!("{ratio:.1}x"), ratio, "x", Target::AtLeast(500.0));
            }
        }
        Err(e) => rep.note(format!("Slurm was not measured in this run: {e}")),
    }
}

fn skipped<T>() -> Result<T, String> {
    Err("skipped (--only)".into())
}

/// wasm against native, QEMU against plain qemu-system, the scheduler engine, the coordinator's
/// memory.
fn compute_figures(args: &Args, rep: &mut Report) {
    match if args.wants("wasm") { compute::wasm_vs_native(&args.root) } else { skipped() } {
        Ok((n, w)) => rep.figure(
            "wasm compute (sieve, 20M x5): vmgrid run / native",
            format!("{w:.2} s / {n:.2} s = {:.2}x", w / n),
            w / n,
            "x",
            Target::AtMost(1.10),
        ),
        Err(e) => rep.note(format!("wasm compute not measured: {e}")),
    }
    if args.wants("wasm") {
        wasm_factor_figures(&args.root, rep);
    }
    match if args.wants("qemu") { compute::qemu_vs_plain(&args.root) } else { skipped() } {
        Ok((p, v)) => rep.figure(
            "QEMU guest-kit job: vmgrid run / plain qemu-system",
            format!("{v:.2} s / {p:.2} s = {:.2}x", v / p),
            v / p,
            "x",
            Target::AtMost(1.10),
        ),
        Err(e) => rep.note(format!("QEMU not measured: {e}")),
    }
    if args.wants("scheduler") {
        let (rate, placed) = engine::scheduler_engine();
        let what = "scheduler engine, 1M jobs of 100 users x 10k nodes, fair share, CEL req + rank";
        rep.figure(what, format!("{rate:.0} placements/s ({placed})"), rate, "/s", Target::AtLeast(100_000.0));
    }
    match if args.wants("rss") { engine::coordinator_rss(&args.root) } else { skipped() } {
        Ok((mb, s, pages)) => {
            rep.figure(
                "coordinator RSS with 1M jobs queued",
                format!("{mb:.0} MiB (submit {s:.1} s)"),
                mb,
                " MiB",
                Target::AtMost(1024.0),
            );
            for (what, ms) in pages {
                let row = format!("job list with 1M jobs queued, {what} (50 jobs; median of 5)");
                rep.figure(&row, format!("{ms:.1} ms"), ms, " ms", Target::AtMost(100.0));
            }
        }
        Err(e) => rep.note(format!("coordinator RSS not measured: {e}")),
    }
}

fn ssi_figures(args: &Args, rep: &mut Report) {
    let limit = if args.quick { 3_000_000 } else { 20_000_000 };
    match if args.wants("ssi") { ssi::ssi_figures(&args.root, limit, 8) } else { skipped() } {
        Ok(f) => {
            let speedup = f.one_node_s / f.two_nodes_s;
            rep.figure(
                "ssi CPU-bound fan-out (8 children): 1 node / 2 nodes",
                format!("{:.2} s / {:.2} s = {speedup:.2}x", f.one_node_s, f.two_nodes_s),
                speedup,
                "x",
                Target::AtLeast(1.8),
            );
            rep.info(
                "ssi remote file, open+close (4 KiB, unchanged) / write+close",
                format!("{:.0} us / {:.0} us", f.open_us, f.write_us),
            );
        }
        Err(e) => rep.note(format!("ssi not measured: {e}")),
    }
}

fn appliance_figures(args: &Args, rep: &mut Report) {
    match if args.wants("appliance") { appliance::appliance_figures(&args.root) } else { skipped() } {
        Ok(f) => {
            let sizes: Vec<String> = f.sizes_mib.iter().map(|(e, m)| format!("{e} {m:.1}")).collect();
            rep.info("appliance image (release vmgrid inside), MiB", sizes.join(", "));
            rep.info("appliance build time", format!("{:.1} s", f.build_s));
            let what = "appliance boot by firmware to joined (one appliance)";
            rep.figure(what, format!("{:.1} s", f.joined_s), f.joined_s, " s", Target::AtMost(60.0));
            rep.info("appliance power-off (SIGTERM) to gone from the pool", format!("{:.1} s", f.left_s));
        }
        Err(e) => rep.note(format!("appliance not measured: {e}")),
    }
}

/// QEMU checkpoints: pause, size and resume for a 256 MiB and a 1 GiB guest, idle and dirty.
/// Target (issue #15): a 256 MiB guest checkpointed in at most 1 s of pause, resumed in at most 2 s.
fn checkpoint_figures(args: &Args, rep: &mut Report) {
    let sizes: &[u64] = if args.quick { &[256] } else { &[256, 1024] };
    for &memory_mb in sizes {
        for dirty in [false, true] {
            let what =
                format!("checkpoint, {memory_mb} MiB guest, {}", if dirty { "60% of RAM written" } else { "idle" });
            match checkpoint::measure(&args.root, memory_mb, dirty) {
                Ok(f) => {
                    let (pause_target, resume_target) = match f.memory_mb {
                        256 => (Target::AtMost(1.0), Target::AtMost(2.0)),
                        _ => (Target::None, Target::None),
                    };
                    let shown = format!("{:.2} s (of {:.2} s saving, live)", f.pause_s, f.took_s);
                    rep.figure(&format!("{what}: pause"), shown, f.pause_s, " s", pause_target);
                    rep.info(
                        &format!("{what}: size as saved / stored (chunks, zstd)"),
                        format!("{:.0} MiB / {:.0} MiB ({:.1} s to compress)", f.raw_mib, f.stored_mib, f.compress_s),
                    );
                    rep.info(
                        &format!("{what}: the next checkpoint sends (new chunks)"),
                        format!("{:.1} MiB of {:.0} MiB", f.next_mib, f.stored_mib),
                    );
                    // As another node resumes it: the stored parts unpacked, then QEMU started on
                    // them and running (fetching the blobs, over the pool's network, is apart).
                    let total = f.unpack_s + f.resume_s;
                    let shown = format!("{total:.2} s ({:.2} s unpacking, {:.2} s QEMU)", f.unpack_s, f.resume_s);
                    rep.figure(&format!("{what}: resume elsewhere"), shown, total, " s", resume_target);
                }
                Err(e) => rep.note(format!("{what} not measured: {e}")),
            }
        }
    }
}

/// The overlay between two VMs on two nodes, direct and relayed, beside QEMU's socket networking.
fn overlay_figures(args: &Args, rep: &mut Report) {
    type Measure = fn(&std::path::Path) -> Result<overlay::Net, String>;
    let ways: [(&str, Measure); 3] = [
        ("QEMU socket networking (-netdev dgram, loopback)", overlay::plain_socket),
        ("overlay, direct (WireGuard over UDP, loopback)", |r| overlay::overlay(r, false)),
        ("overlay, relayed through the coordinator", |r| overlay::overlay(r, true)),
    ];
    for (what, measure) in ways {
        match measure(&args.root) {
            Ok(n) => {
                rep.info(&format!("2 TCG VMs, TCP throughput: {what}"), format!("{:.1} MiB/s", n.mib_s));
                rep.info(&format!("2 TCG VMs, ping round trip: {what}"), format!("{:.2} ms", n.rtt_ms));
            }
            Err(e) => rep.note(format!("{what} not measured: {e}")),
        }
    }
}
