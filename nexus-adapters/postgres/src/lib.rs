//! The `postgres` service kind of Nexus: a PostgreSQL database.
//!
//! Its health check connects and runs a trivial query; pipelines call its `query`,
//! `backup` and `restore` actions. This crate holds the kind's spec, its pure
//! validation and its registration; the driver comes in a later issue, so
//! [`PostgresKind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::model::Duration;
use nexus_core::traits::ServiceAdapter;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const POSTGRES_KIND: &str = "postgres";

/// The settings of a `postgres` service.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    /// Host name or IP address of the server, or the directory of its Unix socket
    /// (`/var/run/postgresql`); not a URL.
    #[schemars(length(min = 1))]
    pub host: String,
    /// TCP port of the server.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Name of the database.
    #[schemars(length(min = 1))]
    pub database: String,
    /// Role to connect as.
    #[schemars(length(min = 1))]
    pub user: String,
    /// Password of `user`, as a reference such as `{{ secrets.db_password }}` (never a
    /// literal); absent for `trust`, `peer` or certificate authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub password: Option<String>,
    /// Whether and how TLS is used, as libpq's `sslmode`.
    #[serde(default)]
    pub sslmode: SslMode,
    /// Time limit of establishing a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
}

/// Whether and how the connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without verifying its certificate.
    #[default]
    Prefer,
    /// Always use TLS, without verifying the server's certificate.
    Require,
    /// Always use TLS, verify the certificate chain and that it names `host`.
    VerifyFull,
}

fn default_port() -> u16 {
    5432
}

impl fmt::Debug for PostgresSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSpec")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sslmode", &self.sslmode)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// The `postgres` service kind.
pub struct PostgresKind;

impl ComponentKind for PostgresKind {
    type Trait = dyn ServiceAdapter;
    type Spec = PostgresSpec;
    const KIND: &'static str = POSTGRES_KIND;
    const DESCRIPTION: &'static str = "A PostgreSQL database: health, queries, backups and restores.";
    const ACTIONS: &'static [&'static str] = &["health", "query", "backup", "restore"];

    fn example() -> PostgresSpec {
        PostgresSpec {
            host: "{{ env.vars.db_host }}".to_owned(),
            port: 5432,
            database: "app".to_owned(),
            user: "app".to_owned(),
            password: Some("{{ secrets.db_password }}".to_owned()),
            sslmode: SslMode::Require,
            connect_timeout: Some(Duration(std::time::Duration::from_secs(10))),
        }
    }

    fn validate(spec: &PostgresSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        let host = spec.host.as_str();
        if !is_template(host) {
            if host.contains("://") {
                issues.push(SpecIssue::new(
                    &["host"],
                    format!(
                        "`{host}` is a URL; give the host name only, and the rest in `port`, `database` and `user`"
                    ),
                ));
            } else if host.contains(char::is_whitespace) {
                issues.push(SpecIssue::new(&["host"], format!("`{host}` must not contain spaces")));
            } else if let Some((_, port)) =
                host.split_once(':').filter(|(_, port)| !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()))
            {
                issues.push(SpecIssue::new(&["host"], format!("give the port in `port: {port}`, not in `host`")));
            }
        }
        if let Some(password) = &spec.password {
            check_secret_ref(&mut issues, &["password"], password);
        }
        if spec.connect_timeout.is_some_and(|t| t.get().is_zero()) {
            issues.push(SpecIssue::new(&["connect_timeout"], "the timeout must be longer than zero"));
        }
        issues
    }

    fn build(_spec: PostgresSpec) -> Result<Arc<dyn ServiceAdapter>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the postgres service's implementation is not built yet; its spec is validated",
        )
        .with_operation("service.build"))
    }
}

/// Registers the `postgres` service kind.
pub fn register_postgres_service(catalog: &mut Catalog) -> Result<()> {
    catalog.services.register_kind::<PostgresKind>()
}

/// Whether `value` holds a template, whose rendered form cannot be checked yet.
fn is_template(value: &str) -> bool {
    value.contains("{{")
}

/// Checks that a credential is a `{{ secrets.* }}` reference, never a literal. The
/// message never repeats the value.
fn check_secret_ref(issues: &mut Vec<SpecIssue>, path: &[&str], value: &str) {
    if !(is_template(value) && value.contains("secrets.")) {
        issues.push(SpecIssue::new(
            path,
            "write the credential as a reference such as `{{ secrets.db_password }}` and declare it in \
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
        KindDescriptor::of::<PostgresKind>()
    }

    /// The example with `changes` applied: each key is set, or removed when `null`.
    fn example_with(changes: Value) -> Value {
        let mut spec = serde_json::to_value(PostgresKind::example()).unwrap();
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
        assert_eq!(d.actions, ["health", "query", "backup", "restore"]);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: PostgresSpec =
            serde_json::from_value(json!({"host": "localhost", "database": "app", "user": "app"})).unwrap();
        assert_eq!(spec.port, 5432);
        assert_eq!(spec.sslmode, SslMode::Prefer);
        assert!(PostgresKind::validate(&spec).is_empty());
    }

    #[test]
    fn every_field_is_documented_in_the_schema() {
        let schema = descriptor().spec_schema;
        for (name, property) in schema["properties"].as_object().unwrap() {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "`{name}` has no description");
        }
    }

    #[test]
    fn sslmode_takes_libpq_names() {
        let spec = example_with(json!({"sslmode": "verify-full"}));
        assert!(descriptor().validate(&spec).is_empty());
        let issues = descriptor().validate(&example_with(json!({"sslmode": "verify_full"})));
        assert!(issues[0].message.contains("unknown variant `verify_full`"), "{issues:#?}");
    }

    #[test]
    fn host_is_a_host_name_not_a_url_or_an_address_with_port() {
        check(example_with(json!({"host": "postgres://db.internal/app"})), &["host"], "is a URL");
        check(example_with(json!({"host": "db.internal:6432"})), &["host"], "`port: 6432`");
        check(example_with(json!({"host": "db internal"})), &["host"], "spaces");
        for fine in ["::1", "/var/run/postgresql", "10.0.0.5", "{{ env.vars.db_host }}:{{ env.vars.db_port }}"] {
            assert!(descriptor().validate(&example_with(json!({"host": fine}))).is_empty(), "{fine}");
        }
    }

    #[test]
    fn password_must_be_a_secret_reference() {
        check(example_with(json!({"password": "hunter2"})), &["password"], "{{ secrets.");
        check(example_with(json!({"password": "{{ env.vars.db_password }}"})), &["password"], "in clear");
        let issues = descriptor().validate(&example_with(json!({"password": "hunter2"})));
        assert!(!issues[0].message.contains("hunter2"), "{issues:#?}");
    }

    #[test]
    fn connect_timeout_must_be_positive() {
        check(example_with(json!({"connect_timeout": "0s"})), &["connect_timeout"], "longer than zero");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let issues = descriptor().validate(&example_with(json!({"dbname": "app"})));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(issues[0].message.contains("unknown field `dbname`"), "{issues:#?}");
        let schema = jsonschema::validator_for(&descriptor().spec_schema).unwrap();
        assert!(!schema.is_valid(&example_with(json!({"dbname": "app"}))));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut spec = PostgresKind::example();
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
        register_postgres_service(&mut catalog).unwrap();
        assert_eq!(catalog.services.get(POSTGRES_KIND).unwrap().kind, "postgres");
    }
}
