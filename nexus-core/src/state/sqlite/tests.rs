//! Tests of the SQLite store, on real files in temporary directories.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::*;
use crate::state::Millis;

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join(".nexus")).unwrap();
    (dir, store)
}

fn run(id: &str, pipeline: &str, created_at: Millis) -> RunRecord {
    RunRecord {
        id: id.into(),
        pipeline: pipeline.into(),
        environment: "staging".into(),
        status: RunStatus::Queued,
        plan_json: r#"{"steps":[]}"#.into(),
        config_digest: "sha256:abc".into(),
        concurrency_group: None,
        parent_run: None,
        created_at,
        started_at: None,
        finished_at: None,
        owner: None,
        heartbeat_at: None,
        cancel_requested: false,
        error: None,
    }
}

fn attempt(run_id: &str, step_id: &str, number: u32, kind: AttemptKind) -> AttemptRecord {
    AttemptRecord {
        run_id: run_id.into(),
        step_id: step_id.into(),
        number,
        kind,
        status: AttemptStatus::Running,
        started_at: now_millis(),
        finished_at: None,
        exit_code: None,
        signal: None,
        log_path: format!("logs/{run_id}/{step_id}.{number}.log"),
        error: None,
    }
}

fn holder(run_id: &str, step_id: &str) -> LeaseHolder {
    LeaseHolder { run_id: run_id.into(), step_id: step_id.into() }
}

fn kind_of<T: fmt::Debug>(r: Result<T>) -> ErrorKind {
    r.unwrap_err().kind()
}

#[test]
fn state_open_creates_dir_wal_file_and_latest_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a/b/.nexus");
    let store = SqliteStore::open(&state).unwrap();
    assert_eq!(store.path(), state.join(DB_FILE));
    assert!(state.join(DB_FILE).is_file());
    let conn = store.lock();
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
    assert_eq!(sync, 1, "NORMAL");
    let fk: i64 = conn.pragma_query_value(None, "foreign_keys", |r| r.get(0)).unwrap();
    assert_eq!(fk, 1);
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    const { assert!(SCHEMA_VERSION >= 1) };
    let app: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0)).unwrap();
    assert_eq!(app, migrations::APPLICATION_ID);
    drop(conn);
    drop(store);
    // Reopening an up-to-date store is a no-op.
    let store = SqliteStore::open(&state).unwrap();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
}

#[test]
fn state_in_memory_store_works() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    assert_eq!(store.run("r-1").unwrap().unwrap().pipeline, "deploy");
    assert_eq!(store.path(), Path::new(":memory:"));
}

#[test]
fn state_migrations_upgrade_an_older_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    // A store at version 0 (an empty file), as if made before the first migration.
    drop(Connection::open(&path).unwrap());
    let store = SqliteStore::open(dir.path()).unwrap();
    let version: u32 = store.lock().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // Every intermediate version upgrades to the latest too.
    for from in 0..SCHEMA_VERSION {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let mut conn = Connection::open(&path).unwrap();
        migrations::migrate_to(&mut conn, &path, from).unwrap();
        drop(conn);
        let store = SqliteStore::open(dir.path()).unwrap();
        let version: u32 = store.lock().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION, "from {from}");
    }
}

#[test]
fn state_a_store_from_a_newer_nexus_is_refused() {
    let (dir, store) = store();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    store.lock().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(store);
    let err = SqliteStore::open(&dir.path().join(".nexus")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let text = err.to_string();
    assert!(text.contains(&dir.path().join(".nexus").join(DB_FILE).display().to_string()), "{text}");
    assert!(text.contains(&format!("schema version {}", SCHEMA_VERSION + 1)), "{text}");
    assert!(text.contains(&format!("up to {SCHEMA_VERSION}")), "{text}");
    assert_eq!(err.operation(), "state.open");
}

#[test]
fn state_a_foreign_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "application_id", 1234).unwrap();
    drop(conn);
    let err = SqliteStore::open(dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("another program"), "{err}");
}

#[test]
fn state_open_reports_an_unusable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let err = SqliteStore::open(&file).unwrap_err();
    assert_eq!(err.operation(), "state.open");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[test]
