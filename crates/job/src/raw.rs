//! The job file exactly as written: serde types that reject unknown keys and keep spans.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    pub name: Option<Spanned<String>>,
    pub vm: Spanned<RawVm>,
    #[serde(default)]
    pub resources: RawResources,
    #[serde(default)]
    pub files: RawFiles,
    #[serde(default)]
    pub policy: RawPolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVm {
    #[serde(rename = "type")]
    pub vm_type: Spanned<String>,
    pub image: Option<Spanned<String>>,
    #[serde(default)]
    pub args: Vec<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, Spanned<String>>,
    pub kernel: Option<Spanned<String>>,
    pub initrd: Option<Spanned<String>>,
    pub append: Option<Spanned<String>>,
    pub network: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResources {
    pub cpus: Option<Spanned<i64>>,
    pub memory_mb: Option<Spanned<i64>>,
    pub timeout_s: Option<Spanned<i64>>,
    pub disk_mb: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFiles {
    #[serde(default)]
    pub inputs: Vec<Spanned<String>>,
    #[serde(default)]
    pub outputs: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub requirements: Option<Spanned<String>>,
    pub rank: Option<Spanned<String>>,
    pub max_retries: Option<Spanned<i64>>,
    pub priority: Option<Spanned<i64>>,
    pub checkpoint_s: Option<Spanned<i64>>,
    pub replicas: Option<Spanned<i64>>,
    pub quorum: Option<Spanned<i64>>,
    pub deterministic: Option<Spanned<bool>>,
}
