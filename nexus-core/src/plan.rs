//! The planner: `plan(ssot, pipeline, env, params) → Plan`, pure and deterministic.
//!
//! A [`Plan`] is the pipeline's DAG with every choice made: environment overlays
//! applied, parameters checked against their types, runners, timeouts and retry
//! policies resolved, matrix steps expanded into instances, and every template that
//! reads only plan-time values (`params`, `env`, `matrix`, `pipeline`) rendered. What is
//! only known when a step starts — `steps.<id>.outputs.*`, `secrets.*`, `run.*` — stays
//! a template, rendered by [`render_command`] at attempt start. Secrets are kept as
//! names, so a plan can be printed, saved and journaled safely.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::load::Sources;
use crate::model::pipeline::ConcurrencyPolicy;
use crate::model::{
    Automation, Duration, Map, ParamSpec, ParamType, Pipeline, RetryPolicy, RunSpec, Severity, Ssot, Step,
};
use crate::traits::Program;

/// Version of the plan format (saved plans of another format are refused).
pub const PLAN_FORMAT: u32 = 1;

/// A pipeline ready to run in one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`PLAN_FORMAT`].
    pub format: u32,
    /// Pipeline name.
    pub pipeline: String,
    /// Environment name.
    pub environment: String,
    /// Parameters after defaults, environment overrides and the caller's values.
    pub params: Map<Value>,
    /// Digest of the registry files the plan was made from.
    pub config_digest: String,
    /// Most steps executing at once.
    pub parallelism: u32,
    /// Time limit of the whole run.
    pub timeout: Option<Duration>,
    /// Concurrency group (rendered) and policy.
    pub concurrency: Option<PlannedConcurrency>,
    /// Values templates read at run time besides outputs and secrets.
    pub context: PlanContext,
    /// Runner instances the plan uses, with their kind and spec (rendered).
    pub runners: Map<PlannedRunner>,
    /// Locks the plan takes: limit and lease.
    pub locks: Map<PlannedLock>,
    /// Main steps, matrix instances expanded, in declaration order.
    pub steps: Vec<PlannedStep>,
    /// Hooks run after a failure (after rollbacks).
    pub on_failure: Vec<PlannedStep>,
    /// Hooks run after success.
    pub on_success: Vec<PlannedStep>,
    /// Hooks run last, whatever the outcome.
    pub finally: Vec<PlannedStep>,
}

/// A rendered concurrency group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedConcurrency {
    /// Group name.
    pub group: String,
    /// What a new run does while the group is busy.
    pub policy: ConcurrencyPolicy,
}

/// Plan-time values that templates may read at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanContext {
    /// `env.*`: name, vars, labels.
    pub env: Value,
    /// `pipeline.*`: name, labels.
    pub pipeline: Value,
}

/// A runner instance used by the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRunner {
    /// Runner kind.
    pub kind: String,
    /// Spec, with plan-time templates rendered.
    pub spec: Value,
    /// Most attempts at once on this instance.
    pub max_parallel: Option<u32>,
}

/// A lock used by the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedLock {
    /// Holders allowed at once.
    pub limit: u32,
    /// Lease length in milliseconds.
    pub lease_ms: u64,
}

/// One step instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    /// Instance id: the step id, with `[axis=value,…]` for a matrix instance.
    pub id: String,
    /// The declared step id.
    pub step: String,
    /// Display name.
    pub name: Option<String>,
    /// Instance ids this one waits for.
    pub needs: Vec<String>,
    /// `if` condition (a minijinja expression evaluated at run time).
    pub condition: Option<String>,
    /// This instance's matrix values.
    pub matrix: Map<Value>,
    /// What it does.
    pub action: PlannedAction,
    /// Time limit of one attempt.
    pub timeout: Option<Duration>,
    /// Retry policy, resolved.
    pub retry: RetryPolicy,
    /// Whether re-running after a crash is safe.
    pub idempotent: bool,
    /// Whether the run goes on when it fails.
    pub continue_on_error: bool,
    /// Locks held while it runs.
    pub locks: Vec<String>,
    /// Outputs it must write.
    pub required_outputs: Vec<String>,
    /// What undoes it.
    pub rollback: Option<PlannedRollback>,
}