fn state_enum_names_agree_with_serde() {
    fn serde_name<T: serde::Serialize>(v: T) -> String {
        serde_json::to_value(v).unwrap().as_str().unwrap().to_owned()
    }
    use RunStatus as R;
    for s in [R::Queued, R::Running, R::Succeeded, R::Failed, R::Cancelled, R::Skipped] {
        assert_eq!(s.as_sql(), serde_name(s));
        assert_eq!(RunStatus::from_sql_str(s.as_sql()), Some(s));
    }
    use StepStatus as S;
    let steps = [
        S::Pending,
        S::Running,
        S::WaitingApproval,
        S::Succeeded,
        S::Failed,
        S::Skipped,
        S::Cancelled,
        S::Interrupted,
        S::RolledBack,
    ];
    for s in steps {
        assert_eq!(s.as_sql(), serde_name(s));
        assert_eq!(StepStatus::from_sql_str(s.as_sql()), Some(s));
        assert_eq!(s.is_final(), FINAL_STEP_STATUSES.contains(&format!("'{}'", s.as_sql())), "{s:?}");
    }
    use AttemptStatus as A;
    for s in [A::Running, A::Succeeded, A::Failed, A::TimedOut, A::Cancelled, A::Interrupted] {
        assert_eq!(s.as_sql(), serde_name(s));
        assert_eq!(AttemptStatus::from_sql_str(s.as_sql()), Some(s));
    }
    for k in [AttemptKind::Main, AttemptKind::Rollback] {
        assert_eq!(k.as_sql(), serde_name(k));
    }
    use DeliveryStatus as D;
    for s in [D::Sending, D::Sent, D::Failed, D::Suppressed] {
        assert_eq!(s.as_sql(), serde_name(s));
        assert_eq!(DeliveryStatus::from_sql_str(s.as_sql()), Some(s));
    }
}

fn delivery(run_id: Option<&str>, channel: &str, created_at: i64) -> DeliveryRecord {
    DeliveryRecord {
        id: 0,
        run_id: run_id.map(str::to_owned),
        route: "failures".into(),
        channel: channel.into(),
        event_kind: "run.failed".into(),
        pipeline: Some("deploy".into()),
        environment: Some("prod".into()),
        fingerprint: "failures|ops|run.failed|deploy|prod".into(),
        dedup_key: "nexus/deploy/prod".into(),
        status: DeliveryStatus::Sending,
        attempts: 0,
        error: None,
        receipt: None,
        created_at,
        finished_at: None,
    }
}

#[test]
fn state_deliveries_are_recorded_finished_and_listed() {
    let (_dir, store) = store();
    let a = store.record_delivery(&delivery(Some("r-1"), "ops", 1_000)).unwrap();
    let b = store.record_delivery(&delivery(None, "ops", 2_000)).unwrap();
    let c = store.record_delivery(&delivery(Some("r-1"), "pager", 3_000)).unwrap();
    assert!(a < b && b < c);
    store.delivery_finished(a, DeliveryStatus::Sent, 2, None, Some("msg-1")).unwrap();
    store.delivery_finished(c, DeliveryStatus::Failed, 4, Some("HTTP 500"), None).unwrap();
    let of_run = store.deliveries("r-1").unwrap();
    assert_eq!(of_run.iter().map(|d| d.id).collect::<Vec<_>>(), [a, c]);
    assert_eq!(of_run[0].status, DeliveryStatus::Sent);
    assert_eq!(of_run[0].attempts, 2);
    assert_eq!(of_run[0].receipt.as_deref(), Some("msg-1"));
    assert!(of_run[0].finished_at.is_some());
    assert_eq!(of_run[1].error.as_deref(), Some("HTTP 500"));
    let recent = store.recent_deliveries("ops", 1_500).unwrap();
    assert_eq!(recent.iter().map(|d| d.id).collect::<Vec<_>>(), [b]);
    assert_eq!(recent[0].run_id, None);
    let missing = store.delivery_finished(999, DeliveryStatus::Sent, 1, None, None).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
}

