//! Validation of a config directory: everything `nexus validate` reports, in one pass.
//!
//! Stages: read and parse (spanned YAML) → JSON Schema check of each registry →
//! typed model → component kinds and specs → semantic checks (cross-references, DAGs,
//! templates, cron and time zones). Every problem becomes a [`Diagnostic`] pointing at
//! the file, line and column it comes from.

mod schema_errors;
mod semantic;
mod templates;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::catalog::Catalog;
use crate::diag::{Diagnostic, Location, Report};
use crate::load::{self, RegistryDoc, RegistryKind, Sources};
use crate::model::Ssot;
use crate::schema::{envelope_family, registry_schema_for};
use crate::yaml::escape_segment;

/// What to validate for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Check as for this environment only (its variables must cover every template);
    /// all environments when absent.
    pub env: Option<String>,
}

/// The result of validating a config directory.
#[derive(Debug)]
pub struct Validated {
    /// The model, when there is no error.
    pub ssot: Option<Ssot>,
    /// Every diagnostic, sorted by file and line.
    pub report: Report,
    /// The files read, for rendering snippets.
    pub sources: Sources,
}

/// Validates the registries of `dir` against the kinds of `catalog`.
pub fn validate_dir(dir: &Path, catalog: &Catalog, options: &Options) -> Validated {
    let (sources, docs, load_diags) = load::load_dir(dir);
    let mut report = Report::default();
    for d in load_diags {
        report.push(d);
    }
    let mut ctx = Ctx { sources: &sources, docs: BTreeMap::new(), report: &mut report };
    for doc in docs {
        ctx.docs.insert(doc.kind, doc);
    }

    let mut typed = Typed::default();
    let mut schema_clean = Vec::new();
    for kind in RegistryKind::ALL {
        let Some(doc) = ctx.docs.get(&kind) else {
            continue;
        };
        let schema = registry_schema_for(kind, catalog, &doc.value);
        let errors = schema_errors::check(doc, &schema, ctx.sources);
        let clean = errors.is_empty();
        for d in errors {
            ctx.report.push(d);
        }
        if clean {
            schema_clean.push(kind);
            if let Err(d) = typed.set(doc, ctx.sources) {
                ctx.push(*d);
            }
        }
    }
    check_component_kinds(&mut ctx, catalog, &schema_clean);

    let ssot = typed.complete();
    if let Some(ssot) = &ssot {
        semantic::check(ssot, catalog, options, &mut ctx);
        templates::check(ssot, options, &mut ctx);
    }
    report.sort();
    let ssot = if report.has_errors() { None } else { ssot };
    Validated { ssot, report, sources }
}

/// What validation stages share: the sources, the parsed registries and the report.
pub(crate) struct Ctx<'a> {
    pub sources: &'a Sources,
    pub docs: BTreeMap<RegistryKind, RegistryDoc>,
    pub report: &'a mut Report,
}

impl Ctx<'_> {
    /// The location of the value at `pointer` in `kind`'s registry.
    pub fn at(&self, kind: RegistryKind, pointer: &str) -> Option<Location> {
        self.docs.get(&kind).and_then(|doc| self.sources.locate(doc, pointer, false))
    }

    /// The location of the key of the entry at `pointer`.
    pub fn key_at(&self, kind: RegistryKind, pointer: &str) -> Option<Location> {
        self.docs.get(&kind).and_then(|doc| self.sources.locate(doc, pointer, true))
    }

    /// Records a diagnostic.
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.report.push(diagnostic);
    }
}

/// Builds a JSON pointer from segments.
pub(crate) fn pointer<S: AsRef<str>>(segments: &[S]) -> String {
    let mut out = String::new();
    for s in segments {
        out.push('/');
        out.push_str(&escape_segment(s.as_ref()));
    }
    out
}

#[derive(Default)]
struct Typed {
    automations: Option<crate::model::AutomationRegistry>,
    pipelines: Option<crate::model::PipelineRegistry>,
    orchestration: Option<crate::model::OrchestrationRegistry>,
    monitoring: Option<crate::model::MonitoringRegistry>,
    security: Option<crate::model::SecurityRegistry>,
}

