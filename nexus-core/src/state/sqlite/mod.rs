//! The embedded SQLite state store: one WAL-mode file, `state.db`, in the state
//! directory (`.nexus/` by default, `--state DIR` on the command line).
//!
//! Each [`SqliteStore`] owns one connection behind a mutex; every process opens its own
//! store, and SQLite's file locks arbitrate between processes. Every write is one short
//! `BEGIN IMMEDIATE` transaction: it takes the write lock up front, so concurrent writers
//! queue on the 5 s busy timeout instead of failing with `SQLITE_BUSY` halfway through a
//! transaction (a deferred transaction that reads and then writes cannot wait for the
//! lock, it can only fail). Readers never wait: WAL gives them a snapshot.
//!
//! Durability: `synchronous = NORMAL` in WAL mode does not fsync at each commit, only at
//! checkpoints. A committed transaction survives the death of the process (`kill -9`,
//! a panic, an OOM kill): it is in the WAL file, which the OS keeps. A power loss or a
//! kernel crash can lose the last transactions committed before it (never corrupt the
//! file). That is the trade-off taken: the journal is what lets a crashed *process*
//! resume, and `FULL` would cost an fsync for every step transition of every run.
//!
//! The schema and its migrations are in [`migrations`](self::migrations) (private);
//! [`SCHEMA_VERSION`] is the version this build writes.

mod migrations;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, ToSql, params};

pub use self::migrations::SCHEMA_VERSION;
use super::{
    ApprovalRecord, AttemptKind, AttemptRecord, AttemptStatus, DeliveryRecord, DeliveryStatus, EventRecord,
    LeaseHolder, NewEvent, Owner, RunFilter, RunRecord, RunStatus, Signals, StateStore, StepRecord, StepStatus,
    TargetRecord, Write, now_millis,
};
use crate::error::{Error, ErrorKind, Result};

/// The state directory used when none is given.
pub const DEFAULT_DIR: &str = ".nexus";
/// The database file inside the state directory.
pub const DB_FILE: &str = "state.db";
/// How long a write waits for another connection's write transaction.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded [`StateStore`]: one SQLite file in WAL mode.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// A failure inside a store operation, before the operation and context are attached.
#[derive(Debug)]
enum Fail {
    /// SQLite said no.
    Sql(rusqlite::Error),
    /// The store said no (a missing run, an impossible transition).
    Domain(ErrorKind, String),
}

impl Fail {
    fn domain(kind: ErrorKind, message: impl Into<String>) -> Self {
        Fail::Domain(kind, message.into())
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

type Res<T> = std::result::Result<T, Fail>;

/// Turns a SQLite error into a Nexus error (kind, message, source). The SQL text never
/// holds values (they are all bound parameters), and the store never receives secrets.
fn sql_error(e: rusqlite::Error) -> Error {
    use rusqlite::ffi;
    let (kind, message) = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => (
                ErrorKind::Unavailable,
                format!("the state store stayed locked by another writer for more than {BUSY_TIMEOUT:?}"),
            ),
            ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::NoLargeFileSupport => {
                (ErrorKind::Unavailable, "the state database cannot be read or written".into())
            }
            ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::AuthorizationForStatementDenied => {
                (ErrorKind::PermissionDenied, "the state database is not writable".into())
            }
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => (
                ErrorKind::Internal,
                "the state database is corrupt or not a SQLite file (move it away to start afresh)".into(),
            ),
            ErrorCode::ConstraintViolation if f.extended_code == ffi::SQLITE_CONSTRAINT_FOREIGNKEY => {
                (ErrorKind::NotFound, "no such run".into())
            }
            ErrorCode::ConstraintViolation
                if f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                (ErrorKind::Conflict, "already recorded".into())
            }
            _ => (ErrorKind::Internal, "unexpected state database error".into()),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => (
            ErrorKind::Internal,
            "unexpected data in the state database (corrupt, or written by a buggy version)".into(),
        ),
        _ => (ErrorKind::Internal, "unexpected state database error".into()),
    };
    Error::new(kind, message).with_source(e)
}

fn io_error(e: std::io::Error, message: String) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => ErrorKind::PermissionDenied,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, message).with_source(e)
}

// ---------------------------------------------------------------------------------------
// Enums as TEXT: the kebab-case serde names (a test checks they agree with serde).

macro_rules! text_enum {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            fn as_sql(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),* }
            }
            fn from_sql_str(s: &str) -> Option<Self> {
                match s { $($name => Some(<$ty>::$variant),)* _ => None }
            }
        }
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_sql()))
            }
        }
        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let s = value.as_str()?;
                <$ty>::from_sql_str(s).ok_or_else(|| {
                    FromSqlError::Other(format!("unknown {} `{s}`", stringify!($ty)).into())
                })
            }
        }
    };
}

