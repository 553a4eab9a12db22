//! The `docker` runner: runs each step attempt in a container on a Docker host, through
//! the Docker Engine API (`bollard`).
//!
//! - One container per attempt, labelled `io.nexus.run`, `io.nexus.step` and
//!   `io.nexus.attempt` (plus the spec's `labels`), removed when the attempt ends
//!   (unless `remove: false`). [`remove_leftovers`] removes the containers a crashed
//!   run left behind.
//! - `Program::Shell` runs as `SHELL -c SCRIPT` (the spec's `entrypoint`, when set,
//!   replaces `SHELL -c`); `Program::Argv` runs as the image's entrypoint (or the
//!   spec's) with the argv as its arguments, like `docker run IMAGE ARGV…`.
//! - stdout and stderr are attached before the container starts and streamed line by
//!   line to the [`LogSink`] as they are produced; a line longer than
//!   [`MAX_LINE_BYTES`] is split. The exit code comes from the container's wait.
//! - On timeout or cancellation the container gets SIGTERM, `kill_grace` to stop,
//!   then SIGKILL, and is removed. A tiny init (`docker-init`) is PID 1 by default, so
//!   the command gets normal signal semantics (a shell killed by SIGKILL exits 137).
//! - Environment, in order of precedence: `NEXUS_*` variables, the task's secrets, the
//!   task's `env`, the spec's `env`, the image's own.
//! - `$NEXUS_OUTPUT`: when the Docker host is this machine (a `unix://` socket), a
//!   per-attempt host directory is bind-mounted at `/.nexus`, and the `key=value`
//!   lines the step writes to `/.nexus/output` become [`Outcome::outputs`].
//! - The image is pulled as the spec's `pull` policy says; a missing image, an
//!   unreachable daemon or a refused pull is an error naming the image or the host.
//!
//! [`LogSink`]: nexus_core::traits::LogSink
//! [`Outcome::outputs`]: nexus_core::traits::Outcome

mod runner;

use std::fmt;
use std::sync::Arc;

use nexus_core::model::{Duration, Map};
use nexus_core::spec::{check_env_name, is_template};
use nexus_core::traits::Runner;
use nexus_core::{Catalog, ComponentKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use nexus_core::lines::MAX_LINE_BYTES;
pub use nexus_core::outputs::MAX_OUTPUT_BYTES;
pub use runner::{DockerRunner, remove_leftovers};

/// The label naming the run on every container the runner creates.
pub const LABEL_RUN: &str = "io.nexus.run";
/// The label naming the step (with its matrix suffix) on every container.
pub const LABEL_STEP: &str = "io.nexus.step";
/// The label naming the attempt number on every container.
pub const LABEL_ATTEMPT: &str = "io.nexus.attempt";

/// The Docker host used when neither the spec's `host` nor `DOCKER_HOST` names one.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Where the per-attempt directory holding the `$NEXUS_OUTPUT` file is mounted.
pub const OUTPUT_MOUNT: &str = "/.nexus";

/// Variables Nexus sets for every attempt; a spec may not set them.
pub const RESERVED_VARS: &[&str] = &["NEXUS_OUTPUT", "NEXUS_RUN_ID", "NEXUS_STEP_ID", "NEXUS_ATTEMPT"];

/// The kind's name in the registries.
pub const DOCKER_KIND: &str = "docker";

/// The smallest memory limit Docker accepts, in bytes (6 MiB).
pub const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

/// Settings of a `docker` runner instance.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerSpec {
    /// The image steps run in (`registry.example.com/team/app:1.4`, `alpine:3.20`); a
    /// step that names its own `image` uses that one instead.
    pub image: String,
    /// Replaces the image's entrypoint (`["/bin/bash", "-lc"]`). A `command` or `script`
    /// step becomes its one argument (default: the step's shell and `-c`); an `argv`
    /// step's words become its arguments (default: the image's own entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Who the step runs as inside the container: `name`, `uid`, `name:group` or
    /// `uid:gid`. Default: the image's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The network the container joins: `bridge`, `host`, `none`, or the name of a
    /// user-defined network. Default: Docker's default bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Host directories and named volumes mounted into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Memory limit: a number and an optional unit `b`, `k`, `m`, `g` (`512m`, `1g`,
    /// `1.5g`); at least `6m`. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU limit, in CPUs (`0.5`, `2`). Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01))]
    pub cpus: Option<f64>,
    /// When to pull the image: `never`, `if-missing` (default) or `always`.
    #[serde(default)]
    pub pull: PullPolicy,
    /// The Docker daemon's address: `unix:///var/run/docker.sock`,
    /// `tcp://build-host:2376`, `ssh://deploy@build-host`. Default: `DOCKER_HOST`, else
    /// the local socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Labels put on every container this runner creates (Nexus adds its own
    /// `io.nexus.run`, `io.nexus.step` and `io.nexus.attempt` labels too).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub labels: Map<String>,
    /// Environment variables set in every container; a step's own `env` wins on a
    /// clash. Values may be templates, and may come from secrets, so they are never logged.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub env: Map<String>,
    /// Working directory inside the container (an absolute path); a step's relative
    /// `working_dir` is resolved against it. Default: the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Whether the container is removed when the attempt ends (default true); false
    /// keeps it, stopped, for inspection.
    #[serde(default = "default_true")]
    pub remove: bool,
    /// Whether a tiny init (Docker's `docker-init`) runs as the container's PID 1,
    /// forwarding signals to the step's command and reaping zombies (default true).
    /// With false the command itself is PID 1, and the kernel ignores every signal it
    /// has no handler for, SIGTERM and a SIGKILL sent from inside the container included.
    #[serde(default = "default_true")]
    pub init: bool,
    /// How long a container gets between SIGTERM and SIGKILL when it is stopped
    /// (timeout or cancellation); default `10s`, Docker's own.
    #[serde(default = "default_kill_grace")]
    pub kill_grace: Duration,
}

