//! The HTTP side shared by the notifiers that speak JSON over HTTP (`webhook`, `slack`,
//! `pagerduty`): one `reqwest` client per channel with a time limit, one attempt per
//! send, and the classification of what went wrong into a [`nexus_core::Error`] the
//! caller's retry policy understands.
//!
//! Errors name the channel kind and the receiver's host, never the URL's path or query
//! (which often carry a token) nor any header value.

use std::time::{Duration, SystemTime};

use nexus_core::{Error, ErrorKind, Result};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

/// The time limit of one request when the spec gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of a receiver's error text quoted in an error message.
const MAX_QUOTED: usize = 300;

/// The operation named in every error of a send.
pub const OPERATION: &str = "notify.send";

/// A client for one channel: its kind (for errors) and its time limit per request.
#[derive(Clone)]
pub struct HttpChannel {
    client: reqwest::Client,
    kind: &'static str,
}

/// What the receiver answered: any HTTP status, as it came.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The `Retry-After` the receiver asked for, if any (seconds or an HTTP date).
    pub retry_after: Option<Duration>,
    /// The response body, as text (lossy UTF-8).
    pub body: String,
}

impl Reply {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl HttpChannel {
    /// A client for a channel of `kind`, each request limited to `timeout` (10 s when
    /// `None`).
    pub fn new(kind: &'static str, timeout: Option<Duration>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout.unwrap_or(DEFAULT_TIMEOUT))
            .connect_timeout(timeout.unwrap_or(DEFAULT_TIMEOUT))
            .user_agent(concat!("nexus/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Internal, format!("cannot set up the HTTP client of a {kind} channel"))
                    .with_operation("notifier.build")
                    .with_context("channel", kind)
                    .with_source(e.without_url())
            })?;
        Ok(HttpChannel { client, kind })
    }

