//! Conformance checks that every Nexus component kind must pass, written once and run by
//! each kind crate's own tests (this crate is their dev-dependency).
//!
//! One `pub fn` per behaviour, generic over the kind `K:` [`ComponentKind`], in the
//! manner of `object_store`'s `integration.rs`: a kind's test calls every check that
//! applies to it, so a check added here tightens every kind at once. A failing check
//! panics with a message that names the kind, the behaviour and the fix.
//!
//! What every kind's spec and registration must do:
//! - [`example_is_valid`]: the example passes the spec schema (`jsonschema`) and the
//!   kind's pure `validate`, and reads back as the same spec;
//! - [`schema_fields_are_documented`]: every field, nested ones included, has a
//!   description in the schema (a doc comment in the Rust type);
//! - [`unknown_field_is_refused`]: by both the schema and `validate`
//!   (`#[serde(deny_unknown_fields)]`);
//! - [`registers_once`]: the kind's `register_*` function adds exactly this kind, and a
//!   second registration is refused as a conflict;
//! - [`build_is_unsupported`]: for kinds whose implementation is not written yet.
//!
//! Helpers for a kind's own tests of its rules: [`example_with`] (the example with some
//! fields changed or removed), [`assert_single_issue`], [`assert_valid`] and
//! [`assert_debug_hides`]. The pure checks those rules are made of live in
//! [`nexus_core::spec`].
//!
//! The [`runner`] module holds the runner behaviour suite: one `pub async fn` per
//! behaviour of the `Runner` trait (lines streamed in order and live, exit status
//! reported faithfully, the whole process tree stopped on timeout and on cancellation,
//! secrets injected and redacted, outputs passed, bounded memory, isolation), which
//! every runner kind's tests run against its own runner, as `object_store`'s backends
//! do with its integration suite.

pub mod http;
pub mod notifier;
pub mod runner;

pub use runner::{MissingProgram, RunnerTarget, SharedDir};

use std::fmt;

use nexus_core::catalog::Kinds;
use nexus_core::traits::{MonitorAdapter, Notifier, Runner, ServiceAdapter};
use nexus_core::{Catalog, ComponentKind, ErrorKind, Family, KindDescriptor, Result, SpecIssue};
use serde_json::Value;

/// A family of components, as the trait object its kinds build (`dyn Runner`…): which
/// [`Family`] it is and where its kinds live in a [`Catalog`].
pub trait KindFamily: 'static {
    /// The family.
    const FAMILY: Family;
    /// The catalog's kinds of this family.
    fn kinds(catalog: &Catalog) -> &Kinds<Self>;
}

impl KindFamily for dyn Runner {
    const FAMILY: Family = Family::Runner;
    fn kinds(catalog: &Catalog) -> &Kinds<Self> {
        &catalog.runners
    }
}

impl KindFamily for dyn ServiceAdapter {
    const FAMILY: Family = Family::Service;
    fn kinds(catalog: &Catalog) -> &Kinds<Self> {
        &catalog.services
    }
}

impl KindFamily for dyn MonitorAdapter {
    const FAMILY: Family = Family::Monitor;
    fn kinds(catalog: &Catalog) -> &Kinds<Self> {
        &catalog.monitors
    }
}

impl KindFamily for dyn Notifier {
    const FAMILY: Family = Family::Notifier;
    fn kinds(catalog: &Catalog) -> &Kinds<Self> {
        &catalog.notifiers
    }
}

/// The catalog descriptor of kind `K`, as a facade or plugin would register it.
pub fn descriptor<K: ComponentKind<Trait: KindFamily>>() -> KindDescriptor<K::Trait> {
    KindDescriptor::of::<K>()
}

/// How failure messages name kind `K`: ``service kind `http` ``.
fn who<K: ComponentKind<Trait: KindFamily>>() -> String {
    format!("{} kind `{}`", K::Trait::FAMILY, K::KIND)
}

