//! Notifications end to end through the real `nexus` binary: a failing pipeline whose
//! step retries three times, then a successful run, against local receivers that check
//! each request as PagerDuty's Events API v2 and the webhook contract document it.
//!
//! The receivers run on a tokio runtime owned by the test; `nexus` is a child process.

mod common;

use std::path::Path;

use common::{nexus, write};

use nexus_testkit::http::{Receiver, Reply};
use serde_json::Value;

/// The secret the failing step prints; it must reach no receiver.
const DB_PASSWORD: &str = "s3cr3t-db-pw-7f2e";
const ROUTING_KEY: &str = "R0UT1NGKEY0000000000000000000001";

/// Registries: `deploy` fails (after 3 retries) unless `outcome` is `pass`; two routes.
fn config(dir: &Path, pagerduty_url: &str, webhook_url: &str) {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    write(&secrets, "db", DB_PASSWORD);
    write(&secrets, "pd", ROUTING_KEY);
    write(&secrets, "hook", "whsec-test-key");
    write(dir, "automation_registry.yaml", "version: 1\n");
    write(
        dir,
        "orchestration_registry.yaml",
        "version: 1\ndefaults:\n  environment: prod\n  pipeline: deploy\nenvironments:\n  prod:\n    labels: {criticality: high}\nrunners:\n  local:\n    kind: local\n",
    );
    write(
        dir,
        "pipeline_registry.yaml",
        r#"version: 1
pipelines:
  deploy:
    description: Fails unless outcome is pass; its step retries three times first.
    params:
      outcome: {type: string, default: fail}
    steps:
      - id: migrate
        secrets: [db_password]
        retry:
          attempts: 4
          backoff: 10ms
        run:
          command: echo "connecting with password $DB_PASSWORD"; echo "migration 42 failed" >&2; test "{{ params.outcome }}" = "pass"
        rollback:
          run:
            command: echo "migration 42 reverted"
"#,
    );
    let security = format!(
        "version: 1\nsecrets:\n  db_password:\n    file: {}\n  pagerduty_key:\n    file: {}\n  hook_key:\n    file: {}\n",
        secrets.join("db").display(),
        secrets.join("pd").display(),
        secrets.join("hook").display()
    );
    write(dir, "security_registry.yaml", &security);
    let monitoring = format!(
        r#"version: 1
channels:
  oncall:
    kind: pagerduty
    spec:
      routing_key: "{{{{ secrets.pagerduty_key }}}}"
      events_url: {pagerduty_url}
  audit:
    kind: webhook
    spec:
      url: {webhook_url}
      signing_secret: "{{{{ secrets.hook_key }}}}"
routes:
  - name: page
    match:
      events: [run.failed, run.recovered]
      labels: {{criticality: high}}
    channels: [oncall]
    continue: true
  - name: audit
    match:
      events: [run.failed, run.recovered, step.failed, step.retrying, step.rolled-back]
    channels: [audit]
    dedup_window: 1m
"#
    );
    write(dir, "monitoring_registry.yaml", &monitoring);
}

/// PagerDuty Events API v2, as documented: POST /v2/enqueue, JSON, routing_key of 32
/// characters, event_action trigger|acknowledge|resolve, dedup_key; a trigger carries
/// payload.summary, payload.source and payload.severity (critical|error|warning|info).
fn check_pagerduty(req: &nexus_testkit::http::Request) -> Result<(), String> {
    if req.method != "POST" || req.path != "/v2/enqueue" {
        return Err(format!("{} {}", req.method, req.path));
    }
    if !req.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
        return Err("Content-Type is not application/json".into());
    }
    let body = req.json()?;
    if body["routing_key"].as_str().is_none_or(|k| k.len() != 32) {
        return Err("routing_key is not 32 characters".into());
    }
    let action = body["event_action"].as_str().unwrap_or_default();
    if !["trigger", "acknowledge", "resolve"].contains(&action) {
        return Err(format!("event_action `{action}`"));
    }
    if body["dedup_key"].as_str().is_none_or(str::is_empty) {
        return Err("no dedup_key".into());
    }
    if action == "trigger" {
        let p = &body["payload"];
        for field in ["summary", "source"] {
            if p[field].as_str().is_none_or(str::is_empty) {
                return Err(format!("no payload.{field}"));
            }
        }
        if !["critical", "error", "warning", "info"].contains(&p["severity"].as_str().unwrap_or_default()) {
            return Err(format!("payload.severity {}", p["severity"]));
        }
    }
    Ok(())
}

