//! The `s3` service kind of Nexus: a bucket on AWS S3 or an S3-compatible store
//! (MinIO, Ceph RGW, Cloudflare R2…).
//!
//! Its health check lists one key under `prefix`; pipelines call its `upload`,
//! `download`, `list` and `purge` actions, which never touch keys outside `prefix`.
//! This crate holds the kind's spec, its pure validation and its registration; the
//! client comes in a later issue, so [`S3Kind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::spec::{check_secret_ref, check_together, check_url, is_template};
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
            let hint = Some("use `access_key_id` and `secret_access_key`");
            check_url(&mut issues, &["endpoint"], endpoint, &["http", "https"], hint);
        }
        check_together(
            &mut issues,
            ("access_key_id", spec.access_key_id.is_some()),
            ("secret_access_key", spec.secret_access_key.is_some()),
            "to use the AWS credential chain",
        );
        if let Some(secret) = &spec.secret_access_key {
            check_secret_ref(&mut issues, &["secret_access_key"], secret, "s3_secret_access_key");
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

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<S3Kind>(), &example_with::<S3Kind>(changes), path, needle);
    }

    /// Asserts that the example with `changes` is valid.
    fn fine(changes: Value) {
        assert_valid(&descriptor::<S3Kind>(), &example_with::<S3Kind>(changes));
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<S3Kind>();
        nexus_testkit::schema_fields_are_documented::<S3Kind>();
        nexus_testkit::unknown_field_is_refused::<S3Kind>("force_path_style");
        nexus_testkit::build_is_unsupported::<S3Kind>();
        nexus_testkit::registers_once::<S3Kind>(register_s3_service);
    }

    #[test]
    fn a_bucket_alone_is_enough() {
        let spec: S3Spec = serde_json::from_value(json!({"bucket": "acme-logs"})).unwrap();
        assert_eq!(spec.region, "us-east-1");
        assert!(!spec.path_style);
        assert!(S3Kind::validate(&spec).is_empty());
    }

    #[test]
    fn bucket_names_follow_the_s3_rules() {
        check(json!({"bucket": "ab"}), &["bucket"], "3 to 63");
        check(json!({"bucket": "Acme_Backups"}), &["bucket"], "lowercase");
        check(json!({"bucket": "-acme"}), &["bucket"], "start and end");
        check(json!({"bucket": "acme..backups"}), &["bucket"], "`..`");
        fine(json!({"bucket": "{{ env.vars.bucket }}"}));
    }

    #[test]
    fn endpoint_is_an_http_url_without_credentials() {
        check(json!({"endpoint": "minio:9000"}), &["endpoint"], "`http://` or `https://`");
        check(json!({"endpoint": "http://key:secret@minio:9000"}), &["endpoint"], "`secret_access_key`");
    }

    #[test]
    fn access_keys_come_in_pairs() {
        check(json!({"secret_access_key": null}), &["secret_access_key"], "give both");
        check(json!({"access_key_id": null}), &["access_key_id"], "give both");
        fine(json!({"access_key_id": null, "secret_access_key": null}));
    }

    #[test]
    fn secret_access_key_must_be_a_secret_reference() {
        check(json!({"secret_access_key": "wJalrXUtnFEMI"}), &["secret_access_key"], "{{ secrets.");
    }

    #[test]
    fn prefix_does_not_start_with_a_slash() {
        check(json!({"prefix": "/backups/"}), &["prefix"], "write `backups/`");
    }

    #[test]
    fn debug_never_shows_the_secret_access_key() {
        let mut spec = S3Kind::example();
        spec.secret_access_key = Some("wJalrXUtnFEMI-s3cr3t".to_owned());
        let shown = assert_debug_hides(&spec, &["wJalrXUtnFEMI-s3cr3t"]);
        assert!(shown.contains("secret_access_key: Some(\"***\")"), "{shown}");
    }
}
