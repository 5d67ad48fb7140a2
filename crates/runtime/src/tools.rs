//! Host tools the runtimes (and the appliance builder) run: found through an override variable,
//! then `PATH`, then the sbin directories a user's `PATH` may lack, with a Debian install hint
//! when missing.

use std::path::PathBuf;

use crate::RunError;

/// `$env` if it is set, else the first `name` on `PATH`, `/usr/sbin` or `/sbin`.
pub fn find(env: Option<&str>, name: &str) -> Option<PathBuf> {
    if let Some(p) = env.and_then(std::env::var_os) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path).chain(sbin).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Like [`find`], or an error that says which Debian package has the tool.
pub fn require(env: Option<&str>, name: &str, package: &str) -> Result<PathBuf, RunError> {
    find(env, name).ok_or_else(|| {
        let set = env.map(|e| format!(" or set {e}")).unwrap_or_default();
        RunError::Host(format!("`{name}` was not found on PATH; install it (Debian: `apt-get install {package}`){set}"))
    })
}

/// The bubblewrap arguments vmgrid's sandboxes (a JVM job's, binaryen's) start from: new PID,
/// network, IPC, UTS and cgroup namespaces, dying with us, a session of its own, the host's `/usr`
/// read-only with the usual links into it, and a private `/dev` and `/tmp`.
pub(crate) fn bwrap_base() -> Vec<String> {
    [
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]
    .map(String::from)
    .to_vec()
}
