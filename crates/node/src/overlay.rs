//! This node's end of the pool's virtual network (`network = "grid"`): a small virtual switch
//! for its grid VMs and WireGuard tunnels (boringtun) to the nodes that run the other members of
//! their groups.
//!
//! - Each VM's NIC is QEMU's end of a socket pair ([`vmgrid_runtime::qemu::NetAttach`]): never a
//!   path on the host, so no other process reaches it. The switch answers ARP itself, drops any
//!   frame whose source MAC or address is not the VM's, and forwards IPv4 only to the members of
//!   the VM's group (`switch.rs`).
//! - One UDP socket carries every tunnel. Its endpoint as the pool sees it comes from the pool's
//!   reflector (a probe to the API's port number), with a token the hello carries back (the pool
//!   hands out no endpoint without one); the pool hands each node the others' keys and
//!   endpoints, and both sides send first, so the NATs between them let the packets in.
//! - When no packet comes back directly, the WireGuard packets go through the pool (`/v1/overlay/
//!   relay`), over this node's HTTPS connection to it: the pool sees ciphertext only
//!   (`tunnels.rs`, `wire.rs`).
//! - A packet from a tunnel reaches a VM only if its source is a member of the VM's group that
//!   the pool says runs on the node the tunnel goes to.
//!
//! - A node started to be on the overlay itself (the appliance with `--network grid`) puts a TAP
//!   device on the switch as it puts a VM's NIC (`host.rs`): its group is the pool's other nodes
//!   that are on the overlay themselves.
//!
//! The key pair is new each time the node registers, and registered with its credential (in its
//! ad): the pool takes no hello with another key. The private key is kept in `overlay.key` (0600)
//! in the node's directory.

mod host;
mod switch;
mod tunnels;
mod wire;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use vmgrid_client::Client;
use vmgrid_proto::overlay::{
    NodeOverlay, OverlayHello, OverlayMap, PROBE_LEN, PROBE_MAGIC, REPLY_MAGIC, addr_of, group_of, key_hex, mac_of,
    reply_decode,
};
use vmgrid_runtime::qemu::NetAttach;

use crate::lock;

/// How often a node with grid VMs says hello (and so learns of new members and paths).
const HELLO_EVERY: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);

/// Test-only (and the benchmark's): set, the node sends every tunnel's packets through the relay,
/// as if UDP between the nodes were blocked. Never set outside tests and benchmarks.
const TEST_ONLY_RELAY: &str = "VMGRID_TEST_ONLY_OVERLAY_RELAY";

/// One of the overlay's threads.
type Loop = fn(&Overlay);

pub(crate) struct Overlay {
    st: Mutex<State>,
    udp: UdpSocket,
    reflector: Option<SocketAddr>,
    client: Mutex<Client>,
    /// Packets for the relay, encoded as a relay body, and its sender's wake-up.
    relay_out: Mutex<Vec<u8>>,
    relay_ready: Condvar,
    stop: AtomicBool,
    /// [`TEST_ONLY_RELAY`]: never send directly.
    relay_only: bool,
    /// The TAP device of a node that is on the overlay itself, and what configures it.
    tap: Option<(Arc<std::fs::File>, crate::ConfigureDevice)>,
}

/// What a node needs for the overlay, made before it registers: its key pair (the public key goes
/// in its ad) and, for a node on the overlay itself, its TAP device (a node that cannot make one
/// does not join).
pub(crate) struct Prepared {
    pub key: KeyPair,
    tap: Option<(std::fs::File, crate::ConfigureDevice)>,
}

impl Prepared {
    pub fn new(dir: &Path, host: Option<crate::ConfigureDevice>) -> std::io::Result<Prepared> {
        let tap = host.map(|c| host::open_tap().map(|t| (t, c))).transpose()?;
        Ok(Prepared { key: new_key(dir)?, tap })
    }

    /// The ad's part of the overlay.
    pub fn ad(&self) -> NodeOverlay {
        self.key.ad(self.tap.is_some())
    }
}

