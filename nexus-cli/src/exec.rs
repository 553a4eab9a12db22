//! `plan`, `graph`, `run`, `resume`, `retry`, `rollback`: planning and executing runs.

use std::path::Path;
use std::sync::Arc;

use nexus_core::engine::{Engine, InterruptedPolicy, Interrupts, Recovered};
use nexus_core::model::{Map, Ssot};
use nexus_core::notify::Notifications;
use nexus_core::plan::{Plan, PlanRequest, config_digest, plan, to_dot, to_mermaid, upstream};
use nexus_core::state::sqlite::SqliteStore;
use nexus_core::state::{RunStatus, StateStore, StepStatus};
use nexus_core::validate::{Options, validate_dir};
use serde_json::Value;

use crate::{EXIT_FAILED, EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, Output, progress, render};

/// A validated model with what was read to build it.
pub struct Loaded {
    pub ssot: Arc<Ssot>,
    pub digest: String,
    pub catalog: Arc<nexus_core::Catalog>,
}

/// Validates the config directory; on error prints the diagnostics and returns the
/// exit code.
pub fn load(config: &Path) -> Result<Loaded, u8> {
    let catalog = crate::catalog::build().map_err(|e| {
        eprintln!("error: {e}");
        EXIT_INTERNAL
    })?;
    let validated = validate_dir(config, &catalog, &Options::default());
    render::diagnostics(&validated.report, &validated.sources);
    match validated.ssot {
        Some(ssot) => {
            Ok(Loaded { ssot: Arc::new(ssot), digest: config_digest(&validated.sources), catalog: Arc::new(catalog) })
        }
        None => {
            eprintln!("{} is invalid: {} error(s); nothing was run", config.display(), validated.report.error_count());
            Err(EXIT_INVALID)
        }
    }
}

/// Parses `--param key=value` pairs (values stay text; the planner converts them to
/// each parameter's type).
pub fn parse_params(pairs: &[String]) -> Result<Map<Value>, u8> {
    let mut out = Map::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            eprintln!("error: `--param {pair}` must be written `--param name=value`");
            return Err(EXIT_INVALID);
        };
        out.insert(k.trim().to_owned(), Value::String(v.to_owned()));
    }
    Ok(out)
}

/// Plans `pipeline` (or the default one).
pub fn make_plan(loaded: &Loaded, pipeline: Option<&str>, env: Option<&str>, params: &[String]) -> Result<Plan, u8> {
    let params = parse_params(params)?;
    let request = PlanRequest { pipeline, environment: env, params, config_digest: loaded.digest.clone() };
    plan(&loaded.ssot, &request).map_err(|e| {
        eprintln!("error: {}", e.message());
        EXIT_INVALID
    })
}

pub fn open_store(state: &Path) -> Result<Arc<dyn StateStore>, u8> {
    match SqliteStore::open(state) {
        Ok(s) => Ok(Arc::new(s)),
        Err(e) => {
            eprintln!("error: cannot open the state store in {}: {e}", state.display());
            Err(EXIT_INTERNAL)
        }
    }
}

/// `nexus plan`.
pub fn cmd_plan(
    config: &Path,
    output: Output,
    pipeline: Option<&str>,
    env: Option<&str>,
    params: &[String],
    save: Option<&Path>,
) -> u8 {
    let loaded = match load(config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let plan = match make_plan(&loaded, pipeline, env, params) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Some(path) = save {
        let text = serde_json::to_string_pretty(&plan).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("error: cannot write {}: {e}", path.display());
            return EXIT_INTERNAL;
        }
        eprintln!("saved the plan to {} (run it with `nexus run --plan {}`)", path.display(), path.display());
    }
    match output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&plan).unwrap_or_default()),
        Output::Text => out!("{}", progress::plan_text(&plan)),
    }
    EXIT_OK
}

/// `nexus graph`.
pub fn cmd_graph(config: &Path, pipeline: Option<&str>, env: Option<&str>, params: &[String], format: &str) -> u8 {
    let loaded = match load(config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let plan = match make_plan(&loaded, pipeline, env, params) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match format {
        "mermaid" => out!("{}", to_mermaid(&plan)),
        _ => out!("{}", to_dot(&plan)),
    }
    EXIT_OK
}

/// Installs SIGINT/SIGTERM handling: the first signal cancels gracefully, the second
/// kills.
fn interrupts() -> Interrupts {
    let interrupts = Interrupts::default();
    let i = interrupts.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            count += 1;
            if count == 1 {
                eprintln!("\nstopping: cancelling running steps (press Ctrl-C again to kill them)");
                i.graceful.cancel();
            } else {
                i.kill.cancel();
                return;
            }
        }
    });
    interrupts
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// How long a finished run waits for its notifications to be delivered (retries
/// included) before the process exits.
const NOTIFY_GRACE: std::time::Duration = std::time::Duration::from_secs(150);

