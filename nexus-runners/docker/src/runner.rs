//! The `docker` runner's execution: one container per attempt, through the Engine API.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerWaitResponse, HostConfig, Mount as DockerMount, MountType};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::{Stream as FuturesStream, StreamExt};
use nexus_core::traits::{LogSink, Outcome, Program, Runner, Stream, Task, sleep_until_some};
use nexus_core::{Error, ErrorKind, Result};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::{
    DEFAULT_DOCKER_HOST, DOCKER_KIND, DockerSpec, LABEL_ATTEMPT, LABEL_RUN, LABEL_STEP, OUTPUT_MOUNT, PullPolicy,
    parse_memory,
};
use nexus_core::lines::LineBuffer;
use nexus_core::outputs::read_outputs_file as read_outputs;

/// How long one Engine API request may take to answer (its headers; streams such as a
/// container's output or its wait may last longer).
const API_TIMEOUT_SECS: u64 = 120;
/// How long the output is still read once the container has stopped.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long to wait for a container to stop after SIGKILL.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

type OutputStream = Pin<Box<dyn FuturesStream<Item = std::result::Result<LogOutput, DockerError>> + Send>>;
type WaitStream = Pin<Box<dyn FuturesStream<Item = std::result::Result<ContainerWaitResponse, DockerError>> + Send>>;

/// Runs step attempts in containers on a Docker host (see the crate documentation).
pub struct DockerRunner {
    spec: DockerSpec,
    host: String,
    /// The client, connected and with its API version agreed on the first attempt.
    client: tokio::sync::OnceCell<Docker>,
    /// A private (0700) directory holding each attempt's outputs directory, created on
    /// first use.
    outputs_dir: OnceLock<tempfile::TempDir>,
    next: AtomicU64,
}

impl fmt::Debug for DockerRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerRunner").field("host", &self.host).field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl DockerRunner {
    /// A runner with these settings. Nothing is contacted until the first attempt; an
    /// address whose scheme is not supported is refused here.
    pub fn new(spec: DockerSpec) -> Result<Self> {
        let host = resolve_host(spec.host.as_deref());
        if !SUPPORTED_SCHEMES.iter().any(|s| host.starts_with(s)) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "Docker host `{host}` is not supported: use a unix:// socket, a tcp:// address or an ssh:// destination"
                ),
            )
            .with_operation("runner.build")
            .with_context("runner", DOCKER_KIND));
        }
        Ok(DockerRunner {
            spec,
            host,
            client: tokio::sync::OnceCell::new(),
            outputs_dir: OnceLock::new(),
            next: AtomicU64::new(0),
        })
    }

    /// The Docker host this runner talks to: the spec's `host`, else `DOCKER_HOST`,
    /// else the local socket.
    pub fn host(&self) -> &str {
        &self.host
    }

    async fn client(&self) -> Result<&Docker> {
        self.client.get_or_try_init(|| connect(&self.host)).await
    }

    /// Whether the Docker host is this machine, so a host directory can be bind-mounted.
    fn host_is_local(&self) -> bool {
        self.host.starts_with("unix://")
    }
}

const SUPPORTED_SCHEMES: [&str; 4] = ["unix://", "tcp://", "http://", "ssh://"];

/// The Docker host to use: `host`, else `DOCKER_HOST`, else the local socket.
fn resolve_host(host: Option<&str>) -> String {
    host.map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned())
}

