//! Path resolution at the home: a process's path, relative to a directory of the SSI root, walked
//! one component at a time with `lstat`, its symbolic links followed by the home itself. The walk
//! stays beneath the directory it started from: `..` above it, or a link whose target is absolute
//! or climbs above it, is refused with `EPERM` (as wasmtime refuses a path that leaves its
//! preopen), so the kernel is never asked to follow a link and never sees a path out of the root.
//! What comes out names only real directories, plus at most a last component that is not
//! followed. It must not change anything on disk.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::{Errno, Root, errno, errno_of};
use vmgrid_proto::ssi::At;

/// Links followed in one resolution at most, as Linux's limit (`ELOOP` past it).
const MAX_LINKS: usize = 40;
/// The longest path and the longest name a process may give (`ENAMETOOLONG` past them).
const MAX_PATH: usize = 4096;
const MAX_NAME: usize = 255;

/// What a resolved path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        nlink: u64,
    },
    Dir,
    /// A link that was not followed, and its target.
    Link(String),
    /// Nothing; the directory it would be in exists.
    Missing,
    /// A fifo, socket or device: never served.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The SSI path: no links on the way, no `.` or `..`.
    pub path: String,
    pub node: Node,
}

/// A namespace operation's target: the resolved directory that holds it, its last component as
/// given, and whether the path ended in `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub dir: String,
    pub name: String,
    pub slash: bool,
}

impl Parent {
    pub fn path(&self) -> String {
        join(&self.dir, &self.name)
    }

    /// `.` or `..` as the last component: not a name an operation can act on.
    pub fn dots(&self) -> bool {
        self.name == "." || self.name == ".."
    }
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

/// Checks what a process may put in a path at all.
fn check_path(path: &str) -> Result<(), Errno> {
    if path.starts_with('/') {
        return Err(errno::PERM);
    }
    if path.is_empty() {
        return Err(errno::NOENT);
    }
    if path.contains('\0') {
        return Err(errno::INVAL);
    }
    if path.len() > MAX_PATH || path.split('/').any(|c| c.len() > MAX_NAME) {
        return Err(errno::NAMETOOLONG);
    }
    Ok(())
}

/// `base/path` with `.` and `..` applied as text, or `None` if that climbs above `base`: where a
/// path is when no link is on its way.
pub fn lexical(at: &At) -> Option<String> {
    let mut parts: Vec<&str> = at.base.split('/').filter(|c| !c.is_empty()).collect();
    let floor = parts.len();
    for c in at.path.split('/') {
        match c {
            "" | "." => {}
            ".." if parts.len() == floor => return None,
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl Root {
    fn host_of(&self, parts: &[String]) -> PathBuf {
        let mut p = self.dir.clone();
        p.extend(parts);
        p
    }

    /// The components of a directory the caller holds (a descriptor's SSI path), each checked to
    /// be a real directory now: one that was replaced by a link is gone (`ENOENT`).
    fn base_parts(&self, base: &str) -> Result<Vec<String>, Errno> {
        let base = Root::normalize(base)?;
        let mut parts = Vec::new();
        for c in base.split('/').filter(|c| !c.is_empty()) {
            parts.push(c.to_string());
            match std::fs::symlink_metadata(self.host_of(&parts)) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(errno::NOTDIR),
                Err(e) => return Err(errno_of(&e)),
            }
        }
        Ok(parts)
    }

    /// Resolves `at` beneath its base, following links on the way and, if `follow` (or the path
    /// ends in `/`, `.` or `..`), in its last component.
    pub fn resolve(&self, at: &At, follow: bool) -> Result<Resolved, Errno> {
        check_path(&at.path)?;
        let mut stack = self.base_parts(&at.base)?;
        let floor = stack.len();
        let last_raw = at.path.rsplit('/').next().unwrap_or_default();
        let mut dir_wanted = matches!(last_raw, "" | "." | "..");
        let mut pending: VecDeque<String> =
            at.path.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_string).collect();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                if stack.len() == floor {
                    return Err(errno::PERM);
                }
                stack.pop();
                continue;
            }
            let last = pending.is_empty();
            stack.push(c);
            let host = self.host_of(&stack);
            let meta = match std::fs::symlink_metadata(&host) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && last => {
                    return Ok(Resolved { path: stack.join("/"), node: Node::Missing });
                }
                Err(e) => return Err(errno_of(&e)),
            };
            if meta.file_type().is_symlink() {
                let target = read_target(&host)?;
                if last && !follow && !dir_wanted {
                    return Ok(Resolved { path: stack.join("/"), node: Node::Link(target) });
                }
                hops += 1;
                if hops > MAX_LINKS {
                    return Err(errno::LOOP);
                }
                stack.pop();
                follow_target(&target, last, &mut dir_wanted, &mut pending)?;
            } else if meta.is_dir() {
                if last {
                    return Ok(Resolved { path: stack.join("/"), node: Node::Dir });
                }
            } else if !last || dir_wanted {
                return Err(errno::NOTDIR);
            } else {
                let node = if meta.is_file() { Node::File { nlink: nlink(&meta) } } else { Node::Other };
                return Ok(Resolved { path: stack.join("/"), node });
            }
        }
        // The path ended on a directory reached by `..` (or was only `.`).
        Ok(Resolved { path: stack.join("/"), node: Node::Dir })
    }

    /// The directory that holds `at`'s last component (resolved, following links), and that
    /// component: what a namespace change acts on, never following a link there.
    pub fn parent(&self, at: &At) -> Result<Parent, Errno> {
        check_path(&at.path)?;
        let slash = at.path.ends_with('/');
        let trimmed = at.path.trim_end_matches('/');
        let (dir, name) = match trimmed.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", trimmed),
        };
        let dir = if dir.is_empty() {
            self.base_parts(&at.base)?.join("/")
        } else {
            let r = self.resolve(&At { base: at.base.clone(), path: format!("{dir}/") }, true)?;
            match r.node {
                Node::Dir => r.path,
                Node::Missing => return Err(errno::NOENT),
                _ => return Err(errno::NOTDIR),
            }
        };
        Ok(Parent { dir, name: name.to_string(), slash })
    }

    /// What is at an SSI path (no links on the way), without following a link there.
    pub fn node_at(&self, path: &str) -> Result<Node, Errno> {
        let host = self.host(path);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => Ok(Node::Link(read_target(&host)?)),
            Ok(m) if m.is_dir() => Ok(Node::Dir),
            Ok(m) if m.is_file() => Ok(Node::File { nlink: nlink(&m) }),
            Ok(_) => Ok(Node::Other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Node::Missing),
            Err(e) => Err(errno_of(&e)),
        }
    }

    /// The host path of an SSI path that has been resolved (so holds no link before its end).
    pub fn host(&self, path: &str) -> PathBuf {
        let mut p = self.dir.clone();
        p.extend(path.split('/').filter(|c| !c.is_empty()));
        p
    }
}

