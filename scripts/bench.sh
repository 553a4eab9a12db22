#!/usr/bin/env bash
# Engine benchmark: what `nexus run` costs on top of the processes it runs.
#
#   scripts/bench.sh                 # build release, run W0..W3, print one line each
#   BENCH_RUNS=9 scripts/bench.sh    # more repetitions (median is reported)
#
# Every step runs `/bin/true`; the same workload is run by `floor` (crate nexus-bench),
# which spawns the same processes with the same parallelism and nothing else. See
# docs/benchmarks.md for what each workload measures and the latest results.
#
# Environment (all optional):
#   BENCH_RUNS            repetitions of W1..W3 (default 5)
#   BENCH_W0_RUNS         repetitions of W0 (default 21)
#   BENCH_W3_PARALLELISM  parallelism of W3's 500-wide middle layer (default 4)
#   BENCH_ONLY="W0 W2"    run only these workloads (default: all four)
#   BENCH_KEEP=1          keep the temporary directory (configs, raw samples, state)
#
# stdout: a header (lines starting with `#`), then exactly one line per workload:
#   W1 nexus_s=… floor_s=… ratio=… rss_mb=…
# Progress goes to stderr, and so does, when perf is installed, nexus's own CPU time per
# workload (perf stat --no-inherit: without its children). Exits non-zero if a run fails
# (never because a target is missed: this is a measurement, not a test).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-5}
W0_RUNS=${BENCH_W0_RUNS:-21}
W3_PAR=${BENCH_W3_PARALLELISM:-4}

say() { printf '%s\n' "$*" >&2; }

command -v python3 >/dev/null || { say "bench: python3 is needed to generate the configurations"; exit 2; }

say "bench: building release binaries (nexus, floor)…"
cargo build --release --quiet -p nexus-cli -p nexus-bench
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
NEXUS="$target_dir/release/nexus"
FLOOR="$target_dir/release/floor"

work=$(mktemp -d "${TMPDIR:-/tmp}/nexus-bench.XXXXXX")
if [ "${BENCH_KEEP:-0}" = 1 ]; then
  say "bench: keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi
raw="$work/samples.txt"
: >"$raw"

# --------------------------------------------------------------------- configurations
# One configuration directory per workload, so that W0 parses a one-step registry and
# not the 1,700 steps of the others. Minimal registries: one environment, the local
# runner, one pipeline whose steps are `run: {argv: ["/bin/true"]}`.
python3 - "$work" "$W3_PAR" <<'PY'
import os, sys

work, w3_par = sys.argv[1], int(sys.argv[2])
TRUE = '        run: {argv: ["/bin/true"]}'

def step(i, needs=None):
    lines = [f"      - id: s{i}", TRUE]
    if needs:
        lines.append("        needs: [" + ", ".join(f"s{n}" for n in needs) + "]")
    return lines

def write(name, parallelism, steps):
    d = os.path.join(work, "config", name)
    os.makedirs(d)
    files = {
        "automation_registry.yaml": "version: 1\nautomations: {}\n",
        "monitoring_registry.yaml": "version: 1\n",
        "security_registry.yaml": "version: 1\n",
        "orchestration_registry.yaml": (
            "version: 1\n"
            "defaults:\n  environment: bench\n  runner: local\n"
            "environments:\n  bench:\n    description: The benchmark machine.\n"
            "runners:\n  local:\n    kind: local\n"
        ),
    }
    pipeline = ["version: 1", "pipelines:", f"  {name}:",
                f"    description: Benchmark workload {name}.",
                f"    parallelism: {parallelism}", "    steps:"]
    for s in steps:
        pipeline.extend(s)
    files["pipeline_registry.yaml"] = "\n".join(pipeline) + "\n"
    for f, text in files.items():
        with open(os.path.join(d, f), "w") as fh:
            fh.write(text)

# W0: one step.
write("w0", 1, [step(0)])
# W1: 1,000 independent steps, parallelism 2.
write("w1", 2, [step(i) for i in range(1000)])
# W2: a chain of 200 steps, each needing the previous one.
write("w2", 2, [step(0)] + [step(i, [i - 1]) for i in range(1, 200)])
# W3: 1 -> 500 -> 1 (s0, s1..s500 need s0, s501 needs all 500).
write("w3", w3_par, [step(0)] + [step(i, [0]) for i in range(1, 501)] + [step(501, range(1, 501))])
PY

# --------------------------------------------------------------------- measurement
# Wall time: bash's $EPOCHREALTIME (microseconds, a builtin: no fork inside the
# interval) around the whole process, the same way for nexus and for floor, so both
# include exec, start-up and exit. stdout/stderr go to /dev/null.
# Peak RSS: /usr/bin/time -f %M (the kernel's ru_maxrss of the process, from wait4)
# in separate runs, so the timed runs carry no wrapper; without /usr/bin/time, the
# same ru_maxrss read by python3's os.wait4.
if [ -x /usr/bin/time ]; then
  RSS_METHOD="/usr/bin/time -f %M (ru_maxrss from wait4)"
else
  RSS_METHOD="python3 os.wait4 ru_maxrss (/usr/bin/time not installed)"
fi

# perf, if it is installed and allowed to count this user's processes (for the CPU line).
PERF=""
if command -v perf >/dev/null && perf stat -x, -e task-clock -o /dev/null -- true >/dev/null 2>&1; then
  PERF=$(command -v perf)
fi

