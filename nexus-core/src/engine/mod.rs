//! The engine (the master orchestrator): runs a [`Plan`] durably.
//!
//! One task owns the run's state and a ready queue over the DAG; attempts run as
//! spawned tasks. Every transition is committed to the [`StateStore`] before the side
//! effect it announces starts and after it ends, so `resume` can continue a run whose
//! process died without repeating finished work.
//!
//! Parallelism is bounded per run (`plan.parallelism`), per runner instance
//! (`max_parallel`) and by named locks (leases in the store, shared by every process).
//! Retries use exponential backoff with full jitter; `on_exit_codes` limits which
//! failures are retried. On failure the rollbacks of succeeded steps run in reverse
//! order, then `on_failure`; `finally` always runs.

mod events;
pub mod logs;
mod scratch;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use events::EventBus;
pub use logs::LiveStatus;

use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Map, RetryPolicy, Severity, Ssot};
use crate::plan::{Plan, PlannedAction, PlannedCommand, PlannedStep, render_command, template_env};
use crate::secrets::{self, Redactor};
use crate::state::{
    AttemptKind, AttemptRecord, AttemptStatus, LeaseHolder, NewEvent, Owner, RunRecord, RunStatus, StateStore,
    StepStatus, TargetRecord, Write, now_millis,
};
use crate::traits::{Event, Runner, SecretValue, Task};

/// How often the owner of a run records a heartbeat and reads operators' requests.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// A run whose heartbeat is older than this (and whose process is gone) is dead.
pub const STALE_AFTER_MS: i64 = 10_000;

/// Everything the engine needs; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    ssot: Arc<Ssot>,
    catalog: Arc<Catalog>,
    store: Arc<dyn StateStore>,
    state_dir: PathBuf,
    bus: EventBus,
    runners: Arc<Mutex<HashMap<String, Arc<dyn Runner>>>>,
    live: LiveStatus,
    /// Events not yet journaled: written in one transaction per scheduler pass.
    pending_events: Arc<Mutex<Vec<(String, NewEvent)>>>,
}

/// What the operator decided for steps interrupted by a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterruptedPolicy {
    /// Re-run only idempotent steps; stop and ask for the others.
    #[default]
    Ask,
    /// Re-run every interrupted step.
    Rerun,
    /// Mark interrupted steps skipped and go on.
    Skip,
}

/// Signals from the command line (SIGINT/SIGTERM).
#[derive(Clone, Default)]
pub struct Interrupts {
    /// First signal: stop scheduling, terminate running steps gracefully.
    pub graceful: CancellationToken,
    /// Second signal: kill now.
    pub kill: CancellationToken,
}

/// The state of one step instance during a run.
#[derive(Debug, Clone)]
struct Node {
    status: StepStatus,
    /// Main attempts started so far.
    attempts: u32,
    outputs: Map<String>,
    /// When a retry may start.
    not_before: Option<Instant>,
    /// For approvals: when waiting ends.
    deadline: Option<Instant>,
    /// Order of completion, for reverse-order rollbacks.
    finished_seq: u64,
    /// Leases held.
    leases: Vec<String>,
}

impl Node {
    fn new() -> Self {
        Node {
            status: StepStatus::Pending,
            attempts: 0,
            outputs: Map::new(),
            not_before: None,
            deadline: None,
            finished_seq: 0,
            leases: Vec::new(),
        }
    }
}

/// The result of one attempt, sent back to the scheduler.
struct AttemptDone {
    step: String,
    kind: AttemptKind,
    number: u32,
    status: AttemptStatus,
    exit_code: Option<i32>,
    signal: Option<i32>,
    outputs: Map<String>,
    error: Option<String>,
}

/// What a finished run looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// The run.
    pub run_id: String,
    /// Final status.
    pub status: RunStatus,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The state of the run handed to [`Engine::execute`]: empty for a new run, read back
/// from the store for a resumed or retried one.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Steps already final (succeeded, skipped…) and their outputs.
    pub done: BTreeMap<String, (StepStatus, Map<String>)>,
    /// Main attempts already made per step.
    pub attempts: BTreeMap<String, u32>,
}

