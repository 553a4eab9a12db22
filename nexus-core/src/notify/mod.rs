//! Notifications: engine events routed to channels (monitoring_registry.yaml `routes`
//! and `channels`), deduplicated, grouped, rate limited, sent with retries, and every
//! delivery recorded in the state store.
//!
//! For each event on the [`EventBus`](crate::engine::EventBus), the matching routes
//! are found ([`route`]); for each of their channels one of two things is recorded
//! before anything is sent (write-ahead, like every side effect):
//!
//! - `suppressed`, with the reason, when the message would add nothing: the run
//!   already produced a failure message on that channel (**grouping**: one failing run
//!   is one message, however many steps failed or retried), the same news went to the
//!   channel within the route's `dedup_window` (**deduplication**; a recovery in between
//!   starts afresh), or the channel's `rate_limit_per_hour` is used up (recoveries are
//!   never held back: they resolve incidents);
//! - `sending`, then `sent` or `failed` once the notifier answered, after retries on
//!   timeouts, 429 (honouring `Retry-After`) and 5xx ([`deliver`]).
//!
//! The history lives in the store, so these rules hold across separate `nexus`
//! processes. A failed delivery never fails the pipeline: it is recorded, shown by
//! `nexus show RUN`, and reported on the terminal. Channel specs are rendered when a
//! message is sent, with the secrets they name resolved then; those values are redacted
//! from everything the message carries.

pub mod deliver;
mod message;
pub mod route;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use self::deliver::{DeliveryPolicy, send_with_retries};
use crate::catalog::Catalog;
use crate::engine::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Channel, Route, Ssot};
use crate::plan::{render_str, render_value, template_env};
use crate::secrets::{self, Redactor};
use crate::state::{DeliveryRecord, DeliveryStatus, Millis, StateStore, now_millis};
use crate::traits::{Event, Notification, Notifier, Receipt};

/// Event types that tell of a failing run; a run gets one of them per channel.
const FAILURE_KINDS: &[&str] = &["run.failed", "step.failed", "step.retrying"];
/// Event types that tell a pipeline is fine again (they reset deduplication).
const RECOVERY_KINDS: &[&str] = &["run.recovered", "run.succeeded"];
const HOUR_MS: Millis = 3_600_000;

/// What happened to the notifications of a run, for the terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Delivered.
    pub sent: usize,
    /// Given up on.
    pub failed: usize,
    /// Not sent on purpose (duplicate, grouped, rate limited).
    pub suppressed: usize,
    /// Still being sent when the time to wait ran out.
    pub unfinished: usize,
}

/// The notification dispatcher of one `nexus` process, subscribed to an engine's bus.
pub struct Notifications {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Summary>,
}

impl Notifications {
    /// Subscribes to `engine`'s events. Returns `None` when no route is configured.
    pub fn start(engine: &Engine) -> Option<Notifications> {
        Self::start_with(engine, DeliveryPolicy::default())
    }

    /// Like [`start`](Self::start), with a delivery policy.
    pub fn start_with(engine: &Engine, policy: DeliveryPolicy) -> Option<Notifications> {
        if engine.ssot().monitoring.routes.is_empty() {
            return None;
        }
        let dispatcher = Arc::new(Dispatcher {
            ssot: engine.ssot().clone(),
            catalog: engine.catalog().clone(),
            store: engine.store().clone(),
            state_dir: engine.state_dir().to_owned(),
            policy,
        });
        let mut events = engine.bus().subscribe();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut sends = JoinSet::new();
            let mut summary = Summary::default();
            loop {
                tokio::select! {
                    biased;
                    received = events.recv() => match received {
                        Some(event) => dispatcher.dispatch(&event, &mut sends, &mut summary),
                        None => break,
                    },
                    _ = stopped.cancelled() => break,
                }
            }
            while let Some(done) = sends.join_next().await {
                match done {
                    Ok(DeliveryStatus::Sent) => summary.sent += 1,
                    _ => summary.failed += 1,
                }
            }
            summary
        });
        Some(Notifications { stop, task })
    }

    /// Sends what is still queued and waits up to `limit` for the deliveries to end.
    pub async fn finish(self, limit: Duration) -> Summary {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        match tokio::time::timeout(limit, self.task).await {
            Ok(Ok(summary)) => summary,
            Ok(Err(_)) => Summary::default(),
            Err(_) => {
                abort.abort();
                Summary { unfinished: 1, ..Summary::default() }
            }
        }
    }
}