/// Connects to `host` and agrees on the API version with its daemon.
async fn connect(host: &str) -> Result<Docker> {
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        if !Path::new(path).exists() {
            return Err(daemon_error(
                host,
                ErrorKind::Unavailable,
                format!("its socket `{path}` does not exist: is dockerd running on this machine?"),
            ));
        }
        Docker::connect_with_unix(host, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else if host.starts_with("ssh://") {
        Docker::connect_with_ssh(host, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION, None)
    } else {
        return Err(daemon_error(
            host,
            ErrorKind::InvalidConfig,
            "this address is not supported: use unix://, tcp:// or ssh://".to_owned(),
        ));
    };
    let docker = docker.map_err(|e| daemon_error(host, ErrorKind::Unavailable, format!("cannot connect: {e}")))?;
    docker.negotiate_version().await.map_err(|e| {
        let shown = format!("{e:?}");
        if shown.contains("PermissionDenied") || shown.contains("Permission denied") {
            daemon_error(
                host,
                ErrorKind::PermissionDenied,
                "permission denied: run Nexus as a user allowed to use the Docker socket (root, or the `docker` group)"
                    .to_owned(),
            )
        } else {
            daemon_error(
                host,
                ErrorKind::Unavailable,
                format!("the daemon does not answer ({e}): is dockerd running, and is `host` (or DOCKER_HOST) right?"),
            )
        }
    })
}

fn daemon_error(host: &str, kind: ErrorKind, what: String) -> Error {
    Error::new(kind, format!("cannot use the Docker daemon at `{host}`: {what}"))
        .with_operation("runner.run")
        .with_context("runner", DOCKER_KIND)
        .with_context("docker_host", host)
}

/// Removes every container (running or not) labelled with run `run_id` on the Docker
/// host `docker_host` (default: `DOCKER_HOST`, else the local socket), such as those a
/// crashed run left behind. Returns their names.
pub async fn remove_leftovers(docker_host: Option<&str>, run_id: &str) -> Result<Vec<String>> {
    let host = resolve_host(docker_host);
    let docker = connect(&host).await?;
    let filters = HashMap::from([("label", vec![format!("{LABEL_RUN}={run_id}")])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let containers = docker.list_containers(Some(options)).await.map_err(|e| {
        daemon_error(&host, api_kind(&e), format!("cannot list the containers of run `{run_id}`: {e}"))
            .with_context("run", run_id)
    })?;
    let mut removed = Vec::new();
    for container in containers {
        let Some(id) = container.id else { continue };
        let name = container
            .names
            .and_then(|n| n.into_iter().next())
            .map_or_else(|| id.clone(), |n| n.trim_start_matches('/').to_owned());
        match docker.remove_container(&id, Some(force_remove())).await {
            Ok(()) => removed.push(name),
            Err(e) if matches!(status(&e), Some(404 | 409)) => {} // gone, or being removed
            Err(e) => {
                return Err(daemon_error(&host, api_kind(&e), format!("cannot remove container `{name}`: {e}"))
                    .with_context("run", run_id)
                    .with_context("container", name));
            }
        }
    }
    Ok(removed)
}

fn force_remove() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new().force(true).v(true).build()
}

/// The HTTP status of an error the daemon answered with.
fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The kind of an Engine API error.
fn api_kind(e: &DockerError) -> ErrorKind {
    match status(e) {
        Some(400) => ErrorKind::InvalidConfig,
        Some(401 | 403) => ErrorKind::PermissionDenied,
        Some(404) => ErrorKind::NotFound,
        Some(409) => ErrorKind::Conflict,
        _ => ErrorKind::Unavailable,
    }
}

/// What the container runs, as the Engine API wants it.
struct Plan {
    image: String,
    entrypoint: Option<Vec<String>>,
    cmd: Vec<String>,
    /// The program, for error messages.
    program: String,
    working_dir: Option<String>,
    name: String,
}

impl DockerRunner {
    fn plan(&self, task: &Task) -> Result<Plan> {
        let image = task.image.as_deref().map(str::trim).filter(|i| !i.is_empty()).unwrap_or(&self.spec.image);
        let (entrypoint, cmd, program) = match &task.program {
            Program::Shell { shell, script } => {
                let shell = if shell.trim().is_empty() { "sh" } else { shell.as_str() };
                let entrypoint =
                    self.spec.entrypoint.clone().unwrap_or_else(|| vec![shell.to_owned(), "-c".to_owned()]);
                let program = entrypoint[0].clone();
                (Some(entrypoint), vec![script.clone()], program)
            }
            Program::Argv(argv) => match argv.first() {
                Some(first) if !first.is_empty() => {
                    let program = self.spec.entrypoint.as_ref().map_or(first, |e| &e[0]).clone();
                    (self.spec.entrypoint.clone(), argv.clone(), program)
                }
                _ => {
                    return Err(step_error(
                        ErrorKind::InvalidConfig,
                        task,
                        "the program to run is empty (`argv` has no program name)",
                    ));
                }
            },
            _ => {
                return Err(step_error(
                    ErrorKind::Unsupported,
                    task,
                    "the docker runner does not support this kind of program",
                ));
            }
        };
        let working_dir = match (self.spec.working_dir.as_deref(), task.working_dir.as_deref()) {
            (_, Some(dir)) if dir.starts_with('/') => Some(dir.to_owned()),
            (Some(base), Some(dir)) => Some(format!("{}/{dir}", base.trim_end_matches('/'))),
            (None, Some(dir)) => {
                return Err(step_error(
                    ErrorKind::InvalidConfig,
                    task,
                    format!(
                        "working directory `{dir}` is relative and the runner has no `working_dir` to resolve it against: give an absolute path"
                    ),
                ));
            }
            (base, None) => base.map(str::to_owned),
        };
        Ok(Plan {
            image: image.to_owned(),
            entrypoint,
            cmd,
            program,
            working_dir,
            name: container_name(task, self.next.fetch_add(1, Ordering::Relaxed)),
        })
    }

    /// The container's configuration.
    fn container_body(&self, task: &Task, plan: &Plan, output_dir: Option<&OutputDir>) -> ContainerCreateBody {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |name: &str, value: &str| match env.iter_mut().find(|(n, _)| n == name) {
            Some(existing) => existing.1 = value.to_owned(),
            None => env.push((name.to_owned(), value.to_owned())),
        };
        for (name, value) in &self.spec.env {
            set(name, value);
        }
        for (name, value) in &task.env {
            set(name, value);
        }
        for (name, value) in &task.secrets {
            set(name, value.expose());
        }
        set("NEXUS_RUN_ID", &task.run_id);
        set("NEXUS_STEP_ID", &task.step_id);
        set("NEXUS_ATTEMPT", &task.attempt.to_string());
        if output_dir.is_some() {
            set("NEXUS_OUTPUT", &format!("{OUTPUT_MOUNT}/output"));
        }

        let mut labels: HashMap<String, String> =
            self.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.insert(LABEL_RUN.to_owned(), task.run_id.clone());
        labels.insert(LABEL_STEP.to_owned(), task.step_id.clone());
        labels.insert(LABEL_ATTEMPT.to_owned(), task.attempt.to_string());

        let mut mounts: Vec<DockerMount> = self
            .spec
            .mounts
            .iter()
            .map(|m| DockerMount {
                target: Some(m.target.clone()),
                source: Some(m.source.clone()),
                typ: Some(if m.source.starts_with('/') { MountType::BIND } else { MountType::VOLUME }),
                read_only: Some(m.read_only),
                ..Default::default()
            })
            .collect();
        if let Some(dir) = output_dir {
            mounts.push(DockerMount {
                target: Some(OUTPUT_MOUNT.to_owned()),
                source: Some(dir.0.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(false),
                ..Default::default()
            });
        }

        let host_config = HostConfig {
            init: Some(self.spec.init),
            memory: self.spec.memory.as_deref().and_then(parse_memory).and_then(|b| i64::try_from(b).ok()),
            nano_cpus: self.spec.cpus.map(|c| (c * 1e9) as i64),
            network_mode: self.spec.network.clone(),
            mounts: (!mounts.is_empty()).then_some(mounts),
            auto_remove: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(plan.image.clone()),
            entrypoint: plan.entrypoint.clone(),
            cmd: Some(plan.cmd.clone()),
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: plan.working_dir.clone(),
            user: self.spec.user.clone(),
            labels: Some(labels),
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(false),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Pulls the image as the pull policy says.
    async fn ensure_image(&self, docker: &Docker, task: &Task, image: &str, logs: &dyn LogSink) -> Result<()> {
        let present = match self.spec.pull {
            PullPolicy::Always => false,
            PullPolicy::Never | PullPolicy::IfMissing => match docker.inspect_image(image).await {
                Ok(_) => true,
                Err(e) if status(&e) == Some(404) => false,
                Err(e) => {
                    return Err(step_error(api_kind(&e), task, format!("cannot inspect image `{image}`: {e}"))
                        .with_context("image", image)
                        .with_context("docker_host", &self.host));
                }
            },
        };
        if present {
            return Ok(());
        }
        if self.spec.pull == PullPolicy::Never {
            return Err(step_error(
                ErrorKind::NotFound,
                task,
                format!(
                    "image `{image}` is not on the Docker host `{}` and the pull policy is `never`: build or load it there (`docker build`, `docker load`), or set `pull: if-missing`",
                    self.host
                ),
            )
            .with_context("image", image)
            .with_context("docker_host", &self.host));
        }
        logs.line(Stream::Stderr, &format!("nexus: pulling image `{image}`"));
        let (from, tag) = split_reference(image);
        let options = CreateImageOptionsBuilder::new().from_image(from).tag(tag).build();
        let mut progress = docker.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            if let Err(e) = item {
                let text = e.to_string();
                let lower = text.to_lowercase();
                let kind = if status(&e) == Some(404)
                    || lower.contains("not found")
                    || lower.contains("manifest unknown")
                    || lower.contains("does not exist")
                {
                    ErrorKind::NotFound
                } else if lower.contains("unauthorized") || lower.contains("denied") {
                    ErrorKind::PermissionDenied
                } else {
                    ErrorKind::Unavailable
                };
                return Err(step_error(
                    kind,
                    task,
                    format!(
                        "cannot pull image `{image}` through the Docker host `{}`: {text}; check the image name and tag, that its registry is reachable from the Docker host and that it is logged in there, or load the image on the host and set `pull: never`",
                        self.host
                    ),
                )
                .with_context("image", image)
                .with_context("docker_host", &self.host));
            }
        }
        Ok(())
    }

    /// A fresh outputs directory for one attempt, writable by any user of the container.
    fn output_dir(&self, task: &Task) -> Result<OutputDir> {
        let parent = match self.outputs_dir.get() {
            Some(d) => d,
            None => {
                let created = tempfile::Builder::new().prefix("nexus-docker-outputs-").tempdir().map_err(|e| {
                    step_error(ErrorKind::Unavailable, task, "cannot create a directory for $NEXUS_OUTPUT files")
                        .with_source(e)
                })?;
                let _ = self.outputs_dir.set(created); // another attempt may have won the race
                self.outputs_dir.get().expect("set above")
            }
        };
        let dir = parent.path().join(format!("attempt-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        let made = std::fs::create_dir(&dir).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            // The container may run as any user; the parent directory (0700) keeps other
            // users of this machine out.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        });
        made.map_err(|e| {
            step_error(ErrorKind::Unavailable, task, format!("cannot create the outputs directory `{}`", dir.display()))
                .with_source(e)
        })?;
        Ok(OutputDir(dir))
    }

    /// Creates, attaches to and starts the container.
    async fn prepare(
        &self,
        task: &Task,
        plan: &Plan,
        logs: &dyn LogSink,
        container: &mut Container,
    ) -> Result<Prepared> {
        let docker = self.client().await.map_err(|e| task.rescope(e))?;
        self.ensure_image(docker, task, &plan.image, logs).await?;
        let output_dir = if self.host_is_local() { Some(self.output_dir(task)?) } else { None };
        let body = self.container_body(task, plan, output_dir.as_ref());
        let options = CreateContainerOptionsBuilder::new().name(&plan.name).build();
        let created = docker.create_container(Some(options), body).await.map_err(|e| {
            let kind = api_kind(&e);
            step_error(kind, task, format!("cannot create a container of image `{}`: {e}", plan.image))
                .with_context("image", &plan.image)
                .with_context("docker_host", &self.host)
        })?;
        container.docker = Some(docker.clone());
        container.id = Some(created.id.clone());
        let id = created.id;
        let attach = AttachContainerOptionsBuilder::new().stdout(true).stderr(true).stream(true).logs(false).build();
        let attached = docker.attach_container(&id, Some(attach)).await.map_err(|e| {
            step_error(api_kind(&e), task, format!("cannot attach to container `{}`: {e}", plan.name))
                .with_context("container", &plan.name)
        })?;
        let started = SystemTime::now();
        docker.start_container(&id, None).await.map_err(|e| self.start_error(task, plan, e))?;
        let wait: WaitStream = Box::pin(docker.wait_container(&id, None));
        Ok(Prepared { output: attached.output, wait, started, output_dir })
    }

    fn start_error(&self, task: &Task, plan: &Plan, e: DockerError) -> Error {
        let text = e.to_string();
        let missing = text.contains("executable file not found")
            || (text.contains("no such file or directory") && text.contains("exec"));
        let error = if missing {
            step_error(
                ErrorKind::NotFound,
                task,
                format!(
                    "program `{}` not found in image `{}`: check its name and that the image provides it ({text})",
                    plan.program, plan.image
                ),
            )
            .with_context("program", &plan.program)
        } else {
            step_error(api_kind(&e), task, format!("cannot start container `{}`: {text}", plan.name))
        };
        error.with_context("image", &plan.image).with_context("container", &plan.name)
    }
}

/// A per-attempt outputs directory on this machine, deleted on drop.
struct OutputDir(PathBuf);

impl Drop for OutputDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started container's streams.
struct Prepared {
    output: OutputStream,
    wait: WaitStream,
    started: SystemTime,
    output_dir: Option<OutputDir>,
}

/// The attempt's container, once created. Dropping it while it still holds the
/// container (the engine abandoned the attempt) removes it in the background, or kills
/// it when the spec keeps containers.
struct Container {
    docker: Option<Docker>,
    id: Option<String>,
    name: String,
    keep: bool,
}

impl Container {
    /// Removes the container (unless the spec keeps them), reporting a failure in the log.
    async fn finish(&mut self, logs: &dyn LogSink) {
        let (Some(docker), Some(id)) = (self.docker.take(), self.id.take()) else { return };
        if self.keep {
            return;
        }
        match docker.remove_container(&id, Some(force_remove())).await {
            Ok(()) => {}
            Err(e) if matches!(status(&e), Some(404 | 409)) => {}
            Err(e) => logs.line(
                Stream::Stderr,
                &format!(
                    "nexus: could not remove container `{}` ({e}); remove it with `docker rm -f {}`",
                    self.name, self.name
                ),
            ),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let (Some(docker), Some(id)) = (self.docker.take(), self.id.take()) else { return };
        let keep = self.keep;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if keep {
                    let _ = docker
                        .kill_container(&id, Some(KillContainerOptionsBuilder::new().signal("SIGKILL").build()))
                        .await;
                } else {
                    let _ = docker.remove_container(&id, Some(force_remove())).await;
                }
            });
        }
    }
}

/// Passes lines on, noticing whether the first stderr line is the container init's
/// report that it could not execute the program (`[FATAL tini (7)] exec X failed: No
/// such file or directory`).
struct ExecWatch<'a> {
    inner: &'a dyn LogSink,
    first_stderr_seen: std::sync::atomic::AtomicBool,
    exec_failed: std::sync::atomic::AtomicBool,
}

impl<'a> ExecWatch<'a> {
    fn new(inner: &'a dyn LogSink) -> Self {
        ExecWatch {
            inner,
            first_stderr_seen: std::sync::atomic::AtomicBool::new(false),
            exec_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn exec_failed(&self) -> bool {
        self.exec_failed.load(Ordering::Relaxed)
    }
}

impl LogSink for ExecWatch<'_> {
    fn line(&self, stream: Stream, line: &str) {
        if stream == Stream::Stderr && !self.first_stderr_seen.swap(true, Ordering::Relaxed) {
            let failed = line.starts_with("[FATAL tini")
                && line.contains("] exec ")
                && line.ends_with("failed: No such file or directory");
            self.exec_failed.store(failed, Ordering::Relaxed);
        }
        self.inner.line(stream, line);
    }
}

/// Why the attempt stopped waiting.
enum Stop {
    Exited(Option<std::result::Result<ContainerWaitResponse, DockerError>>),
    TimedOut,
    Cancelled,
}

/// Both streams' incomplete lines.
#[derive(Default)]
struct Lines {
    stdout: LineBuffer,
    stderr: LineBuffer,
}

impl Lines {
    /// Handles one item of the output stream; false when the stream has ended.
    fn feed(&mut self, item: Option<std::result::Result<LogOutput, DockerError>>, logs: &dyn LogSink) -> bool {
        match item {
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                self.stdout.push(&message, |line| logs.line(Stream::Stdout, line));
            }
            Some(Ok(LogOutput::StdErr { message })) => {
                self.stderr.push(&message, |line| logs.line(Stream::Stderr, line))
            }
            Some(Ok(LogOutput::StdIn { .. })) => {}
            Some(Err(_)) | None => return false,
        }
        true
    }

    /// Reads what is left of the output (up to [`DRAIN_LIMIT`]), then sends the last
    /// unterminated lines.
    async fn drain(&mut self, output: &mut OutputStream, open: bool, logs: &dyn LogSink) {
        if open {
            let _ = timeout(DRAIN_LIMIT, async { while self.feed(output.next().await, logs) {} }).await;
        }
        self.stdout.finish(|line| logs.line(Stream::Stdout, line));
        self.stderr.finish(|line| logs.line(Stream::Stderr, line));
    }
}

#[async_trait]
impl Runner for DockerRunner {
    async fn run(&self, task: &Task, logs: &dyn LogSink, cancel: CancellationToken) -> Result<Outcome> {
        if cancel.is_cancelled() {
            return Err(step_error(ErrorKind::Cancelled, task, "cancelled before it started"));
        }
        let deadline = task.timeout.map(|t| Instant::now() + t);
        let plan = self.plan(task)?;
        let mut container = Container { docker: None, id: None, name: plan.name.clone(), keep: !self.spec.remove };
        let prepared = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(Stop::Cancelled),
            () = sleep_until_some(deadline) => Err(Stop::TimedOut),
            prepared = self.prepare(task, &plan, logs, &mut container) => Ok(prepared),
        };
        let mut prepared = match prepared {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(e)) => {
                container.finish(logs).await;
                return Err(e);
            }
            Err(stop) => {
                // Stopped while preparing: the container may exist, even run.
                let how = self.stop(&container).await;
                container.finish(logs).await;
                return Err(self.stopped_error(task, &stop, &plan, how));
            }
        };

        // The container's output goes through a watch that notices the init failing to
        // start the program, so that shows as the same `NotFound` as without init.
        let watch = ExecWatch::new(logs);
        let logs: &dyn LogSink = &watch;
        let mut lines = Lines::default();
        let mut output_open = true;
        let stop = loop {
            tokio::select! {
                biased;
                item = prepared.wait.next() => break Stop::Exited(item),
                () = sleep_until_some(deadline) => break Stop::TimedOut,
                () = cancel.cancelled() => break Stop::Cancelled,
                item = prepared.output.next(), if output_open => output_open = lines.feed(item, logs),
            }
        };
        let result = match stop {
            Stop::Exited(item) => {
                lines.drain(&mut prepared.output, output_open, logs).await;
                let finished = SystemTime::now();
                match exit_code(item) {
                    Ok((127, _)) if watch.exec_failed() => Err(step_error(
                        ErrorKind::NotFound,
                        task,
                        format!(
                            "program `{}` not found in image `{}`: check its name and that the image provides it",
                            plan.program, plan.image
                        ),
                    )
                    .with_context("program", &plan.program)
                    .with_context("image", &plan.image)),
                    Ok((code, note)) => {
                        if let Some(note) = note {
                            logs.line(Stream::Stderr, &format!("nexus: Docker reported: {note}"));
                        }
                        let mut outcome = Outcome::exited(code, prepared.started, finished);
                        if let Some(dir) = &prepared.output_dir {
                            let (outputs, notes) = read_outputs(&dir.0.join("output"));
                            for note in notes {
                                logs.line(Stream::Stderr, &format!("nexus: {note}"));
                            }
                            outcome.outputs = outputs;
                        }
                        Ok(outcome)
                    }
                    Err(e) => Err(step_error(
                        api_kind(&e),
                        task,
                        format!("lost track of container `{}` while waiting for it: {e}", plan.name),
                    )),
                }
            }
            stop => {
                let how = self.stop(&container).await;
                lines.drain(&mut prepared.output, output_open, logs).await;
                Err(self.stopped_error(task, &stop, &plan, how))
            }
        };
        container.finish(logs).await;
        drop(prepared); // deletes the outputs directory
        result
    }

    /// Removes the containers a crashed run left on this runner's Docker host.
    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        remove_leftovers(Some(&self.host), run_id).await.map(drop)
    }
}

