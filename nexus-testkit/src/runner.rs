//! The runner conformance suite: one `pub async fn` per behaviour of the [`Runner`]
//! trait, run by every runner kind's tests against its own runner (the way
//! `object_store`'s backends run its `integration.rs`).
//!
//! Each check takes the runner under test and a [`RunnerTarget`] that says how to build
//! tasks for it (the shell, an image for container runners, a working directory that
//! exists inside the target, a directory shared between this machine and the target).
//! A failing check panics with a message naming the target and the behaviour.
//!
//! The behaviours:
//! - [`lines_arrive_in_order_and_live`]: stdout and stderr lines reach the [`LogSink`]
//!   in order, and the first ones arrive while the command still runs;
//! - [`exit_codes_are_faithful`]: 0, 1 and a death by SIGKILL (`kill -9 $$`);
//! - [`env_and_working_dir_are_applied`]: the task's env, `NEXUS_RUN_ID`,
//!   `NEXUS_STEP_ID`, `NEXUS_ATTEMPT` and its working directory;
//! - [`secrets_are_injected_and_redacted`]: readable by the command, absent from the
//!   log written through the engine's [`FileSink`] and [`Redactor`];
//! - [`outputs_are_returned`]: `key=value` and `key<<EOF` lines written to `$NEXUS_OUTPUT`;
//! - [`timeout_stops_everything`] and [`cancel_stops_everything`]: the main process and
//!   a background one both stop, and the error kind is `Timeout` / `Cancelled`;
//! - [`cancelled_before_start_runs_nothing`];
//! - [`large_output_streams_in_bounded_memory`]: 10 MB of output, counted line by line,
//!   while this process's peak memory grows by less than [`MAX_MEMORY_GROWTH`];
//! - [`concurrent_attempts_are_isolated`]: two attempts at once do not see each
//!   other's env, outputs or (for [`RunnerTarget::isolated_files`] targets) files;
//! - [`missing_command_is_a_clear_error`].
//!
//! What the target must offer: a POSIX shell with `echo`, `printf`, `sleep` (fractions
//! of a second), `yes`, `head`, `base64`, `cat`, `pwd` and `kill` (busybox has them all),
//! and a directory that this process and the target both see (a bind mount for a
//! container, the same path for the local machine or an SSH session to it): checks
//! use it to hand files to the command and to watch its background processes.
//!
//! No check sleeps a fixed time hoping something happened: each polls with a deadline.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nexus_core::engine::LiveStatus;
use nexus_core::engine::logs::{FileSink, parse_line};
use nexus_core::secrets::Redactor;
use nexus_core::traits::{LogSink, Outcome, Program, Runner, SecretValue, Stream, Task};
use nexus_core::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

/// How much this process's peak resident memory (`VmHWM`) may grow while 10 MB of
/// output stream through a runner.
pub const MAX_MEMORY_GROWTH: u64 = 30 * 1024 * 1024;

/// A directory seen both by this process and by the commands a runner starts.
#[derive(Debug, Clone)]
pub struct SharedDir {
    /// Its path on this machine.
    pub host: PathBuf,
    /// Its path as the command sees it (inside the container, on the remote host).
    pub target: String,
}

impl SharedDir {
    /// A directory with the same path here and in the target (local and loopback SSH).
    pub fn same_path(path: impl Into<PathBuf>) -> Self {
        let host = path.into();
        let target = host.display().to_string();
        SharedDir { host, target }
    }

    /// A directory seen as `host` here and as `target` by the command.
    pub fn new(host: impl Into<PathBuf>, target: impl Into<String>) -> Self {
        SharedDir { host: host.into(), target: target.into() }
    }
}

/// How a program that does not exist shows when run without a shell (`Program::Argv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingProgram {
    /// `run` returns an error of kind `NotFound` naming the program (the local runner,
    /// the Docker runner).
    NotFoundError,
    /// The attempt ends with a non-zero exit code and a stderr line naming the program
    /// (runners that always go through a shell, such as SSH).
    NonZeroExit,
}

