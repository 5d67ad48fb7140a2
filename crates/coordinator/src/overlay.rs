//! The pool's side of the overlay (`network = "grid"`): what each node said about its end of it
//! (WireGuard key, observed endpoint, paths), the UDP reflector that tells a node the address
//! its packets come from (as STUN would), and the relay that carries WireGuard packets between
//! nodes that cannot reach each other directly. All of it is soft state in memory: nodes say it
//! again every second, so a restarted coordinator knows it again within one.
//!
//! The relay carries only packets between nodes that run members of one group now (as the
//! engine says at each relay call), to nodes heard from lately, boundedly per node (each packet
//! charged with its bookkeeping); they are WireGuard packets, so the pool sees ciphertext. Nodes
//! not heard from for [`STALE`] are forgotten.
//! The reflector answers only probes, never with more bytes than the probe had, and its answer
//! carries a token for the address it saw ([`Stamps`]): a node's endpoint reaches other nodes
//! only with a token the pool made for that very address, so a node cannot have its peers send
//! packets to an address it does not receive at.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::hmac;
use tokio::sync::Notify;
use vmgrid_proto::overlay::{
    NetView, OverlayGroup, OverlayHello, OverlayHost, OverlayMap, OverlayPeer, PROBE_LEN, PROBE_MAGIC, PeerPath,
    relay_encode, reply_encode,
};

/// A node not heard from for this long is left out of maps and `vmgrid net`.
const STALE: Duration = Duration::from_secs(30);
/// The most bytes waiting in one node's relay mailbox; past it, packets are dropped (as a full
/// link drops them: TCP in the VMs slows down).
const MAILBOX_BYTES: usize = 4 << 20;
/// The most of one node's mailbox one sender may fill: a node that floods another leaves room for
/// the rest of its peers.
const SENDER_BYTES: usize = MAILBOX_BYTES / 4;
/// What a queued packet costs its mailbox beyond its bytes and its sender's name.
const ENTRY_COST: usize = 64;
/// The shortest WireGuard message (a transport message with no payload); shorter is no packet.
const MIN_PACKET: usize = 32;
/// A reflector's token is good in the period it was made in and the next one: 2 to 4 minutes.
/// Nodes probe before each hello, so theirs are always fresh.
const TOKEN_PERIOD: Duration = Duration::from_secs(120);

#[derive(Default)]
pub(crate) struct Overlay {
    ends: Mutex<Ends>,
    stamps: Stamps,
}

/// The reflector's tokens: HMAC-SHA256 over a period's number and an address (its canonical
/// text), keyed by a secret made at start and kept only in memory. A restarted coordinator
/// refuses the old tokens; nodes probe again before each hello and so have new ones at once.
struct Stamps {
    key: hmac::Key,
    start: Instant,
}

impl Default for Stamps {
    fn default() -> Stamps {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the kernel's random source is readable");
        Stamps { key, start: Instant::now() }
    }
}

impl Stamps {
    fn period(&self) -> u64 {
        self.start.elapsed().as_secs() / TOKEN_PERIOD.as_secs()
    }

    fn message(addr: SocketAddr, period: u64) -> Vec<u8> {
        let mut m = period.to_be_bytes().to_vec();
        m.extend_from_slice(canonical(addr).to_string().as_bytes());
        m
    }

    /// The token, in hex, for a probe from `addr` seen in `period`.
    fn token(&self, addr: SocketAddr, period: u64) -> String {
        hex::encode(hmac::sign(&self.key, &Self::message(addr, period)))
    }

    /// `endpoint` in canonical form if `token` is this coordinator's for that address, made in
    /// `period` or the one before.
    fn verify(&self, endpoint: &str, token: &str, period: u64) -> Option<String> {
        let addr = canonical(endpoint.parse().ok()?);
        let tag = hex::decode(token).ok()?;
        [Some(period), period.checked_sub(1)]
            .into_iter()
            .flatten()
            .any(|p| hmac::verify(&self.key, &Self::message(addr, p), &tag).is_ok())
            .then(|| addr.to_string())
    }
}

