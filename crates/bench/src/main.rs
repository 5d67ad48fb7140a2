//! vmgrid's benchmark suite (`scripts/bench`). Each comparison runs side by side in the same run,
//! so the ratio holds on a noisy machine. It prints a table and writes BENCHMARKS.md.
//!
//! It measures: trivial-job throughput through `vmgrid up` (2 nodes) against a single-node Slurm
//! started by `../shared/peers/slurm-up`; single-job latency on a warm pool; wasm against native
//! compute; a QEMU job against plain qemu-system; the scheduler engine with 1M jobs and 10k nodes;
//! and the coordinator's memory with 1M jobs queued. Benchmarks print figures; they assert nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmgrid_client::Client;
use vmgrid_proto::*;

struct Args {
    root: PathBuf,
    sizes: Vec<u64>,
    slurm: bool,
    out: PathBuf,
    latency_runs: usize,
    quick: bool,
    /// Run only these parts (pool, slurm, wasm, qemu, scheduler, rss, ssi, appliance); all when empty.
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
        out: root.join("BENCHMARKS.md"),
        root,
        sizes: vec![10_000, 100_000],
        slurm: true,
        latency_runs: 300,
        quick: false,
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.sizes = vec![2_000];
                a.latency_runs = 50;
                a.quick = true;
            }
            "--no-slurm" => a.slurm = false,
            "--sizes" => {
                a.sizes = it.next().expect("--sizes N,M").split(',').map(|s| s.parse().expect("a number")).collect()
            }
            "--out" => a.out = PathBuf::from(it.next().expect("--out FILE")),
            "--only" => a.only = it.next().expect("--only PART,PART").split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                println!(
                    "usage: vmgrid-bench [--quick] [--no-slurm] [--sizes 10000,100000] [--only pool,slurm,wasm,qemu,scheduler,rss,ssi,appliance] [--out BENCHMARKS.md]\nRun from the repository root after scripts/bench has built everything."
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("vmgrid-bench: unknown argument {other}; see --help");
                std::process::exit(2);
            }
        }
    }
    a
}

struct Report {
    rows: Vec<(String, String, String)>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, what: &str, value: String, target: &str) {
        println!("{what:<58} {value:>28}   (target {target})");
        self.rows.push((what.into(), value, target.into()));
    }
}

fn vmgrid_bin(root: &Path) -> PathBuf {
    root.join("target/release/vmgrid")
}

fn guest(root: &Path, name: &str) -> PathBuf {
    root.join(format!("guests/target/wasm32-wasip1/release/{name}.wasm"))
}

/// A `vmgrid up` pool in a temporary directory, stopped on drop.
struct Pool {
    child: Child,
    client: Client,
    _dir: PathBuf,
}

