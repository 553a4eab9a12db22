//! Template checks: every string holding `{{ … }}` or `{% … %}` (and every `if:`
//! condition) is compiled with minijinja, and the variables it reads are checked
//! against what exists where it stands:
//!
//! - the namespace is one the registry offers (`params`, `env`, `secrets`, `steps`…);
//! - `secrets.X` is declared; `params.X` is a parameter of the automation or pipeline;
//! - `steps.X` is a step of the pipeline that the template's step depends on
//!   (through `needs`), and `steps.X.outputs.Y` one of its declared outputs;
//! - `matrix.X` is an axis of the step's matrix;
//! - `env.vars.X` is defined in every environment (or in the `--env` one).

use std::collections::{HashMap, HashSet};

use minijinja::Environment;
use serde_json::Value;

use super::{Ctx, Options};
use crate::diag::{Diagnostic, Location};
use crate::load::{RegistryKind, Sources};
use crate::model::{Pipeline, Ssot, Step};

/// Namespaces each registry's templates may read.
fn namespaces(kind: RegistryKind) -> &'static [&'static str] {
    match kind {
        RegistryKind::Automation => &["params", "env", "secrets", "run"],
        RegistryKind::Pipeline => &["params", "env", "secrets", "steps", "matrix", "run", "pipeline"],
        RegistryKind::Orchestration => &["env", "secrets", "event"],
        RegistryKind::Monitoring => &["env", "secrets", "event", "run", "pipeline"],
        RegistryKind::Security => &["env"],
    }
}

/// Functions and values minijinja provides, read as variables by the analysis.
const GLOBALS: &[&str] = &["range", "dict", "namespace", "loop", "true", "false", "none"];

/// A compiled template's variables, or its syntax error.
type Analysis = Result<Vec<String>, (String, Option<usize>)>;

pub(crate) fn check(ssot: &Ssot, options: &Options, ctx: &mut Ctx<'_>) {
    let env = Environment::new();
    let mut cache: HashMap<(bool, String), Analysis> = HashMap::new();
    let mut found: Vec<(RegistryKind, String, String, bool)> = Vec::new();
    for (kind, doc) in &ctx.docs {
        collect(*kind, &doc.value, &mut String::new(), &mut found);
    }
    let scope = Scope::new(ssot, options);
    for (kind, ptr, text, is_condition) in found {
        let analysis =
            cache.entry((is_condition, text.clone())).or_insert_with(|| analyse(&env, &text, is_condition)).clone();
        match analysis {
            Err((message, line)) => {
                let within =
                    line.filter(|l| *l > 1).map(|l| format!(" (line {l} of the template)")).unwrap_or_default();
                ctx.push(
                    Diagnostic::error("nexus::template_syntax", format!("invalid template{within}: {message}"))
                        .at(ctx.at(kind, &ptr))
                        .expected(if is_condition {
                            "a minijinja expression such as `params.env == 'prod'`"
                        } else {
                            "minijinja syntax: `{{ params.name }}`, `{% if … %}…{% endif %}`"
                        }),
                );
            }
            Ok(vars) => {
                for var in vars {
                    if let Some(d) = scope.check(kind, &ptr, &var) {
                        let location = ctx.at(kind, &ptr).map(|l| narrow(ctx.sources, l, &var));
                        ctx.push(d.at(location));
                    }
                }
            }
        }
    }
}

/// Whether the pointer segments are a channel's message `template`.
fn is_message_template(segs: &[String]) -> bool {
    matches!(segs, [channels, _, template] if channels == "channels" && template == "template")
}

/// Points at the variable itself: its first occurrence from the start of the string,
/// which may be on a later line of a block scalar (`script: |`).
fn narrow(sources: &Sources, location: Location, var: &str) -> Location {
    let Some(file) = sources.files.iter().find(|f| f.path == location.file) else {
        return location;
    };
    let window_end = (location.offset + 64 * 1024).min(file.text.len());
    let found = file.text.get(location.offset..window_end).and_then(|rest| rest.find(var));
    match found {
        Some(i) => {
            let mut narrowed = file.location_of_offset(location.offset + i);
            narrowed.length = var.len();
            narrowed
        }
        None => location,
    }
}