    /// Sends one request (`method` to `url` with `headers` and the JSON `body`, as
    /// `Content-Type: application/json` unless `headers` says otherwise) and returns
    /// whatever the receiver answered. A request that got no answer (refused connection,
    /// DNS failure, time limit) is a retryable error naming the host.
    pub async fn send(&self, method: reqwest::Method, url: &str, headers: HeaderMap, body: Vec<u8>) -> Result<Reply> {
        let mut headers = headers;
        if !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = self.client.request(method, url).headers(headers).body(body);
        let response = request.send().await.map_err(|e| self.transport_error(url, e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = response.bytes().await.map_err(|e| self.transport_error(url, e))?;
        Ok(Reply { status, retry_after, body: String::from_utf8_lossy(&body).into_owned() })
    }

    fn transport_error(&self, url: &str, e: reqwest::Error) -> Error {
        let host = host_of(url);
        let kind = self.kind;
        let (error_kind, what) = if e.is_timeout() {
            (ErrorKind::Timeout, "did not answer in time")
        } else if e.is_connect() {
            (ErrorKind::Unavailable, "cannot be reached (connection failed)")
        } else if e.is_builder() {
            (ErrorKind::InvalidConfig, "cannot be sent a request (the URL is not valid)")
        } else {
            (ErrorKind::Unavailable, "broke off the exchange")
        };
        let retryable = error_kind != ErrorKind::InvalidConfig;
        Error::new(error_kind, format!("the {kind} receiver at {host} {what}"))
            .set_retryable(retryable)
            .with_operation(OPERATION)
            .with_context("channel", kind)
            .with_context("host", host)
            .with_source(e.without_url())
    }

    /// The error for a reply that is not a success: 429 and 5xx are retryable (with the
    /// receiver's `Retry-After`), 408 is a retryable timeout, 401/403 are
    /// `PermissionDenied`, any other status is `InvalidConfig`; none of those but 429,
    /// 408 and 5xx is retryable. `detail` is the receiver's own error text, quoted.
    pub fn status_error(&self, url: &str, reply: &Reply, detail: &str) -> Error {
        status_error(self.kind, url, reply.status, reply.retry_after, detail)
    }
}

/// See [`HttpChannel::status_error`].
pub fn status_error(kind: &'static str, url: &str, status: u16, retry_after: Option<Duration>, detail: &str) -> Error {
    let host = host_of(url);
    let (error_kind, hint) = match status {
        429 => (ErrorKind::Unavailable, "rate limited; try again later"),
        408 => (ErrorKind::Timeout, "the receiver timed out waiting for the request"),
        500..=599 => (ErrorKind::Unavailable, "the receiver failed; try again later"),
        401 | 403 => (ErrorKind::PermissionDenied, "check the channel's credentials"),
        _ => (ErrorKind::InvalidConfig, "check the channel's settings"),
    };
    let detail = quote(detail);
    let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
    let mut err =
        Error::new(error_kind, format!("the {kind} receiver at {host} answered HTTP {status}{detail} ({hint})"))
            .set_retryable(matches!(status, 429 | 408 | 500..=599))
            .with_operation(OPERATION)
            .with_context("channel", kind)
            .with_context("host", host);
    if let Some(wait) = retry_after.filter(|_| err.is_retryable()) {
        err = err.with_retry_after(wait);
    }
    err
}

/// The error for a receiver that answered but refused the message in its own terms
/// (Slack's `{"ok": false, "error": "channel_not_found"}`): `error_kind` says what it
/// means; retryable when that kind usually is. `detail` is quoted.
pub fn refused(kind: &'static str, url: &str, error_kind: ErrorKind, detail: &str, hint: &str) -> Error {
    let host = host_of(url);
    Error::new(error_kind, format!("the {kind} receiver at {host} refused the message: {} ({hint})", quote(detail)))
        .with_operation(OPERATION)
        .with_context("channel", kind)
        .with_context("host", host)
}

/// `text` on one line, at most a few hundred characters: for quoting a receiver's error.
pub fn quote(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate_chars(&one_line, MAX_QUOTED)
}

/// `text` cut to at most `max` characters, ending with `…` when cut.
pub fn truncate_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `at` as RFC 3339 in UTC with milliseconds (`2026-11-28T09:12:39.123Z`): the
/// timestamps of the JSON documents sent.
pub fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses a `Retry-After` value: a number of seconds, or an HTTP date (a date in the past
/// gives zero). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The host (and port) of `url`, without credentials, path or query: what errors and
/// logs may show.
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_owned()
}

/// The URL's scheme and host only: many webhook URLs carry a token in their path or
/// query (`https://chat.example.com/hooks/T0K3N` becomes `https://chat.example.com/***`),
/// and credentials before the host are dropped.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let host = host_of(url);
    if rest.contains(['/', '?', '#']) { format!("{scheme}://{host}/***") } else { format!("{scheme}://{host}") }
}

/// Turns `name: value` pairs into a header map; an invalid name or value is an
/// `InvalidConfig` error naming the header (never its value).
pub fn header_map<'a>(kind: &'static str, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let invalid = |what: &str| {
            Error::new(ErrorKind::InvalidConfig, format!("header `{name}` of the {kind} channel has an invalid {what}"))
                .with_operation("notifier.build")
                .with_context("channel", kind)
        };
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("name"))?;
        let mut value = HeaderValue::from_str(value).map_err(|_| invalid("value"))?;
        value.set_sensitive(true);
        map.append(header, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(120)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn urls_show_their_host_only() {
        assert_eq!(redacted_url("https://chat.example.com/hooks/T0K3N?key=K"), "https://chat.example.com/***");
        assert_eq!(redacted_url("https://u:p@chat.example.com"), "https://chat.example.com");
        assert_eq!(redacted_url("chat.example.com/x"), "***");
        assert_eq!(host_of("http://127.0.0.1:8080/v2/enqueue"), "127.0.0.1:8080");
    }

    #[test]
    fn statuses_are_classified() {
        let url = "https://hooks.example.com/T0K3N";
        let e = status_error("webhook", url, 429, Some(Duration::from_secs(7)), "slow down");
        assert!(e.is_retryable() && e.retry_after() == Some(Duration::from_secs(7)), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let e = status_error("webhook", url, 503, None, "");
        assert!(e.is_retryable() && e.retry_after().is_none(), "{e:?}");
        let e = status_error("webhook", url, 401, Some(Duration::from_secs(7)), "bad token");
        assert!(!e.is_retryable() && e.retry_after().is_none(), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let e = status_error("webhook", url, 400, None, "{\"error\": \"invalid_payload\"}");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("invalid_payload") && !e.to_string().contains("T0K3N"), "{e}");
        assert_eq!(e.operation(), OPERATION);
    }

    #[test]
    fn quotes_are_short_and_on_one_line() {
        assert_eq!(quote("a\n  b"), "a b");
        assert_eq!(quote(&"x".repeat(1000)).chars().count(), MAX_QUOTED);
    }
}
