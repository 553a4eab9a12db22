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
            .field("headers", &HeaderNames(&self.headers))
            .field("expect_status", &self.expect_status)
            .field("expect_body_contains", &self.expect_body_contains)
            .field("tls_verify", &self.tls_verify)
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
        check_url(&mut issues, &["url"], &spec.url, &["http", "https"]);
        for (name, value) in &spec.headers {
            if !is_token(name) {
                issues.push(SpecIssue::new(
                    &["headers", name],
                    format!("`{name}` is not a valid header name: use letters, digits and `-`, without spaces or `:`"),
                ));
            }
            if value.contains(['\r', '\n']) {
                issues.push(SpecIssue::new(&["headers", name], "a header value must be a single line"));
            }
        }
        if spec.expect_status.is_empty() {
            issues.push(SpecIssue::new(&["expect_status"], "give at least one status code, such as `[200]`"));
        }
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
        if spec.timeout.is_some_and(|t| t.get().is_zero()) {
            issues.push(SpecIssue::new(&["timeout"], "the timeout must be longer than zero"));
        }
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

/// Whether `name` is an HTTP token (RFC 9110 §5.6.2), as header names must be.
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_core::KindDescriptor;
    use serde_json::{Value, json};

    fn descriptor() -> KindDescriptor<dyn ServiceAdapter> {
        KindDescriptor::of::<HttpKind>()
    }

    /// The example with `changes` applied: each key is set, or removed when `null`.
    fn example_with(changes: Value) -> Value {
        let mut spec = serde_json::to_value(HttpKind::example()).unwrap();
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
        assert_eq!(d.actions, ["health", "request"]);
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
    fn every_field_is_documented_in_the_schema() {
        let schema = descriptor().spec_schema;
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "`{name}` has no description");
        }
    }

    #[test]
    fn url_needs_an_http_scheme_and_a_host() {
        check(example_with(json!({"url": "ftp://example.com/"})), &["url"], "`http://` or `https://`");
        check(example_with(json!({"url": "example.com/healthz"})), &["url"], "not a URL");
        check(example_with(json!({"url": "https:///healthz"})), &["url"], "must name a host");
    }

    #[test]
    fn url_must_not_carry_credentials_even_in_a_template() {
        check(example_with(json!({"url": "https://me:{{ secrets.pw }}@example.com/"})), &["url"], "credentials");
    }

    #[test]
    fn header_names_and_values_are_checked() {
        check(example_with(json!({"headers": {"Bad Name": "x"}})), &["headers", "Bad Name"], "header name");
        check(example_with(json!({"headers": {"X-A": "a\r\nX-B: b"}})), &["headers", "X-A"], "single line");
    }

    #[test]
    fn expected_statuses_are_a_non_empty_list_of_status_codes() {
        check(example_with(json!({"expect_status": []})), &["expect_status"], "at least one");
        check(example_with(json!({"expect_status": [200, 42]})), &["expect_status", "1"], "not an HTTP status");
    }

    #[test]
    fn head_has_no_body_to_check() {
        check(example_with(json!({"method": "HEAD"})), &["expect_body_contains"], "no body");
    }

    #[test]
    fn timeout_must_be_positive() {
        check(example_with(json!({"timeout": "0s"})), &["timeout"], "longer than zero");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let issues = descriptor().validate(&example_with(json!({"verify_tls": false})));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(issues[0].message.contains("unknown field `verify_tls`"), "{issues:#?}");
        let schema = jsonschema::validator_for(&descriptor().spec_schema).unwrap();
        assert!(!schema.is_valid(&example_with(json!({"verify_tls": false}))));
    }

    #[test]
    fn debug_never_shows_header_values() {
        let mut spec = HttpKind::example();
        spec.headers.insert("Authorization".to_owned(), "Bearer s3cr3t-t0ken".to_owned());
        let shown = format!("{spec:?}");
        assert!(!shown.contains("s3cr3t-t0ken"), "{shown}");
        assert!(shown.contains("\"Authorization\": \"***\""), "{shown}");
    }

    #[test]
    fn build_says_the_implementation_is_not_there_yet() {
        let err = descriptor().build(descriptor().example).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert_eq!(err.operation(), "service.build");
    }

    #[test]
    fn registers_as_a_service_kind() {
        let mut catalog = Catalog::new();
        register_http_service(&mut catalog).unwrap();
        assert_eq!(catalog.services.get(HTTP_KIND).unwrap().kind, "http");
    }
}
