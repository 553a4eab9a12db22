//! The `webhook` notifier kind of Nexus: notifications sent as JSON to any URL.
//!
//! With a `signing_secret`, each request carries an HMAC-SHA256 signature of its body
//! in `signature_header` (`sha256=<hex>`), so the receiver can tell that the message
//! comes from Nexus and was not altered. This crate holds the kind's spec, its pure
//! validation and its registration; the client comes in a later issue, so
//! [`WebhookKind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::model::{Duration, Map};
use nexus_core::traits::Notifier;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const WEBHOOK_KIND: &str = "webhook";

/// The header that carries the signature unless `signature_header` says otherwise.
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Nexus-Signature-256";

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
    /// Key of the HMAC-SHA256 signature of each request's body, as a reference such as
    /// `{{ secrets.webhook_signing_key }}` (never a literal); requests are not signed
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub signing_secret: Option<String>,
    /// Header that carries the signature, as `sha256=<hex>`.
    #[serde(default = "default_signature_header")]
    #[schemars(length(min = 1))]
    pub signature_header: String,
    /// Time limit of one request.
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
            .field("headers", &HeaderNames(&self.headers))
            .field("signing_secret", &self.signing_secret.as_ref().map(|_| "***"))
            .field("signature_header", &self.signature_header)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Shows header names, never their values (they may hold credentials).
struct HeaderNames<'a>(&'a Map<String>);

impl fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.keys().map(|name| (name, "***"))).finish()
    }
}

/// The URL's scheme and host only: many webhook URLs carry a token in their path or
/// query (`https://chat.example.com/hooks/T0K3N` becomes `https://chat.example.com/***`),
/// and credentials before the host are dropped.
fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = rest[..end].rsplit_once('@').map_or(&rest[..end], |(_, host)| host);
    if end == rest.len() { format!("{scheme}://{host}") } else { format!("{scheme}://{host}/***") }
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
        check_url(&mut issues, &["url"], &spec.url, &["http", "https"]);
        for (name, value) in &spec.headers {
            if !is_token(name) {
                issues.push(SpecIssue::new(
                    &["headers", name],
                    format!("`{name}` is not a valid header name: use letters, digits and `-`, without spaces or `:`"),
                ));
            } else if value.contains(['\r', '\n']) {
                issues.push(SpecIssue::new(&["headers", name], "a header value must be a single line"));
            } else if spec.signing_secret.is_some() && name.eq_ignore_ascii_case(&spec.signature_header) {
                issues.push(SpecIssue::new(
                    &["headers", name],
                    format!("`{name}` carries the signature; remove it from `headers` or change `signature_header`"),
                ));
            }
        }
        if let Some(secret) = &spec.signing_secret {
            check_secret_ref(&mut issues, &["signing_secret"], secret);
        }
        if !is_token(&spec.signature_header) {
            issues.push(SpecIssue::new(
                &["signature_header"],
                format!("`{}` is not a valid header name", spec.signature_header),
            ));
        } else if spec.signing_secret.is_none() && spec.signature_header != DEFAULT_SIGNATURE_HEADER {
            issues.push(SpecIssue::new(
                &["signature_header"],
                "requests are signed only with a `signing_secret`; set it or remove `signature_header`",
            ));
        }
        if spec.timeout.is_some_and(|t| t.get().is_zero()) {
            issues.push(SpecIssue::new(&["timeout"], "the timeout must be longer than zero"));
        }
        issues
    }

    fn build(_spec: WebhookSpec) -> Result<Arc<dyn Notifier>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the webhook notifier's implementation is not built yet; its spec is validated",
        )
        .with_operation("notifier.build"))
    }
}

/// Registers the `webhook` notifier kind.
pub fn register_webhook_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<WebhookKind>()
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
            "the URL must not carry credentials (`user:password@`), which would show in logs; send them in `headers`",
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
            "write the credential as a reference such as `{{ secrets.webhook_signing_key }}` and declare it in \
             security_registry.yaml; a literal value would sit in the file in clear",
        ));
    }
}

