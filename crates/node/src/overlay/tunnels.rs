//! The WireGuard tunnels to other nodes (boringtun's `Tunn`, one per peer node) and the path each
//! packet takes: straight to the peer's endpoint over UDP while packets come back that way, else
//! through the pool's relay. WireGuard refuses replayed packets, so a packet sent both ways while
//! a path is being tried arrives once. Every tunnel shares one handshake rate limiter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use vmgrid_proto::overlay::{Path, PeerPath};

/// A direct path is alive while a packet came over it this recently (keepalives go every
/// [`KEEPALIVE_S`] seconds).
const ALIVE: Duration = Duration::from_secs(3);
/// For this long after a tunnel starts, packets go both ways: directly (to punch through the
/// NATs) and through the relay (in case that never works).
const TRYING: Duration = Duration::from_secs(3);
const KEEPALIVE_S: u16 = 1;
/// The handshake messages a node takes in a second (from anyone, over UDP or the relay) before
/// each sender must prove, with a cookie, that it receives at the address it sends from
/// (boringtun's own device takes 100). Each message that reaches a tunnel is counted twice: once
/// before the tunnel is looked up (`wire.rs`), once by the tunnel.
pub(super) const HANDSHAKES_PER_S: u64 = 100;

pub(super) struct Peer {
    pub key: [u8; 32],
    pub tunn: Tunn,
    index: u32,
    /// Where its packets come from (authenticated), or else where the pool's reflector saw it.
    pub endpoint: Option<SocketAddr>,
    created: Instant,
    last_direct: Option<Instant>,
    last_rx: Option<Instant>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Where one wire packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Route {
    pub direct: Option<SocketAddr>,
    pub relay: bool,
}

impl Peer {
    pub fn new(
        secret: &StaticSecret,
        key: [u8; 32],
        index: u32,
        endpoint: Option<SocketAddr>,
        limiter: Arc<RateLimiter>,
    ) -> Peer {
        let keepalive = Some(KEEPALIVE_S);
        let tunn = Tunn::new(secret.clone(), PublicKey::from(key), None, keepalive, index, Some(limiter));
        Peer {
            key,
            tunn,
            index,
            endpoint,
            created: Instant::now(),
            last_direct: None,
            last_rx: None,
            tx_bytes: 0,
            rx_bytes: 0,
        }
    }

    fn direct_alive(&self) -> bool {
        self.last_direct.is_some_and(|t| t.elapsed() < ALIVE)
    }

    /// The way `packet` (a WireGuard packet for this peer) goes.
    pub fn route(&self, packet: &[u8]) -> Route {
        let Some(ep) = self.endpoint else { return Route { direct: None, relay: true } };
        if self.direct_alive() {
            return Route { direct: Some(ep), relay: false };
        }
        // Handshakes and keepalives also try the direct path, so it is found again once the
        // NATs let it through; the rest goes direct only while it is being tried.
        let probe = packet.first() == Some(&1) || packet.len() == 32;
        let trying = self.created.elapsed() < TRYING;
        Route { direct: (trying || probe).then_some(ep), relay: true }
    }

    /// A packet from it was authenticated: over UDP from `from`, or through the relay.
    pub fn heard(&mut self, from: Option<SocketAddr>) {
        let now = Instant::now();
        self.last_rx = Some(now);
        if let Some(addr) = from {
            self.last_direct = Some(now);
            self.endpoint = Some(addr);
        }
    }

    pub fn path(&self) -> Path {
        if self.direct_alive() {
            Path::Direct
        } else if self.last_rx.is_some_and(|t| t.elapsed() < ALIVE) {
            Path::Relay
        } else {
            Path::Connecting
        }
    }
}

/// The tunnels, by peer node.
#[derive(Default)]
pub(super) struct Peers {
    by_node: HashMap<String, Peer>,
    next_index: u32,
    /// The handshake rate limiter all tunnels share, and the public key it checks `mac1` for.
    limiter: Option<([u8; 32], Arc<RateLimiter>)>,
}

impl Peers {
    /// The handshake rate limiter for this node's key `public`, made anew when the key changes.
    pub fn limiter(&mut self, public: &[u8; 32]) -> Arc<RateLimiter> {
        match &self.limiter {
            Some((k, l)) if k == public => l.clone(),
            _ => {
                let l = Arc::new(RateLimiter::new(&PublicKey::from(*public), HANDSHAKES_PER_S));
                self.limiter = Some((*public, l.clone()));
                l
            }
        }
    }