/// What undoes a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRollback {
    /// The action.
    pub action: PlannedAction,
    /// Its time limit.
    pub timeout: Option<Duration>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum PlannedAction {
    /// Run a command on a runner (an automation or an inline `run`).
    Command(Box<PlannedCommand>),
    /// Call a service action.
    Service {
        /// Service name.
        service: String,
        /// Adapter kind.
        kind: String,
        /// Action name.
        action: String,
        /// Arguments (pipeline scope; templates may remain).
        args: Map<Value>,
    },
    /// Wait for an operator's approval.
    Approval {
        /// The question (rendered when possible).
        message: String,
        /// Roles allowed to approve.
        approvers: Vec<String>,
        /// How long to wait.
        timeout: Option<Duration>,
    },
    /// Send a notification.
    Notify {
        /// Channels.
        channels: Vec<String>,
        /// Message (rendered when possible).
        message: String,
        /// Severity.
        severity: Severity,
    },
}

impl PlannedAction {
    /// A short description for listings: `uses build-image`, `run`, `service db.backup`…
    pub fn summary(&self) -> String {
        match self {
            PlannedAction::Command(c) => match &c.automation {
                Some(a) => format!("uses {a} on {}", c.runner),
                None => format!("run on {}", c.runner),
            },
            PlannedAction::Service { service, action, .. } => format!("service {service}.{action}"),
            PlannedAction::Approval { .. } => "approval".to_owned(),
            PlannedAction::Notify { channels, .. } => format!("notify {}", channels.join(", ")),
        }
    }
}

/// Whose parameters a command's templates read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// An inline `run`: `params` are the pipeline's.
    Pipeline,
    /// An automation: `params` are the automation's, filled by the step's `with`.
    Automation,
}

/// A command, resolved as far as plan time allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedCommand {
    /// Runner instance, after environment substitutions.
    pub runner: String,
    /// The automation, for `uses` steps.
    pub automation: Option<String>,
    /// Whose `params` the command reads.
    pub scope: Scope,
    /// The automation's parameters (defaults and environment overrides, then the
    /// step's `with`); values may still be pipeline-scope templates.
    pub params: Map<Value>,
    /// Parameter types, to coerce rendered values.
    pub param_types: Map<ParamType>,
    /// What runs; templates remain unless `rendered`.
    pub run: RunSpec,
    /// Extra environment variables from the step (pipeline scope).
    pub env: Map<String>,
    /// Secrets injected as environment variables (names).
    pub secrets: Vec<String>,
    /// Whether every template was rendered at plan time.
    pub rendered: bool,
}

/// A saved plan file: the plan plus the check that the registries have not changed.
impl Plan {
    /// All step instances: main steps, then the hooks.
    pub fn all_steps(&self) -> impl Iterator<Item = &PlannedStep> {
        self.steps.iter().chain(&self.on_failure).chain(&self.on_success).chain(&self.finally)
    }

    /// The instance with this id.
    pub fn step(&self, id: &str) -> Option<&PlannedStep> {
        self.all_steps().find(|s| s.id == id)
    }
}

