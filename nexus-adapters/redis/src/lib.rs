//! The `redis` service kind of Nexus: a Redis (or Valkey) database.
//!
//! Its health check sends `PING`; pipelines call its `ping`, `set`, `get` and
//! `flush-prefix` actions, all confined to `key_prefix` when one is given. This crate
//! holds the kind's spec, its pure validation and its registration; the client comes
//! in a later issue, so [`RedisKind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::spec::{check_secret_ref, check_url, is_template};
use nexus_core::traits::ServiceAdapter;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const REDIS_KIND: &str = "redis";

/// The settings of a `redis` service.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSpec {
    /// Where the server listens: `redis://host:6379`, or `rediss://host:6380` for TLS;
    /// without a password (put it in `password`). Its path may give the database
    /// number (`redis://host:6379/2`) instead of `database`.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Password (`AUTH`), as a reference such as `{{ secrets.redis_password }}` (never a
    /// literal); absent when the server requires none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub password: Option<String>,
    /// Database number selected after connecting (`SELECT`); 0 when neither this nor
    /// the URL's path gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<u32>,
    /// Prefix of the keys this service owns, such as `app:`: `set` and `get` add it to
    /// their key, and `flush-prefix` deletes only the keys that start with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub key_prefix: Option<String>,
}

impl fmt::Debug for RedisSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSpec")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// The `redis` service kind.
pub struct RedisKind;

impl ComponentKind for RedisKind {
    type Trait = dyn ServiceAdapter;
    type Spec = RedisSpec;
    const KIND: &'static str = REDIS_KIND;
    const DESCRIPTION: &'static str = "A Redis database: health, ping, get and set keys, flush a key prefix.";
    const ACTIONS: &'static [&'static str] = &["health", "ping", "flush-prefix", "set", "get"];

    fn example() -> RedisSpec {
        RedisSpec {
            url: "redis://{{ env.vars.redis_host }}:6379".to_owned(),
            password: Some("{{ secrets.redis_password }}".to_owned()),
            database: Some(0),
            key_prefix: Some("app:".to_owned()),
        }
    }

    fn validate(spec: &RedisSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        let url_ok =
            check_url(&mut issues, &["url"], &spec.url, &["redis", "rediss"], Some("put the password in `password`"));
        if url_ok && !is_template(&spec.url) {
            let rest = spec.url.split_once("://").map_or("", |(_, rest)| rest);
            let path = rest.split_once('/').map_or("", |(_, path)| path).trim_end_matches('/');
            if !path.is_empty() && !path.chars().all(|c| c.is_ascii_digit()) {
                issues.push(SpecIssue::new(
                    &["url"],
                    format!("the path of a Redis URL is a database number, not `/{path}`"),
                ));
            } else if !path.is_empty() && spec.database.is_some() {
                issues.push(SpecIssue::new(
                    &["database"],
                    format!("the URL already selects database {path}; remove `database` or the URL's path"),
                ));
            }
        }
        if let Some(password) = &spec.password {
            check_secret_ref(&mut issues, &["password"], password, "redis_password");
        }
        let globbing = |p: &&str| !is_template(p) && p.contains(['*', '?', '[', ']', '\\']);
        if let Some(prefix) = spec.key_prefix.as_deref().filter(globbing) {
            issues.push(SpecIssue::new(
                &["key_prefix"],
                format!(
                    "`{prefix}` contains a pattern character (`*`, `?`, `[`, `]` or `\\`), so `flush-prefix` would \
                     match keys outside the prefix"
                ),
            ));
        }
        issues
    }

    fn build(_spec: RedisSpec) -> Result<Arc<dyn ServiceAdapter>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the redis service's implementation is not built yet; its spec is validated",
        )
        .with_operation("service.build"))
    }
}

/// Registers the `redis` service kind.
pub fn register_redis_service(catalog: &mut Catalog) -> Result<()> {
    catalog.services.register_kind::<RedisKind>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<RedisKind>(), &example_with::<RedisKind>(changes), path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<RedisKind>();
        nexus_testkit::schema_fields_are_documented::<RedisKind>();
        nexus_testkit::unknown_field_is_refused::<RedisKind>("db");
        nexus_testkit::build_is_unsupported::<RedisKind>();
        nexus_testkit::registers_once::<RedisKind>(register_redis_service);
    }

    #[test]
    fn a_url_alone_is_enough() {
        let spec: RedisSpec = serde_json::from_value(json!({"url": "rediss://cache.internal:6380/3"})).unwrap();
        assert!(RedisKind::validate(&spec).is_empty());
    }

    #[test]
    fn url_needs_a_redis_scheme() {
        check(json!({"url": "http://cache:6379"}), &["url"], "`redis://` or `rediss://`");
        check(json!({"url": "cache:6379"}), &["url"], "not a URL");
    }

    #[test]
    fn url_must_not_carry_the_password() {
        check(json!({"url": "redis://:{{ secrets.redis_password }}@cache:6379"}), &["url"], "`password`");
    }

    #[test]
    fn url_path_is_a_database_number_given_once() {
        check(json!({"url": "redis://cache:6379/sessions", "database": null}), &["url"], "database number");
        check(json!({"url": "redis://cache:6379/2"}), &["database"], "already selects database 2");
    }

    #[test]
    fn password_must_be_a_secret_reference() {
        check(json!({"password": "hunter2"}), &["password"], "{{ secrets.redis_password }}");
    }

    #[test]
    fn key_prefix_has_no_pattern_characters() {
        check(json!({"key_prefix": "app:*"}), &["key_prefix"], "outside the prefix");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut spec = RedisKind::example();
        spec.password = Some("s3cr3t-pa55".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t-pa55"]);
        assert!(shown.contains("password: Some(\"***\")"), "{shown}");
    }
}
