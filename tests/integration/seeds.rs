//! The seeds' session contract at its edges, on the real binary over HTTP: a cancel that
//! reaches a running crawl at once (on sled, and across processes on PostgreSQL), failures that
//! read as failures, usage off, records removed after an external export, merged agent options,
//! metrics across attempts.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proc::Server;
use crate::store_postgres::{SchemaGuard, database_url, unique_schema};

/// A crawl of `products` product pages at 2 requests in flight, 100 ms apart per host: slow
/// enough to cancel in the middle.
fn slow_config(base: &str) -> Value {
    json!({
        "name": "slow",
        "start_urls": [format!("{base}/index.html")],
        "limits": {"max_pages": 10_000, "max_depth": 200},
        "http": {"concurrency": 2, "per_host_concurrency": 2, "delay_ms": 100,
                 "timeout_ms": 2000, "obey_robots_txt": false},
        "follow": [{"selector": "a.next"}, {"selector": "article.product a.title", "page": "product"}],
        "pages": {"product": {"fields": {"title": "h1"}}},
    })
}

pub(crate) async fn get_session(http: &reqwest::Client, api: &str, id: &str) -> Value {
    http.get(format!("{api}/v1/sessions/{id}"))
        .send()
        .await
        .expect("GET session")
        .json()
        .await
        .expect("session JSON")
}

/// Polls (every 20 ms, up to `limit`) until the session satisfies `done`; returns it.
pub(crate) async fn wait_until(
    http: &reqwest::Client,
    api: &str,
    id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = get_session(http, api, id).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "waited {limit:?} for {what}; the session is {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits the slow crawl through `api`, cancels it once it has fetched a few pages, and checks
/// that at most the requests in flight (the config's concurrency, 2) reach the site after the
/// cancel is answered, and that the session is CANCELLED within 1 s plus the request timeout
/// (2 s). Without a prompt cancel the worker learns of it at its next heartbeat, a third of the
/// 30 s lease later, crawling on meanwhile.
async fn cancel_is_prompt(api: &str, site: &crate::sitegen::Site) {
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{api}/v1/sessions"))
        .json(&json!({"config": slow_config(site.base_url())}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    let id = resp.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_until(
        &http,
        api,
        &id,
        Duration::from_secs(60),
        "a few pages",
        |s| s["metrics"]["pages_processed"].as_u64().unwrap_or(0) >= 4,
    )
    .await;
    let resp = http
        .post(format!("{api}/v1/sessions/{id}/cancel"))
        .send()
        .await
        .expect("cancel");
    let answered = Instant::now();
    let hits_at_cancel = site.total_hits();
    assert_eq!(resp.status(), 202);
    let done = wait_until(&http, api, &id, Duration::from_secs(30), "CANCELLED", |s| {
        s["status"] == "CANCELLED"
    })
    .await;
    let took = answered.elapsed();
    let after = site.total_hits() - hits_at_cancel;
    assert!(
        took <= Duration::from_secs(3),
        "CANCELLED {took:?} after the cancel was answered: {done}"
    );
    assert!(
        after <= 2,
        "{after} requests reached the site after the cancel was answered (concurrency 2)"
    );
    assert_eq!(done["error"], Value::Null, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_running_crawl_at_once_on_sled() {
    let site = crate::resume_crash::product_site(400).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The shipped config.toml: a 30 s lease, so a heartbeat every 10 s.
    let server = Server::start(dir.path(), 2, &[("HARVEST_CONFIG", "config.toml")]);
    cancel_is_prompt(&format!("http://{}", server.addr), &site).await;
    site.shutdown().await;
}

/// The cancel is answered by `harvest serve` (no workers) while a separate `harvest worker`
/// runs the session: it crosses processes through PostgreSQL's notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_crawl_in_another_process_at_once_on_postgres() {
    let Some(url) = database_url() else { return };
    let schema = unique_schema();
    let _guard = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let site = crate::resume_crash::product_site(400).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("store = \"postgres\"\ndatabase_url = \"{url}\"\n[workers]\nlease_secs = 30\n"),
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let env = [
        ("HARVEST_CONFIG", config.as_str()),
        ("HARVEST_DATABASE_SCHEMA", schema.as_str()),
    ];
    let serve = Server::start(dir.path(), 0, &env);
    let _worker = Server::start_worker(dir.path(), 2, &env);
    cancel_is_prompt(&format!("http://{}", serve.addr), &site).await;
    site.shutdown().await;
}
