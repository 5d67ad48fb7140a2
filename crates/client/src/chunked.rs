//! Large files stored in the pool as content-defined chunks ([`ChunkedFile`]): FastCDC cuts the
//! file where its content says (about every MiB), so a change moves only the cuts near it; each
//! chunk is compressed (zstd) and stored as its own blob. A file stored again after a change
//! shares every chunk that did not change with the last time: that chunk is neither compressed
//! nor sent again (a QEMU job's checkpoints send only what changed since the last one).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use vmgrid_proto::{ChunkedFile, FileRef, MAX_CHUNK_BYTES, MAX_CHUNKS};

use crate::{Client, ClientError, Result};

/// FastCDC's bounds on a chunk: at least 256 KiB (but the last), about 1 MiB, at most 4 MiB.
const MIN: u32 = 256 << 10;
const AVG: u32 = 1 << 20;
const MAX: u32 = MAX_CHUNK_BYTES as u32;
/// zstd's level: fast (a node stores a checkpoint while its VM runs).
const LEVEL: i32 = 1;

/// Chunks the pool holds, by the BLAKE3 hash of their bytes (unpacked): what a file stored again
/// need not send.
pub type Known = HashMap<blake3::Hash, FileRef>;

/// A file stored in chunks.
pub struct Stored {
    pub file: ChunkedFile,
    /// Its chunks, by the hash of their bytes.
    pub chunks: Known,
    /// The bytes of the chunks that were not known (compressed): what this store added.
    pub new_bytes: u64,
}

/// Cuts `path` into chunks; `each` gets every chunk's bytes in order. Stops at the first error.
pub fn split(path: &Path, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path)?;
    for chunk in fastcdc::v2020::StreamCDC::new(file, MIN, AVG, MAX) {
        let chunk = chunk.map_err(|e| ClientError::Io(std::io::Error::other(e.to_string())))?;
        each(&chunk.data)?;
    }
    Ok(())
}

/// A chunk's bytes compressed as the pool stores them.
pub fn pack(data: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(data, LEVEL)
}

impl Client {
    /// Stores the file at `path` in chunks named `NAME.N`. A chunk in `known` is taken from
    /// there; the others are compressed and uploaded (unless the pool holds them already).
    /// Stops with an error, between chunks, once `given_up` says so.
    pub fn upload_chunked(
        &self,
        path: &Path,
        name: &str,
        known: &Known,
        given_up: impl Fn() -> bool,
    ) -> Result<Stored> {
        let mut stored =
            Stored { file: ChunkedFile { size: 0, chunks: Vec::new() }, chunks: Known::new(), new_bytes: 0 };
        split(path, |data| {
            if given_up() {
                return Err(ClientError::Io(std::io::Error::other("given up")));
            }
            if stored.file.chunks.len() == MAX_CHUNKS {
                return Err(ClientError::Io(std::io::Error::other(format!("more than {MAX_CHUNKS} chunks"))));
            }
            let raw = blake3::hash(data);
            let chunk_name = format!("{name}.{}", stored.file.chunks.len());
            let blob = match known.get(&raw).or_else(|| stored.chunks.get(&raw)) {
                Some(f) => FileRef { path: chunk_name, ..f.clone() },
                None => {
                    let packed = pack(data)?;
                    stored.new_bytes += packed.len() as u64;
                    self.upload_bytes(&packed, &chunk_name)?
                }
            };
            stored.file.size += data.len() as u64;
            stored.chunks.insert(raw, blob.clone());
            stored.file.chunks.push(blob);
            Ok(())
        })?;
        Ok(stored)
    }
}

/// Why a chunked file was not unpacked: this host's trouble (a chunk it could not fetch, a file
/// it could not write), or the file's (a chunk that does not unpack as it says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unpack {
    Host(String),
    Bad(String),
}

