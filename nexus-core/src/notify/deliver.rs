//! Sending one notification with retries: on timeouts, 429 (after its `Retry-After`)
//! and 5xx — whatever the notifier marks retryable — never on other errors.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::traits::{Notification, Notifier, Receipt};

/// How hard a delivery tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// Attempts in all (the first included).
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time, with ±25 % jitter.
    pub backoff: Duration,
    /// Longest wait between two attempts, `Retry-After` included.
    pub max_wait: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy { attempts: 4, backoff: Duration::from_secs(1), max_wait: Duration::from_secs(60) }
    }
}

impl DeliveryPolicy {
    /// The wait after failed attempt `n` (1-based) that ended with `error`.
    pub fn wait_after(&self, n: u32, error: &Error) -> Duration {
        if let Some(asked) = error.retry_after() {
            return asked.min(self.max_wait);
        }
        let base = self.backoff.saturating_mul(1 << (n - 1).min(16));
        let jitter = 0.75 + 0.5 * rand_unit();
        base.mul_f64(jitter).min(self.max_wait)
    }
}

/// A number in [0, 1) from the clock: enough to spread retries, no RNG dependency.
fn rand_unit() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

/// Sends `notification`, retrying what is worth retrying. Returns the receipt or the
/// last error, and the number of attempts made.
pub async fn send_with_retries(
    notifier: &dyn Notifier,
    notification: &Notification,
    policy: DeliveryPolicy,
) -> (Result<Receipt>, u32) {
    let mut n = 0;
    loop {
        n += 1;
        match notifier.send(notification).await {
            Ok(receipt) => return (Ok(receipt), n),
            Err(e) if e.is_retryable() && n < policy.attempts => {
                tokio::time::sleep(policy.wait_after(n, &e)).await;
            }
            Err(e) => return (Err(e), n),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use async_trait::async_trait;

    use super::*;
    use crate::error::ErrorKind;
    use crate::model::Severity;

    /// Answers from a script, one entry per call.
    struct Scripted(Mutex<Vec<Result<Receipt>>>);

    #[async_trait]
    impl Notifier for Scripted {
        async fn send(&self, _: &Notification) -> Result<Receipt> {
            self.0.lock().unwrap().remove(0)
        }
    }

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy { attempts: 4, backoff: Duration::from_millis(5), max_wait: Duration::from_millis(300) }
    }

    fn note() -> Notification {
        Notification::new("t", "b", Severity::Error, "k")
    }

    fn ok() -> Result<Receipt> {
        Ok(Receipt::new(Some("m-1".into()), None))
    }

    #[tokio::test]
    async fn server_errors_and_rate_limits_are_retried_honouring_retry_after() {
        let script = vec![
            Err(Error::new(ErrorKind::Unavailable, "HTTP 500")),
            Err(Error::new(ErrorKind::Unavailable, "HTTP 429").with_retry_after(Duration::from_millis(120))),
            ok(),
        ];
        let started = Instant::now();
        let (result, attempts) = send_with_retries(&Scripted(Mutex::new(script)), &note(), policy()).await;
        assert_eq!(result.unwrap().message_id.as_deref(), Some("m-1"));
        assert_eq!(attempts, 3);
        assert!(started.elapsed() >= Duration::from_millis(120), "Retry-After was not honoured");
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let script = vec![Err(Error::new(ErrorKind::InvalidConfig, "HTTP 400: invalid routing key")), ok()];
        let (result, attempts) = send_with_retries(&Scripted(Mutex::new(script)), &note(), policy()).await;
        assert_eq!(result.unwrap_err().message(), "HTTP 400: invalid routing key");
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let script = (0..5).map(|_| Err(Error::new(ErrorKind::Timeout, "timed out"))).collect();
        let (result, attempts) = send_with_retries(&Scripted(Mutex::new(script)), &note(), policy()).await;
        assert_eq!(result.unwrap_err().kind(), ErrorKind::Timeout);
        assert_eq!(attempts, 4);
    }

    #[test]
    fn waits_grow_and_are_capped() {
        let p = DeliveryPolicy { attempts: 9, backoff: Duration::from_secs(1), max_wait: Duration::from_secs(5) };
        let e = Error::new(ErrorKind::Unavailable, "x");
        let first = p.wait_after(1, &e);
        assert!(first >= Duration::from_millis(750) && first <= Duration::from_millis(1250), "{first:?}");
        assert_eq!(p.wait_after(8, &e), Duration::from_secs(5));
        let asked = e.with_retry_after(Duration::from_secs(30));
        assert_eq!(p.wait_after(1, &asked), Duration::from_secs(5));
    }
}