fn nlink(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::nlink(m)
}

/// A link's target, as UTF-8 (the only paths a process can name).
pub fn read_target(host: &Path) -> Result<String, Errno> {
    let t = std::fs::read_link(host).map_err(|e| errno_of(&e))?;
    t.into_os_string().into_string().map_err(|_| errno::ILSEQ)
}

/// Puts a followed link's target in front of what is left of the path. An absolute target leaves
/// the root: refused, never followed.
fn follow_target(target: &str, last: bool, dir_wanted: &mut bool, pending: &mut VecDeque<String>) -> Result<(), Errno> {
    if target.starts_with('/') {
        return Err(errno::PERM);
    }
    if target.is_empty() {
        return Err(errno::NOENT);
    }
    if last && matches!(target.rsplit('/').next(), Some("" | "." | "..")) {
        *dir_wanted = true;
    }
    for t in target.split('/').rev().filter(|c| !c.is_empty() && *c != ".") {
        pending.push_front(t.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn at(base: &str, path: &str) -> At {
        At { base: base.into(), path: path.into() }
    }

    #[test]
    fn links_inside_resolve_and_links_out_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), "x").unwrap();
        symlink("a/b", d.path().join("ab")).unwrap();
        symlink("../b/f", d.path().join("a/b/up")).unwrap();
        symlink("/etc", d.path().join("abs")).unwrap();
        symlink("../..", d.path().join("a/out")).unwrap();
        symlink("loop", d.path().join("loop")).unwrap();
        let r = root.resolve(&at("", "ab/f"), true).unwrap();
        assert_eq!((r.path.as_str(), r.node), ("a/b/f", Node::File { nlink: 1 }));
        assert_eq!(root.resolve(&at("", "ab/up"), true).unwrap().path, "a/b/f");
        assert_eq!(root.resolve(&at("", "ab"), false).unwrap().node, Node::Link("a/b".into()));
        assert_eq!(root.resolve(&at("", "ab/"), false).unwrap().node, Node::Dir);
        assert_eq!(root.resolve(&at("", "abs/passwd"), true).err(), Some(errno::PERM));
        assert_eq!(root.resolve(&at("", "a/out"), true).err(), Some(errno::PERM));
        assert_eq!(root.resolve(&at("", "a/out"), false).unwrap().node, Node::Link("../..".into()));
        assert_eq!(root.resolve(&at("", "../x"), true).err(), Some(errno::PERM));
        assert_eq!(root.resolve(&at("", "/etc"), true).err(), Some(errno::PERM));
        assert_eq!(root.resolve(&at("", "loop"), true).err(), Some(errno::LOOP));
        // Beneath the base: `..` out of `a` is refused even though it stays in the root.
        assert_eq!(root.resolve(&at("a", "../ab"), true).err(), Some(errno::PERM));
        assert_eq!(root.resolve(&at("a", "b/.."), true).unwrap(), Resolved { path: "a".into(), node: Node::Dir });
        assert_eq!(root.resolve(&at("", "a/b/f/"), true).err(), Some(errno::NOTDIR));
        assert_eq!(root.resolve(&at("", "a/nope/f"), true).err(), Some(errno::NOENT));
        assert_eq!(root.resolve(&at("", "a/new"), true).unwrap().node, Node::Missing);
        let p = root.parent(&at("", "ab/new/")).unwrap();
        assert_eq!((p.dir.as_str(), p.name.as_str(), p.slash), ("a/b", "new", true));
        assert_eq!(lexical(&at("a", "b/../c")), Some("a/c".into()));
        assert_eq!(lexical(&at("a", "../c")), None);
    }
}
