# shellcheck shell=bash
# An OpenSSH server on 127.0.0.1:2222 for the `ssh` runner's tests.
#
# Sourced by scripts/test-env.sh (which sources every scripts/test-env.d/*.sh, then
# calls `test_env_sshd`, and `nexus_sshd_stop` from its `test_env_stop`), or directly,
# which starts it at once:
#
#   source scripts/test-env.d/sshd.sh            # install if missing, start, export
#   cargo test -p nexus-runner-ssh -- --include-ignored
#   nexus_sshd_stop                              # stop it (by its PID), remove its files
#
# Idempotent and safe to source twice: the keys and the configuration live in a fixed
# directory (NEXUS_TEST_SSHD_DIR, default ${TMPDIR:-/tmp}/nexus-test-sshd), and a server
# already answering on the port with our host key is reused. Works on a fresh Debian
# machine as root (apt-get installs openssh-server and openssh-client when missing).
# Nothing here fails the sourcing shell under `set -euo pipefail` except a server that
# cannot be started, which returns 1 with the reason.
#
# Exports:
#   NEXUS_TEST_SSH_HOST=127.0.0.1   NEXUS_TEST_SSH_PORT=2222   NEXUS_TEST_SSH_USER=<you>
#   NEXUS_TEST_SSH_KEY=<private key file>   NEXUS_TEST_SSH_KNOWN_HOSTS=<known_hosts file>
# (and appends the same lines to $NEXUS_TEST_ENV_FILE when that is set).

nexus_sshd_log() { printf 'sshd: %s\n' "$*" >&2; }

# Whether something accepts TCP connections on 127.0.0.1:$1.
nexus_sshd_answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Installs the OpenSSH server and client when missing.
nexus_sshd_install() {
  if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; then
    return 0
  fi
  if declare -F test_env_packages >/dev/null; then
    test_env_packages openssh-server openssh-client
    return
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    nexus_sshd_log "OpenSSH is missing and there is no apt-get: install openssh-server and openssh-client"
    return 1
  fi
  nexus_sshd_log "installing openssh-server and openssh-client"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      openssh-server openssh-client >/dev/null ||
    { nexus_sshd_log "apt-get install openssh-server openssh-client failed"; return 1; }
}