/// Two receivers (PagerDuty, checked against its contract; the webhook), scripted by
/// `script`, and a config directory pointing at them.
struct World {
    _rt: tokio::runtime::Runtime,
    pagerduty: Receiver,
    webhook: Receiver,
    _tmp: tempfile::TempDir,
    config: std::path::PathBuf,
    state: std::path::PathBuf,
}

fn world(script: impl FnOnce(&Receiver, &Receiver)) -> World {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (pagerduty, webhook) = rt.block_on(async { (Receiver::start().await, Receiver::start().await) });
    pagerduty.check(check_pagerduty);
    script(&pagerduty, &webhook);
    let tmp = tempfile::tempdir().unwrap();
    let (config_dir, state) = (tmp.path().join("ssot"), tmp.path().join("state"));
    std::fs::create_dir_all(&config_dir).unwrap();
    config(&config_dir, &pagerduty.url("/v2/enqueue"), &webhook.url("/hooks/nexus"));
    World { _rt: rt, pagerduty, webhook, _tmp: tmp, config: config_dir, state }
}

fn pagerduty_accepts() -> Reply {
    Reply::json(202, &serde_json::json!({"status": "success", "message": "Event processed", "dedup_key": "x"}))
}

#[test]
fn a_failing_run_alerts_once_per_route_and_the_next_success_resolves_it() {
    let w = world(|pagerduty, webhook| {
        pagerduty.answer(pagerduty_accepts());
        webhook.answer(Reply::new(200, "ok"));
    });
    let (pagerduty, webhook, config_dir, state) = (&w.pagerduty, &w.webhook, &w.config, &w.state);

    let (code, _, stderr) = nexus(config_dir, state, &["validate"]);
    assert_eq!(code, 0, "{stderr}");

    // 1. The failing run: 4 attempts, then the run fails.
    let (code, _, stderr) = nexus(config_dir, state, &["run"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("notified oncall of run.failed (route page)"), "{stderr}");
    assert!(stderr.contains("notified audit of step.retrying (route audit)"), "{stderr}");
    let triggers = pagerduty.requests();
    assert_eq!(triggers.len(), 1, "one page per failing run: {triggers:#?}");
    let trigger = triggers[0].json().unwrap();
    assert_eq!(trigger["event_action"], "trigger");
    assert_eq!(trigger["routing_key"], ROUTING_KEY);
    let dedup_key = trigger["dedup_key"].as_str().unwrap().to_owned();
    assert_eq!(dedup_key, "nexus/deploy/prod");
    assert_eq!(trigger["payload"]["severity"], "error");
    let hooks = webhook.requests();
    assert_eq!(hooks.len(), 1, "three retries and a failure are one webhook message: {hooks:#?}");
    let hook = hooks[0].json().unwrap();
    // The log tail is in the message, with the step's secret redacted.
    let tail = hook["log_tail"].to_string();
    assert!(tail.contains("connecting with password ***"), "{hook:#}");

    // 2. The next run succeeds: a recovery on both routes; PagerDuty resolves the
    // incident with the same dedup_key.
    let (code, _, stderr) = nexus(config_dir, state, &["run", "--param", "outcome=pass"]);
    assert_eq!(code, 0, "{stderr}");
    let pd = pagerduty.requests();
    assert_eq!(pd.len(), 2, "{pd:#?}");
    let resolve = pd[1].json().unwrap();
    assert_eq!(resolve["event_action"], "resolve");
    assert_eq!(resolve["dedup_key"], dedup_key.as_str());
    let hooks = webhook.requests();
    assert_eq!(hooks.len(), 2);
    assert_eq!(hooks[1].json().unwrap()["type"], "run.recovered");

    // `nexus rollback` of the successful run is routed too.
    let (_, runs, _) = nexus(config_dir, state, &["runs", "--status", "succeeded", "--output", "json"]);
    let runs: Value = serde_json::from_str(&runs).unwrap();
    let (code, _, stderr) = nexus(config_dir, state, &["rollback", runs[0]["id"].as_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("notified audit of step.rolled-back (route audit)"), "{stderr}");
    let hooks = webhook.requests();
    assert_eq!(hooks.len(), 3);
    assert_eq!(hooks[2].json().unwrap()["type"], "step.rolled-back");

    // The contract held for every request, and the secret reached no receiver.
    assert!(pagerduty.violations().is_empty(), "{:?}", pagerduty.violations());
    for req in pagerduty.requests().iter().chain(webhook.requests().iter()) {
        assert!(!req.to_text().contains(DB_PASSWORD), "secret delivered: {}", req.to_text());
    }

    // `nexus show` lists the deliveries of the failing run: sent, and the grouped ones.
    let (_, runs, _) = nexus(config_dir, state, &["runs", "--output", "json"]);
    let runs: Value = serde_json::from_str(&runs).unwrap();
    let failed_run = runs.as_array().unwrap().iter().find(|r| r["status"] == "failed").unwrap()["id"].clone();
    let (_, show, _) = nexus(config_dir, state, &["show", failed_run.as_str().unwrap(), "--output", "json"]);
    let show: Value = serde_json::from_str(&show).unwrap();
    let deliveries = show["notifications"].as_array().unwrap();
    let sent = deliveries.iter().filter(|d| d["status"] == "sent").count();
    let suppressed = deliveries.iter().filter(|d| d["status"] == "suppressed").count();
    assert_eq!((sent, suppressed), (2, 4), "{deliveries:#?}");
    let (_, text, _) = nexus(config_dir, state, &["show", failed_run.as_str().unwrap()]);
    assert!(text.contains("notifications:") && text.contains("grouped into delivery #"), "{text}");
}

#[test]
fn a_failed_delivery_is_retried_then_reported_without_failing_the_run() {
    let w = world(|pagerduty, webhook| {
        // 500, then 429 with Retry-After: 1, then accepted.
        pagerduty.push(Reply::new(500, "oops"));
        pagerduty.push(Reply::new(429, "slow down").header("Retry-After", "1"));
        pagerduty.answer(pagerduty_accepts());
        webhook.answer(Reply::new(400, "no such hook"));
    });
    let (pagerduty, webhook, config_dir, state) = (&w.pagerduty, &w.webhook, &w.config, &w.state);

    let started = std::time::Instant::now();
    let (code, _, stderr) = nexus(config_dir, state, &["run"]);
    // The run's own verdict (failed: its step failed), not the notifications'.
    assert_eq!(code, 1, "{stderr}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "Retry-After was not honoured");
    assert_eq!(pagerduty.requests().len(), 3, "500 and 429 are retried");
    assert_eq!(webhook.requests().len(), 1, "a 400 is not retried");
    assert!(stderr.contains("warning: could not notify audit of step.retrying after 1 attempt(s)"), "{stderr}");
    assert!(stderr.contains("notified oncall of run.failed"), "{stderr}");

    // A successful run is not failed by a dead channel either.
    let (code, _, stderr) = nexus(config_dir, state, &["run", "--param", "outcome=pass"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn notify_test_reports_the_receipt_or_the_exact_error() {
    let w = world(|pagerduty, webhook| {
        pagerduty.answer(pagerduty_accepts());
        webhook.answer(Reply::new(403, "forbidden: bad signature"));
    });
    let (pagerduty, config_dir, state) = (&w.pagerduty, &w.config, &w.state);

    let (code, stdout, stderr) = nexus(config_dir, state, &["notify", "test", "oncall"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("sent a test message to `oncall` (pagerduty)"), "{stdout}");
    assert_eq!(pagerduty.requests().len(), 1);
    assert!(pagerduty.violations().is_empty(), "{:?}", pagerduty.violations());

    let (code, _, stderr) = nexus(config_dir, state, &["notify", "test", "audit"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("the test message to `audit` was not delivered") && stderr.contains("403"), "{stderr}");
    assert!(!stderr.contains("whsec-test-key"), "{stderr}");

    let (code, _, stderr) = nexus(config_dir, state, &["notify", "test", "audti"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("did you mean `audit`?"), "{stderr}");
}
