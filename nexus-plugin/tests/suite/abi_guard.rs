//! The ABI guard: a fingerprint of `src/abi.rs` (its code without comments or white
//! space, so formatting does not count) and of the sizes and offsets of its `#[repr(C)]`
//! types (`abi::describe`), recorded per ABI version. Any change to the ABI definition
//! fails this test until `abi::ABI_VERSION` is bumped and the new fingerprint is
//! recorded below for the new version (never edit an old line).

use sha2::{Digest, Sha256};

/// `(ABI version, fingerprint)`, one line per version ever released.
const FINGERPRINTS: &[(u32, &str)] = &[
    // 1: the first ABI.
    (1, "e81eff7100344da2fdc01f3d043cee40397081bbb63946c93cf81b8805c108f4"),
];

fn fingerprint() -> String {
    let source = include_str!("../../src/abi.rs");
    let code: String = source
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code).trim())
        .flat_map(str::chars)
        .filter(|c| !c.is_whitespace())
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(code.as_bytes());
    hasher.update(nexus_plugin::abi::describe().as_bytes());
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn abi_changes_come_with_a_version_bump() {
    let version = nexus_plugin::abi::ABI_VERSION;
    let now = fingerprint();
    match FINGERPRINTS.iter().find(|(v, _)| *v == version) {
        Some((_, recorded)) => assert_eq!(
            *recorded,
            now,
            "the plugin ABI (nexus-plugin/src/abi.rs) changed but ABI_VERSION is still {version}: bump ABI_VERSION to {} and add `({}, \"{now}\")` to FINGERPRINTS; if only a comment changed, this test would not fail",
            version + 1,
            version + 1
        ),
        None => {
            panic!("ABI version {version} has no recorded fingerprint: add `({version}, \"{now}\")` to FINGERPRINTS")
        }
    }
    let mut versions: Vec<u32> = FINGERPRINTS.iter().map(|(v, _)| *v).collect();
    versions.dedup();
    assert_eq!(versions.len(), FINGERPRINTS.len(), "one fingerprint per version");
}
