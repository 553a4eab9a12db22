//! The `kubernetes` runner: runs each step attempt as a Kubernetes Job.
//!
//! One Job per attempt (`backoffLimit: 0`: retries belong to Nexus), its pod followed
//! until the container ends, its log streamed line by line, the exit code taken from
//! the container's status. Secrets reach the container through a per-attempt Secret
//! that is deleted when the attempt ends. The program runs under a small POSIX `sh`
//! wrapper that tells stderr apart from stdout in the pod's single log stream and
//! prints `$NEXUS_OUTPUT` after the program (see [`runner`] and
//! `docs/runners/kubernetes.md`).
//!
//! Every Job, pod and Secret carries the labels [`LABEL_RUN`], [`LABEL_STEP`] and
//! [`LABEL_ATTEMPT`] (values sanitised to label syntax) and the same keys as
//! annotations with the exact ids; [`Runner::cleanup_run`] deletes what a crashed run
//! left by them.

pub mod runner;

use std::borrow::Cow;
use std::sync::Arc;

use nexus_core::model::Map;
use nexus_core::spec::{check_not_blank, is_template};
use nexus_core::traits::Runner;
use nexus_core::{Catalog, ComponentKind, Result, SpecIssue};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use runner::{KubernetesRunner, label_value};

/// The kind's name in the registries.
pub const KUBERNETES_KIND: &str = "kubernetes";

/// The label (and annotation) naming the run of a Job, its pod and its Secret. The
/// label's value is the run id sanitised to label syntax; the annotation's is exact.
pub const LABEL_RUN: &str = "nexus.run";
/// The label (and annotation) naming the step (with its matrix suffix).
pub const LABEL_STEP: &str = "nexus.step";
/// The label (and annotation) naming the attempt number.
pub const LABEL_ATTEMPT: &str = "nexus.attempt";
/// The label naming the Job on the Job, its pod and its Secret: how the runner finds
/// the Job's pod.
pub const LABEL_JOB: &str = "nexus.job";

/// Settings of a `kubernetes` runner instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSpec {
    /// The namespace the Jobs are created in (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The image of the Job's container; a step that names its own `image` uses that
    /// one instead. Steps must name one when this is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The kubeconfig context to use. Default: the kubeconfig's current context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Path of the kubeconfig file. Default: `KUBECONFIG`, else `~/.kube/config`, else
    /// the in-cluster service account when Nexus runs in a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// The ServiceAccount the Job's pod runs as. Default: the namespace's `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// CPU and memory requested for, and limits of, the step's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Node labels the pod must be scheduled on (`kubernetes.io/arch: amd64`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub node_selector: Map<String>,
    /// Taints the pod tolerates, so that it may run on tainted nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Labels put on every Job and its pod (Nexus adds its own `nexus.run`,
    /// `nexus.step`, `nexus.attempt` and `nexus.job` labels too, which win).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub labels: Map<String>,
    /// How long Kubernetes keeps a finished Job (and its pod and logs) before deleting
    /// it, in seconds. Default: Nexus deletes the Job as soon as the attempt ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u32>,
    /// When the node pulls the image: `Always`, `IfNotPresent` or `Never`. Default:
    /// Kubernetes' (`Always` for `:latest` or untagged images, else `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// Requests and limits of the step's container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// What the scheduler reserves for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceList>,
    /// The most the container may use (CPU is throttled, memory beyond it is OOM-killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceList>,
}

/// Amounts of CPU and memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceList {
    /// CPU, in cores or millicores: `2`, `0.5`, `250m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory, in bytes with an optional suffix: `512Mi`, `1Gi`, `1G`, `128974848`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// A Kubernetes quantity (`250m`, `0.5`, `512Mi`), written as a string or a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity(pub String);

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Integer(i64),
            Number(f64),
        }
        Ok(Quantity(match Written::deserialize(d)? {
            Written::Text(text) => text,
            Written::Integer(n) => n.to_string(),
            Written::Number(n) => n.to_string(),
        }))
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["string", "number"],
            "description": "A Kubernetes quantity: a number and an optional suffix (`m`, `k`, `M`, `G`, `Ki`, `Mi`, `Gi`…), e.g. `250m`, `0.5`, `512Mi`.",
            "examples": ["250m", "2", "512Mi"]
        })
    }
}

