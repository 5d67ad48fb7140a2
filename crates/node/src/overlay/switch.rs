//! The virtual switch's frame rules, as pure functions: what a VM's frame is allowed to be (ARP
//! for any overlay address, answered here as a proxy, and IPv4 from exactly its own MAC and
//! address) and the frames the switch hands a VM. Everything else is dropped, so a VM cannot
//! speak as another, reach the host, or send anything but IPv4 to its group.

use std::net::Ipv4Addr;

/// The MAC the switch answers ARP with and sends every frame from: the VMs' one gateway.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x47, 0, 0, 0, 1];

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

/// What the switch does with a frame from a VM.
#[derive(Debug, PartialEq, Eq)]
pub enum FromVm<'a> {
    /// Answer the VM with this frame (an ARP reply).
    Reply(Vec<u8>),
    /// An IPv4 packet from the VM's own address for `dst`.
    Ip { dst: Ipv4Addr, packet: &'a [u8] },
    /// Dropped, and why.
    Drop(&'static str),
}

/// Judges a frame from the VM whose MAC is `mac` and address `addr`.
pub fn from_vm(frame: &[u8], mac: [u8; 6], addr: Ipv4Addr) -> FromVm<'_> {
    if frame.len() < ETH_HEADER {
        return FromVm::Drop("runt frame");
    }
    if frame[6..12] != mac {
        return FromVm::Drop("source MAC is not the VM's");
    }
    match [frame[12], frame[13]] {
        ETHERTYPE_ARP => arp(&frame[ETH_HEADER..], mac, addr),
        ETHERTYPE_IPV4 => ipv4(&frame[ETH_HEADER..], addr),
        _ => FromVm::Drop("not IPv4 or ARP"),
    }
}

fn arp(p: &[u8], mac: [u8; 6], addr: Ipv4Addr) -> FromVm<'static> {
    // Ethernet/IPv4 ARP request: htype 1, ptype 0x0800, hlen 6, plen 4, op 1.
    if p.len() < 28 || p[..8] != [0, 1, 8, 0, 6, 4, 0, 1] {
        return FromVm::Drop("not an Ethernet/IPv4 ARP request");
    }
    let (sha, spa, tpa) = (&p[8..14], &p[14..18], &p[24..28]);
    if sha != mac || spa != addr.octets() {
        return FromVm::Drop("ARP from another MAC or address than the VM's");
    }
    if tpa == addr.octets() {
        return FromVm::Drop("ARP for the VM's own address");
    }
    let mut r = Vec::with_capacity(42);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&GATEWAY_MAC);
    r.extend_from_slice(&ETHERTYPE_ARP);
    r.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    r.extend_from_slice(&GATEWAY_MAC);
    r.extend_from_slice(tpa);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&addr.octets());
    FromVm::Reply(r)
}

fn ipv4(p: &[u8], addr: Ipv4Addr) -> FromVm<'_> {
    let Some((src, dst, len)) = ipv4_header(p) else { return FromVm::Drop("malformed IPv4 header") };
    if src != addr {
        return FromVm::Drop("IPv4 from another address than the VM's");
    }
    FromVm::Ip { dst, packet: &p[..len] }
}

/// An IPv4 packet's source, destination and total length, if its header is well formed.
pub fn ipv4_header(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, usize)> {
    if p.len() < 20 || p[0] >> 4 != 4 || (p[0] & 0x0f) < 5 {
        return None;
    }
    let len = u16::from_be_bytes([p[2], p[3]]) as usize;
    if len < (p[0] & 0x0f) as usize * 4 || len > p.len() {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    Some((src, dst, len))
}

/// The frame that hands `packet` to the VM whose MAC is `mac`.
pub fn to_vm(packet: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HEADER + packet.len());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&ETHERTYPE_IPV4);
    f.extend_from_slice(packet);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x47, 100, 64, 0, 2];
    const ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn ip_frame(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 24, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[1, 2, 3, 4]);
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&ETHERTYPE_IPV4);
        f.extend_from_slice(&p);
        f.extend_from_slice(&[0; 8]); // Ethernet padding, not part of the packet
        f
    }

    fn arp_request(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&sha);
        f.extend_from_slice(&ETHERTYPE_ARP);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa.octets());
        f
    }

    #[test]
    fn a_vm_gets_proxy_arp_and_sends_ipv4_only_as_itself() {
        let peer = Ipv4Addr::new(100, 64, 0, 3);
        let FromVm::Reply(r) = from_vm(&arp_request(MAC, ADDR, peer), MAC, ADDR) else { panic!("no ARP reply") };
        assert_eq!(&r[..6], &MAC);
        assert_eq!(&r[22..28], &GATEWAY_MAC, "the gateway answers for every address");
        assert_eq!(&r[28..32], &peer.octets());
        let f = ip_frame(MAC, ADDR, peer);
        assert_eq!(from_vm(&f, MAC, ADDR), FromVm::Ip { dst: peer, packet: &f[14..38] });
        assert_eq!(&to_vm(&f[14..38], MAC)[14..], &f[14..38]);
    }

    #[test]
    fn spoofed_and_foreign_frames_are_dropped() {
        let peer = Ipv4Addr::new(100, 64, 0, 3);
        let other_mac = [0x52, 0x47, 100, 64, 0, 3];
        for (f, why) in [
            (ip_frame(other_mac, ADDR, peer), "another MAC"),
            (ip_frame(MAC, peer, ADDR), "another address"),
            (arp_request(MAC, peer, ADDR), "ARP claiming another address"),
            (arp_request(MAC, ADDR, ADDR), "ARP for itself"),
            (vec![0; 10], "runt"),
        ] {
            assert!(matches!(from_vm(&f, MAC, ADDR), FromVm::Drop(_)), "{why}");
        }
        let mut v6 = ip_frame(MAC, ADDR, peer);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(matches!(from_vm(&v6, MAC, ADDR), FromVm::Drop(_)), "IPv6");
        let mut long = ip_frame(MAC, ADDR, peer);
        long[16..18].copy_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(from_vm(&long, MAC, ADDR), FromVm::Drop(_)), "a length past the frame");
    }
}
