//! The `webhook` notifier against a local receiver that verifies every request the way
//! `docs/notify/webhook.md` tells receivers to: the HMAC-SHA256 signature recomputed
//! from the timestamp and the raw body, a recent timestamp, the versioned payload, the
//! delivery id and the custom headers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use nexus_core::ComponentKind;
use nexus_core::ErrorKind;
use nexus_core::model::Severity;
use nexus_core::traits::{Notification, Notifier};
use nexus_notify_webhook::{DEFAULT_SIGNATURE_HEADER, DELIVERY_HEADER, WebhookKind, WebhookSpec};
use nexus_testkit::http::{Receiver, Reply, Request, closed_address};
use nexus_testkit::notifier::{NotifierFixture, Secret, failure_notification};
use serde_json::{Value, json};
use sha2::Sha256;

const SIGNING_KEY: &str = "whsec-s1gn1ng-k3y-0123456789";
const BEARER: &str = "b34r3r-t0k3n-abcdef";
const PATH: &str = "/hooks/P4TH-T0K3N";

/// The receiver side of the signature, exactly as documented: parse `t=…,v1=…`, check the
/// timestamp is within five minutes, recompute HMAC-SHA256(key, "{t}.{raw body}") and
/// compare in constant time.
fn verify(key: &[u8], header: &str, body: &[u8], now: u64) -> Result<(), String> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let t = t.ok_or("no t=")?;
    let v1 = v1.ok_or("no v1=")?;
    let ts: u64 = t.parse().map_err(|_| format!("t={t} is not a number"))?;
    if now.abs_diff(ts) > 300 {
        return Err(format!("timestamp {ts} is more than 5 minutes from now ({now})"));
    }
    let expected: Vec<u8> = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(v1.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| "v1 is not hex".to_owned())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| "the signature does not match the body".to_owned())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// What the documented contract says every request is.
fn check_request(req: &Request, method: &str) -> Result<(), String> {
    if req.method != method {
        return Err(format!("method {} instead of {method}", req.method));
    }
    if req.path != PATH {
        return Err(format!("path {}", req.path));
    }
    if req.header("content-type") != Some("application/json") {
        return Err(format!("content-type {:?}", req.header("content-type")));
    }
    if req.header("authorization") != Some(&format!("Bearer {BEARER}")) || req.header("x-team") != Some("platform") {
        return Err("the custom headers did not arrive".to_owned());
    }
    let delivery = req.header(DELIVERY_HEADER).ok_or("no delivery id")?;
    if delivery.len() != 32 || !delivery.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("delivery id {delivery}"));
    }
    let signature = req.header(DEFAULT_SIGNATURE_HEADER).ok_or("no signature header")?;
    verify(SIGNING_KEY.as_bytes(), signature, &req.body, now())?;
    let payload = req.json()?;
    let keys: Vec<&str> = payload.as_object().ok_or("not an object")?.keys().map(String::as_str).collect();
    let documented = [
        "version",
        "type",
        "title",
        "body",
        "severity",
        "dedup_key",
        "resolve",
        "run_id",
        "pipeline",
        "environment",
        "step",
        "at",
        "facts",
        "log_tail",
        "link",
        "labels",
    ];
    if keys != documented {
        return Err(format!("fields {keys:?}"));
    }
    if payload["version"] != 1 || !payload["resolve"].is_boolean() || !payload["facts"].is_array() {
        return Err(format!("payload {payload}"));
    }
    let severity = payload["severity"].as_str().unwrap_or_default();
    if !["info", "warning", "error", "critical"].contains(&severity) {
        return Err(format!("severity {severity}"));
    }
    let at = payload["at"].as_str().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(at).map_err(|e| format!("at {at}: {e}"))?;
    Ok(())
}

