//! `nexus notify test CHANNEL`: one test message, and the receipt or the exact error.

use std::path::Path;

use crate::{EXIT_FAILED, EXIT_INVALID, EXIT_OK, exec};

/// Sends a test message to `channel`; exit 0 with the receipt, 1 with the error.
pub fn cmd_test(config: &Path, channel: &str, env: Option<&str>) -> u8 {
    let loaded = match exec::load(config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let Some(kind) = loaded.ssot.monitoring.channels.get(channel).map(|c| c.kind.clone()) else {
        eprintln!("error: {}", nexus_core::notify::unknown_channel(&loaded.ssot, channel));
        return EXIT_INVALID;
    };
    let result = exec::runtime().block_on(nexus_core::notify::send_test(&loaded.ssot, &loaded.catalog, channel, env));
    match result {
        Ok(receipt) => {
            let mut line = format!("sent a test message to `{channel}` ({kind})");
            if let Some(id) = &receipt.message_id {
                line.push_str(&format!("; message id: {id}"));
            }
            if let Some(key) = &receipt.dedup_key {
                line.push_str(&format!("; dedup key: {key}"));
            }
            outln!("{line}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: the test message to `{channel}` was not delivered: {e}");
            EXIT_FAILED
        }
    }
}
