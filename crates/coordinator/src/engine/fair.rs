//! Fair share's bookkeeping: each user's usage (cpu-seconds of their running jobs, decayed
//! exponentially with the pool's half-life, as HTCondor's accountant), the cpus they run now, and
//! what an admin set for them (a priority factor, a quota of running cpus). The matchmaker gets a
//! [`UserShare`] per user with idle work in each pass.
//!
//! Usage is exact between events: while a user runs `r` cpus, `usage(t + Δ) = usage(t)·d + r·τ·(1 −
//! d)` with `d = 2^(−Δ/half-life)` and `τ = half-life / ln 2`, brought up to date whenever `r`
//! changes. It is saved every [`USAGE_SAVE_MS`] (at a tick) for users whose usage grew; a restart
//! loads what was saved and charges the time since at the cpus of the jobs still running when the
//! store was loaded. A crash so forgets at most the last [`USAGE_SAVE_MS`] of the usage of jobs
//! that ended in that time.

use std::collections::HashMap;
use std::sync::Arc;

use vmgrid_proto::{UserSettingsRequest, UserView};
use vmgrid_scheduler::UserShare;

use super::{ApiError, Engine, Principal};
use crate::store::{Op, StoredUser};

/// How often users' usage is saved (at most this much is forgotten by a crash).
pub const USAGE_SAVE_MS: u64 = 60_000;

/// HTCondor's PRIORITY_HALFLIFE: one day.
pub const DEFAULT_HALF_LIFE_MS: u64 = 86_400_000;

/// One user's accounting.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct UserEntry {
    /// Decayed cpu-seconds as of `usage_at_ms`.
    usage_cpu_s: f64,
    usage_at_ms: u64,
    pub running_cpus: u64,
    pub running_jobs: u64,
    /// The cpus that accrue usage: those of its running jobs less those queued ahead on a node
    /// behind other jobs (`Node::uncharged`), which are charged once they can be running.
    pub charged_cpus: u64,
    factor: f64,
    pub max_cpus: Option<u64>,
    /// The usage grew since it was last saved.
    unsaved: bool,
}

impl Default for UserEntry {
    fn default() -> Self {
        UserEntry {
            usage_cpu_s: 0.0,
            usage_at_ms: 0,
            running_cpus: 0,
            running_jobs: 0,
            charged_cpus: 0,
            factor: 1.0,
            max_cpus: None,
            unsaved: false,
        }
    }
}

impl UserEntry {
    /// The usage at `now`, in cpu-seconds.
    fn usage_at(&self, now: u64, half_life_ms: u64) -> f64 {
        let dt_s = now.saturating_sub(self.usage_at_ms) as f64 / 1000.0;
        if dt_s == 0.0 {
            return self.usage_cpu_s;
        }
        let tau = tau_s(half_life_ms);
        let x = dt_s / tau;
        // d = e^(−Δ/τ) = 2^(−Δ/half-life); 1 − d without cancellation for a small Δ.
        self.usage_cpu_s * (-x).exp() + self.charged_cpus as f64 * tau * -(-x).exp_m1()
    }

    /// Brings the usage up to `now`, before the running cpus change.
    fn accrue(&mut self, now: u64, half_life_ms: u64) {
        if now <= self.usage_at_ms {
            // A clock stepped back: charge nothing for the negative interval, and go on from
            // now (found in review: a future timestamp froze the accounting until time caught up).
            if now < self.usage_at_ms {
                self.usage_at_ms = now;
                self.unsaved = true;
            }
            return;
        }
        self.usage_cpu_s = self.usage_at(now, half_life_ms);
        self.unsaved |= self.charged_cpus > 0;
        self.usage_at_ms = now;
    }

    fn share(&self, name: &Arc<str>, now: u64, half_life_ms: u64) -> UserShare {
        UserShare {
            name: name.clone(),
            running_cpus: self.running_cpus,
            recent_cpus: self.usage_at(now, half_life_ms) / tau_s(half_life_ms),
            factor: self.factor,
            max_cpus: self.max_cpus,
        }
    }
}

