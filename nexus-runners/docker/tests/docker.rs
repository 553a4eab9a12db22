//! The docker runner against a real Docker daemon: the runner conformance suite of
//! `nexus-testkit`, the error cases, labels, removal and leftovers.
//!
//! Every test that needs the daemon is `#[ignore = "needs docker"]`; `scripts/test.sh`
//! (through `scripts/test-env.sh`) starts dockerd, builds the local test image and runs
//! them. The image is `$NEXUS_TEST_DOCKER_IMAGE` (default `nexus-test-busybox:latest`):
//! busybox, nothing pulled.
//!
//! How the docker runner shows what the suite leaves to each runner:
//! - a command killed by SIGKILL (`kill -9 $$`) is reported as exit code 137 (the
//!   container's init reports its child's death as 128 + 9), with no signal;
//! - a program that does not exist, run without a shell (`Program::Argv`), is an error
//!   of kind `NotFound` naming it and the image (the container cannot start); through
//!   the shell, exit code 127 and the shell's message on stderr;
//! - each attempt has its own file system (the isolation check also covers `/tmp`).
//!
//! Each test uses its own run id and checks at its end that no container labelled with
//! it is left.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, ListContainersOptionsBuilder};
use nexus_core::traits::{Program, Runner, Task};
use nexus_core::{Catalog, ErrorKind};
use nexus_runner_docker::{DOCKER_KIND, LABEL_RUN, register_docker_runner, remove_leftovers};
use nexus_testkit::runner::{self as suite, CollectingSink, eventually};
use nexus_testkit::{MissingProgram, RunnerTarget, SharedDir};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The label every container of these tests carries (on top of the runner's own).
const TEST_LABEL: &str = "io.nexus.test";

fn image() -> String {
    std::env::var("NEXUS_TEST_DOCKER_IMAGE")
        .ok()
        .filter(|i| !i.trim().is_empty())
        .unwrap_or_else(|| "nexus-test-busybox:latest".to_owned())
}

/// A run id unique to one test of this process.
fn run_id(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("test-{test}-{}-{nanos:x}", std::process::id())
}

/// A docker runner built through the catalog from the test image's spec with `changes`.
fn runner(changes: serde_json::Value) -> Arc<dyn Runner> {
    let mut spec = json!({
        "image": image(),
        "pull": "never",
        "kill_grace": "2s",
        "labels": {TEST_LABEL: "docker-runner"},
    });
    for (key, value) in changes.as_object().unwrap() {
        spec[key] = value.clone();
    }
    let mut catalog = Catalog::new();
    register_docker_runner(&mut catalog).unwrap();
    let kind = catalog.runners.get(DOCKER_KIND).unwrap();
    assert!(kind.validate(&spec).is_empty(), "{:?}", kind.validate(&spec));
    kind.build(spec).unwrap()
}

/// A runner whose containers mount a fresh shared directory at `/shared`, and the
/// conformance target for it.
fn conformance(test: &str) -> (Arc<dyn Runner>, RunnerTarget, tempfile::TempDir) {
    let shared = tempfile::tempdir().unwrap();
    let runner = runner(json!({"mounts": [{"source": shared.path(), "target": "/shared"}]}));
    let target = RunnerTarget::new("docker", run_id(test), SharedDir::new(shared.path(), "/shared"))
        .with_image(image())
        .with_work_dir("/tmp")
        .with_isolated_files(true)
        .with_missing_program(MissingProgram::NotFoundError);
    (runner, target, shared)
}

async fn docker() -> Docker {
    Docker::connect_with_defaults().unwrap().negotiate_version().await.unwrap()
}

/// Names of the containers (running or not) labelled with run `run_id`.
async fn containers_of(run_id: &str) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_RUN}={run_id}")])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let list = docker().await.list_containers(Some(options)).await.unwrap();
    list.into_iter().flat_map(|c| c.names.unwrap_or_default()).collect()
}

/// No container of run `run_id` is left.
async fn assert_no_container_left(run_id: &str) {
    let left = containers_of(run_id).await;
    assert!(left.is_empty(), "containers left by run `{run_id}`: {left:?}");
}

macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "needs docker"]
        async fn $check() {
            let (runner, target, _shared) = conformance(stringify!($check));
            suite::$check(&*runner, &target).await;
            assert_no_container_left(&target.run_id).await;
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

fn shell(run: &str, step: &str, script: &str) -> Task {
    Task::new(run, step, 1, Program::Shell { shell: "sh".into(), script: script.into() })
}

#[tokio::test]
#[ignore = "needs docker"]
async fn a_missing_image_with_pull_never_is_not_found() {
    let run = run_id("missing-image");
    let runner = runner(json!({"image": "nexus-test-absent/image:0.0.1", "pull": "never"}));
    let err =
        runner.run(&shell(&run, "build", "true"), &CollectingSink::new(), CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("image `nexus-test-absent/image:0.0.1`"), "{err}");
    assert!(err.message().contains("pull policy is `never`"), "{err}");
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs docker"]
async fn a_refused_pull_names_the_image() {
    // A registry on a closed local port: the daemon's pull is refused at once, and no
    // traffic leaves this machine.
    let run = run_id("refused-pull");
    for pull in ["if-missing", "always"] {
        let runner = runner(json!({"image": "127.0.0.1:9/nexus-test/absent:1", "pull": pull}));
        let logs = CollectingSink::new();
        let err = runner.run(&shell(&run, "build", "true"), &logs, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::NotFound), "{err}");
        assert!(err.message().contains("cannot pull image `127.0.0.1:9/nexus-test/absent:1`"), "{err}");
        assert_eq!(logs.stderr(), ["nexus: pulling image `127.0.0.1:9/nexus-test/absent:1`"]);
    }
    assert_no_container_left(&run).await;
}

#[tokio::test]
async fn an_unreachable_daemon_names_the_host() {
    // Nothing listens on port 9 (discard) here: the connection is refused.
    let runner = runner(json!({"host": "tcp://127.0.0.1:9"}));
    let err =
        runner.run(&shell("r", "build", "true"), &CollectingSink::new(), CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains("Docker daemon at `tcp://127.0.0.1:9`"), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
#[ignore = "needs docker"]
async fn kept_containers_carry_the_labels_and_remove_leftovers_removes_them() {
    let run = run_id("leftovers");
    let runner = runner(json!({"remove": false, "labels": {TEST_LABEL: "docker-runner", "team": "platform"}}));
    let mut task = shell(&run, "deploy[region=eu]", "echo kept");
    task.attempt = 3;
    let outcome = runner.run(&task, &CollectingSink::new(), CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));

    let filters = HashMap::from([("label", vec![format!("{LABEL_RUN}={run}")])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let kept = docker().await.list_containers(Some(options)).await.unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let labels = kept[0].labels.clone().unwrap();
    assert_eq!(labels["io.nexus.run"], run);
    assert_eq!(labels["io.nexus.step"], "deploy[region=eu]");
    assert_eq!(labels["io.nexus.attempt"], "3");
    assert_eq!(labels["team"], "platform");
    assert_eq!(kept[0].state.as_ref().map(|s| s.to_string()).as_deref(), Some("exited"));

    let removed = remove_leftovers(None, &run).await.unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].starts_with(&format!("nexus-{}", &run[..24.min(run.len())])), "{removed:?}");
    assert_no_container_left(&run).await;
    assert!(remove_leftovers(None, &run).await.unwrap().is_empty());
}

#[tokio::test]
#[ignore = "needs docker"]
async fn leftovers_of_a_crashed_run_are_removed_even_running() {
    // A container as a run that died with `kill -9` leaves it: labelled, still running.
    let run = run_id("crashed");
    let docker = docker().await;
    let body = ContainerCreateBody {
        image: Some(image()),
        cmd: Some(vec!["sleep".into(), "60".into()]),
        labels: Some(HashMap::from([
            (LABEL_RUN.to_owned(), run.clone()),
            (TEST_LABEL.to_owned(), "crashed".to_owned()),
        ])),
        ..Default::default()
    };
    let name = format!("nexus-{run}");
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    let created = docker.create_container(Some(options), body).await.unwrap();
    docker.start_container(&created.id, None).await.unwrap();
    assert_eq!(containers_of(&run).await, [format!("/{name}")]);

    let removed = remove_leftovers(None, &run).await.unwrap();
    assert_eq!(removed, [name]);
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs docker"]
async fn an_abandoned_attempt_removes_its_container() {
    let run = run_id("abandoned");
    let runner = runner(json!({}));
    let logs = CollectingSink::new();
    let task = shell(&run, "abandoned", "echo started; sleep 60");
    let begun = async {
        assert!(eventually(Duration::from_secs(30), || logs.stdout().iter().any(|l| l == "started")).await);
    };
    tokio::select! {
        _ = runner.run(&task, &logs, CancellationToken::new()) => panic!("the attempt finished on its own"),
        () = begun => {}
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !containers_of(&run).await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs docker"]
async fn user_limits_network_and_outputs_apply() {
    let run = run_id("limits");
    let runner = runner(json!({
        "user": "1000:1000",
        "memory": "64m",
        "cpus": 0.5,
        "network": "none",
        "working_dir": "/tmp",
        "env": {"FROM_SPEC": "spec"},
    }));
    let script = r#"echo "uid=$(id -u) gid=$(id -g) dir=$(pwd) spec=$FROM_SPEC"
for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do [ -r $f ] && echo "memory=$(cat $f)"; done
echo "links=$(ls /sys/class/net | tr '\n' ' ')"
echo "who=$(id -u)" >> "$NEXUS_OUTPUT""#;
    let mut task = shell(&run, "limits", script);
    task.working_dir = Some("sub".into());
    let logs = CollectingSink::new();
    let outcome = runner.run(&task, &logs, CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.stderr());
    let stdout = logs.stdout();
    assert_eq!(stdout[0], "uid=1000 gid=1000 dir=/tmp/sub spec=spec");
    assert_eq!(stdout[1], format!("memory={}", 64 << 20));
    assert_eq!(stdout[2], "links=lo ");
    assert_eq!(outcome.outputs["who"], "1000");
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs docker"]
async fn argv_runs_with_the_entrypoint_and_the_task_image_wins() {
    let run = run_id("argv");
    // The spec names an image that does not exist: the task's image is used instead.
    let runner = runner(json!({"image": "nexus-test-absent/image:1", "entrypoint": ["/bin/echo", "via-entrypoint"]}));
    let mut task = Task::new(&run, "argv", 1, Program::Argv(vec!["a b".into(), "c".into()]));
    task.image = Some(image());
    let logs = CollectingSink::new();
    let outcome = runner.run(&task, &logs, CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(logs.stdout(), ["via-entrypoint a b c"]);

    let runner = runner_without_entrypoint();
    let mut task = Task::new(&run, "argv", 2, Program::Argv(vec!["echo".into(), "plain".into()]));
    task.image = Some(image());
    let logs = CollectingSink::new();
    runner.run(&task, &logs, CancellationToken::new()).await.unwrap();
    assert_eq!(logs.stdout(), ["plain"]);
    assert_no_container_left(&run).await;
}

fn runner_without_entrypoint() -> Arc<dyn Runner> {
    runner(json!({}))
}

#[tokio::test]
#[ignore = "needs docker"]
async fn a_command_ignoring_sigterm_is_killed_after_the_grace_period() {
    let run = run_id("sigkill");
    let runner = runner(json!({"kill_grace": "500ms"}));
    let task = shell(&run, "stubborn", "trap '' TERM; echo started; while :; do sleep 0.1; done");
    // Cancelled once the trap is set (a timeout could fire before the container runs).
    let token = CancellationToken::new();
    let canceller = token.clone();
    let logs = CollectingSink::calling(move |_, line| {
        if line == "started" {
            canceller.cancel();
        }
    });
    let begun = Instant::now();
    let err = runner.run(&task, &logs, token).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(err.message().contains("killed with SIGKILL after a 500ms grace period"), "{err}");
    assert!(begun.elapsed() < Duration::from_secs(20), "took {:?}", begun.elapsed());
    assert_no_container_left(&run).await;
}
