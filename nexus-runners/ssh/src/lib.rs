//! The `ssh` runner: runs each step attempt on one remote host, or on a fleet of them,
//! over SSH.
//!
//! This crate provides the kind's complete spec, its pure validation and an example.
//! Execution is not implemented yet: [`SshRunnerKind::build`] returns an `Unsupported`
//! error, so a configuration that uses the kind validates but cannot run.

use std::sync::Arc;

use nexus_core::model::Duration;
use nexus_core::spec::{check_not_blank, check_positive_duration, is_template};
use nexus_core::traits::Runner;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind's name in the registries.
pub const SSH_KIND: &str = "ssh";

/// Settings of an `ssh` runner instance. Exactly one of `host` and `hosts` is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SshSpec {
    /// The remote host steps run on: a name or an address (`build-1.example.com`,
    /// `10.0.0.12`, `2001:db8::12`). Give this or `hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Several hosts: every attempt runs on each of them (a fleet), `parallelism` at a
    /// time. Give this or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// The remote user. Default: the SSH configuration's (`~/.ssh/config`), else the
    /// local user's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The SSH port (default 22).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// The private key to authenticate with (a path). Default: the SSH agent and the
    /// SSH configuration's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<String>,
    /// A bastion to connect through, `[user@]host[:port]` (OpenSSH's `ProxyJump`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_host: Option<String>,
    /// Whether a host whose key is not in the known hosts is refused (default true).
    /// Turn it off only for throw-away hosts: it allows man-in-the-middle attacks.
    #[serde(default = "default_true")]
    pub strict_host_key_checking: bool,
    /// The known hosts file to check host keys against. Default: `~/.ssh/known_hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts_file: Option<String>,
    /// With `hosts`: on how many hosts an attempt runs at once (default 1, one after
    /// the other).
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1))]
    pub parallelism: u32,
    /// With `hosts`: what happens when the attempt fails on some hosts: `stop` (default:
    /// start it on no further host) or `continue` (run it on every host). The attempt
    /// fails in both cases.
    #[serde(default)]
    pub on_partial_failure: PartialFailure,
    /// How long to wait for the TCP connection and SSH handshake. Default: the SSH
    /// client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
}

fn default_port() -> u16 {
    22
}

fn default_true() -> bool {
    true
}

fn default_parallelism() -> u32 {
    1
}

/// What a fleet attempt does once it failed on some hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PartialFailure {
    /// Start the attempt on no further host (hosts already running finish).
    #[default]
    Stop,
    /// Run the attempt on every host anyway.
    Continue,
}

/// The `ssh` runner kind, for the [`Catalog`].
pub struct SshRunnerKind;

impl ComponentKind for SshRunnerKind {
    type Trait = dyn Runner;
    type Spec = SshSpec;
    const KIND: &'static str = SSH_KIND;
    const DESCRIPTION: &'static str = "runs steps on remote hosts over SSH (execution not implemented yet)";

    fn example() -> SshSpec {
        SshSpec {
            host: None,
            hosts: Some(vec!["app-1.prod.example.com".to_owned(), "app-2.prod.example.com".to_owned()]),
            user: Some("deploy".to_owned()),
            port: 22,
            identity_file: Some("/etc/nexus/keys/deploy_ed25519".to_owned()),
            jump_host: Some("deploy@bastion.example.com".to_owned()),
            strict_host_key_checking: true,
            known_hosts_file: Some("/etc/nexus/known_hosts".to_owned()),
            parallelism: 1,
            on_partial_failure: PartialFailure::Stop,
            connect_timeout: Some(Duration(std::time::Duration::from_secs(10))),
        }
    }

