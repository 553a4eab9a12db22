//! Semantic checks, run once every registry has its typed form: cross-references
//! (each with "did you mean"), step DAGs (duplicates, unknown `needs`, cycles), the
//! exactly-one-of forms, parameters, cron expressions, time zones and route events.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::{Ctx, Options, pointer};
use crate::catalog::{Catalog, Family};
use crate::diag::Diagnostic;
use crate::load::RegistryKind::{
    self, Automation as A, Monitoring as M, Orchestration as O, Pipeline as P, Security as S,
};
use crate::model::{Map, ParamSpec, Pipeline, RunSpec, Ssot, Step};

/// Event types a route or monitor may name (`step.*` style wildcards are allowed).
pub const EVENT_TYPES: &[&str] = &[
    "run.started",
    "run.succeeded",
    "run.failed",
    "run.cancelled",
    "run.recovered",
    "run.skipped",
    "step.started",
    "step.retrying",
    "step.succeeded",
    "step.failed",
    "step.skipped",
    "step.rolled-back",
    "approval.requested",
    "approval.granted",
    "approval.rejected",
    "approval.expired",
    "health.changed",
];

/// What a reference points to, for messages.
#[derive(Clone, Copy)]
enum Target {
    Automation,
    Runner,
    Service,
    Channel,
    Secret,
    Environment,
    Lock,
    Pipeline,
    Role,
}

impl Target {
    fn noun(self) -> &'static str {
        match self {
            Target::Automation => "automation",
            Target::Runner => "runner",
            Target::Service => "service",
            Target::Channel => "channel",
            Target::Secret => "secret",
            Target::Environment => "environment",
            Target::Lock => "lock",
            Target::Pipeline => "pipeline",
            Target::Role => "role",
        }
    }

    fn home(self) -> &'static str {
        match self {
            Target::Automation => "`automations` of automation_registry.yaml",
            Target::Runner => "`runners` of orchestration_registry.yaml",
            Target::Service => "`services` of monitoring_registry.yaml",
            Target::Channel => "`channels` of monitoring_registry.yaml",
            Target::Secret => "`secrets` of security_registry.yaml",
            Target::Environment => "`environments` of orchestration_registry.yaml",
            Target::Lock => "`locks` of orchestration_registry.yaml",
            Target::Pipeline => "`pipelines` of pipeline_registry.yaml",
            Target::Role => "`roles` of security_registry.yaml",
        }
    }

    fn code(self) -> &'static str {
        match self {
            Target::Automation => "nexus::unknown_automation",
            Target::Runner => "nexus::unknown_runner",
            Target::Service => "nexus::unknown_service",
            Target::Channel => "nexus::unknown_channel",
            Target::Secret => "nexus::unknown_secret",
            Target::Environment => "nexus::unknown_environment",
            Target::Lock => "nexus::unknown_lock",
            Target::Pipeline => "nexus::unknown_pipeline",
            Target::Role => "nexus::unknown_role",
        }
    }
}

struct Names<'a> {
    automations: Vec<&'a str>,
    runners: Vec<&'a str>,
    services: Vec<&'a str>,
    channels: Vec<&'a str>,
    secrets: Vec<&'a str>,
    environments: Vec<&'a str>,
    locks: Vec<&'a str>,
    pipelines: Vec<&'a str>,
    roles: Vec<&'a str>,
}

impl<'a> Names<'a> {
    fn new(ssot: &'a Ssot) -> Self {
        fn keys<V>(m: &Map<V>) -> Vec<&str> {
            m.keys().map(String::as_str).collect()
        }
        Names {
            automations: keys(&ssot.automations.automations),
            runners: keys(&ssot.orchestration.runners),
            services: keys(&ssot.monitoring.services),
            channels: keys(&ssot.monitoring.channels),
            secrets: keys(&ssot.security.secrets),
            environments: keys(&ssot.orchestration.environments),
            locks: keys(&ssot.orchestration.locks),
            pipelines: keys(&ssot.pipelines.pipelines),
            roles: keys(&ssot.security.roles),
        }
    }

    fn of(&self, target: Target) -> &[&'a str] {
        match target {
            Target::Automation => &self.automations,
            Target::Runner => &self.runners,
            Target::Service => &self.services,
            Target::Channel => &self.channels,
            Target::Secret => &self.secrets,
            Target::Environment => &self.environments,
            Target::Lock => &self.locks,
            Target::Pipeline => &self.pipelines,
            Target::Role => &self.roles,
        }
    }
}

