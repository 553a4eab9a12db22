//! A step on a group of hosts (`hosts: [...]`): one attempt on every host,
//! `parallelism` at a time, with `on_partial_failure` deciding whether hosts not started
//! yet still run once one failed.
//!
//! Each host is reported to the engine as a target of the attempt
//! ([`LogSink::target`], [`LogSink::target_finished`]): it gets its own log and its own
//! record (`nexus show RUN` lists them), and its lines also appear in the attempt's log
//! prefixed `[host] `. The attempt's result combines them: exit code 0 only if every
//! host succeeded, else the exit code of the first host (in list order) that failed; a
//! summary line per host ends the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use futures_util::future::join_all;
use nexus_core::traits::{LogSink, Outcome, Stream, TargetReport, Task};
use nexus_core::{Error, ErrorKind, Result};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::PartialFailure;
use crate::runner::{SshRunner, step_error};

/// What happened on one host.
enum HostResult {
    /// Not started: an earlier host failed and `on_partial_failure` is `stop`.
    Skipped,
    Ran(Result<Outcome>),
}

impl HostResult {
    fn failed(&self) -> bool {
        match self {
            HostResult::Skipped => false,
            HostResult::Ran(Ok(outcome)) => !outcome.success(),
            HostResult::Ran(Err(_)) => true,
        }
    }

    /// What the engine records for this host.
    fn report(&self, host: &str, started: SystemTime) -> TargetReport {
        let mut report = TargetReport::exited(host, 0, started, SystemTime::now());
        report.exit_code = None;
        match self {
            HostResult::Skipped => {
                report.skipped = true;
                report.error = Some(self.summary());
            }
            HostResult::Ran(Ok(o)) => {
                (report.exit_code, report.signal) = (o.exit_code, o.signal);
                (report.started, report.finished) = (o.started, o.finished);
            }
            HostResult::Ran(Err(_)) => report.error = Some(self.summary()),
        }
        report
    }

    fn summary(&self) -> String {
        match self {
            HostResult::Skipped => "not started (on_partial_failure: stop)".to_owned(),
            HostResult::Ran(Ok(o)) => match (o.exit_code, o.signal) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "ended without an exit status".to_owned(),
            },
            HostResult::Ran(Err(e)) => format!("{}: {}", e.kind(), e.message()),
        }
    }
}

/// Runs `task` on every host of the runner's group.
pub(crate) async fn run_group(
    runner: &SshRunner,
    task: &Task,
    logs: &dyn LogSink,
    cancel: &CancellationToken,
    deadline: Option<Instant>,
) -> Result<Outcome> {
    let hosts = runner.hosts();
    if hosts.is_empty() {
        return Err(step_error(ErrorKind::InvalidConfig, task, None, "the runner names no host"));
    }
    let started = SystemTime::now();
    let permits = Semaphore::new(usize::try_from(runner.spec.parallelism.max(1)).unwrap_or(1));
    let failed = AtomicBool::new(false);
    let stop_on_failure = runner.spec.on_partial_failure == PartialFailure::Stop;

    // Tokio's semaphore is fair: hosts start in list order.
    let results = join_all(hosts.iter().map(|host| {
        let (permits, failed) = (&permits, &failed);
        async move {
            let host_started = SystemTime::now();
            let Ok(_permit) = permits.acquire().await else { return HostResult::Skipped };
            if stop_on_failure && failed.load(Ordering::SeqCst) {
                logs.target_finished(&HostResult::Skipped.report(host, host_started));
                return HostResult::Skipped;
            }
            let result = {
                let host_logs = logs.target(host);
                HostResult::Ran(runner.run_on(host, task, host_logs.as_ref(), cancel, deadline).await)
            };
            if result.failed() {
                failed.store(true, Ordering::SeqCst);
            }
            logs.target_finished(&result.report(host, host_started));
            result
        }
    }))
    .await;

    let summary: Vec<String> = hosts.iter().zip(&results).map(|(host, r)| format!("{host}: {}", r.summary())).collect();
    for line in &summary {
        logs.line(Stream::Stderr, &format!("nexus: {line}"));
    }
    let ran = results.iter().filter(|r| matches!(r, HostResult::Ran(_))).count();
    let succeeded = results.iter().filter(|r| matches!(r, HostResult::Ran(Ok(o)) if o.success())).count();

    // An interruption, then any host that could not run the step, make the attempt an error.
    let errors: Vec<&Error> =
        results.iter().filter_map(|r| if let HostResult::Ran(Err(e)) = r { Some(e) } else { None }).collect();
    let interruption = errors.iter().find(|e| matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Cancelled));
    if let Some(first) = interruption.or(errors.first()) {
        let what = format!(
            "{} on {} of {} hosts ({succeeded} succeeded): {}",
            match first.kind() {
                ErrorKind::Timeout => "timed out",
                ErrorKind::Cancelled => "cancelled",
                _ => "could not run",
            },
            if first.kind() == ErrorKind::Timeout || first.kind() == ErrorKind::Cancelled {
                errors.iter().filter(|e| e.kind() == first.kind()).count()
            } else {
                errors.len()
            },
            hosts.len(),
            summary.join("; ")
        );
        let retryable = first.is_retryable();
        return Err(step_error(first.kind(), task, None, what).set_retryable(retryable));
    }

    let mut outcome = Outcome::exited(0, started, SystemTime::now());
    // Outputs of every host, a later host in the list winning on a clash.
    for result in &results {
        if let HostResult::Ran(Ok(o)) = result {
            outcome.outputs.extend(o.outputs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    if let Some(HostResult::Ran(Ok(first_failure))) = results.iter().find(|r| r.failed()) {
        outcome.exit_code = first_failure.exit_code;
        outcome.signal = first_failure.signal;
    }
    debug_assert!(ran >= succeeded);
    Ok(outcome)
}
