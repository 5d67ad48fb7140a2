//! This machine itself on the overlay (`vmgrid appliance start --network grid`): a TAP device,
//! `vmgrid0`, with the address the pool gave the node, put on the switch as a VM's NIC is. Its
//! frames pass the same rules (its own MAC and address only, ARP answered by the switch, IPv4
//! only to the pool's other nodes that are on the overlay themselves), so the machine reaches
//! those nodes, and they it, and no job's VM.

use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;

use vmgrid_proto::overlay::{OverlayHost, PREFIX, mac_of};

use super::{Nic, Overlay, State, Vm};

/// The device's name.
pub(super) const DEVICE: &str = "vmgrid0";
/// As the guest kit sets a grid VM's NIC: room for WireGuard's headers in a 1500-byte path.
const MTU: &str = "1400";

/// Creates the TAP device (frames without a packet-information header).
pub(super) fn open_tap() -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot open /dev/net/tun (is the `tun` module loaded?): {e}"))
    })?;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req =
        IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..DEVICE.len()].copy_from_slice(DEVICE.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out (name, then
    // the flags at the union's start, padded to the union's 24 bytes); `req` outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("cannot create the TAP device {DEVICE}: {e}")));
    }
    Ok(file)
}

/// Gives the device the node's address (and the MAC the switch expects of it) and brings it up;
/// the overlay's whole range is routed through it.
pub(super) fn configure(addr: Ipv4Addr) -> std::io::Result<()> {
    let m = mac_of(addr);
    let mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
    let cidr = format!("{addr}/{PREFIX}");
    // IPv6 is never forwarded: no link-local chatter for the switch to drop.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6"), "1");
    let steps: [&[&str]; 5] = [
        &["link", "set", "dev", DEVICE, "down"],
        &["link", "set", "dev", DEVICE, "address", &mac, "mtu", MTU],
        &["addr", "flush", "dev", DEVICE],
        &["addr", "add", &cidr, "dev", DEVICE],
        &["link", "set", "dev", DEVICE, "up"],
    ];
    for args in steps {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run `ip` to configure {DEVICE}: {e}")))?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

impl Overlay {
    /// The pool's word on this node's own address and the other nodes on the overlay: the
    /// device takes the address (again, when the node registered anew and got another one), and
    /// its group is those nodes.
    pub(super) fn seat_host(&self, st: &mut State, tap: &Arc<File>, h: &OverlayHost) {
        if st.host_addr != Some(h.addr) {
            if let Some(old) = st.host_addr.take() {
                st.vms.remove(&old);
            }
            // Said once per address: a device that cannot be configured is not retried.
            st.host_addr = Some(h.addr);
            match configure(h.addr) {
                Ok(()) => tracing::info!("this machine is {} on the pool's overlay ({DEVICE})", h.addr),
                Err(e) => {
                    tracing::error!("cannot put this machine on the pool's overlay as {}: {e}", h.addr);
                    return;
                }
            }
        }
        let group = h.members.iter().map(|m| m.addr).collect();
        st.vms.insert(h.addr, Vm { mac: mac_of(h.addr), sock: Nic::Tap(tap.clone()), group });
    }

    /// Reads the device's frames into the switch, as from the VM at the node's address (none
    /// until the pool has given one: those frames are dropped).
    pub(super) fn tap_loop(self: &Arc<Self>, tap: Arc<File>) {
        let mut buf = [0u8; 2048];
        loop {
            match (&*tap).read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let addr = super::lock(&self.st).host_addr;
                    if let Some(addr) = addr {
                        self.on_frame(addr, &buf[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("the overlay's device {DEVICE} failed: {e}");
                    return;
                }
            }
        }
    }
}
