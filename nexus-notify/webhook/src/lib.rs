//! The `webhook` notifier kind of Nexus: notifications sent as JSON to any URL.
//!
//! Each notification is one `POST` (or `PUT`) of a versioned JSON document
//! ([`PAYLOAD_VERSION`], described in `docs/notify/webhook.md`), with the header
//! `X-Nexus-Delivery`: an id that is the same for every attempt of one notification, so
//! the receiver can drop duplicates. With a `signing_secret`, `signature_header` carries
//! `t=<unix seconds>,v1=<hex>`, where `v1` is the HMAC-SHA256, keyed by the secret, of
//! `"{t}.{body}"` (the raw body bytes): the receiver recomputes it to know that the
//! message comes from Nexus, was not altered, and is recent.
//!
//! The [`http`] module is the HTTP client side the `slack` and `pagerduty` notifiers
//! share with this one: one attempt per send, failures classified for the caller's
//! retries (429 and 5xx retryable with `Retry-After`, other 4xx not), errors that name
//! the host only.

pub mod http;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use nexus_core::model::{Duration, Map};
use nexus_core::spec::{
    MaskedValues, check_header_name, check_headers, check_positive_duration, check_secret_ref, check_url,
};
use nexus_core::traits::{Notification, Notifier, Receipt};
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use reqwest::header::{HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use http::redacted_url;

/// The kind's name in `monitoring_registry.yaml`.
pub const WEBHOOK_KIND: &str = "webhook";

/// The header that carries the signature unless `signature_header` says otherwise.
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Nexus-Signature-256";

/// The header that carries the delivery id: the same on every attempt of one
/// notification, different for different notifications.
pub const DELIVERY_HEADER: &str = "X-Nexus-Delivery";

/// The `version` of the JSON document sent; a change that is not a pure addition of
/// fields bumps it.
pub const PAYLOAD_VERSION: u32 = 1;

/// The settings of a `webhook` channel.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// Where notifications are sent: an `http://` or `https://` URL without credentials
    /// (send those in `headers`). Only its host is shown in logs.
    #[schemars(length(min = 1))]
    pub url: String,
    /// The request method.
    #[serde(default)]
    pub method: Method,
    /// Headers sent with every request; values may be `{{ secrets.* }}` templates and
    /// are never shown in logs.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub headers: Map<String>,
    /// Key of the HMAC-SHA256 signature of each request, as a reference such as
    /// `{{ secrets.webhook_signing_key }}` (never a literal); requests are not signed
    /// when absent. The signature covers `"{t}.{body}"`: the Unix time in seconds, a dot
    /// and the raw body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub signing_secret: Option<String>,
    /// Header that carries the signature, as `t=<unix seconds>,v1=<hex HMAC-SHA256 of
    /// "{t}.{body}">`.
    #[serde(default = "default_signature_header")]
    #[schemars(length(min = 1))]
    pub signature_header: String,
    /// Time limit of one request (10 s when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// The method of a webhook request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// `POST`.
    #[default]
    Post,
    /// `PUT`.
    Put,
}

fn default_signature_header() -> String {
    DEFAULT_SIGNATURE_HEADER.to_owned()
}

impl fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("url", &redacted_url(&self.url))
            .field("method", &self.method)
            .field("headers", &MaskedValues(&self.headers))
            .field("signing_secret", &self.signing_secret.as_ref().map(|_| "***"))
            .field("signature_header", &self.signature_header)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The `webhook` notifier kind.
pub struct WebhookKind;

impl ComponentKind for WebhookKind {
    type Trait = dyn Notifier;
    type Spec = WebhookSpec;
    const KIND: &'static str = WEBHOOK_KIND;
    const DESCRIPTION: &'static str = "A JSON request to any URL, optionally signed with HMAC-SHA256.";

    fn example() -> WebhookSpec {
        WebhookSpec {
            url: "https://hooks.example.com/nexus/events".to_owned(),
            method: Method::Post,
            headers: Map::from_iter([("Authorization".to_owned(), "Bearer {{ secrets.hooks_token }}".to_owned())]),
            signing_secret: Some("{{ secrets.webhook_signing_key }}".to_owned()),
            signature_header: DEFAULT_SIGNATURE_HEADER.to_owned(),
            timeout: Some(Duration(std::time::Duration::from_secs(10))),
        }
    }

    fn validate(spec: &WebhookSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        check_url(&mut issues, &["url"], &spec.url, &["http", "https"], Some("send them in `headers`"));
        check_headers(&mut issues, "headers", &spec.headers);
        if let Some(secret) = &spec.signing_secret {
            for name in spec.headers.keys().filter(|name| name.eq_ignore_ascii_case(&spec.signature_header)) {
                issues.push(SpecIssue::new(
                    &["headers", name],
                    format!("`{name}` carries the signature; remove it from `headers` or change `signature_header`"),
                ));
            }
            check_secret_ref(&mut issues, &["signing_secret"], secret, "webhook_signing_key");
        }
        if check_header_name(&mut issues, &["signature_header"], &spec.signature_header)
            && spec.signing_secret.is_none()
            && spec.signature_header != DEFAULT_SIGNATURE_HEADER
        {
            issues.push(SpecIssue::new(
                &["signature_header"],
                "requests are signed only with a `signing_secret`; set it or remove `signature_header`",
            ));
        }
        check_positive_duration(&mut issues, &["timeout"], spec.timeout, "timeout");
        issues
    }