/// Runs `run_id` to its end with progress output; returns the exit code.
fn drive(engine: &Engine, run_id: &str, plan: &Plan, recovered: Recovered, output: Output) -> u8 {
    let rt = runtime();
    // A resumed run lists only the notifications of this process.
    let started = nexus_core::state::now_millis();
    let (result, notifications) = rt.block_on(async {
        let display = progress::Display::start(engine, plan, run_id, output);
        let notifications = Notifications::start(engine);
        let outcome = engine.execute(run_id, plan, recovered, interrupts()).await;
        display.stop().await;
        (outcome, notifications)
    });
    // The verdict is shown at once; the notifications, still being sent in the
    // background, are waited for (and reported) after it.
    let finish_notifications = |notifications: Option<Notifications>| {
        let Some(notifications) = notifications else { return };
        if rt.block_on(notifications.finish(NOTIFY_GRACE)).unfinished > 0 {
            eprintln!(
                "warning: notifications still being sent after {}s were abandoned; `nexus show {run_id}` lists them",
                NOTIFY_GRACE.as_secs()
            );
        }
    };
    match result {
        Ok(outcome) => {
            let store = engine.store().as_ref();
            if output == Output::Json {
                finish_notifications(notifications);
                progress::summary(store, &outcome, output);
            } else {
                progress::summary(store, &outcome, output);
                finish_notifications(notifications);
                progress::deliveries(store, &outcome.run_id, started);
            }
            match outcome.status {
                // A run skipped by its concurrency group did what the policy asked.
                RunStatus::Succeeded | RunStatus::Skipped => EXIT_OK,
                _ => EXIT_FAILED,
            }
        }
        Err(e) => {
            finish_notifications(notifications);
            eprintln!("error: {e}");
            EXIT_INTERNAL
        }
    }
}

/// Options of `nexus run`.
pub struct RunArgs<'a> {
    pub pipeline: Option<&'a str>,
    pub env: Option<&'a str>,
    pub params: &'a [String],
    pub plan_file: Option<&'a Path>,
}

/// `nexus run`.
pub fn cmd_run(config: &Path, state: &Path, output: Output, args: RunArgs<'_>) -> u8 {
    let loaded = match load(config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let plan = match args.plan_file {
        Some(path) => match read_plan(path, &loaded.digest) {
            Ok(p) => p,
            Err(code) => return code,
        },
        None => match make_plan(&loaded, args.pipeline, args.env, args.params) {
            Ok(p) => p,
            Err(code) => return code,
        },
    };
    let store = match open_store(state) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let engine = Engine::new(loaded.ssot.clone(), loaded.catalog.clone(), store, state.to_owned());
    let run_id = match engine.create_run(&plan, None) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    };
    drive(&engine, &run_id, &plan, Recovered::default(), output)
}

fn read_plan(path: &Path, digest: &str) -> Result<Plan, u8> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read the plan {}: {e}", path.display());
        EXIT_INVALID
    })?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| {
        eprintln!("error: {} is not a saved plan: {e}", path.display());
        EXIT_INVALID
    })?;
    if plan.format != nexus_core::plan::PLAN_FORMAT {
        eprintln!(
            "error: {} has plan format {}, this nexus runs format {}",
            path.display(),
            plan.format,
            nexus_core::plan::PLAN_FORMAT
        );
        return Err(EXIT_INVALID);
    }
    if plan.config_digest != digest {
        eprintln!(
            "error: the registries changed since {} was planned; run `nexus plan … --save {}` again and review it",
            path.display(),
            path.display()
        );
        return Err(EXIT_INVALID);
    }
    Ok(plan)
}

/// The registries, the store, and a stored run with its plan; or the exit code, after
/// saying what is wrong.
fn open_run(
    config: &Path,
    state: &Path,
    run_id: &str,
) -> Result<(Loaded, Arc<dyn StateStore>, nexus_core::state::RunRecord, Plan), u8> {
    let loaded = load(config)?;
    let store = open_store(state)?;
    let (run, plan) = stored_run(store.as_ref(), run_id)?;
    Ok((loaded, store, run, plan))
}

