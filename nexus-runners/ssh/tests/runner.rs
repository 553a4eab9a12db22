//! The ssh runner against a real OpenSSH server.
//!
//! Every test here needs one: `source scripts/test-env.d/sshd.sh` starts it on
//! 127.0.0.1:2222 and exports the `NEXUS_TEST_SSH_*` variables these tests read, then
//! `cargo test -p nexus-runner-ssh -- --include-ignored`. What happened on the far end
//! (a process gone, a file deleted) is checked over a separate plain `ssh`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_core::traits::{LogSink, Outcome, Program, Runner, SecretValue, Stream, TargetReport, Task};
use nexus_core::{Catalog, ErrorKind, Result};
use nexus_runner_ssh::{MAX_LINE_BYTES, SSH_KIND, register_ssh_runner};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type OnLine = Box<dyn Fn(&str) + Send + Sync>;

/// Collects every line, and calls `on_line` for each as it arrives.
#[derive(Default)]
struct Logs {
    lines: Mutex<Vec<(Stream, String)>>,
    on_line: Option<OnLine>,
    /// `target_finished` reports: host, exit code, skipped.
    targets: Mutex<Vec<(String, Option<i32>, bool)>>,
}

impl Logs {
    fn calling(on_line: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Logs { lines: Mutex::default(), on_line: Some(Box::new(on_line)), targets: Mutex::default() }
    }
    fn of(&self, stream: Stream) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|(s, _)| *s == stream).map(|(_, l)| l.clone()).collect()
    }
    fn stdout(&self) -> Vec<String> {
        self.of(Stream::Stdout)
    }
    fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.clone()).collect()
    }
    fn number(&self, key: &str) -> Option<u32> {
        self.stdout().iter().find_map(|l| l.split_once(key)?.1.parse().ok())
    }
}

impl LogSink for Logs {
    fn line(&self, stream: Stream, line: &str) {
        self.lines.lock().unwrap().push((stream, line.to_owned()));
        if let Some(on_line) = &self.on_line {
            on_line(line);
        }
    }

    fn target_finished(&self, report: &TargetReport) {
        self.targets.lock().unwrap().push((report.name.clone(), report.exit_code, report.skipped));
    }
}

/// The test server, from the variables `scripts/test-env.d/sshd.sh` exports.
struct Server {
    host: String,
    port: u16,
    user: String,
    key: String,
    known_hosts: String,
}

fn server() -> Server {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run `source scripts/test-env.d/sshd.sh` first"))
    };
    Server {
        host: var("NEXUS_TEST_SSH_HOST"),
        port: var("NEXUS_TEST_SSH_PORT").parse().expect("NEXUS_TEST_SSH_PORT is a port"),
        user: var("NEXUS_TEST_SSH_USER"),
        key: var("NEXUS_TEST_SSH_KEY"),
        known_hosts: var("NEXUS_TEST_SSH_KNOWN_HOSTS"),
    }
}

/// The spec of a runner on the test server, with `changes` merged in.
fn spec(changes: Value) -> Value {
    let s = server();
    let mut spec = json!({
        "host": s.host,
        "port": s.port,
        "user": s.user,
        "identity_file": s.key,
        "known_hosts_file": s.known_hosts,
        "connect_timeout": "10s",
        "kill_grace": "2s",
    });
    for (k, v) in changes.as_object().expect("an object") {
        if v.is_null() {
            spec.as_object_mut().unwrap().remove(k);
        } else {
            spec[k] = v.clone();
        }
    }
    spec
}

/// A runner built through the catalog, as the engine builds it.
fn runner(spec: Value) -> Arc<dyn Runner> {
    let mut catalog = Catalog::new();
    register_ssh_runner(&mut catalog).unwrap();
    let kind = catalog.runners.get(SSH_KIND).unwrap();
    assert!(kind.validate(&spec).is_empty(), "{:?}", kind.validate(&spec));
    kind.build(spec).unwrap()
}

fn shell(script: &str) -> Task {
    Task::new("run-1", "build", 1, Program::Shell { shell: "sh".into(), script: script.into() })
}

async fn run(runner: &dyn Runner, task: &Task, logs: &Logs) -> Result<Outcome> {
    runner.run(task, logs, CancellationToken::new()).await
}

