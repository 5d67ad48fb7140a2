//! The grid appliance, end to end: `vmgrid appliance build` makes the image in four formats, and
//! two appliances boot from it through the BIOS (no -kernel) under QEMU, join a coordinator on
//! this host next to one ordinary node, run jobs that require `node.appliance`, take a job
//! submitted at one's console, reach each other over the pool's overlay (`--network grid`), and
//! leave: one by power-off (at once), one by a hard kill (its leases expire and its job finishes
//! on the host node).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmgrid_proto::{JobState, NodeState};

use crate::util::*;

const FORMATS: [(&str, &str); 4] = [("raw", "img"), ("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vdi", "vdi")];
/// The bound from issue #5 on boot-to-joined under TCG.
const JOIN_BOUND: Duration = Duration::from_secs(60);

/// The appliance image in all four formats, built once per test run from the vmgrid under test.
fn images() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = repo_root().join("target/appliance-test");
            let started = Instant::now();
            let res = vmgrid().args(["appliance", "build", "--out"]).arg(&out).output().unwrap();
            assert_eq!(res.status.code(), Some(0), "appliance build: {}", stderr_of(&res));
            eprintln!("appliance: image built in {:.1} s", started.elapsed().as_secs_f64());
            out
        })
        .clone()
}

/// The image checks (which build a second image) and the boots take turns, so the boot-to-joined
/// time measured is the appliances', not a build's competing for the same cores.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn image(ext: &str) -> PathBuf {
    images().join(format!("vmgrid-appliance.{ext}"))
}

#[test]
fn the_image_is_built_in_four_formats_that_qemu_img_reads() {
    let _turn = one_at_a_time();
    let raw_size = std::fs::metadata(image("img")).unwrap().len();
    for (format, ext) in FORMATS {
        let p = image(ext);
        let out = Command::new("qemu-img").args(["info", "--output=json"]).arg(&p).output().unwrap();
        assert!(out.status.success(), "qemu-img info {}: {}", p.display(), stderr_of(&out));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["format"], format, "{info}");
        assert_eq!(info["virtual-size"], raw_size, "{format}: the same disk in every format");
        let file = std::fs::metadata(&p).unwrap().len();
        eprintln!(
            "appliance: {format:<5} virtual {:.1} MiB, file {:.1} MiB",
            raw_size as f64 / 1048576.0,
            file as f64 / 1048576.0
        );
    }
    // The raw disk: an MBR with boot code and one active FAT16 partition at 1 MiB, holding the
    // boot loader, the kernel and the initramfs.
    let disk = std::fs::read(image("img")).unwrap();
    assert_eq!(&disk[510..512], &[0x55, 0xaa]);
    assert!(disk[..440].iter().any(|&b| b != 0), "boot code in the MBR");
    assert_eq!(disk[446], 0x80, "the partition is active");
    assert_eq!(disk[450], 0x0e, "FAT16 (LBA)");
    assert_eq!(u32::from_le_bytes(disk[454..458].try_into().unwrap()), 2048);
    let sectors = u32::from_le_bytes(disk[458..462].try_into().unwrap()) as usize;
    assert_eq!(2048 * 512 + sectors * 512, disk.len(), "the partition fills the disk");
    let listing = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@1M", image("img").display()))
        .args(["-a", "-b", "::/"])
        .output()
        .unwrap();
    let listing = stdout_of(&listing).to_lowercase();
    for f in ["ldlinux.sys", "ldlinux.c32", "syslinux.cfg", "vmlinuz", "initrd.gz"] {
        assert!(listing.contains(f), "{f} on the boot partition: {listing}");
    }
    // Reproducible: the same inputs give the same bytes (vmdk and vdi add random disk ids).
    let again = tempfile::tempdir().unwrap();
    let res = vmgrid().args(["appliance", "build", "--format", "raw", "--out"]).arg(again.path()).output().unwrap();
    assert_eq!(res.status.code(), Some(0), "{}", stderr_of(&res));
    assert!(std::fs::read(again.path().join("vmgrid-appliance.img")).unwrap() == disk, "a second build differs");
}

