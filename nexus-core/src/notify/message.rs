//! What a notification says: title, facts, the failed step's log tail, the keys that
//! deduplicate it, and the context its templates read.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::{Value, json};

use crate::engine::logs::parse_line;
use crate::model::Ssot;
use crate::state::{AttemptKind, StateStore, StepStatus};
use crate::traits::{Event, Notification};

/// Lines of the failed step's log a notification carries.
pub const LOG_TAIL_LINES: usize = 20;
/// Longest log line kept in a notification, in characters.
const LOG_LINE_CHARS: usize = 300;

/// What the store says about the run behind an event.
#[derive(Debug, Default)]
pub(crate) struct RunContext {
    pub status: Option<String>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    /// The step the message is about: the event's own, or the run's first failed step.
    pub step: Option<String>,
    pub step_error: Option<String>,
    pub exit_code: Option<i32>,
    pub attempts: Option<u32>,
    pub log_tail: Vec<String>,
}

impl RunContext {
    /// Reads the run of `event` (if any) from the store. Best effort: a notification
    /// without facts is better than none.
    pub fn read(store: &dyn StateStore, state_dir: &Path, event: &Event) -> RunContext {
        let mut ctx = RunContext::default();
        let Some(run_id) = &event.run_id else { return ctx };
        if let Ok(Some(run)) = store.run(run_id) {
            ctx.status = serde_json::to_value(run.status).ok().and_then(|v| v.as_str().map(str::to_owned));
            ctx.duration_ms = run.started_at.map(|s| run.finished_at.unwrap_or_else(crate::state::now_millis) - s);
            ctx.error = run.error;
        }
        let steps = store.steps(run_id).unwrap_or_default();
        let step = match &event.step {
            Some(s) => steps.iter().find(|r| &r.step_id == s),
            None if event.kind.starts_with("run.") && event.kind != "run.recovered" => {
                steps.iter().find(|r| matches!(r.status, StepStatus::Failed | StepStatus::Cancelled))
            }
            None => None,
        };
        let Some(step) = step else { return ctx };
        ctx.step = Some(step.step_id.clone());
        ctx.step_error = step.error.clone();
        ctx.attempts = Some(step.attempts);
        let attempts = store.attempts(run_id).unwrap_or_default();
        if let Some(last) = attempts.iter().rev().find(|a| a.step_id == step.step_id && a.kind == AttemptKind::Main) {
            ctx.exit_code = last.exit_code;
            if !last.log_path.is_empty() {
                ctx.log_tail = log_tail(&state_dir.join(&last.log_path), LOG_TAIL_LINES);
            }
        }
        ctx
    }
}