#[test]
fn state_run_round_trip_and_lifecycle() {
    let (_dir, store) = store();
    let mut full = run("r-full", "deploy", 1_000);
    full.concurrency_group = Some("deploy-prod".into());
    full.parent_run = Some("r-older".into());
    full.started_at = Some(1_001);
    full.finished_at = Some(1_002);
    full.owner = Some(Owner { host: "ops-1".into(), pid: 4242 });
    full.heartbeat_at = Some(1_003);
    full.cancel_requested = true;
    full.error = Some("boom".into());
    store.create_run(&full).unwrap();
    assert_eq!(store.run("r-full").unwrap().as_ref(), Some(&full));
    assert_eq!(store.run("r-none").unwrap(), None);

    let err = store.create_run(&full).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(err.operation(), "state.create_run");
    assert!(err.context().iter().any(|(k, v)| *k == "run" && v == "r-full"));
    assert!(err.context().iter().any(|(k, v)| *k == "path" && v.ends_with(DB_FILE)));

    let r = run("r-1", "deploy", 2_000);
    store.create_run(&r).unwrap();
    let owner = Owner::current();
    let before = now_millis();
    store.claim_run("r-1", &owner).unwrap();
    let got = store.run("r-1").unwrap().unwrap();
    assert_eq!(got.status, RunStatus::Running);
    assert_eq!(got.owner.as_ref(), Some(&owner));
    assert!(got.heartbeat_at.unwrap() >= before);
    let started = got.started_at.unwrap();
    assert!(started >= before);

    // A resumed run is claimed again by another process; started_at stays.
    let other = Owner { host: "ops-2".into(), pid: 7 };
    store.claim_run("r-1", &other).unwrap();
    let got = store.run("r-1").unwrap().unwrap();
    assert_eq!(got.owner, Some(other));
    assert_eq!(got.started_at, Some(started));

    let signals = store.heartbeat("r-1").unwrap();
    assert_eq!(signals, Signals::default());
    store.request_cancel("r-1").unwrap();
    assert!(store.heartbeat("r-1").unwrap().cancel_requested);
    assert!(store.run("r-1").unwrap().unwrap().cancel_requested);

    store.finish_run("r-1", RunStatus::Failed, Some("step `build` failed")).unwrap();
    let got = store.run("r-1").unwrap().unwrap();
    assert_eq!(got.status, RunStatus::Failed);
    assert_eq!(got.error.as_deref(), Some("step `build` failed"));
    assert!(got.finished_at.unwrap() >= started);
    // The same end again is a no-op; another is a conflict, and so is claiming it.
    store.finish_run("r-1", RunStatus::Failed, None).unwrap();
    assert_eq!(kind_of(store.finish_run("r-1", RunStatus::Succeeded, None)), ErrorKind::Conflict);
    assert_eq!(kind_of(store.claim_run("r-1", &owner)), ErrorKind::Conflict);
    assert_eq!(kind_of(store.request_cancel("r-1")), ErrorKind::Conflict);
    assert_eq!(kind_of(store.set_run_status("r-1", RunStatus::Running)), ErrorKind::Conflict);
    assert_eq!(kind_of(store.finish_run("r-1", RunStatus::Running, None)), ErrorKind::Internal);
    assert_eq!(store.run("r-1").unwrap().unwrap().error.as_deref(), Some("step `build` failed"));

    // A run that never started.
    store.create_run(&run("r-2", "deploy", 3_000)).unwrap();
    store.set_run_status("r-2", RunStatus::Skipped).unwrap();
    let got = store.run("r-2").unwrap().unwrap();
    assert_eq!(got.status, RunStatus::Skipped);
    assert!(got.finished_at.is_some() && got.started_at.is_none());

    // Missing runs.
    for r in [
        store.claim_run("r-x", &owner).map(drop),
        store.heartbeat("r-x").map(drop),
        store.finish_run("r-x", RunStatus::Succeeded, None),
        store.set_run_status("r-x", RunStatus::Skipped),
        store.request_cancel("r-x"),
        store.interrupt_running("r-x").map(drop),
        store.append_event("r-x", "run.started", None, "").map(drop),
        store.set_step_status("r-x", "s", StepStatus::Pending, None),
        store.step_finished("r-x", "s", StepStatus::Succeeded, "{}", None),
        store.attempt_started(&attempt("r-x", "s", 1, AttemptKind::Main)),
        store.acquire_lease("l", 1, &holder("r-x", "s"), 1_000).map(drop),
    ] {
        let err = r.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(err.context().iter().any(|(k, v)| *k == "run" && v == "r-x"), "{err}");
    }
}

#[test]
fn state_runs_listing_with_filters_and_limit() {
    let (_dir, store) = store();
    let specs = [
        ("r-1", "deploy", 10, RunStatus::Succeeded),
        ("r-2", "backup", 20, RunStatus::Failed),
        ("r-3", "deploy", 30, RunStatus::Failed),
        ("r-4", "deploy", 30, RunStatus::Queued), // same millisecond as r-3: insertion order breaks the tie
        ("r-5", "backup", 50, RunStatus::Running),
    ];
    for (id, pipeline, at, status) in specs {
        let mut r = run(id, pipeline, at);
        r.status = status;
        store.create_run(&r).unwrap();
    }
    let ids = |filter: RunFilter| store.runs(&filter).unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(RunFilter::default()), ["r-5", "r-4", "r-3", "r-2", "r-1"]);
    assert_eq!(ids(RunFilter { limit: Some(2), ..Default::default() }), ["r-5", "r-4"]);
    assert_eq!(ids(RunFilter { limit: Some(0), ..Default::default() }), Vec::<String>::new());
    assert_eq!(ids(RunFilter { pipeline: Some("deploy".into()), ..Default::default() }), ["r-4", "r-3", "r-1"]);
    assert_eq!(ids(RunFilter { status: Some(RunStatus::Failed), ..Default::default() }), ["r-3", "r-2"]);
    assert_eq!(
        ids(RunFilter { pipeline: Some("deploy".into()), status: Some(RunStatus::Failed), limit: Some(5) }),
        ["r-3"]
    );
    assert_eq!(ids(RunFilter { pipeline: Some("deploy".into()), status: None, limit: Some(1) }), ["r-4"]);
    assert_eq!(ids(RunFilter { pipeline: Some("nope".into()), ..Default::default() }), Vec::<String>::new());
    let all = store.runs(&RunFilter::default()).unwrap();
    assert_eq!(all[0], store.run("r-5").unwrap().unwrap());
}

