//! The `slack` notifier kind of Nexus: notifications posted to a Slack channel.
//!
//! A channel is reached in one of two ways: an incoming webhook (`webhook_url`), which
//! posts to the channel it was created for, or a bot token with `chat:write` (`token`)
//! and the `channel` to post to, through the Web API's `chat.postMessage`. Messages are
//! Block Kit: a header with a status emoji and the title, the body, the facts as
//! fields, the log tail in a code block, and a button to the run (or the command to
//! inspect it); the top-level `text` is always set, for notifications and old clients.
//! A `templated` notification's body is posted as it is (Slack `mrkdwn`).
//!
//! One attempt per send: HTTP 429, 5xx and the Web API's `ratelimited` are retryable
//! (with `Retry-After`); other refusals (`channel_not_found`, `invalid_auth`…) are not.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use nexus_core::model::{Duration, Severity};
use nexus_core::spec::{check_positive_duration, check_secret_ref, check_url, is_template};
use nexus_core::traits::{Notification, Notifier, Receipt};
use nexus_core::{Catalog, ComponentKind, ErrorKind, Result, SpecIssue};
use nexus_notify_webhook::http::{self, HttpChannel, truncate_chars};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The kind's name in `monitoring_registry.yaml`.
pub const SLACK_KIND: &str = "slack";

/// The Slack Web API that `chat.postMessage` is sent to unless `api_url` says otherwise.
pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// The most characters of a section's text (Block Kit's limit).
const SECTION_TEXT_MAX: usize = 3000;
/// The most fields of a section (Block Kit's limit).
const SECTION_FIELDS_MAX: usize = 10;
/// The most characters of one field (Block Kit's limit).
const FIELD_TEXT_MAX: usize = 2000;
/// The most characters of a header's text (Block Kit's limit).
const HEADER_TEXT_MAX: usize = 150;
/// The most blocks of a message (Block Kit's limit).
const BLOCKS_MAX: usize = 50;
/// The most characters of the top-level `text` (Slack truncates longer ones).
const TEXT_MAX: usize = 40_000;

/// The settings of a `slack` channel: `webhook_url`, or `token` and `channel`.
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackSpec {
    /// Incoming-webhook URL, as a reference such as `{{ secrets.slack_webhook_url }}`
    /// (the URL is itself a credential); messages go to the channel the webhook was
    /// created for. Not with `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub webhook_url: Option<String>,
    /// Bot token (`xoxb-…`) with the `chat:write` scope, as a reference such as
    /// `{{ secrets.slack_bot_token }}`; used with `channel`. Not with `webhook_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub token: Option<String>,
    /// Channel the bot posts to, by name (`#ops-alerts`) or id (`C0123456789`); only
    /// with `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub channel: Option<String>,
    /// Name shown as the sender (with a token, needs the `chat:write.customize` scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub username: Option<String>,
    /// Emoji shown as the sender's icon, such as `:rotating_light:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub icon_emoji: Option<String>,
    /// Base URL of the Slack Web API, used with `token`: `https://slack.com/api` when
    /// absent; change it for GovSlack (`https://slack-gov.com/api`) or a test double.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub api_url: Option<String>,
    /// Time limit of one request (10 s when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl fmt::Debug for SlackSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackSpec")
            .field("webhook_url", &self.webhook_url.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("channel", &self.channel)
            .field("username", &self.username)
            .field("icon_emoji", &self.icon_emoji)
            .field("api_url", &self.api_url)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The `slack` notifier kind.
pub struct SlackKind;

impl ComponentKind for SlackKind {
    type Trait = dyn Notifier;
    type Spec = SlackSpec;
    const KIND: &'static str = SLACK_KIND;
    const DESCRIPTION: &'static str = "Slack: an incoming webhook, or a bot token and a channel.";

    fn example() -> SlackSpec {
        SlackSpec {
            webhook_url: None,
            token: Some("{{ secrets.slack_bot_token }}".to_owned()),
            channel: Some("#ops-alerts".to_owned()),
            username: Some("Nexus".to_owned()),
            icon_emoji: Some(":robot_face:".to_owned()),
            api_url: None,
            timeout: Some(Duration(std::time::Duration::from_secs(10))),
        }
    }

    fn validate(spec: &SlackSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        match (&spec.webhook_url, &spec.token, &spec.channel) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            (Some(_), Some(_), _) => {
                issues.push(SpecIssue::new(&[], "give either `webhook_url`, or `token` and `channel`, not both forms"))
            }
            (Some(_), None, Some(_)) => issues.push(SpecIssue::new(
                &["channel"],
                "a webhook posts to the channel it was created for; remove `channel`, or use `token` instead of \
                 `webhook_url`",
            )),
            (None, Some(_), None) => {
                issues.push(SpecIssue::new(&["channel"], "`token` needs the `channel` to post to"));
            }
            (None, None, Some(_)) => issues.push(SpecIssue::new(
                &["token"],
                "`channel` needs a bot `token`; or give a `webhook_url` created for that channel instead",
            )),
            (None, None, None) => {
                issues.push(SpecIssue::new(&[], "give `webhook_url`, or `token` and `channel`"));
            }
        }
        if let Some(url) = &spec.webhook_url {
            check_secret_ref(&mut issues, &["webhook_url"], url, "slack_webhook_url");
        }
        if let Some(token) = &spec.token {
            check_secret_ref(&mut issues, &["token"], token, "slack_bot_token");
        }
        let spaced = |c: &&String| !is_template(c) && c.contains(char::is_whitespace);
        if let Some(channel) = spec.channel.as_ref().filter(spaced) {
            issues.push(SpecIssue::new(
                &["channel"],
                format!("`{channel}` is not a channel: a name (`#ops-alerts`) or an id has no spaces"),
            ));
        }
        if let Some(emoji) = spec.icon_emoji.as_ref().filter(|e| !is_template(e) && !is_emoji_code(e)) {
            issues.push(SpecIssue::new(
                &["icon_emoji"],
                format!("`{emoji}` is not an emoji code; write it between colons, such as `:rotating_light:`"),
            ));
        }
        if let Some(api_url) = &spec.api_url {
            check_url(&mut issues, &["api_url"], api_url, &["https", "http"], None);
            if spec.token.is_none() {
                issues.push(SpecIssue::new(&["api_url"], "`api_url` is used only with `token`; remove it"));
            }
        }
        check_positive_duration(&mut issues, &["timeout"], spec.timeout, "timeout");
        issues
    }

    fn build(spec: SlackSpec) -> Result<Arc<dyn Notifier>> {
        Ok(Arc::new(SlackNotifier::new(spec)?))
    }
}

/// Registers the `slack` notifier kind.
pub fn register_slack_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<SlackKind>()
}

