//! The PostgreSQL store: the shared conformance suite, plus what only PostgreSQL has (racing
//! claims across connection pools, LISTEN/NOTIFY across stores, listener reconnect, schema
//! versioning and concurrent migrations).
//!
//! Every test uses its own schema, created by the store and dropped afterwards, so the tests run
//! in parallel against one database. The database is `HARVEST_TEST_DATABASE_URL`; when it is not
//! set each test prints that it is skipped and passes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use harvest::session::SessionStatus;
use harvest::store::postgres::PostgresStore;
use harvest::store::{SessionClaim, SessionInsert, Store, StoreError};

use crate::store_conformance::{Fixture, at, insert, session};

const URL_ENV: &str = "HARVEST_TEST_DATABASE_URL";

/// The test database URL, or `None` after printing why the test is skipped. Under CI
/// (`HARVEST_CI=1`, set by `.ci/run`) a missing URL fails the test instead: the PostgreSQL
/// suite must have run for CI to pass.
pub(crate) fn database_url() -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("HARVEST_CI").as_deref() != Ok("1"),
                "{URL_ENV} is not set under CI (HARVEST_CI=1): the PostgreSQL suite did not run"
            );
            eprintln!("skipped: {URL_ENV} is not set");
            None
        }
    }
}

/// A schema name no other test (in this or a parallel run) uses.
pub(crate) fn unique_schema() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("harvest_t_{}_{n}_{nanos}", std::process::id())
}

/// A config of the PostgreSQL store in a schema of its own (dropped with the guard), or `None`
/// when the test is skipped ([`database_url`] says so).
pub(crate) fn postgres_config() -> Option<(harvest::config::Config, SchemaGuard)> {
    let url = database_url()?;
    let schema = unique_schema();
    let guard = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let config = harvest::config::Config {
        store: harvest::config::StoreKind::Postgres,
        database_url: Some(url),
        database_schema: schema,
        ..harvest::config::Config::default()
    };
    Some((config, guard))
}

/// Drops its schema (and everything in it) when dropped.
pub(crate) struct SchemaGuard {
    pub(crate) url: String,
    pub(crate) schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with its own
        // runtime does the cleanup and is joined so the schema is gone when the test ends.
        let url = self.url.clone();
        let schema = self.schema.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = admin(&url).await?;
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await?;
                anyhow::Ok(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test schema {}: {e}", self.schema),
            Err(_) => eprintln!("dropping test schema {} panicked", self.schema),
        }
    }
}

/// A plain connection for inspecting and tampering with the database.
pub(crate) async fn admin(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A store in a fresh schema, and the guard that drops the schema.
async fn fresh(url: &str) -> (PostgresStore, SchemaGuard) {
    let schema = unique_schema();
    let guard = SchemaGuard {
        url: url.to_string(),
        schema: schema.clone(),
    };
    let store = PostgresStore::connect_with_schema(url, &schema)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url} (schema {schema}): {e}"));
    (store, guard)
}

async fn fixture(url: &str) -> Fixture {
    let (store, guard) = fresh(url).await;
    Fixture {
        store: Arc::new(store),
        guard: Box::new(guard),
    }
}

/// The conformance suite on PostgreSQL; each check skips when there is no database.
mod conformance {
    async fn fixture() -> Option<crate::store_conformance::Fixture> {
        let url = super::database_url()?;
        Some(super::fixture(&url).await)
    }

    crate::store_conformance::store_conformance!(fixture);
}

/// 8 tasks over 4 stores (4 pools, as if 4 processes) claim 400 sessions: each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_locked_claims_from_many_pools_never_double_claim() {
    let Some(url) = database_url() else { return };
    let (first, _guard) = fresh(&url).await;
    let mut stores: Vec<Arc<dyn Store>> = vec![Arc::new(first)];
    for _ in 1..4 {
        let other = PostgresStore::connect_with_schema(&url, &_guard.schema)
            .await
            .expect("connect");
        stores.push(Arc::new(other));
    }
    const N: usize = 400;
    for i in 0..N {
        insert(&stores[i % 4], session(&format!("s{i:04}"))).await;
    }
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = stores[t % 4].clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            // Bounded: N claims of at least one session each would drain the queue.
            for _ in 0..N {
                let got = store
                    .session_claim(SessionClaim {
                        owner: format!("w{t}"),
                        limit: 5,
                        lease: Duration::from_secs(30),
                        now: at(1),
                    })
                    .await
                    .expect("claim");
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|s| s.id.to_string()));
            }
            (t, mine)
        }));
    }
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        let (t, mine) = task.await.expect("claim task");
        for id in mine {
            if let Some(prev) = owners.insert(id.clone(), t) {
                panic!("{id} was claimed by w{prev} and w{t}");
            }
        }
    }
    assert_eq!(owners.len(), N, "every session claimed exactly once");
    let counts = stores[0].session_counts(at(1)).await.expect("counts");
    assert_eq!(
        counts.by_status.get(&SessionStatus::Running),
        Some(&(N as u64)),
        "{counts:?}"
    );
    for s in stores {
        s.close().await.expect("close");
    }
}

