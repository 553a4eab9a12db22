//! The broken-configuration corpus: `tests/broken/<case>/` holds overlays applied to the
//! valid config in `tests/broken/_base/`, and an `expect` file naming the diagnostics
//! `nexus validate` must report.
//!
//! A case directory holds:
//! - overlay entries: files (or directories, such as `<registry>.d/`) copied over the
//!   base, replacing what is there;
//! - `remove` (optional): base files to delete, one per line;
//! - `expect`: one line per expected diagnostic,
//!   `<file-name> <line> <code> [| <message substring> [| <help substring>]]`, with `-`
//!   for the file and line of a diagnostic that has no location.
//!
//! Each case must exit with code 2 (never a panic or a signal) and report every expected
//! diagnostic. Cases named `bug-…` document validator bugs: they expect the correct
//! behaviour and are printed, not failed, while the bug stands.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken")
}

fn nexus(config: &Path, output: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nexus"))
        .arg("validate")
        .arg("--config")
        .arg(config)
        .args(["--output", output])
        .env_remove("NEXUS_CONFIG")
        .output()
        .expect("the nexus binary runs")
}

fn copy(from: &Path, to: &Path) {
    if from.is_dir() {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        fs::copy(from, to).unwrap();
    }
}

fn remove(path: &Path) {
    if path.is_dir() {
        fs::remove_dir_all(path).unwrap();
    } else if path.exists() {
        fs::remove_file(path).unwrap();
    }
}

/// The config of `case`: `_base`, minus the `remove` list, plus the overlay.
fn prepare(case: &Path) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy(&corpus().join("_base"), dir.path());
    let removed = fs::read_to_string(case.join("remove")).unwrap_or_default();
    for name in removed.lines().map(str::trim).filter(|l| !l.is_empty()) {
        remove(&dir.path().join(name));
    }
    for entry in fs::read_dir(case).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "expect" && entry.file_name() != "remove" {
            let target = dir.path().join(entry.file_name());
            remove(&target);
            copy(&entry.path(), &target);
        }
    }
    dir
}

/// Where a diagnostic points, as `expect` lines write it: file name and line, or `-`.
fn position(d: &Value) -> (String, String) {
    let file = d["file"]
        .as_str()
        .map_or("-".into(), |f| Path::new(f).file_name().map_or(f.into(), |n| n.to_string_lossy().into_owned()));
    let line = d["line"].as_u64().map_or("-".into(), |l| l.to_string());
    (file, line)
}

/// One diagnostic, written the way `expect` lines are (with its help last).
fn describe(d: &Value) -> String {
    let (file, line) = position(d);
    let text = |key: &str| d[key].as_str().unwrap_or("").to_owned();
    format!("{file} {line} {} | {} | {}", text("code"), text("message"), text("help"))
}

/// Whether diagnostic `d` satisfies one `expect` line.
fn matches(expect: &str, d: &Value) -> bool {
    let mut parts = expect.split(" | ");
    let head: Vec<&str> = parts.next().unwrap_or("").split_whitespace().collect();
    let [file, line, code] = head[..] else {
        return false;
    };
    let contains = |key: &str, part: Option<&str>| d[key].as_str().unwrap_or("").contains(part.unwrap_or(""));
    position(d) == (file.to_owned(), line.to_owned())
        && d["code"] == code
        && contains("message", parts.next())
        && contains("help", parts.next())
}

/// Runs one case; the error is a readable report of everything that went wrong.
fn check(case: &Path) -> Result<(), String> {
    let dir = prepare(case);
    let out = nexus(dir.path(), "json");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.code() != Some(2) {
        problems.push(format!("exit status {} (expected code 2)", out.status));
    }
    if stderr.contains("panicked") {
        problems.push(format!("nexus panicked:\n{stderr}"));
    }
    let diagnostics = match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(doc) => doc["diagnostics"].as_array().cloned().unwrap_or_default(),
        Err(e) => {
            problems.push(format!("stdout is not JSON ({e}); stderr: {stderr}"));
            Vec::new()
        }
    };
    let expect = fs::read_to_string(case.join("expect")).unwrap_or_default();
    let lines: Vec<&str> = expect.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        problems.push("no `expect` line".to_owned());
    }
    for line in lines {
        if !diagnostics.iter().any(|d| matches(line, d)) {
            problems.push(format!("expected: {line}"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let produced: Vec<String> = diagnostics.iter().map(|d| format!("    {}", describe(d))).collect();
    Err(format!(
        "{}:\n  {}\n  produced (file line code | message | help):\n{}\n",
        case.file_name().unwrap().to_string_lossy(),
        problems.join("\n  "),
        if produced.is_empty() { "    (nothing)".to_owned() } else { produced.join("\n") }
    ))
}

#[test]
fn every_broken_config_is_reported() {
    let mut cases: Vec<PathBuf> = fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.ends_with("_base"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 36, "only {} cases", cases.len());
    let (mut failures, mut bugs) = (Vec::new(), Vec::new());
    for case in &cases {
        let known_bug = case.file_name().unwrap().to_string_lossy().starts_with("bug-");
        match (check(case), known_bug) {
            (Ok(()), false) => {}
            (Ok(()), true) => bugs.push(format!("{}: passes now; drop the `bug-` prefix\n", case.display())),
            (Err(report), true) => bugs.push(report),
            (Err(report), false) => failures.push(report),
        }
    }
    if !bugs.is_empty() {
        // Straight to the stderr handle, which the test harness does not capture.
        let _ = writeln!(
            std::io::stderr(),
            "\n{} known validator bug case(s), not failing:\n\n{}",
            bugs.len(),
            bugs.join("\n")
        );
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn base_config_is_valid() {
    let out = nexus(&corpus().join("_base"), "json");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(out.status.code(), Some(0), "{doc:#}");
    assert_eq!(doc["valid"], true, "{doc:#}");
    assert_eq!(doc["diagnostics"], serde_json::json!([]), "{doc:#}");
}

#[test]
fn text_output_shows_position_snippet_and_help() {
    let dir = prepare(&corpus().join("22-unknown-automation"));
    let out = nexus(dir.path(), "text");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for wanted in [
        "error[nexus::unknown_automation]: unknown automation `biuld`",
        "pipeline_registry.yaml:14:15",
        "14 |         uses: biuld",
        "= help: did you mean `build`?",
    ] {
        assert!(stderr.contains(wanted), "missing {wanted:?} in:\n{stderr}");
    }
}
