//! What the binary-driven tests share: writing a registry file, running `nexus`.

use std::path::Path;
use std::process::Command;

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Runs `nexus --config CONFIG --state STATE ARGS…` without colours; its exit code,
/// stdout and stderr.
pub fn nexus(config: &Path, state: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .arg("--config")
        .arg(config)
        .arg("--state")
        .arg(state)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}