impl Engine {
    /// An engine over a validated model, a catalog of kinds and a store whose files
    /// (logs) live in `state_dir`.
    pub fn new(ssot: Arc<Ssot>, catalog: Arc<Catalog>, store: Arc<dyn StateStore>, state_dir: PathBuf) -> Self {
        Engine {
            ssot,
            catalog,
            store,
            state_dir,
            bus: EventBus::new(),
            runners: Arc::new(Mutex::new(HashMap::new())),
            live: LiveStatus::default(),
            pending_events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The event bus: monitors, notifiers and the CLI subscribe to it.
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// The validated model the engine runs.
    pub fn ssot(&self) -> &Arc<Ssot> {
        &self.ssot
    }

    /// The kinds the engine builds components from.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The state directory (logs live under it).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// The last log line of each running step, for progress displays.
    pub fn live(&self) -> &LiveStatus {
        &self.live
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Records a new run of `plan` (status `queued`) and returns its id.
    pub fn create_run(&self, plan: &Plan, parent: Option<&str>) -> Result<String> {
        let id = new_run_id();
        let record = RunRecord {
            id: id.clone(),
            pipeline: plan.pipeline.clone(),
            environment: plan.environment.clone(),
            status: RunStatus::Queued,
            plan_json: serde_json::to_string(plan)
                .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot serialize the plan: {e}")))?,
            config_digest: plan.config_digest.clone(),
            concurrency_group: plan.concurrency.as_ref().map(|c| c.group.clone()),
            parent_run: parent.map(str::to_owned),
            created_at: now_millis(),
            started_at: None,
            finished_at: None,
            owner: None,
            heartbeat_at: None,
            cancel_requested: false,
            error: None,
        };
        self.store.create_run(&record)?;
        let ids: Vec<String> = plan.all_steps().map(|s| s.id.clone()).collect();
        self.store.create_steps(&id, &ids)?;
        Ok(id)
    }

    /// Runs (or continues) a run to its end.
    pub async fn execute(
        &self,
        run_id: &str,
        plan: &Plan,
        recovered: Recovered,
        interrupts: Interrupts,
    ) -> Result<RunOutcome> {
        let owner = Owner::current();
        if let Some(outcome) = self.wait_for_group(run_id, plan, &interrupts).await? {
            return Ok(outcome);
        }
        self.store.claim_run(run_id, &owner)?;
        self.emit(
            run_id,
            plan,
            "run.started",
            None,
            Severity::Info,
            format!("run {run_id} of {} in {} started", plan.pipeline, plan.environment),
        );
        let mut run = RunState::new(self.clone(), run_id.to_owned(), plan.clone(), recovered, interrupts);
        let status = run.drive().await;
        // What the last pass decided is journaled, however the run ended.
        let status = match run.commit() {
            Ok(()) => status,
            Err(e) => status.and(Err(e)),
        };
        let (status, error) = match status {
            Ok(status) => (status, run.failure.clone()),
            Err(e) => (RunStatus::Failed, Some(run.redactor.redact(&e.to_string()))),
        };
        self.store.finish_run(run_id, status, error.as_deref())?;
        let kind = match status {
            RunStatus::Succeeded => "run.succeeded",
            RunStatus::Cancelled => "run.cancelled",
            RunStatus::Skipped => "run.skipped",
            _ => "run.failed",
        };
        let severity = if status == RunStatus::Succeeded { Severity::Info } else { Severity::Error };
        let mut message = format!("run {run_id} {}", status_word(status));
        if let Some(e) = &error {
            message.push_str(&format!(": {e}"));
        }
        self.emit(run_id, plan, kind, None, severity, message);
        if status == RunStatus::Succeeded
            && let Some(previous) = self.previous_failure(run_id)
        {
            self.emit(
                run_id,
                plan,
                "run.recovered",
                None,
                Severity::Info,
                format!(
                    "{} recovered in {}: run {run_id} succeeded after run {previous} failed",
                    plan.pipeline, plan.environment
                ),
            );
        }
        self.flush_events();
        Ok(RunOutcome { run_id: run_id.to_owned(), status, error })
    }

    /// The previous finished run of the same pipeline and environment, if it failed
    /// (cancelled and skipped runs say nothing about health and are passed over).
    fn previous_failure(&self, run_id: &str) -> Option<String> {
        match self.store.previous_verdict(run_id) {
            Ok(Some((id, RunStatus::Failed))) => Some(id),
            _ => None,
        }
    }

    /// Runs the rollback actions of a finished run's succeeded steps, latest first
    /// (`order` lists the succeeded steps in completion order). Returns each step rolled
    /// back and whether its rollback succeeded.
    pub async fn rollback_run(&self, run_id: &str, plan: &Plan, order: &[String]) -> Result<Vec<(String, bool)>> {
        let mut recovered = Recovered::default();
        for id in order {
            recovered.done.insert(id.clone(), (StepStatus::Succeeded, Map::new()));
        }
        let mut run = RunState::new(self.clone(), run_id.to_owned(), plan.clone(), recovered, Interrupts::default());
        for (seq, id) in order.iter().enumerate() {
            if let Some(node) = run.nodes.get_mut(id) {
                node.finished_seq = seq as u64 + 1;
            }
        }
        run.rollback_all().await?;
        self.flush_events();
        Ok(order
            .iter()
            .rev()
            .filter(|id| plan.step(id).is_some_and(|s| s.rollback.is_some()))
            .map(|id| (id.clone(), run.nodes.get(id).is_some_and(|n| n.status == StepStatus::RolledBack)))
            .collect())
    }

    /// Asks every runner of the plan to remove what a crashed run left behind.
    pub async fn cleanup_runners(&self, run_id: &str, plan: &Plan) -> Result<()> {
        for name in plan.runners.keys() {
            let runner = match self.runner(plan, name) {
                Ok(r) => r,
                // A kind without an implementation in this build started nothing.
                Err(e) if e.kind() == ErrorKind::Unsupported => continue,
                Err(e) => return Err(e),
            };
            runner.cleanup_run(run_id).await.map_err(|e| e.with_context("runner", name))?;
        }
        Ok(())
    }

    /// Applies the concurrency group's policy before a run starts. `Some` when the run
    /// must not start (skipped, or cancelled while queued).
    async fn wait_for_group(&self, run_id: &str, plan: &Plan, interrupts: &Interrupts) -> Result<Option<RunOutcome>> {
        use crate::model::ConcurrencyPolicy as P;
        let Some(concurrency) = &plan.concurrency else { return Ok(None) };
        let mut announced = false;
        loop {
            let me = self
                .store
                .run(run_id)?
                .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("run {run_id} vanished")))?;
            // Older runs of the group that are alive come first; ties by id.
            let blockers: Vec<RunRecord> = self
                .store
                .active_runs_in_group(&concurrency.group)?
                .into_iter()
                .filter(|r| r.id != run_id && (r.created_at, &r.id) < (me.created_at, &me.id) && is_alive(r))
                .collect();
            if blockers.is_empty() {
                return Ok(None);
            }
            match concurrency.policy {
                P::Skip => {
                    self.store.set_run_status(run_id, RunStatus::Skipped)?;
                    for step in plan.all_steps() {
                        self.store.set_step_status(
                            run_id,
                            &step.id,
                            StepStatus::Skipped,
                            Some("the run was skipped"),
                        )?;
                    }
                    let message = format!(
                        "skipped: concurrency group `{}` is busy with run {}",
                        concurrency.group, blockers[0].id
                    );
                    self.emit(run_id, plan, "run.skipped", None, Severity::Warning, message.clone());
                    self.flush_events();
                    return Ok(Some(RunOutcome {
                        run_id: run_id.to_owned(),
                        status: RunStatus::Skipped,
                        error: Some(message),
                    }));
                }
                P::CancelRunning => {
                    for b in &blockers {
                        self.store.request_cancel(&b.id)?;
                    }
                }
                P::Queue => {}
            }
            if !announced {
                announced = true;
                self.emit(
                    run_id,
                    plan,
                    "run.queued",
                    None,
                    Severity::Info,
                    format!("waiting: concurrency group `{}` is busy with run {}", concurrency.group, blockers[0].id),
                );
                self.flush_events();
            }
            if me.cancel_requested || interrupts.graceful.is_cancelled() {
                self.store.finish_run(run_id, RunStatus::Cancelled, Some("cancelled while queued"))?;
                return Ok(Some(RunOutcome {
                    run_id: run_id.to_owned(),
                    status: RunStatus::Cancelled,
                    error: Some("cancelled while queued".into()),
                }));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = interrupts.graceful.cancelled() => {}
            }
        }
    }

    /// Journals (soon) and publishes an event.
    fn emit(&self, run_id: &str, plan: &Plan, kind: &str, step: Option<&str>, severity: Severity, message: String) {
        self.bus.publish(self.record_event(run_id, plan, kind, step, severity, message));
    }

    /// Queues an event for the journal (see [`Engine::flush_events`]) and returns it, to
    /// be published by the caller.
    fn record_event(
        &self,
        run_id: &str,
        plan: &Plan,
        kind: &str,
        step: Option<&str>,
        severity: Severity,
        message: String,
    ) -> Event {
        if let Ok(mut pending) = self.pending_events.lock() {
            pending.push((
                run_id.to_owned(),
                NewEvent {
                    at: now_millis(),
                    kind: kind.to_owned(),
                    step_id: step.map(str::to_owned),
                    message: message.clone(),
                },
            ));
        }
        run_event(run_id, plan, kind, step, severity, message)
    }

    /// Journals the buffered events. Best effort: losing an event must not fail a run
    /// (the attempts and steps tables, written ahead, are the record that matters).
    fn flush_events(&self) {
        let pending = match self.pending_events.lock() {
            Ok(mut p) if !p.is_empty() => std::mem::take(&mut *p),
            _ => return,
        };
        let mut start = 0;
        while start < pending.len() {
            let run_id = &pending[start].0;
            let end = pending[start..].iter().position(|(r, _)| r != run_id).map_or(pending.len(), |n| start + n);
            let batch: Vec<NewEvent> = pending[start..end].iter().map(|(_, e)| e.clone()).collect();
            let _ = self.store.append_events(run_id, &batch);
            start = end;
        }
    }

    fn runner(&self, plan: &Plan, name: &str) -> Result<Arc<dyn Runner>> {
        if let Some(r) = self.runners.lock().expect("runner cache").get(name) {
            return Ok(r.clone());
        }
        let instance = plan
            .runners
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::InvalidConfig, format!("the plan has no runner `{name}`")))?;
        let spec =
            crate::plan::render_value(&template_env(), &instance.spec, &serde_json::json!({"env": plan.context.env}))?;
        let runner =
            self.catalog.runners.get(&instance.kind)?.build(spec).map_err(|e| e.with_context("runner", name))?;
        self.runners.lock().expect("runner cache").insert(name.to_owned(), runner.clone());
        Ok(runner)
    }
}

