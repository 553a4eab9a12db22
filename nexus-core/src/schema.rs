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
    registry_schema_with(kind, catalog, |_, _| true)
}

/// The schema that checks `doc`, a document of `kind`'s registry: the same verdicts as
/// [`registry_schema`], with the spec branches of only the kinds `doc` uses (a branch
/// `if kind == X` can fire only on an entry of kind X). A small configuration then does
/// not pay for compiling every kind's spec schema at each start.
pub fn registry_schema_for(kind: RegistryKind, catalog: &Catalog, doc: &Value) -> Value {
    registry_schema_with(kind, catalog, |section, name| {
        doc.get(section).and_then(Value::as_object).is_some_and(|entries| {
            entries.values().any(|entry| entry.get("kind").and_then(Value::as_str) == Some(name))
        })
    })
}

fn registry_schema_with(kind: RegistryKind, catalog: &Catalog, used: impl Fn(&str, &str) -> bool) -> Value {
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
            .filter(|k| used(section, k.kind))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::Result;
    use crate::catalog::tests::Echo;
    use crate::catalog::{ComponentKind, SpecIssue};
    use crate::traits::Runner;

    macro_rules! test_kind {
        ($kind:ident, $spec:ident, $name:literal, $field:ident) => {
            #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
            #[serde(deny_unknown_fields)]
            struct $spec {
                $field: u16,
            }
            struct $kind;
            impl ComponentKind for $kind {
                type Trait = dyn Runner;
                type Spec = $spec;
                const KIND: &'static str = $name;
                const DESCRIPTION: &'static str = "test";
                fn example() -> $spec {
                    $spec { $field: 1 }
                }
                fn validate(_: &$spec) -> Vec<SpecIssue> {
                    Vec::new()
                }
                fn build(_: $spec) -> Result<Arc<dyn Runner>> {
                    Ok(Arc::new(Echo))
                }
            }
        };
    }
    test_kind!(AKind, ASpec, "alpha", port);
    test_kind!(BKind, BSpec, "beta", size);

    /// What a schema says about a document: (where, what) of every error.
    fn verdicts(schema: &Value, doc: &Value) -> Vec<(String, String)> {
        let validator = jsonschema::draft202012::new(schema).expect("the schema compiles");
        let mut out: Vec<(String, String)> =
            validator.iter_errors(doc).map(|e| (e.instance_path().to_string(), e.to_string())).collect();
        out.sort();
        out
    }

    #[test]
    fn the_schema_for_a_document_keeps_only_its_kinds_and_the_same_verdicts() {
        let mut catalog = Catalog::new();
        catalog.runners.register_kind::<AKind>().unwrap();
        catalog.runners.register_kind::<BKind>().unwrap();
        let kind = RegistryKind::Orchestration;
        let full = registry_schema(kind, &catalog);
        let docs = [
            json!({"version": 1, "runners": {"a": {"kind": "alpha", "spec": {"port": 8080}}}}),
            json!({"version": 1, "runners": {"a": {"kind": "alpha", "spec": {"port": "x", "extra": 1}}}}),
            json!({"version": 1, "runners": {"a": {"kind": "alpha", "spec": {"size": 1}},
                                              "b": {"kind": "beta", "spec": {"port": 70000}}}}),
            json!({"version": 1, "runners": {"a": {"kind": "gamma", "spec": {"anything": true}}}}),
            json!({"version": 1, "runners": {"a": {"kind": 7, "spec": {}}}}),
        ];
        for doc in &docs {
            let pruned = registry_schema_for(kind, &catalog, doc);
            assert_eq!(verdicts(&pruned, doc), verdicts(&full, doc), "{doc}");
        }
        let branches = |s: &Value| s["properties"]["runners"]["additionalProperties"]["allOf"].as_array().map(Vec::len);
        assert_eq!(branches(&full), Some(2));
        assert_eq!(branches(&registry_schema_for(kind, &catalog, &docs[0])), Some(1));
        assert_eq!(branches(&registry_schema_for(kind, &catalog, &docs[3])), None);
        assert!(!verdicts(&full, &docs[1]).is_empty(), "the bad spec is refused");
    }
}
