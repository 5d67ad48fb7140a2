//! The pool's virtual network (`network = "grid"`): TCP throughput and ping round trips between
//! two guest-kit VMs (TCG) on two node processes, over the overlay's direct path (WireGuard over
//! UDP on loopback) and through the coordinator's relay (the nodes told to use it alone), beside
//! the same two VMs joined by QEMU's plain socket networking (`-netdev dgram` over UDP on
//! loopback, no vmgrid in between). The guests measure themselves: `ping` for the round trip,
//! `/proc/uptime` around a bulk `nc` transfer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmgrid_proto::{JobSpec, JobState, SpecFiles, SubmitRequest};

use crate::pool::Pool;

/// MiB the bulk transfer sends.
const BULK_MIB: u32 = 64;

/// Instance 0 sends `BULK_MIB` MiB to whoever connects to its TCP port 5000; instance 1 pings it,
/// then receives the lot (its console never ends its input, so it reads until the sender closes)
/// and writes `result.txt`: `rtt MIN/AVG/MAX` and `bulk BYTES SECONDS`.
const NET_SH: &str = r#"first=$(echo "$VMGRID_PEERS" | cut -d, -f1)
if [ "$ROLE" = 0 ]; then
  dd if=/dev/zero bs=64k count=$((MIB * 16)) 2> /dev/null | nc -l -p 5000
else
  until ping -c 1 -W 1 "$first" > /dev/null 2>&1; do sleep 0.2; done
  rtt=$(ping -c 10 "$first" | tail -1 | sed 's/.*= //; s/ ms//')
  want=$((MIB * 1048576)); n=0
  while [ "$n" != "$want" ]; do
    t0=$(cut -d' ' -f1 /proc/uptime)
    n=$(( $(nc "$first" 5000 | wc -c) ))
    t1=$(cut -d' ' -f1 /proc/uptime)
    [ "$n" = "$want" ] || sleep 0.2
  done
  echo "rtt $rtt" > /job/result.txt
  echo "bulk $n $(echo "$t1 $t0" | awk '{print $1 - $2}')" >> /job/result.txt
fi
"#;

/// One way of joining the VMs: MiB/s of the bulk transfer and the mean ping round trip (ms).
pub struct Net {
    pub mib_s: f64,
    pub rtt_ms: f64,
}

fn parse(result: &str) -> Result<Net, String> {
    let field = |k: &str| result.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
    let rtt = field("rtt ").and_then(|r| r.split('/').nth(1)).and_then(|a| a.parse::<f64>().ok());
    let bulk = field("bulk ").and_then(|b| b.split_whitespace().nth(1)).and_then(|b| b.parse::<f64>().ok());
    match (rtt, bulk) {
        (Some(rtt_ms), Some(s)) if s > 0.0 => Ok(Net { mib_s: f64::from(BULK_MIB) / s, rtt_ms }),
        _ => Err(format!("the guest's result is unreadable: {result:?}")),
    }
}

fn kit(root: &Path) -> Result<(PathBuf, PathBuf), String> {
    let kit = root.join("guest-kit/out");
    let (k, i) = (kit.join("vmlinuz"), kit.join("initrd.gz"));
    if !k.exists() {
        return Err("guest-kit/out is missing; run scripts/bench".into());
    }
    Ok((k, i))
}

