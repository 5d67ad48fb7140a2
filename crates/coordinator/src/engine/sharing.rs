//! The pool as a tracker of blobs between nodes: each node says, with its heartbeats, which large
//! blobs it holds (whole or in part); a node that needs one asks which ready nodes share it, and
//! fetches its pieces from them. Kept in memory only: nodes say it again with every heartbeat.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use vmgrid_proto::*;

use super::Engine;

/// The most nodes one answer names.
const PEERS_PER_ANSWER: usize = 8;

/// Who shares what.
#[derive(Default)]
pub struct Sharing {
    by_node: HashMap<Arc<str>, Vec<String>>,
    by_blob: HashMap<String, BTreeSet<Arc<str>>>,
}

impl Sharing {
    /// Node `node` now shares `blobs` (and nothing else).
    fn set(&mut self, node: &str, blobs: Vec<String>) {
        self.forget(node);
        if blobs.is_empty() {
            return;
        }
        let node: Arc<str> = Arc::from(node);
        for b in &blobs {
            self.by_blob.entry(b.clone()).or_default().insert(node.clone());
        }
        self.by_node.insert(node, blobs);
    }

    /// Node `node` shares `blob` too (it started fetching it).
    fn add(&mut self, node: &str, blob: &str) {
        let node: Arc<str> = Arc::from(node);
        let list = self.by_node.entry(node.clone()).or_default();
        if list.len() >= MAX_SHARING || list.iter().any(|b| b == blob) {
            return;
        }
        list.push(blob.to_string());
        self.by_blob.entry(blob.to_string()).or_default().insert(node);
    }

    /// Node `node` shares nothing any more.
    pub(super) fn forget(&mut self, node: &str) {
        for b in self.by_node.remove(node).unwrap_or_default() {
            if let Some(set) = self.by_blob.get_mut(&b) {
                set.remove(node);
                if set.is_empty() {
                    self.by_blob.remove(&b);
                }
            }
        }
    }
}

impl Engine {
    /// What node `name` said it shares: blob hashes, at most [`MAX_SHARING`] (the rest ignored).
    pub fn set_sharing(&mut self, name: &str, mut blobs: Vec<String>) {
        if !self.nodes.contains_key(name) {
            return;
        }
        blobs.retain(|b| is_blob_ref(b));
        blobs.truncate(MAX_SHARING);
        blobs.sort_unstable();
        blobs.dedup();
        self.sharing.set(name, blobs);
    }

    /// Node `name` started fetching blob `hash` in pieces: it serves those it has from now on
    /// (its next heartbeat says what it shares, in full).
    pub fn started_fetching(&mut self, name: &str, hash: &str) {
        if self.nodes.contains_key(name) && is_blob_ref(hash) {
            self.sharing.add(name, hash);
        }
    }

    /// The ready nodes other than `caller` that share blob `hash` and serve pieces, a few,
    /// starting at a point that depends on the caller (so that callers spread over them).
    pub fn peers_of(&self, hash: &str, caller: &str) -> Vec<Peer> {
        let Some(set) = self.sharing.by_blob.get(hash) else { return Vec::new() };
        let mut peers: Vec<Peer> = set
            .iter()
            .filter(|n| &***n != caller)
            .filter_map(|n| {
                let node = self.nodes.get(&**n).filter(|x| x.state == NodeState::Ready && !x.silent)?;
                Some(Peer { node: n.to_string(), endpoint: node.ad.peer.clone()? })
            })
            .collect();
        if !peers.is_empty() {
            let start = blake3::hash(caller.as_bytes()).as_bytes()[0] as usize % peers.len();
            peers.rotate_left(start);
        }
        peers.truncate(PEERS_PER_ANSWER);
        peers
    }
}
