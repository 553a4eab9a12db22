//! `runs`, `show`, `logs`, `cancel`, `approve`: reading and steering runs from any
//! terminal, through the state store.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use nexus_core::engine::logs::parse_line;
use nexus_core::state::{ApprovalRecord, RunFilter, RunRecord, RunStatus, StateStore, now_millis};

use crate::exec::open_store;
use crate::progress::steps_table;
use crate::{EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, Output};

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn run_or_exit(store: &dyn StateStore, run_id: &str) -> Result<RunRecord, u8> {
    match store.run(run_id) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => {
            eprintln!("error: no run `{run_id}` in this state store (see `nexus runs`)");
            Err(EXIT_INVALID)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_INTERNAL)
        }
    }
}

/// `exit 3`, `signal 9`, or nothing when the process never ended on its own.
fn how_it_ended(exit_code: Option<i32>, signal: Option<i32>) -> String {
    match (exit_code, signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => String::new(),
    }
}

/// The name of a status or kind as it is written in JSON and in the store (`timed-out`).
fn status_name(s: impl serde::Serialize) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// `nexus runs`.
pub fn cmd_runs(state: &Path, output: Output, pipeline: Option<String>, status: Option<String>, limit: usize) -> u8 {
    let store = match open_store(state) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let status = match status
        .map(|s| serde_json::from_value::<RunStatus>(serde_json::Value::String(s.clone())).map_err(|_| s))
    {
        Some(Ok(s)) => Some(s),
        Some(Err(s)) => {
            eprintln!("error: unknown status `{s}`; one of queued, running, succeeded, failed, cancelled, skipped");
            return EXIT_INVALID;
        }
        None => None,
    };
    let runs = match store.runs(&RunFilter { pipeline, status, limit: Some(limit) }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    };
    if output == Output::Json {
        let list: Vec<_> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "pipeline": r.pipeline, "environment": r.environment, "status": r.status,
                    "created_at": r.created_at, "started_at": r.started_at, "finished_at": r.finished_at,
                    "error": r.error, "parent_run": r.parent_run,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&list).unwrap_or_default());
        return EXIT_OK;
    }
    if runs.is_empty() {
        outln!("no runs yet in {} (start one with `nexus run`)", state.display());
        return EXIT_OK;
    }
    outln!("{:<22} {:<16} {:<10} {:<10} {:<19} {:>9}", "RUN", "PIPELINE", "ENV", "STATUS", "STARTED", "DURATION");
    for r in runs {
        let duration = match (r.started_at, r.finished_at) {
            (Some(a), Some(b)) => format!("{:.1}s", (b - a) as f64 / 1000.0),
            (Some(a), None) => format!("{:.0}s…", (now_millis() - a) as f64 / 1000.0),
            _ => "-".into(),
        };
        outln!(
            "{:<22} {:<16} {:<10} {:<10} {:<19} {:>9}",
            r.id,
            r.pipeline,
            r.environment,
            status_name(r.status),
            time(r.started_at.unwrap_or(r.created_at)),
            duration
        );
    }
    EXIT_OK
}