/// Whether `name` is an HTTP token (RFC 9110 §5.6.2), as header names must be.
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_core::KindDescriptor;
    use serde_json::{Value, json};

    fn descriptor() -> KindDescriptor<dyn Notifier> {
        KindDescriptor::of::<WebhookKind>()
    }

    /// The example with `changes` applied: each key is set, or removed when `null`.
    fn example_with(changes: Value) -> Value {
        let mut spec = serde_json::to_value(WebhookKind::example()).unwrap();
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
    fn defaults_fill_a_minimal_spec() {
        let spec: WebhookSpec = serde_json::from_value(json!({"url": "http://localhost:8080/hook"})).unwrap();
        assert_eq!(spec.method, Method::Post);
        assert_eq!(spec.signature_header, DEFAULT_SIGNATURE_HEADER);
        assert!(WebhookKind::validate(&spec).is_empty());
    }

    #[test]
    fn every_field_is_documented_in_the_schema() {
        let schema = descriptor().spec_schema;
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "`{name}` has no description");
        }
    }

    #[test]
    fn method_is_post_or_put() {
        assert!(descriptor().validate(&example_with(json!({"method": "PUT"}))).is_empty());
        let issues = descriptor().validate(&example_with(json!({"method": "GET"})));
        assert!(issues[0].message.contains("unknown variant `GET`"), "{issues:#?}");
    }

    #[test]
    fn url_is_an_http_url_without_credentials() {
        check(example_with(json!({"url": "hooks.example.com/nexus"})), &["url"], "`http://` or `https://`");
        check(example_with(json!({"url": "https://u:p@hooks.example.com/"})), &["url"], "credentials");
    }

    #[test]
    fn header_names_and_values_are_checked() {
        check(example_with(json!({"headers": {"X Token": "x"}})), &["headers", "X Token"], "header name");
        check(example_with(json!({"headers": {"X-A": "a\nX-B: b"}})), &["headers", "X-A"], "single line");
    }

    #[test]
    fn the_signature_header_is_not_set_by_hand() {
        let headers = json!({"headers": {"x-nexus-signature-256": "sha256=00"}});
        check(example_with(headers), &["headers", "x-nexus-signature-256"], "carries the signature");
    }

    #[test]
    fn signing_secret_must_be_a_secret_reference() {
        check(example_with(json!({"signing_secret": "hunter2"})), &["signing_secret"], "{{ secrets.");
    }

    #[test]
    fn a_signature_header_needs_a_signing_secret() {
        let spec = example_with(json!({"signing_secret": null, "signature_header": "X-Hub-Signature-256"}));
        check(spec, &["signature_header"], "only with a `signing_secret`");
        check(example_with(json!({"signature_header": "X Sig"})), &["signature_header"], "not a valid header name");
    }

    #[test]
    fn timeout_must_be_positive() {
        check(example_with(json!({"timeout": "0s"})), &["timeout"], "longer than zero");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let issues = descriptor().validate(&example_with(json!({"secret": "{{ secrets.x }}"})));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(issues[0].message.contains("unknown field `secret`"), "{issues:#?}");
        let schema = jsonschema::validator_for(&descriptor().spec_schema).unwrap();
        assert!(!schema.is_valid(&example_with(json!({"secret": "{{ secrets.x }}"}))));
    }

    #[test]
    fn debug_never_shows_secrets_headers_or_the_url_path() {
        let mut spec = WebhookKind::example();
        spec.url = "https://chat.example.com/hooks/T0K3N?key=K3Y".to_owned();
        spec.signing_secret = Some("s1gn1ng-s3cr3t".to_owned());
        spec.headers.insert("Authorization".to_owned(), "Bearer b34r3r".to_owned());
        let shown = format!("{spec:?}");
        for secret in ["T0K3N", "K3Y", "s1gn1ng-s3cr3t", "b34r3r"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("url: \"https://chat.example.com/***\""), "{shown}");
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
        register_webhook_notifier(&mut catalog).unwrap();
        assert_eq!(catalog.notifiers.get(WEBHOOK_KIND).unwrap().kind, "webhook");
    }
}
