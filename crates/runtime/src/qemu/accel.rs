//! Which accelerator boots guests here. KVM is used only when a tiny guest really boots with it;
//! otherwise TCG. The answer is cached, keyed by the QEMU binary and the host kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::capture::{CaptureSink, Echo};
use crate::process::{Supervised, Waited};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A boot sector that writes 0x2a to the isa-debug-exit port, so QEMU exits with (0x2a << 1) | 1.
fn probe_boot_sector() -> Vec<u8> {
    let mut sector = vec![0u8; 512];
    // mov al, 0x2a; out 0xf4, al; hlt; jmp $-1
    sector[..7].copy_from_slice(&[0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}
const PROBE_EXIT: i32 = (0x2a << 1) | 1;
const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// `VMGRID_ACCEL=kvm|tcg` overrides the probe; otherwise the cached or fresh probe answer.
pub fn choose(qemu: &Path, cache_dir: &Path) -> Accel {
    match std::env::var("VMGRID_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let key = cache_key(qemu);
    let file = cache_dir.join("accel-probe");
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Some((k, v)) = text.trim().split_once('=')
        && k == key
    {
        return if v == "kvm" { Accel::Kvm } else { Accel::Tcg };
    }
    let accel = probe(qemu);
    let _ = std::fs::create_dir_all(cache_dir);
    let _ = std::fs::write(&file, format!("{key}={}\n", accel.as_str()));
    tracing::info!(accel = accel.as_str(), "accelerator probe");
    accel
}

fn cache_key(qemu: &Path) -> String {
    let meta = std::fs::metadata(qemu).ok();
    let (len, mtime) = meta
        .map(|m| {
            (
                m.len(),
                m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs()),
            )
        })
        .unwrap_or((0, 0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{}:{len}:{mtime}:{}", qemu.display(), kernel.trim()).replace('=', "_")
}

/// KVM if /dev/kvm opens and the probe sector boots with it, else TCG.
pub fn probe(qemu: &Path) -> Accel {
    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm_usable && boots(qemu, Accel::Kvm) { Accel::Kvm } else { Accel::Tcg }
}

/// Boots the probe sector with `accel` and reports whether it ran to its exit port in time.
pub fn boots(qemu: &Path, accel: Accel) -> bool {
    let Ok(dir) = tempfile::tempdir() else { return false };
    let disk: PathBuf = dir.path().join("probe.img");
    if std::fs::write(&disk, probe_boot_sector()).is_err() {
        return false;
    }
    let mut cmd = Command::new(qemu);
    // The probe runs with the CPU model the runtime would use with this accelerator.
    if accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    cmd.args(["-accel", accel.as_str(), "-M", "pc", "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", disk.display()));
    let sink = || CaptureSink::new(4096, Echo::None);
    let Ok(mut child) = Supervised::spawn(&mut cmd, sink(), sink()) else { return false };
    matches!(child.wait_until(Instant::now() + PROBE_TIMEOUT), Ok(Waited::Exited(st)) if st.code() == Some(PROBE_EXIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_guest_boots_under_tcg() {
        let qemu = crate::qemu::find_qemu().expect("qemu-system is installed for the tests");
        assert!(boots(&qemu, Accel::Tcg));
    }

    #[test]
    fn probe_sector_is_bootable() {
        let s = probe_boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
    }
}