/// How a container was stopped.
enum Stopped {
    /// It was not running (any more).
    NotRunning,
    /// SIGTERM sufficed.
    Terminated,
    /// SIGKILL was needed after the grace period.
    Killed,
}

impl DockerRunner {
    /// Stops the container: SIGTERM, up to `kill_grace` to stop, then SIGKILL.
    async fn stop(&self, container: &Container) -> Stopped {
        let (Some(docker), Some(id)) = (&container.docker, &container.id) else { return Stopped::NotRunning };
        let term = KillContainerOptionsBuilder::new().signal("SIGTERM").build();
        if docker.kill_container(id, Some(term)).await.is_err() {
            // 409: not running; 404: gone. Either way there is nothing to stop.
            return Stopped::NotRunning;
        }
        let stopped = |limit| {
            let mut wait = docker.wait_container(id, None);
            async move { timeout(limit, wait.next()).await.is_ok() }
        };
        if stopped(self.spec.kill_grace.get()).await {
            return Stopped::Terminated;
        }
        let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
        let _ = docker.kill_container(id, Some(kill)).await;
        let _ = stopped(KILL_WAIT).await;
        Stopped::Killed
    }

    fn stopped_error(&self, task: &Task, stop: &Stop, plan: &Plan, how: Stopped) -> Error {
        let how = match how {
            Stopped::NotRunning => format!("container `{}` was not running", plan.name),
            Stopped::Terminated => format!("container `{}` was stopped with SIGTERM", plan.name),
            Stopped::Killed => format!(
                "container `{}` was killed with SIGKILL after a {} grace period",
                plan.name,
                nexus_core::model::Duration(self.spec.kill_grace.get())
            ),
        };
        let removed = if self.spec.remove { " and removed" } else { "" };
        let error = match stop {
            Stop::TimedOut => {
                let limit = nexus_core::model::Duration(task.timeout.unwrap_or_default());
                step_error(ErrorKind::Timeout, task, format!("timed out after {limit}; {how}{removed}"))
            }
            _ => step_error(ErrorKind::Cancelled, task, format!("cancelled; {how}{removed}")),
        };
        error.with_context("container", &plan.name)
    }
}

