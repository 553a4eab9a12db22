//! The `kubernetes` runner's execution: one Job per attempt, through the Kubernetes API.
//!
//! An attempt:
//! 1. creates a Secret holding the task's secrets (when it has any), then the Job,
//!    both named `nx-<step>-<attempt>-<random>` and labelled with the run, step,
//!    attempt and Job;
//! 2. polls the Job's pod (found by its [`LABEL_JOB`] label) until its container runs
//!    or has ended, failing fast on image-pull and container-configuration errors,
//!    and after a grace period on a pod the scheduler cannot place;
//! 3. follows the container's log (`follow=true&timestamps=true`) to its end, line by
//!    line; when the stream breaks before its end it reconnects from the last
//!    timestamp seen (`sinceTime`, whole seconds) and skips the lines it already had;
//! 4. reads the exit code from the container's `state.terminated.exitCode`;
//! 5. deletes the Secret, and the Job unless `ttl_seconds_after_finished` keeps it.
//!
//! On timeout or cancel (or an error once the Job exists), the Job is deleted with
//! `propagationPolicy: Foreground`, its pods too, and the runner waits (bounded) until
//! the pods are gone.
//!
//! ## The wrapper
//!
//! A pod has one log stream where stdout and stderr are mixed, and nothing of its file
//! system outlives the container. So the container runs the program under a short POSIX
//! `sh` script ([`WRAPPER`]) given a random per-attempt marker: it sends the program's
//! stderr through a FIFO and prints each stderr line as `<marker>:e <line>`; once the
//! program has ended it prints each line of `$NEXUS_OUTPUT` (a file it created) as
//! `<marker>:o <line>`, and exits with the program's exit status. The runner strips
//! those lines from the log: stderr lines go to the sink as stderr, output lines become
//! the outcome's outputs. The image therefore needs `sh`, `mktemp` and `mkfifo` (any
//! busybox, Debian, Alpine or UBI image has them) and a writable `/tmp`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::io::{AsyncBufRead, AsyncBufReadExt};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerStateTerminated, EnvVar, EnvVarSource, Pod, PodSpec, PodTemplateSpec, ResourceRequirements,
    Secret, SecretKeySelector, Toleration as K8sToleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nexus_core::lines::LineBuffer;
use nexus_core::outputs::{MAX_OUTPUT_BYTES, read_outputs_bytes};
use nexus_core::traits::{LogSink, Outcome, Program, Runner, Stream, Task, sleep_until_some};
use nexus_core::{Error, ErrorKind, Result};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::{
    ImagePullPolicy, KUBERNETES_KIND, KubernetesSpec, LABEL_ATTEMPT, LABEL_JOB, LABEL_RUN, LABEL_STEP, ResourceList,
    TolerationOperator,
};

/// The name of the Job's only container.
pub const CONTAINER: &str = "step";

/// The `sh -c` script the container runs: `sh -c WRAPPER nexus MARKER PROGRAM ARGS…`.
/// See the module documentation.
pub const WRAPPER: &str = r#"m=$1; shift
if ! command -v "$1" >/dev/null 2>&1; then printf '%s:notfound\n' "$m"; exit 127; fi
d=$(mktemp -d 2>/dev/null) && mkfifo "$d/err" || { printf '%s:fail cannot create a temporary directory with a FIFO in /tmp (mktemp -d, mkfifo)\n' "$m"; exit 125; }
export NEXUS_OUTPUT="$d/output"
: >"$NEXUS_OUTPUT"
while IFS= read -r l || [ -n "$l" ]; do printf '%s:e %s\n' "$m" "$l"; done <"$d/err" &
r=$!
trap 'kill -TERM "$p" 2>/dev/null' TERM INT HUP
"$@" 2>"$d/err" &
p=$!
wait "$p"; c=$?
while kill -0 "$p" 2>/dev/null; do wait "$p"; c=$?; done
( sleep 2; kill "$r" ) >/dev/null 2>&1 &
k=$!
wait "$r"
kill "$k" 2>/dev/null
while IFS= read -r l || [ -n "$l" ]; do printf '%s:o %s\n' "$m" "$l"; done <"$NEXUS_OUTPUT"
rm -rf "$d"
exit "$c""#;

/// Timings of an attempt; [`Timings::default`] is what a built runner uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timings {
    /// How often the pod is looked at while it starts and once its log has ended.
    pub poll: Duration,
    /// How long a pod the scheduler cannot place (`PodScheduled=False`,
    /// `Unschedulable`) may wait before the attempt fails with the scheduler's message.
    pub unschedulable_grace: Duration,
    /// How long the Job may go without a pod before the attempt fails.
    pub no_pod_grace: Duration,
    /// The pods' `terminationGracePeriodSeconds`: how long the program has between
    /// SIGTERM and SIGKILL when the Job is deleted.
    pub kill_grace: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            poll: Duration::from_millis(500),
            unschedulable_grace: Duration::from_secs(120),
            no_pod_grace: Duration::from_secs(120),
            kill_grace: Duration::from_secs(10),
        }
    }
}

/// How long after the pods' grace period a stopped attempt waits for them to be gone.
const GONE_WAIT: Duration = Duration::from_secs(15);
/// How much longer than the pods' grace period and [`GONE_WAIT`] removing what an
/// attempt created may take.
const FINISH_MARGIN: Duration = Duration::from_secs(30);
/// How long the container's status may lag behind the end of its log.
const STATUS_WAIT: Duration = Duration::from_secs(60);
/// How many times in a row the log stream may fail before the attempt fails.
const MAX_LOG_RECONNECTS: u32 = 10;
/// Added to the task's timeout as the Job's `activeDeadlineSeconds`: the cluster's
/// own stop, should Nexus die during the attempt.
const DEADLINE_MARGIN_SECS: i64 = 60;

/// Runs step attempts as Kubernetes Jobs (see the module documentation).
pub struct KubernetesRunner {
    spec: KubernetesSpec,
    timings: Timings,
    cluster: tokio::sync::OnceCell<Cluster>,
    next: AtomicU64,
}

impl fmt::Debug for KubernetesRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesRunner").field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// A connected client and how errors name the cluster.
#[derive(Clone)]
struct Cluster {
    client: Client,
    /// `the Kubernetes API at URL (context `C`)`.
    named: String,
}