struct Dispatcher {
    ssot: Arc<Ssot>,
    catalog: Arc<Catalog>,
    store: Arc<dyn StateStore>,
    state_dir: PathBuf,
    policy: DeliveryPolicy,
}

impl Dispatcher {
    fn dispatch(self: &Arc<Self>, event: &Event, sends: &mut JoinSet<DeliveryStatus>, summary: &mut Summary) {
        let routes = route::matching_routes(&self.ssot, event);
        if routes.is_empty() {
            return;
        }
        let (dedup_key, resolve) = (message::dedup_key(event), message::resolves(event));
        // The message (which reads the run, its steps and attempts, and a log tail) is
        // built for the first channel that is not held back: an event whose deliveries
        // are all grouped or duplicates never reads them.
        let mut prepared: Option<(Notification, Value)> = None;
        for route in routes {
            for channel_name in &route.channels {
                let Some(channel) = self.ssot.monitoring.channels.get(channel_name) else { continue };
                let fingerprint = message::fingerprint(&route.name, channel_name, event);
                let mut record = pending_record(&route.name, channel_name, event, fingerprint, &dedup_key);
                let reason = self.hold_back(route, channel, &record, resolve);
                if let Some(reason) = &reason {
                    record.status = DeliveryStatus::Suppressed;
                    record.error = Some(reason.clone());
                    record.finished_at = Some(record.created_at);
                }
                // Best effort: a store that cannot record must not stop the message.
                let id = self.store.record_delivery(&record).ok();
                if reason.is_some() {
                    summary.suppressed += 1;
                    continue;
                }
                let (notification, context) = prepared.get_or_insert_with(|| {
                    let run = message::RunContext::read(self.store.as_ref(), &self.state_dir, event);
                    let notification = message::notification(event, &run);
                    let context = message::template_context(&self.ssot, event, &notification, &run);
                    (notification, context)
                });
                let this = self.clone();
                let channel = channel.clone();
                let (event, notification, context) = (event.clone(), notification.clone(), context.clone());
                let channel_name = channel_name.clone();
                sends.spawn(async move {
                    let sender = Sender {
                        ssot: &this.ssot,
                        catalog: &this.catalog,
                        store: this.store.as_ref(),
                        policy: this.policy,
                    };
                    match sender.send(&channel_name, &channel, id, &event, notification, &context).await {
                        (Ok(_), _) => DeliveryStatus::Sent,
                        (Err(_), _) => DeliveryStatus::Failed,
                    }
                });
            }
        }
    }

    /// Why a message should not be sent, if it should not.
    fn hold_back(&self, route: &Route, channel: &Channel, record: &DeliveryRecord, resolve: bool) -> Option<String> {
        let kind = record.event_kind.as_str();
        let live = |d: &DeliveryRecord| matches!(d.status, DeliveryStatus::Sent | DeliveryStatus::Sending);
        if let Some(run) = &record.run_id
            && FAILURE_KINDS.contains(&kind)
        {
            let earlier = self.store.deliveries(run).unwrap_or_default();
            // Sent, being sent or given up on: either way the run has its message (a
            // channel that refused it is not asked again for the same run).
            if let Some(d) = earlier.iter().find(|d| {
                d.channel == record.channel
                    && FAILURE_KINDS.contains(&d.event_kind.as_str())
                    && d.status != DeliveryStatus::Suppressed
            }) {
                return Some(format!(
                    "grouped into delivery #{} ({}): one message per failing run and channel",
                    d.id, d.event_kind
                ));
            }
        }
        let window = route.dedup_window.map_or(0, |w| w.0.as_millis() as Millis);
        let rate_limit = channel.rate_limit_per_hour.filter(|_| !resolve);
        if window == 0 && rate_limit.is_none() {
            return None;
        }
        let now = record.created_at;
        let recent = self.store.recent_deliveries(&record.channel, now - window.max(HOUR_MS)).unwrap_or_default();
        if window > 0
            && let Some(d) = recent
                .iter()
                .rev()
                .find(|d| d.fingerprint == record.fingerprint && live(d) && d.created_at >= now - window)
        {
            let failure = |k: &str| FAILURE_KINDS.contains(&k);
            let reset = recent.iter().any(|x| {
                x.id > d.id
                    && x.dedup_key == d.dedup_key
                    && live(x)
                    && (failure(&x.event_kind) || RECOVERY_KINDS.contains(&x.event_kind.as_str()))
                    && failure(&x.event_kind) != failure(&d.event_kind)
            });
            if !reset {
                let ago = humantime::format_duration(Duration::from_secs(((now - d.created_at) / 1000).max(0) as u64));
                let window = humantime::format_duration(Duration::from_millis(window as u64));
                return Some(format!("duplicate of delivery #{} sent {ago} ago (dedup window {window})", d.id));
            }
        }
        if let Some(limit) = rate_limit {
            let sent = recent.iter().filter(|d| live(d) && d.created_at >= now - HOUR_MS).count();
            if sent >= limit as usize {
                return Some(format!("rate limit of {limit} messages per hour reached on `{}`", record.channel));
            }
        }
        None
    }
}

