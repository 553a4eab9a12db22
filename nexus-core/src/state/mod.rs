//! The journal of runs (DESIGN.md §4): what the engine did and is doing, written ahead
//! of every side effect so a crashed run can be resumed.
//!
//! [`StateStore`] is the interface; [`sqlite::SqliteStore`] is the embedded
//! implementation (one WAL-mode file under `.nexus/`). Calls are synchronous and short
//! (one small transaction each), so the engine calls them inline.
//!
//! Secrets are never written here: plans hold secret *names*, logs and outputs are
//! redacted before they are recorded.

pub mod sqlite;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = i64;

/// The current time in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Created, waiting for its concurrency group or a process to run it.
    Queued,
    /// A process is running it.
    Running,
    /// Every step succeeded or was skipped.
    Succeeded,
    /// A step failed.
    Failed,
    /// Cancelled by an operator.
    Cancelled,
    /// Not started: its concurrency group was busy and the policy is `skip`.
    Skipped,
}

impl RunStatus {
    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

/// Where a step (one matrix instance) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Waiting for its `needs`.
    Pending,
    /// An attempt is executing.
    Running,
    /// Waiting for `nexus approve`.
    WaitingApproval,
    /// Done, successfully.
    Succeeded,
    /// Done, failed after its last attempt.
    Failed,
    /// Not run: its `if` was false, or a step it needs did not succeed.
    Skipped,
    /// Stopped by a cancellation.
    Cancelled,
    /// Its process died while an attempt was running; `resume` decides.
    Interrupted,
    /// Succeeded, then undone by its rollback.
    RolledBack,
}

impl StepStatus {
    /// Whether the step will not change any more (in this run).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Skipped
                | StepStatus::Cancelled
                | StepStatus::RolledBack
        )
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptStatus {
    /// Executing.
    Running,
    /// Exit code 0 (or the action succeeded).
    Succeeded,
    /// Non-zero exit, a signal, or an error.
    Failed,
    /// Killed after its timeout.
    TimedOut,
    /// Killed by a cancellation.
    Cancelled,
    /// Its process died while it ran.
    Interrupted,
}

/// Whether an attempt executes the step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptKind {
    /// The step's action.
    Main,
    /// The step's rollback action.
    Rollback,
}

/// The process that owns a running run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
}

impl Owner {
    /// This process.
    pub fn current() -> Self {
        Owner { host: crate::host_name(), pid: std::process::id() }
    }
}

/// A run as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Identifier (`r-…`).
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Environment name.
    pub environment: String,
    /// Status.
    pub status: RunStatus,
    /// The plan, as JSON (secrets are names only).
    pub plan_json: String,
    /// Digest of the registries the plan was made from.
    pub config_digest: String,
    /// Concurrency group, rendered.
    pub concurrency_group: Option<String>,
    /// The run this one retries, if any.
    pub parent_run: Option<String>,
    /// Creation time.
    pub created_at: Millis,
    /// When a process started running it.
    pub started_at: Option<Millis>,
    /// When it finished.
    pub finished_at: Option<Millis>,
    /// The process running it.
    pub owner: Option<Owner>,
    /// Last sign of life of the owner.
    pub heartbeat_at: Option<Millis>,
    /// Whether an operator asked to cancel it.
    pub cancel_requested: bool,
    /// Why it failed (redacted).
    pub error: Option<String>,
}

/// A step as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The run.
    pub run_id: String,
    /// The step instance id (`test[component=api]`).
    pub step_id: String,
    /// Status.
    pub status: StepStatus,
    /// Attempts started (main attempts only).
    pub attempts: u32,
    /// First attempt's start.
    pub started_at: Option<Millis>,
    /// When it reached its final status.
    pub finished_at: Option<Millis>,
    /// Outputs, as a JSON object of strings (redacted).
    pub outputs_json: String,
    /// Why it failed or was skipped (redacted).
    pub error: Option<String>,
}

