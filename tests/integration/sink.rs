//! Export sinks: the PostgreSQL table sink writes each record exactly once across a crash between
//! its row insert and the session's status commit; file sinks are complete or absent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use harvest::config::Config;
use harvest::job::{Job, JobContext, JobOutcome};
use harvest::session::SessionStatus;
use harvest::sink::ExportSpec;
use harvest::store::postgres::PostgresStore;
use harvest::store::{AttemptRef, CheckpointBatch, CheckpointCommit, SessionClaim, Store};
use harvest::{Harvest, SubmitRequest};
use serde_json::json;

use crate::store_postgres::{SchemaGuard, admin, database_url, unique_schema};

/// Emits `total` records, `per` per checkpoint, resuming after the records already committed.
struct RecordsJob {
    total: u64,
    per: u64,
}

fn record(n: u64) -> serde_json::Value {
    json!({"n": n, "name": format!("item, \"{n}\"")})
}

fn records(from: u64, n: u64) -> Vec<serde_json::Value> {
    (from..from + n).map(record).collect()
}

#[async_trait]
impl Job for RecordsJob {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let mut done = ctx.resume.records;
        // Bounded: each pass commits at least one record or returns.
        loop {
            let n = self.per.min(self.total.saturating_sub(done));
            let batch = CheckpointBatch {
                records: records(done, n),
                ..Default::default()
            };
            done += n;
            if done >= self.total {
                return JobOutcome::Completed(batch);
            }
            if ctx.sink.commit(batch).await.is_err() {
                return JobOutcome::Stopped(CheckpointBatch::default());
            }
        }
    }
}

/// A PostgreSQL store in a schema of its own, an export schema, and the guards that drop both.
struct Fixture {
    url: String,
    export_schema: String,
    store: Arc<dyn Store>,
    _guards: [SchemaGuard; 2],
}

/// `None` (the test is skipped) without a test database.
async fn fixture() -> Option<Fixture> {
    let url = database_url()?;
    let (store_schema, export_schema) = (unique_schema(), unique_schema());
    let guard = |schema: &String| SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let _guards = [guard(&store_schema), guard(&export_schema)];
    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect_with_schema(&url, &store_schema)
            .await
            .expect("store"),
    );
    Some(Fixture {
        url,
        export_schema,
        store,
        _guards,
    })
}

fn config(export_schema: &str, url: &str, dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.export.schema = export_schema.to_string();
    cfg.export.database_url = Some(url.to_string());
    cfg.export.dir = dir.to_path_buf();
    cfg.workers.retry_backoff_ms = 10;
    cfg.workers.concurrency = 2;
    cfg
}

/// A started service on `store` whose sessions run [`RecordsJob`] (5 records, 2 per checkpoint).
async fn started(cfg: Config, store: &Arc<dyn Store>) -> Harvest {
    let harvest = Harvest::builder(cfg)
        .store(store.clone())
        .job(Arc::new(RecordsJob { total: 5, per: 2 }))
        .open()
        .await
        .expect("open");
    harvest.start();
    harvest
}

/// Submits `req` and waits for the session to end.
async fn complete(harvest: &Harvest, req: SubmitRequest) -> harvest::session::Session {
    harvest
        .submit(req)
        .await
        .expect("submit")
        .await_completion(Duration::from_secs(30))
        .await
        .expect("await")
        .expect("ends")
}