#[test]
fn config_writes_a_floppy_with_the_pool_and_refuses_bad_input() {
    let d = JobDir::new();
    let token = d.write("pool.token", "pool-secret\n");
    let user = d.write("user.token", "user-secret\n");
    let disk = d.path().join("config.img");
    let out = vmgrid()
        .args(["appliance", "config", "--pool", "http://grid.example.org:7800", "--token-file"])
        .arg(&token)
        .arg("--user-token-file")
        .arg(&user)
        .args(["--label", "site=lab", "--out"])
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1440 * 1024, "a 1.44 MB floppy");
    let text =
        Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&disk).arg("::vmgrid.toml").output().unwrap();
    let text = stdout_of(&text);
    for want in [
        "pool = \"http://grid.example.org:7800\"",
        "token = \"pool-secret\"",
        "user_token = \"user-secret\"",
        "site = \"lab\"",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    // A loopback URL is written as given, with a warning that the VM cannot reach it.
    let out = vmgrid()
        .args(["appliance", "config", "--pool", "http://127.0.0.1:7800", "--token-file"])
        .arg(&token)
        .arg("--out")
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr_of(&out).contains("10.0.2.2"), "{}", stderr_of(&out));

    let missing = d.path().join("nope.token");
    let out = vmgrid()
        .args(["appliance", "config", "--pool", "http://x:1", "--token-file"])
        .arg(&missing)
        .arg("--out")
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("cannot read the token file"), "{}", stderr_of(&out));
    let out = vmgrid()
        .args(["appliance", "config", "--pool", "ftp://x:1", "--token-file"])
        .arg(&token)
        .arg("--out")
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("http://"), "{}", stderr_of(&out));
    let out = vmgrid()
        .args(["appliance", "start", "--pool", "http://127.0.0.1:1", "--token-file"])
        .arg(&token)
        .arg("--image")
        .arg(d.path().join("missing.qcow2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("vmgrid appliance build"), "{}", stderr_of(&out));
    let out = vmgrid().args(["appliance", "build", "--format", "iso", "--out"]).arg(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("raw, qcow2, vmdk, vdi"), "{}", stderr_of(&out));
}

/// One `vmgrid appliance start` process, its console (when attached) and its stderr.
struct Appliance {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

fn read_into(from: impl std::io::Read + Send + 'static, to: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            to.lock().unwrap().push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
}

impl Appliance {
    fn start(pool: &Pool, name: &str, image: &Path, user_token: Option<&Path>, console: bool) -> Appliance {
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"));
        cmd.args(["appliance", "start", "--pool", &pool.url, "--name", name, "--cpus", "1", "--memory-mb", "1024"])
            .arg("--token-file")
            .arg(pool.data_dir().join("pool.token"))
            .arg("--image")
            .arg(image)
            .args(["--drain-timeout-s", "10", "--network", "grid", "--state-dir"])
            .arg(pool.dir.path().join(format!("appliance-{name}")))
            .env("VMGRID_CACHE_DIR", repo_root().join("target/test-cache"))
            .stdin(if console { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = user_token {
            cmd.arg("--user-token-file").arg(t);
        }
        if console {
            cmd.arg("--console");
        }
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap();
        let (console, stderr) = (Arc::new(Mutex::new(String::new())), Arc::new(Mutex::new(String::new())));
        read_into(child.stdout.take().unwrap(), console.clone());
        read_into(child.stderr.take().unwrap(), stderr.clone());
        Appliance { name: name.into(), stdin: child.stdin.take(), child, console, stderr, started }
    }

    fn console_log(&self, pool: &Pool) -> String {
        std::fs::read_to_string(pool.dir.path().join(format!("appliance-{}/console.log", self.name)))
            .unwrap_or_default()
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn diagnostics(&self, pool: &Pool) -> String {
        format!(
            "--- {} stderr:\n{}\n--- console:\n{}",
            self.name,
            self.stderr.lock().unwrap(),
            tail(&self.console_log(pool), 3000)
        )
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The node's address on the overlay, as the pool gave it.
fn overlay_addr(pool: &Pool, name: &str) -> Option<std::net::Ipv4Addr> {
    let nodes = pool.admin().nodes().unwrap();
    nodes.into_iter().find(|n| n.ad.name == name)?.ad.overlay?.addr
}

fn node_state(pool: &Pool, name: &str) -> Option<(NodeState, bool)> {
    pool.admin().nodes().unwrap().into_iter().find(|n| n.ad.name == name).map(|n| (n.state, n.ad.appliance))
}

/// A hello-world WASI module in text form, short enough to type at a console.
const HELLO_WAT: &str = r#"(module
(import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
(memory (export "memory") 1)
(data (i32.const 16) "hello from the appliance console\n")
(func (export "_start")
(i32.store (i32.const 0) (i32.const 16))
(i32.store (i32.const 4) (i32.const 33))
(drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Both appliances were started with `--network grid`: each has an address of the nodes' part
/// of the overlay (the ordinary node none), and app-a's console reaches app-b's address over
/// the overlay, through each appliance's own QEMU user-mode NAT (relayed by the pool when the
/// NATs give no direct path); `vmgrid net` says which path.
fn overlay_between_appliances(pool: &Pool, a: &mut Appliance) {
    let (Some(addr_a), Some(addr_b)) = (overlay_addr(pool, "app-a"), overlay_addr(pool, "app-b")) else {
        panic!("an appliance started with --network grid has no overlay address: {:?}", pool.admin().nodes());
    };
    assert_ne!(addr_a, addr_b);
    assert!(vmgrid_proto::overlay::is_node_addr(addr_a) && vmgrid_proto::overlay::is_node_addr(addr_b));
    assert_eq!(overlay_addr(pool, "host"), None, "a node not started on the overlay has no address");
    let started = Instant::now();
    a.type_line(&format!("ip -4 addr show vmgrid0; ping -c 3 -W 5 {addr_b}; echo ping\"\"-exit=$?"));
    let done = poll_until(Duration::from_secs(90), || a.console.lock().unwrap().contains("ping-exit="));
    let console = a.console.lock().unwrap().clone();
    assert!(done, "no answer at the console:\n{}", tail(&console, 3000));
    assert!(console.contains(&format!("inet {addr_a}/16")), "app-a's vmgrid0:\n{}", tail(&console, 3000));
    assert!(console.contains("ping-exit=0"), "app-a cannot reach app-b over the overlay:\n{}", tail(&console, 3000));
    let out = pool.cli().args(["net", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let net: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = net.as_array().unwrap().iter().find(|v| v["node"] == "app-a").and_then(|v| {
        v["paths"].as_array()?.iter().find(|p| p["node"] == "app-b").map(|p| p["path"].as_str().unwrap().to_string())
    });
    assert!(matches!(path.as_deref(), Some("direct" | "relay")), "app-a to app-b: {path:?}\n{net}");
    eprintln!(
        "appliance: app-a ({addr_a}) pinged app-b ({addr_b}) over the overlay ({}) in {:.1} s",
        path.unwrap(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn two_appliances_join_run_jobs_take_a_console_job_and_leave() {
    let (qcow2, raw) = (image("qcow2"), image("img"));
    let _turn = one_at_a_time();
    let test_started = Instant::now();
    let mut pool = Pool::start();
    pool.start_node("host", 1);
    let d = JobDir::new();
    let out = pool.cli().args(["token", "alice"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let alice = d.write("alice.token", stdout_of(&out).trim());

    // Boot both, one from the qcow2 image with its console attached, one from the raw image.
    let mut a = Appliance::start(&pool, "app-a", &qcow2, Some(&alice), true);
    let b = Appliance::start(&pool, "app-b", &raw, None, false);
    let mut joined: [Option<Duration>; 2] = [None, None];
    let all_joined = poll_until(JOIN_BOUND + Duration::from_secs(30), || {
        for (i, app) in [&a, &b].into_iter().enumerate() {
            if joined[i].is_none() && node_state(&pool, &app.name) == Some((NodeState::Ready, true)) {
                joined[i] = Some(app.started.elapsed());
            }
        }
        joined.iter().all(Option::is_some)
    });
    assert!(all_joined, "the appliances did not join:\n{}\n{}", a.diagnostics(&pool), b.diagnostics(&pool));
    for (app, t) in [&a, &b].into_iter().zip(joined) {
        let t = t.unwrap();
        eprintln!("appliance: {} boot-to-joined {:.1} s", app.name, t.as_secs_f64());
        assert!(t <= JOIN_BOUND, "{} took {:.1} s to join (bound: 60 s)", app.name, t.as_secs_f64());
    }
    assert!(a.stderr.lock().unwrap().contains("the appliance reaches it as https://10.0.2.2:"));
    assert!(
        poll_until(Duration::from_secs(10), || b.stderr.lock().unwrap().contains("app-b joined")),
        "{}",
        b.diagnostics(&pool)
    );

    // Jobs that require an appliance run on the appliances only: a process VM in a system VM.
    let job = probe_job_file(
        d.path(),
        "on-appliance",
        &["env:IDX", "sleep:500"],
        "env = { IDX = \"i{index}\" }\n[policy]\nrequirements = 'node.appliance'\n",
    );
    let started = Instant::now();
    let out = pool.cli().arg("submit").arg(&job).args(["--count", "4", "--wait"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}\n{}\n{}", stderr_of(&out), a.diagnostics(&pool), b.diagnostics(&pool));
    eprintln!(
        "appliance: 4 wasm jobs (first ones compile the module under TCG) done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ids = ids_of(&out);
    for id in &ids {
        let j = pool.job(*id);
        assert_eq!(j.state, JobState::Completed, "{j:?}");
        assert_eq!(j.exit_code, Some(0));
        assert!(j.node.as_deref().is_some_and(|n| n.starts_with("app-")), "ran on an appliance: {j:?}");
        eprintln!(
            "appliance:   job {id} on {}: {} ms from submit to result",
            j.node.as_deref().unwrap_or("?"),
            j.finished_ms.unwrap_or(j.submitted_ms) - j.submitted_ms
        );
    }
    let out = pool.cli().args(["logs", &ids[3].to_string()]).output().unwrap();
    assert_eq!(stdout_of(&out), "i3\n");
    // A warm job: the module is compiled and cached on both appliances by now.
    let one = probe_job_file(d.path(), "warm", &["exit:0"], "[policy]\nrequirements = 'node.appliance'\n");
    let out = pool.cli().arg("submit").arg(&one).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let j = pool.job(ids_of(&out)[0]);
    eprintln!(
        "appliance: one wasm job on {} took {} ms from submit to result",
        j.node.as_deref().unwrap_or("?"),
        j.finished_ms.unwrap() - j.submitted_ms
    );

    // A person at app-a's console writes a job and submits it with the CLI there, as alice.
    let console_started = Instant::now();
    a.type_line("cd /tmp && cat > hello.wat <<'EOF'");
    for line in HELLO_WAT.lines() {
        a.type_line(line);
    }
    a.type_line("EOF");
    a.type_line("printf 'name = \"console-hello\"\\n[vm]\\ntype = \"wasm\"\\nimage = \"hello.wat\"\\n' > hello.toml");
    // The quotes keep the echoed command line from matching what the test waits for.
    a.type_line("id=$(vmgrid submit hello.toml) && vmgrid wait $id && vmgrid logs $id; echo console\"\"-exit=$?");
    let done = poll_until(Duration::from_secs(60), || a.console.lock().unwrap().contains("console-exit="));
    let console = a.console.lock().unwrap().clone();
    assert!(done, "no answer at the console:\n{}", tail(&console, 3000));
    assert!(console.contains("console-exit=0"), "{}", tail(&console, 3000));
    assert!(
        // The job's stdout, after `wait`'s progress line (the typed WAT line ends in `\n")`).
        console.lines().any(|l| l.trim_end_matches('\r').ends_with("hello from the appliance console")),
        "{}",
        tail(&console, 3000)
    );
    let jobs = pool.admin().jobs().unwrap();
    let hello = jobs.iter().find(|j| j.name == "console-hello").expect("the console's job is in the pool");
    assert_eq!((hello.owner.as_str(), hello.state), ("alice", JobState::Completed));
    eprintln!(
        "appliance: console job submitted and completed on {} in {:.1} s",
        hello.node.as_deref().unwrap_or("?"),
        console_started.elapsed().as_secs_f64()
    );
    overlay_between_appliances(&pool, &mut a);

    // Power app-a off (SIGTERM to `appliance start`): it drains, deregisters, and is gone from
    // the pool at once, rather than lingering until it is declared lost.
    let off = Instant::now();
    a.signal(libc::SIGTERM);
    let mut seen_lost = false;
    let left = poll_until(Duration::from_secs(30), || match node_state(&pool, "app-a") {
        None => true,
        Some((s, _)) => {
            seen_lost |= s == NodeState::Lost;
            false
        }
    });
    assert!(left, "app-a did not leave the pool:\n{}", a.diagnostics(&pool));
    assert!(!seen_lost, "app-a deregistered; it was not lost");
    eprintln!("appliance: app-a left the pool {:.1} s after power-off", off.elapsed().as_secs_f64());
    let exited = poll_until(Duration::from_secs(30), || a.child.try_wait().unwrap().is_some());
    assert!(exited, "app-a's QEMU did not power off:\n{}", a.diagnostics(&pool));
    assert_eq!(a.child.wait().unwrap().code(), Some(0), "{}", a.diagnostics(&pool));
    assert!(a.stderr.lock().unwrap().contains("app-a powered off"), "{}", a.diagnostics(&pool));
    assert!(a.console_log(&pool).contains("vmgrid-appliance: left the pool as app-a"), "{}", a.diagnostics(&pool));

    // Kill app-b while it runs a job that prefers appliances: its lease expires and the job
    // finishes on the host node.
    let job = probe_job_file(
        d.path(),
        "survivor",
        &["sleep:6000", "exit:0"],
        "[policy]\nrank = 'node.appliance ? 1 : 0'\nmax_retries = 2\n",
    );
    let granted = || {
        let m = pool.admin().metrics().unwrap();
        m.lines().find_map(|l| l.strip_prefix("vmgrid_leases_granted_total ")?.trim().parse::<u64>().ok()).unwrap()
    };
    let granted_before = granted();
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];
    pool.wait_for("the job running on app-b", |p| {
        let j = p.job(id);
        j.state == JobState::Running && j.node.as_deref() == Some("app-b")
    });
    // Placed is not enough: app-b must hold the lease, so that killing it loses a running job.
    wait_until("app-b to take the lease", || granted() > granted_before);
    let killed = Instant::now();
    let mut b = b;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    pool.wait_for("app-b to be lost", |p| node_state(p, "app-b").is_some_and(|(s, _)| s == NodeState::Lost));
    pool.wait_for("the job to finish on the host node", |p| {
        let j = p.job(id);
        j.state == JobState::Completed && j.node.as_deref() == Some("host")
    });
    let j = pool.job(id);
    assert_eq!(j.exit_code, Some(0));
    assert!(j.attempts >= 2, "{j:?}");
    eprintln!(
        "appliance: app-b killed; its job finished on the host node {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    eprintln!("appliance: end-to-end test took {:.1} s", test_started.elapsed().as_secs_f64());
}