/// Unpacks a chunked file into `to`, each chunk's blob read with `read` (checked against its hash
/// by whoever fetched it). Refuses a chunk that unpacks to more than [`MAX_CHUNK_BYTES`], a file
/// of more than `limit` bytes, and one whose size is not the one it says. Returns its chunks by
/// the hash of their bytes.
pub fn unpack(
    file: &ChunkedFile,
    to: &Path,
    limit: u64,
    mut read: impl FnMut(&FileRef) -> std::result::Result<Vec<u8>, Unpack>,
) -> std::result::Result<Known, Unpack> {
    file.check().map_err(Unpack::Bad)?;
    if file.size > limit {
        return Err(Unpack::Bad(format!("it unpacks to {} bytes, more than the {limit} it may", file.size)));
    }
    let host = |e: std::io::Error| Unpack::Host(format!("cannot write {}: {e}", to.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(to).map_err(host)?);
    let (mut size, mut known) = (0u64, Known::new());
    for f in &file.chunks {
        let data = zstd::bulk::decompress(&read(f)?, MAX_CHUNK_BYTES as usize).map_err(|e| {
            Unpack::Bad(format!("chunk {} does not unpack (to at most {MAX_CHUNK_BYTES} bytes): {e}", f.path))
        })?;
        size += data.len() as u64;
        if size > file.size {
            return Err(Unpack::Bad(format!("its chunks unpack to more than its size, {}", file.size)));
        }
        out.write_all(&data).map_err(host)?;
        known.insert(blake3::hash(&data), f.clone());
    }
    if size != file.size {
        return Err(Unpack::Bad(format!("its chunks unpack to {size} bytes, not its size, {}", file.size)));
    }
    out.flush().map_err(host)?;
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(path: &Path) -> Vec<blake3::Hash> {
        let mut v = Vec::new();
        split(path, |d| {
            v.push(blake3::hash(d));
            Ok(())
        })
        .unwrap();
        v
    }

    /// A change in the middle of a file, and bytes inserted near its start, leave most of its
    /// chunks as they were; the chunks put back together are the file.
    #[test]
    fn a_changed_file_shares_most_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 24 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let before = dir.path().join("before");
        std::fs::write(&before, &bytes).unwrap();
        bytes[12 << 20..(12 << 20) + 4096].fill(7);
        bytes.splice(1000..1000, [1u8; 333]);
        let after = dir.path().join("after");
        std::fs::write(&after, &bytes).unwrap();
        let (a, b) = (chunks(&before), chunks(&after));
        assert!(a.len() >= 6 && a.len() <= 96, "{} chunks of 24 MiB", a.len());
        let shared = b.iter().filter(|h| a.contains(h)).count();
        assert!(shared + 4 >= b.len(), "only {shared} of {} chunks shared", b.len());

        let mut blobs = HashMap::new();
        let mut file = ChunkedFile { size: 0, chunks: Vec::new() };
        split(&after, |d| {
            let packed = pack(d)?;
            let f = FileRef {
                path: format!("x.{}", file.chunks.len()),
                blob: blake3::hash(&packed).to_hex().to_string(),
                size: packed.len() as u64,
                inline: None,
            };
            blobs.insert(f.blob.clone(), packed);
            file.size += d.len() as u64;
            file.chunks.push(f);
            Ok(())
        })
        .unwrap();
        let back = dir.path().join("back");
        let read = |f: &FileRef| blobs.get(&f.blob).cloned().ok_or_else(|| Unpack::Host("missing".into()));
        let known = unpack(&file, &back, 32 << 20, read).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), bytes);
        assert_eq!(known.len(), b.iter().collect::<std::collections::HashSet<_>>().len());

        // A size that is not the chunks', and a limit below the size, are refused.
        let bad = |f: &ChunkedFile, limit| match unpack(f, &back, limit, read) {
            Err(Unpack::Bad(e)) => e,
            other => panic!("{other:?}"),
        };
        let wrong = ChunkedFile { size: file.size - 1, ..file.clone() };
        assert!(bad(&wrong, 32 << 20).contains("more than its size"));
        assert!(bad(&file, 1 << 20).contains("more than the"));
        // A chunk that is not zstd is the file's fault; one that cannot be fetched, the host's.
        let mut junk = file.clone();
        junk.chunks[1].blob = "junk".into();
        blobs.insert("junk".into(), vec![1, 2, 3]);
        let read = |f: &FileRef| blobs.get(&f.blob).cloned().ok_or_else(|| Unpack::Host("missing".into()));
        assert!(matches!(unpack(&junk, &back, 32 << 20, read), Err(Unpack::Bad(e)) if e.contains("does not unpack")));
        junk.chunks[1].blob = "gone".into();
        assert_eq!(unpack(&junk, &back, 32 << 20, read), Err(Unpack::Host("missing".into())));
    }
}
