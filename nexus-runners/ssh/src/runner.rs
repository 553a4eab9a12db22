//! The `ssh` runner's execution on one host (see the crate documentation).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use nexus_core::traits::{LogSink, Outcome, Program, Runner, Stream, Task, sleep_until_some};
use nexus_core::{Error, ErrorKind, Result};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::script::{self, Stopped, WrapperError};
use crate::{SSH_KIND, SshSpec};
use nexus_core::lines::pump;
use nexus_core::outputs::read_outputs_bytes as read_outputs;

/// The remote command of every channel: a POSIX shell reading its script from stdin.
/// `exec` works in every login shell (sh, bash, zsh, fish, tcsh).
const REMOTE_SHELL: &str = "exec sh -s";
/// How long a master connection stays up with no step running on it.
const IDLE_PERSIST_SECS: usize = 60;
/// Keep-alive probes on the master connection, so that a dead host is noticed.
const SERVER_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);
/// How long the output is still read, without anything arriving, once the step's
/// processes are gone (a detached process may hold it open forever).
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest output is still read for, once the step's processes are gone.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a stopped step's channel gets to close, after its processes were killed.
const REAP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Added to the grace period for a stop or finish script to answer.
const SCRIPT_MARGIN: std::time::Duration = std::time::Duration::from_secs(20);

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Session>>>>;

/// Runs step attempts on one remote host or on a group of hosts, over SSH (see the
/// crate documentation).
pub struct SshRunner {
    pub(crate) spec: SshSpec,
    /// One master connection per host, opened on first use and reused by later attempts.
    sessions: Mutex<HashMap<String, Slot>>,
    control_dir: PathBuf,
}

impl std::fmt::Debug for SshRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshRunner").field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// Why waiting stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupt {
    TimedOut,
    Cancelled,
}

/// Runs `fut` until it completes, the deadline passes or `cancel` fires.
pub(crate) async fn race<T>(
    fut: impl std::future::Future<Output = T>,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> std::result::Result<T, Interrupt> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(Interrupt::Cancelled),
        () = sleep_until_some(deadline) => Err(Interrupt::TimedOut),
        value = fut => Ok(value),
    }
}

/// What runs on the remote host for one attempt.
struct Plan<'t> {
    argv: Vec<&'t str>,
    env: Vec<(&'t str, &'t str)>,
    working_dir: Option<&'t str>,
}

impl SshRunner {
    /// A runner with these settings (validated by the kind's `validate` first).
    pub fn new(spec: SshSpec) -> Self {
        SshRunner { spec, sessions: Mutex::new(HashMap::new()), control_dir: std::env::temp_dir() }
    }

    /// The hosts an attempt runs on.
    pub(crate) fn hosts(&self) -> Vec<&str> {
        match (&self.spec.host, &self.spec.hosts) {
            (Some(host), _) => vec![host.as_str()],
            (None, Some(hosts)) => hosts.iter().map(String::as_str).collect(),
            (None, None) => Vec::new(),
        }
    }

    /// `host:port` (`[v6]:port`), as errors name it.
    pub(crate) fn address(&self, host: &str) -> String {
        if host.contains(':') { format!("[{host}]:{}", self.spec.port) } else { format!("{host}:{}", self.spec.port) }
    }

    fn kill_grace(&self) -> std::time::Duration {
        self.spec.kill_grace.get()
    }

