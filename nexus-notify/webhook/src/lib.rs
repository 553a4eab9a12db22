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
use nexus_core::spec::{
    MaskedValues, check_header_name, check_headers, check_positive_duration, check_secret_ref, check_url,
};
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
            .field("headers", &MaskedValues(&self.headers))
            .field("signing_secret", &self.signing_secret.as_ref().map(|_| "***"))
            .field("signature_header", &self.signature_header)
            .field("timeout", &self.timeout)
            .finish()
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
        nexus_testkit::build_is_unsupported::<WebhookKind>();
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
    fn debug_never_shows_secrets_headers_or_the_url_path() {
        let mut spec = WebhookKind::example();
        spec.url = "https://chat.example.com/hooks/T0K3N?key=K3Y".to_owned();
        spec.signing_secret = Some("s1gn1ng-s3cr3t".to_owned());
        spec.headers.insert("Authorization".to_owned(), "Bearer b34r3r".to_owned());
        let shown = assert_debug_hides(&spec, &["T0K3N", "K3Y", "s1gn1ng-s3cr3t", "b34r3r"]);
        assert!(shown.contains("url: \"https://chat.example.com/***\""), "{shown}");
    }
}