fn default_true() -> bool {
    true
}

fn default_kill_grace() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

/// A host directory or a named volume mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// An absolute path on the Docker host (a bind mount), or the name of a volume.
    pub source: String,
    /// Where it appears inside the container (an absolute path).
    pub target: String,
    /// Whether the container may only read it (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// When the image is pulled before a container is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Never pull: the image must already be on the Docker host.
    Never,
    /// Pull only when the Docker host does not have the image.
    #[default]
    IfMissing,
    /// Pull before every attempt (picks up a moved tag).
    Always,
}

impl fmt::Debug for DockerSpec {
    /// Shows the names of `env`, never its values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerSpec")
            .field("image", &self.image)
            .field("entrypoint", &self.entrypoint)
            .field("user", &self.user)
            .field("network", &self.network)
            .field("mounts", &self.mounts)
            .field("memory", &self.memory)
            .field("cpus", &self.cpus)
            .field("pull", &self.pull)
            .field("host", &self.host)
            .field("labels", &self.labels)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("working_dir", &self.working_dir)
            .field("remove", &self.remove)
            .field("init", &self.init)
            .field("kill_grace", &self.kill_grace)
            .finish()
    }
}

/// The `docker` runner kind, for the [`Catalog`].
pub struct DockerRunnerKind;

impl ComponentKind for DockerRunnerKind {
    type Trait = dyn Runner;
    type Spec = DockerSpec;
    const KIND: &'static str = DOCKER_KIND;
    const DESCRIPTION: &'static str = "runs steps in containers on a Docker host, one labelled container per attempt";

