//! The kubernetes runner passes the runner conformance suite of `nexus-testkit`, against
//! the in-process fake API server of `fake/` (each pod a real local process group), with
//! the real `kube::Client`. No service is needed: these tests run in plain `cargo test`.
//!
//! How the kubernetes runner shows what the suite leaves to each runner:
//! - a command killed by SIGKILL (`kill -9 $$`) is reported as exit code 137 (the
//!   container's exit code from its status, 128 + 9), with no signal;
//! - a program that does not exist, run without a shell (`Program::Argv`), is an error
//!   of kind `NotFound` naming it and the image (the wrapper checks it with
//!   `command -v`); through the shell, exit code 127 and the shell's message on stderr;
//! - the fake's pods share this machine's file system, so the isolation check covers
//!   env and outputs, not `/tmp` (on a real cluster each pod has its own).

mod fake;

use std::sync::Arc;
use std::time::Duration;

use fake::FakeCluster;
use nexus_core::traits::Runner;
use nexus_runner_kubernetes::runner::Timings;
use nexus_runner_kubernetes::{KubernetesRunner, KubernetesSpec};
use nexus_testkit::runner as suite;
use nexus_testkit::{MissingProgram, RunnerTarget, SharedDir};
use serde_json::json;

/// A runner on a fresh fake cluster, and its target: a fresh shared directory (same
/// path here and for the pods), a fresh working directory. The returned guard keeps
/// the fake and the directories alive.
async fn setup(test: &str) -> (Arc<dyn Runner>, RunnerTarget, (FakeCluster, [tempfile::TempDir; 2])) {
    let cluster = FakeCluster::start().await;
    let spec: KubernetesSpec = serde_json::from_value(json!({
        "namespace": "ci",
        "image": "busybox:1.36",
        "kubeconfig": cluster.kubeconfig(),
        "context": "fake",
    }))
    .unwrap();
    let mut timings = Timings::default();
    timings.poll = Duration::from_millis(50);
    let runner: Arc<dyn Runner> = Arc::new(KubernetesRunner::new(spec).with_timings(timings));
    let shared = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let canonical = |d: &tempfile::TempDir| d.path().canonicalize().unwrap();
    let target =
        RunnerTarget::new("kubernetes (fake API server)", fake::unique(test), SharedDir::same_path(canonical(&shared)))
            .with_image("busybox:1.36")
            .with_work_dir(canonical(&work).display().to_string())
            .with_missing_program(MissingProgram::NotFoundError);
    (runner, target, (cluster, [shared, work]))
}

macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let (runner, target, (cluster, _dirs)) = setup(stringify!($check)).await;
            suite::$check(&*runner, &target).await;
            cluster.assert_nothing_left(&target.run_id).await;
        }
    )*};
}

conformance_tests!(
    lines_arrive_in_order_and_live,
    exit_codes_are_faithful,
    env_and_working_dir_are_applied,
    secrets_are_injected_and_redacted,
    outputs_are_returned,
    timeout_stops_everything,
    cancel_stops_everything,
    cancelled_before_start_runs_nothing,
    large_output_streams_in_bounded_memory,
    concurrent_attempts_are_isolated,
    missing_command_is_a_clear_error,
);
