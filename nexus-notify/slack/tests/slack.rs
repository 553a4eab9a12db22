//! The `slack` notifier against a local receiver that checks each request as Slack's
//! public API documents it (`chat.postMessage` with a bot token; an incoming webhook),
//! and answers the documented successes and failures.

use std::sync::Arc;
use std::time::Duration;

use nexus_core::model::Severity;
use nexus_core::traits::{Notification, Notifier};
use nexus_core::{ComponentKind, ErrorKind};
use nexus_notify_slack::{SlackKind, SlackSpec};
use nexus_testkit::http::{Receiver, Reply, Request, closed_address};
use nexus_testkit::notifier::{NotifierFixture, Secret, assert_error_hides, failure_notification};
use serde_json::{Value, json};

const TOKEN: &str = "xoxb-1111-2222-t0k3ns3cr3t";
const HOOK_PATH: &str = "/services/T000/B000/H00KS3CR3T";
const CHANNEL: &str = "#ops-alerts";

/// What Block Kit allows, for the blocks we send.
fn check_blocks(message: &Value) -> Result<(), String> {
    let text = message["text"].as_str().ok_or("no top-level `text` fallback")?;
    if text.trim().is_empty() {
        return Err("an empty `text`".to_owned());
    }
    let blocks = message["blocks"].as_array().ok_or("no `blocks` array")?;
    if blocks.is_empty() || blocks.len() > 50 {
        return Err(format!("{} blocks", blocks.len()));
    }
    for block in blocks {
        match block["type"].as_str() {
            Some("header") => {
                let t = &block["text"];
                if t["type"] != "plain_text" || t["text"].as_str().is_none_or(|s| s.chars().count() > 150) {
                    return Err(format!("bad header {block}"));
                }
            }
            Some("section") => {
                if let Some(text) = block.get("text")
                    && (text["type"] != "mrkdwn" || text["text"].as_str().is_none_or(|s| s.chars().count() > 3000))
                {
                    return Err(format!("bad section text {block}"));
                }
                if let Some(fields) = block.get("fields") {
                    let fields = fields.as_array().ok_or("fields is not an array")?;
                    if fields.len() > 10 || fields.iter().any(|f| f["text"].as_str().is_none_or(|s| s.len() > 2000)) {
                        return Err(format!("bad section fields {block}"));
                    }
                }
                if block.get("text").is_none() && block.get("fields").is_none() {
                    return Err("a section without text or fields".to_owned());
                }
            }
            Some("actions") => {
                for e in block["elements"].as_array().ok_or("actions without elements")? {
                    if e["type"] != "button" || e["text"]["type"] != "plain_text" || !e["url"].is_string() {
                        return Err(format!("bad button {e}"));
                    }
                }
            }
            Some("context") => {}
            other => return Err(format!("unexpected block type {other:?}")),
        }
    }
    Ok(())
}

/// `chat.postMessage`: POST, JSON with a charset, the bot token as a Bearer, `channel`.
fn check_api(req: &Request) -> Result<(), String> {
    if req.method != "POST" || req.path != "/api/chat.postMessage" {
        return Err(format!("{} {}", req.method, req.path));
    }
    if req.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return Err("no `Authorization: Bearer <token>`".to_owned());
    }
    if req.header("content-type") != Some("application/json; charset=utf-8") {
        return Err(format!("content-type {:?}", req.header("content-type")));
    }
    let message = req.json()?;
    if message["channel"] != CHANNEL {
        return Err(format!("channel {}", message["channel"]));
    }
    if message["username"] != "Nexus" || message["icon_emoji"] != ":robot_face:" {
        return Err("username or icon_emoji missing".to_owned());
    }
    check_blocks(&message)
}

/// An incoming webhook: POST JSON to the webhook's own URL, no token, no channel.
fn check_webhook(req: &Request) -> Result<(), String> {
    if req.method != "POST" || req.path != HOOK_PATH {
        return Err(format!("{} {}", req.method, req.path));
    }
    if req.header("authorization").is_some() {
        return Err("a webhook takes no Authorization".to_owned());
    }
    if !req.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
        return Err(format!("content-type {:?}", req.header("content-type")));
    }
    let message = req.json()?;
    if message.get("channel").is_some() {
        return Err("a webhook posts to its own channel".to_owned());
    }
    check_blocks(&message)
}

fn api_spec(api_url: String) -> SlackSpec {
    serde_json::from_value(json!({
        "token": TOKEN, "channel": CHANNEL, "username": "Nexus", "icon_emoji": ":robot_face:",
        "api_url": api_url, "timeout": "2s",
    }))
    .unwrap()
}

fn webhook_spec(url: String) -> SlackSpec {
    serde_json::from_value(json!({"webhook_url": url, "timeout": "2s"})).unwrap()
}

struct Fixture {
    receiver: Receiver,
    webhook: bool,
    notifier: Arc<dyn Notifier>,
}

impl Fixture {
    async fn api() -> Fixture {
        let receiver = Receiver::start().await;
        receiver.check(check_api);
        receiver.answer(Reply::json(200, &json!({"ok": true, "channel": "C0123456789", "ts": "1764321159.000200"})));
        let notifier = SlackKind::build(api_spec(receiver.url("/api"))).unwrap();
        Fixture { receiver, webhook: false, notifier }
    }