/// The mean life of usage, in seconds: half-life / ln 2.
fn tau_s(half_life_ms: u64) -> f64 {
    half_life_ms.max(1) as f64 / 1000.0 / std::f64::consts::LN_2
}

impl Engine {
    /// Usage decays by half in `ms` (HTCondor's PRIORITY_HALFLIFE).
    pub fn set_usage_half_life(&mut self, ms: u64) {
        self.half_life_ms = ms.max(1);
    }

    fn user_mut(&mut self, name: &Arc<str>) -> &mut UserEntry {
        self.users.entry(name.clone()).or_default()
    }

    /// A job of `owner` taking `cpus` started to run at `now`.
    /// (`charged`: it accrues usage from now; else once [`Engine::user_charged`] says so.)
    pub(super) fn user_started(&mut self, owner: &Arc<str>, cpus: u32, charged: bool, now: u64) {
        let h = self.half_life_ms;
        let u = self.user_mut(owner);
        u.accrue(now, h);
        let was_idle = u.running_cpus == 0;
        u.running_cpus += cpus as u64;
        u.running_jobs += 1;
        if charged {
            u.charged_cpus += cpus as u64;
        }
        // From idle to running, the stored time the usage was brought up to may be old: it is
        // saved with the placement, so a restart does not charge the running cpus for the whole
        // idle gap (found in review).
        if was_idle {
            let op = Op::UserUsage { user: owner.to_string(), usage_cpu_s: u.usage_cpu_s, at_ms: u.usage_at_ms };
            self.store(op);
        }
    }

    /// A job of `owner` holding `cpus` stopped running at `now`.
    pub(super) fn user_stopped(&mut self, owner: &Arc<str>, cpus: u32, charged: bool, now: u64) {
        let h = self.half_life_ms;
        let u = self.user_mut(owner);
        u.accrue(now, h);
        u.running_cpus = u.running_cpus.saturating_sub(cpus as u64);
        u.running_jobs = u.running_jobs.saturating_sub(1);
        if charged {
            u.charged_cpus = u.charged_cpus.saturating_sub(cpus as u64);
        }
    }

    /// A job of `owner` queued ahead on its node can be running from `now` (a job before it
    /// ended): its cpus accrue usage from now.
    pub(super) fn user_charged(&mut self, owner: &Arc<str>, cpus: u32, now: u64) {
        let h = self.half_life_ms;
        let u = self.user_mut(owner);
        u.accrue(now, h);
        u.charged_cpus += cpus as u64;
    }

    /// A running job given back at load: it counts as running since the usage was saved.
    pub(super) fn user_runs_at_load(&mut self, owner: &Arc<str>, cpus: u32, charged: bool) {
        let u = self.user_mut(owner);
        u.running_cpus += cpus as u64;
        u.running_jobs += 1;
        if charged {
            u.charged_cpus += cpus as u64;
        }
    }

    pub(super) fn load_user(&mut self, s: StoredUser) {
        let u = self.user_mut(&Arc::from(s.user.as_str()));
        u.usage_cpu_s = s.usage_cpu_s.max(0.0);
        u.usage_at_ms = s.usage_at_ms;
        u.factor = s.factor;
        u.max_cpus = s.max_cpus;
    }

    /// A user whose usage was never saved starts being charged now, not since the epoch.
    pub(super) fn users_loaded(&mut self, now: u64) {
        for u in self.users.values_mut().filter(|u| u.usage_at_ms == 0) {
            u.usage_at_ms = now;
        }
    }

    /// Saves the usage of the users whose usage grew, every [`USAGE_SAVE_MS`].
    pub(super) fn save_usage(&mut self, now: u64) {
        if now.abs_diff(self.usage_saved_ms) < USAGE_SAVE_MS {
            return;
        }
        self.usage_saved_ms = now;
        let h = self.half_life_ms;
        let mut ops = Vec::new();
        for (name, u) in &mut self.users {
            u.accrue(now, h);
            if u.unsaved {
                u.unsaved = false;
                ops.push(Op::UserUsage { user: name.to_string(), usage_cpu_s: u.usage_cpu_s, at_ms: u.usage_at_ms });
            }
        }
        for op in ops {
            self.store(op);
        }
    }

