#!/usr/bin/env bash
# The test environment: installs what the service tests need, starts the services on
# this machine, and exports where they are. Idempotent: what is installed is not
# installed again, what already runs is used as it is (and not stopped afterwards).
#
#   source scripts/test-env.sh      # then: cargo test --workspace -- --include-ignored
#   test_env_stop                   # stops what this shell's sourcing started
#
# scripts/test.sh sources it, and calls test_env_stop when it exits.
#
# What it provides:
# - Docker Engine (Debian's docker.io): dockerd is started if `docker info` fails, and
#   the test image nexus-test-busybox:latest is built from the busybox-static binary
#   with `docker import` (nothing can be pulled here). Exports NEXUS_TEST_DOCKER_IMAGE.
# - Every file scripts/test-env.d/NAME.sh: sourced (with NEXUS_TEST_ENV_FILE set to
#   the env file), then its function `test_env_NAME` is called if it defines one (a
#   file may also do its work when sourced). test_env_stop calls its stop function
#   `test_env_NAME_stop` (or `nexus_NAME_stop`) if it defines one, after stopping the
#   PIDs recorded with test_env_started. Such a file can use the helpers below:
#     test_env_packages PKG…           installs the Debian packages that are missing
#                                      (`apt-get update` once per sourcing)
#     test_env_started NAME PID        records a process this sourcing started, so that
#                                      test_env_stop stops it
#     test_env_export VAR VALUE        exports VAR and writes it to the env file
#     test_env_wait DESC SECONDS CMD…  polls CMD until it succeeds, within SECONDS
#     test_env_log MESSAGE             prints a progress line on stderr
#   and $TEST_ENV_DIR, a directory for its data, logs and configuration.
#
# Files, under $TEST_ENV_DIR (default target/test-env): `env` (VAR=value lines for the
# addresses: `set -a; source target/test-env/env; set +a` elsewhere) and `pids`
# (NAME PID of what was started).
# Plain `cargo test` does not need any of this: tests that need a service are
# `#[ignore = "needs <service>"]`.

test_env_log() {
  printf 'test-env: %s\n' "$*" >&2
}

test_env_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    test_env_log "missing packages ${missing[*]}: run as root, or install them with apt-get"
    return 1
  fi
  if [ -z "${TEST_ENV_APT_UPDATED:-}" ]; then
    test_env_log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    TEST_ENV_APT_UPDATED=1
  fi
  test_env_log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || return 1
}

test_env_started() {
  printf '%s %s\n' "$1" "$2" >>"$TEST_ENV_DIR/pids"
}

test_env_export() {
  export "$1=$2"
  printf '%s=%q\n' "$1" "$2" >>"$TEST_ENV_DIR/env"
}

test_env_wait() {
  local desc=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      test_env_log "$desc: not ready after ${seconds}s"
      return 1
    fi
    sleep 0.1
  done
}

# Stops what this sourcing started: the PIDs in the pids file, SIGTERM first, then
# SIGKILL after 20 s (dockerd stops its containerd itself), then the stop functions of
# the scripts/test-env.d services. Leaves alone what was already running.
test_env_stop() {
  local file=${TEST_ENV_DIR:-}/pids name pid deadline
  for name in ${TEST_ENV_SERVICES:-}; do
    if declare -F "test_env_${name}_stop" >/dev/null; then
      "test_env_${name}_stop" || test_env_log "stopping $name failed"
    elif declare -F "nexus_${name}_stop" >/dev/null; then
      "nexus_${name}_stop" || test_env_log "stopping $name failed"
    fi
  done
  TEST_ENV_SERVICES=""
  [ -n "${TEST_ENV_DIR:-}" ] && [ -f "$file" ] || return 0
  while read -r name pid; do
    [ -n "$pid" ] || continue
    kill -0 "$pid" 2>/dev/null || continue
    test_env_log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      test_env_log "$name (pid $pid) ignored SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done <"$file"
  : >"$file"
}

