//! The `postgres` service kind of Nexus: a PostgreSQL database.
//!
//! Its health check connects and runs a trivial query; pipelines call its `query`,
//! `backup` and `restore` actions. This crate holds the kind's spec, its pure
//! validation and its registration; the driver comes in a later issue, so
//! [`PostgresKind::build`] returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::model::Duration;
use nexus_core::spec::{check_positive_duration, check_secret_ref, is_template};
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
            check_secret_ref(&mut issues, &["password"], password, "db_password");
        }
        check_positive_duration(&mut issues, &["connect_timeout"], spec.connect_timeout, "timeout");
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

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) -> SpecIssue {
        assert_single_issue(&descriptor::<PostgresKind>(), &example_with::<PostgresKind>(changes), path, needle)
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<PostgresKind>();
        nexus_testkit::schema_fields_are_documented::<PostgresKind>();
        nexus_testkit::unknown_field_is_refused::<PostgresKind>("dbname");
        nexus_testkit::build_is_unsupported::<PostgresKind>();
        nexus_testkit::registers_once::<PostgresKind>(register_postgres_service);
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
    fn sslmode_takes_libpq_names() {
        assert_valid(&descriptor::<PostgresKind>(), &example_with::<PostgresKind>(json!({"sslmode": "verify-full"})));
        check(json!({"sslmode": "verify_full"}), &[], "unknown variant `verify_full`");
    }

    #[test]
    fn host_is_a_host_name_not_a_url_or_an_address_with_port() {
        check(json!({"host": "postgres://db.internal/app"}), &["host"], "is a URL");
        check(json!({"host": "db.internal:6432"}), &["host"], "`port: 6432`");
        check(json!({"host": "db internal"}), &["host"], "spaces");
        for fine in ["::1", "/var/run/postgresql", "10.0.0.5", "{{ env.vars.db_host }}:{{ env.vars.db_port }}"] {
            assert_valid(&descriptor::<PostgresKind>(), &example_with::<PostgresKind>(json!({"host": fine})));
        }
    }

    #[test]
    fn password_must_be_a_secret_reference() {
        let issue = check(json!({"password": "hunter2"}), &["password"], "{{ secrets.db_password }}");
        assert!(!issue.message.contains("hunter2"), "{issue:#?}");
        check(json!({"password": "{{ env.vars.db_password }}"}), &["password"], "in clear");
    }

    #[test]
    fn connect_timeout_must_be_positive() {
        check(json!({"connect_timeout": "0s"}), &["connect_timeout"], "longer than zero");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut spec = PostgresKind::example();
        spec.password = Some("s3cr3t-pa55".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t-pa55"]);
        assert!(shown.contains("password: Some(\"***\")"), "{shown}");
    }
}
