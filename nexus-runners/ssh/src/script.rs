//! The POSIX `sh` scripts the runner sends to a remote host, on the standard input of
//! `exec sh -s` (so nothing of them, secrets included, is on a command line).
//!
//! Each attempt has a private directory `${TMPDIR:-/tmp}/nexus-NONCE` (mode 0700) on the
//! remote host; the nonce is the run's tag ([`run_tag`]) and 32 random hex digits:
//!
//! - `output`: the attempt's `$NEXUS_OUTPUT`;
//! - `pid`: the process group the step runs in, written just before it starts;
//! - `stop`: written by [`stop`] so that a step that has not started yet never does.
//!
//! The scripts:
//!
//! - [`wrapper`] prepares the directory, exports the environment, enters the working
//!   directory and starts the program in a process group of its own (`setsid`), then
//!   exits with the program's exit status. Problems before the program starts are
//!   reported as one stderr line `NONCE error CODE` (nothing else writes to stderr yet);
//!   its last stderr line, `NONCE done …`, says what is left to do. Its stdin stays
//!   open while the runner waits: if it closes first (Nexus crashed, the connection is
//!   gone), a watcher stops the program.
//! - [`stop`] (timeout, cancellation), run over a second channel: marks the attempt
//!   stopped, sends SIGTERM to its process group, waits up to the grace period, then
//!   sends SIGKILL. Prints `none`, `term` or `kill`. [`abandon`] does the same for an
//!   attempt nobody waits for, and removes its directory.
//! - [`finish`], after the program exited with outputs: stops what it left running in
//!   its group the same way, prints `none`/`term`/`kill` on a line, then the outputs
//!   file (at most [`MAX_OUTPUT_BYTES`] + 1 bytes), and removes the directory.
//! - [`cleanup`], for `nexus resume`: stops every attempt of a crashed run.
//!
//! Where `setsid` is missing (it is in util-linux and BusyBox, so on every Linux), the
//! program runs in the wrapper's own process group (sshd makes every session a process
//! group), which [`stop`] and [`finish`] then signal as a whole.

use std::fmt::Write as _;

use nexus_core::outputs::MAX_OUTPUT_BYTES;

/// How often the stop and finish scripts check whether the process group is gone.
const TICK_MS: u128 = 50;

/// What a failed wrapper reports, before the program starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WrapperError {
    /// The attempt's directory could not be created (or `stop` got there first).
    Dir,
    /// The working directory does not exist or cannot be entered.
    WorkingDir,
    /// The program (or the shell) is not found, or not executable.
    NotFound,
}

impl WrapperError {
    fn code(self) -> &'static str {
        match self {
            WrapperError::Dir => "dir",
            WrapperError::WorkingDir => "workdir",
            WrapperError::NotFound => "notfound",
        }
    }

    /// Parses the `CODE` of a `NONCE error CODE` line.
    pub(crate) fn parse(code: &str) -> Option<Self> {
        [WrapperError::Dir, WrapperError::WorkingDir, WrapperError::NotFound].into_iter().find(|e| e.code() == code)
    }
}

/// How a stop or finish script left the attempt's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Nothing was running.
    Nothing,
    /// SIGTERM was enough.
    Terminated,
    /// SIGKILL was needed after the grace period.
    Killed,
}

impl Stopped {
    pub(crate) fn parse(word: &str) -> Option<Self> {
        match word.trim() {
            "none" => Some(Stopped::Nothing),
            "term" => Some(Stopped::Terminated),
            "kill" => Some(Stopped::Killed),
            _ => None,
        }
    }
}

/// `value` as one single-quoted shell word.
pub(crate) fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Whether `name` can be exported by a POSIX shell.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The tag of a run in the names of its attempts' remote directories: 16 hex digits
/// (FNV-1a of the run id), so that [`cleanup`] finds them whatever the id holds.
pub(crate) fn run_tag(run_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in run_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// What `nexus resume` runs on each host before continuing a crashed run: every
/// attempt directory of the run (tag `tag`, see [`run_tag`]) owned by this user is
/// marked stopped, its process group stopped as [`stop`] does, and the directory
/// removed. Prints one [`Stopped`] word per directory.
pub(crate) fn cleanup(tag: &str, grace: std::time::Duration) -> String {
    debug_assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
    let stop = stop_group(grace);
    format!(
        r#"for d in "${{TMPDIR:-/tmp}}"/nexus-{tag}*; do
  [ -d "$d" ] && [ ! -L "$d" ] && [ -O "$d" ] || continue
  : >"$d/stop" 2>/dev/null
  read -r p <"$d/pid" 2>/dev/null || p=
  r=none
{stop}  rm -rf "$d"
  echo "$r"
done
"#
    )
}

/// The lines every script starts with: the nonce and the attempt's directory.
fn prelude(nonce: &str) -> String {
    debug_assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()));
    format!("N={nonce}\nd=\"${{TMPDIR:-/tmp}}/nexus-$N\"\n")
}

