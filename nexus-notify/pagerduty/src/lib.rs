//! The `pagerduty` notifier kind of Nexus: incidents triggered and resolved through the
//! PagerDuty Events API v2, deduplicated by the notification's `dedup_key`.
//!
//! This crate holds the kind's spec, its pure validation and its registration; the
//! client comes in a later issue, so [`PagerDutyKind::build`] returns an `Unsupported`
//! error.

use std::fmt;
use std::sync::Arc;

use nexus_core::traits::Notifier;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const PAGERDUTY_KIND: &str = "pagerduty";

/// The default Events API v2 endpoint.
pub const DEFAULT_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// The settings of a `pagerduty` channel.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PagerDutySpec {
    /// Integration key of the PagerDuty service (Events API v2), as a reference such as
    /// `{{ secrets.pagerduty_routing_key }}` (never a literal).
    #[schemars(length(min = 1))]
    pub routing_key: String,
    /// Events API v2 endpoint; change it for the EU service region
    /// (`https://events.eu.pagerduty.com/v2/enqueue`) or a test double.
    #[serde(default = "default_events_url")]
    #[schemars(length(min = 1))]
    pub events_url: String,
    /// `payload.source` of the events: the system affected; the host running Nexus
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub source: Option<String>,
    /// `payload.component`: the part of `source` affected, such as `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub component: Option<String>,
    /// `payload.group`: a logical grouping of components, such as `platform-prod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub group: Option<String>,
    /// `payload.class`: the class or type of the event, such as `deployment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub class: Option<String>,
}

fn default_events_url() -> String {
    DEFAULT_EVENTS_URL.to_owned()
}

impl fmt::Debug for PagerDutySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagerDutySpec")
            .field("routing_key", &"***")
            .field("events_url", &self.events_url)
            .field("source", &self.source)
            .field("component", &self.component)
            .field("group", &self.group)
            .field("class", &self.class)
            .finish()
    }
}

/// The `pagerduty` notifier kind.
pub struct PagerDutyKind;

impl ComponentKind for PagerDutyKind {
    type Trait = dyn Notifier;
    type Spec = PagerDutySpec;
    const KIND: &'static str = PAGERDUTY_KIND;
    const DESCRIPTION: &'static str = "PagerDuty Events API v2: trigger and resolve incidents by dedup key.";

    fn example() -> PagerDutySpec {
        PagerDutySpec {
            routing_key: "{{ secrets.pagerduty_routing_key }}".to_owned(),
            events_url: DEFAULT_EVENTS_URL.to_owned(),
            source: Some("nexus".to_owned()),
            component: Some("api".to_owned()),
            group: Some("platform".to_owned()),
            class: Some("deployment".to_owned()),
        }
    }

    fn validate(spec: &PagerDutySpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        check_secret_ref(&mut issues, &["routing_key"], &spec.routing_key);
        check_url(&mut issues, &["events_url"], &spec.events_url, &["https", "http"]);
        issues
    }

    fn build(_spec: PagerDutySpec) -> Result<Arc<dyn Notifier>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the pagerduty notifier's implementation is not built yet; its spec is validated",
        )
        .with_operation("notifier.build"))
    }
}

/// Registers the `pagerduty` notifier kind.
pub fn register_pagerduty_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<PagerDutyKind>()
}

/// Whether `value` holds a template, whose rendered form cannot be checked yet.
fn is_template(value: &str) -> bool {
    value.contains("{{")
}

/// Checks that `value` is an absolute URL with one of `schemes`, a host, and no
/// credentials. A template is checked for credentials only.
fn check_url(issues: &mut Vec<SpecIssue>, path: &[&str], value: &str, schemes: &[&str]) {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        issues.push(SpecIssue::new(
            path,
            "the URL must not carry credentials (`user:password@`): they would show in logs",
        ));
        return;
    }
    if is_template(value) {
        return;
    }
    let expected = schemes.iter().map(|s| format!("`{s}://`")).collect::<Vec<_>>().join(" or ");
    match value.split_once("://") {
        Some((scheme, _)) if schemes.contains(&scheme) => {}
        _ => {
            issues.push(SpecIssue::new(path, format!("`{value}` is not a URL starting with {expected}")));
            return;
        }
    }
    if authority.is_empty() || value.contains(char::is_whitespace) {
        issues.push(SpecIssue::new(path, format!("`{value}` must name a host and contain no spaces")));
    }
}

