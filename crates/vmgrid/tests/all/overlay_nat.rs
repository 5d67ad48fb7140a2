//! The overlay across NATs, as network namespaces: two sites, each a node behind a home-router
//! namespace that masquerades (iptables MASQUERADE) and takes no unsolicited traffic, and the
//! coordinator in a third namespace on the "internet" between them. A 2-VM job group talks TCP
//! across the sites directly (UDP hole punching with the endpoints the pool's reflector saw), then,
//! with UDP between the sites blocked, through the pool's relay. Needs root (the test creates and
//! deletes the namespaces); every address lives inside them, and all of them go when it ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use vmgrid_proto::NodeState;
use vmgrid_proto::overlay::Path as NetPath;

use crate::overlay::{assert_exchanged, path_between, run_group, talk_job};
use crate::util::*;

const WAN: &str = "10.232.0";

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(out.status.success(), "{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The namespaces: `wan` (a bridge: the internet), `c` (the coordinator, 10.232.0.1), and per
/// site `r?` (its router: 10.232.0.1x outside, 192.168.1x.1 inside) and `n?` (its node,
/// 192.168.1x.2). Dropping it stops the processes, then deletes every namespace it made.
struct Sites {
    tag: String,
    made: Vec<String>,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Sites {
    fn new() -> Sites {
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the NAT test creates network namespaces and must run as root");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!("vo{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
        let mut s = Sites { tag, made: Vec::new(), dir: tempfile::tempdir().unwrap(), children: Vec::new() };
        let wan = s.add("wan");
        run(&["ip", "-n", &wan, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &wan, "link", "set", "br0", "up"]);
        s.on_wan("c", &format!("{WAN}.1"));
        for (site, n) in [("a", 11), ("b", 12)] {
            s.site(site, n);
        }
        s
    }

    fn ns(&self, what: &str) -> String {
        format!("{}{what}", self.tag)
    }

    fn add(&mut self, what: &str) -> String {
        let ns = self.ns(what);
        run(&["ip", "netns", "add", &ns]);
        self.made.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Namespace `what` with `eth0` at `addr` on the internet's bridge.
    fn on_wan(&mut self, what: &str, addr: &str) {
        let ns = self.add(what);
        let port = self.ns(what);
        run(&[
            "ip",
            "link",
            "add",
            &port,
            "netns",
            &self.ns("wan"),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        run(&["ip", "-n", &self.ns("wan"), "link", "set", &port, "master", "br0", "up"]);
        run(&["ip", "-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
    }

    /// A site: its router (masquerading its LAN, dropping unsolicited input) and its node's host.
    fn site(&mut self, site: &str, n: u8) {
        let router = format!("r{site}");
        self.on_wan(&router, &format!("{WAN}.{n}"));
        let (r, host) = (self.ns(&router), self.add(&format!("n{site}")));
        run(&["ip", "link", "add", "lan0", "netns", &r, "type", "veth", "peer", "name", "eth0", "netns", &host]);
        run(&["ip", "-n", &r, "addr", "add", &format!("192.168.{n}.1/24"), "dev", "lan0"]);
        run(&["ip", "-n", &r, "link", "set", "lan0", "up"]);
        run(&["ip", "-n", &host, "addr", "add", &format!("192.168.{n}.2/24"), "dev", "eth0"]);
        run(&["ip", "-n", &host, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &host, "route", "add", "default", "via", &format!("192.168.{n}.1")]);
        run(&["ip", "netns", "exec", &r, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        run(&[
            "ip",
            "netns",
            "exec",
            &r,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "eth0",
            "-j",
            "MASQUERADE",
        ]);
        run(&["ip", "netns", "exec", &r, "iptables", "-A", "INPUT", "-i", "eth0", "-j", "DROP"]);
    }

    /// Each router drops UDP to the other site: only the coordinator is reachable over UDP.
    fn block_udp_between_sites(&self) {
        for (site, other) in [("a", 12), ("b", 11)] {
            let r = self.ns(&format!("r{site}"));
            let to = format!("{WAN}.{other}");
            run(&[
                "ip", "netns", "exec", &r, "iptables", "-I", "FORWARD", "-o", "eth0", "-p", "udp", "-d", &to, "-j",
                "DROP",
            ]);
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!("{what}.log"))
    }

    fn spawn(&mut self, what: &str, args: &[&str], log: &Path) {
        let child = spawn_vmgrid_in(&self.ns(what), args, log);
        self.children.push(child);
    }

    /// The CLI, run on the coordinator's host as the admin.
    fn cli(&self) -> assert_cmd::Command {
        let mut c = assert_cmd::Command::new("ip");
        c.args(["netns", "exec", &self.ns("c")]).arg(assert_cmd::cargo::cargo_bin("vmgrid"));
        c.env("VMGRID_CONFIG", self.data().join("client.toml")).env_remove("VMGRID_POOL").env_remove("VMGRID_TOKEN");
        c
    }

    fn start_pool(&mut self) {
        let data = self.data().display().to_string();
        let listen = format!("{WAN}.1:7800");
        self.spawn("c", &["coordinator", "--listen", &listen, "--data-dir", &data], &self.log("coordinator"));
        wait_until("the coordinator to write its CA and tokens", || self.data().join("client.toml").is_file());
        for site in ["a", "b"] {
            let home = self.dir.path().join(format!("node-{site}"));
            std::fs::create_dir_all(&home).unwrap();
            std::fs::copy(self.data().join("pool.token"), home.join("pool.token")).unwrap();
            std::fs::copy(self.data().join("ca.pem"), home.join("ca.pem")).unwrap();
            let (token, cache) = (home.join("pool.token"), home.join("cache"));
            let (token, cache, url) =
                (token.display().to_string(), cache.display().to_string(), format!("https://{listen}"));
            let name = format!("site-{site}");
            let args =
                ["node", "--pool", &url, "--name", &name, "--cpus", "1", "--token-file", &token, "--cache-dir", &cache];
            self.spawn(&format!("n{site}"), &args, &self.log(&name));
        }
        wait_until("both nodes to join through their NATs", || {
            let out = self.cli().args(["status", "--json"]).output().unwrap();
            let nodes: Vec<vmgrid_proto::NodeView> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            nodes.iter().filter(|n| n.state == NodeState::Ready).count() == 2
        });
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn vms_behind_two_nats_talk_directly_and_through_the_relay_when_udp_between_the_sites_is_blocked() {
    let kit = guest_kit();
    let mut sites = Sites::new();
    sites.start_pool();
    let d = JobDir::new();
    let job = talk_job(&d, &kit);

    let got = run_group(|| sites.cli(), &job, &d.path().join("direct"));
    assert_exchanged(&got);
    let path = path_between(|| sites.cli(), "site-a", "site-b");
    assert_eq!(path, Some(NetPath::Direct), "the NATs were punched through; node logs: {}", logs(&sites));

    sites.block_udp_between_sites();
    let got = run_group(|| sites.cli(), &job, &d.path().join("relayed"));
    assert_exchanged(&got);
    let path = path_between(|| sites.cli(), "site-a", "site-b");
    assert_eq!(path, Some(NetPath::Relay), "with UDP between the sites blocked; node logs: {}", logs(&sites));
    let text = stdout_of(&sites.cli().arg("net").output().unwrap());
    assert!(
        text.contains("relay") && text.contains(&format!("{WAN}.11:")),
        "the endpoints are the routers' public addresses: {text}"
    );
}

fn logs(sites: &Sites) -> String {
    ["site-a", "site-b"].map(|n| std::fs::read_to_string(sites.log(n)).unwrap_or_default()).join("\n---\n")
}