/// The digest of the registry files read: a saved plan records it and refuses to run
/// when the registries changed since.
pub fn config_digest(sources: &Sources) -> String {
    let mut files: Vec<_> = sources.files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = Sha256::new();
    for f in files {
        hasher.update(f.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        hasher.update([0]);
        hasher.update(f.text.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, message).with_operation("plan")
}

/// Namespaces only known when a step starts.
const RUNTIME: [&str; 3] = ["steps", "secrets", "run"];

/// The template engine of plans and runs: strict about undefined values, so a typo
/// fails loudly instead of rendering an empty string.
pub fn template_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Booleans print as `true`/`false`, as shells, YAML and JSON write them (minijinja
    // follows Python's `True`/`False`, which `[ "$x" = true ]` would never match).
    env.set_formatter(|out, state, value| {
        if value.kind() == minijinja::value::ValueKind::Bool {
            out.write_str(if value.is_true() { "true" } else { "false" }).map_err(minijinja::Error::from)
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env
}

/// Whether `text` is a template reading run-time values.
fn reads_runtime(env: &Environment<'_>, text: &str) -> bool {
    if !text.contains("{{") && !text.contains("{%") {
        return false;
    }
    match env.template_from_str(text) {
        Ok(t) => t.undeclared_variables(false).iter().any(|v| RUNTIME.contains(&v.as_str())),
        Err(_) => false,
    }
}

fn value_reads_runtime(env: &Environment<'_>, value: &Value) -> bool {
    match value {
        Value::String(s) => reads_runtime(env, s),
        Value::Array(items) => items.iter().any(|v| value_reads_runtime(env, v)),
        Value::Object(map) => map.values().any(|v| value_reads_runtime(env, v)),
        _ => false,
    }
}

/// Renders a string template; text without `{{`/`{%` is returned as is.
pub fn render_str(env: &Environment<'_>, text: &str, ctx: &Value) -> Result<String> {
    if !text.contains("{{") && !text.contains("{%") {
        return Ok(text.to_owned());
    }
    env.render_str(text, minijinja::Value::from(minijinja::value::Serde(ctx)))
        .map_err(|e| invalid(format!("cannot render `{text}`: {}", e.detail().unwrap_or(&e.to_string()))))
}

/// Renders every string inside a JSON value.
pub fn render_value(env: &Environment<'_>, value: &Value, ctx: &Value) -> Result<Value> {
    Ok(match value {
        Value::String(s) => Value::String(render_str(env, s, ctx)?),
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(env, v, ctx)).collect::<Result<_>>()?),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| Ok((k.clone(), render_value(env, v, ctx)?))).collect::<Result<_>>()?)
        }
        other => other.clone(),
    })
}

fn render_run(env: &Environment<'_>, run: &RunSpec, ctx: &Value) -> Result<RunSpec> {
    let r = |s: &Option<String>| s.as_ref().map(|s| render_str(env, s, ctx)).transpose();
    Ok(RunSpec {
        command: r(&run.command)?,
        script: r(&run.script)?,
        argv: run
            .argv
            .as_ref()
            .map(|a| a.iter().map(|s| render_str(env, s, ctx)).collect::<Result<_>>())
            .transpose()?,
        shell: run.shell.clone(),
        image: r(&run.image)?,
        env: run.env.iter().map(|(k, v)| Ok((k.clone(), render_str(env, v, ctx)?))).collect::<Result<_>>()?,
        working_dir: r(&run.working_dir)?,
    })
}

fn run_reads_runtime(env: &Environment<'_>, run: &RunSpec) -> bool {
    let any = |s: &Option<String>| s.as_ref().is_some_and(|s| reads_runtime(env, s));
    any(&run.command)
        || any(&run.script)
        || any(&run.image)
        || any(&run.working_dir)
        || run.argv.iter().flatten().any(|s| reads_runtime(env, s))
        || run.env.values().any(|s| reads_runtime(env, s))
}

/// Converts a value given as text (command line, rendered template) to a parameter's type.
pub fn coerce(value: Value, ty: ParamType) -> std::result::Result<Value, String> {
    if ty.accepts(&value) {
        return Ok(value);
    }
    let Value::String(text) = &value else {
        return Err(format!("expected a {ty}, got `{value}`"));
    };
    let parsed = match ty {
        ParamType::String => Some(value.clone()),
        ParamType::Integer => text.trim().parse::<i64>().ok().map(Value::from),
        ParamType::Number => text.trim().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number),
        ParamType::Boolean => match text.trim() {
            "true" | "yes" | "on" | "1" => Some(Value::Bool(true)),
            "false" | "no" | "off" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
        ParamType::List | ParamType::Map => serde_json::from_str::<Value>(text).ok().filter(|v| ty.accepts(v)),
    };
    parsed.ok_or_else(|| format!("expected a {ty}, got `{text}`"))
}