struct Checker<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    names: Names<'c>,
    catalog: &'c Catalog,
}

impl Checker<'_, '_> {
    /// Reports `name` at `registry`/`ptr` unless it is a declared `target`.
    fn reference(&mut self, registry: RegistryKind, ptr: &str, target: Target, name: &str) {
        let names = self.names.of(target);
        if names.contains(&name) {
            return;
        }
        let mut d = Diagnostic::error(target.code(), format!("unknown {} `{name}`", target.noun()))
            .at(self.ctx.at(registry, ptr))
            .expected(format!("the name of {} {} declared in {}", article(target.noun()), target.noun(), target.home()))
            .suggest(name, names.iter().copied());
        if d.help.is_none() {
            d = d.help(if names.is_empty() {
                format!("no {} is declared yet; add `{name}` to {}", target.noun(), target.home())
            } else {
                format!("declared: {}", preview(names))
            });
        }
        self.ctx.push(d);
    }

    fn references<'n>(
        &mut self,
        registry: RegistryKind,
        base: &str,
        target: Target,
        names: impl IntoIterator<Item = &'n String>,
    ) {
        for (i, name) in names.into_iter().enumerate() {
            self.reference(registry, &format!("{base}/{i}"), target, name);
        }
    }

    fn error(
        &mut self,
        registry: RegistryKind,
        ptr: &str,
        code: &'static str,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let d = Diagnostic::error(code, message).at(self.ctx.at(registry, ptr));
        self.ctx.report.diagnostics.push(d);
        self.ctx.report.diagnostics.last_mut().expect("just pushed")
    }

    fn key_error(
        &mut self,
        registry: RegistryKind,
        ptr: &str,
        code: &'static str,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let d = Diagnostic::error(code, message).at(self.ctx.key_at(registry, ptr));
        self.ctx.report.diagnostics.push(d);
        self.ctx.report.diagnostics.last_mut().expect("just pushed")
    }
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

fn preview(names: &[&str]) -> String {
    if names.len() <= 12 {
        names.join(", ")
    } else {
        format!("{}, … ({} in all)", names[..12].join(", "), names.len())
    }
}

pub(crate) fn check(ssot: &Ssot, catalog: &Catalog, options: &Options, ctx: &mut Ctx<'_>) {
    let mut c = Checker { ctx, names: Names::new(ssot), catalog };
    if let Some(env) = &options.env
        && !c.names.environments.contains(&env.as_str())
    {
        let d = Diagnostic::error("nexus::unknown_environment", format!("unknown environment `{env}` (from --env)"))
            .suggest(env, c.names.environments.iter().copied())
            .expected(format!("one of: {}", preview(&c.names.environments)));
        c.ctx.push(d);
    }
    automations(ssot, &mut c);
    for (name, pipeline) in &ssot.pipelines.pipelines {
        pipeline_checks(ssot, name, pipeline, &mut c);
    }
    orchestration(ssot, &mut c);
    monitoring(ssot, &mut c);
    security(ssot, &mut c);
}

fn run_forms(c: &mut Checker<'_, '_>, registry: RegistryKind, ptr: &str, run: &RunSpec) {
    match run.forms_given() {
        1 => {}
        0 => {
            c.error(registry, ptr, "nexus::run_form", "`run` says nothing to run").expected =
                Some("exactly one of `command`, `script` or `argv`".into());
        }
        _ => {
            c.error(registry, ptr, "nexus::run_form", "`run` gives more than one of `command`, `script` and `argv`")
                .expected = Some("exactly one of them".into());
        }
    }
    if run.argv.as_ref().is_some_and(Vec::is_empty) {
        c.error(registry, &format!("{ptr}/argv"), "nexus::run_form", "`argv` is empty").expected =
            Some("the program to run, then its arguments".into());
    }
}

