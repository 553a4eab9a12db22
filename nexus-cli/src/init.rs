//! `nexus init`: a small, valid, commented starter set of the five registries.

use std::path::Path;

use nexus_core::load::RegistryKind;

/// The starter files, embedded in the binary.
pub const STARTER: [(RegistryKind, &str); 5] = [
    (RegistryKind::Automation, include_str!("../templates/init/automation_registry.yaml")),
    (RegistryKind::Pipeline, include_str!("../templates/init/pipeline_registry.yaml")),
    (RegistryKind::Orchestration, include_str!("../templates/init/orchestration_registry.yaml")),
    (RegistryKind::Monitoring, include_str!("../templates/init/monitoring_registry.yaml")),
    (RegistryKind::Security, include_str!("../templates/init/security_registry.yaml")),
];

/// Writes the starter set into `dir`; refuses to overwrite unless `force`.
pub fn run(dir: &Path, force: bool) -> u8 {
    if !force {
        let existing: Vec<String> = STARTER
            .iter()
            .map(|(kind, _)| dir.join(kind.file_name()))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            eprintln!("error: refusing to overwrite {}; pass --force to replace them", existing.join(", "));
            return crate::EXIT_INVALID;
        }
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return crate::EXIT_INTERNAL;
    }
    for (kind, text) in STARTER {
        let path = dir.join(kind.file_name());
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return crate::EXIT_INTERNAL;
        }
        outln!("wrote {}", path.display());
    }
    outln!("next: nexus validate --config {}", dir.display());
    crate::EXIT_OK
}