    /// The users with idle work among `owners`, for a pass: their index is their place in the
    /// returned list.
    pub(super) fn shares<'a>(&self, owners: impl Iterator<Item = &'a Arc<str>>, now: u64) -> Vec<UserShare> {
        owners
            .map(|name| match self.users.get(name) {
                Some(u) => u.share(name, now, self.half_life_ms),
                None => UserShare::new(name),
            })
            .collect()
    }

    /// Whether `owner` may run `cpus` more under their quota.
    /// A time-shared job (an SSI process, `cpus = 0`) takes no cpu and is never held back, as
    /// the matchmaker does not count it (found in review: a quota lowered below what a user
    /// runs stopped their processes and made every pass repeat).
    pub(super) fn within_quota(&self, owner: &str, cpus: u32) -> bool {
        cpus == 0
            || self.users.get(owner).and_then(|u| u.max_cpus.map(|m| u.running_cpus + cpus as u64 <= m)).unwrap_or(true)
    }

    /// Every user an admin may see (or the caller alone), lowest effective priority first.
    pub fn user_views(&self, p: &Principal, now: u64) -> Vec<UserView> {
        let mut idle: HashMap<&str, u64> = HashMap::new();
        for ids in self.idle_by_spec.values() {
            if let Some(j) = ids.first().and_then(|id| self.jobs.get(id)) {
                *idle.entry(&*j.owner).or_default() += ids.len() as u64;
            }
        }
        let mut names: Vec<&str> = match p {
            Principal::Admin(_) => {
                let mut all: Vec<&str> =
                    self.users.keys().map(|k| &**k).chain(self.queued.keys().map(|k| &**k)).collect();
                all.sort_unstable();
                all.dedup();
                all
            }
            other => vec![other.owner()],
        };
        names.retain(|n| !n.is_empty());
        let default = UserEntry::default();
        let mut views: Vec<UserView> = names
            .into_iter()
            .map(|name| {
                let u = self.users.get(name).unwrap_or(&default);
                let share = u.share(&Arc::from(name), now, self.half_life_ms);
                UserView {
                    user: name.to_string(),
                    usage_cpu_s: u.usage_at(now, self.half_life_ms),
                    recent_cpus: share.recent_cpus,
                    running_jobs: u.running_jobs,
                    idle_jobs: idle.get(name).copied().unwrap_or(0),
                    running_cpus: u.running_cpus,
                    factor: u.factor,
                    max_cpus: u.max_cpus,
                    priority: share.priority(0),
                }
            })
            .collect();
        views.sort_by(|a, b| a.priority.total_cmp(&b.priority).then_with(|| a.user.cmp(&b.user)));
        views
    }

    /// An admin sets a user's priority factor and quota, durably; the user's view after it.
    pub fn set_user(&mut self, p: &Principal, req: &UserSettingsRequest, now: u64) -> Result<UserView, ApiError> {
        if !matches!(p, Principal::Admin(_)) {
            return Err(ApiError::Forbidden(format!(
                "a {} token cannot set users' quotas or priority factors; an admin token can",
                p.role().as_str()
            )));
        }
        req.check().map_err(ApiError::BadRequest)?;
        let name: Arc<str> = Arc::from(req.user.as_str());
        let u = self.user_mut(&name);
        if let Some(f) = req.factor {
            u.factor = f;
        }
        if let Some(m) = req.max_cpus {
            u.max_cpus = Some(m);
        }
        if req.no_max_cpus {
            u.max_cpus = None;
        }
        let (factor, max_cpus) = (u.factor, u.max_cpus);
        self.store(Op::UserSettings { user: req.user.clone(), factor, max_cpus });
        self.dirty = true;
        self.wake_nodes();
        let me = Principal::User(req.user.clone());
        Ok(self.user_views(&me, now).remove(0))
    }
}

#[cfg(test)]
mod tests;