/// Checks and completes parameter values: defaults, types, allowed values, unknown and
/// missing parameters.
fn resolve_params(owner: &str, specs: &Map<ParamSpec>, layers: &[&Map<Value>]) -> Result<Map<Value>> {
    let mut out = Map::new();
    for layer in layers {
        for (name, value) in *layer {
            let Some(spec) = specs.get(name) else {
                let mut message = format!("`{owner}` has no parameter `{name}`");
                if let Some(near) = crate::suggest::closest(name, specs.keys().map(String::as_str)) {
                    message.push_str(&format!("; did you mean `{near}`?"));
                }
                return Err(invalid(message));
            };
            let value =
                coerce(value.clone(), spec.ty).map_err(|e| invalid(format!("parameter `{name}` of `{owner}`: {e}")))?;
            out.insert(name.clone(), value);
        }
    }
    for (name, spec) in specs {
        if !out.contains_key(name) {
            match &spec.default {
                Some(default) => {
                    out.insert(name.clone(), default.clone());
                }
                None if spec.required => {
                    return Err(invalid(format!("`{owner}` needs parameter `{name}`; pass `--param {name}=…`")));
                }
                None => {}
            }
        }
        if let (Some(allowed), Some(value)) = (&spec.allowed, out.get(name))
            && !allowed.contains(value)
        {
            return Err(invalid(format!(
                "parameter `{name}` of `{owner}` is `{value}`, not one of {}",
                Value::Array(allowed.clone())
            )));
        }
    }
    // Declaration order, for stable output.
    let mut ordered = Map::new();
    for name in specs.keys() {
        if let Some(v) = out.shift_remove(name) {
            ordered.insert(name.clone(), v);
        }
    }
    Ok(ordered)
}

/// What the planner needs besides the model.
pub struct PlanRequest<'a> {
    /// Pipeline name (the orchestration default when `None`).
    pub pipeline: Option<&'a str>,
    /// Environment name (the orchestration default when `None`).
    pub environment: Option<&'a str>,
    /// Parameters given by the caller (`--param k=v`), as text or typed values.
    pub params: Map<Value>,
    /// [`config_digest`] of the registries.
    pub config_digest: String,
}

/// Plans a pipeline run. Pure: the same model and request give the same plan.
pub fn plan(ssot: &Ssot, request: &PlanRequest<'_>) -> Result<Plan> {
    let o = &ssot.orchestration;
    let pipeline_name = request
        .pipeline
        .or(o.defaults.pipeline.as_deref())
        .ok_or_else(|| invalid("no pipeline named and no `defaults.pipeline` in orchestration_registry.yaml"))?;
    let pipeline = ssot.pipelines.pipelines.get(pipeline_name).ok_or_else(|| {
        let mut m = format!("unknown pipeline `{pipeline_name}`");
        if let Some(near) = crate::suggest::closest(pipeline_name, ssot.pipelines.pipelines.keys().map(String::as_str))
        {
            m.push_str(&format!("; did you mean `{near}`?"));
        }
        invalid(m).set_retryable(false)
    })?;
    let env_name = request
        .environment
        .or(o.defaults.environment.as_deref())
        .or_else(|| o.environments.keys().next().map(String::as_str))
        .ok_or_else(|| invalid("no environment is declared"))?;
    let environment = o.environments.get(env_name).ok_or_else(|| {
        let mut m = format!("unknown environment `{env_name}`");
        if let Some(near) = crate::suggest::closest(env_name, o.environments.keys().map(String::as_str)) {
            m.push_str(&format!("; did you mean `{near}`?"));
        }
        invalid(m)
    })?;
    let empty = Map::new();
    let env_param_defaults = environment.overrides.params.get(pipeline_name).unwrap_or(&empty);
    let params = resolve_params(pipeline_name, &pipeline.params, &[env_param_defaults, &request.params])?;

    let context = PlanContext {
        env: serde_json::json!({
            "name": env_name,
            "vars": environment.vars,
            "labels": environment.labels,
            "description": environment.description,
        }),
        pipeline: serde_json::json!({ "name": pipeline_name, "labels": pipeline.labels }),
    };
    let tenv = template_env();
    let base_ctx = serde_json::json!({
        "params": params,
        "env": context.env,
        "pipeline": context.pipeline,
    });

    let mut planner =
        Planner { ssot, env_name, environment, tenv: &tenv, base_ctx, runners: Map::new(), locks: Map::new() };
    let steps = planner.steps(pipeline, &pipeline.steps)?;
    let on_failure = planner.steps(pipeline, &pipeline.on_failure)?;
    let on_success = planner.steps(pipeline, &pipeline.on_success)?;
    let finally = planner.steps(pipeline, &pipeline.finally)?;
    let concurrency = pipeline
        .concurrency
        .as_ref()
        .map(|c| {
            Ok::<_, Error>(PlannedConcurrency {
                group: render_str(&tenv, &c.group, &planner.base_ctx)?,
                policy: c.policy,
            })
        })
        .transpose()?;
    let parallelism =
        environment.overrides.parallelism.or(pipeline.parallelism).or(o.defaults.parallelism).unwrap_or(4);
    Ok(Plan {
        format: PLAN_FORMAT,
        pipeline: pipeline_name.to_owned(),
        environment: env_name.to_owned(),
        params,
        config_digest: request.config_digest.clone(),
        parallelism,
        timeout: pipeline.timeout,
        concurrency,
        context,
        runners: planner.runners,
        locks: planner.locks,
        steps,
        on_failure,
        on_success,
        finally,
    })
}