/// A session inserted through one store wakes a waiter of another (only NOTIFY connects them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_from_another_store_wakes_pending_wait() {
    let Some(url) = database_url() else { return };
    let (waiter_store, guard) = fresh(&url).await;
    let waiter_store = Arc::new(waiter_store);
    let submitter = PostgresStore::connect_with_schema(&url, &guard.schema)
        .await
        .expect("connect");
    assert!(
        waiter_store.listener_ready(Duration::from_secs(10)).await,
        "listener never connected"
    );
    // The listener leaves one permit when it connects; use it up so the wait below is real.
    waiter_store.pending_wait(Duration::ZERO).await;

    let waiter = {
        let store = waiter_store.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            store.pending_wait(Duration::from_secs(60)).await;
            start.elapsed()
        })
    };
    insert(&(Arc::new(submitter) as Arc<dyn Store>), session("a")).await;
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter did not wake within 30 s of another store's insert")
        .expect("waiter task");
    assert!(waited < Duration::from_secs(30), "woke after {waited:?}");
}

/// A requeue through one store wakes a waiter of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_on_requeue_wakes_other_store() {
    let Some(url) = database_url() else { return };
    let (waiter_store, guard) = fresh(&url).await;
    let waiter_store = Arc::new(waiter_store);
    let worker: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_schema(&url, &guard.schema)
            .await
            .expect("connect"),
    );
    insert(&worker, session("a")).await;
    let s = crate::store_conformance::claim(&worker, "w", 1, at(1))
        .await
        .remove(0);
    assert!(
        waiter_store.listener_ready(Duration::from_secs(10)).await,
        "listener never connected"
    );
    waiter_store.pending_wait(Duration::ZERO).await;

    let waiter = {
        let store = waiter_store.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            store.pending_wait(Duration::from_secs(60)).await;
            start.elapsed()
        })
    };
    let outcome = worker
        .session_requeue_if_running(harvest::store::SessionRequeue {
            attempt: harvest::store::AttemptRef {
                id: harvest::SessionKey::from(s.id.clone()),
                attempt: s.attempt,
                owner: "w".into(),
            },
            spend_attempt: false,
            run_at: at(2),
            error: None,
            cleanup_after: Duration::from_secs(98),
            now: at(2),
        })
        .await
        .expect("requeue")
        .map(|s| harvest::store::RequeueOutcome::of(s.status));
    assert_eq!(outcome, Some(harvest::store::RequeueOutcome::Requeued));
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter did not wake within 30 s of another store's requeue")
        .expect("waiter task");
    assert!(waited < Duration::from_secs(30), "woke after {waited:?}");
}

/// When the server kills the listener's connection, the store reconnects and keeps waking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_connection_is_killed() {
    let Some(url) = database_url() else { return };
    let (store, guard) = fresh(&url).await;
    let store = Arc::new(store);
    assert!(
        store.listener_ready(Duration::from_secs(10)).await,
        "listener never connected"
    );
    let db = admin(&url).await.expect("admin connection");
    let app = format!("harvest-listener {}", guard.schema);
    let killed = db
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("terminate the listener");
    assert_eq!(killed.len(), 1, "exactly one listener connection for {app}");
    let old_pid: i32 = killed[0].get(0);

    // Wait (bounded) until a new listener backend is there and listening.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = db
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2",
                &[&app, &old_pid],
            )
            .await
            .expect("pg_stat_activity");
        if !rows.is_empty() && store.listener_ready(Duration::from_millis(0)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener did not reconnect within 20 s"
        );
        // A polled condition with a deadline: the server's view has no event to wait on. A
        // new backend means the task saw the old one die (it clears `ready` before
        // reconnecting), so `ready` is then about the new connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.pending_wait(Duration::ZERO).await;

    let other: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_schema(&url, &guard.schema)
            .await
            .expect("connect"),
    );
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            store.pending_wait(Duration::from_secs(60)).await;
            start.elapsed()
        })
    };
    insert(&other, session("after-reconnect")).await;
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("no wake-up after the listener reconnected")
        .expect("waiter task");
    assert!(waited < Duration::from_secs(30), "woke after {waited:?}");
}

/// A schema migrated by a newer harvest is refused with a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_version_is_refused() {
    let Some(url) = database_url() else { return };
    let (store, guard) = fresh(&url).await;
    store.close().await.expect("close");
    let db = admin(&url).await.expect("admin connection");
    db.batch_execute(&format!(
        "INSERT INTO {}.harvest_schema_version (version) VALUES (99)",
        guard.schema
    ))
    .await
    .expect("pretend a newer harvest migrated");
    match PostgresStore::connect_with_schema(&url, &guard.schema).await {
        Err(e @ StoreError::NewerVersion { found: 99, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&guard.schema),
                "the message names the schema: {msg}"
            );
            assert!(
                msg.contains("upgrade harvest"),
                "the message says what to do: {msg}"
            );
        }
        Err(e) => panic!("expected NewerVersion, got {e}"),
        Ok(_) => panic!("a schema of version 99 was accepted"),
    }
}

