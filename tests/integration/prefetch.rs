//! The claimer's local buffer (`workers.prefetch`): sessions claimed ahead of free slots keep
//! their leases while they wait, a cancel ends a buffered session without running it, shutdown
//! hands the buffer back, and a worker SIGKILLed with a full buffer loses nothing: every
//! buffered session runs exactly once, after its lease expires, on another worker.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use harvest::config::{Config, StoreKind};
use harvest::job::{Job, JobContext, JobOutcome};
use harvest::service::{Harvest, SubmitRequest};
use harvest::session::{Session, SessionId, SessionStatus};
use harvest::store::{CancelOutcome, CheckpointBatch, SessionList};
use serde_json::json;

use crate::proc::Server;
use crate::store_postgres::{SchemaGuard, database_url, unique_schema};

/// Counts its runs per session; until `open`, holds each until its stop signal, then completes
/// with one record. A session whose config says `"hold": true` first waits for `release`.
#[derive(Clone, Default)]
struct Gate {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    open: Arc<std::sync::atomic::AtomicBool>,
    release: Arc<tokio::sync::Notify>,
}

impl Gate {
    fn runs(&self, id: &SessionId) -> u32 {
        self.runs
            .lock()
            .unwrap()
            .get(id.as_str())
            .copied()
            .unwrap_or(0)
    }

    fn total(&self) -> u32 {
        self.runs.lock().unwrap().values().sum()
    }
}

#[async_trait]
impl Job for Gate {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(ctx.session.id.to_string())
            .or_default() += 1;
        if ctx.session.job.config["hold"] == json!(true) {
            self.release.notified().await;
        }
        if !self.open.load(std::sync::atomic::Ordering::SeqCst) {
            ctx.stop.stopped().await;
            return JobOutcome::Stopped(CheckpointBatch::default());
        }
        JobOutcome::Completed(CheckpointBatch {
            records: vec![json!({"id": ctx.session.id.to_string()})],
            ..Default::default()
        })
    }
}

async fn open(dir: &std::path::Path, gate: &Gate) -> Harvest {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 2;
    cfg.workers.prefetch = 4;
    cfg.workers.poll_interval_ms = 50;
    cfg.workers.lease_secs = 3;
    Harvest::builder(cfg)
        .job(Arc::new(gate.clone()))
        .open()
        .await
        .expect("open harvest")
}

async fn sessions(h: &Harvest) -> Vec<Session> {
    h.list(SessionList {
        limit: 1000,
        ..Default::default()
    })
    .await
    .expect("list")
    .sessions
}

