//! The overlay's data plane: frames from VMs through the switch into tunnels (or to another local
//! VM), WireGuard packets from the UDP socket or the relay out of tunnels into VMs, and the
//! tunnels' timers (handshakes, keepalives).
//!
//! Handshake messages are rate-limited before a tunnel is looked up (which for an initiation
//! costs a key exchange): past [`super::tunnels::HANDSHAKES_PER_S`] a second, a sender that has
//! no cookie for its address gets one instead, as boringtun's own device does. A relayed
//! packet's sender is the node the pool says sent it, which stands for an address of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519::PublicKey;
use vmgrid_proto::overlay::{MAX_RELAY_BODY, MAX_RELAY_PACKET, relay_encode};

use super::switch::{self, FromVm};
use super::tunnels::{Peer, Route};
use super::{Overlay, Vm};
use crate::lock;

/// Where a WireGuard packet came from.
pub(super) enum Via<'a> {
    Udp(SocketAddr),
    /// The pool relayed it from this node.
    Relay(&'a str),
}

impl Via<'_> {
    /// The address a cookie for the sender is bound to: the UDP source, or for a relayed packet
    /// an IPv6 unique local address (fd00::/8) made from a hash of the sending node's name (the
    /// node's UDP socket is IPv4, so no datagram comes from one).
    fn source(&self) -> IpAddr {
        match self {
            Via::Udp(a) => a.ip(),
            Via::Relay(node) => {
                let mut b = [0xfd; 16];
                b[1..].copy_from_slice(&blake3::hash(node.as_bytes()).as_bytes()[..15]);
                IpAddr::V6(Ipv6Addr::from(b))
            }
        }
    }
}

/// Room for a packet and WireGuard's overhead.
const BUF: usize = MAX_RELAY_PACKET + 64;
/// A cookie reply: its message type and length.
const COOKIE_REPLY: u8 = 3;
const COOKIE_REPLY_LEN: usize = 64;

impl Overlay {
    /// A WireGuard packet for this node: into its tunnel, and what comes out to the VM it is for.
    pub(super) fn on_wire(&self, packet: &[u8], via: Via<'_>) {
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        let source = via.source();
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        let checked = st.peers.limiter(&st.public).verify_packet(Some(source), packet, &mut cookie);
        let found = match checked {
            Err(TunnResult::WriteToNetwork(c)) => return self.answer(&via, c),
            Err(_) => return,
            Ok(Packet::HandshakeInit(h)) => {
                let Ok(half) = parse_handshake_anon(&st.secret, &PublicKey::from(st.public), &h) else { return };
                st.peers.by_key(&half.peer_static_public)
            }
            Ok(Packet::HandshakeResponse(r)) => st.peers.by_index(r.receiver_idx),
            Ok(Packet::PacketCookieReply(c)) => st.peers.by_index(c.receiver_idx),
            Ok(Packet::PacketData(d)) => st.peers.by_index(d.receiver_idx),
        };
        let Some((name, peer)) = found else { return };
        if let Via::Relay(from) = via
            && from != name
        {
            return;
        }
        let name = name.clone();
        let src = match via {
            Via::Udp(a) => Some(a),
            Via::Relay(_) => None,
        };
        let mut buf = [0u8; BUF];
        let mut replies = Vec::new();
        let delivered = match peer.tunn.decapsulate(Some(source), packet, &mut buf) {
            TunnResult::Err(_) => return,
            // The limit was reached since the check above: a cookie, and nothing authenticated.
            TunnResult::WriteToNetwork(p) if p.first() == Some(&COOKIE_REPLY) => return self.answer(&via, p),
            TunnResult::WriteToNetwork(p) => {
                replies.push(p.to_vec());
                // Packets queued while the handshake ran go now.
                while let TunnResult::WriteToNetwork(p) = peer.tunn.decapsulate(None, &[], &mut buf) {
                    replies.push(p.to_vec());
                }
                None
            }
            TunnResult::WriteToTunnelV4(p, _) => Some(p.to_vec()),
            _ => None,
        };
        peer.heard(src);
        for r in &replies {
            self.send_wire(&name, peer, r);
        }
        if let Some(p) = delivered {
            peer.rx_bytes += p.len() as u64;
            deliver(&st.vms, &st.routes, &name, &p);
        }
    }

