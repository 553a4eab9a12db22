//! The `email` notifier kind of Nexus: notifications sent through an SMTP server.
//!
//! One message per notification, through `lettre` (STARTTLS, TLS from the first byte, or
//! plain for a relay on the same host; optional authentication): the subject is
//! `subject_prefix` and the title; the body is `multipart/alternative` with a plain-text
//! part (the body, the facts, the log tail and the link) and an HTML part (the same, all
//! escaped, with the facts in a table and the log tail in `<pre>`). A `templated`
//! notification's body is the message as it is (and, in HTML, that text in `<pre>`).
//! Headers `X-Nexus-Dedup-Key` and `X-Nexus-Status` (`firing` or `resolved`) help mail
//! filters; the receipt holds the `Message-ID`.
//!
//! One attempt per send: a connection that fails, a timeout and a transient (4xx) SMTP
//! reply are retryable; a permanent (5xx) reply is not (`PermissionDenied` for refused
//! authentication), nor is a TLS or protocol mismatch.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use nexus_core::model::{Duration, Severity};
use nexus_core::spec::{
    check_non_empty, check_positive_duration, check_secret_ref, check_single_line, check_together, is_template,
};
use nexus_core::traits::{Notification, Notifier, Receipt};
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
    /// Time limit of one send: connecting, TLS and the whole SMTP exchange; 30 s when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
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
            .field("timeout", &self.timeout)
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
            timeout: Some(Duration(std::time::Duration::from_secs(10))),
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
        check_positive_duration(&mut issues, &["timeout"], spec.timeout, "timeout");
        issues
    }

    fn build(spec: EmailSpec) -> Result<Arc<dyn Notifier>> {
        Ok(Arc::new(EmailNotifier::new(spec)?))
    }
}

/// Registers the `email` notifier kind.
pub fn register_email_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<EmailKind>()
}

/// The time limit of one send when the spec gives none.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `email` notifier.
pub struct EmailNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    host: String,
    port: u16,
    from: Mailbox,
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    subject_prefix: Option<String>,
    timeout: std::time::Duration,
}

impl fmt::Debug for EmailNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailNotifier")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

fn build_error(message: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, message).with_operation("notifier.build").with_context("channel", EMAIL_KIND)
}

fn mailbox(field: &str, text: &str) -> Result<Mailbox> {
    text.parse().map_err(|e| build_error(format!("`{field}`: `{text}` is not an email address ({e})")))
}

impl EmailNotifier {
    /// A notifier for `spec`, whose templates are already rendered. Nothing is
    /// connected before the first send.
    pub fn new(spec: EmailSpec) -> Result<Self> {
        let host = spec.host.trim().to_owned();
        let tls_error = |e: lettre::transport::smtp::Error| build_error(format!("cannot set up TLS for `{host}`: {e}"));
        let builder = match spec.tls {
            Tls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host),
            Tls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host).map_err(tls_error)?,
            Tls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&host).map_err(tls_error)?,
        };
        let timeout = spec.timeout.map_or(DEFAULT_TIMEOUT, Duration::get);
        // lettre's own limit covers connecting only; `send` bounds the whole exchange.
        let mut builder = builder.port(spec.port).timeout(Some(timeout));
        if let (Some(username), Some(password)) = (spec.username, spec.password) {
            builder = builder.credentials(Credentials::new(username, password));
        }
        let to = spec.to.iter().map(|t| mailbox("to", t)).collect::<Result<Vec<_>>>()?;
        if to.is_empty() {
            return Err(build_error("`to`: give at least one recipient".to_owned()));
        }
        Ok(EmailNotifier {
            transport: builder.build(),
            from: mailbox("from", &spec.from)?,
            to,
            cc: spec.cc.iter().map(|c| mailbox("cc", c)).collect::<Result<Vec<_>>>()?,
            subject_prefix: spec.subject_prefix,
            timeout,
            host,
            port: spec.port,
        })
    }

    /// The message for `notification`, ready to send.
    pub fn message(&self, notification: &Notification) -> Result<Message> {
        let subject = match &self.subject_prefix {
            Some(prefix) => format!("{prefix} {}", notification.title),
            None => notification.title.clone(),
        };
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(one_line(&subject))
            .message_id(None)
            .header(DedupKey(one_line(&notification.dedup_key)))
            .header(Status(if notification.resolve { "resolved" } else { "firing" }.to_owned()));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        for cc in &self.cc {
            builder = builder.cc(cc.clone());
        }
        let (text, html) = bodies(notification);
        builder
            .multipart(
                MultiPart::alternative()
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(text))
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(html)),
            )
            .map_err(|e| {
                Error::new(ErrorKind::InvalidConfig, format!("cannot write the message: {e}"))
                    .with_operation("notify.send")
                    .with_context("channel", EMAIL_KIND)
                    .with_context("host", &self.host)
            })
    }

    fn send_error(&self, e: lettre::transport::smtp::Error) -> Error {
        let code = e.status().map(|c| c.to_string());
        let (kind, retryable, what) = if e.is_transient() {
            (ErrorKind::Unavailable, true, "refused the message for now (transient SMTP error); try again later")
        } else if e.is_permanent() && matches!(code.as_deref(), Some("530" | "534" | "535" | "538")) {
            (ErrorKind::PermissionDenied, false, "refused the authentication; check `username` and `password`")
        } else if e.is_permanent() {
            (ErrorKind::InvalidConfig, false, "refused the message (permanent SMTP error); check `from` and `to`")
        } else if e.is_timeout() {
            (ErrorKind::Timeout, true, "did not answer in time")
        } else if e.is_tls() || io_error_kind(&e) == Some(std::io::ErrorKind::InvalidData) {
            // rustls reports a failed handshake (a certificate refused, a server that
            // does not speak TLS on that port) as invalid data.
            (ErrorKind::InvalidConfig, false, "failed the TLS handshake; check `tls`, `port` and its certificate")
        } else if e.is_client() {
            (ErrorKind::InvalidConfig, false, "cannot be used as configured; check `tls`, `port` and the credentials")
        } else {
            (ErrorKind::Unavailable, true, "cannot be reached")
        };
        self.server_error(kind, what).set_retryable(retryable).with_source(e)
    }

    /// An error of a send saying that the SMTP server `what`, naming it (`host:port`).
    fn server_error(&self, kind: ErrorKind, what: &str) -> Error {
        let server = format!("{}:{}", self.host, self.port);
        Error::new(kind, format!("the SMTP server {server} {what}"))
            .with_operation("notify.send")
            .with_context("channel", EMAIL_KIND)
            .with_context("host", server)
    }
}