/// Checks that a credential is a `{{ secrets.* }}` reference, never a literal. The
/// message never repeats the value.
fn check_secret_ref(issues: &mut Vec<SpecIssue>, path: &[&str], value: &str) {
    if !(is_template(value) && value.contains("secrets.")) {
        issues.push(SpecIssue::new(
            path,
            "write the credential as a reference such as `{{ secrets.pagerduty_routing_key }}` and declare it in \
             security_registry.yaml; a literal value would sit in the file in clear",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_core::KindDescriptor;
    use serde_json::{Value, json};

    fn descriptor() -> KindDescriptor<dyn Notifier> {
        KindDescriptor::of::<PagerDutyKind>()
    }

    /// The example with `changes` applied: each key is set, or removed when `null`.
    fn example_with(changes: Value) -> Value {
        let mut spec = serde_json::to_value(PagerDutyKind::example()).unwrap();
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                spec.as_object_mut().unwrap().remove(key);
            } else {
                spec[key] = value.clone();
            }
        }
        spec
    }

    /// Asserts that validating `spec` gives exactly one issue, at `path`, saying `needle`.
    fn check(spec: Value, path: &[&str], needle: &str) {
        let issues = descriptor().validate(&spec);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].path, path, "{issues:#?}");
        assert!(issues[0].message.contains(needle), "{issues:#?}");
    }

    #[test]
    fn example_is_valid_against_schema_and_validate() {
        let d = descriptor();
        assert!(d.validate(&d.example).is_empty(), "{:#?}", d.validate(&d.example));
        let schema = jsonschema::validator_for(&d.spec_schema).unwrap();
        let errors: Vec<_> = schema.iter_errors(&d.example).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    #[test]
    fn a_routing_key_alone_is_enough() {
        let spec: PagerDutySpec =
            serde_json::from_value(json!({"routing_key": "{{ secrets.pagerduty_routing_key }}"})).unwrap();
        assert_eq!(spec.events_url, DEFAULT_EVENTS_URL);
        assert!(PagerDutyKind::validate(&spec).is_empty());
    }

    #[test]
    fn every_field_is_documented_in_the_schema() {
        let schema = descriptor().spec_schema;
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "`{name}` has no description");
        }
    }

    #[test]
    fn routing_key_must_be_a_secret_reference() {
        check(example_with(json!({"routing_key": "R0UT1NGK3Y"})), &["routing_key"], "{{ secrets.");
        let issues = descriptor().validate(&example_with(json!({"routing_key": "R0UT1NGK3Y"})));
        assert!(!issues[0].message.contains("R0UT1NGK3Y"), "{issues:#?}");
    }

    #[test]
    fn events_url_is_an_http_url() {
        check(example_with(json!({"events_url": "events.pagerduty.com/v2/enqueue"})), &["events_url"], "`https://`");
        check(example_with(json!({"events_url": "https://u:p@events.test/v2"})), &["events_url"], "credentials");
        assert!(descriptor().validate(&example_with(json!({"events_url": "http://127.0.0.1:8080/v2"}))).is_empty());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let issues = descriptor().validate(&example_with(json!({"severity": "critical"})));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(issues[0].message.contains("unknown field `severity`"), "{issues:#?}");
        let schema = jsonschema::validator_for(&descriptor().spec_schema).unwrap();
        assert!(!schema.is_valid(&example_with(json!({"severity": "critical"}))));
    }

    #[test]
    fn debug_never_shows_the_routing_key() {
        let mut spec = PagerDutyKind::example();
        spec.routing_key = "R0UT1NGK3Y".to_owned();
        let shown = format!("{spec:?}");
        assert!(!shown.contains("R0UT1NGK3Y"), "{shown}");
        assert!(shown.contains("routing_key: \"***\""), "{shown}");
    }

    #[test]
    fn build_says_the_implementation_is_not_there_yet() {
        let err = descriptor().build(descriptor().example).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert_eq!(err.operation(), "notifier.build");
    }

    #[test]
    fn registers_as_a_notifier_kind() {
        let mut catalog = Catalog::new();
        register_pagerduty_notifier(&mut catalog).unwrap();
        assert_eq!(catalog.notifiers.get(PAGERDUTY_KIND).unwrap().kind, "pagerduty");
    }
}
