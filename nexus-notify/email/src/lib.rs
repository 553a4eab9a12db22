//! The `email` notifier kind of Nexus: notifications sent through an SMTP server.
//!
//! This crate holds the kind's spec, its pure validation and its registration; the SMTP
//! client comes in a later issue, so [`EmailKind::build`] returns an `Unsupported`
//! error.

use std::fmt;
use std::sync::Arc;

use nexus_core::spec::{check_non_empty, check_secret_ref, check_single_line, check_together, is_template};
use nexus_core::traits::Notifier;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const EMAIL_KIND: &str = "email";

/// The settings of an `email` channel.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailSpec {
    /// Host name of the SMTP server (not a URL).
    #[schemars(length(min = 1))]
    pub host: String,
    /// TCP port of the SMTP server: usually 587 with `starttls`, 465 with `tls`, 25
    /// between servers.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// How the connection is encrypted.
    #[serde(default)]
    pub tls: Tls,
    /// User name for SMTP authentication, given together with `password`; no
    /// authentication when both are absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub username: Option<String>,
    /// Password for SMTP authentication, as a reference such as
    /// `{{ secrets.smtp_password }}` (never a literal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub password: Option<String>,
    /// Sender: `nexus@example.com` or `Nexus <nexus@example.com>`.
    #[schemars(length(min = 1))]
    pub from: String,
    /// Recipients, one address per item.
    #[schemars(length(min = 1))]
    pub to: Vec<String>,
    /// Recipients in copy, one address per item.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<String>,
    /// Text put before every subject, such as `[nexus]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub subject_prefix: Option<String>,
}

/// How the SMTP connection is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// No encryption: only for a relay on the same host or a test server.
    None,
    /// Plain connection upgraded with `STARTTLS`, which the server must offer.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

fn default_port() -> u16 {
    587
}

impl fmt::Debug for EmailSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailSpec")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("from", &self.from)
            .field("to", &self.to)
            .field("cc", &self.cc)
            .field("subject_prefix", &self.subject_prefix)
            .finish()
    }
}

/// The `email` notifier kind.
pub struct EmailKind;

impl ComponentKind for EmailKind {
    type Trait = dyn Notifier;
    type Spec = EmailSpec;
    const KIND: &'static str = EMAIL_KIND;
    const DESCRIPTION: &'static str = "Email through an SMTP server (STARTTLS or TLS, optional authentication).";

    fn example() -> EmailSpec {
        EmailSpec {
            host: "{{ env.vars.smtp_host }}".to_owned(),
            port: 587,
            tls: Tls::Starttls,
            username: Some("nexus".to_owned()),
            password: Some("{{ secrets.smtp_password }}".to_owned()),
            from: "Nexus <nexus@example.com>".to_owned(),
            to: vec!["ops@example.com".to_owned()],
            cc: vec!["platform-leads@example.com".to_owned()],
            subject_prefix: Some("[nexus]".to_owned()),
        }
    }

    fn validate(spec: &EmailSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        if !is_template(&spec.host) && (spec.host.contains("://") || spec.host.contains(char::is_whitespace)) {
            issues.push(SpecIssue::new(
                &["host"],
                format!("`{}` is not a host name; give the host only, and the rest in `port` and `tls`", spec.host),
            ));
        }
        check_together(
            &mut issues,
            ("username", spec.username.is_some()),
            ("password", spec.password.is_some()),
            "to send without authentication",
        );
        if let Some(password) = &spec.password {
            check_secret_ref(&mut issues, &["password"], password, "smtp_password");
            if spec.tls == Tls::None {
                issues.push(SpecIssue::new(
                    &["tls"],
                    "`tls: none` would send the password in clear; use `starttls` or `tls`",
                ));
            }
        }
        check_address(&mut issues, &["from"], &spec.from);
        check_non_empty(&mut issues, &["to"], &spec.to, "recipient");
        for (field, list) in [("to", &spec.to), ("cc", &spec.cc)] {
            for (i, address) in list.iter().enumerate() {
                check_address(&mut issues, &[field, &i.to_string()], address);
            }
        }
        if let Some(prefix) = &spec.subject_prefix {
            check_single_line(&mut issues, &["subject_prefix"], prefix, "the subject prefix");
        }
        issues
    }

