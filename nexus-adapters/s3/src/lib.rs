//! The `s3` service kind of Nexus: a bucket on AWS S3 or an S3-compatible store
//! (MinIO, Ceph RGW, Cloudflare R2…).
//!
//! Its health check lists one key under `prefix`; pipelines call its `upload`,
//! `download`, `list` and `purge` actions, which never touch keys outside `prefix`.
//! This crate holds the kind's spec, its pure validation and its registration; the
//! client comes in a later issue, so [`S3Kind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::traits::ServiceAdapter;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const S3_KIND: &str = "s3";

/// The settings of an `s3` service.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Spec {
    /// Name of the bucket (3–63 lowercase letters, digits, `.` and `-`).
    #[schemars(length(min = 1))]
    pub bucket: String,
    /// URL of an S3-compatible service (`http://minio:9000`); AWS S3 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub endpoint: Option<String>,
    /// Region of the bucket (`eu-west-1`); most S3-compatible stores accept any value.
    #[serde(default = "default_region")]
    #[schemars(length(min = 1))]
    pub region: String,
    /// Access key id, given together with `secret_access_key`; when both are absent the
    /// standard AWS credential chain (environment, profile, instance role) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub access_key_id: Option<String>,
    /// Secret access key, as a reference such as `{{ secrets.s3_secret_access_key }}`
    /// (never a literal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub secret_access_key: Option<String>,
    /// Whether requests address the bucket in the path (`endpoint/bucket/key`), as MinIO
    /// and most self-hosted stores need, rather than in the host name
    /// (`bucket.endpoint/key`).
    #[serde(default)]
    pub path_style: bool,
    /// Key prefix of every object this service reads or writes (`backups/app/`); `list`
    /// and `purge` never touch keys outside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub prefix: Option<String>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

impl fmt::Debug for S3Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Spec")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "***"))
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The `s3` service kind.
pub struct S3Kind;

impl ComponentKind for S3Kind {
    type Trait = dyn ServiceAdapter;
    type Spec = S3Spec;
    const KIND: &'static str = S3_KIND;
    const DESCRIPTION: &'static str =
        "An S3 or S3-compatible bucket: health, upload, download, list and purge under a prefix.";
    const ACTIONS: &'static [&'static str] = &["health", "upload", "download", "list", "purge"];

    fn example() -> S3Spec {
        S3Spec {
            bucket: "acme-backups".to_owned(),
            endpoint: Some("{{ env.vars.s3_endpoint }}".to_owned()),
            region: "us-east-1".to_owned(),
            access_key_id: Some("{{ secrets.s3_access_key_id }}".to_owned()),
            secret_access_key: Some("{{ secrets.s3_secret_access_key }}".to_owned()),
            path_style: true,
            prefix: Some("backups/app/".to_owned()),
        }
    }

    fn validate(spec: &S3Spec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        if let Some(problem) = bucket_name_problem(&spec.bucket).filter(|_| !is_template(&spec.bucket)) {
            issues
                .push(SpecIssue::new(&["bucket"], format!("`{}` is not a valid bucket name: {problem}", spec.bucket)));
        }
        if let Some(endpoint) = &spec.endpoint {
            check_url(&mut issues, &["endpoint"], endpoint, &["http", "https"]);
        }
        match (&spec.access_key_id, &spec.secret_access_key) {
            (Some(_), None) => issues.push(SpecIssue::new(
                &["secret_access_key"],
                "`access_key_id` needs its `secret_access_key`; give both, or neither to use the AWS credential chain",
            )),
            (None, Some(_)) => issues.push(SpecIssue::new(
                &["access_key_id"],
                "`secret_access_key` needs its `access_key_id`; give both, or neither to use the AWS credential chain",
            )),
            _ => {}
        }
        if let Some(secret) = &spec.secret_access_key {
            check_secret_ref(&mut issues, &["secret_access_key"], secret);
        }
        if let Some(prefix) = spec.prefix.as_deref().filter(|p| p.starts_with('/')) {
            issues.push(SpecIssue::new(
                &["prefix"],
                format!("S3 keys do not start with `/`; write `{}`", prefix.trim_start_matches('/')),
            ));
        }
        issues
    }

    fn build(_spec: S3Spec) -> Result<Arc<dyn ServiceAdapter>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the s3 service's implementation is not built yet; its spec is validated",
        )
        .with_operation("service.build"))
    }
}

/// Registers the `s3` service kind.
pub fn register_s3_service(catalog: &mut Catalog) -> Result<()> {
    catalog.services.register_kind::<S3Kind>()
}

