//! This machine itself on the overlay (`vmgrid appliance start --network grid`): a TAP device,
//! `vmgrid0`, with the address the pool gave the node (configured by the caller's
//! [`crate::ConfigureDevice`]: the appliance runs `ip`), put on the switch as a VM's NIC is. Its
//! frames pass the same rules (its own MAC and address only, ARP answered by the switch, IPv4
//! only to the pool's other nodes that are on the overlay themselves), so the machine reaches
//! those nodes, and they it, and no job's VM.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmgrid_proto::overlay::{NODE_PREFIX, OverlayHost, mac_of};

use super::{Nic, Overlay, Vm};
use crate::lock;

/// The device's name.
pub(super) const DEVICE: &str = "vmgrid0";
/// How long after a failed configuration the device is tried again.
const RETRY: Duration = Duration::from_secs(10);

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

impl Overlay {
    /// The pool's word on this node's own address and the other nodes on the overlay: the
    /// device takes the address (again, when the node registered anew and got another one) and
    /// is put on the switch only once that worked (retried every [`RETRY`] while it fails); its
    /// group is those nodes.
    pub(super) fn seat_host(&self, h: &OverlayHost) {
        let Some((tap, configure)) = &self.tap else { return };
        let group: HashSet<Ipv4Addr> = h.members.iter().map(|m| m.addr).collect();
        {
            let mut st = lock(&self.st);
            if st.host_addr == Some(h.addr) {
                if let Some(vm) = st.vms.get_mut(&h.addr) {
                    vm.group = group;
                }
                return;
            }
            if st.host_retry.is_some_and(|t| Instant::now() < t) {
                return;
            }
        }
        // Without the switch's lock: configuring takes milliseconds (`ip` runs).
        let mac = mac_of(h.addr);
        match configure(DEVICE, h.addr, NODE_PREFIX, mac) {
            Ok(()) => {
                let mut st = lock(&self.st);
                if let Some(old) = st.host_addr.replace(h.addr) {
                    st.vms.remove(&old);
                }
                st.host_retry = None;
                st.vms.insert(h.addr, Vm { mac, nic: Nic::Tap(tap.clone()), group });
                tracing::info!("this machine is {}/{NODE_PREFIX} on the pool's overlay ({DEVICE})", h.addr);
            }
            Err(e) => {
                tracing::error!("cannot put this machine on the pool's overlay as {}: {e}; trying again", h.addr);
                lock(&self.st).host_retry = Some(Instant::now() + RETRY);
            }
        }
    }

    /// Reads the device's frames into the switch, as from the VM at the node's address (none
    /// until the pool has given one: those frames are dropped).
    pub(super) fn tap_loop(self: &Arc<Self>, tap: Arc<File>) {
        let mut buf = [0u8; 2048];
        loop {
            match (&*tap).read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let addr = lock(&self.st).host_addr;
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