/// Submits each config, in order; their session ids.
async fn submit_each(
    h: &Harvest,
    configs: impl IntoIterator<Item = serde_json::Value>,
) -> Vec<SessionId> {
    let mut ids = Vec::new();
    for config in configs {
        let s = h.submit(SubmitRequest::new(config)).await.expect("submit");
        ids.push(s.id().clone());
    }
    ids
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

fn with_status(all: &[Session], status: SessionStatus) -> Vec<Session> {
    all.iter().filter(|s| s.status == status).cloned().collect()
}

/// A harvest on PostgreSQL, in a schema of its own, with one slot, a buffer of `prefetch` and an
/// open [`Gate`] (not started); `None` when the test is skipped. Keep it whole (borrow its
/// fields): a field moved out by a pattern with `..` drops the rest at once, the schema with
/// the guard.
struct OnPostgres {
    h: Harvest,
    job: Gate,
    url: String,
    schema: String,
    _guard: SchemaGuard,
    _dir: tempfile::TempDir,
}

async fn one_slot_on_postgres(prefetch: usize) -> Option<OnPostgres> {
    let (mut cfg, guard) = crate::store_postgres::postgres_config()?;
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.data_dir = dir.path().to_path_buf();
    let url = cfg.database_url.clone().unwrap_or_default();
    let schema = cfg.database_schema.clone();
    cfg.workers.concurrency = 1;
    cfg.workers.prefetch = prefetch;
    cfg.workers.poll_interval_ms = 50;
    let job = Gate::default();
    job.open.store(true, std::sync::atomic::Ordering::SeqCst);
    let h = Harvest::builder(cfg)
        .job(Arc::new(job.clone()))
        .open()
        .await
        .expect("open harvest");
    Some(OnPostgres {
        h,
        job,
        url,
        schema,
        _guard: guard,
        _dir: dir,
    })
}

/// On sled, in process: 2 slots and a buffer of 4. The buffered sessions stay RUNNING under
/// their first attempt for longer than a lease (renewed while they wait; maintenance would take
/// them back otherwise), a cancel ends a buffered session without running its job, shutdown
/// hands the buffer back without spending an attempt, and after a restart every session runs
/// to COMPLETED, the buffered ones exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_sessions_keep_leases_take_cancels_and_go_back_at_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = Gate::default();
    let h = open(dir.path(), &gate).await;
    submit_each(&h, (0..10).map(|_| json!({"name": "gate"}))).await;
    // Started once all are queued, so that the first claim fills the slots and the buffer.
    h.start();
    wait_until(
        "2 running and 4 buffered",
        Duration::from_secs(20),
        async || {
            with_status(&sessions(&h).await, SessionStatus::Running).len() == 6 && gate.total() == 2
        },
    )
    .await;
    // Longer than the 3 s lease, with maintenance running: renewals keep the buffer's leases.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all = sessions(&h).await;
    let held = with_status(&all, SessionStatus::Running);
    assert_eq!(held.len(), 6, "the buffer kept its sessions past a lease");
    assert!(
        held.iter().all(|s| s.attempt == 1 && s.failures == 0),
        "no buffered lease expired: {:?}",
        held.iter()
            .map(|s| (s.id.to_string(), s.attempt, s.failures))
            .collect::<Vec<_>>()
    );
    let buffered: Vec<SessionId> = held
        .iter()
        .filter(|s| gate.runs(&s.id) == 0)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(buffered.len(), 4, "4 claimed sessions never started");

    // A cancel reaches a buffered session at once: CANCELLED, its job never run.
    let victim = buffered[0].clone();
    assert!(matches!(
        h.cancel(victim.clone()).await.expect("cancel"),
        CancelOutcome::Requested(_) | CancelOutcome::Cancelled(_)
    ));
    wait_until(
        "the buffered session to end CANCELLED",
        Duration::from_secs(5),
        async || {
            h.get(victim.clone())
                .await
                .expect("get")
                .is_some_and(|s| s.status == SessionStatus::Cancelled)
        },
    )
    .await;
    assert_eq!(
        gate.runs(&victim),
        0,
        "a cancelled buffered session never runs"
    );

    // Shutdown: the running two are handed back after the grace, the buffered three at once;
    // none spends an attempt.
    h.shutdown(Duration::from_millis(200))
        .await
        .expect("shutdown");
    drop(h);
    gate.open.store(true, std::sync::atomic::Ordering::SeqCst);
    let h = open(dir.path(), &gate).await;
    h.start();
    wait_until(
        "every session to end",
        Duration::from_secs(30),
        async || {
            let all = sessions(&h).await;
            with_status(&all, SessionStatus::Completed).len() == 9
                && with_status(&all, SessionStatus::Cancelled).len() == 1
        },
    )
    .await;
    for s in sessions(&h).await {
        assert_eq!(s.failures, 0, "{}: a hand-back spends no attempt", s.id);
        if buffered.contains(&s.id) && s.id != victim {
            assert_eq!(gate.runs(&s.id), 1, "{}: buffered, then run once", s.id);
        }
        if s.status == SessionStatus::Completed {
            assert_eq!(s.records, 1, "{}: its record once", s.id);
        }
    }
    h.shutdown(Duration::from_secs(1)).await.expect("shutdown");
}

