//! What the installed QEMU accepts, learned from the binary itself (`-version` and `-help`), so
//! that one vmgrid drives QEMU 7.2 (Debian 12) and QEMU 10 (Debian 12 backports, Debian 13) alike.
//!
//! The one option that differs between the generations vmgrid supports is how QEMU drops root:
//! `-runas USER` until QEMU 9.x, `-run-with user=USER` from QEMU 9.1 on (9.1 deprecated `-runas`,
//! 10.0 removed it).
//! Every other option vmgrid passes exists unchanged in both. `-sandbox` exists only when QEMU was
//! built with seccomp; without it the VM runs unsandboxed, and the node says so in its log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::RunError;

/// The oldest QEMU whose options vmgrid has been run against.
pub const OLDEST_SUPPORTED: Version = Version(7, 2, 0);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// How this QEMU switches to an unprivileged user before the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropRoot {
    /// `-runas USER` (QEMU up to 9.x).
    RunAs,
    /// `-run-with user=USER` (QEMU 9.1 and later).
    RunWithUser,
}

impl DropRoot {
    /// The options that make QEMU switch to `user`.
    pub fn args(self, user: &str) -> [String; 2] {
        match self {
            DropRoot::RunAs => ["-runas".into(), user.into()],
            DropRoot::RunWithUser => ["-run-with".into(), format!("user={user}")],
        }
    }
}

/// What one QEMU binary accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    pub version: Version,
    /// `None` if this QEMU cannot drop root at all (then it is never run as root).
    pub drop_root: Option<DropRoot>,
    /// Whether `-sandbox` (seccomp) is available.
    pub sandbox: bool,
}

impl Caps {
    /// Reads the capabilities from the texts of `-version` and `-help`.
    pub fn parse(version_text: &str, help_text: &str) -> Result<Caps, String> {
        let version = parse_version(version_text)
            .ok_or_else(|| format!("cannot read a version from {:?}", version_text.lines().next().unwrap_or("")))?;
        let option = |name: &str| help_text.lines().find(|l| l.split_whitespace().next() == Some(name));
        let drop_root = if option("-run-with").is_some_and(|l| l.contains("user=")) {
            Some(DropRoot::RunWithUser)
        } else if option("-runas").is_some() {
            Some(DropRoot::RunAs)
        } else {
            None
        };
        Ok(Caps { version, drop_root, sandbox: option("-sandbox").is_some() })
    }
}

