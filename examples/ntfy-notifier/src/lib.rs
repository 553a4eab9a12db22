//! Example Nexus plugin: the `ntfy` notifier, which publishes notifications to a topic
//! of an [ntfy](https://ntfy.sh) server (self-hosted or ntfy.sh), so an operator gets
//! pipeline failures as push notifications on a phone or desktop.
//!
//! The same crate is used two ways (see `docs/plugins.md`):
//! - built as a `cdylib` (`cargo build --release -p nexus-notify-ntfy`) and dropped into
//!   a plugin directory, where the stock `nexus` loads it;
//! - linked statically into a custom `nexus` (`cargo build -p nexus-cli --features
//!   example-plugin`), through [`register`].
//!
//! Mapping: the title is ntfy's `title`, the body (then the facts, then the last log
//! lines) its `message`, severity its `priority` (info 3, warning 4, error and critical
//! 5) and a tag, a resolved notification gets the `white_check_mark` tag, and the link
//! becomes the `click` action when it is a URL. HTTP 429 and 5xx are retryable (with
//! `Retry-After`); other refusals are not.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nexus_core::model::Severity;
use nexus_core::spec::{check_not_blank, check_secret_ref, check_url, is_template};
use nexus_core::traits::{Notification, Notifier, Receipt};
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The kind's name in `monitoring_registry.yaml`.
pub const NTFY_KIND: &str = "ntfy";

/// The server used when the spec names none.
pub const DEFAULT_SERVER: &str = "https://ntfy.sh";

/// The settings of an `ntfy` channel.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NtfySpec {
    /// Base URL of the ntfy server (`https://ntfy.example.com`); `https://ntfy.sh` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub server: Option<String>,
    /// The topic to publish to (letters, digits, `_` and `-`); anyone who knows a topic on
    /// a public server can read it, so pick an unguessable one or use `token`.
    #[schemars(length(min = 1, max = 64))]
    pub topic: String,
    /// Access token for a protected topic, as a reference such as
    /// `{{ secrets.ntfy_token }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub token: Option<String>,
    /// Extra tags (emoji short codes such as `rocket`) added to every message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Time limit of one request, in seconds (10 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_secs: Option<u64>,
}

impl fmt::Debug for NtfySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NtfySpec")
            .field("server", &self.server)
            .field("topic", &self.topic)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tags", &self.tags)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

/// The `ntfy` notifier kind.
pub struct NtfyKind;

impl ComponentKind for NtfyKind {
    type Trait = dyn Notifier;
    type Spec = NtfySpec;
    const KIND: &'static str = NTFY_KIND;
    const DESCRIPTION: &'static str = "publishes notifications to an ntfy topic (push to phones and desktops)";

    fn example() -> NtfySpec {
        NtfySpec {
            server: Some("https://ntfy.example.com".into()),
            topic: "platform-alerts".into(),
            token: Some("{{ secrets.ntfy_token }}".into()),
            tags: vec!["nexus".into()],
            timeout_secs: None,
        }
    }

    fn validate(spec: &NtfySpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        if let Some(server) = &spec.server {
            check_url(&mut issues, &["server"], server, &["http", "https"], Some("use `token` for credentials"));
        }
        if check_not_blank(&mut issues, &["topic"], &spec.topic, "topic", "name the topic to publish to")
            && !is_template(&spec.topic)
            && !spec.topic.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            issues.push(SpecIssue::new(
                &["topic"],
                format!("`{}` is not an ntfy topic: use only letters, digits, `_` and `-`", spec.topic),
            ));
        }
        if let Some(token) = &spec.token {
            check_secret_ref(&mut issues, &["token"], token, "ntfy_token");
        }
        issues
    }

    fn build(spec: NtfySpec) -> Result<Arc<dyn Notifier>> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(spec.timeout_secs.unwrap_or(10)))
            .user_agent(concat!("nexus-notify-ntfy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Internal, "cannot set up the HTTP client of an ntfy channel")
                    .with_operation("notifier.build")
                    .with_source(e)
            })?;
        Ok(Arc::new(NtfyNotifier { spec, client }))
    }
}

/// Registers the `ntfy` notifier kind (for a statically linked `nexus`).
pub fn register(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<NtfyKind>()
}

// The same crate as a plugin library: this one line is all the plugin-specific code.
nexus_plugin::export_plugin!(notifier: NtfyKind);

struct NtfyNotifier {
    spec: NtfySpec,
    client: reqwest::Client,
}

/// ntfy's priority for a severity (1 min … 5 urgent).
fn priority(severity: Severity) -> u8 {
    match severity {
        Severity::Info => 3,
        Severity::Warning => 4,
        Severity::Error | Severity::Critical => 5,
    }
}

/// The JSON message ntfy's publish endpoint takes.
pub fn message(spec: &NtfySpec, n: &Notification) -> Value {
    let mut text = n.body.clone();
    if !n.templated {
        for (k, v) in &n.facts {
            text.push_str(&format!("\n{k}: {v}"));
        }
        if !n.log_tail.is_empty() {
            text.push_str("\n\nlast log lines:\n");
            text.push_str(&n.log_tail.join("\n"));
        }
    }
    let mut tags = spec.tags.clone();
    tags.push(if n.resolve { "white_check_mark".into() } else { format!("{:?}", n.severity).to_lowercase() });
    let mut doc = json!({
        "topic": spec.topic,
        "title": n.title,
        "message": text,
        "priority": if n.resolve { 3 } else { priority(n.severity) },
        "tags": tags,
    });
    if let Some(link) = n.web_link() {
        doc["click"] = json!(link);
    }
    doc
}

#[async_trait]
impl Notifier for NtfyNotifier {
    async fn send(&self, n: &Notification) -> Result<Receipt> {
        let server = self.spec.server.as_deref().unwrap_or(DEFAULT_SERVER).trim_end_matches('/');
        let host = server.split("://").nth(1).unwrap_or(server).split('/').next().unwrap_or_default().to_owned();
        let mut request = self.client.post(server).json(&message(&self.spec, n));
        if let Some(token) = &self.spec.token {
            request = request.bearer_auth(token);
        }
        tracing::debug!(host = %host, topic = %self.spec.topic, "publishing to ntfy");
        let response = request.send().await.map_err(|e| {
            Error::new(ErrorKind::Unavailable, format!("ntfy server {host} did not answer"))
                .with_operation("notify.send")
                .with_context("host", &host)
                .with_source(e.without_url())
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let quoted: String = body.chars().take(300).collect();
            let kind = match status.as_u16() {
                401 | 403 => ErrorKind::PermissionDenied,
                404 => ErrorKind::NotFound,
                429 | 500..=599 => ErrorKind::Unavailable,
                _ => ErrorKind::InvalidConfig,
            };
            let mut e = Error::new(kind, format!("ntfy server {host} refused the message: HTTP {status}: {quoted}"))
                .with_operation("notify.send")
                .with_context("host", &host)
                .with_context("status", status.as_u16());
            if let Some(wait) = retry_after {
                e = e.with_retry_after(wait);
            }
            tracing::warn!(host = %host, status = status.as_u16(), "ntfy refused a message");
            return Err(e);
        }
        let id = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["id"].as_str().map(str::to_owned));
        tracing::info!(host = %host, topic = %self.spec.topic, id = id.as_deref().unwrap_or("-"), "published to ntfy");
        Ok(Receipt::new(id, Some(n.dedup_key.clone())))
    }
}