/// Reads a run and its plan from the store.
fn stored_run(store: &dyn StateStore, run_id: &str) -> Result<(nexus_core::state::RunRecord, Plan), u8> {
    let run = match store.run(run_id) {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!("error: no run `{run_id}` in this state store (see `nexus runs`)");
            return Err(EXIT_INVALID);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Err(EXIT_INTERNAL);
        }
    };
    let plan: Plan = serde_json::from_str(&run.plan_json).map_err(|e| {
        eprintln!("error: the stored plan of {run_id} cannot be read: {e}");
        EXIT_INTERNAL
    })?;
    Ok((run, plan))
}

/// What the store says about a run's steps: final ones with outputs, attempt counts, and
/// steps in completion order.
fn recovered_from(store: &dyn StateStore, run_id: &str) -> Result<(Recovered, Vec<String>), u8> {
    let steps = store.steps(run_id).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_INTERNAL
    })?;
    let mut recovered = Recovered::default();
    let mut finished: Vec<(i64, String)> = Vec::new();
    for s in steps {
        recovered.attempts.insert(s.step_id.clone(), s.attempts);
        if matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped | StepStatus::Failed | StepStatus::RolledBack)
        {
            let outputs: Map<String> = serde_json::from_str(&s.outputs_json).unwrap_or_default();
            recovered.done.insert(s.step_id.clone(), (s.status, outputs));
            if s.status == StepStatus::Succeeded {
                finished.push((s.finished_at.unwrap_or(0), s.step_id.clone()));
            }
        }
    }
    finished.sort();
    Ok((recovered, finished.into_iter().map(|(_, id)| id).collect()))
}

/// `nexus resume`.
pub fn cmd_resume(config: &Path, state: &Path, output: Output, run_id: &str, policy: InterruptedPolicy) -> u8 {
    let (loaded, store, run, plan) = match open_run(config, state, run_id) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    if run.status.is_final() {
        eprintln!(
            "error: run {run_id} already {}; use `nexus retry {run_id} --from STEP` to run part of it again",
            status_text(run.status)
        );
        return EXIT_INVALID;
    }
    if run.status == RunStatus::Running && nexus_core::engine::is_alive(&run) {
        let pid = run.owner.as_ref().map(|o| o.pid).unwrap_or_default();
        eprintln!("error: run {run_id} is still running (process {pid}); `nexus cancel {run_id}` stops it");
        return EXIT_INVALID;
    }
    // The steps that were running when the process died (or that an earlier, refused
    // `resume` already marked interrupted). Decide first; change nothing until decided.
    let steps = match store.steps(run_id) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let interrupted: Vec<String> = steps
        .iter()
        .filter(|s| matches!(s.status, StepStatus::Running | StepStatus::Interrupted))
        .map(|s| s.step_id.clone())
        .collect();
    let undecided: Vec<String> = interrupted
        .iter()
        .filter(|id| policy == InterruptedPolicy::Ask && !plan.step(id).is_some_and(|s| s.idempotent))
        .cloned()
        .collect();
    if !undecided.is_empty() {
        eprintln!(
            "run {run_id} was interrupted while {} running; {} not idempotent, so nexus will not guess whether {} again.",
            list(&undecided),
            if undecided.len() == 1 { "it is" } else { "they are" },
            if undecided.len() == 1 { "to run it" } else { "to run them" }
        );
        eprintln!(
            "decide, then resume:\n  nexus resume {run_id} --rerun-interrupted   # run them again\n  nexus resume {run_id} --skip-interrupted    # treat them as skipped"
        );
        return EXIT_INVALID;
    }
    if let Err(e) = store.interrupt_running(run_id) {
        eprintln!("error: {e}");
        return EXIT_INTERNAL;
    }
    match nexus_core::notify::close_interrupted(store.as_ref(), run_id) {
        Ok(0) => {}
        Ok(n) => eprintln!("warning: {n} notification(s) of run {run_id} were being sent when its process died"),
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    }
    if policy == InterruptedPolicy::Skip {
        for id in &interrupted {
            if let Err(e) =
                store.set_step_status(run_id, id, StepStatus::Skipped, Some("interrupted; skipped by the operator"))
            {
                eprintln!("error: {e}");
                return EXIT_INTERNAL;
            }
        }
    }
    let (recovered, _) = match recovered_from(store.as_ref(), run_id) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !interrupted.is_empty() && policy != InterruptedPolicy::Skip {
        eprintln!("re-running interrupted step(s): {}", list(&interrupted));
    }
    let engine = Engine::new(loaded.ssot.clone(), loaded.catalog.clone(), store, state.to_owned());
    // Containers, Jobs or remote processes the dead process left are removed first.
    if let Err(e) = runtime().block_on(engine.cleanup_runners(run_id, &plan)) {
        eprintln!("error: cannot clean up what run {run_id} left behind: {e}");
        return EXIT_INTERNAL;
    }
    drive(&engine, run_id, &plan, recovered, output)
}