/// A delivery about to be sent (or suppressed): what the store records first.
fn pending_record(route: &str, channel: &str, event: &Event, fingerprint: String, dedup_key: &str) -> DeliveryRecord {
    DeliveryRecord {
        id: 0,
        run_id: event.run_id.clone(),
        route: route.to_owned(),
        channel: channel.to_owned(),
        event_kind: event.kind.clone(),
        pipeline: event.pipeline.clone(),
        environment: event.environment.clone(),
        fingerprint,
        dedup_key: dedup_key.to_owned(),
        status: DeliveryStatus::Sending,
        attempts: 0,
        error: None,
        receipt: None,
        created_at: now_millis(),
        finished_at: None,
    }
}

/// What sending needs, whoever sends: the dispatcher or a `notify` step.
struct Sender<'a> {
    ssot: &'a Ssot,
    catalog: &'a Catalog,
    store: &'a dyn StateStore,
    policy: DeliveryPolicy,
}

impl Sender<'_> {
    /// Sends `notification` to channel `name` and records how `delivery` ended: the
    /// channel's template applied, its spec rendered with the secrets it names (for the
    /// event's environment), those secrets redacted from the message and from any
    /// error, retries per the policy. Returns the receipt or the (redacted) error, and
    /// the attempts made.
    async fn send(
        &self,
        name: &str,
        channel: &Channel,
        delivery: Option<i64>,
        event: &Event,
        mut notification: Notification,
        context: &Value,
    ) -> (std::result::Result<Receipt, String>, u32) {
        let template_error = apply_template(channel, &mut notification, context);
        let environment = event.environment.clone().or_else(|| self.ssot.orchestration.defaults.environment.clone());
        let (result, attempts) = match prepare(self.ssot, self.catalog, name, channel, environment.as_deref(), context)
        {
            Err(e) => (Err(e.to_string()), 0),
            Ok((notifier, redactor)) => {
                redact_notification(&redactor, &mut notification);
                let (result, attempts) = send_with_retries(notifier.as_ref(), &notification, self.policy).await;
                (result.map_err(|e| redactor.redact(&e.to_string())), attempts)
            }
        };
        let result = match (result, &template_error) {
            (Err(e), Some(t)) => Err(format!("{e}; {t}")),
            (r, _) => r,
        };
        if let Some(id) = delivery {
            let (status, error, receipt) = match &result {
                // A template that failed is noted even when the default message went out.
                Ok(r) => (DeliveryStatus::Sent, template_error, receipt_text(r)),
                Err(e) => (DeliveryStatus::Failed, Some(e.clone()), None),
            };
            let _ = self.store.delivery_finished(id, status, attempts, error.as_deref(), receipt.as_deref());
        }
        (result, attempts)
    }
}

/// Renders the channel's `template` into the body. On a render error the default body
/// stays and the error is returned for the delivery record.
fn apply_template(channel: &Channel, notification: &mut Notification, context: &Value) -> Option<String> {
    let template = channel.template.as_ref()?;
    match render_str(&template_env(), template, context) {
        Ok(body) => {
            notification.body = body;
            notification.templated = true;
            None
        }
        Err(e) => Some(format!("the channel's template failed ({e}); the default message was sent")),
    }
}

