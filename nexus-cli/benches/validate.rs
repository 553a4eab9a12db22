//! Benchmark of `nexus validate` (run on demand: `cargo bench -p nexus-cli --bench validate`).
//!
//! Measures, on the example platform and on a generated large configuration (1,000
//! automations, 200 pipelines of 20 steps): the library call `validate_dir` (read,
//! parse, schema, semantic and template checks) and the whole `nexus validate` process.
//! Prints min / median / max of several runs; a benchmark, not a test, so it asserts
//! nothing about time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_core::Catalog;
use nexus_core::validate::{Options, validate_dir};

const RUNS: usize = 15;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let example = root.join("config/ssot");
    let large = std::env::temp_dir().join(format!("nexus-bench-large-{}", std::process::id()));
    generate_large(&large, 1000, 200, 20);
    let binary = nexus_binary(&root);

    let mut catalog = Catalog::new();
    nexus_runners::register(&mut catalog).expect("runners");
    nexus_adapters::register(&mut catalog).expect("adapters");
    nexus_notify::register(&mut catalog).expect("notifiers");

    for (name, dir) in [("example config/ssot", &example), ("large (1000 automations, 200x20 steps)", &large)] {
        let check = validate_dir(dir, &catalog, &Options::default());
        assert!(!check.report.has_errors(), "{name} must be valid: {:#?}", check.report.diagnostics.first());
        let lib = measure(|| {
            let v = validate_dir(dir, &catalog, &Options::default());
            std::hint::black_box(v.report.error_count());
        });
        report(&format!("validate_dir  {name}"), &lib);
        if let Some(binary) = &binary {
            let process = measure(|| {
                let status = Command::new(binary)
                    .args(["validate", "--config"])
                    .arg(dir)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .expect("run nexus");
                assert!(status.success());
            });
            report(&format!("nexus validate {name}"), &process);
        }
    }
    // The "billion laughs" bomb: 10 levels of 10 aliases would expand to 10^10 nodes.
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
    }
    let refused = measure(|| {
        assert!(nexus_core::yaml::parse(&bomb).is_err());
    });
    report("yaml::parse  alias bomb (refused)", &refused);

    let size: u64 =
        std::fs::read_dir(&large).expect("dir").filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!("large configuration: {} KiB in {}", size / 1024, large.display());
    if std::env::var_os("KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&large);
    }
}

fn measure(mut f: impl FnMut()) -> Vec<Duration> {
    f(); // warm-up: page cache, lazy statics
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn report(name: &str, times: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<58} min {:>7.2} ms   median {:>7.2} ms   max {:>7.2} ms   ({} runs)",
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        times.len()
    );
}

/// The release `nexus` binary next to this bench's target directory, if built.
fn nexus_binary(root: &Path) -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let path = target.join("release/nexus");
    if path.exists() {
        Some(path)
    } else {
        eprintln!("(build `cargo build --release -p nexus-cli` to also time the whole process)");
        None
    }
}

/// Writes a valid configuration with `automations` automations and `pipelines`
/// pipelines of `steps` steps each, using every kind of reference.
pub fn generate_large(dir: &Path, automations: usize, pipelines: usize, steps: usize) {
    std::fs::create_dir_all(dir).expect("create bench dir");
    let mut a = String::from("version: 1\nautomations:\n");
    for i in 0..automations {
        let _ = write!(
            a,
            "  auto-{i}:\n    category: deployment\n    description: Generated automation {i}.\n    owner: team-{o}\n    labels:\n      shard: \"{s}\"\n    params:\n      version:\n        type: string\n        required: true\n      replicas:\n        type: integer\n        default: 2\n    run:\n      command: echo deploy {{{{ params.version }}}} x{{{{ params.replicas }}}} to {{{{ env.vars.host }}}} && echo out=ok >> \"$NEXUS_OUTPUT\"\n      env:\n        TOKEN: \"{{{{ secrets.secret_{k} }}}}\"\n    runner: runner-{r}\n    timeout: 5m\n    retry:\n      attempts: 3\n      backoff: 2s\n      max_backoff: 1m\n    outputs:\n      out:\n        description: Result.\n",
            o = i % 10,
            s = i % 7,
            k = i % 20,
            r = i % 3
        );
    }
    let mut p = String::from("version: 1\npipelines:\n");
    for i in 0..pipelines {
        let _ = write!(
            p,
            "  pipe-{i}:\n    description: Generated pipeline {i}.\n    params:\n      version:\n        type: string\n        default: 1.0.0\n    concurrency:\n      group: \"pipe-{i}-{{{{ env.name }}}}\"\n    steps:\n"
        );
        for j in 0..steps {
            let auto = (i * steps + j) % automations;
            let _ = write!(
                p,
                "      - id: s{j}\n        uses: auto-{auto}\n        with:\n          version: \"{{{{ params.version }}}}\"\n"
            );
            if j > 0 {
                let _ = writeln!(p, "        needs: [s{}]", j - 1);
            }
            if j > 1 {
                let _ = write!(
                    p,
                    "        if: \"steps.s{}.outputs.out == 'ok'\"\n        env:\n          PREV: \"{{{{ steps.s{}.outputs.out }}}}\"\n",
                    j - 1,
                    j - 2
                );
            }
            if j % 5 == 0 {
                let _ = write!(p, "        locks: [lock-{}]\n        timeout: 10m\n", j % 3);
            }
        }
        let _ = write!(
            p,
            "    on_failure:\n      - id: alert\n        notify:\n          channels: [ops]\n          message: \"pipe-{i} failed in {{{{ env.name }}}}\"\n"
        );
    }
    let mut o = String::from(
        "version: 1\ndefaults:\n  environment: dev\n  pipeline: pipe-0\n  runner: runner-0\nenvironments:\n",
    );
    for env in ["dev", "staging", "prod"] {
        let _ = write!(o, "  {env}:\n    vars:\n      host: {env}.example.internal\n");
    }
    o.push_str("runners:\n");
    for r in 0..3 {
        let _ = write!(o, "  runner-{r}:\n    kind: local\n    spec:\n      shell: sh\n");
    }
    o.push_str("locks:\n");
    for l in 0..3 {
        let _ = write!(o, "  lock-{l}:\n    limit: 1\n");
    }
    o.push_str("schedules:\n  nightly:\n    pipeline: pipe-1\n    environment: prod\n    cron: \"0 3 * * *\"\n    timezone: Europe/Berlin\n");
    let m = "version: 1\nchannels:\n  ops:\n    kind: webhook\n    spec:\n      url: https://hooks.example.internal/nexus\nroutes:\n  - name: failures\n    match:\n      events: [run.failed]\n    channels: [ops]\n";
    let mut s = String::from("version: 1\nsecrets:\n");
    for k in 0..20 {
        let _ = write!(s, "  secret_{k}:\n    env: SECRET_{k}\n");
    }
    for (file, text) in [
        ("automation_registry.yaml", a),
        ("pipeline_registry.yaml", p),
        ("orchestration_registry.yaml", o),
        ("monitoring_registry.yaml", m.to_owned()),
        ("security_registry.yaml", s),
    ] {
        std::fs::write(dir.join(file), text).expect("write bench file");
    }
}
