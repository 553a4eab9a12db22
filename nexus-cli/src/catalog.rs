//! The catalog of this `nexus` build: every statically linked kind. Which kinds are
//! compiled in is decided by the facades' cargo features.

use nexus_core::{Catalog, Result};

/// The catalog with the kinds compiled into this binary.
pub fn build() -> Result<Catalog> {
    let mut catalog = Catalog::new();
    nexus_runners::register(&mut catalog)?;
    nexus_adapters::register(&mut catalog)?;
    nexus_notify::register(&mut catalog)?;
    Ok(catalog)
}