/// An attempt as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The run.
    pub run_id: String,
    /// The step instance id.
    pub step_id: String,
    /// 1 for the first attempt (per kind).
    pub number: u32,
    /// Main or rollback.
    pub kind: AttemptKind,
    /// Status.
    pub status: AttemptStatus,
    /// Start.
    pub started_at: Millis,
    /// End.
    pub finished_at: Option<Millis>,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// Signal, if the process was killed by one.
    pub signal: Option<i32>,
    /// The attempt's log file, relative to the state directory.
    pub log_path: String,
    /// Why it failed (redacted).
    pub error: Option<String>,
}

/// How one target (a host of a group) of an attempt ended: recorded as its own attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// The run.
    pub run_id: String,
    /// The step instance id.
    pub step_id: String,
    /// The attempt's number.
    pub number: u32,
    /// The attempt's kind.
    pub kind: AttemptKind,
    /// The target (host).
    pub target: String,
    /// Succeeded (exit 0), failed, or cancelled (with `skipped` when never started).
    pub status: AttemptStatus,
    /// Whether the target was not started (partial-failure policy `stop`).
    pub skipped: bool,
    /// Start.
    pub started_at: Millis,
    /// End.
    pub finished_at: Millis,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// Signal, if the process was killed by one.
    pub signal: Option<i32>,
    /// The target's own log file, relative to the state directory.
    pub log_path: String,
    /// Why it failed or did not run (redacted).
    pub error: Option<String>,
}

/// An event as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The run.
    pub run_id: String,
    /// Order within the run, from 1.
    pub seq: i64,
    /// When.
    pub at: Millis,
    /// Dotted type (`step.retrying`).
    pub kind: String,
    /// The step, if any.
    pub step_id: Option<String>,
    /// One line (redacted).
    pub message: String,
}

/// An event not yet journaled.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// When it happened.
    pub at: Millis,
    /// Dotted type.
    pub kind: String,
    /// The step, if any.
    pub step_id: Option<String>,
    /// One line (redacted).
    pub message: String,
}

/// An operator's decision on an approval step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// The run.
    pub run_id: String,
    /// The approval step.
    pub step_id: String,
    /// Approved (true) or rejected (false).
    pub approved: bool,
    /// Who decided (user name).
    pub by: String,
    /// When.
    pub at: Millis,
    /// Optional comment.
    pub comment: Option<String>,
}

/// Where a notification delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryStatus {
    /// Recorded before the first attempt; still being sent (or the process died).
    Sending,
    /// The channel accepted it.
    Sent,
    /// Every attempt failed, or the error was not worth retrying.
    Failed,
    /// Not sent on purpose: a duplicate within the route's window, grouped into an
    /// earlier message of the same run, or over the channel's rate limit.
    Suppressed,
}

/// One notification for one channel, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Identifier, given by the store.
    pub id: i64,
    /// The run the event belongs to, if any.
    pub run_id: Option<String>,
    /// The route that matched.
    pub route: String,
    /// The channel.
    pub channel: String,
    /// The event type (`run.failed`).
    pub event_kind: String,
    /// The pipeline, if any.
    pub pipeline: Option<String>,
    /// The environment, if any.
    pub environment: Option<String>,
    /// What makes two notifications duplicates of each other.
    pub fingerprint: String,
    /// The key the receiver groups and resolves by (PagerDuty `dedup_key`).
    pub dedup_key: String,
    /// Status.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// Why it failed or was suppressed (redacted).
    pub error: Option<String>,
    /// What the receiver answered (message id), if anything.
    pub receipt: Option<String>,
    /// When it was recorded.
    pub created_at: Millis,
    /// When it reached its final status.
    pub finished_at: Option<Millis>,
}

/// Who holds a lock lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    /// The run.
    pub run_id: String,
    /// The step instance.
    pub step_id: String,
}