nexus_sshd_start() {
  local port="${NEXUS_TEST_SSH_PORT:-2222}"
  local dir="${NEXUS_TEST_SSHD_DIR:-${TMPDIR:-/tmp}/nexus-test-sshd}"
  local user
  user="$(id -un)"
  nexus_sshd_install || return 1

  if [ -e "$dir" ] && { [ ! -O "$dir" ] || [ -L "$dir" ]; }; then
    nexus_sshd_log "$dir exists and is not a directory of $user: remove it or set NEXUS_TEST_SSHD_DIR"
    return 1
  fi
  mkdir -p "$dir" && chmod 700 "$dir" || return 1

  # Throw-away keys, made once per directory: the server's host key and the client's.
  [ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C nexus-test-host -f "$dir/host_ed25519" || return 1
  [ -f "$dir/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C nexus-test-client -f "$dir/client_ed25519" || return 1
  cp "$dir/client_ed25519.pub" "$dir/authorized_keys"

  cat >"$dir/sshd_config" <<EOF
# Written by scripts/test-env.d/sshd.sh: a throw-away server for tests.
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
# Tests run in parallel: let every connection through.
MaxStartups 200
MaxSessions 64
# Keep the user's ~/.bashrc out of the sessions (with SHLVL set, bash does not read it
# for a command run by sshd): the tests expect exact output, and a bashrc that prints
# or slows down (pyenv init) would get in the way. Real hosts keep theirs.
SetEnv SHLVL=1
LogLevel INFO
EOF

  # Every name the tests use for this server (a two-host group uses both).
  local key
  key="$(cut -d' ' -f1,2 "$dir/host_ed25519.pub")"
  printf '[127.0.0.1]:%s %s\n[localhost]:%s %s\n' "$port" "$key" "$port" "$key" >"$dir/known_hosts"

  local pid=""
  [ -f "$dir/sshd.pid" ] && pid="$(cat "$dir/sshd.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && nexus_sshd_answers "$port"; then
    : # ours, already running
  elif nexus_sshd_answers "$port"; then
    # Something else listens there: reuse it only if it is a server with our host key.
    if ! ssh-keyscan -p "$port" -t ed25519 127.0.0.1 2>/dev/null | grep -qF "${key#* }"; then
      nexus_sshd_log "127.0.0.1:$port is taken by another program: free it or set NEXUS_TEST_SSH_PORT"
      return 1
    fi
  else
    mkdir -p /run/sshd 2>/dev/null || true # the privilege separation directory
    /usr/sbin/sshd -t -f "$dir/sshd_config" || { nexus_sshd_log "bad configuration $dir/sshd_config"; return 1; }
    /usr/sbin/sshd -D -e -f "$dir/sshd_config" >>"$dir/sshd.log" 2>&1 &
    local started=$!
    NEXUS_SSHD_STARTED_PID=$started
    local deadline=$((SECONDS + 10))
    until nexus_sshd_answers "$port"; do
      if ! kill -0 "$started" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
        nexus_sshd_log "sshd did not start on 127.0.0.1:$port; its log ($dir/sshd.log) ends with:"
        tail -n 5 "$dir/sshd.log" >&2 || true
        return 1
      fi
      sleep 0.05
    done
    nexus_sshd_log "started on 127.0.0.1:$port (pid $started, files in $dir)"
  fi

  export NEXUS_TEST_SSHD_DIR="$dir"
  export NEXUS_TEST_SSH_HOST=127.0.0.1
  export NEXUS_TEST_SSH_PORT="$port"
  export NEXUS_TEST_SSH_USER="$user"
  export NEXUS_TEST_SSH_KEY="$dir/client_ed25519"
  export NEXUS_TEST_SSH_KNOWN_HOSTS="$dir/known_hosts"
  if [ -n "${NEXUS_TEST_ENV_FILE:-}" ]; then
    local var
    for var in NEXUS_TEST_SSH_HOST NEXUS_TEST_SSH_PORT NEXUS_TEST_SSH_USER NEXUS_TEST_SSH_KEY NEXUS_TEST_SSH_KNOWN_HOSTS; do
      printf '%s=%q\n' "$var" "${!var}" >>"$NEXUS_TEST_ENV_FILE"
    done
  fi
}

# The hook scripts/test-env.sh calls after sourcing this file.
test_env_sshd() {
  nexus_sshd_start
}

# Stops the server this shell started (by its PID) and removes its files; a server that
# was already running when this shell sourced the snippet is left alone, unless called
# as `nexus_sshd_stop force` (which stops the one named by the pid file).
nexus_sshd_stop() {
  local dir="${NEXUS_TEST_SSHD_DIR:-${TMPDIR:-/tmp}/nexus-test-sshd}"
  local pid="${NEXUS_SSHD_STARTED_PID:-}"
  if [ "${1:-}" = force ] && [ -f "$dir/sshd.pid" ]; then
    pid="$(cat "$dir/sshd.pid" 2>/dev/null || true)"
  fi
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  if [ -d "$dir" ] && [ -O "$dir" ]; then rm -rf "$dir"; fi
  unset NEXUS_SSHD_STARTED_PID NEXUS_TEST_SSH_HOST NEXUS_TEST_SSH_PORT NEXUS_TEST_SSH_USER NEXUS_TEST_SSH_KEY \
    NEXUS_TEST_SSH_KNOWN_HOSTS
  return 0
}

# Sourced on its own: start now. Sourced by scripts/test-env.sh: it calls test_env_sshd.
if ! declare -F test_env_started >/dev/null; then
  nexus_sshd_start
fi
