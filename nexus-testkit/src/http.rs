//! A local HTTP receiver for the tests of HTTP notifiers and adapters: it listens on
//! `127.0.0.1:0`, records every request (method, path and query, headers, raw body),
//! checks each one with the test's own rules (the receiver's public API contract), and
//! answers with scripted responses.
//!
//! ```no_run
//! # async fn demo() {
//! use nexus_testkit::http::{Receiver, Reply};
//! let receiver = Receiver::start().await;
//! receiver.check(|req| if req.method == "POST" { Ok(()) } else { Err(format!("method {}", req.method)) });
//! receiver.push(Reply::new(429, "").header("Retry-After", "7"));
//! // … send to receiver.url("/hook") …
//! assert!(receiver.violations().is_empty());
//! # }
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Request {
    /// `POST`, `PUT`…
    pub method: String,
    /// The path with its query, as sent (`/v2/enqueue`).
    pub path: String,
    /// Headers in the order received, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, or an error saying why it is not JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("the body is not JSON: {e}"))
    }

    /// The whole request as text: request line, headers, blank line, body; what a test
    /// searches for text that must (or must never) be sent.
    pub fn to_text(&self) -> String {
        let mut text = format!("{} {}\n", self.method, self.path);
        for (name, value) in &self.headers {
            text.push_str(&format!("{name}: {value}\n"));
        }
        text.push('\n');
        text.push_str(&self.body_text());
        text
    }
}

/// A response the receiver answers with.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Option<Duration>,
}

impl Reply {
    /// A response with `status` and a text body.
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
            body: body.into(),
            delay: None,
        }
    }

    /// A response with `status` and a JSON body.
    pub fn json(status: u16, body: &Value) -> Self {
        Reply {
            status,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.to_string(),
            delay: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Waits `delay` before answering (for time limits).
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

type Check = Box<dyn Fn(&Request) -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct Shared {
    requests: Vec<Request>,
    violations: Vec<String>,
    scripted: VecDeque<Reply>,
    default: Option<Reply>,
    check: Option<Check>,
}

/// The receiver: see the [module](self) documentation. Stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver on `127.0.0.1:0` that answers `200 ok` until told otherwise.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the test receiver stopped");
        });
        Receiver { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `127.0.0.1:PORT`: what an error should name.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Checks every request with `check`: a request it refuses is recorded as a
    /// violation (see [`Receiver::violations`]) and answered `400` with the reason.
    pub fn check(&self, check: impl Fn(&Request) -> Result<(), String> + Send + Sync + 'static) {
        self.shared.lock().unwrap().check = Some(Box::new(check));
    }

    /// Queues `reply` for the next request not answered by an earlier queued reply.
    pub fn push(&self, reply: Reply) {
        self.shared.lock().unwrap().scripted.push_back(reply);
    }

    /// Answers `reply` once the queued replies are used up (instead of `200 ok`).
    pub fn answer(&self, reply: Reply) {
        self.shared.lock().unwrap().default = Some(reply);
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Every request so far as text ([`Request::to_text`]), oldest first, for a
    /// notifier fixture's `captured`; panics if the check refused any request.
    pub fn deliveries(&self) -> Vec<String> {
        let violations = self.violations();
        assert!(violations.is_empty(), "the receiver refused requests: {violations:#?}");
        self.requests().iter().map(Request::to_text).collect()
    }

    /// The reasons the check refused requests, oldest first.
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().unwrap().violations.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Request {
        method: method.to_string(),
        path: uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: body.to_vec(),
    };
    let reply = {
        let mut shared = shared.lock().unwrap();
        let verdict = shared.check.as_ref().map_or(Ok(()), |check| check(&request));
        shared.requests.push(request);
        match verdict {
            Err(reason) => {
                shared.violations.push(reason.clone());
                Reply::new(400, format!("request refused by the test receiver: {reason}"))
            }
            Ok(()) => {
                shared.scripted.pop_front().or_else(|| shared.default.clone()).unwrap_or_else(|| Reply::new(200, "ok"))
            }
        }
    };
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = (StatusCode::from_u16(reply.status).expect("a valid status"), reply.body).into_response();
    for (name, value) in reply.headers {
        let name = axum::http::HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
        response.headers_mut().insert(name, value.parse().expect("a valid header value"));
    }
    response
}

/// An address on 127.0.0.1 where nothing listens (a port bound then released): for
/// "receiver unreachable" tests.
pub fn closed_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(url: &str, body: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn records_checks_and_answers_scripted_replies() {
        let receiver = Receiver::start().await;
        receiver.check(|req| if req.json().is_ok() { Ok(()) } else { Err("not JSON".to_owned()) });
        receiver.push(Reply::new(429, "slow down").header("Retry-After", "7"));
        let (status, head, _) = post(&receiver.url("/hook?x=1"), "{}").await;
        assert_eq!(status, 429);
        assert!(head.to_ascii_lowercase().contains("retry-after: 7"), "{head}");
        let (status, _, body) = post(&receiver.url("/hook"), "{}").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
        let (status, _, body) = post(&receiver.url("/hook"), "nope").await;
        assert_eq!(status, 400);
        assert!(body.contains("not JSON"), "{body}");
        let requests = receiver.requests();
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].path, "/hook?x=1");
        assert_eq!(requests[0].header("Content-Type"), Some("application/json"));
        assert_eq!(receiver.violations(), ["not JSON"]);
    }
}
