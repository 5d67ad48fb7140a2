//! The runtime around the engine. One lock covers the engine and the store's writer, so store
//! operations are queued in the order of the state changes that caused them. Everything slow
//! happens after the lock is released: waiting for the commit of what a call queued (a reply is
//! sent only once its changes are on disk), waking callers that wait, and logging.
//!
//! A scheduling pass is woken as soon as a call queues a change that may allow placements, not
//! once it is durable. While a lease call waits to run it, the change's commit is held (at most
//! [`store::HOLD_MAX`]) until the pass has queued its placements, and both go to disk in one
//! group commit; otherwise the pass runs while the change commits, and its placements go in the
//! next. Nothing is acknowledged early by either: the lease reply that carries a placement waits
//! for its own ticket, which comes after the change's.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

use std::sync::Arc;

use crate::blobs::Blobs;
use crate::engine::{Engine, Event};
use crate::parked::ParkedNodes;
use crate::serve::Transport;
use crate::store::{self, Writer};

struct Core {
    engine: Engine,
    writer: Writer,
}

pub(crate) struct Shared {
    core: Mutex<Core>,
    committed: watch::Receiver<u64>,
    /// Holds the commit of a change that wakes a pass until the pass's placements join it.
    hold: Arc<store::Hold>,
    /// Wakes one long-polling lease call (`notify_one`) to run a scheduling pass: something
    /// changed that may allow placements. After it, only the nodes the pass placed work on are
    /// woken (`parked`), not every parked call.
    pub work: Notify,
    /// The parked lease calls, by node.
    pub parked: ParkedNodes,
    /// Wakes `wait` calls: some job changed state.
    pub changed: Notify,
    pub blobs: Blobs,
    transport: Transport,
    /// The largest blob one upload may be.
    pub max_blob_bytes: u64,
    /// A scheduling pass is running (one at a time).
    scheduling: AtomicBool,
    /// Lease calls waiting for work now ([`Shared::wait_for_work`]): one of them runs the pass a
    /// change wakes.
    waiting: AtomicUsize,
    /// Counts durable changes (jobs, nodes): the dashboard's event streams wait on it. A watch
    /// keeps only the latest count, so a slow stream skips ticks instead of queueing them.
    pub ticks: watch::Sender<u64>,
    /// The open event streams, counted per owner ([`crate::api::Streams`]).
    pub streams: Arc<crate::api::Streams>,
    /// The overlay's soft state: nodes' keys, endpoints and paths, and the relay's mailboxes.
    pub overlay: crate::overlay::Overlay,
}

/// What a call leaves to do once the lock is released: wait for its commit, then wake.
#[must_use = "a reply must wait for the changes it reports to be durable"]
pub(crate) struct Pending {
    ticket: u64,
    wake_waiters: bool,
    changed: bool,
}

impl Pending {
    /// Whether the call changed the pool (its commit bumps the dashboards' tick).
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// This and what an earlier `Pending` owed (its wake-ups and event tick), waited for at once:
    /// tickets only grow, so waiting for this one waits for the earlier one too.
    pub fn after(mut self, earlier: Option<Pending>) -> Pending {
        if let Some(e) = earlier {
            self.ticket = self.ticket.max(e.ticket);
            self.wake_waiters |= e.wake_waiters;
            self.changed |= e.changed;
        }
        self
    }
}

impl Shared {
    pub fn new(engine: Engine, writer: Writer, blobs: Blobs, transport: Transport, max_blob_bytes: u64) -> Shared {
        let committed = writer.committed();
        let hold = writer.hold();
        Shared {
            core: Mutex::new(Core { engine, writer }),
            committed,
            hold,
            work: Notify::new(),
            parked: ParkedNodes::default(),
            changed: Notify::new(),
            blobs,
            transport,
            max_blob_bytes,
            scheduling: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            ticks: watch::Sender::new(0),
            streams: Arc::default(),
            overlay: Default::default(),
        }
    }

