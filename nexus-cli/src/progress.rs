//! What `nexus run` shows while a run goes on, and the summary at its end.
//!
//! Off a terminal (or with `--output json`), one timestamped line per event. On a
//! terminal, the same lines scroll above a live block: one line per running step with
//! its elapsed time and last log line.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use nexus_core::engine::{Engine, RunOutcome};
use nexus_core::plan::{Plan, PlannedAction};
use nexus_core::state::{DeliveryStatus, StateStore, StepRecord, StepStatus};
use nexus_core::traits::Event;

use crate::Output;

/// The live display of one run.
pub struct Display {
    stop: tokio_util_stop::Stop,
    task: tokio::task::JoinHandle<()>,
}

/// A tiny one-shot stop signal (avoids a dependency for one flag).
mod tokio_util_stop {
    use std::sync::Arc;
    use tokio::sync::Notify;

    #[derive(Clone, Default)]
    pub struct Stop(Arc<Notify>);

    impl Stop {
        pub fn fire(&self) {
            self.0.notify_one();
        }
        pub async fn wait(&self) {
            self.0.notified().await;
        }
    }
}

/// The local time of day, `HH:MM:SS` (written out: `format("%H:%M:%S")` parses its
/// pattern at every call, twice per step).
fn clock() -> String {
    use chrono::Timelike;
    let now = chrono::Local::now();
    format!("{:02}:{:02}:{:02}", now.hour(), now.minute(), now.second())
}

fn symbol(kind: &str) -> &'static str {
    match kind {
        "step.started" => "▶",
        "step.succeeded" | "run.succeeded" | "approval.granted" | "step.rolled-back" => "✓",
        "step.failed" | "run.failed" | "approval.rejected" | "step.rollback-failed" => "✗",
        "step.retrying" => "↻",
        "step.skipped" | "run.skipped" => "○",
        "approval.requested" => "?",
        _ => "·",
    }
}

/// Prints one event: a JSON line on stdout, or a timestamped line on stderr. The
/// line is formatted first and written with one call (stderr is unbuffered: printing
/// it piece by piece costs a system call per piece, and a run prints two per step).
fn print_event(event: &Event, json: bool) {
    if json {
        let line = serde_json::json!({
            "at": clock(), "event": event.kind, "step": event.step, "message": event.message,
        });
        outln!("{line}");
    } else {
        let line = format!("{} {} {}\n", clock(), symbol(&event.kind), event.message);
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

impl Display {
    /// Starts printing the run's events.
    pub fn start(engine: &Engine, plan: &Plan, run_id: &str, output: Output) -> Display {
        let mut events = engine.bus().subscribe();
        let live = engine.live().clone();
        let stop = tokio_util_stop::Stop::default();
        let stop_task = stop.clone();
        let fancy = output == Output::Text && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let json = output == Output::Json;
        if !json {
            eprintln!(
                "{} run {run_id}: pipeline {} in {} ({} steps, parallelism {})",
                clock(),
                plan.pipeline,
                plan.environment,
                plan.all_steps().count(),
                plan.parallelism
            );
        }
        let total = plan.all_steps().count();
        let task = tokio::spawn(async move {
            let mut running: BTreeMap<String, Instant> = BTreeMap::new();
            let mut finished = 0usize;
            let started = Instant::now();
            let mut drawn = 0usize;
            let mut redraw = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    received = events.recv() => {
                        let Some(event): Option<Event> = received else { break };
                        if fancy { clear(&mut drawn); }
                        match event.kind.as_str() {
                            "step.started" => { if let Some(s) = &event.step { running.insert(s.clone(), Instant::now()); } }
                            "step.succeeded" | "step.failed" | "step.skipped" | "step.cancelled" => {
                                if let Some(s) = &event.step { running.remove(s); }
                                finished += 1;
                            }
                            "step.retrying" => {
                                if let Some(s) = &event.step { running.remove(s); }
                            }
                            _ => {}
                        }
                        print_event(&event, json);
                        if fancy { drawn = draw(&running, &live, (finished, total, started)); }
                    }
                    _ = redraw.tick(), if fancy => {
                        clear(&mut drawn);
                        drawn = draw(&running, &live, (finished, total, started));
                    }
                    _ = stop_task.wait() => {
                        // Drain what was published before the stop.
                        while let Ok(event) = events.try_recv() {
                            if fancy { clear(&mut drawn); }
                            print_event(&event, json);
                        }
                        if fancy { clear(&mut drawn); }
                        break;
                    }
                }
            }
        });
        Display { stop, task }
    }

    /// Stops the display after printing what is pending.
    pub async fn stop(self) {
        self.stop.fire();
        let _ = self.task.await;
    }
}