impl KubernetesRunner {
    /// A runner with these settings. Nothing is read or contacted until the first
    /// attempt (or [`Runner::cleanup_run`]).
    pub fn new(spec: KubernetesSpec) -> Self {
        KubernetesRunner {
            spec,
            timings: Timings::default(),
            cluster: tokio::sync::OnceCell::new(),
            next: AtomicU64::new(0),
        }
    }

    /// The same runner with other timings (tests use short ones).
    pub fn with_timings(mut self, timings: Timings) -> Self {
        self.timings = timings;
        self
    }

    async fn cluster(&self) -> Result<&Cluster> {
        self.cluster.get_or_try_init(|| connect(&self.spec)).await
    }

    fn jobs(&self, cluster: &Cluster) -> Api<Job> {
        Api::namespaced(cluster.client.clone(), &self.spec.namespace)
    }

    fn pods(&self, cluster: &Cluster) -> Api<Pod> {
        Api::namespaced(cluster.client.clone(), &self.spec.namespace)
    }

    fn secrets(&self, cluster: &Cluster) -> Api<Secret> {
        Api::namespaced(cluster.client.clone(), &self.spec.namespace)
    }
}

/// Builds the client: the spec's kubeconfig, else `KUBECONFIG` or `~/.kube/config`,
/// else the in-cluster service account; the spec's context, else the current one.
async fn connect(spec: &KubernetesSpec) -> Result<Cluster> {
    // kube's TLS uses the process's default rustls provider; choose `ring` (what this
    // crate builds with) unless the program chose one, so that another crate enabling
    // a second provider cannot leave rustls unable to pick.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config_error = |kind, what: String| {
        Error::new(kind, what).with_operation("runner.connect").with_context("runner", KUBERNETES_KIND)
    };
    let (kubeconfig, source) = match spec.kubeconfig.as_deref() {
        Some(path) => {
            let path = expand_home(path);
            let config = Kubeconfig::read_from(&path).map_err(|e| {
                config_error(ErrorKind::InvalidConfig, format!("cannot read the kubeconfig `{path}`: {e}"))
            })?;
            (Some(config), path)
        }
        None => {
            let path = std::env::var("KUBECONFIG").ok().filter(|p| !p.trim().is_empty());
            let home = std::env::var("HOME").ok().map(|h| format!("{h}/.kube/config"));
            let exists = path.is_some() || home.as_deref().is_some_and(|h| std::path::Path::new(h).exists());
            if exists {
                let shown = path.or(home).unwrap_or_default();
                let config = Kubeconfig::read().map_err(|e| {
                    config_error(ErrorKind::InvalidConfig, format!("cannot read the kubeconfig `{shown}`: {e}"))
                })?;
                (Some(config), shown)
            } else {
                (None, String::new())
            }
        }
    };
    let (config, context) = match kubeconfig {
        Some(kubeconfig) => {
            let context = spec.context.clone().or_else(|| kubeconfig.current_context.clone());
            let names: Vec<String> = kubeconfig.contexts.iter().map(|c| c.name.clone()).collect();
            if let Some(wanted) = &spec.context
                && !names.iter().any(|n| n == wanted)
            {
                return Err(config_error(
                    ErrorKind::InvalidConfig,
                    format!(
                        "the kubeconfig `{source}` has no context `{wanted}`; its contexts: {}",
                        if names.is_empty() { "none".to_owned() } else { names.join(", ") }
                    ),
                ));
            }
            let options = KubeConfigOptions { context: spec.context.clone(), ..Default::default() };
            let config = Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| {
                config_error(
                    ErrorKind::InvalidConfig,
                    format!(
                        "cannot use context `{}` of the kubeconfig `{source}`: {e}",
                        context.as_deref().unwrap_or("(current)")
                    ),
                )
            })?;
            (config, context.map_or_else(|| "current context".to_owned(), |c| format!("context `{c}`")))
        }
        None => {
            if let Some(context) = &spec.context {
                return Err(config_error(
                    ErrorKind::InvalidConfig,
                    format!(
                        "context `{context}` is set but there is no kubeconfig (set `kubeconfig`, KUBECONFIG, or create ~/.kube/config)"
                    ),
                ));
            }
            let config = Config::incluster().map_err(|e| {
                config_error(
                    ErrorKind::Unavailable,
                    format!(
                        "no kubeconfig (`kubeconfig`, KUBECONFIG, ~/.kube/config) and not running in a pod with a service account: {e}"
                    ),
                )
            })?;
            (config, "in-cluster service account".to_owned())
        }
    };
    let named = format!("the Kubernetes API at {} ({context})", config.cluster_url);
    let client = Client::try_from(config).map_err(|e| {
        config_error(ErrorKind::InvalidConfig, format!("cannot build a client for {named}: {e}")).with_source(e)
    })?;
    Ok(Cluster { client, named })
}

/// `~/x` → `$HOME/x`.
fn expand_home(path: &str) -> String {
    match (path.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{}/{rest}", home.trim_end_matches('/')),
        _ => path.to_owned(),
    }
}

/// An API error as a Nexus error: `what` failed, and why, naming the cluster.
fn api_error(cluster: &Cluster, e: kube::Error, what: &str) -> Error {
    let (kind, why) = match &e {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() { status.reason.clone() } else { status.message.clone() };
            match status.code {
                401 => (
                    ErrorKind::PermissionDenied,
                    format!(
                        "{} refused the credentials (401 Unauthorized): {message}; check the kubeconfig's user (token, certificate) for this context",
                        cluster.named
                    ),
                ),
                403 => (
                    ErrorKind::PermissionDenied,
                    format!(
                        "forbidden by {} (403): {message}; the user needs RBAC permission to manage jobs, pods, pods/log and secrets in the namespace",
                        cluster.named
                    ),
                ),
                404 => (ErrorKind::NotFound, format!("not found (404) at {}: {message}", cluster.named)),
                409 => (ErrorKind::Conflict, format!("conflict (409) at {}: {message}", cluster.named)),
                400 | 422 => {
                    (ErrorKind::InvalidConfig, format!("refused by {} ({}): {message}", cluster.named, status.code))
                }
                code => (ErrorKind::Unavailable, format!("{} answered {code}: {message}", cluster.named)),
            }
        }
        other => (
            ErrorKind::Unavailable,
            format!(
                "cannot reach {}: {other}; check that the cluster is up and the URL and context are right",
                cluster.named
            ),
        ),
    };
    Error::new(kind, format!("{what}: {why}")).with_source(e)
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// What one attempt creates, by name (known before anything is created).
#[derive(Debug, Clone, PartialEq)]
pub struct Names {
    /// The Job's name (also the Secret's).
    pub job: String,
    /// The per-attempt marker of the wrapper's lines.
    pub marker: String,
}