/// The number of ticks in `grace`.
fn ticks(grace: std::time::Duration) -> u128 {
    grace.as_millis().div_ceil(TICK_MS).max(1)
}

/// Shell code that stops process group `$p` (SIGTERM, up to `grace`, SIGKILL) and sets
/// `r` to `term` or `kill`; `r` stays as it was when nothing was running.
///
/// A group whose members are all zombies counts as gone: where `/proc` shows process
/// states (Linux), `nexus_live` looks for a member that is not one, since a host whose
/// PID 1 is slow to reap (or never reaps, in a container without an init) would
/// otherwise keep a finished group alive until SIGKILL.
fn stop_group(grace: std::time::Duration) -> String {
    let ticks = ticks(grace);
    let tick = format!("0.{:02}", TICK_MS / 10);
    format!(
        r#"nexus_live() {{
  kill -0 -"$p" 2>/dev/null || return 1
  [ -r /proc/self/stat ] || return 0
  for nexus_f in /proc/[0-9]*/stat; do
    read -r nexus_l 2>/dev/null <"$nexus_f" || continue
    set -- ${{nexus_l##*") "}}
    [ "$3" = "$p" ] && [ "$1" != Z ] && [ "$1" != X ] && return 0
  done
  return 1
}}
case $p in ''|*[!0-9]*|0|1) ;; *)
  if nexus_live; then
    kill -TERM -"$p" 2>/dev/null
    r=term; i=0
    while nexus_live; do
      if [ "$i" -ge {ticks} ]; then kill -KILL -"$p" 2>/dev/null; r=kill; break; fi
      sleep {tick} 2>/dev/null || sleep 1
      i=$((i+1))
    done
  fi ;;
esac
"#
    )
}

/// The wrapper that runs one attempt. `argv` is the program and its arguments; `env`
/// the variables to export, in order (a later one wins). `NEXUS_OUTPUT` is exported
/// last. Names must be valid ([`is_env_name`]) and no string may hold a NUL byte.
///
/// While the program runs, a watcher reads the wrapper's stdin, which the runner keeps
/// open until the attempt is over: end of file means that Nexus or its connection is
/// gone (a crash, a lost network), and the watcher then stops the program's process
/// group and removes the attempt's directory.
///
/// Once the program exited, the wrapper stops what it left running in its process
/// group (`grace` between SIGTERM and SIGKILL), removes the attempt's directory unless
/// the outputs file has something in it, and reports on stderr, as its last line,
/// `NONCE done HOW [outputs]` (`HOW` as [`Stopped`]); [`finish`] is then needed only for
/// outputs. Where `setsid` is missing, the wrapper cannot stop its own process group
/// and always says `outputs`, so that [`finish`] runs and stops the leftovers.
pub(crate) fn wrapper(
    nonce: &str,
    argv: &[&str],
    env: &[(&str, &str)],
    working_dir: Option<&str>,
    grace: std::time::Duration,
) -> String {
    // One brace group: the shell reads all of it before running any, so that nothing
    // but the watcher reads stdin once the step runs.
    let mut s = String::from("{\n");
    s.push_str(&prelude(nonce));
    s.push_str(
        "nexus_fail() { printf '%s error %s\\n' \"$N\" \"$1\" >&2; exit 1; }\n\
         mkdir -m 700 \"$d\" 2>/dev/null || nexus_fail dir\n\
         : >\"$d/output\" 2>/dev/null || nexus_fail dir\n",
    );
    for (name, value) in env {
        debug_assert!(is_env_name(name));
        let _ = writeln!(s, "export {name}={}", quote(value));
    }
    s.push_str("export NEXUS_OUTPUT=\"$d/output\"\n");
    if let Some(dir) = working_dir {
        // `cd -- DIR` is not understood by every shell: protect a leading `-` instead.
        let dir = if dir.starts_with('-') { format!("./{dir}") } else { dir.to_owned() };
        let _ = writeln!(s, "cd {} 2>/dev/null || nexus_fail {}", quote(&dir), WrapperError::WorkingDir.code());
    }
    let program = quote(argv.first().copied().unwrap_or_default());
    let _ = writeln!(
        s,
        "case {program} in */*) [ -f {program} ] && [ -x {program} ] ;; *) command -v -- {program} >/dev/null 2>&1 ;; esac || nexus_fail {}",
        WrapperError::NotFound.code()
    );
    let words: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    let words = words.join(" ");
    let stop = stop_group(grace);
    let _ = write!(
        s,
        r#"unset -f nexus_fail
exec 3<&0
if command -v setsid >/dev/null 2>&1; then
  (
    while read -r _; do :; done <&3
    read -r p <"$d/pid" 2>/dev/null || p=
    r=none
{stop}    rm -rf "$d"
  ) >/dev/null 2>&1 &
  w=$!
  exec 3<&-
  setsid sh -c 'printf "%s\n" "$$" >"$1/pid" || exit 125; [ -e "$1/stop" ] && exit 143; shift; exec "$@"' nexus-step "$d" {words} </dev/null
  rc=$?
  kill -KILL "$w" 2>/dev/null
else
  printf '%s\n' "$$" >"$d/pid"
  (
    trap '' TERM
    while read -r _; do :; done <&3
    rm -rf "$d"
    p=$$
    r=none
{stop}  ) >/dev/null 2>&1 &
  w=$!
  exec 3<&-
  [ -e "$d/stop" ] && {{ kill -KILL "$w"; exit 143; }}
  {words} </dev/null
  rc=$?
  kill -KILL "$w" 2>/dev/null
  # The finish script stops what is left in this group, once this shell is gone.
  trap '' PIPE
  printf '%s done none outputs\n' "$N" >&2
  exit $rc
fi
trap '' PIPE
read -r p <"$d/pid" 2>/dev/null || p=
r=none
{stop}if [ -s "$d/output" ]; then o=outputs; else o=; rm -rf "$d"; fi
printf '%s done %s %s\n' "$N" "$r" "$o" >&2
exit $rc
}}
"#
    );
    s
}

