//! The `local` runner: runs each step attempt as a process on the machine Nexus runs on.
//!
//! - `Program::Shell` runs as `SHELL -c SCRIPT`, `Program::Argv` runs the program
//!   directly (no shell).
//! - Every attempt gets its own process group, so a timeout or a cancellation stops the
//!   whole tree it started: SIGTERM to the group, `kill_grace` to finish, then SIGKILL.
//!   Processes the attempt leaves behind when its main process exits are stopped the
//!   same way: an attempt never leaves orphans (a process that wants to outlive its step
//!   must detach itself with `setsid`).
//! - stdout and stderr are streamed line by line to the [`LogSink`] as they are
//!   produced; a line longer than [`MAX_LINE_BYTES`] is split.
//! - The attempt's environment is, in order of precedence: `NEXUS_*` variables, the
//!   task's secrets, the task's `env`, the spec's `env`, and (with `inherit_env`) the
//!   environment of Nexus itself.
//! - Outputs: the attempt writes `key=value` lines (or `key<<DELIM` … `DELIM` blocks
//!   for multi-line values) to the file named by `$NEXUS_OUTPUT`; they become
//!   [`Outcome::outputs`].
//!
//! [`LogSink`]: nexus_core::traits::LogSink
//! [`Outcome::outputs`]: nexus_core::traits::Outcome

mod group;
mod runner;

use std::fmt;
use std::sync::Arc;

use nexus_core::model::{Duration, Map};
use nexus_core::spec::{check_env_name, check_not_blank, is_template};
use nexus_core::traits::Runner;
use nexus_core::{Catalog, ComponentKind, Result, SpecIssue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use nexus_core::lines::MAX_LINE_BYTES;
pub use nexus_core::outputs::MAX_OUTPUT_BYTES;
pub use runner::LocalRunner;

/// The kind's name in the registries.
pub const LOCAL_KIND: &str = "local";

/// Settings of a `local` runner instance.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// The shell that runs `command` and `script` steps as `SHELL -c SCRIPT` when the
    /// step does not name one (default `sh`).
    #[serde(default = "default_shell")]
    pub shell: String,
    /// Base directory of every step: a step's relative `working_dir` is resolved against
    /// it (default: the directory Nexus runs in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Environment variables given to every step; a step's own `env` wins on a clash.
    /// Values may be templates, and may come from secrets, so they are never logged.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub env: Map<String>,
    /// Whether steps inherit the environment of Nexus itself (default true). When
    /// false, a step sees only `env`, its own variables, its secrets and `NEXUS_*`: set
    /// `PATH` in `env` if it needs one.
    #[serde(default = "default_true")]
    pub inherit_env: bool,
    /// How long a step's processes get between SIGTERM and SIGKILL when they are stopped
    /// (timeout, cancellation, or processes left behind when the step exits); default `5s`.
    #[serde(default = "default_kill_grace")]
    pub kill_grace: Duration,
}

fn default_shell() -> String {
    "sh".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_kill_grace() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}

impl Default for LocalSpec {
    fn default() -> Self {
        LocalSpec {
            shell: default_shell(),
            working_dir: None,
            env: Map::new(),
            inherit_env: true,
            kill_grace: default_kill_grace(),
        }
    }
}

impl fmt::Debug for LocalSpec {
    /// Shows the names of `env`, never its values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSpec")
            .field("shell", &self.shell)
            .field("working_dir", &self.working_dir)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("inherit_env", &self.inherit_env)
            .field("kill_grace", &self.kill_grace)
            .finish()
    }
}

/// Variables Nexus sets for every attempt; a spec may not set them.
pub const RESERVED_VARS: &[&str] = &["NEXUS_OUTPUT", "NEXUS_RUN_ID", "NEXUS_STEP_ID", "NEXUS_ATTEMPT"];

/// The `local` runner kind, for the [`Catalog`].
pub struct LocalRunnerKind;

