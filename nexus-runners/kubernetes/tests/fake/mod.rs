//! An in-process fake of the Kubernetes API server: exactly the calls the kubernetes
//! runner makes, served by axum on 127.0.0.1, and talked to by the real `kube::Client`
//! through a kubeconfig that points at it (plain HTTP, a bearer token).
//!
//! Each pod the fake "Job controller" creates is backed by a real local process (its
//! container's `command`, env with `secretKeyRef`s resolved from the stored Secrets,
//! `workingDir`) in its own process group, so exit codes and logs are real. Like a
//! container runtime, it kills the whole group when the main process ends or the pod
//! is deleted, and it writes the container's stdout and stderr, each line prefixed with
//! an RFC 3339 timestamp, to one log file that the `log` endpoint serves (`follow`,
//! `timestamps`, `sinceTime`).
//!
//! Scenarios, chosen by the Job:
//! - image `fake/unpullable:*` → the container waits in `ErrImagePull`;
//! - image `fake/no-shell:*` → the container ends with `StartError`, exit code 128;
//! - node selector key `fake/unschedulable` → `PodScheduled=False`, `Unschedulable`;
//! - image `fake/no-pod:*` → the Job never gets a pod;
//! - namespace `forbidden` → every call is refused with 403.
#![allow(dead_code)] // each test file uses a part of it

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The token the fake accepts.
pub const TOKEN: &str = "fake-token-7c1e";

/// What the fake holds, for tests to look at.
#[derive(Default)]
pub struct FakeState {
    /// Jobs by `namespace/name`.
    pub jobs: BTreeMap<String, Value>,
    /// Secrets by `namespace/name`.
    pub secrets: BTreeMap<String, Value>,
    /// Pods by `namespace/name`.
    pods: BTreeMap<String, FakePod>,
    /// Every Job and Secret ever created, as posted.
    pub created: Vec<Value>,
    /// Every request: `METHOD path?query`.
    pub requests: Vec<String>,
    /// Every Job deletion: name and propagation policy.
    pub job_deletions: Vec<(String, String)>,
    /// When set, the next log stream breaks (the connection is cut) after this many lines.
    pub break_log_after: Option<usize>,
    next: u64,
}

struct FakePod {
    json: Value,
    pgid: Option<i32>,
    log: PathBuf,
    complete: Arc<AtomicBool>,
    deleting: bool,
}

/// A running fake API server.
pub struct FakeCluster {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<Mutex<FakeState>>,
    dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

struct Shared {
    state: Arc<Mutex<FakeState>>,
    logs_dir: PathBuf,
}

impl FakeCluster {
    /// Starts a fake on 127.0.0.1 (port chosen by the system).
    pub async fn start() -> FakeCluster {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let shared = Arc::new(Shared { state: state.clone(), logs_dir: dir.path().to_owned() });
        let app = Router::new().fallback(handle).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeCluster { addr, state, dir, server }
    }

