//! The `pagerduty` notifier kind of Nexus: incidents triggered and resolved through the
//! PagerDuty Events API v2, deduplicated by the notification's `dedup_key`.
//!
//! A notification is one `POST` to `events_url` (`https://events.pagerduty.com/v2/enqueue`):
//! a `trigger` with the summary (the title, at most 1024 characters), source, severity
//! (`critical`, `error`, `warning`, `info`), timestamp, component, group, class, the
//! facts, body and log tail in `custom_details`, and the run's link in `links`; or, for
//! a resolving notification, a `resolve` with only the routing key and the dedup key.
//! `202` gives a receipt with the dedup key; `400` is not retryable and quotes
//! PagerDuty's `errors`; `429` and `5xx` are retryable.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use nexus_core::model::{Duration, Severity};
use nexus_core::spec::{check_positive_duration, check_secret_ref, check_url};
use nexus_core::traits::{Notification, Notifier, Receipt};
use nexus_core::{Catalog, ComponentKind, ErrorKind, Result, SpecIssue};
use nexus_notify_webhook::http::{self, HttpChannel, truncate_chars};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map as JsonMap, Value, json};
use sha2::{Digest, Sha256};

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
    /// Time limit of one request (10 s when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// The most characters of `payload.summary` (the API's limit).
const SUMMARY_MAX: usize = 1024;
/// The most characters of a `dedup_key` (the API's limit); longer keys are hashed.
const DEDUP_KEY_MAX: usize = 255;

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
            .field("timeout", &self.timeout)
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
            timeout: Some(Duration(std::time::Duration::from_secs(10))),
        }
    }

    fn validate(spec: &PagerDutySpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        check_secret_ref(&mut issues, &["routing_key"], &spec.routing_key, "pagerduty_routing_key");
        check_url(&mut issues, &["events_url"], &spec.events_url, &["https", "http"], None);
        check_positive_duration(&mut issues, &["timeout"], spec.timeout, "timeout");
        issues
    }

    fn build(spec: PagerDutySpec) -> Result<Arc<dyn Notifier>> {
        Ok(Arc::new(PagerDutyNotifier::new(spec)?))
    }
}

/// Registers the `pagerduty` notifier kind.
pub fn register_pagerduty_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<PagerDutyKind>()
}

/// The `pagerduty` notifier.
pub struct PagerDutyNotifier {
    http: HttpChannel,
    spec: PagerDutySpec,
    source: String,
}

impl fmt::Debug for PagerDutyNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagerDutyNotifier").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl PagerDutyNotifier {
    /// A notifier for `spec`, whose templates are already rendered.
    pub fn new(spec: PagerDutySpec) -> Result<Self> {
        Ok(PagerDutyNotifier {
            http: HttpChannel::new(PAGERDUTY_KIND, spec.timeout.map(Duration::get))?,
            source: spec.source.clone().unwrap_or_else(nexus_core::host_name),
            spec,
        })
    }

    /// The Events API v2 event for `notification`.
    pub fn event(&self, notification: &Notification) -> Value {
        let dedup_key = dedup_key(&notification.dedup_key);
        if notification.resolve {
            return json!({"routing_key": self.spec.routing_key, "event_action": "resolve", "dedup_key": dedup_key});
        }
        let at = notification.event.as_ref().map_or_else(SystemTime::now, |e| e.at);
        let mut payload = JsonMap::new();
        payload.insert("summary".to_owned(), json!(truncate_chars(&notification.title, SUMMARY_MAX)));
        payload.insert("source".to_owned(), json!(self.source));
        payload.insert("severity".to_owned(), json!(severity(notification.severity)));
        payload.insert("timestamp".to_owned(), json!(http::rfc3339(at)));
        for (field, value) in
            [("component", &self.spec.component), ("group", &self.spec.group), ("class", &self.spec.class)]
        {
            if let Some(value) = value {
                payload.insert(field.to_owned(), json!(value));
            }
        }
        let mut details = JsonMap::new();
        if !notification.lead().is_empty() {
            details.insert("body".to_owned(), json!(notification.lead()));
        }
        for (name, value) in &notification.facts {
            details.insert(name.clone(), json!(value));
        }
        if let Some(event) = &notification.event {
            details.insert("event".to_owned(), json!(event.kind));
        }
        if !notification.log_tail.is_empty() {
            details.insert("log_tail".to_owned(), json!(notification.log_tail));
        }
        payload.insert("custom_details".to_owned(), Value::Object(details));
        let mut event = json!({
            "routing_key": self.spec.routing_key,
            "event_action": "trigger",
            "dedup_key": dedup_key,
            "client": "Nexus",
            "payload": payload,
        });
        if let Some(link) = notification.web_link() {
            event["client_url"] = json!(link);
            event["links"] = json!([{"href": link, "text": "Nexus run"}]);
        }
        event
    }
}