/// Finds every templated string (and every `if` condition) with its pointer.
fn collect(kind: RegistryKind, value: &Value, ptr: &mut String, out: &mut Vec<(RegistryKind, String, String, bool)>) {
    match value {
        Value::String(s) => {
            // `if` of a step: /pipelines/<name>/<group>/<index>/if
            let is_condition = kind == RegistryKind::Pipeline && ptr.ends_with("/if") && ptr.matches('/').count() == 5;
            if is_condition || s.contains("{{") || s.contains("{%") {
                out.push((kind, ptr.clone(), s.clone(), is_condition));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = ptr.len();
                ptr.push_str(&format!("/{i}"));
                collect(kind, item, ptr, out);
                ptr.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&crate::yaml::escape_segment(k));
                collect(kind, v, ptr, out);
                ptr.truncate(len);
            }
        }
        _ => {}
    }
}

fn analyse(env: &Environment<'_>, text: &str, is_condition: bool) -> Analysis {
    let error = |e: minijinja::Error| (e.detail().map_or_else(|| e.to_string(), str::to_owned), e.line());
    let vars = if is_condition {
        env.compile_expression(text).map_err(error)?.undeclared_variables(true)
    } else {
        env.template_from_str(text).map_err(error)?.undeclared_variables(true)
    };
    let mut vars: Vec<String> = vars.into_iter().collect();
    vars.sort();
    Ok(vars)
}

/// What templates may refer to.
struct Scope<'a> {
    ssot: &'a Ssot,
    /// Variables defined per environment.
    env_vars: Vec<(&'a str, HashSet<&'a str>)>,
    secrets: Vec<&'a str>,
}

impl<'a> Scope<'a> {
    fn new(ssot: &'a Ssot, options: &Options) -> Self {
        let env_vars = ssot
            .orchestration
            .environments
            .iter()
            .filter(|(name, _)| options.env.as_ref().is_none_or(|e| e == *name))
            .map(|(name, env)| (name.as_str(), env.vars.keys().map(String::as_str).collect()))
            .collect();
        Scope { ssot, env_vars, secrets: ssot.security.secrets.keys().map(String::as_str).collect() }
    }