/// An event of run `run_id` of `plan`.
fn run_event(run_id: &str, plan: &Plan, kind: &str, step: Option<&str>, severity: Severity, message: String) -> Event {
    let mut event = Event::new(kind, severity, message);
    event.run_id = Some(run_id.to_owned());
    event.pipeline = Some(plan.pipeline.clone());
    event.environment = Some(plan.environment.clone());
    event.step = step.map(str::to_owned);
    event
}

/// Whether the owner of a run is alive: a fresh heartbeat, and on this host a live pid.
pub fn is_alive(run: &RunRecord) -> bool {
    if run.status == RunStatus::Queued {
        // A queued run is waiting in some process; trust its heartbeat-less creation
        // only for a while.
        return now_millis() - run.created_at < STALE_AFTER_MS * 6;
    }
    let fresh = run.heartbeat_at.is_some_and(|h| now_millis() - h < STALE_AFTER_MS);
    match &run.owner {
        Some(owner) if owner.host == Owner::current().host => fresh && pid_alive(owner.pid),
        _ => fresh,
    }
}

/// Whether a process of this pid exists on this host.
fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn status_word(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Queued => "queued",
        RunStatus::Running => "running",
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "was cancelled",
        RunStatus::Skipped => "was skipped",
    }
}

/// `20261128-071502-4f2a`: sortable, short, unique enough for one store.
fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let salt = (nanos ^ (std::process::id().rotate_left(16))) & 0xffff;
    format!("{}-{salt:04x}", now.format("%Y%m%d-%H%M%S"))
}

/// The exponential backoff before attempt `next` (2 for the first retry), with full
/// jitter when asked.
pub fn backoff(policy: &RetryPolicy, next: u32) -> Duration {
    let base = policy.backoff.map_or(Duration::from_secs(1), |d| d.get());
    let factor = policy.factor.unwrap_or(2.0);
    let max = policy.max_backoff.map_or(Duration::from_secs(300), |d| d.get());
    let exp = factor.powi(next.saturating_sub(2) as i32);
    let wait = base.mul_f64(exp.min(1e6)).min(max);
    if policy.jitter.unwrap_or(false) {
        // Full jitter: uniform in [0, wait]. A cheap source of randomness is enough.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        wait.mul_f64(f64::from(nanos % 1_000_000) / 1_000_000.0)
    } else {
        wait
    }
}

/// An attempt ready to start (its task, not spawned yet).
type Launch = std::pin::Pin<Box<dyn std::future::Future<Output = AttemptDone> + Send>>;

/// One run being driven.
///
/// A scheduler pass decides transitions (attempts that ended, steps that finished,
/// attempts to start) into `journal`; [`RunState::commit`] writes them in one
/// transaction, then starts the attempts and publishes their events. So every
/// transition is on disk before the side effect it announces, at one commit per pass
/// rather than one per transition.
struct RunState {
    engine: Engine,
    run_id: String,
    plan: Plan,
    nodes: HashMap<String, Node>,
    /// Steps with a retry delay or an approval deadline.
    timers: HashSet<String>,
    running: JoinSet<AttemptDone>,
    /// Journal writes decided since the last [`RunState::commit`].
    journal: Vec<Write>,
    /// Attempts journaled in `journal`, started once it is committed.
    launches: Vec<Launch>,
    /// Events of the transitions in `journal`, published once it is committed.
    unannounced: Vec<Event>,
    running_per_runner: HashMap<String, u32>,
    interrupts: Interrupts,
    cancelled: bool,
    /// The run passed its own timeout (it then ends `failed`, not `cancelled`).
    timed_out: bool,
    failure: Option<String>,
    redactor: Redactor,
    finished_counter: u64,
    /// Steps that became final since the scheduler last looked (to prune its open set
    /// without scanning it).
    just_finished: Vec<String>,
    deadline: Option<Instant>,
    /// The run's scratch directory in this process (`Task::scratch_dir`).
    scratch: Option<scratch::Scratch>,
}

impl RunState {
    fn new(engine: Engine, run_id: String, plan: Plan, recovered: Recovered, interrupts: Interrupts) -> Self {
        let security = &engine.ssot.security;
        let redactor =
            Redactor::new(std::iter::empty(), &security.redaction.patterns, security.redaction.replacement.as_deref());
        let mut nodes = HashMap::new();
        for step in plan.all_steps() {
            let mut node = Node::new();
            if let Some((status, outputs)) = recovered.done.get(&step.id) {
                node.status = *status;
                node.outputs = outputs.clone();
            }
            node.attempts = recovered.attempts.get(&step.id).copied().unwrap_or(0);
            nodes.insert(step.id.clone(), node);
        }
        let deadline = plan.timeout.map(|t| Instant::now() + t.get());
        // Attempt logs go to <state>/logs/<run>/; a failure shows at the first attempt.
        let _ = std::fs::create_dir_all(engine.state_dir.join("logs").join(&run_id));
        let scratch = scratch::Scratch::create(&engine.state_dir, &run_id);
        RunState {
            engine,
            run_id,
            plan,
            nodes,
            timers: HashSet::new(),
            running: JoinSet::new(),
            journal: Vec::new(),
            launches: Vec::new(),
            unannounced: Vec::new(),
            running_per_runner: HashMap::new(),
            interrupts,
            cancelled: false,
            timed_out: false,
            failure: None,
            redactor,
            finished_counter: 0,
            just_finished: Vec::new(),
            deadline,
            scratch,
        }
    }