text_enum!(RunStatus {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
    Skipped => "skipped",
});

text_enum!(StepStatus {
    Pending => "pending",
    Running => "running",
    WaitingApproval => "waiting-approval",
    Succeeded => "succeeded",
    Failed => "failed",
    Skipped => "skipped",
    Cancelled => "cancelled",
    Interrupted => "interrupted",
    RolledBack => "rolled-back",
});

text_enum!(AttemptStatus {
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    TimedOut => "timed-out",
    Cancelled => "cancelled",
    Interrupted => "interrupted",
});

text_enum!(DeliveryStatus {
    Sending => "sending",
    Sent => "sent",
    Failed => "failed",
    Suppressed => "suppressed",
});

text_enum!(AttemptKind {
    Main => "main",
    Rollback => "rollback",
});

/// The step statuses a main attempt may not start from (`is_final`), as SQL.
macro_rules! final_step_statuses {
    () => {
        "'succeeded','failed','skipped','cancelled','rolled-back'"
    };
}
#[cfg(test)]
const FINAL_STEP_STATUSES: &str = final_step_statuses!();

/// A main attempt starts: the step becomes `running` unless it is final already.
const STEP_RUNNING: &str = concat!(
    "INSERT INTO steps (run_id, step_id, status, attempts, started_at)
     VALUES (?1, ?2, 'running', ?3, ?4)
     ON CONFLICT (run_id, step_id) DO UPDATE SET
         status = 'running', attempts = MAX(attempts, excluded.attempts),
         started_at = COALESCE(started_at, excluded.started_at),
         finished_at = NULL, error = NULL
     WHERE steps.status NOT IN (",
    final_step_statuses!(),
    ")"
);

// ---------------------------------------------------------------------------------------
// Rows.

const RUN_COLS: &str = "id, pipeline, environment, status, plan_json, config_digest, concurrency_group, parent_run, \
                        created_at, started_at, finished_at, owner_host, owner_pid, heartbeat_at, cancel_requested, error";

fn run_row(r: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let host: Option<String> = r.get(11)?;
    let pid: Option<u32> = r.get(12)?;
    Ok(RunRecord {
        id: r.get(0)?,
        pipeline: r.get(1)?,
        environment: r.get(2)?,
        status: r.get(3)?,
        plan_json: r.get(4)?,
        config_digest: r.get(5)?,
        concurrency_group: r.get(6)?,
        parent_run: r.get(7)?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        owner: host.zip(pid).map(|(host, pid)| Owner { host, pid }),
        heartbeat_at: r.get(13)?,
        cancel_requested: r.get(14)?,
        error: r.get(15)?,
    })
}

const STEP_COLS: &str = "run_id, step_id, status, attempts, started_at, finished_at, outputs_json, error";

fn step_row(r: &Row<'_>) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        run_id: r.get(0)?,
        step_id: r.get(1)?,
        status: r.get(2)?,
        attempts: r.get(3)?,
        started_at: r.get(4)?,
        finished_at: r.get(5)?,
        outputs_json: r.get(6)?,
        error: r.get(7)?,
    })
}

const ATTEMPT_COLS: &str =
    "run_id, step_id, number, kind, status, started_at, finished_at, exit_code, signal, log_path, error";

fn attempt_row(r: &Row<'_>) -> rusqlite::Result<AttemptRecord> {
    Ok(AttemptRecord {
        run_id: r.get(0)?,
        step_id: r.get(1)?,
        number: r.get(2)?,
        kind: r.get(3)?,
        status: r.get(4)?,
        started_at: r.get(5)?,
        finished_at: r.get(6)?,
        exit_code: r.get(7)?,
        signal: r.get(8)?,
        log_path: r.get(9)?,
        error: r.get(10)?,
    })
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        run_id: r.get(0)?,
        seq: r.get(1)?,
        at: r.get(2)?,
        kind: r.get(3)?,
        step_id: r.get(4)?,
        message: r.get(5)?,
    })
}

fn approval_row(r: &Row<'_>) -> rusqlite::Result<ApprovalRecord> {
    Ok(ApprovalRecord {
        run_id: r.get(0)?,
        step_id: r.get(1)?,
        approved: r.get(2)?,
        by: r.get(3)?,
        at: r.get(4)?,
        comment: r.get(5)?,
    })
}

const TARGET_COLS: &str = "run_id, step_id, number, kind, target, status, skipped, started_at, finished_at, exit_code, \
                           signal, log_path, error";

fn target_row(r: &Row<'_>) -> rusqlite::Result<TargetRecord> {
    Ok(TargetRecord {
        run_id: r.get(0)?,
        step_id: r.get(1)?,
        number: r.get(2)?,
        kind: r.get(3)?,
        target: r.get(4)?,
        status: r.get(5)?,
        skipped: r.get(6)?,
        started_at: r.get(7)?,
        finished_at: r.get(8)?,
        exit_code: r.get(9)?,
        signal: r.get(10)?,
        log_path: r.get(11)?,
        error: r.get(12)?,
    })
}