impl Pool {
    fn up(root: &Path, nodes: u32) -> Pool {
        let dir = std::env::temp_dir().join(format!("vmgrid-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new(vmgrid_bin(root))
            .args(["up", "--nodes", &nodes.to_string(), "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .stderr(Stdio::null())
            .spawn()
            .expect("start vmgrid up");
        let client = client_of(&dir);
        while client.nodes().map(|n| n.len() as u32).unwrap_or(0) < nodes {
            std::thread::sleep(Duration::from_millis(20));
        }
        Pool { child, client, _dir: dir }
    }

    fn completed(&self) -> u64 {
        let m = self.client.metrics().unwrap_or_default();
        m.lines()
            .find_map(|l| l.strip_prefix("vmgrid_jobs{state=\"completed\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A client for the pool whose data dir is `dir`, once its client.toml appears.
fn client_of(dir: &Path) -> Client {
    let config = dir.join("client.toml");
    loop {
        if let Ok(text) = std::fs::read_to_string(&config) {
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                    .map(|v| v.trim_end_matches('"').to_string())
            };
            if let (Some(p), Some(t)) = (get("pool"), get("token")) {
                return Client::new(&p, &t);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn trivial_spec(client: &Client, root: &Path) -> JobSpec {
    let image = client.upload_file(&guest(root, "probe"), "probe.wasm").expect("upload the probe guest");
    JobSpec {
        name: "trivial".into(),
        vm_type: "wasm".into(),
        image: Some(image),
        args: vec!["exit:0".into()],
        env: BTreeMap::new(),
        kernel: None,
        initrd: None,
        append: None,
        network: "none".into(),
        cpus: 1,
        memory_mb: 16,
        timeout_s: 60,
        disk_mb: 1,
        inputs: vec![],
        outputs: vec![],
        requirements: Some("\"wasm\" in node.vm_types".into()),
        rank: Some("node.free_cpus".into()),
        max_retries: 0,
        ssi: None,
    }
}

/// Jobs per second from submit to the last durable result.
fn vmgrid_throughput(pool: &Pool, spec: &JobSpec, n: u64) -> f64 {
    let before = pool.completed();
    let start = Instant::now();
    pool.client.submit(&SubmitRequest { spec: spec.clone(), count: n }).expect("submit the sweep");
    while pool.completed() < before + n {
        std::thread::sleep(Duration::from_millis(20));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn slurm(root: &Path, sizes: &[u64]) -> Result<BTreeMap<u64, f64>, String> {
    let peers = root.join("../shared/peers");
    if !peers.join("slurm-up").exists() {
        return Err(format!("{} not found", peers.display()));
    }
    let up = Command::new("bash").arg(peers.join("slurm-up")).output().map_err(|e| e.to_string())?;
    if !up.status.success() {
        return Err(format!("slurm-up failed: {}", String::from_utf8_lossy(&up.stderr).trim()));
    }
    let mut out = BTreeMap::new();
    for &n in sizes {
        let r = Command::new("bash")
            .arg(peers.join("slurm-throughput"))
            .arg(n.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&r.stdout);
        // "slurm: N jobs in X s = Y jobs/s"
        let rate = text.split('=').nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse::<f64>().ok());
        match rate {
            Some(r) => {
                out.insert(n, r);
            }
            None => return Err(format!("slurm-throughput printed {text:?} {}", String::from_utf8_lossy(&r.stderr))),
        }
    }
    let _ = Command::new("bash").arg(peers.join("slurm-down")).status();
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latency(pool: &Pool, spec: &JobSpec, runs: usize) -> (f64, f64) {
    let mut ms = Vec::with_capacity(runs);
    for i in 0..runs + 10 {
        let start = Instant::now();
        let ids = pool.client.submit(&SubmitRequest { spec: spec.clone(), count: 1 }).expect("submit").ids;
        let v = pool.client.wait(ids[0], Duration::from_secs(30)).expect("wait");
        assert_eq!(v.state, JobState::Completed);
        if i >= 10 {
            ms.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

fn time_cmd(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let st = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("run a benchmark command");
    assert!(st.success(), "{cmd:?} failed: {st}");
    start.elapsed().as_secs_f64()
}

fn wasm_vs_native(root: &Path) -> Result<(f64, f64), String> {
    let native = root.join("guests/target/release/compute");
    if !native.exists() {
        return Err("guests/target/release/compute is missing; run scripts/bench".into());
    }
    let dir = std::env::temp_dir().join("vmgrid-bench-compute");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let job = dir.join("compute.toml");
    std::fs::write(
        &job,
        format!(
            "[vm]\ntype = \"wasm\"\nimage = {:?}\nargs = [\"20000000\", \"5\"]\n[resources]\nmemory_mb = 256\ntimeout_s = 600\n",
            guest(root, "compute").to_str().unwrap()
        ),
    )
    .map_err(|e| e.to_string())?;
    let run_wasm = || time_cmd(Command::new(vmgrid_bin(root)).arg("run").arg(&job).arg("--out").arg(&dir));
    run_wasm(); // warm the module cache
    let (mut n, mut w) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        n = n.min(time_cmd(Command::new(&native).args(["20000000", "5"])));
        w = w.min(run_wasm());
    }
    Ok((n, w))
}

fn qemu_vs_plain(root: &Path) -> Result<(f64, f64), String> {
    let kit = root.join("guest-kit/out");
    let (kernel, initrd) = (kit.join("vmlinuz"), kit.join("initrd.gz"));
    if !kernel.exists() {
        return Err("guest-kit/out is missing; run scripts/bench".into());
    }
    let dir = std::env::temp_dir().join("vmgrid-bench-qemu");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("share")).map_err(|e| e.to_string())?;
    let job = dir.join("qemu.toml");
    std::fs::write(
        &job,
        format!(
            "[vm]\ntype = \"qemu\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 quiet\"\nargs = [\"true\"]\n[resources]\nmemory_mb = 256\ntimeout_s = 300\n",
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap()
        ),
    )
    .map_err(|e| e.to_string())?;
    let plain = |share: &Path| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"])
        .args(["-fsdev", &format!("local,id=job,path={},security_model=mapped-xattr", share.display())])
        .args(["-device", "virtio-9p-pci,fsdev=job,mount_tag=vmgrid", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 -- true"])
        .stdin(Stdio::null());
        c
    };
    let (mut p, mut v) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        p.push(time_cmd(&mut plain(&dir.join("share"))));
        v.push(time_cmd(
            Command::new(vmgrid_bin(root)).env("VMGRID_ACCEL", "tcg").arg("run").arg(&job).arg("--out").arg(&dir),
        ));
    }
    p.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((p[1], v[1]))
}

fn scheduler_engine() -> (f64, usize) {
    use vmgrid_scheduler::*;
    let nodes: Vec<NodeSlot> = (0..10_000)
        .map(|i| NodeSlot {
            ad: NodeAd {
                name: format!("n{i:05}"),
                arch: "x86_64".into(),
                os: "linux".into(),
                cpus: 128,
                memory_mb: 1 << 20,
                disk_mb: 1 << 20,
                vm_types: vec!["wasm".into(), "qemu".into()],
                accelerators: vec!["tcg".into()],
                labels: BTreeMap::from([("rack".to_string(), (i % 40).to_string())]),
                appliance: i % 10 == 0,
            },
            free_cpus: 128,
            free_memory_mb: 1 << 20,
            running_jobs: 0,
        })
        .collect();
    let clusters: std::collections::HashMap<u64, Cluster> = (0..100)
        .map(|k| {
            let req = format!(
                "node.memory_mb >= {} && \"wasm\" in node.vm_types && node.labels.rack != \"{}\"",
                512 * (k % 4 + 1),
                k % 40
            );
            (k, Cluster::compile("wasm", 1, 64, Some(&req), Some("node.free_cpus")).unwrap())
        })
        .collect();
    let jobs: Vec<IdleJob> = (0..1_000_000u64).map(|id| IdleJob { id, cluster: id % 100 }).collect();
    let mut slots = nodes.clone();
    let start = Instant::now();
    let d = place(&mut slots, &clusters, &jobs);
    let secs = start.elapsed().as_secs_f64();
    (d.placements.len() as f64 / secs, d.placements.len())
}

/// A `vmgrid coordinator` on a free loopback port with its data in `dir`, and an admin client.
fn coordinator(root: &Path, dir: &Path) -> Result<(Child, Client), String> {
    let child = Command::new(vmgrid_bin(root))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the coordinator: {e}"))?;
    Ok((child, client_of(dir)))
}

fn coordinator_rss(root: &Path) -> Result<(f64, f64), String> {
    let dir = std::env::temp_dir().join(format!("vmgrid-bench-rss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut child, client) = coordinator(root, &dir)?;
    let spec = trivial_spec(&client, root);
    let start = Instant::now();
    let r = client.submit(&SubmitRequest { spec, count: 1_000_000 });
    let submit_s = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    r.map_err(|e| e.to_string())?;
    Ok((rss_kb / 1024.0, submit_s))
}

/// The single-system image: a CPU-bound fan-out on 1 node and on 2 (each node agent pinned to
/// its own core, so "a node" is one core of this machine), and the cost of a remote open/close.
struct SsiFigures {
    one_node_s: f64,
    two_nodes_s: f64,
    open_us: f64,
    write_us: f64,
}

fn ssi_figures(root: &Path, limit: u64, parts: u32) -> Result<SsiFigures, String> {
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
    let console = |script: &str| -> Result<(f64, String), String> {
        let start = Instant::now();
        let mut c = Command::new(vmgrid_bin(root))
            .args(["ssi", "--pool", &url, "--token-file"])
            .arg(data.join("admin.token"))
            .arg("--root")
            .arg(&fsroot)
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
    };
    let mut nodes: Vec<Child> = Vec::new();
    let mut result = Err("not run".to_string());
    let fan = format!("run /fanout.wasm {parts} {limit}\n");
    let warm = format!("run /fanout.wasm {parts} 100000\n");
    for n in 1..=2u32 {
        let node = Command::new("taskset")
            .args(["-c", &(n - 1).to_string()])
            .arg(vmgrid_bin(root))
            .args(["node", "--pool", &url, "--name", &format!("core{n}"), "--cpus", "1", "--token-file"])
            .arg(data.join("pool.token"))
            .arg("--cache-dir")
            .arg(dir.join(format!("node{n}")))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("taskset: {e}"))?;
        nodes.push(node);
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

/// The grid appliance: the image's size in each format and its build time; one appliance booted
/// by firmware under QEMU (KVM by probe, else TCG): boot to joined, and power-off to gone.
struct ApplianceFigures {
    build_s: f64,
    sizes_mib: Vec<(String, f64)>,
    joined_s: f64,
    left_s: f64,
}

fn appliance_figures(root: &Path) -> Result<ApplianceFigures, String> {
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("vmgrid-bench-appliance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let images = dir.join("image");
    let start = Instant::now();
    let out = Command::new(vmgrid_bin(root))
        .args(["appliance", "build", "--out"])
        .arg(&images)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("appliance build: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let build_s = start.elapsed().as_secs_f64();
    let mut sizes_mib = Vec::new();
    for ext in ["img", "qcow2", "vmdk", "vdi"] {
        let len = std::fs::metadata(images.join(format!("vmgrid-appliance.{ext}"))).map_err(|e| e.to_string())?.len();
        sizes_mib.push((ext.to_string(), len as f64 / (1 << 20) as f64));
    }
    let data = dir.join("pool");
    let (mut coord, client) = coordinator(root, &data)?;
    let mut app = Command::new(vmgrid_bin(root))
        .args(["appliance", "start", "--pool", client.url(), "--token-file"])
        .arg(data.join("pool.token"))
        .arg("--image")
        .arg(images.join("vmgrid-appliance.qcow2"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = std::io::BufReader::new(app.stderr.take().expect("piped")).lines();
    let mut joined_s = None;
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        // "vmgrid: appliance NAME joined … (12.3 s after boot)"
        if line.contains(" joined ") {
            joined_s = line.rsplit_once('(').and_then(|(_, r)| r.split_whitespace().next()?.parse::<f64>().ok());
            break;
        }
    }
    let result = match joined_s {
        None => Err("the appliance never said it joined".to_string()),
        Some(joined_s) => {
            // SAFETY: signalling our own child, which we have not reaped yet.
            unsafe { libc::kill(app.id() as i32, libc::SIGTERM) };
            let asked = Instant::now();
            while client.nodes().map(|n| !n.is_empty()).unwrap_or(true) && asked.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(ApplianceFigures { build_s, sizes_mib, joined_s, left_s: asked.elapsed().as_secs_f64() })
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let _ = app.wait();
    let _ = coord.kill();
    let _ = coord.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args = parse_args();
    let root = args.root.clone();
    if !vmgrid_bin(&root).exists() {
        eprintln!("vmgrid-bench: {} is missing; run scripts/bench", vmgrid_bin(&root).display());
        std::process::exit(1);
    }
    let mut rep = Report { rows: Vec::new(), notes: Vec::new() };
    let machine = format!(
        "{} cores ({}), {} MiB, Linux {}",
        sh("nproc"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'"),
        sh("awk '/MemTotal/{print int($2/1024)}' /proc/meminfo"),
        sh("uname -r")
    );
    let date = sh("date -u +%Y-%m-%dT%H:%MZ");
    println!("vmgrid benchmarks, {date}\nmachine: {machine}\n");

    // Throughput and latency, on one warm pool.
    let mut ours = BTreeMap::new();
    if args.wants("pool") {
        let pool = Pool::up(&root, 2);
        let spec = trivial_spec(&pool.client, &root);
        vmgrid_throughput(&pool, &spec, 200); // warm up: module cache, connections
        for &n in &args.sizes {
            let rate = vmgrid_throughput(&pool, &spec, n);
            ours.insert(n, rate);
            rep.row(
                &format!("throughput, {n} trivial wasm jobs, vmgrid up (2 nodes)"),
                format!("{rate:.0} jobs/s"),
                ">= 10,000 jobs/s",
            );
        }
        let (p50, p99) = latency(&pool, &spec, args.latency_runs);
        rep.row(
            &format!("one trivial job, submit to result, warm pool (n={})", args.latency_runs),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
            "p50 <= 2 ms, p99 <= 10 ms",
        );
    }

    if args.slurm && args.wants("slurm") {
        // Slurm gets the smallest size only: at its rate the larger sweeps would take hours.
        let n = args.sizes[0];
        match slurm(&root, &[n]) {
            Ok(r) => {
                let theirs = r[&n];
                rep.row(
                    &format!("throughput, {n} trivial jobs, Slurm job array (1 node)"),
                    format!("{theirs:.1} jobs/s"),
                    "-",
                );
                if let Some(o) = ours.get(&n) {
                    rep.row(&format!("vmgrid / Slurm, {n} jobs, same run"), format!("{:.1}x", o / theirs), ">= 500x");
                }
            }
            Err(e) => {
                println!("slurm: not measured: {e}");
                rep.notes.push(format!("Slurm was not measured in this run: {e}"));
            }
        }
    }

    match if args.wants("wasm") { wasm_vs_native(&root) } else { Err("skipped (--only)".into()) } {
        Ok((n, w)) => rep.row(
            "wasm compute (sieve, 20M x5): vmgrid run / native",
            format!("{w:.2} s / {n:.2} s = {:.2}x", w / n),
            "<= 1.10x",
        ),
        Err(e) => rep.notes.push(format!("wasm compute not measured: {e}")),
    }
    match if args.wants("qemu") { qemu_vs_plain(&root) } else { Err("skipped (--only)".into()) } {
        Ok((p, v)) => rep.row(
            "QEMU guest-kit job: vmgrid run / plain qemu-system",
            format!("{v:.2} s / {p:.2} s = {:.2}x", v / p),
            "<= 1.10x",
        ),
        Err(e) => rep.notes.push(format!("QEMU not measured: {e}")),
    }
    if args.wants("scheduler") {
        let (rate, placed) = scheduler_engine();
        rep.row(
            "scheduler engine, 1M jobs x 10k nodes, CEL req + rank",
            format!("{rate:.0} placements/s ({placed})"),
            ">= 100,000/s",
        );
    }
    match if args.wants("rss") { coordinator_rss(&root) } else { Err("skipped (--only)".into()) } {
        Ok((mb, s)) => {
            rep.row("coordinator RSS with 1M jobs queued", format!("{mb:.0} MiB (submit {s:.1} s)"), "<= 1024 MiB")
        }
        Err(e) => rep.notes.push(format!("coordinator RSS not measured: {e}")),
    }

    let ssi = if args.wants("ssi") {
        ssi_figures(&root, if args.quick { 3_000_000 } else { 20_000_000 }, 8)
    } else {
        Err("skipped (--only)".into())
    };
    match ssi {
        Ok(f) => {
            rep.row(
                "ssi CPU-bound fan-out (8 children): 1 node / 2 nodes",
                format!("{:.2} s / {:.2} s = {:.2}x", f.one_node_s, f.two_nodes_s, f.one_node_s / f.two_nodes_s),
                ">= 1.8x",
            );
            rep.row(
                "ssi remote file, open+close (4 KiB, unchanged) / write+close",
                format!("{:.0} us / {:.0} us", f.open_us, f.write_us),
                "-",
            );
        }
        Err(e) => rep.notes.push(format!("ssi not measured: {e}")),
    }

    match if args.wants("appliance") { appliance_figures(&root) } else { Err("skipped (--only)".into()) } {
        Ok(f) => {
            let sizes: Vec<String> = f.sizes_mib.iter().map(|(e, m)| format!("{e} {m:.1}")).collect();
            rep.row("appliance image (release vmgrid inside), MiB", sizes.join(", "), "-");
            rep.row("appliance build time", format!("{:.1} s", f.build_s), "-");
            rep.row("appliance boot by firmware to joined (one appliance)", format!("{:.1} s", f.joined_s), "<= 60 s");
            rep.row("appliance power-off (SIGTERM) to gone from the pool", format!("{:.1} s", f.left_s), "-");
        }
        Err(e) => rep.notes.push(format!("appliance not measured: {e}")),
    }

    let mut md = format!(
        "# vmgrid benchmarks\n\nWritten by `scripts/bench` (crates/bench). Each comparison ran side by side in the same run.\n\n- date: {date}\n- machine: {machine}\n- commit: {}\n\n| figure | measured | target |\n|---|---|---|\n",
        sh("git rev-parse --short HEAD")
    );
    for (w, v, t) in &rep.rows {
        md.push_str(&format!("| {w} | {v} | {t} |\n"));
    }
    for n in &rep.notes {
        md.push_str(&format!("\n- {n}"));
    }
    md.push('\n');
    let analysis = root.join("crates/bench/ANALYSIS.md");
    if let Ok(text) = std::fs::read_to_string(&analysis) {
        md.push('\n');
        md.push_str(&text);
    }
    std::fs::write(&args.out, md).expect("write BENCHMARKS.md");
    println!("\nwrote {}", args.out.display());
}