/// A loopback site whose `/slow/N` pages answer after `delay`, counting requests per page.
struct SlowSite {
    base: String,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

impl SlowSite {
    async fn start(delay: Duration) -> SlowSite {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let h = hits.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let h = h.clone();
            async move {
                let path = uri.path().to_string();
                if !path.starts_with("/slow/") {
                    return StatusCode::NOT_FOUND.into_response();
                }
                *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                tokio::time::sleep(delay).await;
                (
                    [(header::CONTENT_TYPE, "text/html")],
                    format!("<html><body><h1>{path}</h1></body></html>"),
                )
                    .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        SlowSite { base, hits }
    }

    fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The real binary on PostgreSQL: worker A (2 slots, a buffer of 12) claims 14 slow sessions,
/// and is SIGKILLed with its buffer full. Worker B starts at once but gets none of A's sessions
/// until their leases expire; then every session completes with its record exactly once, and
/// each of the 12 buffered sessions was fetched exactly once (only A's two running sessions
/// were fetched twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_with_a_full_buffer_runs_each_buffered_session_once() {
    let Some(url) = database_url() else {
        eprintln!("skipped: HARVEST_TEST_DATABASE_URL is not set");
        return;
    };
    const SESSIONS: usize = 20;
    const SLOTS: usize = 2;
    const PREFETCH: usize = 12;
    let schema = unique_schema();
    let _guard = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let site = SlowSite::start(Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "store = \"postgres\"\ndatabase_url = \"{url}\"\n\
             [workers]\nlease_secs = 4\nprefetch = {PREFETCH}\nretry_backoff_ms = 50\n\
             shutdown_grace_secs = 2\n"
        ),
    )
    .expect("config");
    let config_env = config_path.to_string_lossy().into_owned();
    let env: Vec<(&str, &str)> = vec![
        ("HARVEST_CONFIG", &config_env),
        ("HARVEST_DATABASE_SCHEMA", &schema),
        ("RUST_LOG", "warn,harvest=info"),
    ];
    let data = dir.path().join("unused-sled");
    let h = Harvest::open(Config {
        store: StoreKind::Postgres,
        database_url: Some(url.clone()),
        database_schema: schema.clone(),
        ..Config::default()
    })
    .await
    .expect("open");

    let mut paths = HashMap::new();
    for i in 0..SESSIONS {
        let path = format!("/slow/{i}");
        let config = json!({
            "name": "prefetch",
            "start_urls": [format!("{}{path}", site.base)],
            "start_page": "p",
            "limits": {"max_pages": 1},
            "pages": {"p": {"item": "body", "fields": {"title": "h1"}}},
        });
        let s = h.submit(SubmitRequest::new(config)).await.expect("submit");
        paths.insert(s.id().clone(), path);
    }

    let a = Server::start_worker(&data, SLOTS, &env);
    wait_until(
        "worker A to hold 2 running and 12 buffered sessions",
        Duration::from_secs(30),
        async || {
            let running = with_status(&sessions(&h).await, SessionStatus::Running).len();
            let fetching: u32 = paths.values().map(|p| site.hits(p)).sum();
            running == SLOTS + PREFETCH && fetching == SLOTS as u32
        },
    )
    .await;
    let held = with_status(&sessions(&h).await, SessionStatus::Running);
    let buffered: Vec<SessionId> = held
        .iter()
        .filter(|s| site.hits(&paths[&s.id]) == 0)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(buffered.len(), PREFETCH, "a full buffer");
    a.kill9();
    let killed_at = Instant::now();

    let b = Server::start_worker(&data, SLOTS, &env);
    wait_until(
        "every session to complete",
        Duration::from_secs(90),
        async || with_status(&sessions(&h).await, SessionStatus::Completed).len() == SESSIONS,
    )
    .await;

