//! The `slack` notifier kind of Nexus: notifications posted to a Slack channel.
//!
//! A channel is reached in one of two ways: an incoming webhook (`webhook_url`), which
//! posts to the channel it was created for, or a bot token with `chat:write` (`token`)
//! and the `channel` to post to. This crate holds the kind's spec, its pure validation
//! and its registration; the client comes in a later issue, so [`SlackKind::build`]
//! returns an `Unsupported` error.

use std::fmt;
use std::sync::Arc;

use nexus_core::spec::{check_secret_ref, is_template};
use nexus_core::traits::Notifier;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const SLACK_KIND: &str = "slack";

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
}

impl fmt::Debug for SlackSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackSpec")
            .field("webhook_url", &self.webhook_url.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("channel", &self.channel)
            .field("username", &self.username)
            .field("icon_emoji", &self.icon_emoji)
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
        issues
    }

    fn build(_spec: SlackSpec) -> Result<Arc<dyn Notifier>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the slack notifier's implementation is not built yet; its spec is validated",
        )
        .with_operation("notifier.build"))
    }
}

/// Registers the `slack` notifier kind.
pub fn register_slack_notifier(catalog: &mut Catalog) -> Result<()> {
    catalog.notifiers.register_kind::<SlackKind>()
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
    use serde_json::json;

    /// Asserts that `spec` gives one issue, at `path`, saying `needle`.
    fn check(spec: serde_json::Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<SlackKind>(), &spec, path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<SlackKind>();
        nexus_testkit::schema_fields_are_documented::<SlackKind>();
        nexus_testkit::unknown_field_is_refused::<SlackKind>("icon_url");
        nexus_testkit::build_is_unsupported::<SlackKind>();
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
    fn debug_never_shows_the_token_or_the_webhook_url() {
        let mut spec = SlackKind::example();
        spec.token = Some("xoxb-s3cr3t".to_owned());
        spec.webhook_url = Some("https://hooks.slack.com/services/T0/B0/S3CR3T".to_owned());
        let shown = assert_debug_hides(&spec, &["s3cr3t", "S3CR3T"]);
        assert!(shown.contains("token: Some(\"***\")"), "{shown}");
    }
}