/// The last `n` lines of an attempt's log file (already redacted when written), read
/// from its end so a huge log costs nothing.
pub(crate) fn log_tail(path: &Path, n: usize) -> Vec<String> {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else { return Vec::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(WINDOW);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.take(WINDOW).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    let keep = lines.len().saturating_sub(n);
    lines[keep..]
        .iter()
        .map(|raw| {
            let text = parse_line(raw).map_or_else(|| (*raw).to_owned(), |l| l.text);
            if text.chars().count() > LOG_LINE_CHARS {
                let cut: String = text.chars().take(LOG_LINE_CHARS).collect();
                format!("{cut}…")
            } else {
                text
            }
        })
        .collect()
}

/// The key receivers group and resolve by: one incident per pipeline and environment
/// (a recovery resolves it), one per approval, one per service.
pub(crate) fn dedup_key(event: &Event) -> String {
    let pipeline = event.pipeline.as_deref().unwrap_or("-");
    let env = event.environment.as_deref().unwrap_or("-");
    if event.kind.starts_with("health.") {
        let service = event.labels.get("service").map_or("-", String::as_str);
        return format!("nexus/service/{service}");
    }
    if event.kind.starts_with("approval.") {
        let run = event.run_id.as_deref().unwrap_or("-");
        let step = event.step.as_deref().unwrap_or("-");
        return format!("nexus/{pipeline}/{env}/approval/{run}/{step}");
    }
    format!("nexus/{pipeline}/{env}")
}

/// What makes two notifications of one route and channel the same: the event type and
/// what it is about (not the run: the third failure of `deploy` in `prod` within the
/// window is the same news as the first).
pub(crate) fn fingerprint(route: &str, channel: &str, event: &Event) -> String {
    let about = if event.kind.starts_with("step.") || event.kind.starts_with("approval.") {
        event.step.as_deref().unwrap_or("-")
    } else if event.kind.starts_with("health.") {
        event.labels.get("status").map_or("-", String::as_str)
    } else {
        "-"
    };
    format!("{route}|{channel}|{}|{}|{about}", event.kind, dedup_key(event))
}

/// A one-line title.
pub(crate) fn title(event: &Event, ctx: &RunContext) -> String {
    let pipeline = event.pipeline.as_deref().unwrap_or("pipeline");
    let env = event.environment.as_deref().map(|e| format!(" in {e}")).unwrap_or_default();
    let step = event.step.as_deref().or(ctx.step.as_deref()).unwrap_or("?");
    match event.kind.as_str() {
        "run.failed" => format!("{pipeline} failed{env}"),
        "run.succeeded" => format!("{pipeline} succeeded{env}"),
        "run.recovered" => format!("{pipeline} recovered{env}"),
        "run.cancelled" => format!("{pipeline} was cancelled{env}"),
        "step.failed" => format!("{pipeline}: step {step} failed{env}"),
        "step.retrying" => format!("{pipeline}: step {step} is retrying{env}"),
        "approval.requested" => format!("{pipeline}{env} waits for approval of {step}"),
        _ => event.message.clone(),
    }
}

fn duration_text(ms: i64) -> String {
    let secs = ms.max(0) as f64 / 1000.0;
    if secs < 60.0 { format!("{secs:.1}s") } else { format!("{}m{:02}s", (secs / 60.0) as u64, secs as u64 % 60) }
}

/// The facts shown as fields, in order.
pub(crate) fn facts(event: &Event, ctx: &RunContext) -> Vec<(String, String)> {
    let mut facts = Vec::new();
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            facts.push((k.to_owned(), v));
        }
    };
    add("Pipeline", event.pipeline.clone());
    add("Environment", event.environment.clone());
    add("Run", event.run_id.clone());
    add("Status", ctx.status.clone());
    if !event.kind.starts_with("approval.") && event.kind != "run.recovered" && event.kind != "run.succeeded" {
        let label = if event.kind == "step.retrying" { "Step" } else { "Failed step" };
        add(label, event.step.clone().or_else(|| ctx.step.clone()));
        add("Exit code", ctx.exit_code.map(|c| c.to_string()));
        add("Attempts", ctx.attempts.filter(|a| *a > 0).map(|a| a.to_string()));
        add("Error", ctx.step_error.clone().or_else(|| ctx.error.clone()));
    } else if event.kind.starts_with("approval.") {
        add("Step", event.step.clone());
    }
    add("Duration", ctx.duration_ms.map(duration_text));
    facts
}

/// The values message templates (`template:` of a channel) and channel specs read.
pub(crate) fn template_context(ssot: &Ssot, event: &Event, n: &Notification, ctx: &RunContext) -> Value {
    let facts: serde_json::Map<String, Value> =
        n.facts.iter().map(|(k, v)| (k.to_lowercase().replace(' ', "_"), Value::String(v.clone()))).collect();
    let env = event.environment.as_ref().and_then(|name| {
        ssot.orchestration.environments.get(name).map(|e| json!({"name": name, "vars": e.vars, "labels": e.labels}))
    });
    let pipeline = event.pipeline.as_ref().map(|name| {
        let labels = ssot.pipelines.pipelines.get(name).map(|p| p.labels.clone()).unwrap_or_default();
        json!({"name": name, "labels": labels})
    });
    let at = chrono::DateTime::<chrono::Utc>::from(event.at).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    json!({
        "event": {
            "kind": event.kind,
            "title": n.title,
            "message": event.message,
            "severity": event.severity,
            "run_id": event.run_id,
            "pipeline": event.pipeline,
            "environment": event.environment,
            "step": event.step.clone().or_else(|| ctx.step.clone()),
            "at": at,
            "labels": event.labels,
            "facts": facts,
            "log_tail": n.log_tail,
            "link": n.link,
        },
        "run": {
            "id": event.run_id,
            "status": ctx.status,
            "duration": ctx.duration_ms.map(duration_text),
            "error": ctx.error,
        },
        "pipeline": pipeline.unwrap_or(Value::Null),
        "env": env.unwrap_or(Value::Null),
    })
}