#[test]
fn state_active_runs_in_group_oldest_first() {
    let (_dir, store) = store();
    for (id, group, at) in [
        ("r-1", Some("prod"), 10),
        ("r-2", Some("prod"), 20),
        ("r-3", Some("dev"), 30),
        ("r-4", None, 40),
        ("r-5", Some("prod"), 50),
    ] {
        let mut r = run(id, "deploy", at);
        r.concurrency_group = group.map(Into::into);
        store.create_run(&r).unwrap();
    }
    store.claim_run("r-2", &Owner::current()).unwrap();
    store.finish_run("r-1", RunStatus::Succeeded, None).unwrap();
    let ids: Vec<_> = store.active_runs_in_group("prod").unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["r-2", "r-5"]);
    assert_eq!(store.active_runs_in_group("dev").unwrap().len(), 1);
    assert!(store.active_runs_in_group("none").unwrap().is_empty());
}

#[test]
fn state_steps_and_attempts_round_trip() {
    let (_dir, store) = store();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    // Registered in plan order; listed in that order whatever happens next.
    for step in ["build", "test[component=api]", "test[component=worker]", "deploy", "approve"] {
        store.set_step_status("r-1", step, StepStatus::Pending, None).unwrap();
    }

    // build: fails once, then succeeds.
    let mut a1 = attempt("r-1", "build", 1, AttemptKind::Main);
    store.attempt_started(&a1).unwrap();
    let s = &store.steps("r-1").unwrap()[0];
    assert_eq!((s.step_id.as_str(), s.status, s.attempts), ("build", StepStatus::Running, 1));
    assert_eq!(s.started_at, Some(a1.started_at));
    assert_eq!(kind_of(store.attempt_started(&a1)), ErrorKind::Conflict);
    a1.status = AttemptStatus::Failed;
    a1.exit_code = Some(2);
    a1.error = Some("exit code 2".into());
    a1.finished_at = Some(a1.started_at + 5);
    store.attempt_finished(&a1).unwrap();
    store.attempt_finished(&a1).unwrap(); // a repeat is harmless
    let mut other = a1.clone();
    other.status = AttemptStatus::Succeeded;
    assert_eq!(kind_of(store.attempt_finished(&other)), ErrorKind::Conflict);
    other.number = 9;
    assert_eq!(kind_of(store.attempt_finished(&other)), ErrorKind::NotFound);
    other.status = AttemptStatus::Running;
    assert_eq!(kind_of(store.attempt_finished(&other)), ErrorKind::Internal);

    let mut a2 = attempt("r-1", "build", 2, AttemptKind::Main);
    a2.status = AttemptStatus::Failed; // ignored: a started attempt is running
    store.attempt_started(&a2).unwrap();
    a2.status = AttemptStatus::Succeeded;
    a2.exit_code = Some(0);
    store.attempt_finished(&a2).unwrap();
    store.step_finished("r-1", "build", StepStatus::Succeeded, r#"{"image":"api:1.2"}"#, None).unwrap();
    assert_eq!(kind_of(store.step_finished("r-1", "build", StepStatus::Running, "{}", None)), ErrorKind::Internal);
    // A finished step never runs again.
    assert_eq!(kind_of(store.attempt_started(&attempt("r-1", "build", 3, AttemptKind::Main))), ErrorKind::Conflict);

    // test[component=worker] is skipped with a reason; approve waits.
    store.set_step_status("r-1", "test[component=worker]", StepStatus::Skipped, Some("`if` was false")).unwrap();
    store.set_step_status("r-1", "approve", StepStatus::WaitingApproval, None).unwrap();

    // deploy succeeds, then is rolled back.
    let mut d1 = attempt("r-1", "deploy", 1, AttemptKind::Main);
    store.attempt_started(&d1).unwrap();
    d1.status = AttemptStatus::Succeeded;
    store.attempt_finished(&d1).unwrap();
    store.step_finished("r-1", "deploy", StepStatus::Succeeded, "{}", None).unwrap();
    let mut rb = attempt("r-1", "deploy", 1, AttemptKind::Rollback);
    store.attempt_started(&rb).unwrap();
    assert_eq!(store.steps("r-1").unwrap()[3].status, StepStatus::Succeeded, "rollback attempts leave the step");
    rb.status = AttemptStatus::Succeeded;
    rb.signal = None;
    store.attempt_finished(&rb).unwrap();
    store.set_step_status("r-1", "deploy", StepStatus::RolledBack, None).unwrap();

    // A step first recorded by step_finished is appended.
    store.step_finished("r-1", "notify", StepStatus::Succeeded, "{}", None).unwrap();

    let steps = store.steps("r-1").unwrap();
    let order: Vec<_> = steps.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(order, ["build", "test[component=api]", "test[component=worker]", "deploy", "approve", "notify"]);
    let build = &steps[0];
    assert_eq!(build.status, StepStatus::Succeeded);
    assert_eq!(build.attempts, 2);
    assert_eq!(build.outputs_json, r#"{"image":"api:1.2"}"#);
    assert_eq!(build.started_at, Some(a1.started_at));
    assert!(build.finished_at.is_some());
    assert_eq!(build.error, None);
    assert_eq!(steps[1].status, StepStatus::Pending);
    assert_eq!(steps[1].outputs_json, "{}");
    assert_eq!(steps[1].finished_at, None);
    assert_eq!(steps[2].status, StepStatus::Skipped);
    assert_eq!(steps[2].error.as_deref(), Some("`if` was false"));
    assert!(steps[2].finished_at.is_some());
    assert_eq!(steps[3].status, StepStatus::RolledBack);
    assert_eq!(steps[3].attempts, 1);
    assert_eq!(steps[4].status, StepStatus::WaitingApproval);
    assert_eq!(steps[4].run_id, "r-1");

    let attempts = store.attempts("r-1").unwrap();
    assert_eq!(
        attempts,
        vec![a1, a2.clone(), d1.clone(), rb.clone()]
            .into_iter()
            .map(|mut a| {
                a.finished_at = attempts_finished_at(&store, &a);
                a
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(attempts[1].exit_code, Some(0));
    assert_eq!(attempts[3].kind, AttemptKind::Rollback);
    assert!(attempts.iter().all(|a| a.finished_at.is_some()));
    assert!(store.attempts("r-other").unwrap().is_empty());
}

/// The stored `finished_at` of an attempt (defaulted to "now" when not given).
fn attempts_finished_at(store: &SqliteStore, a: &AttemptRecord) -> Option<Millis> {
    store
        .lock()
        .query_row(
            "SELECT finished_at FROM attempts WHERE run_id = ?1 AND step_id = ?2 AND kind = ?3 AND number = ?4",
            params![a.run_id, a.step_id, a.kind, a.number],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn state_interrupt_running() {
    let (_dir, store) = store();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    store.claim_run("r-1", &Owner::current()).unwrap();
    // done: finished; b and c: running; d: running between attempts (backoff); rb: a
    // running rollback attempt of a succeeded step.
    let mut done = attempt("r-1", "done", 1, AttemptKind::Main);
    store.attempt_started(&done).unwrap();
    done.status = AttemptStatus::Succeeded;
    store.attempt_finished(&done).unwrap();
    store.step_finished("r-1", "done", StepStatus::Succeeded, "{}", None).unwrap();
    store.attempt_started(&attempt("r-1", "c", 1, AttemptKind::Main)).unwrap();
    store.attempt_started(&attempt("r-1", "b", 1, AttemptKind::Main)).unwrap();
    let mut d = attempt("r-1", "d", 1, AttemptKind::Main);
    store.attempt_started(&d).unwrap();
    d.status = AttemptStatus::Failed;
    store.attempt_finished(&d).unwrap();
    store.attempt_started(&attempt("r-1", "done", 1, AttemptKind::Rollback)).unwrap();
    // Another run's attempts are untouched.
    store.create_run(&run("r-2", "deploy", 2)).unwrap();
    store.attempt_started(&attempt("r-2", "b", 1, AttemptKind::Main)).unwrap();

    let before = now_millis();
    let ids = store.interrupt_running("r-1").unwrap();
    assert_eq!(ids, ["c", "b", "done"]);

    let status =
        |run: &str, step: &str| store.steps(run).unwrap().into_iter().find(|s| s.step_id == step).unwrap().status;
    assert_eq!(status("r-1", "c"), StepStatus::Interrupted);
    assert_eq!(status("r-1", "b"), StepStatus::Interrupted);
    assert_eq!(status("r-1", "d"), StepStatus::Running);
    assert_eq!(status("r-1", "done"), StepStatus::Succeeded);
    assert_eq!(status("r-2", "b"), StepStatus::Running);
    for a in store.attempts("r-1").unwrap() {
        match (a.step_id.as_str(), a.kind) {
            ("done", AttemptKind::Main) => assert_eq!(a.status, AttemptStatus::Succeeded),
            ("d", _) => assert_eq!(a.status, AttemptStatus::Failed),
            _ => {
                assert_eq!(a.status, AttemptStatus::Interrupted, "{a:?}");
                assert!(a.finished_at.unwrap() >= before);
            }
        }
    }
    assert_eq!(store.attempts("r-2").unwrap()[0].status, AttemptStatus::Running);
    assert!(store.interrupt_running("r-1").unwrap().is_empty(), "idempotent");

    // Resume re-runs an interrupted step with the next attempt number.
    store.attempt_started(&attempt("r-1", "b", 2, AttemptKind::Main)).unwrap();
    let b = store.steps("r-1").unwrap().into_iter().find(|s| s.step_id == "b").unwrap();
    assert_eq!((b.status, b.attempts), (StepStatus::Running, 2));
}

#[test]
fn state_events_and_approvals_round_trip() {
    let (_dir, store) = store();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    store.create_run(&run("r-2", "deploy", 2)).unwrap();
    let before = now_millis();
    assert_eq!(store.append_event("r-1", "run.started", None, "started").unwrap(), 1);
    assert_eq!(store.append_event("r-2", "run.started", None, "started").unwrap(), 1);
    assert_eq!(store.append_event("r-1", "step.retrying", Some("build"), "attempt 2 in 1s").unwrap(), 2);
    let events = store.events("r-1").unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[1],
        EventRecord {
            run_id: "r-1".into(),
            seq: 2,
            at: events[1].at,
            kind: "step.retrying".into(),
            step_id: Some("build".into()),
            message: "attempt 2 in 1s".into(),
        }
    );
    assert!(events[0].at >= before && events[0].step_id.is_none());

    let rejected = ApprovalRecord {
        run_id: "r-1".into(),
        step_id: "approve-prod".into(),
        approved: false,
        by: "alice".into(),
        at: 100,
        comment: Some("not on a Friday".into()),
    };
    store.record_approval(&rejected).unwrap();
    let other = ApprovalRecord {
        step_id: "approve-db".into(),
        approved: true,
        by: "bob".into(),
        at: 50,
        comment: None,
        ..rejected.clone()
    };
    store.record_approval(&other).unwrap();
    assert_eq!(store.approvals("r-1").unwrap(), [other.clone(), rejected.clone()]);
    // The last decision for a step wins.
    let approved = ApprovalRecord { approved: true, by: "carol".into(), at: 200, comment: None, ..rejected.clone() };
    store.record_approval(&approved).unwrap();
    assert_eq!(store.approvals("r-1").unwrap(), [other.clone(), approved.clone()]);
    assert!(store.approvals("r-2").unwrap().is_empty());
    let signals = store.heartbeat("r-1").unwrap();
    assert_eq!(signals, Signals { cancel_requested: false, approvals: vec![other, approved.clone()] });

    store.finish_run("r-1", RunStatus::Succeeded, None).unwrap();
    assert_eq!(kind_of(store.record_approval(&approved)), ErrorKind::Conflict);
    assert_eq!(
        kind_of(store.record_approval(&ApprovalRecord { run_id: "r-x".into(), ..approved })),
        ErrorKind::NotFound
    );
}

#[test]
fn state_leases_limit_expiry_idempotence() {
    let (_dir, store) = store();
    for id in ["r-1", "r-2", "r-3"] {
        store.create_run(&run(id, "deploy", 1)).unwrap();
    }
    let long = 60_000;
    let h1 = holder("r-1", "migrate");
    let h2 = holder("r-2", "migrate");
    let h3 = holder("r-3", "migrate");
    // Limit 2.
    assert!(store.acquire_lease("db", 2, &h1, long).unwrap());
    assert!(store.acquire_lease("db", 2, &h2, long).unwrap());
    assert!(!store.acquire_lease("db", 2, &h3, long).unwrap());
    // Re-acquiring is idempotent: still true, no second row.
    assert!(store.acquire_lease("db", 2, &h1, long).unwrap());
    assert!(store.acquire_lease("db", 1, &h1, long).unwrap());
    let rows: i64 = store.lock().query_row("SELECT COUNT(*) FROM leases", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 2);
    // Other locks are independent.
    assert!(store.acquire_lease("cache", 1, &h3, long).unwrap());
    assert!(!store.acquire_lease("cache", 1, &h1, long).unwrap());
    assert!(!store.acquire_lease("never", 0, &h1, long).unwrap());
    // Release frees a slot; releasing twice is harmless.
    store.release_lease("db", &h2).unwrap();
    store.release_lease("db", &h2).unwrap();
    assert!(store.acquire_lease("db", 2, &h3, long).unwrap());
    assert!(!store.acquire_lease("db", 2, &h2, long).unwrap());

    // Expiry frees a lease (its holder died without releasing it).
    let stale = holder("r-3", "stale");
    assert!(store.acquire_lease("solo", 1, &stale, 1).unwrap());
    std::thread::sleep(Duration::from_millis(5));
    assert!(store.acquire_lease("solo", 1, &h1, long).unwrap(), "the expired lease was discarded");
    assert!(!store.acquire_lease("solo", 1, &stale, long).unwrap());

    // Renewal keeps a lease alive past its first expiry.
    let h = holder("r-2", "deploy");
    assert!(store.acquire_lease("renewed", 1, &h, 30).unwrap());
    store.renew_leases("r-2", long).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    assert!(!store.acquire_lease("renewed", 1, &h3, long).unwrap(), "renewed lease still held");
    let expires: i64 =
        store.lock().query_row("SELECT expires_at FROM leases WHERE lock_name = 'renewed'", [], |r| r.get(0)).unwrap();
    assert!(expires > now_millis() + long / 2);
}

#[test]
fn state_errors_name_operation_run_and_path() {
    let (_dir, store) = store();
    let err = store.heartbeat("r-missing").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(!err.is_retryable());
    assert_eq!(err.operation(), "state.heartbeat");
    let text = err.to_string();
    assert!(text.contains("run: r-missing") && text.contains(DB_FILE), "{text}");

    // A writer holding the lock longer than the busy timeout yields `Unavailable`,
    // retryable. (The timeout is shortened for the test.)
    let other = Connection::open(store.path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    store.lock().busy_timeout(Duration::from_millis(50)).unwrap();
    let err = store.create_run(&run("r-1", "deploy", 1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    assert!(err.is_retryable());
    other.execute_batch("ROLLBACK").unwrap();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
}

#[test]
fn state_corrupt_rows_are_internal_errors() {
    let (_dir, store) = store();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    store.lock().execute("UPDATE runs SET status = 'exploded' WHERE id = 'r-1'", []).unwrap();
    let err = store.run("r-1").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(err.operation(), "state.run");
}

#[test]
fn state_two_stores_on_one_file_from_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let b = Arc::new(SqliteStore::open(dir.path()).unwrap());
    a.create_run(&run("r-1", "deploy", 1)).unwrap();
    b.create_run(&run("r-2", "deploy", 2)).unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let acquired = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = [(a, "r-1"), (b, "r-2")]
        .into_iter()
        .map(|(store, run_id)| {
            let (inside, acquired, refused) = (Arc::clone(&inside), Arc::clone(&acquired), Arc::clone(&refused));
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let me = holder(run_id, "migrate");
                let mut seqs = Vec::new();
                start.wait();
                for i in 0..500 {
                    // Both threads append to r-1: sequence numbers must not collide.
                    seqs.push(store.append_event("r-1", "step.log", Some(run_id), &format!("{run_id} {i}")).unwrap());
                    if store.acquire_lease("db", 1, &me, 60_000).unwrap() {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders of a limit-1 lock");
                        acquired.fetch_add(1, Ordering::SeqCst);
                        // Hold it across a few writes, so the other thread finds it taken.
                        store.renew_leases(run_id, 60_000).unwrap();
                        store.heartbeat(run_id).unwrap();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        store.release_lease("db", &me).unwrap();
                    } else {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
    let check = SqliteStore::open(dir.path()).unwrap();
    let events = check.events("r-1").unwrap();
    assert_eq!(events.len(), 1000);
    assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as i64 + 1));
    assert_eq!(events.iter().filter(|e| e.step_id.as_deref() == Some("r-2")).count(), 500);
    let leases: i64 = check.lock().query_row("SELECT COUNT(*) FROM leases", [], |r| r.get(0)).unwrap();
    assert_eq!(leases, 0);
    let (acquired, refused) = (acquired.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    assert_eq!(acquired + refused, 1000);
    assert!(acquired > 0);
    eprintln!("state: 2 stores x 500 events + lease churn: {acquired} leases taken, {refused} refused");
}

#[test]
fn state_3000_step_transitions_on_a_file_store() {
    let (_dir, store) = store();
    store.create_run(&run("r-big", "deploy", 1)).unwrap();
    let start = Instant::now();
    for i in 0..1000 {
        let step = format!("step-{i}");
        let mut a = attempt("r-big", &step, 1, AttemptKind::Main);
        store.attempt_started(&a).unwrap();
        a.status = AttemptStatus::Succeeded;
        a.exit_code = Some(0);
        store.attempt_finished(&a).unwrap();
        store.step_finished("r-big", &step, StepStatus::Succeeded, "{}", None).unwrap();
    }
    let elapsed = start.elapsed();
    eprintln!("state: 3000 calls (1000 x attempt_started, attempt_finished, step_finished) in {elapsed:?}");
    let steps = store.steps("r-big").unwrap();
    assert_eq!(steps.len(), 1000);
    assert_eq!(steps[999].step_id, "step-999");
    assert!(steps.iter().all(|s| s.status == StepStatus::Succeeded && s.attempts == 1));
    assert_eq!(store.attempts("r-big").unwrap().len(), 1000);
}

#[test]
fn state_targets_of_an_attempt_round_trip() {
    let (_dir, store) = store();
    store.create_run(&run("r-t", "fleet", 1_000)).unwrap();
    let target = |name: &str, exit: Option<i32>, skipped: bool| TargetRecord {
        run_id: "r-t".into(),
        step_id: "upgrade".into(),
        number: 1,
        kind: AttemptKind::Main,
        target: name.into(),
        status: if skipped { AttemptStatus::Cancelled } else { AttemptStatus::Failed },
        skipped,
        started_at: 1_001,
        finished_at: 1_002,
        exit_code: exit,
        signal: None,
        log_path: format!("logs/r-t/upgrade.1.{name}.log"),
        error: skipped.then(|| "not started".to_owned()),
    };
    let records = [target("web-1", Some(3), false), target("web-2", None, true)];
    store.record_targets(&records).unwrap();
    store.record_targets(&[]).unwrap();
    assert_eq!(store.targets("r-t").unwrap(), records);
    assert!(store.targets("r-other").unwrap().is_empty());
}

#[test]
fn state_previous_verdict_skips_cancelled_runs_and_other_environments() {
    let (_dir, store) = store();
    let create = |id: &str, env: &str, at: i64, status: Option<RunStatus>| {
        let mut r = run(id, "deploy", at);
        r.environment = env.into();
        store.create_run(&r).unwrap();
        if let Some(status) = status {
            store.claim_run(id, &Owner::current()).unwrap();
            store.finish_run(id, status, None).unwrap();
        }
    };
    create("r-1", "prod", 1_000, Some(RunStatus::Failed));
    create("r-2", "staging", 2_000, Some(RunStatus::Succeeded));
    create("r-3", "prod", 3_000, Some(RunStatus::Cancelled));
    create("r-4", "prod", 4_000, None);
    assert_eq!(store.previous_verdict("r-4").unwrap(), Some(("r-1".into(), RunStatus::Failed)));
    assert_eq!(store.previous_verdict("r-1").unwrap(), None);
    assert_eq!(store.previous_verdict("r-2").unwrap(), None);
}

#[test]
fn state_commit_applies_a_pass_all_or_nothing() {
    let (_dir, store) = store();
    store.create_run(&run("r-1", "deploy", 1)).unwrap();
    store.create_steps("r-1", &["build".into(), "test".into(), "deploy".into()]).unwrap();
    let mut build = attempt("r-1", "build", 1, AttemptKind::Main);
    store.attempt_started(&build).unwrap();

    // One pass: build ended and finished its step, test starts.
    build.status = AttemptStatus::Succeeded;
    build.exit_code = Some(0);
    let finished = |step: &str| Write::StepFinished {
        run_id: "r-1".into(),
        step_id: step.into(),
        status: StepStatus::Succeeded,
        outputs_json: r#"{"image":"api:1"}"#.into(),
        error: None,
    };
    let pass = [
        Write::AttemptFinished(build.clone()),
        finished("build"),
        Write::AttemptStarted(attempt("r-1", "test", 1, AttemptKind::Main)),
    ];
    store.commit(&pass).unwrap();
    let status = |store: &SqliteStore| -> Vec<(String, StepStatus)> {
        store.steps("r-1").unwrap().into_iter().map(|s| (s.step_id, s.status)).collect()
    };
    let expected = vec![
        ("build".to_owned(), StepStatus::Succeeded),
        ("test".to_owned(), StepStatus::Running),
        ("deploy".to_owned(), StepStatus::Pending),
    ];
    assert_eq!(status(&store), expected);
    assert_eq!(store.attempts("r-1").unwrap().len(), 2);

    // A pass whose last write is refused (build is final: it never runs again) leaves
    // nothing behind, not even the writes before it; the error names the batch.
    let refused = [
        Write::StepStatus { run_id: "r-1".into(), step_id: "deploy".into(), status: StepStatus::Skipped, error: None },
        Write::AttemptStarted(attempt("r-1", "build", 2, AttemptKind::Main)),
    ];
    let err = store.commit(&refused).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("already succeeded"), "{err}");
    assert_eq!(status(&store), expected);
    assert_eq!(store.attempts("r-1").unwrap().len(), 2);
    store.commit(&[]).unwrap(); // nothing to do
}
