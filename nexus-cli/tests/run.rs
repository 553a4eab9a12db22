//! The engine, driven through the real `nexus` binary: crash and resume, retries,
//! timeouts, cancellation, rollbacks, outputs, approvals, concurrency groups, secret
//! redaction, conditions and `retry --from`; named locks and the run's parallelism;
//! a runner's `max_parallel`; `retry.on_exit_codes`; Ctrl-C; saved plans and `graph`;
//! `logs --follow`; exit codes.
//!
//! Every pipeline lives in `tests/run/ssot/pipeline_registry.yaml`, runs on the `local`
//! runner and writes only into the test's temporary directory (its `dir` param). Tests
//! that need something to be running when they act poll for it (a marker file written
//! by the step, a status in `nexus show --output json`) with a deadline; none sleeps a
//! fixed time hoping it happened.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use helper::{Env, attempts_of, events_of, pid_is_dead, read_pid, status_of, wait_until};

/// Spawning `nexus`, waiting for it with a deadline, reading `runs` and `show`.
mod helper {
    use std::fs::File;
    use std::os::unix::process::CommandExt as _;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use serde_json::Value;
    use tempfile::TempDir;

    /// How long any single wait may take before the test fails.
    pub const DEADLINE: Duration = Duration::from_secs(20);

    /// The fixture config directory.
    pub fn config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/run/ssot")
    }

    /// A test's world: `work` (the pipelines' `dir`), `state` (the store), and the
    /// captured output of every `nexus` process it started.
    pub struct Env {
        tmp: TempDir,
        pub work: PathBuf,
        pub state: PathBuf,
        spawned: AtomicUsize,
    }

    /// A `nexus` process being waited for; its output goes to files (readable while it
    /// runs). Dropping it unfinished kills its process group.
    pub struct Spawned {
        child: Child,
        pub out: PathBuf,
        pub err: PathBuf,
        done: bool,
    }

    /// A finished `nexus` process.
    pub struct Finished {
        pub code: Option<i32>,
        pub stdout: String,
        pub stderr: String,
    }

    impl Finished {
        /// Everything it printed, for assertion messages.
        pub fn dump(&self) -> String {
            format!("exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
        }

        /// Stdout as JSON.
        pub fn json(&self) -> Value {
            serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.dump()))
        }
    }

    impl Env {
        pub fn new() -> Env {
            let tmp = tempfile::Builder::new().prefix("nexus-run-test-").tempdir().expect("temp dir");
            let work = tmp.path().join("work");
            let state = tmp.path().join("state");
            std::fs::create_dir_all(&work).expect("work dir");
            Env { tmp, work, state, spawned: AtomicUsize::new(0) }
        }

        /// `nexus --config FIXTURE --state STATE ARGS…`, nothing inherited that could
        /// change its behaviour.
        pub fn command(&self, args: &[&str]) -> Command {
            self.command_at(&config(), &self.state, args)
        }

        /// The same with another configuration or state directory.
        pub fn command_at(&self, config: &Path, state: &Path, args: &[&str]) -> Command {
            let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
            command
                .arg("--config")
                .arg(config)
                .arg("--state")
                .arg(state)
                .args(args)
                .env_remove("NEXUS_CONFIG")
                .env_remove("NEXUS_STATE")
                .env_remove("NEXUS_TEST_TOKEN")
                .env("NO_COLOR", "1")
                // Its temporary files (the `$NEXUS_OUTPUT` directory) go with the test's:
                // a nexus the test kills with SIGKILL cannot remove them itself.
                .env("TMPDIR", self.tmp.path())
                .stdin(Stdio::null())
                // Its own process group, so the test can kill it and only it.
                .process_group(0);
            command
        }

        /// Starts `command` with its output captured to files.
        pub fn spawn_command(&self, mut command: Command) -> Spawned {
            let n = self.spawned.fetch_add(1, Ordering::SeqCst);
            let out = self.tmp.path().join(format!("nexus-{n}.out"));
            let err = self.tmp.path().join(format!("nexus-{n}.err"));
            command.stdout(File::create(&out).expect("stdout file"));
            command.stderr(File::create(&err).expect("stderr file"));
            let child = command.spawn().expect("the nexus binary starts");
            Spawned { child, out, err, done: false }
        }

        /// A directory for the test's own files (not the pipelines' `dir`).
        pub fn scratch(&self) -> &Path {
            self.tmp.path()
        }

        /// Starts `nexus ARGS…`.
        pub fn spawn(&self, args: &[&str]) -> Spawned {
            self.spawn_command(self.command(args))
        }

        /// Runs `nexus ARGS…` to its end.
        pub fn nexus(&self, args: &[&str]) -> Finished {
            self.spawn(args).wait()
        }

        /// Starts `nexus run PIPELINE --param dir=WORK`.
        pub fn spawn_run(&self, pipeline: &str) -> Spawned {
            self.spawn_command(self.run_command(pipeline))
        }

        /// The command of `nexus run PIPELINE --param dir=WORK`.
        pub fn run_command(&self, pipeline: &str) -> Command {
            let dir = format!("dir={}", self.work.display());
            self.command(&["run", pipeline, "--param", &dir])
        }

        /// Runs `nexus run PIPELINE --param dir=WORK` to its end.
        pub fn run(&self, pipeline: &str) -> Finished {
            self.spawn_run(pipeline).wait()
        }

        /// `nexus runs --output json`, newest first.
        pub fn runs(&self) -> Vec<Value> {
            let done = self.nexus(&["runs", "--output", "json", "--limit", "100"]);
            assert_eq!(done.code, Some(0), "{}", done.dump());
            done.json().as_array().cloned().expect("`runs` prints an array")
        }

        /// One run from `nexus runs --output json`.
        pub fn run_record(&self, id: &str) -> Value {
            self.runs()
                .into_iter()
                .find(|r| r["id"] == id)
                .unwrap_or_else(|| panic!("run {id} is not listed by `nexus runs`"))
        }

        /// `nexus show RUN --output json`.
        pub fn show(&self, id: &str) -> Value {
            let done = self.nexus(&["show", id, "--output", "json"]);
            assert_eq!(done.code, Some(0), "{}", done.dump());
            done.json()
        }

        /// `nexus logs RUN`.
        pub fn logs(&self, id: &str) -> String {
            let done = self.nexus(&["logs", id]);
            assert_eq!(done.code, Some(0), "{}", done.dump());
            done.stdout
        }

        /// Starts `nexus run PIPELINE` and waits until its step has written `start RUN` to
        /// the trace; returns the process and the run id.
        pub fn spawn_run_started(&self, pipeline: &str) -> (Spawned, String) {
            let run = self.spawn_run(pipeline);
            let id = run.run_id();
            wait_until(&format!("the step of run {id} to start"), || self.trace().contains(&format!("start {id}")));
            (run, id)
        }

        /// Lets run A's step end (`WORK/release`); both runs must succeed, B's step having
        /// started only after A's ended.
        pub fn release_and_expect_one_after_the_other(&self, a: Spawned, a_id: &str, b: Spawned, b_id: &str) {
            self.touch("release");
            let (a, b) = (a.wait(), b.wait());
            assert_eq!(a.code, Some(0), "{}", a.dump());
            assert_eq!(b.code, Some(0), "{}", b.dump());
            assert_eq!(
                self.trace(),
                [format!("start {a_id}"), format!("end {a_id}"), format!("start {b_id}"), format!("end {b_id}")]
            );
        }

        /// The lines of `WORK/trace`.
        pub fn trace(&self) -> Vec<String> {
            std::fs::read_to_string(self.work.join("trace")).unwrap_or_default().lines().map(str::to_owned).collect()
        }

        /// Creates `WORK/NAME` (the markers steps wait for).
        pub fn touch(&self, name: &str) {
            std::fs::write(self.work.join(name), "").expect("marker file");
        }
    }

    impl Drop for Env {
        /// Kills what a failed test may have left running: the process groups and pids
        /// the steps recorded in `WORK`.
        fn drop(&mut self) {
            let Ok(entries) = std::fs::read_dir(&self.work) else { return };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = read_pid(&entry.path()) else { continue };
                if name.ends_with(".pgid") {
                    kill(&format!("-{pid}"));
                } else if name.ends_with(".pid") || name == "child" {
                    kill(&pid.to_string());
                }
            }
        }
    }

    impl Spawned {
        /// The run id it announced on stderr (`run <id>: pipeline …`), waiting for it.
        pub fn run_id(&self) -> String {
            let mut found = None;
            wait_until("nexus to announce its run id on stderr", || {
                let text = std::fs::read_to_string(&self.err).unwrap_or_default();
                found = text.lines().find_map(announced_id);
                found.is_some()
            });
            found.expect("run id")
        }

        /// Waits for it to exit, at most [`DEADLINE`]; kills its group and fails after.
        pub fn wait(mut self) -> Finished {
            let start = Instant::now();
            let status = loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    break status;
                }
                if start.elapsed() > DEADLINE {
                    self.kill_group();
                    panic!(
                        "nexus did not exit within {DEADLINE:?}\n--- stderr\n{}",
                        std::fs::read_to_string(&self.err).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            self.done = true;
            Finished {
                code: status.code(),
                stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
                stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
            }
        }

        /// Its process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// SIGKILL to its process group, then reaps it.
        pub fn kill_group(&mut self) {
            kill(&format!("-{}", self.child.id()));
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.done = true;
        }
    }

    impl Drop for Spawned {
        fn drop(&mut self) {
            if !self.done {
                self.kill_group();
            }
        }
    }

    /// `<id>` of a line `[HH:MM:SS ]run <id>: pipeline …`.
    fn announced_id(line: &str) -> Option<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.windows(3).find_map(|w| {
            (w[0] == "run" && w[1].ends_with(':') && w[2] == "pipeline").then(|| w[1].trim_end_matches(':').to_owned())
        })
    }

    /// `kill -KILL -- TARGET` (a pid, or `-PGID` for a group); errors ignored.
    pub fn kill(target: &str) {
        let _ = Command::new("kill").args(["-KILL", "--", target]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Polls `condition` every 25 ms until it holds; fails the test after [`DEADLINE`].
    pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let start = Instant::now();
        while !condition() {
            assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The pid written in `path`, if any.
    pub fn read_pid(path: &Path) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Whether `pid` is gone: no `/proc/<pid>`, or a zombie (state `Z` or `X`).
    pub fn pid_is_dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // `pid (comm) state …`; `comm` may hold spaces and parentheses.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| matches!(state, "Z" | "X" | "x")),
        }
    }

    /// The status of step `id` in a `show` document.
    pub fn status_of(show: &Value, id: &str) -> String {
        show["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["step_id"] == id))
            .and_then(|s| s["status"].as_str())
            .unwrap_or_else(|| panic!("no step `{id}` in {show:#}"))
            .to_owned()
    }

    /// The attempts of step `id` in a `show` document.
    pub fn attempts_of(show: &Value, id: &str) -> Vec<Value> {
        show["attempts"].as_array().into_iter().flatten().filter(|a| a["step_id"] == id).cloned().collect()
    }

    /// The kinds of the events of a `show` document, in order.
    pub fn events_of(show: &Value) -> Vec<String> {
        show["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{} {}", e["kind"].as_str().unwrap_or(""), e["step_id"].as_str().unwrap_or("")))
            .map(|s| s.trim_end().to_owned())
            .collect()
    }
}