const DELIVERY_COLS: &str = "id, run_id, route, channel, event_kind, pipeline, environment, fingerprint, dedup_key, \
                             status, attempts, error, receipt, created_at, finished_at";

fn delivery_row(r: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        id: r.get(0)?,
        run_id: r.get(1)?,
        route: r.get(2)?,
        channel: r.get(3)?,
        event_kind: r.get(4)?,
        pipeline: r.get(5)?,
        environment: r.get(6)?,
        fingerprint: r.get(7)?,
        dedup_key: r.get(8)?,
        status: r.get(9)?,
        attempts: r.get(10)?,
        error: r.get(11)?,
        receipt: r.get(12)?,
        created_at: r.get(13)?,
        finished_at: r.get(14)?,
    })
}

const APPROVALS_OF_RUN: &str =
    "SELECT run_id, step_id, approved, by_user, at, comment FROM approvals WHERE run_id = ?1 ORDER BY at, step_id";

fn approvals_of(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<ApprovalRecord>> {
    let mut stmt = conn.prepare_cached(APPROVALS_OF_RUN)?;
    stmt.query_map([run_id], approval_row)?.collect()
}

/// The status of a run, or `NotFound`.
fn run_status(conn: &Connection, run_id: &str) -> Res<RunStatus> {
    let mut stmt = conn.prepare_cached("SELECT status FROM runs WHERE id = ?1")?;
    stmt.query_row([run_id], |r| r.get(0)).optional()?.ok_or_else(no_such_run)
}

fn no_such_run() -> Fail {
    Fail::domain(ErrorKind::NotFound, "no such run")
}

/// After an update of a non-final run changed nothing: says why (missing, or finished).
fn explain_final(conn: &Connection, run_id: &str, what: &str) -> Fail {
    match run_status(conn, run_id) {
        Ok(status) => {
            Fail::domain(ErrorKind::Conflict, format!("cannot {what}: the run is already {}", status.as_sql()))
        }
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------

impl SqliteStore {
    /// Opens (creating them if needed) the state directory `dir` and its `state.db`,
    /// applies the missing migrations, and refuses a store written by a newer Nexus.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(DB_FILE);
        let fail = |e: Error| e.with_operation("state.open").with_context("path", path.display());
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(io_error(e, format!("cannot create the state directory `{}`", dir.display()))))?;
        let conn = Connection::open(&path).map_err(|e| fail(sql_error(e)))?;
        Self::init(conn, path.clone(), true).map_err(fail)
    }

    /// A private store in memory, gone when dropped (tests, dry runs).
    pub fn open_in_memory() -> Result<Self> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory()
            .map_err(|e| sql_error(e).with_operation("state.open").with_context("path", path.display()))?;
        Self::init(conn, path.clone(), false)
            .map_err(|e| e.with_operation("state.open").with_context("path", path.display()))
    }

    /// The database file (`:memory:` for [`open_in_memory`](Self::open_in_memory)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init(mut conn: Connection, path: PathBuf, wal: bool) -> Result<Self> {
        let to_error = |f: Fail| match f {
            Fail::Sql(e) => sql_error(e),
            Fail::Domain(kind, message) => Error::new(kind, message),
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_error)?;
        conn.set_prepared_statement_cache_capacity(64);
        // See the module documentation for the durability trade-off of NORMAL. Set
        // first: switching a new database to WAL then costs fewer fsyncs.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql_error)?;
        if wal {
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(sql_error)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the state database cannot use WAL mode (SQLite kept `{mode}`); put the state directory on \
                         a local file system"
                    ),
                ));
            }
        }
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sql_error)?;
        migrations::migrate(&mut conn, &path).map_err(to_error)?;
        Ok(SqliteStore { conn: Mutex::new(conn), path })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction, which rolled back: the
        // connection is usable.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, operation: &'static str, run: Option<&str>, fail: Fail) -> Error {
        let mut err = match fail {
            Fail::Sql(e) => sql_error(e),
            Fail::Domain(kind, message) => Error::new(kind, message),
        }
        .with_operation(operation);
        if let Some(run) = run {
            err = err.with_context("run", run);
        }
        err.with_context("path", self.path.display())
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction; rolls back on error.
    fn write<T>(&self, operation: &'static str, run: Option<&str>, f: impl FnOnce(&Connection) -> Res<T>) -> Result<T> {
        let conn = self.lock();
        let result = (|| {
            let tx = Immediate::begin(&conn)?;
            let value = f(&conn)?;
            tx.commit()?;
            Ok(value)
        })();
        result.map_err(|e| self.error(operation, run, e))
    }

    /// Runs `f` outside an explicit transaction (one statement reads one snapshot).
    fn read<T>(&self, operation: &'static str, run: Option<&str>, f: impl FnOnce(&Connection) -> Res<T>) -> Result<T> {
        let conn = self.lock();
        f(&conn).map_err(|e| self.error(operation, run, e))
    }

    /// Records a run's final or skip status (shared by `finish_run` and `set_run_status`).
    fn end_run(
        &self,
        operation: &'static str,
        run_id: &str,
        status: RunStatus,
        error: Option<&str>,
        set_error: bool,
    ) -> Result<()> {
        self.write(operation, Some(run_id), |tx| {
            let now = now_millis();
            let changed = tx
                .prepare_cached(
                    "UPDATE runs SET status = ?2,
                         finished_at = CASE WHEN ?3 THEN COALESCE(finished_at, ?4) ELSE finished_at END,
                         error = CASE WHEN ?5 THEN ?6 ELSE error END
                     WHERE id = ?1 AND status IN ('queued', 'running')",
                )?
                .execute(params![run_id, status, status.is_final(), now, set_error, error])?;
            if changed == 0 {
                // Finished already: the same status again is a harmless repeat.
                let current = run_status(tx, run_id)?;
                if current != status {
                    return Err(Fail::domain(
                        ErrorKind::Conflict,
                        format!("cannot mark the run {}: it is already {}", status.as_sql(), current.as_sql()),
                    ));
                }
            }
            Ok(())
        })
    }
}