/// Runs `command` on the test server with plain `ssh`; its exit code and stdout.
fn remote(command: &str) -> (i32, String) {
    let s = server();
    let out = std::process::Command::new("ssh")
        .args(["-i", &s.key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", s.known_hosts))
        .args(["-p", &s.port.to_string(), "-l", &s.user, &s.host, command])
        .output()
        .expect("ssh runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether remote process `pid` still runs (a zombie does not count).
fn remote_alive(pid: u32) -> bool {
    remote(&format!("[ -d /proc/{pid} ] && ! grep -qs '^State:[[:space:]]*[ZX]' /proc/{pid}/status")).0 == 0
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("nexus-ssh-test-{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn streams_lines_in_order_while_the_process_runs() {
    let flag = format!("/tmp/{}", unique("seen"));
    let seen = flag.clone();
    // The script waits (up to 20 s) for a remote file the sink creates when it receives
    // `ready`: it can only finish if `ready` reached the sink while it was still running.
    let logs = Logs::calling(move |line| {
        if line == "ready" {
            let seen = seen.clone();
            std::thread::spawn(move || remote(&format!("touch {seen}")));
        }
    });
    let script = format!(
        r#"i=1; while [ $i -le 200 ]; do echo $i; i=$((i+1)); done
        for e in e1 e2 e3; do echo $e >&2; done
        echo ready
        n=0; while [ ! -e '{flag}' ]; do n=$((n+1)); [ $n -gt 400 ] && exit 3; sleep 0.05; done
        rm -f '{flag}'
        printf 'done'"#
    );
    let outcome = run(&*runner(spec(json!({}))), &shell(&script), &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.all());
    let mut expected: Vec<String> = (1..=200).map(|i| i.to_string()).collect();
    expected.extend(["ready".to_owned(), "done".to_owned()]);
    assert_eq!(logs.stdout(), expected);
    assert_eq!(logs.of(Stream::Stderr), ["e1", "e2", "e3"]);
    assert!(outcome.started <= outcome.finished);
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn long_lines_are_split_and_big_output_streams() {
    let logs = Logs::default();
    let script = "head -c 150000 /dev/zero | tr '\\0' x; echo; echo after";
    run(&*runner(spec(json!({}))), &shell(script), &logs).await.unwrap();
    let lengths: Vec<usize> = logs.stdout().iter().map(String::len).collect();
    assert_eq!(lengths, [MAX_LINE_BYTES, MAX_LINE_BYTES, 150_000 - 2 * MAX_LINE_BYTES, 5]);

    // 10 MB in 100-byte lines: counted as they pass, not kept.
    struct Count(AtomicU32);
    impl LogSink for Count {
        fn line(&self, stream: Stream, line: &str) {
            assert_eq!(line.len(), 99, "{stream:?} {line}");
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let count = Count(AtomicU32::new(0));
    let task = shell(
        "yes 012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678 | head -n 100000",
    );
    let outcome = runner(spec(json!({}))).run(&task, &count, CancellationToken::new()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(count.0.load(Ordering::Relaxed), 100_000);
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn exit_codes_are_reported_faithfully() {
    let ssh = runner(spec(json!({})));
    let logs = Logs::default();
    for (script, code) in [
        ("exit 0", 0),
        ("echo failing >&2; exit 1", 1),
        ("exit 137", 137),
        // openssh's own meanings of 127 and 255 must not leak through.
        ("exit 127", 127),
        ("exit 255", 255),
        ("nexus-no-such-command-inside", 127),
        // A shell whose child was killed by SIGKILL exits with 128 + 9.
        ("sh -c 'kill -9 $$'", 137),
    ] {
        let outcome = run(&*ssh, &shell(script), &logs).await.unwrap();
        assert_eq!((outcome.exit_code, outcome.signal), (Some(code), None), "{script}");
        assert_eq!(outcome.success(), code == 0);
    }
    // The step's main process killed by a signal: seen as 128 + 9 (see the crate docs).
    let killed = run(&*ssh, &shell("kill -9 $$"), &logs).await.unwrap();
    assert!(killed.exit_code == Some(137) || killed.signal == Some(9), "{killed:?}");
    assert!(!killed.success());
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn env_working_dir_and_argv_quoting() {
    let ssh = runner(spec(json!({})));
    let dir = format!("/tmp/{}", unique("wd"));
    assert_eq!(remote(&format!("mkdir -p '{dir}/sub dir'")).0, 0);
    let mut task = shell(r#"echo "$FROM_TASK|$QUOTED|$NEXUS_RUN_ID $NEXUS_STEP_ID $NEXUS_ATTEMPT"; pwd"#);
    task.env = vec![("FROM_TASK".into(), "task".into()), ("QUOTED".into(), "it's $HOME `x` \"y\"".into())];
    task.working_dir = Some(format!("{dir}/sub dir"));
    let logs = Logs::default();
    let outcome = run(&*ssh, &task, &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.all());
    assert_eq!(logs.stdout(), [r#"task|it's $HOME `x` "y"|run-1 build 1"#.to_owned(), format!("{dir}/sub dir")]);

    // Argv: each argument arrives as one word, untouched by any shell.
    let task = Task::new(
        "run-1",
        "args",
        2,
        Program::Argv(vec!["printf".into(), "[%s]\\n".into(), "a b".into(), "$HOME".into(), "'".into()]),
    );
    let logs = Logs::default();
    run(&*ssh, &task, &logs).await.unwrap();
    assert_eq!(logs.stdout(), ["[a b]", "[$HOME]", "[']"]);
    remote(&format!("rm -rf '{dir}'"));
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn secrets_are_readable_remotely_and_on_no_command_line() {
    let secret = format!("s3cr3t-{}", unique("value"));
    let mut task =
        shell(r#"[ "$DB_PASSWORD" = "$EXPECTED_PREFIX-$EXPECTED_REST" ] && echo matches; echo ready; sleep 1"#);
    let (prefix, rest) = secret.split_once('-').unwrap();
    task.env = vec![("EXPECTED_PREFIX".into(), prefix.into()), ("EXPECTED_REST".into(), rest.into())];
    task.secrets = vec![("DB_PASSWORD".into(), SecretValue::new(secret.clone()))];
    let found = Arc::new(Mutex::new(Vec::<String>::new()));
    let (needle, found_in) = (secret.clone(), Arc::clone(&found));
    // While the step runs, no process on this machine (the client's side, and the
    // server's when it is local) shows the secret in its command line.
    let logs = Logs::calling(move |line| {
        if line == "ready" {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
                    && String::from_utf8_lossy(&cmdline).contains(&needle)
                {
                    found_in.lock().unwrap().push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
                }
            }
        }
    });
    let outcome = run(&*runner(spec(json!({}))), &task, &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.all());
    assert_eq!(logs.stdout(), ["matches", "ready"]);
    assert!(found.lock().unwrap().is_empty(), "the secret is on a command line: {:?}", found.lock().unwrap());
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn outputs_file_is_read_back_then_deleted() {
    let script = r#"
        echo "image=registry.example.com/api:1.4" >> "$NEXUS_OUTPUT"
        echo "url=http://api/?a=b" >> "$NEXUS_OUTPUT"
        printf 'notes<<EOF\nfirst\nsecond\nEOF\n' >> "$NEXUS_OUTPUT"
        echo "not an output" >> "$NEXUS_OUTPUT"
        ls -ld "$(dirname "$NEXUS_OUTPUT")" | cut -c1-10
        echo "$NEXUS_OUTPUT"
    "#;
    let logs = Logs::default();
    let outcome = run(&*runner(spec(json!({}))), &shell(script), &logs).await.unwrap();
    assert_eq!(outcome.outputs["image"], "registry.example.com/api:1.4");
    assert_eq!(outcome.outputs["url"], "http://api/?a=b");
    assert_eq!(outcome.outputs["notes"], "first\nsecond");
    assert_eq!(outcome.outputs.len(), 3);
    let stdout = logs.stdout();
    assert_eq!(stdout[0], "drwx------", "the attempt's directory is private");
    let path = &stdout[1];
    let dir = path.rsplit_once('/').unwrap().0;
    assert_eq!(remote(&format!("test -e '{dir}'")).0, 1, "{dir} was not deleted");
    let notes = logs.of(Stream::Stderr);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].starts_with("nexus: $NEXUS_OUTPUT line 7"), "{notes:?}");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn timeout_kills_the_remote_process_tree() {
    let ssh = runner(spec(json!({"kill_grace": "2s"})));
    let mut task = shell("sleep 30 & echo child=$!; echo main=$$; sleep 30");
    task.timeout = Some(Duration::from_secs(3));
    let logs = Logs::default();
    let begun = Instant::now();
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(20), "took {:?}", begun.elapsed());
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.message().contains("step `build`") && err.message().contains("timed out after 3s"), "{err}");
    assert!(err.message().contains("SIGTERM"), "{err}");
    let (child, main) = (logs.number("child=").unwrap(), logs.number("main=").unwrap());
    assert!(
        eventually(Duration::from_secs(5), || !remote_alive(child) && !remote_alive(main)).await,
        "{child} or {main} survived"
    );
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn processes_ignoring_sigterm_are_killed_after_the_grace_period() {
    let ssh = runner(spec(json!({"kill_grace": "500ms"})));
    // An ignored signal stays ignored across exec, so `sleep` ignores SIGTERM too.
    let mut task = shell("trap '' TERM; sleep 30 & echo child=$!; sleep 30");
    task.timeout = Some(Duration::from_secs(3));
    let logs = Logs::default();
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.message().contains("SIGKILL after a 500ms grace period"), "{err}");
    let child = logs.number("child=").unwrap();
    assert!(eventually(Duration::from_secs(5), || !remote_alive(child)).await, "{child} survived");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn cancel_stops_the_remote_processes() {
    let token = CancellationToken::new();
    let canceller = token.clone();
    let logs = Logs::calling(move |line| {
        if line.starts_with("child=") {
            canceller.cancel();
        }
    });
    let begun = Instant::now();
    let task = shell("sleep 30 & echo child=$!; sleep 30");
    let err = runner(spec(json!({}))).run(&task, &logs, token).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(20), "took {:?}", begun.elapsed());
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(!err.is_retryable());
    let child = logs.number("child=").unwrap();
    assert!(eventually(Duration::from_secs(5), || !remote_alive(child)).await, "{child} survived");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn cancelled_before_start_runs_nothing() {
    let flag = format!("/tmp/{}", unique("ran"));
    let token = CancellationToken::new();
    token.cancel();
    let err = runner(spec(json!({}))).run(&shell(&format!("touch {flag}")), &Logs::default(), token).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(remote(&format!("test -e {flag}")).0, 1);
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn processes_left_behind_are_stopped_when_the_step_exits() {
    let logs = Logs::default();
    // One keeps the output open, the other does not.
    let script = "sleep 30 & echo child=$!; sleep 31 >/dev/null 2>&1 & echo other=$!";
    let begun = Instant::now();
    let outcome = run(&*runner(spec(json!({}))), &shell(script), &logs).await.unwrap();
    assert!(begun.elapsed() < Duration::from_secs(20), "took {:?}", begun.elapsed());
    assert_eq!(outcome.exit_code, Some(0));
    let (child, other) = (logs.number("child=").unwrap(), logs.number("other=").unwrap());
    assert!(eventually(Duration::from_secs(5), || !remote_alive(child) && !remote_alive(other)).await);
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn dropping_the_attempt_stops_the_remote_processes() {
    let ssh = runner(spec(json!({})));
    let logs = Logs::default();
    let task = shell("sleep 30 & echo child=$!; sleep 30");
    let printed = async {
        assert!(eventually(Duration::from_secs(10), || logs.number("child=").is_some()).await);
    };
    tokio::select! {
        _ = run(&*ssh, &task, &logs) => panic!("the attempt finished on its own"),
        () = printed => {}
    }
    // The attempt's future is dropped here, as when the engine abandons it.
    let child = logs.number("child=").unwrap();
    assert!(eventually(Duration::from_secs(10), || !remote_alive(child)).await, "{child} survived");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn missing_program_shell_or_directory_is_not_found() {
    let ssh = runner(spec(json!({})));
    let logs = Logs::default();
    let task = Task::new("run-1", "deploy", 1, Program::Argv(vec!["nexus-no-such-program".into(), "--help".into()]));
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("program `nexus-no-such-program` not found"), "{err}");
    assert!(err.message().contains("step `deploy`"), "{err}");
    assert!(err.message().contains(&format!(":{}", server().port)), "names the host: {err}");

    let task = Task::new("run-1", "deploy", 1, Program::Argv(vec!["/nonexistent/tool".into()]));
    assert_eq!(run(&*ssh, &task, &logs).await.unwrap_err().kind(), ErrorKind::NotFound);

    let task =
        Task::new("run-1", "deploy", 1, Program::Shell { shell: "nexus-no-such-shell".into(), script: "true".into() });
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.message().contains("`nexus-no-such-shell`"), "{err}");

    let mut task = shell("true");
    task.working_dir = Some("/nonexistent/nexus/dir".into());
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.message().contains("working directory `/nonexistent/nexus/dir`"), "{err}");
    assert!(logs.all().is_empty(), "the wrapper's reports stay out of the log: {:?}", logs.all());
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_wrong_key_is_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("wrong_ed25519");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let ssh = runner(spec(json!({"identity_file": key})));
    let err = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.message().contains("refused to authenticate") && err.message().contains("identity_file"), "{err}");
    assert!(!err.is_retryable());

    let ssh = runner(spec(json!({"identity_file": dir.path().join("missing")})));
    let err = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.message().contains("identity file"), "{err}");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn an_unreachable_port_is_unavailable_naming_host_and_port() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }; // closed again: nothing listens there
    let ssh = runner(spec(json!({"port": port, "connect_timeout": "5s"})));
    let begun = Instant::now();
    let err = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(20));
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.message().contains("connection refused"), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn an_unknown_host_key_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("known_hosts");
    std::fs::write(&empty, "").unwrap();
    let ssh = runner(spec(json!({"known_hosts_file": empty})));
    let err = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.message().contains("is not in the known hosts file"), "{err}");
    assert!(err.message().contains("ssh-keyscan -p"), "{err}");

    // A key that is not the recorded one is refused even without strict checking.
    let other = dir.path().join("other_ed25519");
    let made =
        std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other).status();
    assert!(made.unwrap().success());
    let other_key = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let other_key: Vec<&str> = other_key.split_whitespace().take(2).collect();
    let s = server();
    let changed = dir.path().join("changed_known_hosts");
    std::fs::write(&changed, format!("[{}]:{} {}\n", s.host, s.port, other_key.join(" "))).unwrap();
    for strict in [true, false] {
        let ssh = runner(spec(json!({"known_hosts_file": changed, "strict_host_key_checking": strict})));
        let err = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        assert!(err.message().contains("is not the one recorded") && err.message().contains("ssh-keygen -R"), "{err}");
    }

    // With strict checking off, the key is accepted and recorded.
    let ssh = runner(spec(json!({"known_hosts_file": empty, "strict_host_key_checking": false})));
    let outcome = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert!(!std::fs::read_to_string(&empty).unwrap().trim().is_empty(), "the key was not recorded");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn the_connection_is_reused_across_attempts() {
    let ssh = runner(spec(json!({})));
    let logs = Logs::default();
    for _ in 0..3 {
        run(&*ssh, &shell("echo $SSH_CONNECTION | cut -d' ' -f2"), &logs).await.unwrap();
    }
    let ports = logs.stdout();
    assert_eq!(ports.len(), 3);
    assert!(ports.iter().all(|p| *p == ports[0]), "a new connection per attempt: {ports:?}");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn two_attempts_at_once_do_not_see_each_others_env_or_files() {
    let ssh = runner(spec(json!({})));
    let script = r#"echo "$WHO" > "$(dirname "$NEXUS_OUTPUT")/mine"; sleep 0.5; echo "$WHO $(cat "$(dirname "$NEXUS_OUTPUT")/mine")"; echo "who=$WHO" >> "$NEXUS_OUTPUT""#;
    let (mut a, mut b) = (shell(script), shell(script));
    a.env = vec![("WHO".into(), "a".into())];
    b.env = vec![("WHO".into(), "b".into())];
    let (la, lb) = (Logs::default(), Logs::default());
    let (ra, rb) = tokio::join!(run(&*ssh, &a, &la), run(&*ssh, &b, &lb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((la.stdout(), lb.stdout()), (vec!["a a".to_owned()], vec!["b b".to_owned()]));
    assert_eq!((ra.outputs["who"].as_str(), rb.outputs["who"].as_str()), ("a", "b"));
}

/// A group of two names of the same server; the first host to run the script fails.
fn group_spec(policy: &str, parallelism: u32) -> Value {
    spec(
        json!({"host": null, "hosts": ["127.0.0.1", "localhost"], "on_partial_failure": policy, "parallelism": parallelism}),
    )
}

fn first_fails(flag: &str) -> Task {
    shell(&format!(
        "if mkdir {flag} 2>/dev/null; then echo first; exit 3; else echo second; echo \"host=second\" >> \"$NEXUS_OUTPUT\"; rmdir {flag}; fi"
    ))
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_group_runs_on_every_host_with_continue() {
    let flag = format!("/tmp/{}", unique("group"));
    let logs = Logs::default();
    let outcome = run(&*runner(group_spec("continue", 1)), &first_fails(&flag), &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(3), "{:?}", logs.all());
    assert_eq!(logs.stdout(), ["[127.0.0.1] first", "[localhost] second"]);
    assert_eq!(outcome.outputs["host"], "second");
    let summary = logs.of(Stream::Stderr);
    assert_eq!(summary, ["nexus: 127.0.0.1: exit code 3", "nexus: localhost: exit code 0"]);
    // Each host is reported as its own attempt.
    let targets = logs.targets.lock().unwrap().clone();
    assert_eq!(targets, [("127.0.0.1".to_owned(), Some(3), false), ("localhost".to_owned(), Some(0), false)]);
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_group_stops_after_a_failure_with_stop() {
    let flag = format!("/tmp/{}", unique("group"));
    let logs = Logs::default();
    let outcome = run(&*runner(group_spec("stop", 1)), &first_fails(&flag), &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(logs.stdout(), ["[127.0.0.1] first"]);
    assert_eq!(logs.of(Stream::Stderr)[1], "nexus: localhost: not started (on_partial_failure: stop)");
    let targets = logs.targets.lock().unwrap().clone();
    assert_eq!(targets, [("127.0.0.1".to_owned(), Some(3), false), ("localhost".to_owned(), None, true)]);
    remote(&format!("rmdir {flag}"));
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_group_runs_hosts_in_parallel() {
    let ssh = runner(group_spec("stop", 2));
    // Each host waits for the other: only possible if both run at once.
    let flag = format!("/tmp/{}", unique("par"));
    let task = shell(&format!(
        "mkdir -p {flag}; touch {flag}/$$; n=0; while [ $(ls {flag} | wc -l) -lt 2 ]; do n=$((n+1)); [ $n -gt 200 ] && exit 9; sleep 0.05; done; echo both"
    ));
    let logs = Logs::default();
    let outcome = run(&*ssh, &task, &logs).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{:?}", logs.all());
    let mut stdout = logs.stdout();
    stdout.sort();
    assert_eq!(stdout, ["[127.0.0.1] both", "[localhost] both"]);
    remote(&format!("rm -rf {flag}"));

    // A timeout stops every host.
    let mut task = shell("sleep 30 & echo child=$!; sleep 30");
    task.timeout = Some(Duration::from_secs(3));
    let logs = Logs::default();
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let children: Vec<u32> = logs.stdout().iter().filter_map(|l| l.split_once("child=")?.1.parse().ok()).collect();
    assert_eq!(children.len(), 2, "{:?}", logs.all());
    assert!(eventually(Duration::from_secs(5), || children.iter().all(|c| !remote_alive(*c))).await);
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_group_with_an_unreachable_host_is_an_error_naming_it() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let ssh = runner(spec(
        json!({"host": null, "hosts": ["127.0.0.1", "localhost"], "port": port, "on_partial_failure": "continue"}),
    ));
    let err = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains("could not run on 2 of 2 hosts"), "{err}");
    assert!(err.message().contains(&format!("localhost:{port}")), "{err}");
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_lost_connection_is_unavailable_and_the_step_is_stopped_over_a_new_one() {
    let ssh = runner(spec(json!({})));
    // `$PPID` is the remote wrapper; its parent is sshd's process for this connection.
    let task = shell("sleep 30 & echo child=$!; echo sshd=$(ps -o ppid= -p $PPID | tr -d ' '); sleep 30");
    let logs = Logs::calling(|line| {
        if let Some(pid) = line.strip_prefix("sshd=") {
            let pid = pid.to_owned();
            std::thread::spawn(move || remote(&format!("kill -9 {pid}")));
        }
    });
    let begun = Instant::now();
    let err = run(&*ssh, &task, &logs).await.unwrap_err();
    assert!(begun.elapsed() < Duration::from_secs(20), "took {:?}", begun.elapsed());
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains("lost the connection") && err.message().contains("were stopped"), "{err}");
    let child = logs.number("child=").unwrap();
    assert!(eventually(Duration::from_secs(5), || !remote_alive(child)).await, "{child} survived");
    // The runner connects again for the next attempt.
    let outcome = run(&*ssh, &shell("true"), &Logs::default()).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
}

/// Run by `a_crashed_nexus_leaves_nothing_running` in a process of its own (this test
/// binary again): starts a step and prints its background process's pid, until killed.
/// Does nothing in a normal test run.
#[tokio::test]
#[ignore = "needs sshd"]
async fn crash_helper() {
    if std::env::var_os("NEXUS_SSH_CRASH_HELPER").is_none() {
        return;
    }
    let logs = Logs::calling(|line| {
        if line.starts_with("child=") {
            println!("{line}");
        }
    });
    let _ = run(&*runner(spec(json!({}))), &shell("sleep 30 & echo child=$!; sleep 30"), &logs).await;
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn a_crashed_nexus_leaves_nothing_running() {
    use std::io::BufRead;
    // The helper's TMPDIR holds its ControlMaster socket: it names the helper's `ssh`.
    let tmp = tempfile::tempdir().unwrap();
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "crash_helper", "--nocapture", "--test-threads=1"])
        .env("NEXUS_SSH_CRASH_HELPER", "1")
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(helper.stdout.take().unwrap());
    let child: u32 = stdout
        .lines()
        .map_while(std::result::Result::ok)
        .find_map(|l| l.split_once("child=")?.1.trim().parse().ok())
        .expect("the helper printed its step's pid");
    assert!(remote_alive(child));
    // Nexus dies without a chance to clean up.
    helper.kill().unwrap();
    helper.wait().unwrap();
    let stopped = eventually(Duration::from_secs(10), || !remote_alive(child)).await;
    // The helper's master connection outlives it until its idle timeout: end it now.
    let needle = tmp.path().display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("ssh\0") && cmdline.contains(&needle) {
            let _ = std::process::Command::new("kill").arg(entry.file_name()).status();
        }
    }
    assert!(stopped, "the step's process {child} survived the crash of Nexus");
}

/// The tag of a run in its attempts' remote directory names (`nexus-TAG…`): FNV-1a.
fn run_tag(run_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in run_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[tokio::test]
#[ignore = "needs sshd"]
async fn cleanup_run_stops_what_a_crashed_run_left_on_every_host() {
    // What a crashed run leaves when nothing stopped it: an attempt directory naming the
    // process group of a step that still runs (made here by hand, as the wrapper does).
    let (crashed, other) = (unique("crashed"), unique("other"));
    let leave = |run: &str| {
        let d = format!("/tmp/nexus-{}{}", run_tag(run), "ab".repeat(16));
        let (code, pid) = remote(&format!(
            "mkdir -m 700 {d} || exit 1; setsid sh -c 'echo $$ > {d}/pid; exec sleep 60' </dev/null >/dev/null 2>&1 & \
             n=0; until [ -s {d}/pid ] || [ $n -gt 100 ]; do n=$((n+1)); sleep 0.05; done; cat {d}/pid"
        ));
        assert_eq!(code, 0);
        (d, pid.trim().parse::<u32>().unwrap())
    };
    let (dir, pid) = leave(&crashed);
    let (other_dir, other_pid) = leave(&other);
    assert!(remote_alive(pid));

    let ssh = runner(group_spec("continue", 1));
    ssh.cleanup_run(&crashed).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || !remote_alive(pid)).await, "{pid} survived");
    assert_eq!(remote(&format!("test -e {dir}")).0, 1, "{dir} was not removed");
    assert!(remote_alive(other_pid), "another run's step was stopped");

    // An unreachable host does not block a resume.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    runner(spec(json!({"port": port}))).cleanup_run(&other).await.unwrap();
    ssh.cleanup_run(&other).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || !remote_alive(other_pid)).await);
    assert_eq!(remote(&format!("test -e {other_dir}")).0, 1);
}