/// The exit code in the wait response, and a note when Docker reported an error.
fn exit_code(
    item: Option<std::result::Result<ContainerWaitResponse, DockerError>>,
) -> std::result::Result<(i32, Option<String>), DockerError> {
    let clamp = |code: i64| i32::try_from(code).unwrap_or(i32::MAX);
    match item {
        Some(Ok(response)) => {
            let note = response.error.and_then(|e| e.message).filter(|m| !m.is_empty());
            Ok((clamp(response.status_code), note))
        }
        // bollard reports a non-zero exit as an error; it is an exit code all the same.
        Some(Err(DockerError::DockerContainerWaitError { error, code })) => {
            Ok((clamp(code), Some(error).filter(|e| !e.is_empty())))
        }
        Some(Err(e)) => Err(e),
        None => Err(DockerError::DockerStreamError { error: "the wait ended without an exit code".to_owned() }),
    }
}

/// `(repository, tag or digest)` of an image reference, with `latest` when it has
/// neither (the Engine API pulls every tag when given none).
fn split_reference(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name, digest);
    }
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// A container name unique to the attempt: `nexus-<run>-<step>-<attempt>-<suffix>`,
/// with what Docker does not accept in a name replaced by `-`.
fn container_name(task: &Task, n: u64) -> String {
    let clean = |text: &str, max: usize| -> String {
        text.chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
            .take(max)
            .collect()
    };
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let suffix = (u64::from(std::process::id()) << 32 | u64::from(nanos)) ^ n.rotate_left(17);
    format!("nexus-{}-{}-{}-{suffix:x}", clean(&task.run_id, 24), clean(&task.step_id, 40), task.attempt)
}