/// A taint the pod tolerates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    /// The taint's key; absent (with operator `Exists`) to tolerate every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `Equal` (default: the taint's value must be `value`) or `Exists` (any value).
    #[serde(default)]
    pub operator: TolerationOperator,
    /// The taint's value, for operator `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The taint effect tolerated: `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    /// Default: every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// With effect `NoExecute`: how long the pod stays on a node after the taint
    /// appears, in seconds. Default: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<u64>,
}

/// How a toleration matches a taint's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum TolerationOperator {
    /// The taint's value must equal the toleration's.
    #[default]
    Equal,
    /// Any value matches.
    Exists,
}

/// What a taint does to pods that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum TaintEffect {
    /// New pods are not scheduled on the node.
    NoSchedule,
    /// The scheduler avoids the node.
    PreferNoSchedule,
    /// Running pods are evicted too.
    NoExecute,
}

/// When the node pulls the container image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    /// Before every pod start.
    Always,
    /// Only when the node does not have it.
    IfNotPresent,
    /// Never: the image must already be on the node.
    Never,
}

/// The `kubernetes` runner kind, for the [`Catalog`].
pub struct KubernetesRunnerKind;

impl ComponentKind for KubernetesRunnerKind {
    type Trait = dyn Runner;
    type Spec = KubernetesSpec;
    const KIND: &'static str = KUBERNETES_KIND;
    const DESCRIPTION: &'static str = "runs steps as Kubernetes Jobs, one Job per attempt";

    fn example() -> KubernetesSpec {
        let quantity = |q: &str| Some(Quantity(q.to_owned()));
        KubernetesSpec {
            namespace: "ci".to_owned(),
            image: Some("registry.example.com/platform/builder:1.4".to_owned()),
            context: Some("prod-eu-1".to_owned()),
            kubeconfig: None,
            service_account: Some("nexus-runner".to_owned()),
            resources: Some(Resources {
                requests: Some(ResourceList { cpu: quantity("500m"), memory: quantity("512Mi") }),
                limits: Some(ResourceList { cpu: quantity("2"), memory: quantity("2Gi") }),
            }),
            node_selector: Map::from_iter([("kubernetes.io/arch".to_owned(), "amd64".to_owned())]),
            tolerations: vec![Toleration {
                key: Some("dedicated".to_owned()),
                operator: TolerationOperator::Equal,
                value: Some("ci".to_owned()),
                effect: Some(TaintEffect::NoSchedule),
                toleration_seconds: None,
            }],
            labels: Map::from_iter([("app.kubernetes.io/part-of".to_owned(), "platform".to_owned())]),
            ttl_seconds_after_finished: Some(3600),
            image_pull_policy: Some(ImagePullPolicy::IfNotPresent),
        }
    }

    fn validate(spec: &KubernetesSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        if let Some(problem) = dns_label_problem(&spec.namespace) {
            issues.push(SpecIssue::new(&["namespace"], format!("namespace {problem}")));
        }
        if let Some(account) = &spec.service_account
            && let Some(problem) = dns_subdomain_problem(account)
        {
            issues.push(SpecIssue::new(&["service_account"], format!("service account {problem}")));
        }
        for (field, value) in [("image", &spec.image), ("context", &spec.context), ("kubeconfig", &spec.kubeconfig)] {
            if let Some(value) = value.as_deref()
                && check_not_blank(&mut issues, &[field], value, field, "remove it or give one")
                && field == "image"
                && !is_template(value)
                && value.chars().any(char::is_whitespace)
            {
                issues.push(SpecIssue::new(&[field], format!("`{value}` is not a valid image; remove it or give one")));
            }
        }
        if let Some(resources) = &spec.resources {
            check_resources(resources, &mut issues);
        }
        for (field, map) in [("node_selector", &spec.node_selector), ("labels", &spec.labels)] {
            for (key, value) in map {
                if let Some(problem) = label_key_problem(key) {
                    issues.push(SpecIssue::new(&[field, key], problem));
                }
                if let Some(problem) = label_value_problem(value) {
                    issues.push(SpecIssue::new(&[field, key], problem));
                }
            }
        }
        for (index, toleration) in spec.tolerations.iter().enumerate() {
            check_toleration(&index.to_string(), toleration, &mut issues);
        }
        issues
    }

    fn build(spec: KubernetesSpec) -> Result<Arc<dyn Runner>> {
        Ok(Arc::new(KubernetesRunner::new(spec)))
    }
}

