//! `vmgrid users`: each user's share of the pool (usage, running and idle jobs, priority factor,
//! quota, effective priority) and what an admin sets for a user.

use serde::{Deserialize, Serialize};

/// One user's standing, as `GET /v1/users` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    pub user: String,
    /// Cpu-seconds of the user's running jobs, decayed with the pool's half-life.
    pub usage_cpu_s: f64,
    /// The usage as an average number of busy cpus: usage ÷ (half-life / ln 2).
    pub recent_cpus: f64,
    pub running_jobs: u64,
    pub idle_jobs: u64,
    pub running_cpus: u64,
    /// The admin-set priority factor (1 by default): larger means a smaller share.
    pub factor: f64,
    /// The admin-set quota of running cpus, if any.
    pub max_cpus: Option<u64>,
    /// factor × (recent_cpus + running_cpus): the user with the lowest gets the next free slot.
    pub priority: f64,
}

/// `POST /v1/users/settings` (admin only): what to change for `user`; fields left out stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettingsRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u64>,
    /// Remove the user's quota.
    #[serde(default)]
    pub no_max_cpus: bool,
}

impl UserSettingsRequest {
    /// The one validator's rules for user settings ([`vmgrid_job::check::user_settings`]).
    pub fn check(&self) -> Result<(), String> {
        vmgrid_job::check::user_settings(&self.user, self.factor, self.max_cpus, self.no_max_cpus)
    }
}