/// A worker commits all records, copies them to the table and writes the files, then dies before
/// committing COMPLETED. After its lease is reclaimed and the session resumes elsewhere, the table
/// holds each record exactly once, the files are whole, and closing the session deletes the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_sink_crash_between_rows_and_status_leaves_one_copy() {
    let Some(Fixture {
        url,
        export_schema,
        store,
        _guards,
    }) = fixture().await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let harvest = Harvest::builder(config(&export_schema, &url, dir.path()))
        .store(store.clone())
        .job(Arc::new(RecordsJob { total: 30, per: 10 }))
        .open()
        .await
        .expect("open");
    let spec_json = json!({"postgres_table": "items", "jsonl": true, "csv": true});
    let handle = harvest
        .submit(SubmitRequest::new(
            json!({"name": "sink", "export": spec_json}),
        ))
        .await
        .expect("submit");
    let spec: ExportSpec = serde_json::from_value(spec_json).expect("spec");

    // The worker that dies: all 30 records committed and exported (a retried export writes
    // nothing), files written, then no status commit.
    let now = harvest.clock().now();
    let claimed = store
        .session_claim(SessionClaim {
            owner: "dead".into(),
            limit: 1,
            lease: Duration::from_millis(1),
            now,
        })
        .await
        .expect("claim");
    let session = claimed.into_iter().next().expect("claimed the session");
    let attempt = AttemptRef {
        id: harvest::SessionKey::from(session.id.clone()),
        attempt: session.attempt,
        owner: "dead".into(),
    };
    for i in 0..3 {
        let applied = store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: attempt.clone(),
                batch: CheckpointBatch {
                    records: records(i * 10, 10),
                    ..Default::default()
                },
                lease: Duration::from_millis(1),
                now,
            })
            .await
            .expect("checkpoint")
            .is_some();
        assert!(applied, "checkpoint {i} applied");
        let written = harvest
            .sinks()
            .export_rows(&*store, &session, &spec)
            .await
            .expect("export");
        assert_eq!(written, 10, "checkpoint {i} copies its 10 rows");
        let again = harvest
            .sinks()
            .export_rows(&*store, &session, &spec)
            .await
            .expect("export again");
        assert_eq!(
            again, 0,
            "a retried export of checkpoint {i} writes nothing"
        );
    }
    harvest
        .sinks()
        .export_all(&*store, &session, &spec)
        .await
        .expect("export all");

    // Resume: the lease expired at once; maintenance reclaims, a worker finishes it.
    harvest.start();
    let done = handle
        .await_completion(Duration::from_secs(30))
        .await
        .expect("await")
        .expect("the session completes after its resume");
    assert_eq!(done.status, SessionStatus::Completed, "{done:?}");
    assert_eq!(done.attempt, 2, "completed by the second attempt");
    assert_eq!(done.metrics.processed_elements, 30);

    let db = admin(&url).await.expect("admin");
    let id = session.id.as_str().to_string();
    let rows = db
        .query(
            &format!(
                "SELECT seq, data FROM {export_schema}.items WHERE session_id = $1 ORDER BY seq"
            ),
            &[&id],
        )
        .await
        .expect("rows");
    let got: Vec<(i64, serde_json::Value)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(i64, serde_json::Value)> = (0..30).map(|n| (n as i64, record(n))).collect();
    assert_eq!(got, want, "each record exactly once, in order");
    let next: i64 = db
        .query_one(
            &format!(
                "SELECT next_seq FROM {export_schema}.harvest_export_marks WHERE session_id = $1"
            ),
            &[&id],
        )
        .await
        .expect("marker")
        .get(0);
    assert_eq!(next, 30, "the marker is past every record");

    // Files: whole, and no temp file left behind.
    let jsonl_path = harvest.sinks().file_path(&done, "jsonl");
    assert!(
        jsonl_path.starts_with(dir.path()),
        "{jsonl_path:?} under export.dir"
    );
    let client_dir = jsonl_path
        .parent()
        .expect("a client directory")
        .to_path_buf();
    let jsonl = std::fs::read_to_string(&jsonl_path).expect("jsonl");
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines, records(0, 30), "jsonl holds every record once");
    let csv_text = std::fs::read_to_string(client_dir.join(format!("{id}.csv"))).expect("csv");
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    assert_eq!(header, ["n", "name"]);
    let csv_rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("csv row")).collect();
    assert_eq!(csv_rows.len(), 30);
    assert_eq!(&csv_rows[7][1], "item, \"7\"", "quoting survives");
    let leftovers: Vec<_> = std::fs::read_dir(&client_dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Close: cleanup_external (default) deletes the rows and the marker.
    harvest.close(&session.id).await.expect("close");
    let left: i64 = db
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {export_schema}.items WHERE session_id = $1) + \
                 (SELECT count(*) FROM {export_schema}.harvest_export_marks WHERE session_id = $1)"
            ),
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "closing removed the exported rows and the marker");
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

/// A file sink that cannot write keeps the session from completing: it is retried and ends
/// FAILED (`export_failed`), and no file (partial or whole) exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_failure_fails_the_session_and_leaves_no_file() {
    let data = tempfile::tempdir().expect("tempdir");
    let blocker = data.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").expect("write blocker");
    let mut cfg = Config {
        data_dir: data.path().join("db"),
        ..Config::default()
    };
    cfg.export.dir = blocker.join("exports");
    cfg.workers.retry_backoff_ms = 10;
    let harvest = Harvest::builder(cfg)
        .job(Arc::new(RecordsJob { total: 5, per: 2 }))
        .open()
        .await
        .expect("open");
    harvest.start();
    let options = harvest::SessionOptions {
        max_attempts: Some(2),
        ..Default::default()
    };
    let handle = harvest
        .submit(
            SubmitRequest::new(json!({"name": "f", "export": {"jsonl": true}})).options(options),
        )
        .await
        .expect("submit");
    let done = handle
        .await_completion(Duration::from_secs(30))
        .await
        .expect("await")
        .expect("the session ends");
    assert_eq!(done.status, SessionStatus::Failed, "{done:?}");
    assert_eq!(
        done.error.as_ref().map(|e| e.kind.as_str()),
        Some("export_failed")
    );
    assert_eq!(done.attempt, 2, "the export was retried once");
    assert_eq!(
        done.metrics.processed_elements, 5,
        "records stay in the store"
    );
    assert!(
        !blocker.join("exports").exists(),
        "no export file or directory"
    );
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

