//! The `local` runner's execution.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::SystemTime;

use async_trait::async_trait;
use nexus_core::traits::{LogSink, Outcome, Program, Runner, Stream, Task, sleep_until_some};
use nexus_core::{Error, ErrorKind, Result};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::group::ProcessGroup;
use crate::{LOCAL_KIND, LocalSpec};
use nexus_core::lines::pump;
use nexus_core::outputs::read_outputs_file as read_outputs;

/// How often a stopping process group is checked for live members.
const POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// How long the output pipes are still read once every process of the group is gone (a
/// detached process may hold them open forever).
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long to wait for the main process to be reaped after SIGKILL.
const REAP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs step attempts as local processes (see the crate documentation).
#[derive(Debug)]
pub struct LocalRunner {
    spec: LocalSpec,
    /// For tasks without a scratch directory (built outside the engine): a private
    /// (0700) temporary directory for their `$NEXUS_OUTPUT` files, created on first use.
    outputs_dir: std::sync::OnceLock<tempfile::TempDir>,
    /// `/dev/null`, opened once (`None` if it cannot be): an attempt's stdin is a
    /// duplicate of it (one `dup` instead of an `open` per attempt).
    dev_null: std::sync::OnceLock<Option<std::fs::File>>,
}

impl LocalRunner {
    /// A runner with these settings.
    pub fn new(spec: LocalSpec) -> Self {
        LocalRunner { spec, outputs_dir: std::sync::OnceLock::new(), dev_null: std::sync::OnceLock::new() }
    }

    /// An attempt's stdin: nothing to read.
    fn stdin(&self) -> Stdio {
        let null = self.dev_null.get_or_init(|| std::fs::File::open("/dev/null").ok());
        null.as_ref().and_then(|f| f.try_clone().ok()).map_or_else(Stdio::null, Stdio::from)
    }

    /// The program to start, its arguments, and how to name it in errors.
    fn program<'t>(&'t self, task: &'t Task) -> Result<(&'t str, Vec<&'t str>)> {
        match &task.program {
            Program::Shell { shell, script } => {
                let shell = if shell.trim().is_empty() { self.spec.shell.as_str() } else { shell.as_str() };
                Ok((shell, vec!["-c", script.as_str()]))
            }
            Program::Argv(argv) => match argv.split_first() {
                Some((program, args)) if !program.is_empty() => {
                    Ok((program.as_str(), args.iter().map(String::as_str).collect()))
                }
                _ => Err(step_error(
                    ErrorKind::InvalidConfig,
                    task,
                    "the program to run is empty (`argv` has no program name)",
                )),
            },
            _ => {
                Err(step_error(ErrorKind::Unsupported, task, "the local runner does not support this kind of program"))
            }
        }
    }

    /// The attempt's working directory: the task's, resolved against the spec's base.
    fn working_dir(&self, task: &Task) -> Option<PathBuf> {
        let base = self.spec.working_dir.as_deref().map(Path::new);
        match (base, task.working_dir.as_deref().map(Path::new)) {
            (Some(base), Some(dir)) => Some(base.join(dir)), // `join` keeps an absolute `dir`
            (None, Some(dir)) => Some(dir.to_owned()),
            (Some(base), None) => Some(base.to_owned()),
            (None, None) => None,
        }
    }

    fn command(&self, task: &Task, program: &str, args: &[&str], output_file: &Path) -> Result<Command> {
        let mut command = Command::new(program);
        command.args(args);
        if !self.spec.inherit_env {
            command.env_clear();
        }
        command
            .envs(&self.spec.env)
            .envs(task.env.iter().map(|(k, v)| (k, v)))
            .envs(task.secrets.iter().map(|(k, v)| (k, v.expose())))
            .env("NEXUS_OUTPUT", output_file)
            .env("NEXUS_RUN_ID", &task.run_id)
            .env("NEXUS_STEP_ID", &task.step_id)
            .env("NEXUS_ATTEMPT", task.attempt.to_string());
        if let Some(dir) = self.working_dir(task) {
            if !dir.is_dir() {
                return Err(step_error(
                    ErrorKind::NotFound,
                    task,
                    format!("working directory `{}` does not exist or is not a directory", dir.display()),
                )
                .with_context("working_dir", dir.display()));
            }
            command.current_dir(dir);
        }
        command
            .stdin(self.stdin())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that stopping the attempt stops all it started.
            .process_group(0)
            .kill_on_drop(true);
        Ok(command)
    }
}