/// `nexus show RUN`.
pub fn cmd_show(state: &Path, output: Output, run_id: &str) -> u8 {
    let store = match open_store(state) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let run = match run_or_exit(store.as_ref(), run_id) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let steps = store.steps(run_id).unwrap_or_default();
    let attempts = store.attempts(run_id).unwrap_or_default();
    let events = store.events(run_id).unwrap_or_default();
    let approvals = store.approvals(run_id).unwrap_or_default();
    let deliveries = store.deliveries(run_id).unwrap_or_default();
    let targets = store.targets(run_id).unwrap_or_default();
    if output == Output::Json {
        let mut run_json = serde_json::to_value(&run).unwrap_or_default();
        if let Some(obj) = run_json.as_object_mut() {
            obj.remove("plan_json");
        }
        let doc = serde_json::json!({
            "run": run_json, "steps": steps, "attempts": attempts, "events": events, "approvals": approvals,
            "targets": targets, "notifications": deliveries,
        });
        outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return EXIT_OK;
    }
    outln!("run {}: pipeline {} in {}", run.id, run.pipeline, run.environment);
    outln!("status: {}", status_name(run.status));
    outln!("created: {}", time(run.created_at));
    if let Some(f) = run.finished_at {
        outln!("finished: {}", time(f));
    }
    if let Some(p) = &run.parent_run {
        outln!("retry of: {p}");
    }
    if let Some(e) = &run.error {
        outln!("error: {e}");
    }
    outln!();
    out!("{}", steps_table(&steps));
    if !attempts.is_empty() {
        // One column per field, as wide as the longest step id.
        let width = attempts.iter().map(|a| a.step_id.chars().count()).max().unwrap_or(0).max(4);
        outln!(
            "\n{:<width$}  {:>2}  {:<8} {:<11} {:<10} {:>9}  {}",
            "STEP",
            "#",
            "KIND",
            "STATUS",
            "ENDED",
            "DURATION",
            "ERROR"
        );
        for a in &attempts {
            let row = format!(
                "{:<width$}  {:>2}  {:<8} {:<11} {:<10} {:>9}  {}",
                a.step_id,
                a.number,
                status_name(a.kind),
                status_name(a.status),
                how_it_ended(a.exit_code, a.signal),
                crate::progress::span(Some(a.started_at), a.finished_at),
                a.error.as_deref().unwrap_or("")
            );
            outln!("{}", row.trim_end());
            for t in targets.iter().filter(|t| t.step_id == a.step_id && t.number == a.number && t.kind == a.kind) {
                let status = if t.skipped { "not-started".to_owned() } else { status_name(t.status) };
                let exit = how_it_ended(t.exit_code, t.signal);
                outln!(
                    "  on {:<20} {status:<11} {exit:<10} {}  log: {}",
                    t.target,
                    t.error.as_deref().unwrap_or(""),
                    t.log_path
                );
            }
        }
    }
    if !events.is_empty() {
        outln!("\nevents:");
        for e in &events {
            outln!("  {} {:<20} {}", time(e.at), e.kind, e.message);
        }
    }
    if !deliveries.is_empty() {
        outln!("\nnotifications:");
        for d in &deliveries {
            let status = status_name(d.status);
            let attempts = match d.attempts {
                0 => String::new(),
                1 => "1 attempt".to_owned(),
                n => format!("{n} attempts"),
            };
            let detail = d.error.as_deref().or(d.receipt.as_deref()).unwrap_or("");
            outln!(
                "  {} {:<14} → {:<14} {status:<10} {attempts:<10} (route {}) {detail}",
                time(d.created_at),
                d.event_kind,
                d.channel,
                d.route
            );
        }
    }
    EXIT_OK
}