    /// Runs scheduling passes while the engine says something changed: the snapshot and the
    /// placements under the lock, the matchmaking (user CEL) without it, on a thread that may
    /// block. One pass runs at a time; a caller that finds one running leaves it to that one.
    /// Returns the nodes it placed jobs on, and what the last pass left to make durable.
    pub fn schedule(&self) -> (BTreeSet<String>, Option<Pending>) {
        let mut placed = BTreeSet::new();
        if self.scheduling.swap(true, Ordering::AcqRel) {
            return (placed, None);
        }
        // Ends the pass however it ends (a panic in a user's expression included): the next
        // change may run one, and the hold on the writer goes.
        struct Over<'a>(&'a Shared);
        impl Drop for Over<'_> {
            fn drop(&mut self) {
                self.0.scheduling.store(false, Ordering::Release);
                self.0.hold.release();
            }
        }
        let over = Over(self);
        let mut last = None;
        let mut settled = false;
        for _ in 0..8 {
            let (snap, pending) = self.call(|e| e.snapshot(vmgrid_proto::now_ms()));
            last = Some(pending.after(last));
            let Some(mut snap) = snap else {
                settled = true;
                break;
            };
            if snap.is_empty() {
                self.peek_mut(|e| e.recycle(&mut snap));
                continue;
            }
            let decision = tokio::task::block_in_place(|| snap.decide());
            let (on, pending) = self.call(|e| {
                let on = e.apply(&snap, decision, vmgrid_proto::now_ms());
                let on = on.into_iter().map(str::to_string).collect::<Vec<_>>();
                e.recycle(&mut snap);
                on
            });
            placed.extend(on);
            last = Some(pending.after(last));
        }
        drop(over);
        // A change that came after the last snapshot, while this pass still ran, found the pass
        // busy and was left to it: another parked call takes it.
        if settled && self.peek(|e| e.needs_pass()) {
            self.work.notify_one();
        }
        (placed, last)
    }

    /// A lease call's wait for work, until `deadline`: woken by `mine` (a pass placed work on its
    /// node) or to run a pass (one waiting call for the pool). Only a call that waits takes that
    /// wake-up: a change's commit may be held for the pass it wakes ([`store::Hold`]), and a call
    /// still looking, or waiting for a commit, would not run it; a wake-up with no call waiting
    /// is kept (`notify_one` keeps a permit) for the next one. Counted in `waiting` meanwhile.
    pub async fn wait_for_work(&self, mine: impl std::future::Future<Output = ()>, deadline: tokio::time::Instant) {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _counted = Waiting(&self.waiting);
        let pass = self.work.notified();
        let _ = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                _ = pass => {}
                _ = mine => {}
            }
        })
        .await;
    }

    /// The server's TLS configuration; `None` when it serves plain HTTP.
    pub fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.transport.server.clone()
    }

    /// The pool's own CA, if it has one (it then signs the consoles' certificates).
    pub fn ca(&self) -> Option<&vmgrid_tls::Ca> {
        self.transport.ca.as_deref()
    }

    /// The CA of nodes' certificates for serving each other blobs, if the pool has its own CA.
    pub fn peer_ca(&self) -> Option<&vmgrid_tls::Ca> {
        self.transport.peer_ca.as_deref()
    }

    pub fn scheme(&self) -> &'static str {
        self.transport.scheme()
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the engine and queues what it stored. The reply of a call must wait for the
    /// returned [`Pending`] ([`Shared::finish`]); even a call that changed nothing waits for what
    /// was queued before it, so no reply shows state that is not yet durable.
    pub fn call<T>(&self, f: impl FnOnce(&mut Engine) -> T) -> (T, Pending) {
        let mut core = self.lock();
        let out = f(&mut core.engine);
        let fx = core.engine.take_effects();
        let changed = !fx.ops.is_empty() || fx.wake_waiters || !fx.events.is_empty();
        let mut ticket = core.writer.last_ticket();
        // A pass will run (a lease call waiting for work is woken to run it): its placements
        // join this change's commit rather than wait for the one after it.
        if fx.wake_nodes && !fx.ops.is_empty() && self.waiting.load(Ordering::Acquire) > 0 {
            self.hold.set();
        }
        for op in fx.ops {
            ticket = core.writer.push(op);
        }
        drop(core);
        if fx.wake_nodes {
            self.work.notify_one();
        }
        for node in &fx.end_calls {
            self.parked.wake(node);
        }
        for e in fx.events {
            log(&e);
        }
        (out, Pending { ticket, wake_waiters: fx.wake_waiters, changed })
    }

    /// Reads the engine without waiting for anything (authentication, metrics).
    pub fn peek<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        f(&self.lock().engine)
    }

    /// A change to what the engine keeps in memory only, which causes no effects (nothing to
    /// store, nobody to wake): `Engine::reuse_blob`.
    pub fn peek_mut<T>(&self, f: impl FnOnce(&mut Engine) -> T) -> T {
        let mut inner = self.lock();
        let out = f(&mut inner.engine);
        debug_assert!(inner.engine.take_effects().is_empty(), "peek_mut is for calls without effects");
        out
    }

    /// Why the store cannot commit, while it cannot (new work is then refused at once).
    pub fn store_failing(&self) -> Option<store::Failing> {
        self.lock().writer.failing()
    }

    /// Waits until what the call queued is durable, then wakes the `wait` calls it concerns. While the
    /// store cannot commit (a full disk), the wait ends after [`STORE_PATIENCE`] with why: the
    /// change is then not acknowledged (it is saved once the store can), and the caller says so.
    pub async fn finish(&self, p: Pending) -> Result<(), store::Failing> {
        let durable = store::durable(self.committed.clone(), p.ticket);
        if tokio::time::timeout(STORE_PATIENCE, durable).await.is_err() {
            let why = self.lock().writer.failing().unwrap_or(store::Failing("the job store is slow".into()));
            return Err(why);
        }
        if p.wake_waiters {
            self.changed.notify_waiters();
        }
        if p.changed {
            self.ticks.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}

/// How long a reply waits for its changes to be durable before it answers that they are not.
pub const STORE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

fn log(e: &Event) {
    match e {
        Event::NodeLost { node } => tracing::warn!(%node, "node lost: no heartbeat"),
        Event::ResultRefused { job, epoch, node, why } => {
            tracing::info!(job, epoch, %node, "refused a result: {why}")
        }
        Event::UnreadableSpec { spec, why } => tracing::error!(spec, "unreadable spec in the store: {why}"),
        Event::UnreadableDag { dag, why } => tracing::error!(dag, "unreadable workflow in the store, left out: {why}"),
    }
}
