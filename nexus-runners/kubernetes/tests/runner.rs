//! The kubernetes runner's own behaviour against the fake API server of `fake/`: the
//! Job and Secret it creates, their removal however the attempt ends, the errors for
//! images that cannot be pulled, pods that cannot be scheduled, images without a shell,
//! refused credentials and permissions, a log stream cut in the middle, kubeconfig
//! contexts, and `cleanup_run`.

mod fake;

use std::sync::Arc;
use std::time::Duration;

use fake::FakeCluster;
use nexus_core::traits::{Program, Runner, SecretValue, Task};
use nexus_core::{Catalog, ErrorKind};
use nexus_runner_kubernetes::runner::Timings;
use nexus_runner_kubernetes::{
    KUBERNETES_KIND, KubernetesRunner, KubernetesSpec, label_value, register_kubernetes_runner,
};
use nexus_testkit::runner::{CollectingSink, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A runner on `cluster` with the test spec plus `changes`, polling fast.
fn runner(cluster: &FakeCluster, changes: Value) -> KubernetesRunner {
    let mut spec = json!({"namespace": "ci", "image": "busybox:1.36", "kubeconfig": cluster.kubeconfig()});
    for (key, value) in changes.as_object().unwrap() {
        spec[key] = value.clone();
    }
    let spec: KubernetesSpec = serde_json::from_value(spec).unwrap();
    let mut timings = Timings::default();
    timings.poll = Duration::from_millis(50);
    timings.unschedulable_grace = Duration::from_secs(1);
    timings.no_pod_grace = Duration::from_secs(1);
    KubernetesRunner::new(spec).with_timings(timings)
}

fn task(run: &str, step: &str, script: &str) -> Task {
    Task::new(run, step, 1, Program::Shell { shell: "sh".into(), script: script.into() })
}

fn created<'a>(state: &'a fake::FakeState, kind: &str) -> Vec<&'a Value> {
    state.created.iter().filter(|v| v["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_and_secret_carry_the_spec() {
    let cluster = FakeCluster::start().await;
    let runner = runner(
        &cluster,
        json!({
            "service_account": "nexus-runner",
            "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": 1, "memory": "128Mi"}},
            "node_selector": {"kubernetes.io/arch": "amd64"},
            "tolerations": [
                {"key": "dedicated", "value": "ci", "effect": "NoSchedule"},
                {"operator": "Exists", "effect": "NoExecute", "toleration_seconds": 30},
            ],
            "labels": {"team": "platform", "nexus.run": "spoofed"},
            "image_pull_policy": "IfNotPresent",
        }),
    );
    let run = "run/2024-01-01T00:00:00Z#1";
    let mut task =
        task(run, "deploy[env=prod]", "echo \"$GREETING $TOKEN_CHECK\"; echo \"token length ${#API_TOKEN}\"");
    task.attempt = 2;
    task.env = vec![("GREETING".into(), "hello".into())];
    task.secrets = vec![("API_TOKEN".into(), SecretValue::new("s3cr3t"))];
    task.timeout = Some(Duration::from_secs(30));
    task.working_dir = Some("/".into());
    let logs = CollectingSink::new();
    let outcome = runner.run(&task, &logs, CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.stderr());
    assert_eq!(logs.stdout(), ["hello ", "token length 6"]);
    cluster.assert_nothing_left(run).await;

    let state = cluster.state();
    let jobs = created(&state, "Job");
    assert_eq!(jobs.len(), 1);
    let job = jobs[0];
    let name = job["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("nx-deploy-env-prod-2-"), "{name}");
    assert!(name.len() <= 52, "{name}");
    let labels = &job["metadata"]["labels"];
    assert_eq!(labels["nexus.run"], "run-2024-01-01T00-00-00Z-1");
    assert_eq!(labels["nexus.step"], "deploy-env-prod");
    assert_eq!(labels["nexus.attempt"], "2");
    assert_eq!(labels["nexus.job"], name);
    assert_eq!(labels["team"], "platform");
    let annotations = &job["metadata"]["annotations"];
    assert_eq!(annotations["nexus.run"], run);
    assert_eq!(annotations["nexus.step"], "deploy[env=prod]");
    let spec = &job["spec"];
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["activeDeadlineSeconds"], 90);
    assert!(spec["ttlSecondsAfterFinished"].is_null());
    let template = &spec["template"];
    assert_eq!(template["metadata"]["labels"], *labels);
    assert_eq!(template["metadata"]["annotations"], *annotations);
    let pod = &template["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["serviceAccountName"], "nexus-runner");
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/arch": "amd64"}));
    assert_eq!(
        pod["tolerations"],
        json!([
            {"key": "dedicated", "operator": "Equal", "value": "ci", "effect": "NoSchedule"},
            {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        ])
    );
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "step");
    assert_eq!(container["image"], "busybox:1.36");
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    assert_eq!(container["workingDir"], "/");
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}})
    );
    let command = container["command"].as_array().unwrap();
    assert_eq!(command[0], "sh");
    assert_eq!(command[1], "-c");
    assert_eq!(&command[5..], [json!("sh"), json!("-c"), json!(task_script(&task))]);
    let env = container["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|v| v["name"] == name).cloned().unwrap_or(Value::Null);
    assert_eq!(var("GREETING")["value"], "hello");
    assert_eq!(var("NEXUS_RUN_ID")["value"], run);
    assert_eq!(var("NEXUS_STEP_ID")["value"], "deploy[env=prod]");
    assert_eq!(var("NEXUS_ATTEMPT")["value"], "2");
    assert_eq!(
        var("API_TOKEN")["valueFrom"]["secretKeyRef"],
        json!({"name": name, "key": "API_TOKEN", "optional": false})
    );
    assert!(!serde_json::to_string(job).unwrap().contains("s3cr3t"), "the secret's value is in the Job");

    let secrets = created(&state, "Secret");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["metadata"]["name"], name);
    assert_eq!(secrets[0]["metadata"]["labels"], *labels);
    assert_eq!(secrets[0]["stringData"], json!({"API_TOKEN": "s3cr3t"}));
    assert!(state.secrets.is_empty(), "the Secret was not deleted");
    assert!(state.jobs.is_empty(), "the Job was not deleted");
    assert_eq!(state.job_deletions, [(name.to_owned(), "Background".to_owned())]);
}

