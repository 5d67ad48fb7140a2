//! A pool across machines, as network namespaces: the coordinator and each node in a namespace
//! of its own, joined by veth pairs to a bridge in a hub namespace, so that every connection
//! crosses a real (virtual) network and its links can be cut. Needs root (the tests create and
//! delete the namespaces); traffic stays inside them.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vmgrid_proto::{JobState, NodeState};

use crate::util::*;

const SUBNET: &str = "10.231.0";
const COORDINATOR: u8 = 1;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip(8), from iproute2");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A LAN of namespaces: a hub holding the bridge, and hosts `h1`, `h2`, … each with `eth0` at
/// 10.231.0.N. Dropping it deletes every namespace (and so every link) it made.
struct Lan {
    tag: String,
    hosts: Vec<u8>,
}

impl Lan {
    fn new() -> Lan {
        assert!(
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() } == 0,
            "the network-namespace tests create namespaces and must run as root"
        );
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!("vmg{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
        let lan = Lan { tag, hosts: Vec::new() };
        ip(&["netns", "add", &lan.hub()]);
        ip(&["-n", &lan.hub(), "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.hub(), "link", "set", "br0", "up"]);
        lan
    }

    fn hub(&self) -> String {
        format!("{}hub", self.tag)
    }

    fn ns(&self, n: u8) -> String {
        format!("{}h{n}", self.tag)
    }

    fn addr(n: u8) -> String {
        format!("{SUBNET}.{n}")
    }

    /// Adds host `n`, its link to the bridge up.
    fn host(&mut self, n: u8) {
        let (ns, port) = (self.ns(n), format!("{}p{n}", self.tag));
        ip(&["netns", "add", &ns]);
        self.hosts.push(n);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["link", "add", &port, "netns", &self.hub(), "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["-n", &self.hub(), "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", Lan::addr(n)), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    }

    /// Cuts host `n` off the LAN (its cable pulled, at the switch), or plugs it back in.
    fn set_link(&self, n: u8, up: bool) {
        ip(&["-n", &self.hub(), "link", "set", &format!("{}p{n}", self.tag), if up { "up" } else { "down" }]);
    }

    /// `vmgrid args…` in host `n`'s namespace, stderr to `log`.
    fn vmgrid(&self, n: u8, args: &[&str], log: &Path) -> Child {
        spawn_vmgrid_in(&self.ns(n), args, log)
    }

    /// Runs `f` on a thread that lives in host `n`'s namespace (so its sockets do).
    fn within<T: Send>(&self, n: u8, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.ns(n))).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread alone, with a namespace file we hold open.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in self.hosts.clone() {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.hub()]).status();
    }
}

/// A coordinator on host 1 and nodes on other hosts, all killed when dropped.
struct NetPool {
    lan: Lan,
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

impl NetPool {
    fn start() -> NetPool {
        let mut lan = Lan::new();
        lan.host(COORDINATOR);
        let dir = tempfile::tempdir().unwrap();
        let mut pool = NetPool { lan, dir, children: Vec::new() };
        let data = pool.data().display().to_string();
        let listen = format!("{}:7800", Lan::addr(COORDINATOR));
        let c = pool.lan.vmgrid(
            COORDINATOR,
            &[
                "coordinator",
                "--listen",
                &listen,
                "--data-dir",
                &data,
                "--lease-ttl-ms",
                "1500",
                "--node-ttl-ms",
                "1500",
            ],
            &pool.log("coordinator"),
        );
        pool.children.push(("coordinator".into(), c));
        wait_until("the coordinator to write its CA and token", || {
            pool.data().join("ca.pem").is_file() && pool.data().join("admin.token").is_file()
        });
        wait_until("the coordinator to answer across the LAN", || pool.admin_on(COORDINATOR).nodes().is_ok());
        pool
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("https://{}:7800", Lan::addr(COORDINATOR))
    }

    fn log(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!("{what}.log"))
    }

    fn log_text(&self, what: &str) -> String {
        std::fs::read_to_string(self.log(what)).unwrap_or_default()
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data().join("ca.pem")).unwrap()
    }

    fn client_with_ca(&self, ca_pem: &str) -> vmgrid_client::Client {
        let token = std::fs::read_to_string(self.data().join("admin.token")).unwrap();
        vmgrid_client::Client::with_trust(&self.url(), &token, vmgrid_client::Trust::pool_ca(ca_pem).unwrap())
    }