    /// Commits the journal, then starts its attempts and publishes its events: nothing
    /// starts, and nobody hears of a transition, before it is on disk. If the commit
    /// fails, none of it happened (the attempts are dropped unstarted).
    fn commit(&mut self) -> Result<()> {
        if !self.journal.is_empty() {
            let writes = std::mem::take(&mut self.journal);
            if let Err(e) = self.engine.store.commit(&writes) {
                self.launches.clear();
                self.unannounced.clear();
                return Err(e);
            }
        }
        // Attempts first: on a current-thread runtime, tasks run in the order they were
        // woken, and a subscriber printing the events should not delay a process start.
        for launch in self.launches.drain(..) {
            self.running.spawn(launch);
        }
        for event in self.unannounced.drain(..) {
            self.engine.bus.publish(event);
        }
        Ok(())
    }

    /// An event of this run, published at the next commit.
    fn emit(&mut self, kind: &str, step: Option<&str>, severity: Severity, message: String) {
        let event = self.engine.record_event(&self.run_id, &self.plan, kind, step, severity, message);
        self.unannounced.push(event);
    }

    /// Journals a step's new status (a final one with outputs: `finish_step_after`).
    fn journal_status(&mut self, step_id: &str, status: StepStatus, error: Option<String>) {
        self.journal.push(Write::StepStatus {
            run_id: self.run_id.clone(),
            step_id: step_id.to_owned(),
            status,
            error,
        });
    }

    /// Attempts started or about to start.
    fn in_flight(&self) -> usize {
        self.running.len() + self.launches.len()
    }

    /// Main steps, then rollbacks and `on_failure` or `on_success`, then `finally`.
    async fn drive(&mut self) -> Result<RunStatus> {
        let main: Vec<PlannedStep> = self.plan.steps.clone();
        self.run_dag(&main).await?;
        let failed = self.failure.is_some()
            || main.iter().any(|s| self.nodes[&s.id].status == StepStatus::Failed && !s.continue_on_error);
        if failed && self.failure.is_none() {
            self.failure = Some("a step failed".into());
        }
        if self.cancelled {
            // Cancelled: no rollback, no success or failure hook, but `finally` runs
            // unless the operator insisted (second signal).
            let hooks: Vec<PlannedStep> = self.plan.on_failure.iter().chain(&self.plan.on_success).cloned().collect();
            self.skip_all(&hooks, "the run was cancelled")?;
            if !self.interrupts.kill.is_cancelled() {
                let finally = self.plan.finally.clone();
                self.cancelled = false;
                self.interrupts.graceful = CancellationToken::new();
                self.run_dag(&finally).await?;
            }
            self.skip_all(&self.plan.finally.clone(), "the run was killed")?;
            return Ok(if self.timed_out { RunStatus::Failed } else { RunStatus::Cancelled });
        }
        if failed {
            self.rollback_all().await?;
            let hooks = self.plan.on_failure.clone();
            self.run_dag(&hooks).await?;
            self.skip_all(&self.plan.on_success.clone(), "the run failed")?;
        } else {
            let hooks = self.plan.on_success.clone();
            self.run_dag(&hooks).await?;
            self.skip_all(&self.plan.on_failure.clone(), "the run succeeded")?;
        }
        let finally = self.plan.finally.clone();
        self.run_dag(&finally).await?;
        Ok(if failed { RunStatus::Failed } else { RunStatus::Succeeded })
    }

    /// Marks the steps of a list that will not run as skipped, with the reason.
    fn skip_all(&mut self, steps: &[PlannedStep], why: &str) -> Result<()> {
        for s in steps {
            if !self.nodes[&s.id].status.is_final() {
                self.finish_step(s, StepStatus::Skipped, Some(why.to_owned()))?;
            }
        }
        Ok(())
    }

    /// Runs the rollback action of every succeeded main step, latest first.
    async fn rollback_all(&mut self) -> Result<()> {
        let mut done: Vec<(u64, PlannedStep)> = self
            .plan
            .steps
            .iter()
            .filter(|s| s.rollback.is_some() && self.nodes[&s.id].status == StepStatus::Succeeded)
            .map(|s| (self.nodes[&s.id].finished_seq, s.clone()))
            .collect();
        done.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for (_, step) in done {
            self.rollback_step(&step).await?;
        }
        Ok(())
    }

    /// Runs one step's rollback action and waits for it.
    async fn rollback_step(&mut self, step: &PlannedStep) -> Result<()> {
        let Some(rollback) = &step.rollback else { return Ok(()) };
        let mut planned = step.clone();
        planned.action = rollback.action.clone();
        planned.timeout = rollback.timeout;
        self.emit("step.rolling-back", Some(&step.id), Severity::Warning, format!("rolling back {}", step.id));
        self.commit()?; // the count below reads the store
        let number = self
            .engine
            .store
            .attempts(&self.run_id)?
            .iter()
            .filter(|a| a.step_id == step.id && a.kind == AttemptKind::Rollback)
            .count() as u32
            + 1;
        self.start_attempt(&planned, AttemptKind::Rollback, number)?;
        self.commit()?;
        while let Some(joined) = self.running.join_next().await {
            let done = joined.map_err(|e| Error::new(ErrorKind::Internal, format!("an attempt task failed: {e}")))?;
            self.release(&planned);
            let record = AttemptRecord {
                run_id: self.run_id.clone(),
                step_id: step.id.clone(),
                number: done.number,
                kind: AttemptKind::Rollback,
                status: done.status,
                started_at: 0,
                finished_at: Some(now_millis()),
                exit_code: done.exit_code,
                signal: done.signal,
                log_path: String::new(),
                error: done.error.as_ref().map(|e| self.redactor.redact(e)),
            };
            self.journal.push(Write::AttemptFinished(record));
            if done.status == AttemptStatus::Succeeded {
                if let Some(node) = self.nodes.get_mut(&step.id) {
                    node.status = StepStatus::RolledBack;
                }
                self.journal_status(&step.id, StepStatus::RolledBack, None);
                self.emit("step.rolled-back", Some(&step.id), Severity::Warning, format!("{} rolled back", step.id));
            } else {
                let why = done.error.unwrap_or_else(|| "rollback failed".into());
                self.emit(
                    "step.rollback-failed",
                    Some(&step.id),
                    Severity::Error,
                    format!("rollback of {} failed: {why}", step.id),
                );
            }
            self.commit()?;
        }
        Ok(())
    }