/// The compiled spec schema of `descriptor`; panics if it does not compile.
fn compiled_schema<T: ?Sized>(descriptor: &KindDescriptor<T>) -> jsonschema::Validator {
    jsonschema::validator_for(&descriptor.spec_schema)
        .unwrap_or_else(|e| panic!("kind `{}`: its spec schema does not compile: {e}", descriptor.kind))
}

/// The example is a valid spec: it passes the spec schema (as `nexus validate` checks it
/// with `jsonschema`) and the kind's pure `validate`, it reads back as the same spec,
/// and the descriptor lists the kind's actions.
pub fn example_is_valid<K: ComponentKind<Trait: KindFamily>>() {
    let who = who::<K>();
    let d = descriptor::<K>();
    let errors: Vec<String> = compiled_schema(&d).iter_errors(&d.example).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{who}: the example does not match the spec schema: {errors:#?}");
    let issues = d.validate(&d.example);
    assert!(issues.is_empty(), "{who}: `validate` refuses the example: {issues:#?}");
    let spec: K::Spec = serde_json::from_value(d.example.clone())
        .unwrap_or_else(|e| panic!("{who}: the example does not read back as a spec: {e}"));
    let again = serde_json::to_value(spec).unwrap_or_else(|e| panic!("{who}: the spec does not serialize: {e}"));
    assert_eq!(again, d.example, "{who}: the example changes when read back and written again");
    assert_eq!(d.actions, K::ACTIONS, "{who}: the descriptor does not list the kind's actions");
}

/// Every field of the spec has a description in its schema (from the field's doc
/// comment), nested fields included, so the schema documents the spec for editors and
/// `nexus schema`.
pub fn schema_fields_are_documented<K: ComponentKind<Trait: KindFamily>>() {
    let who = who::<K>();
    let schema = descriptor::<K>().spec_schema;
    assert!(
        schema.get("properties").is_some_and(Value::is_object),
        "{who}: the spec schema has no `properties`; a spec is a struct with named fields: {schema:#}"
    );
    let mut missing = Vec::new();
    undocumented(&schema, "", &mut missing);
    assert!(missing.is_empty(), "{who}: these spec fields have no description (a doc comment): {missing:?}");
}

/// Collects into `missing` the paths of the properties below `schema` without a
/// description.
fn undocumented(schema: &Value, at: &str, missing: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("properties", Value::Object(properties)) => {
                        for (name, property) in properties {
                            let path = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
                            let described = property
                                .get("description")
                                .and_then(Value::as_str)
                                .is_some_and(|d| !d.trim().is_empty());
                            if !described {
                                missing.push(path.clone());
                            }
                            undocumented(property, &path, missing);
                        }
                    }
                    ("default" | "examples" | "const" | "enum", _) => {}
                    _ => undocumented(value, at, missing),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| undocumented(item, at, missing)),
        _ => {}
    }
}

/// A field the spec does not have (`field`, a plausible mistake such as `verify_tls`
/// for `tls_verify`) is refused both by the spec schema and by `validate`, whose one
/// issue names it.
pub fn unknown_field_is_refused<K: ComponentKind<Trait: KindFamily>>(field: &str) {
    let who = who::<K>();
    let d = descriptor::<K>();
    assert!(
        d.spec_schema["properties"].get(field).is_none(),
        "{who}: `{field}` is one of its fields; give a field it does not have"
    );
    let spec = example_with::<K>(Value::Object([(field.to_owned(), Value::Bool(true))].into_iter().collect()));
    assert!(
        !compiled_schema(&d).is_valid(&spec),
        "{who}: the spec schema accepts the unknown field `{field}`; add `#[serde(deny_unknown_fields)]` to the spec"
    );
    let issues = d.validate(&spec);
    let expected = format!("unknown field `{field}`");
    assert!(
        issues.len() == 1 && issues[0].message.contains(&expected),
        "{who}: `validate` should give one issue saying {expected}: {issues:#?}"
    );
}

