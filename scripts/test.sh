#!/usr/bin/env bash
# The test command of the README and of CI: everything, from a fresh checkout.
#
#   scripts/test.sh
#
# 1. formatting and lints (cargo fmt --check, clippy -D warnings);
# 2. every test of the workspace, including the `#[ignore = "needs …"]` ones
#    (tests that need a real service: scripts/test-env.sh installs and starts those
#    services — Docker, and each of scripts/test-env.d/ — and what it started is
#    stopped when this script exits, whatever the outcome);
# 3. the front door: the committed JSON Schemas are fresh, the example platform
#    validates, and its default pipeline runs.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

state_dir=""
cleanup() {
  if declare -F test_env_stop >/dev/null; then
    test_env_stop
  fi
  if [ -n "$state_dir" ]; then
    rm -rf "$state_dir"
  fi
}
trap cleanup EXIT

if [ -x scripts/test-env.sh ]; then
  step "starting test services"
  # shellcheck source=/dev/null
  source scripts/test-env.sh
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test --workspace (including ignored tests)"
cargo test --workspace --quiet -- --include-ignored

step "nexus schema --check"
cargo run --quiet -p nexus-cli -- schema --check

step "nexus validate (example platform)"
cargo run --quiet -p nexus-cli -- validate --config config/ssot

step "nexus run (the README's main command, on a fresh state store)"
state_dir=$(mktemp -d)
cargo run --quiet -p nexus-cli -- run --state "$state_dir"

step "all checks passed"