/// How to build tasks for the runner under test.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunnerTarget {
    /// How failure messages name the target (`local`, `docker`, `ssh 127.0.0.1`).
    pub name: String,
    /// The run id every task of the suite carries (so a test can find what the suite
    /// left behind, such as containers labelled with it).
    pub run_id: String,
    /// The shell of `Program::Shell` tasks (default `sh`).
    pub shell: String,
    /// The image of every task, for container runners.
    pub image: Option<String>,
    /// A directory that exists inside the target, written as `pwd -P` prints it
    /// (no symbolic link in it); default `/`.
    pub work_dir: String,
    /// A directory seen both here and by the target's commands.
    pub shared: SharedDir,
    /// Whether each attempt has a file system of its own (containers): then the
    /// isolation check also writes a private file in `/tmp`.
    pub isolated_files: bool,
    /// How a missing program run without a shell shows.
    pub missing_program: MissingProgram,
    /// The longest any one attempt of the suite may take before the check fails
    /// (default 60 s): a runner that hangs fails instead of hanging the test.
    pub limit: Duration,
}

impl RunnerTarget {
    /// A target named `name` whose tasks carry `run_id`, sharing `shared` with this
    /// process; shell `sh`, no image, working directory `/`, no private file system,
    /// a missing program reported as `NotFound`.
    pub fn new(name: impl Into<String>, run_id: impl Into<String>, shared: SharedDir) -> Self {
        RunnerTarget {
            name: name.into(),
            run_id: run_id.into(),
            shell: "sh".to_owned(),
            image: None,
            work_dir: "/".to_owned(),
            shared,
            isolated_files: false,
            missing_program: MissingProgram::NotFoundError,
            limit: Duration::from_secs(60),
        }
    }

    /// The same target with this shell.
    pub fn with_shell(mut self, shell: impl Into<String>) -> Self {
        self.shell = shell.into();
        self
    }

    /// The same target with this image.
    pub fn with_image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// The same target with this working directory.
    pub fn with_work_dir(mut self, dir: impl Into<String>) -> Self {
        self.work_dir = dir.into();
        self
    }

    /// The same target, saying whether each attempt has its own file system.
    pub fn with_isolated_files(mut self, isolated: bool) -> Self {
        self.isolated_files = isolated;
        self
    }

    /// The same target, saying how a missing program shows.
    pub fn with_missing_program(mut self, how: MissingProgram) -> Self {
        self.missing_program = how;
        self
    }

    /// The same target with another limit per attempt.
    pub fn with_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// A shell task of this target for `step`.
    pub fn task(&self, step: &str, script: &str) -> Task {
        let mut task =
            Task::new(&self.run_id, step, 1, Program::Shell { shell: self.shell.clone(), script: script.to_owned() });
        task.image = self.image.clone();
        task
    }

    /// A path in the shared directory, as the command sees it, single-quoted for the shell.
    fn shared_target(&self, name: &str) -> String {
        let path = format!("{}/{name}", self.shared.target.trim_end_matches('/'));
        format!("'{}'", path.replace('\'', r"'\''"))
    }

    /// A path in the shared directory, as this process sees it.
    fn shared_host(&self, name: &str) -> PathBuf {
        self.shared.host.join(name)
    }

    /// Runs `task`, failing the check if it takes longer than [`RunnerTarget::limit`].
    async fn run(
        &self,
        runner: &dyn Runner,
        task: &Task,
        logs: &dyn LogSink,
        cancel: CancellationToken,
        check: &str,
    ) -> Result<Outcome> {
        match tokio::time::timeout(self.limit, runner.run(task, logs, cancel)).await {
            Ok(result) => result,
            Err(_) => panic!("{}: {check}: the attempt did not return within {:?}", self.name, self.limit),
        }
    }

    /// Runs `task` and expects an outcome.
    async fn outcome(&self, runner: &dyn Runner, task: &Task, logs: &dyn LogSink, check: &str) -> Outcome {
        self.run(runner, task, logs, CancellationToken::new(), check)
            .await
            .unwrap_or_else(|e| panic!("{}: {check}: the attempt failed: {e}", self.name))
    }
}

