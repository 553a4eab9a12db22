//! `nexus`: the command operators use. Every command is a thin layer over a library
//! call of `nexus-core`; this crate alone knows about terminals, exit codes and
//! `config/` paths (ARCHITECTURE.md).

/// `println!` that ends the process quietly when stdout is closed early
/// (`nexus runs | head`), instead of panicking on a broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `print!` with the same broken-pipe handling as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod catalog;
mod exec;
mod init;
mod inspect;
mod notify;
mod plugins;
mod progress;
mod render;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use nexus_core::schema::schema_files;
use nexus_core::validate::{Options, validate_dir};

// Validation builds and frees hundreds of thousands of small values; mimalloc makes
// that markedly cheaper than the system allocator (see benches/validate.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code: success.
const EXIT_OK: u8 = 0;
/// Exit code: a run failed, or a check found a difference.
const EXIT_FAILED: u8 = 1;
/// Exit code: invalid configuration or usage.
const EXIT_INVALID: u8 = 2;
/// Exit code: internal error (I/O, a bug).
const EXIT_INTERNAL: u8 = 3;

#[derive(Parser)]
#[command(
    name = "nexus",
    version,
    about = "Nexus: one source of truth for your automation, one engine that runs it.",
    after_help = "Examples:\n  nexus run                           run the default pipeline in the default environment\n  nexus run deploy --env staging --param version=1.4.2\n  nexus runs                          list recent runs\n  nexus validate                      check config/ssot\n  nexus validate --config ops/ssot --env prod --output json\n  nexus schema --check                fail if schemas/ is stale\n  nexus init my-platform              write a commented starter set\n\nExit codes: 0 success, 1 run failed or check found a difference, 2 invalid configuration or usage, 3 internal error."
)]
struct Cli {
    /// Directory holding the five registry files.
    #[arg(long, global = true, default_value = "config/ssot", env = "NEXUS_CONFIG")]
    config: PathBuf,
    /// Output format of reading commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Directory of the state store (runs, logs).
    #[arg(long, global = true, default_value = ".nexus", env = "NEXUS_STATE")]
    state: PathBuf,
    /// Directory of plugin libraries (repeatable); searched before `NEXUS_PLUGIN_PATH`
    /// (colon-separated) and the orchestration registry's `plugins.dirs`.
    #[arg(long = "plugins", global = true, value_name = "DIR")]
    plugins: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Output {
    /// Human-readable text (colours on a terminal unless NO_COLOR is set).
    Text,
    /// One JSON document on stdout.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check the registries: schemas, references, DAGs, templates, cron, durations.
    #[command(
        after_help = "Examples:\n  nexus validate\n  nexus validate --config ops/ssot --env prod\n  nexus validate --output json | jq '.diagnostics[] | .message'\n\nExit codes: 0 valid, 2 invalid."
    )]
    Validate {
        /// Check as for this environment only (its variables must cover every template).
        #[arg(long)]
        env: Option<String>,
    },
    /// Write the JSON Schemas of the five registries (for editors and CI).
    #[command(
        after_help = "Examples:\n  nexus schema                 write schemas/*.schema.json\n  nexus schema --check         exit 1 if the committed schemas are stale"
    )]
    Schema {
        /// Directory the schema files are written to.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
        /// Do not write; exit 1 when a file differs from what would be written.
        #[arg(long)]
        check: bool,
    },
    /// Show the resolved plan of a pipeline: steps, commands, runners, timeouts.
    #[command(
        after_help = "Examples:\n  nexus plan\n  nexus plan deploy --env prod --param version=1.4.2\n  nexus plan deploy --env prod --param version=1.4.2 --save deploy.plan.json\n  nexus run --plan deploy.plan.json"
    )]
    Plan {
        /// Pipeline (default: `defaults.pipeline`).
        pipeline: Option<String>,
        /// Environment (default: `defaults.environment`).
        #[arg(long)]
        env: Option<String>,
        /// A pipeline parameter, `name=value` (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Also write the plan to FILE, to run it later with `nexus run --plan FILE`.
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// Print a pipeline's DAG in Graphviz DOT or Mermaid.
    #[command(
        after_help = "Examples:\n  nexus graph ci | dot -Tsvg > ci.svg\n  nexus graph deploy --format mermaid --param version=1.4.2"
    )]
    Graph {
        /// Pipeline (default: `defaults.pipeline`).
        pipeline: Option<String>,
        /// Environment (default: `defaults.environment`).
        #[arg(long)]
        env: Option<String>,
        /// A pipeline parameter, `name=value` (repeatable): a pipeline with required
        /// parameters is planned, and so drawn, with them.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// `dot` or `mermaid`.
        #[arg(long, default_value = "dot", value_parser = ["dot", "mermaid"])]
        format: String,
    },
    /// Run a pipeline, journaling every step in the state store.
    #[command(
        after_help = "Examples:\n  nexus run\n  nexus run deploy --env staging --param version=1.4.2\n  nexus run --plan deploy.plan.json\n\nCtrl-C once cancels gracefully (running steps get SIGTERM, then SIGKILL after their grace period); twice kills them.\nExit codes: 0 succeeded, 1 failed or cancelled, 2 invalid configuration or usage, 3 internal error."
    )]
    Run {
        /// Pipeline (default: `defaults.pipeline`).
        pipeline: Option<String>,
        /// Environment (default: `defaults.environment`).
        #[arg(long)]
        env: Option<String>,
        /// A pipeline parameter, `name=value` (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Run a plan saved by `nexus plan --save` (refused if the registries changed).
        #[arg(long, conflicts_with_all = ["pipeline", "env", "params"])]
        plan: Option<PathBuf>,
    },
    /// Continue a run whose process died; finished steps are not run again.
    #[command(
        after_help = "Examples:\n  nexus resume 20261128-071502-4f2a\n  nexus resume 20261128-071502-4f2a --rerun-interrupted"
    )]
    Resume {
        /// The run.
        run: String,
        /// Run again the steps that were running when the process died.
        #[arg(long, conflicts_with = "skip_interrupted")]
        rerun_interrupted: bool,
        /// Treat the steps that were running when the process died as skipped.
        #[arg(long)]
        skip_interrupted: bool,
    },
    /// Start a new run of a run's plan from STEP, reusing the outputs of everything upstream.
    #[command(after_help = "Examples:\n  nexus retry 20261128-071502-4f2a --from package")]
    Retry {
        /// The run to retry.
        run: String,
        /// The step to start from.
        #[arg(long)]
        from: String,
    },
    /// Ask a running run to stop (from any terminal).
    Cancel {
        /// The run.
        run: String,
    },
    /// Run the rollback actions of a finished run's succeeded steps, latest first.
    Rollback {
        /// The run.
        run: String,
    },
    /// Approve (or reject) an approval step of a running run.
    #[command(
        after_help = "Examples:\n  nexus approve 20261128-071502-4f2a approve\n  nexus approve 20261128-071502-4f2a approve --reject --comment 'not during the sale'"
    )]
    Approve {
        /// The run.
        run: String,
        /// The approval step.
        step: String,
        /// Reject instead of approving.
        #[arg(long)]
        reject: bool,
        /// A comment recorded with the decision.
        #[arg(long)]
        comment: Option<String>,
    },
    /// List runs, newest first.
    #[command(
        after_help = "Examples:\n  nexus runs\n  nexus runs --pipeline deploy --status failed --limit 5 --output json"
    )]
    Runs {
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only this status (queued, running, succeeded, failed, cancelled, skipped).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show a run: steps, attempts, events.
    Show {
        /// The run.
        run: String,
    },
    /// Print the logs of a run, or of one of its steps.
    #[command(
        after_help = "Examples:\n  nexus logs 20261128-071502-4f2a\n  nexus logs 20261128-071502-4f2a test --follow"
    )]
    Logs {
        /// The run.
        run: String,
        /// Only this step (all its matrix instances and attempts).
        step: Option<String>,
        /// Keep printing new lines until the run ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// List the plugin libraries loaded (file, kinds, ABI and SDK versions) and why any
    /// was refused.
    #[command(
        after_help = "Examples:\n  nexus plugins --plugins target/release\n  NEXUS_PLUGIN_PATH=/opt/nexus/plugins nexus plugins --output json\n\nExit codes: 0 all loaded, 2 a library was refused or a kind clashes."
    )]
    Plugins,
    /// Notification channels.
    #[command(subcommand)]
    Notify(NotifyCommand),
    /// Write a small, valid, commented starter set of the five registries.
    #[command(
        after_help = "Examples:\n  nexus init                   write config/ssot/\n  nexus init ops/ssot\n  nexus validate --config ops/ssot"
    )]
    Init {
        /// Directory to create (default: the `--config` directory).
        dir: Option<PathBuf>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `nexus notify …`.
#[derive(Subcommand)]
enum NotifyCommand {
    /// Send a test message to a channel and report the receipt or the exact error.
    #[command(
        after_help = "Examples:\n  nexus notify test ops-slack\n  nexus notify test oncall --env prod\n\nExit codes: 0 delivered, 1 not delivered, 2 invalid configuration."
    )]
    Test {
        /// The channel (a key of `channels` in monitoring_registry.yaml).
        channel: String,
        /// Environment whose secrets the channel's spec reads (default: `defaults.environment`).
        #[arg(long)]
        env: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    plugins::configure(&cli.plugins, &cli.config, matches!(cli.command, Command::Plugins));
    let code = match &cli.command {
        Command::Validate { env } => cmd_validate(&cli, env.clone()),
        Command::Schema { out, check } => cmd_schema(out, *check),
        Command::Plugins => plugins::cmd_plugins(cli.output),
        Command::Init { dir, force } => init::run(dir.as_deref().unwrap_or(&cli.config), *force),
        Command::Plan { pipeline, env, params, save } => {
            exec::cmd_plan(&cli.config, cli.output, pipeline.as_deref(), env.as_deref(), params, save.as_deref())
        }
        Command::Graph { pipeline, env, params, format } => {
            exec::cmd_graph(&cli.config, pipeline.as_deref(), env.as_deref(), params, format)
        }
        Command::Run { pipeline, env, params, plan } => exec::cmd_run(
            &cli.config,
            &cli.state,
            cli.output,
            exec::RunArgs { pipeline: pipeline.as_deref(), env: env.as_deref(), params, plan_file: plan.as_deref() },
        ),
        Command::Resume { run, rerun_interrupted, skip_interrupted } => {
            let policy = if *rerun_interrupted {
                nexus_core::engine::InterruptedPolicy::Rerun
            } else if *skip_interrupted {
                nexus_core::engine::InterruptedPolicy::Skip
            } else {
                nexus_core::engine::InterruptedPolicy::Ask
            };
            exec::cmd_resume(&cli.config, &cli.state, cli.output, run, policy)
        }
        Command::Retry { run, from } => exec::cmd_retry(&cli.config, &cli.state, cli.output, run, from),
        Command::Cancel { run } => inspect::cmd_cancel(&cli.state, run),
        Command::Rollback { run } => exec::cmd_rollback(&cli.config, &cli.state, run),
        Command::Approve { run, step, reject, comment } => {
            inspect::cmd_approve(&cli.state, run, step, *reject, comment.clone())
        }
        Command::Runs { pipeline, status, limit } => {
            inspect::cmd_runs(&cli.state, cli.output, pipeline.clone(), status.clone(), *limit)
        }
        Command::Notify(NotifyCommand::Test { channel, env }) => notify::cmd_test(&cli.config, channel, env.as_deref()),
        Command::Show { run } => inspect::cmd_show(&cli.state, cli.output, run),
        Command::Logs { run, step, follow } => inspect::cmd_logs(&cli.state, cli.output, run, step.as_deref(), *follow),
    };
    ExitCode::from(code)
}

