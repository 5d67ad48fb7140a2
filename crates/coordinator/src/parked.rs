//! The lease calls parked in a long poll, by node. Each node waits on its own `Notify`, so a
//! scheduling pass wakes only the nodes it placed work on: with thousands of nodes parked, waking
//! them all for each placement would have each take the engine's lock to find nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The nodes whose lease calls are parked, each with what wakes them. An entry lives while a call
/// of that node holds it ([`Parked`]): a node that went away, or does not poll, leaves none.
#[derive(Default)]
pub(crate) struct ParkedNodes {
    map: Mutex<HashMap<String, Arc<Notify>>>,
    /// The server stops: parked calls end now (a graceful shutdown waits for every call).
    closed: AtomicBool,
}

impl ParkedNodes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What wakes node `name`'s lease call; held while the call may wait.
    pub fn park(&self, name: &str) -> Parked<'_> {
        let notify = self.lock().entry(name.to_string()).or_default().clone();
        Parked { nodes: self, name: name.to_string(), notify }
    }

    /// Ends every parked call, and any call that parks from now on (the server stops).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for n in self.lock().values() {
            n.notify_waiters();
        }
    }

    /// Whether the server stops ([`ParkedNodes::close`]).
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Wakes node `name`'s parked lease calls; whether it had any entry.
    pub fn wake(&self, name: &str) -> bool {
        let notify = self.lock().get(name).cloned();
        notify.map(|n| n.notify_waiters()).is_some()
    }

    /// How many nodes have a lease call open (`/metrics`: most of them wait for work).
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A node's lease call's hold on its entry: the entry goes with the node's last call.
pub(crate) struct Parked<'a> {
    nodes: &'a ParkedNodes,
    name: String,
    pub notify: Arc<Notify>,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        let mut map = self.nodes.lock();
        // Two holders, the map and this call: no other call of the node holds the entry (a new
        // holder clones it under the same lock).
        let last = Arc::strong_count(&self.notify) == 2;
        if last && map.get(&self.name).is_some_and(|n| Arc::ptr_eq(n, &self.notify)) {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    use super::*;

    fn ready(f: std::pin::Pin<&mut impl Future>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[test]
    fn a_wake_reaches_the_parked_calls_of_that_node_only() {
        let nodes = ParkedNodes::default();
        let (a1, a2, b) = (nodes.park("a"), nodes.park("a"), nodes.park("b"));
        assert_eq!(nodes.len(), 2, "one entry per node");
        let mut wa1 = pin!(a1.notify.notified());
        let mut wa2 = pin!(a2.notify.notified());
        let mut wb = pin!(b.notify.notified());
        assert!(!ready(wa1.as_mut()) && !ready(wa2.as_mut()) && !ready(wb.as_mut()));
        assert!(nodes.wake("a"));
        assert!(ready(wa1.as_mut()) && ready(wa2.as_mut()), "both calls of node a wake");
        assert!(!ready(wb.as_mut()), "node b sleeps on");
        assert!(!nodes.wake("c"), "a node with no parked call has no entry");
        assert_eq!(nodes.len(), 2);
    }

    #[test]
    fn closing_wakes_every_parked_call_and_says_so_to_later_ones() {
        let nodes = ParkedNodes::default();
        let (a, b) = (nodes.park("a"), nodes.park("b"));
        let mut wa = pin!(a.notify.notified());
        let mut wb = pin!(b.notify.notified());
        assert!(!ready(wa.as_mut()) && !ready(wb.as_mut()) && !nodes.closed());
        nodes.close();
        assert!(ready(wa.as_mut()) && ready(wb.as_mut()), "every node's call wakes");
        assert!(nodes.closed(), "a call that parks later sees it and does not wait");
    }

    #[test]
    fn the_entry_goes_with_the_nodes_last_call() {
        let nodes = ParkedNodes::default();
        let first = nodes.park("a");
        let second = nodes.park("a");
        assert!(Arc::ptr_eq(&first.notify, &second.notify));
        drop(first);
        assert_eq!(nodes.len(), 1, "a call of node a still holds it");
        drop(second);
        assert_eq!(nodes.len(), 0);
        assert!(!nodes.wake("a"));
        let again = nodes.park("a");
        assert_eq!(nodes.len(), 1, "a new call makes a new entry");
        drop(again);
        assert_eq!(nodes.len(), 0);
    }
}