/// The lines that mark the attempt stopped and read its process group into `p`.
const MARK_STOPPED: &str =
    "mkdir -m 700 \"$d\" 2>/dev/null\n: >\"$d/stop\" 2>/dev/null\nread -r p <\"$d/pid\" 2>/dev/null || p=\nr=none\n";

/// Stops the attempt: it will not start if it has not yet, and its process group gets
/// SIGTERM, then SIGKILL after `grace`. Prints how (see [`Stopped`]).
pub(crate) fn stop(nonce: &str, grace: std::time::Duration) -> String {
    let mut s = prelude(nonce);
    s.push_str(MARK_STOPPED);
    s.push_str(&stop_group(grace));
    s.push_str("echo \"$r\"\n");
    s
}

/// [`stop`] for an attempt nobody waits for any more (its future was dropped): also
/// removes the attempt's directory once the step had started (before that, the `stop`
/// mark must stay, to keep it from starting). Nothing is printed before the end, so the
/// script completes even when its channel is closed under it.
pub(crate) fn abandon(nonce: &str, grace: std::time::Duration) -> String {
    let mut s = prelude(nonce);
    s.push_str(MARK_STOPPED);
    s.push_str(&stop_group(grace));
    s.push_str("[ -n \"$p\" ] && rm -rf \"$d\"\necho \"$r\"\n");
    s
}

/// After the program exited: stops what it left running in its process group, prints
/// how (see [`Stopped`]) on the first line, then the outputs file, and removes the
/// attempt's directory.
pub(crate) fn finish(nonce: &str, grace: std::time::Duration) -> String {
    let mut s = prelude(nonce);
    s.push_str("read -r p <\"$d/pid\" 2>/dev/null || p=\nr=none\n");
    s.push_str(&stop_group(grace));
    let _ = write!(
        s,
        r#"echo "$r"
if [ -f "$d/output" ]; then head -c {limit} "$d/output" 2>/dev/null || cat "$d/output"; fi
rm -rf "$d"
"#,
        limit = MAX_OUTPUT_BYTES + 1
    );
    s
}

