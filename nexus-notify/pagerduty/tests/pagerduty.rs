//! The `pagerduty` notifier against a local receiver that checks each request as the
//! Events API v2 documents it (`POST /v2/enqueue`, JSON, a 32-character routing key,
//! `event_action`, `dedup_key`, and for a trigger `payload.summary`, `source`,
//! `severity` and `timestamp`), and answers the documented 202, 400, 429 and 5xx.

use std::sync::Arc;
use std::time::Duration;

use nexus_core::model::Severity;
use nexus_core::traits::{Notification, Notifier};
use nexus_core::{ComponentKind, ErrorKind};
use nexus_notify_pagerduty::{PagerDutyKind, PagerDutySpec};
use nexus_testkit::http::{Receiver, Reply, Request, closed_address};
use nexus_testkit::notifier::{NotifierFixture, Secret, assert_error_hides, failure_notification};
use serde_json::{Value, json};

/// An integration key has 32 characters.
const ROUTING_KEY: &str = "R0UT1NGK3Y0123456789abcdefABCDEF";

/// The Events API v2 contract, as documented.
fn check_event(req: &Request) -> Result<(), String> {
    if req.method != "POST" || req.path != "/v2/enqueue" {
        return Err(format!("{} {}", req.method, req.path));
    }
    if req.header("content-type") != Some("application/json") {
        return Err(format!("content-type {:?}", req.header("content-type")));
    }
    let event = req.json()?;
    let object = event.as_object().ok_or("not an object")?;
    let routing_key = event["routing_key"].as_str().ok_or("no routing_key")?;
    if routing_key.len() != 32 {
        return Err(format!(
            "Length of 'routing_key' is incorrect (should be 32 characters), got {}",
            routing_key.len()
        ));
    }
    let action = event["event_action"].as_str().ok_or("no event_action")?;
    if !["trigger", "acknowledge", "resolve"].contains(&action) {
        return Err(format!("event_action {action}"));
    }
    let dedup_key = event["dedup_key"].as_str().ok_or("no dedup_key")?;
    if dedup_key.is_empty() || dedup_key.len() > 255 {
        return Err(format!("dedup_key of {} characters", dedup_key.len()));
    }
    let allowed = ["routing_key", "event_action", "dedup_key", "client", "client_url", "payload", "images", "links"];
    if let Some(unknown) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown}"));
    }
    if action != "trigger" {
        return if object.len() == 3 {
            Ok(())
        } else {
            Err(format!("a {action} carries only the three keys: {event}"))
        };
    }
    let payload = event["payload"].as_object().ok_or("a trigger needs a payload")?;
    let summary = payload.get("summary").and_then(Value::as_str).ok_or("no payload.summary")?;
    if summary.is_empty() || summary.chars().count() > 1024 {
        return Err(format!("summary of {} characters", summary.chars().count()));
    }
    if payload.get("source").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err("no payload.source".to_owned());
    }
    let severity = payload.get("severity").and_then(Value::as_str).ok_or("no payload.severity")?;
    if !["critical", "error", "warning", "info"].contains(&severity) {
        return Err(format!("severity {severity}"));
    }
    if let Some(timestamp) = payload.get("timestamp") {
        let t = timestamp.as_str().ok_or("timestamp is not a string")?;
        chrono::DateTime::parse_from_rfc3339(t).map_err(|e| format!("timestamp {t}: {e}"))?;
    }
    for field in ["component", "group", "class"] {
        if payload.get(field).is_some_and(|v| !v.is_string()) {
            return Err(format!("payload.{field} is not a string"));
        }
    }
    if payload.get("custom_details").is_some_and(|v| !v.is_object()) {
        return Err("custom_details is not an object".to_owned());
    }
    for link in event.get("links").and_then(Value::as_array).into_iter().flatten() {
        if !link["href"].is_string() {
            return Err(format!("link without href {link}"));
        }
    }
    Ok(())
}

fn spec(events_url: String) -> PagerDutySpec {
    serde_json::from_value(json!({
        "routing_key": ROUTING_KEY, "events_url": events_url, "source": "nexus.shop.internal",
        "component": "api", "group": "shop-prod", "class": "deployment", "timeout": "2s",
    }))
    .unwrap()
}

struct Fixture {
    receiver: Receiver,
    notifier: Arc<dyn Notifier>,
}

impl Fixture {
    async fn new() -> Fixture {
        let receiver = Receiver::start().await;
        receiver.check(check_event);
        let accepted =
            json!({"status": "success", "message": "Event processed", "dedup_key": "nexus/deploy-shop/prod"});
        receiver.answer(Reply::json(202, &accepted));
        let notifier = PagerDutyKind::build(spec(receiver.url("/v2/enqueue"))).unwrap();
        Fixture { receiver, notifier }
    }

    /// Answers the documented success, echoing the dedup key.
    fn accept(&self, dedup_key: &str) {
        let body = json!({"status": "success", "message": "Event processed", "dedup_key": dedup_key});
        self.receiver.push(Reply::json(202, &body));
    }

    fn last(&self) -> Value {
        self.receiver.requests().last().unwrap().json().unwrap()
    }
}

impl NotifierFixture for Fixture {
    fn notifier(&self) -> Arc<dyn Notifier> {
        self.notifier.clone()
    }

