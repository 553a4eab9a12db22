//! The dispatcher end to end inside one process: events on a real engine's bus, a real
//! SQLite store, and a recording notifier kind registered in the catalog.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::catalog::ComponentKind;
use crate::model::Severity;
use crate::state::sqlite::SqliteStore;

/// Everything the `memo` notifiers received, with the name of their channel.
static SENT: Mutex<Vec<(String, Notification)>> = Mutex::new(Vec::new());
/// Serialises the tests of this module: they share `SENT`.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
/// Test spec.
struct MemoSpec {
    /// Channel name, recorded with each message.
    name: String,
    /// A credential (rendered from a secret).
    #[serde(default)]
    token: String,
    /// `retry-once`: the first call of each message fails with a retryable error;
    /// `reject`: every call fails with a non-retryable one.
    #[serde(default)]
    mode: String,
}

struct Memo(MemoSpec, Mutex<u32>);

#[async_trait]
impl Notifier for Memo {
    async fn send(&self, n: &Notification) -> Result<Receipt> {
        let calls = {
            let mut c = self.1.lock().unwrap();
            *c += 1;
            *c
        };
        match self.0.mode.as_str() {
            "retry-once" if calls == 1 => {
                return Err(Error::new(ErrorKind::Unavailable, "HTTP 503").with_retry_after(Duration::from_millis(20)));
            }
            "reject" => {
                return Err(Error::new(ErrorKind::InvalidConfig, format!("HTTP 400: bad token {}", self.0.token)));
            }
            _ => {}
        }
        SENT.lock().unwrap().push((self.0.name.clone(), n.clone()));
        Ok(Receipt::new(Some(format!("m-{calls}")), Some(n.dedup_key.clone())))
    }
}

struct MemoKind;

impl ComponentKind for MemoKind {
    type Trait = dyn Notifier;
    type Spec = MemoSpec;
    const KIND: &'static str = "memo";
    const DESCRIPTION: &'static str = "test notifier";
    fn example() -> MemoSpec {
        MemoSpec { name: "x".into(), token: String::new(), mode: String::new() }
    }
    fn build(spec: MemoSpec) -> Result<Arc<dyn Notifier>> {
        Ok(Arc::new(Memo(spec, Mutex::new(0))))
    }
}

fn ssot(channels: serde_json::Value, routes: serde_json::Value) -> Ssot {
    ssot_with_secret(channels, routes, "/nonexistent")
}

fn ssot_with_secret(channels: serde_json::Value, routes: serde_json::Value, secret_file: &str) -> Ssot {
    Ssot {
        automations: serde_json::from_value(json!({"version": 1})).unwrap(),
        pipelines: serde_json::from_value(json!({"version": 1, "pipelines": {
            "deploy": {"description": "d", "labels": {"team": "web"}, "steps": [{"id": "a", "run": {"command": "true"}}]},
            "backup": {"description": "b", "steps": [{"id": "a", "run": {"command": "true"}}]},
        }}))
        .unwrap(),
        orchestration: serde_json::from_value(json!({"version": 1, "environments": {"prod": {}}, "runners": {"local": {"kind": "local"}}})).unwrap(),
        monitoring: serde_json::from_value(json!({"version": 1, "channels": channels, "routes": routes})).unwrap(),
        security: serde_json::from_value(json!({"version": 1, "secrets": {"memo_token": {"file": secret_file}}}))
            .unwrap(),
    }
}

struct Fixture {
    engine: Engine,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

fn fixture(ssot: Ssot) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let mut catalog = Catalog::new();
    catalog.notifiers.register_kind::<MemoKind>().unwrap();
    let engine = Engine::new(Arc::new(ssot), Arc::new(catalog), store.clone(), dir.path().to_owned());
    Fixture { engine, store, _dir: dir }
}

fn event(kind: &str, run: &str, step: Option<&str>) -> Event {
    let severity = if kind == "run.recovered" { Severity::Info } else { Severity::Error };
    let mut e = Event::new(kind, severity, format!("{kind} in {run}"));
    e.run_id = Some(run.into());
    e.pipeline = Some("deploy".into());
    e.environment = Some("prod".into());
    e.step = step.map(str::to_owned);
    e
}

