//! Scratch directories in the system's temp directory: a QEMU job's overlay and QMP socket, a
//! checkpoint's saved state, an appliance's sockets, a module binaryen optimizes. They are there, not under a node's own
//! directory, because a socket's path must be short (108 bytes) and QEMU, once it has dropped
//! root, must reach the state file.
//!
//! A process removes its scratch when done, but a process killed with SIGKILL (a node that
//! crashed, or that a test killed) cannot: each directory left that way held a disk overlay and,
//! for a checkpoint, the whole saved RAM (80 MB for a 256 MiB guest). So each directory is named
//! for the process that made it (the machine's boot, its PID namespace and its PID), and the first
//! scratch directory a process makes removes those whose maker, of this boot and namespace, is
//! gone (`kill(pid, 0)` says no such process), when they are directories of this account. A
//! directory of a live process, of another boot or machine (a temp directory on a shared file
//! system), of another PID namespace (another container sharing this /tmp) or of another account
//! is left alone. A maker's QEMU dies with it (`process::Supervised`, and `unshare` for a QEMU that
//! drops root), except where `unshare` is missing and QEMU dropped root (`qemu::launch` warns):
//! such a QEMU outlives its vmgrid unsupervised, and loses its scratch directory to the sweep.

use std::path::Path;
use std::sync::Once;

/// The kinds of scratch directory, the part of the name after `vmgrid-`.
const KINDS: [&str; 4] = ["qemu", "ckpt", "appliance", "wasm-opt"];

/// A new scratch directory of `kind` (one of [`KINDS`]), removed when the value is dropped.
pub fn dir(kind: &str) -> std::io::Result<tempfile::TempDir> {
    debug_assert!(KINDS.contains(&kind), "unknown scratch kind {kind}");
    static SWEPT: Once = Once::new();
    let tmp = std::env::temp_dir();
    SWEPT.call_once(|| {
        let n = sweep(&tmp, host().as_deref());
        if n > 0 {
            tracing::info!("removed {n} scratch directories that killed vmgrid processes left in {}", tmp.display());
        }
    });
    tempfile::Builder::new().prefix(&prefix(kind, host().as_deref(), std::process::id())).tempdir_in(tmp)
}

/// Where this process's PIDs mean something: this boot of the machine (the start of
/// `/proc/sys/kernel/random/boot_id`) and the PID namespace (the inode of `/proc/self/ns/pid`,
/// which is the same number in every machine's first namespace), as `BOOT.NAMESPACE`.
fn host() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let boot: String = boot.trim().chars().filter(char::is_ascii_hexdigit).take(12).collect();
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let ns = link.to_str()?.strip_prefix("pid:[")?.strip_suffix(']')?;
    (boot.len() == 12 && ns.bytes().all(|b| b.is_ascii_digit())).then(|| format!("{boot}.{ns}"))
}

fn prefix(kind: &str, host: Option<&str>, pid: u32) -> String {
    format!("vmgrid-{kind}-{}-{pid}-", host.unwrap_or("x"))
}

/// Whether process `pid` of this PID namespace is gone: only "no such process" says so (one of
/// another account is there, though we may not signal it).
fn gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The host (boot and PID namespace) and PID a scratch directory's name gives its maker.
fn maker(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix("vmgrid-")?;
    let rest = KINDS.iter().find_map(|k| rest.strip_prefix(k)?.strip_prefix('-'))?;
    let mut parts = rest.splitn(3, '-');
    let (ns, pid) = (parts.next()?, parts.next()?);
    parts.next()?;
    Some((ns, pid.parse().ok()?))
}

/// Removes from `tmp` the scratch directories of this account whose maker, on `host`, is gone;
/// returns how many. Nothing is swept without a known host.
fn sweep(tmp: &Path, host: Option<&str>) -> usize {
    use std::os::unix::fs::MetadataExt;
    let (Some(host), Ok(entries)) = (host, std::fs::read_dir(tmp)) else { return 0 };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((theirs, pid)) = name.to_str().and_then(maker) else { continue };
        if theirs != host || !gone(pid) {
            continue;
        }
        // Not followed: a link, or another account's directory, is not ours to remove.
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID no process has: above the kernel's largest.
    const GONE: u32 = 4_194_304 + 7;

    #[test]
    fn what_a_gone_process_left_is_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let make = |name: &str| {
            std::fs::create_dir(t.join(name)).unwrap();
            std::fs::write(t.join(name).join("state"), b"saved RAM").unwrap();
        };
        let dead = format!("{}abc", prefix("ckpt", Some("41"), GONE));
        let live = format!("{}abc", prefix("qemu", Some("41"), std::process::id()));
        let other_ns = format!("{}abc", prefix("qemu", Some("42"), GONE));
        for n in [&dead, &live, &other_ns, &"vmgrid-qemu-abcdef".to_string(), &"vmgrid-other-41-9-x".to_string()] {
            make(n);
        }
        let link = format!("{}lnk", prefix("appliance", Some("41"), GONE));
        std::os::unix::fs::symlink(t.join(&live), t.join(&link)).unwrap();
        assert_eq!(sweep(t, Some("41")), 1);
        assert!(!t.join(&dead).exists(), "a gone process's directory is removed");
        for kept in [&live, &other_ns, &link] {
            assert!(t.join(kept).exists(), "{kept} is kept");
        }
        assert!(t.join(&live).join("state").exists(), "a link is not followed");
        assert!(t.join("vmgrid-qemu-abcdef").exists(), "a name without its maker is left");
        assert_eq!(sweep(t, None), 0, "no host, no sweep");
        assert!(
            gone(GONE) && !gone(std::process::id()) && !gone(1),
            "init is there (signalled or not: EPERM is alive)"
        );
        assert!(!gone(0) && !gone(u32::MAX), "not a PID one process has");
    }

    #[test]
    fn a_scratch_directory_names_its_maker() {
        let d = dir("qemu").unwrap();
        let name = d.path().file_name().unwrap().to_str().unwrap().to_string();
        let (ns, pid) = maker(&name).unwrap();
        assert_eq!(pid, std::process::id());
        assert_eq!(Some(ns.to_string()), host());
        assert!(ns.contains('.'), "{ns}: the boot and the PID namespace");
        assert_eq!(maker("vmgrid-qemu-1-2"), None, "no random part");
        assert_eq!(maker("vmgrid-qemu-1-x-abc"), None);
    }
}