/// Where a `slack` channel posts.
enum Target {
    /// An incoming webhook: answers `ok` as text.
    Webhook { url: String },
    /// `chat.postMessage` with a bot token: answers JSON `{"ok": …}` with HTTP 200.
    /// `headers` carry the token, built once (a token unfit for a header is a build
    /// error, not a failure of every send).
    Api { url: String, headers: reqwest::header::HeaderMap, channel: String },
}

/// The `slack` notifier.
pub struct SlackNotifier {
    http: HttpChannel,
    target: Target,
    username: Option<String>,
    icon_emoji: Option<String>,
}

impl fmt::Debug for SlackNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match &self.target {
            Target::Webhook { url } => format!("webhook {}", http::redacted_url(url)),
            Target::Api { url, channel, .. } => format!("{} to {channel}", http::redacted_url(url)),
        };
        f.debug_struct("SlackNotifier").field("target", &target).finish_non_exhaustive()
    }
}

impl SlackNotifier {
    /// A notifier for `spec`, whose templates are already rendered.
    pub fn new(spec: SlackSpec) -> Result<Self> {
        let target = match (spec.webhook_url, spec.token, spec.channel) {
            (Some(url), None, None) => Target::Webhook { url },
            (None, Some(token), Some(channel)) => {
                let api = spec.api_url.as_deref().unwrap_or(DEFAULT_API_URL).trim_end_matches('/');
                let headers = http::header_map(
                    SLACK_KIND,
                    [
                        ("authorization", format!("Bearer {token}").as_str()),
                        ("content-type", "application/json; charset=utf-8"),
                    ],
                )?;
                Target::Api { url: format!("{api}/chat.postMessage"), headers, channel }
            }
            _ => {
                return Err(nexus_core::Error::new(
                    ErrorKind::InvalidConfig,
                    "give `webhook_url`, or `token` and `channel`",
                )
                .with_operation("notifier.build")
                .with_context("channel", SLACK_KIND));
            }
        };
        Ok(SlackNotifier {
            http: HttpChannel::new(SLACK_KIND, spec.timeout.map(Duration::get))?,
            target,
            username: spec.username,
            icon_emoji: spec.icon_emoji,
        })
    }