/// A unique suffix for the names of files and steps of one check.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{what}-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

type OnLine = Box<dyn Fn(Stream, &str) + Send + Sync>;

/// A sink that keeps every line and calls a function for each as it arrives.
#[derive(Default)]
pub struct CollectingSink {
    lines: Mutex<Vec<(Stream, String)>>,
    on_line: Option<OnLine>,
}

impl CollectingSink {
    /// A sink that only collects.
    pub fn new() -> Self {
        CollectingSink::default()
    }

    /// A sink that collects and calls `on_line` for each line, as it arrives.
    pub fn calling(on_line: impl Fn(Stream, &str) + Send + Sync + 'static) -> Self {
        CollectingSink { lines: Mutex::default(), on_line: Some(Box::new(on_line)) }
    }

    /// The lines of `stream`, in order.
    pub fn of(&self, stream: Stream) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().filter(|(s, _)| *s == stream).map(|(_, l)| l.clone()).collect()
    }

    /// The stdout lines, in order.
    pub fn stdout(&self) -> Vec<String> {
        self.of(Stream::Stdout)
    }

    /// The stderr lines, in order.
    pub fn stderr(&self) -> Vec<String> {
        self.of(Stream::Stderr)
    }
}

impl LogSink for CollectingSink {
    fn line(&self, stream: Stream, line: &str) {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).push((stream, line.to_owned()));
        if let Some(on_line) = &self.on_line {
            on_line(stream, line);
        }
    }
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The size of each file, 0 for one that does not exist.
fn sizes(paths: &[PathBuf]) -> Vec<u64> {
    paths.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).collect()
}

