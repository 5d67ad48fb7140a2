//! Users and their tokens: the tokens an admin makes, lists and revokes (`vmgrid token`), each
//! user's share of the pool (`vmgrid users`: usage, running and idle jobs, priority factor, quota,
//! effective priority) and what an admin sets for a user.

use serde::{Deserialize, Serialize};

/// One user's standing, as `GET /v1/users` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

pub(crate) fn is_zero(x: &i32) -> bool {
    *x == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Node,
    User,
    Admin,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub role: Role,
    pub owner: String,
    /// The token stops working this many seconds after it is made; `None`: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

/// The longest a token may be made to last: ten years.
pub const MAX_TOKEN_TTL_S: u64 = 10 * 365 * 24 * 3600;

impl TokenRequest {
    /// The owner a token is made for, as the pool records it (surrounding blanks dropped).
    pub fn owner(&self) -> &str {
        self.owner.trim()
    }

    /// An owner is a user name ([`vmgrid_job::check::user_name`]), and a lifetime a sane one.
    pub fn check(&self) -> Result<(), String> {
        vmgrid_job::check::user_name(self.owner())?;
        if let Some(ttl) = self.ttl_s
            && (ttl == 0 || ttl > MAX_TOKEN_TTL_S)
        {
            return Err(format!("ttl is {ttl} s; it must be between 1 s and {MAX_TOKEN_TTL_S} s"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// The secret, shown this once; the pool keeps only its hash.
    pub token: String,
    /// What names the token for `vmgrid token --revoke`.
    pub id: String,
    pub expires_ms: Option<u64>,
}

/// A token as an admin lists it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    /// `pool`, `node`, `user`, `admin` or `console`.
    pub role: String,
    pub owner: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub id: String,
}
