//! The pool's virtual network (`network = "grid"`) on the wire: each grid job's address, what a
//! node tells the pool about its end of the overlay and what it hears back (its VMs' groups, where
//! their members run, the other nodes' WireGuard keys and observed endpoints), the packets the
//! pool relays between nodes that cannot reach each other directly, and what `vmgrid net` shows.
//!
//! Addresses are a function of the job id, which the pool's store keeps: a job's address is as
//! durable as the job, and the same on every node without a call.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The overlay's range: 100.64.0.0/10 (shared address space, RFC 6598), never a site's own LAN.
pub const NET: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
pub const PREFIX: u8 = 10;
/// The addresses a job can have: the range's first 63 /16s but its first address
/// (100.64.0.1 to 100.126.255.255).
pub const HOSTS: u64 = (1 << (32 - PREFIX as u64)) - (1 << 16) - 1;
/// The range's last /16 is the nodes' that are on the overlay themselves (appliances started
/// with `--network grid`): 100.127.0.1 to 100.127.255.254.
pub const NODE_NET: Ipv4Addr = Ipv4Addr::new(100, 127, 0, 0);
/// A node on the overlay routes only this part of the range to it: the rest of 100.64.0.0/10 may
/// be a site's own (a pool reached over a Tailscale-style network, say).
pub const NODE_PREFIX: u8 = 16;
pub const NODE_ADDRS: u32 = (1 << 16) - 2;

/// The `i`th address a node on the overlay can have (`i < NODE_ADDRS`).
pub fn node_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(NODE_NET) + 1 + i % NODE_ADDRS)
}

/// Whether `a` is an address of [`NODE_NET`] a node can have.
pub fn is_node_addr(a: Ipv4Addr) -> bool {
    let a = u32::from(a);
    a > u32::from(NODE_NET) && a <= u32::from(NODE_NET) + NODE_ADDRS
}

/// The most VMs one job group has.
pub const MAX_GROUP: u32 = vmgrid_job::limits::MAX_GROUP;

/// The address of grid job `job_id`. The members of a group (consecutive ids) never share one;
/// jobs whose ids differ by a multiple of [`HOSTS`] do, and the pool never runs two such at once.
pub fn addr_of(job_id: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(NET) + 1 + (job_id % HOSTS) as u32)
}

/// The MAC of the VM at `addr`: locally administered, unicast, and the address's four bytes.
pub fn mac_of(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x52, 0x47, o[0], o[1], o[2], o[3]]
}

/// The members of the group of job `job_id`, instance `index` of a submit whose spec says
/// `group` (instances 0..group-1 of one submit are one group; a job without one is alone).
pub fn group_of(job_id: u64, index: u64, group: Option<u32>) -> Vec<u64> {
    match group {
        Some(n) if index < u64::from(n) => {
            let first = job_id - index;
            (first..first + u64::from(n)).collect()
        }
        _ => vec![job_id],
    }
}

/// A node's part of the overlay, in its ad: its WireGuard key, registered with its credential
/// (a hello must carry this key), and whether the node itself is on the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeOverlay {
    /// The node's WireGuard public key (x25519, 64 hex digits); a new one at each registration.
    pub key: String,
    /// The node itself is on the overlay (an appliance started with `--network grid`): it
    /// reaches, and is reached by, the other nodes that are, and no job's VM.
    #[serde(default)]
    pub host: bool,
    /// Its address on the overlay when `host`: the pool gives it at registration (what a node
    /// says here is ignored) and keeps it while the node is in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub addr: Option<Ipv4Addr>,
}

impl NodeOverlay {
    pub fn check(&self) -> Result<(), String> {
        if parse_key(&self.key).is_none() {
            return Err("`overlay.key` must be 64 hex digits (an x25519 public key)".into());
        }
        if self.addr.is_some_and(|a| !is_node_addr(a)) {
            return Err(format!("`overlay.addr` is in {NODE_NET}/16"));
        }
        Ok(())
    }
}

/// What a node says about its end of the overlay, about once a second while it runs grid jobs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OverlayHello {
    /// The node's WireGuard public key (x25519, 64 hex digits); a new one each time it registers.
    pub key: String,
    /// Its UDP endpoint as the pool's reflector saw it (`ip:port`), if it has heard back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The reflector's token for that endpoint (hex), from the same reply: the pool hands the
    /// endpoint to other nodes only if the token is its own for that address and a few minutes
    /// old at most, so a node cannot send its peers' packets to an address it does not receive at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_token: Option<String>,
    /// How it reaches each node it has a tunnel with.
    #[serde(default)]
    pub paths: Vec<PeerPath>,
}