    /// A frame from the VM at `addr`: answered (ARP), forwarded to a member of its group, or
    /// dropped.
    pub(super) fn on_frame(&self, addr: Ipv4Addr, frame: &[u8]) {
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        let Some(vm) = st.vms.get(&addr) else { return };
        let (dst, packet) = match switch::from_vm(frame, vm.mac, addr) {
            FromVm::Reply(r) => {
                to_nic(&vm.nic, &r);
                return;
            }
            FromVm::Drop(why) => {
                tracing::trace!(%addr, why, "dropped a frame from a VM");
                return;
            }
            FromVm::Ip { dst, packet } => (dst, packet),
        };
        if dst == addr || !vm.group.contains(&dst) {
            return;
        }
        if let Some(to) = st.vms.get(&dst) {
            // Both ends must count the other as a member: the receiver's group decides too.
            if to.group.contains(&addr) {
                to_nic(&to.nic, &switch::to_vm(packet, to.mac));
            }
            return;
        }
        let Some(node) = st.routes.get(&dst) else { return };
        let Some(peer) = st.peers.get_mut(node) else { return };
        let mut buf = [0u8; BUF];
        if packet.len() + 32 > BUF {
            return;
        }
        if let TunnResult::WriteToNetwork(p) = peer.tunn.encapsulate(packet, &mut buf) {
            peer.tx_bytes += packet.len() as u64;
            let p = p.to_vec();
            self.send_wire(node, peer, &p);
        }
    }

    /// Sends a WireGuard packet to `node`'s tunnel end: directly, through the relay, or both.
    pub(super) fn send_wire(&self, node: &str, peer: &Peer, packet: &[u8]) {
        let route = match self.relay_only {
            true => Route { direct: None, relay: true },
            false => peer.route(packet),
        };
        if let Some(ep) = route.direct {
            let _ = self.udp.send_to(packet, ep);
        }
        if route.relay {
            self.to_relay(node, packet);
        }
    }

    /// Sends `packet` back the way the packet it answers came: to its UDP source, or through the
    /// relay to the node that sent it.
    fn answer(&self, via: &Via<'_>, packet: &[u8]) {
        match via {
            Via::Udp(a) => {
                let _ = self.udp.send_to(packet, a);
            }
            Via::Relay(node) => self.to_relay(node, packet),
        }
    }

    fn to_relay(&self, node: &str, packet: &[u8]) {
        let mut out = lock(&self.relay_out);
        // A relay that cannot keep up drops packets, as a full link does.
        if out.len() + packet.len() + node.len() + 3 <= MAX_RELAY_BODY {
            relay_encode(&mut out, node, packet);
            self.relay_ready.notify_one();
        }
    }

    /// The tunnels' timers: handshake retries and rekeys, keepalives; the handshake rate
    /// limiter's count, every second.
    pub(super) fn timers(&self) {
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        st.peers.reset_limiter();
        let mut buf = [0u8; BUF];
        for (name, peer) in st.peers.iter_mut() {
            if let TunnResult::WriteToNetwork(p) = peer.tunn.update_timers(&mut buf) {
                let p = p.to_vec();
                self.send_wire(name, peer, &p);
            }
        }
    }
}

/// Hands an IPv4 packet from `node`'s tunnel to the local VM it is for, if its source is a
/// member of that VM's group that the pool says runs on `node`.
fn deliver(
    vms: &std::collections::HashMap<Ipv4Addr, Vm>,
    routes: &std::collections::HashMap<Ipv4Addr, String>,
    node: &str,
    packet: &[u8],
) {
    let Some((src, dst, len)) = switch::ipv4_header(packet) else { return };
    let Some(vm) = vms.get(&dst) else { return };
    if !vm.group.contains(&src) || routes.get(&src).map(String::as_str) != Some(node) {
        tracing::trace!(%src, %dst, node, "dropped a packet from a tunnel: not from a member of the group there");
        return;
    }
    to_nic(&vm.nic, &switch::to_vm(&packet[..len], vm.mac));
}