fn spec(url: String) -> WebhookSpec {
    serde_json::from_value(json!({
        "url": url,
        "headers": {"Authorization": format!("Bearer {BEARER}"), "X-Team": "platform"},
        "signing_secret": SIGNING_KEY,
        "timeout": "2s",
    }))
    .unwrap()
}

struct Fixture {
    receiver: Receiver,
    notifier: Arc<dyn Notifier>,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with_method("POST").await
    }

    async fn with_method(method: &'static str) -> Fixture {
        let receiver = Receiver::start().await;
        receiver.check(move |req| check_request(req, method));
        let mut spec = spec(receiver.url(PATH));
        spec.method = serde_json::from_value(json!(method)).unwrap();
        let notifier = WebhookKind::build(spec).unwrap();
        Fixture { receiver, notifier }
    }
}

impl NotifierFixture for Fixture {
    fn notifier(&self) -> Arc<dyn Notifier> {
        self.notifier.clone()
    }

    fn unreachable(&self) -> (Arc<dyn Notifier>, String) {
        let addr = closed_address();
        (WebhookKind::build(spec(format!("http://{addr}{PATH}"))).unwrap(), addr.to_string())
    }

    fn secrets(&self) -> Vec<Secret> {
        vec![
            Secret::never_sent(SIGNING_KEY),
            Secret::sent_in(BEARER, format!("authorization: Bearer {BEARER}")),
            Secret::sent_in("P4TH-T0K3N", format!("POST {PATH}")),
        ]
    }

    fn captured(&self) -> Vec<String> {
        self.receiver.deliveries()
    }

    fn marks_resolved(&self, delivery: &str) -> bool {
        let body = delivery.split_once("\n\n").map_or("", |(_, body)| body);
        serde_json::from_str::<Value>(body).unwrap()["resolve"] == true
    }
}

nexus_testkit::notifier_suite!(Fixture::new().await);

#[tokio::test]
async fn the_payload_carries_the_event() {
    let fixture = Fixture::new().await;
    let n = failure_notification();
    let receipt = fixture.notifier.send(&n).await.unwrap();
    let request = &fixture.receiver.requests()[0];
    let payload = request.json().unwrap();
    assert_eq!(payload["type"], "run.failed");
    assert_eq!(payload["severity"], "error");
    assert_eq!(payload["run_id"], "r-20261128-0001");
    assert_eq!(payload["pipeline"], "deploy-shop");
    assert_eq!(payload["environment"], "prod");
    assert_eq!(payload["step"], "deploy-api");
    assert_eq!(payload["labels"], json!({"team": "platform"}));
    assert_eq!(payload["facts"][0], json!({"name": "Pipeline", "value": "deploy-shop"}));
    assert_eq!(payload["log_tail"].as_array().unwrap().len(), 3);
    assert_eq!(receipt.message_id.as_deref(), request.header(DELIVERY_HEADER));
    assert_eq!(receipt.dedup_key.as_deref(), Some("nexus/deploy-shop/prod"));
}

#[tokio::test]
async fn put_is_sent_when_asked() {
    let fixture = Fixture::with_method("PUT").await;
    fixture.notifier.send(&failure_notification()).await.unwrap();
    assert_eq!(fixture.receiver.requests()[0].method, "PUT");
    assert!(fixture.receiver.violations().is_empty(), "{:?}", fixture.receiver.violations());
}

#[tokio::test]
async fn a_retry_carries_the_same_delivery_id_and_a_new_notification_another() {
    let fixture = Fixture::new().await;
    fixture.receiver.push(Reply::new(503, "busy"));
    let n = failure_notification();
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    fixture.notifier.send(&n).await.unwrap();
    let mut other = failure_notification();
    other.event.as_mut().unwrap().at += Duration::from_secs(60);
    fixture.notifier.send(&other).await.unwrap();
    let ids: Vec<String> =
        fixture.receiver.requests().iter().map(|r| r.header(DELIVERY_HEADER).unwrap().to_owned()).collect();
    assert_eq!(ids[0], ids[1], "a retry is the same delivery");
    assert_ne!(ids[1], ids[2], "another notification is another delivery");
}