fn parse_version(text: &str) -> Option<Version> {
    let line = text.lines().find(|l| l.contains("version"))?;
    let word = line.split_whitespace().skip_while(|w| *w != "version").nth(1)?;
    let mut parts = word.split('.').map(|p| p.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().and_then(Result::ok).unwrap_or(0);
    let micro = parts.next().and_then(Result::ok).unwrap_or(0);
    Some(Version(major, minor, micro))
}

type Key = (PathBuf, u64, i128);

static CACHE: Mutex<Option<HashMap<Key, Caps>>> = Mutex::new(None);

/// The capabilities of the QEMU binary at `qemu`, asked once per binary (by path, size and
/// modification time) for the life of this process.
pub fn of(qemu: &Path) -> Result<Caps, RunError> {
    let meta = std::fs::metadata(qemu).map_err(|e| RunError::host(format!("cannot read {}", qemu.display()), e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    let key = (qemu.to_path_buf(), meta.len(), mtime);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cache.as_ref().and_then(|m| m.get(&key)) {
        return Ok(c.clone());
    }
    let caps = ask(qemu)?;
    if caps.version < OLDEST_SUPPORTED {
        return Err(RunError::Host(format!(
            "{} is QEMU {}; vmgrid supports QEMU {OLDEST_SUPPORTED} and later (Debian 12 has 7.2): install a newer one or set VMGRID_QEMU",
            qemu.display(),
            caps.version
        )));
    }
    if !caps.sandbox {
        tracing::warn!(qemu = %qemu.display(), "this QEMU has no -sandbox (built without seccomp): VMs run without it");
    }
    cache.get_or_insert_with(HashMap::new).insert(key, caps.clone());
    Ok(caps)
}

fn ask(qemu: &Path) -> Result<Caps, RunError> {
    let run = |arg: &str| -> Result<String, RunError> {
        let out = Command::new(qemu)
            .arg(arg)
            .output()
            .map_err(|e| RunError::host(format!("cannot run {} {arg}", qemu.display()), e))?;
        if !out.status.success() {
            return Err(RunError::Host(format!(
                "`{} {arg}` failed ({}): {}",
                qemu.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    Caps::parse(&run("-version")?, &run("-help")?)
        .map_err(|e| RunError::Host(format!("{} does not look like QEMU: {e}", qemu.display())))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The relevant lines of `-version` and `-help` as Debian's QEMU 7.2 and 10.0 print them.
    pub(crate) const QEMU_7_2_VERSION: &str = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
    pub(crate) const QEMU_7_2_HELP: &str = "-sandbox on[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]\n          [,spawn=allow|deny][,resourcecontrol=allow|deny]\n-runas user     change to user id user just before starting the VM\n                user can be numeric uid:gid instead\n";
    pub(crate) const QEMU_10_VERSION: &str = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
    pub(crate) const QEMU_10_HELP: &str = "-sandbox on[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]\n-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n                Set miscellaneous QEMU process lifecycle options:\n                user=username switch to the specified user before starting the VM\n";

    #[test]
    fn qemu_7_2_drops_root_with_runas() {
        let c = Caps::parse(QEMU_7_2_VERSION, QEMU_7_2_HELP).unwrap();
        assert_eq!(c, Caps { version: Version(7, 2, 22), drop_root: Some(DropRoot::RunAs), sandbox: true });
        assert_eq!(DropRoot::RunAs.args("nobody"), ["-runas", "nobody"]);
    }

    #[test]
    fn qemu_10_drops_root_with_run_with_user() {
        let c = Caps::parse(QEMU_10_VERSION, QEMU_10_HELP).unwrap();
        assert_eq!(c, Caps { version: Version(10, 0, 2), drop_root: Some(DropRoot::RunWithUser), sandbox: true });
        assert_eq!(DropRoot::RunWithUser.args("nobody"), ["-run-with", "user=nobody"]);
    }

    #[test]
    fn qemu_9_1_with_both_prefers_run_with() {
        let help = "-runas user     change to user id user just before starting the VM\n-run-with [async-teardown=on|off][,chroot=dir][,user=username|uid:gid]\n";
        let c = Caps::parse("QEMU emulator version 9.1.0\n", help).unwrap();
        assert_eq!(c.drop_root, Some(DropRoot::RunWithUser));
        assert!(!c.sandbox);
    }

    #[test]
    fn a_run_with_without_user_cannot_drop_root() {
        // QEMU 8.x: -run-with knows only async-teardown and chroot; -runas is still there.
        let help =
            "-runas user     change to user id user just before starting the VM\n-run-with async-teardown=on|off\n";
        assert_eq!(Caps::parse("QEMU emulator version 8.2.0\n", help).unwrap().drop_root, Some(DropRoot::RunAs));
        assert_eq!(
            Caps::parse("QEMU emulator version 8.2.0\n", "-run-with async-teardown=on\n").unwrap().drop_root,
            None
        );
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(parse_version("QEMU emulator version 10.1.0\n"), Some(Version(10, 1, 0)));
        assert_eq!(parse_version("QEMU emulator version 8.0.0-rc2\n"), Some(Version(8, 0, 0)));
        assert_eq!(parse_version("not qemu"), None);
        assert!(Caps::parse("hello\n", "").is_err());
        assert!(Version(7, 1, 9) < OLDEST_SUPPORTED && Version(7, 2, 0) >= OLDEST_SUPPORTED);
        assert!(Version(10, 0, 2) > Version(9, 2, 0));
    }

    #[test]
    fn the_installed_qemu_is_supported_and_can_drop_root() {
        let qemu = crate::qemu::find_qemu().expect("qemu-system is installed for the tests");
        let caps = of(&qemu).unwrap();
        assert!(caps.version >= OLDEST_SUPPORTED, "{caps:?}");
        assert!(caps.drop_root.is_some(), "{caps:?}");
        assert!(caps.sandbox, "Debian's QEMU is built with seccomp: {caps:?}");
        if caps.version >= Version(9, 1, 0) {
            assert_eq!(caps.drop_root, Some(DropRoot::RunWithUser));
        }
    }
}