fn params_decl(c: &mut Checker<'_, '_>, registry: RegistryKind, base: &str, params: &Map<ParamSpec>) {
    for (name, spec) in params {
        let ptr = format!("{base}/{}", crate::yaml::escape_segment(name));
        if let Some(default) = &spec.default {
            if !spec.ty.accepts(default) {
                c.error(
                    registry,
                    &format!("{ptr}/default"),
                    "nexus::param_type",
                    format!("default of parameter `{name}` is not of type `{}`", spec.ty),
                )
                .expected = Some(format!("a value of type `{}`", spec.ty));
            } else if let Some(allowed) = &spec.allowed
                && !allowed.contains(default)
            {
                c.error(
                    registry,
                    &format!("{ptr}/default"),
                    "nexus::param_value",
                    format!("default of parameter `{name}` is not one of its allowed values"),
                )
                .expected = Some(format!("one of: {}", Value::Array(allowed.clone())));
            }
            if spec.required {
                c.error(
                    registry,
                    &format!("{ptr}/required"),
                    "nexus::param_required",
                    format!("parameter `{name}` is required but has a default"),
                )
                .help = Some("drop `required: true` (the default makes it optional) or drop the default".into());
            }
        }
    }
}

/// Checks literal arguments against the params they fill (templates are checked at plan time).
fn args(
    c: &mut Checker<'_, '_>,
    registry: RegistryKind,
    base: &str,
    field: &str,
    owner: &str,
    params: &Map<ParamSpec>,
    with: &Map<Value>,
) {
    let known: Vec<&str> = params.keys().map(String::as_str).collect();
    for (name, value) in with {
        let ptr = format!("{base}/{field}/{}", crate::yaml::escape_segment(name));
        match params.get(name) {
            None => {
                let d =
                    c.key_error(registry, &ptr, "nexus::unknown_param", format!("`{owner}` has no parameter `{name}`"));
                d.expected = Some(if known.is_empty() {
                    "no parameter".into()
                } else {
                    format!("one of: {}", known.join(", "))
                });
                if let Some(near) = crate::suggest::closest(name, known.iter().copied()) {
                    d.help = Some(format!("did you mean `{near}`?"));
                }
            }
            Some(spec) => {
                let templated = value.as_str().is_some_and(|s| s.contains("{{"));
                if !templated && !spec.ty.accepts(value) {
                    c.error(
                        registry,
                        &ptr,
                        "nexus::param_type",
                        format!("parameter `{name}` of `{owner}` takes a value of type `{}`", spec.ty),
                    )
                    .expected = Some(format!("a value of type `{}`", spec.ty));
                } else if let (false, Some(allowed)) = (templated, &spec.allowed)
                    && !allowed.contains(value)
                {
                    c.error(
                        registry,
                        &ptr,
                        "nexus::param_value",
                        format!("`{value}` is not an allowed value of parameter `{name}`"),
                    )
                    .expected = Some(format!("one of: {}", Value::Array(allowed.clone())));
                }
            }
        }
    }
    for (name, spec) in params {
        if spec.required && spec.default.is_none() && !with.contains_key(name) {
            c.key_error(
                registry,
                base,
                "nexus::missing_param",
                format!("required parameter `{name}` of `{owner}` is not given"),
            )
            .help = Some(format!("add `{field}: {{ {name}: … }}`"));
        }
    }
}

fn automations(ssot: &Ssot, c: &mut Checker<'_, '_>) {
    for (name, automation) in &ssot.automations.automations {
        let base = pointer(&["automations", name.as_str()]);
        run_forms(c, A, &format!("{base}/run"), &automation.run);
        if let Some(runner) = &automation.runner {
            c.reference(A, &format!("{base}/runner"), Target::Runner, runner);
        }
        c.references(A, &format!("{base}/secrets"), Target::Secret, &automation.secrets);
        params_decl(c, A, &format!("{base}/params"), &automation.params);
    }
}

/// What a step does, for the exactly-one-of check.
fn step_forms(step: &Step) -> Vec<&'static str> {
    let mut forms = Vec::new();
    if step.uses.is_some() {
        forms.push("uses");
    }
    if step.run.is_some() {
        forms.push("run");
    }
    if step.service.is_some() {
        forms.push("service");
    }
    if step.approval.is_some() {
        forms.push("approval");
    }
    if step.notify.is_some() {
        forms.push("notify");
    }
    forms
}

