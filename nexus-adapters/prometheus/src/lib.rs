//! The `prometheus` monitor kind of Nexus: exports the engine's metrics to Prometheus.
//!
//! Metrics are exposed on `/metrics` at `listen` while `nexus serve` runs, pushed to a
//! Pushgateway at `pushgateway_url` (for short-lived `nexus run` processes), or both.
//! This crate holds the kind's spec, its pure validation and its registration; the
//! exporter comes in a later issue, so [`PrometheusKind::build`] returns an
//! `Unsupported` error.

use std::sync::Arc;

use nexus_core::model::{Duration, Map};
use nexus_core::spec::{check_positive_duration, check_url, is_template};
use nexus_core::traits::MonitorAdapter;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in `monitoring_registry.yaml`.
pub const PROMETHEUS_KIND: &str = "prometheus";

/// The settings of a `prometheus` monitor. No field holds a credential, so `Debug` is
/// derived.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrometheusSpec {
    /// URL of a Prometheus Pushgateway that metrics are pushed to
    /// (`http://pushgateway:9091`), without credentials; nothing is pushed when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub pushgateway_url: Option<String>,
    /// The `job` label of pushed metrics: the first part of the Pushgateway grouping key.
    #[serde(default = "default_job")]
    #[schemars(length(min = 1))]
    pub job: String,
    /// `host:port` on which `nexus serve` exposes `/metrics` for Prometheus to scrape
    /// (`0.0.0.0:9464`); nothing is exposed when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub listen: Option<String>,
    /// Further labels of the Pushgateway grouping key (`instance: ci-1`), so pushes from
    /// different places do not overwrite each other.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub grouping: Map<String>,
    /// Time between two pushes to the Pushgateway; 15s when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_interval: Option<Duration>,
}

fn default_job() -> String {
    "nexus".to_owned()
}

/// The `prometheus` monitor kind.
pub struct PrometheusKind;

impl ComponentKind for PrometheusKind {
    type Trait = dyn MonitorAdapter;
    type Spec = PrometheusSpec;
    const KIND: &'static str = PROMETHEUS_KIND;
    const DESCRIPTION: &'static str = "Prometheus: `/metrics` exposition under `nexus serve` and Pushgateway pushes.";

    fn example() -> PrometheusSpec {
        PrometheusSpec {
            pushgateway_url: Some("http://{{ env.vars.pushgateway_host }}:9091".to_owned()),
            job: "nexus".to_owned(),
            listen: Some("0.0.0.0:9464".to_owned()),
            grouping: Map::from_iter([("instance".to_owned(), "{{ env.vars.instance }}".to_owned())]),
            push_interval: Some(Duration(std::time::Duration::from_secs(15))),
        }
    }

    fn validate(spec: &PrometheusSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        match &spec.pushgateway_url {
            Some(url) => {
                check_url(&mut issues, &["pushgateway_url"], url, &["http", "https"], None);
            }
            None => {
                if spec.listen.is_none() {
                    issues.push(SpecIssue::new(
                        &[],
                        "give `listen`, `pushgateway_url` or both; with neither, nothing is exported",
                    ));
                }
                if !spec.grouping.is_empty() {
                    issues.push(SpecIssue::new(
                        &["grouping"],
                        "the grouping key is used only for pushes; set `pushgateway_url` or remove `grouping`",
                    ));
                }
                if spec.push_interval.is_some() {
                    issues.push(SpecIssue::new(
                        &["push_interval"],
                        "nothing is pushed without `pushgateway_url`; set it or remove `push_interval`",
                    ));
                }
            }
        }
        if let Some(problem) = spec.listen.as_deref().and_then(listen_problem) {
            issues.push(SpecIssue::new(&["listen"], problem));
        }
        for name in spec.grouping.keys() {
            if name == "job" {
                issues.push(SpecIssue::new(&["grouping", name], "set the `job` label with `job`, not in `grouping`"));
            } else if !is_label_name(name) || name.starts_with("__") {
                issues.push(SpecIssue::new(
                    &["grouping", name],
                    format!(
                        "`{name}` is not a Prometheus label name: letters, digits and `_`, not starting with a digit \
                         or `__`"
                    ),
                ));
            }
        }
        check_positive_duration(&mut issues, &["push_interval"], spec.push_interval, "interval");
        issues
    }