/// A node's overlay key pair, made before it registers: the public key goes in its ad.
pub(crate) struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl KeyPair {
    /// The ad's part of the overlay: this key, and whether the node is on the overlay itself.
    pub fn ad(&self, host: bool) -> NodeOverlay {
        NodeOverlay { key: key_hex(&self.public), host, addr: None }
    }
}

struct State {
    secret: StaticSecret,
    public: [u8; 32],
    /// This node's UDP endpoint as the pool's reflector saw it.
    endpoint: Option<SocketAddr>,
    /// The reflector's token for `endpoint`, said with it in the hello (from the same reply).
    endpoint_token: Option<String>,
    vms: HashMap<Ipv4Addr, Vm>,
    /// Where each member of the local VMs' groups runs, as the pool said.
    routes: HashMap<Ipv4Addr, String>,
    peers: tunnels::Peers,
    /// Say hello at the next tick (a VM came).
    hello_now: bool,
    /// This node's own address on the overlay, once the pool gave it (with a TAP device).
    host_addr: Option<Ipv4Addr>,
    /// When configuring the device failed: not tried again before this.
    host_retry: Option<Instant>,
}

/// A NIC on the switch, as the switch hands it frames.
pub(crate) enum Nic {
    /// A VM's: QEMU's socket pair.
    Sock(Arc<UnixDatagram>),
    /// This machine's own TAP device.
    Tap(Arc<std::fs::File>),
}

struct Vm {
    mac: [u8; 6],
    nic: Nic,
    /// The addresses of its group's members (itself included).
    group: HashSet<Ipv4Addr>,
}

