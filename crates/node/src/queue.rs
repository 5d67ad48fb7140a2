//! Lease-ahead on the node: jobs it leased beyond its free cpus wait here, in order, and start as
//! cpus free up, without a call to the pool per job. How far ahead the node asks is sized by how
//! short its recent jobs were: about [`BUDGET`] of work queued per cpu, at most
//! [`MAX_AHEAD_PER_CPU`] cpus' worth per cpu, and none until it has seen a few jobs or while one
//! of its jobs runs longer than the budget. A queued job that waited longer than [`STALE`] (a
//! longer job got ahead of it) is handed back to the pool with the next heartbeat, to be placed
//! again where a cpu is free.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmgrid_proto::{Lease, LeaseId, MAX_AHEAD_PER_CPU};

use super::{Agent, lock};

/// How much work, by its recent jobs' mean duration, a node queues per cpu.
pub const BUDGET: Duration = Duration::from_millis(100);
/// How long a queued job may wait before the node hands it back.
pub const STALE: Duration = Duration::from_secs(1);
/// How many recent durations the mean is taken over, and how many it needs first.
const SAMPLES: usize = 32;
const MIN_SAMPLES: usize = 4;

pub struct Queued {
    pub lease: Lease,
    pub since: Instant,
}

impl Queued {
    pub fn id(&self) -> LeaseId {
        LeaseId { job_id: self.lease.job_id, epoch: self.lease.epoch }
    }
}

/// The node's recent job durations.
#[derive(Default)]
pub struct Recent {
    durations: VecDeque<Duration>,
}

impl Recent {
    pub fn add(&mut self, d: Duration) {
        if self.durations.len() == SAMPLES {
            self.durations.pop_front();
        }
        self.durations.push_back(d);
    }

    /// Cpus' worth of jobs to queue beyond `cpus`, while its longest running job has run
    /// `longest` so far.
    pub fn ahead(&self, cpus: u32, longest: Duration) -> u32 {
        if self.durations.len() < MIN_SAMPLES || longest > BUDGET {
            return 0;
        }
        let mean = self.durations.iter().sum::<Duration>() / self.durations.len() as u32;
        let per_cpu = BUDGET.as_micros() / mean.as_micros().max(100);
        (per_cpu.min(u128::from(MAX_AHEAD_PER_CPU)) as u32).saturating_mul(cpus)
    }
}

impl Agent {
    /// How far ahead to lease now (time-shared jobs, SSI processes that may live for hours, do
    /// not count).
    pub(crate) fn ahead(&self) -> u32 {
        let running = lock(&self.running);
        let longest = running.values().filter(|r| r.cpus > 0).map(|r| r.started.elapsed()).max().unwrap_or_default();
        drop(running);
        lock(&self.recent).ahead(self.ad.cpus, longest)
    }

    /// The cpus a lease call may ask for: the node's cpus and lease-ahead, less what its running
    /// and queued jobs hold.
    pub(crate) fn room(&self, ahead: u32) -> u32 {
        let running: u32 = lock(&self.running).values().map(|r| r.cpus).sum();
        let queued: u32 = lock(&self.queue).iter().map(|q| q.lease.spec.cpus).sum();
        (self.ad.cpus + ahead).saturating_sub(running + queued)
    }

    /// Waits (at most 100 ms) until a lease call is worth making: while the pool has more work
    /// than the node took (`eager`: its last reply was full), once half its queue is free (so it
    /// asks in batches); else once a cpu is free, as without lease-ahead (a node whose pool had
    /// no more work does not keep a call open while its cpus are busy). Returns the room, with
    /// lease-ahead, and the lease-ahead it was counted with.
    pub(crate) fn wait_for_room(&self, eager: bool) -> (u32, u32) {
        let mut seen = (0, 0);
        for _ in 0..10 {
            let ahead = self.ahead();
            let room = self.room(ahead);
            seen = (room, ahead);
            let ready = if eager && ahead > 0 { room >= ((self.ad.cpus + ahead) / 2).max(1) } else { self.room(0) > 0 };
            if ready {
                break;
            }
            let running = lock(&self.running);
            drop(self.slot_freed.wait_timeout(running, Duration::from_millis(10)).unwrap_or_else(|p| p.into_inner()));
        }
        seen
    }

