//! The ssh runner passes the runner conformance suite of `nexus-testkit`, against the
//! OpenSSH server that `scripts/test-env.d/sshd.sh` starts on 127.0.0.1 (so the
//! "remote" host shares this machine's file system, which the suite's shared directory
//! relies on).
//!
//! How the ssh runner shows what the suite leaves to each runner:
//! - a command killed by SIGKILL (`kill -9 $$`) is reported as exit code 137 = 128 + 9:
//!   its remote parent shell sees the signal, OpenSSH does not pass it on;
//! - a program that does not exist, run without a shell (`Program::Argv`), is an error
//!   of kind `NotFound` naming it (the remote wrapper looks it up before starting it);
//! - attempts share the host's file system: only their `$NEXUS_OUTPUT` directories are
//!   private, so the isolation check covers env and outputs, not `/tmp`.

use std::sync::Arc;

use nexus_core::Catalog;
use nexus_core::traits::Runner;
use nexus_runner_ssh::{SSH_KIND, register_ssh_runner};
use nexus_testkit::runner as suite;
use nexus_testkit::{MissingProgram, RunnerTarget, SharedDir};
use serde_json::json;

/// An ssh runner on the test server, built through the catalog, and its target: a
/// fresh shared directory and working directory (same paths here and on the server).
fn setup() -> (Arc<dyn Runner>, RunnerTarget, [tempfile::TempDir; 2]) {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run `source scripts/test-env.d/sshd.sh` first"))
    };
    let host = var("NEXUS_TEST_SSH_HOST");
    let spec = json!({
        "host": host,
        "port": var("NEXUS_TEST_SSH_PORT").parse::<u16>().unwrap(),
        "user": var("NEXUS_TEST_SSH_USER"),
        "identity_file": var("NEXUS_TEST_SSH_KEY"),
        "known_hosts_file": var("NEXUS_TEST_SSH_KNOWN_HOSTS"),
        "kill_grace": "2s",
    });
    let mut catalog = Catalog::new();
    register_ssh_runner(&mut catalog).unwrap();
    let runner = catalog.runners.get(SSH_KIND).unwrap().build(spec).unwrap();
    let shared = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let canonical = |d: &tempfile::TempDir| d.path().canonicalize().unwrap();
    let target = RunnerTarget::new(format!("ssh {host}"), "conformance-ssh", SharedDir::same_path(canonical(&shared)))
        .with_work_dir(canonical(&work).display().to_string())
        .with_missing_program(MissingProgram::NotFoundError);
    (runner, target, [shared, work])
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn lines_arrive_in_order_and_live() {
    let (runner, target, _dirs) = setup();
    suite::lines_arrive_in_order_and_live(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn exit_codes_are_faithful() {
    let (runner, target, _dirs) = setup();
    suite::exit_codes_are_faithful(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn env_and_working_dir_are_applied() {
    let (runner, target, _dirs) = setup();
    suite::env_and_working_dir_are_applied(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn secrets_are_injected_and_redacted() {
    let (runner, target, _dirs) = setup();
    suite::secrets_are_injected_and_redacted(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn outputs_are_returned() {
    let (runner, target, _dirs) = setup();
    suite::outputs_are_returned(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn timeout_stops_everything() {
    let (runner, target, _dirs) = setup();
    suite::timeout_stops_everything(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn cancel_stops_everything() {
    let (runner, target, _dirs) = setup();
    suite::cancel_stops_everything(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn cancelled_before_start_runs_nothing() {
    let (runner, target, _dirs) = setup();
    suite::cancelled_before_start_runs_nothing(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn large_output_streams_in_bounded_memory() {
    let (runner, target, _dirs) = setup();
    suite::large_output_streams_in_bounded_memory(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn concurrent_attempts_are_isolated() {
    let (runner, target, _dirs) = setup();
    suite::concurrent_attempts_are_isolated(&*runner, &target).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn missing_command_is_a_clear_error() {
    let (runner, target, _dirs) = setup();
    suite::missing_command_is_a_clear_error(&*runner, &target).await;
}