struct Planner<'a> {
    ssot: &'a Ssot,
    env_name: &'a str,
    environment: &'a crate::model::Environment,
    tenv: &'a Environment<'static>,
    base_ctx: Value,
    runners: Map<PlannedRunner>,
    locks: Map<PlannedLock>,
}

impl Planner<'_> {
    /// Expands and resolves one list of steps (main steps or a hook list).
    fn steps(&mut self, pipeline: &Pipeline, steps: &[Step]) -> Result<Vec<PlannedStep>> {
        // Instance ids of each declared step, for `needs` on matrix steps.
        let mut instances: Map<Vec<String>> = Map::new();
        let mut out = Vec::new();
        for step in steps {
            let combos = matrix_combinations(&step.matrix);
            let mut ids = Vec::new();
            for matrix in combos {
                let id = instance_id(&step.id, &matrix);
                ids.push(id.clone());
                out.push((step, matrix, id));
            }
            instances.insert(step.id.clone(), ids);
        }
        out.into_iter()
            .map(|(step, matrix, id)| {
                let needs = step
                    .needs
                    .iter()
                    .flat_map(|n| instances.get(n).cloned().unwrap_or_else(|| vec![n.clone()]))
                    .collect();
                self.step(pipeline, step, matrix, id, needs)
            })
            .collect()
    }

    fn step(
        &mut self,
        _pipeline: &Pipeline,
        step: &Step,
        matrix: Map<Value>,
        id: String,
        needs: Vec<String>,
    ) -> Result<PlannedStep> {
        let ssot = self.ssot;
        let o = &ssot.orchestration;
        let mut ctx = self.base_ctx.clone();
        ctx["matrix"] = serde_json::to_value(&matrix).unwrap_or_default();
        let automation = step.uses.as_ref().map(|a| {
            ssot.automations
                .automations
                .get(a)
                .ok_or_else(|| invalid(format!("step `{}` uses unknown automation `{a}`", step.id)))
        });
        let automation = automation.transpose()?;
        let overrides = step.uses.as_ref().and_then(|a| self.environment.overrides.automations.get(a));
        let action = self.action(step, automation, &ctx, &id)?;
        let retry = step
            .retry
            .clone()
            .or_else(|| overrides.and_then(|ov| ov.retry.clone()))
            .or_else(|| automation.and_then(|a| a.retry.clone()))
            .or_else(|| o.defaults.retry.clone())
            .unwrap_or(RetryPolicy {
                attempts: 1,
                backoff: None,
                factor: None,
                max_backoff: None,
                jitter: None,
                on_exit_codes: vec![],
            });
        let timeout = step
            .timeout
            .or_else(|| overrides.and_then(|ov| ov.timeout))
            .or_else(|| automation.and_then(|a| a.timeout))
            .or(o.defaults.timeout);
        let idempotent = step.idempotent.unwrap_or_else(|| {
            automation.is_some_and(|a| a.idempotent) || matches!(action, PlannedAction::Approval { .. })
        });
        for lock in &step.locks {
            let decl =
                o.locks.get(lock).ok_or_else(|| invalid(format!("step `{}` takes unknown lock `{lock}`", step.id)))?;
            self.locks.insert(
                lock.clone(),
                PlannedLock { limit: decl.limit, lease_ms: decl.lease.map_or(60_000, |d| d.get().as_millis() as u64) },
            );
        }
        let required_outputs = match automation {
            Some(a) => a.outputs.iter().filter(|(_, o)| o.required).map(|(k, _)| k.clone()).collect(),
            None => step.outputs.iter().filter(|(_, o)| o.required).map(|(k, _)| k.clone()).collect(),
        };
        let rollback = step
            .rollback
            .as_ref()
            .map(|rb| {
                let pseudo = Step {
                    uses: rb.uses.clone(),
                    run: rb.run.clone(),
                    service: rb.service.clone(),
                    action: rb.action.clone(),
                    with: rb.with.clone(),
                    runner: rb.runner.clone().or_else(|| step.runner.clone()),
                    ..step.clone()
                };
                let rb_automation = rb.uses.as_ref().and_then(|a| ssot.automations.automations.get(a));
                Ok::<_, Error>(PlannedRollback {
                    action: self.action(&pseudo, rb_automation, &ctx, &id)?,
                    timeout: rb.timeout.or(timeout),
                })
            })
            .transpose()?;
        Ok(PlannedStep {
            id,
            step: step.id.clone(),
            name: step.name.as_ref().map(|n| render_str(self.tenv, n, &ctx)).transpose()?,
            needs,
            condition: step.condition.clone(),
            matrix,
            action,
            timeout,
            retry,
            idempotent,
            continue_on_error: step.continue_on_error,
            locks: step.locks.clone(),
            required_outputs,
            rollback,
        })
    }

    fn action(&mut self, step: &Step, automation: Option<&Automation>, ctx: &Value, id: &str) -> Result<PlannedAction> {
        let tenv = self.tenv;
        if let Some(approval) = &step.approval {
            let message = if reads_runtime(tenv, &approval.message) {
                approval.message.clone()
            } else {
                render_str(tenv, &approval.message, ctx)?
            };
            return Ok(PlannedAction::Approval {
                message,
                approvers: approval.approvers.clone(),
                timeout: approval.timeout,
            });
        }
        if let Some(notify) = &step.notify {
            let message = if reads_runtime(tenv, &notify.message) {
                notify.message.clone()
            } else {
                render_str(tenv, &notify.message, ctx)?
            };
            return Ok(PlannedAction::Notify { channels: notify.channels.clone(), message, severity: notify.severity });
        }
        if let Some(service) = &step.service {
            let svc = self
                .ssot
                .monitoring
                .services
                .get(service)
                .ok_or_else(|| invalid(format!("step `{id}` calls unknown service `{service}`")))?;
            let args: Map<Value> = step
                .with
                .iter()
                .map(|(k, v)| {
                    let v = if value_reads_runtime(tenv, v) { v.clone() } else { render_value(tenv, v, ctx)? };
                    Ok((k.clone(), v))
                })
                .collect::<Result<_>>()?;
            return Ok(PlannedAction::Service {
                service: service.clone(),
                kind: svc.kind.clone(),
                action: step.action.clone().unwrap_or_default(),
                args,
            });
        }
        let overrides = step.uses.as_ref().and_then(|a| self.environment.overrides.automations.get(a));
        let declared_runner = step
            .runner
            .clone()
            .or_else(|| overrides.and_then(|ov| ov.runner.clone()))
            .or_else(|| automation.and_then(|a| a.runner.clone()))
            .or_else(|| self.ssot.orchestration.defaults.runner.clone())
            .or_else(|| self.ssot.orchestration.runners.keys().next().cloned())
            .ok_or_else(|| invalid(format!("step `{id}` has no runner and there is no `defaults.runner`")))?;
        let runner = self.environment.overrides.runners.get(&declared_runner).cloned().unwrap_or(declared_runner);
        self.use_runner(&runner, id)?;
        let (scope, run, params, param_types, secrets) = match automation {
            Some(a) => {
                let empty = Map::new();
                let env_defaults = overrides.map_or(&empty, |ov| &ov.params);
                // `with` values are pipeline-scope templates: rendered now when they
                // read only plan-time values.
                let mut with = Map::new();
                for (k, v) in &step.with {
                    let v = if value_reads_runtime(tenv, v) { v.clone() } else { render_value(tenv, v, ctx)? };
                    with.insert(k.clone(), v);
                }
                let runtime_with: Map<Value> = with
                    .iter()
                    .filter(|(_, v)| value_reads_runtime(tenv, v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let static_with: Map<Value> = with
                    .iter()
                    .filter(|(k, _)| !runtime_with.contains_key(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // Check what can be checked now; runtime values are checked when rendered.
                let mut specs_for_check = a.params.clone();
                for k in runtime_with.keys() {
                    if let Some(spec) = specs_for_check.get_mut(k) {
                        spec.required = false;
                        spec.default = None;
                        spec.allowed = None;
                    }
                }
                let owner = step.uses.as_deref().unwrap_or_default();
                let mut params = resolve_params(owner, &specs_for_check, &[env_defaults, &static_with])?;
                params.extend(runtime_with);
                let types = a.params.iter().map(|(k, s)| (k.clone(), s.ty)).collect();
                let mut secrets = a.secrets.clone();
                secrets.extend(step.secrets.iter().cloned());
                (Scope::Automation, a.run.clone(), params, types, secrets)
            }
            None => {
                let run = step.run.clone().ok_or_else(|| invalid(format!("step `{id}` has nothing to run")))?;
                (Scope::Pipeline, run, Map::new(), Map::new(), step.secrets.clone())
            }
        };
        let mut command = PlannedCommand {
            runner,
            automation: step.uses.clone(),
            scope,
            params,
            param_types,
            run,
            env: step.env.clone(),
            secrets,
            rendered: false,
        };
        let deferred = run_reads_runtime(tenv, &command.run)
            || command.env.values().any(|v| reads_runtime(tenv, v))
            || command.params.values().any(|v| value_reads_runtime(tenv, v));
        if !deferred {
            command = render_planned(tenv, command, ctx)?;
        }
        Ok(PlannedAction::Command(Box::new(command)))
    }

    fn use_runner(&mut self, name: &str, id: &str) -> Result<()> {
        if self.runners.contains_key(name) {
            return Ok(());
        }
        let instance = self
            .ssot
            .orchestration
            .runners
            .get(name)
            .ok_or_else(|| invalid(format!("step `{id}` runs on unknown runner `{name}`")))?;
        if let Some(policy) = self.ssot.security.policies.get(self.env_name)
            && !policy.allowed_runners.is_empty()
            && !policy.allowed_runners.iter().any(|r| r == name)
        {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "step `{id}` would run on `{name}`, which the `{}` policy does not allow (allowed: {})",
                    self.env_name,
                    policy.allowed_runners.join(", ")
                ),
            )
            .with_operation("plan"));
        }
        let spec = if value_reads_runtime(self.tenv, &instance.spec) {
            instance.spec.clone()
        } else {
            render_value(self.tenv, &instance.spec, &self.base_ctx)?
        };
        self.runners.insert(
            name.to_owned(),
            PlannedRunner { kind: instance.kind.clone(), spec, max_parallel: instance.max_parallel },
        );
        Ok(())
    }
}