    async fn webhook() -> Fixture {
        let receiver = Receiver::start().await;
        receiver.check(check_webhook);
        let notifier = SlackKind::build(webhook_spec(receiver.url(HOOK_PATH))).unwrap();
        Fixture { receiver, webhook: true, notifier }
    }
}

impl NotifierFixture for Fixture {
    fn notifier(&self) -> Arc<dyn Notifier> {
        self.notifier.clone()
    }

    fn unreachable(&self) -> (Arc<dyn Notifier>, String) {
        let addr = closed_address();
        let notifier = if self.webhook {
            SlackKind::build(webhook_spec(format!("http://{addr}{HOOK_PATH}"))).unwrap()
        } else {
            SlackKind::build(api_spec(format!("http://{addr}/api"))).unwrap()
        };
        (notifier, addr.to_string())
    }

    fn secrets(&self) -> Vec<Secret> {
        vec![
            Secret::sent_in(TOKEN, format!("authorization: Bearer {TOKEN}")),
            Secret::sent_in("H00KS3CR3T", format!("POST {HOOK_PATH}")),
        ]
    }

    fn captured(&self) -> Vec<String> {
        self.receiver.deliveries()
    }

    fn marks_resolved(&self, delivery: &str) -> bool {
        delivery.contains(":white_check_mark:")
    }
}

/// The suite with a bot token and `chat.postMessage`.
mod api {
    use super::*;
    nexus_testkit::notifier_suite!(Fixture::api().await);
}

/// The suite with an incoming webhook.
mod webhook {
    use super::*;
    nexus_testkit::notifier_suite!(Fixture::webhook().await);
}

#[tokio::test]
async fn the_receipt_is_the_message_ts() {
    let fixture = Fixture::api().await;
    let receipt = fixture.notifier.send(&failure_notification()).await.unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("1764321159.000200"));
    let message = fixture.receiver.requests()[0].json().unwrap();
    let blocks = message["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["text"]["text"], ":x: deploy-shop failed in prod");
    assert_eq!(blocks.last().unwrap()["elements"][0]["url"], "https://nexus.shop.example/runs/r-20261128-0001");
    assert!(message["text"].as_str().unwrap().starts_with(":x: deploy-shop failed in prod"));
}

fn check_error(err: &nexus_core::Error, kind: ErrorKind, retryable: bool, host: &str, needle: &str) {
    assert_eq!((err.kind(), err.is_retryable()), (kind, retryable), "{err:?}");
    assert_eq!(err.operation(), "notify.send");
    let shown = err.to_string();
    assert!(shown.contains(host) && shown.contains("slack") && shown.contains(needle), "{shown}");
    let secrets = [Secret::never_sent(TOKEN), Secret::never_sent("H00KS3CR3T")];
    assert_error_hides(err, &secrets);
}

#[tokio::test]
async fn web_api_refusals_are_classified() {
    let fixture = Fixture::api().await;
    let host = fixture.receiver.host();
    let n = Notification::new("t", "b", Severity::Critical, "k");
    let send = || fixture.notifier.send(&n);

    fixture.receiver.push(Reply::json(200, &json!({"ok": false, "error": "channel_not_found"})));
    check_error(&send().await.unwrap_err(), ErrorKind::InvalidConfig, false, &host, "channel_not_found");

    fixture.receiver.push(Reply::json(200, &json!({"ok": false, "error": "invalid_auth"})));
    check_error(&send().await.unwrap_err(), ErrorKind::PermissionDenied, false, &host, "invalid_auth");

    fixture.receiver.push(Reply::json(200, &json!({"ok": false, "error": "ratelimited"})));
    check_error(&send().await.unwrap_err(), ErrorKind::Unavailable, true, &host, "ratelimited");

    fixture.receiver.push(Reply::json(429, &json!({"ok": false, "error": "ratelimited"})).header("Retry-After", "30"));
    let err = send().await.unwrap_err();
    check_error(&err, ErrorKind::Unavailable, true, &host, "429");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));

    fixture.receiver.push(Reply::new(500, "oops"));
    check_error(&send().await.unwrap_err(), ErrorKind::Unavailable, true, &host, "500");

    fixture.receiver.push(Reply::new(200, "<html>not the api</html>"));
    check_error(&send().await.unwrap_err(), ErrorKind::Unavailable, true, &host, "not JSON");
}

#[tokio::test]
async fn webhook_refusals_are_classified() {
    let fixture = Fixture::webhook().await;
    let host = fixture.receiver.host();
    let n = Notification::new("t", "b", Severity::Critical, "k");
    let send = || fixture.notifier.send(&n);

    fixture.receiver.push(Reply::new(404, "no_service"));
    check_error(&send().await.unwrap_err(), ErrorKind::InvalidConfig, false, &host, "no_service");

    fixture.receiver.push(Reply::new(403, "action_prohibited"));
    check_error(&send().await.unwrap_err(), ErrorKind::PermissionDenied, false, &host, "action_prohibited");

    fixture.receiver.push(Reply::new(400, "invalid_blocks"));
    check_error(&send().await.unwrap_err(), ErrorKind::InvalidConfig, false, &host, "invalid_blocks");

    fixture.receiver.push(Reply::new(429, "rate limited").header("Retry-After", "5"));
    let err = send().await.unwrap_err();
    check_error(&err, ErrorKind::Unavailable, true, &host, "429");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));

    fixture.receiver.push(Reply::new(503, "rollup_error"));
    check_error(&send().await.unwrap_err(), ErrorKind::Unavailable, true, &host, "rollup_error");
}