/// Two grid VMs on two nodes of a pool; through the relay alone when `relay`.
pub fn overlay(root: &Path, relay: bool) -> Result<Net, String> {
    let (kernel, initrd) = kit(root)?;
    let env: &[(&str, &str)] = if relay { &[("VMGRID_TEST_ONLY_OVERLAY_RELAY", "1")] } else { &[] };
    let pool = Pool::separate_env(root, 2, &[], env);
    let c = &pool.client;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let script = dir.path().join("net.sh");
    std::fs::write(&script, NET_SH).map_err(|e| e.to_string())?;
    let up = |p: &Path, name: &str| c.upload_file(p, name).map_err(|e| e.to_string());
    let files = SpecFiles {
        image: None,
        kernel: Some(up(&kernel, "vmlinuz")?),
        initrd: Some(up(&initrd, "initrd.gz")?),
        inputs: vec![up(&script, "net.sh")?],
    };
    let job = vmgrid_job::parse_job(
        &dir.path().join("net.toml"),
        &format!(
            "name = \"net\"\n[vm]\ntype = \"qemu\"\nkernel = \"vmlinuz\"\ninitrd = \"initrd.gz\"\nappend = \"console=ttyS0 quiet\"\n\
             network = \"grid\"\nargs = [\"sh\", \"net.sh\"]\nenv = {{ ROLE = \"{{index}}\", MIB = \"{BULK_MIB}\" }}\n\
             [resources]\nmemory_mb = 128\ntimeout_s = 600\ndisk_mb = 8\n[files]\ninputs = [\"net.sh\"]\noutputs = [\"result.txt\"]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let spec = JobSpec { group: Some(2), ..JobSpec::from_job(&job, files) };
    let ids = c.submit(&SubmitRequest { spec, count: 2 }).map_err(|e| e.to_string())?.ids;
    for id in &ids {
        let v = c.wait(*id, Duration::from_secs(900)).map_err(|e| e.to_string())?;
        if v.state != JobState::Completed || v.exit_code != Some(0) {
            return Err(format!("job {id} ended {} ({:?}): {:?}", v.state.as_str(), v.exit_code, v.reason));
        }
    }
    // The path the nodes said they used: what this row claims to measure.
    let want = if relay { vmgrid_proto::overlay::Path::Relay } else { vmgrid_proto::overlay::Path::Direct };
    let paths: Vec<_> = c.net().map_err(|e| e.to_string())?.into_iter().flat_map(|v| v.paths).collect();
    if paths.is_empty() || paths.iter().any(|p| p.path != want) {
        return Err(format!("the nodes' paths were {paths:?}, not {}", want.as_str()));
    }
    let r = c.job(ids[1]).map_err(|e| e.to_string())?;
    let out = r.outputs.iter().find(|f| f.path == "result.txt").ok_or("no result.txt")?;
    let dest = dir.path().join("result.txt");
    c.fetch_file(out, &dest).map_err(|e| e.to_string())?;
    parse(&std::fs::read_to_string(&dest).map_err(|e| e.to_string())?)
}

/// The same two VMs joined by QEMU's socket networking alone: each sends its frames in UDP
/// datagrams to the other's QEMU on loopback.
pub fn plain_socket(root: &Path) -> Result<Net, String> {
    let (kernel, initrd) = kit(root)?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ports = [free_udp_port()?, free_udp_port()?];
    let peers = "100.64.0.1,100.64.0.2";
    let mut vms = Vec::new();
    for role in 0..2usize {
        let share = dir.path().join(format!("vm{role}"));
        std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
        std::fs::write(share.join("net.sh"), NET_SH).map_err(|e| e.to_string())?;
        let netdev = format!(
            "dgram,id=n,local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1,remote.port={}",
            ports[role],
            ports[1 - role]
        );
        let append = format!(
            "console=ttyS0 quiet panic=-1 ROLE={role} MIB={BULK_MIB} VMGRID_ADDR=100.64.0.{}/10 VMGRID_PEERS={peers} -- sh net.sh",
            role + 1
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ]);
        cmd.args(["-no-reboot", "-serial", "null", "-netdev", &netdev]);
        cmd.args(["-device", &format!("virtio-net-pci,netdev=n,mac=52:47:64:40:00:0{}", role + 1)]);
        let fsdev = format!("local,id=job,path={},security_model=mapped-xattr", share.display());
        cmd.args(["-fsdev", &fsdev, "-device", "virtio-9p-pci,fsdev=job,mount_tag=vmgrid"]);
        cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd).args(["-append", &append]);
        vms.push(cmd.spawn().map_err(|e| format!("qemu-system-x86_64: {e}"))?);
    }
    for mut vm in vms {
        vm.wait().map_err(|e| e.to_string())?;
    }
    parse(&std::fs::read_to_string(dir.path().join("vm1/result.txt")).map_err(|e| format!("vm1's result: {e}"))?)
}

fn free_udp_port() -> Result<u16, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.port())
}
