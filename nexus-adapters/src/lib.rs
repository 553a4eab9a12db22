//! The service and monitor adapter kinds of Nexus, each behind a feature of the same
//! name (all on by default). A new kind is a new crate plus one line in [`register`].

use nexus_core::{Catalog, Result};

/// Registers every service and monitor kind whose feature is on.
pub fn register(catalog: &mut Catalog) -> Result<()> {
    let _ = &catalog; // with every feature off, no line below uses it
    #[cfg(feature = "http")]
    nexus_adapter_http::register_http_service(catalog)?;
    #[cfg(feature = "postgres")]
    nexus_adapter_postgres::register_postgres_service(catalog)?;
    #[cfg(feature = "redis")]
    nexus_adapter_redis::register_redis_service(catalog)?;
    #[cfg(feature = "s3")]
    nexus_adapter_s3::register_s3_service(catalog)?;
    #[cfg(feature = "prometheus")]
    nexus_monitor_prometheus::register_prometheus_monitor(catalog)?;
    Ok(())
}

#[cfg(all(test, feature = "http", feature = "postgres", feature = "redis", feature = "s3", feature = "prometheus"))]
mod tests {
    use super::*;

    #[test]
    fn registers_every_kind_with_a_valid_example() {
        let mut catalog = Catalog::new();
        register(&mut catalog).unwrap();
        assert_eq!(catalog.services.names().collect::<Vec<_>>(), ["http", "postgres", "redis", "s3"]);
        assert_eq!(catalog.monitors.names().collect::<Vec<_>>(), ["prometheus"]);
        for kind in catalog.services.iter() {
            assert!(kind.validate(&kind.example).is_empty(), "the example of `{}` is invalid", kind.kind);
        }
        for kind in catalog.monitors.iter() {
            assert!(kind.validate(&kind.example).is_empty(), "the example of `{}` is invalid", kind.kind);
        }
        assert!(register(&mut catalog).is_err(), "a second registration must clash");
    }
}
