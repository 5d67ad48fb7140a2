//! The pool's virtual network (`network = "grid"`), end to end with real QEMU (TCG, the guest
//! kit), real node agents and real WireGuard (boringtun): a job group of two VMs on two nodes,
//! one listening and one connecting over TCP, each reporting what it received; `vmgrid net`
//! saying how the nodes reach each other. The same across NATs and through the relay is in
//! `netns.rs`, which can make network namespaces.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmgrid_proto::JobState;
use vmgrid_proto::overlay::{NetView, Path as NetPath};

use crate::util::*;

/// The exchange: instance 0 listens on TCP port 5000, instance 1 connects to it (retrying until
/// it listens); each sends a line naming itself and keeps what it received in `got.txt`.
pub const TALK_SH: &str = r#"me=$(sed -n "$((ROLE+1))p" /job/.vmgrid-peers | cut -d' ' -f1)
first=$(echo "$VMGRID_PEERS" | cut -d, -f1)
if [ "$ROLE" = 0 ]; then
  echo "from 0 at $me" | nc -l -p 5000 > /job/got.txt
else
  n=0
  until echo "from 1 at $me" | nc -w 10 "$first" 5000 > /job/got.txt && [ -s /job/got.txt ]; do
    n=$((n+1)); [ $n -gt 120 ] && exit 3; sleep 1
  done
fi
echo "got: $(cat /job/got.txt)"
"#;

/// The talking job's file in `d`, for a group of two.
pub fn talk_job(d: &JobDir, kit: &(PathBuf, PathBuf)) -> PathBuf {
    d.write("talk.sh", TALK_SH);
    d.job(&format!(
        "name = \"talk\"\n[vm]\ntype = \"qemu\"\nkernel = {}\ninitrd = {}\nappend = \"console=ttyS0 quiet\"\nnetwork = \"grid\"\n\
         args = [\"sh\", \"talk.sh\"]\nenv = {{ ROLE = \"{{index}}\" }}\n\
         [resources]\nmemory_mb = 128\ntimeout_s = 300\ndisk_mb = 8\n[files]\ninputs = [\"talk.sh\"]\noutputs = [\"got.txt\"]\n",
        toml_path(&kit.0),
        toml_path(&kit.1)
    ))
}

/// Submits the group with `cli`, waits for both to end, and returns what each received, after
/// checking that they completed on two different nodes.
pub fn run_group(cli: impl Fn() -> assert_cmd::Command, job: &Path, out: &Path) -> [String; 2] {
    let o = cli().args(["submit", "--count", "2", "--group"]).arg(job).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let ids = ids_of(&o);
    assert_eq!(ids.len(), 2);
    let w = cli().arg("wait").args(ids.iter().map(u64::to_string)).timeout(Duration::from_secs(400)).output().unwrap();
    let q = cli().args(["q", "--json"]).output().unwrap();
    let jobs: Vec<vmgrid_proto::JobView> = serde_json::from_slice(&q.stdout).unwrap();
    let mine: Vec<_> = jobs.iter().filter(|j| ids.contains(&j.id)).collect();
    let logs: Vec<String> =
        ids.iter().map(|id| stdout_of(&cli().args(["logs", &id.to_string()]).output().unwrap())).collect();
    assert_eq!(w.status.code(), Some(0), "the group failed: {mine:?}\nconsoles: {logs:?}");
    assert!(mine.iter().all(|j| j.state == JobState::Completed), "{mine:?}");
    assert_ne!(mine[0].node, mine[1].node, "the two VMs ran on two nodes: {mine:?}");
    let got = |id: u64| {
        let dir = out.join(id.to_string());
        let f = cli().args(["fetch", &id.to_string(), "--out"]).arg(&dir).output().unwrap();
        assert_eq!(f.status.code(), Some(0), "{}", stderr_of(&f));
        std::fs::read_to_string(dir.join("got.txt")).unwrap().trim().to_string()
    };
    [got(ids[0]), got(ids[1])]
}

