//! The runner conformance suite of `nexus-testkit` passes for the fixture runner (the
//! `local` runner, wrapped) both statically linked and loaded from the `cdylib`.

use crate::fixture;

use std::sync::Arc;

use nexus_core::KindDescriptor;
use nexus_core::traits::Runner;
use nexus_plugin_fixture::FixtureRunnerKind;
use nexus_testkit::runner as suite;
use nexus_testkit::{MissingProgram, RunnerTarget, SharedDir};
use serde_json::json;

/// The suite measures this process's peak memory: its runs must not overlap.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn target(name: &str) -> (RunnerTarget, [tempfile::TempDir; 2]) {
    let shared = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let canonical = |d: &tempfile::TempDir| d.path().canonicalize().unwrap();
    let target = RunnerTarget::new(name, format!("conformance-{name}"), SharedDir::same_path(canonical(&shared)))
        .with_work_dir(canonical(&work).display().to_string())
        .with_missing_program(MissingProgram::NotFoundError);
    (target, [shared, work])
}

fn plugin_runner() -> Arc<dyn Runner> {
    fixture::catalog("plain").runners.get("fixture-local").unwrap().build(json!({"kill_grace": "2s"})).unwrap()
}

fn static_runner() -> Arc<dyn Runner> {
    KindDescriptor::<dyn Runner>::of::<FixtureRunnerKind>().build(json!({"kill_grace": "2s"})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statically_linked_runner_passes_the_suite() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (target, _dirs) = target("fixture-static");
    suite::run_all(&*static_runner(), &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_runner_passes_the_suite() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (target, _dirs) = target("fixture-plugin");
    suite::run_all(&*plugin_runner(), &target).await;
}

/// The same tasks give the same outcomes, lines and errors through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_plugin_give_identical_results() {
    use nexus_core::traits::{Program, Task};
    use nexus_testkit::runner::CollectingSink;
    use tokio_util::sync::CancellationToken;
    let _one = ONE_AT_A_TIME.lock().await;
    let scripts = ["echo a; echo b >&2; echo x=1 >> \"$NEXUS_OUTPUT\"; exit 4", "printf 'no newline'", "kill -9 $$"];
    for script in scripts {
        let mut results = Vec::new();
        for runner in [static_runner(), plugin_runner()] {
            let logs = CollectingSink::new();
            let task = Task::new("r", "s", 1, Program::Shell { shell: "sh".into(), script: script.into() });
            let o = runner.run(&task, &logs, CancellationToken::new()).await.unwrap();
            results.push((o.exit_code, o.signal, o.outputs, logs.stdout(), logs.stderr()));
        }
        assert_eq!(results[0], results[1], "{script}");
    }
    let mut errors = Vec::new();
    for runner in [static_runner(), plugin_runner()] {
        let task = Task::new("r", "missing", 1, Program::Argv(vec!["nexus-no-such-program".into()]));
        let e = runner.run(&task, &CollectingSink::new(), CancellationToken::new()).await.unwrap_err();
        errors.push((e.kind(), e.message().to_owned(), e.is_retryable(), e.operation(), e.context().to_vec()));
    }
    assert_eq!(errors[0], errors[1]);
}