/// An open `BEGIN IMMEDIATE` transaction, rolled back unless committed (also when a
/// panic unwinds through it). `BEGIN` and `COMMIT` are cached statements: rusqlite's
/// `Transaction` parses their text again at every write, a measurable share of a
/// scheduler pass.
struct Immediate<'c> {
    conn: &'c Connection,
    committed: bool,
}

impl<'c> Immediate<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(Immediate { conn, committed: false })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Immediate<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

impl StateStore for SqliteStore {
    /// Stores the record as given (the engine passes status `queued`).
    fn create_run(&self, run: &RunRecord) -> Result<()> {
        self.write("state.create_run", Some(&run.id), |tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO runs (id, pipeline, environment, status, plan_json, config_digest, concurrency_group,
                     parent_run, created_at, started_at, finished_at, owner_host, owner_pid, heartbeat_at,
                     cancel_requested, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            let inserted = stmt.execute(params![
                run.id,
                run.pipeline,
                run.environment,
                run.status,
                run.plan_json,
                run.config_digest,
                run.concurrency_group,
                run.parent_run,
                run.created_at,
                run.started_at,
                run.finished_at,
                run.owner.as_ref().map(|o| &o.host),
                run.owner.as_ref().map(|o| o.pid),
                run.heartbeat_at,
                run.cancel_requested,
                run.error,
            ]);
            match inserted {
                Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == ErrorCode::ConstraintViolation => {
                    Err(Fail::domain(ErrorKind::Conflict, "a run with this id already exists"))
                }
                other => other.map(drop).map_err(Fail::from),
            }
        })
    }

    /// Queued or running (a resumed run is re-claimed) → running; a finished run is a
    /// conflict.
    fn claim_run(&self, run_id: &str, owner: &Owner) -> Result<()> {
        self.write("state.claim_run", Some(run_id), |tx| {
            let now = now_millis();
            let changed = tx
                .prepare_cached(
                    "UPDATE runs SET status = 'running', owner_host = ?2, owner_pid = ?3, heartbeat_at = ?4,
                         started_at = COALESCE(started_at, ?4)
                     WHERE id = ?1 AND status IN ('queued', 'running')",
                )?
                .execute(params![run_id, owner.host, owner.pid, now])?;
            if changed == 0 {
                return Err(explain_final(tx, run_id, "claim the run"));
            }
            Ok(())
        })
    }

    fn heartbeat(&self, run_id: &str) -> Result<Signals> {
        self.write("state.heartbeat", Some(run_id), |tx| {
            let cancel_requested = tx
                .prepare_cached("UPDATE runs SET heartbeat_at = ?2 WHERE id = ?1 RETURNING cancel_requested")?
                .query_row(params![run_id, now_millis()], |r| r.get(0))
                .optional()?
                .ok_or_else(no_such_run)?;
            Ok(Signals { cancel_requested, approvals: approvals_of(tx, run_id)? })
        })
    }