/// How one node reaches another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerPath {
    pub node: String,
    pub path: Path,
    /// Bytes sent to and received from it through the tunnel (the VMs' packets).
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default)]
    pub rx_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// UDP straight to its endpoint (through both NATs).
    Direct,
    /// Through the pool, over both nodes' connections to it (the pool sees ciphertext only).
    Relay,
    /// No packet from it yet.
    Connecting,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
            Path::Connecting => "connecting",
        }
    }
}

/// The pool's answer to a hello: the groups of the node's running grid jobs and the nodes that
/// run their other members.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayMap {
    pub groups: Vec<OverlayGroup>,
    pub peers: Vec<OverlayPeer>,
    /// For a node that is on the overlay itself: its address and the other such nodes'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<OverlayHost>,
}

/// The nodes that are on the overlay themselves: each reaches the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayHost {
    /// The asking node's own address.
    #[schema(value_type = String)]
    pub addr: Ipv4Addr,
    /// Every such node now (the asking one too).
    pub members: Vec<OverlayHostMember>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayHostMember {
    #[schema(value_type = String)]
    pub addr: Ipv4Addr,
    pub node: String,
}

/// One of the node's running grid jobs and the members of its group that run now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayGroup {
    pub job_id: u64,
    pub members: Vec<OverlayMember>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayMember {
    pub job_id: u64,
    #[schema(value_type = String)]
    pub addr: Ipv4Addr,
    pub node: String,
}

/// Another node this one may need a tunnel to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayPeer {
    pub node: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A node's end of the overlay, as `vmgrid net` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetView {
    pub node: String,
    pub key: String,
    pub endpoint: Option<String>,
    pub paths: Vec<PeerPath>,
}

/// A WireGuard key as text: 64 hex digits.
pub fn key_hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_key(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

impl OverlayHello {
    pub fn check(&self) -> Result<(), String> {
        if parse_key(&self.key).is_none() {
            return Err("`key` must be 64 hex digits (an x25519 public key)".into());
        }
        if let Some(e) = &self.endpoint
            && e.parse::<SocketAddr>().is_err()
        {
            return Err(format!("`endpoint` {e:?} is not ip:port"));
        }
        if let Some(t) = &self.endpoint_token
            && (t.len() > MAX_TOKEN_HEX || !t.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("`endpoint_token` must be at most {MAX_TOKEN_HEX} hex digits"));
        }
        if self.paths.len() > 4096 {
            return Err("at most 4096 paths".into());
        }
        for p in &self.paths {
            crate::check_node_name(&p.node)?;
        }
        Ok(())
    }
}

/// A node's probe to the pool's UDP reflector (on the API's port number), padded to
/// [`PROBE_LEN`]: the reply is never longer than the probe, so the reflector amplifies nothing.
pub const PROBE_MAGIC: &[u8] = b"VMGRID?";
/// Room for the longest reply: its magic, an IPv6 `[ip%scope]:port` (58 bytes), a space and a
/// token of [`MAX_TOKEN_HEX`] digits.
pub const PROBE_LEN: usize = 160;
/// The reflector's reply: this, then the probe's source `ip:port` as the pool saw it, a space,
/// and the pool's token for that address (hex digits), which the node says in its hello.
pub const REPLY_MAGIC: &[u8] = b"VMGRID!";
/// The longest token, in hex digits.
pub const MAX_TOKEN_HEX: usize = 64;

/// The reflector's reply to a probe it saw come from `seen`, with its token for that address.
pub fn reply_encode(seen: &str, token: &str) -> Vec<u8> {
    let mut reply = REPLY_MAGIC.to_vec();
    reply.extend_from_slice(seen.as_bytes());
    reply.push(b' ');
    reply.extend_from_slice(token.as_bytes());
    reply
}

/// The address and token in a reflector's reply, if it is one and well formed.
pub fn reply_decode(packet: &[u8]) -> Option<(SocketAddr, String)> {
    let text = std::str::from_utf8(packet.strip_prefix(REPLY_MAGIC)?).ok()?;
    let (seen, token) = text.split_once(' ')?;
    let well_formed = !token.is_empty() && token.len() <= MAX_TOKEN_HEX;
    if !well_formed || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((seen.parse().ok()?, token.to_string()))
}