    /// Writes a kubeconfig with contexts `fake` (current; this server, the right
    /// token), `wrong-token` (this server, a wrong token) and `unreachable` (a closed
    /// port); returns its path.
    pub fn kubeconfig(&self) -> String {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [
                {"name": "fake", "cluster": {"server": format!("http://{}", self.addr)}},
                {"name": "closed", "cluster": {"server": "http://127.0.0.1:9"}},
            ],
            "users": [
                {"name": "tester", "user": {"token": TOKEN}},
                {"name": "intruder", "user": {"token": "not-the-token"}},
            ],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "tester"}},
                {"name": "wrong-token", "context": {"cluster": "fake", "user": "intruder"}},
                {"name": "unreachable", "context": {"cluster": "closed", "user": "tester"}},
            ],
        });
        let path = self.dir.path().join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        path.display().to_string()
    }

    /// Locks the state.
    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Names of the pods (in any namespace) that still exist.
    pub fn pod_names(&self) -> Vec<String> {
        self.state().pods.keys().cloned().collect()
    }

    /// Asserts that nothing of run `run_id` is left (pods may take a moment to be reaped).
    pub async fn assert_nothing_left(&self, run_id: &str) {
        let label = nexus_runner_kubernetes::label_value(run_id);
        let gone =
            nexus_testkit::runner::eventually(std::time::Duration::from_secs(10), || self.leftovers(&label).is_empty())
                .await;
        assert!(gone, "left behind: {:?}", self.leftovers(&label));
    }

    /// Whether anything (Job, pod, Secret) of run label `run` is left.
    pub fn leftovers(&self, run_label: &str) -> Vec<String> {
        let state = self.state();
        let of_run = |v: &Value| v["metadata"]["labels"]["nexus.run"] == run_label;
        let mut left: Vec<String> = Vec::new();
        left.extend(state.jobs.iter().filter(|(_, v)| of_run(v)).map(|(k, _)| format!("job {k}")));
        left.extend(state.secrets.iter().filter(|(_, v)| of_run(v)).map(|(k, _)| format!("secret {k}")));
        left.extend(state.pods.iter().filter(|(_, p)| of_run(&p.json)).map(|(k, _)| format!("pod {k}")));
        left
    }

    /// Adds a Job, its pod and a Secret as a crashed run would have left them: the pod
    /// runs `sleep 600`.
    pub async fn add_leftover(&self, namespace: &str, name: &str, run_id: &str, run_label: &str) {
        let meta = json!({
            "name": name,
            "namespace": namespace,
            "labels": {"nexus.run": run_label, "nexus.job": name},
            "annotations": {"nexus.run": run_id},
        });
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"template": {"metadata": {"labels": meta["labels"], "annotations": meta["annotations"]},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "step", "image": "busybox", "command": ["sleep", "600"]}]}}},
        });
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"A": "b"}});
        let shared = Shared { state: self.state.clone(), logs_dir: self.dir.path().to_owned() };
        self.state().secrets.insert(format!("{namespace}/{name}"), secret);
        create_job(&shared, namespace, job);
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.server.abort();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for pod in state.pods.values() {
            if let Some(pgid) = pod.pgid {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn ok(code: u16, body: Value) -> Response {
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn success() -> Response {
    ok(200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}))
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Response {
    ok(200, json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "1"}, "items": items}))
}

/// Whether `labels` match an equality-based selector `a=b,c=d`.
fn matches(selector: Option<&String>, labels: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| match term.split_once('=') {
        Some((key, value)) => labels[key.trim_end_matches('=')].as_str() == Some(value.trim_start_matches('=')),
        None => !labels[term].is_null(),
    })
}

