//! The JSON shapes that cross the plugin boundary: the values of the `nexus-core` traits
//! and [`nexus_core::Error`]. Both sides use these functions, so a value comes out of the
//! boundary as it went in. Part of the SDK version ([`crate::abi::SDK_VERSION`]).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nexus_core::model::{Map, Severity};
use nexus_core::traits::{
    Event, Health, HealthStatus, Notification, Outcome, Program, Receipt, Sample, SecretValue, Task,
};
use nexus_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Interns a string: `nexus_core::Error` keeps operations and context keys as
/// `&'static str`. The set of distinct names is small (they are code constants on the
/// plugin side), so this leaks a bounded amount.
fn intern(s: &str) -> &'static str {
    static SET: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = SET.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = set.get(s) {
        return found;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// An error as it crosses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// `ErrorKind::as_str`.
    pub kind: String,
    /// The message.
    pub message: String,
    /// Whether retrying may help.
    pub retryable: bool,
    /// The operation, possibly empty.
    #[serde(default)]
    pub operation: String,
    /// Key–value context.
    #[serde(default)]
    pub context: Vec<(String, String)>,
    /// `Retry-After`, in milliseconds.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// The source chain, rendered.
    #[serde(default)]
    pub source: Option<String>,
}

/// The kind named `name`; `Internal` for a name this host does not know.
pub fn kind_from_str(name: &str) -> ErrorKind {
    ErrorKind::from_name(name).unwrap_or(ErrorKind::Internal)
}

/// An error's wire form.
pub fn error_to_wire(e: &Error) -> WireError {
    let mut source = None;
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        source = Some(match source {
            None => text,
            Some(s) => format!("{s}: {text}"),
        });
        cause = c.source();
    }
    WireError {
        kind: e.kind().as_str().to_owned(),
        message: e.message().to_owned(),
        retryable: e.is_retryable(),
        operation: e.operation().to_owned(),
        context: e.context().iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        retry_after_ms: e.retry_after().map(|d| d.as_millis() as u64),
        source,
    }
}

/// The source of an error that crossed: its rendered text.
#[derive(Debug)]
struct RemoteSource(String);

impl std::fmt::Display for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RemoteSource {}

/// An error back from its wire form.
pub fn error_from_wire(w: WireError) -> Error {
    let mut e = Error::new(kind_from_str(&w.kind), w.message);
    if !w.operation.is_empty() {
        e = e.with_operation(intern(&w.operation));
    }
    for (k, v) in w.context {
        e = e.with_context(intern(&k), v);
    }
    if let Some(ms) = w.retry_after_ms {
        e = e.with_retry_after(Duration::from_millis(ms));
    }
    if let Some(source) = w.source {
        e = e.with_source(RemoteSource(source));
    }
    e.set_retryable(w.retryable)
}

fn time_to_wire(t: SystemTime) -> Value {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    json!([d.as_secs(), d.subsec_nanos()])
}

fn time_from_wire(v: &Value) -> SystemTime {
    let secs = v.get(0).and_then(Value::as_u64).unwrap_or(0);
    let nanos = v.get(1).and_then(Value::as_u64).unwrap_or(0) as u32;
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn bad(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Internal, format!("malformed {what} across the plugin boundary: {e}"))
        .with_operation("plugin.wire")
}

fn field<T: serde::de::DeserializeOwned>(v: &Value, name: &str, what: &str) -> Result<T> {
    serde_json::from_value(v.get(name).cloned().unwrap_or(Value::Null)).map_err(|e| bad(what, format!("`{name}`: {e}")))
}

/// A task's wire form (secrets included: they cross in memory, never to a log).
pub fn task_to_wire(t: &Task) -> Result<Value> {
    let program = match &t.program {
        Program::Shell { shell, script } => json!({"shell": {"shell": shell, "script": script}}),
        Program::Argv(argv) => json!({"argv": argv}),
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("this plugin SDK cannot carry the program {other:?}"),
            ));
        }
    };
    Ok(json!({
        "run_id": t.run_id,
        "step_id": t.step_id,
        "attempt": t.attempt,
        "program": program,
        "image": t.image,
        "env": t.env,
        "secrets": t.secrets.iter().map(|(k, v)| (k.as_str(), v.expose())).collect::<Vec<_>>(),
        "working_dir": t.working_dir,
        "timeout_ns": t.timeout.map(|d| d.as_nanos() as u64),
        "scratch_dir": t.scratch_dir,
    }))
}