fn pipeline_checks(ssot: &Ssot, name: &str, pipeline: &Pipeline, c: &mut Checker<'_, '_>) {
    let base = pointer(&["pipelines", name]);
    params_decl(c, P, &format!("{base}/params"), &pipeline.params);
    let groups: [(&str, &Vec<Step>); 4] = [
        ("steps", &pipeline.steps),
        ("on_failure", &pipeline.on_failure),
        ("on_success", &pipeline.on_success),
        ("finally", &pipeline.finally),
    ];
    // Step ids are unique across the whole pipeline, hooks included.
    let mut seen: HashMap<&str, String> = HashMap::new();
    for (group, steps) in groups {
        for (i, step) in steps.iter().enumerate() {
            let ptr = format!("{base}/{group}/{i}");
            if let Some(first) = seen.get(step.id.as_str()) {
                let first_loc = c.ctx.at(P, first).map(|l| format!("line {}", l.line)).unwrap_or_default();
                c.error(
                    P,
                    &format!("{ptr}/id"),
                    "nexus::duplicate_step",
                    format!("duplicate step id `{}` in pipeline `{name}`", step.id),
                )
                .help = Some(format!("step ids are unique in a pipeline; the first `{}` is at {first_loc}", step.id));
            } else {
                seen.insert(&step.id, ptr.clone());
            }
            step_checks(ssot, name, &ptr, step, c);
        }
        dag(name, &format!("{base}/{group}"), steps, c);
    }
    if steps_empty(pipeline) {
        c.key_error(P, &base, "nexus::empty_pipeline", format!("pipeline `{name}` has no steps")).expected =
            Some("at least one step".into());
    }
}

fn steps_empty(p: &Pipeline) -> bool {
    p.steps.is_empty()
}

fn step_checks(ssot: &Ssot, pipeline: &str, ptr: &str, step: &Step, c: &mut Checker<'_, '_>) {
    let forms = step_forms(step);
    match forms.len() {
        1 => {}
        0 => {
            c.error(P, ptr, "nexus::step_form", format!("step `{}` does nothing", step.id)).expected =
                Some("exactly one of `uses`, `run`, `service` (with `action`), `approval` or `notify`".into());
        }
        _ => {
            c.error(
                P,
                ptr,
                "nexus::step_form",
                format!("step `{}` has several actions: {}", step.id, forms.join(", ")),
            )
            .expected = Some(
                "exactly one of `uses`, `run`, `service`, `approval` or `notify`; split it into several steps".into(),
            );
        }
    }
    if let Some(automation) = &step.uses {
        c.reference(P, &format!("{ptr}/uses"), Target::Automation, automation);
        if let Some(a) = ssot.automations.automations.get(automation) {
            args(c, P, ptr, "with", automation, &a.params, &step.with);
        }
    }
    if let Some(run) = &step.run {
        run_forms(c, P, &format!("{ptr}/run"), run);
    }
    if step.uses.is_some() && !step.outputs.is_empty() {
        c.key_error(
            P,
            &format!("{ptr}/outputs"),
            "nexus::step_form",
            "a `uses` step takes its outputs from the automation",
        )
        .help = Some("declare these outputs under the automation's `outputs` instead".into());
    }
    service_action(c, ssot, ptr, step.service.as_deref(), step.action.as_deref());
    if step.service.is_none() && step.uses.is_none() && !step.with.is_empty() {
        c.key_error(
            P,
            &format!("{ptr}/with"),
            "nexus::step_form",
            "`with` gives arguments, but the step neither `uses` an automation nor calls a `service`",
        )
        .help = Some("remove `with`, or pass values to the command through `env`".into());
    }
    if let Some(runner) = &step.runner {
        c.reference(P, &format!("{ptr}/runner"), Target::Runner, runner);
    }
    if let Some(notify) = &step.notify {
        c.references(P, &format!("{ptr}/notify/channels"), Target::Channel, &notify.channels);
    }
    if let Some(approval) = &step.approval {
        c.references(P, &format!("{ptr}/approval/approvers"), Target::Role, &approval.approvers);
    }
    c.references(P, &format!("{ptr}/locks"), Target::Lock, &step.locks);
    c.references(P, &format!("{ptr}/secrets"), Target::Secret, &step.secrets);
    for (key, values) in &step.matrix {
        if values.is_empty() {
            c.error(
                P,
                &format!("{ptr}/matrix/{}", crate::yaml::escape_segment(key)),
                "nexus::matrix",
                format!("matrix axis `{key}` has no values"),
            )
            .expected = Some("at least one value".into());
        }
    }
    if let Some(rollback) = &step.rollback {
        let rptr = format!("{ptr}/rollback");
        let forms = usize::from(rollback.uses.is_some())
            + usize::from(rollback.run.is_some())
            + usize::from(rollback.service.is_some());
        if forms != 1 {
            c.error(
                P,
                &rptr,
                "nexus::rollback_form",
                format!("rollback of step `{}` must do exactly one thing", step.id),
            )
            .expected = Some("exactly one of `uses`, `run` or `service` (with `action`)".into());
        }
        if let Some(automation) = &rollback.uses {
            c.reference(P, &format!("{rptr}/uses"), Target::Automation, automation);
            if let Some(a) = ssot.automations.automations.get(automation) {
                args(c, P, &rptr, "with", automation, &a.params, &rollback.with);
            }
        }
        if let Some(run) = &rollback.run {
            run_forms(c, P, &format!("{rptr}/run"), run);
        }
        if let Some(runner) = &rollback.runner {
            c.reference(P, &format!("{rptr}/runner"), Target::Runner, runner);
        }
        service_action(c, ssot, &rptr, rollback.service.as_deref(), rollback.action.as_deref());
    }
    let _ = pipeline;
}