/// Several processes starting at once migrate once; reconnecting changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_race_free() {
    let Some(url) = database_url() else { return };
    let schema = unique_schema();
    let guard = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let mut starts = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        let schema = schema.clone();
        starts.push(tokio::spawn(async move {
            PostgresStore::connect_with_schema(&url, &schema).await
        }));
    }
    let mut stores = Vec::new();
    for s in starts {
        stores.push(s.await.expect("connect task").expect("concurrent connect"));
    }
    let store: Arc<dyn Store> = Arc::new(stores.remove(0));
    insert(&store, session("kept")).await;
    let again = PostgresStore::connect_with_schema(&url, &schema)
        .await
        .expect("reconnect");
    assert!(
        again
            .session_get(&harvest::SessionKey::from(
                &"kept".parse::<harvest::SessionId>().unwrap()
            ))
            .await
            .unwrap()
            .is_some(),
        "data kept"
    );

    let db = admin(&url).await.expect("admin connection");
    let rows = db
        .query(
            &format!(
                "SELECT version FROM {}.harvest_schema_version",
                guard.schema
            ),
            &[],
        )
        .await
        .expect("versions");
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    // One per file in migrations/, numbered from 1.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations/")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count() as i32;
    let expected: Vec<i32> = (1..=files).collect();
    assert_eq!(versions, expected, "each migration recorded once");
}

/// A bad schema name and a bad URL are refused before anything is sent.
#[tokio::test]
async fn bad_schema_name_and_url_are_invalid() {
    let r = PostgresStore::connect_with_schema("postgres://x@127.0.0.1/db", "Robert'); DROP").await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    let r = PostgresStore::connect("not a url at all ::").await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
}

/// A single-session agent admits one of many racing submissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_agent_racing_inserts_admit_one() {
    let Some(url) = database_url() else { return };
    let (store, _guard) = fresh(&url).await;
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = session(&format!("run{i}"));
            s.job.agent = Some("nightly".into());
            store
                .session_insert(SessionInsert {
                    session: s,
                    single_agent: Some("nightly".into()),
                })
                .await
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        if let harvest::store::InsertOutcome::Inserted(_) = t.await.expect("task").expect("insert")
        {
            inserted += 1;
        }
    }
    assert_eq!(
        inserted, 1,
        "exactly one racing submission of a single-session agent is admitted"
    );
}

/// Claims per second, 8 claimers of 10 over 4 pools; run with
/// `cargo test --release --test integration store_postgres::claim_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn claim_throughput() {
    let Some(url) = database_url() else { return };
    let (first, guard) = fresh(&url).await;
    let mut stores: Vec<Arc<dyn Store>> = vec![Arc::new(first)];
    for _ in 1..4 {
        stores.push(Arc::new(
            PostgresStore::connect_with_schema(&url, &guard.schema)
                .await
                .expect("connect"),
        ));
    }
    const N: usize = 20_000;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = stores[t % 4].clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..N).step_by(8) {
                insert(&store, session(&format!("s{i:06}"))).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("insert task");
    }
    let inserted = start.elapsed();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = stores[t % 4].clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..N {
                let got = store
                    .session_claim(SessionClaim {
                        owner: format!("w{t}"),
                        limit: 10,
                        lease: Duration::from_secs(30),
                        now: at(1),
                    })
                    .await
                    .expect("claim");
                if got.is_empty() {
                    break;
                }
                n += got.len();
            }
            n
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.expect("claim task");
    }
    let took = start.elapsed();
    assert_eq!(claimed, N);
    println!(
        "postgres: {N} inserts in {inserted:?} ({:.0}/s); {N} claims in {took:?} ({:.0}/s)",
        N as f64 / inserted.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
}

/// A server that is not there is a typed PostgreSQL error, unavailable, whose message says what
/// was being done and why it failed (no database needed: the port refuses).
#[tokio::test]
async fn a_refused_connection_is_a_postgres_error_that_is_unavailable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("postgres://harvest@127.0.0.1:{port}/db?connect_timeout=5");
    let err = PostgresStore::connect_with_schema(&url, "s")
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(err, StoreError::Postgres { .. }),
        "a PostgreSQL error: {err:?}"
    );
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        std::error::Error::source(&err).is_some_and(|s| s.is::<tokio_postgres::Error>()),
        "the driver's error is the cause: {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("PostgreSQL, connecting") && msg.contains("error connecting to server: "),
        "{msg}"
    );
}