    fn builder(&self) -> SessionBuilder {
        let spec = &self.spec;
        let mut builder = SessionBuilder::default();
        builder
            .known_hosts_check(if spec.strict_host_key_checking { KnownHosts::Strict } else { KnownHosts::Add })
            .control_directory(&self.control_dir)
            .control_persist(ControlPersist::IdleFor(NonZeroUsize::new(IDLE_PERSIST_SECS).expect("not zero")))
            .server_alive_interval(SERVER_ALIVE);
        if let Some(user) = &spec.user {
            builder.user(user.clone());
        }
        // 22 leaves the port to the operator's ssh configuration (whose default is 22).
        if spec.port != 22 {
            builder.port(spec.port);
        }
        if let Some(key) = &spec.identity_file {
            builder.keyfile(expand_home(key));
        }
        if let Some(jump) = &spec.jump_host {
            builder.jump_hosts([jump]);
        }
        if let Some(file) = &spec.known_hosts_file {
            builder.user_known_hosts_file(expand_home(file));
        }
        if let Some(limit) = spec.connect_timeout {
            // ssh counts whole seconds.
            let secs = limit.get().as_secs_f64().ceil().max(1.0) as u64;
            builder.connect_timeout(std::time::Duration::from_secs(secs));
        }
        builder
    }

