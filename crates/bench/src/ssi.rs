//! The single-system image's figures: a CPU-bound fan-out on one node and on two, and the cost of
//! a remote open and write.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::engine::coordinator;
use crate::pool::{guest, vmgrid_bin};

pub struct SsiFigures {
    pub one_node_s: f64,
    pub two_nodes_s: f64,
    pub open_us: f64,
    pub write_us: f64,
}

/// The single-system image: a CPU-bound fan-out on 1 node and on 2 (each node agent pinned to
/// its own core, so "a node" is one core of this machine), and the cost of a remote open/close.
pub fn ssi_figures(root: &Path, limit: u64, parts: u32) -> Result<SsiFigures, String> {
    let dir = std::env::temp_dir().join(format!("vmgrid-bench-ssi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fsroot = dir.join("root");
    std::fs::create_dir_all(&fsroot).map_err(|e| e.to_string())?;
    for g in ["fanout", "ssi-probe"] {
        std::fs::copy(guest(root, g), fsroot.join(format!("{g}.wasm"))).map_err(|e| format!("{g}: {e}"))?;
    }
    std::fs::write(fsroot.join("data.txt"), vec![b'x'; 4096]).map_err(|e| e.to_string())?;
    let data = dir.join("pool");
    let (mut coord, client) = coordinator(root, &data)?;
    let url = client.url().to_string();
    let console = |script: &str| run_console(root, &url, &data, &fsroot, script);
    let mut nodes: Vec<Child> = Vec::new();
    let mut result = Err("not run".to_string());
    let fan = format!("run /fanout.wasm {parts} {limit}\n");
    let warm = format!("run /fanout.wasm {parts} 100000\n");
    for n in 1..=2u32 {
        nodes.push(pinned_node(root, &url, &data, &dir, n)?);
        while client.nodes().map(|v| v.len() as u32).unwrap_or(0) < n {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Warm: every node compiles the module once.
        for _ in 0..n {
            console(&warm)?;
        }
        let mut times = Vec::new();
        for _ in 0..3 {
            let (secs, out) = console(&fan)?;
            if !out.contains("primes below") {
                return Err(format!("the fan-out printed no answer: {out}"));
            }
            times.push(secs);
        }
        times.sort_by(f64::total_cmp);
        println!("ssi fan-out on {n} node(s): {times:.2?} s");
        result = match result {
            Err(_) => Ok(SsiFigures { one_node_s: times[1], two_nodes_s: 0.0, open_us: 0.0, write_us: 0.0 }),
            Ok(f) => Ok(SsiFigures { two_nodes_s: times[1], ..f }),
        };
    }
    let (_, out) = console("run /ssi-probe.wasm opens:/data.txt:2000 writes:/w.txt:500\n")?;
    let grab =
        |prefix: &str| out.lines().find_map(|l| l.strip_prefix(prefix)?.strip_suffix(" us")?.parse::<f64>().ok());
    let mut figures = result?;
    figures.open_us = grab("open+close ").ok_or(format!("no open figure in {out}"))?;
    figures.write_us = grab("write+close ").ok_or(format!("no write figure in {out}"))?;
    for mut n in nodes {
        let _ = n.kill();
        let _ = n.wait();
    }
    let _ = coord.kill();
    let _ = coord.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

/// A node agent pinned to core `n - 1`, with one cpu.
fn pinned_node(root: &Path, url: &str, data: &Path, dir: &Path, n: u32) -> Result<Child, String> {
    Command::new("taskset")
        .args(["-c", &(n - 1).to_string()])
        .arg(vmgrid_bin(root))
        .args(["node", "--pool", url, "--name", &format!("core{n}"), "--cpus", "1", "--token-file"])
        .arg(data.join("pool.token"))
        .arg("--cache-dir")
        .arg(dir.join(format!("node{n}")))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("taskset: {e}"))
}

/// Runs `script` through a `vmgrid ssi` console; its wall time and what it printed.
fn run_console(root: &Path, url: &str, data: &Path, fsroot: &Path, script: &str) -> Result<(f64, String), String> {
    let start = Instant::now();
    let mut c = Command::new(vmgrid_bin(root))
        .args(["ssi", "--pool", url, "--token-file"])
        .arg(data.join("admin.token"))
        .arg("--root")
        .arg(fsroot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    c.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    let out = c.wait_with_output().map_err(|e| e.to_string())?;
    let secs = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("the console exited with {}: {text}", out.status));
    }
    Ok((secs, text))
}
