//! A reproducible initramfs archive: the kernel's "newc" cpio format, with entries in name order,
//! owned by root, and every time stamp zero.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

pub enum Entry {
    Dir,
    /// A file with its mode (e.g. 0o755) and where its contents come from.
    File {
        mode: u32,
        data: Data,
    },
    Symlink(String),
    /// A character device node (major, minor), e.g. /dev/console before devtmpfs is mounted.
    CharDev(u32, u32),
}

pub enum Data {
    Bytes(Vec<u8>),
    Path(PathBuf),
}

/// The tree to archive, by path without a leading slash ("bin/busybox").
#[derive(Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    /// Adds an entry and the directories above it.
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').trim_end_matches('/').to_string();
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            self.entries.entry(p.to_string()).or_insert(Entry::Dir);
            parent = p;
        }
        self.entries.insert(path, entry);
    }

    pub fn dir(&mut self, path: &str) {
        self.add(path, Entry::Dir);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) {
        self.add(path, Entry::File { mode, data: Data::Bytes(data.into()) });
    }

    pub fn file_from(&mut self, path: &str, mode: u32, from: PathBuf) {
        self.add(path, Entry::File { mode, data: Data::Path(from) });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Entry::Symlink(target.to_string()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.add(path, Entry::CharDev(major, minor));
    }

    /// Writes the archive. BTreeMap order puts every directory before what it holds.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut ino = 1u32;
        for (name, entry) in &self.entries {
            ino += 1;
            match entry {
                Entry::Dir => header(out, ino, 0o040755, 2, 0, name, (0, 0))?,
                Entry::CharDev(major, minor) => header(out, ino, 0o020600, 1, 0, name, (*major, *minor))?,
                Entry::Symlink(target) => {
                    header(out, ino, 0o120777, 1, target.len() as u64, name, (0, 0))?;
                    out.write_all(target.as_bytes())?;
                    pad(out, target.len() as u64)?;
                }
                Entry::File { mode, data } => match data {
                    Data::Bytes(b) => {
                        header(out, ino, 0o100000 | mode, 1, b.len() as u64, name, (0, 0))?;
                        out.write_all(b)?;
                        pad(out, b.len() as u64)?;
                    }
                    Data::Path(p) => {
                        let mut f = std::fs::File::open(p)
                            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                        let len = f.metadata()?.len();
                        header(out, ino, 0o100000 | mode, 1, len, name, (0, 0))?;
                        let copied = io::copy(&mut f, out)?;
                        if copied != len {
                            return Err(io::Error::other(format!("{} changed while it was archived", p.display())));
                        }
                        pad(out, len)?;
                    }
                },
            }
        }
        header(out, 0, 0, 1, 0, "TRAILER!!!", (0, 0))
    }
}

fn header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u64,
    name: &str,
    (rmajor, rminor): (u32, u32),
) -> io::Result<()> {
    if size > u32::MAX as u64 {
        return Err(io::Error::other(format!("{name} is too large for an initramfs")));
    }
    let namesize = name.len() + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check.
    let h = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    );
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, (h.len() + namesize) as u64)
}

fn pad(out: &mut impl Write, len: u64) -> io::Result<()> {
    let n = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..n as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_sorted_and_parents_come_first() {
        let mut t = Tree::default();
        t.file("usr/bin/x", 0o755, b"abcde".to_vec());
        t.symlink("bin/sh", "busybox");
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        let names: Vec<usize> = ["bin\0", "bin/sh\0", "usr\0", "usr/bin\0", "usr/bin/x\0", "TRAILER!!!\0"]
            .iter()
            .map(|n| text.find(n).unwrap())
            .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert_eq!(out.len() % 4, 0);
        assert!(text.starts_with("070701"));
        // Every header starts at a multiple of 4.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }
}