    /// The master connection to `host`: the cached one if it is alive, else a new one.
    pub(crate) async fn session(&self, host: &str) -> Result<Arc<Session>> {
        if let Some(key) = &self.spec.identity_file {
            let path = expand_home(key);
            if !path.is_file() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("identity file `{}` does not exist or is not a file: fix `identity_file`", path.display()),
                )
                .with_operation("runner.connect")
                .with_context("runner", SSH_KIND)
                .with_context("host", self.address(host)));
            }
        }
        let slot = {
            let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(sessions.entry(host.to_owned()).or_default())
        };
        let mut cached = slot.lock().await;
        if let Some(session) = cached.as_ref() {
            if session.check().await.is_ok() {
                return Ok(Arc::clone(session));
            }
            *cached = None;
        }
        // In a task of its own, so that an attempt that stops waiting (cancelled) does not
        // leave a half-started `ssh` behind: the task finishes, and drops what it made.
        let builder = self.builder();
        let destination = host.to_owned();
        let connecting = tokio::spawn(async move { builder.connect_mux(destination).await });
        let session = match connecting.await {
            Ok(Ok(session)) => Arc::new(session),
            Ok(Err(e)) => return Err(self.connect_error(host, e)),
            Err(e) => {
                return Err(Error::new(ErrorKind::Internal, format!("connecting to {} failed", self.address(host)))
                    .with_source(e));
            }
        };
        *cached = Some(Arc::clone(&session));
        Ok(session)
    }

    /// What a failed connection means, and what to do about it.
    fn connect_error(&self, host: &str, e: openssh::Error) -> Error {
        let address = self.address(host);
        let mut detail = error_detail(&e);
        let spawn_failed = matches!(&e, openssh::Error::Connect(io) if io.raw_os_error().is_some());
        let (kind, what) = if spawn_failed {
            (
                ErrorKind::NotFound,
                "cannot run the OpenSSH client `ssh`: install it (Debian: openssh-client) and make sure it is on PATH"
                    .to_owned(),
            )
        } else if detail.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || detail.contains("has changed and you have requested strict checking")
        {
            // ssh's banner is long: keep its last sentences.
            if let Some(at) = detail.find("Host key for ") {
                detail = detail[at..].to_owned();
            }
            let file = match &self.spec.known_hosts_file {
                Some(file) => format!(" -f '{file}'"),
                None => String::new(),
            };
            (
                ErrorKind::PermissionDenied,
                format!(
                    "the host key of {address} is not the one recorded in {}: if the host was reinstalled, remove the old key (`ssh-keygen -R '{}'{file}`) and add the new one after checking its fingerprint; otherwise someone may be intercepting the connection",
                    self.known_hosts_name(),
                    known_hosts_name(host, self.spec.port)
                ),
            )
        } else if detail.contains("Host key verification failed")
            || detail.contains("No ED25519 host key is known")
            || detail.contains("host key is known")
        {
            (
                ErrorKind::PermissionDenied,
                format!(
                    "the host key of {address} is not in {} and strict_host_key_checking is on: check the host's fingerprint, then add its key, e.g. `ssh-keyscan -p {} {host} >> {}`",
                    self.known_hosts_name(),
                    self.spec.port,
                    self.spec.known_hosts_file.as_deref().unwrap_or("~/.ssh/known_hosts"),
                ),
            )
        } else if detail.contains("Permission denied") || detail.contains("Too many authentication failures") {
            let user =
                self.spec.user.as_deref().map(|u| format!("`{u}`")).unwrap_or_else(|| "the default user".to_owned());
            let key = match &self.spec.identity_file {
                Some(key) => format!("the key `{key}`"),
                None => "the SSH agent's and ~/.ssh's keys".to_owned(),
            };
            (
                ErrorKind::PermissionDenied,
                format!(
                    "{address} refused to authenticate {user} with {key}: check `user` and `identity_file`, and that the public key is in the user's authorized_keys on the host"
                ),
            )
        } else if detail.contains("Connection refused") {
            (
                ErrorKind::Unavailable,
                format!(
                    "cannot connect to {address}: connection refused; check that sshd runs there and listens on port {}",
                    self.spec.port
                ),
            )
        } else if detail.contains("Could not resolve hostname") || detail.contains("Name or service not known") {
            (ErrorKind::Unavailable, format!("cannot resolve the host name of {address}: check `host`/`hosts` and DNS"))
        } else if detail.contains("timed out") {
            (
                ErrorKind::Unavailable,
                format!(
                    "connecting to {address} timed out: check that the host is up and reachable (firewall, `jump_host`)"
                ),
            )
        } else {
            (ErrorKind::Unavailable, format!("cannot connect to {address}"))
        };
        let mut error = Error::new(kind, if detail.is_empty() { what } else { format!("{what} (ssh: {detail})") })
            .with_operation("runner.connect")
            .with_context("runner", SSH_KIND)
            .with_context("host", address);
        if spawn_failed {
            error = error.with_source(e);
        }
        error
    }

    fn known_hosts_name(&self) -> String {
        match &self.spec.known_hosts_file {
            Some(file) => format!("the known hosts file `{file}`"),
            None => "the known hosts (~/.ssh/known_hosts)".to_owned(),
        }
    }

    /// The program, environment and working directory of `task`, checked.
    fn plan<'t>(&self, task: &'t Task) -> Result<Plan<'t>> {
        let argv: Vec<&str> = match &task.program {
            Program::Shell { shell, script } => {
                let shell = if shell.trim().is_empty() { "sh" } else { shell.as_str() };
                vec![shell, "-c", script.as_str()]
            }
            Program::Argv(argv) => match argv.first() {
                Some(program) if !program.is_empty() => argv.iter().map(String::as_str).collect(),
                _ => {
                    return Err(step_error(
                        ErrorKind::InvalidConfig,
                        task,
                        None,
                        "the program to run is empty (`argv` has no program name)",
                    ));
                }
            },
            _ => {
                return Err(step_error(
                    ErrorKind::Unsupported,
                    task,
                    None,
                    "the ssh runner does not support this kind of program",
                ));
            }
        };
        let mut env: Vec<(&str, &str)> = Vec::with_capacity(task.env.len() + task.secrets.len() + 3);
        env.extend(task.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        env.extend(task.secrets.iter().map(|(k, v)| (k.as_str(), v.expose())));
        env.push(("NEXUS_RUN_ID", task.run_id.as_str()));
        env.push(("NEXUS_STEP_ID", task.step_id.as_str()));
        for (name, _) in &env {
            if !script::is_env_name(name) {
                return Err(step_error(
                    ErrorKind::InvalidConfig,
                    task,
                    None,
                    format!(
                        "`{name}` cannot be exported by a remote shell: a variable name is letters, digits and `_`, not starting with a digit"
                    ),
                ));
            }
        }
        if env.iter().any(|(_, v)| v.contains('\0')) {
            return Err(step_error(
                ErrorKind::InvalidConfig,
                task,
                None,
                "an environment variable's value holds a NUL byte",
            ));
        }
        if argv.iter().any(|a| a.contains('\0')) || task.working_dir.as_deref().is_some_and(|d| d.contains('\0')) {
            return Err(step_error(
                ErrorKind::InvalidConfig,
                task,
                None,
                "the program or working directory holds a NUL byte",
            ));
        }
        Ok(Plan { argv, env, working_dir: task.working_dir.as_deref().filter(|d| !d.is_empty()) })
    }

    /// Runs `script` on `host` over a new channel of `session`, or of a new connection
    /// when that one is gone; returns its standard output.
    async fn remote_script(&self, host: &str, session: &Arc<Session>, script: &str) -> Result<Vec<u8>> {
        match run_script(session, script).await {
            Ok(stdout) => Ok(stdout),
            Err(first) => {
                let fresh = self.session(host).await.map_err(|e| e.with_context("after", error_detail(&first)))?;
                run_script(&fresh, script).await.map_err(|e| {
                    Error::new(ErrorKind::Unavailable, format!("cannot run a command on {}", self.address(host)))
                        .with_context("ssh", error_detail(&e))
                })
            }
        }
    }

    /// Opens the attempt's main channel (`exec sh -s`, all three streams piped). A master
    /// connection that died since it was checked (idle timeout) is replaced once.
    async fn open_channel(&self, host: &str, session: &mut Arc<Session>) -> Result<openssh::Child<Arc<Session>>> {
        let open = |session: &Arc<Session>| {
            let mut command = Session::to_raw_command(Arc::clone(session), REMOTE_SHELL);
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            async move { command.spawn().await }
        };
        match open(session).await {
            Ok(child) => Ok(child),
            Err(first) if session.check().await.is_err() => {
                *session = self.session(host).await.map_err(|e| e.with_context("after", error_detail(&first)))?;
                open(session).await.map_err(|e| self.channel_error(host, &e))
            }
            Err(e) => Err(self.channel_error(host, &e)),
        }
    }

    fn channel_error(&self, host: &str, e: &openssh::Error) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "{} refused a new session channel: check sshd's MaxSessions if many steps share this host ({})",
                self.address(host),
                error_detail(e)
            ),
        )
        .with_operation("runner.run")
        .with_context("runner", SSH_KIND)
        .with_context("host", self.address(host))
    }

    /// Stops the attempt `nonce` on `host` (see [`script::stop`]).
    async fn stop_remote(&self, host: &str, session: &Arc<Session>, nonce: &str) -> Result<Stopped> {
        let grace = self.kill_grace();
        let stdout = timeout(grace + SCRIPT_MARGIN, self.remote_script(host, session, &script::stop(nonce, grace)))
            .await
            .map_err(|_| {
                Error::new(ErrorKind::Timeout, format!("{} did not answer the stop request", self.address(host)))
            })??;
        Ok(Stopped::parse(&String::from_utf8_lossy(&stdout)).unwrap_or(Stopped::Nothing))
    }

    /// Finishes the attempt `nonce` on `host` (see [`script::finish`]): what was left
    /// running, and the outputs file's bytes.
    async fn finish_remote(
        &self,
        host: &str,
        session: &Arc<Session>,
        nonce: &str,
    ) -> Result<(Option<Stopped>, Vec<u8>)> {
        let grace = self.kill_grace();
        let stdout = timeout(grace + SCRIPT_MARGIN, self.remote_script(host, session, &script::finish(nonce, grace)))
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, format!("{} did not answer", self.address(host))))??;
        Ok(script::parse_finish(&stdout))
    }

    /// Runs one attempt on one host. `deadline` and `cancel` bound everything, the
    /// connection included.
    pub(crate) async fn run_on(
        &self,
        host: &str,
        task: &Task,
        logs: &dyn LogSink,
        cancel: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Result<Outcome> {
        let address = self.address(host);
        if cancel.is_cancelled() {
            return Err(step_error(ErrorKind::Cancelled, task, Some(&address), "cancelled before it started"));
        }
        let plan = self.plan(task)?;
        let attempt = task.attempt.to_string();
        let mut env = plan.env.clone();
        env.push(("NEXUS_ATTEMPT", attempt.as_str()));

        let session = match race(self.session(host), deadline, cancel).await {
            Ok(session) => {
                session.map_err(|e| e.with_context("step", &task.step_id).with_context("run", &task.run_id))?
            }
            Err(why) => return Err(interrupted(task, &address, why, "while connecting; nothing was started")),
        };
        let nonce = nonce(&task.run_id);
        let wrapper = script::wrapper(&nonce, &plan.argv, &env, plan.working_dir, self.kill_grace());

        let started = SystemTime::now();
        let mut session = session;
        let mut child = match race(self.open_channel(host, &mut session), deadline, cancel).await {
            Ok(Ok(child)) => child,
            Ok(Err(e)) => return Err(e.with_context("step", &task.step_id).with_context("run", &task.run_id)),
            Err(why) => {
                return Err(interrupted(task, &address, why, "before the program started; nothing was started"));
            }
        };
        // From here on, something may run remotely: dropping this attempt stops it.
        let mut guard = Guard::new(&session, &nonce, self.kill_grace());
        // The wrapper's stdin stays open until the attempt is over: its end tells the
        // remote side that Nexus is gone (see `script::wrapper`).
        let mut stdin = child.stdin().take();
        let written = race(
            async {
                if let Some(stdin) = stdin.as_mut() {
                    stdin.write_all(wrapper.as_bytes()).await?;
                    stdin.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            },
            deadline,
            cancel,
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            // The stop script makes sure that the program never starts.
            let _ = self.stop_remote(host, &session, &nonce).await;
            let _ = self.finish_remote(host, &session, &nonce).await;
            guard.disarm();
            return Err(match written {
                Ok(Err(e)) => {
                    step_error(ErrorKind::Unavailable, task, Some(&address), "cannot send the step to the host")
                        .with_source(e)
                }
                Err(why) => interrupted(task, &address, why, "before the program started; nothing was started"),
                Ok(Ok(())) => unreachable!("matched above"),
            });
        }

        let sink = Intercept::new(logs, &nonce);
        let (stdout, stderr) = (child.stdout().take(), child.stderr().take());
        let io = async {
            tokio::join!(pump(stdout, Stream::Stdout, &sink), pump(stderr, Stream::Stderr, &sink));
        };
        let mut io = std::pin::pin!(io);
        let mut io_done = false;

        // The exit status is asked for only once the output is read to its end (or the
        // wrapper said it is done): openssh drops the channel, and any output still on
        // its way, when it hands the exit status over.
        let stop = tokio::select! {
            biased;
            () = &mut io => {
                io_done = true;
                None
            }
            () = sink.reported.notified() => {
                drain(io.as_mut(), &mut io_done, &sink).await;
                None
            }
            () = sleep_until_some(deadline) => Some(Interrupt::TimedOut),
            () = cancel.cancelled() => Some(Interrupt::Cancelled),
        };
        match stop {
            Some(why) => {
                let stopped = reading(self.stop_remote(host, &session, &nonce), io.as_mut(), &mut io_done).await;
                // The channel ends once the program's processes are gone.
                let _ = timeout(REAP_LIMIT, async {
                    drain(io.as_mut(), &mut io_done, &sink).await;
                    child.wait().await
                })
                .await;
                let _ = self.finish_remote(host, &session, &nonce).await;
                guard.disarm();
                let how = match stopped {
                    Ok(Stopped::Killed) => format!(
                        "its remote processes were killed with SIGKILL after a {} grace period",
                        nexus_core::model::Duration(self.kill_grace())
                    ),
                    Ok(Stopped::Terminated) => "its remote processes were stopped with SIGTERM".to_owned(),
                    Ok(Stopped::Nothing) => "no remote process was left to stop".to_owned(),
                    Err(e) => format!("its remote processes could not be stopped and may still run: {e}"),
                };
                Err(interrupted(task, &address, why, &how))
            }
            None => {
                let status = match reading(child.wait(), io.as_mut(), &mut io_done).await {
                    Ok(status) => Ok(status.code()),
                    // openssh turns exit code 127 into this error.
                    Err(openssh::Error::Remote(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(127)),
                    // No exit status: the wrapper was killed, or the connection was lost.
                    Err(openssh::Error::RemoteProcessTerminated) if session.check().await.is_ok() => Ok(None),
                    Err(e) => Err(e),
                };
                // The connection is gone: stop the step over a new one, if the host answers.
                let stopped_after_loss = match status {
                    Err(_) => {
                        reading(self.stop_remote(host, &session, &nonce), io.as_mut(), &mut io_done).await.is_ok()
                    }
                    Ok(_) => false,
                };
                // The wrapper's last stderr line says what is left to do.
                let finished = match sink.done() {
                    Some(done) if status.is_ok() && !done.outputs => Ok((Some(done.stopped), Vec::new())),
                    _ => reading(self.finish_remote(host, &session, &nonce), io.as_mut(), &mut io_done).await,
                };
                guard.disarm();
                let exit_code = match status {
                    Ok(code) => code,
                    Err(e) => {
                        let what = if stopped_after_loss && finished.is_ok() {
                            "lost the connection while the step ran; its remote processes were stopped over a new connection"
                        } else {
                            "lost the connection while the step ran; the host does not answer, so its remote processes stop only when its sshd notices the lost connection"
                        };
                        return Err(step_error(ErrorKind::Unavailable, task, Some(&address), what)
                            .with_context("ssh", error_detail(&e)));
                    }
                };
                if let Some(error) = sink.wrapper_error() {
                    return Err(wrapper_error(task, &address, &plan, error));
                }
                let (_, output_bytes) = finished.map_err(|e| {
                    step_error(
                        e.kind(),
                        task,
                        Some(&address),
                        format!(
                            "the step ended (exit code {}) but its outputs could not be read: {}",
                            exit_code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
                            e.message()
                        ),
                    )
                })?;
                let (outputs, notes) = read_outputs(output_bytes);
                for note in notes {
                    logs.line(Stream::Stderr, &format!("nexus: {note}"));
                }
                if exit_code.is_none() {
                    logs.line(
                        Stream::Stderr,
                        &format!(
                            "nexus: the remote step on {address} ended without an exit status (its shell was killed)"
                        ),
                    );
                }
                let mut outcome = Outcome::exited(0, started, SystemTime::now());
                outcome.exit_code = exit_code;
                outcome.outputs = outputs;
                Ok(outcome)
            }
        }
    }
}

#[async_trait]
impl Runner for SshRunner {
    async fn run(&self, task: &Task, logs: &dyn LogSink, cancel: CancellationToken) -> Result<Outcome> {
        let deadline = task.timeout.map(|t| Instant::now() + t);
        match (&self.spec.host, &self.spec.hosts) {
            (Some(host), _) => self.run_on(host, task, logs, &cancel, deadline).await,
            _ => crate::group::run_group(self, task, logs, &cancel, deadline).await,
        }
    }

    /// On every host, stops the steps a crashed run left running (their process groups:
    /// SIGTERM, `kill_grace`, SIGKILL) and removes their directories. A host that cannot
    /// be reached is skipped: what ran there stops by itself once its sshd notices the
    /// lost connection (see `script::wrapper`).
    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        let grace = self.kill_grace();
        let script = script::cleanup(&script::run_tag(run_id), grace);
        for host in self.hosts() {
            let session = match self.session(host).await {
                Ok(session) => session,
                Err(e) if e.kind() == ErrorKind::Unavailable => continue,
                Err(e) => return Err(e.with_operation("runner.cleanup_run").with_context("run", run_id)),
            };
            timeout(grace + SCRIPT_MARGIN, self.remote_script(host, &session, &script))
                .await
                .map_err(|_| {
                    Error::new(ErrorKind::Timeout, format!("{} did not answer the clean-up", self.address(host)))
                })?
                .map_err(|e| e.with_operation("runner.cleanup_run").with_context("run", run_id))?;
        }
        Ok(())
    }
}

/// Stops the remote attempt if the attempt's future is dropped before it finished (the
/// engine gave up on it): the stop and finish scripts run in a task of their own.
struct Guard {
    armed: Option<(Arc<Session>, String, std::time::Duration)>,
}

impl Guard {
    fn new(session: &Arc<Session>, nonce: &str, grace: std::time::Duration) -> Self {
        Guard { armed: Some((Arc::clone(session), nonce.to_owned(), grace)) }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some((session, nonce, grace)) = self.armed.take() else { return };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = timeout(grace + SCRIPT_MARGIN, run_script(&session, &script::abandon(&nonce, grace))).await;
            });
        }
    }
}