/// Registers the `kubernetes` runner kind into `catalog`.
pub fn register_kubernetes_runner(catalog: &mut Catalog) -> Result<()> {
    catalog.runners.register_kind::<KubernetesRunnerKind>()
}

fn check_resources(resources: &Resources, issues: &mut Vec<SpecIssue>) {
    let mut parsed = [[None; 2]; 2]; // [requests, limits] × [cpu, memory]
    for (which, list) in [("requests", &resources.requests), ("limits", &resources.limits)].into_iter().enumerate() {
        let (section, Some(list)) = list else {
            continue;
        };
        for (what, quantity) in [("cpu", &list.cpu), ("memory", &list.memory)].into_iter().enumerate() {
            let (resource, Some(Quantity(text))) = quantity else {
                continue;
            };
            if is_template(text) {
                continue;
            }
            match parse_quantity(text) {
                Some(value) if value > 0.0 => parsed[which][what] = Some(value),
                Some(_) => issues.push(SpecIssue::new(
                    &["resources", section, resource],
                    format!("{resource} {section} `{text}` must be greater than zero"),
                )),
                None => issues.push(SpecIssue::new(
                    &["resources", section, resource],
                    format!(
                        "`{text}` is not a Kubernetes quantity: write a number and an optional suffix, such as {}",
                        if resource == "cpu" { "`250m` or `2`" } else { "`512Mi` or `2Gi`" }
                    ),
                )),
            }
        }
    }
    for (what, resource) in ["cpu", "memory"].into_iter().enumerate() {
        if let (Some(request), Some(limit)) = (parsed[0][what], parsed[1][what])
            && request > limit
        {
            issues.push(SpecIssue::new(
                &["resources", "requests", resource],
                format!("the {resource} request is above its limit; Kubernetes refuses such a pod"),
            ));
        }
    }
}

fn check_toleration(index: &str, toleration: &Toleration, issues: &mut Vec<SpecIssue>) {
    let key = toleration.key.as_deref().filter(|k| !k.is_empty());
    match toleration.operator {
        TolerationOperator::Exists if toleration.value.as_deref().is_some_and(|v| !v.is_empty()) => {
            issues.push(SpecIssue::new(
                &["tolerations", index, "value"],
                "a toleration with operator `Exists` matches any value: remove `value`, or use operator `Equal`",
            ))
        }
        TolerationOperator::Equal if key.is_none() => issues.push(SpecIssue::new(
            &["tolerations", index, "key"],
            "a toleration without `key` must use operator `Exists` (it then tolerates every taint)",
        )),
        _ => {}
    }
    if let Some(problem) = key.and_then(label_key_problem) {
        issues.push(SpecIssue::new(&["tolerations", index, "key"], problem));
    }
    if toleration.toleration_seconds.is_some() && toleration.effect != Some(TaintEffect::NoExecute) {
        issues.push(SpecIssue::new(
            &["tolerations", index, "toleration_seconds"],
            "`toleration_seconds` applies only to effect `NoExecute`",
        ));
    }
}

/// A Kubernetes quantity's value (`250m` → 0.25, `1Ki` → 1024, `129e6`), if valid.
fn parse_quantity(text: &str) -> Option<f64> {
    let end = text
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && matches!(c, '+' | '-'))))
        .map_or(text.len(), |(i, _)| i);
    let (number, suffix) = text.split_at(end);
    if !number.bytes().any(|b| b.is_ascii_digit()) || number.matches('.').count() > 1 {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let digits = digits.strip_prefix('+').unwrap_or(digits);
            if digits.is_empty() || !digits.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(digits.parse().ok()?)
        }
    };
    Some(number * multiplier)
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS-1123 label: at most 63 lowercase letters, digits and `-`, alphanumeric at both ends.
fn dns_label_problem(name: &str) -> Option<String> {
    if is_template(name) {
        return None;
    }
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| is_alnum(c) || c == '-')
        && name.starts_with(is_alnum)
        && name.ends_with(is_alnum);
    (!valid).then(|| {
        format!("`{name}` is not a valid name: at most 63 lowercase letters, digits and `-`, starting and ending with a letter or digit")
    })
}

