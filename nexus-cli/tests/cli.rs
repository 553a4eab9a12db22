//! The `nexus` command's front door: the example validates, the committed schemas are
//! fresh, `nexus init` writes a valid starter set, and the exit codes are as documented.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn nexus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .output()
        .expect("run nexus")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn example_platform_is_valid() {
    let out = nexus(&["validate", "--config", "config/ssot"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("config/ssot is valid"), "{}", text(&out.stdout));
}

#[test]
fn example_platform_is_valid_for_each_environment() {
    for env in ["dev", "staging", "prod"] {
        let out = nexus(&["validate", "--env", env]);
        assert_eq!(out.status.code(), Some(0), "{env}: {}", text(&out.stderr));
    }
    let out = nexus(&["validate", "--env", "prdo", "--output", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["diagnostics"][0]["code"], "nexus::unknown_environment");
    assert_eq!(doc["diagnostics"][0]["help"], "did you mean `prod`?");
}

#[test]
fn committed_schemas_are_up_to_date() {
    let out = nexus(&["schema", "--check", "--out", "schemas"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "schemas/ is stale; run `cargo run -p nexus-cli -- schema` and commit: {}",
        text(&out.stderr)
    );
}

#[test]
fn schema_check_fails_on_drift() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().to_str().expect("utf-8 path");
    assert_eq!(nexus(&["schema", "--out", out_dir]).status.code(), Some(0));
    assert_eq!(nexus(&["schema", "--check", "--out", out_dir]).status.code(), Some(0));
    let file = dir.path().join("pipeline_registry.schema.json");
    std::fs::write(&file, "{}").expect("overwrite");
    let out = nexus(&["schema", "--check", "--out", out_dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("pipeline_registry.schema.json"), "{}", text(&out.stderr));
}

#[test]
fn init_writes_a_valid_starter_set_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("ssot");
    let target = target.to_str().expect("utf-8 path");
    assert_eq!(nexus(&["init", target]).status.code(), Some(0));
    let out = nexus(&["validate", "--config", target]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let again = nexus(&["init", target]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("--force"));
    assert_eq!(nexus(&["init", target, "--force"]).status.code(), Some(0));
}

#[test]
fn missing_config_directory_is_a_clear_error() {
    let out = nexus(&["validate", "--config", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("cannot read config directory `no/such/dir`"), "{err}");
    assert!(err.contains("nexus init"), "{err}");
}

#[test]
fn version_and_help_work() {
    let out = nexus(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("nexus "));
    let out = nexus(&["validate", "--help"]);
    assert!(text(&out.stdout).contains("Examples:"));
    let out = nexus(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}