/// Waits until every file in `paths` has stopped growing (unchanged for `quiet`),
/// within `limit`; returns whether they did.
async fn stop_growing(paths: &[PathBuf], quiet: Duration, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut last = sizes(paths);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sizes(paths);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// A shell loop that waits (up to about 30 s) for `file`, then runs `then`; it exits
/// 3 with a message if the file never comes.
fn wait_for_file(file: &str, then: &str) -> String {
    format!(
        "n=0; while [ ! -e {file} ]; do n=$((n+1)); if [ $n -gt 600 ]; then echo 'gave up waiting for {file}' >&2; exit 3; fi; sleep 0.05; done; {then}"
    )
}

/// Stdout and stderr lines reach the sink in the order they were written, and the first
/// ones arrive while the command is still running: the command prints `ready`, then
/// waits for a file that this check creates only when the sink has received `ready`.
pub async fn lines_arrive_in_order_and_live(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "lines arrive in order and live";
    let id = unique("live");
    let seen = target.shared_host(&format!("{id}-seen"));
    let created = seen.clone();
    let logs = CollectingSink::calling(move |stream, line| {
        if stream == Stream::Stdout && line == "ready" {
            let _ = std::fs::write(&created, b"");
        }
    });
    let script = format!(
        "i=1; while [ $i -le 100 ]; do echo line-$i; i=$((i+1)); done\nfor e in e1 e2 e3; do echo $e >&2; done\necho ready\n{}",
        wait_for_file(&target.shared_target(&format!("{id}-seen")), "printf done")
    );
    let outcome = target.outcome(runner, &target.task("live", &script), &logs, check).await;
    let _ = std::fs::remove_file(&seen);
    assert_eq!(
        outcome.exit_code,
        Some(0),
        "{}: {check}: the command did not see its file: `ready` did not reach the sink while it ran; stderr: {:?}",
        target.name,
        logs.stderr()
    );
    let mut expected: Vec<String> = (1..=100).map(|i| format!("line-{i}")).collect();
    expected.extend(["ready".to_owned(), "done".to_owned()]);
    assert_eq!(logs.stdout(), expected, "{}: {check}: stdout lines", target.name);
    assert_eq!(logs.stderr(), ["e1", "e2", "e3"], "{}: {check}: stderr lines", target.name);
    assert!(outcome.started <= outcome.finished, "{}: {check}: started after finished", target.name);
}

/// Exit codes 0 and 1 are reported as such, with no signal; a command killed by SIGKILL
/// (`kill -9 $$`) is reported either as `signal: Some(9)` with no exit code (a process
/// the runner waits for directly, as the local runner does) or as exit code 137 = 128 + 9
/// (how containers and remote shells report it). Neither counts as a success.
pub async fn exit_codes_are_faithful(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "exit codes are faithful";
    let logs = CollectingSink::new();
    let ok = target.outcome(runner, &target.task("exit-0", "exit 0"), &logs, check).await;
    assert_eq!((ok.exit_code, ok.signal), (Some(0), None), "{}: {check}: `exit 0`", target.name);
    assert!(ok.success(), "{}: {check}: `exit 0` is not a success", target.name);

    let failed = target.outcome(runner, &target.task("exit-1", "echo failing >&2; exit 1"), &logs, check).await;
    assert_eq!((failed.exit_code, failed.signal), (Some(1), None), "{}: {check}: `exit 1`", target.name);
    assert!(!failed.success(), "{}: {check}: `exit 1` is a success", target.name);

    let killed = target.outcome(runner, &target.task("exit-137", "kill -9 $$; echo survived"), &logs, check).await;
    let faithful = matches!((killed.exit_code, killed.signal), (None, Some(9)) | (Some(137), None));
    assert!(
        faithful,
        "{}: {check}: `kill -9 $$` should give signal 9 or exit code 137, got exit code {:?} and signal {:?}; stdout {:?}",
        target.name,
        killed.exit_code,
        killed.signal,
        logs.stdout()
    );
    assert!(!killed.success(), "{}: {check}: a killed command is a success", target.name);
    assert!(!logs.stdout().iter().any(|l| l == "survived"), "{}: {check}: the shell survived SIGKILL", target.name);
}

/// The task's environment variables (a value with spaces, an empty one), the
/// `NEXUS_RUN_ID`, `NEXUS_STEP_ID` and `NEXUS_ATTEMPT` variables, and the working
/// directory are applied.
pub async fn env_and_working_dir_are_applied(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "env and working dir are applied";
    let mut task = target.task(
        "env",
        r#"echo "greeting=$NEXUS_CONF_GREETING"
echo "empty=${NEXUS_CONF_EMPTY-unset}"
echo "run=$NEXUS_RUN_ID step=$NEXUS_STEP_ID attempt=$NEXUS_ATTEMPT"
pwd -P"#,
    );
    task.attempt = 3;
    task.env = vec![("NEXUS_CONF_GREETING".into(), "hello  world".into()), ("NEXUS_CONF_EMPTY".into(), String::new())];
    task.working_dir = Some(target.work_dir.clone());
    let logs = CollectingSink::new();
    let outcome = target.outcome(runner, &task, &logs, check).await;
    assert_eq!(outcome.exit_code, Some(0), "{}: {check}: stderr {:?}", target.name, logs.stderr());
    assert_eq!(
        logs.stdout(),
        [
            "greeting=hello  world".to_owned(),
            "empty=".to_owned(),
            format!("run={} step=env attempt=3", target.run_id),
            target.work_dir.clone(),
        ],
        "{}: {check}",
        target.name
    );
}

/// A secret injected into the task is readable by the command, and absent — as
/// written and base64-encoded — from the log written through the engine's [`FileSink`]
/// with a [`Redactor`] for it, where `***` stands in its place.
pub async fn secrets_are_injected_and_redacted(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "secrets are injected and redacted";
    let secret = format!("nx-S3cr3t-{}", unique("v").replace('-', ""));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{}: {check}: cannot create a temp dir: {e}", target.name));
    let log = dir.path().join("attempt.log");
    let sink =
        FileSink::create(&log, Redactor::new([secret.as_str()], &[], None), LiveStatus::default(), "secret".into())
            .unwrap_or_else(|e| panic!("{}: {check}: cannot create the FileSink: {e}", target.name));
    let script = format!(
        r#"if [ "$NEXUS_CONF_TOKEN" = '{secret}' ]; then echo secret-matches; else echo secret-differs; fi
echo "token=$NEXUS_CONF_TOKEN"
printf %s "$NEXUS_CONF_TOKEN" | base64
echo "on stderr: $NEXUS_CONF_TOKEN" >&2"#
    );
    let mut task = target.task("secret", &script);
    task.secrets = vec![("NEXUS_CONF_TOKEN".into(), SecretValue::new(secret.clone()))];
    let outcome = target.outcome(runner, &task, &sink, check).await;
    let text = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("{}: {check}: the FileSink wrote no log at {}: {e}", target.name, log.display()));
    let lines: Vec<String> = text.lines().filter_map(parse_line).map(|l| format!("{} {}", l.stream, l.text)).collect();
    assert_eq!(outcome.exit_code, Some(0), "{}: {check}: {lines:?}", target.name);
    assert!(!text.contains(&secret), "{}: {check}: the secret is in the log: {lines:?}", target.name);
    let b64 = base64_encode(secret.as_bytes());
    assert!(!text.contains(b64.trim_end_matches('=')), "{}: {check}: its base64 is in the log", target.name);
    let expected = ["out secret-matches", "out token=***", "out ***", "err on stderr: ***"];
    for line in expected {
        assert!(lines.iter().any(|l| l == line), "{}: {check}: no line `{line}` in {lines:?}", target.name);
    }
}