/// Starts `crash` (or `crash-idempotent`), waits until step `b` runs, then SIGKILLs
/// `nexus` and its process group, and the step's own process group (the local runner
/// gives each attempt its own group, so it may outlive nexus). Returns the run id.
fn start_and_kill_in_b(env: &Env, pipeline: &str) -> String {
    let mut run = env.spawn_run(pipeline);
    let id = run.run_id();
    wait_until("step b to run", || {
        env.trace().contains(&"b".to_owned()) && status_of(&env.show(&id), "b") == "running"
    });
    run.kill_group();
    if let Some(pgid) = read_pid(&env.work.join("b.pgid")) {
        helper::kill(&format!("-{pgid}"));
        wait_until("the interrupted step's shell to die", || pid_is_dead(pgid));
    }
    assert_eq!(env.trace(), ["a", "b"], "trace when nexus was killed");
    assert_eq!(env.run_record(&id)["status"], "running", "the journal of a killed run still says running");
    id
}

#[test]
fn kill_9_then_resume_asks_about_a_non_idempotent_step_then_reruns_it() {
    let env = Env::new();
    let id = start_and_kill_in_b(&env, "crash");
    // The killed process's scratch directory (its `$NEXUS_OUTPUT` files) is left in the
    // state directory, not in the system's temporary one.
    let leftovers = scratch_dirs(&env);
    assert!(leftovers.len() == 1 && leftovers[0].starts_with(&format!("{id}.")), "{leftovers:?}");
    assert_eq!(nexus_temp_files(&env), Vec::<String>::new());

    let refused = env.nexus(&["resume", &id]);
    assert_eq!(refused.code, Some(2), "{}", refused.dump());
    for needle in ["`b`", "--rerun-interrupted", "--skip-interrupted"] {
        assert!(refused.stderr.contains(needle), "`resume` should name {needle}:\n{}", refused.dump());
    }
    assert_eq!(env.trace(), ["a", "b"], "a refused resume runs nothing");

    env.touch("go");
    let resumed = env.nexus(&["resume", &id, "--rerun-interrupted"]);
    assert_eq!(resumed.code, Some(0), "{}", resumed.dump());
    // `a` ran once, `b` twice (interrupted, then re-run), and `d` read `a`'s output,
    // kept across the crash.
    assert_eq!(env.trace(), ["a", "b", "b", "c", "d from-a"]);
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "succeeded");
    for step in ["a", "b", "c", "d"] {
        assert_eq!(status_of(&show, step), "succeeded", "{step}");
    }
    let b: Vec<String> = attempts_of(&show, "b").iter().map(|a| a["status"].as_str().unwrap().to_owned()).collect();
    assert_eq!(b, ["interrupted", "succeeded"]);
    assert_eq!(attempts_of(&show, "a").len(), 1, "a finished step is never run again");
    assert_eq!(scratch_dirs(&env), Vec::<String>::new(), "the resume removed the dead process's scratch directory");
}