/// What the owner of a run learns at each heartbeat.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signals {
    /// An operator asked to cancel the run.
    pub cancel_requested: bool,
    /// Decisions on approval steps of the run.
    pub approvals: Vec<ApprovalRecord>,
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this pipeline.
    pub pipeline: Option<String>,
    /// Only this status.
    pub status: Option<RunStatus>,
    /// At most this many, newest first.
    pub limit: Option<usize>,
}

/// One journal write; see [`StateStore::commit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// See [`StateStore::set_step_status`].
    StepStatus {
        /// The run.
        run_id: String,
        /// The step.
        step_id: String,
        /// Its new status.
        status: StepStatus,
        /// Why (replaces the step's error).
        error: Option<String>,
    },
    /// See [`StateStore::attempt_started`].
    AttemptStarted(AttemptRecord),
    /// See [`StateStore::attempt_finished`].
    AttemptFinished(AttemptRecord),
    /// See [`StateStore::step_finished`].
    StepFinished {
        /// The run.
        run_id: String,
        /// The step.
        step_id: String,
        /// Its final status.
        status: StepStatus,
        /// Its outputs, a JSON object of strings.
        outputs_json: String,
        /// Why it did not succeed.
        error: Option<String>,
    },
}

impl Write {
    /// The run written to.
    pub fn run_id(&self) -> &str {
        match self {
            Write::StepStatus { run_id, .. } | Write::StepFinished { run_id, .. } => run_id,
            Write::AttemptStarted(a) | Write::AttemptFinished(a) => &a.run_id,
        }
    }

    /// The name of the operation, for errors.
    pub fn operation(&self) -> &'static str {
        match self {
            Write::StepStatus { .. } => "state.set_step_status",
            Write::AttemptStarted(_) => "state.attempt_started",
            Write::AttemptFinished(_) => "state.attempt_finished",
            Write::StepFinished { .. } => "state.step_finished",
        }
    }
}