/// Why the main loop stopped waiting.
enum Stop {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
}

/// An attempt's `$NEXUS_OUTPUT` path; the file, if the step created it, is removed on drop.
struct OutputFile(std::path::PathBuf);

impl Drop for OutputFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Numbers the `$NEXUS_OUTPUT` paths of the process: every local runner instance of a run
/// shares the run's scratch directory.
static NEXT_OUTPUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl LocalRunner {
    /// A fresh, not yet existing path for the attempt's `$NEXUS_OUTPUT` file, in the run's
    /// scratch directory (or the runner's own temporary one). The file exists only if the
    /// step writes it, which spares two file-system operations per attempt.
    fn output_path(&self, task: &Task) -> Result<std::path::PathBuf> {
        let n = NEXT_OUTPUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{LOCAL_KIND}-output-{n}");
        if let Some(scratch) = &task.scratch_dir {
            return Ok(scratch.join(name));
        }
        let dir = match self.outputs_dir.get() {
            Some(d) => d,
            None => {
                let created = tempfile::Builder::new().prefix("nexus-outputs-").tempdir().map_err(|e| {
                    step_error(
                        ErrorKind::Unavailable,
                        task,
                        "cannot create a directory for $NEXUS_OUTPUT files in the temporary directory",
                    )
                    .with_source(e)
                })?;
                // Another attempt may have won the race; its directory is as good.
                let _ = self.outputs_dir.set(created);
                self.outputs_dir.get().expect("set above")
            }
        };
        Ok(dir.path().join(name))
    }
}

#[async_trait]
impl Runner for LocalRunner {
    async fn run(&self, task: &Task, logs: &dyn LogSink, cancel: CancellationToken) -> Result<Outcome> {
        if cancel.is_cancelled() {
            return Err(step_error(ErrorKind::Cancelled, task, "cancelled before it started"));
        }
        let (program, args) = self.program(task)?;
        let output_file = OutputFile(self.output_path(task)?);
        let mut command = self.command(task, program, &args, &output_file.0)?;

        let started = SystemTime::now();
        let deadline = task.timeout.map(|t| Instant::now() + t);
        let mut child = command.spawn().map_err(|e| spawn_error(task, program, e))?;
        let Some(group) = child.id().and_then(ProcessGroup::new) else {
            return Err(step_error(ErrorKind::Internal, task, "the process started but has no usable pid"));
        };
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let io = async move {
            tokio::join!(pump(stdout, Stream::Stdout, logs), pump(stderr, Stream::Stderr, logs));
        };
        let mut io = std::pin::pin!(io);
        let mut io_done = false;

        let stop = loop {
            tokio::select! {
                biased;
                status = child.wait() => break Stop::Exited(status.map_err(|e| wait_error(task, e))?),
                () = sleep_until_some(deadline) => break Stop::TimedOut,
                () = cancel.cancelled() => break Stop::Cancelled,
                () = &mut io, if !io_done => io_done = true,
            }
        };
        let reaped = matches!(stop, Stop::Exited(_));
        let grace = self.spec.kill_grace.get();
        let stopped = shutdown(group, &mut child, io.as_mut(), io_done, reaped, grace).await;
        if stopped.output_left_open {
            logs.line(
                Stream::Stderr,
                "nexus: stopped reading output still held open by a process outside the step's process group",
            );
        }
        let finished = SystemTime::now();

        let how = if stopped.killed {
            format!(
                "its processes were killed with SIGKILL after a {} grace period",
                nexus_core::model::Duration(grace)
            )
        } else {
            "its processes were stopped with SIGTERM".to_owned()
        };
        match stop {
            Stop::TimedOut => {
                let limit = nexus_core::model::Duration(task.timeout.unwrap_or_default());
                Err(step_error(ErrorKind::Timeout, task, format!("timed out after {limit}; {how}")))
            }
            Stop::Cancelled => Err(step_error(ErrorKind::Cancelled, task, format!("cancelled; {how}"))),
            Stop::Exited(status) => {
                let (outputs, notes) = read_outputs(&output_file.0);
                for note in notes {
                    logs.line(Stream::Stderr, &format!("nexus: {note}"));
                }
                drop(output_file); // deletes it, if the step wrote it
                let mut outcome = Outcome::exited(0, started, finished);
                outcome.exit_code = status.code();
                outcome.signal = status.signal();
                outcome.outputs = outputs;
                Ok(outcome)
            }
        }
    }
}

