//! JSON Schema validation of a registry, with errors turned into diagnostics that point
//! at the YAML source and name what was expected.

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;

use crate::diag::Diagnostic;
use crate::load::{RegistryDoc, Sources};
use crate::model::common::DURATION_PATTERN;
use crate::yaml::escape_segment;

/// Regular expressions of the schemas' `pattern`s, compiled once per process: the five
/// registry schemas share some (every duration field has the same one).
static PATTERNS: std::sync::LazyLock<jsonschema::PatternCache> = std::sync::LazyLock::new(Default::default);

/// Validates `doc` against `schema`; every violation becomes a diagnostic.
pub(crate) fn check(doc: &RegistryDoc, schema: &Value, sources: &Sources) -> Vec<Diagnostic> {
    let validator = match jsonschema::draft202012::options().with_pattern_cache(PATTERNS.clone()).build(schema) {
        Ok(v) => v,
        Err(e) => {
            return vec![Diagnostic::error(
                "nexus::internal",
                format!("the {} schema does not compile: {e}", doc.kind),
            )];
        }
    };
    let mut out = Vec::new();
    for error in validator.iter_errors(&doc.value) {
        let instance_path = error.instance_path().as_str().to_owned();
        let schema_path = error.schema_path().as_str().to_owned();
        let here = sources.locate(doc, &instance_path, false);
        let found = describe(error.instance());
        let d = match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let allowed = allowed_fields(schema, &schema_path);
                for name in unexpected {
                    let child = format!("{instance_path}/{}", escape_segment(name));
                    let mut d = Diagnostic::error("nexus::unknown_field", format!("unknown field `{name}`"))
                        .at(sources.locate(doc, &child, true))
                        .expected(if allowed.is_empty() {
                            "no field here".to_owned()
                        } else {
                            format!("one of: {}", allowed.join(", "))
                        });
                    d = d.suggest(name, allowed.iter().map(String::as_str));
                    if d.help.is_none() {
                        d = d.help("remove it, or check the field names in docs/registries.md");
                    }
                    out.push(d);
                }
                continue;
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let description = field_description(schema, &schema_path, name);
                let mut d = Diagnostic::error("nexus::missing_field", format!("missing required field `{name}`"))
                    .at(sources.locate(doc, &instance_path, true))
                    .expected(format!("a field `{name}` here"));
                if let Some(description) = description {
                    d = d.help(format!("`{name}`: {description}"));
                }
                d
            }
            ValidationErrorKind::Type { kind } => {
                let expected = match kind {
                    TypeKind::Single(t) => type_name(&t.to_string()),
                    TypeKind::Multiple(ts) => {
                        ts.iter().map(|t| type_name(&t.to_string())).collect::<Vec<_>>().join(" or ")
                    }
                };
                // A quoted number or boolean is text: say so, or "found `1`" puzzles.
                let found = match error.instance().as_ref() {
                    Value::String(text) => format!("the text \"{text}\""),
                    _ => found,
                };
                Diagnostic::error("nexus::type", format!("expected {expected}, found {found}"))
                    .at(here)
                    .expected(expected)
            }
            ValidationErrorKind::Enum { options } => {
                let names: Vec<String> =
                    options.as_array().map(|a| a.iter().map(value_name).collect()).unwrap_or_default();
                not_allowed(error.instance(), &found, &names).at(here)
            }
            // schemars writes an enum whose variants are documented as `oneOf` consts.
            ValidationErrorKind::OneOfNotValid { .. } if const_options(schema, &schema_path).is_some() => {
                let names = const_options(schema, &schema_path).unwrap_or_default();
                not_allowed(error.instance(), &found, &names).at(here)
            }
            ValidationErrorKind::Constant { expected_value } if instance_path == "/version" => {
                Diagnostic::error("nexus::version", format!("unsupported registry version {found}"))
                    .at(here)
                    .expected(format!("version {expected_value}"))
                    .help("this nexus reads version 1 registries; set `version: 1`")
            }
            ValidationErrorKind::Pattern { pattern } if pattern == DURATION_PATTERN => {
                Diagnostic::error("nexus::duration", format!("invalid duration {found}"))
                    .at(here)
                    .expected("a number and a unit: ms, s, m, h, d or w")
                    .help("write durations like `30s`, `5m`, `1h30m` or `250ms`")
            }
            ValidationErrorKind::Pattern { pattern } => {
                Diagnostic::error("nexus::invalid_value", format!("{found} has the wrong form"))
                    .at(here)
                    .expected(format!("a value matching `{pattern}`"))
            }
            _ => Diagnostic::error("nexus::invalid_value", error.to_string()).at(here),
        };
        out.push(d);
    }
    out
}

fn value_name(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn not_allowed(instance: &Value, found: &str, names: &[String]) -> Diagnostic {
    let given = instance.as_str().unwrap_or_default();
    Diagnostic::error("nexus::invalid_value", format!("{found} is not an allowed value"))
        .expected(format!("one of: {}", names.join(", ")))
        .suggest(given, names.iter().map(String::as_str))
}

/// The values of a `oneOf` whose branches are all `const` (a documented enum).
fn const_options(schema: &Value, schema_path: &str) -> Option<Vec<String>> {
    let branches = schema.pointer(schema_path)?.as_array()?;
    branches.iter().map(|b| b.get("const").map(value_name)).collect()
}

/// The field names allowed by the object schema whose `additionalProperties` refused one.
fn allowed_fields(schema: &Value, schema_path: &str) -> Vec<String> {
    let parent = schema_path.rsplit_once('/').map_or("", |(p, _)| p);
    schema
        .pointer(parent)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|props| props.keys().cloned().collect())
        .unwrap_or_default()
}

/// The description of a required field, to say what it is for.
fn field_description(schema: &Value, schema_path: &str, name: &str) -> Option<String> {
    let parent = schema_path.rsplit_once('/').map_or("", |(p, _)| p);
    let text = schema.pointer(parent)?.get("properties")?.get(name)?.get("description")?.as_str()?;
    Some(text.lines().next().unwrap_or(text).to_owned())
}

fn type_name(t: &str) -> String {
    match t {
        "object" => "a mapping".to_owned(),
        "array" => "a list".to_owned(),
        "string" => "a string".to_owned(),
        "integer" => "an integer".to_owned(),
        "number" => "a number".to_owned(),
        "boolean" => "true or false".to_owned(),
        "null" => "nothing".to_owned(),
        other => other.to_owned(),
    }
}

/// A short description of a value, for messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("a string `{}…`", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("`{s}`"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}
