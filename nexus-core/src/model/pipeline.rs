//! `pipeline_registry.yaml`: pipelines, DAGs of steps.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, Labels, Map, OutputSpec, ParamSpec, RetryPolicy, RunSpec};

/// The pipeline registry file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineRegistry {
    /// Schema version of this file; must be `1`.
    pub version: u32,
    /// Pipelines by name (`nexus run NAME`).
    #[serde(default)]
    pub pipelines: Map<Pipeline>,
}

/// A DAG of steps run together as one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// What the pipeline achieves.
    pub description: String,
    /// Labels for selection and notification routing.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Typed parameters given on the command line (`--param key=value`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<ParamSpec>,
    /// Time limit of the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Most steps of one run executing at once (the orchestration default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub parallelism: Option<u32>,
    /// Runs sharing a group never overlap; the policy says what a new run does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// The steps. Order matters only for display; execution follows `needs`.
    pub steps: Vec<Step>,
    /// Steps run after the main steps when the run failed (after rollbacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_failure: Vec<Step>,
    /// Steps run after the main steps when the run succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_success: Vec<Step>,
    /// Steps run last, whatever the outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finally: Vec<Step>,
}

/// A concurrency group and what happens when a run of the group is already active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Group name; may use templates such as `deploy-{{ env.name }}`.
    pub group: String,
    /// What a new run does while another run of the group is active.
    #[serde(default)]
    pub policy: ConcurrencyPolicy,
}

/// What a new run does when its concurrency group is busy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ConcurrencyPolicy {
    /// Wait until the active run finishes.
    #[default]
    Queue,
    /// Cancel the active run, then start.
    CancelRunning,
    /// Do not start; record the run as skipped.
    Skip,
}

/// One node of a pipeline: exactly one of `uses`, `run`, `service`, `approval`, `notify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Identifier, unique in the pipeline; used by `needs` and `{{ steps.<id>… }}`.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9_-]*$"))]
    pub id: String,
    /// Human-readable name shown in progress output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Run an automation from the automation registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<String>,
    /// Run an inline command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
    /// Call an action of a service from the monitoring registry (with `action`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service action to call (`backup`, `query`, `publish`, `health`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Wait for a human approval (`nexus approve RUN STEP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Send a notification to channels of the monitoring registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifyStep>,
    /// Arguments: the automation's params (`uses`) or the action's arguments (`service`).
    #[serde(default, rename = "with", skip_serializing_if = "Map::is_empty")]
    pub with: Map<serde_json::Value>,
    /// Runner instance for this step, overriding the automation's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Steps that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// A condition (minijinja expression); the step is skipped when it is false.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Run the step once per combination of these values (`{{ matrix.<key> }}`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub matrix: Map<Vec<serde_json::Value>>,
    /// Time limit of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy, overriding the automation's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// What undoes this step when a later step fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// Whether re-running the step after a crash is safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Whether the run goes on when this step fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
    /// Outputs the step writes, for `run` and `service` steps (a `uses` step has the
    /// outputs declared by its automation).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub outputs: Map<OutputSpec>,
    /// Named locks (orchestration registry) held while the step runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
    /// Extra environment variables; values may use templates.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub env: Map<String>,
    /// Secrets injected as environment variables (upper-cased names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// A human approval gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// What the approver is asked; may use templates.
    pub message: String,
    /// Roles (security registry) allowed to approve; any operator when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// How long to wait before the step fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// A notification sent as a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyStep {
    /// Channels (monitoring registry) to send to.
    pub channels: Vec<String>,
    /// The message; may use templates.
    pub message: String,
    /// Severity shown to the receiver.
    #[serde(default)]
    pub severity: Severity,
}

/// How serious an event or a message is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information only.
    #[default]
    Info,
    /// Needs attention soon.
    Warning,
    /// Something failed.
    Error,
    /// Needs someone now.
    Critical,
}

/// What undoes a step: an automation, an inline command or a service action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// Run an automation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<String>,
    /// Run an inline command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
    /// Call a service action (with `action`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service action to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Arguments of the automation or action.
    #[serde(default, rename = "with", skip_serializing_if = "Map::is_empty")]
    pub with: Map<serde_json::Value>,
    /// Runner instance for an inline command or automation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Time limit of the rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}
