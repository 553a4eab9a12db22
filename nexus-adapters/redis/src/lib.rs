//! The `redis` service kind of Nexus: a Redis (or Valkey) database.
//!
//! Its health check sends `PING`; pipelines call its `ping`, `set`, `get` and
//! `flush-prefix` actions, all confined to `key_prefix` when one is given. This crate
//! holds the kind's spec, its pure validation and its registration; the client comes
//! in a later issue, so [`RedisKind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

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
        check_url(&mut issues, &["url"], &spec.url, &["redis", "rediss"]);
        if issues.is_empty() && !is_template(&spec.url) {
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
            check_secret_ref(&mut issues, &["password"], password);
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
            "the URL must not carry credentials (`user:password@`), which would show in logs; put the password in \
             `password`",
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
            "write the credential as a reference such as `{{ secrets.redis_password }}` and declare it in \
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
        KindDescriptor::of::<RedisKind>()
    }

    /// The example with `changes` applied: each key is set, or removed when `null`.
    fn example_with(changes: Value) -> Value {
        let mut spec = serde_json::to_value(RedisKind::example()).unwrap();
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
        assert_eq!(d.actions, ["health", "ping", "flush-prefix", "set", "get"]);
    }

    #[test]
    fn a_url_alone_is_enough() {
        let spec: RedisSpec = serde_json::from_value(json!({"url": "rediss://cache.internal:6380/3"})).unwrap();
        assert!(RedisKind::validate(&spec).is_empty());
    }

    #[test]
    fn every_field_is_documented_in_the_schema() {
        let schema = descriptor().spec_schema;
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "`{name}` has no description");
        }
    }

    #[test]
    fn url_needs_a_redis_scheme() {
        check(example_with(json!({"url": "http://cache:6379"})), &["url"], "`redis://` or `rediss://`");
        check(example_with(json!({"url": "cache:6379"})), &["url"], "not a URL");
    }

    #[test]
    fn url_must_not_carry_the_password() {
        check(example_with(json!({"url": "redis://:{{ secrets.redis_password }}@cache:6379"})), &["url"], "`password`");
    }

    #[test]
    fn url_path_is_a_database_number_given_once() {
        check(
            example_with(json!({"url": "redis://cache:6379/sessions", "database": null})),
            &["url"],
            "database number",
        );
        check(example_with(json!({"url": "redis://cache:6379/2"})), &["database"], "already selects database 2");
    }

    #[test]
    fn password_must_be_a_secret_reference() {
        check(example_with(json!({"password": "hunter2"})), &["password"], "{{ secrets.");
    }

    #[test]
    fn key_prefix_has_no_pattern_characters() {
        check(example_with(json!({"key_prefix": "app:*"})), &["key_prefix"], "outside the prefix");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let issues = descriptor().validate(&example_with(json!({"db": 1})));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(issues[0].message.contains("unknown field `db`"), "{issues:#?}");
        let schema = jsonschema::validator_for(&descriptor().spec_schema).unwrap();
        assert!(!schema.is_valid(&example_with(json!({"db": 1}))));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut spec = RedisKind::example();
        spec.password = Some("s3cr3t-pa55".to_owned());
        let shown = format!("{spec:?}");
        assert!(!shown.contains("s3cr3t-pa55"), "{shown}");
        assert!(shown.contains("password: Some(\"***\")"), "{shown}");
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
        register_redis_service(&mut catalog).unwrap();
        assert_eq!(catalog.services.get(REDIS_KIND).unwrap().kind, "redis");
    }
}
