//! The kubernetes runner against a real cluster: the parts of the runner conformance
//! suite that need no directory shared with the pods, then `cleanup_run`.
//!
//! Compiled only with the crate's `real-cluster` feature, so that neither plain
//! `cargo test` nor the CI's `--include-ignored` run ever needs a cluster:
//!
//! ```sh
//! NEXUS_TEST_KUBECONFIG=~/.kube/config [NEXUS_TEST_K8S_CONTEXT=kind-nexus] \
//! [NEXUS_TEST_K8S_NAMESPACE=default] [NEXUS_TEST_K8S_IMAGE=busybox:1.36] \
//!   cargo test -p nexus-runner-kubernetes --features real-cluster --test real_cluster
//! ```
//!
//! The user of the kubeconfig needs to create and delete Jobs, Secrets and pods, and to
//! read pods and their logs, in the namespace; the nodes need to pull the image.
#![cfg(feature = "real-cluster")]

use std::time::Duration;

use nexus_core::traits::Runner;
use nexus_runner_kubernetes::{KubernetesRunner, KubernetesSpec};
use nexus_testkit::runner as suite;
use nexus_testkit::{MissingProgram, RunnerTarget, SharedDir};
use serde_json::json;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_works_on_a_real_cluster() {
    let kubeconfig = var("NEXUS_TEST_KUBECONFIG")
        .expect("set NEXUS_TEST_KUBECONFIG to the kubeconfig of the cluster to test against");
    let image = var("NEXUS_TEST_K8S_IMAGE").unwrap_or_else(|| "busybox:1.36".to_owned());
    let mut spec = json!({
        "namespace": var("NEXUS_TEST_K8S_NAMESPACE").unwrap_or_else(|| "default".to_owned()),
        "kubeconfig": kubeconfig,
        "image": image,
    });
    if let Some(context) = var("NEXUS_TEST_K8S_CONTEXT") {
        spec["context"] = json!(context);
    }
    let spec: KubernetesSpec = serde_json::from_value(spec).unwrap();
    let runner = KubernetesRunner::new(spec);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let run_id = format!("real-cluster-{nanos:x}");
    // Nothing is shared with the pods: only the checks that need no shared directory.
    let unused = tempfile::tempdir().unwrap();
    let target = RunnerTarget::new("kubernetes (real cluster)", &run_id, SharedDir::new(unused.path(), "/nonexistent"))
        .with_image(image)
        .with_work_dir("/tmp")
        .with_isolated_files(true)
        .with_missing_program(MissingProgram::NotFoundError)
        .with_limit(Duration::from_secs(300));
    suite::exit_codes_are_faithful(&runner, &target).await;
    suite::env_and_working_dir_are_applied(&runner, &target).await;
    suite::secrets_are_injected_and_redacted(&runner, &target).await;
    suite::outputs_are_returned(&runner, &target).await;
    suite::cancelled_before_start_runs_nothing(&runner, &target).await;
    suite::large_output_streams_in_bounded_memory(&runner, &target).await;
    suite::missing_command_is_a_clear_error(&runner, &target).await;
    runner.cleanup_run(&run_id).await.unwrap();
}