/// A DNS-1123 subdomain: dot-separated DNS-1123 labels, at most 253 characters.
fn dns_subdomain_problem(name: &str) -> Option<String> {
    if is_template(name) {
        return None;
    }
    let valid =
        !name.is_empty() && name.len() <= 253 && name.split('.').all(|label| dns_label_problem(label).is_none());
    (!valid).then(|| {
        format!("`{name}` is not a valid name: lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit")
    })
}

/// The name part of a label key, or a label value: at most 63 letters, digits, `-`,
/// `_`, `.`, alphanumeric at both ends.
fn label_name_valid(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    name.len() <= 63
        && name.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.'))
        && (name.is_empty() || name.starts_with(alnum) && name.ends_with(alnum))
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn label_key_problem(key: &str) -> Option<String> {
    if is_template(key) {
        return None;
    }
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let valid = !name.is_empty() && label_name_valid(name) && prefix.is_none_or(|p| dns_subdomain_problem(p).is_none());
    (!valid).then(|| {
        format!("`{key}` is not a valid label key: `[prefix/]name`, the name at most 63 letters, digits, `-`, `_` and `.`, the prefix a DNS name")
    })
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_`, `.`.
fn label_value_problem(value: &str) -> Option<String> {
    (!is_template(value) && !label_name_valid(value)).then(|| {
        format!("`{value}` is not a valid label value: at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(value: serde_json::Value) -> Vec<String> {
        let spec: KubernetesSpec = serde_json::from_value(value).unwrap();
        KubernetesRunnerKind::validate(&spec)
            .into_iter()
            .map(|i| format!("{} | {}", i.path.join("."), i.message))
            .collect()
    }

    fn paths(found: &[String]) -> Vec<&str> {
        found.iter().map(|i| i.split(" | ").next().unwrap()).collect()
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<KubernetesRunnerKind>();
        nexus_testkit::schema_fields_are_documented::<KubernetesRunnerKind>();
        nexus_testkit::unknown_field_is_refused::<KubernetesRunnerKind>("serviceAccountName");
        nexus_testkit::registers_once::<KubernetesRunnerKind>(register_kubernetes_runner);
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let minimal: KubernetesSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(minimal.namespace, "default");
        assert!(KubernetesRunnerKind::validate(&minimal).is_empty());
    }

    #[test]
    fn image_context_and_kubeconfig_are_not_blank() {
        let found = issues(serde_json::json!({"image": "my image", "context": " ", "kubeconfig": ""}));
        assert_eq!(
            found,
            [
                "image | `my image` is not a valid image; remove it or give one",
                "context | the context is empty; remove it or give one",
                "kubeconfig | the kubeconfig is empty; remove it or give one",
            ]
        );
    }

    #[test]
    fn bad_spec_gives_issues_with_paths() {
        let found = issues(serde_json::json!({
            "namespace": "CI_jobs",
            "service_account": "Runner",
            "resources": {
                "requests": {"cpu": "4", "memory": "lots"},
                "limits": {"cpu": "500m", "memory": 0},
            },
            "node_selector": {"-bad": "ok"},
            "labels": {"team": "has space"},
            "tolerations": [
                {"operator": "Exists", "value": "x"},
                {"value": "x"},
                {"key": "k", "effect": "NoSchedule", "toleration_seconds": 60},
            ],
        }));
        assert_eq!(
            paths(&found),
            [
                "namespace",
                "service_account",
                "resources.requests.memory",
                "resources.limits.memory",
                "resources.requests.cpu",
                "node_selector.-bad",
                "labels.team",
                "tolerations.0.value",
                "tolerations.1.key",
                "tolerations.2.toleration_seconds",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("250m"), Some(0.25));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Ki"), Some(1024.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("129e6"), Some(129e6));
        for bad in ["", "Mi", "1.2.3", "12MB", "1e", "ten"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
        let numbers: KubernetesSpec =
            serde_json::from_value(serde_json::json!({"resources": {"limits": {"cpu": 1.5, "memory": 1073741824}}}))
                .unwrap();
        assert_eq!(numbers.resources.unwrap().limits.unwrap().cpu, Some(Quantity("1.5".to_owned())));
    }

    #[test]
    fn templates_skip_format_checks() {
        let found = issues(serde_json::json!({
            "namespace": "{{ env.name }}",
            "labels": {"env": "{{ env.name }}"},
            "resources": {"limits": {"memory": "{{ env.vars.memory }}"}},
        }));
        assert!(found.is_empty(), "{found:?}");
    }
}
