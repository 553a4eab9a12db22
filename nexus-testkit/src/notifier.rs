//! The notifier behaviour suite: one `pub async fn` per behaviour of the `Notifier`
//! trait, which every notifier kind's tests run against its own notifier and receiver
//! (a local HTTP receiver, a real SMTP sink), through a [`NotifierFixture`].
//!
//! - [`delivers_a_failure`]: a failure notification arrives with its title, every fact,
//!   every log line and the link;
//! - [`delivers_a_resolve`]: a resolve arrives and is marked as one (and a failure is not);
//! - [`uses_a_templated_body_as_is`]: an operator's rendered template is the message;
//! - [`never_leaks_secrets`]: the spec's secret values appear in what the receiver got
//!   only where they belong (an `Authorization` header, PagerDuty's `routing_key`), and
//!   in no error;
//! - [`unreachable_receiver_is_retryable`]: a receiver that does not listen gives a
//!   retryable `Unavailable`/`Timeout` error of operation `notify.send` that names the
//!   channel's host and no secret.
//!
//! And for a kind's unit tests: [`builds`], the check that `build` succeeds on the
//! example with some fields changed (templates rendered as the router would).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nexus_core::model::Severity;
use nexus_core::traits::{Event, Notification, Notifier};
use nexus_core::{ComponentKind, Error, ErrorKind};
use serde_json::Value;

/// A secret value the test put in the notifier's spec, and the one exact text in which
/// it may travel to the receiver (`authorization: Bearer xoxb-…`, `"routing_key":"…"`),
/// if any: anywhere else in a delivery, or in any error, it is a leak.
#[derive(Debug, Clone)]
pub struct Secret {
    /// The value.
    pub value: String,
    /// The text, containing the value, where it legitimately appears in a delivery.
    pub carried_in: Option<String>,
}

impl Secret {
    /// A secret that is never sent (a signing key, an SMTP password sent only in `AUTH`).
    pub fn never_sent(value: impl Into<String>) -> Self {
        Secret { value: value.into(), carried_in: None }
    }

    /// A secret sent only as part of `carried_in`.
    pub fn sent_in(value: impl Into<String>, carried_in: impl Into<String>) -> Self {
        Secret { value: value.into(), carried_in: Some(carried_in.into()) }
    }
}

/// What a notifier kind's test supplies to run the suite: the notifier under test, and
/// what its receiver captured.
pub trait NotifierFixture {
    /// The notifier under test, built from a spec holding [`NotifierFixture::secrets`],
    /// sending to the fixture's receiver.
    fn notifier(&self) -> Arc<dyn Notifier>;

    /// The same kind with the same secrets, sending to an address where nothing
    /// listens; and that address's host as errors should name it (`127.0.0.1:PORT`).
    fn unreachable(&self) -> (Arc<dyn Notifier>, String);

    /// The secret values in the spec of both notifiers.
    fn secrets(&self) -> Vec<Secret>;

    /// Every delivery the receiver got from this fixture, oldest first, each as the text
    /// a reader or a log of the receiver would see: the whole HTTP request (request line,
    /// headers, body) or the whole email as written by the SMTP server.
    fn captured(&self) -> Vec<String>;

    /// Whether `delivery` (one item of [`NotifierFixture::captured`]) says the incident
    /// is resolved (`"event_action":"resolve"`, `"resolve":true`, a "Resolved" subject).
    fn marks_resolved(&self, delivery: &str) -> bool;
}