/// What each received names the other, at its overlay address (consecutive ids: consecutive
/// addresses).
pub fn assert_exchanged(got: &[String; 2]) {
    assert!(got[0].starts_with("from 1 at 100."), "instance 0 received {:?}", got[0]);
    assert!(got[1].starts_with("from 0 at 100."), "instance 1 received {:?}", got[1]);
}

/// What `vmgrid net --json` says of how `from` reaches `to`.
pub fn pair(cli: impl Fn() -> assert_cmd::Command, from: &str, to: &str) -> Option<vmgrid_proto::overlay::PeerPath> {
    let o = cli().args(["net", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let views: Vec<NetView> = serde_json::from_slice(&o.stdout).unwrap();
    views.into_iter().find(|v| v.node == from)?.paths.into_iter().find(|p| p.node == to)
}

/// The path `vmgrid net --json` says `from` uses to reach `to`.
pub fn path_between(cli: impl Fn() -> assert_cmd::Command, from: &str, to: &str) -> Option<NetPath> {
    pair(cli, from, to).map(|p| p.path)
}

#[test]
fn two_vms_on_two_nodes_talk_tcp_through_a_wireguard_tunnel() {
    let kit = guest_kit();
    let mut pool = Pool::start();
    pool.start_node("ov-a", 1);
    pool.start_node("ov-b", 1);
    let d = JobDir::new();
    let job = talk_job(&d, &kit);
    let got = run_group(|| pool.cli(), &job, &d.out());
    assert_exchanged(&got);
    assert_eq!(path_between(|| pool.cli(), "ov-a", "ov-b"), Some(NetPath::Direct), "on loopback the path is direct");
    // Each node tells its last byte counts once its VM has left.
    wait_until("the nodes to count the bytes their tunnel carried", || {
        ["ov-a", "ov-b"]
            .iter()
            .zip(["ov-b", "ov-a"])
            .all(|(from, to)| pair(|| pool.cli(), from, to).is_some_and(|p| p.tx_bytes > 0 && p.rx_bytes > 0))
    });
    let text = stdout_of(&pool.cli().arg("net").output().unwrap());
    assert!(text.contains("ov-a") && text.contains("direct"), "{text}");
}

/// The guarded group: instance 0 notes when it starts listening, then keeps every line sent to
/// TCP port 5000 until its own member's comes; instance 1 sends that 45 s after it boots.
const GUARD_SH: &str = r#"first=$(echo "$VMGRID_PEERS" | cut -d, -f1)
if [ "$ROLE" = 0 ]; then
  echo "listening $(date +%s)" > /job/got.txt
  until grep -q '^member' /job/got.txt; do nc -l -p 5000 >> /job/got.txt; done
  echo "closed $(date +%s)" >> /job/got.txt
else
  sleep 45
  until echo "member $(date +%s)" | nc -w 5 "$first" 5000; do sleep 1; done
fi
"#;

/// The intruder, a grid VM of another group: tries the guarded VM's port every second for 40 s,
/// noting the time and the outcome of each try.
const INTRUDE_SH: &str = r#"end=$(( $(date +%s) + 40 ))
while [ "$(date +%s)" -lt "$end" ]; do
  if echo intruder | nc -w 1 "$TARGET" 5000; then r=reached; else r=failed; fi
  echo "$(date +%s) $r" >> /job/tried.txt
  sleep 1
done
"#;

#[test]
fn another_groups_vm_and_a_host_process_cannot_reach_a_groups_vms() {
    let kit = guest_kit();
    let mut pool = Pool::start();
    for n in ["iso-a", "iso-b", "iso-c"] {
        pool.start_node(n, 1);
    }
    let d = JobDir::new();
    d.write("guard.sh", GUARD_SH);
    d.write("intrude.sh", INTRUDE_SH);
    let grid_job = |name: &str, script: &str, env: &str, out: &str| {
        d.job(&format!(
            "name = \"{name}\"\n[vm]\ntype = \"qemu\"\nkernel = {}\ninitrd = {}\nappend = \"console=ttyS0 quiet\"\nnetwork = \"grid\"\n\
             args = [\"sh\", \"{script}\"]\nenv = {{ {env} }}\n\
             [resources]\nmemory_mb = 128\ntimeout_s = 300\ndisk_mb = 8\n[files]\ninputs = [\"{script}\"]\noutputs = [\"{out}\"]\n",
            toml_path(&kit.0),
            toml_path(&kit.1)
        ))
    };
    let guard = grid_job("guard", "guard.sh", "ROLE = \"{index}\"", "got.txt");
    let o = pool.cli().args(["submit", "--count", "2", "--group"]).arg(&guard).output().unwrap();
    let group = ids_of(&o);
    let target = vmgrid_proto::overlay::addr_of(group[0]);
    let intruder = grid_job("intruder", "intrude.sh", &format!("TARGET = \"{target}\""), "tried.txt");
    let o = pool.cli().arg("submit").arg(&intruder).output().unwrap();
    let intruder_id = ids_of(&o)[0];
    let all: Vec<String> = group.iter().chain([&intruder_id]).map(u64::to_string).collect();

    // A process on the host sends to the guarded VM's address and port every second while the
    // jobs run (the overlay's addresses are nowhere on the host: whatever routes them, if
    // anything, is not the overlay).
    let done = std::sync::atomic::AtomicBool::new(false);
    let (w, host_tries) = std::thread::scope(|s| {
        let host = s.spawn(|| host_process(target, &done));
        let w = pool.cli().arg("wait").args(&all).timeout(Duration::from_secs(400)).output().unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (w, host.join().unwrap())
    });
    assert_eq!(w.status.code(), Some(0), "{}", stderr_of(&w));
    let fetched = |id: u64, file: &str| {
        let dir = d.out().join(id.to_string());
        let f = pool.cli().args(["fetch", &id.to_string(), "--out"]).arg(&dir).output().unwrap();
        assert_eq!(f.status.code(), Some(0), "{}", stderr_of(&f));
        std::fs::read_to_string(dir.join(file)).unwrap()
    };
    let got = fetched(group[0], "got.txt");
    let time_of = |prefix: &str| -> u64 {
        let line = got.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in {got:?}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (open, member) = (time_of("listening"), time_of("member"));
    assert!(!got.contains("intruder"), "the other group's VM got through: {got:?}");
    assert!(!got.contains("host"), "a host process got through: {got:?}");
    let host_while_open = host_tries.iter().filter(|t| **t > open && **t < member).count();
    assert!(host_while_open >= 3, "the host process tried {host_while_open} times while the guard listened");
    let tried = fetched(intruder_id, "tried.txt");
    let tries: Vec<(u64, &str)> =
        tried.lines().map(|l| l.split_once(' ').map(|(t, r)| (t.parse().unwrap(), r)).unwrap()).collect();
    assert!(tries.iter().all(|(_, r)| *r == "failed"), "{tried}");
    let while_open = tries.iter().filter(|(t, _)| *t > open && *t < member).count();
    assert!(
        while_open >= 3,
        "the intruder tried {while_open} times while the guard listened ({open}..{member}): {tried}"
    );
}

/// Sends a line naming itself to `target`:5000 every second until `done`; returns when it tried
/// (seconds since the epoch, the guests' clock).
fn host_process(target: std::net::Ipv4Addr, done: &std::sync::atomic::AtomicBool) -> Vec<u64> {
    use std::io::Write;
    let mut tries = Vec::new();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&(target, 5000).into(), Duration::from_secs(1)) {
            let _ = s.write_all(b"host process\n");
        }
        tries.push(now);
        // One try a second, as the intruder VM does.
        std::thread::sleep(Duration::from_secs(1));
    }
    tries
}