/// The names in `dir` (none if it does not exist).
fn names_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// The scratch directories (`<state>/tmp/<run>.<pid>`) present now.
fn scratch_dirs(env: &Env) -> Vec<String> {
    names_in(&env.state.join("tmp"))
}

/// What nexus put in its `TMPDIR` (the test's directory) under its own names.
fn nexus_temp_files(env: &Env) -> Vec<String> {
    names_in(env.scratch()).into_iter().filter(|name| name.starts_with("nexus-outputs-")).collect()
}

#[test]
fn kill_9_then_resume_reruns_an_idempotent_step_without_asking() {
    let env = Env::new();
    let id = start_and_kill_in_b(&env, "crash-idempotent");
    env.touch("go");
    let resumed = env.nexus(&["resume", &id]);
    assert_eq!(resumed.code, Some(0), "{}", resumed.dump());
    assert_eq!(env.trace(), ["a", "b", "b", "c", "d from-a"]);
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "succeeded");
    assert_eq!(attempts_of(&show, "a").len(), 1);
    assert_eq!(attempts_of(&show, "b").len(), 2);
}

#[test]
fn a_refused_resume_still_asks_and_skip_interrupted_still_skips() {
    let env = Env::new();
    let id = start_and_kill_in_b(&env, "crash");
    assert_eq!(env.nexus(&["resume", &id]).code, Some(2));
    // If the bug stands, `b` re-runs: let it finish at once instead of hanging.
    env.touch("go");
    let again = env.nexus(&["resume", &id]);
    assert_eq!(again.code, Some(2), "a second plain resume must still ask:\n{}", again.dump());
    assert_eq!(env.trace(), ["a", "b"]);
    let skipped = env.nexus(&["resume", &id, "--skip-interrupted"]);
    assert_eq!(env.trace(), ["a", "b"], "--skip-interrupted must not run `b` again:\n{}", skipped.dump());
    assert_eq!(status_of(&env.show(&id), "b"), "skipped");
}

