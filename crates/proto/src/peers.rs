//! Blobs between nodes: a node that needs a large blob fetches it in pieces from the nodes that
//! have it (the pool says which, as a tracker), each piece checked against the hash the pool
//! gives for it, and falls back to the pool for a piece no node serves. Nodes serve each other
//! over TLS with certificates from the pool's CA, and each side checks the other's.

use serde::{Deserialize, Serialize};

/// A shared blob's pieces are cut where its content says (FastCDC), about this large: an image
/// changed in place or by an insertion keeps most of its pieces, which a node that has the old
/// image does not fetch again.
pub const PIECE_BYTES: u64 = 4 << 20;
/// The largest piece.
pub const MAX_PIECE_BYTES: u64 = 16 << 20;
/// Blobs at least this large are fetched from other nodes when they have them.
pub const PEER_MIN_BYTES: u64 = 16 << 20;
/// The most blobs a node says it shares.
pub const MAX_SHARING: usize = 256;

/// A blob's pieces, in order: where each starts, its length, and its BLAKE3 hash (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pieces {
    pub size: u64,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Piece {
    pub first: u64,
    pub len: u64,
    pub hash: String,
}

impl Pieces {
    /// Whether the pieces follow each other with no gap, each at most [`MAX_PIECE_BYTES`], and
    /// cover the blob's size.
    pub fn check(&self) -> Result<(), String> {
        let mut at = 0u64;
        for p in &self.pieces {
            if p.first != at || p.len == 0 || p.len > MAX_PIECE_BYTES || !crate::is_blob_ref(&p.hash) {
                return Err(format!("a piece at {} of {} bytes does not follow at {at}", p.first, p.len));
            }
            at += p.len;
        }
        match at == self.size {
            true => Ok(()),
            false => Err(format!("the pieces cover {at} bytes, not the blob's {}", self.size)),
        }
    }
}

/// A node that shares a blob, and where it serves pieces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Peer {
    pub node: String,
    /// `ip:port`.
    pub endpoint: String,
}

/// The nodes that share a blob (whole or in part), at most a handful, spread between callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeersResponse {
    pub peers: Vec<Peer>,
}

/// What a node that serves pieces needs: a certificate the pool's CA issued for its address (for
/// serving, and to show other nodes it is one of the pool's), its key, and the CA's.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}