/// Erases the live block.
fn clear(drawn: &mut usize) {
    if *drawn > 0 {
        let mut err = std::io::stderr().lock();
        for _ in 0..*drawn {
            let _ = write!(err, "\x1b[1A\x1b[2K");
        }
        let _ = err.flush();
        *drawn = 0;
    }
}

/// Draws the overall bar and one line per running step; returns how many lines were
/// drawn.
fn draw(
    running: &BTreeMap<String, Instant>,
    live: &nexus_core::engine::LiveStatus,
    (finished, total, started): (usize, usize, Instant),
) -> usize {
    let width = terminal_width();
    let mut err = std::io::stderr().lock();
    let cells = 30;
    let full = (finished * cells).checked_div(total).unwrap_or(0).min(cells);
    let _ = writeln!(
        err,
        "  [{}{}] {finished}/{total} steps  {:.1}s",
        "█".repeat(full),
        "░".repeat(cells - full),
        started.elapsed().as_secs_f64()
    );
    for (step, since) in running {
        let last = live.last_line(step).unwrap_or_default();
        let mut line = format!("  ⠿ {step:<28} {:>6.1}s  {last}", since.elapsed().as_secs_f64());
        if line.chars().count() > width {
            line = line.chars().take(width.saturating_sub(1)).collect::<String>() + "…";
        }
        let _ = writeln!(err, "{line}");
    }
    let _ = err.flush();
    running.len() + 1
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(100)
}

/// The time from `start` to `end` (Unix ms) in seconds, `-` if it has not ended.
pub fn span(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(a), Some(b)) if b >= a => format!("{:.2}s", (b - a) as f64 / 1000.0),
        _ => "-".to_owned(),
    }
}

pub fn step_status(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pending => "pending",
        StepStatus::Running => "running",
        StepStatus::WaitingApproval => "waiting-approval",
        StepStatus::Succeeded => "succeeded",
        StepStatus::Failed => "failed",
        StepStatus::Skipped => "skipped",
        StepStatus::Cancelled => "cancelled",
        StepStatus::Interrupted => "interrupted",
        StepStatus::RolledBack => "rolled-back",
    }
}

/// The table of steps: step, status, attempts, duration, note.
pub fn steps_table(steps: &[StepRecord]) -> String {
    let width = steps.iter().map(|s| s.step_id.chars().count()).max().unwrap_or(4).max(4);
    let mut out = format!("{:<width$}  {:<16} {:>8}  {:>9}  {}\n", "STEP", "STATUS", "ATTEMPTS", "DURATION", "NOTE");
    for s in steps {
        let row = format!(
            "{:<width$}  {:<16} {:>8}  {:>9}  {}",
            s.step_id,
            step_status(s.status),
            s.attempts,
            span(s.started_at, s.finished_at),
            s.error.as_deref().unwrap_or("")
        );
        out.push_str(row.trim_end());
        out.push('\n');
    }
    out
}