impl Typed {
    fn set(&mut self, doc: &RegistryDoc, sources: &Sources) -> Result<(), Box<Diagnostic>> {
        fn de<T: serde::de::DeserializeOwned>(doc: &RegistryDoc, sources: &Sources) -> Result<T, Box<Diagnostic>> {
            // The schema is generated from the same types, so this is rare: a value the
            // schema cannot express, such as a duration too long to represent or `1.0`
            // where an integer belongs.
            serde_path_to_error::deserialize(&doc.value).map_err(|e| {
                use serde_path_to_error::Segment;
                let segments: Vec<String> = e
                    .path()
                    .iter()
                    .filter_map(|s| match s {
                        Segment::Map { key } => Some(key.clone()),
                        Segment::Seq { index } => Some(index.to_string()),
                        Segment::Enum { .. } | Segment::Unknown => None,
                    })
                    .collect();
                let field = segments.last().cloned().unwrap_or_default();
                Box::new(
                    Diagnostic::error("nexus::invalid_value", format!("invalid `{field}`: {}", e.inner()))
                        .at(sources.locate(doc, &pointer(&segments), false))
                        .help("write the value in the form the message names"),
                )
            })
        }
        match doc.kind {
            RegistryKind::Automation => self.automations = Some(de(doc, sources)?),
            RegistryKind::Pipeline => self.pipelines = Some(de(doc, sources)?),
            RegistryKind::Orchestration => self.orchestration = Some(de(doc, sources)?),
            RegistryKind::Monitoring => self.monitoring = Some(de(doc, sources)?),
            RegistryKind::Security => self.security = Some(de(doc, sources)?),
        }
        Ok(())
    }

    fn complete(self) -> Option<Ssot> {
        Some(Ssot {
            automations: self.automations?,
            pipelines: self.pipelines?,
            orchestration: self.orchestration?,
            monitoring: self.monitoring?,
            security: self.security?,
        })
    }
}

/// Unknown kinds, and each known kind's pure validation of its spec. Only registries
/// that passed their schema are looked at, so a problem is not reported twice.
fn check_component_kinds(ctx: &mut Ctx<'_>, catalog: &Catalog, schema_clean: &[RegistryKind]) {
    let mut found = Vec::new();
    for (kind, doc) in ctx.docs.iter().filter(|(k, _)| schema_clean.contains(k)) {
        let Value::Object(sections) = &doc.value else {
            continue;
        };
        for (section, entries) in sections {
            let Some(family) = envelope_family(*kind, section) else {
                continue;
            };
            let Value::Object(entries) = entries else {
                continue;
            };
            for (name, entry) in entries {
                let Some(kind_name) = entry.get("kind").and_then(Value::as_str) else {
                    continue;
                };
                found.push((
                    *kind,
                    family,
                    section.clone(),
                    name.clone(),
                    kind_name.to_owned(),
                    entry.get("spec").cloned(),
                ));
            }
        }
    }
    for (registry, family, section, name, kind_name, spec) in found {
        let kinds = catalog.family(family);
        let base = pointer(&[section.as_str(), name.as_str()]);
        match kinds.iter().find(|k| k.kind == kind_name) {
            None => {
                let available: Vec<&str> = kinds.iter().map(|k| k.kind).collect();
                let list = if available.is_empty() { "none".to_owned() } else { available.join(", ") };
                ctx.push(
                    Diagnostic::error("nexus::unknown_kind", format!("unknown {family} kind `{kind_name}` for `{name}`"))
                        .at(ctx.at(registry, &format!("{base}/kind")))
                        .expected(format!("one of: {list}"))
                        .suggest(&kind_name, available.iter().copied())
                        .help_or(format!(
                            "available {family} kinds: {list}; a plugin providing `{kind_name}` must be in a plugin directory"
                        )),
                );
            }
            Some(k) => {
                let spec = spec.unwrap_or_else(|| Value::Object(Default::default()));
                for issue in k.validate(&spec) {
                    let mut segments = vec![section.clone(), name.clone(), "spec".to_owned()];
                    segments.extend(issue.path.iter().cloned());
                    ctx.push(
                        Diagnostic::error(
                            "nexus::invalid_spec",
                            format!("invalid `{kind_name}` spec for `{name}`: {}", issue.message),
                        )
                        .at(ctx.at(registry, &pointer(&segments))),
                    );
                }
            }
        }
    }
}