impl ComponentKind for LocalRunnerKind {
    type Trait = dyn Runner;
    type Spec = LocalSpec;
    const KIND: &'static str = LOCAL_KIND;
    const DESCRIPTION: &'static str = "runs steps as processes on this machine, each in its own process group";

    fn example() -> LocalSpec {
        let mut env = Map::new();
        env.insert("RUST_LOG".to_owned(), "info".to_owned());
        LocalSpec {
            shell: "bash".to_owned(),
            working_dir: Some("/srv/platform".to_owned()),
            env,
            inherit_env: true,
            kill_grace: Duration(std::time::Duration::from_secs(10)),
        }
    }

    fn validate(spec: &LocalSpec) -> Vec<SpecIssue> {
        let mut issues = Vec::new();
        if !is_template(&spec.shell)
            && check_not_blank(&mut issues, &["shell"], &spec.shell, "shell", "name one such as `sh` or `bash`")
            && spec.shell.chars().any(char::is_whitespace)
        {
            issues.push(SpecIssue::new(
                &["shell"],
                format!(
                    "`{}` is not a program name: the shell is run as `SHELL -c SCRIPT`, so give only its name or path (options go in the script)",
                    spec.shell
                ),
            ));
        }
        if let Some(dir) = &spec.working_dir {
            check_not_blank(&mut issues, &["working_dir"], dir, "working directory", "remove it or give a path");
        }
        for name in spec.env.keys() {
            if check_env_name(&mut issues, &["env", name], name) && RESERVED_VARS.contains(&name.as_str()) {
                issues.push(SpecIssue::new(
                    &["env", name],
                    format!("`{name}` is set by Nexus for every attempt; choose another name"),
                ));
            }
        }
        issues
    }

    fn build(spec: LocalSpec) -> Result<Arc<dyn Runner>> {
        Ok(Arc::new(LocalRunner::new(spec)))
    }
}

/// Registers the `local` runner kind into `catalog`.
pub fn register_local_runner(catalog: &mut Catalog) -> Result<()> {
    catalog.runners.register_kind::<LocalRunnerKind>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: serde_json::Value) -> LocalSpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn passes_the_kind_conformance_checks() {
        nexus_testkit::example_is_valid::<LocalRunnerKind>();
        nexus_testkit::schema_fields_are_documented::<LocalRunnerKind>();
        nexus_testkit::unknown_field_is_refused::<LocalRunnerKind>("shel");
        nexus_testkit::registers_once::<LocalRunnerKind>(register_local_runner);
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let empty = spec(serde_json::json!({}));
        assert_eq!(empty, LocalSpec::default());
        assert_eq!(empty.shell, "sh");
        assert!(empty.inherit_env);
        assert_eq!(empty.kill_grace.get(), std::time::Duration::from_secs(5));
    }

    #[test]
    fn bad_spec_gives_issues_with_paths() {
        let bad = spec(
            serde_json::json!({"shell": "bash -e", "env": {"NEXUS_OUTPUT": "x", "A=B": "y", "{{ env.vars.k }}": "z"}}),
        );
        let issues = LocalRunnerKind::validate(&bad);
        let paths: Vec<_> = issues.iter().map(|i| i.path.join(".")).collect();
        assert_eq!(paths, ["shell", "env.NEXUS_OUTPUT", "env.A=B"], "{issues:?}");
        assert!(issues[0].message.contains("SHELL -c SCRIPT"));
    }

    #[test]
    fn bad_durations_are_refused() {
        assert!(serde_json::from_value::<LocalSpec>(serde_json::json!({"kill_grace": "soon"})).is_err());
    }

    #[test]
    fn debug_hides_env_values() {
        let mut spec = LocalSpec::default();
        spec.env.insert("TOKEN".to_owned(), "hunter2".to_owned());
        let shown = nexus_testkit::assert_debug_hides(&spec, &["hunter2"]);
        assert!(shown.contains("TOKEN"), "{shown}");
    }
}