# Version of the test image's recipe: bump it when the recipe changes, so that an
# older image on the machine is rebuilt.
TEST_ENV_IMAGE_RECIPE=busybox-2

test_env_docker_image() {
  local image=nexus-test-busybox:latest recipe busybox rootfs applet
  recipe=$(docker image inspect -f '{{ index .Config.Labels "io.nexus.test-image" }}' "$image" 2>/dev/null || true)
  if [ "$recipe" != "$TEST_ENV_IMAGE_RECIPE" ]; then
    busybox=/bin/busybox
    # busybox-static's binary: it must run in an image without a C library.
    [ -x "$busybox" ] || { test_env_log "$busybox is missing (package busybox-static)"; return 1; }
    test_env_log "building the test image $image from $busybox"
    rootfs=$(mktemp -d) || return 1
    mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
    chmod 1777 "$rootfs/tmp"
    cp "$busybox" "$rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
      [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    tar -C "$rootfs" -cf - . | docker import \
      --change 'ENV PATH=/bin' \
      --change "LABEL io.nexus.test-image=$TEST_ENV_IMAGE_RECIPE" \
      --change 'CMD ["sh"]' \
      - "$image" >/dev/null
    local status=$?
    rm -rf "$rootfs"
    [ "$status" -eq 0 ] || { test_env_log "docker import of $image failed"; return 1; }
  fi
  test_env_export NEXUS_TEST_DOCKER_IMAGE "$image"
}

test_env_docker() {
  test_env_packages docker.io busybox-static || return 1
  if ! docker info >/dev/null 2>&1; then
    local log pid
    log=$(mktemp "${TMPDIR:-/tmp}/nexus-test-dockerd.XXXXXX.log") || return 1
    test_env_log "starting dockerd (log: $log)"
    /usr/sbin/dockerd >"$log" 2>&1 &
    pid=$!
    test_env_started dockerd "$pid"
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
      if ! kill -0 "$pid" 2>/dev/null; then
        test_env_log "dockerd exited; the end of its log:"
        tail -n 20 "$log" >&2
        return 1
      fi
      if [ "$SECONDS" -ge "$deadline" ]; then
        test_env_log "dockerd does not answer after 60s; see $log"
        return 1
      fi
      sleep 0.1
    done
  fi
  test_env_export NEXUS_TEST_DOCKER_HOST "${DOCKER_HOST:-unix:///var/run/docker.sock}"
  test_env_docker_image
}

test_env_main() {
  local root name file
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  TEST_ENV_DIR=${TEST_ENV_DIR:-$root/target/test-env}
  export TEST_ENV_DIR
  mkdir -p "$TEST_ENV_DIR" || return 1
  : >"$TEST_ENV_DIR/env"
  : >"$TEST_ENV_DIR/pids"
  export NEXUS_TEST_ENV_FILE="$TEST_ENV_DIR/env"
  TEST_ENV_SERVICES=""
  test_env_docker || return 1
  for file in "$root"/scripts/test-env.d/*.sh; do
    [ -f "$file" ] || continue
    name=$(basename "$file" .sh)
    TEST_ENV_SERVICES="$TEST_ENV_SERVICES $name"
    # shellcheck source=/dev/null
    source "$file" || { test_env_log "$name: sourcing $file failed"; return 1; }
    if declare -F "test_env_$name" >/dev/null; then
      "test_env_$name" || { test_env_log "$name: did not start"; return 1; }
    fi
  done
  test_env_log "ready; addresses in $TEST_ENV_DIR/env"
}

if (return 0 2>/dev/null); then
  test_env_main || return 1
else
  # Run, not sourced: set up, and leave the services running; their addresses are in
  # $TEST_ENV_DIR/env, their PIDs in $TEST_ENV_DIR/pids (a later run or sourcing finds
  # them running, uses them, and does not stop them).
  set -uo pipefail
  test_env_main || exit 1
  printf 'source %s/env\n' "$TEST_ENV_DIR"
fi