    /// The admin's client; use it inside [`Lan::within`].
    fn admin_on(&self, n: u8) -> AdminOn<'_> {
        AdminOn(self, n)
    }

    /// A node on host `n`, given what a node's owner would be given: the pool token and the CA
    /// (`ca_pem`, normally the pool's), in a directory of its own.
    fn start_node(&mut self, n: u8, name: &str, ca_pem: &str) {
        self.lan.host(n);
        let home = self.dir.path().join(format!("node-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::copy(self.data().join("pool.token"), home.join("pool.token")).unwrap();
        std::fs::write(home.join("ca.pem"), ca_pem).unwrap();
        let (token, cache) = (home.join("pool.token").display().to_string(), home.join("cache").display().to_string());
        let args = [
            "node",
            "--pool",
            &self.url(),
            "--name",
            name,
            "--cpus",
            "1",
            "--token-file",
            &token,
            "--cache-dir",
            &cache,
        ];
        let child = self.lan.vmgrid(n, &args, &self.log(name));
        self.children.push((name.into(), child));
    }

    fn node_state(&self, name: &str) -> Option<NodeState> {
        let nodes = self.admin_on(COORDINATOR).nodes().unwrap();
        nodes.iter().find(|v| v.ad.name == name).map(|v| v.state)
    }

    fn job(&self, id: u64) -> vmgrid_proto::JobView {
        self.admin_on(COORDINATOR).job(id)
    }
}

impl Drop for NetPool {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The admin's client, run in host N's namespace.
struct AdminOn<'a>(&'a NetPool, u8);

impl AdminOn<'_> {
    fn run<T: Send>(&self, f: impl FnOnce(&vmgrid_client::Client) -> T + Send) -> T {
        let client = self.0.client_with_ca(&self.0.ca_pem());
        self.0.lan.within(self.1, || f(&client))
    }

    fn nodes(&self) -> vmgrid_client::Result<Vec<vmgrid_proto::NodeView>> {
        self.run(|c| c.nodes())
    }

    fn job(&self, id: u64) -> vmgrid_proto::JobView {
        self.run(|c| c.job(id)).unwrap().job
    }

    fn submit_probe(&self, args: &[&str]) -> u64 {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.run(|c| {
            let image = c.upload_file(&guest_wasm("probe"), "probe.wasm").unwrap();
            let spec: vmgrid_proto::JobSpec = serde_json::from_value(serde_json::json!({
                "name": "net", "vm_type": "wasm", "image": image, "args": args,
                "cpus": 1, "memory_mb": 64, "timeout_s": 120, "disk_mb": 16,
            }))
            .unwrap();
            c.submit(&vmgrid_proto::SubmitRequest { spec, count: 1 }).unwrap().ids[0]
        })
    }
}

#[test]
fn a_pool_across_namespaces_speaks_tls_and_a_node_or_client_with_another_ca_is_refused() {
    let mut pool = NetPool::start();
    let ca = pool.ca_pem();
    pool.start_node(2, "good", &ca);
    wait_until("the node to join over TLS", || pool.node_state("good") == Some(NodeState::Ready));
    // A client on a third machine submits; the job runs on the node and its output comes back.
    pool.lan.host(3);
    let id = pool.admin_on(3).submit_probe(&["args", "across the LAN"]);
    wait_until("the job to complete", || pool.job(id).state == JobState::Completed);
    let stdout = pool.admin_on(3).run(|c| {
        let r = c.job(id).unwrap();
        let dest = tempfile::NamedTempFile::new().unwrap();
        c.fetch_file(&r.stdout.unwrap(), dest.path()).unwrap();
        std::fs::read_to_string(dest.path()).unwrap()
    });
    assert_eq!(stdout, "across the LAN\n");
    assert_eq!(pool.job(id).node.as_deref(), Some("good"));

    // Another pool's CA: the node does not join, and says why.
    let other = vmgrid_tls::Ca::generate().unwrap();
    pool.start_node(4, "wrongca", other.cert_pem());
    wait_until("the node to say its pool's certificate is not trusted", || {
        pool.log_text("wrongca").contains("not one this client trusts")
    });
    assert_eq!(pool.node_state("wrongca"), None);
    // Nor does a client with it get anywhere, and it says why too.
    let client = pool.client_with_ca(other.cert_pem());
    let e = pool.lan.within(3, || client.nodes()).unwrap_err();
    assert!(e.to_string().contains("not one this client trusts"), "{e}");
    // Plain HTTP to the coordinator's port gets nothing.
    let token = std::fs::read_to_string(pool.data().join("admin.token")).unwrap();
    let plain = vmgrid_client::Client::new(&pool.url().replace("https://", "http://"), &token);
    assert!(pool.lan.within(3, || plain.nodes()).is_err(), "the coordinator answered plain HTTP");
}

#[test]
fn a_node_cut_off_the_network_is_fenced_its_job_reruns_and_its_late_result_is_refused() {
    let mut pool = NetPool::start();
    let ca = pool.ca_pem();
    pool.start_node(2, "a", &ca);
    wait_until("node a to join", || pool.node_state("a") == Some(NodeState::Ready));
    let id = pool.admin_on(COORDINATOR).submit_probe(&["sleep:6000", "args", "ran"]);
    wait_until("the job to run on a", || pool.job(id).state == JobState::Running);
    pool.start_node(3, "b", &ca);
    wait_until("node b to join", || pool.node_state("b") == Some(NodeState::Ready));

    // Pull a's cable: its lease expires, and b reruns the job.
    pool.lan.set_link(2, false);
    wait_until("the job to complete on b", || {
        let v = pool.job(id);
        v.state == JobState::Completed && v.node.as_deref() == Some("b")
    });
    // Plug it back in once its run has ended: its result for the old lease is refused, and it
    // joins again.
    std::thread::sleep(Duration::from_secs(4));
    pool.lan.set_link(2, true);
    let refused = || {
        let metrics = pool.admin_on(COORDINATOR).run(|c| c.metrics()).unwrap();
        metrics.lines().any(|l| l.starts_with("vmgrid_results_refused_total") && !l.ends_with(" 0"))
    };
    wait_until("a's late result to be refused", refused);
    wait_until("a to rejoin", || pool.node_state("a") == Some(NodeState::Ready));
    let v = pool.job(id);
    assert_eq!((v.state, v.node.as_deref(), v.exit_code, v.attempts), (JobState::Completed, Some("b"), Some(0), 2));
}
