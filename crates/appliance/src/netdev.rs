//! The appliance's own device on the pool's overlay (`--network grid`): the node agent makes the
//! TAP device and hands it to this to configure, with busybox's `ip`.

use std::net::Ipv4Addr;
use std::process::Command;

/// As the guest kit sets a grid VM's NIC: room for WireGuard's headers in a 1500-byte path.
const MTU: &str = "1400";

/// Gives `device` its address on the overlay and the MAC the node's switch expects of it, routes
/// only the `prefix` part of the range through it, and brings it up ([`vmgrid_node::ConfigureDevice`]).
pub fn configure(device: &str, addr: Ipv4Addr, prefix: u8, mac: [u8; 6]) -> std::io::Result<()> {
    let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let cidr = format!("{addr}/{prefix}");
    // IPv6 is never forwarded: no link-local chatter for the switch to drop.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{device}/disable_ipv6"), "1");
    let steps: [&[&str]; 5] = [
        &["link", "set", "dev", device, "down"],
        &["link", "set", "dev", device, "address", &mac, "mtu", MTU],
        &["addr", "flush", "dev", device],
        &["addr", "add", &cidr, "dev", device],
        &["link", "set", "dev", device, "up"],
    ];
    for args in steps {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run `ip` to configure {device}: {e}")))?;
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