/// A task back from its wire form.
pub fn task_from_wire(v: &Value) -> Result<Task> {
    let w = "task";
    let program = v.get("program").ok_or_else(|| bad(w, "no program"))?;
    let program = if let Some(shell) = program.get("shell") {
        Program::Shell { shell: field(shell, "shell", w)?, script: field(shell, "script", w)? }
    } else {
        Program::Argv(field(program, "argv", w)?)
    };
    let mut task = Task::new(
        field::<String>(v, "run_id", w)?,
        field::<String>(v, "step_id", w)?,
        field::<u32>(v, "attempt", w)?,
        program,
    );
    task.image = field(v, "image", w)?;
    task.env = field(v, "env", w)?;
    task.secrets =
        field::<Vec<(String, String)>>(v, "secrets", w)?.into_iter().map(|(k, s)| (k, SecretValue::new(s))).collect();
    task.working_dir = field(v, "working_dir", w)?;
    task.timeout = field::<Option<u64>>(v, "timeout_ns", w)?.map(Duration::from_nanos);
    task.scratch_dir = field(v, "scratch_dir", w)?;
    Ok(task)
}

/// An outcome's wire form.
pub fn outcome_to_wire(o: &Outcome) -> Value {
    json!({
        "exit_code": o.exit_code,
        "signal": o.signal,
        "outputs": o.outputs,
        "started": time_to_wire(o.started),
        "finished": time_to_wire(o.finished),
    })
}

/// An outcome back from its wire form.
pub fn outcome_from_wire(v: &Value) -> Result<Outcome> {
    let w = "outcome";
    let mut o = Outcome::exited(0, time_from_wire(&v["started"]), time_from_wire(&v["finished"]));
    o.exit_code = field(v, "exit_code", w)?;
    o.signal = field(v, "signal", w)?;
    o.outputs = field::<Map<String>>(v, "outputs", w)?;
    Ok(o)
}

fn status_str(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unhealthy => "unhealthy",
    }
}

/// A health result's wire form.
pub fn health_to_wire(h: &Health) -> Value {
    json!({"status": status_str(h.status), "latency_ns": h.latency.as_nanos() as u64, "detail": h.detail})
}

/// A health result back from its wire form.
pub fn health_from_wire(v: &Value) -> Result<Health> {
    let status = match v["status"].as_str() {
        Some("healthy") => HealthStatus::Healthy,
        Some("degraded") => HealthStatus::Degraded,
        Some("unhealthy") => HealthStatus::Unhealthy,
        other => return Err(bad("health", format!("status {other:?}"))),
    };
    Ok(Health::new(
        status,
        Duration::from_nanos(field(v, "latency_ns", "health")?),
        field::<String>(v, "detail", "health")?,
    ))
}

/// Samples' wire form.
pub fn samples_to_wire(samples: &[Sample]) -> Value {
    Value::Array(samples.iter().map(|s| json!({"name": s.name, "labels": s.labels, "value": s.value})).collect())
}

/// Samples back from their wire form.
pub fn samples_from_wire(v: &Value) -> Result<Vec<Sample>> {
    let items = v.as_array().ok_or_else(|| bad("samples", "not an array"))?;
    items
        .iter()
        .map(|s| {
            let mut sample = Sample::new(field::<String>(s, "name", "sample")?, field(s, "value", "sample")?);
            sample.labels = field(s, "labels", "sample")?;
            Ok(sample)
        })
        .collect()
}