/// Standard base64 (the check must not depend on the redactor's own encoder to find
/// what the command printed).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `key=value` lines and `key<<DELIM` … `DELIM` blocks written to `$NEXUS_OUTPUT`
/// become the outcome's outputs; a later line wins.
pub async fn outputs_are_returned(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "outputs are returned";
    let script = r#"echo "image=registry.example.com/api:1.4" >> "$NEXUS_OUTPUT"
echo "url=http://api/?a=b" >> "$NEXUS_OUTPUT"
printf 'notes<<EOF\nfirst\nsecond\nEOF\n' >> "$NEXUS_OUTPUT"
echo "image=registry.example.com/api:1.5" >> "$NEXUS_OUTPUT""#;
    let logs = CollectingSink::new();
    let outcome = target.outcome(runner, &target.task("outputs", script), &logs, check).await;
    assert_eq!(outcome.exit_code, Some(0), "{}: {check}: stderr {:?}", target.name, logs.stderr());
    let outputs: Vec<(&str, &str)> = outcome.outputs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut sorted = outputs.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [("image", "registry.example.com/api:1.5"), ("notes", "first\nsecond"), ("url", "http://api/?a=b")],
        "{}: {check}",
        target.name
    );
}

/// A script whose main process and a background process both append to a heartbeat
/// file in the shared directory every 50 ms; it prints `started` once both run.
fn heartbeats(target: &RunnerTarget, id: &str) -> (String, Vec<PathBuf>) {
    let child = target.shared_target(&format!("{id}-child"));
    let main = target.shared_target(&format!("{id}-main"));
    let script = format!(
        "( while :; do echo x >> {child}; sleep 0.05; done ) &\necho x >> {main}\n{}\nwhile :; do echo x >> {main}; sleep 0.05; done",
        wait_for_file(&child, "echo started")
    );
    let files = vec![target.shared_host(&format!("{id}-child")), target.shared_host(&format!("{id}-main"))];
    (script, files)
}

/// Checks that an attempt stopped by a timeout or a cancellation left nothing running:
/// both heartbeat files exist (the processes ran) and stop growing.
async fn assert_heartbeats_stop(target: &RunnerTarget, check: &str, files: &[PathBuf]) {
    assert!(
        files.iter().all(|f| f.exists()),
        "{}: {check}: the command never started its processes (no heartbeat files {files:?})",
        target.name
    );
    let stopped = stop_growing(files, Duration::from_secs(1), Duration::from_secs(20)).await;
    assert!(stopped, "{}: {check}: a process of the attempt still runs (its heartbeat file grows)", target.name);
    for file in files {
        let _ = std::fs::remove_file(file);
    }
}