    /// Checks one variable read by the template at `ptr` of registry `kind`.
    fn check(&self, kind: RegistryKind, ptr: &str, var: &str) -> Option<Diagnostic> {
        let parts: Vec<&str> = var.split('.').collect();
        let root = parts[0];
        let allowed = namespaces(kind);
        if GLOBALS.contains(&root) {
            return None;
        }
        if !allowed.contains(&root) {
            return Some(
                Diagnostic::error(
                    "nexus::template_namespace",
                    format!("template reads `{var}`, but `{root}` is not available here"),
                )
                .expected(format!("a variable under: {}", allowed.join(", ")))
                .suggest(root, allowed.iter().copied()),
            );
        }
        let segs = segments(ptr);
        if kind == RegistryKind::Monitoring && root == "secrets" && is_message_template(&segs) {
            return Some(
                Diagnostic::error(
                    "nexus::secret_in_message",
                    format!("a message template reads `{var}`: messages must never carry secrets"),
                )
                .expected("a template over `event`, `run`, `pipeline` and `env`")
                .help_or("put credentials in the channel's `spec`, where they are used and never shown"),
            );
        }
        match (root, parts.get(1)) {
            ("secrets", Some(name)) if !self.secrets.contains(name) => Some(
                Diagnostic::error("nexus::unknown_secret", format!("template reads undeclared secret `{name}`"))
                    .expected("a secret declared in `secrets` of security_registry.yaml")
                    .suggest(name, self.secrets.iter().copied())
                    .help_or(format!(
                        "declare `{name}` in security_registry.yaml (with its `env`, `file` or `command` source)"
                    )),
            ),
            ("env", Some(&"vars")) => {
                let name = parts.get(2)?;
                let missing: Vec<&str> =
                    self.env_vars.iter().filter(|(_, vars)| !vars.contains(name)).map(|(env, _)| *env).collect();
                if missing.is_empty() {
                    return None;
                }
                let all: Vec<&str> = self.env_vars.iter().flat_map(|(_, v)| v.iter().copied()).collect();
                Some(
                    Diagnostic::error(
                        "nexus::unknown_env_var",
                        format!(
                            "template reads `env.vars.{name}`, which environment{} {} do{} not define",
                            plural(missing.len()),
                            quote_list(&missing),
                            if missing.len() == 1 { "es" } else { "" }
                        ),
                    )
                    .expected("a variable defined in `vars` of every environment")
                    .suggest(name, all)
                    .help_or(format!("add `{name}` to the `vars` of {}", quote_list(&missing))),
                )
            }
            ("env", Some(field)) if !["name", "vars", "labels", "description"].contains(field) => Some(
                Diagnostic::error(
                    "nexus::template_namespace",
                    format!("template reads `{var}`; an environment has `name`, `vars`, `labels` and `description`"),
                )
                .suggest(field, ["name", "vars", "labels", "description"]),
            ),
            ("params", Some(name)) => {
                let params: Vec<&str> = self.params_at(kind, &segs)?;
                if params.contains(name) {
                    return None;
                }
                Some(
                    Diagnostic::error(
                        "nexus::unknown_param",
                        format!("template reads `params.{name}`, which is not a declared parameter"),
                    )
                    .expected(if params.is_empty() {
                        "no parameter is declared here".to_owned()
                    } else {
                        format!("one of: {}", params.join(", "))
                    })
                    .suggest(name, params.iter().copied())
                    .help_or(format!("declare `{name}` under `params`")),
                )
            }
            ("steps", Some(id)) => self.check_step_ref(&segs, id, parts.get(2).copied(), parts.get(3).copied()),
            ("matrix", Some(axis)) => {
                let step = self.step_at(&segs)?;
                if step.matrix.contains_key(*axis) {
                    return None;
                }
                let axes: Vec<&str> = step.matrix.keys().map(String::as_str).collect();
                Some(
                    Diagnostic::error(
                        "nexus::unknown_matrix_axis",
                        format!("template reads `matrix.{axis}`, but step `{}` has no such matrix axis", step.id),
                    )
                    .expected(if axes.is_empty() {
                        "a `matrix:` on the step".to_owned()
                    } else {
                        format!("one of: {}", axes.join(", "))
                    })
                    .suggest(axis, axes.iter().copied()),
                )
            }
            _ => None,
        }
    }

    fn pipeline_at(&self, segs: &[String]) -> Option<(&'a str, &'a Pipeline)> {
        if segs.first().map(String::as_str) != Some("pipelines") {
            return None;
        }
        self.ssot.pipelines.pipelines.get_key_value(segs.get(1)?.as_str()).map(|(k, v)| (k.as_str(), v))
    }