fn service_action(c: &mut Checker<'_, '_>, ssot: &Ssot, ptr: &str, service: Option<&str>, action: Option<&str>) {
    match (service, action) {
        (Some(service), action) => {
            c.reference(P, &format!("{ptr}/service"), Target::Service, service);
            let Some(svc) = ssot.monitoring.services.get(service) else {
                return;
            };
            let kinds = c.catalog.family(Family::Service);
            let Some(kind) = kinds.iter().find(|k| k.kind == svc.kind) else {
                return;
            };
            let actions: Vec<&str> = kind.actions.iter().map(String::as_str).collect();
            match action {
                None => {
                    c.error(
                        P,
                        &format!("{ptr}/service"),
                        "nexus::missing_action",
                        format!("calling service `{service}` needs an `action`"),
                    )
                    .expected = Some(format!("`action:` one of {}", actions.join(", ")));
                }
                Some(action) if !actions.contains(&action) => {
                    let d = c.error(
                        P,
                        &format!("{ptr}/action"),
                        "nexus::unknown_action",
                        format!("service `{service}` (kind `{}`) has no action `{action}`", svc.kind),
                    );
                    d.expected = Some(format!("one of: {}", actions.join(", ")));
                    if let Some(near) = crate::suggest::closest(action, actions.iter().copied()) {
                        d.help = Some(format!("did you mean `{near}`?"));
                    }
                }
                Some(_) => {}
            }
        }
        (None, Some(_)) => {
            c.error(P, &format!("{ptr}/action"), "nexus::missing_service", "`action` without a `service`").expected =
                Some("a `service:` naming a service of monitoring_registry.yaml".into());
        }
        (None, None) => {}
    }
}

/// Unknown `needs`, self-dependencies and cycles among `steps`.
fn dag(pipeline: &str, base: &str, steps: &[Step], c: &mut Checker<'_, '_>) {
    let index: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        for (j, need) in step.needs.iter().enumerate() {
            let ptr = format!("{base}/{i}/needs/{j}");
            match index.get(need.as_str()) {
                Some(&k) if k == i => {
                    c.error(P, &ptr, "nexus::self_dependency", format!("step `{need}` needs itself")).help =
                        Some("remove it from its own `needs`".into());
                }
                Some(&k) => edges[i].push(k),
                None => {
                    let d = c.error(
                        P,
                        &ptr,
                        "nexus::unknown_step",
                        format!(
                            "step `{}` needs `{need}`, which is not a step of this list in pipeline `{pipeline}`",
                            step.id
                        ),
                    );
                    d.expected = Some(format!("one of: {}", preview(&ids)));
                    if let Some(near) = crate::suggest::closest(need, ids.iter().copied()) {
                        d.help = Some(format!("did you mean `{near}`?"));
                    }
                }
            }
        }
    }
    // Iterative DFS (colours: 0 new, 1 on the stack, 2 done); the first back edge found
    // from each unvisited root is reported with the whole cycle.
    let mut colour = vec![0u8; steps.len()];
    for root in 0..steps.len() {
        if colour[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = 1;
        while let Some((node, next)) = stack.last_mut() {
            let node = *node;
            if *next < edges[node].len() {
                let target = edges[node][*next];
                *next += 1;
                match colour[target] {
                    0 => {
                        colour[target] = 1;
                        stack.push((target, 0));
                    }
                    1 => {
                        let start = stack.iter().position(|(n, _)| *n == target).unwrap_or(0);
                        // The stack holds each step before what it needs: `a → b` reads
                        // "a needs b".
                        let mut cycle: Vec<&str> = stack[start..].iter().map(|(n, _)| ids[*n]).collect();
                        cycle.push(cycle[0]);
                        let j = steps[node].needs.iter().position(|n| n == ids[target]).unwrap_or(0);
                        c.error(
                            P,
                            &format!("{base}/{node}/needs/{j}"),
                            "nexus::cycle",
                            format!(
                                "steps of pipeline `{pipeline}` depend on each other in a cycle: {}",
                                cycle.join(" → ")
                            ),
                        )
                        .help = Some("remove one of these `needs` so the steps form a DAG".into());
                    }
                    _ => {}
                }
            } else {
                colour[node] = 2;
                stack.pop();
            }
        }
    }
}