#[test]
fn retry_then_success() {
    let env = Env::new();
    let done = env.run("retry");
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert_eq!(std::fs::read_to_string(env.work.join("count")).unwrap().trim(), "2", "the step ran twice");
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "succeeded");
    assert_eq!(status_of(&show, "flaky"), "succeeded");
    assert_eq!(show["steps"][0]["attempts"], 2);
    let attempts: Vec<(Value, Value)> =
        attempts_of(&show, "flaky").iter().map(|a| (a["status"].clone(), a["exit_code"].clone())).collect();
    assert_eq!(attempts, [("failed".into(), 1.into()), ("succeeded".into(), 0.into())]);
    assert!(events_of(&show).contains(&"step.retrying flaky".to_owned()), "{:?}", events_of(&show));
    let logs = env.logs(&id);
    assert!(logs.contains("attempt 1") && logs.contains("attempt 2"), "{logs}");
    // `nexus show` as text: the attempts as a table, one row each, in columns.
    let text = env.nexus(&["show", &id]).stdout;
    let header = text.lines().position(|l| l.starts_with("STEP") && l.contains("KIND")).expect(&text);
    let rows: Vec<&str> = text.lines().skip(header).take(3).collect();
    let column = |line: &str, word: &str| line.find(word).unwrap_or_else(|| panic!("no `{word}` in `{line}`"));
    assert_eq!(column(rows[1], "failed"), column(rows[0], "STATUS"), "{text}");
    assert_eq!(column(rows[2], "succeeded"), column(rows[0], "STATUS"), "{text}");
    assert!(rows[1].starts_with("flaky") && rows[1].contains("exit 1"), "{text}");
    assert!(rows[2].starts_with("flaky") && rows[2].contains("exit 0"), "{text}");
}

#[test]
fn each_attempt_sees_its_number_in_nexus_attempt() {
    let env = Env::new();
    let done = env.run("retry");
    assert_eq!(done.code, Some(0), "{}", done.dump());
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let logs = env.logs(&id);
    assert!(logs.contains("attempt 1 NEXUS_ATTEMPT=1"), "{logs}");
    assert!(logs.contains("attempt 2 NEXUS_ATTEMPT=2"), "{logs}");
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let env = Env::new();
    let started = std::time::Instant::now();
    let done = env.run("timeout");
    assert_eq!(done.code, Some(1), "{}", done.dump());
    assert!(started.elapsed() < Duration::from_secs(15), "the 1s timeout was not enforced: {:?}", started.elapsed());
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "failed");
    assert_eq!(status_of(&show, "slow"), "failed");
    let attempts = attempts_of(&show, "slow");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["status"], "timed-out", "{attempts:?}");
    assert!(show["run"]["error"].as_str().unwrap_or("").contains("timed out"), "{:#}", show["run"]);
    // The background `sleep` and the inner shell, two levels below the step's shell.
    for file in ["child", "inner.pid"] {
        let pid = read_pid(&env.work.join(file)).unwrap_or_else(|| panic!("the step wrote no {file}"));
        wait_until(&format!("process {pid} ({file}) to be gone"), || pid_is_dead(pid));
    }
}

#[test]
fn an_attempt_killed_by_a_signal_records_it() {
    let env = Env::new();
    let done = env.run("signal");
    assert_eq!(done.code, Some(1), "{}", done.dump());
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let attempt = attempts_of(&env.show(&id), "killed").remove(0);
    assert_eq!(attempt["error"], "killed by signal 15");
    assert_eq!((attempt["exit_code"].clone(), attempt["signal"].clone()), (Value::Null, 15.into()), "{attempt:#}");
}

#[test]
fn cancel_from_another_process() {
    let env = Env::new();
    let run = env.spawn_run("cancel");
    let id = run.run_id();
    wait_until("the long step to start its child", || {
        env.work.join("child").exists() && status_of(&env.show(&id), "long") == "running"
    });
    let cancel = env.nexus(&["cancel", &id]);
    assert_eq!(cancel.code, Some(0), "{}", cancel.dump());
    let done = run.wait();
    assert_eq!(done.code, Some(1), "{}", done.dump());
    assert_eq!(env.run_record(&id)["status"], "cancelled");
    let show = env.show(&id);
    assert_eq!(status_of(&show, "long"), "cancelled");
    assert_eq!(attempts_of(&show, "long")[0]["status"], "cancelled");
    assert_ne!(status_of(&show, "after"), "succeeded");
    assert!(env.trace().is_empty(), "nothing runs after a cancellation: {:?}", env.trace());
    for file in ["long.pgid", "child"] {
        let pid = read_pid(&env.work.join(file)).expect("pid file");
        wait_until(&format!("process {pid} ({file}) to be gone"), || pid_is_dead(pid));
    }
}

#[test]
fn rollback_runs_latest_first_then_on_failure_then_finally() {
    let env = Env::new();
    let done = env.run("rollback");
    assert_eq!(done.code, Some(1), "{}", done.dump());
    assert_eq!(env.trace(), ["a", "b", "c", "rb-b", "rb-a", "on-failure", "finally"]);
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "failed");
    assert_eq!(status_of(&show, "a"), "rolled-back");
    assert_eq!(status_of(&show, "b"), "rolled-back");
    assert_eq!(status_of(&show, "c"), "failed");
    assert_eq!(status_of(&show, "finally"), "succeeded");
    let events = events_of(&show);
    let rolled: Vec<&String> = events.iter().filter(|e| e.starts_with("step.rolled-back")).collect();
    assert_eq!(rolled, ["step.rolled-back b", "step.rolled-back a"]);
}

