//! The `email` notifier against a real SMTP server (postfix's `smtp-sink`, started by
//! `scripts/test-env.d/smtp.sh`, which writes every message it gets to a file), and
//! against small scripted SMTP servers for the failures a real relay gives (refused
//! authentication, a transient refusal, no STARTTLS), and a closed port.
//!
//! The tests that need the sink are `#[ignore = "needs smtp-sink …"]` and fail loudly
//! when `NEXUS_TEST_SMTP` or `NEXUS_TEST_SMTP_DIR` is missing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nexus_core::model::Severity;
use nexus_core::traits::{Notification, Notifier};
use nexus_core::{ComponentKind, ErrorKind};
use nexus_notify_email::{EmailKind, EmailSpec};
use nexus_testkit::http::closed_address;
use nexus_testkit::notifier::{NotifierFixture, Secret, assert_error_hides, failure_notification};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const PASSWORD: &str = "smtp-pa55w0rd-s3cr3t";

/// The sink's address and message directory, from scripts/test-env.d/smtp.sh.
fn sink() -> (String, u16, PathBuf) {
    let missing = |var: &str| -> String {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: start the SMTP sink with `source scripts/test-env.d/smtp.sh` (or scripts/test-env.sh)")
        })
    };
    let address = missing("NEXUS_TEST_SMTP");
    let (host, port) = address.rsplit_once(':').expect("NEXUS_TEST_SMTP is HOST:PORT");
    let dir = PathBuf::from(missing("NEXUS_TEST_SMTP_DIR"));
    assert!(dir.is_dir(), "NEXUS_TEST_SMTP_DIR={} is not a directory", dir.display());
    (host.to_owned(), port.parse().expect("a port number"), dir)
}

/// A recipient no other test uses: how a fixture finds its own messages among all those
/// the sink wrote.
fn unique_recipient() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("ops-{}-{nanos}-{}@example.test", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn spec(host: &str, port: u16, to: &str) -> EmailSpec {
    serde_json::from_value(json!({
        "host": host, "port": port, "tls": "none", "username": "nexus", "password": PASSWORD,
        "from": "Nexus <nexus@shop.example>", "to": [to], "cc": ["Platform Leads <leads@example.test>"],
        "subject_prefix": "[nexus prod]", "timeout": "5s",
    }))
    .unwrap()
}

/// Undoes quoted-printable (soft line breaks and `=XX`), for looking into message parts
/// that lettre chose to encode so.
fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct SinkFixture {
    notifier: Arc<dyn Notifier>,
    recipient: String,
    dir: PathBuf,
}

impl SinkFixture {
    fn new() -> SinkFixture {
        let (host, port, dir) = sink();
        let recipient = unique_recipient();
        let notifier = EmailKind::build(spec(&host, port, &recipient)).unwrap();
        SinkFixture { notifier, recipient, dir }
    }
}

impl NotifierFixture for SinkFixture {
    fn notifier(&self) -> Arc<dyn Notifier> {
        self.notifier.clone()
    }

    fn unreachable(&self) -> (Arc<dyn Notifier>, String) {
        let addr = closed_address();
        (EmailKind::build(spec("127.0.0.1", addr.port(), &self.recipient)).unwrap(), addr.to_string())
    }

    fn secrets(&self) -> Vec<Secret> {
        vec![Secret::never_sent(PASSWORD)]
    }

    /// The messages to this fixture's recipient, oldest first, each followed by its
    /// quoted-printable-decoded text.
    fn captured(&self) -> Vec<String> {
        let mut messages: Vec<(SystemTime, String)> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let text = std::fs::read_to_string(entry.path()).ok()?;
                // smtp-sink writes the file as the data arrives: take it once complete.
                (text.contains(&self.recipient) && text.contains("</html>"))
                    .then(|| (entry.metadata().unwrap().modified().unwrap(), text))
            })
            .collect();
        messages.sort();
        messages.into_iter().map(|(_, text)| format!("{text}\n{}", decode_quoted_printable(&text))).collect()
    }

    fn marks_resolved(&self, delivery: &str) -> bool {
        delivery.contains("X-Nexus-Status: resolved")
    }
}