/// The largest packet the pool relays (a WireGuard packet of a 1420-byte MTU and its headers).
pub const MAX_RELAY_PACKET: usize = 2048;
/// The most bytes one relay call carries.
pub const MAX_RELAY_BODY: usize = 1 << 20;

/// Relayed packets in one body: each is the other node's name (a byte of length, then the
/// name), the packet's length (two bytes, big-endian) and the packet. Sent, the name is the
/// node it goes to; received, the node it came from.
pub fn relay_encode(out: &mut Vec<u8>, node: &str, packet: &[u8]) {
    let name = &node.as_bytes()[..node.len().min(255)];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&(packet.len().min(MAX_RELAY_PACKET) as u16).to_be_bytes());
    out.extend_from_slice(&packet[..packet.len().min(MAX_RELAY_PACKET)]);
}

/// The packets of a relay body, or why it is malformed.
pub fn relay_decode(mut body: &[u8]) -> Result<Vec<(String, &[u8])>, String> {
    if body.len() > MAX_RELAY_BODY {
        return Err(format!("a relay body is at most {MAX_RELAY_BODY} bytes"));
    }
    let mut out = Vec::new();
    while let Some((&n, rest)) = body.split_first() {
        let n = n as usize;
        if rest.len() < n + 2 {
            return Err("a relay body ends inside a packet's header".into());
        }
        let name = std::str::from_utf8(&rest[..n]).map_err(|_| "a node name is not UTF-8".to_string())?;
        let len = u16::from_be_bytes([rest[n], rest[n + 1]]) as usize;
        if len > MAX_RELAY_PACKET || rest.len() < n + 2 + len {
            return Err("a relayed packet is too long or cut short".into());
        }
        out.push((name.to_string(), &rest[n + 2..n + 2 + len]));
        body = &rest[n + 2 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_inside_the_range_and_groups_are_one_submits_instances() {
        assert_eq!(addr_of(0), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(addr_of(HOSTS - 1), Ipv4Addr::new(100, 126, 255, 255));
        assert_eq!(addr_of(HOSTS), addr_of(0));
        assert!((0..HOSTS).step_by(997).all(|i| !is_node_addr(addr_of(i))), "jobs and nodes never share");
        assert_eq!(node_addr(0), Ipv4Addr::new(100, 127, 0, 1));
        assert_eq!(node_addr(NODE_ADDRS - 1), Ipv4Addr::new(100, 127, 255, 254));
        assert!(is_node_addr(node_addr(NODE_ADDRS - 1)) && !is_node_addr(Ipv4Addr::new(100, 127, 255, 255)));
        assert_eq!(mac_of(Ipv4Addr::new(100, 64, 0, 9)), [0x52, 0x47, 100, 64, 0, 9]);
        assert_eq!(group_of(12, 2, Some(3)), vec![10, 11, 12]);
        assert_eq!(group_of(12, 2, None), vec![12]);
    }

    #[test]
    fn relay_bodies_round_trip_and_bad_ones_are_refused() {
        let mut b = Vec::new();
        relay_encode(&mut b, "n1", b"abc");
        relay_encode(&mut b, "node-2", &[]);
        let d = relay_decode(&b).unwrap();
        assert_eq!(d, vec![("n1".to_string(), &b"abc"[..]), ("node-2".to_string(), &b""[..])]);
        assert!(relay_decode(&b[..b.len() - 1]).is_err());
        assert!(relay_decode(&[5, b'a']).is_err());
        assert_eq!(parse_key(&key_hex(&[7; 32])), Some([7; 32]));
        assert!(parse_key("zz").is_none());
    }

    #[test]
    fn a_reflector_reply_round_trips_and_the_longest_fits_in_a_probe() {
        let token = "ab".repeat(MAX_TOKEN_HEX / 2);
        let reply = reply_encode("10.0.0.1:7", &token);
        assert_eq!(reply_decode(&reply), Some(("10.0.0.1:7".parse().unwrap(), token.clone())));
        let longest = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535";
        assert!(longest.parse::<SocketAddr>().is_ok());
        assert!(reply_encode(longest, &token).len() <= PROBE_LEN);
        // No token, a token that is not hex, or no reply at all: nothing.
        assert_eq!(reply_decode(b"VMGRID!10.0.0.1:7"), None);
        assert_eq!(reply_decode(&reply_encode("10.0.0.1:7", "xyz")), None);
        assert_eq!(reply_decode(&reply_encode("10.0.0.1:7", "")), None);
        assert_eq!(reply_decode(b"VMGRID?10.0.0.1:7 ab"), None);
    }
}
