# shellcheck shell=bash
# An SMTP sink on 127.0.0.1:2526 for the `email` notifier's tests: postfix's
# `smtp-sink`, which accepts every message and writes it, headers included, to a file.
#
# Sourced by scripts/test-env.sh (which sources every scripts/test-env.d/*.sh, then
# calls `test_env_smtp`, and `nexus_smtp_stop` from its `test_env_stop`), or directly,
# which starts it at once:
#
#   source scripts/test-env.d/smtp.sh            # install if missing, start, export
#   cargo test -p nexus-notify-email -- --include-ignored
#   nexus_smtp_stop                              # stop it (by its PID), remove its files
#
# Idempotent and safe to source twice: the messages go to a fixed directory
# (NEXUS_TEST_SMTP_DIR, default ${TMPDIR:-/tmp}/nexus-test-smtp), and a sink already
# answering on the port with our pid file is reused. Works on a fresh Debian machine as
# root: apt-get installs postfix with debconf's "No configuration" (nothing of postfix
# itself is configured or started; only its `smtp-sink` test program is used).
#
# Exports:
#   NEXUS_TEST_SMTP=127.0.0.1:2526   NEXUS_TEST_SMTP_DIR=<where each message is written>
# (and appends the same lines to $NEXUS_TEST_ENV_FILE when that is set). Each message is
# one file `$NEXUS_TEST_SMTP_DIR/<unique>.<Message-ID>` (smtp-sink's `-d DIR/%M.`).

nexus_smtp_log() { printf 'smtp: %s\n' "$*" >&2; }

# Whether something accepts TCP connections on 127.0.0.1:$1.
nexus_smtp_answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Finds smtp-sink (Debian puts it in /usr/sbin).
nexus_smtp_sink_bin() {
  command -v smtp-sink 2>/dev/null || { [ -x /usr/sbin/smtp-sink ] && echo /usr/sbin/smtp-sink; }
}

# Installs postfix (for smtp-sink) when missing, without configuring a mail system.
nexus_smtp_install() {
  [ -n "$(nexus_smtp_sink_bin)" ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    nexus_smtp_log "smtp-sink is missing: install postfix (as root, with apt-get)"
    return 1
  fi
  printf 'postfix postfix/main_mailer_type select No configuration\n' | debconf-set-selections || return 1
  if declare -F test_env_packages >/dev/null; then
    test_env_packages postfix || return 1
  else
    nexus_smtp_log "installing postfix (for smtp-sink)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null ||
      { nexus_smtp_log "apt-get install postfix failed"; return 1; }
  fi
  [ -n "$(nexus_smtp_sink_bin)" ] || { nexus_smtp_log "postfix is installed but smtp-sink is not found"; return 1; }
}

# The sink's own directory (pid file, log, messages/). NEXUS_TEST_SMTP_DIR names it
# before a start, and its messages/ subdirectory (what the tests read) once exported, so
# a second sourcing or the stop finds the same directory.
nexus_smtp_dir() {
  local dir="${NEXUS_TEST_SMTP_DIR:-${TMPDIR:-/tmp}/nexus-test-smtp}"
  printf '%s\n' "${dir%/messages}"
}

nexus_smtp_start() {
  local port="${NEXUS_TEST_SMTP_PORT:-2526}"
  local dir
  dir="$(nexus_smtp_dir)"
  nexus_smtp_install || return 1
  local sink
  sink="$(nexus_smtp_sink_bin)"

  if [ -e "$dir" ] && { [ ! -O "$dir" ] || [ -L "$dir" ]; }; then
    nexus_smtp_log "$dir exists and is not a directory of $(id -un): remove it or set NEXUS_TEST_SMTP_DIR"
    return 1
  fi
  # -u: the user smtp-sink runs as (it refuses to run as root otherwise). As `nobody`, it
  # must reach and write the message directory: also when a running sink is reused.
  local user
  user="$(id -un)"
  [ "$user" = root ] && { id nobody >/dev/null 2>&1 && user=nobody; }
  mkdir -p "$dir/messages" || return 1
  if [ "$user" = nobody ]; then
    chmod 711 "$dir" && chown nobody "$dir/messages" || return 1
  else
    chmod 700 "$dir" || return 1
  fi

  local pid=""
  [ -f "$dir/smtp-sink.pid" ] && pid="$(cat "$dir/smtp-sink.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && nexus_smtp_answers "$port"; then
    : # ours, already running
  elif nexus_smtp_answers "$port"; then
    nexus_smtp_log "127.0.0.1:$port is taken by another program: free it or set NEXUS_TEST_SMTP_PORT"
    return 1
  else
    # -d DIR/%M.: one file per message named after a unique id; 100: the connection
    # backlog.
    "$sink" -u "$user" -d "$dir/messages/%M." "127.0.0.1:$port" 100 >>"$dir/smtp-sink.log" 2>&1 &
    local started=$!
    echo "$started" >"$dir/smtp-sink.pid"
    NEXUS_SMTP_STARTED_PID=$started
    declare -F test_env_started >/dev/null && test_env_started smtp-sink "$started"
    local deadline=$((SECONDS + 10))
    until nexus_smtp_answers "$port"; do
      if ! kill -0 "$started" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
        nexus_smtp_log "smtp-sink did not start on 127.0.0.1:$port; its log ($dir/smtp-sink.log) ends with:"
        tail -n 5 "$dir/smtp-sink.log" >&2 || true
        return 1
      fi
      sleep 0.05
    done
    nexus_smtp_log "started on 127.0.0.1:$port (pid $started, messages in $dir/messages)"
  fi

  export NEXUS_TEST_SMTP="127.0.0.1:$port"
  export NEXUS_TEST_SMTP_DIR="$dir/messages"
  if [ -n "${NEXUS_TEST_ENV_FILE:-}" ]; then
    local var
    for var in NEXUS_TEST_SMTP NEXUS_TEST_SMTP_DIR; do
      printf '%s=%q\n' "$var" "${!var}" >>"$NEXUS_TEST_ENV_FILE"
    done
  fi
}

# The hook scripts/test-env.sh calls after sourcing this file.
test_env_smtp() {
  nexus_smtp_start
}

# Stops the sink this shell started (by its PID) and removes its files; a sink that was
# already running when this shell sourced the snippet is left alone, unless called as
# `nexus_smtp_stop force` (which stops the one named by the pid file).
nexus_smtp_stop() {
  local dir
  dir="$(nexus_smtp_dir)"
  local pid="${NEXUS_SMTP_STARTED_PID:-}"
  if [ "${1:-}" = force ] && [ -f "$dir/smtp-sink.pid" ]; then
    pid="$(cat "$dir/smtp-sink.pid" 2>/dev/null || true)"
  fi
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  if [ -d "$dir" ] && [ -O "$dir" ]; then rm -rf "$dir"; fi
  unset NEXUS_SMTP_STARTED_PID NEXUS_TEST_SMTP NEXUS_TEST_SMTP_DIR
  return 0
}

# Sourced on its own: start now. Sourced by scripts/test-env.sh: it calls test_env_smtp.
if ! declare -F test_env_started >/dev/null; then
  nexus_smtp_start
fi