fn orchestration(ssot: &Ssot, c: &mut Checker<'_, '_>) {
    let o = &ssot.orchestration;
    let d = &o.defaults;
    if let Some(env) = &d.environment {
        c.reference(O, "/defaults/environment", Target::Environment, env);
    }
    if let Some(p) = &d.pipeline {
        c.reference(O, "/defaults/pipeline", Target::Pipeline, p);
    }
    if let Some(r) = &d.runner {
        c.reference(O, "/defaults/runner", Target::Runner, r);
    }
    if d.runner.is_none() {
        let unassigned = ssot.automations.automations.values().any(|a| a.runner.is_none());
        if unassigned && o.runners.len() != 1 {
            c.key_error(
                O,
                "/defaults",
                "nexus::no_default_runner",
                "some automations name no runner and there is no `defaults.runner`",
            )
            .help = Some("set `defaults: { runner: NAME }` or give each automation a `runner`".into());
        }
    }
    if o.environments.is_empty() {
        c.key_error(O, "/environments", "nexus::no_environment", "no environment is declared").expected =
            Some("at least one environment, such as `dev`".into());
    }
    for (env_name, env) in &o.environments {
        let base = pointer(&["environments", env_name.as_str(), "overrides"]);
        for (from, to) in &env.overrides.runners {
            let ptr = format!("{base}/runners/{}", crate::yaml::escape_segment(from));
            let names = c.names.of(Target::Runner);
            if !names.contains(&from.as_str()) {
                let d = c.key_error(O, &ptr, "nexus::unknown_runner", format!("unknown runner `{from}`"));
                d.expected = Some("the name of a runner declared in `runners`".into());
            }
            c.reference(O, &ptr, Target::Runner, to);
        }
        for (automation, ov) in &env.overrides.automations {
            let ptr = format!("{base}/automations/{}", crate::yaml::escape_segment(automation));
            if !c.names.automations.contains(&automation.as_str()) {
                let names = c.names.automations.clone();
                let d = c.key_error(O, &ptr, "nexus::unknown_automation", format!("unknown automation `{automation}`"));
                d.expected = Some("the name of an automation".into());
                if let Some(near) = crate::suggest::closest(automation, names) {
                    d.help = Some(format!("did you mean `{near}`?"));
                }
                continue;
            }
            if let Some(runner) = &ov.runner {
                c.reference(O, &format!("{ptr}/runner"), Target::Runner, runner);
            }
            let params = &ssot.automations.automations[automation].params;
            for (param, value) in &ov.params {
                let pptr = format!("{ptr}/params/{}", crate::yaml::escape_segment(param));
                match params.get(param) {
                    None => {
                        c.key_error(
                            O,
                            &pptr,
                            "nexus::unknown_param",
                            format!("`{automation}` has no parameter `{param}`"),
                        );
                    }
                    Some(spec) if !value.as_str().is_some_and(|s| s.contains("{{")) && !spec.ty.accepts(value) => {
                        c.error(
                            O,
                            &pptr,
                            "nexus::param_type",
                            format!("parameter `{param}` of `{automation}` takes a value of type `{}`", spec.ty),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
        for (pipeline, values) in &env.overrides.params {
            let ptr = format!("{base}/params/{}", crate::yaml::escape_segment(pipeline));
            let Some(p) = ssot.pipelines.pipelines.get(pipeline) else {
                c.key_error(O, &ptr, "nexus::unknown_pipeline", format!("unknown pipeline `{pipeline}`"));
                continue;
            };
            for param in values.keys() {
                if !p.params.contains_key(param) {
                    c.key_error(
                        O,
                        &format!("{ptr}/{}", crate::yaml::escape_segment(param)),
                        "nexus::unknown_param",
                        format!("pipeline `{pipeline}` has no parameter `{param}`"),
                    );
                }
            }
        }
    }
    for (name, schedule) in &o.schedules {
        let base = pointer(&["schedules", name.as_str()]);
        c.reference(O, &format!("{base}/pipeline"), Target::Pipeline, &schedule.pipeline);
        c.reference(O, &format!("{base}/environment"), Target::Environment, &schedule.environment);
        if let Err(e) = croner::parser::CronParser::new().parse(&schedule.cron) {
            c.error(
                O,
                &format!("{base}/cron"),
                "nexus::cron",
                format!("invalid cron expression `{}`: {e}", schedule.cron),
            )
            .expected = Some(
                "5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first, e.g. `0 2 * * *`"
                    .into(),
            );
        }
        timezone(c, O, &format!("{base}/timezone"), &schedule.timezone);
        if let Some(p) = ssot.pipelines.pipelines.get(&schedule.pipeline) {
            args(c, O, &base, "params", &schedule.pipeline, &p.params, &schedule.params);
        }
    }
    for (name, trigger) in &o.triggers {
        let base = pointer(&["triggers", name.as_str()]);
        c.reference(O, &format!("{base}/pipeline"), Target::Pipeline, &trigger.pipeline);
        c.reference(O, &format!("{base}/environment"), Target::Environment, &trigger.environment);
        if let Some(secret) = &trigger.signing_secret {
            c.reference(O, &format!("{base}/signing_secret"), Target::Secret, secret);
        }
        if let Some(p) = ssot.pipelines.pipelines.get(&trigger.pipeline) {
            args(c, O, &base, "params", &trigger.pipeline, &p.params, &trigger.params);
        }
    }
    if o.state.backend == crate::model::orchestration::StateBackend::Postgres && o.state.url.is_none() {
        c.key_error(O, "/state", "nexus::state", "the postgres state backend needs a `url`").help =
            Some("set `url: postgres://user:{{ secrets.db_password }}@host/db`".into());
    }
}

fn timezone(c: &mut Checker<'_, '_>, registry: RegistryKind, ptr: &str, tz: &str) {
    if tz.parse::<chrono_tz::Tz>().is_err() {
        let d = c.error(registry, ptr, "nexus::timezone", format!("unknown time zone `{tz}`"));
        d.expected = Some("an IANA time zone name such as `UTC`, `Europe/Paris` or `America/New_York`".into());
        if let Some(near) = crate::suggest::closest(tz, chrono_tz::TZ_VARIANTS.iter().map(|t| t.name())) {
            d.help = Some(format!("did you mean `{near}`?"));
        }
    }
}

fn event_pattern(c: &mut Checker<'_, '_>, ptr: &str, pattern: &str) {
    let known = EVENT_TYPES.contains(&pattern)
        || pattern == "*"
        || pattern
            .strip_suffix(".*")
            .is_some_and(|prefix| EVENT_TYPES.iter().any(|e| e.starts_with(&format!("{prefix}."))));
    if !known {
        let d = c.error(M, ptr, "nexus::unknown_event", format!("unknown event type `{pattern}`"));
        d.expected = Some(format!("one of: {} (or a prefix wildcard such as `step.*`)", EVENT_TYPES.join(", ")));
        if let Some(near) = crate::suggest::closest(pattern, EVENT_TYPES.iter().copied()) {
            d.help = Some(format!("did you mean `{near}`?"));
        }
    }
}

fn monitoring(ssot: &Ssot, c: &mut Checker<'_, '_>) {
    let m = &ssot.monitoring;
    for (name, service) in &m.services {
        let base = pointer(&["services", name.as_str()]);
        c.references(M, &format!("{base}/environments"), Target::Environment, &service.environments);
    }
    for (name, monitor) in &m.monitors {
        let base = pointer(&["monitors", name.as_str(), "events"]);
        for (i, e) in monitor.events.iter().enumerate() {
            event_pattern(c, &format!("{base}/{i}"), e);
        }
    }
    for (i, route) in m.routes.iter().enumerate() {
        let base = format!("/routes/{i}");
        if route.channels.is_empty() {
            c.key_error(
                M,
                &format!("{base}/channels"),
                "nexus::route",
                format!("route `{}` sends to no channel", route.name),
            )
            .expected = Some("at least one channel".into());
        }
        c.references(M, &format!("{base}/channels"), Target::Channel, &route.channels);
        c.references(M, &format!("{base}/match/pipelines"), Target::Pipeline, &route.matches.pipelines);
        c.references(M, &format!("{base}/match/environments"), Target::Environment, &route.matches.environments);
        for (j, e) in route.matches.events.iter().enumerate() {
            event_pattern(c, &format!("{base}/match/events/{j}"), e);
        }
    }
    let mut names: HashSet<&str> = HashSet::new();
    for (i, route) in m.routes.iter().enumerate() {
        if !names.insert(&route.name) {
            c.error(
                M,
                &format!("/routes/{i}/name"),
                "nexus::duplicate_name",
                format!("two routes are named `{}`", route.name),
            )
            .help = Some("route names identify deliveries; make them unique".into());
        }
    }
}

fn security(ssot: &Ssot, c: &mut Checker<'_, '_>) {
    let s = &ssot.security;
    for (name, secret) in &s.secrets {
        let base = pointer(&["secrets", name.as_str()]);
        let given = secret.source().forms_given();
        // One default source, or none when every environment that uses it has its own.
        let valid = given == 1 || (given == 0 && !secret.environments.is_empty());
        if !valid {
            c.key_error(
                S,
                &base,
                "nexus::secret_source",
                format!("secret `{name}` must come from exactly one source"),
            )
            .expected = Some("exactly one of `env`, `file` or `command` (or per-environment sources)".into());
        }
        for (env, source) in &secret.environments {
            let ptr = format!("{base}/environments/{}", crate::yaml::escape_segment(env));
            if !c.names.environments.contains(&env.as_str()) {
                c.key_error(S, &ptr, "nexus::unknown_environment", format!("unknown environment `{env}`"));
            }
            if source.forms_given() != 1 {
                c.key_error(
                    S,
                    &ptr,
                    "nexus::secret_source",
                    format!("secret `{name}` in `{env}` must come from exactly one source"),
                )
                .expected = Some("exactly one of `env`, `file` or `command`".into());
            }
        }
    }
    for (i, pattern) in s.redaction.patterns.iter().enumerate() {
        if let Err(e) = regex_syntax::Parser::new().parse(pattern) {
            c.error(S, &format!("/redaction/patterns/{i}"), "nexus::regex", format!("invalid redaction pattern: {e}"));
        }
    }
    for (name, role) in &s.roles {
        let base = pointer(&["roles", name.as_str()]);
        c.references(S, &format!("{base}/environments"), Target::Environment, &role.environments);
        c.references(S, &format!("{base}/pipelines"), Target::Pipeline, &role.pipelines);
    }
    for (name, token) in &s.tokens {
        let base = pointer(&["tokens", name.as_str()]);
        c.reference(S, &format!("{base}/secret"), Target::Secret, &token.secret);
        c.references(S, &format!("{base}/roles"), Target::Role, &token.roles);
        if let Some(expires) = &token.expires
            && chrono::NaiveDate::parse_from_str(expires, "%Y-%m-%d").is_err()
            && chrono::DateTime::parse_from_rfc3339(expires).is_err()
        {
            c.error(S, &format!("{base}/expires"), "nexus::date", format!("invalid date `{expires}`")).expected =
                Some("a date `YYYY-MM-DD` or an RFC 3339 time".into());
        }
    }
    for (env, policy) in &s.policies {
        let base = pointer(&["policies", env.as_str()]);
        if !c.names.environments.contains(&env.as_str()) {
            let envs = c.names.environments.clone();
            let d =
                c.key_error(S, &base, "nexus::unknown_environment", format!("policy for unknown environment `{env}`"));
            if let Some(near) = crate::suggest::closest(env, envs) {
                d.help = Some(format!("did you mean `{near}`?"));
            }
        }
        c.references(S, &format!("{base}/approvers"), Target::Role, &policy.approvers);
        c.references(S, &format!("{base}/allowed_runners"), Target::Runner, &policy.allowed_runners);
        for (i, window) in policy.change_windows.iter().enumerate() {
            timezone(c, S, &format!("{base}/change_windows/{i}/timezone"), &window.timezone);
        }
    }
}