fn task_script(task: &Task) -> String {
    match &task.program {
        Program::Shell { script, .. } => script.clone(),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_is_deleted_however_the_attempt_ends() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({}));
    let run = fake::unique("secrets");
    let with_secret = |step: &str, script: &str| {
        let mut task = task(&run, step, script);
        task.secrets = vec![("TOKEN".into(), SecretValue::new("t0k3n"))];
        task
    };
    let logs = CollectingSink::new();
    // Failure.
    let failed = runner.run(&with_secret("fails", "exit 3"), &logs, CancellationToken::new()).await.unwrap();
    assert_eq!(failed.exit_code, Some(3));
    // Timeout.
    let mut slow = with_secret("slow", "sleep 30");
    slow.timeout = Some(Duration::from_millis(1500));
    let err = runner.run(&slow, &logs, CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.message().contains("was deleted with its pods"), "{err}");
    // Cancel.
    let token = CancellationToken::new();
    let canceller = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        canceller.cancel();
    });
    let err = runner.run(&with_secret("cancelled", "sleep 30"), &logs, token).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    // An image that cannot be pulled.
    let mut unpullable = with_secret("unpullable", "true");
    unpullable.image = Some("fake/unpullable:1".into());
    runner.run(&unpullable, &logs, CancellationToken::new()).await.unwrap_err();
    cluster.assert_nothing_left(&run).await;

    let state = cluster.state();
    assert_eq!(created(&state, "Secret").len(), 4);
    assert!(state.secrets.is_empty(), "Secrets left: {:?}", state.secrets.keys());
    // Stopped attempts delete their Job in the foreground (its pods first).
    let policies: Vec<&str> = state.job_deletions.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(policies, ["Background", "Foreground", "Foreground", "Foreground"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_keeps_the_job_for_kubernetes_to_delete() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({"ttl_seconds_after_finished": 600}));
    let mut task = task("ttl-run", "kept", "echo hi");
    task.secrets = vec![("TOKEN".into(), SecretValue::new("t0k3n"))];
    let outcome = runner.run(&task, &CollectingSink::new(), CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    let state = cluster.state();
    assert_eq!(state.jobs.len(), 1, "the Job should be kept");
    assert_eq!(state.jobs.values().next().unwrap()["spec"]["ttlSecondsAfterFinished"], 600);
    assert!(state.secrets.is_empty(), "the Secret is deleted all the same");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_fails_fast_and_clearly() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({"image": "fake/unpullable:1"}));
    let begun = std::time::Instant::now();
    let err = runner
        .run(&task("pull-run", "build", "true"), &CollectingSink::new(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(10));
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let message = err.message();
    for part in [
        "step `build`",
        "image `fake/unpullable:1` cannot be pulled: ErrImagePull",
        "not found",
        "namespace `ci`",
        "Job `nx-build-1-",
    ] {
        assert!(message.contains(part), "`{part}` not in: {message}");
    }
    cluster.assert_nothing_left("pull-run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_pod_fails_with_the_schedulers_message() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({"node_selector": {"fake/unschedulable": "yes"}}));
    let logs = CollectingSink::new();
    let err = runner.run(&task("sched-run", "build", "true"), &logs, CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let message = err.message();
    for part in ["cannot be scheduled: 0/3 nodes are available", "namespace `ci`", "waited 1s"] {
        assert!(message.contains(part), "`{part}` not in: {message}");
    }
    assert!(logs.stderr().iter().any(|l| l.contains("cannot be scheduled yet")), "{:?}", logs.stderr());
    cluster.assert_nothing_left("sched-run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_a_pod_and_an_image_without_a_shell_are_clear_errors() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({}));
    let mut no_pod = task("odd-run", "nopod", "true");
    no_pod.image = Some("fake/no-pod:1".into());
    let err = runner.run(&no_pod, &CollectingSink::new(), CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains("created no pod within 1s"), "{err}");

    let mut no_shell = task("odd-run", "noshell", "true");
    no_shell.image = Some("fake/no-shell:1".into());
    let err = runner.run(&no_shell, &CollectingSink::new(), CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("image `fake/no-shell:1` must provide a POSIX shell"), "{err}");
    assert!(err.message().contains("executable file not found"), "{err}");
    cluster.assert_nothing_left("odd-run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_log_stream_loses_and_repeats_no_line() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({}));
    cluster.state().break_log_after = Some(150);
    let logs = CollectingSink::new();
    let script = "i=1; while [ $i -le 400 ]; do echo line-$i; [ $((i % 100)) = 0 ] && echo err-$i >&2; i=$((i+1)); done; echo k=v >> \"$NEXUS_OUTPUT\"";
    let outcome = runner.run(&task("cut-run", "cut", script), &logs, CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    let expected: Vec<String> = (1..=400).map(|i| format!("line-{i}")).collect();
    assert_eq!(logs.stdout(), expected);
    assert_eq!(logs.stderr(), ["err-100", "err-200", "err-300", "err-400"]);
    assert_eq!(outcome.outputs.get("k").map(String::as_str), Some("v"));
    let state = cluster.state();
    let log_requests = state.requests.iter().filter(|r| r.contains("/log?")).collect::<Vec<_>>();
    assert_eq!(log_requests.len(), 2, "{log_requests:?}");
    assert!(log_requests[1].contains("sinceTime="), "{log_requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_are_selected_and_refusals_name_the_cluster() {
    let cluster = FakeCluster::start().await;
    let url = format!("http://{}", cluster.addr);
    let run = |runner: KubernetesRunner| async move {
        runner.run(&task("ctx-run", "ctx", "echo hi"), &CollectingSink::new(), CancellationToken::new()).await
    };
    // The current context (`fake`) and the same one named.
    assert_eq!(run(runner(&cluster, json!({}))).await.unwrap().exit_code, Some(0));
    assert_eq!(run(runner(&cluster, json!({"context": "fake"}))).await.unwrap().exit_code, Some(0));

    let err = run(runner(&cluster, json!({"context": "wrong-token"}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    for part in [url.as_str(), "context `wrong-token`", "401 Unauthorized", "cannot create the Job"] {
        assert!(err.message().contains(part), "`{part}` not in: {err}");
    }

    let err = run(runner(&cluster, json!({"context": "unreachable"}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    for part in ["http://127.0.0.1:9/", "context `unreachable`", "cannot reach"] {
        assert!(err.message().contains(part), "`{part}` not in: {err}");
    }

    let err = run(runner(&cluster, json!({"context": "nope"}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.message().contains("has no context `nope`; its contexts: fake, wrong-token, unreachable"), "{err}");

    let err = run(runner(&cluster, json!({"kubeconfig": "/nonexistent/kubeconfig"}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.message().contains("/nonexistent/kubeconfig"), "{err}");

    let err = run(runner(&cluster, json!({"namespace": "forbidden"}))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    for part in ["forbidden by", "(403)", "namespace `forbidden`", "busybox:1.36", "RBAC"] {
        assert!(err.message().contains(part), "`{part}` not in: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_run_deletes_what_a_crashed_run_left() {
    let cluster = FakeCluster::start().await;
    let runner = runner(&cluster, json!({}));
    let crashed = "crashed/run#1";
    cluster.add_leftover("ci", "nx-left-1-aaaa", crashed, &label_value(crashed)).await;
    // Another run whose sanitised id is the same: kept, thanks to the annotation.
    cluster.add_leftover("ci", "nx-left-1-bbbb", "crashed-run-1", &label_value(crashed)).await;
    // The same run in another namespace: not this runner's.
    cluster.add_leftover("other", "nx-left-1-cccc", crashed, &label_value(crashed)).await;
    assert!(eventually(Duration::from_secs(5), || cluster.pod_names().len() == 3).await);

    runner.cleanup_run(crashed).await.unwrap();
    let gone = eventually(Duration::from_secs(10), || cluster.pod_names().len() == 2).await;
    assert!(gone, "pods: {:?}", cluster.pod_names());
    let state = cluster.state();
    let jobs: Vec<&String> = state.jobs.keys().collect();
    assert_eq!(jobs, ["ci/nx-left-1-bbbb", "other/nx-left-1-cccc"]);
    let secrets: Vec<&String> = state.secrets.keys().collect();
    assert_eq!(secrets, ["ci/nx-left-1-bbbb", "other/nx-left-1-cccc"]);
    drop(state);
    let pods = cluster.pod_names();
    assert!(pods.iter().all(|p| !p.starts_with("ci/nx-left-1-aaaa")), "{pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kind_builds_through_the_catalog_without_contacting_anything() {
    let cluster = FakeCluster::start().await;
    let mut catalog = Catalog::new();
    register_kubernetes_runner(&mut catalog).unwrap();
    let kind = catalog.runners.get(KUBERNETES_KIND).unwrap();
    // Building reads nothing: a kubeconfig that does not exist is an error of the attempt.
    let missing: Arc<dyn Runner> = kind.build(json!({"kubeconfig": "/nonexistent/kubeconfig"})).unwrap();
    let err = missing.run(&task("r", "s", "true"), &CollectingSink::new(), CancellationToken::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");

    let built = kind.build(json!({"namespace": "ci", "image": "busybox", "kubeconfig": cluster.kubeconfig()})).unwrap();
    assert!(cluster.state().requests.is_empty(), "building contacted the cluster");
    let logs = CollectingSink::new();
    let outcome = built.run(&task("catalog-run", "s", "echo built"), &logs, CancellationToken::new()).await.unwrap();
    assert_eq!((outcome.exit_code, logs.stdout()), (Some(0), vec!["built".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_attempt_deletes_its_job_and_secret() {
    let cluster = FakeCluster::start().await;
    let runner = Arc::new(runner(&cluster, json!({})));
    let mut task = task("abandoned-run", "abandoned", "sleep 60");
    task.secrets = vec![("TOKEN".into(), SecretValue::new("t0k3n"))];
    let attempt = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run(&task, &CollectingSink::new(), CancellationToken::new()).await }
    });
    assert!(eventually(Duration::from_secs(10), || cluster.pod_names().len() == 1).await, "no pod started");
    attempt.abort(); // the engine drops the attempt's future
    cluster.assert_nothing_left("abandoned-run").await;
    let state = cluster.state();
    assert_eq!(state.job_deletions.len(), 1);
    assert_eq!(state.job_deletions[0].1, "Foreground");
}
