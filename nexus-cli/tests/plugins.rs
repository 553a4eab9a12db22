//! Dynamic plugins through the real `nexus` binary: a pipeline whose runner, service,
//! monitor and channel are kinds of the fixture plugin library (built as a real `cdylib`
//! by `nexus-plugin/tests/support/fixture.rs`) validates and runs with `--plugins DIR`
//! (or `NEXUS_PLUGIN_PATH`, or the registry's `plugins.dirs`); a spec that violates the
//! plugin's schema is refused with its file and line; `nexus plugins` lists what loaded
//! and why anything was refused.

#[path = "../../nexus-plugin/tests/support/fixture.rs"]
mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct World {
    _tmp: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    work: PathBuf,
    plugins: PathBuf,
}

const ORCHESTRATION: &str = r#"version: 1

defaults:
  environment: test
  runner: plugged
  timeout: 1m

environments:
  test:
    description: The test's temporary directory.

runners:
  plugged:
    kind: fixture-local
    spec:
      shell: sh
"#;

const PIPELINES: &str = r#"version: 1

pipelines:
  hello:
    description: Two steps on a runner from a plugin library.
    params:
      dir: {type: string, required: true}
    steps:
      - id: greet
        outputs:
          word: {}
        run:
          command: echo "hello from $NEXUS_STEP_ID" > "{{ params.dir }}/greeting"; echo "word=plugged" >> "$NEXUS_OUTPUT"
      - id: after
        needs: [greet]
        run:
          command: echo "{{ steps.greet.outputs.word }}" > "{{ params.dir }}/after"
"#;

const MONITORING: &str = r#"version: 1

services:
  boundary:
    kind: fixture-service
    spec:
      greeting: hello

channels:
  plugged:
    kind: fixture-notifier
    spec:
      prefix: ops
"#;

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ssot");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("orchestration_registry.yaml"), ORCHESTRATION).unwrap();
    std::fs::write(config.join("pipeline_registry.yaml"), PIPELINES).unwrap();
    std::fs::write(config.join("monitoring_registry.yaml"), MONITORING).unwrap();
    std::fs::write(config.join("automation_registry.yaml"), "version: 1\n\nautomations: {}\n").unwrap();
    std::fs::write(config.join("security_registry.yaml"), "version: 1\n").unwrap();
    let plugins = tmp.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let lib = fixture::library("plain");
    std::fs::copy(&lib, plugins.join(lib.file_name().unwrap())).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    World { state: tmp.path().join("state"), config, work, plugins, _tmp: tmp }
}

fn nexus(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nexus"));
    cmd.args(args).env_remove("NEXUS_PLUGIN_PATH").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pipeline_with_plugin_kinds_validates_and_runs() {
    let w = world();
    let o = nexus(&["validate", "--config", s(&w.config), "--plugins", s(&w.plugins)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is valid"), "{}", text(&o));

    let dir = format!("dir={}", w.work.display());
    let o = nexus(
        &[
            "run",
            "hello",
            "--config",
            s(&w.config),
            "--state",
            s(&w.state),
            "--param",
            &dir,
            "--plugins",
            s(&w.plugins),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(w.work.join("greeting")).unwrap(), "hello from greet\n");
    assert_eq!(std::fs::read_to_string(w.work.join("after")).unwrap(), "plugged\n");
}

#[test]
fn without_the_plugin_the_kinds_are_unknown() {
    let w = world();
    let o = nexus(&["validate", "--config", s(&w.config)], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("fixture-local"), "{}", text(&o));
}

#[test]
fn plugin_path_variable_and_registry_dirs_are_searched() {
    let w = world();
    let o = nexus(&["validate", "--config", s(&w.config)], &[("NEXUS_PLUGIN_PATH", &w.plugins)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let with_dirs = ORCHESTRATION.replace("defaults:", "plugins:\n  dirs: [../plugins]\n\ndefaults:");
    std::fs::write(w.config.join("orchestration_registry.yaml"), with_dirs).unwrap();
    let o = nexus(&["validate", "--config", s(&w.config)], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn spec_violating_the_plugin_schema_is_refused_with_its_location() {
    let w = world();
    let broken = MONITORING.replace("greeting: hello", "greeting: hello\n      port: 70000");
    std::fs::write(w.config.join("monitoring_registry.yaml"), broken).unwrap();
    let o = nexus(&["validate", "--config", s(&w.config), "--plugins", s(&w.plugins), "--output", "json"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("monitoring_registry.yaml"), "{out}");
    assert!(out.contains("port"), "{out}");
}

#[test]
fn plugins_command_lists_loaded_and_refused_libraries() {
    let w = world();
    let bad = fixture::library("bad-abi");
    std::fs::copy(&bad, w.plugins.join(bad.file_name().unwrap())).unwrap();
    let o = nexus(&["plugins", "--plugins", s(&w.plugins)], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("loaded nexus-plugin-fixture"), "{out}");
    assert!(out.contains("fixture-local") && out.contains("fixture-notifier"), "{out}");
    assert!(out.contains("ABI version 1"), "{out}");
    assert!(out.contains("refused") && out.contains("libfixture_bad_abi"), "{out}");
    assert!(out.contains("this nexus speaks ABI version"), "{out}");

    let o = nexus(&["plugins", "--plugins", s(&w.plugins), "--output", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["plugins"][0]["name"], "nexus-plugin-fixture");
    assert_eq!(doc["plugins"][0]["kinds"].as_array().unwrap().len(), 4);
    assert_eq!(doc["refused"].as_array().unwrap().len(), 1);
}

#[test]
fn a_plugin_kind_clashing_with_another_plugin_names_both_files() {
    let w = world();
    let other = w.plugins.join("libfixture_copy.so");
    std::fs::copy(fixture::library("plain"), &other).unwrap();
    let o = nexus(&["validate", "--config", s(&w.config), "--plugins", s(&w.plugins)], &[]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("clashes") && out.contains("libfixture_copy.so") && out.contains("libfixture_plain.so"),
        "{out}"
    );
}
