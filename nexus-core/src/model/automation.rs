//! `automation_registry.yaml`: the catalogue of automations.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, Labels, Map, OutputSpec, ParamSpec, RetryPolicy, RunSpec};

/// The automation registry file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AutomationRegistry {
    /// Schema version of this file; must be `1`.
    pub version: u32,
    /// Automations by name. A name is how pipelines refer to the automation (`uses:`).
    #[serde(default)]
    pub automations: Map<Automation>,
}

/// What an automation is for; used to group and filter them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Releasing and rolling out software.
    Deployment,
    /// Building, linting, developer workflows.
    Development,
    /// Health checks, probes, reports.
    Monitoring,
    /// Test suites, smoke tests, load tests.
    Testing,
    /// Backups, restores, exports.
    Backup,
    /// Scans, rotations, audits.
    Security,
    /// Anything else operational (cleanup, rotation of logs…).
    Maintenance,
}

/// A named, reusable unit of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Automation {
    /// What kind of work this is.
    pub category: Category,
    /// One or two sentences saying what the automation does.
    pub description: String,
    /// Team or person responsible, contacted when it breaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Labels for selection and notification routing.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Typed parameters, given by the step that uses the automation (`with:`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<ParamSpec>,
    /// What runs.
    pub run: RunSpec,
    /// The runner instance (from the orchestration registry) that runs it; the
    /// orchestration default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Time limit of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy; the orchestration default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Outputs the automation writes (`key=value` lines to `$NEXUS_OUTPUT`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub outputs: Map<OutputSpec>,
    /// Whether running it twice has the same effect as once (safe to re-run after a crash).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent: bool,
    /// Secrets (from the security registry) injected as environment variables of the
    /// same name, upper-cased.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}