    /// Runs a list of steps as a DAG until every one is final.
    async fn run_dag(&mut self, steps: &[PlannedStep]) -> Result<()> {
        let position: HashMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
        // The steps not final yet, in declaration order; a step is removed when it
        // becomes final (`just_finished`), so a pass costs what is open, not the DAG.
        let mut open: BTreeSet<usize> =
            (0..steps.len()).filter(|&i| !self.nodes[&steps[i].id].status.is_final()).collect();
        self.just_finished.clear();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.prune(&position, &mut open);
            if !self.cancelled {
                self.schedule(steps, &open).await?;
                self.prune(&position, &mut open);
            }
            self.commit()?;
            if self.running.is_empty() && !open.is_empty() {
                // Nothing runs: before waiting, make sure no final step is left over.
                open.retain(|&i| !self.nodes[&steps[i].id].status.is_final());
            }
            if open.is_empty() && self.running.is_empty() {
                return Ok(());
            }
            if self.cancelled && self.running.is_empty() {
                for s in steps {
                    if !self.nodes[&s.id].status.is_final() {
                        self.finish_step(s, StepStatus::Cancelled, Some("run cancelled".into()))?;
                    }
                }
                return self.commit();
            }
            let next_wake = self.next_wake();
            tokio::select! {
                Some(joined) = self.running.join_next(), if !self.running.is_empty() => {
                    // Every attempt that has ended by now goes into this pass: one commit
                    // for all of them and the steps they unblock.
                    let mut joined = Some(joined);
                    while let Some(result) = joined {
                        let done = result.map_err(|e| Error::new(ErrorKind::Internal, format!("an attempt task failed: {e}")))?;
                        if let Some(&i) = position.get(done.step.as_str()) {
                            self.attempt_done(&steps[i], done)?;
                        }
                        joined = self.running.try_join_next();
                    }
                }
                _ = heartbeat.tick() => {
                    self.tick(steps)?;
                }
                _ = crate::traits::sleep_until_some(next_wake.map(Into::into)) => {}
                _ = self.interrupts.graceful.cancelled(), if !self.cancelled => {
                    self.cancel("cancelled by a signal");
                }
                _ = self.interrupts.kill.cancelled() => {
                    // Dropping the attempts kills their process groups.
                    self.running.abort_all();
                    while self.running.join_next().await.is_some() {}
                    self.cancel("killed by a second signal");
                    for s in steps {
                        if !self.nodes[&s.id].status.is_final() {
                            self.finish_step(s, StepStatus::Cancelled, Some("killed".into()))?;
                        }
                    }
                    return self.commit();
                }
            }
        }
    }

    /// Removes from `open` the steps that became final since the last call.
    fn prune(&mut self, position: &HashMap<&str, usize>, open: &mut BTreeSet<usize>) {
        for id in self.just_finished.drain(..) {
            if let Some(i) = position.get(id.as_str()) {
                open.remove(i);
            }
        }
    }

    fn cancel(&mut self, why: &str) {
        if !self.cancelled {
            self.cancelled = true;
            self.failure.get_or_insert_with(|| why.to_owned());
            self.interrupts.graceful.cancel();
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.timers
            .iter()
            .filter_map(|id| {
                let n = &self.nodes[id];
                n.not_before.into_iter().chain(n.deadline).min()
            })
            .chain(self.deadline)
            .min()
    }

    /// Heartbeat: record life, read cancel requests and approvals, renew leases, expire
    /// approvals, enforce the run timeout.
    fn tick(&mut self, steps: &[PlannedStep]) -> Result<()> {
        // Events are journaled here and at the end of the run, not per step: they are the
        // narrative; attempts and steps (written ahead, synchronously) are the record.
        self.engine.flush_events();
        let signals = self.engine.store.heartbeat(&self.run_id)?;
        if signals.cancel_requested {
            self.cancel("cancelled by an operator (`nexus cancel`)");
        }
        if self.nodes.values().any(|n| !n.leases.is_empty()) {
            let ttl = self.plan.locks.values().map(|l| l.lease_ms as i64).max().unwrap_or(60_000);
            self.engine.store.renew_leases(&self.run_id, ttl)?;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.deadline = None;
            let limit = self.plan.timeout.map(|t| t.to_string()).unwrap_or_default();
            self.failure = Some(format!("the run exceeded its timeout of {limit}"));
            self.timed_out = true;
            self.cancel("run timeout");
        }
        let now = Instant::now();
        for s in steps {
            let node = &self.nodes[&s.id];
            if node.status != StepStatus::WaitingApproval {
                continue;
            }
            if let Some(decision) = signals.approvals.iter().rev().find(|a| a.step_id == s.id) {
                let (status, kind, msg) = if decision.approved {
                    (StepStatus::Succeeded, "approval.granted", format!("{} approved by {}", s.id, decision.by))
                } else {
                    (StepStatus::Failed, "approval.rejected", format!("{} rejected by {}", s.id, decision.by))
                };
                self.emit(kind, Some(&s.id), Severity::Info, msg.clone());
                self.finish_step(s, status, (!decision.approved).then_some(msg))?;
            } else if node.deadline.is_some_and(|d| now >= d) {
                let msg = format!("no approval for {} before its timeout", s.id);
                self.emit("approval.expired", Some(&s.id), Severity::Warning, msg.clone());
                self.finish_step(s, StepStatus::Failed, Some(msg))?;
            }
        }
        Ok(())
    }

    /// Starts every step that can start.
    async fn schedule(&mut self, steps: &[PlannedStep], open: &BTreeSet<usize>) -> Result<()> {
        let now = Instant::now();
        for step in open.iter().map(|&i| &steps[i]) {
            if self.in_flight() >= self.plan.parallelism as usize {
                break;
            }
            let node = &self.nodes[&step.id];
            if node.status != StepStatus::Pending || node.not_before.is_some_and(|t| t > now) {
                continue;
            }
            // Needs: all final; a need that did not succeed skips this step.
            let mut ready = true;
            let mut blocked_by = None;
            for need in &step.needs {
                let Some(n) = self.nodes.get(need) else { continue };
                match n.status {
                    StepStatus::Succeeded => {}
                    StepStatus::Failed if self.plan.step(need).is_some_and(|s| s.continue_on_error) => {}
                    s if s.is_final() => blocked_by = Some(need.clone()),
                    _ => ready = false,
                }
            }
            if !ready {
                continue;
            }
            if let Some(need) = blocked_by {
                self.finish_step(step, StepStatus::Skipped, Some(format!("`{need}` did not succeed")))?;
                continue;
            }
            if let Some(condition) = &step.condition {
                match self.evaluate(step, condition) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.finish_step(step, StepStatus::Skipped, Some(format!("`if: {condition}` is false")))?;
                        continue;
                    }
                    Err(e) => {
                        let msg = self.redactor.redact(&e.to_string());
                        self.finish_step(step, StepStatus::Failed, Some(msg))?;
                        continue;
                    }
                }
            }
            if let PlannedAction::Command(c) = &step.action {
                let limit = self.plan.runners.get(&c.runner).and_then(|r| r.max_parallel);
                if limit.is_some_and(|l| self.running_per_runner.get(&c.runner).copied().unwrap_or(0) >= l) {
                    continue;
                }
            }
            if !self.take_locks(step)? {
                continue;
            }
            if let PlannedAction::Approval { message, timeout, .. } = &step.action {
                let deadline = timeout.map(|t| Instant::now() + t.get());
                let node = self.nodes.get_mut(&step.id).expect("node");
                node.status = StepStatus::WaitingApproval;
                node.deadline = deadline;
                if deadline.is_some() {
                    self.timers.insert(step.id.clone());
                }
                self.journal_status(&step.id, StepStatus::WaitingApproval, None);
                let message = self.render_text(step, message);
                self.emit(
                    "approval.requested",
                    Some(&step.id),
                    Severity::Warning,
                    format!("{message} (approve with `nexus approve {} {}`)", self.run_id, step.id),
                );
                continue;
            }
            let number = self.nodes[&step.id].attempts + 1;
            self.nodes.get_mut(&step.id).expect("node").attempts = number;
            self.nodes.get_mut(&step.id).expect("node").status = StepStatus::Running;
            self.start_attempt(step, AttemptKind::Main, number)?;
        }
        Ok(())
    }

    fn take_locks(&mut self, step: &PlannedStep) -> Result<bool> {
        if step.locks.is_empty() {
            return Ok(true);
        }
        let holder = LeaseHolder { run_id: self.run_id.clone(), step_id: step.id.clone() };
        let mut taken = Vec::new();
        for lock in &step.locks {
            let decl =
                self.plan.locks.get(lock).cloned().unwrap_or(crate::plan::PlannedLock { limit: 1, lease_ms: 60_000 });
            if self.engine.store.acquire_lease(lock, decl.limit, &holder, decl.lease_ms as i64)? {
                taken.push(lock.clone());
            } else {
                for t in &taken {
                    self.engine.store.release_lease(t, &holder)?;
                }
                return Ok(false);
            }
        }
        self.nodes.get_mut(&step.id).expect("node").leases = taken;
        Ok(true)
    }

    /// Gives back what an attempt of `step` held: its runner slot and its lock leases.
    fn release(&mut self, step: &PlannedStep) {
        if let PlannedAction::Command(c) = &step.action
            && let Some(n) = self.running_per_runner.get_mut(&c.runner)
        {
            *n = n.saturating_sub(1);
        }
        if let Some(node) = self.nodes.get_mut(&step.id)
            && !node.leases.is_empty()
        {
            let holder = LeaseHolder { run_id: self.run_id.clone(), step_id: step.id.clone() };
            for lock in std::mem::take(&mut node.leases) {
                let _ = self.engine.store.release_lease(&lock, &holder);
            }
        }
    }

    /// The template context of a step at run time (outputs so far; no secrets).
    fn context(&self, step: &PlannedStep) -> Value {
        let steps: serde_json::Map<String, Value> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                let status = serde_json::to_value(n.status).unwrap_or_default();
                (id.clone(), serde_json::json!({ "outputs": n.outputs, "status": status }))
            })
            .collect();
        // Matrix steps are also reachable by their declared id when they have one instance.
        serde_json::json!({
            "params": self.plan.params,
            "env": self.plan.context.env,
            "pipeline": self.plan.context.pipeline,
            "matrix": step.matrix,
            "steps": steps,
            "run": { "id": self.run_id },
        })
    }

    fn evaluate(&self, step: &PlannedStep, condition: &str) -> Result<bool> {
        let env = template_env();
        let expr = env
            .compile_expression(condition)
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("invalid `if` of {}: {e}", step.id)))?;
        let value = expr.eval(minijinja::Value::from(minijinja::value::Serde(self.context(step)))).map_err(|e| {
            Error::new(ErrorKind::InvalidConfig, format!("cannot evaluate `if: {condition}` of {}: {e}", step.id))
        })?;
        Ok(value.is_true())
    }

    fn render_text(&self, step: &PlannedStep, text: &str) -> String {
        crate::plan::render_str(&template_env(), text, &self.context(step)).unwrap_or_else(|_| text.to_owned())
    }

    /// Journals and spawns one attempt.
    fn start_attempt(&mut self, step: &PlannedStep, kind: AttemptKind, number: u32) -> Result<()> {
        let suffix = match kind {
            AttemptKind::Main => "",
            AttemptKind::Rollback => ".rollback",
        };
        let log_rel = format!("logs/{}/{}{suffix}.{number}.log", self.run_id, sanitize(&step.id));
        let record = AttemptRecord {
            run_id: self.run_id.clone(),
            step_id: step.id.clone(),
            number,
            kind,
            status: AttemptStatus::Running,
            started_at: now_millis(),
            finished_at: None,
            exit_code: None,
            signal: None,
            log_path: log_rel.clone(),
            error: None,
        };
        // Write-ahead: the attempt starts once this is committed (`commit`).
        self.journal.push(Write::AttemptStarted(record));
        if kind == AttemptKind::Main {
            let verb = if number > 1 { format!("started (attempt {number})") } else { "started".to_owned() };
            self.emit("step.started", Some(&step.id), Severity::Info, format!("{} {verb}", step.id));
        }
        let prepared = self.prepare(step, kind, number, &log_rel);
        if let PlannedAction::Command(c) = &step.action {
            *self.running_per_runner.entry(c.runner.clone()).or_default() += 1;
        }
        let step_id = step.id.clone();
        let cancel = self.interrupts.graceful.child_token();
        let live = self.engine.live.clone();
        self.launches.push(Box::pin(async move {
            let result = match prepared {
                Ok(p) => p.run(cancel, live).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(o) => AttemptDone {
                    step: step_id,
                    kind,
                    number,
                    status: o.status,
                    exit_code: o.exit_code,
                    signal: o.signal,
                    outputs: o.outputs,
                    error: o.error,
                },
                Err(e) => AttemptDone {
                    step: step_id,
                    kind,
                    number,
                    status: match e.kind() {
                        ErrorKind::Timeout => AttemptStatus::TimedOut,
                        ErrorKind::Cancelled => AttemptStatus::Cancelled,
                        _ => AttemptStatus::Failed,
                    },
                    exit_code: None,
                    signal: None,
                    // The message alone: the context (run, step) is shown next to it.
                    error: Some(e.message().to_owned()),
                    outputs: Map::new(),
                },
            }
        }));
        Ok(())
    }

    /// Resolves what an attempt needs (secrets, rendered command, runner) before it is
    /// spawned; errors become a failed attempt.
    fn prepare(&mut self, step: &PlannedStep, kind: AttemptKind, number: u32, log_rel: &str) -> Result<Prepared> {
        let log_path = self.engine.state_dir.join(log_rel);
        match &step.action {
            PlannedAction::Command(command) => {
                let secrets = self.resolve_secrets(command)?;
                // The run-time context (every step's outputs) is built only for commands
                // that still hold templates: most are fully rendered at plan time.
                let runtime = if command.rendered {
                    Value::Null
                } else {
                    let mut runtime = self.context(step);
                    runtime["secrets"] = Value::Object(
                        secrets.iter().map(|(k, v)| (k.clone(), Value::String(v.expose().to_owned()))).collect(),
                    );
                    runtime
                };
                let resolved = render_command(&self.plan, step, command, &runtime).map_err(|e| {
                    Error::new(e.kind(), self.redactor.redact(e.message())).with_operation("engine.render")
                })?;
                let runner = self.engine.runner(&self.plan, &command.runner)?;
                let attempt = (self.run_id.clone(), step.id.clone(), number, kind, log_rel.to_owned());
                let mut task = Task::new(&self.run_id, &step.id, number, resolved.program);
                task.image = resolved.image;
                task.env = resolved.env;
                task.working_dir = resolved.working_dir;
                task.timeout = step.timeout.map(|t| t.get());
                task.scratch_dir = self.scratch.as_ref().map(|s| s.path().to_owned());
                task.secrets =
                    secrets.into_iter().map(|(name, value)| (name.to_uppercase().replace('-', "_"), value)).collect();
                let store = self.engine.store.clone();
                let task = Box::new(task);
                Ok(Prepared::Command { runner, task, log_path, redactor: self.redactor.clone(), store, attempt })
            }
            PlannedAction::Service { service, kind, action, .. } => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "service `{service}` (kind `{kind}`): calling `{action}` needs the `{kind}` adapter, which is not implemented in this build yet"
                ),
            )),
            PlannedAction::Notify { channels, message, severity } => {
                let message = if message.contains("{{") || message.contains("{%") {
                    self.render_text(step, message)
                } else {
                    message.clone()
                };
                let message = self.redactor.redact(&message);
                let event = run_event(&self.run_id, &self.plan, "step.notify", Some(&step.id), *severity, message);
                Ok(Prepared::Notify {
                    engine: self.engine.clone(),
                    event: Box::new(event),
                    channels: channels.clone(),
                    log_path,
                    redactor: self.redactor.clone(),
                })
            }
            PlannedAction::Approval { .. } => Err(Error::new(ErrorKind::Internal, "approval steps are not attempts")),
        }
    }

    /// Resolves the secrets a command names and adds them to the redactor.
    fn resolve_secrets(&mut self, command: &PlannedCommand) -> Result<Vec<(String, SecretValue)>> {
        let security = &self.engine.ssot.security;
        let mut names: Vec<String> = command.secrets.clone();
        // Secrets read by templates (`{{ secrets.x }}`) are resolved too; a rendered
        // command has none left (templates reading secrets are rendered at run time).
        if !command.rendered {
            let text = serde_json::to_string(&command.run).unwrap_or_default()
                + &serde_json::to_string(&command.env).unwrap_or_default()
                + &serde_json::to_string(&command.params).unwrap_or_default();
            for name in security.secrets.keys() {
                if text.contains(&format!("secrets.{name}")) && !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            let value = secrets::resolve(security, &name, &self.plan.environment)?;
            out.push((name, value));
        }
        if !out.is_empty() {
            self.redactor =
                self.redactor.with_values(out.iter().map(|(_, v)| v.expose()), &security.redaction.patterns);
        }
        Ok(out)
    }

    /// Handles a finished attempt: journal, retry or finish the step.
    fn attempt_done(&mut self, step: &PlannedStep, done: AttemptDone) -> Result<()> {
        self.release(step);
        let error = done.error.as_ref().map(|e| self.redactor.redact(e));
        let outputs: Map<String> = done.outputs.iter().map(|(k, v)| (k.clone(), self.redactor.redact(v))).collect();
        let mut record = AttemptRecord {
            run_id: self.run_id.clone(),
            step_id: step.id.clone(),
            number: done.number,
            kind: done.kind,
            status: done.status,
            started_at: 0,
            finished_at: Some(now_millis()),
            exit_code: done.exit_code,
            signal: done.signal,
            log_path: String::new(),
            error: error.clone(),
        };
        // Required outputs missing turn a success into a failure.
        if done.status == AttemptStatus::Succeeded {
            let missing: Vec<&String> = step.required_outputs.iter().filter(|o| !outputs.contains_key(*o)).collect();
            if !missing.is_empty() {
                record.status = AttemptStatus::Failed;
                record.error = Some(format!(
                    "required output{} {} not written to $NEXUS_OUTPUT",
                    if missing.len() == 1 { "" } else { "s" },
                    missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if record.status == AttemptStatus::Succeeded {
            self.nodes.get_mut(&step.id).expect("node").outputs = outputs;
            return self.finish_step_after(step, StepStatus::Succeeded, None, Some(record));
        }
        let why = record.error.clone().unwrap_or_else(|| match record.exit_code {
            Some(code) => format!("exited with code {code}"),
            None => "failed".to_owned(),
        });
        if record.status == AttemptStatus::Cancelled || self.cancelled {
            return self.finish_step_after(step, StepStatus::Cancelled, Some(why), Some(record));
        }
        let attempts = self.nodes[&step.id].attempts;
        let retryable_code = step.retry.on_exit_codes.is_empty()
            || record.exit_code.is_some_and(|c| step.retry.on_exit_codes.contains(&c));
        if attempts < step.retry.attempts && retryable_code && done.kind == AttemptKind::Main {
            self.journal.push(Write::AttemptFinished(record));
            let wait = backoff(&step.retry, attempts + 1);
            let node = self.nodes.get_mut(&step.id).expect("node");
            node.status = StepStatus::Pending;
            node.not_before = Some(Instant::now() + wait);
            self.timers.insert(step.id.clone());
            self.journal_status(&step.id, StepStatus::Pending, Some(why.clone()));
            self.emit(
                "step.retrying",
                Some(&step.id),
                Severity::Warning,
                format!(
                    "{} attempt {attempts} failed ({why}); retrying in {}",
                    step.id,
                    humantime::format_duration(round_ms(wait))
                ),
            );
            return Ok(());
        }
        self.finish_step_after(step, StepStatus::Failed, Some(why), Some(record))
    }

    fn finish_step(&mut self, step: &PlannedStep, status: StepStatus, error: Option<String>) -> Result<()> {
        self.finish_step_after(step, status, error, None)
    }

    /// Records a step's final status, with the attempt that ended it in the same
    /// transaction when there is one.
    fn finish_step_after(
        &mut self,
        step: &PlannedStep,
        status: StepStatus,
        error: Option<String>,
        attempt: Option<AttemptRecord>,
    ) -> Result<()> {
        self.finished_counter += 1;
        self.just_finished.push(step.id.clone());
        let node = self.nodes.get_mut(&step.id).expect("node");
        node.status = status;
        node.not_before = None;
        node.deadline = None;
        self.timers.remove(&step.id);
        node.finished_seq = self.finished_counter;
        let outputs = serde_json::to_string(&node.outputs).unwrap_or_else(|_| "{}".into());
        let error = error.map(|e| self.redactor.redact(&e));
        if let Some(a) = attempt {
            self.journal.push(Write::AttemptFinished(a));
        }
        self.journal.push(Write::StepFinished {
            run_id: self.run_id.clone(),
            step_id: step.id.clone(),
            status,
            outputs_json: outputs,
            error: error.clone(),
        });
        let (kind, severity) = match status {
            StepStatus::Succeeded => ("step.succeeded", Severity::Info),
            StepStatus::Skipped => ("step.skipped", Severity::Info),
            StepStatus::Cancelled => ("step.cancelled", Severity::Warning),
            _ => ("step.failed", Severity::Error),
        };
        let mut message = format!("{} {}", step.id, kind.trim_start_matches("step."));
        if let Some(e) = &error {
            message.push_str(&format!(": {e}"));
        }
        self.emit(kind, Some(&step.id), severity, message);
        if status == StepStatus::Failed && !step.continue_on_error && self.plan.steps.iter().any(|s| s.id == step.id) {
            self.failure
                .get_or_insert_with(|| format!("step `{}` failed: {}", step.id, error.clone().unwrap_or_default()));
        }
        Ok(())
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Records how each target of an attempt ended (before the attempt's own end is).
/// Best effort: the attempt's record is what the run depends on.
fn record_targets(
    store: &dyn StateStore,
    attempt: &(String, String, u32, AttemptKind, String),
    redactor: &Redactor,
    reports: Vec<crate::traits::TargetReport>,
) {
    if reports.is_empty() {
        return;
    }
    let (run_id, step_id, number, kind, log_rel) = attempt;
    let millis = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    let records: Vec<TargetRecord> = reports
        .into_iter()
        .map(|r| TargetRecord {
            run_id: run_id.clone(),
            step_id: step_id.clone(),
            number: *number,
            kind: *kind,
            status: if r.skipped {
                AttemptStatus::Cancelled
            } else if r.exit_code == Some(0) {
                AttemptStatus::Succeeded
            } else {
                AttemptStatus::Failed
            },
            skipped: r.skipped,
            started_at: millis(r.started),
            finished_at: millis(r.finished),
            exit_code: r.exit_code,
            signal: r.signal,
            log_path: logs::target_log_path(std::path::Path::new(log_rel), &r.name).to_string_lossy().into_owned(),
            error: r.error.as_deref().map(|e| redactor.redact(e)),
            target: r.name,
        })
        .collect();
    let _ = store.record_targets(&records);
}

/// A step id or a target name made safe for a file name.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(
            |c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '[' | ']' | ',') { c } else { '_' },
        )
        .collect()
}

/// An attempt ready to run.
enum Prepared {
    Command {
        runner: Arc<dyn Runner>,
        task: Box<Task>,
        log_path: PathBuf,
        redactor: Redactor,
        store: Arc<dyn StateStore>,
        /// Run, step, number, kind and log path of the attempt, to record its targets.
        attempt: (String, String, u32, AttemptKind, String),
    },
    /// A `notify` step: its message to each channel, with the notifiers' retries.
    Notify { engine: Engine, event: Box<Event>, channels: Vec<String>, log_path: PathBuf, redactor: Redactor },
}

struct Finished {
    status: AttemptStatus,
    exit_code: Option<i32>,
    signal: Option<i32>,
    outputs: Map<String>,
    error: Option<String>,
}

impl Prepared {
    async fn run(self, cancel: CancellationToken, live: LiveStatus) -> Result<Finished> {
        match self {
            Prepared::Command { runner, task, log_path, redactor, store, attempt } => {
                let sink = logs::FileSink::create(&log_path, redactor.clone(), live, task.step_id.clone())?;
                let result = runner.run(&task, &sink, cancel).await;
                record_targets(store.as_ref(), &attempt, &redactor, sink.take_targets());
                let outcome = result?;
                let status = if outcome.success() { AttemptStatus::Succeeded } else { AttemptStatus::Failed };
                let error = match (outcome.exit_code, outcome.signal) {
                    (Some(0), _) => None,
                    (Some(code), _) => Some(format!("exited with code {code}")),
                    (None, Some(sig)) => Some(format!("killed by signal {sig}")),
                    (None, None) => Some("ended without an exit status".to_owned()),
                };
                Ok(Finished {
                    status,
                    exit_code: outcome.exit_code,
                    signal: outcome.signal,
                    outputs: outcome.outputs,
                    error,
                })
            }
            Prepared::Notify { engine, event, channels, log_path, redactor } => {
                let step = event.step.clone().unwrap_or_default();
                let sink = logs::FileSink::create(&log_path, redactor, live, step)?;
                let send = crate::notify::send_step_message(
                    &engine.ssot,
                    &engine.catalog,
                    engine.store.as_ref(),
                    crate::notify::DeliveryPolicy::default(),
                    &event,
                    &channels,
                );
                let deliveries = tokio::select! {
                    d = send => d,
                    _ = cancel.cancelled() => {
                        return Err(Error::new(ErrorKind::Cancelled, "cancelled while notifying"));
                    }
                };
                let mut failed = Vec::new();
                for d in &deliveries {
                    let line = match &d.result {
                        Ok(r) => {
                            let id = r.message_id.as_deref().or(r.dedup_key.as_deref()).unwrap_or("accepted");
                            format!("sent to {} ({id})", d.channel)
                        }
                        Err(e) => {
                            failed.push(d.channel.clone());
                            format!("not sent to {} after {} attempt(s): {e}", d.channel, d.attempts)
                        }
                    };
                    crate::traits::LogSink::line(&sink, crate::traits::Stream::Stdout, &line);
                }
                // The step fails only when nobody got the message: one flaky channel
                // among several must not fail the pipeline.
                let all_failed = !deliveries.is_empty() && failed.len() == deliveries.len();
                Ok(Finished {
                    status: if all_failed { AttemptStatus::Failed } else { AttemptStatus::Succeeded },
                    exit_code: None,
                    signal: None,
                    outputs: Map::new(),
                    error: all_failed.then(|| format!("the message reached no channel ({})", failed.join(", "))),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Duration as Span;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            attempts: 10,
            backoff: Some(Span(Duration::from_millis(100))),
            factor: Some(3.0),
            max_backoff: Some(Span(Duration::from_secs(2))),
            jitter: Some(jitter),
            on_exit_codes: Vec::new(),
        }
    }

    #[test]
    fn backoff_grows_by_its_factor_up_to_its_cap() {
        let waits: Vec<u128> = (2..=6).map(|next| backoff(&policy(false), next).as_millis()).collect();
        assert_eq!(waits, [100, 300, 900, 2000, 2000]);
    }

    #[test]
    fn backoff_with_jitter_stays_within_the_wait() {
        for next in 2..=6 {
            let cap = backoff(&policy(false), next);
            for _ in 0..50 {
                assert!(backoff(&policy(true), next) <= cap);
            }
        }
    }
}