/// A grid VM's place on the switch: its NIC for QEMU, its address and its group's; it leaves
/// the switch when dropped.
pub(crate) struct Attached {
    overlay: Arc<Overlay>,
    pub addr: Ipv4Addr,
    /// The group's addresses, by instance index.
    pub members: Vec<Ipv4Addr>,
    pub net: NetAttach,
    sock: Arc<UnixDatagram>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut st = lock(&self.overlay.st);
        // Only its own entry: the same job leased here again may have attached a newer VM.
        if st.vms.get(&self.addr).is_some_and(|vm| matches!(&vm.nic, Nic::Sock(s) if Arc::ptr_eq(s, &self.sock))) {
            st.vms.remove(&self.addr);
        }
        st.hello_now = true;
        drop(st);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Overlay {
    /// Opens the node's UDP socket (and, for a node on the overlay itself, its TAP device) and
    /// starts its threads, with the key pair it registered with.
    pub fn start(pool: &str, client: Client, prepared: Prepared) -> std::io::Result<Arc<Overlay>> {
        let udp = UdpSocket::bind("0.0.0.0:0")?;
        udp.set_read_timeout(Some(Duration::from_millis(500)))?;
        let reflector = reflector_of(pool);
        if reflector.is_none() {
            tracing::warn!(
                "cannot tell the pool's address from {pool}: grid VMs on other nodes are reached through the relay"
            );
        }
        let Prepared { key, tap } = prepared;
        let tap = tap.map(|(t, c)| (Arc::new(t), c));
        let overlay = Arc::new(Overlay {
            st: Mutex::new(State {
                secret: key.secret,
                public: key.public,
                endpoint: None,
                endpoint_token: None,
                vms: HashMap::new(),
                routes: HashMap::new(),
                peers: tunnels::Peers::default(),
                hello_now: false,
                host_addr: None,
                host_retry: None,
            }),
            udp,
            reflector,
            client: Mutex::new(client),
            relay_out: Mutex::default(),
            relay_ready: Condvar::new(),
            stop: AtomicBool::new(false),
            relay_only: std::env::var_os(TEST_ONLY_RELAY).is_some(),
            tap: tap.clone(),
        });
        if let Some((tap, _)) = tap {
            let o = overlay.clone();
            std::thread::Builder::new().name("vmgrid-overlay-tap".into()).spawn(move || o.tap_loop(tap))?;
        }
        let loops: [(&str, Loop); 4] = [
            ("vmgrid-overlay-udp", Overlay::udp_loop),
            ("vmgrid-overlay-tick", Overlay::tick_loop),
            ("vmgrid-overlay-relay-in", Overlay::relay_in_loop),
            ("vmgrid-overlay-relay-out", Overlay::relay_out_loop),
        ];
        for (name, f) in loops {
            let o = overlay.clone();
            std::thread::Builder::new().name(name.into()).spawn(move || f(&o))?;
        }
        Ok(overlay)
    }

    /// The node registered again, with a new key pair (the old tunnels end) and credential.
    pub fn rotate(&self, client: Client, key: KeyPair) {
        // The key first: a hello between the two would say the old key under the new credential.
        let mut st = lock(&self.st);
        st.secret = key.secret;
        st.public = key.public;
        st.peers.clear();
        st.hello_now = true;
        *lock(&self.client) = client;
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.relay_ready.notify_all();
    }

    /// Puts the VM of grid job `job_id` (instance `index` of a submit with `group`) on the switch.
    pub fn attach(self: &Arc<Self>, job_id: u64, index: u64, group: Option<u32>) -> std::io::Result<Attached> {
        let addr = addr_of(job_id);
        let mac = mac_of(addr);
        let members: Vec<Ipv4Addr> = group_of(job_id, index, group).into_iter().map(addr_of).collect();
        let (ours, theirs) = UnixDatagram::pair()?;
        let sock = Arc::new(ours);
        {
            let mut st = lock(&self.st);
            st.vms.insert(addr, Vm { mac, nic: Nic::Sock(sock.clone()), group: members.iter().copied().collect() });
            st.hello_now = true;
        }
        let (o, s) = (self.clone(), sock.clone());
        let thread = std::thread::Builder::new().name(format!("vmgrid-vm-nic-{job_id}")).spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok(n @ 1..) = s.recv(&mut buf) {
                o.on_frame(addr, &buf[..n]);
            }
        })?;
        let net = NetAttach { fd: std::os::fd::OwnedFd::from(theirs), mac };
        Ok(Attached { overlay: self.clone(), addr, members, net, sock, thread: Some(thread) })
    }

    fn udp_loop(&self) {
        let mut buf = [0u8; 2048];
        while !self.stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = self.udp.recv_from(&mut buf) else { continue };
            let packet = &buf[..n];
            if Some(from) == self.reflector && packet.starts_with(REPLY_MAGIC) {
                let (seen, token) = reply_decode(packet).unzip();
                let mut st = lock(&self.st);
                st.endpoint = seen;
                st.endpoint_token = token;
                continue;
            }
            self.on_wire(packet, wire::Via::Udp(from));
        }
    }

    fn tick_loop(&self) {
        let mut last_hello = Instant::now() - HELLO_EVERY;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            self.timers();
            let now_due = std::mem::take(&mut lock(&self.st).hello_now);
            if now_due || last_hello.elapsed() >= HELLO_EVERY {
                last_hello = Instant::now();
                self.hello();
            }
        }
    }

    /// Says hello (probing the reflector first) and applies the map the pool answers with. A
    /// node whose last grid VM left says hello until the pool's map has no group for it (so its
    /// last paths and byte counts are told), then nothing.
    fn hello(&self) {
        let hello = {
            let mut st = lock(&self.st);
            if st.vms.is_empty() && st.peers.is_empty() && self.tap.is_none() {
                st.routes.clear();
                return;
            }
            OverlayHello {
                key: key_hex(&st.public),
                endpoint: st.endpoint.map(|e| e.to_string()),
                endpoint_token: st.endpoint_token.clone(),
                paths: st.peers.paths(),
            }
        };
        if let Some(r) = self.reflector {
            let mut probe = PROBE_MAGIC.to_vec();
            probe.resize(PROBE_LEN, 0);
            let _ = self.udp.send_to(&probe, r);
        }
        let client = lock(&self.client).clone();
        match client.overlay_hello(&hello) {
            Ok(map) => self.apply(map),
            // A refusal is the pool's word on this node (a key it did not register): said.
            Err(e @ vmgrid_client::ClientError::Refused { .. }) => tracing::warn!("overlay hello refused: {e}"),
            Err(e) => tracing::debug!("overlay hello: {e}"),
        }
    }

    /// The pool's map: where each member runs, and a tunnel to each node that runs one; a new
    /// tunnel starts with a handshake sent at once, which opens this side's NAT to the peer.
    fn apply(&self, map: OverlayMap) {
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        st.routes = map.groups.iter().flat_map(|g| &g.members).map(|m| (m.addr, m.node.clone())).collect();
        if let (Some(_), Some(h)) = (&self.tap, &map.host) {
            st.routes.extend(h.members.iter().map(|m| (m.addr, m.node.clone())));
        }
        for p in &map.peers {
            let Some(key) = vmgrid_proto::overlay::parse_key(&p.key) else { continue };
            let ep = p.endpoint.as_deref().and_then(|e| e.parse().ok());
            if let Some(peer) = st.peers.ensure(&st.secret, &p.node, key, ep) {
                let mut buf = [0u8; 256];
                if let boringtun::noise::TunnResult::WriteToNetwork(init) =
                    peer.tunn.format_handshake_initiation(&mut buf, false)
                {
                    let init = init.to_vec();
                    self.send_wire(&p.node, peer, &init);
                }
            }
        }
        st.peers.retain(|n| map.peers.iter().any(|p| p.node == n));
        drop(guard);
        if let Some(h) = &map.host {
            self.seat_host(h);
        }
    }

    fn relay_in_loop(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            if lock(&self.st).vms.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            let client = lock(&self.client).clone();
            match client.relay_recv(5_000) {
                Ok(body) => match vmgrid_proto::overlay::relay_decode(&body) {
                    Ok(packets) => {
                        for (from, p) in packets {
                            self.on_wire(p, wire::Via::Relay(&from));
                        }
                    }
                    Err(e) => tracing::warn!("a relay body from the pool is malformed: {e}"),
                },
                Err(e) => {
                    tracing::debug!("overlay relay: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn relay_out_loop(&self) {
        loop {
            let body = {
                let mut out = lock(&self.relay_out);
                while out.is_empty() && !self.stop.load(Ordering::Relaxed) {
                    out = self.relay_ready.wait(out).unwrap_or_else(|p| p.into_inner());
                }
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::mem::take(&mut *out)
            };
            let client = lock(&self.client).clone();
            if let Err(e) = client.relay_send(&body) {
                tracing::debug!("overlay relay: {e}");
            }
        }
    }
}

/// A new key pair; the private key is written (0600) to `overlay.key` in `dir`.
pub(crate) fn new_key(dir: &Path) -> std::io::Result<KeyPair> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let secret = StaticSecret::from(bytes);
    crate::write_secret(&dir.join("overlay.key"), &key_hex(&secret.to_bytes()))?;
    let public = PublicKey::from(&secret).to_bytes();
    Ok(KeyPair { secret, public })
}

/// The pool's reflector: the UDP port of the same number as its API's, on its (first) URL's host.
fn reflector_of(pool: &str) -> Option<SocketAddr> {
    let url = pool.split(',').next()?.trim();
    let (scheme, rest) = url.split_once("://")?;
    let host_port = rest.split('/').next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    let with_port = if host_port.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        host_port.to_string()
    } else {
        format!("{host_port}:{default}")
    };
    with_port.to_socket_addrs().ok()?.find(SocketAddr::is_ipv4)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reflector_is_at_the_pool_urls_host_and_port() {
        assert_eq!(
            super::reflector_of("https://127.0.0.1:7000/x,https://10.0.0.1:1"),
            Some("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(super::reflector_of("http://127.0.0.1"), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(super::reflector_of("nonsense"), None);
    }
}
