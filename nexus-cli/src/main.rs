//! `nexus`: the command operators use. Every command is a thin layer over a library
//! call of `nexus-core`; this crate alone knows about terminals, exit codes and
//! `config/` paths (ARCHITECTURE.md).

mod catalog;
mod init;
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
    after_help = "Examples:\n  nexus validate                      check config/ssot\n  nexus validate --config ops/ssot --env prod --output json\n  nexus schema --check                fail if schemas/ is stale\n  nexus init my-platform              write a commented starter set\n\nExit codes: 0 success, 1 run failed or check found a difference, 2 invalid configuration or usage, 3 internal error."
)]
struct Cli {
    /// Directory holding the five registry files.
    #[arg(long, global = true, default_value = "config/ssot", env = "NEXUS_CONFIG")]
    config: PathBuf,
    /// Output format of reading commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Validate { env } => cmd_validate(&cli, env.clone()),
        Command::Schema { out, check } => cmd_schema(out, *check),
        Command::Init { dir, force } => init::run(dir.as_deref().unwrap_or(&cli.config), *force),
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
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Output::Text => {
            render::diagnostics(report, &validated.sources);
            match &validated.ssot {
                Some(ssot) => println!(
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
            println!("{} schemas in {} are up to date", files.len(), out.display());
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
        println!("wrote {}", path.display());
    }
    EXIT_OK
}

/// Whether to draw colours and graphics on stderr.
fn fancy_stderr() -> bool {
    std::io::stderr().is_terminal()
}