/// Runs `script` with `sh -s` over a new channel of `session`; returns its stdout.
async fn run_script(session: &Session, script: &str) -> std::result::Result<Vec<u8>, openssh::Error> {
    let mut child = session
        .raw_command(REMOTE_SHELL)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .await?;
    if let Some(mut stdin) = child.stdin().take() {
        stdin.write_all(script.as_bytes()).await.map_err(openssh::Error::ChildIo)?;
        stdin.shutdown().await.map_err(openssh::Error::ChildIo)?;
    }
    Ok(child.wait_with_output().await?.stdout)
}

/// Runs `fut` while still reading the step's output.
async fn reading<T>(
    fut: impl std::future::Future<Output = T>,
    mut io: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    io_done: &mut bool,
) -> T {
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            biased;
            value = &mut fut => return value,
            () = io.as_mut(), if !*io_done => *io_done = true,
        }
    }
}

/// Reads what is left of the output once the step's processes are gone, until the
/// channel closes, nothing arrives for [`DRAIN_IDLE`], or [`DRAIN_LIMIT`] passed.
async fn drain(
    mut io: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    io_done: &mut bool,
    sink: &Intercept<'_>,
) {
    let limit = Instant::now() + DRAIN_LIMIT;
    while !*io_done {
        let seen = sink.lines();
        if timeout(DRAIN_IDLE, io.as_mut()).await.is_ok() {
            *io_done = true;
            return;
        }
        if sink.lines() == seen || Instant::now() >= limit {
            sink.inner.line(
                Stream::Stderr,
                "nexus: stopped reading output still held open by a remote process outside the step's process group",
            );
            return;
        }
    }
}

