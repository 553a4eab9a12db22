//! The catalog of this `nexus` build: every statically linked kind. Which kinds are
//! compiled in is decided by the facades' cargo features; plugin libraries found at run
//! time are registered after them (`plugins.rs`).

use nexus_core::{Catalog, Result};

/// The catalog with the kinds compiled into this binary.
pub fn build() -> Result<Catalog> {
    let mut catalog = Catalog::new();
    nexus_runners::register(&mut catalog)?;
    nexus_adapters::register(&mut catalog)?;
    nexus_notify::register(&mut catalog)?;
    // The example plugin crate, linked statically (`--features example-plugin`).
    #[cfg(feature = "example-plugin")]
    nexus_notify_ntfy::register(&mut catalog)?;
    // Plugin libraries last, so a clash names the built-in kind's origin too.
    crate::plugins::register(&mut catalog)?;
    Ok(catalog)
}
