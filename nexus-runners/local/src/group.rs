//! The process group of one attempt: signalling it, telling whether it still has live
//! members, and killing it if the attempt is abandoned.

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The process group an attempt runs in (its id is the main process's pid).
///
/// Dropping it while armed sends SIGKILL to the whole group, so an attempt whose future
/// is dropped (the engine gave up on it) leaves no process behind.
pub(crate) struct ProcessGroup {
    pgid: Pid,
    armed: bool,
}

impl ProcessGroup {
    /// The group led by `pid`.
    pub(crate) fn new(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok().filter(|p| *p > 1)?;
        Some(ProcessGroup { pgid: Pid::from_raw(pid), armed: true })
    }

    /// Sends `signal` to every member; false when the group no longer exists.
    pub(crate) fn signal(&self, signal: Signal) -> bool {
        !matches!(killpg(self.pgid, signal), Err(Errno::ESRCH))
    }

    /// Whether the group still exists (zombies included).
    fn exists(&self) -> bool {
        !matches!(killpg(self.pgid, None), Err(Errno::ESRCH))
    }

    /// Whether the group has a member that is still running (not a zombie).
    pub(crate) fn has_live_member(&self) -> bool {
        if !self.exists() {
            return false;
        }
        live_member_in_proc(self.pgid.as_raw()).unwrap_or(true)
    }

    /// Kills what may be left (zombies waiting for their new parent to reap them, or
    /// members `/proc` did not show) and disarms the drop guard.
    pub(crate) fn finish(mut self) {
        if self.exists() {
            self.signal(Signal::SIGKILL);
        }
        self.armed = false;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

/// On Linux, whether `/proc` shows a member of group `pgid` that is not a zombie;
/// `None` where `/proc` cannot tell.
#[cfg(target_os = "linux")]
fn live_member_in_proc(pgid: i32) -> Option<bool> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        // A process may exit while we look: a missing file just means it is gone.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp …`; `comm` may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
        if pgrp == Some(pgid) && !matches!(state, Some("Z" | "X" | "x")) {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(not(target_os = "linux"))]
fn live_member_in_proc(_pgid: i32) -> Option<bool> {
    None
}