    fn build(spec: WebhookSpec) -> Result<Arc<dyn Notifier>> {
        Ok(Arc::new(WebhookNotifier::new(spec)?))
    }
}

/// Registers the `webhook` notifier kind.
pub fn register_webhook_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<WebhookKind>()
}

/// The `webhook` notifier: one request per notification, signed when a key is given.
pub struct WebhookNotifier {
    http: http::HttpChannel,
    url: String,
    method: reqwest::Method,
    headers: reqwest::header::HeaderMap,
    signing_secret: Option<String>,
    signature_header: HeaderName,
}

impl fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookNotifier")
            .field("url", &redacted_url(&self.url))
            .field("method", &self.method)
            .field("signed", &self.signing_secret.is_some())
            .finish_non_exhaustive()
    }
}

impl WebhookNotifier {
    /// A notifier for `spec`, whose templates are already rendered.
    pub fn new(spec: WebhookSpec) -> Result<Self> {
        let headers = http::header_map(WEBHOOK_KIND, spec.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let signature_header = HeaderName::from_bytes(spec.signature_header.as_bytes()).map_err(|_| {
            Error::new(ErrorKind::InvalidConfig, format!("`{}` is not a valid header name", spec.signature_header))
                .with_operation("notifier.build")
                .with_context("channel", WEBHOOK_KIND)
        })?;
        Ok(WebhookNotifier {
            http: http::HttpChannel::new(WEBHOOK_KIND, spec.timeout.map(Duration::get))?,
            url: spec.url,
            method: match spec.method {
                Method::Post => reqwest::Method::POST,
                Method::Put => reqwest::Method::PUT,
            },
            headers,
            signing_secret: spec.signing_secret,
            signature_header,
        })
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn send(&self, notification: &Notification) -> Result<Receipt> {
        let body = serde_json::to_vec(&payload(notification)).expect("a JSON value serializes");
        let mut headers = self.headers.clone();
        let delivery = delivery_id(notification);
        headers.insert(DELIVERY_HEADER, HeaderValue::from_str(&delivery).expect("hex is a valid header value"));
        if let Some(secret) = &self.signing_secret {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let mut value = HeaderValue::from_str(&signature(secret.as_bytes(), now, &body))
                .expect("the signature is a valid header value");
            value.set_sensitive(true);
            headers.insert(self.signature_header.clone(), value);
        }
        let reply = self.http.send(self.method.clone(), &self.url, headers, body).await?;
        if !reply.is_success() {
            return Err(self.http.status_error(&self.url, &reply, &reply.body));
        }
        Ok(Receipt::new(Some(delivery), Some(notification.dedup_key.clone())))
    }
}

/// The JSON document sent for `notification` (version [`PAYLOAD_VERSION`]).
pub fn payload(notification: &Notification) -> Value {
    let event = notification.event.as_ref();
    let kind = event.map_or_else(
        || if notification.resolve { "notification.resolved" } else { "notification" }.to_owned(),
        |e| e.kind.clone(),
    );
    let at = event.map_or_else(SystemTime::now, |e| e.at);
    let labels = event.map_or_else(|| json!({}), |e| json!(e.labels));
    json!({
        "version": PAYLOAD_VERSION,
        "type": kind,
        "title": notification.title,
        "body": notification.body,
        "severity": notification.severity,
        "dedup_key": notification.dedup_key,
        "resolve": notification.resolve,
        "run_id": event.and_then(|e| e.run_id.clone()),
        "pipeline": event.and_then(|e| e.pipeline.clone()),
        "environment": event.and_then(|e| e.environment.clone()),
        "step": event.and_then(|e| e.step.clone()),
        "at": http::rfc3339(at),
        "facts": notification.facts.iter().map(|(name, value)| json!({"name": name, "value": value})).collect::<Vec<_>>(),
        "log_tail": notification.log_tail,
        "link": notification.link,
        "labels": labels,
    })
}

/// The delivery id of `notification`: 32 hex digits of a SHA-256 over what identifies
/// it (dedup key, resolve, the event's type and time, or the title and body when there
/// is no event), so every attempt of one notification carries the same id.
pub fn delivery_id(notification: &Notification) -> String {
    let mut hash = Sha256::new();
    for part in [
        notification.dedup_key.as_str(),
        if notification.resolve { "resolve" } else { "trigger" },
        notification.event.as_ref().map_or("", |e| e.kind.as_str()),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    match &notification.event {
        Some(event) => {
            let nanos = event.at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
            hash.update(nanos.to_string().as_bytes());
        }
        None => {
            hash.update(notification.title.as_bytes());
            hash.update([0]);
            hash.update(notification.body.as_bytes());
        }
    }
    hex(&hash.finalize()[..16])
}

/// The signature header's value: `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "{t}.{body}")>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex(&mac.finalize().into_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<WebhookKind>(), &example_with::<WebhookKind>(changes), path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<WebhookKind>();
        nexus_testkit::schema_fields_are_documented::<WebhookKind>();
        nexus_testkit::unknown_field_is_refused::<WebhookKind>("secret");
        nexus_testkit::notifier::builds::<WebhookKind>(json!({"signing_secret": "s1gn1ng-s3cr3t"}));
        nexus_testkit::registers_once::<WebhookKind>(register_webhook_notifier);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: WebhookSpec = serde_json::from_value(json!({"url": "http://localhost:8080/hook"})).unwrap();
        assert_eq!(spec.method, Method::Post);
        assert_eq!(spec.signature_header, DEFAULT_SIGNATURE_HEADER);
        assert!(WebhookKind::validate(&spec).is_empty());
    }

    #[test]
    fn method_is_post_or_put() {
        assert_valid(&descriptor::<WebhookKind>(), &example_with::<WebhookKind>(json!({"method": "PUT"})));
        check(json!({"method": "GET"}), &[], "unknown variant `GET`");
    }

    #[test]
    fn url_is_an_http_url_without_credentials() {
        check(json!({"url": "hooks.example.com/nexus"}), &["url"], "`http://` or `https://`");
        check(json!({"url": "https://u:p@hooks.example.com/"}), &["url"], "credentials");
    }

    #[test]
    fn header_names_and_values_are_checked() {
        check(json!({"headers": {"X Token": "x"}}), &["headers", "X Token"], "header name");
        check(json!({"headers": {"X-A": "a\nX-B: b"}}), &["headers", "X-A"], "single line");
    }

    #[test]
    fn the_signature_header_is_not_set_by_hand() {
        let headers = json!({"headers": {"x-nexus-signature-256": "sha256=00"}});
        check(headers, &["headers", "x-nexus-signature-256"], "carries the signature");
    }

    #[test]
    fn signing_secret_must_be_a_secret_reference() {
        check(json!({"signing_secret": "hunter2"}), &["signing_secret"], "{{ secrets.webhook_signing_key }}");
    }

    #[test]
    fn a_signature_header_needs_a_signing_secret() {
        let spec = json!({"signing_secret": null, "signature_header": "X-Hub-Signature-256"});
        check(spec, &["signature_header"], "only with a `signing_secret`");
        check(json!({"signature_header": "X Sig"}), &["signature_header"], "not a valid header name");
    }

    #[test]
    fn timeout_must_be_positive() {
        check(json!({"timeout": "0s"}), &["timeout"], "longer than zero");
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // The vector of docs/notify/webhook.md, computed with Python's hmac and with
        // `openssl dgst -sha256 -hmac`.
        assert_eq!(
            signature(b"whsec-test", 1_700_000_000, br#"{"version":1}"#),
            "t=1700000000,v1=274fa19a2b82656d91420a4e63c58e236ebef72fa5a30d4eae149450e313ba4c"
        );
    }

    #[test]
    fn delivery_id_is_stable_per_notification() {
        use nexus_core::model::Severity;
        let a = Notification::new("t", "b", Severity::Error, "k");
        assert_eq!(delivery_id(&a), delivery_id(&a.clone()));
        let mut resolved = a.clone();
        resolved.resolve = true;
        assert_ne!(delivery_id(&a), delivery_id(&resolved));
        assert_eq!(delivery_id(&a).len(), 32);
    }

    #[test]
    fn payload_without_an_event_has_every_field() {
        use nexus_core::model::Severity;
        let mut n = Notification::new("Deploy failed", "step api failed", Severity::Critical, "shop/deploy/prod");
        n.facts.push(("Pipeline".to_owned(), "deploy".to_owned()));
        let p = payload(&n);
        assert_eq!(p.as_object().unwrap().len(), 16, "{p}");
        assert_eq!((&p["version"], &p["type"], &p["at"].is_string()), (&json!(1), &json!("notification"), &true));
        assert_eq!(p["severity"], "critical");
        assert_eq!(p["facts"][0], json!({"name": "Pipeline", "value": "deploy"}));
    }

    #[test]
    fn debug_never_shows_secrets_headers_or_the_url_path() {
        let mut spec = WebhookKind::example();
        spec.url = "https://chat.example.com/hooks/T0K3N?key=K3Y".to_owned();
        spec.signing_secret = Some("s1gn1ng-s3cr3t".to_owned());
        spec.headers.insert("Authorization".to_owned(), "Bearer b34r3r".to_owned());
        let shown = assert_debug_hides(&spec, &["T0K3N", "K3Y", "s1gn1ng-s3cr3t", "b34r3r"]);
        assert!(shown.contains("url: \"https://chat.example.com/***\""), "{shown}");
    }
}
