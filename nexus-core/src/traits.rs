//! The four extension traits (DESIGN.md §3) and the values that cross them.
//!
//! Arguments and results that may grow are `#[non_exhaustive]` structs with
//! constructors, so adding a field never breaks an implementation or a plugin.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::model::{Map, Severity};

/// What an attempt executes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Program {
    /// A script (one command line or many lines) given to a shell as `SHELL -c SCRIPT`.
    Shell {
        /// The shell (`sh`, `bash`…).
        shell: String,
        /// The script.
        script: String,
    },
    /// A program and its arguments, without a shell.
    Argv(Vec<String>),
}

/// A secret value: its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wraps a resolved secret.
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }
    /// The value, for the one place that injects it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

/// One attempt of one step, fully resolved, handed to a [`Runner`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Task {
    /// The run this attempt belongs to.
    pub run_id: String,
    /// The step (with its matrix suffix, if any).
    pub step_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// What to execute.
    pub program: Program,
    /// Container image, for runners that run containers.
    pub image: Option<String>,
    /// Environment variables (secrets excluded).
    pub env: Vec<(String, String)>,
    /// Secrets to inject as environment variables.
    pub secrets: Vec<(String, SecretValue)>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// Time limit: the runner kills everything it started when it passes.
    pub timeout: Option<Duration>,
    /// A private (0700) directory of this run, on this machine, for the files a runner
    /// keeps next to the attempt (the `$NEXUS_OUTPUT` file). It is under the state
    /// directory, so what a killed `nexus` leaves in it is removed when the run is
    /// resumed, instead of staying in the system's temporary directory. Runners of several
    /// kinds share it: name files with the runner kind as a prefix. `None` (a task built
    /// outside the engine): the runner uses a temporary directory of its own.
    pub scratch_dir: Option<std::path::PathBuf>,
}

impl Task {
    /// A task with no env, secrets, image, working directory or timeout.
    pub fn new(run_id: impl Into<String>, step_id: impl Into<String>, attempt: u32, program: Program) -> Self {
        Task {
            run_id: run_id.into(),
            step_id: step_id.into(),
            attempt,
            program,
            image: None,
            env: Vec::new(),
            secrets: Vec::new(),
            working_dir: None,
            timeout: None,
            scratch_dir: None,
        }
    }

    /// An error about this attempt, raised by the runner of kind `runner`: the message
    /// reads ``step `ID` (attempt N): WHAT``, the operation is `runner.run`, and the
    /// run, step and runner are its context.
    pub fn error(&self, kind: ErrorKind, runner: &'static str, what: impl fmt::Display) -> Error {
        Error::new(kind, format!("step `{}` (attempt {}): {what}", self.step_id, self.attempt))
            .with_operation("runner.run")
            .with_context("runner", runner)
            .with_context("run", &self.run_id)
            .with_context("step", &self.step_id)
    }

    /// `e`, raised by a helper that did not know the attempt, now about this attempt:
    /// the message prefixed as by [`Task::error`], the operation `runner.run`, the run
    /// and step added to its context; kind, retryability, `retry_after` and source kept.
    pub fn rescope(&self, e: Error) -> Error {
        let message = format!("step `{}` (attempt {}): {}", self.step_id, self.attempt, e.message());
        e.with_message(message)
            .with_operation("runner.run")
            .with_context("run", &self.run_id)
            .with_context("step", &self.step_id)
    }
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Receives an attempt's output line by line, as it is produced.
pub trait LogSink: Send + Sync {
    /// One line, without its line terminator.
    fn line(&self, stream: Stream, line: &str);

    /// For runners that run one attempt on several targets (an SSH host group): the
    /// sink of one target's lines. By default its lines come here prefixed `[name] `;
    /// the engine gives each target its own log as well.
    fn target<'a>(&'a self, name: &str) -> Box<dyn LogSink + 'a> {
        Box::new(Prefixed { inner: self, prefix: format!("[{name}] ") })
    }

    /// Reports how the attempt ended on one target, so that it is recorded as its own
    /// attempt. Ignored by default.
    fn target_finished(&self, report: &TargetReport) {
        let _ = report;
    }
}

/// Lines of one target, prefixed with its name, into the attempt's sink.
struct Prefixed<'a, S: LogSink + ?Sized> {
    inner: &'a S,
    prefix: String,
}

impl<S: LogSink + ?Sized> LogSink for Prefixed<'_, S> {
    fn line(&self, stream: Stream, line: &str) {
        self.inner.line(stream, &format!("{}{line}", self.prefix));
    }

    // Overridden so that nesting stays one type (the default would recurse on types).
    fn target<'a>(&'a self, name: &str) -> Box<dyn LogSink + 'a> {
        Box::new(Prefixed { inner: self.inner, prefix: format!("{}[{name}] ", self.prefix) })
    }

    fn target_finished(&self, report: &TargetReport) {
        self.inner.target_finished(report);
    }
}