/// Renders a command completely, given a pipeline-scope context (which may hold
/// `steps`, `secrets` and `run` at run time).
fn render_planned(tenv: &Environment<'_>, mut c: PlannedCommand, ctx: &Value) -> Result<PlannedCommand> {
    let mut params = Map::new();
    for (k, v) in &c.params {
        let v = render_value(tenv, v, ctx)?;
        let v = match c.param_types.get(k) {
            Some(ty) => coerce(v, *ty).map_err(|e| invalid(format!("parameter `{k}`: {e}")))?,
            None => v,
        };
        params.insert(k.clone(), v);
    }
    c.env = c.env.iter().map(|(k, v)| Ok((k.clone(), render_str(tenv, v, ctx)?))).collect::<Result<_>>()?;
    let run_ctx = match c.scope {
        Scope::Pipeline => ctx.clone(),
        Scope::Automation => {
            let mut a = ctx.clone();
            a["params"] = serde_json::to_value(&params).unwrap_or_default();
            a
        }
    };
    c.run = render_run(tenv, &c.run, &run_ctx)?;
    c.params = params;
    c.rendered = true;
    Ok(c)
}

/// What a runner needs to execute a command, fully rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedCommand {
    /// Program.
    pub program: Program,
    /// Image, for container runners.
    pub image: Option<String>,
    /// Environment variables (secrets excluded).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub working_dir: Option<String>,
}