/// A session whose exported rows were kept (`cleanup_external = false`) is removed, and a new
/// session takes its id: the new one exports beside the kept rows (they differ in
/// `session_seq`), and closing it with `cleanup_external` deletes only its own. A table made by
/// an earlier harvest (no `session_seq`) gets the column and keeps working, and a marker an
/// earlier harvest left under the id (keyed without the session's seq) does not make the new
/// session skip rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_session_id_exports_beside_the_rows_its_predecessor_kept() {
    let Some(Fixture {
        url,
        export_schema,
        store,
        _guards,
    }) = fixture().await
    else {
        return;
    };
    let db = admin(&url).await.expect("admin");
    // The shape of tables made before `session_seq`, with a row of an old session.
    db.batch_execute(&format!(
        "CREATE SCHEMA {export_schema};
         CREATE TABLE {export_schema}.items (
             session_id text NOT NULL, seq bigint NOT NULL, client_id text NOT NULL,
             data jsonb NOT NULL, PRIMARY KEY (session_id, seq));
         INSERT INTO {export_schema}.items VALUES ('old', 0, 'c', '{{}}');
         CREATE TABLE {export_schema}.harvest_export_marks (
             session_id text NOT NULL, tbl text NOT NULL, next_seq bigint NOT NULL,
             PRIMARY KEY (session_id, tbl));
         INSERT INTO {export_schema}.harvest_export_marks VALUES ('reused', 'items', 3);"
    ))
    .await
    .expect("an old-style table");
    let dir = tempfile::tempdir().expect("tempdir");
    let harvest = started(config(&export_schema, &url, dir.path()), &store).await;
    let id = harvest::session::SessionId::parse("reused").expect("id");
    let run = |table: &str, keep: bool| {
        let mut req = SubmitRequest::new(json!({"name": "t", "export": {"postgres_table": table}}));
        req.session_id = Some(id.clone());
        req.options.cleanup_external = !keep;
        req
    };
    // In the old-style table: the column is added, rows of new sessions carry their seq.
    let first = complete(&harvest, run("items", true)).await;
    assert_eq!(first.status, SessionStatus::Completed, "{first:?}");
    harvest.close(&id).await.expect("close, keeping the rows");

    // A fresh table, twice with one id.
    let a = complete(&harvest, run("fresh", true)).await;
    assert_eq!(a.status, SessionStatus::Completed, "{a:?}");
    harvest.close(&id).await.expect("close, keeping the rows");
    let b = complete(&harvest, run("fresh", false)).await;
    assert_eq!(
        b.status,
        SessionStatus::Completed,
        "the id's second session exports beside the first's rows: {b:?}"
    );
    assert_ne!(a.seq, b.seq);
    let count = |sql: String| {
        let db = &db;
        async move {
            db.query_one(&sql, &[])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    let per_seq = |seq: u64| {
        format!(
            "SELECT count(*) FROM {export_schema}.fresh WHERE session_id = 'reused' \
             AND session_seq = {seq}"
        )
    };
    assert_eq!(count(per_seq(a.seq)).await, 5);
    assert_eq!(count(per_seq(b.seq)).await, 5);
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM {export_schema}.items WHERE session_id = 'reused' \
             AND session_seq = {}",
            first.seq
        ))
        .await,
        5
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM {export_schema}.items WHERE session_id = 'old' \
             AND session_seq = 0"
        ))
        .await,
        1,
        "rows of before the column keep their place"
    );
    // Closing the second (cleanup_external) deletes its rows, not the first's.
    harvest.close(&id).await.expect("close");
    assert_eq!(count(per_seq(b.seq)).await, 0);
    assert_eq!(count(per_seq(a.seq)).await, 5);
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