/// `nexus logs RUN [STEP] [--follow]`.
pub fn cmd_logs(state: &Path, output: Output, run_id: &str, step: Option<&str>, follow: bool) -> u8 {
    let store = match open_store(state) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(code) = run_or_exit(store.as_ref(), run_id) {
        return code;
    }
    let mut printed: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        let attempts = store.attempts(run_id).unwrap_or_default();
        if let Some(step) = step
            && !follow
            && !attempts.iter().any(|a| a.step_id == step || a.step_id.starts_with(&format!("{step}[")))
        {
            let ids: Vec<String> = attempts.iter().map(|a| a.step_id.clone()).collect();
            eprintln!("error: run {run_id} has no attempt of step `{step}`; steps with logs: {}", ids.join(", "));
            return EXIT_INVALID;
        }
        for a in &attempts {
            if step.is_some_and(|s| a.step_id != s && !a.step_id.starts_with(&format!("{s}["))) {
                continue;
            }
            let path = state.join(&a.log_path);
            let Ok(mut file) = std::fs::File::open(&path) else { continue };
            let offset = printed.entry(a.log_path.clone()).or_insert(0);
            if file.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut reader = BufReader::new(file);
            let mut raw = String::new();
            while reader.read_line(&mut raw).unwrap_or(0) > 0 {
                if !raw.ends_with('\n') {
                    break; // a line still being written: read it next time
                }
                *offset += raw.len() as u64;
                if let Some(line) = parse_line(raw.trim_end_matches('\n')) {
                    if output == Output::Json {
                        outln!(
                            "{}",
                            serde_json::json!({"step": a.step_id, "attempt": a.number, "stream": line.stream, "at": line.at_ms, "line": line.text})
                        );
                    } else {
                        let prefix =
                            if a.number > 1 { format!("{}#{}", a.step_id, a.number) } else { a.step_id.clone() };
                        outln!("{prefix} | {}", line.text);
                    }
                }
                raw.clear();
            }
        }
        if !follow {
            return EXIT_OK;
        }
        match store.run(run_id) {
            Ok(Some(r)) if r.status.is_final() => {
                if printed.len() >= store.attempts(run_id).map(|a| a.len()).unwrap_or(0) {
                    return EXIT_OK;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_INTERNAL;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `nexus cancel RUN`.
pub fn cmd_cancel(state: &Path, run_id: &str) -> u8 {
    let store = match open_store(state) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let run = match run_or_exit(store.as_ref(), run_id) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if run.status.is_final() {
        eprintln!("run {run_id} already {}; nothing to cancel", crate::exec::status_text(run.status));
        return EXIT_INVALID;
    }
    if let Err(e) = store.request_cancel(run_id) {
        eprintln!("error: {e}");
        return EXIT_INTERNAL;
    }
    if !nexus_core::engine::is_alive(&run) && run.status == RunStatus::Running {
        // Nobody will see the request: the owner is gone.
        let _ = store.finish_run(run_id, RunStatus::Cancelled, Some("cancelled after its process died"));
        outln!("run {run_id}: its process is gone; marked cancelled");
        return EXIT_OK;
    }
    outln!("run {run_id}: cancellation requested; its process stops the running steps within a second");
    EXIT_OK
}

/// `nexus approve RUN STEP [--reject]`.
pub fn cmd_approve(state: &Path, run_id: &str, step: &str, reject: bool, comment: Option<String>) -> u8 {
    let store = match open_store(state) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(code) = run_or_exit(store.as_ref(), run_id) {
        return code;
    }
    let steps = store.steps(run_id).unwrap_or_default();
    match steps.iter().find(|s| s.step_id == step) {
        Some(s) if s.status == nexus_core::state::StepStatus::WaitingApproval => {}
        Some(s) => {
            eprintln!(
                "error: step `{step}` of run {run_id} is {}, not waiting for an approval",
                crate::progress::step_status(s.status)
            );
            return EXIT_INVALID;
        }
        None => {
            let waiting: Vec<&str> = steps
                .iter()
                .filter(|s| s.status == nexus_core::state::StepStatus::WaitingApproval)
                .map(|s| s.step_id.as_str())
                .collect();
            eprintln!(
                "error: run {run_id} has no step `{step}`; waiting for approval: {}",
                if waiting.is_empty() { "none".to_owned() } else { waiting.join(", ") }
            );
            return EXIT_INVALID;
        }
    }
    let by = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let record = ApprovalRecord {
        run_id: run_id.to_owned(),
        step_id: step.to_owned(),
        approved: !reject,
        by,
        at: now_millis(),
        comment,
    };
    if let Err(e) = store.record_approval(&record) {
        eprintln!("error: {e}");
        return EXIT_INTERNAL;
    }
    outln!("{} `{step}` of run {run_id}", if reject { "rejected" } else { "approved" });
    EXIT_OK
}
