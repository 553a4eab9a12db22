//! The typed model of the five registries (DESIGN.md §1).
//!
//! Every type derives `JsonSchema`: the schemas in `schemas/` are generated from these
//! types, and every doc comment becomes a schema `description`.

pub mod automation;
pub mod common;
pub mod monitoring;
pub mod orchestration;
pub mod pipeline;
pub mod security;

pub use automation::{Automation, AutomationRegistry, Category};
pub use common::{Duration, Labels, Map, OutputSpec, ParamSpec, ParamType, RetryPolicy, RunSpec};
pub use monitoring::{Channel, HealthCheck, Monitor, MonitoringRegistry, Route, RouteMatch, Service};
pub use orchestration::{Defaults, Environment, Lock, OrchestrationRegistry, RunnerInstance, Schedule, StateStore};
pub use pipeline::{
    Approval, Concurrency, ConcurrencyPolicy, NotifyStep, Pipeline, PipelineRegistry, Rollback, Severity, Step,
};
pub use security::{Policy, Role, Secret, SecretSource, SecurityRegistry};

/// The whole validated source of truth: the five registries.
#[derive(Debug, Clone, PartialEq)]
pub struct Ssot {
    /// `automation_registry.yaml`.
    pub automations: AutomationRegistry,
    /// `pipeline_registry.yaml`.
    pub pipelines: PipelineRegistry,
    /// `orchestration_registry.yaml`.
    pub orchestration: OrchestrationRegistry,
    /// `monitoring_registry.yaml`.
    pub monitoring: MonitoringRegistry,
    /// `security_registry.yaml`.
    pub security: SecurityRegistry,
}