/// `build` refuses, as `Unsupported` with the operation `<family>.build`, because the
/// kind's implementation is not written yet: a configuration using it validates but
/// cannot run.
pub fn build_is_unsupported<K: ComponentKind<Trait: KindFamily>>() {
    let who = who::<K>();
    let d = descriptor::<K>();
    let Err(err) = d.build(d.example.clone()) else {
        panic!("{who}: `build` succeeds; run the kind's behaviour tests instead of `build_is_unsupported`");
    };
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{who}: {err}");
    assert_eq!(err.operation(), format!("{}.build", K::Trait::FAMILY), "{who}: {err}");
}

/// `register` (the kind crate's `register_*` function, which its facade calls) adds
/// exactly kind `K` to an empty catalog, under its family, as a built-in kind with its
/// description; registering it a second time is refused as a conflict.
pub fn registers_once<K: ComponentKind<Trait: KindFamily>>(register: impl Fn(&mut Catalog) -> Result<()>) {
    let who = who::<K>();
    let mut catalog = Catalog::new();
    register(&mut catalog).unwrap_or_else(|e| panic!("{who}: registering into an empty catalog fails: {e}"));
    let registered: Vec<String> = [Family::Runner, Family::Service, Family::Monitor, Family::Notifier]
        .into_iter()
        .flat_map(|family| catalog.family(family).into_iter().map(move |view| format!("{family} kind `{}`", view.kind)))
        .collect();
    assert_eq!(registered, std::slice::from_ref(&who), "{who}: `register` should add this kind and nothing else");
    let registered = K::Trait::kinds(&catalog).get(K::KIND).unwrap_or_else(|e| panic!("{who}: {e}"));
    assert!(!K::DESCRIPTION.trim().is_empty(), "{who}: its `DESCRIPTION` is empty");
    assert_eq!(registered.description, K::DESCRIPTION, "{who}: registered with another description");
    assert_eq!(registered.origin, "built-in", "{who}: a statically linked kind is `built-in`");
    assert_eq!(registered.example, descriptor::<K>().example, "{who}: registered with another example");
    let again = register(&mut catalog).err();
    assert_eq!(
        again.as_ref().map(|e| e.kind()),
        Some(ErrorKind::Conflict),
        "{who}: a second registration should be refused as a conflict: {again:?}"
    );
}

/// The JSON form of kind `K`'s example with `changes` applied: each key of the `changes`
/// object is set to its value, or removed when the value is `null`.
pub fn example_with<K: ComponentKind<Trait: KindFamily>>(changes: Value) -> Value {
    let mut spec = descriptor::<K>().example;
    let (Value::Object(fields), Value::Object(changes)) = (&mut spec, changes) else {
        panic!("{}: the example and the changes must both be JSON objects", who::<K>());
    };
    for (key, value) in changes {
        if value.is_null() {
            fields.shift_remove(&key);
        } else {
            fields.insert(key, value);
        }
    }
    spec
}

/// Asserts that `descriptor`'s validation of `spec` gives exactly one issue, at `path`,
/// whose message contains `needle`; returns that issue for further checks.
pub fn assert_single_issue<T: ?Sized + 'static>(
    descriptor: &KindDescriptor<T>,
    spec: &Value,
    path: &[&str],
    needle: &str,
) -> SpecIssue {
    let mut issues = descriptor.validate(spec);
    let kind = &descriptor.kind;
    assert_eq!(issues.len(), 1, "kind `{kind}`: expected one issue at {path:?} saying `{needle}`: {issues:#?}");
    let issue = issues.remove(0);
    assert_eq!(issue.path, path, "kind `{kind}`: the issue is not at {path:?}: {issue:#?}");
    assert!(issue.message.contains(needle), "kind `{kind}`: the issue does not say `{needle}`: {issue:#?}");
    issue
}