impl KubernetesRunner {
    fn names(&self, task: &Task) -> Names {
        let random = random_u64(self.next.fetch_add(1, Ordering::Relaxed));
        let step = dns_part(&task.step_id, 30);
        let step = if step.is_empty() { "step".to_owned() } else { step };
        Names {
            job: format!("nx-{step}-{}-{:08x}", task.attempt, random as u32),
            marker: format!("nexus-{:016x}", random_u64(random)),
        }
    }

    /// The labels of the Job, its pod and its Secret: the spec's, then Nexus' own.
    fn labels(&self, task: &Task, names: &Names) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> =
            self.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.insert(LABEL_RUN.to_owned(), label_value(&task.run_id));
        labels.insert(LABEL_STEP.to_owned(), label_value(&task.step_id));
        labels.insert(LABEL_ATTEMPT.to_owned(), task.attempt.to_string());
        labels.insert(LABEL_JOB.to_owned(), names.job.clone());
        labels.insert("app.kubernetes.io/managed-by".to_owned(), "nexus".to_owned());
        labels
    }

    /// The annotations with the exact ids.
    fn annotations(task: &Task) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_RUN.to_owned(), task.run_id.clone()),
            (LABEL_STEP.to_owned(), task.step_id.clone()),
            (LABEL_ATTEMPT.to_owned(), task.attempt.to_string()),
        ])
    }

    /// The image of the attempt: the task's, else the spec's.
    fn image(&self, task: &Task) -> Result<String> {
        let image = task.image.as_deref().map(str::trim).filter(|i| !i.is_empty());
        match image.or(self.spec.image.as_deref()) {
            Some(image) => Ok(image.to_owned()),
            None => Err(step_error(
                ErrorKind::InvalidConfig,
                task,
                "no image: give the step an `image`, or the kubernetes runner an `image`",
            )),
        }
    }

    /// The program the wrapper runs: `[shell, -c, script]` or the argv.
    fn program(task: &Task) -> Result<Vec<String>> {
        match &task.program {
            Program::Shell { shell, script } => {
                let shell = if shell.trim().is_empty() { "sh" } else { shell.as_str() };
                Ok(vec![shell.to_owned(), "-c".to_owned(), script.clone()])
            }
            Program::Argv(argv) if argv.first().is_some_and(|p| !p.is_empty()) => Ok(argv.clone()),
            Program::Argv(_) => Err(step_error(
                ErrorKind::InvalidConfig,
                task,
                "the program to run is empty (`argv` has no program name)",
            )),
            _ => Err(step_error(
                ErrorKind::Unsupported,
                task,
                "the kubernetes runner does not support this kind of program",
            )),
        }
    }

    /// The per-attempt Secret holding the task's secrets, if it has any. Keys are the
    /// variables' names.
    pub fn secret(&self, task: &Task, names: &Names) -> Option<Secret> {
        if task.secrets.is_empty() {
            return None;
        }
        let data: BTreeMap<String, String> =
            task.secrets.iter().map(|(name, value)| (name.clone(), value.expose().to_owned())).collect();
        Some(Secret {
            metadata: ObjectMeta {
                name: Some(names.job.clone()),
                namespace: Some(self.spec.namespace.clone()),
                labels: Some(self.labels(task, names)),
                annotations: Some(Self::annotations(task)),
                ..Default::default()
            },
            string_data: Some(data),
            type_: Some("Opaque".to_owned()),
            ..Default::default()
        })
    }

    /// The Job of an attempt, running `image` (see [`KubernetesRunner::image`]).
    pub fn job(&self, task: &Task, names: &Names, image: &str) -> Result<Job> {
        let mut command = vec!["sh".to_owned(), "-c".to_owned(), WRAPPER.to_owned(), "nexus".to_owned()];
        command.push(names.marker.clone());
        command.extend(Self::program(task)?);

        let mut env: Vec<EnvVar> = Vec::new();
        let mut set = |var: EnvVar| match env.iter_mut().find(|e| e.name == var.name) {
            Some(existing) => *existing = var,
            None => env.push(var),
        };
        let plain = |name: &str, value: &str| EnvVar {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            ..Default::default()
        };
        for (name, value) in &task.env {
            set(plain(name, value));
        }
        set(plain("NEXUS_RUN_ID", &task.run_id));
        set(plain("NEXUS_STEP_ID", &task.step_id));
        set(plain("NEXUS_ATTEMPT", &task.attempt.to_string()));
        for (name, _) in &task.secrets {
            set(EnvVar {
                name: name.clone(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: names.job.clone(),
                        key: name.clone(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }

        let resources = self.spec.resources.as_ref().map(|r| {
            let list = |list: &Option<ResourceList>| {
                let list = list.as_ref()?;
                let map: BTreeMap<String, K8sQuantity> = [("cpu", &list.cpu), ("memory", &list.memory)]
                    .into_iter()
                    .filter_map(|(name, q)| q.as_ref().map(|q| (name.to_owned(), K8sQuantity(q.0.clone()))))
                    .collect();
                (!map.is_empty()).then_some(map)
            };
            ResourceRequirements { requests: list(&r.requests), limits: list(&r.limits), ..Default::default() }
        });
        let container = Container {
            name: CONTAINER.to_owned(),
            image: Some(image.to_owned()),
            command: Some(command),
            env: Some(env),
            working_dir: task.working_dir.clone(),
            resources,
            image_pull_policy: self.spec.image_pull_policy.map(|p| {
                match p {
                    ImagePullPolicy::Always => "Always",
                    ImagePullPolicy::IfNotPresent => "IfNotPresent",
                    ImagePullPolicy::Never => "Never",
                }
                .to_owned()
            }),
            ..Default::default()
        };
        let tolerations: Vec<K8sToleration> = self
            .spec
            .tolerations
            .iter()
            .map(|t| K8sToleration {
                key: t.key.clone(),
                operator: Some(match t.operator {
                    TolerationOperator::Equal => "Equal".to_owned(),
                    TolerationOperator::Exists => "Exists".to_owned(),
                }),
                value: t.value.clone(),
                effect: t.effect.map(|e| format!("{e:?}")),
                toleration_seconds: t.toleration_seconds.and_then(|s| i64::try_from(s).ok()),
            })
            .collect();
        let labels = self.labels(task, names);
        let meta = ObjectMeta {
            labels: Some(labels.clone()),
            annotations: Some(Self::annotations(task)),
            ..Default::default()
        };
        let pod = PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".to_owned()),
            service_account_name: self.spec.service_account.clone(),
            node_selector: (!self.spec.node_selector.is_empty())
                .then(|| self.spec.node_selector.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            termination_grace_period_seconds: Some(self.timings.kill_grace.as_secs().max(1) as i64),
            ..Default::default()
        };
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(names.job.clone()),
                namespace: Some(self.spec.namespace.clone()),
                ..meta.clone()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                ttl_seconds_after_finished: self
                    .spec
                    .ttl_seconds_after_finished
                    .map(i32::try_from)
                    .and_then(|t| t.ok()),
                active_deadline_seconds: task
                    .timeout
                    .map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX / 2) + DEADLINE_MARGIN_SECS),
                template: PodTemplateSpec { metadata: Some(meta), spec: Some(pod) },
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// A per-process random number (std's `RandomState` is seeded from the OS).
fn random_u64(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(salt);
    hasher.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// A DNS-label fragment of `text`: lowercase letters, digits and single `-`, at most
/// `max` characters, no `-` at either end.
fn dns_part(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= max {
            break;
        }
    }
    out.trim_end_matches('-').to_owned()
}

/// `text` as a label value: letters, digits, `-`, `_` and `.` (others become `-`),
/// alphanumeric at both ends, at most 63 characters; a value that had to be cut ends
/// with a hash of the whole id, so distinct long ids stay distinct. The exact id is in
/// the annotation of the same key.
pub fn label_value(text: &str) -> String {
    let clean: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect();
    let trim = |s: &str| s.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned();
    let clean = trim(&clean);
    if clean.len() <= 63 {
        return clean;
    }
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{}-{:08x}", trim(&clean[..54]), hash as u32)
}

/// An error about the attempt of `task`.
fn step_error(kind: ErrorKind, task: &Task, what: impl std::fmt::Display) -> Error {
    task.error(kind, KUBERNETES_KIND, what)
}

/// Why an attempt stopped early.
enum Stop {
    TimedOut,
    Cancelled,
}

/// What the attempt created, so that it is removed however the attempt ends (also when
/// the engine drops the attempt: then in the background).
struct Created {
    cluster: Option<Cluster>,
    namespace: String,
    job: String,
    /// Whether the Secret's creation was sent (it may exist).
    secret_sent: bool,
    /// Whether the Job's creation was sent (it may exist).
    job_sent: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        let Some(cluster) = self.cluster.take() else { return };
        let (namespace, job) = (self.namespace.clone(), self.job.clone());
        let (job_sent, secret) = (self.job_sent, self.secret_sent);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if job_sent {
                    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &namespace);
                    let _ = jobs.delete(&job, &DeleteParams::foreground()).await;
                }
                if secret {
                    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), &namespace);
                    let _ = secrets.delete(&job, &DeleteParams::default()).await;
                }
            });
        }
    }
}