/// Renders a planned command at attempt start. `runtime` holds `steps` (outputs so
/// far), `secrets` (resolved values of the secrets the command names) and `run`.
pub fn render_command(
    plan: &Plan,
    step: &PlannedStep,
    command: &PlannedCommand,
    runtime: &Value,
) -> Result<ResolvedCommand> {
    let c = if command.rendered {
        command.clone()
    } else {
        let tenv = template_env();
        let mut ctx = serde_json::json!({
            "params": plan.params,
            "env": plan.context.env,
            "pipeline": plan.context.pipeline,
            "matrix": step.matrix,
        });
        if let (Value::Object(ctx), Value::Object(rt)) = (&mut ctx, runtime) {
            for (k, v) in rt {
                ctx.insert(k.clone(), v.clone());
            }
        }
        render_planned(&tenv, command.clone(), &ctx)?
    };
    let run = &c.run;
    let program = if let Some(argv) = &run.argv {
        Program::Argv(argv.clone())
    } else if let Some(script) = &run.script {
        // A script stops at its first failing line, as documented.
        Program::Shell { shell: run.shell.clone().unwrap_or_default(), script: format!("set -e\n{script}") }
    } else {
        Program::Shell { shell: run.shell.clone().unwrap_or_default(), script: run.command.clone().unwrap_or_default() }
    };
    let mut env: Vec<(String, String)> = run.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(ResolvedCommand { program, image: run.image.clone(), env, working_dir: run.working_dir.clone() })
}