/// An event's wire form.
pub fn event_to_wire(e: &Event) -> Value {
    json!({
        "kind": e.kind,
        "at": time_to_wire(e.at),
        "run_id": e.run_id,
        "pipeline": e.pipeline,
        "environment": e.environment,
        "step": e.step,
        "severity": e.severity,
        "message": e.message,
        "labels": e.labels,
    })
}

/// An event back from its wire form.
pub fn event_from_wire(v: &Value) -> Result<Event> {
    let w = "event";
    let mut e = Event::new(
        field::<String>(v, "kind", w)?,
        field::<Severity>(v, "severity", w)?,
        field::<String>(v, "message", w)?,
    );
    e.at = time_from_wire(&v["at"]);
    e.run_id = field(v, "run_id", w)?;
    e.pipeline = field(v, "pipeline", w)?;
    e.environment = field(v, "environment", w)?;
    e.step = field(v, "step", w)?;
    e.labels = field(v, "labels", w)?;
    Ok(e)
}

/// A notification's wire form.
pub fn notification_to_wire(n: &Notification) -> Value {
    json!({
        "title": n.title,
        "body": n.body,
        "severity": n.severity,
        "dedup_key": n.dedup_key,
        "resolve": n.resolve,
        "event": n.event.as_ref().map(event_to_wire),
        "facts": n.facts,
        "log_tail": n.log_tail,
        "link": n.link,
        "templated": n.templated,
    })
}

/// A notification back from its wire form.
pub fn notification_from_wire(v: &Value) -> Result<Notification> {
    let w = "notification";
    let mut n = Notification::new(
        field::<String>(v, "title", w)?,
        field::<String>(v, "body", w)?,
        field::<Severity>(v, "severity", w)?,
        field::<String>(v, "dedup_key", w)?,
    );
    n.resolve = field(v, "resolve", w)?;
    n.event = match v.get("event") {
        Some(e) if !e.is_null() => Some(event_from_wire(e)?),
        _ => None,
    };
    n.facts = field(v, "facts", w)?;
    n.log_tail = field(v, "log_tail", w)?;
    n.link = field(v, "link", w)?;
    n.templated = field(v, "templated", w)?;
    Ok(n)
}

/// A receipt's wire form.
pub fn receipt_to_wire(r: &Receipt) -> Value {
    json!({"message_id": r.message_id, "dedup_key": r.dedup_key})
}

/// A receipt back from its wire form.
pub fn receipt_from_wire(v: &Value) -> Result<Receipt> {
    Ok(Receipt::new(field(v, "message_id", "receipt")?, field(v, "dedup_key", "receipt")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_crosses_the_wire_with_every_field() {
        let mut task = Task::new("r1", "deploy[env=prod]", 2, Program::Argv(vec!["/bin/echo".into(), "hi".into()]));
        task.image = Some("alpine:3".into());
        task.env = vec![("A".into(), "1".into())];
        task.secrets = vec![("TOKEN".into(), SecretValue::new("s3cret".to_owned()))];
        task.working_dir = Some("sub".into());
        task.timeout = Some(Duration::from_millis(1500));
        task.scratch_dir = Some("/state/tmp/r1.42".into());
        let back = task_from_wire(&task_to_wire(&task).unwrap()).unwrap();
        assert_eq!((back.run_id.as_str(), back.step_id.as_str(), back.attempt), ("r1", "deploy[env=prod]", 2));
        assert_eq!(back.program, task.program);
        assert_eq!(back.image, task.image);
        assert_eq!(back.env, task.env);
        assert_eq!(back.secrets.len(), 1);
        assert_eq!((back.secrets[0].0.as_str(), back.secrets[0].1.expose()), ("TOKEN", "s3cret"));
        assert_eq!(back.working_dir, task.working_dir);
        assert_eq!(back.timeout, task.timeout);
        assert_eq!(back.scratch_dir, task.scratch_dir);
        // A host that does not send a scratch directory (an older one): none.
        let mut old = task_to_wire(&task).unwrap();
        old.as_object_mut().unwrap().remove("scratch_dir");
        assert_eq!(task_from_wire(&old).unwrap().scratch_dir, None);
    }
}