/// What the wrapper's last line (`NONCE done HOW [outputs]`) said.
#[derive(Debug, Clone, Copy)]
struct Done {
    stopped: Stopped,
    /// The outputs file has something to read.
    outputs: bool,
}

/// Passes the step's lines on, and keeps the wrapper's own reports on stderr
/// (`NONCE error CODE` before the step starts, `NONCE done …` after it ended) out of
/// the log.
struct Intercept<'a> {
    inner: &'a dyn LogSink,
    marker: String,
    error: Mutex<Option<WrapperError>>,
    done: Mutex<Option<Done>>,
    /// Notified when the wrapper reported (an error before the step, or its end).
    reported: tokio::sync::Notify,
    lines: AtomicU64,
}

impl<'a> Intercept<'a> {
    fn new(inner: &'a dyn LogSink, nonce: &str) -> Self {
        Intercept {
            inner,
            marker: format!("{nonce} "),
            error: Mutex::new(None),
            done: Mutex::new(None),
            reported: tokio::sync::Notify::new(),
            lines: AtomicU64::new(0),
        }
    }

    fn wrapper_error(&self) -> Option<WrapperError> {
        *self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn done(&self) -> Option<Done> {
        *self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Takes a report of the wrapper; false when `report` is not one.
    fn report(&self, report: &str) -> bool {
        let mut words = report.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("error"), Some(code), None) => match WrapperError::parse(code) {
                Some(error) => {
                    *self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
                    self.reported.notify_one();
                    true
                }
                None => false,
            },
            (Some("done"), Some(how), outputs) => match Stopped::parse(how) {
                Some(stopped) => {
                    let done = Done { stopped, outputs: outputs == Some("outputs") };
                    *self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(done);
                    self.reported.notify_one();
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
}

impl LogSink for Intercept<'_> {
    fn line(&self, stream: Stream, line: &str) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        // The report may follow a last line the step left unterminated.
        if stream == Stream::Stderr
            && let Some(at) = line.find(&self.marker)
            && self.report(line[at + self.marker.len()..].trim_end())
        {
            if at > 0 {
                self.inner.line(stream, &line[..at]);
            }
            return;
        }
        self.inner.line(stream, line);
    }
}

/// A fresh nonce naming one attempt's remote directory: the run's tag
/// ([`script::run_tag`]) then 32 random hex digits.
fn nonce(run_id: &str) -> String {
    use std::io::Read;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    if !random {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mixed = now ^ (u128::from(std::process::id()) << 64) ^ u128::from(COUNTER.fetch_add(1, Ordering::Relaxed));
        bytes = mixed.to_le_bytes();
    }
    let random: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{random}", script::run_tag(run_id))
}

/// `~/x` → `$HOME/x`, as ssh itself reads it.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// How known_hosts names a host on `port`.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_owned() } else { format!("[{host}]:{port}") }
}

/// The message of an openssh error and its sources, on one line.
pub(crate) fn error_detail(e: &openssh::Error) -> String {
    use std::error::Error as _;
    let mut parts = Vec::new();
    let mut source: Option<&dyn std::error::Error> = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    let text = parts.join(": ");
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// An error about the attempt of `task` (on `address`, when known).
pub(crate) fn step_error(kind: ErrorKind, task: &Task, address: Option<&str>, what: impl std::fmt::Display) -> Error {
    let on = address.map(|a| format!(" on {a}")).unwrap_or_default();
    let mut error = Error::new(kind, format!("step `{}` (attempt {}){on}: {what}", task.step_id, task.attempt))
        .with_operation("runner.run")
        .with_context("runner", SSH_KIND)
        .with_context("run", &task.run_id)
        .with_context("step", &task.step_id);
    if let Some(address) = address {
        error = error.with_context("host", address);
    }
    error
}

fn interrupted(task: &Task, address: &str, why: Interrupt, how: &str) -> Error {
    match why {
        Interrupt::TimedOut => {
            let limit = nexus_core::model::Duration(task.timeout.unwrap_or_default());
            step_error(ErrorKind::Timeout, task, Some(address), format!("timed out after {limit}; {how}"))
        }
        Interrupt::Cancelled => step_error(ErrorKind::Cancelled, task, Some(address), format!("cancelled; {how}")),
    }
}

fn wrapper_error(task: &Task, address: &str, plan: &Plan<'_>, error: WrapperError) -> Error {
    let program = plan.argv.first().copied().unwrap_or_default();
    match error {
        WrapperError::NotFound => step_error(
            ErrorKind::NotFound,
            task,
            Some(address),
            format!("program `{program}` not found on the host: check its name, or install it there and make sure it is on the remote PATH"),
        )
        .with_context("program", program),
        WrapperError::WorkingDir => {
            let dir = plan.working_dir.unwrap_or_default();
            step_error(
                ErrorKind::NotFound,
                task,
                Some(address),
                format!("working directory `{dir}` does not exist on the host or cannot be entered"),
            )
            .with_context("working_dir", dir)
        }
        WrapperError::Dir => step_error(
            ErrorKind::Unavailable,
            task,
            Some(address),
            "cannot create the attempt's private directory in the remote temporary directory (${TMPDIR:-/tmp}): check that it exists and has space",
        ),
    }
}