    fn build(_spec: EmailSpec) -> Result<Arc<dyn Notifier>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the email notifier's implementation is not built yet; its spec is validated",
        )
        .with_operation("notifier.build"))
    }
}

/// Registers the `email` notifier kind.
pub fn register_email_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<EmailKind>()
}

/// Checks that `text` looks like one email address, bare or as `Name <address>`
/// (templates are not checked).
fn check_address(issues: &mut Vec<SpecIssue>, path: &[&str], text: &str) {
    if is_template(text) {
        return;
    }
    let address = text.trim_end().strip_suffix('>').and_then(|t| t.rsplit_once('<')).map_or(text, |(_, a)| a);
    let problem = if address.contains([',', ';']) {
        "give one address per item"
    } else if text.contains(['\r', '\n']) {
        "an address must be a single line"
    } else {
        match address.split_once('@') {
            Some((local, domain))
                if !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.contains("..")
                    && !address.contains(char::is_whitespace) =>
            {
                return;
            }
            _ => "expected an address such as `ops@example.com` or `Ops <ops@example.com>`",
        }
    };
    issues.push(SpecIssue::new(path, format!("`{text}` is not an email address: {problem}")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<EmailKind>(), &example_with::<EmailKind>(changes), path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<EmailKind>();
        nexus_testkit::schema_fields_are_documented::<EmailKind>();
        nexus_testkit::unknown_field_is_refused::<EmailKind>("bcc");
        nexus_testkit::build_is_unsupported::<EmailKind>();
        nexus_testkit::registers_once::<EmailKind>(register_email_notifier);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: EmailSpec =
            serde_json::from_value(json!({"host": "localhost", "from": "nexus@localhost", "to": ["root@localhost"]}))
                .unwrap();
        assert_eq!(spec.port, 587);
        assert_eq!(spec.tls, Tls::Starttls);
        assert!(EmailKind::validate(&spec).is_empty());
    }

    #[test]
    fn host_is_a_host_name() {
        check(json!({"host": "smtp://mail.example.com"}), &["host"], "not a host name");
    }

    #[test]
    fn username_and_password_come_together() {
        check(json!({"password": null}), &["password"], "give both");
        check(json!({"username": null}), &["username"], "give both");
    }

    #[test]
    fn password_must_be_a_secret_reference_and_never_sent_in_clear() {
        check(json!({"password": "hunter2"}), &["password"], "{{ secrets.smtp_password }}");
        check(json!({"tls": "none"}), &["tls"], "in clear");
    }

    #[test]
    fn recipients_are_a_non_empty_list_of_addresses() {
        check(json!({"to": []}), &["to"], "at least one");
        check(json!({"to": ["ops@example.com", "oncall"]}), &["to", "1"], "not an email address");
        check(json!({"to": ["a@example.com, b@example.com"]}), &["to", "0"], "one address per item");
        check(json!({"cc": ["lead@@example.com"]}), &["cc", "0"], "not an email address");
        let fine = json!({"to": ["\"Ops, EU\" <ops-eu@example.com>", "{{ env.vars.oncall_email }}"]});
        assert_valid(&descriptor::<EmailKind>(), &example_with::<EmailKind>(fine));
    }

    #[test]
    fn sender_is_an_address() {
        check(json!({"from": "Nexus"}), &["from"], "not an email address");
        check(json!({"from": "Nexus <nexus@example.com>\r\nBcc: x@evil"}), &["from"], "single line");
    }

    #[test]
    fn subject_prefix_is_one_line() {
        check(json!({"subject_prefix": "[nexus]\nBcc: x@evil"}), &["subject_prefix"], "single line");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut spec = EmailKind::example();
        spec.password = Some("s3cr3t-pa55".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t-pa55"]);
        assert!(shown.contains("password: Some(\"***\")"), "{shown}");
    }
}
