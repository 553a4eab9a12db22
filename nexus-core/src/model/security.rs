//! `security_registry.yaml`: secrets by reference, redaction, tokens and roles,
//! policies, audit.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, Map};

/// The security registry file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityRegistry {
    /// Schema version of this file; must be `1`.
    pub version: u32,
    /// Secrets by name, each saying where its value comes from (never the value).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub secrets: Map<Secret>,
    /// What is removed from logs, outputs, events and messages.
    #[serde(default)]
    pub redaction: Redaction,
    /// Roles: what a holder may do.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub roles: Map<Role>,
    /// API tokens of `nexus serve`, by name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tokens: Map<ApiToken>,
    /// Rules per environment.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub policies: Map<Policy>,
    /// The audit trail.
    #[serde(default)]
    pub audit: Audit,
}

/// Where a secret's value comes from: exactly one of `env`, `file`, `command`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// What the secret is and who rotates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Read from this environment variable of the `nexus` process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Read from this file (trailing newline removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Printed on stdout by this command (e.g. `vault kv get -field=password db`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Per-environment sources replacing the one above (e.g. prod reads from a vault).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub environments: Map<SecretSource>,
}

/// A secret source for one environment: exactly one of `env`, `file`, `command`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// Read from this environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Read from this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Printed on stdout by this command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl Secret {
    /// The environment-independent source.
    pub fn source(&self) -> SecretSource {
        SecretSource { env: self.env.clone(), file: self.file.clone(), command: self.command.clone() }
    }
}

impl SecretSource {
    /// How many sources are given (a valid source has exactly one).
    pub fn forms_given(&self) -> usize {
        usize::from(self.env.is_some()) + usize::from(self.file.is_some()) + usize::from(self.command.is_some())
    }
}

/// What is redacted besides the values of declared secrets.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Redaction {
    /// Regular expressions whose matches are replaced (e.g. `AKIA[0-9A-Z]{16}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// Replacement text (default `***`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
}

/// What a role may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// What the role is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Allowed operations.
    pub permissions: Vec<Permission>,
    /// Environments the permissions apply to (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    /// Pipelines the permissions apply to (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<String>,
}

/// An operation a role may be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// List and show runs, logs, health.
    Read,
    /// Start, retry and resume runs.
    Run,
    /// Approve approval steps.
    Approve,
    /// Cancel and roll back runs.
    Cancel,
    /// Everything.
    Admin,
}

/// An API token for `nexus serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// The secret holding the token's value.
    pub secret: String,
    /// Roles granted to the bearer.
    pub roles: Vec<String>,
    /// When the token stops being accepted, if ever: a date `YYYY-MM-DD` or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// Rules for one environment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Whether every run in the environment waits for an approval before starting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval_required: bool,
    /// Roles allowed to give that approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// Runner instances steps may use in the environment (any when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_runners: Vec<String>,
    /// Windows in which runs may start (any time when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub change_windows: Vec<ChangeWindow>,
}

/// A recurring window of time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeWindow {
    /// Days of the week (`mon` … `sun`); every day when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
    /// Start time, `HH:MM`.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// End time, `HH:MM` (may be earlier than `start` to cross midnight).
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub end: String,
    /// IANA time zone the times are read in.
    #[serde(default = "utc")]
    pub timezone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// The audit trail: who did what, when.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Whether operator actions are recorded.
    #[serde(default)]
    pub enabled: bool,
    /// JSON-lines file the records are appended to (in the state store when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How long records are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
}
