//! The `ntfy` notifier against a local HTTP server that plays ntfy: the request it sends
//! (JSON publish, bearer token) and how answers become receipts and errors.

use std::time::Duration;

use nexus_core::model::Severity;
use nexus_core::traits::Notification;
use nexus_core::{ErrorKind, KindDescriptor};
use nexus_notify_ntfy::NtfyKind;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one request with `status`, `headers` and `body`; returns the request's head
/// and JSON body.
async fn serve_once(status: &str, headers: &str, body: &str) -> (String, tokio::task::JoinHandle<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let reply =
        format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}", body.len());
    let handle = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = socket.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if rest.len() >= len {
                    socket.write_all(reply.as_bytes()).await.unwrap();
                    return (head.to_owned(), serde_json::from_str(rest).unwrap());
                }
            }
            if n == 0 {
                panic!("connection closed early");
            }
        }
    });
    (url, handle)
}

fn notification() -> Notification {
    let mut n = Notification::new("deploy failed", "step migrate failed", Severity::Critical, "run-7");
    n.facts = vec![("Pipeline".into(), "deploy".into()), ("Environment".into(), "prod".into())];
    n.log_tail = vec!["error: relation exists".into()];
    n.link = Some("https://nexus.example/runs/7".into());
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_json_with_token_and_returns_the_message_id() {
    let (url, server) =
        serve_once("200 OK", "content-type: application/json\r\n", r#"{"id":"abc123","event":"message"}"#).await;
    let notifier = KindDescriptor::of::<NtfyKind>()
        .build(json!({"server": url, "topic": "ops", "token": "tk_secret", "tags": ["nexus"]}))
        .unwrap();
    let receipt = notifier.send(&notification()).await.unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("abc123"));
    assert_eq!(receipt.dedup_key.as_deref(), Some("run-7"));
    let (head, body) = server.await.unwrap();
    assert!(head.starts_with("POST / HTTP/1.1"), "{head}");
    assert!(head.to_ascii_lowercase().contains("authorization: bearer tk_secret"), "{head}");
    assert_eq!(
        body,
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
    let (url, _server) = serve_once("429 Too Many Requests", "retry-after: 12\r\n", "slow down").await;
    let notifier = KindDescriptor::of::<NtfyKind>().build(json!({"server": url, "topic": "ops"})).unwrap();
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

/// The library cargo built next to this test's rlib (`crate-type` has `cdylib`).
fn plugin_library() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(|deps| deps.parent()).unwrap();
    debug.join(format!("libnexus_notify_ntfy.{}", std::env::consts::DLL_EXTENSION))
}

/// The same crate, loaded as a plugin library: same kind, same schema, same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_the_same_loaded_as_a_plugin() {
    let path = plugin_library();
    if !path.exists() {
        eprintln!("skipped: {} was not built", path.display());
        return;
    }
    let plugin = nexus_plugin::load_library(&path).unwrap();
    assert_eq!(plugin.name, "nexus-notify-ntfy");
    let mut catalog = nexus_core::Catalog::new();
    assert!(plugin.register(&mut catalog).is_empty());
    let foreign = catalog.notifiers.get("ntfy").unwrap();
    let native = KindDescriptor::<dyn nexus_core::traits::Notifier>::of::<NtfyKind>();
    assert_eq!(foreign.spec_schema, native.spec_schema);
    assert_eq!(foreign.validate(&json!({"topic": "a b"})), native.validate(&json!({"topic": "a b"})));

    let (url, server) = serve_once("200 OK", "", r#"{"id":"via-plugin"}"#).await;
    let notifier = foreign.build(json!({"server": url, "topic": "ops"})).unwrap();
    let receipt = notifier.send(&notification()).await.unwrap();
    assert_eq!(receipt.message_id.as_deref(), Some("via-plugin"));
    let (_, body) = server.await.unwrap();
    assert_eq!(body["title"], "deploy failed");
    assert_eq!(body["priority"], 5);
}