/// What stopping the group took.
struct Stopped {
    /// SIGKILL was needed.
    killed: bool,
    /// The output pipes were still open when reading them was given up.
    output_left_open: bool,
}

/// Stops what is left of the attempt's process group: everything on timeout or cancel
/// (the main process is not `reaped` yet), the processes left behind after the main one
/// exited otherwise. SIGTERM, up to `grace` for them to exit, then SIGKILL. Then reads
/// what is left of the output.
async fn shutdown(
    group: ProcessGroup,
    child: &mut Child,
    mut io: Pin<&mut impl Future<Output = ()>>,
    mut io_done: bool,
    mut reaped: bool,
    grace: std::time::Duration,
) -> Stopped {
    let mut killed = false;
    if !reaped || group.has_live_member() {
        group.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while !reaped || group.has_live_member() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::select! {
                biased;
                // An error means the child can no longer be waited for: it is gone too.
                _ = child.wait(), if !reaped => reaped = true,
                () = &mut io, if !io_done => io_done = true,
                () = sleep(POLL.min(deadline - now)) => {}
            }
        }
        if !reaped || group.has_live_member() {
            group.signal(Signal::SIGKILL);
            killed = true;
        }
    }
    if !reaped {
        let _ = timeout(REAP_LIMIT, child.wait()).await;
    }
    group.finish();
    let output_left_open = !io_done && timeout(DRAIN_LIMIT, io).await.is_err();
    Stopped { killed, output_left_open }
}

/// An error about the attempt of `task`.
fn step_error(kind: ErrorKind, task: &Task, what: impl std::fmt::Display) -> Error {
    task.error(kind, LOCAL_KIND, what)
}

fn spawn_error(task: &Task, program: &str, e: std::io::Error) -> Error {
    let (kind, what) = match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOENT) => (
            ErrorKind::NotFound,
            format!("program `{program}` not found: check its name, or install it and make sure it is on PATH"),
        ),
        Some(Errno::EACCES | Errno::EPERM) => (
            ErrorKind::PermissionDenied,
            format!("program `{program}` cannot be executed: check that it is a file and has the execute permission"),
        ),
        Some(Errno::ENOEXEC) => (
            ErrorKind::InvalidConfig,
            format!("`{program}` is not an executable format: give a script a `#!` line, or run it through a shell"),
        ),
        Some(Errno::E2BIG) => {
            (ErrorKind::InvalidConfig, format!("cannot start `{program}`: its arguments and environment are too large"))
        }
        Some(Errno::EAGAIN | Errno::ENOMEM | Errno::EMFILE | Errno::ENFILE) => {
            (ErrorKind::Unavailable, format!("cannot start `{program}` now: the system is out of resources"))
        }
        _ => (ErrorKind::Internal, format!("cannot start `{program}`")),
    };
    step_error(kind, task, what).with_context("program", program).with_source(e)
}

fn wait_error(task: &Task, e: std::io::Error) -> Error {
    step_error(ErrorKind::Internal, task, "lost track of the process").with_source(e)
}