/// How one target (a host of a group) of an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetReport {
    /// The target's name (the host).
    pub name: String,
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Signal number, when the process was killed by a signal.
    pub signal: Option<i32>,
    /// Why it could not run or was stopped (never a secret), if so.
    pub error: Option<String>,
    /// Whether it was not started at all (a partial-failure policy of `stop`).
    pub skipped: bool,
    /// When it started (the report's time for a skipped target).
    pub started: SystemTime,
    /// When it finished.
    pub finished: SystemTime,
}

impl TargetReport {
    /// A target that ran and exited with `exit_code`.
    pub fn exited(name: impl Into<String>, exit_code: i32, started: SystemTime, finished: SystemTime) -> Self {
        TargetReport {
            name: name.into(),
            exit_code: Some(exit_code),
            signal: None,
            error: None,
            skipped: false,
            started,
            finished,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Signal number, when the process was killed by a signal.
    pub signal: Option<i32>,
    /// Outputs written by the attempt (`key=value` lines to `$NEXUS_OUTPUT`).
    pub outputs: Map<String>,
    /// When the attempt started.
    pub started: SystemTime,
    /// When it finished.
    pub finished: SystemTime,
}

impl Outcome {
    /// An outcome with an exit code and no outputs.
    pub fn exited(exit_code: i32, started: SystemTime, finished: SystemTime) -> Self {
        Outcome { exit_code: Some(exit_code), signal: None, outputs: Map::new(), started, finished }
    }

    /// Whether the attempt succeeded (exit code 0).
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Executes step attempts: a local process, a container, a Kubernetes Job, a remote host.
#[async_trait]
pub trait Runner: Send + Sync {
    /// Runs one attempt, streaming its output to `logs`. On timeout or when `cancel`
    /// fires, it must stop everything it started and clean up before returning.
    async fn run(&self, task: &Task, logs: &dyn LogSink, cancel: CancellationToken) -> Result<Outcome>;

    /// Removes what a crashed run may have left on this runner (containers, Jobs,
    /// remote processes), before `nexus resume` continues it. Nothing by default.
    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        let _ = run_id;
        Ok(())
    }
}

/// The state of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// Working.
    Healthy,
    /// Working, but slow or partly failing.
    Degraded,
    /// Not working.
    Unhealthy,
}

/// The result of a health check.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// The verdict.
    pub status: HealthStatus,
    /// How long the check took.
    pub latency: Duration,
    /// What was observed (version, reason of failure); never a secret.
    pub detail: String,
}

impl Health {
    /// A health result.
    pub fn new(status: HealthStatus, latency: Duration, detail: impl Into<String>) -> Self {
        Health { status, latency, detail: detail.into() }
    }
}

/// One metric sample.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// Metric name (`nexus_step_duration_seconds`).
    pub name: String,
    /// Labels.
    pub labels: Map<String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// A sample without labels.
    pub fn new(name: impl Into<String>, value: f64) -> Self {
        Sample { name: name.into(), labels: Map::new(), value }
    }
}

/// Talks to a service the platform runs.
#[async_trait]
pub trait ServiceAdapter: Send + Sync {
    /// Checks the service's health.
    async fn check(&self) -> Result<Health>;
    /// Reads the service's metrics.
    async fn metrics(&self) -> Result<Vec<Sample>> {
        Ok(Vec::new())
    }
    /// Calls a named action (`backup`, `query`, `publish`…) with JSON arguments.
    async fn invoke(&self, action: &str, args: serde_json::Value) -> Result<serde_json::Value>;
}

/// Something that happened in the engine or to a service.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// Dotted type: `run.started`, `run.failed`, `step.retrying`, `health.changed`…
    pub kind: String,
    /// When it happened.
    pub at: SystemTime,
    /// The run, if any.
    pub run_id: Option<String>,
    /// The pipeline, if any.
    pub pipeline: Option<String>,
    /// The environment, if any.
    pub environment: Option<String>,
    /// The step, if any.
    pub step: Option<String>,
    /// How serious it is.
    pub severity: Severity,
    /// A one-line description (already redacted).
    pub message: String,
    /// Labels of the pipeline, service or environment concerned.
    pub labels: Map<String>,
}

impl Event {
    /// An event of `kind` happening now.
    pub fn new(kind: impl Into<String>, severity: Severity, message: impl Into<String>) -> Self {
        Event {
            kind: kind.into(),
            at: SystemTime::now(),
            run_id: None,
            pipeline: None,
            environment: None,
            step: None,
            severity,
            message: message.into(),
            labels: Map::new(),
        }
    }
}