/// Prints the end-of-run summary.
pub fn summary(store: &dyn StateStore, outcome: &RunOutcome, output: Output) {
    let steps = store.steps(&outcome.run_id).unwrap_or_default();
    if output == Output::Json {
        let deliveries = store.deliveries(&outcome.run_id).unwrap_or_default();
        let doc = serde_json::json!({
            "run": outcome.run_id,
            "status": outcome.status,
            "error": outcome.error,
            "steps": steps,
            "notifications": deliveries,
        });
        outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    eprintln!();
    eprint!("{}", steps_table(&steps));
    let verdict = crate::exec::status_text(outcome.status);
    match &outcome.error {
        Some(e) => eprintln!("\nrun {} {verdict}: {e}", outcome.run_id),
        None => eprintln!("\nrun {} {verdict}", outcome.run_id),
    }
    eprintln!("details: nexus show {}   logs: nexus logs {}", outcome.run_id, outcome.run_id);
}

/// One line per notification of the run recorded since `since` (Unix ms) that was sent
/// or given up on.
pub fn deliveries(store: &dyn StateStore, run_id: &str, since: i64) {
    for d in store.deliveries(run_id).unwrap_or_default().into_iter().filter(|d| d.created_at >= since) {
        match d.status {
            DeliveryStatus::Sent => eprintln!("notified {} of {} (route {})", d.channel, d.event_kind, d.route),
            DeliveryStatus::Failed => eprintln!(
                "warning: could not notify {} of {} after {} attempt(s): {}",
                d.channel,
                d.event_kind,
                d.attempts,
                d.error.as_deref().unwrap_or("unknown error")
            ),
            DeliveryStatus::Sending | DeliveryStatus::Suppressed => {}
        }
    }
}

/// `nexus plan` as text.
pub fn plan_text(plan: &Plan) -> String {
    let mut out = format!("plan: pipeline {} in {}\n", plan.pipeline, plan.environment);
    if !plan.params.is_empty() {
        out.push_str("params:\n");
        for (k, v) in &plan.params {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    out.push_str(&format!("parallelism: {}", plan.parallelism));
    if let Some(t) = plan.timeout {
        out.push_str(&format!(", timeout: {t}"));
    }
    if let Some(c) = &plan.concurrency {
        out.push_str(&format!(", concurrency group: {} ({:?})", c.group, c.policy));
    }
    out.push('\n');
    let groups = [
        ("steps", &plan.steps),
        ("on_failure", &plan.on_failure),
        ("on_success", &plan.on_success),
        ("finally", &plan.finally),
    ];
    for (name, steps) in groups {
        if steps.is_empty() {
            continue;
        }
        out.push_str(&format!("{name}:\n"));
        for s in steps.iter() {
            out.push_str(&format!("  {}  [{}]", s.id, s.action.summary()));
            if !s.needs.is_empty() {
                out.push_str(&format!("  needs: {}", s.needs.join(", ")));
            }
            out.push('\n');
            if let Some(c) = &s.condition {
                out.push_str(&format!("      if: {c}\n"));
            }
            if let PlannedAction::Command(c) = &s.action {
                let what = c
                    .run
                    .command
                    .clone()
                    .or_else(|| c.run.script.clone())
                    .or_else(|| c.run.argv.as_ref().map(|a| a.join(" ")))
                    .unwrap_or_default();
                for (i, line) in what.lines().enumerate() {
                    out.push_str(&format!("      {} {line}\n", if i == 0 { "$" } else { " " }));
                }
                if !c.rendered {
                    out.push_str("      (rendered at run time: reads step outputs or secrets)\n");
                }
                if !c.secrets.is_empty() {
                    out.push_str(&format!("      secrets: {}\n", c.secrets.join(", ")));
                }
            }
            let mut extra = Vec::new();
            if let Some(t) = s.timeout {
                extra.push(format!("timeout {t}"));
            }
            if s.retry.attempts > 1 {
                extra.push(format!("{} attempts", s.retry.attempts));
            }
            if s.idempotent {
                extra.push("idempotent".to_owned());
            }
            if !s.locks.is_empty() {
                extra.push(format!("locks {}", s.locks.join(", ")));
            }
            if s.rollback.is_some() {
                extra.push("has rollback".to_owned());
            }
            if !extra.is_empty() {
                out.push_str(&format!("      {}\n", extra.join(", ")));
            }
        }
    }
    out
}