/// Splits the finish script's standard output into how it stopped leftovers and the
/// outputs file's bytes.
pub(crate) fn parse_finish(stdout: &[u8]) -> (Option<Stopped>, Vec<u8>) {
    match stdout.iter().position(|b| *b == b'\n') {
        Some(end) => (Stopped::parse(&String::from_utf8_lossy(&stdout[..end])), stdout[end + 1..].to_vec()),
        None => (Stopped::parse(&String::from_utf8_lossy(stdout)), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    const NONCE: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn quoting_survives_every_character() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        let tricky = "a'b\"c$d`e\\f\ng h*;|&";
        let out = Command::new("sh").arg("-c").arg(format!("printf %s {}", quote(tricky))).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), tricky);
    }

    #[test]
    fn env_names() {
        for good in ["A", "_x", "PATH", "a1_B2"] {
            assert!(is_env_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "$(x)", "É"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn grace_is_counted_in_ticks() {
        assert_eq!(ticks(Duration::from_secs(5)), 100);
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::ZERO), 1);
    }

    #[test]
    fn finish_output_is_split() {
        assert_eq!(parse_finish(b"term\nk=v\n"), (Some(Stopped::Terminated), b"k=v\n".to_vec()));
        assert_eq!(parse_finish(b"none\n"), (Some(Stopped::Nothing), Vec::new()));
        assert_eq!(parse_finish(b"kill"), (Some(Stopped::Killed), Vec::new()));
        assert_eq!(parse_finish(b""), (None, Vec::new()));
    }

    #[test]
    fn wrapper_error_codes_round_trip() {
        for e in [WrapperError::Dir, WrapperError::WorkingDir, WrapperError::NotFound] {
            assert_eq!(WrapperError::parse(e.code()), Some(e));
        }
        assert_eq!(WrapperError::parse("other"), None);
    }

    /// The scripts are POSIX sh: run them here, with `sh -s`, as the remote host would,
    /// with TMPDIR pointing at a private directory.
    fn run_script(script: &str, tmp: &std::path::Path) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new("sh")
            .arg("-s")
            .env("TMPDIR", tmp)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The runner keeps the wrapper's stdin open until the attempt is over (the other
        // scripts end at the end of their input).
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
        let keep = script.starts_with("{\n").then_some(stdin);
        let output = child.wait_with_output().unwrap();
        drop(keep);
        output
    }

    /// Whether local process `pid` is gone (or a zombie).
    fn gone(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X'])))
    }

    fn eventually_gone(pid: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone(pid) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    #[test]
    fn the_scripts_run_a_program_and_collect_its_outputs_locally() {
        let tmp = tempfile::tempdir().unwrap();
        let script = wrapper(
            NONCE,
            &["sh", "-c", "echo \"$A $B\"; pwd; echo 'k=v 1' >> \"$NEXUS_OUTPUT\"; exit 3"],
            &[("A", "it's"), ("B", "$HOME")],
            Some("/"),
            Duration::from_millis(200),
        );
        let out = run_script(&script, tmp.path());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME\n/\n");
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{NONCE} done none outputs\n"));
        let dir = tmp.path().join(format!("nexus-{NONCE}"));
        assert!(dir.join("pid").exists(), "kept for its outputs");
        let out = run_script(&finish(NONCE, Duration::from_millis(200)), tmp.path());
        let (stopped, outputs) = parse_finish(&out.stdout);
        assert_eq!(stopped, Some(Stopped::Nothing));
        assert_eq!(outputs, b"k=v 1\n");
        assert!(!dir.exists());
    }

    #[test]
    fn the_wrapper_stops_leftovers_and_cleans_up_when_there_are_no_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        // The leftover ignores SIGTERM, and keeps neither output open.
        let script = wrapper(
            NONCE,
            &["sh", "-c", "trap '' TERM; sleep 30 >/dev/null 2>&1 & echo $!"],
            &[],
            None,
            Duration::from_millis(300),
        );
        let out = run_script(&script, tmp.path());
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{NONCE} done kill \n"));
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let gone = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z") || s.contains(") X"))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !gone(&pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(&pid), "leftover {pid} survived");
        assert!(!tmp.path().join(format!("nexus-{NONCE}")).exists());
    }

    #[test]
    fn the_step_is_stopped_when_the_wrappers_stdin_closes_under_it() {
        use std::io::{BufRead, Write};
        let tmp = tempfile::tempdir().unwrap();
        let script = wrapper(
            NONCE,
            &["sh", "-c", "sleep 30 & echo $!; echo $$; sleep 30"],
            &[],
            None,
            Duration::from_millis(300),
        );
        let mut child = Command::new("sh")
            .arg("-s")
            .env("TMPDIR", tmp.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (mut background, mut main) = (String::new(), String::new());
        stdout.read_line(&mut background).unwrap();
        stdout.read_line(&mut main).unwrap();
        // As when Nexus dies: the wrapper's stdin closes while the step runs.
        drop(stdin);
        for pid in [background.trim(), main.trim()] {
            assert!(eventually_gone(pid), "{pid} survived");
        }
        let status = child.wait().unwrap();
        assert_ne!(status.code(), Some(0));
        let dir = tmp.path().join(format!("nexus-{NONCE}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while dir.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!dir.exists(), "the attempt's directory was not removed");
    }

    #[test]
    fn without_setsid_the_finish_script_stops_the_leftovers() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        // A PATH with everything the scripts use but `setsid`.
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for tool in ["sh", "mkdir", "rm", "head", "sleep", "cat"] {
            let found = ["/usr/bin", "/bin"].iter().map(|d| std::path::Path::new(d).join(tool)).find(|p| p.exists());
            std::os::unix::fs::symlink(found.unwrap(), bin.join(tool)).unwrap();
        }
        let script =
            wrapper(NONCE, &["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], &[], None, Duration::from_millis(300));
        // A session of its own, as sshd gives every session.
        let mut child = Command::new("/usr/bin/setsid")
            .args(["/bin/sh", "-s"])
            .env("TMPDIR", tmp.path())
            .env("PATH", &bin)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{NONCE} done none outputs\n"));
        let leftover = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!gone(&leftover), "the leftover should still run before the finish script");
        let out = run_script(&finish(NONCE, Duration::from_millis(300)), tmp.path());
        drop(stdin);
        assert_eq!(parse_finish(&out.stdout).0, Some(Stopped::Terminated), "the leftover went at SIGTERM");
        assert!(eventually_gone(&leftover), "leftover {leftover} survived");
    }

    #[test]
    fn run_tags_are_stable_hex() {
        assert_eq!(run_tag(""), "cbf29ce484222325");
        assert_eq!(run_tag("a"), "af63dc4c8601ec8c");
        assert_ne!(run_tag("run-1"), run_tag("run-2"));
    }

    #[test]
    fn cleanup_stops_every_attempt_of_the_run_and_no_other() {
        use std::io::BufRead;
        let tmp = tempfile::tempdir().unwrap();
        let (ours, other) = (run_tag("crashed"), run_tag("alive"));
        let mut steps = Vec::new();
        for (tag, n) in [(&ours, "1"), (&ours, "2"), (&other, "3")] {
            let nonce = format!("{tag}{}", n.repeat(32));
            let script = wrapper(&nonce, &["sh", "-c", "echo $$; sleep 30"], &[], None, Duration::from_millis(300));
            let mut child = Command::new("sh")
                .arg("-s")
                .env("TMPDIR", tmp.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            std::io::Write::write_all(&mut stdin, script.as_bytes()).unwrap();
            let mut pid = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut pid).unwrap();
            steps.push((child, stdin, pid.trim().to_owned()));
        }
        let out = run_script(&cleanup(&ours, Duration::from_millis(300)), tmp.path());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "term\nterm\n");
        assert!(eventually_gone(&steps[0].2) && eventually_gone(&steps[1].2));
        assert!(!gone(&steps[2].2), "another run's step was stopped");
        let left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [format!("nexus-{other}{}", "3".repeat(32))]);
        // The last one ends when its stdin closes, as when Nexus dies.
        for (mut child, stdin, _) in steps {
            drop(stdin);
            child.wait().unwrap();
        }
    }

    #[test]
    fn the_wrapper_reports_a_missing_program_or_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = format!("{NONCE} error ");
        for (argv, dir, code) in [
            (vec!["nexus-no-such-program"], None, "notfound"),
            (vec!["/nonexistent/prog"], None, "notfound"),
            (vec!["true"], Some("/nonexistent/dir"), "workdir"),
        ] {
            let out = run_script(&wrapper(NONCE, &argv, &[], dir, Duration::from_millis(100)), tmp.path());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.trim_end(), format!("{marker}{code}"), "{argv:?}");
            run_script(&finish(NONCE, Duration::from_millis(100)), tmp.path());
        }
    }

    #[test]
    fn a_stopped_attempt_never_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let out = run_script(&stop(NONCE, Duration::from_millis(100)), tmp.path());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "none\n");
        let flag = tmp.path().join("ran");
        let script = wrapper(NONCE, &["touch", flag.to_str().unwrap()], &[], None, Duration::from_millis(100));
        let out = run_script(&script, tmp.path());
        assert!(!flag.exists(), "{}", String::from_utf8_lossy(&out.stderr));
        run_script(&finish(NONCE, Duration::from_millis(100)), tmp.path());
        assert!(!tmp.path().join(format!("nexus-{NONCE}")).exists());
    }
}