    fn example() -> DockerSpec {
        DockerSpec {
            image: "registry.example.com/platform/builder:1.4".to_owned(),
            entrypoint: None,
            user: Some("1000:1000".to_owned()),
            network: Some("ci".to_owned()),
            mounts: vec![
                Mount {
                    source: "/srv/nexus/artifacts".to_owned(),
                    target: "/workspace/artifacts".to_owned(),
                    read_only: false,
                },
                Mount {
                    source: "cargo-cache".to_owned(),
                    target: "/usr/local/cargo/registry".to_owned(),
                    read_only: false,
                },
                Mount { source: "/etc/ssl/certs".to_owned(), target: "/etc/ssl/certs".to_owned(), read_only: true },
            ],
            memory: Some("2g".to_owned()),
            cpus: Some(2.0),
            pull: PullPolicy::IfMissing,
            host: Some("unix:///var/run/docker.sock".to_owned()),
            labels: Map::from_iter([("team".to_owned(), "platform".to_owned())]),
            env: Map::from_iter([("CARGO_TERM_COLOR".to_owned(), "never".to_owned())]),
            working_dir: Some("/workspace".to_owned()),
            remove: true,
            init: true,
            kill_grace: Duration(std::time::Duration::from_secs(10)),
        }
    }

    fn validate(spec: &DockerSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        if let Some(problem) = image_problem(&spec.image) {
            issues.push(SpecIssue::new(&["image"], problem));
        }
        if let Some(entrypoint) = &spec.entrypoint
            && entrypoint.first().is_none_or(|program| program.trim().is_empty())
        {
            issues.push(SpecIssue::new(
                &["entrypoint"],
                "the entrypoint is empty; give the program first (`[\"/bin/sh\", \"-c\"]`) or remove it",
            ));
        }
        for (field, value) in [("user", &spec.user), ("network", &spec.network)] {
            if let Some(value) = value.as_deref().filter(|v| !is_template(v))
                && (value.is_empty() || value.chars().any(char::is_whitespace))
            {
                issues.push(SpecIssue::new(
                    &[field],
                    format!("`{value}` is not a valid {field}: it must be a non-empty name without spaces"),
                ));
            }
        }
        let mut targets: Vec<&str> = Vec::new();
        for (index, mount) in spec.mounts.iter().enumerate() {
            let index = index.to_string();
            if let Some(problem) = mount_source_problem(&mount.source) {
                issues.push(SpecIssue::new(&["mounts", &index, "source"], problem));
            }
            if !is_template(&mount.target) {
                if !mount.target.starts_with('/') {
                    issues.push(SpecIssue::new(
                        &["mounts", &index, "target"],
                        format!("mount target `{}` must be an absolute path inside the container", mount.target),
                    ));
                } else if mount.target.trim_end_matches('/').is_empty() {
                    issues.push(SpecIssue::new(
                        &["mounts", &index, "target"],
                        "a mount cannot replace the container's root `/`",
                    ));
                } else if targets.contains(&mount.target.as_str()) {
                    issues.push(SpecIssue::new(
                        &["mounts", &index, "target"],
                        format!(
                            "`{}` is the target of an earlier mount; each target can be mounted once",
                            mount.target
                        ),
                    ));
                }
                targets.push(&mount.target);
            }
        }
        if let Some(memory) = spec.memory.as_deref().filter(|m| !is_template(m)) {
            match parse_memory(memory) {
                None => issues.push(SpecIssue::new(
                    &["memory"],
                    format!("`{memory}` is not a memory size: write a number and an optional unit b, k, m or g, such as `512m` or `1g`"),
                )),
                Some(bytes) if bytes < MIN_MEMORY_BYTES => issues.push(SpecIssue::new(
                    &["memory"],
                    format!("`{memory}` is below Docker's minimum memory limit of `6m`"),
                )),
                Some(_) => {}
            }
        }
        if let Some(cpus) = spec.cpus
            && !(cpus.is_finite() && cpus > 0.0)
        {
            issues.push(SpecIssue::new(
                &["cpus"],
                format!("`{cpus}` CPUs is not a limit: give a number above 0, such as `0.5` or `2`"),
            ));
        }
        if let Some(host) = spec.host.as_deref().filter(|h| !is_template(h))
            && let Some(problem) = host_problem(host)
        {
            issues.push(SpecIssue::new(&["host"], problem));
        }
        for name in spec.labels.keys().filter(|k| !is_template(k)) {
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                issues.push(SpecIssue::new(
                    &["labels", name],
                    format!("`{name}` is not a valid label name: it must be non-empty, without spaces"),
                ));
            }
        }
        for name in spec.env.keys() {
            if check_env_name(&mut issues, &["env", name], name) && RESERVED_VARS.contains(&name.as_str()) {
                issues.push(SpecIssue::new(
                    &["env", name],
                    format!("`{name}` is set by Nexus for every attempt; choose another name"),
                ));
            }
        }
        for (index, mount) in spec.mounts.iter().enumerate() {
            if mount.target.trim_end_matches('/') == OUTPUT_MOUNT {
                issues.push(SpecIssue::new(
                    &["mounts", &index.to_string(), "target"],
                    format!(
                        "`{OUTPUT_MOUNT}` is where Nexus mounts the attempt's outputs directory; choose another target"
                    ),
                ));
            }
        }
        if let Some(dir) = spec.working_dir.as_deref().filter(|d| !is_template(d))
            && !dir.starts_with('/')
        {
            issues.push(SpecIssue::new(
                &["working_dir"],
                format!("`{dir}` must be an absolute path inside the container"),
            ));
        }
        issues
    }

    /// Builds the runner without touching the network: it connects to the Docker host
    /// on its first attempt.
    fn build(spec: DockerSpec) -> Result<Arc<dyn Runner>> {
        Ok(Arc::new(DockerRunner::new(spec)?))
    }
}

