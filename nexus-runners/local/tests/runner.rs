//! The local runner against real processes.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_core::traits::{LogSink, Outcome, Program, Runner, SecretValue, Stream, Task};
use nexus_core::{Catalog, ErrorKind, Result};
use nexus_runner_local::{LOCAL_KIND, MAX_LINE_BYTES, register_local_runner};
use serde_json::json;
use tokio_util::sync::CancellationToken;

type OnLine = Box<dyn Fn(&str) + Send + Sync>;

/// Collects every line, and calls `on_line` for each as it arrives.
#[derive(Default)]
struct Logs {
    lines: Mutex<Vec<(Stream, String)>>,
    on_line: Option<OnLine>,
}

impl Logs {
    fn calling(on_line: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Logs { lines: Mutex::default(), on_line: Some(Box::new(on_line)) }
    }
    fn of(&self, stream: Stream) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|(s, _)| *s == stream).map(|(_, l)| l.clone()).collect()
    }
    fn stdout(&self) -> Vec<String> {
        self.of(Stream::Stdout)
    }
    fn first_pid(&self) -> Option<i32> {
        self.stdout().iter().find_map(|l| l.strip_prefix("pid=")?.parse().ok())
    }
}

impl LogSink for Logs {
    fn line(&self, stream: Stream, line: &str) {
        self.lines.lock().unwrap().push((stream, line.to_owned()));
        if let Some(on_line) = &self.on_line {
            on_line(line);
        }
    }
}

/// A local runner built through the catalog, as the engine builds it.
fn runner(spec: serde_json::Value) -> Arc<dyn Runner> {
    let mut catalog = Catalog::new();
    register_local_runner(&mut catalog).unwrap();
    let kind = catalog.runners.get(LOCAL_KIND).unwrap();
    assert!(kind.validate(&spec).is_empty(), "{:?}", kind.validate(&spec));
    kind.build(spec).unwrap()
}

fn shell(script: &str) -> Task {
    Task::new("run-1", "build", 1, Program::Shell { shell: "sh".into(), script: script.into() })
}

async fn run(runner: &dyn Runner, task: &Task, logs: &Logs) -> Result<Outcome> {
    runner.run(task, logs, CancellationToken::new()).await
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held.
async fn eventually(limit: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether process `pid` no longer runs (gone, or a zombie waiting to be reaped).
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test]
async fn streams_lines_in_order_while_the_process_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("seen");
    let seen = marker.clone();
    // The script waits (up to 10 s) for a file the sink creates when it receives `ready`:
    // it can only finish if `ready` reached the sink while it was still running.
    let logs = Logs::calling(move |line| {
        if line == "ready" {
            std::fs::write(&seen, b"").unwrap();
        }
    });
    let script = format!(
        r#"i=1; while [ $i -le 200 ]; do echo $i; i=$((i+1)); done
        for e in e1 e2 e3; do echo $e >&2; done
        echo ready
        n=0; while [ ! -e '{}' ]; do n=$((n+1)); [ $n -gt 1000 ] && exit 3; sleep 0.01; done
        printf 'done'"#,
        marker.display()
    );
    let outcome = run(&*runner(json!({})), &shell(&script), &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.lines);
    let mut expected: Vec<String> = (1..=200).map(|i| i.to_string()).collect();
    expected.extend(["ready".to_owned(), "done".to_owned()]);
    assert_eq!(logs.stdout(), expected);
    assert_eq!(logs.of(Stream::Stderr), ["e1", "e2", "e3"]);
    assert!(outcome.started <= outcome.finished);
}