/// A failure notification as the router builds it: a `run.failed` event with facts, a
/// log tail and a link.
pub fn failure_notification() -> Notification {
    let mut event = Event::new("run.failed", Severity::Error, "deploy-shop failed in prod at step deploy-api");
    event.run_id = Some("r-20261128-0001".to_owned());
    event.pipeline = Some("deploy-shop".to_owned());
    event.environment = Some("prod".to_owned());
    event.step = Some("deploy-api".to_owned());
    event.labels.insert("team".to_owned(), "platform".to_owned());
    let mut n = Notification::new(
        "deploy-shop failed in prod",
        "Step deploy-api failed after 3 attempts.",
        Severity::Error,
        "nexus/deploy-shop/prod",
    );
    n.event = Some(event);
    n.facts = vec![
        ("Pipeline".to_owned(), "deploy-shop".to_owned()),
        ("Environment".to_owned(), "prod".to_owned()),
        ("Failed step".to_owned(), "deploy-api".to_owned()),
        ("Duration".to_owned(), "4m12s".to_owned()),
        ("Run".to_owned(), "r-20261128-0001".to_owned()),
    ];
    n.log_tail = vec![
        "pulling image registry.shop.internal/api:1.4.2".to_owned(),
        "waiting for rollout of deployment api".to_owned(),
        "error: readiness probe failed on pod api-7f9c".to_owned(),
    ];
    n.link = Some("https://nexus.shop.example/runs/r-20261128-0001".to_owned());
    n
}

/// The resolve of [`failure_notification`]: same dedup key, `run.succeeded`.
pub fn resolve_notification() -> Notification {
    let mut n = failure_notification();
    n.title = "deploy-shop recovered in prod".to_owned();
    n.body = "The next run of deploy-shop succeeded.".to_owned();
    n.severity = Severity::Info;
    n.resolve = true;
    n.log_tail.clear();
    if let Some(event) = &mut n.event {
        event.kind = "run.succeeded".to_owned();
        event.severity = Severity::Info;
        event.at = SystemTime::now();
    }
    n
}

/// How long the suite waits for a delivery to show up at the receiver.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(10);

