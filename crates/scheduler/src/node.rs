//! The node as CEL sees it. What comes from its ad (name, arch, labels, …) is turned into CEL once,
//! when the ad is registered ([`MatchAd::new`]), and shared by every pass; a pass adds only what
//! changes (`running_jobs`, `free_cpus`, `free_memory_mb`, `reputation`), and only for the nodes it evaluates an
//! expression on.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use cel::Value;
use cel::objects::{Key, Map};
use vmgrid_proto::NodeAd;

use crate::NodeSlot;

/// The node attributes CEL sees, in a fixed order: the ad's, then the pool's view of the node.
pub(crate) const ATTRS: [&str; 15] = [
    "name",
    "arch",
    "os",
    "cpus",
    "memory_mb",
    "disk_mb",
    "vm_types",
    "accelerators",
    "labels",
    "appliance",
    "qemu",
    "running_jobs",
    "free_cpus",
    "free_memory_mb",
    "reputation",
];

/// How many of [`ATTRS`] come from the ad (the first ones).
const AD_ATTRS: usize = 11;

/// A node's ad with what the matchmaker derives from it once: the CEL map of the ad's attributes,
/// and a hash of each, so that nodes alike in what an expression reads share one evaluation of it.
/// Built when the ad is registered and shared (`Arc`) by every pass; it derefs to the ad.
pub struct MatchAd {
    ad: NodeAd,
    cel: HashMap<Key, Value>,
    hashes: [u64; AD_ATTRS],
}

impl MatchAd {
    pub fn new(ad: NodeAd) -> MatchAd {
        let mut cel = HashMap::with_capacity(ATTRS.len());
        let mut put = |name: &str, v: Value| cel.insert(Key::String(Arc::new(name.to_string())), v);
        put("name", ad.name.clone().into());
        put("arch", ad.arch.clone().into());
        put("os", ad.os.clone().into());
        put("cpus", Value::Int(ad.cpus as i64));
        put("memory_mb", Value::Int(ad.memory_mb as i64));
        put("disk_mb", Value::Int(ad.disk_mb as i64));
        let vm_types: Vec<Value> = ad.vm_types.iter().map(|t| Value::from(t.as_str())).collect();
        put("vm_types", vm_types.into());
        put("accelerators", ad.accelerators.clone().into());
        let labels: HashMap<String, Value> = ad.labels.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        put("labels", labels.into());
        put("appliance", Value::Bool(ad.appliance));
        // The QEMU version as text (`10.0.2`), empty where the node runs no QEMU jobs.
        put("qemu", ad.qemu.clone().unwrap_or_default().into());
        let hashes = [
            hash(&ad.name),
            hash(&ad.arch),
            hash(&ad.os),
            hash(&ad.cpus),
            hash(&ad.memory_mb),
            hash(&ad.disk_mb),
            hash(&ad.vm_types),
            hash(&ad.accelerators),
            hash(&ad.labels),
            hash(&ad.appliance),
            hash(&ad.qemu),
        ];
        MatchAd { ad, cel, hashes }
    }

    pub fn ad(&self) -> &NodeAd {
        &self.ad
    }
}

impl std::ops::Deref for MatchAd {
    type Target = NodeAd;
    fn deref(&self) -> &NodeAd {
        &self.ad
    }
}

impl std::fmt::Debug for MatchAd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.ad.fmt(f)
    }
}

impl From<NodeAd> for MatchAd {
    fn from(ad: NodeAd) -> MatchAd {
        MatchAd::new(ad)
    }
}

fn hash(v: &impl Hash) -> u64 {
    let mut s = DefaultHasher::new();
    v.hash(&mut s);
    s.finish()
}

/// The pool's view of a node as a pass found it, what its expressions see beside the ad (a copy
/// of these numbers only: a copy of the slots would take an `Arc` of each ad).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    running_jobs: u32,
    free_cpus: u32,
    free_memory_mb: u64,
    reputation: f64,
}

impl Seen {
    pub(crate) fn of(n: &NodeSlot) -> Seen {
        Seen {
            running_jobs: n.running_jobs,
            free_cpus: n.free_cpus,
            free_memory_mb: n.free_memory_mb,
            reputation: n.reputation,
        }
    }
}

/// A hash of attribute `a` (an index into [`ATTRS`]) of the node with ad `ad`, as `seen`.
pub(crate) fn attr_hash(ad: &MatchAd, seen: &Seen, a: usize) -> u64 {
    match a {
        11 => hash(&seen.running_jobs),
        12 => hash(&seen.free_cpus),
        13 => hash(&seen.free_memory_mb),
        14 => hash(&seen.reputation.to_bits()),
        _ => ad.hashes[a],
    }
}

/// The node as CEL sees it: its ad plus the pool's view.
pub(crate) fn node_value(ad: &MatchAd, seen: &Seen) -> Value {
    let mut m = ad.cel.clone();
    m.insert(Key::String(Arc::new("running_jobs".into())), Value::Int(seen.running_jobs as i64));
    m.insert(Key::String(Arc::new("free_cpus".into())), Value::Int(seen.free_cpus as i64));
    m.insert(Key::String(Arc::new("free_memory_mb".into())), Value::Int(seen.free_memory_mb as i64));
    m.insert(Key::String(Arc::new("reputation".into())), Value::Float(seen.reputation));
    Value::Map(Map { map: Arc::new(m) })
}