/// Errors the server reports are told apart by their SQLSTATE: a violated constraint or a bad
/// statement is not unavailable; the server ending the connection is, and so is every later
/// call on that connection.
#[tokio::test]
async fn server_errors_are_unavailable_only_when_the_connection_goes() {
    let Some(url) = database_url() else { return };
    let wrap = |source| StoreError::Postgres {
        context: "testing".into(),
        source,
    };
    let db = admin(&url).await.expect("admin connection");
    db.batch_execute("CREATE TEMPORARY TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .expect("temporary table");
    let duplicate = wrap(
        db.execute("INSERT INTO t VALUES (1)", &[])
            .await
            .expect_err("duplicate key"),
    );
    assert!(!duplicate.is_unavailable(), "{duplicate}");
    assert!(duplicate.to_string().contains("(23505)"), "{duplicate}");
    let bad = wrap(
        db.execute("SELECT 1 / 0", &[])
            .await
            .expect_err("division by zero"),
    );
    assert!(!bad.is_unavailable(), "{bad}");

    let terminated = wrap(
        db.execute("SELECT pg_terminate_backend(pg_backend_pid())", &[])
            .await
            .expect_err("the server ends the connection"),
    );
    assert!(terminated.is_unavailable(), "{terminated}");
    let after = wrap(
        db.execute("SELECT 1", &[])
            .await
            .expect_err("the connection is gone"),
    );
    assert!(after.is_unavailable(), "{after}");
}

/// Migration 6 (tenant-scoped keys) on a schema holding data of version 5: every session,
/// record and log line is found in the single namespace, and ids can then be reused by tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_6_keeps_version_5_data_in_the_single_namespace() {
    use harvest::SessionKey;
    use harvest::store::{AttemptRef, CheckpointBatch, CheckpointCommit, RecordsPage};
    let Some(url) = database_url() else { return };
    let (store, guard) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    for (name, n) in [("old-a", 2usize), ("old-b", 3)] {
        insert(&store, session(name)).await;
        let claimed = crate::store_conformance::claim(&store, "w", 1, at(1)).await;
        let s = &claimed[0];
        let batch = CheckpointBatch {
            records: (0..n).map(|i| serde_json::json!({ "i": i })).collect(),
            log: vec![harvest::session::LogLine {
                at: at(2),
                level: "info".into(),
                message: format!("log of {name}"),
            }],
            ..Default::default()
        };
        store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: AttemptRef {
                    id: s.key(),
                    attempt: s.attempt,
                    owner: s.lease.as_ref().expect("lease").owner.clone(),
                },
                batch,
                lease: Duration::from_secs(30),
                now: at(2),
            })
            .await
            .expect("checkpoint")
            .expect("applied");
    }
    store.close().await.expect("close");
    drop(store);
    // Back to the shape of version 5: the keys without a tenant.
    let db = admin(&url).await.expect("admin connection");
    let s = &guard.schema;
    db.batch_execute(&format!(
        "ALTER TABLE {s}.sessions DROP CONSTRAINT sessions_pkey, DROP COLUMN tenant, ADD PRIMARY KEY (id);
         ALTER TABLE {s}.records DROP CONSTRAINT records_pkey, DROP COLUMN tenant, ADD PRIMARY KEY (session_id, seq);
         DROP INDEX {s}.frontier_pos_idx;
         ALTER TABLE {s}.frontier DROP CONSTRAINT frontier_pkey, DROP COLUMN tenant, ADD PRIMARY KEY (session_id, url);
         CREATE INDEX frontier_pos_idx ON {s}.frontier (session_id, pos);
         ALTER TABLE {s}.seen DROP CONSTRAINT seen_pkey, DROP COLUMN tenant, ADD PRIMARY KEY (session_id, url);
         ALTER TABLE {s}.log DROP CONSTRAINT log_pkey, DROP COLUMN tenant, ADD PRIMARY KEY (session_id, id);
         ALTER TABLE {s}.context DROP CONSTRAINT context_pkey, DROP COLUMN tenant, ADD PRIMARY KEY (session_id);
         DROP TRIGGER sessions_events ON {s}.sessions;
         DROP TRIGGER sessions_events_updated ON {s}.sessions;
         DROP TRIGGER sessions_events_inserted ON {s}.sessions;
         DROP FUNCTION {s}.harvest_session_event();
         DROP FUNCTION {s}.harvest_session_events_updated();
         DROP FUNCTION {s}.harvest_session_events_inserted();
         DROP TABLE {s}.events;
         DELETE FROM {s}.harvest_schema_version WHERE version >= 6;"
    ))
    .await
    .expect("downgrade to version 5");
    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_schema(&url, s)
            .await
            .expect("migrate to 6"),
    );
    for (name, n) in [("old-a", 2usize), ("old-b", 3)] {
        let key = SessionKey::single(name.parse().unwrap());
        let got = store
            .session_get(&key)
            .await
            .unwrap()
            .expect("session kept");
        assert_eq!(got.tenant, None);
        assert_eq!(got.records, n as u64);
        let records = store
            .records_page(RecordsPage {
                id: key.clone(),
                offset: 0,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(records.len(), n);
        let log = store.log_tail(&key, 10).await.unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].message, format!("log of {name}"));
    }
    // A tenant may now take the same id.
    let mut s2 = session("old-a");
    s2.tenant = Some("acme".into());
    insert(&store, s2).await;
    assert!(
        store
            .session_get(&SessionKey::new(Some("acme"), "old-a".parse().unwrap()))
            .await
            .unwrap()
            .is_some()
    );
}