/// What breaks the S3 bucket naming rules, if anything.
fn bucket_name_problem(name: &str) -> Option<&'static str> {
    let bytes = name.as_bytes();
    if !(3..=63).contains(&bytes.len()) {
        Some("it must be 3 to 63 characters long")
    } else if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'-') {
        Some("use only lowercase letters, digits, `.` and `-`")
    } else if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        Some("it must start and end with a letter or a digit")
    } else if name.contains("..") {
        Some("it must not contain `..`")
    } else {
        None
    }
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
            "the URL must not carry credentials (`user:password@`), which would show in logs; use `access_key_id` \
             and `secret_access_key`",
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
            "write the credential as a reference such as `{{ secrets.s3_secret_access_key }}` and declare it in \
             security_registry.yaml; a literal value would sit in the file in clear",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_core::KindDescriptor;
    use serde_json::{Value, json};

    fn descriptor() -> KindDescriptor<dyn ServiceAdapter> {
        KindDescriptor::of::<S3Kind>()
    }

    /// The example with `changes` applied: each key is set, or removed when `null`.
    fn example_with(changes: Value) -> Value {
        let mut spec = serde_json::to_value(S3Kind::example()).unwrap();
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
        assert_eq!(d.actions, ["health", "upload", "download", "list", "purge"]);
    }

    #[test]
    fn a_bucket_alone_is_enough() {
        let spec: S3Spec = serde_json::from_value(json!({"bucket": "acme-logs"})).unwrap();
        assert_eq!(spec.region, "us-east-1");
        assert!(!spec.path_style);
        assert!(S3Kind::validate(&spec).is_empty());
    }

    #[test]
    fn every_field_is_documented_in_the_schema() {
        let schema = descriptor().spec_schema;
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "`{name}` has no description");
        }
    }

    #[test]
    fn bucket_names_follow_the_s3_rules() {
        check(example_with(json!({"bucket": "ab"})), &["bucket"], "3 to 63");
        check(example_with(json!({"bucket": "Acme_Backups"})), &["bucket"], "lowercase");
        check(example_with(json!({"bucket": "-acme"})), &["bucket"], "start and end");
        check(example_with(json!({"bucket": "acme..backups"})), &["bucket"], "`..`");
        assert!(descriptor().validate(&example_with(json!({"bucket": "{{ env.vars.bucket }}"}))).is_empty());
    }

    #[test]
    fn endpoint_is_an_http_url_without_credentials() {
        check(example_with(json!({"endpoint": "minio:9000"})), &["endpoint"], "`http://` or `https://`");
        check(example_with(json!({"endpoint": "http://key:secret@minio:9000"})), &["endpoint"], "credentials");
    }

    #[test]
    fn access_keys_come_in_pairs() {
        check(example_with(json!({"secret_access_key": null})), &["secret_access_key"], "give both");
        check(example_with(json!({"access_key_id": null})), &["access_key_id"], "give both");
        let neither = example_with(json!({"access_key_id": null, "secret_access_key": null}));
        assert!(descriptor().validate(&neither).is_empty());
    }

    #[test]
    fn secret_access_key_must_be_a_secret_reference() {
        check(example_with(json!({"secret_access_key": "wJalrXUtnFEMI"})), &["secret_access_key"], "{{ secrets.");
    }

    #[test]
    fn prefix_does_not_start_with_a_slash() {
        check(example_with(json!({"prefix": "/backups/"})), &["prefix"], "write `backups/`");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let issues = descriptor().validate(&example_with(json!({"force_path_style": true})));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(issues[0].message.contains("unknown field `force_path_style`"), "{issues:#?}");
        let schema = jsonschema::validator_for(&descriptor().spec_schema).unwrap();
        assert!(!schema.is_valid(&example_with(json!({"force_path_style": true}))));
    }

    #[test]
    fn debug_never_shows_the_secret_access_key() {
        let mut spec = S3Kind::example();
        spec.secret_access_key = Some("wJalrXUtnFEMI-s3cr3t".to_owned());
        let shown = format!("{spec:?}");
        assert!(!shown.contains("wJalrXUtnFEMI-s3cr3t"), "{shown}");
        assert!(shown.contains("secret_access_key: Some(\"***\")"), "{shown}");
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
        register_s3_service(&mut catalog).unwrap();
        assert_eq!(catalog.services.get(S3_KIND).unwrap().kind, "s3");
    }
}