/// The container's state, as far as starting it goes.
enum PodState {
    /// Not yet running, for no reason worth reporting.
    Pending,
    /// Running or ended: its log can be read.
    Started,
    /// The scheduler cannot place it.
    Unschedulable(String),
    /// The image cannot be pulled: reason, message.
    ImagePull(String, String),
    /// The container cannot be created: reason, message.
    Config(String, String),
    /// The pod failed before its container ran: reason, message.
    Failed(String, String),
}

fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == CONTAINER))
        .and_then(|c| c.state.as_ref());
    if let Some(state) = container {
        if state.running.is_some() || state.terminated.is_some() {
            return PodState::Started;
        }
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.clone().unwrap_or_default();
            let message = waiting.message.clone().unwrap_or_default();
            match reason.as_str() {
                "ErrImagePull"
                | "ImagePullBackOff"
                | "InvalidImageName"
                | "ErrImageNeverPull"
                | "RegistryUnavailable" => {
                    return PodState::ImagePull(reason, message);
                }
                "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
                    return PodState::Config(reason, message);
                }
                _ => {}
            }
        }
    }
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    if phase == "Failed" || phase == "Succeeded" {
        let reason = status.and_then(|s| s.reason.clone()).unwrap_or_else(|| phase.to_owned());
        let message = status.and_then(|s| s.message.clone()).unwrap_or_default();
        return PodState::Failed(reason, message);
    }
    let unschedulable = status.and_then(|s| s.conditions.as_ref()).and_then(|conditions| {
        conditions
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
    });
    match unschedulable {
        Some(condition) => PodState::Unschedulable(condition.message.clone().unwrap_or_default()),
        None => PodState::Pending,
    }
}

fn terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .clone()
}