    /// Queues leases the pool handed over and starts what the free cpus can run.
    pub(crate) fn enqueue(self: &Arc<Self>, leases: Vec<Lease>) {
        let now = Instant::now();
        lock(&self.queue).extend(leases.into_iter().map(|lease| Queued { lease, since: now }));
        self.start_queued();
    }

    /// Starts queued jobs that fit in the free cpus and memory: time-shared ones (cpus = 0, SSI
    /// processes) first, then the others in order, each the first that fits (a job too big for
    /// what is free now waits, and is handed back if it waits too long). A job moves from the
    /// queue to the running ones under both locks, so no two callers give one cpu twice and a
    /// heartbeat sees every job in one or the other. Once the node is asked to stop, nothing
    /// more starts: what is queued is handed back by the drain, not run while the lease loop
    /// finishes its call.
    pub(crate) fn start_queued(self: &Arc<Self>) {
        loop {
            if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let next = {
                let mut running = lock(&self.running);
                let mut queue = lock(&self.queue);
                let (cpus, memory) = running.values().fold((0, 0), |(c, m), r| (c + r.cpus, m + r.memory_mb));
                let fits = |q: &Queued| {
                    let s = &q.lease.spec;
                    (s.cpus == 0 || cpus + s.cpus <= self.ad.cpus) && memory + s.memory_mb <= self.ad.memory_mb
                };
                let at = (queue.iter().position(|q| q.lease.spec.cpus == 0 && fits(q)))
                    .or_else(|| queue.iter().position(|q| q.lease.spec.cpus > 0 && fits(q)));
                at.and_then(|i| queue.remove(i)).map(|q| {
                    let started = super::Running::new(&q.lease.spec);
                    let flags = (started.cancel.clone(), started.vacate.clone());
                    running.insert(q.id(), started);
                    (q.lease, flags)
                })
            };
            match next {
                Some((lease, (cancel, vacate))) => self.spawn_job(lease, cancel, vacate),
                None => return,
            }
        }
    }

    /// The leases of the running and queued jobs, read together.
    pub(crate) fn held_leases(&self) -> Vec<LeaseId> {
        let running = lock(&self.running);
        let queue = lock(&self.queue);
        running.keys().copied().chain(queue.iter().map(Queued::id)).collect()
    }

    /// Takes out of the queue the jobs that waited longer than [`STALE`] (all of them with
    /// `all`), to hand back.
    pub(crate) fn take_queued(&self, all: bool) -> Vec<LeaseId> {
        let mut queue = lock(&self.queue);
        let mut out = Vec::new();
        queue.retain(|q| {
            let stale = all || q.since.elapsed() > STALE;
            if stale {
                out.push(q.id());
            }
            !stale
        });
        out
    }

    /// Drops the queued jobs whose leases are named (revoked, or to hand back unstarted); returns
    /// those it dropped.
    pub(crate) fn drop_queued(&self, revoked: &[LeaseId]) -> Vec<LeaseId> {
        let mut dropped = Vec::new();
        lock(&self.queue).retain(|q| {
            let drop = revoked.contains(&q.id());
            if drop {
                dropped.push(q.id());
            }
            !drop
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent(ms: &[u64]) -> Recent {
        let mut r = Recent::default();
        for &m in ms {
            r.add(Duration::from_millis(m));
        }
        r
    }

    #[test]
    fn lease_ahead_is_sized_by_how_short_recent_jobs_were() {
        assert_eq!(recent(&[1, 1, 1]).ahead(2, Duration::ZERO), 0, "too few jobs seen");
        assert_eq!(recent(&[10; 4]).ahead(2, Duration::ZERO), 20, "100 ms of 10 ms jobs per cpu");
        assert_eq!(recent(&[0; 8]).ahead(2, Duration::ZERO), 2 * MAX_AHEAD_PER_CPU, "bounded per cpu");
        assert_eq!(recent(&[200; 8]).ahead(2, Duration::ZERO), 0, "jobs longer than the budget: none");
        assert_eq!(recent(&[1; 8]).ahead(2, Duration::from_millis(150)), 0, "a long job is running: none");
        // Only the last 32 count: long jobs long ago do not keep the queue from filling.
        let mut r = recent(&[500; 32]);
        for _ in 0..32 {
            r.add(Duration::from_millis(5));
        }
        assert_eq!(r.ahead(1, Duration::ZERO), 20);
    }
}