/// Every transition records its event in the same transaction, in order, with the session as
/// the transition left it; a heartbeat records none. Events older than the retention go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_record_their_events_in_order() {
    use harvest::event::EventKind;
    use harvest::store::{
        AttemptRef, CheckpointBatch, CheckpointCommit, SessionFinish, SessionHeartbeat,
    };
    let Some(url) = database_url() else { return };
    let (store, _guard) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    assert!(store.events_recorded());
    let start = store.events_last_id().await.expect("last id");
    insert(&store, session("ev")).await;
    let s = crate::store_conformance::claim(&store, "w", 1, at(1))
        .await
        .remove(0);
    let aref = AttemptRef {
        id: s.key(),
        attempt: s.attempt,
        owner: "w".into(),
    };
    store
        .session_heartbeat_if_running(SessionHeartbeat {
            attempt: aref.clone(),
            lease: Duration::from_secs(30),
            now: at(2),
        })
        .await
        .expect("heartbeat");
    store
        .checkpoint_commit_if_running(CheckpointCommit {
            attempt: aref.clone(),
            batch: CheckpointBatch {
                records: vec![serde_json::json!({"n": 1})],
                ..Default::default()
            },
            lease: Duration::from_secs(30),
            now: at(3),
        })
        .await
        .expect("checkpoint")
        .expect("applied");
    store
        .session_finish_if_running(SessionFinish {
            attempt: aref,
            status: SessionStatus::Completed,
            error: None,
            batch: CheckpointBatch::default(),
            cleanup_after: Duration::from_secs(60),
            now: at(4),
        })
        .await
        .expect("finish")
        .expect("applied");
    store.session_remove(&s.key()).await.expect("remove");
    let events = events_in(&store, start, Default::default()).await;
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::Started,
            EventKind::Progress,
            EventKind::Completed,
            EventKind::Removed
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    let status: Vec<Option<SessionStatus>> = events
        .iter()
        .map(|e| e.session.as_ref().map(|s| s.status))
        .collect();
    // Each as its transition left it; `removed` carries the session as it was (with its spec),
    // the others lost theirs with the row (their spec is read from the live row).
    assert_eq!(status[4], Some(SessionStatus::Completed));
    assert!(status[..4].iter().all(Option::is_none), "{status:?}");
    assert_eq!(events[4].session.as_ref().map(|s| s.records), Some(1));
    assert!(events.iter().all(|e| e.session_id.as_str() == "ev"));

    // While the session lives, each event carries the session as it was then.
    insert(&store, session("live")).await;
    let c = crate::store_conformance::claim(&store, "w", 1, at(5))
        .await
        .remove(0);
    let events = events_in(&store, events[4].id, Default::default()).await;
    let got: Vec<(EventKind, Option<SessionStatus>, Option<u32>)> = events
        .iter()
        .map(|e| {
            (
                e.kind,
                e.session.as_ref().map(|s| s.status),
                e.session.as_ref().map(|s| s.attempt),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Created, Some(SessionStatus::Pending), Some(0)),
            (
                EventKind::Started,
                Some(SessionStatus::Running),
                Some(c.attempt)
            ),
        ]
    );
    // A scope is filtered by the store: one session's events, one client's.
    let scoped = |scope| {
        let store = store.clone();
        async move {
            events_in(&store, start, scope)
                .await
                .iter()
                .map(|e| (e.kind, e.session_id.to_string()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        scoped(harvest::event::EventScope::Session(c.key())).await,
        [
            (EventKind::Created, "live".to_string()),
            (EventKind::Started, "live".to_string())
        ]
    );
    assert_eq!(
        scoped(harvest::event::EventScope::Client(
            c.client.client_id().to_string()
        ))
        .await
        .len(),
        7
    );
    assert!(
        scoped(harvest::event::EventScope::Client("someone-else".into()))
            .await
            .is_empty()
    );
    assert_eq!(
        store
            .events_expire(Duration::from_secs(3600))
            .await
            .expect("expire"),
        0
    );
    assert_eq!(
        store.events_expire(Duration::ZERO).await.expect("expire"),
        7
    );
    assert_eq!(store.events_last_id().await.expect("last"), 0);
}

/// Migration 8 (events as columns) on a schema holding events written by version 7's JSON
/// trigger: each old event reads back as it was written (kind, order, the session as the
/// transition left it, the spec of a removed one), and new events continue the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_8_keeps_version_7_events() {
    use harvest::event::EventKind;
    let Some(url) = database_url() else { return };
    let (store, guard) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    insert(&store, session("kept")).await;
    let claimed = crate::store_conformance::claim(&store, "w", 1, at(1)).await;
    assert_eq!(claimed[0].id.as_str(), "kept");
    insert(&store, session("gone")).await;
    let before = store.events_last_id().await.expect("last id");
    store.close().await.expect("close");
    drop(store);

    // Back to version 7: its events table and trigger, then transitions it records as JSON.
    let db = admin(&url).await.expect("admin connection");
    let s = &guard.schema;
    db.batch_execute(&format!(
        "DROP TRIGGER sessions_events ON {s}.sessions;
         DROP TRIGGER sessions_events_updated ON {s}.sessions;
         DROP TRIGGER sessions_events_inserted ON {s}.sessions;
         DROP FUNCTION {s}.harvest_session_event();
         DROP FUNCTION {s}.harvest_session_events_updated();
         DROP FUNCTION {s}.harvest_session_events_inserted();
         DROP TABLE {s}.events;
         DELETE FROM {s}.harvest_schema_version WHERE version >= 8;
         SET search_path TO {s};
         {v7}
         SELECT setval('{s}.events_id_seq', {before});
         UPDATE {s}.sessions SET checkpoints = checkpoints + 1, records = 4 WHERE id = 'kept';
         DELETE FROM {s}.sessions WHERE id = 'gone';
         RESET search_path;",
        v7 = include_str!("../../migrations/0007_events.sql"),
    ))
    .await
    .expect("downgrade to version 7");

    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_schema(&url, s)
            .await
            .expect("migrate to 8"),
    );
    let events = events_in(&store, before, Default::default()).await;
    // (id, kind, session, its status, its records)
    type Seen<'a> = (u64, EventKind, &'a str, Option<SessionStatus>, Option<u64>);
    let got: Vec<Seen> = events
        .iter()
        .map(|e| {
            (
                e.id,
                e.kind,
                e.session_id.as_str(),
                e.session.as_ref().map(|s| s.status),
                e.session.as_ref().map(|s| s.records),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                before + 1,
                EventKind::Progress,
                "kept",
                Some(SessionStatus::Running),
                Some(4)
            ),
            (
                before + 2,
                EventKind::Removed,
                "gone",
                Some(SessionStatus::Pending),
                Some(0)
            ),
        ]
    );
    // The removed session's config came through the JSON and back.
    let gone = events[1]
        .session
        .as_ref()
        .expect("removed carries its session");
    assert_eq!(gone.job, session("gone").job);
    // New events continue the ids.
    insert(&store, session("after")).await;
    let next = events_in(&store, before + 2, Default::default()).await;
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].id, next[0].kind), (before + 3, EventKind::Created));
}