/// The default plain-text body: the event's message, the facts, the log tail and where
/// to look. Channels with a richer layout build it from the same fields.
pub(crate) fn default_body(event: &Event, n: &Notification) -> String {
    let mut body = String::new();
    body.push_str(&event.message);
    body.push('\n');
    for (k, v) in &n.facts {
        body.push_str(&format!("\n{k}: {v}"));
    }
    if !n.log_tail.is_empty() {
        body.push_str("\n\nLast log lines:\n");
        for line in &n.log_tail {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some(link) = &n.link {
        body.push_str(&format!("\nDetails: {link}\n"));
    }
    body
}

/// Whether the notification of `event` resolves its incident (a recovery).
pub(crate) fn resolves(event: &Event) -> bool {
    event.kind == "run.recovered"
}

/// The notification for `event` (without a template applied).
pub(crate) fn notification(event: &Event, ctx: &RunContext) -> Notification {
    let mut n = Notification::new(title(event, ctx), String::new(), event.severity, dedup_key(event));
    n.resolve = resolves(event);
    n.event = Some(event.clone());
    n.facts = facts(event, ctx);
    if !n.resolve && event.kind != "run.succeeded" {
        n.log_tail = ctx.log_tail.clone();
    }
    n.link = event.run_id.as_ref().map(|r| format!("nexus show {r}"));
    n.body = default_body(event, &n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Severity;

    fn event(kind: &str) -> Event {
        let mut e = Event::new(kind, Severity::Error, "run r-1 failed: step migrate failed");
        e.run_id = Some("r-1".into());
        e.pipeline = Some("deploy".into());
        e.environment = Some("prod".into());
        e
    }

    #[test]
    fn incidents_are_keyed_by_pipeline_and_environment() {
        assert_eq!(dedup_key(&event("run.failed")), "nexus/deploy/prod");
        assert_eq!(dedup_key(&event("run.recovered")), "nexus/deploy/prod");
        let mut approval = event("approval.requested");
        approval.step = Some("gate".into());
        assert_eq!(dedup_key(&approval), "nexus/deploy/prod/approval/r-1/gate");
    }

    #[test]
    fn fingerprints_ignore_the_run_but_not_the_step() {
        let a = event("run.failed");
        let mut b = event("run.failed");
        b.run_id = Some("r-2".into());
        assert_eq!(fingerprint("r", "c", &a), fingerprint("r", "c", &b));
        let mut s1 = event("step.retrying");
        s1.step = Some("a".into());
        let mut s2 = s1.clone();
        s2.step = Some("b".into());
        assert_ne!(fingerprint("r", "c", &s1), fingerprint("r", "c", &s2));
    }

    #[test]
    fn a_failure_carries_facts_and_log_tail_and_a_recovery_resolves() {
        let ctx = RunContext {
            status: Some("failed".into()),
            duration_ms: Some(83_000),
            step: Some("migrate".into()),
            exit_code: Some(3),
            attempts: Some(2),
            log_tail: vec!["boom".into()],
            ..Default::default()
        };
        let n = notification(&event("run.failed"), &ctx);
        assert_eq!(n.title, "deploy failed in prod");
        assert!(!n.resolve);
        let facts: Vec<String> = n.facts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            facts,
            [
                "Pipeline=deploy",
                "Environment=prod",
                "Run=r-1",
                "Status=failed",
                "Failed step=migrate",
                "Exit code=3",
                "Attempts=2",
                "Duration=1m23s"
            ]
        );
        assert_eq!(n.log_tail, ["boom"]);
        assert!(n.body.contains("Last log lines:\nboom"), "{}", n.body);
        assert_eq!(n.link.as_deref(), Some("nexus show r-1"));
        let r = notification(&event("run.recovered"), &ctx);
        assert!(r.resolve);
        assert!(r.log_tail.is_empty());
        assert_eq!(r.dedup_key, n.dedup_key);
    }

    #[test]
    fn the_log_tail_is_the_last_lines_without_their_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (1..=50).map(|i| format!("1700000000000 out line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 3);
        assert_eq!(tail, ["line 48", "line 49", "line 50"]);
        assert!(log_tail(&dir.path().join("missing"), 3).is_empty());
    }
}