/// When the task's timeout passes, the runner stops everything the attempt started (a
/// background process too) and returns an error of kind `Timeout` naming the step.
pub async fn timeout_stops_everything(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "timeout stops everything";
    let id = unique("timeout");
    let (script, files) = heartbeats(target, &id);
    let mut task = target.task("slow-step", &script);
    // Long enough for a container or a remote session to start and print `started`.
    task.timeout = Some(Duration::from_secs(3));
    let logs = CollectingSink::new();
    let begun = Instant::now();
    let result = target.run(runner, &task, &logs, CancellationToken::new(), check).await;
    let err = expect_error(target, check, result, ErrorKind::Timeout, &logs);
    assert!(err.message().contains("slow-step"), "{}: {check}: the error does not name the step: {err}", target.name);
    assert!(
        begun.elapsed() >= Duration::from_millis(2900),
        "{}: {check}: returned after {:?}, before the timeout",
        target.name,
        begun.elapsed()
    );
    assert_eq!(logs.stdout(), ["started"], "{}: {check}: stderr {:?}", target.name, logs.stderr());
    assert_heartbeats_stop(target, check, &files).await;
}

/// When the cancellation token fires (here: as soon as the command has printed
/// `started`), the runner stops everything the attempt started and returns an error
/// of kind `Cancelled`, not worth retrying.
pub async fn cancel_stops_everything(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "cancel stops everything";
    let id = unique("cancel");
    let (script, files) = heartbeats(target, &id);
    let token = CancellationToken::new();
    let canceller = token.clone();
    let logs = CollectingSink::calling(move |_, line| {
        if line == "started" {
            canceller.cancel();
        }
    });
    let result = target.run(runner, &target.task("cancelled-step", &script), &logs, token, check).await;
    let err = expect_error(target, check, result, ErrorKind::Cancelled, &logs);
    assert!(!err.is_retryable(), "{}: {check}: a cancellation is marked retryable: {err}", target.name);
    assert!(
        err.message().contains("cancelled-step"),
        "{}: {check}: the error does not name the step: {err}",
        target.name
    );
    assert_heartbeats_stop(target, check, &files).await;
}

/// An attempt whose token is cancelled before it starts runs nothing and returns
/// `Cancelled`.
pub async fn cancelled_before_start_runs_nothing(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "cancelled before start runs nothing";
    let id = unique("precancel");
    let marker = target.shared_host(&id);
    let token = CancellationToken::new();
    token.cancel();
    let logs = CollectingSink::new();
    let task = target.task("precancel", &format!("echo ran > {}", target.shared_target(&id)));
    let result = target.run(runner, &task, &logs, token, check).await;
    expect_error(target, check, result, ErrorKind::Cancelled, &logs);
    assert!(!marker.exists(), "{}: {check}: the command ran", target.name);
}

fn expect_error(
    target: &RunnerTarget,
    check: &str,
    result: Result<Outcome>,
    kind: ErrorKind,
    logs: &CollectingSink,
) -> Error {
    match result {
        Ok(outcome) => panic!(
            "{}: {check}: expected a `{kind}` error, the attempt ended with exit code {:?} signal {:?}; stdout {:?} stderr {:?}",
            target.name,
            outcome.exit_code,
            outcome.signal,
            logs.stdout(),
            logs.stderr()
        ),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{}: {check}: {e}", target.name);
            e
        }
    }
}

/// Counts lines and bytes without keeping them, checking each line.
struct CountingSink {
    expected: &'static str,
    lines: AtomicUsize,
    bytes: AtomicU64,
    wrong: AtomicUsize,
    stderr: AtomicUsize,
    first_wrong: Mutex<Option<String>>,
}

impl LogSink for CountingSink {
    fn line(&self, stream: Stream, line: &str) {
        if stream == Stream::Stderr {
            self.stderr.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.lines.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
        if line != self.expected {
            self.wrong.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_wrong.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(line.chars().take(200).collect());
            }
        }
    }
}