fn cmd_validate(cli: &Cli, env: Option<String>) -> u8 {
    let catalog = match catalog::build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let started = std::time::Instant::now();
    let validated = validate_dir(&cli.config, &catalog, &Options { env });
    let elapsed = started.elapsed();
    let report = &validated.report;
    match cli.output {
        Output::Json => {
            let doc = serde_json::json!({
                "valid": !report.has_errors(),
                "config": cli.config,
                "errors": report.error_count(),
                "diagnostics": report.diagnostics,
            });
            outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Output::Text => {
            render::diagnostics(report, &validated.sources);
            match &validated.ssot {
                Some(ssot) => outln!(
                    "{} is valid: {} automations, {} pipelines, {} environments, {} runners, {} services, {} channels ({} ms)",
                    cli.config.display(),
                    ssot.automations.automations.len(),
                    ssot.pipelines.pipelines.len(),
                    ssot.orchestration.environments.len(),
                    ssot.orchestration.runners.len(),
                    ssot.monitoring.services.len(),
                    ssot.monitoring.channels.len(),
                    elapsed.as_millis()
                ),
                None => eprintln!(
                    "{} is invalid: {} error{}",
                    cli.config.display(),
                    report.error_count(),
                    if report.error_count() == 1 { "" } else { "s" }
                ),
            }
        }
    }
    if report.has_errors() { EXIT_INVALID } else { EXIT_OK }
}

fn cmd_schema(out: &Path, check: bool) -> u8 {
    let catalog = match catalog::build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let files = schema_files(&catalog);
    if check {
        let stale: Vec<String> = files
            .iter()
            .filter(|(name, text)| std::fs::read_to_string(out.join(name)).ok().as_deref() != Some(text.as_str()))
            .map(|(name, _)| out.join(name).display().to_string())
            .collect();
        if stale.is_empty() {
            outln!("{} schemas in {} are up to date", files.len(), out.display());
            return EXIT_OK;
        }
        for file in &stale {
            eprintln!("stale or missing: {file}");
        }
        eprintln!("run `nexus schema --out {}` and commit the result", out.display());
        return EXIT_FAILED;
    }
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!("error: cannot create {}: {e}", out.display());
        return EXIT_INTERNAL;
    }
    for (name, text) in &files {
        let path = out.join(name);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return EXIT_INTERNAL;
        }
        outln!("wrote {}", path.display());
    }
    EXIT_OK
}

/// Whether to draw colours and graphics on stderr.
fn fancy_stderr() -> bool {
    std::io::stderr().is_terminal()
}
