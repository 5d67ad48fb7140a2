//! Fair share: the order in which one pass hands out slots across users. Each user's idle jobs
//! form a queue (higher job priority first, then oldest first); the next slot goes to the user
//! whose effective priority — their factor × (recent usage + the cpus they run, counting what this
//! pass already gave them) — is lowest, as HTCondor's user priorities (lower is better). So over
//! passes each user's share of the cpus tends to the fair share: equal for equal factors, and a
//! factor twice as large gets half as many.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Arc;

use crate::IdleJob;

/// What the matchmaker knows of one user for a pass.
#[derive(Debug, Clone, PartialEq)]
pub struct UserShare {
    pub name: Arc<str>,
    /// Cpus of the user's running jobs.
    pub running_cpus: u64,
    /// Decayed usage expressed in cpus: usage in cpu-seconds ÷ (half-life / ln 2), the average
    /// number of cpus the user kept busy, weighted toward the recent past (HTCondor's real
    /// user priority).
    pub recent_cpus: f64,
    /// The admin-set priority factor (1 by default); larger means a smaller share.
    pub factor: f64,
    /// The admin-set quota: the most cpus the user's running jobs may hold at once.
    pub max_cpus: Option<u64>,
}

impl UserShare {
    /// A user with no usage, factor 1 and no quota.
    pub fn new(name: &str) -> UserShare {
        UserShare { name: Arc::from(name), running_cpus: 0, recent_cpus: 0.0, factor: 1.0, max_cpus: None }
    }

    /// The effective priority with `given` more cpus running: lower is served first.
    pub fn priority(&self, given: u64) -> f64 {
        self.factor * (self.recent_cpus + (self.running_cpus + given) as f64)
    }

    /// Whether the user's quota forbids a job asking for `cpus` more, with `given` more running.
    pub fn over_quota(&self, given: u64, cpus: u32) -> bool {
        self.max_cpus.is_some_and(|max| cpus > 0 && self.running_cpus + given + cpus as u64 > max)
    }

    /// Why the user's jobs wait at their quota, with `given` more running.
    pub fn quota_reason(&self, given: u64) -> String {
        format!(
            "{} runs {} cpu(s), and {} is the user's quota (`vmgrid users`): waiting until some of {}'s jobs end",
            self.name,
            self.running_cpus + given,
            self.max_cpus.unwrap_or(0),
            self.name
        )
    }
}

/// A user's place in the pass's order.
#[derive(Debug, Clone, Copy)]
struct Turn {
    priority: f64,
    /// The id of the user's next job: among equals, the user who has waited longest goes first.
    head: u64,
    user: u32,
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority.total_cmp(&other.priority).then(self.head.cmp(&other.head)).then(self.user.cmp(&other.user))
    }
}

/// The users' queues of one pass and whose turn it is.
pub(crate) struct Queues<'u> {
    pub users: &'u [UserShare],
    jobs: Vec<Vec<IdleJob>>,
    next: Vec<usize>,
    /// Cpus this pass gave each user.
    pub given: Vec<u64>,
    turns: BinaryHeap<Reverse<Turn>>,
}

impl<'u> Queues<'u> {
    /// Sorts the jobs into their users' queues; jobs of a user not in `users` are returned.
    pub fn new<J: std::borrow::Borrow<IdleJob>>(
        users: &'u [UserShare],
        jobs: impl IntoIterator<Item = J>,
    ) -> (Queues<'u>, Vec<IdleJob>) {
        let mut queues: Vec<Vec<IdleJob>> = vec![Vec::new(); users.len()];
        let mut unknown = Vec::new();
        for j in jobs {
            let j = j.borrow().clone();
            match queues.get_mut(j.user as usize) {
                Some(q) => q.push(j),
                None => unknown.push(j),
            }
        }
        let mut q = Queues {
            users,
            next: vec![0; users.len()],
            given: vec![0; users.len()],
            turns: BinaryHeap::with_capacity(users.len()),
            jobs: queues,
        };
        for u in 0..users.len() {
            // Higher priority first, then oldest first (already so when given in id order).
            q.jobs[u].sort_by_key(|j| (Reverse(j.priority), j.id));
            q.queue(u);
        }
        (q, unknown)
    }

    /// Puts user `u` back in line if they have jobs left.
    fn queue(&mut self, u: usize) {
        if let Some(head) = self.jobs[u].get(self.next[u]) {
            let priority = self.users[u].priority(self.given[u]);
            self.turns.push(Reverse(Turn { priority, head: head.id, user: u as u32 }));
        }
    }

    /// The next job of the user whose turn it is; call [`Queues::done`] with what it got.
    pub fn pop(&mut self) -> Option<(usize, IdleJob)> {
        let Reverse(t) = self.turns.pop()?;
        let u = t.user as usize;
        let job = self.jobs[u][self.next[u]].clone();
        self.next[u] += 1;
        Some((u, job))
    }

    /// User `u`'s job took `cpus` (0 if it was not placed); the user waits for their next turn.
    pub fn done(&mut self, u: usize, cpus: u32) {
        self.given[u] += cpus as u64;
        self.queue(u);
    }
}