/// An error about the attempt of `task`.
fn step_error(kind: ErrorKind, task: &Task, what: impl std::fmt::Display) -> Error {
    task.error(kind, DOCKER_KIND, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DockerRunnerKind;
    use nexus_core::ComponentKind;

    fn spec(value: serde_json::Value) -> DockerSpec {
        serde_json::from_value(value).unwrap()
    }

    fn shell_task(script: &str) -> Task {
        Task::new("run-1", "build[os=linux]", 2, Program::Shell { shell: String::new(), script: script.into() })
    }

    #[test]
    fn image_references_get_a_tag() {
        assert_eq!(split_reference("alpine"), ("alpine", "latest"));
        assert_eq!(split_reference("alpine:3.20"), ("alpine", "3.20"));
        assert_eq!(split_reference("localhost:5000/team/app"), ("localhost:5000/team/app", "latest"));
        assert_eq!(split_reference("localhost:5000/team/app:1"), ("localhost:5000/team/app", "1"));
        assert_eq!(split_reference("app@sha256:abc"), ("app", "sha256:abc"));
    }

    #[test]
    fn container_names_are_valid_and_unique() {
        let task = shell_task("true");
        let (a, b) = (container_name(&task, 0), container_name(&task, 1));
        assert_ne!(a, b);
        assert!(a.starts_with("nexus-run-1-build-os-linux--2-"), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')), "{a}");
    }

    #[test]
    fn the_host_comes_from_the_spec_then_the_environment() {
        assert_eq!(resolve_host(Some("tcp://build:2375")), "tcp://build:2375");
        let from_env = std::env::var("DOCKER_HOST").ok().filter(|h| !h.trim().is_empty());
        assert_eq!(resolve_host(None), from_env.unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned()));
        assert_eq!(resolve_host(Some("  ")), resolve_host(None));
    }

    #[test]
    fn build_touches_no_network_and_refuses_unknown_schemes() {
        // A socket that does not exist: building still works, the first attempt fails.
        let runner =
            DockerRunnerKind::build(spec(serde_json::json!({"image": "a", "host": "unix:///nonexistent.sock"})));
        assert!(runner.is_ok());
        let err =
            DockerRunner::new(spec(serde_json::json!({"image": "a", "host": "npipe:////./pipe/docker"}))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("npipe:"), "{err}");
    }

    #[test]
    fn shell_and_argv_programs_become_entrypoint_and_cmd() {
        let runner = DockerRunner::new(spec(serde_json::json!({"image": "base:1"}))).unwrap();
        let plan = runner.plan(&shell_task("echo hi")).unwrap();
        assert_eq!(plan.entrypoint, Some(vec!["sh".to_owned(), "-c".to_owned()]));
        assert_eq!(plan.cmd, ["echo hi"]);
        assert_eq!(plan.image, "base:1");

        let mut task = Task::new("r", "s", 1, Program::Argv(vec!["make".into(), "test".into()]));
        task.image = Some("other:2".into());
        let plan = runner.plan(&task).unwrap();
        assert_eq!(
            (plan.entrypoint, plan.cmd, plan.image.as_str()),
            (None, vec!["make".into(), "test".into()], "other:2")
        );

        let runner =
            DockerRunner::new(spec(serde_json::json!({"image": "b", "entrypoint": ["/bin/bash", "-lc"]}))).unwrap();
        let plan = runner.plan(&shell_task("echo hi")).unwrap();
        assert_eq!(plan.entrypoint, Some(vec!["/bin/bash".to_owned(), "-lc".to_owned()]));
        assert_eq!(plan.program, "/bin/bash");

        let empty = Task::new("r", "s", 1, Program::Argv(vec![]));
        assert_eq!(runner.plan(&empty).err().map(|e| e.kind()), Some(ErrorKind::InvalidConfig));
    }

    #[test]
    fn working_dirs_resolve_against_the_spec() {
        let with_base =
            DockerRunner::new(spec(serde_json::json!({"image": "a", "working_dir": "/workspace/"}))).unwrap();
        let without = DockerRunner::new(spec(serde_json::json!({"image": "a"}))).unwrap();
        let mut task = shell_task("true");
        assert_eq!(with_base.plan(&task).unwrap().working_dir.as_deref(), Some("/workspace/"));
        assert_eq!(without.plan(&task).unwrap().working_dir, None);
        task.working_dir = Some("src".into());
        assert_eq!(with_base.plan(&task).unwrap().working_dir.as_deref(), Some("/workspace/src"));
        let err = without.plan(&task).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("`src` is relative"), "{err}");
        task.working_dir = Some("/abs".into());
        assert_eq!(without.plan(&task).unwrap().working_dir.as_deref(), Some("/abs"));
    }

    #[test]
    fn the_container_carries_labels_env_limits_and_mounts() {
        let runner = DockerRunner::new(spec(serde_json::json!({
            "image": "a",
            "env": {"SHARED": "spec", "FROM_SPEC": "1"},
            "labels": {"team": "platform", "io.nexus.run": "spoofed"},
            "mounts": [{"source": "/srv/data", "target": "/data", "read_only": true}, {"source": "cache", "target": "/cache"}],
            "memory": "512m",
            "cpus": 1.5,
            "network": "none",
            "user": "1000:1000",
        })))
        .unwrap();
        let mut task = shell_task("true");
        task.env = vec![("SHARED".into(), "task".into())];
        task.secrets = vec![("TOKEN".into(), nexus_core::traits::SecretValue::new("t0k3n"))];
        let plan = runner.plan(&task).unwrap();
        let dir = OutputDir(PathBuf::from("/nonexistent/nexus-test-outputs"));
        let body = runner.container_body(&task, &plan, Some(&dir));
        std::mem::forget(dir);
        let env = body.env.unwrap();
        for expected in [
            "SHARED=task",
            "FROM_SPEC=1",
            "TOKEN=t0k3n",
            "NEXUS_RUN_ID=run-1",
            "NEXUS_STEP_ID=build[os=linux]",
            "NEXUS_ATTEMPT=2",
            "NEXUS_OUTPUT=/.nexus/output",
        ] {
            assert!(env.iter().any(|e| e == expected), "{expected} not in {env:?}");
        }
        assert_eq!(env.len(), 7, "{env:?}");
        let labels = body.labels.unwrap();
        assert_eq!(labels["io.nexus.run"], "run-1");
        assert_eq!(labels["io.nexus.step"], "build[os=linux]");
        assert_eq!(labels["io.nexus.attempt"], "2");
        assert_eq!(labels["team"], "platform");
        let host = body.host_config.unwrap();
        assert_eq!(host.memory, Some(512 << 20));
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.init, Some(true));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[2].target.as_deref(), Some("/.nexus"));
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn wait_errors_with_a_code_are_exit_codes() {
        let wait_error = DockerError::DockerContainerWaitError { error: String::new(), code: 3 };
        assert_eq!(exit_code(Some(Err(wait_error))).unwrap(), (3, None));
        let ok = ContainerWaitResponse { status_code: 0, error: None };
        assert_eq!(exit_code(Some(Ok(ok))).unwrap(), (0, None));
        assert!(exit_code(None).is_err());
    }

    #[tokio::test]
    async fn a_missing_socket_is_unavailable_and_names_the_host() {
        let runner =
            DockerRunner::new(spec(serde_json::json!({"image": "a", "host": "unix:///nonexistent/docker.sock"})))
                .unwrap();
        let logs = nexus_testkit::runner::CollectingSink::new();
        let err = runner.run(&shell_task("true"), &logs, CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.message().contains("unix:///nonexistent/docker.sock"), "{err}");
        assert!(err.message().contains("step `build[os=linux]`"), "{err}");
        let err = remove_leftovers(Some("unix:///nonexistent/docker.sock"), "r").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    }
}