/// Registers the `docker` runner kind into `catalog`.
pub fn register_docker_runner(catalog: &mut Catalog) -> Result<()> {
    catalog.runners.register_kind::<DockerRunnerKind>()
}

/// What is wrong with an image reference (`[registry/]path[:tag][@digest]`), if anything.
fn image_problem(image: &str) -> Option<String> {
    if is_template(image) {
        return None;
    }
    if image.trim().is_empty() {
        return Some("the image is empty; name one such as `alpine:3.20`".to_owned());
    }
    if image.chars().any(char::is_whitespace) || image.starts_with(['-', '/', ':', '@']) {
        return Some(format!("`{image}` is not an image reference: expected `[registry/]name[:tag][@digest]`"));
    }
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let valid = digest.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty() && hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if !valid {
            return Some(format!("`{image}` has an invalid digest: expected `@sha256:` and the hexadecimal digest"));
        }
    }
    // A tag is after the last `:` that follows the last `/` (a registry may have a port).
    let path = match name.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') => {
            if tag.is_empty() {
                return Some(format!("`{image}` has an empty tag: remove the `:` or give a tag"));
            }
            path
        }
        _ => name,
    };
    let mut components: Vec<&str> = path.split('/').collect();
    let first = components[0];
    if components.len() > 1 && (first.contains(['.', ':']) || first == "localhost") {
        components.remove(0); // the registry host, whose case does not matter
    }
    if components.iter().any(|c| c.is_empty()) {
        return Some(format!("`{image}` has an empty path component"));
    }
    if components.iter().any(|c| c.chars().any(|ch| ch.is_ascii_uppercase())) {
        return Some(format!("`{image}`: an image's repository name must be lowercase"));
    }
    None
}

/// What is wrong with a mount's source, if anything.
fn mount_source_problem(source: &str) -> Option<String> {
    if is_template(source) || source.starts_with('/') {
        return None;
    }
    if source.is_empty() {
        return Some("the mount source is empty; give an absolute host path or a volume name".to_owned());
    }
    let volume_name = source.len() >= 2
        && source.starts_with(|c: char| c.is_ascii_alphanumeric())
        && source.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if volume_name {
        None
    } else {
        Some(format!(
            "`{source}` is neither an absolute host path nor a volume name (letters, digits, `_`, `.`, `-`); write a host path in full, starting with `/`"
        ))
    }
}

