//! The `ntfy` notifier against a local HTTP server that plays ntfy: the request it sends
//! (JSON publish, bearer token) and how answers become receipts and errors.

use std::time::Duration;

use nexus_core::model::Severity;
use nexus_core::traits::Notification;
use nexus_core::{ErrorKind, KindDescriptor};
use nexus_notify_ntfy::NtfyKind;
use nexus_testkit::http::{Receiver, Reply};
use serde_json::json;

fn notification() -> Notification {
    let mut n = Notification::new("deploy failed", "step migrate failed", Severity::Critical, "run-7");
    n.facts = vec![("Pipeline".into(), "deploy".into()), ("Environment".into(), "prod".into())];
    n.log_tail = vec!["error: relation exists".into()];
    n.link = Some("https://nexus.example/runs/7".into());
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_json_with_token_and_returns_the_message_id() {
    let server = Receiver::start().await;
    server.push(Reply::json(200, &json!({"id": "abc123", "event": "message"})));
    let notifier = KindDescriptor::of::<NtfyKind>()
        .build(json!({"server": server.url(""), "topic": "ops", "token": "tk_secret", "tags": ["nexus"]}))
        .unwrap();
    let receipt = notifier.send(&notification()).await.unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("abc123"));
    assert_eq!(receipt.dedup_key.as_deref(), Some("run-7"));
    let [request] = &server.requests()[..] else { panic!("{:?}", server.requests()) };
    let head = request.to_text();
    assert!(head.starts_with("POST /\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains("authorization: bearer tk_secret"), "{head}");
    assert_eq!(
        request.json().unwrap(),
        json!({
            "topic": "ops",
            "title": "deploy failed",
            "message": "step migrate failed\nPipeline: deploy\nEnvironment: prod\n\nlast log lines:\nerror: relation exists",
            "priority": 5,
            "tags": ["nexus", "critical"],
            "click": "https://nexus.example/runs/7",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_retryable_with_retry_after() {
    let server = Receiver::start().await;
    server.push(Reply::new(429, "slow down").header("retry-after", "12"));
    let notifier = KindDescriptor::of::<NtfyKind>().build(json!({"server": server.url(""), "topic": "ops"})).unwrap();
    let err = notifier.send(&notification()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(12)));
    assert!(err.message().contains("HTTP 429"), "{err}");
}

#[test]
fn spec_rules() {
    let d = KindDescriptor::<dyn nexus_core::traits::Notifier>::of::<NtfyKind>();
    assert!(d.validate(&d.example).is_empty(), "{:?}", d.validate(&d.example));
    let issues = d.validate(&json!({"topic": "has space", "token": "literal", "server": "ftp://x"}));
    let paths: Vec<String> = issues.iter().map(|i| i.path.join("/")).collect();
    assert_eq!(paths, ["server", "topic", "token"], "{issues:?}");
}

/// This crate built as a plugin library (its `crate-type` has `cdylib`). `cargo test`
/// does not promise the `cdylib` exists when the test runs, so the test builds it, in
/// the target directory of the plugin fixtures (not the one of the `cargo test` running
/// it, whose lock it would wait for).
fn plugin_library() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = root.join("target/plugin-fixtures");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", "nexus-notify-ntfy", "--lib", "--target-dir"])
        .arg(&target)
        .current_dir(&root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the ntfy plugin library failed");
    target.join("debug").join(format!("libnexus_notify_ntfy.{}", std::env::consts::DLL_EXTENSION))
}

/// The same crate, loaded as a plugin library: same kind, same schema, same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_the_same_loaded_as_a_plugin() {
    let path = plugin_library();
    assert!(path.exists(), "{} was not built", path.display());
    let plugin = nexus_plugin::load_library(&path).unwrap();
    assert_eq!(plugin.name, "nexus-notify-ntfy");
    let mut catalog = nexus_core::Catalog::new();
    assert!(plugin.register(&mut catalog).is_empty());
    let foreign = catalog.notifiers.get("ntfy").unwrap();
    let native = KindDescriptor::<dyn nexus_core::traits::Notifier>::of::<NtfyKind>();
    assert_eq!(foreign.spec_schema, native.spec_schema);
    assert_eq!(foreign.validate(&json!({"topic": "a b"})), native.validate(&json!({"topic": "a b"})));

    let server = Receiver::start().await;
    server.push(Reply::new(200, r#"{"id":"via-plugin"}"#));
    let notifier = foreign.build(json!({"server": server.url(""), "topic": "ops"})).unwrap();
    let receipt = notifier.send(&notification()).await.unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("via-plugin"));
    let body = server.requests()[0].json().unwrap();
    assert_eq!(body["title"], "deploy failed");
    assert_eq!(body["priority"], 5);
}