fn receipt_text(receipt: &Receipt) -> Option<String> {
    receipt.message_id.clone().or_else(|| receipt.dedup_key.clone())
}

fn redact_notification(redactor: &Redactor, n: &mut Notification) {
    if redactor.is_empty() {
        return;
    }
    n.title = redactor.redact(&n.title);
    n.body = redactor.redact(&n.body);
    for (_, v) in &mut n.facts {
        *v = redactor.redact(v);
    }
    for line in &mut n.log_tail {
        *line = redactor.redact(line);
    }
    if let Some(event) = &mut n.event {
        event.message = redactor.redact(&event.message);
    }
}

/// The secrets a channel's spec names (`{{ secrets.X }}`).
fn secrets_named(spec: &Value, out: &mut Vec<String>) {
    match spec {
        Value::String(s) if s.contains("{{") || s.contains("{%") => {
            if let Ok(t) = template_env().template_from_str(s) {
                for var in t.undeclared_variables(true) {
                    if let Some(name) = var.strip_prefix("secrets.")
                        && !out.iter().any(|n| n == name)
                    {
                        out.push(name.to_owned());
                    }
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| secrets_named(v, out)),
        Value::Object(map) => map.values().for_each(|v| secrets_named(v, out)),
        _ => {}
    }
}

/// Builds a channel's notifier: its spec rendered with `context` and the secrets it
/// names (resolved for `environment`), and a redactor of those secrets.
pub fn prepare(
    ssot: &Ssot,
    catalog: &Catalog,
    channel_name: &str,
    channel: &Channel,
    environment: Option<&str>,
    context: &Value,
) -> Result<(Arc<dyn Notifier>, Redactor)> {
    let fail = |e: Error| e.with_context("channel", channel_name);
    let mut names = Vec::new();
    secrets_named(&channel.spec, &mut names);
    let mut resolved = serde_json::Map::new();
    let mut values = Vec::new();
    for name in names {
        let value = secrets::resolve(&ssot.security, &name, environment.unwrap_or_default()).map_err(fail)?;
        values.push(value.expose().to_owned());
        resolved.insert(name, Value::String(value.expose().to_owned()));
    }
    let security = &ssot.security;
    let redactor = Redactor::new(
        values.iter().map(String::as_str),
        &security.redaction.patterns,
        security.redaction.replacement.as_deref(),
    );
    let mut context = context.clone();
    if let Value::Object(map) = &mut context {
        map.insert("secrets".into(), Value::Object(resolved));
    }
    let spec = render_value(&template_env(), &channel.spec, &context)
        .map_err(|e| Error::new(ErrorKind::InvalidConfig, redactor.redact(&e.to_string())))
        .map_err(fail)?;
    let notifier = catalog.notifiers.get(&channel.kind)?.build(spec).map_err(|e| {
        let text = redactor.redact(&e.to_string());
        fail(Error::new(e.kind(), text).set_retryable(e.is_retryable()))
    })?;
    Ok((notifier, redactor))
}

/// The error for a channel `name` that monitoring_registry.yaml does not declare, with
/// the nearest declared name if one is close.
pub fn unknown_channel(ssot: &Ssot, name: &str) -> String {
    let mut message = format!("no channel `{name}` in monitoring_registry.yaml");
    if let Some(near) = crate::suggest::closest(name, ssot.monitoring.channels.keys().map(String::as_str)) {
        message.push_str(&format!("; did you mean `{near}`?"));
    }
    message
}

/// Sends a test message to a channel once (`nexus notify test CHANNEL`); returns the
/// receipt or the exact error (redacted).
pub async fn send_test(
    ssot: &Ssot,
    catalog: &Catalog,
    channel_name: &str,
    environment: Option<&str>,
) -> std::result::Result<Receipt, String> {
    let Some(channel) = ssot.monitoring.channels.get(channel_name) else {
        return Err(unknown_channel(ssot, channel_name));
    };
    let environment = environment.map(str::to_owned).or_else(|| ssot.orchestration.defaults.environment.clone());
    let mut event = Event::new(
        "notify.test",
        crate::model::Severity::Info,
        format!("Test message from nexus to channel `{channel_name}`: if you read this, the channel works."),
    );
    event.environment = environment.clone();
    let mut notification = Notification::new(
        format!("nexus test message ({channel_name})"),
        event.message.clone(),
        crate::model::Severity::Info,
        format!("nexus/test/{channel_name}"),
    );
    notification.facts = vec![("Channel".into(), channel_name.to_owned())];
    if let Some(env) = &environment {
        notification.facts.push(("Environment".into(), env.clone()));
    }
    notification.event = Some(event.clone());
    let context = message::template_context(ssot, &event, &notification, &message::RunContext::default());
    if let Some(e) = apply_template(channel, &mut notification, &context) {
        return Err(e);
    }
    let (notifier, redactor) =
        prepare(ssot, catalog, channel_name, channel, environment.as_deref(), &context).map_err(|e| e.to_string())?;
    notifier.send(&notification).await.map_err(|e| redactor.redact(&e.to_string()))
}

/// Marks the deliveries of a run still `sending` — its process died while sending
/// them — as failed, so the journal says what happened; returns how many. (Their
/// messages are not sent again: whether the receiver got them is unknown, and a second
/// page is worse than none for an event that is over.)
pub fn close_interrupted(store: &dyn StateStore, run_id: &str) -> Result<usize> {
    let mut closed = 0;
    for d in store.deliveries(run_id)?.into_iter().filter(|d| d.status == DeliveryStatus::Sending) {
        let why = "interrupted: the nexus process died while sending it; not sent again";
        store.delivery_finished(d.id, DeliveryStatus::Failed, d.attempts, Some(why), None)?;
        closed += 1;
    }
    Ok(closed)
}

/// What became of a notify step's message on one channel.
#[derive(Debug)]
pub struct StepDelivery {
    /// The channel.
    pub channel: String,
    /// The receipt, or the error (redacted).
    pub result: std::result::Result<Receipt, String>,
    /// Attempts made.
    pub attempts: u32,
}

/// Sends the message of a pipeline's `notify` step to its channels, with retries, each
/// delivery recorded (route `step:<id>`). `event` names the run, pipeline, environment
/// and step; its message is the text to send.
pub async fn send_step_message(
    ssot: &Ssot,
    catalog: &Catalog,
    store: &dyn StateStore,
    policy: DeliveryPolicy,
    event: &Event,
    channels: &[String],
) -> Vec<StepDelivery> {
    let mut notification = Notification::new(
        event.message.lines().next().unwrap_or_default().to_owned(),
        event.message.clone(),
        event.severity,
        format!(
            "nexus/{}/{}/notify/{}",
            event.pipeline.as_deref().unwrap_or("-"),
            event.environment.as_deref().unwrap_or("-"),
            event.step.as_deref().unwrap_or("-")
        ),
    );
    notification.event = Some(event.clone());
    let facts = [("Pipeline", &event.pipeline), ("Environment", &event.environment), ("Run", &event.run_id)];
    notification.facts = facts.iter().filter_map(|(k, v)| v.as_ref().map(|v| ((*k).to_owned(), v.clone()))).collect();
    notification.link = event.run_id.as_ref().map(|r| format!("nexus show {r}"));
    let context = message::template_context(ssot, event, &notification, &message::RunContext::default());
    let route = format!("step:{}", event.step.as_deref().unwrap_or("-"));
    let sender = Sender { ssot, catalog, store, policy };
    let mut out = Vec::new();
    for channel_name in channels {
        let fingerprint = format!("{route}|{channel_name}|{}", notification.dedup_key);
        let record = pending_record(&route, channel_name, event, fingerprint, &notification.dedup_key);
        let id = store.record_delivery(&record).ok();
        let (result, attempts) = match ssot.monitoring.channels.get(channel_name) {
            Some(channel) => sender.send(channel_name, channel, id, event, notification.clone(), &context).await,
            None => {
                let error = format!("no channel `{channel_name}` in monitoring_registry.yaml");
                if let Some(id) = id {
                    let _ = store.delivery_finished(id, DeliveryStatus::Failed, 0, Some(&error), None);
                }
                (Err(error), 0)
            }
        };
        out.push(StepDelivery { channel: channel_name.clone(), result, attempts });
    }
    out
}

#[cfg(test)]
mod tests;