#[test]
fn rollback_command_undoes_a_finished_run_latest_first() {
    let env = Env::new();
    assert_eq!(env.run("rollback-later").code, Some(0));
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let done = env.nexus(&["rollback", &id]);
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert_eq!(env.trace(), ["a", "b", "rb-b", "rb-a"]);
    let show = env.show(&id);
    assert_eq!(status_of(&show, "a"), "rolled-back");
    assert_eq!(status_of(&show, "b"), "rolled-back");
    let rollback_attempts: Vec<Value> =
        attempts_of(&show, "a").into_iter().filter(|a| a["kind"] == "rollback").collect();
    assert_eq!(rollback_attempts.len(), 1);
    assert_eq!(rollback_attempts[0]["status"], "succeeded", "{rollback_attempts:?}");
    // Nothing left to undo the second time.
    let again = env.nexus(&["rollback", &id]);
    assert_eq!(again.code, Some(0), "{}", again.dump());
    assert_eq!(env.trace(), ["a", "b", "rb-b", "rb-a"]);
}

#[test]
fn a_run_past_its_timeout_fails_and_still_runs_finally() {
    let env = Env::new();
    let done = env.run("run-timeout");
    assert_eq!(done.code, Some(1), "{}", done.dump());
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "failed");
    assert!(show["run"]["error"].as_str().unwrap_or_default().contains("exceeded its timeout"), "{:#}", show["run"]);
    assert_eq!(status_of(&show, "long"), "cancelled");
    assert_eq!(env.trace(), ["cleanup"]);
}

#[test]
fn a_finished_run_has_no_pending_step() {
    let env = Env::new();
    assert_eq!(env.run("rollback").code, Some(1));
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(status_of(&show, "on-success"), "skipped", "{:#}", show["steps"]);
}

#[test]
fn outputs_flow_between_steps() {
    let env = Env::new();
    let done = env.run("outputs");
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert_eq!(std::fs::read_to_string(env.work.join("answer")).unwrap(), "42\n");
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    let one = show["steps"].as_array().unwrap().iter().find(|s| s["step_id"] == "one").unwrap();
    let outputs: Value = serde_json::from_str(one["outputs_json"].as_str().unwrap()).unwrap();
    assert_eq!(outputs, serde_json::json!({"answer": "42"}));
    // The `$NEXUS_OUTPUT` files were in the run's scratch directory, gone with the run.
    assert_eq!(scratch_dirs(&env), Vec::<String>::new());
    assert_eq!(nexus_temp_files(&env), Vec::<String>::new());
}

/// Starts `approval` and waits until its gate waits; checks nothing ran meanwhile.
fn start_waiting_for_approval(env: &Env) -> (helper::Spawned, String) {
    let run = env.spawn_run("approval");
    let id = run.run_id();
    wait_until("the gate to wait for an approval", || status_of(&env.show(&id), "gate") == "waiting-approval");
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "running");
    assert_eq!(status_of(&show, "after"), "pending");
    assert!(events_of(&show).contains(&"approval.requested gate".to_owned()));
    (run, id)
}

#[test]
fn approval_granted_or_rejected_from_another_process() {
    let env = Env::new();
    let (run, id) = start_waiting_for_approval(&env);
    assert!(env.trace().is_empty());
    let approve = env.nexus(&["approve", &id, "gate"]);
    assert_eq!(approve.code, Some(0), "{}", approve.dump());
    let done = run.wait();
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert_eq!(env.trace(), ["after"]);
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "succeeded");
    assert_eq!(status_of(&show, "gate"), "succeeded");
    assert_eq!(show["approvals"][0]["approved"], true);
    assert!(events_of(&show).contains(&"approval.granted gate".to_owned()));

    std::fs::remove_file(env.work.join("trace")).unwrap();
    let (run, id) = start_waiting_for_approval(&env);
    let reject = env.nexus(&["approve", &id, "gate", "--reject"]);
    assert_eq!(reject.code, Some(0), "{}", reject.dump());
    let done = run.wait();
    assert_eq!(done.code, Some(1), "{}", done.dump());
    assert!(env.trace().is_empty(), "the step after a rejected gate ran");
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "failed");
    assert_eq!(status_of(&show, "gate"), "failed");
    assert_eq!(status_of(&show, "after"), "skipped");
    assert_eq!(show["approvals"][0]["approved"], false);
    assert!(events_of(&show).contains(&"approval.rejected gate".to_owned()));
}

#[test]
fn concurrency_group_queue_waits_for_the_running_run() {
    let env = Env::new();
    let (a, a_id) = env.spawn_run_started("group-queue");
    let b = env.spawn_run("group-queue");
    let b_id = b.run_id();
    // B has seen A and decided to wait.
    wait_until("run B to queue", || events_of(&env.show(&b_id)).contains(&"run.queued".to_owned()));
    assert_eq!(env.run_record(&b_id)["status"], "queued");
    assert_eq!(env.run_record(&a_id)["status"], "running");
    assert_eq!(env.trace(), [format!("start {a_id}")], "B must not start while A runs");

    env.release_and_expect_one_after_the_other(a, &a_id, b, &b_id);
    let (a_rec, b_rec) = (env.run_record(&a_id), env.run_record(&b_id));
    assert_eq!(b_rec["status"], "succeeded");
    assert!(
        b_rec["started_at"].as_i64().unwrap() >= a_rec["finished_at"].as_i64().unwrap(),
        "B started before A finished: {a_rec:#} {b_rec:#}"
    );
}

