//! The overlay's data plane: frames from VMs through the switch into tunnels (or to another local
//! VM), WireGuard packets from the UDP socket or the relay out of tunnels into VMs, and the
//! tunnels' timers (handshakes, keepalives).

use std::net::{Ipv4Addr, SocketAddr};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
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

/// Room for a packet and WireGuard's overhead.
const BUF: usize = MAX_RELAY_PACKET + 64;

impl Overlay {
    /// A WireGuard packet for this node: into its tunnel, and what comes out to the VM it is for.
    pub(super) fn on_wire(&self, packet: &[u8], via: Via<'_>) {
        let mut guard = lock(&self.st);
        let st = &mut *guard;
        let found = match Tunn::parse_incoming_packet(packet) {
            Ok(Packet::HandshakeInit(h)) => {
                let Ok(half) = parse_handshake_anon(&st.secret, &PublicKey::from(st.public), &h) else { return };
                st.peers.by_key(&half.peer_static_public)
            }
            Ok(Packet::HandshakeResponse(r)) => st.peers.by_index(r.receiver_idx),
            Ok(Packet::PacketCookieReply(c)) => st.peers.by_index(c.receiver_idx),
            Ok(Packet::PacketData(d)) => st.peers.by_index(d.receiver_idx),
            Err(_) => return,
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
        let delivered = match peer.tunn.decapsulate(src.map(|a| a.ip()), packet, &mut buf) {
            TunnResult::Err(_) => return,
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
                to_nic(&vm.sock, &r);
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
                to_nic(&to.sock, &switch::to_vm(packet, to.mac));
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
            let mut out = lock(&self.relay_out);
            // A relay that cannot keep up drops packets, as a full link does.
            if out.len() + packet.len() + node.len() + 3 <= MAX_RELAY_BODY {
                relay_encode(&mut out, node, packet);
                self.relay_ready.notify_one();
            }
        }
    }

    /// The tunnels' timers: handshake retries and rekeys, keepalives.
    pub(super) fn timers(&self) {
        let mut guard = lock(&self.st);
        let st = &mut *guard;
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
    to_nic(&vm.sock, &switch::to_vm(&packet[..len], vm.mac));
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
