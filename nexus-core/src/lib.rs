//! Nexus core: the model of the five registries, their loading and validation, the
//! extension traits and the catalog of component kinds.

pub mod catalog;
pub mod error;
pub mod model;
pub mod outputs;
pub mod plan;
pub mod suggest;
pub mod traits;
pub mod yaml;

pub use catalog::{Catalog, ComponentKind, Family, KindDescriptor, SpecIssue};
pub use error::{Error, ErrorKind, Result};
pub use model::Ssot;
pub mod diag;
pub mod engine;
pub mod lines;
pub mod load;
pub mod notify;
pub mod schema;
pub mod secrets;
pub mod spec;
pub mod state;
pub mod validate;

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else
/// `localhost`): the owner of the runs this process runs, and the default source of
/// what it reports.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