nexus_testkit::notifier_suite!(ignore = "needs smtp-sink (scripts/test-env.sh)", SinkFixture::new());

/// The error of sending the failure notification with a notifier built from `spec`.
async fn send_error(spec: EmailSpec) -> nexus_core::Error {
    EmailKind::build(spec).unwrap().send(&failure_notification()).await.unwrap_err()
}

#[tokio::test]
async fn unreachable_server_is_retryable() {
    // Needs no sink: the fixture's notifier is never used.
    let addr = closed_address();
    let err = send_error(spec("127.0.0.1", addr.port(), "ops@example.test")).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::Unavailable, true), "{err:?}");
    assert_eq!(err.operation(), "notify.send");
    assert!(err.to_string().contains(&addr.to_string()) && err.to_string().contains("email"), "{err}");
    assert_error_hides(&err, &[Secret::never_sent(PASSWORD)]);
}

/// The newest message to `fixture`'s recipient, once the sink has written it.
async fn written(fixture: &SinkFixture) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(m) = fixture.captured().pop() {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "the sink wrote no message to {}", fixture.recipient);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The part of `message` after the `Content-Type: {mime}` header line, up to the next
/// boundary.
fn part<'a>(message: &'a str, mime: &str) -> &'a str {
    let start = message.find(&format!("Content-Type: {mime}")).unwrap_or_else(|| panic!("no {mime} part:\n{message}"));
    let rest = &message[start..];
    let body = rest.find("\r\n\r\n").or_else(|| rest.find("\n\n")).unwrap();
    let rest = &rest[body..];
    &rest[..rest.find("\n--").unwrap_or(rest.len())]
}

#[tokio::test]
#[ignore = "needs smtp-sink (scripts/test-env.sh)"]
async fn the_message_on_disk_has_the_headers_and_both_parts() {
    let fixture = SinkFixture::new();
    let receipt = fixture.notifier.send(&failure_notification()).await.unwrap();
    let message_id = receipt.message_id.expect("the receipt holds the Message-ID");
    let message = written(&fixture).await;
    for header in [
        "Subject: [nexus prod] deploy-shop failed in prod".to_owned(),
        "From: Nexus <nexus@shop.example>".to_owned(),
        format!("To: {}", fixture.recipient),
        "Cc: \"Platform Leads\" <leads@example.test>".to_owned(),
        format!("Message-ID: {message_id}"),
        "X-Nexus-Dedup-Key: nexus/deploy-shop/prod".to_owned(),
        "X-Nexus-Status: firing".to_owned(),
        "MIME-Version: 1.0".to_owned(),
        "Content-Type: multipart/alternative".to_owned(),
    ] {
        assert!(message.contains(&header), "no `{header}` in:\n{message}");
    }
    let text = decode_quoted_printable(part(&message, "text/plain"));
    assert!(text.contains("Failed: deploy-shop failed in prod"), "{text}");
    assert!(text.contains("Failed step: deploy-api"), "{text}");
    assert!(text.contains("    error: readiness probe failed on pod api-7f9c"), "{text}");
    assert!(text.contains("Open the run: https://nexus.shop.example/runs/r-20261128-0001"), "{text}");
    let html = decode_quoted_printable(part(&message, "text/html"));
    assert!(
        html.contains("<th style=\"text-align: left; padding: 2px 12px 2px 0\">Failed step</th><td>deploy-api</td>"),
        "{html}"
    );
    assert!(html.contains("<pre") && html.contains("error: readiness probe failed on pod api-7f9c</pre>"), "{html}");
    assert!(html.contains("<a href=\"https://nexus.shop.example/runs/r-20261128-0001\">"), "{html}");
}

