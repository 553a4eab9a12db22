//! Dynamic plugins for this `nexus` process: where they are looked for, loading them
//! (once; libraries are never unloaded), registering their kinds into the catalog, and
//! `nexus plugins`.
//!
//! Directories, in order: each `--plugins DIR`, then `NEXUS_PLUGIN_PATH`
//! (colon-separated), then `plugins.dirs` of the orchestration registry (relative to the
//! config directory).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nexus_core::{Catalog, Error, ErrorKind, Result};
use nexus_plugin::PluginSet;

use crate::{EXIT_INVALID, EXIT_OK, Output};

/// The environment variable holding plugin directories.
pub const PATH_VAR: &str = "NEXUS_PLUGIN_PATH";

/// Where this process looks for plugins, and whether it lists them (`nexus plugins`
/// reports refusals itself; other commands warn once).
struct Search {
    cli: Vec<PathBuf>,
    config: PathBuf,
    listing: bool,
}

static SEARCH: OnceLock<Search> = OnceLock::new();
static LOADED: OnceLock<PluginSet> = OnceLock::new();

/// Records where plugins are looked for; called once, before any catalog is built.
/// Nothing is read until a command needs the catalog.
pub fn configure(cli: &[PathBuf], config: &Path, listing: bool) {
    let _ = SEARCH.set(Search { cli: cli.to_vec(), config: config.to_owned(), listing });
}

/// `plugins.dirs` of the orchestration registry (main file and `.d/` fragments),
/// resolved against the config directory. Read leniently: a broken registry is reported
/// by validation, not here.
fn registry_dirs(config: &Path) -> Vec<PathBuf> {
    let (main, fragments) = nexus_core::load::registry_files(config, nexus_core::load::RegistryKind::Orchestration);
    let mut dirs = Vec::new();
    for file in std::iter::once(main).chain(fragments) {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let Ok((value, _)) = nexus_core::yaml::parse(&text) else { continue };
        if let Some(list) = value.pointer("/plugins/dirs").and_then(|v| v.as_array()) {
            dirs.extend(list.iter().filter_map(|d| d.as_str()).map(|d| config.join(d)));
        }
    }
    dirs
}

/// The plugins of this process, loaded on first use.
pub fn loaded() -> &'static PluginSet {
    LOADED.get_or_init(|| {
        let Some(search) = SEARCH.get() else { return nexus_plugin::load_dirs(&[]) };
        let env = std::env::var_os(PATH_VAR);
        let dirs = nexus_plugin::plugin_dirs(&search.cli, env.as_deref(), &registry_dirs(&search.config));
        let set = nexus_plugin::load_dirs(&dirs);
        if !search.listing {
            for refusal in &set.refused {
                eprintln!("warning: {}", refusal.error.message());
            }
        }
        set
    })
}

/// Registers the loaded plugins' kinds; a kind clashing with a built-in one or another
/// plugin's is an error naming both files.
pub fn register(catalog: &mut Catalog) -> Result<()> {
    let errors = loaded().register(catalog);
    if errors.is_empty() {
        return Ok(());
    }
    let messages: Vec<&str> = errors.iter().map(|e| e.message()).collect();
    Err(Error::new(ErrorKind::Conflict, messages.join("; ")).with_operation("plugins.register"))
}

/// `nexus plugins`: what is loaded (file, kinds, ABI and SDK versions) and why anything
/// was refused. Exit 2 when something was refused or clashes.
pub fn cmd_plugins(output: Output) -> u8 {
    let set = loaded();
    let clashes = match crate::catalog::build() {
        Ok(_) => Vec::new(),
        Err(e) => vec![e.message().to_owned()],
    };
    let failed = !set.refused.is_empty() || !clashes.is_empty();
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "host": {"abi_version": nexus_plugin::abi::ABI_VERSION, "sdk_version": nexus_plugin::abi::SDK_VERSION},
                "dirs": set.dirs,
                "plugins": set.plugins.iter().map(|p| serde_json::json!({
                    "file": p.path,
                    "name": p.name,
                    "version": p.version,
                    "abi_version": p.abi_version,
                    "sdk_version": p.sdk_version,
                    "kinds": p.kinds().map(|k| serde_json::json!({
                        "family": k.family.to_string(), "kind": k.name, "description": k.description,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "refused": set.refused.iter().map(|r| serde_json::json!({
                    "file": r.path, "reason": r.error.message(),
                })).collect::<Vec<_>>(),
                "clashes": clashes,
            });
            outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Output::Text => {
            outln!(
                "plugin ABI version {}, SDK (nexus-plugin) {}",
                nexus_plugin::abi::ABI_VERSION,
                nexus_plugin::abi::SDK_VERSION
            );
            if set.dirs.is_empty() {
                outln!(
                    "no plugin directory: pass `--plugins DIR`, set {PATH_VAR}, or list `plugins.dirs` in the orchestration registry"
                );
            } else {
                let dirs: Vec<String> = set
                    .dirs
                    .iter()
                    .map(|d| if d.exists() { d.display().to_string() } else { format!("{} (missing)", d.display()) })
                    .collect();
                outln!("searched: {}", dirs.join(", "));
            }
            for p in &set.plugins {
                outln!("\nloaded {} {} ({})", p.name, p.version, p.path.display());
                outln!("  ABI version {}, built with nexus-plugin {}", p.abi_version, p.sdk_version);
                for k in p.kinds() {
                    outln!("  {:<9} {:<24} {}", k.family.to_string(), k.name, k.description);
                }
            }
            for r in &set.refused {
                outln!("\nrefused {}", r.path.display());
                outln!("  {}", r.error.message());
            }
            for c in &clashes {
                outln!("\nclash: {c}");
            }
            if set.plugins.is_empty() && set.refused.is_empty() && !set.dirs.is_empty() {
                outln!("\nno plugin library (*.{}) found", nexus_plugin::host::LIBRARY_EXTENSION);
            }
        }
    }
    if failed { EXIT_INVALID } else { EXIT_OK }
}
