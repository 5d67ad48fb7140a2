//! The runtime around the engine. One lock covers the engine and the store's writer, so store
//! operations are queued in the order of the state changes that caused them. Everything slow
//! happens after the lock is released: waiting for the commit of what a call queued (a reply is
//! sent only once its changes are on disk), waking callers that wait, and logging.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

use std::sync::Arc;

use crate::blobs::Blobs;
use crate::engine::{Engine, Event};
use crate::serve::Transport;
use crate::store::{self, Writer};

struct Core {
    engine: Engine,
    writer: Writer,
}

pub(crate) struct Shared {
    core: Mutex<Core>,
    committed: watch::Receiver<u64>,
    /// Wakes long-polling lease calls: there may be work.
    pub work: Notify,
    /// Wakes `wait` calls: some job changed state.
    pub changed: Notify,
    pub blobs: Blobs,
    transport: Transport,
    /// The largest blob one upload may be.
    pub max_blob_bytes: u64,
}

/// What a call leaves to do once the lock is released: wait for its commit, then wake.
#[must_use = "a reply must wait for the changes it reports to be durable"]
pub(crate) struct Pending {
    ticket: u64,
    wake_nodes: bool,
    wake_waiters: bool,
}

impl Shared {
    pub fn new(engine: Engine, writer: Writer, blobs: Blobs, transport: Transport, max_blob_bytes: u64) -> Shared {
        let committed = writer.committed();
        Shared {
            core: Mutex::new(Core { engine, writer }),
            committed,
            work: Notify::new(),
            changed: Notify::new(),
            blobs,
            transport,
            max_blob_bytes,
        }
    }

    /// The server's TLS configuration; `None` when it serves plain HTTP.
    pub fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.transport.server.clone()
    }

    /// The pool's own CA, if it has one (it then signs the consoles' certificates).
    pub fn ca(&self) -> Option<&vmgrid_tls::Ca> {
        self.transport.ca.as_deref()
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
        let mut ticket = core.writer.last_ticket();
        for op in fx.ops {
            ticket = core.writer.push(op);
        }
        drop(core);
        for e in fx.events {
            log(&e);
        }
        (out, Pending { ticket, wake_nodes: fx.wake_nodes, wake_waiters: fx.wake_waiters })
    }

    /// Reads the engine without waiting for anything (authentication, metrics).
    pub fn peek<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        f(&self.lock().engine)
    }

    /// Waits until what the call queued is durable, then wakes whoever it concerns.
    pub async fn finish(&self, p: Pending) {
        store::durable(self.committed.clone(), p.ticket).await;
        if p.wake_nodes {
            self.work.notify_waiters();
        }
        if p.wake_waiters {
            self.changed.notify_waiters();
        }
    }
}

fn log(e: &Event) {
    match e {
        Event::NodeLost { node } => tracing::warn!(%node, "node lost: no heartbeat"),
        Event::ResultRefused { job, epoch, node, why } => {
            tracing::info!(job, epoch, %node, "refused a result: {why}")
        }
        Event::UnreadableSpec { spec, why } => tracing::error!(spec, "unreadable spec in the store: {why}"),
    }
}
