//! The `http` service kind of Nexus: a service reached over HTTP(S).
//!
//! Its health check requests `url` and compares the status (and optionally the body)
//! with what is expected; pipelines call its `request` action to send a request to the
//! same endpoint. This crate holds the kind's spec, its pure validation and its
//! registration; the client itself comes in a later issue, so [`HttpKind::build`]
//! returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::model::{Duration, Map};
use nexus_core::spec::{MaskedValues, check_headers, check_non_empty, check_positive_duration, check_url};
use nexus_core::traits::ServiceAdapter;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const HTTP_KIND: &str = "http";

/// The settings of an `http` service.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// The endpoint checked by `health` and used by `request`: an `http://` or
    /// `https://` URL without credentials (put those in `headers`).
    #[schemars(length(min = 1))]
    pub url: String,
    /// The method of the health-check request.
    #[serde(default)]
    pub method: Method,
    /// Headers sent with every request; values may be `{{ secrets.* }}` templates and
    /// are never shown in logs.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub headers: Map<String>,
    /// Status codes that mean healthy.
    #[serde(default = "default_expect_status")]
    #[schemars(length(min = 1), inner(range(min = 100, max = 599)))]
    pub expect_status: Vec<u16>,
    /// Text the response body must contain to be healthy (not checked when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub expect_body_contains: Option<String>,
    /// Whether the server's TLS certificate is verified; turn off only for
    /// self-signed test endpoints.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Time limit of one request (the health check's own `timeout` applies when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// An HTTP request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// `GET`.
    #[default]
    Get,
    /// `HEAD`: status only, no body (so `expect_body_contains` cannot be used).
    Head,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// `DELETE`.
    Delete,
    /// `OPTIONS`.
    Options,
}

fn default_expect_status() -> Vec<u16> {
    vec![200]
}

fn default_true() -> bool {
    true
}

impl fmt::Debug for HttpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSpec")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("headers", &MaskedValues(&self.headers))
            .field("expect_status", &self.expect_status)
            .field("expect_body_contains", &self.expect_body_contains)
            .field("tls_verify", &self.tls_verify)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The `http` service kind.
pub struct HttpKind;

impl ComponentKind for HttpKind {
    type Trait = dyn ServiceAdapter;
    type Spec = HttpSpec;
    const KIND: &'static str = HTTP_KIND;
    const DESCRIPTION: &'static str = "An HTTP(S) endpoint: health by status code and body, and requests to it.";
    const ACTIONS: &'static [&'static str] = &["health", "request"];

    fn example() -> HttpSpec {
        HttpSpec {
            url: "https://{{ env.vars.api_host }}/healthz".to_owned(),
            method: Method::Get,
            headers: Map::from_iter([("Authorization".to_owned(), "Bearer {{ secrets.api_health_token }}".to_owned())]),
            expect_status: vec![200, 204],
            expect_body_contains: Some("ok".to_owned()),
            tls_verify: true,
            timeout: Some(Duration(std::time::Duration::from_secs(5))),
        }
    }

    fn validate(spec: &HttpSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        check_url(&mut issues, &["url"], &spec.url, &["http", "https"], Some("send them in `headers`"));
        check_headers(&mut issues, "headers", &spec.headers);
        check_non_empty(&mut issues, &["expect_status"], &spec.expect_status, "status code, such as `[200]`");
        for (i, status) in spec.expect_status.iter().enumerate() {
            if !(100..=599).contains(status) {
                issues.push(SpecIssue::new(
                    &["expect_status", &i.to_string()],
                    format!("{status} is not an HTTP status code (100–599)"),
                ));
            }
        }
        if spec.method == Method::Head && spec.expect_body_contains.is_some() {
            issues.push(SpecIssue::new(
                &["expect_body_contains"],
                "a `HEAD` response has no body; use `method: GET` or remove `expect_body_contains`",
            ));
        }
        check_positive_duration(&mut issues, &["timeout"], spec.timeout, "timeout");
        issues
    }

    fn build(_spec: HttpSpec) -> Result<Arc<dyn ServiceAdapter>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the http service's implementation is not built yet; its spec is validated",
        )
        .with_operation("service.build"))
    }
}

/// Registers the `http` service kind.
pub fn register_http_service(catalog: &mut Catalog) -> Result<()> {
    catalog.services.register_kind::<HttpKind>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<HttpKind>(), &example_with::<HttpKind>(changes), path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<HttpKind>();
        nexus_testkit::schema_fields_are_documented::<HttpKind>();
        nexus_testkit::unknown_field_is_refused::<HttpKind>("verify_tls");
        nexus_testkit::build_is_unsupported::<HttpKind>();
        nexus_testkit::registers_once::<HttpKind>(register_http_service);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: HttpSpec = serde_json::from_value(json!({"url": "http://localhost:8080/"})).unwrap();
        assert_eq!(spec.method, Method::Get);
        assert_eq!(spec.expect_status, [200]);
        assert!(spec.tls_verify);
        assert!(HttpKind::validate(&spec).is_empty());
    }

    #[test]
    fn url_needs_an_http_scheme_and_a_host() {
        check(json!({"url": "ftp://example.com/"}), &["url"], "`http://` or `https://`");
        check(json!({"url": "example.com/healthz"}), &["url"], "not a URL");
        check(json!({"url": "https:///healthz"}), &["url"], "must name a host");
        assert_valid(&descriptor::<HttpKind>(), &example_with::<HttpKind>(json!({"url": "http://10.0.0.5:8080/"})));
    }

    #[test]
    fn url_must_not_carry_credentials_even_in_a_template() {
        check(json!({"url": "https://me:{{ secrets.pw }}@example.com/"}), &["url"], "`headers`");
    }

    #[test]
    fn header_names_and_values_are_checked() {
        check(json!({"headers": {"Bad Name": "x"}}), &["headers", "Bad Name"], "header name");
        check(json!({"headers": {"X-A": "a\r\nX-B: b"}}), &["headers", "X-A"], "single line");
    }

    #[test]
    fn expected_statuses_are_a_non_empty_list_of_status_codes() {
        check(json!({"expect_status": []}), &["expect_status"], "at least one");
        check(json!({"expect_status": [200, 42]}), &["expect_status", "1"], "not an HTTP status");
    }

    #[test]
    fn head_has_no_body_to_check() {
        check(json!({"method": "HEAD"}), &["expect_body_contains"], "no body");
    }

    #[test]
    fn timeout_must_be_positive() {
        check(json!({"timeout": "0s"}), &["timeout"], "longer than zero");
    }

    #[test]
    fn debug_never_shows_header_values() {
        let mut spec = HttpKind::example();
        spec.headers.insert("Authorization".to_owned(), "Bearer s3cr3t-t0ken".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t-t0ken"]);
        assert!(shown.contains("\"Authorization\": \"***\""), "{shown}");
    }
}