#[tokio::test]
async fn a_tampered_body_or_another_key_fails_verification() {
    let fixture = Fixture::new().await;
    fixture.notifier.send(&failure_notification()).await.unwrap();
    let request = fixture.receiver.requests()[0].clone();
    let signature = request.header(DEFAULT_SIGNATURE_HEADER).unwrap();
    assert!(signature.starts_with("t=") && signature.contains(",v1="), "{signature}");
    verify(SIGNING_KEY.as_bytes(), signature, &request.body, now()).unwrap();
    let tampered = String::from_utf8(request.body.clone()).unwrap().replace("deploy-shop failed", "all is well");
    assert_ne!(tampered.as_bytes(), request.body.as_slice());
    let err = verify(SIGNING_KEY.as_bytes(), signature, tampered.as_bytes(), now()).unwrap_err();
    assert!(err.contains("does not match"), "{err}");
    assert!(verify(b"another key", signature, &request.body, now()).is_err());
    assert!(verify(SIGNING_KEY.as_bytes(), signature, &request.body, now() + 3600).unwrap_err().contains("minutes"));

    // The same tampered request sent to the receiver is refused by its check.
    let client = reqwest::Client::new();
    let mut forged = client.post(fixture.receiver.url(PATH)).body(tampered);
    for (name, value) in &request.headers {
        if !["content-length", "host"].contains(&name.as_str()) {
            forged = forged.header(name, value);
        }
    }
    assert_eq!(forged.send().await.unwrap().status().as_u16(), 400);
    assert_eq!(fixture.receiver.violations(), ["the signature does not match the body"]);
}

#[tokio::test]
async fn without_a_signing_secret_nothing_is_signed() {
    let receiver = Receiver::start().await;
    let mut spec = spec(receiver.url(PATH));
    spec.signing_secret = None;
    WebhookKind::build(spec).unwrap().send(&failure_notification()).await.unwrap();
    assert_eq!(receiver.requests()[0].header(DEFAULT_SIGNATURE_HEADER), None);
    assert!(receiver.requests()[0].header(DELIVERY_HEADER).is_some());
}

#[tokio::test]
async fn failures_are_classified() {
    let fixture = Fixture::new().await;
    let n = Notification::new("t", "b", Severity::Warning, "k");
    let hides = |e: &nexus_core::Error| {
        nexus_testkit::notifier::assert_error_hides(e, &fixture.secrets());
        assert_eq!(e.operation(), "notify.send");
        let shown = e.to_string();
        assert!(shown.contains(&fixture.receiver.host()) && shown.contains("webhook"), "{shown}");
    };

    fixture.receiver.push(Reply::new(429, "slow down").header("Retry-After", "17"));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.is_retryable(), err.retry_after()),
        (ErrorKind::Unavailable, true, Some(Duration::from_secs(17)))
    );
    hides(&err);

    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    fixture.receiver.push(Reply::new(503, "maintenance").header("Retry-After", &date));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let wait = err.retry_after().unwrap();
    assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120), "{wait:?}");

    fixture.receiver.push(Reply::new(500, "boom"));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert_eq!((err.kind(), err.is_retryable(), err.retry_after()), (ErrorKind::Unavailable, true, None));

    fixture.receiver.push(Reply::json(400, &json!({"error": "unknown event type"})));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::InvalidConfig, false));
    assert!(err.to_string().contains("unknown event type"), "{err}");
    hides(&err);

    fixture.receiver.push(Reply::new(401, "bad token"));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::PermissionDenied, false));
    hides(&err);

    fixture.receiver.push(Reply::new(200, "late").delayed(Duration::from_secs(4)));
    let err = fixture.notifier.send(&n).await.unwrap_err();
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::Timeout, true));
    hides(&err);
}