#[async_trait]
impl Notifier for PagerDutyNotifier {
    async fn send(&self, notification: &Notification) -> Result<Receipt> {
        let url = &self.spec.events_url;
        let body = serde_json::to_vec(&self.event(notification)).expect("a JSON value serializes");
        let reply = self.http.send(reqwest::Method::POST, url, Default::default(), body).await?;
        let answer: Option<Value> = serde_json::from_str(&reply.body).ok();
        if !reply.is_success() {
            // 400: {"status": "invalid event", "message": "Event object is invalid", "errors": [...]}.
            let detail = answer
                .as_ref()
                .map(|a| {
                    let message = a.get("message").and_then(Value::as_str).unwrap_or_default();
                    let errors: Vec<&str> = a
                        .get("errors")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    if errors.is_empty() { message.to_owned() } else { format!("{message}: {}", errors.join("; ")) }
                })
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| reply.body.clone());
            return Err(self.http.status_error(url, &reply, &detail));
        }
        let returned = answer.as_ref().and_then(|a| a.get("dedup_key")).and_then(Value::as_str);
        if answer.as_ref().and_then(|a| a.get("status")).and_then(Value::as_str) != Some("success") {
            return Err(http::refused(
                PAGERDUTY_KIND,
                url,
                ErrorKind::Unavailable,
                &format!("HTTP {} without `\"status\": \"success\"`: {}", reply.status, reply.body),
                "is `events_url` the Events API v2?",
            ));
        }
        let key = returned.map_or_else(|| dedup_key(&notification.dedup_key), str::to_owned);
        Ok(Receipt::new(None, Some(key)))
    }
}

/// The Events API's severity for `severity`.
fn severity(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "critical",
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "info",
    }
}

/// `key` as the API takes it: unchanged up to 255 characters, else its SHA-256 in hex
/// (the same for every send, so a resolve still finds its incident).
fn dedup_key(key: &str) -> String {
    if key.chars().count() <= DEDUP_KEY_MAX {
        return key.to_owned();
    }
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
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
        nexus_testkit::notifier::builds::<PagerDutyKind>(json!({"routing_key": "R0UT1NGK3Y"}));
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
    fn timeout_must_be_positive() {
        check(json!({"timeout": "0s"}), &["timeout"], "longer than zero");
    }

    #[test]
    fn long_dedup_keys_are_hashed_stably() {
        assert_eq!(dedup_key("a/b"), "a/b");
        let long = "k".repeat(300);
        // SHA-256 in hex, the same in every process (`printf 'k%.0s' $(seq 300) | sha256sum`).
        assert_eq!(dedup_key(&long), "17b16d8ef494060fefa36a6a41567b8c32d213a17e02b7eeae86158cc4495461");
    }

    #[test]
    fn debug_never_shows_the_routing_key() {
        let mut spec = PagerDutyKind::example();
        spec.routing_key = "R0UT1NGK3Y".to_owned();
        let shown = assert_debug_hides(&spec, &["R0UT1NGK3Y"]);
        assert!(shown.contains("routing_key: \"***\""), "{shown}");
    }
}