/// Hands a frame to a VM's NIC without waiting: a VM that does not read its frames (paused,
/// hung, or slower than its peers) loses them, as a full NIC queue does, and never holds up the
/// switch.
fn to_nic(nic: &super::Nic, frame: &[u8]) {
    use std::os::fd::AsRawFd;
    let sock = match nic {
        super::Nic::Sock(s) => s,
        // A TAP device takes a frame at once (the kernel's stack receives it).
        super::Nic::Tap(t) => {
            if let Err(e) = std::io::Write::write(&mut &**t, frame) {
                tracing::trace!("a frame for this machine was dropped: {e}");
            }
            return;
        }
    };
    // SAFETY: the descriptor is open for as long as `sock` is borrowed, and the pointer and
    // length describe `frame`, which outlives the call; send(2) only reads from it.
    let sent = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
    if sent < 0 {
        tracing::trace!("a frame for a VM was dropped: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::UdpSocket;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    use vmgrid_proto::overlay::relay_decode;

    use super::super::tunnels::{HANDSHAKES_PER_S, Peers};
    use super::super::{Overlay, State};
    use super::{COOKIE_REPLY, COOKIE_REPLY_LEN, Via};
    use crate::lock;

    /// A node's overlay with no threads: packets go in through `on_wire`, and what it sends
    /// through the relay waits in `relay_out`.
    fn node() -> Overlay {
        let secret = StaticSecret::from([1u8; 32]);
        let public = PublicKey::from(&secret).to_bytes();
        let st = State {
            secret,
            public,
            endpoint: None,
            endpoint_token: None,
            vms: HashMap::new(),
            routes: HashMap::new(),
            peers: Peers::default(),
            hello_now: false,
            host_addr: None,
            host_retry: None,
        };
        Overlay {
            st: Mutex::new(st),
            udp: UdpSocket::bind("127.0.0.1:0").unwrap(),
            reflector: None,
            client: Mutex::new(vmgrid_client::Client::new("https://127.0.0.1:1", "unused")),
            relay_out: Mutex::default(),
            relay_ready: Condvar::new(),
            stop: AtomicBool::new(false),
            relay_only: false,
            tap: None,
        }
    }

    fn initiation(t: &mut Tunn) -> Vec<u8> {
        let mut b = [0u8; 256];
        match t.format_handshake_initiation(&mut b, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("no handshake initiation: {r:?}"),
        }
    }

    /// The one packet the node put in the relay, for `to`.
    fn relayed(node: &Overlay, to: &str) -> Vec<u8> {
        let body = std::mem::take(&mut *lock(&node.relay_out));
        let packets = relay_decode(&body).unwrap();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0, to);
        packets[0].1.to_vec()
    }

    #[test]
    fn past_the_rate_limit_handshakes_get_cookies_and_only_senders_that_use_them_get_further() {
        let node = node();
        let node_key = PublicKey::from(lock(&node.st).public);
        // A flood over UDP from a key the node has no tunnel to: well-formed initiations (right
        // mac1), each of which would cost a key exchange.
        let flooder = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A bound on a wait for datagrams already sent over loopback, not a delay.
        flooder.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut flood = Tunn::new(StaticSecret::from([9u8; 32]), node_key, None, None, 1, None);
        let over = 5;
        for _ in 0..HANDSHAKES_PER_S + over {
            node.on_wire(&initiation(&mut flood), Via::Udp(flooder.local_addr().unwrap()));
        }
        // Past the limit each got a cookie reply, sent back to where it came from.
        let mut b = [0u8; 256];
        for _ in 0..over {
            let n = flooder.recv(&mut b).expect("a cookie reply");
            assert_eq!((b[0], n), (COOKIE_REPLY, COOKIE_REPLY_LEN));
        }
        // Peer b, which the node has a tunnel to, says hello through the relay meanwhile: it gets
        // a cookie too, through the relay.
        let b_secret = StaticSecret::from([2u8; 32]);
        {
            let mut guard = lock(&node.st);
            let st = &mut *guard;
            st.peers.ensure(&st.secret, "b", PublicKey::from(&b_secret).to_bytes(), None);
        }
        let mut b_tunn = Tunn::new(b_secret, node_key, None, None, 7, None);
        node.on_wire(&initiation(&mut b_tunn), Via::Relay("b"));
        let cookie = relayed(&node, "b");
        assert_eq!(cookie[0], COOKIE_REPLY);
        // b takes the cookie; its next initiation proves it (mac2) and gets a handshake response.
        assert!(matches!(b_tunn.decapsulate(None, &cookie, &mut b), TunnResult::Done));
        node.on_wire(&initiation(&mut b_tunn), Via::Relay("b"));
        let response = relayed(&node, "b");
        assert_eq!(response[0], 2, "a handshake response");
        assert!(!matches!(b_tunn.decapsulate(None, &response, &mut b), TunnResult::Err(_)));
    }
}