    /// The JSON body for `notification` (without `channel`).
    pub fn message(&self, notification: &Notification) -> Value {
        let mut message = message(notification);
        if let Some(username) = &self.username {
            message["username"] = json!(username);
        }
        if let Some(icon) = &self.icon_emoji {
            message["icon_emoji"] = json!(icon);
        }
        message
    }
}

#[async_trait]
impl Notifier for SlackNotifier {
    async fn send(&self, notification: &Notification) -> Result<Receipt> {
        let mut message = self.message(notification);
        match &self.target {
            Target::Webhook { url } => {
                let body = serde_json::to_vec(&message).expect("a JSON value serializes");
                let reply = self.http.send(reqwest::Method::POST, url, Default::default(), body).await?;
                if !reply.is_success() {
                    return Err(self.http.status_error(url, &reply, &reply.body));
                }
                Ok(Receipt::new(None, None))
            }
            Target::Api { url, headers, channel } => {
                message["channel"] = json!(channel);
                let body = serde_json::to_vec(&message).expect("a JSON value serializes");
                let reply = self.http.send(reqwest::Method::POST, url, headers.clone(), body).await?;
                let answer: Option<Value> = serde_json::from_str(&reply.body).ok();
                let error = answer.as_ref().and_then(|a| a.get("error")).and_then(Value::as_str);
                if !reply.is_success() {
                    return Err(self.http.status_error(url, &reply, error.unwrap_or(&reply.body)));
                }
                let Some(answer) = &answer else {
                    return Err(http::refused(
                        SLACK_KIND,
                        url,
                        ErrorKind::Unavailable,
                        &format!("the answer is not JSON: {}", reply.body),
                        "is `api_url` the Slack Web API?",
                    ));
                };
                if answer.get("ok").and_then(Value::as_bool) != Some(true) {
                    let code = error.unwrap_or("no `ok` and no `error` in the answer");
                    let (kind, hint) = classify_api_error(code);
                    // Retryable as its kind is (`Error::new`'s default), with Slack's `Retry-After` then.
                    let mut err = http::refused(SLACK_KIND, url, kind, code, hint);
                    if let Some(wait) = reply.retry_after.filter(|_| err.is_retryable()) {
                        err = err.with_retry_after(wait);
                    }
                    return Err(err);
                }
                let ts = answer.get("ts").and_then(Value::as_str).map(str::to_owned);
                Ok(Receipt::new(ts, None))
            }
        }
    }
}

/// What a Web API `error` code means, and what to check.
fn classify_api_error(code: &str) -> (ErrorKind, &'static str) {
    match code {
        "ratelimited" | "rate_limited" => (ErrorKind::Unavailable, "rate limited; try again later"),
        "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
            (ErrorKind::Unavailable, "Slack failed; try again later")
        }
        "invalid_auth"
        | "not_authed"
        | "account_inactive"
        | "token_revoked"
        | "token_expired"
        | "no_permission"
        | "missing_scope"
        | "not_allowed_token_type"
        | "ekm_access_denied" => (ErrorKind::PermissionDenied, "check the bot token and its scopes (`chat:write`)"),
        "channel_not_found" | "not_in_channel" | "is_archived" => {
            (ErrorKind::InvalidConfig, "check `channel`, and that the bot is a member of it")
        }
        _ => (ErrorKind::InvalidConfig, "check the channel's settings"),
    }
}

/// The status emoji of a notification.
fn emoji(notification: &Notification) -> &'static str {
    if notification.resolve {
        return ":white_check_mark:";
    }
    match notification.severity {
        Severity::Critical => ":rotating_light:",
        Severity::Error => ":x:",
        Severity::Warning => ":warning:",
        Severity::Info => ":information_source:",
    }
}

/// Escapes the three characters Slack's `mrkdwn` reserves (`&`, `<`, `>`).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn section(text: &str) -> Value {
    json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate_chars(text, SECTION_TEXT_MAX)}})
}