async fn deliver(f: &Fixture, events: &[Event]) -> Summary {
    let policy =
        DeliveryPolicy { attempts: 3, backoff: Duration::from_millis(5), max_wait: Duration::from_millis(100) };
    let notifications = Notifications::start_with(&f.engine, policy).expect("routes are configured");
    for e in events {
        f.engine.bus().publish(e.clone());
        // Decisions read the store; let each event's record land before the next.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    notifications.finish(Duration::from_secs(10)).await
}

fn sent() -> Vec<(String, Notification)> {
    std::mem::take(&mut *SENT.lock().unwrap())
}

fn memo(name: &str) -> serde_json::Value {
    json!({"kind": "memo", "spec": {"name": name}})
}

#[tokio::test]
async fn one_failing_run_is_one_message_per_channel() {
    let _serial = SERIAL.lock().await;
    sent();
    let routes = json!([{"name": "all", "match": {"events": ["run.*", "step.*"]}, "channels": ["a", "b"]}]);
    let f = fixture(ssot(json!({"a": memo("a"), "b": memo("b")}), routes));
    let events = [
        event("step.retrying", "r-1", Some("migrate")),
        event("step.retrying", "r-1", Some("migrate")),
        event("step.retrying", "r-1", Some("migrate")),
        event("step.failed", "r-1", Some("migrate")),
        event("run.failed", "r-1", None),
    ];
    let summary = deliver(&f, &events).await;
    assert_eq!(summary, Summary { sent: 2, failed: 0, suppressed: 8, unfinished: 0 });
    let got = sent();
    assert_eq!(got.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let records = f.store.deliveries("r-1").unwrap();
    assert_eq!(records.len(), 10);
    let grouped = records.iter().filter(|d| d.status == DeliveryStatus::Suppressed).collect::<Vec<_>>();
    assert!(grouped.iter().all(|d| d.error.as_deref().unwrap().starts_with("grouped into delivery #")), "{grouped:?}");
}

#[tokio::test]
async fn duplicates_within_the_window_are_suppressed_until_a_recovery() {
    let _serial = SERIAL.lock().await;
    sent();
    let routes = json!([{"name": "failures", "channels": ["pager"], "dedup_window": "30m"}]);
    let f = fixture(ssot(json!({"pager": memo("pager")}), routes));
    let events = [
        event("run.failed", "r-1", None),
        event("run.failed", "r-2", None),
        event("run.recovered", "r-3", None),
        event("run.failed", "r-4", None),
        event("run.succeeded", "r-5", None),
    ];
    let summary = deliver(&f, &events).await;
    assert_eq!(summary, Summary { sent: 3, failed: 0, suppressed: 1, unfinished: 0 });
    let got = sent();
    let kinds: Vec<(&str, bool)> =
        got.iter().map(|(_, n)| (n.event.as_ref().unwrap().kind.as_str(), n.resolve)).collect();
    assert_eq!(kinds, [("run.failed", false), ("run.recovered", true), ("run.failed", false)]);
    assert!(got.iter().all(|(_, n)| n.dedup_key == "nexus/deploy/prod"));
    let dup = &f.store.deliveries("r-2").unwrap()[0];
    assert_eq!(dup.status, DeliveryStatus::Suppressed);
    assert!(dup.error.as_deref().unwrap().contains("duplicate of delivery #"), "{dup:?}");
    assert!(f.store.deliveries("r-5").unwrap().is_empty(), "a plain success matches no default route");
}

#[tokio::test]
async fn the_rate_limit_holds_back_failures_but_never_recoveries() {
    let _serial = SERIAL.lock().await;
    sent();
    let channels = json!({"chat": {"kind": "memo", "spec": {"name": "chat"}, "rate_limit_per_hour": 2}});
    let f = fixture(ssot(channels, json!([{"name": "r", "channels": ["chat"]}])));
    let events =
        [event("run.failed", "r-1", None), event("run.failed", "r-2", None), event("run.failed", "r-3", None), {
            event("run.recovered", "r-4", None)
        }];
    let summary = deliver(&f, &events).await;
    assert_eq!(summary, Summary { sent: 3, failed: 0, suppressed: 1, unfinished: 0 });
    let limited = &f.store.deliveries("r-3").unwrap()[0];
    assert!(limited.error.as_deref().unwrap().contains("rate limit of 2 messages per hour"), "{limited:?}");
    assert_eq!(f.store.deliveries("r-4").unwrap()[0].status, DeliveryStatus::Sent);
}

#[tokio::test]
async fn routes_filter_by_label_and_continue() {
    let _serial = SERIAL.lock().await;
    sent();
    let routes = json!([
        {"name": "web", "match": {"labels": {"team": "web"}}, "channels": ["web"], "continue": true},
        {"name": "rest", "channels": ["rest"]},
        {"name": "never", "channels": ["never"]},
    ]);
    let f = fixture(ssot(json!({"web": memo("web"), "rest": memo("rest"), "never": memo("never")}), routes));
    let mut backup = event("run.failed", "r-2", None);
    backup.pipeline = Some("backup".into());
    deliver(&f, &[event("run.failed", "r-1", None), backup]).await;
    let got: Vec<(String, String)> = sent().into_iter().map(|(c, n)| (c, n.event.unwrap().pipeline.unwrap())).collect();
    let expect = [("web", "deploy"), ("rest", "deploy"), ("rest", "backup")];
    assert_eq!(got, expect.map(|(a, b)| (a.to_owned(), b.to_owned())));
}

#[tokio::test]
async fn retries_are_recorded_and_failures_are_redacted() {
    let _serial = SERIAL.lock().await;
    sent();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "tok-3f9a2c\n").unwrap();
    let channels = json!({
        "flaky": {"kind": "memo", "spec": {"name": "flaky", "mode": "retry-once"}},
        "broken": {"kind": "memo", "spec": {"name": "broken", "token": "{{ secrets.memo_token }}", "mode": "reject"}},
        "templated": {"kind": "memo", "spec": {"name": "templated", "token": "{{ secrets.memo_token }}"},
                      "template": "{{ event.title }} after {{ run.status or 'unknown' }}: {{ event.message }}"},
    });
    let routes = json!([{"name": "r", "channels": ["flaky", "broken", "templated"]}]);
    let f = fixture(ssot_with_secret(channels, routes, secret.path().to_str().unwrap()));
    let mut failed = event("run.failed", "r-1", None);
    failed.message = "deploy failed: token tok-3f9a2c refused".into();
    let summary = deliver(&f, &[failed]).await;
    assert_eq!(summary, Summary { sent: 2, failed: 1, suppressed: 0, unfinished: 0 });
    let records = f.store.deliveries("r-1").unwrap();
    let by = |c: &str| records.iter().find(|d| d.channel == c).unwrap().clone();
    assert_eq!((by("flaky").status, by("flaky").attempts), (DeliveryStatus::Sent, 2));
    let broken = by("broken");
    assert_eq!((broken.status, broken.attempts), (DeliveryStatus::Failed, 1));
    assert!(broken.error.as_deref().unwrap().contains("HTTP 400: bad token"), "{broken:?}");
    let got = sent();
    let templated = &got.iter().find(|(c, _)| c == "templated").unwrap().1;
    assert!(templated.templated);
    assert!(
        templated.body.starts_with("deploy failed in prod after unknown: deploy failed: token "),
        "{}",
        templated.body
    );
    for d in &records {
        assert!(!format!("{d:?}").contains("tok-3f9a2c"), "secret in the delivery record: {d:?}");
    }
    // The channels whose spec reads the secret redact it from what they send (a run's
    // own secrets were redacted by the engine before the event was published).
    assert!(!format!("{templated:?}").contains("tok-3f9a2c"), "secret in a message: {templated:?}");
    assert!(templated.body.contains("token *** refused"), "{}", templated.body);
}

#[test]
fn deliveries_cut_short_by_a_crash_are_closed_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let record = |status| DeliveryRecord {
        id: 0,
        run_id: Some("r-1".into()),
        route: "r".into(),
        channel: "c".into(),
        event_kind: "run.failed".into(),
        pipeline: None,
        environment: None,
        fingerprint: "f".into(),
        dedup_key: "k".into(),
        status,
        attempts: 1,
        error: None,
        receipt: None,
        created_at: 1,
        finished_at: None,
    };
    store.record_delivery(&record(DeliveryStatus::Sending)).unwrap();
    store.record_delivery(&record(DeliveryStatus::Sent)).unwrap();
    assert_eq!(close_interrupted(&store, "r-1").unwrap(), 1);
    let statuses: Vec<DeliveryStatus> = store.deliveries("r-1").unwrap().iter().map(|d| d.status).collect();
    assert_eq!(statuses, [DeliveryStatus::Failed, DeliveryStatus::Sent]);
    assert_eq!(close_interrupted(&store, "r-1").unwrap(), 0);
}
