//! A run's scratch directory (`Task::scratch_dir`): `<state>/tmp/<run>.<pid>/`, private
//! (0700), created when the run starts in this process and removed when it ends here.
//! A `nexus` killed with SIGKILL cannot remove its own; the next process that runs the
//! run (`nexus resume`) removes those of dead processes when it creates its own, so
//! nothing is left in the system's temporary directory and nothing outlives the run's
//! state.

use std::path::{Path, PathBuf};

/// This process's scratch directory for one run; removed (with its content) on drop.
#[derive(Debug)]
pub(super) struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates this process's scratch directory for `run_id`, after removing those of
    /// the run's earlier processes that are gone. `None` if it cannot be created: runners
    /// then use a temporary directory of their own, as for a task built outside the engine.
    pub(super) fn create(state_dir: &Path, run_id: &str) -> Option<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        // Absolute: the step's process runs in its own working directory.
        let parent = std::path::absolute(state_dir.join("tmp")).ok()?;
        remove_leftovers(&parent, run_id);
        std::fs::create_dir_all(&parent).ok()?;
        let path = parent.join(format!("{run_id}.{}", std::process::id()));
        let create = || std::fs::DirBuilder::new().mode(0o700).create(&path);
        if let Err(e) = create() {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return None;
            }
            // Left by a dead process that had this pid: start afresh.
            let _ = std::fs::remove_dir_all(&path);
            create().ok()?;
        }
        Some(Scratch { path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the scratch directories of `run_id` in `parent` left by processes that are gone.
fn remove_leftovers(parent: &Path, run_id: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!("{run_id}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !super::pid_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_private_and_removed_with_its_content() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(state.path(), "r1").expect("created");
        let path = scratch.path().to_owned();
        let expected =
            std::fs::canonicalize(state.path()).unwrap().join("tmp").join(format!("r1.{}", std::process::id()));
        assert_eq!(path, expected);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(path.join("local-output-0"), "k=v\n").unwrap();
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn leftovers_of_dead_processes_go_and_those_of_live_ones_stay() {
        let state = tempfile::tempdir().unwrap();
        let tmp = state.path().join("tmp");
        // Pid 0 is never a process (no /proc/0); this process is alive.
        let dead = tmp.join("r1.0");
        let live = tmp.join(format!("r1.{}", std::process::id()));
        let other_run = tmp.join("r2.0");
        for dir in [&dead, &live, &other_run] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("local-output-0"), "k=v\n").unwrap();
        }
        remove_leftovers(&tmp, "r1");
        assert!(!dead.exists(), "a dead process's directory is removed");
        assert!(live.exists(), "a live process's directory is kept");
        assert!(other_run.exists(), "another run's directory is not touched");
    }
}