now_us() { local t=${EPOCHREALTIME//[.,]/}; printf "%s" "$t"; }

# peak_rss_kb CMD... : runs CMD (output discarded), prints its peak RSS in KiB.
peak_rss_kb() {
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f %M -o "$work/rss.txt" "$@" >/dev/null 2>&1
    tail -n 1 "$work/rss.txt"
  else
    python3 -c '
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                   (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
_, status, ru = os.wait4(pid, 0)
sys.exit(f"exit status {status}") if status else print(ru.ru_maxrss)' "$@"
  fi
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# bench NAME RUNS JOBS PARALLELISM SHAPE
bench() {
  local name=$1 runs=$2 jobs=$3 par=$4 shape=$5
  case " ${BENCH_ONLY:-W0 W1 W2 W3} " in *" $name "*) ;; *) return 0 ;; esac
  local cfg="$work/config/${name,,}" pipeline=${name,,}
  local nexus_samples=() floor_samples=() rss_max=0
  say "bench: $name ($runs runs)…"
  for ((i = 0; i < runs; i++)); do
    local t0 t1 st out rss

    # floor
    t0=$(now_us)
    out=$("$FLOOR" --jobs "$jobs" --parallelism "$par" --shape "$shape")
    t1=$(now_us)
    floor_samples+=("$((t1 - t0))")
    printf '%s run=%d floor_us=%d self: %s\n' "$name" "$i" "$((t1 - t0))" "$out" >>"$raw"

    # nexus, timed (fresh state directory: the store is created and migrated each time)
    st="$work/state-$name-$i"
    t0=$(now_us)
    if ! "$NEXUS" run "$pipeline" --config "$cfg" --state "$st" >/dev/null 2>"$work/nexus.err"; then
      say "bench: nexus run $pipeline failed:"; cat "$work/nexus.err" >&2; exit 1
    fi
    t1=$(now_us)
    nexus_samples+=("$((t1 - t0))")
    rm -rf "$st"

    # nexus, peak RSS (separate run, fresh state again)
    rss=$(peak_rss_kb "$NEXUS" run "$pipeline" --config "$cfg" --state "$st-rss")
    rm -rf "$st-rss"
    ((rss > rss_max)) && rss_max=$rss
    printf '%s run=%d nexus_us=%d nexus_rss_kb=%d\n' "$name" "$i" "${nexus_samples[-1]}" "$rss" >>"$raw"
  done
  # nexus's own CPU time (not its children's): steadier than wall time on a shared
  # machine, so a small change to the engine shows here first. Needs perf; to stderr,
  # since stdout is one line per workload.
  if [ -n "$PERF" ]; then
    local cpu_samples=() c
    for ((i = 0; i < 3; i++)); do
      c=$("$PERF" stat --no-inherit -x, -e task-clock -o "$work/cpu.txt" -- \
        "$NEXUS" run "$pipeline" --config "$cfg" --state "$work/state-$name-cpu" >/dev/null 2>&1 &&
        awk -F, '/task-clock/ { print $1 }' "$work/cpu.txt")
      rm -rf "$work/state-$name-cpu"
      [ -n "$c" ] && cpu_samples+=("$c")
    done
    if ((${#cpu_samples[@]})); then
      c=$(printf '%s\n' "${cpu_samples[@]}" | median)
      say "bench: $name nexus's own CPU (perf stat --no-inherit task-clock, median of ${#cpu_samples[@]}): $(awk -v c="$c" -v j="$jobs" 'BEGIN { printf "%.1f ms", c; if (j > 1) printf ", %.0f us per step", c * 1000 / j }')"
    fi
  fi
  local n f
  n=$(printf '%s\n' "${nexus_samples[@]}" | median)
  f=$(printf '%s\n' "${floor_samples[@]}" | median)
  awk -v name="$name" -v n="$n" -v f="$f" -v rss="$rss_max" 'BEGIN {
    printf "%s nexus_s=%.4f floor_s=%.4f ratio=%.2f rss_mb=%.1f\n", name, n / 1e6, f / 1e6, n / f, rss / 1024
  }'
}

# A warm-up run of each binary, so that the first measured sample does not pay for
# loading them from disk.
"$FLOOR" --jobs 1 --parallelism 1 --shape chain >/dev/null
"$NEXUS" run w0 --config "$work/config/w0" --state "$work/state-warmup" >/dev/null 2>&1
rm -rf "$work/state-warmup"

cat <<EOF
# nexus engine benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPU(s), $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)
# $("$NEXUS" --version 2>/dev/null | head -n 1) (release build, commit $(git describe --always --dirty 2>/dev/null || echo unknown)), floor = nexus-bench's floor binary
# Every step runs /bin/true. floor spawns the same processes with std::process::Command,
# same DAG, same parallelism, nothing else. Each nexus run gets a fresh --state directory
# (default SQLite store: WAL, synchronous=NORMAL, created and migrated by the run).
# W0: 1 step (cold start of \`nexus run\` to exit)       floor --jobs 1 --shape chain
# W1: 1,000 independent steps, parallelism 2           floor --jobs 1000 --parallelism 2 --shape flat
# W2: chain of 200 steps                               floor --jobs 200 --shape chain
# W3: 1 -> 500 -> 1, parallelism $W3_PAR                     floor --jobs 502 --parallelism $W3_PAR --shape diamond
# nexus_s, floor_s: median wall time of $RUNS runs ($W0_RUNS for W0), measured around the
#   whole process with bash \$EPOCHREALTIME; output to /dev/null. ratio = nexus_s / floor_s.
# rss_mb: largest peak RSS of nexus over the runs, by $RSS_METHOD.
# Targets: W1, W2, W3 ratio <= 1.3; W0 nexus_s < 0.030; rss_mb < 50.
EOF

bench W0 "$W0_RUNS" 1 1 chain
bench W1 "$RUNS" 1000 2 flat
bench W2 "$RUNS" 200 1 chain
bench W3 "$RUNS" 502 "$W3_PAR" diamond