    /// Starts the rate limiter's next second, if a second has passed since the last one began.
    pub fn reset_limiter(&self) {
        if let Some((_, l)) = &self.limiter {
            l.reset_count();
        }
    }

    pub fn get_mut(&mut self, node: &str) -> Option<&mut Peer> {
        self.by_node.get_mut(node)
    }

    /// The tunnel whose local index is `receiver_idx`'s (its upper 24 bits).
    pub fn by_index(&mut self, receiver_idx: u32) -> Option<(&String, &mut Peer)> {
        self.by_node.iter_mut().find(|(_, p)| p.index == receiver_idx >> 8)
    }

    pub fn by_key(&mut self, key: &[u8; 32]) -> Option<(&String, &mut Peer)> {
        self.by_node.iter_mut().find(|(_, p)| &p.key == key)
    }

    /// Starts a tunnel to `node` (replacing one under another key); returns it if it is new.
    pub fn ensure(
        &mut self,
        secret: &StaticSecret,
        node: &str,
        key: [u8; 32],
        endpoint: Option<SocketAddr>,
    ) -> Option<&mut Peer> {
        if let Some(p) = self.by_node.get_mut(node)
            && p.key == key
        {
            // The reflector's view is only a fallback for the address packets really come from.
            if !p.direct_alive() && endpoint.is_some() {
                p.endpoint = endpoint;
            }
            return None;
        }
        // A key another node's tunnel has already is refused: handshakes are matched to tunnels
        // by key, so a node claiming another's key could take that node's handshakes.
        if self.by_node.iter().any(|(n, p)| n != node && p.key == key) {
            tracing::warn!(node, "a peer's WireGuard key is another peer's; no tunnel to it");
            return None;
        }
        self.next_index = (self.next_index + 1) & 0x00ff_ffff;
        let limiter = self.limiter(PublicKey::from(secret).as_bytes());
        let peer = Peer::new(secret, key, self.next_index, endpoint, limiter);
        self.by_node.insert(node.to_string(), peer);
        self.by_node.get_mut(node)
    }

    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.by_node.retain(|n, _| keep(n));
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_node.clear();
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Peer)> {
        self.by_node.iter_mut()
    }

    pub fn paths(&self) -> Vec<PeerPath> {
        let mut v: Vec<PeerPath> = self
            .by_node
            .iter()
            .map(|(n, p)| PeerPath { node: n.clone(), path: p.path(), tx_bytes: p.tx_bytes, rx_bytes: p.rx_bytes })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_another_peer_has_gets_no_tunnel() {
        let secret = StaticSecret::from([1u8; 32]);
        let key = |b: u8| PublicKey::from(&StaticSecret::from([b; 32])).to_bytes();
        let mut peers = Peers::default();
        assert!(peers.ensure(&secret, "b", key(2), None).is_some(), "a new peer gets a tunnel");
        assert!(peers.ensure(&secret, "impostor", key(2), None).is_none(), "b's key under another name");
        assert!(peers.get_mut("impostor").is_none());
        assert_eq!(peers.by_key(&key(2)).map(|(n, _)| n.clone()).as_deref(), Some("b"));
        assert!(peers.ensure(&secret, "c", key(3), None).is_some());
    }

    #[test]
    fn every_tunnel_shares_the_rate_limiter_of_the_nodes_key_of_now() {
        let mut peers = Peers::default();
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let first = peers.limiter(&k1);
        assert!(Arc::ptr_eq(&first, &peers.limiter(&k1)));
        // A new key (the node registered again): a new limiter, checking mac1 for that key.
        assert!(!Arc::ptr_eq(&first, &peers.limiter(&k2)));
    }
}