/// Sends `n` and returns the delivery it made (the first new item of `captured`),
/// polling with a deadline.
async fn send_and_capture<F: NotifierFixture>(fixture: &F, n: &Notification, what: &str) -> String {
    let before = fixture.captured().len();
    fixture.notifier().send(n).await.unwrap_or_else(|e| panic!("{what}: sending failed: {e:?}"));
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let captured = fixture.captured();
        if captured.len() > before {
            assert_eq!(captured.len(), before + 1, "{what}: one notification made several deliveries");
            return captured[before].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: `send` returned Ok but the receiver got nothing in {DELIVERY_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_shows(what: &str, delivery: &str, needles: &[&str]) {
    for needle in needles {
        assert!(delivery.contains(needle), "{what}: the delivery does not show `{needle}`:\n{delivery}");
    }
}

/// A failure notification arrives with its title, every fact name and value, every
/// line of the log tail, and the link; and is not marked resolved.
pub async fn delivers_a_failure<F: NotifierFixture>(fixture: &F) {
    let n = failure_notification();
    let delivery = send_and_capture(fixture, &n, "a failure notification").await;
    let mut needles = vec![n.title.as_str()];
    for (name, value) in &n.facts {
        needles.push(name);
        needles.push(value);
    }
    needles.extend(n.log_tail.iter().map(String::as_str));
    needles.extend(n.link.as_deref());
    assert_shows("a failure notification", &delivery, &needles);
    assert!(!fixture.marks_resolved(&delivery), "a failure notification is marked resolved:\n{delivery}");
}

/// A resolve notification arrives and is marked resolved.
pub async fn delivers_a_resolve<F: NotifierFixture>(fixture: &F) {
    let n = resolve_notification();
    let delivery = send_and_capture(fixture, &n, "a resolve notification").await;
    assert!(fixture.marks_resolved(&delivery), "a resolve notification is not marked resolved:\n{delivery}");
}

/// A `templated` notification's body (the operator's rendered template) arrives
/// unchanged.
pub async fn uses_a_templated_body_as_is<F: NotifierFixture>(fixture: &F) {
    let mut n = failure_notification();
    n.body = "OPERATOR TEMPLATE: deploy-shop broke in prod, see runbook RB-7 (on call: team platform)".to_owned();
    n.templated = true;
    let delivery = send_and_capture(fixture, &n, "a templated notification").await;
    assert_shows("a templated notification", &delivery, &[&n.body]);
}

/// The spec's secrets appear in the deliveries only where they belong, and in no error
/// of a failed send.
pub async fn never_leaks_secrets<F: NotifierFixture>(fixture: &F) {
    let _ = send_and_capture(fixture, &failure_notification(), "a failure notification").await;
    let _ = send_and_capture(fixture, &resolve_notification(), "a resolve notification").await;
    let secrets = fixture.secrets();
    assert!(!secrets.is_empty(), "the fixture gives no secret to look for");
    for delivery in fixture.captured() {
        for secret in &secrets {
            let mut text = delivery.clone();
            if let Some(carrier) = &secret.carried_in {
                assert!(carrier.contains(&secret.value), "the fixture's `carried_in` does not contain the secret");
                text = text.replace(carrier, "");
            }
            assert!(
                !text.contains(&secret.value),
                "a secret appears in a delivery outside of its place ({:?}):\n{delivery}",
                secret.carried_in
            );
        }
    }
    let (unreachable, _) = fixture.unreachable();
    let err = unreachable.send(&failure_notification()).await.expect_err("an unreachable receiver must fail");
    assert_error_hides(&err, &secrets);
}

/// A receiver where nothing listens gives a retryable `Unavailable` (or `Timeout`)
/// error of operation `notify.send` that names the host and shows no secret.
pub async fn unreachable_receiver_is_retryable<F: NotifierFixture>(fixture: &F) {
    let (notifier, host) = fixture.unreachable();
    let err = notifier.send(&failure_notification()).await.expect_err("an unreachable receiver must fail");
    assert!(matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Timeout), "{err:?}");
    assert!(err.is_retryable(), "an unreachable receiver must be retryable: {err:?}");
    assert_eq!(err.operation(), "notify.send", "{err:?}");
    assert!(err.to_string().contains(&host), "the error must name the host {host}: {err}");
    assert_error_hides(&err, &fixture.secrets());
}

/// Asserts that neither the `Display` nor the `Debug` of `err` (with its sources) shows
/// a secret value.
pub fn assert_error_hides(err: &Error, secrets: &[Secret]) {
    let shown = format!("{err}\n{err:?}");
    for secret in secrets {
        assert!(!shown.contains(&secret.value), "an error shows a secret:\n{shown}");
    }
}

/// `build` succeeds for the kind's example with `changes` applied (see
/// [`crate::example_with`]): give the rendered values of its templates, as the router
/// does before calling `build`.
pub fn builds<K: ComponentKind<Trait = dyn Notifier>>(changes: Value) {
    let spec = crate::example_with::<K>(changes);
    if let Err(e) = crate::descriptor::<K>().build(spec) {
        panic!("{}: `build` fails on the example: {e:?}", crate::who::<K>());
    }
}

/// Writes one `#[tokio::test]` per behaviour of this suite, each running it against the
/// fixture that `$fixture` (an expression, which may `.await`) makes; with
/// `ignore = "needs …"` first, every test is `#[ignore]` with that reason. Call it in a
/// module per fixture when a kind has several (`mod webhook { use super::*; … }`); the
/// calling crate needs `tokio` with `macros` and `rt` as a dev-dependency.
///
/// ```ignore
/// nexus_testkit::notifier_suite!(Fixture::new().await);
/// nexus_testkit::notifier_suite!(ignore = "needs smtp-sink (scripts/test-env.sh)", SinkFixture::new());
/// ```
#[macro_export]
macro_rules! notifier_suite {
    (@all ($($attr:tt)*) $fixture:expr) => {
        $crate::notifier_suite!(@one ($($attr)*) $fixture, delivers_a_failure);
        $crate::notifier_suite!(@one ($($attr)*) $fixture, delivers_a_resolve);
        $crate::notifier_suite!(@one ($($attr)*) $fixture, uses_a_templated_body_as_is);
        $crate::notifier_suite!(@one ($($attr)*) $fixture, never_leaks_secrets);
        $crate::notifier_suite!(@one ($($attr)*) $fixture, unreachable_receiver_is_retryable);
    };
    (@one ($($attr:tt)*) $fixture:expr, $name:ident) => {
        #[tokio::test]
        $($attr)*
        async fn $name() {
            $crate::notifier::$name(&$fixture).await;
        }
    };
    (ignore = $reason:literal, $fixture:expr) => {
        $crate::notifier_suite!(@all (#[ignore = $reason]) $fixture);
    };
    ($fixture:expr) => {
        $crate::notifier_suite!(@all () $fixture);
    };
}