/// The events trigger copies a session row into `events` by position (`NEW.*`): after every
/// migration, `events` is `event_id`, `event_kind`, `event_at`, then exactly the columns of
/// `sessions`, same names, types and order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_mirror_the_sessions_columns() {
    let Some(url) = database_url() else { return };
    let (_store, guard) = fresh(&url).await;
    let db = admin(&url).await.expect("admin connection");
    let columns = |table: &'static str| {
        let db = &db;
        let schema = guard.schema.clone();
        async move {
            db.query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a \
                 WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass \
                 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
        }
    };
    let sessions = columns("sessions").await;
    let events = columns("events").await;
    assert!(sessions.len() > 30, "{sessions:?}");
    let head: Vec<&str> = events.iter().take(3).map(|(n, _)| n.as_str()).collect();
    assert_eq!(head, ["event_id", "event_kind", "event_at"]);
    assert_eq!(events[3..], sessions[..]);
    // The UPDATE and INSERT triggers' functions name every column (migrations 9 and 10 list
    // them).
    for function in [
        "harvest_session_events_updated",
        "harvest_session_events_inserted",
    ] {
        let body: String = db
            .query_one(
                "SELECT pg_get_functiondef((quote_ident($1) || '.' || $2)::regproc)",
                &[&guard.schema, &function],
            )
            .await
            .expect("the trigger's function")
            .get(0);
        for (name, _) in sessions.iter().filter(|(n, _)| n != "spec") {
            assert!(
                body.contains(&format!("n.{name},")) || body.contains(&format!("n.{name}\n")),
                "{function} does not copy {name}: recreate it as migrations 9 and 10 do"
            );
        }
    }
}