/// The log tail as a code block of at most [`SECTION_TEXT_MAX`] characters: the last
/// lines that fit (the end of a log says most), after a line saying how many were left out.
fn log_block(lines: &[String]) -> String {
    const TITLE: &str = "*Last log lines*\n```\n";
    const END: &str = "\n```";
    let budget = SECTION_TEXT_MAX - TITLE.chars().count() - END.chars().count() - 40;
    let mut kept: Vec<String> = Vec::new();
    let mut used = 0;
    for line in lines.iter().rev() {
        // Three backticks would close the block early.
        let line = escape(line).replace("```", "`\u{200b}``");
        let len = line.chars().count() + 1;
        if used + len > budget {
            if kept.is_empty() {
                let tail: String = line.chars().rev().take(budget - 1).collect::<Vec<_>>().into_iter().rev().collect();
                kept.push(format!("…{tail}"));
            }
            break;
        }
        used += len;
        kept.push(line);
    }
    kept.reverse();
    let omitted = lines.len() - kept.len();
    let mut text = TITLE.to_owned();
    if omitted > 0 {
        text.push_str(&format!("[{omitted} earlier lines left out]\n"));
    }
    text.push_str(&kept.join("\n"));
    text.push_str(END);
    text
}

/// The Block Kit message for `notification`: `text` and `blocks`.
pub fn message(notification: &Notification) -> Value {
    let emoji = emoji(notification);
    if notification.templated {
        let blocks: Vec<Value> = chunks(&notification.body, SECTION_TEXT_MAX)
            .into_iter()
            .take(BLOCKS_MAX)
            .map(|chunk| section(&chunk))
            .collect();
        return json!({"text": truncate_chars(&notification.body, TEXT_MAX), "blocks": blocks});
    }
    let mut blocks = vec![json!({
        "type": "header",
        "text": {"type": "plain_text", "text": truncate_chars(&format!("{emoji} {}", notification.title), HEADER_TEXT_MAX), "emoji": true},
    })];
    if !notification.lead().trim().is_empty() {
        blocks.push(section(&escape(notification.lead())));
    }
    for facts in notification.facts.chunks(SECTION_FIELDS_MAX) {
        let fields: Vec<Value> = facts
            .iter()
            .map(|(name, value)| {
                let text = format!("*{}*\n{}", escape(name), escape(value));
                json!({"type": "mrkdwn", "text": truncate_chars(&text, FIELD_TEXT_MAX)})
            })
            .collect();
        blocks.push(json!({"type": "section", "fields": fields}));
    }
    if !notification.log_tail.is_empty() {
        blocks.push(section(&log_block(&notification.log_tail)));
    }
    if let Some(url) = notification.web_link() {
        blocks.push(json!({
            "type": "actions",
            "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Open the run"}, "url": url}],
        }));
    } else if let Some(command) = &notification.link {
        let text = format!("Inspect with `{}`", escape(command).replace('`', "'"));
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}));
    }
    blocks.truncate(BLOCKS_MAX);
    let mut text = format!("{emoji} {}", notification.title);
    if !notification.lead().trim().is_empty() {
        text.push_str(": ");
        text.push_str(notification.lead());
    }
    json!({"text": truncate_chars(&escape(&text), TEXT_MAX), "blocks": blocks})
}

/// `text` in pieces of at most `max` characters, cut at a line end when there is one.
fn chunks(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest: Vec<char> = text.chars().collect();
    while rest.len() > max {
        let cut = rest[..max].iter().rposition(|&c| c == '\n').map_or(max, |i| i + 1);
        out.push(rest.drain(..cut).collect());
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.into_iter().collect());
    }
    out
}