    let all = sessions(&h).await;
    for s in &all {
        assert_eq!(s.records, 1, "{}: its record exactly once", s.id);
        let hits = site.hits(&paths[&s.id]);
        if buffered.contains(&s.id) {
            assert_eq!(
                hits, 1,
                "{}: buffered on the killed worker, then run exactly once",
                s.id
            );
            assert_eq!(s.attempt, 2, "{}: A's claim, then B's", s.id);
            let started = s
                .attempts
                .last()
                .map(|a| a.started_at)
                .expect("attempts kept");
            let claimed_by_a = s.attempts.first().map(|a| a.started_at).expect("attempts");
            assert!(
                started.0 - claimed_by_a.0 >= 4_000,
                "{}: B claimed it only after A's 4 s lease expired ({} ms after A's claim)",
                s.id,
                started.0 - claimed_by_a.0
            );
        } else {
            assert!(
                (1..=2).contains(&hits),
                "{}: fetched {hits} times (twice only if A was fetching it)",
                s.id
            );
        }
    }
    let twice = all.iter().filter(|s| site.hits(&paths[&s.id]) == 2).count();
    assert!(
        twice <= SLOTS,
        "{twice} sessions fetched twice; A ran only {SLOTS}"
    );
    eprintln!(
        "all {SESSIONS} sessions completed {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    drop(b);
}

/// An attempt gives its worker slot up once only its finish is left to write: with one slot,
/// while session A's finish waits (another connection holds A's row locked, so the UPDATE
/// blocks, as it would on a slow commit), session B is claimed, runs and completes. A then
/// completes once the lock goes, and each ran once. (Before, A's slot was held through its
/// commit, and B could not start until A's finish was written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finishing_attempt_frees_its_slot_for_the_next_session() {
    let Some(pg) = one_slot_on_postgres(0).await else {
        return;
    };
    let (h, job, url, schema) = (&pg.h, &pg.job, &pg.url, &pg.schema);
    h.start();
    let a = h
        .submit(SubmitRequest::new(json!({"name": "a", "hold": true})))
        .await
        .expect("submit a")
        .id()
        .clone();
    wait_until("A running", Duration::from_secs(20), async || {
        job.runs(&a) == 1
    })
    .await;
    // Lock A's row, then let its job end: its finish blocks on the lock.
    let mut admin = crate::store_postgres::admin(url).await.expect("connect");
    let lock = admin.transaction().await.expect("begin");
    let locked = lock
        .execute(
            &format!("SELECT 1 FROM {schema}.sessions WHERE id = $1 FOR UPDATE"),
            &[&a.as_str()],
        )
        .await
        .expect("lock A's row");
    assert_eq!(locked, 1);
    job.release.notify_one();
    let b = h
        .submit(SubmitRequest::new(json!({"name": "b"})))
        .await
        .expect("submit b")
        .id()
        .clone();
    wait_until(
        "B completed while A's finish waits",
        Duration::from_secs(20),
        async || {
            h.get(&b)
                .await
                .expect("get b")
                .is_some_and(|s| s.status == SessionStatus::Completed)
        },
    )
    .await;
    let a_now = h.get(&a).await.expect("get a").expect("a exists");
    assert_eq!(
        a_now.status,
        SessionStatus::Running,
        "A's finish is still blocked on the lock"
    );
    lock.rollback().await.expect("release the lock");
    wait_until("A completed", Duration::from_secs(20), async || {
        h.get(&a)
            .await
            .expect("get a")
            .is_some_and(|s| s.status == SessionStatus::Completed)
    })
    .await;
    assert_eq!((job.runs(&a), job.runs(&b)), (1, 1), "each ran once");
    h.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}

/// Buffered sessions keep starting while a claim is in flight. On PostgreSQL, with 1 slot and a
/// buffer of 4: the table is locked against updates once five sessions are claimed (one held
/// running, four buffered), then the held one is let go. Every finish now waits for the lock,
/// but hands its slot on; and once the buffer is down to half the claimer claims again, a claim
/// that also waits. The buffered sessions behind it must still run (the claimer used to await
/// its claim, leaving the freed slot idle until the claim returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_sessions_start_while_a_claim_waits() {
    let Some(pg) = one_slot_on_postgres(4).await else {
        return;
    };
    let (h, job, url, schema) = (&pg.h, &pg.job, &pg.url, &pg.schema);
    let ids = submit_each(
        h,
        (0..5).map(|i| json!({"name": format!("s{i}"), "hold": i == 0})),
    )
    .await;
    h.start();
    wait_until(
        "the first running and four buffered",
        Duration::from_secs(20),
        async || {
            job.runs(&ids[0]) == 1
                && with_status(&sessions(h).await, SessionStatus::Running).len() == 5
        },
    )
    .await;
    let mut admin = crate::store_postgres::admin(url).await.expect("connect");
    let lock = admin.transaction().await.expect("begin");
    lock.batch_execute(&format!(
        "LOCK TABLE {schema}.sessions IN SHARE ROW EXCLUSIVE MODE"
    ))
    .await
    .expect("lock the sessions against updates");
    job.release.notify_one();
    wait_until(
        "every buffered session started while the table is locked",
        Duration::from_secs(20),
        async || ids.iter().all(|id| job.runs(id) == 1),
    )
    .await;
    lock.rollback().await.expect("release the lock");
    wait_until("all completed", Duration::from_secs(20), async || {
        with_status(&sessions(h).await, SessionStatus::Completed).len() == 5
    })
    .await;
    assert!(ids.iter().all(|id| job.runs(id) == 1), "each ran once");
    h.shutdown(Duration::from_secs(5)).await.expect("shutdown");
}
