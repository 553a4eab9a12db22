//! The runners facade: each runner kind is its own crate (`nexus-runner-<kind>`),
//! turned on by the Cargo feature of the same name (all of them by default).
//!
//! [`register`] puts every enabled kind into a [`Catalog`]. Adding a runner kind means
//! a new crate, a feature in `Cargo.toml`, and one line here.

use nexus_core::{Catalog, Result};

/// Registers every runner kind enabled by this crate's features into `catalog`.
///
/// Fails only if a kind of the same name is already registered.
pub fn register(catalog: &mut Catalog) -> Result<()> {
    #[cfg(feature = "local")]
    nexus_runner_local::register_local_runner(catalog)?;
    #[cfg(feature = "docker")]
    nexus_runner_docker::register_docker_runner(catalog)?;
    #[cfg(feature = "kubernetes")]
    nexus_runner_kubernetes::register_kubernetes_runner(catalog)?;
    #[cfg(feature = "ssh")]
    nexus_runner_ssh::register_ssh_runner(catalog)?;
    let _ = &catalog; // keeps a build with no runner feature free of warnings
    Ok(())
}

#[cfg(all(test, feature = "local", feature = "docker", feature = "kubernetes", feature = "ssh"))]
mod tests {
    use super::*;

    #[test]
    fn registers_every_default_kind_once() {
        let mut catalog = Catalog::new();
        register(&mut catalog).unwrap();
        assert_eq!(catalog.runners.names().collect::<Vec<_>>(), ["docker", "kubernetes", "local", "ssh"]);
        for descriptor in catalog.runners.iter() {
            assert!(descriptor.validate(&descriptor.example).is_empty(), "{}", descriptor.kind);
        }
        let again = register(&mut catalog).unwrap_err();
        assert_eq!(again.kind(), nexus_core::ErrorKind::Conflict);
    }
}