/// This process's peak resident memory (`VmHWM`), in bytes; `None` off Linux.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// 10 MB of output (104,858 lines of 100 characters) stream through the sink line by
/// line, all of them, while this process's peak memory grows by less than
/// [`MAX_MEMORY_GROWTH`] (checked where `/proc/self/status` exists).
pub async fn large_output_streams_in_bounded_memory(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "10 MB of output streams in bounded memory";
    const LINE: &str =
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzAB";
    const LINES: usize = 104_858;
    let sink = CountingSink {
        expected: LINE,
        lines: AtomicUsize::new(0),
        bytes: AtomicU64::new(0),
        wrong: AtomicUsize::new(0),
        stderr: AtomicUsize::new(0),
        first_wrong: Mutex::new(None),
    };
    let before = peak_rss();
    let task = target.task("large-output", &format!("yes '{LINE}' | head -n {LINES}"));
    let outcome = target.outcome(runner, &task, &sink, check).await;
    let after = peak_rss();
    assert_eq!(outcome.exit_code, Some(0), "{}: {check}", target.name);
    let first_wrong = sink.first_wrong.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(
        (sink.lines.load(Ordering::Relaxed), sink.wrong.load(Ordering::Relaxed)),
        (LINES, 0),
        "{}: {check}: lines received and lines altered (first altered: {first_wrong:?}; {} stderr lines)",
        target.name,
        sink.stderr.load(Ordering::Relaxed)
    );
    assert_eq!(sink.bytes.load(Ordering::Relaxed), (LINES * (LINE.len() + 1)) as u64, "{}: {check}", target.name);
    if let (Some(before), Some(after)) = (before, after) {
        let growth = after.saturating_sub(before);
        assert!(
            growth < MAX_MEMORY_GROWTH,
            "{}: {check}: peak memory grew by {} MB while streaming 10 MB: the output is held in memory",
            target.name,
            growth / (1024 * 1024)
        );
    }
}

/// Two attempts running at the same time (each waits for the other to have started)
/// do not see each other's environment variables or outputs, nor — on targets with
/// [`RunnerTarget::isolated_files`] — a file the other wrote in `/tmp`.
pub async fn concurrent_attempts_are_isolated(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "concurrent attempts are isolated";
    let id = unique("pair");
    let task_for = |me: &str, other: &str| {
        let ready = target.shared_target(&format!("{id}-{me}-ready"));
        let other_ready = target.shared_target(&format!("{id}-{other}-ready"));
        let private =
            if target.isolated_files { format!("echo {me} > /tmp/nexus-conformance-private\n") } else { String::new() };
        let read_private = if target.isolated_files {
            "echo \"private=$(cat /tmp/nexus-conformance-private)\"".to_owned()
        } else {
            format!("echo private={me}")
        };
        let script = format!(
            r#"{private}echo "who=$NEXUS_CONF_WHO" >> "$NEXUS_OUTPUT"
echo ok > {ready}
{}
echo "who=$NEXUS_CONF_WHO only_a=${{NEXUS_CONF_ONLY_A-unset}} only_b=${{NEXUS_CONF_ONLY_B-unset}}"
{read_private}"#,
            wait_for_file(&other_ready, "echo both-running")
        );
        let mut task = target.task(&format!("pair-{me}"), &script);
        task.env =
            vec![("NEXUS_CONF_WHO".into(), me.into()), (format!("NEXUS_CONF_ONLY_{}", me.to_uppercase()), "1".into())];
        task
    };
    let (task_a, task_b) = (task_for("a", "b"), task_for("b", "a"));
    let (logs_a, logs_b) = (CollectingSink::new(), CollectingSink::new());
    let (a, b) =
        tokio::join!(target.outcome(runner, &task_a, &logs_a, check), target.outcome(runner, &task_b, &logs_b, check));
    for (me, outcome, logs, only) in
        [("a", &a, &logs_a, "only_a=1 only_b=unset"), ("b", &b, &logs_b, "only_a=unset only_b=1")]
    {
        assert_eq!(outcome.exit_code, Some(0), "{}: {check}: attempt {me}: stderr {:?}", target.name, logs.stderr());
        assert_eq!(
            logs.stdout(),
            ["both-running".to_owned(), format!("who={me} {only}"), format!("private={me}")],
            "{}: {check}: attempt {me}",
            target.name
        );
        let outputs: Vec<(&String, &String)> = outcome.outputs.iter().collect();
        assert_eq!(outputs, [(&"who".to_owned(), &me.to_owned())], "{}: {check}: outputs of {me}", target.name);
    }
    for me in ["a", "b"] {
        let _ = std::fs::remove_file(target.shared_host(&format!("{id}-{me}-ready")));
    }
}