fn list(ids: &[String]) -> String {
    ids.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
}

pub fn status_text(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Queued => "queued",
        RunStatus::Running => "running",
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "was cancelled",
        RunStatus::Skipped => "was skipped",
    }
}

/// `nexus retry RUN --from STEP`.
pub fn cmd_retry(config: &Path, state: &Path, output: Output, run_id: &str, from: &str) -> u8 {
    let (loaded, store, _, plan) = match open_run(config, state, run_id) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    let targets: Vec<&str> =
        plan.steps.iter().filter(|s| s.id == from || s.step == from).map(|s| s.id.as_str()).collect();
    if targets.is_empty() {
        let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
        eprintln!("error: run {run_id} has no step `{from}`; its steps: {}", ids.join(", "));
        return EXIT_INVALID;
    }
    let mut keep = std::collections::BTreeSet::new();
    for t in &targets {
        keep.extend(upstream(&plan.steps, t));
    }
    let (old, _) = match recovered_from(store.as_ref(), run_id) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let missing: Vec<String> =
        keep.iter().filter(|id| !matches!(old.done.get(*id), Some((StepStatus::Succeeded, _)))).cloned().collect();
    if !missing.is_empty() {
        eprintln!(
            "error: cannot retry from `{from}`: upstream step(s) {} did not succeed in run {run_id}",
            list(&missing)
        );
        return EXIT_INVALID;
    }
    let mut recovered = Recovered::default();
    for id in &keep {
        if let Some(done) = old.done.get(id) {
            recovered.done.insert(id.clone(), done.clone());
        }
    }
    let engine = Engine::new(loaded.ssot.clone(), loaded.catalog.clone(), store.clone(), state.to_owned());
    let new_id = match engine.create_run(&plan, Some(run_id)) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    };
    for (id, (status, outputs)) in &recovered.done {
        let outputs = serde_json::to_string(outputs).unwrap_or_else(|_| "{}".into());
        let _ = store.step_finished(&new_id, id, *status, &outputs, Some(&format!("reused from run {run_id}")));
    }
    eprintln!("run {new_id} retries {run_id} from `{from}`, reusing {} upstream step(s)", keep.len());
    drive(&engine, &new_id, &plan, recovered, output)
}

/// `nexus rollback RUN`: runs the rollback actions of the run's succeeded steps, latest
/// first.
pub fn cmd_rollback(config: &Path, state: &Path, run_id: &str) -> u8 {
    let (loaded, store, run, plan) = match open_run(config, state, run_id) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    if !run.status.is_final() && nexus_core::engine::is_alive(&run) {
        eprintln!("error: run {run_id} is still running; cancel it first (`nexus cancel {run_id}`)");
        return EXIT_INVALID;
    }
    let (_, order) = match recovered_from(store.as_ref(), run_id) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let engine = Engine::new(loaded.ssot.clone(), loaded.catalog.clone(), store, state.to_owned());
    let rt = runtime();
    let started = nexus_core::state::now_millis();
    // Rollback events go through the notification routes too (`step.rolled-back`).
    let result = rt.block_on(async {
        let notifications = Notifications::start(&engine);
        let result = engine.rollback_run(run_id, &plan, &order).await;
        if let Some(notifications) = notifications {
            notifications.finish(NOTIFY_GRACE).await;
        }
        result
    });
    progress::deliveries(engine.store().as_ref(), run_id, started);
    match result {
        Ok(results) if results.is_empty() => {
            outln!("run {run_id}: no succeeded step has a rollback; nothing to do");
            EXIT_OK
        }
        Ok(results) => {
            let mut failed = false;
            for (step, ok) in &results {
                outln!("{} {step}", if *ok { "rolled back" } else { "ROLLBACK FAILED" });
                failed |= !ok;
            }
            if failed { EXIT_FAILED } else { EXIT_OK }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_INTERNAL
        }
    }
}