fn now() -> String {
    Timestamp::now().to_string()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_owned(), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default();
    shared.state.lock().unwrap().requests.push(format!("{method} {uri}"));
    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let path: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (namespace, rest) = match path.as_slice() {
        ["api", "v1", "namespaces", ns, rest @ ..] => (*ns, rest.to_vec()),
        ["apis", "batch", "v1", "namespaces", ns, rest @ ..] => (*ns, rest.to_vec()),
        _ => {
            return status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({})", uri.path()),
            );
        }
    };
    if namespace == "forbidden" {
        return status(
            403,
            "Forbidden",
            &format!(
                "jobs.batch is forbidden: User \"tester\" cannot create resource \"jobs\" in API group \"batch\" in the namespace \"{namespace}\""
            ),
        );
    }
    let selector = query.get("labelSelector");
    let key = |name: &str| format!("{namespace}/{name}");
    let in_ns = |k: &String| k.starts_with(&format!("{namespace}/"));
    // The Jobs or Secrets of the namespace that the label selector matches.
    let selected = |objects: &BTreeMap<String, Value>| -> Vec<Value> {
        objects
            .iter()
            .filter(|(k, v)| in_ns(k) && matches(selector, &v["metadata"]["labels"]))
            .map(|(_, v)| v.clone())
            .collect()
    };
    match (method.as_str(), rest.as_slice()) {
        ("POST", ["jobs"]) => {
            let job: Value = serde_json::from_slice(&body).unwrap();
            let name = job["metadata"]["name"].as_str().unwrap().to_owned();
            if shared.state.lock().unwrap().jobs.contains_key(&key(&name)) {
                return status(409, "AlreadyExists", &format!("jobs.batch \"{name}\" already exists"));
            }
            let created = create_job(&shared, namespace, job);
            ok(201, created)
        }
        ("GET", ["jobs"]) => list("JobList", "batch/v1", selected(&shared.state.lock().unwrap().jobs)),
        ("GET", ["jobs", name]) => match shared.state.lock().unwrap().jobs.get(&key(name)) {
            Some(job) => ok(200, job.clone()),
            None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
        },
        ("DELETE", ["jobs", name]) => {
            let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let policy = options["propagationPolicy"].as_str().unwrap_or("").to_owned();
            let mut state = shared.state.lock().unwrap();
            let Some(job) = state.jobs.remove(&key(name)) else {
                return status(404, "NotFound", &format!("jobs.batch \"{name}\" not found"));
            };
            state.job_deletions.push(((*name).to_owned(), policy.clone()));
            if policy != "Orphan" {
                let pods: Vec<String> = state
                    .pods
                    .iter()
                    .filter(|(k, p)| in_ns(k) && p.json["metadata"]["labels"]["job-name"] == *name)
                    .map(|(k, _)| k.clone())
                    .collect();
                for pod in pods {
                    delete_pod(&mut state, &pod);
                }
            }
            ok(200, job)
        }
        ("POST", ["secrets"]) => {
            let secret: Value = serde_json::from_slice(&body).unwrap();
            let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
            let mut state = shared.state.lock().unwrap();
            if state.secrets.contains_key(&key(&name)) {
                return status(409, "AlreadyExists", &format!("secrets \"{name}\" already exists"));
            }
            state.created.push(secret.clone());
            state.secrets.insert(key(&name), secret.clone());
            ok(201, secret)
        }
        ("GET", ["secrets"]) => list("SecretList", "v1", selected(&shared.state.lock().unwrap().secrets)),
        ("DELETE", ["secrets", name]) => match shared.state.lock().unwrap().secrets.remove(&key(name)) {
            Some(_) => success(),
            None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
        },
        ("GET", ["pods"]) => {
            let state = shared.state.lock().unwrap();
            let items = state
                .pods
                .iter()
                .filter(|(k, p)| in_ns(k) && matches(selector, &p.json["metadata"]["labels"]))
                .map(|(_, p)| p.json.clone())
                .collect();
            list("PodList", "v1", items)
        }
        ("DELETE", ["pods"]) => {
            let mut state = shared.state.lock().unwrap();
            let chosen: Vec<String> = state
                .pods
                .iter()
                .filter(|(k, p)| in_ns(k) && matches(selector, &p.json["metadata"]["labels"]))
                .map(|(k, _)| k.clone())
                .collect();
            let items: Vec<Value> = chosen.iter().map(|k| state.pods[k].json.clone()).collect();
            for pod in chosen {
                delete_pod(&mut state, &pod);
            }
            list("PodList", "v1", items)
        }
        ("GET", ["pods", name]) => match shared.state.lock().unwrap().pods.get(&key(name)) {
            Some(pod) => ok(200, pod.json.clone()),
            None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
        },
        ("DELETE", ["pods", name]) => {
            let mut state = shared.state.lock().unwrap();
            match state.pods.get(&key(name)).map(|p| p.json.clone()) {
                Some(json) => {
                    delete_pod(&mut state, &key(name));
                    ok(200, json)
                }
                None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        ("GET", ["pods", name, "log"]) => {
            let mut state = shared.state.lock().unwrap();
            let break_after = state.break_log_after.take();
            let Some(pod) = state.pods.get(&key(name)) else {
                return status(404, "NotFound", &format!("pods \"{name}\" not found"));
            };
            let container = &pod.json["status"]["containerStatuses"][0]["state"];
            if container["running"].is_null() && container["terminated"].is_null() {
                return status(
                    400,
                    "BadRequest",
                    &format!("container \"step\" in pod \"{name}\" is waiting to start: ContainerCreating"),
                );
            }
            let since = query.get("sinceTime").and_then(|t| t.parse::<Timestamp>().ok());
            let timestamps = query.get("timestamps").is_some_and(|t| t == "true");
            let follow = query.get("follow").is_some_and(|t| t == "true");
            let body = log_body(pod.log.clone(), pod.complete.clone(), since, timestamps, follow, break_after);
            Response::builder().status(200).header("content-type", "text/plain").body(body).unwrap()
        }
        _ => status(405, "MethodNotAllowed", &format!("the fake does not serve {method} {}", uri.path())),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Marks a pod deleted: kills its processes; it disappears once they are reaped (at once
/// when it has none).
fn delete_pod(state: &mut FakeState, key: &str) {
    let Some(pod) = state.pods.get_mut(key) else { return };
    pod.deleting = true;
    match pod.pgid {
        Some(pgid) => {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        None => {
            state.pods.remove(key);
        }
    }
}

/// Stores the Job and creates its pod (the Job controller's part); returns the Job.
fn create_job(shared: &Shared, namespace: &str, mut job: Value) -> Value {
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    job["metadata"]["uid"] = json!(format!("uid-{name}"));
    job["metadata"]["creationTimestamp"] = json!(now());
    let image = job["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap_or("").to_owned();
    {
        let mut state = shared.state.lock().unwrap();
        state.created.push(job.clone());
        state.jobs.insert(format!("{namespace}/{name}"), job.clone());
    }
    if image.starts_with("fake/no-pod") {
        return job;
    }
    let template = job["spec"]["template"].clone();
    let n = {
        let mut state = shared.state.lock().unwrap();
        state.next += 1;
        state.next
    };
    let pod_name = format!("{name}-{n:05x}");
    let mut labels = template["metadata"]["labels"].clone();
    labels["job-name"] = json!(name);
    labels["batch.kubernetes.io/job-name"] = json!(name);
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
            "annotations": template["metadata"]["annotations"], "uid": format!("uid-{pod_name}")},
        "spec": template["spec"],
        "status": {"phase": "Pending", "conditions": [],
            "containerStatuses": [{"name": "step", "image": image, "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]},
    });
    let key = format!("{namespace}/{pod_name}");
    let log = shared.logs_dir.join(format!("{pod_name}.log"));
    std::fs::write(&log, b"").unwrap();
    let complete = Arc::new(AtomicBool::new(false));
    let node_selector = &template["spec"]["nodeSelector"];
    if !node_selector["fake/unschedulable"].is_null() {
        pod["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."}]);
        pod["status"]["containerStatuses"] = Value::Null;
    } else if image.starts_with("fake/unpullable") {
        pod["status"]["containerStatuses"][0]["state"] = json!({"waiting": {"reason": "ErrImagePull",
            "message": format!("rpc error: code = NotFound desc = failed to pull and unpack image \"docker.io/{image}\": docker.io/{image}: not found")}});
    } else if image.starts_with("fake/no-shell") {
        pod["status"]["phase"] = json!("Failed");
        pod["status"]["containerStatuses"][0]["state"] = json!({"terminated": {"exitCode": 128, "reason": "StartError",
            "message": "failed to create containerd task: exec: \"sh\": executable file not found in $PATH"}});
        complete.store(true, Ordering::SeqCst);
    }
    let starts = pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating";
    let mut state = shared.state.lock().unwrap();
    state.pods.insert(
        key.clone(),
        FakePod { json: pod.clone(), pgid: None, log: log.clone(), complete: complete.clone(), deleting: false },
    );
    if starts {
        start(shared.state.clone(), key, &pod, &mut state, log, complete);
    }
    job
}

/// Starts the pod's container as a local process group (the kubelet's part).
fn start(
    state_lock: Arc<Mutex<FakeState>>,
    key: String,
    pod: &Value,
    state: &mut FakeState,
    log: PathBuf,
    complete: Arc<AtomicBool>,
) {
    let container = &pod["spec"]["containers"][0];
    let command: Vec<String> =
        container["command"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    let namespace = pod["metadata"]["namespace"].as_str().unwrap().to_owned();
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().cloned().unwrap_or_default() {
        let name = var["name"].as_str().unwrap().to_owned();
        if let Some(value) = var["value"].as_str() {
            env.push((name, value.to_owned()));
        } else if !var["valueFrom"]["secretKeyRef"].is_null() {
            let reference = &var["valueFrom"]["secretKeyRef"];
            let secret = state.secrets.get(&format!("{namespace}/{}", reference["name"].as_str().unwrap()));
            let key = reference["key"].as_str().unwrap();
            let value = secret.and_then(|s| s["stringData"][key].as_str().map(str::to_owned));
            match value {
                Some(value) => env.push((name, value)),
                None => {
                    let entry = state.pods.get_mut(&key_of(pod)).unwrap();
                    entry.json["status"]["containerStatuses"][0]["state"] = json!({"waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": format!("secret \"{}\" not found", reference["name"].as_str().unwrap())}});
                    return;
                }
            }
        }
    }
    let working_dir = container["workingDir"].as_str().unwrap_or("/").to_owned();
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_owned()))
        .envs(env)
        .current_dir(&working_dir)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let entry = state.pods.get_mut(&key).unwrap();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            entry.json["status"]["phase"] = json!("Failed");
            entry.json["status"]["containerStatuses"][0]["state"] =
                json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": e.to_string()}});
            complete.store(true, Ordering::SeqCst);
            return;
        }
    };
    let pgid = child.id().unwrap() as i32;
    entry.pgid = Some(pgid);
    entry.json["status"]["phase"] = json!("Running");
    entry.json["status"]["containerStatuses"][0]["state"] = json!({"running": {"startedAt": now()}});
    let file = Arc::new(Mutex::new(std::fs::OpenOptions::new().append(true).open(&log).unwrap()));
    let pump = |reader: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        let file = file.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                let mut entry = Timestamp::now().to_string().into_bytes();
                entry.push(b' ');
                entry.extend_from_slice(&line);
                use std::io::Write;
                file.lock().unwrap().write_all(&entry).unwrap();
            }
        })
    };
    let out = pump(Box::new(child.stdout.take().unwrap()));
    let err = pump(Box::new(child.stderr.take().unwrap()));
    tokio::spawn(async move {
        let status = child.wait().await.unwrap();
        // Like a container's end: everything else in it dies too.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        let _ = out.await;
        let _ = err.await;
        use std::os::unix::process::ExitStatusExt;
        let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let mut state = state_lock.lock().unwrap();
        if let Some(entry) = state.pods.get_mut(&key) {
            entry.json["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
            entry.json["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
                "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                "startedAt": now(), "finishedAt": now()}});
            entry.pgid = None;
            complete.store(true, Ordering::SeqCst);
            if entry.deleting {
                state.pods.remove(&key);
            }
        }
    });
}

fn key_of(pod: &Value) -> String {
    format!("{}/{}", pod["metadata"]["namespace"].as_str().unwrap(), pod["metadata"]["name"].as_str().unwrap())
}

/// The pod's log, served as the kubelet does: from `since`, with or without timestamps,
/// following the file until the container has ended when `follow`; cut (an error in
/// the body) after `break_after` lines.
fn log_body(
    path: PathBuf,
    complete: Arc<AtomicBool>,
    since: Option<Timestamp>,
    timestamps: bool,
    follow: bool,
    break_after: Option<usize>,
) -> Body {
    struct Reader {
        file: Option<tokio::fs::File>,
        pending: Vec<u8>,
        sent: usize,
        done: bool,
    }
    let state = Reader { file: None, pending: Vec::new(), sent: 0, done: false };
    let stream = futures_util::stream::unfold(state, move |mut st| {
        let (path, complete) = (path.clone(), complete.clone());
        async move {
            if st.done {
                return None;
            }
            let mut file = match st.file.take() {
                Some(file) => file,
                None => tokio::fs::File::open(&path).await.unwrap(),
            };
            let mut buf = vec![0u8; 64 * 1024];
            let mut was_complete = complete.load(Ordering::SeqCst);
            loop {
                let mut out = Vec::new();
                while let Some(end) = st.pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = st.pending.drain(..=end).collect();
                    let (ts, text) = line.split_at(line.iter().position(|b| *b == b' ').unwrap());
                    let ts: Timestamp = std::str::from_utf8(ts).unwrap().parse().unwrap();
                    if since.is_some_and(|since| ts < since) {
                        continue;
                    }
                    if break_after.is_some_and(|limit| st.sent >= limit) {
                        if out.is_empty() {
                            // Let what was sent reach the client before the cut.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            st.done = true;
                            st.file = Some(file);
                            return Some((Err(std::io::Error::other("connection cut by the fake")), st));
                        }
                        st.pending.splice(0..0, line);
                        break;
                    }
                    st.sent += 1;
                    out.extend_from_slice(if timestamps { &line } else { &text[1..] });
                    if out.len() >= 64 * 1024 {
                        break;
                    }
                }
                if !out.is_empty() {
                    st.file = Some(file);
                    return Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), st));
                }
                let n = file.read(&mut buf).await.unwrap();
                if n > 0 {
                    st.pending.extend_from_slice(&buf[..n]);
                    continue;
                }
                if was_complete || !follow {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                was_complete = complete.load(Ordering::SeqCst);
            }
        }
    });
    Body::from_stream(stream)
}

/// A counter for unique names in tests.
pub fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{what}-{}-{}-{nanos:x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