/// Every combination of matrix values, in key order (one empty combination when there
/// is no matrix).
fn matrix_combinations(matrix: &Map<Vec<Value>>) -> Vec<Map<Value>> {
    let mut combos = vec![Map::new()];
    for (key, values) in matrix {
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for combo in &combos {
            for v in values {
                let mut c = combo.clone();
                c.insert(key.clone(), v.clone());
                next.push(c);
            }
        }
        combos = next;
    }
    combos
}

/// `test[component=api,os=linux]`, or `test` without a matrix.
fn instance_id(step: &str, matrix: &Map<Value>) -> String {
    if matrix.is_empty() {
        return step.to_owned();
    }
    let parts: Vec<String> = matrix
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
        .collect();
    format!("{step}[{}]", parts.join(","))
}

/// Ids of every step that `id` depends on, transitively.
pub fn upstream(steps: &[PlannedStep], id: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![id.to_owned()];
    while let Some(current) = stack.pop() {
        if let Some(step) = steps.iter().find(|s| s.id == current) {
            for need in &step.needs {
                if seen.insert(need.clone()) {
                    stack.push(need.clone());
                }
            }
        }
    }
    seen
}

/// The graph of a plan in Graphviz DOT.
pub fn to_dot(plan: &Plan) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n", plan.pipeline);
    for s in &plan.steps {
        out.push_str(&format!("  \"{}\" [label=\"{}\\n{}\"];\n", s.id, s.id, s.action.summary().replace('"', "'")));
        for n in &s.needs {
            out.push_str(&format!("  \"{n}\" -> \"{}\";\n", s.id));
        }
    }
    out.push_str("}\n");
    out
}

/// The graph of a plan as a Mermaid flowchart.
pub fn to_mermaid(plan: &Plan) -> String {
    let node = |id: &str| id.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let mut out = String::from("flowchart LR\n");
    for s in &plan.steps {
        out.push_str(&format!("  {}[\"{}<br/>{}\"]\n", node(&s.id), s.id, s.action.summary().replace('"', "'")));
        for n in &s.needs {
            out.push_str(&format!("  {} --> {}\n", node(n), node(&s.id)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_render_as_shells_write_them() {
        let ctx = serde_json::json!({"yes": true, "no": false, "n": 3, "s": "x"});
        let text = render_str(&template_env(), "{{ yes }} {{ no }} {{ n }} {{ s }} {{ yes and no }}", &ctx).unwrap();
        assert_eq!(text, "true false 3 x false");
    }
}