#[async_trait]
impl Runner for KubernetesRunner {
    async fn run(&self, task: &Task, logs: &dyn LogSink, cancel: CancellationToken) -> Result<Outcome> {
        if cancel.is_cancelled() {
            return Err(step_error(ErrorKind::Cancelled, task, "cancelled before it started"));
        }
        let deadline = task.timeout.map(|t| Instant::now() + t);
        let names = self.names(task);
        let image = self.image(task)?;
        let job = self.job(task, &names, &image)?;
        let secret = self.secret(task, &names);
        let cluster = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(step_error(ErrorKind::Cancelled, task, "cancelled while connecting to the cluster")),
            () = sleep_until_some(deadline) => return Err(self.stopped_error(task, &Stop::TimedOut, &names, "nothing was created")),
            cluster = self.cluster() => cluster.map_err(|e| task.rescope(e))?,
        };
        let mut created = Created {
            cluster: Some(cluster.clone()),
            namespace: self.spec.namespace.clone(),
            job: names.job.clone(),
            secret_sent: false,
            job_sent: false,
        };
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(Stop::Cancelled),
            () = sleep_until_some(deadline) => Err(Stop::TimedOut),
            result = self.execute(cluster, task, &names, (&image, job, secret), logs, &mut created) => Ok(result),
        };
        match result {
            Ok(Ok(outcome)) => {
                self.finish_within(cluster, &mut created, logs, false).await;
                Ok(outcome)
            }
            Ok(Err(e)) => {
                self.finish_within(cluster, &mut created, logs, true).await;
                Err(e)
            }
            Err(stop) => {
                let how = self.finish_within(cluster, &mut created, logs, true).await;
                Err(self.stopped_error(task, &stop, &names, &how))
            }
        }
    }

    /// Deletes the Jobs (with their pods) and Secrets labelled with run `run_id` in the
    /// runner's namespace.
    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        let cluster = self.cluster().await?;
        let selector = ListParams::default().labels(&format!("{LABEL_RUN}={}", label_value(run_id)));
        let ours =
            |meta: &ObjectMeta| meta.annotations.as_ref().and_then(|a| a.get(LABEL_RUN)).is_some_and(|r| r == run_id);
        let what =
            |kind: &str| format!("cannot clean up the {kind} of run `{run_id}` in namespace `{}`", self.spec.namespace);
        let fail = |e, kind: &str| {
            api_error(cluster, e, &what(kind))
                .with_operation("runner.cleanup_run")
                .with_context("runner", KUBERNETES_KIND)
                .with_context("run", run_id)
        };
        delete_listed(&self.jobs(cluster), &selector, &DeleteParams::foreground(), ours)
            .await
            .map_err(|e| fail(e, "Jobs"))?;
        delete_listed(&self.pods(cluster), &selector, &DeleteParams::default(), ours)
            .await
            .map_err(|e| fail(e, "pods"))?;
        delete_listed(&self.secrets(cluster), &selector, &DeleteParams::default(), ours)
            .await
            .map_err(|e| fail(e, "Secrets"))
    }
}

