//! Many processes on one PostgreSQL: 1 `harvest serve` + 3 `harvest worker` (the real binary)
//! run 2,000 scraping sessions of a loopback site while two workers are SIGKILLed and restarted,
//! and a cron agent fires every second. Checked afterwards, from the database:
//!
//! - every session ended COMPLETED, with its records exactly once (store and export table);
//! - extra attempts are bounded by what the killed processes held, counted from their leases
//!   right after each kill (a session claimed by two live workers would show up as a duplicate
//!   record or export row, or a failed CAS and a retry);
//! - the cron agent's runs have one session per scheduled second.
//!
//! Skips without `HARVEST_TEST_DATABASE_URL`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use harvest::AgentSpec;
use harvest::config::{Config, StoreKind};
use harvest::session::{ClientContext, Session, SessionStatus};
use harvest::store::SessionList;
use harvest::{Harvest, SubmitRequest};
use serde_json::json;

use crate::proc::Server;
use crate::store_postgres::{SchemaGuard, admin, database_url, unique_schema};

const SESSIONS: usize = 2_000;
const PER_SESSION: u64 = 5;
const WORKERS_PER_PROCESS: usize = 8;

async fn all_sessions(h: &Harvest) -> Vec<Session> {
    let mut out = Vec::new();
    let mut cursor = None;
    for _ in 0..100 {
        let page = h
            .list(SessionList {
                limit: 1000,
                cursor,
                ..Default::default()
            })
            .await
            .expect("list");
        out.extend(page.sessions);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    out
}

async fn wait_for(what: &str, deadline: Instant, mut cond: impl AsyncFnMut() -> bool) {
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_workers_share_postgres_through_kills() {
    let Some(url) = database_url() else { return };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    let schema = unique_schema();
    let export_schema = unique_schema();
    let _g1 = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let _g2 = SchemaGuard {
        url: url.clone(),
        schema: export_schema.clone(),
    };
    let site = crate::sitegen::serve(crate::sitegen::SiteOptions {
        products: 50,
        per_list: PER_SESSION as usize,
        specials: false,
        tree: 0,
    })
    .await
    .expect("site");
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.toml");
    // A 4 s lease: short enough that the killed workers' sessions come back quickly, long
    // enough that a live worker's heartbeats (every third of it) survive a loaded machine (a 2 s
    // lease let live workers lose sessions under a load of 8 on 2 cores).
    std::fs::write(
        &config_path,
        format!(
            "store = \"postgres\"\ndatabase_url = \"{url}\"\n\
             [workers]\nlease_secs = 4\nretry_backoff_ms = 50\nshutdown_grace_secs = 2\n\
             [export]\nschema = \"{export_schema}\"\ndir = \"{}\"\n",
            dir.path().join("exports").display()
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

    // The test's own handle on the store: submits, reads; never runs workers or maintenance.
    let mut cfg = Config {
        store: StoreKind::Postgres,
        database_url: Some(url.clone()),
        database_schema: schema.clone(),
        ..Config::default()
    };
    cfg.export.schema = export_schema.clone();
    let h = Harvest::open(cfg).await.expect("open");

    let serve = Server::start(&data, WORKERS_PER_PROCESS, &env);
    let mut workers: Vec<Option<Server>> = (0..3)
        .map(|_| Some(Server::start_worker(&data, WORKERS_PER_PROCESS, &env)))
        .collect();

    let scraper = json!({
        "name": "mp",
        "start_urls": [site.url("/index.html")],
        "start_page": "list",
        "limits": {"max_pages": 1},
        "pages": {"list": {"item": "article.product", "fields": {"title": "a.title"}}},
        "export": {"postgres_table": "items"},
    });
    h.agent_put(
        "cron",
        "ticker",
        AgentSpec {
            config: scraper.clone(),
            schedule: Some("* * * * * *".into()),
            // Ahead of the 2,000 queued sessions: a tick is skipped while the previous run is
            // still PENDING or RUNNING.
            options: harvest::SessionOptions {
                priority: 10,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("agent");
    let cron_from = Instant::now();

    let mut tasks = Vec::new();
    const _: () = assert!(
        SESSIONS.is_multiple_of(16),
        "16 submitters share the sessions evenly"
    );
    for _ in 0..16 {
        let h = h.clone();
        let scraper = scraper.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..SESSIONS / 16 {
                h.submit(SubmitRequest::new(scraper.clone()).client(ClientContext::of("mp")))
                    .await
                    .expect("submit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("submitter");
    }

    let completed = |h: Harvest| async move {
        let c = h
            .store()
            .session_counts(h.clock().now())
            .await
            .expect("counts");
        c.by_status
            .get(&SessionStatus::Completed)
            .copied()
            .unwrap_or(0)
    };
    // Kill two workers while sessions run, one after the other, and restart each. What each
    // held at its death is counted from its leases: its running sessions and those whose
    // finish was not committed yet (a slot is handed on while the finish commits, so that can
    // be more than its slots).
    let db = admin(&url).await.expect("admin");
    let mut held = 0;
    for (i, at) in [(0usize, 400u64), (1, 900)] {
        wait_for(&format!("{at} completed sessions"), deadline, async || {
            completed(h.clone()).await >= at
        })
        .await;
        if let Some(w) = workers[i].take() {
            let pid = w.child.id();
            w.kill9();
            // Owners are `host:pid:suffix/n`. A finish the dead process sent may still commit
            // after this count: then it counts a session that is not retried, never the reverse.
            let row = db
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {schema}.sessions \
                         WHERE status = 'RUNNING' AND lease_owner LIKE $1"
                    ),
                    &[&format!("%:{pid}:%")],
                )
                .await
                .expect("count the killed worker's sessions");
            held += row.get::<_, i64>(0) as usize;
        }
        workers[i] = Some(Server::start_worker(&data, WORKERS_PER_PROCESS, &env));
    }

    wait_for("every user session to complete", deadline, async || {
        let c = h
            .store()
            .session_counts(h.clock().now())
            .await
            .expect("counts");
        let done = c
            .by_status
            .get(&SessionStatus::Completed)
            .copied()
            .unwrap_or(0);
        done >= SESSIONS as u64 && cron_from.elapsed() > Duration::from_secs(5)
    })
    .await;
    // Stop the cron, then let its last runs finish.
    h.agent_delete("cron", "ticker")
        .await
        .expect("delete agent");
    let cron_secs = cron_from.elapsed().as_secs();
    wait_for("the queue to drain", deadline, async || {
        let c = h
            .store()
            .session_counts(h.clock().now())
            .await
            .expect("counts");
        c.by_status
            .get(&SessionStatus::Pending)
            .copied()
            .unwrap_or(0)
            + c.by_status
                .get(&SessionStatus::Running)
                .copied()
                .unwrap_or(0)
            == 0
    })
    .await;

    let sessions = all_sessions(&h).await;
    let (cron_runs, user): (Vec<_>, Vec<_>) = sessions
        .iter()
        .partition(|s| s.job.agent.as_deref() == Some("ticker"));
    assert_eq!(user.len(), SESSIONS, "every submission is a session");
    let not_done: Vec<_> = sessions
        .iter()
        .filter(|s| {
            s.status != SessionStatus::Completed || s.metrics.processed_elements != PER_SESSION
        })
        .map(|s| {
            (
                s.id.to_string(),
                s.status,
                s.metrics.processed_elements,
                s.error.clone(),
            )
        })
        .take(5)
        .collect();
    assert!(
        not_done.is_empty(),
        "sessions not COMPLETED with {PER_SESSION} records: {not_done:?}"
    );
    // Only sessions held by the two killed processes needed a second attempt.
    let retried: Vec<_> = sessions.iter().filter(|s| s.attempt > 1).collect();
    assert!(
        retried.len() <= held,
        "{} sessions took more than one attempt; the killed workers held {held}: {:?}",
        retried.len(),
        retried
            .iter()
            .map(|s| (s.id.to_string(), &s.attempts))
            .collect::<Vec<_>>()
    );

    let count = |sql: String| {
        let db = &db;
        async move { db.query_one(&sql, &[]).await.expect(&sql).get::<_, i64>(0) }
    };
    let total = sessions.len() as i64 * PER_SESSION as i64;
    assert_eq!(
        count(format!("SELECT count(*) FROM {schema}.records")).await,
        total
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM (SELECT session_id, data FROM {schema}.records \
             GROUP BY 1, 2 HAVING count(*) > 1) d"
        ))
        .await,
        0,
        "no record is stored twice"
    );
    assert_eq!(
        count(format!("SELECT count(*) FROM {export_schema}.items")).await,
        total,
        "each record exported exactly once"
    );
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM (SELECT session_id, data FROM {export_schema}.items \
             GROUP BY 1, 2 HAVING count(*) > 1) d"
        ))
        .await,
        0,
        "no exported row twice"
    );

    // Cron: one run per scheduled second, and it did run while the processes were up.
    let mut ticks = HashSet::new();
    for s in &cron_runs {
        let id = s.id.to_string();
        // `_cron.<agent>.<tick secs>.<hash>`
        let tick = id
            .strip_prefix(harvest::runtime::CRON_ID_PREFIX)
            .and_then(|rest| rest.rsplit('.').nth(1))
            .unwrap_or_else(|| panic!("cron run {id} has no tick in its id"));
        assert!(ticks.insert(tick.to_string()), "tick {tick} fired twice");
    }
    assert!(
        cron_runs.len() as u64 >= cron_secs / 3,
        "only {} cron runs in {cron_secs} s",
        cron_runs.len()
    );

    eprintln!(
        "multiprocess: {} sessions ({} cron runs), {} retried, {held} held by the killed, in {:.1} s",
        sessions.len(),
        cron_runs.len(),
        retried.len(),
        started.elapsed().as_secs_f64()
    );
    let _ = serve.terminate(Duration::from_secs(10));
    for w in workers.into_iter().flatten() {
        let _ = w.terminate(Duration::from_secs(10));
    }
    h.shutdown(Duration::from_secs(1)).await.expect("shutdown");
}