/// Whether `text` is an emoji code: `:name:` with a name of letters, digits, `_`, `-`
/// and `+` (`:+1:`).
fn is_emoji_code(text: &str) -> bool {
    text.strip_prefix(':')
        .and_then(|t| t.strip_suffix(':'))
        .is_some_and(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-+'".contains(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_debug_hides, assert_single_issue, assert_valid, descriptor, example_with};

    /// Asserts that `spec` gives one issue, at `path`, saying `needle`.
    fn check(spec: serde_json::Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<SlackKind>(), &spec, path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<SlackKind>();
        nexus_testkit::schema_fields_are_documented::<SlackKind>();
        nexus_testkit::unknown_field_is_refused::<SlackKind>("icon_url");
        nexus_testkit::notifier::builds::<SlackKind>(json!({"token": "xoxb-1-2-s3cr3t"}));
        nexus_testkit::notifier::builds::<SlackKind>(
            json!({"token": null, "channel": null, "webhook_url": "https://hooks.slack.com/services/T0/B0/S3CR3T"}),
        );
        nexus_testkit::registers_once::<SlackKind>(register_slack_notifier);
    }

    #[test]
    fn a_webhook_alone_is_enough() {
        assert_valid(&descriptor::<SlackKind>(), &json!({"webhook_url": "{{ secrets.slack_webhook_url }}"}));
    }

    #[test]
    fn exactly_one_form_is_given() {
        let webhook = "{{ secrets.slack_webhook_url }}";
        check(example_with::<SlackKind>(json!({"webhook_url": webhook})), &[], "not both forms");
        let webhook_and_channel = example_with::<SlackKind>(json!({"webhook_url": webhook, "token": null}));
        check(webhook_and_channel, &["channel"], "remove `channel`");
        check(example_with::<SlackKind>(json!({"channel": null})), &["channel"], "needs the `channel`");
        check(example_with::<SlackKind>(json!({"token": null})), &["token"], "needs a bot `token`");
        check(json!({"username": "Nexus"}), &[], "give `webhook_url`, or `token` and `channel`");
    }

    #[test]
    fn credentials_must_be_secret_references() {
        check(example_with::<SlackKind>(json!({"token": "xoxb-123-456-abc"})), &["token"], "{{ secrets.");
        let literal = json!({"webhook_url": "https://hooks.slack.com/services/T0/B0/XYZ"});
        check(literal, &["webhook_url"], "{{ secrets.slack_webhook_url }}");
    }

    #[test]
    fn channel_and_icon_have_their_shapes() {
        check(example_with::<SlackKind>(json!({"channel": "#ops alerts"})), &["channel"], "no spaces");
        check(example_with::<SlackKind>(json!({"icon_emoji": "robot_face"})), &["icon_emoji"], "between colons");
        assert_valid(&descriptor::<SlackKind>(), &example_with::<SlackKind>(json!({"icon_emoji": ":+1:"})));
    }

    #[test]
    fn api_url_and_timeout_are_checked() {
        check(example_with::<SlackKind>(json!({"api_url": "slack.test/api"})), &["api_url"], "`https://`");
        let webhook = json!({"webhook_url": "{{ secrets.slack_webhook_url }}", "api_url": "https://slack-gov.com/api"});
        check(webhook, &["api_url"], "only with `token`");
        check(example_with::<SlackKind>(json!({"timeout": "0s"})), &["timeout"], "longer than zero");
    }

    fn notification() -> Notification {
        let mut n = Notification::new("deploy <b> failed", "step api & co failed", Severity::Critical, "k");
        n.facts = (0..12).map(|i| (format!("Fact {i}"), "x".repeat(2500))).collect();
        n.log_tail = (0..200).map(|i| format!("line {i} {}", "y".repeat(40))).collect();
        n.link = Some("nexus show r-1".to_owned());
        n
    }

    #[test]
    fn messages_keep_within_block_kit_limits() {
        let m = message(&notification());
        assert_eq!(m["text"], ":rotating_light: deploy &lt;b&gt; failed: step api &amp; co failed");
        let blocks = m["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        for block in blocks {
            if let Some(text) = block["text"]["text"].as_str() {
                assert!(text.chars().count() <= SECTION_TEXT_MAX, "{block}");
            }
            if let Some(fields) = block["fields"].as_array() {
                assert!(fields.len() <= SECTION_FIELDS_MAX);
                assert!(fields.iter().all(|f| f["text"].as_str().unwrap().chars().count() <= FIELD_TEXT_MAX));
            }
        }
        let fields: usize = blocks.iter().filter_map(|b| b["fields"].as_array()).map(Vec::len).sum();
        assert_eq!(fields, 12, "every fact is shown, 10 per section");
        let log = blocks.iter().find_map(|b| b["text"]["text"].as_str().filter(|t| t.contains("```"))).unwrap();
        assert!(
            log.contains("line 199") && !log.contains("line 0 ") && log.contains("earlier lines left out"),
            "{log}"
        );
        assert_eq!(blocks.last().unwrap()["type"], "context");
    }

    #[test]
    fn a_templated_body_is_the_message() {
        let mut n = notification();
        n.templated = true;
        n.body = "*deploy* <https://x.test|failed>".to_owned();
        let m = message(&n);
        assert_eq!(m["text"], n.body);
        assert_eq!(m["blocks"], json!([{"type": "section", "text": {"type": "mrkdwn", "text": n.body}}]));
        n.body = "a\n".repeat(2000);
        let blocks = message(&n)["blocks"].as_array().unwrap().clone();
        assert_eq!(blocks.len(), 2);
    }

    #[test]
    fn debug_never_shows_the_token_or_the_webhook_url() {
        let mut spec = SlackKind::example();
        spec.token = Some("xoxb-s3cr3t".to_owned());
        spec.webhook_url = Some("https://hooks.slack.com/services/T0/B0/S3CR3T".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t", "S3CR3T"]);
        assert!(shown.contains("token: Some(\"***\")"), "{shown}");
    }
}