/// A Docker memory size (`512m`, `1g`, `1.5g`, `1024k`, `536870912`, `512MiB`) in bytes.
pub(crate) fn parse_memory(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim_start().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    let bytes = number * multiplier as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// What is wrong with a Docker host address, if anything.
fn host_problem(host: &str) -> Option<String> {
    const SCHEMES: [&str; 4] = ["unix://", "tcp://", "ssh://", "npipe://"];
    match SCHEMES.iter().find(|s| host.starts_with(**s)) {
        None => Some(format!(
            "`{host}` is not a Docker host address: it must start with unix://, tcp://, ssh:// or npipe:// (such as `unix:///var/run/docker.sock` or `tcp://build-host:2376`)"
        )),
        Some(scheme) if host.len() == scheme.len() || host.chars().any(char::is_whitespace) => {
            Some(format!("`{host}` is not a Docker host address: give the socket path or host after `{scheme}`"))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(value: serde_json::Value) -> Vec<String> {
        let spec: DockerSpec = serde_json::from_value(value).unwrap();
        DockerRunnerKind::validate(&spec).into_iter().map(|i| format!("{}: {}", i.path.join("."), i.message)).collect()
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<DockerRunnerKind>();
        nexus_testkit::schema_fields_are_documented::<DockerRunnerKind>();
        nexus_testkit::unknown_field_is_refused::<DockerRunnerKind>("volumes");
        nexus_testkit::registers_once::<DockerRunnerKind>(register_docker_runner);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let minimal: DockerSpec = serde_json::from_value(serde_json::json!({"image": "alpine:3.20"})).unwrap();
        assert_eq!(minimal.pull, PullPolicy::IfMissing);
        assert!(minimal.remove);
        assert!(DockerRunnerKind::validate(&minimal).is_empty());
    }

    #[test]
    fn bad_spec_gives_issues_with_paths() {
        let found = issues(serde_json::json!({
            "image": "Registry.example.com/Team/App:1",
            "mounts": [
                {"source": "./data", "target": "data"},
                {"source": "/srv/a", "target": "/a"},
                {"source": "vol", "target": "/a"},
            ],
            "memory": "512x",
            "cpus": 0.0,
            "host": "build-host:2376",
            "working_dir": "workspace",
            "entrypoint": [],
        }));
        let paths: Vec<_> = found.iter().map(|i| i.split(':').next().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "image",
                "entrypoint",
                "mounts.0.source",
                "mounts.0.target",
                "mounts.2.target",
                "memory",
                "cpus",
                "host",
                "working_dir"
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m"), Some(512 << 20));
        assert_eq!(parse_memory("1g"), Some(1 << 30));
        assert_eq!(parse_memory("1.5G"), Some(3 << 29));
        assert_eq!(parse_memory("512MiB"), Some(512 << 20));
        assert_eq!(parse_memory("1048576"), Some(1 << 20));
        assert_eq!(parse_memory("m"), None);
        assert_eq!(parse_memory("1q"), None);
        assert_eq!(issues(serde_json::json!({"image": "a", "memory": "4m"})).len(), 1);
    }

    #[test]
    fn templates_skip_format_checks() {
        let found = issues(serde_json::json!({
            "image": "{{ env.vars.registry }}/api:{{ params.version }}",
            "memory": "{{ env.vars.memory }}",
            "host": "{{ env.vars.docker_host }}",
            "mounts": [{"source": "{{ env.vars.data }}", "target": "{{ env.vars.target }}"}],
        }));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn image_references() {
        for good in [
            "alpine",
            "alpine:3.20",
            "localhost:5000/app",
            "ghcr.io/org/app:v1",
            "REGISTRY.io/app:TAG",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(image_problem(good), None, "{good}");
        }
        for bad in ["", "app:", "My/App", "a b", "app@md5", "-app", "a//b"] {
            assert!(image_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn env_names_are_checked() {
        let found = issues(serde_json::json!({"image": "a", "env": {"A=B": "x", "{{ env.vars.k }}": "y", "OK": "z"}}));
        assert_eq!(found, ["env.A=B: `A=B` is not a valid environment variable name: it cannot contain `=` or NUL"]);
    }

    #[test]
    fn debug_hides_env_values() {
        let mut spec = DockerRunnerKind::example();
        spec.env.insert("TOKEN".to_owned(), "hunter2".to_owned());
        let shown = nexus_testkit::assert_debug_hides(&spec, &["hunter2"]);
        assert!(shown.contains("TOKEN"), "{shown}");
    }
}
