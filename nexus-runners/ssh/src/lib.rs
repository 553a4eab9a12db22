//! The `ssh` runner: runs each step attempt on one remote host, or on a fleet of them,
//! over SSH.
//!
//! - It drives the system's OpenSSH client (the [`openssh`] crate, native multiplexing):
//!   one ControlMaster connection per host, opened on first use and shared by the
//!   attempts that follow (it closes after a minute without use, or when the runner is
//!   dropped). The operator's `~/.ssh/config`, agent, keys and `ProxyJump` apply;
//!   `BatchMode` is on (no prompt can block a run). Known-hosts checking is strict by
//!   default.
//! - An attempt runs `exec sh -s` on the host and sends it a small POSIX script on its
//!   standard input (never on a command line): it exports the task's environment and
//!   secrets, enters the working directory, and starts the program in a process group
//!   of its own (`setsid`). `Program::Shell` runs as `SHELL -c SCRIPT` (default shell
//!   `sh`), `Program::Argv` runs the program directly, its arguments quoted.
//! - stdout and stderr are streamed to the [`LogSink`] line by line as they arrive; a
//!   line longer than [`MAX_LINE_BYTES`] is split.
//! - The exit code is the remote program's. A remote program killed by signal N is seen
//!   by its remote parent shell, so it is reported as exit code 128 + N (137 for
//!   SIGKILL): OpenSSH does not pass a remote signal on to its client.
//! - Timeout and cancellation stop the REMOTE processes: over a second channel, SIGTERM
//!   to the attempt's process group, `kill_grace` for it to exit, then SIGKILL. So do
//!   processes the step leaves running when it exits, and an attempt whose future is
//!   dropped. A lost connection is reported as `Unavailable` after the same stop is
//!   tried over a new connection. If Nexus itself dies, the remote wrapper's stdin
//!   (kept open while the runner waits) closes, and a watcher there stops the step;
//!   `cleanup_run` (before `nexus resume`) stops whatever a crashed run still has
//!   running on the hosts it can reach.
//! - `$NEXUS_OUTPUT` names a file in a private (0700) remote directory made for the
//!   attempt; after the program exits, it is read back (`key=value` lines or
//!   `key<<DELIM` blocks, at most [`MAX_OUTPUT_BYTES`]) and the directory is deleted.
//! - `hosts: [...]`: the attempt runs on every host, `parallelism` at a time;
//!   `on_partial_failure: stop` starts it on no further host once one failed. Each host
//!   is reported as a target of the attempt (its own log and record); the attempt's
//!   result combines them (see the `group` module).
//!
//! [`LogSink`]: nexus_core::traits::LogSink

mod group;
mod runner;
mod script;

use std::sync::Arc;

use nexus_core::model::Duration;
use nexus_core::spec::{check_not_blank, check_positive_duration, is_template};
use nexus_core::traits::Runner;
use nexus_core::{Catalog, ComponentKind, Error, ErrorKind, Result, SpecIssue};

pub use nexus_core::lines::MAX_LINE_BYTES;
pub use nexus_core::outputs::MAX_OUTPUT_BYTES;
pub use runner::SshRunner;
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
    /// The SSH port (default 22). With 22, a `Port` set for the host in the SSH
    /// configuration (`~/.ssh/config`) applies.
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
    /// When false, an unknown host's key is accepted and added to the known hosts file
    /// (OpenSSH's `accept-new`); a changed key is still refused. Turn it off only for
    /// throw-away hosts: the first connection can be intercepted.
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
    /// How long a step's remote processes get between SIGTERM and SIGKILL when they are
    /// stopped (timeout, cancellation, or processes left behind when the step exits);
    /// default `5s`.
    #[serde(default = "default_kill_grace")]
    pub kill_grace: Duration,
}

fn default_kill_grace() -> Duration {
    Duration(std::time::Duration::from_secs(5))
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
    const DESCRIPTION: &'static str =
        "runs steps on a remote host or a fleet of hosts over SSH (OpenSSH), stopping the remote processes on timeout";

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
            kill_grace: Duration(std::time::Duration::from_secs(10)),
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

    fn build(spec: SshSpec) -> Result<Arc<dyn Runner>> {
        let issues = Self::validate(&spec);
        if let Some(issue) = issues.first() {
            let at = if issue.path.is_empty() { String::new() } else { format!(" at `{}`", issue.path.join(".")) };
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("invalid `ssh` runner spec{at}: {}", issue.message),
            )
            .with_operation("runner.build"));
        }
        Ok(Arc::new(SshRunner::new(spec)))
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
        nexus_testkit::registers_once::<SshRunnerKind>(register_ssh_runner);
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let minimal: SshSpec = serde_json::from_value(serde_json::json!({"host": "db-1"})).unwrap();
        assert_eq!((minimal.port, minimal.parallelism), (22, 1));
        assert_eq!(minimal.kill_grace.get(), std::time::Duration::from_secs(5));
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