/// A session's scope tells two tenants' sessions of the same id apart, and a client's scope
/// keeps only that client's (tenants are clients here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_event_reads_keep_tenants_apart() {
    use harvest::event::EventScope;
    let Some(url) = database_url() else { return };
    let (store, _guard) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    let start = store.events_last_id().await.expect("last id");
    let mut keys = Vec::new();
    for tenant in ["acme", "globex"] {
        let mut s = session("same");
        s.tenant = Some(tenant.into());
        s.client = harvest::session::ClientContext::of(tenant);
        keys.push(insert(&store, s).await.key());
    }
    let read = |scope: EventScope| {
        let store = store.clone();
        async move {
            events_in(&store, start, scope)
                .await
                .iter()
                .map(|e| (e.tenant.clone(), e.client_id.clone()))
                .collect::<Vec<_>>()
        }
    };
    let globex = (Some("globex".to_string()), "globex".to_string());
    assert_eq!(
        read(EventScope::Session(keys[1].clone())).await,
        std::slice::from_ref(&globex)
    );
    assert_eq!(read(EventScope::Client("globex".into())).await, [globex]);
    assert_eq!(read(EventScope::All).await.len(), 2);
}

/// The store's events after `after` in `scope` (at most 100).
async fn events_in(
    store: &Arc<dyn Store>,
    after: u64,
    scope: harvest::event::EventScope,
) -> Vec<harvest::event::Event> {
    store
        .events_after(harvest::store::EventsAfter {
            after,
            limit: 100,
            scope,
        })
        .await
        .expect("events")
}

/// A batch insert is one statement whose trigger writes the `created` events of the rows it
/// inserted (migration 10): one per inserted session, none for a key already taken, with ids in
/// the order of the sessions' `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_insert_records_one_created_event_per_inserted_session() {
    use harvest::event::{EventKind, EventScope};
    use harvest::store::InsertOutcome;
    let Some(url) = database_url() else { return };
    let (store, _guard) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    insert(&store, session("taken")).await;
    let start = store.events_last_id().await.expect("last id");
    let out = store
        .session_insert_many(vec![
            session("b1"),
            session("taken"),
            session("b2"),
            session("b3"),
        ])
        .await
        .expect("insert many");
    assert!(matches!(out[1], Err(StoreError::Duplicate(_))), "{out:?}");
    let inserted: Vec<(String, u64)> = out
        .iter()
        .filter_map(|r| match r {
            Ok(InsertOutcome::Inserted(s)) => Some((s.id.to_string(), s.seq)),
            _ => None,
        })
        .collect();
    assert_eq!(inserted.len(), 3, "{out:?}");
    assert!(inserted.windows(2).all(|w| w[0].1 < w[1].1), "{inserted:?}");
    let events = events_in(&store, start, EventScope::All).await;
    assert!(
        events.iter().all(|e| e.kind == EventKind::Created),
        "{events:?}"
    );
    let recorded: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            (
                e.session_id.to_string(),
                e.session.as_ref().map_or(0, |s| s.seq),
            )
        })
        .collect();
    assert_eq!(recorded, inserted);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
}

/// A submission through one store wakes both waiters of another: its claimers (`harvest_pending`)
/// and its event feed (`harvest_events`). The store owes both NOTIFYs after an insert and sends
/// them in one statement; each channel must still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_insert_wakes_both_the_claimers_and_the_event_feed_of_another_store() {
    let Some(url) = database_url() else { return };
    let (waiter_store, guard) = fresh(&url).await;
    let waiter_store = Arc::new(waiter_store);
    let submitter: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_schema(&url, &guard.schema)
            .await
            .expect("connect"),
    );
    assert!(
        waiter_store.listener_ready(Duration::from_secs(10)).await,
        "listener never connected"
    );
    // The listener leaves one permit of each when it connects; use them up so the waits below
    // are real.
    waiter_store.pending_wait(Duration::ZERO).await;
    waiter_store.events_wait(Duration::ZERO).await;
    let pending = {
        let store = waiter_store.clone();
        tokio::spawn(async move { store.pending_wait(Duration::from_secs(60)).await })
    };
    let events = {
        let store = waiter_store.clone();
        tokio::spawn(async move { store.events_wait(Duration::from_secs(60)).await })
    };
    let start = Instant::now();
    insert(&submitter, session("a")).await;
    for (what, waiter) in [("pending", pending), ("events", events)] {
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .unwrap_or_else(|_| panic!("the {what} waiter did not wake within 30 s"))
            .expect("waiter task");
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "woke after {:?}",
        start.elapsed()
    );
}