/// Exports events and metrics (Prometheus, Grafana, Elasticsearch, a custom sink).
#[async_trait]
pub trait MonitorAdapter: Send + Sync {
    /// Exports one event.
    async fn export_event(&self, event: &Event) -> Result<()>;
    /// Exports metric samples.
    async fn export_metrics(&self, samples: &[Sample]) -> Result<()> {
        let _ = samples;
        Ok(())
    }
}

/// A rendered notification.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Notification {
    /// The subject or title.
    pub title: String,
    /// The body.
    pub body: String,
    /// How serious it is.
    pub severity: Severity,
    /// Key used by the receiver to group and resolve (PagerDuty `dedup_key`).
    pub dedup_key: String,
    /// Whether this resolves an earlier notification with the same key.
    pub resolve: bool,
    /// The event that caused it.
    pub event: Option<Event>,
    /// Ordered facts shown as fields (`Pipeline`, `Environment`, `Failed step`,
    /// `Duration`, `Run`); already redacted.
    pub facts: Vec<(String, String)>,
    /// The last lines of the failed step's log, oldest first; already redacted.
    pub log_tail: Vec<String>,
    /// Where to act: a URL, or a command such as `nexus show RUN`.
    pub link: Option<String>,
    /// Whether `body` was rendered from the operator's template: a channel then shows
    /// it as the message instead of its own default layout.
    pub templated: bool,
}

impl Notification {
    /// A notification that opens (not resolves) an incident.
    pub fn new(
        title: impl Into<String>,
        body: impl Into<String>,
        severity: Severity,
        dedup_key: impl Into<String>,
    ) -> Self {
        Notification {
            title: title.into(),
            body: body.into(),
            severity,
            dedup_key: dedup_key.into(),
            resolve: false,
            event: None,
            facts: Vec::new(),
            log_tail: Vec::new(),
            link: None,
            templated: false,
        }
    }

    /// The link when it is a web address (`http://` or `https://`), which a channel can
    /// make a button of; `None` when there is no link or it is a command to show as text
    /// (`nexus show RUN`).
    pub fn web_link(&self) -> Option<&str> {
        self.link.as_deref().filter(|l| l.starts_with("https://") || l.starts_with("http://"))
    }

    /// The text a channel with its own layout (facts as fields, the log tail in a
    /// block, the link as a button) shows above that layout: the operator's templated
    /// body as is; otherwise the event's one-line message — `body` then already holds
    /// the facts, log tail and link in plain text, which the layout shows again.
    pub fn lead(&self) -> &str {
        match &self.event {
            Some(event) if !self.templated => &event.message,
            _ => &self.body,
        }
    }
}

/// What the receiving end said about a delivered notification.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The receiver's id for the message, if it gives one.
    pub message_id: Option<String>,
    /// The deduplication key the receiver uses.
    pub dedup_key: Option<String>,
}

impl Receipt {
    /// A receipt.
    pub fn new(message_id: Option<String>, dedup_key: Option<String>) -> Self {
        Receipt { message_id, dedup_key }
    }
}

/// Delivers notifications to a channel (email, Slack, PagerDuty, webhook).
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Sends one notification.
    async fn send(&self, notification: &Notification) -> Result<Receipt>;
}

/// Sleeps until `deadline`, or forever when there is none: the `select!` arm of an
/// optional timeout.
pub async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn only_a_web_address_is_a_web_link() {
        let mut n = Notification::new("t", "b", crate::model::Severity::Error, "k");
        assert_eq!(n.web_link(), None);
        for (link, web) in [
            ("https://ci.example/runs/1", true),
            ("http://localhost:8080/r", true),
            ("nexus show r-1", false),
            ("javascript:alert(1)", false),
            ("HTTPS-ish", false),
        ] {
            n.link = Some(link.to_owned());
            assert_eq!(n.web_link(), web.then_some(link), "{link}");
        }
    }

    #[test]
    fn rescope_prefixes_the_message_and_keeps_everything_else() {
        let task = Task::new("r-1", "deploy", 2, Program::Argv(vec!["true".into()]));
        let wait = std::time::Duration::from_secs(7);
        let helper = Error::new(ErrorKind::Unavailable, "the daemon is restarting")
            .with_context("host", "docker.sock")
            .with_retry_after(wait)
            .with_source(std::io::Error::other("connection refused"));
        let e = task.rescope(helper);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.message(), "step `deploy` (attempt 2): the daemon is restarting");
        assert_eq!(e.operation(), "runner.run");
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(wait));
        assert_eq!(e.source().map(ToString::to_string).as_deref(), Some("connection refused"));
        let context: Vec<(&str, &str)> = e.context().iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(context, [("host", "docker.sock"), ("run", "r-1"), ("step", "deploy")]);
    }
}