/// Asserts that `descriptor`'s validation accepts `spec`.
pub fn assert_valid<T: ?Sized + 'static>(descriptor: &KindDescriptor<T>, spec: &Value) {
    let issues = descriptor.validate(spec);
    assert!(issues.is_empty(), "kind `{}` refuses {spec:#}: {issues:#?}", descriptor.kind);
}

/// Asserts that the `Debug` form of `value` (a spec holding secrets) shows none of
/// `secrets`; returns that form for further checks of what it does show.
pub fn assert_debug_hides(value: &impl fmt::Debug, secrets: &[&str]) -> String {
    let shown = format!("{value:?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "`Debug` shows the secret `{secret}`: {shown}");
    }
    shown
}

#[cfg(test)]
mod tests {
    //! The checks against a conforming kind, and against kinds that each break one rule.

    use std::sync::Arc;

    use nexus_core::{Error, SpecIssue};
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    /// The spec of a conforming kind.
    #[derive(Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct ProbeSpec {
        /// Where to send.
        url: String,
        /// The token, by reference.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Nested settings.
        #[serde(default)]
        nested: Nested,
    }

    /// Nested settings.
    #[derive(Default, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        /// A number.
        #[serde(default)]
        size: u32,
    }

    impl fmt::Debug for ProbeSpec {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ProbeSpec")
                .field("url", &self.url)
                .field("token", &self.token.as_ref().map(|_| "***"))
                .finish()
        }
    }

    fn probe_example() -> ProbeSpec {
        ProbeSpec {
            url: "https://example.com".into(),
            token: Some("{{ secrets.t }}".into()),
            nested: Nested::default(),
        }
    }

    fn probe_validate(spec: &ProbeSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        nexus_core::spec::check_url(&mut issues, &["url"], &spec.url, &["https"], None);
        if let Some(token) = &spec.token {
            nexus_core::spec::check_secret_ref(&mut issues, &["token"], token, "t");
        }
        issues
    }

    fn not_built_yet<T: ?Sized>(operation: &'static str) -> Result<Arc<T>> {
        Err(Error::new(ErrorKind::Unsupported, "not built yet").with_operation(operation))
    }

    struct Probe;
    impl ComponentKind for Probe {
        type Trait = dyn Notifier;
        type Spec = ProbeSpec;
        const KIND: &'static str = "probe";
        const DESCRIPTION: &'static str = "A kind that conforms.";
        const ACTIONS: &'static [&'static str] = &["ping"];
        fn example() -> ProbeSpec {
            probe_example()
        }
        fn validate(spec: &ProbeSpec) -> Vec<SpecIssue> {
            probe_validate(spec)
        }
        fn build(_: ProbeSpec) -> Result<Arc<dyn Notifier>> {
            not_built_yet("notifier.build")
        }
    }

    fn register_probe(catalog: &mut Catalog) -> Result<()> {
        catalog.notifiers.register_kind::<Probe>()
    }

    #[test]
    fn a_conforming_kind_passes_every_check() {
        example_is_valid::<Probe>();
        schema_fields_are_documented::<Probe>();
        unknown_field_is_refused::<Probe>("tokn");
        build_is_unsupported::<Probe>();
        registers_once::<Probe>(register_probe);
    }

    #[test]
    fn example_with_sets_and_removes_fields() {
        let spec = example_with::<Probe>(json!({"url": "http://x", "token": null}));
        assert_eq!(spec, json!({"url": "http://x", "nested": {"size": 0}}));
    }

    #[test]
    fn issue_helpers_check_path_and_message() {
        let d = descriptor::<Probe>();
        let issue =
            assert_single_issue(&d, &example_with::<Probe>(json!({"token": "hunter2"})), &["token"], "in clear");
        assert!(!issue.message.contains("hunter2"));
        assert_valid(&d, &example_with::<Probe>(json!({"token": null})));
        let shown = assert_debug_hides(&ProbeSpec { token: Some("hunter2".into()), ..probe_example() }, &["hunter2"]);
        assert!(shown.contains("token: Some(\"***\")"), "{shown}");
    }

    #[test]
    #[should_panic(expected = "expected one issue at [\"url\"]")]
    fn assert_single_issue_fails_on_a_valid_spec() {
        assert_single_issue(&descriptor::<Probe>(), &descriptor::<Probe>().example, &["url"], "URL");
    }

    #[test]
    #[should_panic(expected = "the issue is not at [\"url\"]")]
    fn assert_single_issue_fails_on_another_path() {
        let spec = example_with::<Probe>(json!({"token": "hunter2"}));
        assert_single_issue(&descriptor::<Probe>(), &spec, &["url"], "in clear");
    }

    #[test]
    #[should_panic(expected = "`Debug` shows the secret `s3cr3t`")]
    fn assert_debug_hides_fails_when_a_secret_shows() {
        assert_debug_hides(&"token s3cr3t", &["s3cr3t"]);
    }

    #[test]
    #[should_panic(expected = "`token` is one of its fields")]
    fn unknown_field_must_really_be_unknown() {
        unknown_field_is_refused::<Probe>("token");
    }

    /// A spec that breaks the rules: no `deny_unknown_fields`, an undocumented nested
    /// field (`nested` itself is described by its type's doc comment).
    #[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
    struct LaxSpec {
        /// Documented.
        #[serde(default)]
        name: String,
        #[serde(default)]
        nested: LaxNested,
    }

    /// Nested, with an undocumented field.
    #[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
    struct LaxNested {
        #[serde(default)]
        size: u32,
    }

    /// A kind whose `validate` refuses its own example, whose `build` fails for another
    /// reason than `Unsupported`, and whose spec breaks the schema rules.
    struct Lax;
    impl ComponentKind for Lax {
        type Trait = dyn Runner;
        type Spec = LaxSpec;
        const KIND: &'static str = "lax";
        const DESCRIPTION: &'static str = "A kind that breaks every rule.";
        fn example() -> LaxSpec {
            LaxSpec::default()
        }
        fn validate(_: &LaxSpec) -> Vec<SpecIssue> {
            vec![SpecIssue::new(&["name"], "always wrong")]
        }
        fn build(_: LaxSpec) -> Result<Arc<dyn Runner>> {
            Err(Error::new(ErrorKind::InvalidConfig, "no").with_operation("runner.build"))
        }
    }

    #[test]
    #[should_panic(expected = "runner kind `lax`: `validate` refuses the example")]
    fn an_example_refused_by_validate_fails() {
        example_is_valid::<Lax>();
    }

    #[test]
    #[should_panic(expected = "these spec fields have no description (a doc comment): [\"nested.size\"]")]
    fn undocumented_fields_fail_nested_ones_too() {
        schema_fields_are_documented::<Lax>();
    }

    #[test]
    #[should_panic(expected = "the spec schema accepts the unknown field `nme`")]
    fn a_spec_without_deny_unknown_fields_fails() {
        unknown_field_is_refused::<Lax>("nme");
    }

    #[test]
    #[should_panic(expected = "runner kind `lax`: ")]
    fn a_build_failing_otherwise_than_unsupported_fails() {
        build_is_unsupported::<Lax>();
    }

    #[test]
    #[should_panic(expected = "should add this kind and nothing else")]
    fn registering_another_kind_too_fails() {
        registers_once::<Probe>(|catalog| {
            register_probe(catalog)?;
            catalog.runners.register_kind::<Lax>()
        });
    }

    #[test]
    #[should_panic(expected = "a second registration should be refused as a conflict")]
    fn registering_under_a_fresh_name_each_time_fails() {
        registers_once::<Probe>(|catalog| {
            if catalog.notifiers.get(Probe::KIND).is_ok() { Ok(()) } else { register_probe(catalog) }
        });
    }
}
