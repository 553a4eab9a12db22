//! A step on a group of SSH hosts, through the real `nexus` binary: each host is
//! recorded as its own attempt with its own log.
//!
//! Needs the test sshd: `source scripts/test-env.d/sshd.sh` (the README's test command
//! does it), which exports the `NEXUS_TEST_SSH_*` variables read here.

mod common;

use common::{nexus, write};

use serde_json::Value;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run `source scripts/test-env.d/sshd.sh` first"))
}

#[test]
#[ignore = "needs sshd (scripts/test-env.d/sshd.sh)"]
fn each_host_of_a_group_is_its_own_attempt_with_its_own_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, state) = (tmp.path().join("ssot"), tmp.path().join("state"));
    std::fs::create_dir_all(&config).unwrap();
    let flag = tmp.path().join("first-host-ran");
    write(&config, "automation_registry.yaml", "version: 1\n");
    write(&config, "security_registry.yaml", "version: 1\n");
    write(&config, "monitoring_registry.yaml", "version: 1\n");
    write(
        &config,
        "orchestration_registry.yaml",
        &format!(
            r#"version: 1
defaults: {{environment: test, pipeline: fleet}}
environments:
  test: {{}}
runners:
  fleet:
    kind: ssh
    spec:
      hosts: ["{host}", localhost]
      port: {port}
      user: {user}
      identity_file: {key}
      known_hosts_file: {known}
      parallelism: 1
      on_partial_failure: continue
"#,
            host = var("NEXUS_TEST_SSH_HOST"),
            port = var("NEXUS_TEST_SSH_PORT"),
            user = var("NEXUS_TEST_SSH_USER"),
            key = var("NEXUS_TEST_SSH_KEY"),
            known = var("NEXUS_TEST_SSH_KNOWN_HOSTS"),
        ),
    );
    // Both host names reach the same server: the first to run fails, the second passes.
    write(
        &config,
        "pipeline_registry.yaml",
        &format!(
            r#"version: 1
pipelines:
  fleet:
    description: One step on two hosts.
    steps:
      - id: upgrade
        runner: fleet
        run:
          command: if mkdir {flag} 2>/dev/null; then echo "upgrading failed here"; exit 4; else echo "upgraded"; rmdir {flag}; fi
"#,
            flag = flag.display()
        ),
    );
    let (code, _, stderr) = nexus(&config, &state, &["run"]);
    assert_eq!(code, 1, "{stderr}");
    let (_, runs, _) = nexus(&config, &state, &["runs", "--output", "json"]);
    let runs: Value = serde_json::from_str(&runs).unwrap();
    let run = runs[0]["id"].as_str().unwrap().to_owned();
    let (_, show, _) = nexus(&config, &state, &["show", &run, "--output", "json"]);
    let show: Value = serde_json::from_str(&show).unwrap();
    let targets = show["targets"].as_array().unwrap();
    let summary: Vec<(String, Value, String)> = targets
        .iter()
        .map(|t| (t["target"].as_str().unwrap().to_owned(), t["exit_code"].clone(), t["status"].to_string()))
        .collect();
    let host = var("NEXUS_TEST_SSH_HOST");
    assert_eq!(
        summary,
        [
            (host.clone(), Value::from(4), "\"failed\"".to_owned()),
            ("localhost".to_owned(), Value::from(0), "\"succeeded\"".to_owned())
        ]
    );
    let log = |i: usize| std::fs::read_to_string(state.join(targets[i]["log_path"].as_str().unwrap())).unwrap();
    assert!(log(0).ends_with(" out upgrading failed here\n"), "{}", log(0));
    assert!(log(1).ends_with(" out upgraded\n"), "{}", log(1));
    let (_, text, _) = nexus(&config, &state, &["show", &run]);
    assert!(text.contains("localhost") && text.contains("succeeded") && text.contains("exit 4"), "{text}");
    // The attempt's own log has every host's lines, prefixed.
    let (_, logs, _) = nexus(&config, &state, &["logs", &run, "upgrade"]);
    assert!(
        logs.contains(&format!("[{host}] upgrading failed here")) && logs.contains("[localhost] upgraded"),
        "{logs}"
    );
}
