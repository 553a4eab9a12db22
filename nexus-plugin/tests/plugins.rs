//! The host loads the real fixture `cdylib` (built by `support/fixture.rs`): handshake,
//! schemas, create and invoke of each family, refusals, panics, runtime and cancellation;
//! and, as modules of this one test binary, the runner conformance suite
//! (`suite/conformance.rs`), log crossing (`suite/logs.rs`) and the ABI guard
//! (`suite/abi_guard.rs`).

#[path = "support/fixture.rs"]
mod fixture;

#[path = "suite/abi_guard.rs"]
mod abi_guard;
#[path = "suite/conformance.rs"]
mod conformance;
#[path = "suite/logs.rs"]
mod logs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_core::model::Severity;
use nexus_core::traits::{Event, HealthStatus, Notification, Sample};
use nexus_core::{Catalog, ErrorKind};
use nexus_plugin::{abi, load_dirs, load_library};
use serde_json::json;

fn catalog() -> Catalog {
    fixture::catalog("plain")
}

fn service(spec: serde_json::Value) -> Arc<dyn nexus_core::traits::ServiceAdapter> {
    catalog().services.get("fixture-service").unwrap().build(spec).unwrap()
}

#[test]
fn handshake_lists_kinds_versions_and_schemas() {
    let path = fixture::library("plain");
    let plugin = load_library(&path).unwrap();
    assert_eq!(plugin.name, "nexus-plugin-fixture");
    assert_eq!(plugin.abi_version, abi::ABI_VERSION);
    assert_eq!(plugin.sdk_version, abi::SDK_VERSION);
    let kinds: Vec<String> = plugin.kinds().map(|k| format!("{}:{}", k.family, k.name)).collect();
    assert_eq!(
        kinds,
        ["runner:fixture-local", "service:fixture-service", "monitor:fixture-monitor", "notifier:fixture-notifier"]
    );
    let catalog = catalog();
    let d = catalog.services.get("fixture-service").unwrap();
    assert_eq!(d.origin, path.display().to_string());
    assert_eq!(d.spec_schema["properties"]["greeting"]["type"], "string");
    assert_eq!(d.spec_schema["additionalProperties"], false);
    assert_eq!(d.actions, ["echo", "spawn", "sleep", "panic", "fail", "log"]);
    assert_eq!(d.example, json!({"greeting": "hello", "panic_on_create": false}));
    // The same schema as the statically linked kind.
    let stat = nexus_core::KindDescriptor::<dyn nexus_core::traits::ServiceAdapter>::of::<
        nexus_plugin_fixture::FixtureServiceKind,
    >();
    assert_eq!(d.spec_schema, stat.spec_schema);
    // The kind's pure validation crosses too.
    assert!(d.validate(&json!({"greeting": "hi"})).is_empty());
    let issues = d.validate(&json!({"greeting": "forbidden"}));
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].path, ["greeting"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_round_trip() {
    let s = service(json!({"greeting": "hi"}));
    let health = s.check().await.unwrap();
    assert_eq!(health.status, HealthStatus::Healthy);
    assert_eq!(health.detail, "hi from the plugin");
    assert_eq!(health.latency, Duration::from_millis(3));
    let samples = s.metrics().await.unwrap();
    assert_eq!(samples[0].name, "fixture_up");
    assert_eq!(samples[0].labels["greeting"], "hi");
    let echoed = s.invoke("echo", json!({"a": [1, 2, {"b": "é"}]})).await.unwrap();
    assert_eq!(echoed, json!({"a": [1, 2, {"b": "é"}]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let m = catalog().monitors.get("fixture-monitor").unwrap().build(json!({"file": file})).unwrap();
    let mut event = Event::new("run.failed", Severity::Error, "deploy failed");
    event.run_id = Some("r-1".into());
    event.labels.insert("team".into(), "ops".into());
    m.export_event(&event).await.unwrap();
    m.export_metrics(&[Sample::new("x", 1.0)]).await.unwrap();
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&file).unwrap().trim()).unwrap();
    assert_eq!(
        line,
        json!({"kind": "run.failed", "message": "deploy failed", "severity": "error", "run": "r-1", "labels": {"team": "ops"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifier_round_trip() {
    let n = catalog().notifiers.get("fixture-notifier").unwrap().build(json!({"prefix": "p"})).unwrap();
    let mut note = Notification::new("Deploy failed", "step build", Severity::Critical, "dedup-1");
    note.facts = vec![("Pipeline".into(), "deploy".into())];
    note.log_tail = vec!["a".into(), "b".into()];
    note.event = Some(Event::new("run.failed", Severity::Error, "x"));
    let receipt = n.send(&note).await.unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("p:Deploy failed:step build:Critical:1:a/b:run.failed"));
    assert_eq!(receipt.dedup_key.as_deref(), Some("dedup-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_round_trip() {
    let r = catalog().runners.get("fixture-local").unwrap().build(json!({})).unwrap();
    let logs = nexus_testkit::runner::CollectingSink::new();
    let task = nexus_core::traits::Task::new(
        "r",
        "s",
        1,
        nexus_core::traits::Program::Shell {
            shell: "sh".into(),
            script: "echo out; echo err >&2; echo k=v >> \"$NEXUS_OUTPUT\"; exit 3".into(),
        },
    );
    let outcome = r.run(&task, &logs, tokio_util::sync::CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.outputs["k"], "v");
    assert_eq!(logs.stdout(), ["out"]);
    assert_eq!(logs.stderr(), ["err"]);
    assert!(outcome.finished >= outcome.started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_kind_message_context_and_retry_after() {
    let err = service(json!({"greeting": "hi"})).invoke("fail", json!({})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(err.message(), "the fixture is down");
    assert_eq!(err.operation(), "fixture.fail");
    assert_eq!(err.context(), [("host", "db-1".to_owned()), ("attempt", "3".to_owned())]);
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
}

#[test]
fn config_violating_the_schema_is_refused_with_its_path_and_create_is_not_called() {
    let catalog = catalog();
    let d = catalog.services.get("fixture-service").unwrap();
    // `panic_on_create` would panic if `create` were called.
    let err = d.build(json!({"greeting": "hi", "panic_on_create": true, "port": 70000})).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.message().contains("`/port`"), "{err}");
    let err = d.build(json!({"greeting": 5, "panic_on_create": true})).err().unwrap();
    assert!(err.message().contains("`/greeting`"), "{err}");
    let err = d.build(json!({"greeting": "x", "panic_on_create": true, "colour": "red"})).err().unwrap();
    assert!(err.message().contains("colour"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_in_create_and_invoke_are_errors_and_the_host_goes_on() {
    let catalog = catalog();
    let d = catalog.services.get("fixture-service").unwrap();
    let err = d.build(json!({"greeting": "hi", "panic_on_create": true})).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.message().contains("panicked") && err.message().contains("asked to panic in create"), "{err}");

    let s = d.build(json!({"greeting": "hi"})).unwrap();
    let err = s.invoke("panic", json!({})).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.message().contains("asked to panic in invoke"), "{err}");
    // The instance is marked unusable; a fresh one works.
    let again = s.invoke("echo", json!(1)).await.unwrap_err();
    assert!(again.message().contains("unusable"), "{again}");
    let fresh = d.build(json!({"greeting": "hi"})).unwrap();
    assert_eq!(fresh.invoke("echo", json!(1)).await.unwrap(), json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_runtime_spawns_and_sleeps_and_serves_100_concurrent_calls() {
    let s = service(json!({"greeting": "hi"}));
    let calls = (0..100u64).map(|n| {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.invoke("spawn", json!({"n": n, "ms": 50})).await })
    });
    let begun = Instant::now();
    let results = futures_join_all(calls.collect()).await;
    for (n, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap().unwrap(), json!({"doubled": n * 2}));
    }
    // The 100 sleeps of 50 ms run concurrently in the plugin.
    assert!(begun.elapsed() < Duration::from_secs(3), "{:?}", begun.elapsed());
}

async fn futures_join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_timeout_cancels_the_plugin_task() {
    let s = service(json!({"greeting": "hi"}));
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("dropped");
    let r =
        tokio::time::timeout(Duration::from_millis(100), s.invoke("sleep", json!({"ms": 30_000, "marker": marker})))
            .await;
    assert!(r.is_err(), "the call should have timed out");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !marker.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(marker.exists(), "the plugin's task was not dropped when the host dropped the future");
    // The instance still works.
    assert_eq!(s.invoke("echo", json!("ok")).await.unwrap(), json!("ok"));
}

fn refusal(variant: &str) -> (std::path::PathBuf, String) {
    let (_dir, path) = fixture::plugin_dir(variant);
    let err = load_library(&path).expect_err("the library must be refused");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "the error does not name the file: {text}");
    // The library stays mapped (never unloaded) after its file is removed with `_dir`.
    (path, text)
}

#[test]
fn abi_version_mismatch_is_refused() {
    let (_, text) = refusal("bad-abi");
    assert!(text.contains(&format!("ABI version {}", abi::ABI_VERSION + 1)), "{text}");
    assert!(text.contains(&format!("this nexus speaks ABI version {}", abi::ABI_VERSION)), "{text}");
    assert!(text.contains("rebuild the plugin"), "{text}");
}

#[test]
fn bad_magic_is_refused() {
    let (_, text) = refusal("bad-magic");
    assert!(text.contains("bad magic"), "{text}");
    assert!(text.contains("rebuild"), "{text}");
}

#[test]
fn library_that_is_not_a_plugin_is_refused() {
    let (_, text) = refusal("not-a-plugin");
    assert!(text.contains("is not a Nexus plugin"), "{text}");
    assert!(text.contains("nexus_plugin_declaration"), "{text}");
    // And a file that is not a library at all.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libnotes.so");
    std::fs::write(&fake, "not a library").unwrap();
    let text = load_library(&fake).unwrap_err().to_string();
    assert!(text.contains(&fake.display().to_string()) && text.contains("cannot be loaded"), "{text}");
}

#[test]
fn sdk_major_mismatch_is_refused() {
    let (_, text) = refusal("bad-sdk");
    assert!(text.contains("nexus-plugin 99.0.0"), "{text}");
    assert!(
        text.contains(&format!("rebuild `nexus-plugin-fixture` against nexus-plugin {}", abi::SDK_VERSION)),
        "{text}"
    );
}

#[test]
fn declared_panic_abort_is_refused() {
    let (_, text) = refusal("claims-abort");
    assert!(text.contains("panic = \"abort\""), "{text}");
    assert!(text.contains("panic = \"unwind\""), "{text}");
}

/// A real `panic = "abort"` build (its own target directory: every dependency is built
/// again once, then cached).
#[test]
fn real_panic_abort_build_is_refused() {
    let (_, text) = refusal("panic-abort");
    assert!(text.contains("panic = \"abort\""), "{text}");
}

#[test]
fn directories_load_in_order_and_clashes_name_both_files() {
    let (dir_a, a) = fixture::plugin_dir("plain");
    let (dir_b, b) = fixture::plugin_dir("plain");
    let (dir_c, c) = fixture::plugin_dir("bad-abi");
    let set = load_dirs(&[dir_a.path().to_path_buf(), dir_b.path().to_path_buf(), dir_c.path().to_path_buf()]);
    assert_eq!(set.plugins.len(), 2);
    assert_eq!(set.refused.len(), 1);
    assert_eq!(set.refused[0].path, c);
    let mut catalog = Catalog::new();
    let errors = set.register(&mut catalog);
    assert_eq!(errors.len(), 4, "{errors:?}");
    let text = errors[0].to_string();
    assert!(text.contains(&a.display().to_string()) && text.contains(&b.display().to_string()), "{text}");
    // A clash with a built-in kind names the plugin file and `built-in`.
    let mut catalog = Catalog::new();
    catalog.runners.register_kind::<nexus_plugin_fixture::FixtureRunnerKind>().unwrap();
    let errors = set.plugins[0].register(&mut catalog);
    let text = errors[0].to_string();
    assert!(text.contains("built-in") && text.contains(&a.display().to_string()), "{text}");
    drop((dir_a, dir_b, dir_c));
}

#[test]
fn plugin_dirs_come_from_flags_env_and_registry_in_order() {
    use std::path::PathBuf;
    let dirs = nexus_plugin::plugin_dirs(
        &[PathBuf::from("/cli")],
        Some(std::ffi::OsStr::new("/env1:/env2::/cli")),
        &[PathBuf::from("/reg")],
    );
    assert_eq!(dirs, [PathBuf::from("/cli"), "/env1".into(), "/env2".into(), "/reg".into()]);
}
