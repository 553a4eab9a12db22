//! `monitoring_registry.yaml`: services, monitor sinks, notification channels, routes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Duration, Labels, Map, empty_object};
use super::pipeline::Severity;

/// The monitoring registry file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitoringRegistry {
    /// Schema version of this file; must be `1`.
    pub version: u32,
    /// Services the platform runs, by name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub services: Map<Service>,
    /// Where events and metrics are exported, by name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub monitors: Map<Monitor>,
    /// Notification channels, by name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub channels: Map<Channel>,
    /// Which events go to which channels, evaluated in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// A service: a kind of adapter and its settings, plus health checking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The adapter kind (`http`, `postgres`, `redis`, `s3`, or a plugin's).
    pub kind: String,
    /// The kind's settings, checked against its schema; may use `{{ env.vars.* }}`
    /// and `{{ secrets.* }}`.
    #[serde(default = "empty_object")]
    pub spec: serde_json::Value,
    /// What the service is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How and how often its health is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Environments the service exists in (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    /// Labels, used by routes.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// Health checking of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Time between checks under `nexus serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Time limit of one check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Consecutive failures before the service is declared unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub failure_threshold: Option<u32>,
    /// Latency above which the service is reported degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_latency: Option<Duration>,
    /// Severity of the `health.changed` event when the service becomes unhealthy.
    #[serde(default)]
    pub severity: Severity,
}

/// A monitor sink: where events and metrics are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    /// The monitor kind (`prometheus`, or a plugin's).
    pub kind: String,
    /// The kind's settings, checked against its schema.
    #[serde(default = "empty_object")]
    pub spec: serde_json::Value,
    /// Event types exported (all when empty), e.g. `run.finished`, `step.*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

/// A notification channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// The notifier kind (`email`, `slack`, `pagerduty`, `webhook`…).
    pub kind: String,
    /// The kind's settings, checked against its schema; credentials through
    /// `{{ secrets.* }}`.
    #[serde(default = "empty_object")]
    pub spec: serde_json::Value,
    /// Message text replacing the channel's default layout (minijinja over `event.*`,
    /// `run.*`, `pipeline.*`, `env.*`; never `secrets.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Most messages per hour sent to the channel; the rest are recorded as suppressed
    /// (recoveries always go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rate_limit_per_hour: Option<u32>,
}

/// A notification route: which events go to which channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name shown in delivery records.
    pub name: String,
    /// Which events the route takes.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Channels the matching events are sent to.
    pub channels: Vec<String>,
    /// The same news (route, channel, event type, pipeline, environment) within this
    /// window is sent once; a recovery in between starts afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<Duration>,
    /// Whether later routes are still evaluated after this one matched (by default the
    /// first matching route wins).
    #[serde(default, rename = "continue", skip_serializing_if = "std::ops::Not::not")]
    pub continue_matching: bool,
}

/// Conditions of a route; all given conditions must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Event types (`run.failed`, `run.recovered`, `health.changed`, `approval.requested`…);
    /// `run.failed` and `run.recovered` when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Pipelines (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<String>,
    /// Environments (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    /// Lowest severity taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_severity: Option<Severity>,
    /// Labels the event's pipeline, service or environment must carry.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}