    fn build(_spec: PrometheusSpec) -> Result<Arc<dyn MonitorAdapter>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the prometheus monitor's implementation is not built yet; its spec is validated",
        )
        .with_operation("monitor.build"))
    }
}

/// Registers the `prometheus` monitor kind.
pub fn register_prometheus_monitor(catalog: &mut Catalog) -> Result<()> {
    catalog.monitors.register_kind::<PrometheusKind>()
}

/// What is wrong with a `listen` address, if anything (templates are not checked).
fn listen_problem(listen: &str) -> Option<String> {
    if is_template(listen) {
        return None;
    }
    let expected = "expected `host:port`, such as `0.0.0.0:9464`, `127.0.0.1:9464` or `[::]:9464`";
    match listen.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(char::is_whitespace) => match port.parse::<u16>() {
            Ok(0) => Some(format!("`{listen}`: port 0 picks a random port that Prometheus cannot be told about")),
            Ok(_) => None,
            Err(_) => Some(format!("`{listen}` has no valid port; {expected}")),
        },
        _ => Some(format!("`{listen}` is not an address; {expected}")),
    }
}

/// Whether `name` matches `[a-zA-Z_][a-zA-Z0-9_]*`, the Prometheus label name syntax.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::{assert_single_issue, assert_valid, descriptor, example_with};
    use serde_json::{Value, json};

    /// Asserts that the example with `changes` gives one issue, at `path`, saying `needle`.
    fn check(changes: Value, path: &[&str], needle: &str) {
        assert_single_issue(&descriptor::<PrometheusKind>(), &example_with::<PrometheusKind>(changes), path, needle);
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<PrometheusKind>();
        nexus_testkit::schema_fields_are_documented::<PrometheusKind>();
        nexus_testkit::unknown_field_is_refused::<PrometheusKind>("port");
        nexus_testkit::build_is_unsupported::<PrometheusKind>();
        nexus_testkit::registers_once::<PrometheusKind>(register_prometheus_monitor);
    }

    #[test]
    fn listen_alone_is_enough() {
        let spec: PrometheusSpec = serde_json::from_value(json!({"listen": "127.0.0.1:9464"})).unwrap();
        assert_eq!(spec.job, "nexus");
        assert!(PrometheusKind::validate(&spec).is_empty());
    }

    #[test]
    fn something_must_be_exported() {
        assert_single_issue(&descriptor::<PrometheusKind>(), &json!({"job": "nexus"}), &[], "nothing is exported");
    }

    #[test]
    fn push_settings_need_a_pushgateway() {
        check(json!({"pushgateway_url": null, "push_interval": null}), &["grouping"], "only for pushes");
        check(json!({"pushgateway_url": null, "grouping": {}}), &["push_interval"], "nothing is pushed");
    }

    #[test]
    fn pushgateway_url_is_an_http_url_without_credentials() {
        check(json!({"pushgateway_url": "pushgateway:9091"}), &["pushgateway_url"], "`http://`");
        check(json!({"pushgateway_url": "http://u:p@pushgateway:9091"}), &["pushgateway_url"], "credentials");
    }

    #[test]
    fn listen_is_host_and_port() {
        check(json!({"listen": "9464"}), &["listen"], "not an address");
        check(json!({"listen": "0.0.0.0:http"}), &["listen"], "no valid port");
        check(json!({"listen": "0.0.0.0:0"}), &["listen"], "random port");
        assert_valid(&descriptor::<PrometheusKind>(), &example_with::<PrometheusKind>(json!({"listen": "[::]:9464"})));
    }

    #[test]
    fn grouping_keys_are_label_names_other_than_job() {
        check(json!({"grouping": {"job": "x"}}), &["grouping", "job"], "with `job`");
        check(json!({"grouping": {"data-center": "x"}}), &["grouping", "data-center"], "label name");
        check(json!({"grouping": {"__name__": "x"}}), &["grouping", "__name__"], "label name");
    }

    #[test]
    fn push_interval_must_be_positive() {
        check(json!({"push_interval": "0s"}), &["push_interval"], "longer than zero");
    }
}
