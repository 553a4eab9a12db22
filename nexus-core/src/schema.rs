//! JSON Schemas of the five registries, generated from the model types.
//!
//! Subschemas are inlined (no `$ref`), so that a schema error's keyword location is a
//! plain JSON pointer into the schema: validation uses it to list the fields allowed
//! where an unknown one was written. The spec schema of every kind in the catalog is
//! attached to its envelope (`if kind == X then spec: <X's schema>`), so built-in and
//! plugin kinds are checked the same way, and editors can complete specs.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::catalog::{Catalog, Family};
use crate::load::RegistryKind;
use crate::model::{AutomationRegistry, MonitoringRegistry, OrchestrationRegistry, PipelineRegistry, SecurityRegistry};

/// Where, in each registry, entries are `{ kind, spec }` envelopes of a family.
fn envelopes(kind: RegistryKind) -> &'static [(&'static str, Family)] {
    match kind {
        RegistryKind::Orchestration => &[("runners", Family::Runner)],
        RegistryKind::Monitoring => {
            &[("services", Family::Service), ("monitors", Family::Monitor), ("channels", Family::Notifier)]
        }
        _ => &[],
    }
}

/// The families whose envelopes live in `section` of `kind`'s registry, if any.
pub fn envelope_family(kind: RegistryKind, section: &str) -> Option<Family> {
    envelopes(kind).iter().find(|(s, _)| *s == section).map(|(_, f)| *f)
}

/// Generates the schema of `T` with every subschema inlined.
pub fn inline_schema_for<T: JsonSchema>() -> Value {
    let schema = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value();
    strip_null(schema)
}

/// Removes the `null` alternative schemars adds for `Option` fields: a field left out
/// is `None`, and an explicit `null` is refused with a plain type error instead of an
/// `anyOf` error that hides what was really wrong.
fn strip_null(node: Value) -> Value {
    match node {
        Value::Object(mut map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(branches)) = map.get("anyOf") {
                let rest: Vec<&Value> = branches.iter().filter(|b| b.get("type") != Some(&json!("null"))).collect();
                if rest.len() == 1
                    && branches.len() == 2
                    && let Value::Object(inner) = rest[0].clone()
                {
                    map.remove("anyOf");
                    for (k, v) in inner {
                        map.entry(k).or_insert(v);
                    }
                }
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, strip_null(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(strip_null).collect()),
        other => other,
    }
}

/// The JSON Schema of one registry, with the spec schemas of the catalog's kinds.
pub fn registry_schema(kind: RegistryKind, catalog: &Catalog) -> Value {
    let mut schema = match kind {
        RegistryKind::Automation => inline_schema_for::<AutomationRegistry>(),
        RegistryKind::Pipeline => inline_schema_for::<PipelineRegistry>(),
        RegistryKind::Orchestration => inline_schema_for::<OrchestrationRegistry>(),
        RegistryKind::Monitoring => inline_schema_for::<MonitoringRegistry>(),
        RegistryKind::Security => inline_schema_for::<SecurityRegistry>(),
    };
    schema["$id"] = json!(format!("https://nexus.invalid/schemas/{}", kind.schema_file_name()));
    schema["title"] = json!(kind.file_name());
    schema["properties"]["version"]["const"] = json!(1);
    for (section, family) in envelopes(kind) {
        let kinds = catalog.family(*family);
        let entry = &mut schema["properties"][*section]["additionalProperties"];
        let names: Vec<&str> = kinds.iter().map(|k| k.kind).collect();
        if let Some(description) = entry["properties"]["kind"]["description"].as_str() {
            let text = format!("{description} Available: {}.", names.join(", "));
            entry["properties"]["kind"]["description"] = json!(text);
        }
        entry["properties"]["kind"]["examples"] = json!(names);
        let branches: Vec<Value> = kinds
            .iter()
            .map(|k| {
                json!({
                    "if": { "properties": { "kind": { "const": k.kind } }, "required": ["kind"] },
                    "then": { "properties": { "spec": without_meta(inline_refs(k.spec_schema.clone())) } }
                })
            })
            .collect();
        if !branches.is_empty() {
            entry["allOf"] = Value::Array(branches);
        }
    }
    schema
}

/// Drops the keywords that only make sense at a schema's root.
fn without_meta(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.remove("$schema");
        map.remove("$id");
        map.remove("$defs");
        map.remove("definitions");
    }
    schema
}

/// Replaces local `$ref`s (`#/$defs/X`) by the definitions they point at, so a kind's
/// schema can be embedded in a registry schema. Recursive definitions are left as an
/// open schema (`{}`) past the first level.
pub fn inline_refs(schema: Value) -> Value {
    let defs = schema.get("$defs").or_else(|| schema.get("definitions")).cloned().unwrap_or(Value::Null);
    fn walk(node: Value, defs: &Value, depth: usize) -> Value {
        match node {
            Value::Object(mut map) => {
                if let Some(Value::String(reference)) = map.get("$ref") {
                    let name = reference.rsplit('/').next().unwrap_or_default();
                    if let Some(target) = defs.get(name).filter(|_| depth < 16) {
                        map.remove("$ref");
                        let resolved = walk(target.clone(), defs, depth + 1);
                        if let Value::Object(resolved) = resolved {
                            for (k, v) in resolved {
                                map.entry(k).or_insert(v);
                            }
                        }
                        return Value::Object(map);
                    }
                    map.remove("$ref");
                }
                Value::Object(map.into_iter().map(|(k, v)| (k, walk(v, defs, depth))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(|v| walk(v, defs, depth)).collect()),
            other => other,
        }
    }
    walk(schema, &defs, 0)
}

/// The schemas of the five registries, as pretty-printed files: `(file name, contents)`.
pub fn schema_files(catalog: &Catalog) -> Vec<(String, String)> {
    RegistryKind::ALL
        .iter()
        .map(|kind| {
            let schema = registry_schema(*kind, catalog);
            let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
            text.push('\n');
            (kind.schema_file_name(), text)
        })
        .collect()
}