#[test]
fn concurrency_group_skip_skips_while_another_run_is_active() {
    let env = Env::new();
    let (a, a_id) = env.spawn_run_started("group-skip");
    let started = std::time::Instant::now();
    let b = env.spawn_run("group-skip");
    let b_id = b.run_id();
    let b = b.wait();
    assert!(started.elapsed() < Duration::from_secs(5), "B took {:?} to give up", started.elapsed());
    // Exit 1 today; the documented codes do not mention a skipped run, so any
    // non-crash code is accepted here.
    assert!(matches!(b.code, Some(0 | 1)), "{}", b.dump());
    assert_eq!(env.run_record(&b_id)["status"], "skipped");
    assert_eq!(env.run_record(&a_id)["status"], "running", "A still runs when B has given up");
    assert_eq!(env.trace(), [format!("start {a_id}")], "B's step never ran");

    env.touch("release");
    let a = a.wait();
    assert_eq!(a.code, Some(0), "{}", a.dump());
    assert_eq!(env.run_record(&a_id)["status"], "succeeded");
    assert_eq!(env.trace(), [format!("start {a_id}"), format!("end {a_id}")]);
}

#[test]
fn secrets_appear_nowhere() {
    const VALUE: &str = "s3cr3t-value-9f";
    const BASE64: &str = "czNjcjN0LXZhbHVlLTlm"; // printf %s s3cr3t-value-9f | base64
    fn leaks(bytes: &[u8]) -> Option<&'static str> {
        [VALUE, BASE64].into_iter().find(|needle| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() { files(&path, out) } else { out.push(path) }
        }
    }
    fn check_state_dir(env: &Env) -> Vec<String> {
        let mut all = Vec::new();
        files(&env.state, &mut all);
        for path in &all {
            // A file may vanish between listing and reading (WAL checkpoint).
            let Ok(bytes) = std::fs::read(path) else { continue };
            assert_eq!(leaks(&bytes), None, "the secret is in {}", path.display());
        }
        all.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    let env = Env::new();
    let mut command = env.run_command("secret");
    command.env("NEXUS_TEST_TOKEN", VALUE);
    let run = env.spawn_command(command);
    let id = run.run_id();
    wait_until("the leaking step to finish", || status_of(&env.show(&id), "hold") == "running");
    // The step did receive the secret (else this test would prove nothing).
    assert_eq!(std::fs::read_to_string(env.work.join("seen")).unwrap(), VALUE);
    // Mid-run, with the store's WAL in use.
    let names = check_state_dir(&env);
    assert!(names.iter().any(|n| n == "state.db-wal"), "the WAL was not there to check: {names:?}");

    env.touch("go");
    let done = run.wait();
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert_eq!(leaks(done.stdout.as_bytes()), None, "`run` stdout:\n{}", done.stdout);
    assert_eq!(leaks(done.stderr.as_bytes()), None, "`run` stderr:\n{}", done.stderr);
    check_state_dir(&env);

    let logs = env.logs(&id);
    assert_eq!(leaks(logs.as_bytes()), None, "`nexus logs`:\n{logs}");
    for line in ["plain ***", "template ***", "to stderr ***"] {
        assert!(logs.contains(line), "the redacted line `{line}` is missing from the logs:\n{logs}");
    }
    let json = env.nexus(&["logs", &id, "--output", "json"]);
    assert_eq!(leaks(json.stdout.as_bytes()), None, "`nexus logs --output json`:\n{}", json.stdout);
    let show = env.nexus(&["show", &id, "--output", "json"]);
    assert_eq!(leaks(show.stdout.as_bytes()), None, "`nexus show --output json`:\n{}", show.stdout);
    let show_text = env.nexus(&["show", &id]);
    assert_eq!(leaks(show_text.stdout.as_bytes()), None, "`nexus show`:\n{}", show_text.stdout);
    let runs = env.nexus(&["runs", "--output", "json"]);
    assert_eq!(leaks(runs.stdout.as_bytes()), None, "`nexus runs`:\n{}", runs.stdout);
    // The output the step wrote is recorded, redacted.
    let leak = show.json()["steps"].as_array().unwrap().iter().find(|s| s["step_id"] == "leak").cloned().unwrap();
    assert_eq!(leak["outputs_json"], r#"{"leaked":"***"}"#);
}

#[test]
fn false_if_skips_failed_need_skips_continue_on_error_goes_on() {
    let env = Env::new();
    let done = env.run("conditions");
    assert_eq!(done.code, Some(1), "{}", done.dump());
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "failed");
    assert_eq!(status_of(&show, "never"), "skipped");
    assert_eq!(status_of(&show, "always"), "succeeded");
    assert_eq!(status_of(&show, "breaks"), "failed");
    assert_eq!(status_of(&show, "after-break"), "skipped");
    assert!(attempts_of(&show, "never").is_empty() && attempts_of(&show, "after-break").is_empty());
    let mut trace = env.trace();
    trace.sort();
    assert_eq!(trace, ["always", "breaks"]);

    // A failed `continue_on_error` step lets its dependents run, and (engine/mod.rs:
    // a run fails only for a failed step without it) the run succeeds.
    std::fs::remove_file(env.work.join("trace")).unwrap();
    let done = env.run("soft-failure");
    assert_eq!(done.code, Some(0), "{}", done.dump());
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let show = env.show(&id);
    assert_eq!(show["run"]["status"], "succeeded");
    assert_eq!(status_of(&show, "soft"), "failed");
    assert_eq!(status_of(&show, "after-soft"), "succeeded");
    assert_eq!(env.trace(), ["soft", "after-soft"]);
}