    /// `status` must be final; finishing a finished run again with the same status is a
    /// no-op, with another status a conflict.
    fn finish_run(&self, run_id: &str, status: RunStatus, error: Option<&str>) -> Result<()> {
        if !status.is_final() {
            return Err(self.error(
                "state.finish_run",
                Some(run_id),
                Fail::domain(
                    ErrorKind::Internal,
                    format!("finish_run called with non-final status {}", status.as_sql()),
                ),
            ));
        }
        self.end_run("state.finish_run", run_id, status, error, true)
    }

    /// From queued or running only; a final status also sets `finished_at`.
    fn set_run_status(&self, run_id: &str, status: RunStatus) -> Result<()> {
        self.end_run("state.set_run_status", run_id, status, None, false)
    }

    /// All or nothing. `set_step_status` replaces the step's error; a final status sets
    /// `finished_at` (now), a non-final one clears it; outputs and attempt count are kept.
    /// `attempt_started` stores the attempt row `running` (whatever its status says); for
    /// a main attempt the step becomes `running`, its count the highest attempt number
    /// seen; a main attempt of a step that already reached a final status is a conflict
    /// (finished steps are never run again), and so is an attempt number recorded before.
    /// `attempt_finished`: only a `running` attempt can finish (repeating the same final
    /// status is a no-op); `finished_at` defaults to now.
    fn commit(&self, writes: &[Write]) -> Result<()> {
        let Some(first) = writes.first() else { return Ok(()) };
        let operation = if writes.len() == 1 { first.operation() } else { "state.commit" };
        self.write(operation, Some(first.run_id()), |tx| {
            for write in writes {
                match write {
                    Write::StepStatus { run_id, step_id, status, error } => {
                        step_status_tx(tx, run_id, step_id, *status, error.as_deref())?;
                    }
                    Write::AttemptStarted(a) => attempt_started_tx(tx, a)?,
                    Write::AttemptFinished(a) => attempt_finished_tx(tx, a)?,
                    Write::StepFinished { run_id, step_id, status, outputs_json, error } => {
                        step_finished_tx(tx, run_id, step_id, *status, outputs_json, error.as_deref())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Steps that are `running` between attempts (a retry's backoff) have no attempt in
    /// flight and are left alone; the returned ids follow attempt start order.
    fn interrupt_running(&self, run_id: &str) -> Result<Vec<String>> {
        self.write("state.interrupt_running", Some(run_id), |tx| {
            run_status(tx, run_id)?;
            let mut step_ids: Vec<String> = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT step_id FROM attempts WHERE run_id = ?1 AND status = 'running' ORDER BY seq",
                )?;
                for id in stmt.query_map([run_id], |r| r.get::<_, String>(0))? {
                    let id = id?;
                    if !step_ids.contains(&id) {
                        step_ids.push(id);
                    }
                }
            }
            tx.prepare_cached(
                "UPDATE steps SET status = 'interrupted'
                 WHERE run_id = ?1 AND status = 'running'
                   AND step_id IN (SELECT step_id FROM attempts WHERE run_id = ?1 AND status = 'running')",
            )?
            .execute([run_id])?;
            tx.prepare_cached(
                "UPDATE attempts SET status = 'interrupted', finished_at = ?2 WHERE run_id = ?1 AND status = 'running'",
            )?
            .execute(params![run_id, now_millis()])?;
            Ok(step_ids)
        })
    }

    fn append_event(&self, run_id: &str, kind: &str, step_id: Option<&str>, message: &str) -> Result<i64> {
        self.write("state.append_event", Some(run_id), |tx| {
            let seq = tx
                .prepare_cached(
                    "INSERT INTO events (run_id, seq, at, kind, step_id, message)
                     VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id = ?1), ?2, ?3, ?4, ?5)
                     RETURNING seq",
                )?
                .query_row(params![run_id, now_millis(), kind, step_id, message], |r| r.get(0))?;
            Ok(seq)
        })
    }

    fn append_events(&self, run_id: &str, events: &[NewEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.write("state.append_events", Some(run_id), |tx| {
            let mut seq: i64 = tx
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?1")?
                .query_row([run_id], |r| r.get(0))?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (run_id, seq, at, kind, step_id, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in events {
                seq += 1;
                insert.execute(params![run_id, seq, e.at, e.kind, e.step_id, e.message])?;
            }
            Ok(())
        })
    }

    fn create_steps(&self, run_id: &str, step_ids: &[String]) -> Result<()> {
        self.write("state.create_steps", Some(run_id), |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO steps (run_id, step_id, status) VALUES (?1, ?2, 'pending')
                 ON CONFLICT (run_id, step_id) DO NOTHING",
            )?;
            for id in step_ids {
                insert.execute(params![run_id, id])?;
            }
            Ok(())
        })
    }

    /// A finished run cannot be cancelled (conflict).
    fn request_cancel(&self, run_id: &str) -> Result<()> {
        self.write("state.request_cancel", Some(run_id), |tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE runs SET cancel_requested = 1 WHERE id = ?1 AND status IN ('queued', 'running')",
                )?
                .execute([run_id])?;
            if changed == 0 {
                return Err(explain_final(tx, run_id, "cancel the run"));
            }
            Ok(())
        })
    }

    /// A decision on a finished run is a conflict.
    fn record_approval(&self, approval: &ApprovalRecord) -> Result<()> {
        let a = approval;
        self.write("state.record_approval", Some(&a.run_id), |tx| {
            let status = run_status(tx, &a.run_id)?;
            if status.is_final() {
                return Err(Fail::domain(
                    ErrorKind::Conflict,
                    format!(
                        "cannot record an approval of step `{}`: the run is already {}",
                        a.step_id,
                        status.as_sql()
                    ),
                ));
            }
            tx.prepare_cached(
                "INSERT INTO approvals (run_id, step_id, approved, by_user, at, comment) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (run_id, step_id) DO UPDATE SET approved = excluded.approved, by_user = excluded.by_user,
                     at = excluded.at, comment = excluded.comment",
            )?
            .execute(params![a.run_id, a.step_id, a.approved, a.by, a.at, a.comment])?;
            Ok(())
        })
    }

    /// A holder that already has a lease on `lock` gets it extended and `true`, whatever
    /// the count.
    fn acquire_lease(&self, lock: &str, limit: u32, holder: &LeaseHolder, ttl_ms: i64) -> Result<bool> {
        self.write("state.acquire_lease", Some(&holder.run_id), |tx| {
            let now = now_millis();
            let expires = now.saturating_add(ttl_ms);
            tx.prepare_cached("DELETE FROM leases WHERE lock_name = ?1 AND expires_at <= ?2")?
                .execute(params![lock, now])?;
            let renewed = tx
                .prepare_cached(
                    "UPDATE leases SET expires_at = ?4 WHERE lock_name = ?1 AND run_id = ?2 AND step_id = ?3",
                )?
                .execute(params![lock, holder.run_id, holder.step_id, expires])?;
            if renewed > 0 {
                return Ok(true);
            }
            let live: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM leases WHERE lock_name = ?1")?
                .query_row([lock], |r| r.get(0))?;
            if live >= i64::from(limit) {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO leases (lock_name, run_id, step_id, acquired_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![lock, holder.run_id, holder.step_id, now, expires])?;
            Ok(true)
        })
    }

    /// Every row of the run is extended, expired or not: an expired lease still present
    /// was not taken over (`acquire_lease` deletes a lock's expired leases before
    /// counting), so renewing it cannot exceed a limit.
    fn renew_leases(&self, run_id: &str, ttl_ms: i64) -> Result<()> {
        self.write("state.renew_leases", Some(run_id), |tx| {
            tx.prepare_cached("UPDATE leases SET expires_at = ?2 WHERE run_id = ?1")?
                .execute(params![run_id, now_millis().saturating_add(ttl_ms)])?;
            Ok(())
        })
    }

    /// Releasing a lease not held is a no-op.
    fn release_lease(&self, lock: &str, holder: &LeaseHolder) -> Result<()> {
        self.write("state.release_lease", Some(&holder.run_id), |tx| {
            tx.prepare_cached("DELETE FROM leases WHERE lock_name = ?1 AND run_id = ?2 AND step_id = ?3")?
                .execute(params![lock, holder.run_id, holder.step_id])?;
            Ok(())
        })
    }

    fn active_runs_in_group(&self, group: &str) -> Result<Vec<RunRecord>> {
        self.read("state.active_runs_in_group", None, |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {RUN_COLS} FROM runs
                 WHERE concurrency_group = ?1 AND status IN ('queued', 'running')
                 ORDER BY created_at, rowid"
            ))?;
            Ok(stmt.query_map([group], run_row)?.collect::<rusqlite::Result<_>>()?)
        })
        .map_err(|e| e.with_context("group", group))
    }

    fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        self.read("state.run", Some(run_id), |conn| {
            let mut stmt = conn.prepare_cached(&format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"))?;
            Ok(stmt.query_row([run_id], run_row).optional()?)
        })
    }

    fn previous_verdict(&self, run_id: &str) -> Result<Option<(String, RunStatus)>> {
        self.read("state.previous_verdict", Some(run_id), |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT p.id, p.status FROM runs r
                 JOIN runs p ON p.pipeline = r.pipeline AND p.environment = r.environment
                     AND (p.created_at < r.created_at OR (p.created_at = r.created_at AND p.rowid < r.rowid))
                 WHERE r.id = ?1 AND p.status IN ('succeeded', 'failed')
                 ORDER BY p.created_at DESC, p.rowid DESC LIMIT 1",
            )?;
            Ok(stmt.query_row([run_id], |r| Ok((r.get(0)?, r.get(1)?))).optional()?)
        })
    }

    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        self.read("state.runs", None, |conn| {
            // One statement text per combination of filters, so each can use its index.
            let mut sql = format!("SELECT {RUN_COLS} FROM runs");
            let mut args: Vec<&dyn ToSql> = Vec::new();
            let mut conditions = Vec::new();
            if let Some(pipeline) = &filter.pipeline {
                args.push(pipeline);
                conditions.push(format!("pipeline = ?{}", args.len()));
            }
            if let Some(status) = &filter.status {
                args.push(status);
                conditions.push(format!("status = ?{}", args.len()));
            }
            if !conditions.is_empty() {
                sql.push_str(" WHERE ");
                sql.push_str(&conditions.join(" AND "));
            }
            let limit = filter.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
            args.push(&limit);
            sql.push_str(&format!(" ORDER BY created_at DESC, rowid DESC LIMIT ?{}", args.len()));
            let mut stmt = conn.prepare_cached(&sql)?;
            Ok(stmt.query_map(args.as_slice(), run_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>> {
        self.read("state.steps", Some(run_id), |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {STEP_COLS} FROM steps WHERE run_id = ?1 ORDER BY seq"))?;
            Ok(stmt.query_map([run_id], step_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>> {
        self.read("state.attempts", Some(run_id), |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {ATTEMPT_COLS} FROM attempts WHERE run_id = ?1 ORDER BY seq"))?;
            Ok(stmt.query_map([run_id], attempt_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn events(&self, run_id: &str) -> Result<Vec<EventRecord>> {
        self.read("state.events", Some(run_id), |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT run_id, seq, at, kind, step_id, message FROM events WHERE run_id = ?1 ORDER BY seq",
            )?;
            Ok(stmt.query_map([run_id], event_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn approvals(&self, run_id: &str) -> Result<Vec<ApprovalRecord>> {
        self.read("state.approvals", Some(run_id), |conn| Ok(approvals_of(conn, run_id)?))
    }

    fn record_targets(&self, targets: &[TargetRecord]) -> Result<()> {
        let Some(first) = targets.first() else { return Ok(()) };
        self.write("state.record_targets", Some(&first.run_id), |tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO attempt_targets ({TARGET_COLS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))?;
            for t in targets {
                stmt.execute(params![
                    t.run_id,
                    t.step_id,
                    t.number,
                    t.kind,
                    t.target,
                    t.status,
                    t.skipped,
                    t.started_at,
                    t.finished_at,
                    t.exit_code,
                    t.signal,
                    t.log_path,
                    t.error
                ])?;
            }
            Ok(())
        })
    }

    fn targets(&self, run_id: &str) -> Result<Vec<TargetRecord>> {
        self.read("state.targets", Some(run_id), |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {TARGET_COLS} FROM attempt_targets WHERE run_id = ?1 ORDER BY step_id, kind, number, rowid"
            ))?;
            Ok(stmt.query_map([run_id], target_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn record_delivery(&self, d: &DeliveryRecord) -> Result<i64> {
        self.write("state.record_delivery", d.run_id.as_deref(), |tx| {
            tx.prepare_cached(
                "INSERT INTO deliveries (run_id, route, channel, event_kind, pipeline, environment, fingerprint,
                     dedup_key, status, attempts, error, receipt, created_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                d.run_id,
                d.route,
                d.channel,
                d.event_kind,
                d.pipeline,
                d.environment,
                d.fingerprint,
                d.dedup_key,
                d.status,
                d.attempts,
                d.error,
                d.receipt,
                d.created_at,
                d.finished_at
            ])?;
            Ok(tx.last_insert_rowid())
        })
    }

    fn delivery_finished(
        &self,
        id: i64,
        status: DeliveryStatus,
        attempts: u32,
        error: Option<&str>,
        receipt: Option<&str>,
    ) -> Result<()> {
        self.write("state.delivery_finished", None, |tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE deliveries SET status = ?2, attempts = ?3, error = ?4, receipt = ?5, finished_at = ?6
                     WHERE id = ?1",
                )?
                .execute(params![id, status, attempts, error, receipt, now_millis()])?;
            if changed == 0 {
                return Err(Fail::domain(ErrorKind::NotFound, format!("no delivery {id}")));
            }
            Ok(())
        })
    }

    fn deliveries(&self, run_id: &str) -> Result<Vec<DeliveryRecord>> {
        self.read("state.deliveries", Some(run_id), |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {DELIVERY_COLS} FROM deliveries WHERE run_id = ?1 ORDER BY id"))?;
            Ok(stmt.query_map([run_id], delivery_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn recent_deliveries(&self, channel: &str, since: i64) -> Result<Vec<DeliveryRecord>> {
        self.read("state.recent_deliveries", None, |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLS} FROM deliveries WHERE channel = ?1 AND created_at >= ?2 ORDER BY id"
            ))?;
            Ok(stmt.query_map(params![channel, since], delivery_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }
}

/// The body of `set_step_status`, inside a write transaction.
fn step_status_tx(
    tx: &Connection,
    run_id: &str,
    step_id: &str,
    status: StepStatus,
    error: Option<&str>,
) -> std::result::Result<(), Fail> {
    let finished_at = status.is_final().then(now_millis);
    tx.prepare_cached(
        "INSERT INTO steps (run_id, step_id, status, finished_at, error) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (run_id, step_id) DO UPDATE SET
             status = excluded.status, finished_at = excluded.finished_at, error = excluded.error",
    )?
    .execute(params![run_id, step_id, status, finished_at, error])?;
    Ok(())
}

/// The body of `attempt_started`, inside a write transaction.
fn attempt_started_tx(tx: &Connection, a: &AttemptRecord) -> std::result::Result<(), Fail> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO attempts (run_id, step_id, number, kind, status, started_at, log_path)
             VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6)",
        )?
        .execute(params![a.run_id, a.step_id, a.number, a.kind, a.started_at, a.log_path]);
    match inserted {
        Err(rusqlite::Error::SqliteFailure(f, _))
            if f.code == ErrorCode::ConstraintViolation
                && f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            return Err(Fail::domain(
                ErrorKind::Conflict,
                format!("{} attempt {} of step `{}` is already recorded", a.kind.as_sql(), a.number, a.step_id),
            ));
        }
        other => other?,
    };
    if a.kind == AttemptKind::Main {
        let changed = tx.prepare_cached(STEP_RUNNING)?.execute(params![a.run_id, a.step_id, a.number, a.started_at])?;
        if changed == 0 {
            let status: StepStatus = tx
                .prepare_cached("SELECT status FROM steps WHERE run_id = ?1 AND step_id = ?2")?
                .query_row([&a.run_id, &a.step_id], |r| r.get(0))?;
            return Err(Fail::domain(
                ErrorKind::Conflict,
                format!("cannot start an attempt of step `{}`: it is already {}", a.step_id, status.as_sql()),
            ));
        }
    }
    Ok(())
}

/// The body of `attempt_finished`, inside a write transaction.
fn attempt_finished_tx(tx: &Connection, a: &AttemptRecord) -> std::result::Result<(), Fail> {
    if a.status == AttemptStatus::Running {
        return Err(Fail::domain(ErrorKind::Internal, "attempt_finished called with status running"));
    }
    let changed = tx
        .prepare_cached(
            "UPDATE attempts SET status = ?5, finished_at = ?6, exit_code = ?7, signal = ?8, error = ?9
             WHERE run_id = ?1 AND step_id = ?2 AND kind = ?3 AND number = ?4 AND status = 'running'",
        )?
        .execute(params![
            a.run_id,
            a.step_id,
            a.kind,
            a.number,
            a.status,
            a.finished_at.unwrap_or_else(now_millis),
            a.exit_code,
            a.signal,
            a.error,
        ])?;
    if changed == 0 {
        let current: Option<AttemptStatus> = tx
            .prepare_cached(
                "SELECT status FROM attempts WHERE run_id = ?1 AND step_id = ?2 AND kind = ?3 AND number = ?4",
            )?
            .query_row(params![a.run_id, a.step_id, a.kind, a.number], |r| r.get(0))
            .optional()?;
        let what = format!("{} attempt {} of step `{}`", a.kind.as_sql(), a.number, a.step_id);
        return match current {
            None => Err(Fail::domain(ErrorKind::NotFound, format!("no {what}"))),
            Some(s) if s == a.status => Ok(()),
            Some(s) => Err(Fail::domain(
                ErrorKind::Conflict,
                format!("cannot mark {what} {}: it is already {}", a.status.as_sql(), s.as_sql()),
            )),
        };
    }
    Ok(())
}

/// The body of `step_finished`, inside a write transaction.
fn step_finished_tx(
    tx: &Connection,
    run_id: &str,
    step_id: &str,
    status: StepStatus,
    outputs_json: &str,
    error: Option<&str>,
) -> std::result::Result<(), Fail> {
    if !status.is_final() {
        return Err(Fail::domain(
            ErrorKind::Internal,
            format!("step_finished called with non-final status {}", status.as_sql()),
        ));
    }
    tx.prepare_cached(
        "INSERT INTO steps (run_id, step_id, status, finished_at, outputs_json, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (run_id, step_id) DO UPDATE SET status = excluded.status,
             finished_at = excluded.finished_at, outputs_json = excluded.outputs_json, error = excluded.error",
    )?
    .execute(params![run_id, step_id, status, now_millis(), outputs_json, error])?;
    Ok(())
}