    /// The step a pointer is inside: (group, index, step).
    fn step_at(&self, segs: &[String]) -> Option<&'a Step> {
        let (_, pipeline) = self.pipeline_at(segs)?;
        let index: usize = segs.get(3)?.parse().ok()?;
        group(pipeline, segs.get(2)?)?.get(index)
    }

    fn params_at(&self, kind: RegistryKind, segs: &[String]) -> Option<Vec<&'a str>> {
        let params = match kind {
            RegistryKind::Automation => &self.ssot.automations.automations.get(segs.get(1)?.as_str())?.params,
            RegistryKind::Pipeline => &self.pipeline_at(segs)?.1.params,
            _ => return None,
        };
        Some(params.keys().map(String::as_str).collect())
    }

    fn check_step_ref(
        &self,
        segs: &[String],
        id: &str,
        field: Option<&str>,
        output: Option<&str>,
    ) -> Option<Diagnostic> {
        let (pipeline_name, pipeline) = self.pipeline_at(segs)?;
        let all: Vec<&Step> = ["steps", "on_failure", "on_success", "finally"]
            .iter()
            .filter_map(|g| group(pipeline, g))
            .flatten()
            .collect();
        let Some(target) = all.iter().find(|s| s.id == id) else {
            return Some(
                Diagnostic::error(
                    "nexus::unknown_step",
                    format!("template reads `steps.{id}`, but pipeline `{pipeline_name}` has no step `{id}`"),
                )
                .expected("the id of a step of this pipeline")
                .suggest(id, all.iter().map(|s| s.id.as_str())),
            );
        };
        // A main step may only read main steps it waits for; hooks run after all of them.
        let reader = (segs.get(2).map(String::as_str) == Some("steps")).then(|| self.step_at(segs)).flatten();
        if let Some(reader) = reader.filter(|r| r.id != id) {
            let hook = ["on_failure", "on_success", "finally"]
                .into_iter()
                .find(|g| group(pipeline, g).is_some_and(|steps| steps.iter().any(|s| s.id == id)));
            if let Some(hook) = hook {
                return Some(
                    Diagnostic::error("nexus::hook_step_read", format!("step `{}` reads `steps.{id}`, but `{id}` is an `{hook}` step", reader.id))
                        .expected("a main step that this step needs")
                        .help(format!("`{hook}` steps run after every main step, so no main step can read them; read it from another `{hook}` step instead")),
                );
            }
            if !depends_on(&pipeline.steps, &reader.id, id) {
                return Some(
                    Diagnostic::error(
                        "nexus::missing_needs",
                        format!("step `{}` reads `steps.{id}` but does not depend on `{id}`", reader.id),
                    )
                    .expected(format!("`{id}` among the step's `needs` (directly or through other steps)"))
                    .help(format!("add `needs: [{id}]` to step `{}` so `{id}` has finished when it runs", reader.id)),
                );
            }
        }
        if field != Some("outputs") {
            return None;
        }
        let output = output?;
        let declared: Vec<&str> = match &target.uses {
            Some(a) => {
                self.ssot.automations.automations.get(a).map(|a| a.outputs.keys().map(String::as_str).collect())?
            }
            None => target.outputs.keys().map(String::as_str).collect(),
        };
        if declared.contains(&output) {
            return None;
        }
        Some(
            Diagnostic::error(
                "nexus::unknown_output",
                format!("template reads `steps.{id}.outputs.{output}`, but step `{id}` declares no output `{output}`"),
            )
            .expected(if declared.is_empty() {
                "an output declared under `outputs:`".to_owned()
            } else {
                format!("one of: {}", declared.join(", "))
            })
            .suggest(output, declared.iter().copied())
            .help_or(format!("declare `{output}` under the `outputs` of `{}`", target.uses.as_deref().unwrap_or(id))),
        )
    }
}

fn group<'p>(pipeline: &'p Pipeline, name: &str) -> Option<&'p Vec<Step>> {
    match name {
        "steps" => Some(&pipeline.steps),
        "on_failure" => Some(&pipeline.on_failure),
        "on_success" => Some(&pipeline.on_success),
        "finally" => Some(&pipeline.finally),
        _ => None,
    }
}

/// Whether step `from` depends (transitively, through `needs`) on step `on`.
fn depends_on(steps: &[Step], from: &str, on: &str) -> bool {
    let by_id: HashMap<&str, &Step> = steps.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut stack = vec![from];
    let mut seen = HashSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for need in by_id.get(id).map(|s| s.needs.as_slice()).unwrap_or_default() {
            if need == on {
                return true;
            }
            stack.push(need);
        }
    }
    false
}

fn segments(ptr: &str) -> Vec<String> {
    ptr.split('/').skip(1).map(|s| s.replace("~1", "/").replace("~0", "~")).collect()
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn quote_list(items: &[&str]) -> String {
    items.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
}