/// Deletes the objects of `api` that `selector` lists and `ours` accepts; one already
/// gone (404) is not an error.
async fn delete_listed<K>(
    api: &Api<K>,
    selector: &ListParams,
    params: &DeleteParams,
    ours: impl Fn(&ObjectMeta) -> bool,
) -> std::result::Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug,
{
    for object in api.list(selector).await?.items {
        let meta = object.meta();
        if let (true, Some(name)) = (ours(meta), &meta.name) {
            match api.delete(name, params).await {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl KubernetesRunner {
    /// Creates the Secret and the Job (of `image`), follows the pod to its end.
    async fn execute(
        &self,
        cluster: &Cluster,
        task: &Task,
        names: &Names,
        (image, job, secret): (&str, Job, Option<Secret>),
        logs: &dyn LogSink,
        created: &mut Created,
    ) -> Result<Outcome> {
        let at = |what: &str| format!("{what} in namespace `{}`", self.spec.namespace);
        if let Some(secret) = secret {
            created.secret_sent = true;
            self.secrets(cluster).create(&PostParams::default(), &secret).await.map_err(|e| {
                task.rescope(api_error(cluster, e, &at(&format!("cannot create the Secret `{}`", names.job))))
                    .with_context("namespace", &self.spec.namespace)
            })?;
        }
        created.job_sent = true;
        self.jobs(cluster).create(&PostParams::default(), &job).await.map_err(|e| {
            task.rescope(api_error(
                cluster,
                e,
                &at(&format!("cannot create the Job `{}` of image `{image}`", names.job)),
            ))
            .with_context("namespace", &self.spec.namespace)
            .with_context("job", &names.job)
            .with_context("image", image)
        })?;
        let started = SystemTime::now();
        let pod = self.wait_started(cluster, task, names, image, logs).await?;
        let pod_error = |e: Error| {
            task.rescope(e)
                .with_context("namespace", &self.spec.namespace)
                .with_context("job", &names.job)
                .with_context("pod", &pod)
        };
        let mut follow = Follow::new(&names.marker, logs);
        self.follow_logs(cluster, &pod, &mut follow)
            .await
            .map_err(|e| pod_error(api_error(cluster, e, &at(&format!("lost the log of pod `{pod}`")))))?;
        let end = self.wait_terminated(cluster, &pod).await.map_err(pod_error)?;
        let finished = SystemTime::now();
        let state = follow.state;
        let reason = end.reason.clone().unwrap_or_default();
        if state.not_found {
            let program = Self::program(task)?.remove(0);
            return Err(step_error(
                ErrorKind::NotFound,
                task,
                format!(
                    "program `{program}` not found in image `{image}`: check its name and that the image provides it"
                ),
            )
            .with_context("program", program)
            .with_context("image", image)
            .with_context("job", &names.job));
        }
        if let Some(failure) = &state.failure {
            return Err(step_error(
                ErrorKind::Unavailable,
                task,
                format!("in pod `{pod}` (image `{image}`): {failure}"),
            )
            .with_context("image", image)
            .with_context("pod", &pod));
        }
        if matches!(reason.as_str(), "StartError" | "ContainerCannotRun") {
            let message = end.message.clone().unwrap_or_default();
            return Err(step_error(
                ErrorKind::NotFound,
                task,
                format!(
                    "the container of pod `{pod}` could not start ({reason}: {message}); the kubernetes runner runs the step through `sh`: image `{image}` must provide a POSIX shell with mktemp and mkfifo"
                ),
            )
            .with_context("image", image)
            .with_context("pod", &pod));
        }
        if reason == "OOMKilled" {
            logs.line(
                Stream::Stderr,
                &format!(
                    "nexus: the container of pod `{pod}` was killed for using more memory than its limit (OOMKilled)"
                ),
            );
        }
        let mut outcome = Outcome::exited(end.exit_code, started, finished);
        let (outputs, notes) = read_outputs_bytes(state.outputs);
        for note in notes {
            logs.line(Stream::Stderr, &format!("nexus: {note}"));
        }
        outcome.outputs = outputs;
        Ok(outcome)
    }

    /// Waits until the Job's pod has started its container (or ended); returns its name.
    async fn wait_started(
        &self,
        cluster: &Cluster,
        task: &Task,
        names: &Names,
        image: &str,
        logs: &dyn LogSink,
    ) -> Result<String> {
        let pods = self.pods(cluster);
        let selector = ListParams::default().labels(&format!("{LABEL_JOB}={}", names.job));
        let begun = Instant::now();
        let mut unschedulable_since: Option<Instant> = None;
        let ns = &self.spec.namespace;
        let error = |kind, what: String| {
            step_error(kind, task, what)
                .with_context("namespace", ns)
                .with_context("job", &names.job)
                .with_context("image", image)
        };
        loop {
            let list = pods.list(&selector).await.map_err(|e| {
                task.rescope(api_error(
                    cluster,
                    e,
                    &format!("cannot list the pods of Job `{}` in namespace `{ns}`", names.job),
                ))
            })?;
            match list.items.first() {
                Some(pod) => {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    match pod_state(pod) {
                        PodState::Started => return Ok(name),
                        PodState::Pending => unschedulable_since = None,
                        PodState::ImagePull(reason, message) => {
                            let lower = message.to_lowercase();
                            let kind = if reason == "InvalidImageName" {
                                ErrorKind::InvalidConfig
                            } else if lower.contains("unauthorized")
                                || lower.contains("denied")
                                || lower.contains("forbidden")
                            {
                                ErrorKind::PermissionDenied
                            } else if reason == "ErrImageNeverPull"
                                || lower.contains("not found")
                                || lower.contains("manifest unknown")
                            {
                                ErrorKind::NotFound
                            } else {
                                ErrorKind::Unavailable
                            };
                            return Err(error(
                                kind,
                                format!(
                                    "image `{image}` cannot be pulled: {reason}: {message} (pod `{name}` of Job `{}` in namespace `{ns}`); check the image name and tag, that the nodes can reach its registry, and the pull secrets",
                                    names.job
                                ),
                            ));
                        }
                        PodState::Config(reason, message) => {
                            return Err(error(
                                ErrorKind::InvalidConfig,
                                format!(
                                    "the container of pod `{name}` (Job `{}`, namespace `{ns}`, image `{image}`) cannot be created: {reason}: {message}",
                                    names.job
                                ),
                            ));
                        }
                        PodState::Failed(reason, message) => {
                            return Err(error(
                                ErrorKind::Unavailable,
                                format!(
                                    "pod `{name}` of Job `{}` in namespace `{ns}` failed before its container ran: {reason}: {message}",
                                    names.job
                                ),
                            ));
                        }
                        PodState::Unschedulable(message) => {
                            let since = *unschedulable_since.get_or_insert_with(|| {
                                logs.line(
                                    Stream::Stderr,
                                    &format!("nexus: pod `{name}` cannot be scheduled yet: {message}"),
                                );
                                Instant::now()
                            });
                            if since.elapsed() >= self.timings.unschedulable_grace {
                                return Err(error(
                                    ErrorKind::Unavailable,
                                    format!(
                                        "pod `{name}` of Job `{}` in namespace `{ns}` cannot be scheduled: {message} (waited {}); check the resources, node_selector and tolerations against the nodes",
                                        names.job,
                                        nexus_core::model::Duration(self.timings.unschedulable_grace)
                                    ),
                                ));
                            }
                        }
                    }
                }
                None if begun.elapsed() >= self.timings.no_pod_grace => {
                    return Err(error(
                        ErrorKind::Unavailable,
                        format!(
                            "Job `{}` in namespace `{ns}` created no pod within {}; see `kubectl -n {ns} describe job {}` (quota, admission or service account problems show there)",
                            names.job,
                            nexus_core::model::Duration(self.timings.no_pod_grace),
                            names.job
                        ),
                    ));
                }
                None => {}
            }
            sleep(self.timings.poll).await;
        }
    }

    /// Follows the container's log to its end, reconnecting when the stream breaks.
    async fn follow_logs(
        &self,
        cluster: &Cluster,
        pod: &str,
        follow: &mut Follow<'_>,
    ) -> std::result::Result<(), kube::Error> {
        let pods = self.pods(cluster);
        let mut failures = 0;
        loop {
            let since = follow.resume();
            let before = follow.received();
            let params = LogParams {
                container: Some(CONTAINER.to_owned()),
                follow: true,
                timestamps: true,
                since_time: since,
                ..Default::default()
            };
            let error = match pods.log_stream(pod, &params).await {
                Ok(reader) => match read_lines(Box::pin(reader), follow).await {
                    Ok(()) => return Ok(()),
                    Err(e) => kube::Error::ReadEvents(e),
                },
                Err(e) => e,
            };
            // A stream that brought lines before it broke starts a new count.
            failures = if follow.received() > before { 1 } else { failures + 1 };
            if failures > MAX_LOG_RECONNECTS || matches!(status_code(&error), Some(400..=499)) {
                return Err(error);
            }
            sleep(self.timings.poll).await;
        }
    }

    /// Waits until the container's status says it ended.
    async fn wait_terminated(&self, cluster: &Cluster, pod: &str) -> Result<ContainerStateTerminated> {
        let pods = self.pods(cluster);
        let ns = &self.spec.namespace;
        let begun = Instant::now();
        loop {
            match pods.get(pod).await {
                Ok(found) => {
                    if let Some(end) = terminated(&found) {
                        return Ok(end);
                    }
                }
                Err(e) if status_code(&e) == Some(404) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "pod `{pod}` in namespace `{ns}` was deleted (evicted, or deleted by someone else) before its exit code was known"
                        ),
                    ));
                }
                Err(e) => return Err(api_error(cluster, e, &format!("cannot read pod `{pod}` in namespace `{ns}`"))),
            }
            if begun.elapsed() >= STATUS_WAIT {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the log of pod `{pod}` in namespace `{ns}` ended but its container has not been reported as ended within {}",
                        nexus_core::model::Duration(STATUS_WAIT)
                    ),
                ));
            }
            sleep(self.timings.poll.min(Duration::from_millis(200))).await;
        }
    }

    /// [`KubernetesRunner::finish`], within a limit: an API server that stops answering
    /// does not hang the attempt (what is left is reported, and `cleanup_run` removes it).
    async fn finish_within(&self, cluster: &Cluster, created: &mut Created, logs: &dyn LogSink, stop: bool) -> String {
        let limit = self.timings.kill_grace + GONE_WAIT + FINISH_MARGIN;
        match tokio::time::timeout(limit, self.finish(cluster, created, logs, stop)).await {
            Ok(how) => how,
            Err(_) => {
                let (ns, job) = (&self.spec.namespace, &created.job);
                logs.line(
                    Stream::Stderr,
                    &format!(
                        "nexus: {} did not answer while removing Job `{job}` and its Secret; check with `kubectl -n {ns} get job,secret {job}`",
                        cluster.named
                    ),
                );
                format!("Job `{job}` may be left: {} did not answer", cluster.named)
            }
        }
    }

    /// Removes what the attempt created: the Secret always; the Job when `stop` (with
    /// its pods, waiting until they are gone) or when the spec does not keep it.
    /// Returns how the pods were stopped, for the error of a stopped attempt.
    async fn finish(&self, cluster: &Cluster, created: &mut Created, logs: &dyn LogSink, stop: bool) -> String {
        created.cluster = None;
        let job = created.job.clone();
        let ns = &self.spec.namespace;
        let job_sent = created.job_sent;
        let mut how =
            if job_sent { format!("Job `{job}` was deleted with its pods") } else { "no Job was created".to_owned() };
        if job_sent && (stop || self.spec.ttl_seconds_after_finished.is_none()) {
            let params = if stop { DeleteParams::foreground() } else { DeleteParams::background() };
            match self.jobs(cluster).delete(&job, &params).await {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => how = format!("Job `{job}` did not exist (yet)"),
                Err(e) => {
                    how = format!("Job `{job}` could not be deleted ({e})");
                    logs.line(
                        Stream::Stderr,
                        &format!("nexus: could not delete Job `{job}` ({e}); delete it with `kubectl -n {ns} delete job {job}`"),
                    );
                }
            }
        }
        if stop && job_sent {
            let pods = self.pods(cluster);
            let selector = ListParams::default().labels(&format!("{LABEL_JOB}={job}"));
            let _ = pods.delete_collection(&DeleteParams::default(), &selector).await;
            let limit = Instant::now() + self.timings.kill_grace + GONE_WAIT;
            loop {
                match pods.list(&selector).await {
                    Ok(list) if list.items.is_empty() => break,
                    Ok(_) if Instant::now() < limit => sleep(self.timings.poll.min(Duration::from_millis(200))).await,
                    Ok(list) => {
                        let left: Vec<String> = list.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
                        how = format!("Job `{job}` was deleted but its pods {left:?} are still terminating");
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        if created.secret_sent {
            match self.secrets(cluster).delete(&job, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => logs.line(
                    Stream::Stderr,
                    &format!("nexus: could not delete Secret `{job}` ({e}); delete it with `kubectl -n {ns} delete secret {job}`"),
                ),
            }
        }
        how
    }

    fn stopped_error(&self, task: &Task, stop: &Stop, names: &Names, how: &str) -> Error {
        let error = match stop {
            Stop::TimedOut => {
                let limit = nexus_core::model::Duration(task.timeout.unwrap_or_default());
                step_error(ErrorKind::Timeout, task, format!("timed out after {limit}; {how}"))
            }
            Stop::Cancelled => step_error(ErrorKind::Cancelled, task, format!("cancelled; {how}")),
        };
        error.with_context("namespace", &self.spec.namespace).with_context("job", &names.job)
    }
}

/// What the wrapper's lines said.
#[derive(Default)]
struct FollowState {
    /// `$NEXUS_OUTPUT`'s content, up to [`MAX_OUTPUT_BYTES`] + 1 bytes.
    outputs: Vec<u8>,
    not_found: bool,
    failure: Option<String>,
    /// How many lines came (skipped ones included).
    received: u64,
    /// The timestamp of the last line, and how many lines had exactly it.
    last: Option<(Timestamp, usize)>,
    /// After a reconnection: lines before this timestamp, and this many lines at it,
    /// were already received.
    skip: Option<(Timestamp, usize)>,
    /// Where the last line went (for the rest of a line longer than the limit).
    last_kind: Kind,
    /// Whether the last line was skipped as already received.
    last_skipped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Kind {
    #[default]
    Stdout,
    Stderr,
    Output,
}

/// Splits the pod's log into stdout, stderr and outputs lines (see [`WRAPPER`]).
struct Follow<'a> {
    marker: String,
    logs: &'a dyn LogSink,
    state: FollowState,
}

impl<'a> Follow<'a> {
    fn new(marker: &str, logs: &'a dyn LogSink) -> Self {
        Follow { marker: marker.to_owned(), logs, state: FollowState::default() }
    }

    /// Where to reconnect from: the last timestamp seen, cut to the second (the
    /// precision of `sinceTime`); the lines already received are then skipped.
    fn resume(&mut self) -> Option<Timestamp> {
        let (ts, count) = self.state.last?;
        self.state.skip = Some((ts, count));
        Timestamp::from_second(ts.as_second()).ok()
    }

    /// How many lines came so far.
    fn received(&self) -> u64 {
        self.state.received
    }

    /// One line of the log, `<RFC 3339 timestamp> <text>` (or the rest of a long line).
    fn line(&mut self, raw: &str) {
        let state = &mut self.state;
        state.received += 1;
        let parsed = raw.split_once(' ').and_then(|(ts, text)| ts.parse::<Timestamp>().ok().map(|ts| (ts, text)));
        let Some((ts, text)) = parsed else {
            // The rest of a line longer than the line limit: it goes where its start went.
            if !state.last_skipped {
                let kind = state.last_kind;
                self.emit(kind, raw);
            }
            return;
        };
        if let Some((skip_ts, remaining)) = state.skip {
            if ts < skip_ts || (ts == skip_ts && remaining > 0) {
                if ts == skip_ts {
                    state.skip = Some((skip_ts, remaining - 1));
                }
                state.last_skipped = true;
                return;
            }
            state.skip = None;
        }
        state.last_skipped = false;
        state.last = match state.last {
            Some((last, n)) if last == ts => Some((ts, n + 1)),
            _ => Some((ts, 1)),
        };
        let tagged = text.strip_prefix(self.marker.as_str());
        let (kind, text) = match tagged {
            Some(rest) => {
                if let Some(line) = rest.strip_prefix(":e ") {
                    (Kind::Stderr, line)
                } else if let Some(line) = rest.strip_prefix(":o ") {
                    (Kind::Output, line)
                } else if rest == ":notfound" {
                    state.not_found = true;
                    return;
                } else if let Some(message) = rest.strip_prefix(":fail ") {
                    state.failure = Some(message.to_owned());
                    return;
                } else {
                    (Kind::Stdout, text)
                }
            }
            None => (Kind::Stdout, text),
        };
        state.last_kind = kind;
        self.emit(kind, text);
    }

    fn emit(&mut self, kind: Kind, text: &str) {
        match kind {
            Kind::Stdout => self.logs.line(Stream::Stdout, text),
            Kind::Stderr => self.logs.line(Stream::Stderr, text),
            Kind::Output => {
                let outputs = &mut self.state.outputs;
                if (outputs.len() as u64) <= MAX_OUTPUT_BYTES {
                    outputs.extend_from_slice(text.as_bytes());
                    outputs.push(b'\n');
                }
            }
        }
    }
}

/// The longest log line handled as one, in bytes; longer ones are cut into several.
const MAX_LINE_BYTES: usize = nexus_core::lines::MAX_LINE_BYTES + 64;

/// Reads `reader` to its end, line by line, in bounded memory. An error means the
/// stream broke before its end; the partial line read so far is then dropped (the
/// reconnection reads it again whole).
async fn read_lines<R: AsyncBufRead + Unpin>(mut reader: R, follow: &mut Follow<'_>) -> std::io::Result<()> {
    let mut lines = LineBuffer::with_limit(MAX_LINE_BYTES);
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        lines.push(buf, |line| follow.line(line));
        reader.consume_unpin(n);
    }
    lines.finish(|line| follow.line(line));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(Stream, String)>>);

    impl LogSink for Collect {
        fn line(&self, stream: Stream, line: &str) {
            self.0.lock().unwrap().push((stream, line.to_owned()));
        }
    }

    #[test]
    fn label_values_are_valid_and_long_ids_stay_distinct() {
        assert_eq!(label_value("run-1"), "run-1");
        assert_eq!(label_value("build[os=linux]"), "build-os-linux");
        assert_eq!(label_value("/étape/"), "tape");
        let long_a = "a".repeat(70);
        let long_b = format!("{}b", "a".repeat(69));
        let (a, b) = (label_value(&long_a), label_value(&long_b));
        assert_ne!(a, b);
        for value in [&a, &b] {
            assert!(value.len() <= 63, "{value}");
            assert!(value.starts_with(|c: char| c.is_ascii_alphanumeric()));
            assert!(value.ends_with(|c: char| c.is_ascii_alphanumeric()));
        }
        assert_eq!(label_value(&long_a), a, "stable");
    }

    #[test]
    fn job_names_are_dns_labels() {
        assert_eq!(dns_part("Build_Image[os=Linux]", 30), "build-image-os-linux");
        assert_eq!(dns_part("---", 30), "");
        assert_eq!(dns_part(&"x".repeat(80), 30).len(), 30);
        let runner = KubernetesRunner::new(serde_json::from_value(serde_json::json!({})).unwrap());
        let task = Task::new("r", "Ünïcode step!", 12, Program::Argv(vec!["true".into()]));
        let (a, b) = (runner.names(&task), runner.names(&task));
        assert_ne!(a.job, b.job);
        assert_ne!(a.marker, b.marker);
        assert!(a.job.starts_with("nx-n-code-step-12-"), "{}", a.job);
        assert!(a.job.len() <= 52 && a.job.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn the_wrapper_lines_are_split_into_streams_and_outputs() {
        let sink = Collect::default();
        let mut follow = Follow::new("nexus-0123", &sink);
        let ts = "2026-01-01T00:00:00.5Z";
        for line in [
            "plain".to_owned(),
            "nexus-0123:e to stderr".to_owned(),
            "nexus-0123:o key=value".to_owned(),
            "nexus-0123:o notes<<EOF".to_owned(),
            "nexus-0123:o a".to_owned(),
            "nexus-0123:o EOF".to_owned(),
            "nexus-0124:e another marker".to_owned(),
        ] {
            follow.line(&format!("{ts} {line}"));
        }
        follow.line("rest of the stderr line"); // no timestamp: continues the previous line's stream
        let state = &follow.state;
        assert_eq!(String::from_utf8_lossy(&state.outputs), "key=value\nnotes<<EOF\na\nEOF\n");
        assert!(!state.not_found && state.failure.is_none());
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            [
                (Stream::Stdout, "plain".to_owned()),
                (Stream::Stderr, "to stderr".to_owned()),
                (Stream::Stdout, "nexus-0124:e another marker".to_owned()),
                (Stream::Stdout, "rest of the stderr line".to_owned()),
            ]
        );
        follow.line(&format!("{ts} nexus-0123:notfound"));
        follow.line(&format!("{ts} nexus-0123:fail no /tmp"));
        let state = &follow.state;
        assert!(state.not_found);
        assert_eq!(state.failure.as_deref(), Some("no /tmp"));
    }

    #[test]
    fn a_reconnection_skips_the_lines_already_received() {
        let sink = Collect::default();
        let mut follow = Follow::new("m", &sink);
        let lines = [
            ("2026-01-01T00:00:01.1Z", "one"),
            ("2026-01-01T00:00:02.2Z", "two"),
            ("2026-01-01T00:00:02.2Z", "two again"),
            ("2026-01-01T00:00:02.7Z", "three"),
        ];
        for (ts, text) in &lines[..3] {
            follow.line(&format!("{ts} {text}"));
        }
        let since = follow.resume().unwrap();
        assert_eq!(since.to_string(), "2026-01-01T00:00:02Z");
        // The server sends again from second 2.
        for (ts, text) in &lines[1..] {
            follow.line(&format!("{ts} {text}"));
        }
        let got: Vec<String> = sink.0.lock().unwrap().iter().map(|(_, l)| l.clone()).collect();
        assert_eq!(got, ["one", "two", "two again", "three"]);
    }
}