    fn validate(spec: &SshSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        match (&spec.host, &spec.hosts) {
            (Some(_), Some(_)) => issues
                .push(SpecIssue::new(&["hosts"], "give either `host` (one machine) or `hosts` (a fleet), not both")),
            (None, None) => {
                issues.push(SpecIssue::new(&[], "no host: give `host` (one machine) or `hosts` (a fleet)"));
            }
            (None, Some(hosts)) if hosts.is_empty() => {
                issues.push(SpecIssue::new(&["hosts"], "`hosts` is empty; list at least one host"));
            }
            _ => {}
        }
        if let Some(problem) = spec.host.as_deref().and_then(host_problem) {
            issues.push(SpecIssue::new(&["host"], problem));
        }
        let mut seen: Vec<&str> = Vec::new();
        for (index, host) in spec.hosts.iter().flatten().enumerate() {
            let index = index.to_string();
            if let Some(problem) = host_problem(host) {
                issues.push(SpecIssue::new(&["hosts", &index], problem));
            } else if !is_template(host) && seen.contains(&host.as_str()) {
                issues.push(SpecIssue::new(&["hosts", &index], format!("`{host}` is listed twice")));
            }
            seen.push(host);
        }
        if let Some(user) = spec.user.as_deref().filter(|u| !is_template(u))
            && (user.is_empty()
                || user.starts_with('-')
                || user.contains(['@', ':'])
                || user.chars().any(char::is_whitespace))
        {
            issues.push(SpecIssue::new(&["user"], format!("`{user}` is not a user name")));
        }
        if spec.port == 0 {
            issues
                .push(SpecIssue::new(&["port"], "port 0 is not a port; SSH listens on 22 unless configured otherwise"));
        }
        for (field, path) in [("identity_file", &spec.identity_file), ("known_hosts_file", &spec.known_hosts_file)] {
            if let Some(path) = path {
                check_not_blank(&mut issues, &[field], path, "path", "remove the field or give a path");
            }
        }
        if let Some(jump) = spec.jump_host.as_deref().filter(|j| !is_template(j)) {
            let valid = !jump.is_empty() && !jump.starts_with('-') && !jump.chars().any(char::is_whitespace);
            if !valid {
                issues.push(SpecIssue::new(
                    &["jump_host"],
                    format!("`{jump}` is not a jump host: expected `[user@]host[:port]`"),
                ));
            }
        }
        if spec.parallelism == 0 {
            issues.push(SpecIssue::new(&["parallelism"], "parallelism must be at least 1"));
        }
        check_positive_duration(&mut issues, &["connect_timeout"], spec.connect_timeout, "connect timeout");
        issues
    }

    fn build(_spec: SshSpec) -> Result<Arc<dyn Runner>> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "the ssh runner's execution is not implemented yet; its spec is validated",
        )
        .with_operation("runner.build"))
    }
}

/// Registers the `ssh` runner kind into `catalog`.
pub fn register_ssh_runner(catalog: &mut Catalog) -> Result<()> {
    catalog.runners.register_kind::<SshRunnerKind>()
}

/// What is wrong with a host name or address, if anything.
fn host_problem(host: &str) -> Option<String> {
    if is_template(host) {
        return None;
    }
    if host.trim().is_empty() {
        return Some("the host is empty".to_owned());
    }
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!("`{host}` is not a host name or address"));
    }
    if host.contains('@') {
        return Some(format!("`{host}`: write the user in `user`, not in the host"));
    }
    // One colon is `host:port`; an IPv6 address has several.
    if host.matches(':').count() == 1 || host.starts_with('[') {
        return Some(format!("`{host}`: write the port in `port`, and an IPv6 address without brackets"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(value: serde_json::Value) -> Vec<(String, String)> {
        let spec: SshSpec = serde_json::from_value(value).unwrap();
        SshRunnerKind::validate(&spec).into_iter().map(|i| (i.path.join("."), i.message)).collect()
    }

    fn paths(value: serde_json::Value) -> Vec<String> {
        issues(value).into_iter().map(|(path, _)| path).collect()
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<SshRunnerKind>();
        nexus_testkit::schema_fields_are_documented::<SshRunnerKind>();
        nexus_testkit::unknown_field_is_refused::<SshRunnerKind>("identity");
        nexus_testkit::build_is_unsupported::<SshRunnerKind>();
        nexus_testkit::registers_once::<SshRunnerKind>(register_ssh_runner);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let minimal: SshSpec = serde_json::from_value(serde_json::json!({"host": "db-1"})).unwrap();
        assert_eq!((minimal.port, minimal.parallelism), (22, 1));
        assert!(minimal.strict_host_key_checking);
        assert_eq!(minimal.on_partial_failure, PartialFailure::Stop);
        assert!(SshRunnerKind::validate(&minimal).is_empty());
    }

    #[test]
    fn exactly_one_of_host_and_hosts() {
        assert_eq!(paths(serde_json::json!({})), [""]);
        assert_eq!(paths(serde_json::json!({"host": "a", "hosts": ["b"]})), ["hosts"]);
        assert_eq!(paths(serde_json::json!({"hosts": []})), ["hosts"]);
        let (_, message) = &issues(serde_json::json!({}))[0];
        assert!(message.contains("`host`") && message.contains("`hosts`"), "{message}");
    }

    #[test]
    fn bad_spec_gives_issues_with_paths() {
        let found = paths(serde_json::json!({
            "hosts": ["app-1", "deploy@app-2", "app-1", "app-3:2222", "-oProxyCommand=x", "2001:db8::12"],
            "user": "bad user",
            "port": 0,
            "parallelism": 0,
            "jump_host": "bastion host",
            "identity_file": "",
            "connect_timeout": "0s",
        }));
        assert_eq!(
            found,
            [
                "hosts.1",
                "hosts.2",
                "hosts.3",
                "hosts.4",
                "user",
                "port",
                "identity_file",
                "jump_host",
                "parallelism",
                "connect_timeout"
            ]
        );
    }

    #[test]
    fn templates_skip_format_checks() {
        assert!(paths(serde_json::json!({"hosts": ["{{ env.vars.app_host }}", "{{ env.vars.app_host }}"], "user": "{{ env.vars.user }}"})).is_empty());
    }
}
