//! The floor of the engine benchmark (`scripts/bench.sh`): the cheapest way to run the
//! benchmark's workloads. It spawns `/bin/true` with `std::process::Command` exactly as
//! the DAG allows and does nothing else: no parsing, no planning, no journal, no logs.
//!
//! ```text
//! floor --jobs N --parallelism P --shape flat|chain|diamond [--program PATH]
//! ```
//!
//! - `flat`: N independent processes, at most P at a time (P worker threads pulling
//!   from a shared counter);
//! - `chain`: N processes one after the other (P is irrelevant);
//! - `diamond`: 1 process, then N − 2 independent ones at most P at a time, then 1
//!   (N counts every process, so `--jobs 502` is 1 → 500 → 1).
//!
//! On success it prints one line on stdout,
//! `floor shape=… jobs=… parallelism=… wall_s=… vmhwm_kb=…`: its own wall time from the
//! start of `main` to the last child's exit, and its own peak resident set size
//! (`VmHWM` of `/proc/self/status`, not the children's). Exit status 0 when every child
//! exited 0, 1 when one did not, 2 on bad usage.

use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

const USAGE: &str = "usage: floor --jobs N --parallelism P --shape flat|chain|diamond [--program PATH]";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Flat,
    Chain,
    Diamond,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Flat => "flat",
            Shape::Chain => "chain",
            Shape::Diamond => "diamond",
        }
    }
}

struct Args {
    jobs: usize,
    parallelism: usize,
    shape: Shape,
    program: String,
}

fn parse_args() -> Result<Args, String> {
    let mut jobs = None;
    let mut parallelism = None;
    let mut shape = None;
    let mut program = String::from("/bin/true");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let mut value = || inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--jobs" => jobs = Some(value()?.parse::<usize>().map_err(|e| format!("--jobs: {e}"))?),
            "--parallelism" => {
                parallelism = Some(value()?.parse::<usize>().map_err(|e| format!("--parallelism: {e}"))?)
            }
            "--shape" => {
                shape = Some(match value()?.as_str() {
                    "flat" => Shape::Flat,
                    "chain" => Shape::Chain,
                    "diamond" => Shape::Diamond,
                    other => return Err(format!("--shape: unknown shape `{other}` (flat, chain, diamond)")),
                })
            }
            "--program" => program = value()?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let jobs = jobs.ok_or("--jobs is required")?;
    let parallelism = parallelism.unwrap_or(1);
    let shape = shape.ok_or("--shape is required")?;
    if jobs == 0 {
        return Err("--jobs must be at least 1".into());
    }
    if parallelism == 0 {
        return Err("--parallelism must be at least 1".into());
    }
    if shape == Shape::Diamond && jobs < 3 {
        return Err("--shape diamond needs --jobs 3 or more (1 → jobs−2 → 1)".into());
    }
    Ok(Args { jobs, parallelism, shape, program })
}

/// Runs the program once and waits for it; `true` when it exited 0.
fn spawn_one(program: &str) -> bool {
    match Command::new(program).stdin(Stdio::null()).status() {
        Ok(status) => status.success(),
        Err(e) => {
            eprintln!("floor: cannot run {program}: {e}");
            false
        }
    }
}

/// Runs the program `n` times, at most `parallelism` at a time.
fn flat(program: &str, n: usize, parallelism: usize) -> bool {
    let workers = parallelism.min(n);
    if workers <= 1 {
        return (0..n).all(|_| spawn_one(program));
    }
    let next = AtomicUsize::new(0);
    let ok = AtomicBool::new(true);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while ok.load(Ordering::Relaxed) && next.fetch_add(1, Ordering::Relaxed) < n {
                    if !spawn_one(program) {
                        ok.store(false, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    ok.into_inner()
}

/// `VmHWM` (peak resident set size) of this process, in KiB; 0 if unreadable.
fn vmhwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmHWM:").and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if message.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("floor: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let program = args.program.as_str();
    let ok = match args.shape {
        Shape::Flat => flat(program, args.jobs, args.parallelism),
        Shape::Chain => (0..args.jobs).all(|_| spawn_one(program)),
        Shape::Diamond => spawn_one(program) && flat(program, args.jobs - 2, args.parallelism) && spawn_one(program),
    };
    let wall = start.elapsed();
    if !ok {
        eprintln!("floor: a child did not exit 0");
        return ExitCode::FAILURE;
    }
    println!(
        "floor shape={} jobs={} parallelism={} wall_s={:.6} vmhwm_kb={}",
        args.shape.name(),
        args.jobs,
        args.parallelism,
        wall.as_secs_f64(),
        vmhwm_kb()
    );
    ExitCode::SUCCESS
}
