//! The schema of the SQLite state store and its versioned migrations.
//!
//! The schema version is `PRAGMA user_version` (a field of the database header, written
//! in the same transaction as the migration that sets it). `PRAGMA application_id` marks
//! the file as a Nexus store, so a `--state` directory that holds another program's
//! SQLite file is refused instead of being altered.
//!
//! Rules for adding a migration: append to [`MIGRATIONS`], never edit or reorder an
//! existing entry (stores in the field have already applied it), and keep each entry
//! plain DDL/DML that runs inside a transaction (no `VACUUM`, no `PRAGMA journal_mode`).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::Fail;
use crate::error::ErrorKind;

/// `PRAGMA application_id` of a Nexus state store ("NXS1").
pub(super) const APPLICATION_ID: i32 = 0x4e58_5331;

/// The ordered migrations: entry `i` brings the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4];

/// The schema version this build of Nexus writes (the number of migrations).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 1: runs, steps, attempts, events, approvals, lock leases.
///
/// Timestamps are milliseconds since the Unix epoch (UTC); statuses are the kebab-case
/// names of the Rust enums (`waiting-approval`), the same as in JSON output.
const V1: &str = r#"
CREATE TABLE runs (
    id                TEXT    NOT NULL PRIMARY KEY,
    pipeline          TEXT    NOT NULL,
    environment       TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    plan_json         TEXT    NOT NULL,
    config_digest     TEXT    NOT NULL,
    concurrency_group TEXT,
    parent_run        TEXT,   -- not a foreign key: a parent may be pruned before its retries
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    owner_host        TEXT,
    owner_pid         INTEGER,
    heartbeat_at      INTEGER,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    error             TEXT
);
-- `nexus runs` (newest first, optionally by pipeline or status); the implicit rowid
-- in each index breaks ties between runs created in the same millisecond.
CREATE INDEX runs_by_created ON runs (created_at);
CREATE INDEX runs_by_pipeline ON runs (pipeline, created_at);
CREATE INDEX runs_by_status ON runs (status, created_at);
-- The queue of a concurrency group.
CREATE INDEX runs_by_group ON runs (concurrency_group, status, created_at)
    WHERE concurrency_group IS NOT NULL;

CREATE TABLE steps (
    seq          INTEGER NOT NULL PRIMARY KEY,  -- rowid: the order steps were first recorded
    run_id       TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id      TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    started_at   INTEGER,
    finished_at  INTEGER,
    outputs_json TEXT    NOT NULL DEFAULT '{}',
    error        TEXT,
    UNIQUE (run_id, step_id)
);

CREATE TABLE attempts (
    seq         INTEGER NOT NULL PRIMARY KEY,   -- rowid: start order
    run_id      TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    number      INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    exit_code   INTEGER,
    signal      INTEGER,
    log_path    TEXT    NOT NULL,
    error       TEXT,
    UNIQUE (run_id, step_id, kind, number)
);
-- `interrupt_running` looks for the running attempts of a run.
CREATE INDEX attempts_running ON attempts (run_id) WHERE status = 'running';

CREATE TABLE events (
    run_id  TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    step_id TEXT,
    message TEXT    NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

-- One row per approval step: the last decision wins.
CREATE TABLE approvals (
    run_id   TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id  TEXT    NOT NULL,
    approved INTEGER NOT NULL,
    by_user  TEXT    NOT NULL,
    at       INTEGER NOT NULL,
    comment  TEXT,
    PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;

CREATE TABLE leases (
    lock_name   TEXT    NOT NULL,
    run_id      TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id     TEXT    NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (lock_name, run_id, step_id)
) WITHOUT ROWID;
CREATE INDEX leases_by_run ON leases (run_id);
"#;

/// Reads `(application_id, user_version)`.
fn header(conn: &Connection) -> rusqlite::Result<(i32, u32)> {
    let app: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok((app, version))
}

/// Refuses a file that is not a Nexus store, or one written by a newer Nexus.
fn check(path: &Path, app: i32, version: u32, latest: u32) -> Result<(), Fail> {
    if app != 0 && app != APPLICATION_ID {
        return Err(Fail::domain(
            ErrorKind::InvalidConfig,
            format!(
                "`{}` is a SQLite database of another program (application_id {app:#x}), not a Nexus state \
                 store; point --state at another directory",
                path.display()
            ),
        ));
    }
    if version > latest {
        return Err(Fail::domain(
            ErrorKind::Unsupported,
            format!(
                "`{}` has schema version {version}, written by a newer Nexus; this Nexus knows schema versions up \
                 to {latest}: upgrade nexus, or use another --state directory",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Brings the store to [`SCHEMA_VERSION`].
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), Fail> {
    migrate_to(conn, path, SCHEMA_VERSION)
}

/// Brings the store to version `target` (tests stop short of the latest).
///
/// The version is read first without a write lock, so opening an up-to-date store never
/// waits for a writer; otherwise the missing migrations are applied in one `IMMEDIATE`
/// transaction that re-reads the version, so two processes opening an old store at once
/// migrate it exactly once.
pub(super) fn migrate_to(conn: &mut Connection, path: &Path, target: u32) -> Result<(), Fail> {
    let (app, version) = header(conn)?;
    check(path, app, version, SCHEMA_VERSION)?;
    if version >= target {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (app, version) = header(&tx)?;
    check(path, app, version, SCHEMA_VERSION)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().take(target as usize).skip(version as usize) {
        let to = index as u32 + 1;
        tx.execute_batch(sql).map_err(|e| {
            Fail::domain(
                ErrorKind::Internal,
                format!("migrating `{}` from schema version {index} to {to} failed: {e}", path.display()),
            )
        })?;
        tx.pragma_update(None, "user_version", to)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()?;
    Ok(())
}

/// Version 2: notification deliveries (one row per event, route and channel). `run_id`
/// is not a foreign key: health events have no run.
const V2: &str = r#"
CREATE TABLE deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT,
    route        TEXT    NOT NULL,
    channel      TEXT    NOT NULL,
    event_kind   TEXT    NOT NULL,
    pipeline     TEXT,
    environment  TEXT,
    fingerprint  TEXT    NOT NULL,
    dedup_key    TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    receipt      TEXT,
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER
);
CREATE INDEX deliveries_by_run ON deliveries (run_id, id);
CREATE INDEX deliveries_by_channel ON deliveries (channel, created_at);
"#;

/// Version 3: the targets of an attempt (each host of an SSH group), each recorded as
/// its own attempt with its own log.
const V3: &str = r#"
CREATE TABLE attempt_targets (
    run_id       TEXT    NOT NULL REFERENCES runs (id),
    step_id      TEXT    NOT NULL,
    number       INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    skipped      INTEGER NOT NULL DEFAULT 0,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    exit_code    INTEGER,
    signal       INTEGER,
    log_path     TEXT    NOT NULL,
    error        TEXT,
    PRIMARY KEY (run_id, step_id, kind, number, target)
);
"#;

/// Version 4: no partial index of running attempts. Every attempt's start and end had
/// to update it (a page more in each scheduler pass's commit) for `interrupt_running`,
/// which runs once per `resume` and finds a run's attempts by the unique index anyway.
const V4: &str = r#"
DROP INDEX attempts_running;
"#;
