//! Builds the fixture plugin (`nexus-plugin/fixtures/fixture`) as a real `cdylib`, in
//! variants made by its cargo features, and returns the path of each library.
//!
//! Builds go to `target/plugin-fixtures/` (a target directory of their own, so a build
//! started from a running test never waits for the lock of the `cargo test` that runs
//! it); each variant is copied to `target/plugin-fixtures/variants/<variant>/` under a
//! name of its own (written beside and renamed, so a library another test process has
//! loaded is never overwritten in place). A file lock serializes the builds of
//! concurrent test processes. The real `panic = "abort"` build uses
//! `target/plugin-fixtures-abort/`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    loop {
        let manifest = dir.join("Cargo.toml");
        if std::fs::read_to_string(&manifest).is_ok_and(|t| t.contains("[workspace]")) {
            return dir;
        }
        assert!(dir.pop(), "no workspace above {}", env!("CARGO_MANIFEST_DIR"));
    }
}

/// The fixture library of `variant`: `plain` (the real plugin), a feature of the fixture
/// crate (`bad-abi`, `bad-magic`, `bad-sdk`, `claims-abort`, `not-a-plugin`), or
/// `panic-abort` (the plain plugin really built with `panic = "abort"`), or `release`
/// (the plain plugin, optimized: for the benchmark).
pub fn library(variant: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(variant) {
        return path.clone();
    }
    let root = workspace_root();
    let base = root.join("target");
    std::fs::create_dir_all(&base).unwrap();
    let lock = std::fs::File::create(base.join("plugin-fixtures.lock")).unwrap();
    lock.lock().unwrap();
    let target_dir =
        if variant == "panic-abort" { base.join("plugin-fixtures-abort") } else { base.join("plugin-fixtures") };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", "nexus-plugin-fixture", "--lib", "--target-dir"])
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // No debug info: the libraries stay small (they are copied into many temporary
        // plugin directories) and the builds fast.
        .args(["--config", "profile.dev.debug=0", "--config", "profile.release.debug=0"]);
    match variant {
        "plain" => {}
        "release" => {
            cmd.arg("--release");
        }
        "panic-abort" => {
            cmd.args(["--config", "profile.dev.panic=\"abort\""]);
        }
        feature => {
            cmd.args(["--features", feature]);
        }
    }
    let status = cmd.status().expect("cannot run cargo to build the fixture plugin");
    assert!(status.success(), "building the fixture plugin ({variant}) failed");
    let file = format!("libnexus_plugin_fixture.{}", std::env::consts::DLL_EXTENSION);
    let built_lib = target_dir.join(if variant == "release" { "release" } else { "debug" }).join(&file);
    let out_dir = base.join("plugin-fixtures").join("variants").join(variant);
    std::fs::create_dir_all(&out_dir).unwrap();
    let name = format!("libfixture_{}.{}", variant.replace('-', "_"), std::env::consts::DLL_EXTENSION);
    let dest = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::copy(&built_lib, &tmp).unwrap();
    std::fs::rename(&tmp, &dest).unwrap();
    drop(lock);
    built.get_or_insert_with(HashMap::new).insert(variant.to_owned(), dest.clone());
    dest
}

/// A fresh directory holding only the library of `variant` (as a plugin directory).
pub fn plugin_dir(variant: &str) -> (tempfile::TempDir, PathBuf) {
    let lib = library(variant);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join(lib.file_name().unwrap());
    std::fs::copy(&lib, &dest).unwrap();
    (dir, dest)
}

/// A catalog holding the kinds of the fixture built as `variant` (asserting that they
/// register without clashes).
pub fn catalog(variant: &str) -> nexus_core::Catalog {
    let plugin = nexus_plugin::load_library(&library(variant)).expect("the fixture loads");
    let mut catalog = nexus_core::Catalog::new();
    let errors = plugin.register(&mut catalog);
    assert!(errors.is_empty(), "{errors:?}");
    catalog
}
