//! `orchestration_registry.yaml`: environments, runners, defaults, locks, schedules,
//! the state store and plugin directories.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, Labels, Map, RetryPolicy, empty_object};
use super::pipeline::ConcurrencyPolicy;

/// The orchestration registry file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrchestrationRegistry {
    /// Schema version of this file; must be `1`.
    pub version: u32,
    /// Values used when an automation, step or command says nothing.
    #[serde(default)]
    pub defaults: Defaults,
    /// Environments by name (`--env NAME`).
    pub environments: Map<Environment>,
    /// Runner instances by name: where steps execute.
    pub runners: Map<RunnerInstance>,
    /// Named locks: at most `limit` holders at once, across runs and processes.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub locks: Map<Lock>,
    /// Global limits.
    #[serde(default)]
    pub limits: Limits,
    /// Pipelines started on a calendar by `nexus serve`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub schedules: Map<Schedule>,
    /// Pipelines started by an HTTP call to `nexus serve`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub triggers: Map<Trigger>,
    /// Where runs are journaled.
    #[serde(default)]
    pub state: StateStore,
    /// Dynamic plugins.
    #[serde(default)]
    pub plugins: Plugins,
}

/// Values that apply when nothing more specific is set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Environment used when `--env` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Pipeline run by `nexus run` without a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Runner instance for automations and steps that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Time limit of one attempt when nothing more specific is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy when nothing more specific is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Most steps of one run executing at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub parallelism: Option<u32>,
}

/// A target environment (`dev`, `staging`, `prod`…).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// What the environment is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Variables available to templates as `{{ env.vars.<name> }}`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub vars: Map<serde_json::Value>,
    /// Labels, used by notification routes and policies.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Values this environment changes; everything else comes from the registries.
    #[serde(default)]
    pub overrides: Overrides,
}

/// What an environment overlays on the registries.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Runner substitutions: a step that names the key runs on the value instead.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub runners: Map<String>,
    /// Per-automation changes.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub automations: Map<AutomationOverride>,
    /// Pipeline parameter defaults for this environment, by pipeline then parameter.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<Map<serde_json::Value>>,
    /// Most steps of one run executing at once in this environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub parallelism: Option<u32>,
}

/// What an environment changes in one automation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AutomationOverride {
    /// Runner instance in this environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Time limit in this environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy in this environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Parameter defaults in this environment.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<serde_json::Value>,
}

/// A runner instance: a kind of runner and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunnerInstance {
    /// The runner kind (`local`, `docker`, `kubernetes`, `ssh`, or a plugin's).
    pub kind: String,
    /// The kind's settings, checked against its schema.
    #[serde(default = "empty_object")]
    pub spec: serde_json::Value,
    /// What this instance is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Most attempts running on this instance at once, across runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parallel: Option<u32>,
    /// Labels, used by policies.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// A named lock (a counting semaphore held as a lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// What the lock protects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Holders allowed at once (1 makes it a mutex).
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub limit: u32,
    /// How long a lease lives without renewal; a crashed holder's lease expires after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Duration>,
}

fn one() -> u32 {
    1
}

/// Global limits.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most runs active at once in one store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_runs: Option<u32>,
    /// Most attempts executing at once, all runs together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<u32>,
    /// Largest log kept per attempt before it is truncated (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_log_bytes: Option<u64>,
}

/// A pipeline started on a calendar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The pipeline to run.
    pub pipeline: String,
    /// Environment to run it in.
    pub environment: String,
    /// Cron expression: 5 fields (minute hour day month weekday), 6 with seconds first,
    /// or a nickname such as `@daily`.
    pub cron: String,
    /// IANA time zone the expression is read in (`UTC`, `Europe/Paris`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// What happens when the previous run is still active at the next tick.
    #[serde(default)]
    pub overlap: ConcurrencyPolicy,
    /// Parameters given to the pipeline.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<serde_json::Value>,
    /// Whether the schedule is active.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Run a missed tick at start-up if it was missed by less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<Duration>,
}

fn utc() -> String {
    "UTC".to_owned()
}

fn yes() -> bool {
    true
}

/// A pipeline started by an HTTP request to `nexus serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// The pipeline to run.
    pub pipeline: String,
    /// Environment to run it in.
    pub environment: String,
    /// Secret (security registry) holding the HMAC key requests must be signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
    /// Parameters given to the pipeline; may use `{{ event.* }}` from the request body.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<serde_json::Value>,
}

/// Where the journal of runs is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateStore {
    /// `sqlite` (embedded, one file) or `postgres` (shared by several `nexus serve`).
    #[serde(default)]
    pub backend: StateBackend,
    /// SQLite: directory of the store (`--state` overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// PostgreSQL: connection URL; put the password in a secret (`{{ secrets.x }}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How long finished runs and their logs are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore { backend: StateBackend::Sqlite, path: None, url: None, retention: None }
    }
}

/// A state store implementation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// Embedded SQLite file (WAL).
    #[default]
    Sqlite,
    /// Shared PostgreSQL database.
    Postgres,
}

/// Dynamic plugin settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plugins {
    /// Directories searched for plugin libraries (relative to the config directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<String>,
}
