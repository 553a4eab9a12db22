//! The `pagerduty` notifier kind of Nexus: incidents triggered and resolved through the
//! PagerDuty Events API v2, deduplicated by the notification's `dedup_key`.
//!
//! This crate holds the kind's spec, its pure validation and its registration; the
//! client comes in a later issue, so [`PagerDutyKind::build`] returns an `Unsupported`
//! error.

use std::fmt;
use std::sync::Arc;

use nexus_core::spec::{check_secret_ref, check_url};
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
        check_secret_ref(&mut issues, &["routing_key"], &spec.routing_key, "pagerduty_routing_key");
        check_url(&mut issues, &["events_url"], &spec.events_url, &["https", "http"], None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) -> SpecIssue {
        assert_single_issue(&descriptor::<PagerDutyKind>(), &example_with::<PagerDutyKind>(changes), path, needle)
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<PagerDutyKind>();
        nexus_testkit::schema_fields_are_documented::<PagerDutyKind>();
        nexus_testkit::unknown_field_is_refused::<PagerDutyKind>("severity");
        nexus_testkit::build_is_unsupported::<PagerDutyKind>();
        nexus_testkit::registers_once::<PagerDutyKind>(register_pagerduty_notifier);
    }

    #[test]
    fn a_routing_key_alone_is_enough() {
        let spec: PagerDutySpec =
            serde_json::from_value(json!({"routing_key": "{{ secrets.pagerduty_routing_key }}"})).unwrap();
        assert_eq!(spec.events_url, DEFAULT_EVENTS_URL);
        assert!(PagerDutyKind::validate(&spec).is_empty());
    }

    #[test]
    fn routing_key_must_be_a_secret_reference() {
        let issue = check(json!({"routing_key": "R0UT1NGK3Y"}), &["routing_key"], "{{ secrets.");
        assert!(!issue.message.contains("R0UT1NGK3Y"), "{issue:#?}");
    }

    #[test]
    fn events_url_is_an_http_url() {
        check(json!({"events_url": "events.pagerduty.com/v2/enqueue"}), &["events_url"], "`https://`");
        check(json!({"events_url": "https://u:p@events.test/v2"}), &["events_url"], "credentials");
        let local = example_with::<PagerDutyKind>(json!({"events_url": "http://127.0.0.1:8080/v2"}));
        assert_valid(&descriptor::<PagerDutyKind>(), &local);
    }

    #[test]
    fn debug_never_shows_the_routing_key() {
        let mut spec = PagerDutyKind::example();
        spec.routing_key = "R0UT1NGK3Y".to_owned();
        let shown = assert_debug_hides(&spec, &["R0UT1NGK3Y"]);
        assert!(shown.contains("routing_key: \"***\""), "{shown}");
    }
}