/// An address as the reflector tells it and its tokens cover it: a probe over IPv4 to a socket
/// on `[::]` arrives from `::ffff:a.b.c.d`, which is `a.b.c.d` (a node's IPv4 socket can send
/// only there); IPv6 without its flow label.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => SocketAddr::V6(SocketAddrV6::new(*a.ip(), a.port(), 0, a.scope_id())),
        },
        v4 => v4,
    }
}

#[derive(Default)]
struct Ends {
    map: HashMap<String, End>,
    /// When nodes not heard from were last forgotten.
    swept: Option<Instant>,
}

impl End {
    fn fresh(&self) -> bool {
        self.seen.elapsed() < STALE
    }
}

/// What one queued packet costs its mailbox.
fn cost(from: &str, packet: &[u8]) -> usize {
    packet.len() + from.len() + ENTRY_COST
}

struct End {
    key: String,
    endpoint: Option<String>,
    paths: Vec<PeerPath>,
    seen: Instant,
    mailbox: VecDeque<(String, Vec<u8>)>,
    queued: usize,
    /// What each sender has waiting in the mailbox.
    by_sender: HashMap<String, usize>,
    notify: Arc<Notify>,
}

/// The nodes `node` may have tunnels to: those that run members of its groups, and, when it is
/// on the overlay itself, the other nodes that are.
pub(crate) fn peers_of(node: &str, groups: &[OverlayGroup], host: Option<&OverlayHost>) -> HashSet<String> {
    let members = groups.iter().flat_map(|g| &g.members).map(|m| &m.node);
    let hosts = host.into_iter().flat_map(|h| &h.members).map(|m| &m.node);
    members.chain(hosts).filter(|n| *n != node).cloned().collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Overlay {
    /// Records a node's hello and answers with its map: its groups, and the keys and endpoints
    /// of the nodes that run their other members (and, for a node on the overlay itself, of the
    /// other such nodes). The endpoint it says is kept only with the reflector's token for it
    /// (else its peers reach it through the relay).
    pub fn hello(
        &self,
        node: &str,
        mut hello: OverlayHello,
        groups: Vec<OverlayGroup>,
        host: Option<OverlayHost>,
    ) -> OverlayMap {
        let endpoint = match (&hello.endpoint, &hello.endpoint_token) {
            (Some(e), Some(t)) => self.stamps.verify(e, t, self.stamps.period()),
            _ => None,
        };
        if endpoint.is_none() && hello.endpoint.is_some() {
            tracing::debug!(
                node,
                endpoint = hello.endpoint,
                "an overlay endpoint without the reflector's token for it"
            );
        }
        let mut guard = lock(&self.ends);
        let st = &mut *guard;
        if st.swept.is_none_or(|t| t.elapsed() >= STALE) {
            st.map.retain(|_, e| e.fresh());
            st.swept = Some(Instant::now());
        }
        let ends = &mut st.map;
        let peers = peers_of(node, &groups, host.as_ref());
        // What a node says of its paths is kept only for nodes of the overlay (what `vmgrid net`
        // shows): its last paths outlive its last VM, so not only its peers of now.
        hello.paths.retain(|p| p.node != node && ends.contains_key(&p.node));
        let end = ends.entry(node.to_string()).or_insert_with(|| End {
            key: String::new(),
            endpoint: None,
            paths: Vec::new(),
            seen: Instant::now(),
            mailbox: VecDeque::new(),
            queued: 0,
            by_sender: HashMap::new(),
            notify: Arc::default(),
        });
        if end.key != hello.key {
            // A new key (the node registered again): what waited for the old one is useless.
            end.mailbox.clear();
            end.queued = 0;
            end.by_sender.clear();
        }
        end.key = hello.key;
        end.endpoint = endpoint;
        end.paths = hello.paths;
        end.seen = Instant::now();
        let mut out: Vec<OverlayPeer> = peers
            .iter()
            .filter_map(|p| {
                let e = ends.get(p).filter(|e| e.seen.elapsed() < STALE)?;
                Some(OverlayPeer { node: p.clone(), key: e.key.clone(), endpoint: e.endpoint.clone() })
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        OverlayMap { groups, peers: out, host }
    }

    /// Queues packets from `from` for the nodes they name; returns how many were dropped: not
    /// one of `allowed` (the nodes that run members of `from`'s groups now, as the engine says),
    /// not heard from lately, too short to be a WireGuard message, or a full mailbox.
    pub fn relay(&self, from: &str, allowed: &HashSet<String>, packets: Vec<(String, &[u8])>) -> usize {
        let mut guard = lock(&self.ends);
        let ends = &mut guard.map;
        if !ends.get(from).is_some_and(End::fresh) {
            return packets.len();
        }
        let mut dropped = 0;
        for (to, p) in packets {
            let c = cost(from, p);
            match ends.get_mut(&to).filter(|e| allowed.contains(&to) && e.fresh() && p.len() >= MIN_PACKET) {
                Some(e)
                    if e.queued + c <= MAILBOX_BYTES
                        && e.by_sender.get(from).copied().unwrap_or(0) + c <= SENDER_BYTES =>
                {
                    e.queued += c;
                    *e.by_sender.entry(from.to_string()).or_default() += c;
                    e.mailbox.push_back((from.to_string(), p.to_vec()));
                    e.notify.notify_one();
                }
                _ => dropped += 1,
            }
        }
        dropped
    }

    /// The packets waiting for `node`, encoded as a relay body (at most `max` bytes), or the
    /// notification to wait on when there are none.
    pub fn take(&self, node: &str, max: usize) -> Result<Vec<u8>, Option<Arc<Notify>>> {
        let mut ends = lock(&self.ends);
        let Some(e) = ends.map.get_mut(node) else { return Err(None) };
        if e.mailbox.is_empty() {
            return Err(Some(e.notify.clone()));
        }
        let mut body = Vec::new();
        while let Some((from, p)) = e.mailbox.front() {
            if !body.is_empty() && body.len() + p.len() + from.len() + 3 > max {
                break;
            }
            relay_encode(&mut body, from, p);
            let c = cost(from, p);
            e.queued -= c;
            if let Some(n) = e.by_sender.get_mut(from.as_str()) {
                *n -= c;
                if *n == 0 {
                    e.by_sender.remove(from.as_str());
                }
            }
            e.mailbox.pop_front();
        }
        Ok(body)
    }

    /// Every node's end heard from lately, for `vmgrid net`.
    pub fn views(&self) -> Vec<NetView> {
        let ends = lock(&self.ends);
        let mut v: Vec<NetView> = ends
            .map
            .iter()
            .filter(|(_, e)| e.fresh())
            .map(|(n, e)| NetView {
                node: n.clone(),
                key: e.key.clone(),
                endpoint: e.endpoint.clone(),
                paths: e.paths.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Forgets a node that left the pool.
    pub fn forget(&self, node: &str) {
        lock(&self.ends).map.remove(node);
    }

    /// The reflector's answer to a datagram from `from`: for a probe, the address it came from
    /// and the token for it, if that is no longer than the probe; else nothing.
    pub fn reply(&self, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        if datagram.len() < PROBE_LEN || !datagram.starts_with(PROBE_MAGIC) {
            return None;
        }
        let seen = canonical(from);
        let reply = reply_encode(&seen.to_string(), &self.stamps.token(seen, self.stamps.period()));
        (reply.len() <= datagram.len()).then_some(reply)
    }
}

/// The reflector: answers each probe with the address it came from and a token for it. It shares
/// the API's port number (UDP and TCP ports are apart), so a node finds it from the pool's URL.
pub(crate) async fn reflect(sock: tokio::net::UdpSocket, shared: Arc<crate::core::Shared>) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
        if let Some(reply) = shared.overlay.reply(&buf[..n], from) {
            let _ = sock.send_to(&reply, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmgrid_proto::overlay::{OverlayMember, relay_decode, reply_decode};

    fn hello(key: u8) -> OverlayHello {
        OverlayHello {
            key: vmgrid_proto::overlay::key_hex(&[key; 32]),
            endpoint: Some("10.0.0.1:7".into()),
            endpoint_token: None,
            paths: vec![],
        }
    }

    fn group(of: &[(&str, u64)]) -> Vec<OverlayGroup> {
        let members = of
            .iter()
            .map(|(n, id)| OverlayMember {
                job_id: *id,
                addr: vmgrid_proto::overlay::addr_of(*id),
                node: n.to_string(),
            })
            .collect();
        vec![OverlayGroup { job_id: of[0].1, members }]
    }

    #[test]
    fn the_relay_carries_packets_only_between_nodes_of_one_group_and_boundedly() {
        let o = Overlay::default();
        let map = o.hello("a", hello(1), group(&[("a", 1), ("b", 2)]), None);
        assert!(map.peers.is_empty(), "b has not said hello yet");
        let map = o.hello("b", hello(2), group(&[("b", 2), ("a", 1)]), None);
        assert_eq!(map.peers.len(), 1);
        assert_eq!(map.peers[0].key, vmgrid_proto::overlay::key_hex(&[1; 32]));
        o.hello("c", hello(3), vec![], None);
        // a may send to b (the engine says they share a group now), not to c, nor to a node it
        // never heard of, and nothing shorter than a WireGuard message.
        let peers_of_a: HashSet<String> = ["b".to_string()].into();
        let packet = [7u8; MIN_PACKET];
        let sent = vec![("b".into(), &packet[..]), ("c".into(), &packet[..]), ("z".into(), &packet[..])];
        assert_eq!(o.relay("a", &peers_of_a, sent), 2);
        assert_eq!(o.relay("a", &peers_of_a, vec![("b".into(), &b""[..]), ("b".into(), &packet[1..])]), 2);
        let body = o.take("b", 1 << 20).unwrap();
        assert_eq!(relay_decode(&body).unwrap(), vec![("a".to_string(), &packet[..])]);
        assert!(o.take("c", 1 << 20).is_err(), "c got nothing");
        // Once the engine says their group is over, a relays nothing more to b.
        assert_eq!(o.relay("a", &HashSet::new(), vec![("b".into(), &packet[..])]), 1);
        // One sender fills at most SENDER_BYTES of a mailbox, each packet charged with its
        // bookkeeping; the others still get through, up to MAILBOX_BYTES in all.
        let per = SENDER_BYTES / cost("a", &packet);
        let dropped = o.relay("a", &peers_of_a, (0..per + 10).map(|_| ("b".to_string(), &packet[..])).collect());
        assert_eq!(dropped, 10);
        let peers_of_others: HashSet<String> = ["b".to_string()].into();
        for sender in ["c", "d", "e", "f"] {
            o.hello(sender, hello(5), vec![], None);
            let batch = (0..per).map(|_| ("b".to_string(), &packet[..])).collect();
            let dropped = o.relay(sender, &peers_of_others, batch);
            // a, c, d and e fill the mailbox; f finds it full.
            assert_eq!(dropped, if sender == "f" { per } else { 0 }, "{sender}");
        }
        let mut taken = 0;
        while let Ok(body) = o.take("b", 1 << 20) {
            taken += relay_decode(&body).unwrap().len();
        }
        assert_eq!(taken, 4 * per, "taken, the mailbox is empty again");
        assert_eq!(o.relay("a", &peers_of_a, vec![("b".into(), &packet[..])]), 0, "and a may send again");
        // A new key (b registered again) empties what waited for the old one.
        o.hello("b", hello(9), group(&[("b", 2), ("a", 1)]), None);
        assert!(o.take("b", 1 << 20).is_err());
    }

    #[test]
    fn paths_name_only_overlay_nodes() {
        let o = Overlay::default();
        o.hello("a", hello(1), vec![], None);
        o.hello("b", hello(2), vec![], None);
        let mut h = hello(1);
        h.paths = ["b", "nowhere", "a"]
            .iter()
            .map(|n| vmgrid_proto::overlay::PeerPath {
                node: n.to_string(),
                path: vmgrid_proto::overlay::Path::Direct,
                tx_bytes: 1,
                rx_bytes: 1,
            })
            .collect();
        o.hello("a", h, vec![], None);
        let a = o.views().into_iter().find(|v| v.node == "a").unwrap();
        assert_eq!(a.paths.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn an_endpoint_reaches_peers_only_with_the_reflectors_token_for_that_address() {
        let o = Overlay::default();
        // A probe over IPv4 to a socket on [::]: the reflector answers with the IPv4 address and
        // a token for it, never with more bytes than the probe, and answers no short probe.
        let from: SocketAddr = "[::ffff:10.0.0.1]:7".parse().unwrap();
        let mut probe = PROBE_MAGIC.to_vec();
        probe.resize(PROBE_LEN, 0);
        let reply = o.reply(&probe, from).unwrap();
        assert!(reply.len() <= probe.len());
        let (seen, token) = reply_decode(&reply).unwrap();
        assert_eq!(seen, "10.0.0.1:7".parse().unwrap());
        assert!(o.reply(&probe[..PROBE_LEN - 1], from).is_none());
        assert!(o.reply(&[0; PROBE_LEN], from).is_none());
        // What a hands out of b's endpoint, after b said `endpoint` with `token`.
        let b_seen_by_a = |endpoint: &str, token: Option<&str>| {
            let mut h = hello(2);
            h.endpoint = Some(endpoint.into());
            h.endpoint_token = token.map(Into::into);
            o.hello("b", h, group(&[("b", 2), ("a", 1)]), None);
            o.hello("a", hello(1), group(&[("a", 1), ("b", 2)]), None).peers[0].endpoint.clone()
        };
        assert_eq!(b_seen_by_a("10.0.0.1:7", Some(&token)).as_deref(), Some("10.0.0.1:7"));
        // The same address written otherwise is the same address.
        assert_eq!(b_seen_by_a("[::ffff:10.0.0.1]:7", Some(&token)).as_deref(), Some("10.0.0.1:7"));
        // Another address, no token, or another coordinator's token: no endpoint (a relays).
        assert_eq!(b_seen_by_a("10.0.0.1:8", Some(&token)), None);
        assert_eq!(b_seen_by_a("10.0.0.2:7", Some(&token)), None);
        assert_eq!(b_seen_by_a("10.0.0.1:7", None), None);
        let (_, foreign) = reply_decode(&Overlay::default().reply(&probe, from).unwrap()).unwrap();
        assert_eq!(b_seen_by_a("10.0.0.1:7", Some(&foreign)), None);
        assert!(o.views().iter().all(|v| v.endpoint.is_none()));
        // A token is good in its period and the next, not later nor earlier.
        let (st, addr) = (&o.stamps, "10.0.0.1:7".parse().unwrap());
        assert!(st.verify("10.0.0.1:7", &st.token(addr, 6), 6).is_some());
        assert!(st.verify("10.0.0.1:7", &st.token(addr, 5), 6).is_some());
        assert!(st.verify("10.0.0.1:7", &st.token(addr, 4), 6).is_none());
        assert!(st.verify("10.0.0.1:7", &st.token(addr, 7), 6).is_none());
        assert!(st.verify("10.0.0.1:7", "zz", 6).is_none());
    }
}