#[tokio::test]
#[ignore = "needs smtp-sink (scripts/test-env.sh)"]
async fn html_special_characters_arrive_escaped() {
    let fixture = SinkFixture::new();
    let mut n = Notification::new("deploy <shop> & co", "it failed", Severity::Critical, "k-html");
    n.log_tail = vec!["<script>alert(1)</script>".to_owned()];
    fixture.notifier.send(&n).await.unwrap();
    let message = written(&fixture).await;
    let html = decode_quoted_printable(part(&message, "text/html"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !html.contains("<script>"), "{html}");
    assert!(html.contains("Critical: deploy &lt;shop&gt; &amp; co"), "{html}");
}

/// A scripted SMTP server on 127.0.0.1:0: greets, answers EHLO with `ehlo` (the lines
/// after the first), then answers each later command with the first reply in `replies`
/// whose command prefix it starts with (`"AUTH"`, `"MAIL"`…), or `250 OK`.
async fn scripted_server(ehlo: &'static [&'static str], replies: &'static [(&'static str, &'static str)]) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 scripted.test ESMTP\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply = if upper.starts_with("EHLO") {
                        let mut reply = String::from("250-scripted.test\r\n");
                        for (i, ext) in ehlo.iter().enumerate() {
                            reply.push_str(&format!("250{}{ext}\r\n", if i + 1 == ehlo.len() { " " } else { "-" }));
                        }
                        if ehlo.is_empty() {
                            reply = "250 scripted.test\r\n".to_owned();
                        }
                        reply
                    } else if upper.starts_with("QUIT") {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        let found = replies.iter().find(|(cmd, _)| upper.starts_with(cmd));
                        format!("{}\r\n", found.map_or("250 OK", |(_, r)| r))
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn refused_authentication_is_permission_denied_and_final() {
    let port =
        scripted_server(&["AUTH PLAIN LOGIN"], &[("AUTH", "535 5.7.8 Authentication credentials invalid")]).await;
    let err = send_error(spec("127.0.0.1", port, "ops@example.test")).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::PermissionDenied, false), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("authentication") && shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert_error_hides(&err, &[Secret::never_sent(PASSWORD)]);
}

#[tokio::test]
async fn a_server_without_auth_is_a_configuration_error() {
    let port = scripted_server(&["PIPELINING"], &[]).await;
    let err = send_error(spec("127.0.0.1", port, "ops@example.test")).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::InvalidConfig, false), "{err:?}");
    assert_error_hides(&err, &[Secret::never_sent(PASSWORD)]);
}

#[tokio::test]
async fn a_transient_refusal_is_retryable() {
    let port = scripted_server(&["AUTH PLAIN LOGIN"], &[("MAIL", "451 4.3.0 Try again later")]).await;
    let err = send_error(spec("127.0.0.1", port, "ops@example.test")).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::Unavailable, true), "{err:?}");
    assert!(err.to_string().contains("transient"), "{err}");
}

#[tokio::test]
async fn a_rejected_recipient_is_final() {
    let port = scripted_server(&["AUTH PLAIN LOGIN"], &[("RCPT", "550 5.1.1 No such user")]).await;
    let err = send_error(spec("127.0.0.1", port, "ops@example.test")).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::InvalidConfig, false), "{err:?}");
}

#[tokio::test]
async fn starttls_that_the_server_does_not_offer_is_refused() {
    let port = scripted_server(&["AUTH PLAIN LOGIN"], &[]).await;
    let mut spec = spec("127.0.0.1", port, "ops@example.test");
    spec.tls = nexus_notify_email::Tls::Starttls;
    let err = send_error(spec).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::InvalidConfig, false), "{err:?}");
    assert_error_hides(&err, &[Secret::never_sent(PASSWORD)]);
}

#[tokio::test]
async fn tls_to_a_plain_text_server_is_a_configuration_error() {
    let port = scripted_server(&["AUTH PLAIN LOGIN"], &[]).await;
    let mut spec = spec("127.0.0.1", port, "ops@example.test");
    spec.tls = nexus_notify_email::Tls::Tls;
    let err = send_error(spec).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::InvalidConfig, false), "{err:?}");
    assert!(err.to_string().contains("TLS"), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_and_is_retryable() {
    // Accepts connections but never greets.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let mut spec = spec("127.0.0.1", port, "ops@example.test");
    spec.timeout = Some(nexus_core::model::Duration(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    let err = send_error(spec).await;
    assert_eq!((err.kind(), err.is_retryable()), (ErrorKind::Timeout, true), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    held.abort();
}