/// The journal. Every method is one short transaction; implementations must tolerate
/// several processes using the same store at once.
pub trait StateStore: Send + Sync {
    /// Records a new run (status `queued`).
    fn create_run(&self, run: &RunRecord) -> Result<()>;
    /// Makes `owner` the process running `run_id`: status `running`, heartbeat now.
    fn claim_run(&self, run_id: &str, owner: &Owner) -> Result<()>;
    /// Records a sign of life and returns what operators asked meanwhile.
    fn heartbeat(&self, run_id: &str) -> Result<Signals>;
    /// Records the end of a run.
    fn finish_run(&self, run_id: &str, status: RunStatus, error: Option<&str>) -> Result<()>;
    /// Records a run that never started (its group was busy under policy `skip`).
    fn set_run_status(&self, run_id: &str, status: RunStatus) -> Result<()>;
    /// Applies several journal writes in one transaction: all of them or none. The
    /// engine journals everything one scheduler pass decided (the attempts that ended,
    /// the steps that finished, the attempts about to start) in one commit, before any
    /// of those attempts starts.
    fn commit(&self, writes: &[Write]) -> Result<()>;
    /// Sets a step's status (pending, skipped, waiting-approval, cancelled…), creating
    /// its row if needed, with an optional reason.
    fn set_step_status(&self, run_id: &str, step_id: &str, status: StepStatus, error: Option<&str>) -> Result<()> {
        let (run_id, step_id, error) = (run_id.to_owned(), step_id.to_owned(), error.map(str::to_owned));
        self.commit(&[Write::StepStatus { run_id, step_id, status, error }])
    }
    /// Before an attempt's side effect: the attempt row (status `running`) and, for a
    /// main attempt, the step `running` with its attempt count — in one transaction.
    fn attempt_started(&self, attempt: &AttemptRecord) -> Result<()> {
        self.commit(&[Write::AttemptStarted(attempt.clone())])
    }
    /// After an attempt: its final status, exit code or signal, error.
    fn attempt_finished(&self, attempt: &AttemptRecord) -> Result<()> {
        self.commit(&[Write::AttemptFinished(attempt.clone())])
    }
    /// A step's final status with its outputs (JSON object of strings).
    fn step_finished(
        &self,
        run_id: &str,
        step_id: &str,
        status: StepStatus,
        outputs_json: &str,
        error: Option<&str>,
    ) -> Result<()> {
        let (run_id, step_id) = (run_id.to_owned(), step_id.to_owned());
        let (outputs_json, error) = (outputs_json.to_owned(), error.map(str::to_owned));
        self.commit(&[Write::StepFinished { run_id, step_id, status, outputs_json, error }])
    }
    /// Marks every `running` attempt (and its step) of the run `interrupted`; returns the
    /// step ids concerned. Used by `resume` once the owner is known to be dead.
    fn interrupt_running(&self, run_id: &str) -> Result<Vec<String>>;
    /// Appends an event; returns its sequence number.
    fn append_event(&self, run_id: &str, kind: &str, step_id: Option<&str>, message: &str) -> Result<i64>;
    /// Appends several events, in order, in one transaction.
    fn append_events(&self, run_id: &str, events: &[NewEvent]) -> Result<()>;
    /// Records the steps of a new run as `pending`, in order, in one transaction.
    fn create_steps(&self, run_id: &str, step_ids: &[String]) -> Result<()>;
    /// Asks the owner of a run to cancel it.
    fn request_cancel(&self, run_id: &str) -> Result<()>;
    /// Records an approval decision (the last one for a step wins).
    fn record_approval(&self, approval: &ApprovalRecord) -> Result<()>;
    /// Takes a lease on `lock` unless `limit` live leases exist; `ttl_ms` from now.
    /// Expired leases (a dead holder) are discarded first.
    fn acquire_lease(&self, lock: &str, limit: u32, holder: &LeaseHolder, ttl_ms: i64) -> Result<bool>;
    /// Extends every lease of a run by `ttl_ms` from now.
    fn renew_leases(&self, run_id: &str, ttl_ms: i64) -> Result<()>;
    /// Gives a lease back.
    fn release_lease(&self, lock: &str, holder: &LeaseHolder) -> Result<()>;
    /// Runs of a concurrency group that are queued or running, oldest first.
    fn active_runs_in_group(&self, group: &str) -> Result<Vec<RunRecord>>;
    /// One run.
    fn run(&self, run_id: &str) -> Result<Option<RunRecord>>;
    /// Runs, newest first.
    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>>;
    /// The latest run of the same pipeline and environment created before `run_id` that
    /// succeeded or failed (cancelled and skipped runs say nothing about health), with
    /// its status.
    fn previous_verdict(&self, run_id: &str) -> Result<Option<(String, RunStatus)>>;
    /// The steps of a run, in the order they were first recorded.
    fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>>;
    /// The attempts of a run, in start order.
    fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>>;
    /// The events of a run, in order.
    fn events(&self, run_id: &str) -> Result<Vec<EventRecord>>;
    /// The approvals of a run.
    fn approvals(&self, run_id: &str) -> Result<Vec<ApprovalRecord>>;
    /// Records how the targets of an attempt ended (before the attempt's own end).
    fn record_targets(&self, targets: &[TargetRecord]) -> Result<()>;
    /// The targets of a run's attempts, in attempt then record order.
    fn targets(&self, run_id: &str) -> Result<Vec<TargetRecord>>;
    /// Records a notification delivery (its `id` is ignored) and returns its id.
    fn record_delivery(&self, delivery: &DeliveryRecord) -> Result<i64>;
    /// Records how a delivery ended.
    fn delivery_finished(
        &self,
        id: i64,
        status: DeliveryStatus,
        attempts: u32,
        error: Option<&str>,
        receipt: Option<&str>,
    ) -> Result<()>;
    /// The deliveries of a run, in order.
    fn deliveries(&self, run_id: &str) -> Result<Vec<DeliveryRecord>>;
    /// The deliveries to a channel recorded at or after `since`, oldest first (for
    /// deduplication, grouping and rate limits across processes).
    fn recent_deliveries(&self, channel: &str, since: Millis) -> Result<Vec<DeliveryRecord>>;
}
