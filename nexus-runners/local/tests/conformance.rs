//! The local runner passes the runner conformance suite of `nexus-testkit`.
//!
//! How the local runner shows what the suite leaves to each runner:
//! - a command killed by SIGKILL (`kill -9 $$`) is reported as `signal: Some(9)` with no
//!   exit code (the runner waits for the process itself);
//! - a program that does not exist, run without a shell (`Program::Argv`), is an error
//!   of kind `NotFound` naming it; through the shell, exit code 127 and the shell's
//!   message on stderr;
//! - attempts share this machine's file system: only their `$NEXUS_OUTPUT` files are
//!   private, so the isolation check covers env and outputs, not `/tmp`.

use std::sync::Arc;

use nexus_core::Catalog;
use nexus_core::traits::Runner;
use nexus_runner_local::{LOCAL_KIND, register_local_runner};
use nexus_testkit::runner as suite;
use nexus_testkit::{MissingProgram, RunnerTarget, SharedDir};
use serde_json::json;

/// A local runner built through the catalog, with a short grace period, and its target:
/// a fresh shared directory (same path here and for the command), a fresh working
/// directory. The directories live as long as the returned guard.
fn setup() -> (Arc<dyn Runner>, RunnerTarget, [tempfile::TempDir; 2]) {
    let mut catalog = Catalog::new();
    register_local_runner(&mut catalog).unwrap();
    let runner = catalog.runners.get(LOCAL_KIND).unwrap().build(json!({"kill_grace": "2s"})).unwrap();
    let shared = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let canonical = |d: &tempfile::TempDir| d.path().canonicalize().unwrap();
    let target = RunnerTarget::new("local", "conformance-local", SharedDir::same_path(canonical(&shared)))
        .with_work_dir(canonical(&work).display().to_string())
        .with_missing_program(MissingProgram::NotFoundError);
    (runner, target, [shared, work])
}

#[tokio::test]
async fn lines_arrive_in_order_and_live() {
    let (runner, target, _dirs) = setup();
    suite::lines_arrive_in_order_and_live(&*runner, &target).await;
}

#[tokio::test]
async fn exit_codes_are_faithful() {
    let (runner, target, _dirs) = setup();
    suite::exit_codes_are_faithful(&*runner, &target).await;
}

#[tokio::test]
async fn env_and_working_dir_are_applied() {
    let (runner, target, _dirs) = setup();
    suite::env_and_working_dir_are_applied(&*runner, &target).await;
}

#[tokio::test]
async fn secrets_are_injected_and_redacted() {
    let (runner, target, _dirs) = setup();
    suite::secrets_are_injected_and_redacted(&*runner, &target).await;
}

#[tokio::test]
async fn outputs_are_returned() {
    let (runner, target, _dirs) = setup();
    suite::outputs_are_returned(&*runner, &target).await;
}

#[tokio::test]
async fn timeout_stops_everything() {
    let (runner, target, _dirs) = setup();
    suite::timeout_stops_everything(&*runner, &target).await;
}

#[tokio::test]
async fn cancel_stops_everything() {
    let (runner, target, _dirs) = setup();
    suite::cancel_stops_everything(&*runner, &target).await;
}

#[tokio::test]
async fn cancelled_before_start_runs_nothing() {
    let (runner, target, _dirs) = setup();
    suite::cancelled_before_start_runs_nothing(&*runner, &target).await;
}

#[tokio::test]
async fn large_output_streams_in_bounded_memory() {
    let (runner, target, _dirs) = setup();
    suite::large_output_streams_in_bounded_memory(&*runner, &target).await;
}

#[tokio::test]
async fn concurrent_attempts_are_isolated() {
    let (runner, target, _dirs) = setup();
    suite::concurrent_attempts_are_isolated(&*runner, &target).await;
}

#[tokio::test]
async fn missing_command_is_a_clear_error() {
    let (runner, target, _dirs) = setup();
    suite::missing_command_is_a_clear_error(&*runner, &target).await;
}