/// A command that does not exist gives a clear failure naming it: through the shell, a
/// non-zero exit code (127 for POSIX shells) with the shell's message on stderr;
/// without a shell (`Program::Argv`), as the target's [`MissingProgram`] says.
pub async fn missing_command_is_a_clear_error(runner: &dyn Runner, target: &RunnerTarget) {
    let check = "a missing command is a clear error";
    let name = "nexus-no-such-command-7f3a";
    let logs = CollectingSink::new();
    let outcome =
        target.outcome(runner, &target.task("missing-shell", &format!("{name} --version")), &logs, check).await;
    assert!(
        outcome.exit_code.is_some_and(|c| c != 0),
        "{}: {check}: through the shell: exit code {:?}",
        target.name,
        outcome.exit_code
    );
    assert!(
        logs.stderr().iter().any(|l| l.contains(name)),
        "{}: {check}: through the shell: no stderr line names `{name}`: {:?}",
        target.name,
        logs.stderr()
    );

    let mut task = Task::new(&target.run_id, "missing-argv", 1, Program::Argv(vec![name.into(), "--version".into()]));
    task.image = target.image.clone();
    let logs = CollectingSink::new();
    let result = target.run(runner, &task, &logs, CancellationToken::new(), check).await;
    match (target.missing_program, result) {
        (MissingProgram::NotFoundError, Err(e)) => {
            assert_eq!(e.kind(), ErrorKind::NotFound, "{}: {check}: {e}", target.name);
            assert!(e.to_string().contains(name), "{}: {check}: the error does not name `{name}`: {e}", target.name);
            assert!(
                e.message().contains("missing-argv"),
                "{}: {check}: the error does not name the step: {e}",
                target.name
            );
        }
        (MissingProgram::NonZeroExit, Ok(outcome)) => {
            assert!(
                outcome.exit_code.is_some_and(|c| c != 0),
                "{}: {check}: exit code {:?}",
                target.name,
                outcome.exit_code
            );
            assert!(
                logs.stderr().iter().any(|l| l.contains(name)),
                "{}: {check}: no stderr line names `{name}`: {:?}",
                target.name,
                logs.stderr()
            );
        }
        (expected, got) => panic!(
            "{}: {check}: without a shell, expected {expected:?}, got {:?}",
            target.name,
            got.map(|o| (o.exit_code, o.signal, logs.stderr()))
        ),
    }
}

/// Runs the whole suite, one check after the other (for a runner whose tests prefer a
/// single entry point; each check is also callable on its own).
pub async fn run_all(runner: &dyn Runner, target: &RunnerTarget) {
    lines_arrive_in_order_and_live(runner, target).await;
    exit_codes_are_faithful(runner, target).await;
    env_and_working_dir_are_applied(runner, target).await;
    secrets_are_injected_and_redacted(runner, target).await;
    outputs_are_returned(runner, target).await;
    timeout_stops_everything(runner, target).await;
    cancel_stops_everything(runner, target).await;
    cancelled_before_start_runs_nothing(runner, target).await;
    large_output_streams_in_bounded_memory(runner, target).await;
    concurrent_attempts_are_isolated(runner, target).await;
    missing_command_is_a_clear_error(runner, target).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn shared_paths_are_quoted() {
        let target = RunnerTarget::new("t", "r", SharedDir::new("/host/dir", "/in/it's"));
        assert_eq!(target.shared_target("f"), r"'/in/it'\''s/f'");
        assert_eq!(target.shared_host("f"), PathBuf::from("/host/dir/f"));
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss().is_some_and(|b| b > 0));
        }
    }
}
