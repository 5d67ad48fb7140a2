//! What this node is: the ad it registers with, found by looking at the host.

use vmgrid_proto::{NodeAd, VmType};

use crate::NodeConfig;

pub fn fingerprint(config: &NodeConfig) -> NodeAd {
    let cpus = config.cpus.unwrap_or_else(host_cpus);
    let memory_mb = config.memory_mb.unwrap_or_else(host_memory_mb);
    let mut vm_types = vec![VmType::Wasm];
    let mut accelerators = Vec::new();
    let mut qemu_version = None;
    match vmgrid_runtime::qemu::usable() {
        Ok(qemu) => {
            tracing::info!(qemu = %qemu.qemu.display(), version = %qemu.caps.version, "QEMU jobs run here");
            vm_types.push(VmType::Qemu);
            qemu_version = Some(qemu.caps.version.to_string());
            let cache = config.cache_dir.join("runtime");
            if vmgrid_runtime::qemu::accel::choose(&qemu.qemu, &cache) == vmgrid_runtime::qemu::Accel::Kvm {
                accelerators.push("kvm".into());
            }
            accelerators.push("tcg".into());
        }
        Err(e) => tracing::info!("this node takes no QEMU jobs: {e}"),
    }
    if config.allow_jvm {
        match vmgrid_runtime::jvm::usable() {
            Ok(jvm) => {
                tracing::info!(java = %jvm.java.display(), "JVM jobs run here, confined by bubblewrap");
                vm_types.push(VmType::Jvm);
            }
            Err(e) => tracing::warn!("this node takes no JVM jobs: {e}"),
        }
    }
    NodeAd {
        name: config.name.clone(),
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        cpus,
        memory_mb,
        disk_mb: disk_mb(&config.cache_dir),
        vm_types,
        accelerators,
        labels: config.labels.clone(),
        appliance: config.appliance,
        qemu: qemu_version,
        peer: None,
        overlay: None,
    }
}

/// The cpus this process may use (its affinity mask and cgroup quota), at least 1.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// The host's memory in MiB (MemTotal), or 1024 when /proc/meminfo cannot be read.
pub fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}

fn disk_mb(dir: &std::path::Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return 0 };
    // SAFETY: statvfs gets a valid NUL-terminated path and a zeroed struct to fill.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) == 0 { (s.f_bavail as u64 * s.f_frsize as u64) >> 20 } else { 0 }
    }
}