/// With `[[clients]]`, two tenants each run a session named `same` exporting to one table: each
/// exports all its rows (markers are per session, not per id), and closing one tenant's session
/// deletes only its rows, leaving the other's marker, so a later export of the other's writes
/// nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_sessions_of_one_id_each_export_every_row() {
    let Some(Fixture {
        url,
        export_schema,
        store,
        _guards,
    }) = fixture().await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&export_schema, &url, dir.path());
    for client in ["a", "b"] {
        cfg.clients.push(harvest::config::ClientConfig {
            id: client.into(),
            token: format!("token-{client}"),
            max_running: None,
            max_pending: None,
        });
    }
    let harvest = started(cfg, &store).await;
    let id = harvest::session::SessionId::parse("same").expect("id");
    let mut ended = Vec::new();
    for client in ["a", "b"] {
        let mut req =
            SubmitRequest::new(json!({"name": "t", "export": {"postgres_table": "shared"}}))
                .client(harvest::session::ClientContext::of(client));
        req.session_id = Some(id.clone());
        let s = complete(&harvest, req).await;
        assert_eq!(s.status, SessionStatus::Completed, "{client}: {s:?}");
        ended.push(s);
    }
    let db = admin(&url).await.expect("admin");
    let rows = |client: &'static str| {
        let (db, schema) = (&db, &export_schema);
        async move {
            db.query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT data) FROM {schema}.shared \
                     WHERE session_id = 'same' AND client_id = $1"
                ),
                &[&client],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .expect("count")
        }
    };
    assert_eq!(rows("a").await, (5, 5), "tenant a's rows, each once");
    assert_eq!(rows("b").await, (5, 5), "tenant b's rows, each once");
    // Closing b's session (cleanup_external) takes b's rows and marker only.
    harvest
        .close(harvest.key(Some("b"), id.clone()))
        .await
        .expect("close b");
    assert_eq!(rows("b").await, (0, 0));
    assert_eq!(rows("a").await, (5, 5));
    let sinks = harvest::sink::Sinks::new(&config(&export_schema, &url, dir.path()));
    let spec = ExportSpec::of(&ended[0].job.config).expect("spec");
    assert_eq!(
        sinks
            .export_rows(&*store, &ended[0], &spec)
            .await
            .expect("export a again"),
        0,
        "a's marker survived b's cleanup: nothing is written twice"
    );
    assert_eq!(rows("a").await, (5, 5));
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

/// A session that exported under a marker of an earlier harvest (keyed by id alone), to a table
/// made before rows had `session_seq`, resumes after the upgrade where it was: its new marker
/// adopts the old one, which stands right after its rows, and the next export writes only the
/// records the table lacks, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_under_a_marker_of_an_earlier_harvest_resumes_after_its_rows() {
    let Some(Fixture {
        url,
        export_schema,
        store,
        _guards,
    }) = fixture().await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let harvest = started(config(&export_schema, &url, dir.path()), &store).await;
    let mut req = SubmitRequest::new(json!({"name": "t"}));
    req.session_id = Some(harvest::session::SessionId::parse("inflight").expect("id"));
    let s = complete(&harvest, req).await;
    assert_eq!(s.status, SessionStatus::Completed, "{s:?}");
    // What the earlier harvest left: records 0..2 exported, its marker at 3.
    let db = admin(&url).await.expect("admin");
    db.batch_execute(&format!(
        "CREATE SCHEMA {export_schema};
         CREATE TABLE {export_schema}.legacy (
             session_id text NOT NULL, seq bigint NOT NULL, client_id text NOT NULL,
             data jsonb NOT NULL, PRIMARY KEY (session_id, seq));
         CREATE TABLE {export_schema}.harvest_export_marks (
             session_id text NOT NULL, tbl text NOT NULL, next_seq bigint NOT NULL,
             PRIMARY KEY (session_id, tbl));
         INSERT INTO {export_schema}.harvest_export_marks VALUES ('inflight', 'legacy', 3);"
    ))
    .await
    .expect("the earlier harvest's tables");
    for n in 0..3i64 {
        db.execute(
            &format!("INSERT INTO {export_schema}.legacy VALUES ('inflight', $1, $2, $3)"),
            &[&n, &s.client.client_id(), &record(n as u64)],
        )
        .await
        .expect("an earlier row");
    }
    let sinks = harvest::sink::Sinks::new(&config(&export_schema, &url, dir.path()));
    let spec = ExportSpec::of(&json!({"name": "t", "export": {"postgres_table": "legacy"}}))
        .expect("spec");
    assert_eq!(
        sinks.export_rows(&*store, &s, &spec).await.expect("export"),
        2,
        "records 3 and 4 only"
    );
    assert_eq!(
        sinks.export_rows(&*store, &s, &spec).await.expect("again"),
        0
    );
    let rows: Vec<(i64, i64)> = db
        .query(
            &format!("SELECT seq, session_seq FROM {export_schema}.legacy ORDER BY seq"),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let seq = s.seq as i64;
    assert_eq!(rows, vec![(0, 0), (1, 0), (2, 0), (3, seq), (4, seq)]);
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