    fn unreachable(&self) -> (Arc<dyn Notifier>, String) {
        let addr = closed_address();
        (PagerDutyKind::build(spec(format!("http://{addr}/v2/enqueue"))).unwrap(), addr.to_string())
    }

    fn secrets(&self) -> Vec<Secret> {
        vec![Secret::sent_in(ROUTING_KEY, format!("\"routing_key\":\"{ROUTING_KEY}\""))]
    }

    fn captured(&self) -> Vec<String> {
        self.receiver.deliveries()
    }

    fn marks_resolved(&self, delivery: &str) -> bool {
        delivery.contains("\"event_action\":\"resolve\"")
    }
}

nexus_testkit::notifier_suite!(Fixture::new().await);

#[tokio::test]
async fn a_trigger_carries_the_documented_fields() {
    let fixture = Fixture::new().await;
    fixture.accept("returned-by-pagerduty");
    let receipt = fixture.notifier.send(&failure_notification()).await.unwrap();
    assert_eq!(receipt.dedup_key.as_deref(), Some("returned-by-pagerduty"));
    let event = fixture.last();
    assert_eq!(event["event_action"], "trigger");
    assert_eq!(event["dedup_key"], "nexus/deploy-shop/prod");
    let payload = &event["payload"];
    assert_eq!(payload["summary"], "deploy-shop failed in prod");
    assert_eq!(payload["source"], "nexus.shop.internal");
    assert_eq!(payload["severity"], "error");
    assert_eq!(
        (&payload["component"], &payload["group"], &payload["class"]),
        (&json!("api"), &json!("shop-prod"), &json!("deployment"))
    );
    assert_eq!(payload["custom_details"]["Failed step"], "deploy-api");
    assert_eq!(payload["custom_details"]["log_tail"].as_array().unwrap().len(), 3);
    assert_eq!(event["links"][0]["href"], "https://nexus.shop.example/runs/r-20261128-0001");
}

#[tokio::test]
async fn a_resolve_carries_only_the_key_and_the_action() {
    let fixture = Fixture::new().await;
    let mut n = failure_notification();
    n.resolve = true;
    fixture.notifier.send(&n).await.unwrap();
    assert_eq!(
        fixture.last(),
        json!({"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": "nexus/deploy-shop/prod"})
    );
}

#[tokio::test]
async fn severities_and_long_summaries_fit_the_api() {
    let fixture = Fixture::new().await;
    for (severity, expected) in [
        (Severity::Critical, "critical"),
        (Severity::Error, "error"),
        (Severity::Warning, "warning"),
        (Severity::Info, "info"),
    ] {
        fixture.notifier.send(&Notification::new("x".repeat(2000), "", severity, "k")).await.unwrap();
        let event = fixture.last();
        assert_eq!(event["payload"]["severity"], expected);
        assert_eq!(event["payload"]["summary"].as_str().unwrap().chars().count(), 1024);
    }
    assert!(fixture.receiver.violations().is_empty(), "{:?}", fixture.receiver.violations());
}

fn check_error(err: &nexus_core::Error, kind: ErrorKind, retryable: bool, host: &str, needle: &str) {
    assert_eq!((err.kind(), err.is_retryable()), (kind, retryable), "{err:?}");
    assert_eq!(err.operation(), "notify.send");
    let shown = err.to_string();
    assert!(shown.contains(host) && shown.contains("pagerduty") && shown.contains(needle), "{shown}");
    assert_error_hides(err, &[Secret::never_sent(ROUTING_KEY)]);
}

#[tokio::test]
async fn failures_are_classified() {
    let fixture = Fixture::new().await;
    let host = fixture.receiver.host();
    let n = failure_notification();

    let invalid = json!({
        "status": "invalid event",
        "message": "Event object is invalid",
        "errors": ["Length of 'routing_key' is incorrect (should be 32 characters)"],
    });
    fixture.receiver.push(Reply::json(400, &invalid));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    check_error(&err, ErrorKind::InvalidConfig, false, &host, "Length of 'routing_key' is incorrect");
    assert!(err.retry_after().is_none());

    fixture.receiver.push(Reply::new(429, "").header("Retry-After", "60"));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    check_error(&err, ErrorKind::Unavailable, true, &host, "429");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));

    fixture.receiver.push(Reply::new(429, ""));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    check_error(&err, ErrorKind::Unavailable, true, &host, "429");
    assert_eq!(err.retry_after(), None);

    for status in [500, 502, 503] {
        fixture.receiver.push(Reply::new(status, "upstream failure"));
        let err = fixture.notifier.send(&n).await.unwrap_err();
        check_error(&err, ErrorKind::Unavailable, true, &host, &status.to_string());
    }

    fixture.receiver.push(Reply::json(403, &json!({"status": "unauthorized", "message": "forbidden"})));
    check_error(&fixture.notifier.send(&n).await.unwrap_err(), ErrorKind::PermissionDenied, false, &host, "forbidden");

    fixture.receiver.push(Reply::json(200, &json!({"status": "nope"})));
    check_error(&fixture.notifier.send(&n).await.unwrap_err(), ErrorKind::Unavailable, true, &host, "success");
}