#[test]
fn retry_from_a_step_reuses_upstream_outputs() {
    let env = Env::new();
    let first = env.run("retry-from");
    assert_eq!(first.code, Some(1), "{}", first.dump());
    let old = env.runs()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(env.trace(), ["up", "down 7"]);

    env.touch("fixed");
    let retry = env.spawn(&["retry", &old, "--from", "down"]);
    let new = retry.run_id();
    let retry = retry.wait();
    assert_eq!(retry.code, Some(0), "{}", retry.dump());
    assert_ne!(new, old);
    assert_eq!(env.trace(), ["up", "down 7", "down 7"], "`up` ran once; its output was reused");
    let record = env.run_record(&new);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["parent_run"], old.as_str());
    let show = env.show(&new);
    assert_eq!(status_of(&show, "up"), "succeeded");
    assert!(attempts_of(&show, "up").is_empty(), "no attempt of `up` in the retry");
    assert_eq!(attempts_of(&show, "down").len(), 1);
    assert_eq!(env.run_record(&old)["status"], "failed", "the retried run is left as it was");
}

#[test]
fn concurrency_group_cancel_running_cancels_the_running_run() {
    let env = Env::new();
    let (a, a_id) = env.spawn_run_started("group-cancel");
    let b = env.spawn_run("group-cancel");
    let b_id = b.run_id();
    let a = a.wait();
    assert_eq!(a.code, Some(1), "A is cancelled by B: {}", a.dump());
    assert_eq!(env.run_record(&a_id)["status"], "cancelled");
    let a_pgid = read_pid(&env.work.join(format!("{a_id}.pgid"))).expect("A's step recorded its group");
    wait_until("A's step processes to be gone", || pid_is_dead(a_pgid));
    wait_until("run B's step to start", || env.trace().contains(&format!("start {b_id}")));

    env.touch("release");
    let b = b.wait();
    assert_eq!(b.code, Some(0), "{}", b.dump());
    assert_eq!(env.run_record(&b_id)["status"], "succeeded");
    assert_eq!(env.trace(), [format!("start {a_id}"), format!("start {b_id}"), format!("end {b_id}")]);
}

#[test]
fn a_named_lock_is_held_across_runs_and_processes() {
    let env = Env::new();
    let (a, a_id) = env.spawn_run_started("locked");
    let b = env.spawn_run("locked");
    let b_id = b.run_id();
    // B is running and has retried the lock at two heartbeats at least, in vain.
    wait_until("run B to be running", || env.run_record(&b_id)["status"] == "running");
    let beat = |env: &Env| env.show(&b_id)["run"]["heartbeat_at"].as_i64().expect("heartbeat_at");
    let first_beat = beat(&env);
    wait_until("two more heartbeats of run B", || beat(&env) >= first_beat + 2 * 250);
    assert_eq!(env.trace(), [format!("start {a_id}")], "B must not take lock `db` while A holds it");
    assert_eq!(status_of(&env.show(&b_id), "work"), "pending");

    env.release_and_expect_one_after_the_other(a, &a_id, b, &b_id);
}

#[test]
fn the_run_parallelism_bounds_the_steps_running_at_once() {
    let env = Env::new();
    let done = env.run("parallel");
    assert_eq!(done.code, Some(0), "{}", done.dump());
    // Each step wrote how many steps were running when it started, itself included.
    let counts: Vec<u32> = env.trace().iter().map(|l| l.trim().parse().expect("a count")).collect();
    assert_eq!(counts.len(), 6, "{counts:?}");
    assert!(counts.iter().all(|&n| (1..=2).contains(&n)), "more than 2 at once: {counts:?}");
    assert!(counts.contains(&2), "the steps never ran side by side: {counts:?}");
}

#[test]
fn a_saved_plan_runs_and_is_refused_once_the_registries_change() {
    let env = Env::new();
    let config = env.scratch().join("config");
    std::fs::create_dir_all(&config).unwrap();
    for entry in std::fs::read_dir(helper::config()).unwrap().flatten() {
        std::fs::copy(entry.path(), config.join(entry.file_name())).unwrap();
    }
    let plan = env.scratch().join("outputs.plan.json");
    let dir = format!("dir={}", env.work.display());
    let plan_arg = plan.to_str().unwrap();
    let saved = env
        .spawn_command(env.command_at(&config, &env.state, &["plan", "outputs", "--param", &dir, "--save", plan_arg]))
        .wait();
    assert_eq!(saved.code, Some(0), "{}", saved.dump());
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(stored["pipeline"], "outputs");

    let ran = env.spawn_command(env.command_at(&config, &env.state, &["run", "--plan", plan_arg])).wait();
    assert_eq!(ran.code, Some(0), "{}", ran.dump());
    let answer = env.work.join("answer");
    assert_eq!(std::fs::read_to_string(&answer).unwrap().trim(), "42", "the saved plan's steps ran");
    std::fs::remove_file(&answer).unwrap();

    let orchestration = config.join("orchestration_registry.yaml");
    let text = std::fs::read_to_string(&orchestration).unwrap();
    std::fs::write(&orchestration, text.replace("timeout: 2m", "timeout: 3m")).unwrap();
    let refused = env.spawn_command(env.command_at(&config, &env.state, &["run", "--plan", plan_arg])).wait();
    assert_eq!(refused.code, Some(2), "{}", refused.dump());
    assert!(refused.stderr.contains("changed"), "the refusal says why: {}", refused.dump());
    assert!(!answer.exists(), "a refused plan runs nothing");
}

