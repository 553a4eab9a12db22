//! Types shared by several registries: durations, parameters, retry policies.

use std::borrow::Cow;
use std::fmt;

use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A map that keeps the order in which entries were written in the file.
pub type Map<V> = IndexMap<String, V>;

/// The pattern every duration string must match (`30s`, `5m`, `1h30m`, `250ms`, `2d`).
pub const DURATION_PATTERN: &str = r"^\s*[0-9]+\s*(ms|msec|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days|w|week|weeks)(\s*[0-9]+\s*(ms|msec|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days|w|week|weeks))*\s*$";

/// A length of time written the human way: `30s`, `5m`, `1h30m`, `250ms`, `2d`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Parses `30s`, `5m`, `1h30m`…; the error says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim()).map(Duration).map_err(|e| {
            format!(
                "invalid duration `{text}` ({e}): expected a number and a unit, such as `30s`, `5m`, `1h30m` or `250ms`"
            )
        })
    }

    /// The standard-library duration.
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration: a number and a unit (ms, s, m, h, d, w), e.g. `30s`, `5m`, `1h30m`.",
            "examples": ["30s", "5m", "1h30m"]
        })
    }
}

/// The type of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// Any text.
    String,
    /// A whole number.
    Integer,
    /// Any number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A list of values.
    List,
    /// A mapping of names to values.
    Map,
}

impl ParamType {
    /// Whether `value` has this type.
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (self, value) {
            (ParamType::String, V::String(_)) => true,
            (ParamType::Integer, V::Number(n)) => n.is_i64() || n.is_u64(),
            (ParamType::Number, V::Number(_)) => true,
            (ParamType::Boolean, V::Bool(_)) => true,
            (ParamType::List, V::Array(_)) => true,
            (ParamType::Map, V::Object(_)) => true,
            _ => false,
        }
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::List => "list",
            ParamType::Map => "map",
        })
    }
}

/// A typed parameter of an automation or a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The value's type; a value of another type is refused when the run is planned.
    #[serde(rename = "type", default = "default_param_type")]
    pub ty: ParamType,
    /// What the parameter means, shown by `nexus plan` and `--help` output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The value used when the caller gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// Whether the caller must give a value (a required parameter has no default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// The only values allowed, if the set is closed.
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<serde_json::Value>>,
    /// Whether the value is sensitive: it is then redacted like a secret.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
}

fn default_param_type() -> ParamType {
    ParamType::String
}

/// How a failed attempt is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Total number of attempts, the first included (1 means no retry).
    #[schemars(range(min = 1, max = 100))]
    pub attempts: u32,
    /// Wait before the second attempt; each later wait is multiplied by `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    /// Multiplier applied to the wait after each attempt (exponential backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub factor: Option<f64>,
    /// Upper bound of any single wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<Duration>,
    /// Whether each wait is randomised (full jitter) so retries do not stampede.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<bool>,
    /// Retry only when the exit code is one of these (any failure when absent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_exit_codes: Vec<i32>,
}

/// A declared output of an automation or a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// What the output holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether the run fails when the step finishes without writing this output.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

/// What a step or an automation runs: exactly one of `command`, `script` or `argv`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// A command line run through the shell (`sh -c` unless `shell` says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A multi-line script run by the shell, stopping at the first failing line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// A program and its arguments, run directly without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// The shell that runs `command` or `script` (default `sh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// The container image, for runners that run containers (docker, kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment variables set for the command; values may use templates.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub env: Map<String>,
    /// Working directory of the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

impl RunSpec {
    /// How many of `command`, `script`, `argv` are set (a valid spec has exactly one).
    pub fn forms_given(&self) -> usize {
        usize::from(self.command.is_some()) + usize::from(self.script.is_some()) + usize::from(self.argv.is_some())
    }
}

/// Free-form `key: value` labels used for selection and routing.
pub type Labels = Map<String>;

pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}
