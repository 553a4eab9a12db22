//! The catalog of this `nexus` build: every statically linked kind.

use nexus_core::{Catalog, Result};

/// The catalog with the kinds compiled into this binary.
pub fn build() -> Result<Catalog> {
    let catalog = Catalog::new();
    Ok(catalog)
}