#[test]
fn graph_draws_the_dag_as_dot_and_mermaid() {
    let env = Env::new();
    let dot = env.nexus(&["graph", "outputs", "--format", "dot", "--param", "dir=/unused"]);
    assert_eq!(dot.code, Some(0), "{}", dot.dump());
    assert!(dot.stdout.starts_with("digraph \"outputs\" {"), "{}", dot.dump());
    assert!(dot.stdout.contains("\"one\" -> \"two\";"), "{}", dot.dump());
    let mermaid = env.nexus(&["graph", "outputs", "--format", "mermaid", "--param", "dir=/unused"]);
    assert_eq!(mermaid.code, Some(0), "{}", mermaid.dump());
    assert!(mermaid.stdout.starts_with("flowchart LR"), "{}", mermaid.dump());
    assert!(mermaid.stdout.contains("one --> two"), "{}", mermaid.dump());
}

#[test]
fn logs_follow_streams_a_running_step_until_the_run_ends() {
    let env = Env::new();
    let run = env.spawn_run("follow");
    let id = run.run_id();
    let follow = env.spawn(&["logs", &id, "--follow"]);
    wait_until("`logs --follow` to print the first line", || {
        std::fs::read_to_string(&follow.out).unwrap_or_default().contains("first line")
    });
    assert!(!std::fs::read_to_string(&follow.out).unwrap_or_default().contains("last line"));
    env.touch("release");
    let (run, follow) = (run.wait(), follow.wait());
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert_eq!(follow.code, Some(0), "`logs --follow` ends with the run: {}", follow.dump());
    assert!(follow.stdout.contains("last line"), "{}", follow.dump());
}

#[test]
fn exit_codes_tell_usage_from_failure_from_internal_errors() {
    let env = Env::new();
    let unknown = env.nexus(&["run", "no-such-pipeline"]);
    assert_eq!(unknown.code, Some(2), "{}", unknown.dump());
    assert!(unknown.stderr.contains("unknown pipeline `no-such-pipeline`"), "{}", unknown.dump());
    let failed = env.run("signal");
    assert_eq!(failed.code, Some(1), "{}", failed.dump());
    // A state directory that cannot exist (under a file): the store cannot be opened.
    let file = env.scratch().join("a-file");
    std::fs::write(&file, "").unwrap();
    let command = env.command_at(&helper::config(), &file.join("state"), &["run", "outputs", "--param", "dir=/unused"]);
    let internal = env.spawn_command(command).wait();
    assert_eq!(internal.code, Some(3), "{}", internal.dump());
    assert!(internal.stderr.contains("cannot open the state store"), "{}", internal.dump());
}

#[test]
fn a_runner_max_parallel_bounds_its_steps_under_a_wider_run() {
    let env = Env::new();
    let done = env.run("narrow");
    assert_eq!(done.code, Some(0), "{}", done.dump());
    // Each step wrote how many steps were running when it started, itself included.
    assert_eq!(env.trace(), ["1", "1", "1", "1"], "runner `narrow` runs one step at a time");
}

#[test]
fn retry_on_exit_codes_retries_only_the_listed_codes() {
    let env = Env::new();
    // Exit 3, not listed: one attempt, the step fails.
    let failed = env.run("exit-codes");
    assert_eq!(failed.code, Some(1), "{}", failed.dump());
    assert_eq!(env.trace(), ["attempt 1"]);
    let id = env.runs()[0]["id"].as_str().unwrap().to_owned();
    let attempts = attempts_of(&env.show(&id), "pick");
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["exit_code"], 3);

    // Exit 75, listed: retried, and the second attempt succeeds.
    std::fs::remove_file(env.work.join("trace")).unwrap();
    env.touch("flaky");
    let retried = env.run("exit-codes");
    assert_eq!(retried.code, Some(0), "{}", retried.dump());
    assert_eq!(env.trace(), ["attempt 1", "attempt 2"]);
}

#[test]
fn sigint_cancels_gracefully_and_stops_the_steps() {
    let env = Env::new();
    let run = env.spawn_run("cancel");
    let id = run.run_id();
    wait_until("the long step to start its child", || {
        env.work.join("child").exists() && status_of(&env.show(&id), "long") == "running"
    });
    // Ctrl-C: SIGINT to nexus alone (not its group), as a terminal's first Ctrl-C is
    // handled by nexus, which stops the step's own process group.
    let pid = run.pid().to_string();
    let sent = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success());
    let done = run.wait();
    assert_eq!(done.code, Some(1), "{}", done.dump());
    assert!(done.stderr.contains("stopping: cancelling running steps"), "{}", done.dump());
    assert_eq!(env.run_record(&id)["status"], "cancelled");
    assert_eq!(status_of(&env.show(&id), "long"), "cancelled");
    assert!(env.trace().is_empty(), "nothing runs after a cancellation: {:?}", env.trace());
    for file in ["long.pgid", "child"] {
        let pid = read_pid(&env.work.join(file)).expect("pid file");
        wait_until(&format!("process {pid} ({file}) to be gone"), || pid_is_dead(pid));
    }
}