#[async_trait]
impl Notifier for EmailNotifier {
    async fn send(&self, notification: &Notification) -> Result<Receipt> {
        let message = self.message(notification)?;
        let id = message.headers().get_raw("Message-ID").map(str::to_owned);
        tokio::time::timeout(self.timeout, self.transport.send(message))
            .await
            .map_err(|_| {
                let what = format!("did not finish the exchange within {:?}", self.timeout);
                self.server_error(ErrorKind::Timeout, &what)
            })?
            .map_err(|e| self.send_error(e))?;
        Ok(Receipt::new(id, None))
    }
}

/// The kind of the first I/O error in `e`'s chain of sources.
fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = err.source();
    }
    None
}

/// A header type holding a text value, named `$name`.
macro_rules! text_header {
    ($(#[$doc:meta])* $type:ident, $name:literal) => {
        $(#[$doc])*
        #[derive(Clone)]
        struct $type(String);

        impl Header for $type {
            fn name() -> HeaderName {
                HeaderName::new_from_ascii_str($name)
            }
            fn parse(s: &str) -> std::result::Result<Self, Box<dyn std::error::Error + Send + Sync>> {
                Ok($type(s.to_owned()))
            }
            fn display(&self) -> HeaderValue {
                HeaderValue::new(Self::name(), self.0.clone())
            }
        }
    };
}

text_header!(
    /// `X-Nexus-Dedup-Key`: the notification's dedup key, for mail filters.
    DedupKey,
    "X-Nexus-Dedup-Key"
);
text_header!(
    /// `X-Nexus-Status`: `firing`, or `resolved` for a notification that resolves.
    Status,
    "X-Nexus-Status"
);

/// `text` on one line (a header cannot hold a line break).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Escapes text for HTML content and attribute values.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The plain-text and HTML bodies of `notification`.
pub fn bodies(notification: &Notification) -> (String, String) {
    if notification.templated {
        let html = format!(
            "<!DOCTYPE html>\n<html><body>\n<pre style=\"font-family: monospace; white-space: pre-wrap\">{}</pre>\n</body></html>\n",
            escape_html(&notification.body)
        );
        return (notification.body.clone(), html);
    }
    let (status, colour) = match (notification.resolve, notification.severity) {
        (true, _) => ("Resolved", "#2e7d32"),
        (false, Severity::Critical) => ("Critical", "#b71c1c"),
        (false, Severity::Error) => ("Failed", "#c62828"),
        (false, Severity::Warning) => ("Warning", "#ef6c00"),
        (false, Severity::Info) => ("Info", "#1565c0"),
    };
    let mut text = format!("{status}: {}\n", notification.title);
    let mut html = format!(
        "<!DOCTYPE html>\n<html><body style=\"font-family: sans-serif\">\n<h2 style=\"color: {colour}\">{status}: {}</h2>\n",
        escape_html(&notification.title)
    );
    if !notification.lead().trim().is_empty() {
        text.push_str(&format!("\n{}\n", notification.lead()));
        let paragraphs = escape_html(notification.lead()).replace('\n', "<br>\n");
        html.push_str(&format!("<p>{paragraphs}</p>\n"));
    }
    if !notification.facts.is_empty() {
        let width = notification.facts.iter().map(|(name, _)| name.chars().count()).max().unwrap_or(0) + 1;
        text.push('\n');
        html.push_str("<table style=\"border-collapse: collapse\">\n");
        for (name, value) in &notification.facts {
            text.push_str(&format!("{:<width$} {value}\n", format!("{name}:")));
            html.push_str(&format!(
                "<tr><th style=\"text-align: left; padding: 2px 12px 2px 0\">{}</th><td>{}</td></tr>\n",
                escape_html(name),
                escape_html(value)
            ));
        }
        html.push_str("</table>\n");
    }
    if !notification.log_tail.is_empty() {
        text.push_str("\nLast log lines:\n");
        for line in &notification.log_tail {
            text.push_str(&format!("    {line}\n"));
        }
        let lines: Vec<String> = notification.log_tail.iter().map(|l| escape_html(l)).collect();
        html.push_str(&format!(
            "<h3>Last log lines</h3>\n<pre style=\"background: #f5f5f5; padding: 8px\">{}</pre>\n",
            lines.join("\n")
        ));
    }
    if let Some(url) = notification.web_link() {
        text.push_str(&format!("\nOpen the run: {url}\n"));
        html.push_str(&format!("<p><a href=\"{}\">Open the run</a></p>\n", escape_html(url)));
    } else if let Some(command) = &notification.link {
        text.push_str(&format!("\nInspect with: {command}\n"));
        html.push_str(&format!("<p>Inspect with <code>{}</code></p>\n", escape_html(command)));
    }
    html.push_str("</body></html>\n");
    (text, html)
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
    use nexus_core::model::Severity;
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
        nexus_testkit::notifier::builds::<EmailKind>(json!({"host": "smtp.example.com", "password": "s3cr3t-pa55"}));
        nexus_testkit::notifier::builds::<EmailKind>(
            json!({"host": "127.0.0.1", "tls": "none", "password": null, "username": null}),
        );
        nexus_testkit::notifier::builds::<EmailKind>(json!({"host": "smtp.example.com", "tls": "tls", "port": 465}));
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
    fn timeout_must_be_positive() {
        check(json!({"timeout": "0s"}), &["timeout"], "longer than zero");
    }

    fn notification() -> Notification {
        let mut n = Notification::new("deploy <b>&</b> failed", "step \"api\" failed", Severity::Error, "k");
        n.facts = vec![("Pipeline".to_owned(), "<script>x</script>".to_owned())];
        n.log_tail = vec!["error: a < b".to_owned()];
        n.link = Some("https://nexus.test/runs/1?a=1&b=2".to_owned());
        n
    }

    #[test]
    fn html_escapes_everything_it_shows() {
        let (text, html) = bodies(&notification());
        assert!(text.contains("Pipeline: <script>x</script>") && text.contains("    error: a < b"), "{text}");
        assert!(!html.contains("<script>") && !html.contains("<b>"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;") && html.contains("error: a &lt; b"), "{html}");
        assert!(html.contains("href=\"https://nexus.test/runs/1?a=1&amp;b=2\""), "{html}");
        assert!(html.contains("step &quot;api&quot; failed"), "{html}");
    }

    #[test]
    fn a_templated_body_is_the_text_and_the_html_shows_it_escaped() {
        let mut n = notification();
        n.templated = true;
        n.body = "Deploy <failed>\nsee runbook".to_owned();
        let (text, html) = bodies(&n);
        assert_eq!(text, n.body);
        assert!(html.contains("Deploy &lt;failed&gt;\nsee runbook</pre>"), "{html}");
    }

    #[test]
    fn the_subject_is_the_prefix_and_the_title_on_one_line() {
        let mut spec = EmailKind::example();
        spec.host = "smtp.example.com".to_owned();
        let notifier = EmailNotifier::new(spec).unwrap();
        let mut n = notification();
        n.title = "deploy\r\nBcc: x@evil.test failed".to_owned();
        let message = notifier.message(&n).unwrap();
        assert_eq!(message.headers().get_raw("Subject"), Some("[nexus] deploy Bcc: x@evil.test failed"));
        assert_eq!(message.headers().get_raw("X-Nexus-Status"), Some("firing"));
        assert!(message.headers().get_raw("Message-ID").is_some_and(|id| id.starts_with('<')));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut spec = EmailKind::example();
        spec.password = Some("s3cr3t-pa55".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t-pa55"]);
        assert!(shown.contains("password: Some(\"***\")"), "{shown}");
    }
}