#[tokio::test]
async fn long_lines_are_split() {
    let logs = Logs::default();
    let script = "head -c 150000 /dev/zero | tr '\\0' x; echo; echo after";
    run(&*runner(json!({})), &shell(script), &logs).await.unwrap();
    let lengths: Vec<usize> = logs.stdout().iter().map(String::len).collect();
    assert_eq!(lengths, [MAX_LINE_BYTES, MAX_LINE_BYTES, 150_000 - 2 * MAX_LINE_BYTES, 5]);
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported_faithfully() {
    let local = runner(json!({}));
    let logs = Logs::default();
    let ok = run(&*local, &shell("exit 0"), &logs).await.unwrap();
    assert!(ok.success());
    assert_eq!((ok.exit_code, ok.signal), (Some(0), None));

    let failed = run(&*local, &shell("echo failing >&2; exit 1"), &logs).await.unwrap();
    assert!(!failed.success());
    assert_eq!((failed.exit_code, failed.signal), (Some(1), None));

    // The main process itself killed by SIGKILL: no exit code, signal 9.
    let killed = run(&*local, &shell("kill -9 $$"), &logs).await.unwrap();
    assert_eq!((killed.exit_code, killed.signal), (None, Some(9)));
    assert!(!killed.success());

    // A shell whose child was killed by SIGKILL exits with 128 + 9.
    let nested = run(&*local, &shell("sh -c 'kill -9 $$'"), &logs).await.unwrap();
    assert_eq!((nested.exit_code, nested.signal), (Some(137), None));
}

#[tokio::test]
async fn env_and_working_dir() {
    let base = tempfile::tempdir().unwrap();
    std::fs::create_dir(base.path().join("sub")).unwrap();
    let local = runner(json!({
        "working_dir": base.path(),
        "env": {"FROM_SPEC": "spec", "OVERRIDDEN": "spec"},
    }));
    let mut task =
        shell(r#"echo "$FROM_SPEC $FROM_TASK $OVERRIDDEN $NEXUS_RUN_ID $NEXUS_STEP_ID $NEXUS_ATTEMPT"; pwd -P"#);
    task.env = vec![("FROM_TASK".into(), "task".into()), ("OVERRIDDEN".into(), "task".into())];
    let logs = Logs::default();
    run(&*local, &task, &logs).await.unwrap();
    let canonical = |p: &Path| p.canonicalize().unwrap().display().to_string();
    assert_eq!(logs.stdout(), ["spec task task run-1 build 1".to_owned(), canonical(base.path())]);

    // A relative working directory is resolved against the spec's; an absolute one is kept.
    let logs = Logs::default();
    task.working_dir = Some("sub".into());
    run(&*local, &task, &logs).await.unwrap();
    assert_eq!(logs.stdout()[1], canonical(&base.path().join("sub")));
    let other = tempfile::tempdir().unwrap();
    let logs = Logs::default();
    task.working_dir = Some(other.path().display().to_string());
    run(&*local, &task, &logs).await.unwrap();
    assert_eq!(logs.stdout()[1], canonical(other.path()));
}

#[tokio::test]
async fn without_inherit_env_only_declared_variables_are_set() {
    let local = runner(json!({"inherit_env": false, "env": {"FROM_SPEC": "spec"}}));
    let mut task = Task::new("run-1", "env", 2, Program::Argv(vec!["/usr/bin/env".into()]));
    task.env = vec![("FROM_TASK".into(), "task".into())];
    task.secrets = vec![("TOKEN".into(), SecretValue::new("t"))];
    let logs = Logs::default();
    run(&*local, &task, &logs).await.unwrap();
    let mut names: Vec<String> = logs.stdout().iter().map(|l| l.split('=').next().unwrap().to_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        ["FROM_SPEC", "FROM_TASK", "NEXUS_ATTEMPT", "NEXUS_OUTPUT", "NEXUS_RUN_ID", "NEXUS_STEP_ID", "TOKEN"]
    );
}

#[tokio::test]
async fn secrets_are_readable_by_the_command() {
    let mut task = shell(r#"[ "$DB_PASSWORD" = 's3cr3t value' ] && echo matches"#);
    task.secrets = vec![("DB_PASSWORD".into(), SecretValue::new("s3cr3t value"))];
    let logs = Logs::default();
    let outcome = run(&*runner(json!({})), &task, &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(logs.stdout(), ["matches"]);
}

#[tokio::test]
async fn outputs_file_is_parsed_then_deleted() {
    let script = r#"
        echo "image=registry.example.com/api:1.4" >> "$NEXUS_OUTPUT"
        echo "url=http://api/?a=b" >> "$NEXUS_OUTPUT"
        printf 'notes<<EOF\nfirst\nsecond\nEOF\n' >> "$NEXUS_OUTPUT"
        echo "not an output" >> "$NEXUS_OUTPUT"
        echo "$NEXUS_OUTPUT"
    "#;
    let logs = Logs::default();
    let outcome = run(&*runner(json!({})), &shell(script), &logs).await.unwrap();
    assert_eq!(outcome.outputs["image"], "registry.example.com/api:1.4");
    assert_eq!(outcome.outputs["url"], "http://api/?a=b");
    assert_eq!(outcome.outputs["notes"], "first\nsecond");
    assert_eq!(outcome.outputs.len(), 3);
    let path = &logs.stdout()[0];
    assert!(!Path::new(path).exists(), "{path} was not deleted");
    let notes = logs.of(Stream::Stderr);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].starts_with("nexus: $NEXUS_OUTPUT line 7"), "{notes:?}");
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let local = runner(json!({"kill_grace": "2s"}));
    let mut task = shell("sleep 30 & echo pid=$!; sleep 30");
    task.timeout = Some(Duration::from_millis(300));
    let logs = Logs::default();
    let begun = Instant::now();
    let err = run(&*local, &task, &logs).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(10), "took {:?}", begun.elapsed());
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.message().contains("step `build`") && err.message().contains("timed out after 300ms"), "{err}");
    assert!(err.message().contains("SIGTERM"), "{err}");
    let grandchild = logs.first_pid().expect("the script printed its background pid");
    assert!(eventually(Duration::from_secs(5), || is_gone(grandchild)).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn processes_ignoring_sigterm_are_killed_after_the_grace_period() {
    let local = runner(json!({"kill_grace": "300ms"}));
    // An ignored signal stays ignored across exec, so `sleep` ignores SIGTERM too.
    let mut task = shell("trap '' TERM; sleep 30 & echo pid=$!; sleep 30");
    task.timeout = Some(Duration::from_millis(200));
    let logs = Logs::default();
    let begun = Instant::now();
    let err = run(&*local, &task, &logs).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(10), "took {:?}", begun.elapsed());
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.message().contains("SIGKILL after a 300ms grace period"), "{err}");
    let grandchild = logs.first_pid().unwrap();
    assert!(eventually(Duration::from_secs(5), || is_gone(grandchild)).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn cancel_stops_the_attempt() {
    let token = CancellationToken::new();
    let canceller = token.clone();
    let logs = Logs::calling(move |line| {
        if line.starts_with("pid=") {
            canceller.cancel();
        }
    });
    let begun = Instant::now();
    let err = runner(json!({})).run(&shell("sleep 30 & echo pid=$!; sleep 30"), &logs, token).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(10), "took {:?}", begun.elapsed());
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert!(!err.is_retryable());
    assert!(err.message().contains("step `build`"), "{err}");
    let grandchild = logs.first_pid().unwrap();
    assert!(eventually(Duration::from_secs(5), || is_gone(grandchild)).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn cancelled_before_start_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let token = CancellationToken::new();
    token.cancel();
    let logs = Logs::default();
    let err = runner(json!({})).run(&shell(&format!("touch '{}'", marker.display())), &logs, token).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert!(!marker.exists());
}

#[tokio::test]
async fn processes_left_behind_are_stopped_when_the_step_exits() {
    let local = runner(json!({"kill_grace": "2s"}));
    let logs = Logs::default();
    // One keeps the output pipe open, the other does not.
    let script = "sleep 30 & echo pid=$!; sleep 31 >/dev/null 2>&1 & echo pid2=$!";
    let outcome = run(&*local, &shell(script), &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    let first = logs.first_pid().unwrap();
    let second: i32 = logs.stdout().iter().find_map(|l| l.strip_prefix("pid2=")?.parse().ok()).unwrap();
    assert!(eventually(Duration::from_secs(5), || is_gone(first) && is_gone(second)).await);
}

#[tokio::test]
async fn dropping_the_attempt_kills_its_processes() {
    let local = runner(json!({}));
    let logs = Logs::default();
    let task = shell("sleep 30 & echo pid=$!; sleep 30");
    let printed = async {
        assert!(eventually(Duration::from_secs(10), || logs.first_pid().is_some()).await);
    };
    tokio::select! {
        _ = run(&*local, &task, &logs) => panic!("the attempt finished on its own"),
        () = printed => {}
    }
    // The attempt's future is dropped here, as when the engine abandons it.
    let grandchild = logs.first_pid().unwrap();
    assert!(eventually(Duration::from_secs(5), || is_gone(grandchild)).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn missing_program_shell_or_directory_is_not_found() {
    let logs = Logs::default();
    let task = Task::new("run-1", "deploy", 1, Program::Argv(vec!["nexus-no-such-program".into(), "--help".into()]));
    let err = run(&*runner(json!({})), &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.message().contains("program `nexus-no-such-program` not found"), "{err}");
    assert!(err.message().contains("step `deploy`"), "{err}");

    let task =
        Task::new("run-1", "deploy", 1, Program::Shell { shell: "nexus-no-such-shell".into(), script: "true".into() });
    let err = run(&*runner(json!({})), &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.message().contains("`nexus-no-such-shell`"), "{err}");

    let mut task = shell("true");
    task.working_dir = Some("/nonexistent/nexus/dir".into());
    let err = run(&*runner(json!({})), &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.message().contains("working directory `/nonexistent/nexus/dir`"), "{err}");
}

#[tokio::test]
async fn an_empty_task_shell_uses_the_spec_shell() {
    let local = runner(json!({"shell": "bash"}));
    let task =
        Task::new("run-1", "build", 1, Program::Shell { shell: String::new(), script: "echo $BASH_VERSION".into() });
    let logs = Logs::default();
    run(&*local, &task, &logs).await.unwrap();
    assert!(!logs.stdout()[0].is_empty(), "not run by bash: {:?}", logs.stdout());
}