/// A batch of finishes is one transaction sent in one round trip (`BEGIN`, the statement and
/// `COMMIT` together). When its statement fails, nothing of it is written, and the connection
/// goes back to the pool outside any transaction: every later call works (one left in the
/// failed transaction would refuse every statement until its end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_finish_writes_nothing_and_leaves_its_connection_usable() {
    let Some(url) = database_url() else { return };
    let (store, guard) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    // Only this test's schema refuses one session's end.
    admin(&url)
        .await
        .expect("connect")
        .batch_execute(&format!(
            "ALTER TABLE {}.sessions ADD CONSTRAINT poisoned \
             CHECK (id <> 'poison' OR status <> 'COMPLETED')",
            guard.schema
        ))
        .await
        .expect("add the constraint");
    const N: usize = 40;
    for i in 0..N {
        insert(&store, session(&format!("s{i:02}"))).await;
    }
    insert(&store, session("poison")).await;
    let claimed = crate::store_conformance::claim(&store, "w", N + 1, at(1)).await;
    assert_eq!(claimed.len(), N + 1);
    let finish = |s: &harvest::session::Session| harvest::store::SessionFinish {
        attempt: harvest::store::AttemptRef {
            id: s.key(),
            attempt: s.attempt,
            owner: "w".into(),
        },
        status: SessionStatus::Completed,
        error: None,
        batch: Default::default(),
        cleanup_after: Duration::from_secs(60),
        now: at(2),
    };
    let all: Vec<_> = claimed.iter().map(finish).collect();
    let e = store
        .session_finish_many(&all)
        .await
        .expect_err("the poisoned session fails the batch's statement");
    assert!(e.to_string().contains("poisoned"), "{e}");
    // Then one call at a time, more calls than the pool has connections: each would fail on a
    // connection left inside the failed transaction.
    for (i, s) in claimed.iter().enumerate() {
        let got = store
            .session_get(&s.key())
            .await
            .unwrap_or_else(|e| panic!("read {i} after the failed finish: {e}"));
        assert_eq!(
            got.map(|s| s.status),
            Some(SessionStatus::Running),
            "{}: nothing of the failed batch is written",
            s.id
        );
        if s.id.as_str() != "poison" {
            let done = store
                .session_finish_many(std::slice::from_ref(&finish(s)))
                .await
                .unwrap_or_else(|e| panic!("finish {i} after the failed one: {e}"));
            assert_eq!(
                done[0]
                    .as_ref()
                    .ok()
                    .and_then(|s| s.as_ref())
                    .map(|s| s.status),
                Some(SessionStatus::Completed)
            );
        }
    }
    store.close().await.expect("close");
}

/// Notifications on `harvest_pending` for `schema`, as the instants they arrived, from a
/// connection of their own that LISTENs.
async fn pending_notifications(
    url: &str,
    schema: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<Instant>,
) {
    use futures::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let schema = schema.to_string();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m
                && n.channel() == "harvest_pending"
                && n.payload() == schema
            {
                let _ = tx.send(Instant::now());
            }
        }
    });
    client
        .batch_execute("LISTEN harvest_pending")
        .await
        .expect("listen");
    (client, rx)
}

/// The next notification `heard`, within 10 s.
async fn next_notification(
    heard: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>,
    what: &str,
) -> Instant {
    match tokio::time::timeout(Duration::from_secs(10), heard.recv()).await {
        Ok(Some(t)) => t,
        _ => panic!("no notification for the {what} submission within 10 s"),
    }
}

/// The store's NOTIFYs to other processes are at least 10 ms apart (`NOTIFY_GAP`): a burst of
/// 400 submissions from 16 tasks is announced by a handful, not one per commit. No request is
/// dropped for it: a submission made while the gap runs is announced once the gap is over, so
/// two back-to-back submissions are two notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_to_other_processes_are_paced_and_none_is_dropped() {
    const GAP: Duration = Duration::from_millis(10);
    let Some(url) = database_url() else { return };
    let (store, guard) = fresh(&url).await;
    let (_listener, mut heard) = pending_notifications(&url, &guard.schema).await;
    let store: Arc<dyn Store> = Arc::new(store);
    // A quiet spell first, so the first submission is announced at once.
    tokio::time::sleep(GAP * 2).await;
    let count_until_quiet = |heard: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>| {
        let mut times = Vec::new();
        while let Ok(t) = heard.try_recv() {
            times.push(t);
        }
        times
    };

    // The first submission is announced at once. The second, made as soon as that is heard
    // (within the gap, unless this machine is very slow), is announced once the gap is over:
    // two notifications. (Made before the first was sent, it would share its statement.)
    insert(&store, session("first")).await;
    next_notification(&mut heard, "first").await;
    insert(&store, session("second")).await;
    next_notification(&mut heard, "second").await;
    tokio::time::sleep(GAP * 5).await;
    let extra = count_until_quiet(&mut heard);
    assert!(
        extra.is_empty(),
        "{} notifications more than owed",
        extra.len()
    );

    // A burst: at most one notification per gap.
    let start = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    insert(&store, session(&format!("b{t:02}-{i:02}"))).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("submitter");
    }
    tokio::time::sleep(GAP * 5).await;
    let times = count_until_quiet(&mut heard);
    let last = *times
        .last()
        .expect("a burst of 400 submissions was never announced");
    let most = (last - start).as_secs_f64() / GAP.as_secs_f64() + 1.0;
    assert!(
        (times.len() as f64) <= most,
        "{} notifications in {:?}: more than one per {GAP:?}",
        times.len(),
        last - start
    );
}
