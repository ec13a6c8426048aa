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
pub(crate) fn slow_config(base: &str) -> Value {
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

/// A running `harvest serve` on a fresh sled directory with the shipped config.toml.
pub(crate) fn serve_sled(dir: &std::path::Path) -> (Server, String) {
    let server = Server::start(dir, 2, &[("HARVEST_CONFIG", "config.toml")]);
    let api = format!("http://{}", server.addr);
    (server, api)
}

pub(crate) async fn submit(http: &reqwest::Client, api: &str, body: Value) -> String {
    let resp = http
        .post(format!("{api}/v1/sessions"))
        .json(&body)
        .send()
        .await
        .expect("submit");
    let status = resp.status();
    let v: Value = resp.json().await.expect("JSON");
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().expect("id").to_string()
}

async fn terminal(http: &reqwest::Client, api: &str, id: &str) -> Value {
    wait_until(http, api, id, Duration::from_secs(60), "the end", |s| {
        matches!(
            s["status"].as_str(),
            Some("COMPLETED" | "FAILED" | "CANCELLED")
        )
    })
    .await
}

/// A port nothing listens on (bound, then released).
pub(crate) fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The seed's failure: a session whose start URL cannot be fetched ends FAILED with a kind and
/// the last error's message (it ended COMPLETED with `error: null`, and counted a page it never
/// fetched); a failure that may pass is retried per max_attempts first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crawl_that_fetches_nothing_fails_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, api) = serve_sled(dir.path());
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/index.html", closed_port());
    let id = submit(
        &http,
        &api,
        json!({
            "config": {"name": "closed", "start_urls": [url], "start_page": "p",
                       "http": {"retries": 0, "obey_robots_txt": false},
                       "pages": {"p": {"fields": {"title": "h1"}}}},
            "options": {"max_attempts": 2},
        }),
    )
    .await;
    let s = terminal(&http, &api, &id).await;
    assert_eq!(s["status"], "FAILED", "{s}");
    assert_eq!(s["error"]["kind"], "fetch_failed", "{s}");
    let message = s["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no start URL could be fetched") && message.contains("127.0.0.1"),
        "{message}"
    );
    assert_eq!(s["metrics"]["pages_processed"], 0, "{s}");
    assert_eq!(
        s["attempt"], 2,
        "a refused connection may pass: retried once: {s}"
    );
    assert_eq!(s["attempts"][0]["outcome"], "retried", "{s}");
    assert_eq!(s["attempts"][1]["outcome"], "failed", "{s}");
}

/// `harvest run` of a crawl the network guard refuses entirely exits with the FAILED code (it
/// printed "completed" and exited 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harvest_run_of_a_refused_crawl_exits_failed() {
    let site = crate::resume_crash::product_site(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        crate::resume_crash::paced_config("refused", site.base_url()),
    )
    .expect("config");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
        .arg("run")
        .arg(&cfg)
        .arg("--guard")
        .env_remove("HARVEST_CONFIG")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("harvest run ended")
        .expect("harvest run ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("failed") && stderr.contains("network guard"),
        "{stderr}"
    );
    assert_eq!(site.total_hits(), 0);
    site.shutdown().await;
}

/// `token_tracking: false` keeps no usage, and the view says so with `usage: null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_null_when_token_tracking_is_off() {
    let site = crate::resume_crash::product_site(5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, api) = serve_sled(dir.path());
    let http = reqwest::Client::new();
    let mut config = slow_config(site.base_url());
    config["http"]["delay_ms"] = json!(0);
    let off = submit(
        &http,
        &api,
        json!({"config": config.clone(), "options": {"token_tracking": false}}),
    )
    .await;
    let on = submit(&http, &api, json!({"config": config})).await;
    let off = terminal(&http, &api, &off).await;
    let on = terminal(&http, &api, &on).await;
    assert_eq!(off["status"], "COMPLETED", "{off}");
    assert_eq!(off["usage"], Value::Null, "{off}");
    assert!(
        off["metrics"]["pages_processed"].as_u64() > Some(0),
        "{off}"
    );
    assert!(on["usage"]["http_requests"].as_u64() > Some(0), "{on}");
    site.shutdown().await;
}

/// An agent's run options merge key by key over the agent's defaults (they replaced them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_run_options_merge_over_the_agents() {
    let site = crate::resume_crash::product_site(2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, api) = serve_sled(dir.path());
    let http = reqwest::Client::new();
    let resp = http
        .put(format!("{api}/v1/agents/shop"))
        .json(&json!({
            "config": slow_config(site.base_url()),
            "options": {"session_timeout_secs": 60, "max_attempts": 5},
        }))
        .send()
        .await
        .expect("put agent");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let resp = http
        .post(format!("{api}/v1/agents/shop/run"))
        .json(&json!({"options": {"priority": 1}}))
        .send()
        .await
        .expect("run agent");
    let v: Value = resp.json().await.expect("JSON");
    assert_eq!(v["options"]["priority"], 1, "{v}");
    assert_eq!(
        v["options"]["session_timeout_secs"], 60,
        "the agent's, kept: {v}"
    );
    assert_eq!(v["options"]["max_attempts"], 5, "the agent's, kept: {v}");
    site.shutdown().await;
}

/// `remove_after_export` with a file sink: once the JSONL file is written the internal records
/// go, and the session (its status and counts) stays, saying what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_after_a_file_export_and_the_status_stays() {
    let site = crate::resume_crash::product_site(12).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let exports = dir.path().join("exports");
    let exports_env = exports.to_string_lossy().into_owned();
    let server = Server::start(
        &dir.path().join("data"),
        2,
        &[
            ("HARVEST_CONFIG", "config.toml"),
            ("HARVEST_EXPORT_DIR", &exports_env),
        ],
    );
    let api = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let mut config = slow_config(site.base_url());
    config["http"]["delay_ms"] = json!(0);
    config["export"] = json!({"jsonl": true});
    let id = submit(
        &http,
        &api,
        json!({"config": config, "options": {"remove_after_export": true}}),
    )
    .await;
    let s = terminal(&http, &api, &id).await;
    assert_eq!(s["status"], "COMPLETED", "{s}");
    assert_eq!(s["records"], 12, "{s}");
    // The removal follows the export, which follows the end: moments after it, not with it.
    let s = wait_until(
        &http,
        &api,
        &id,
        Duration::from_secs(15),
        "the internal records to go",
        |s| s["records_held"] == 0,
    )
    .await;
    assert_eq!(s["status"], "COMPLETED", "{s}");
    assert_eq!(s["records"], 12, "{s}");
    let file = exports.join(format!("_/{id}.jsonl"));
    let lines = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .lines()
        .count();
    assert_eq!(lines, 12, "the file sink has every record");
    let records: Value = http
        .get(format!("{api}/v1/sessions/{id}/records?format=json"))
        .send()
        .await
        .expect("records")
        .json()
        .await
        .expect("JSON");
    assert_eq!(records, json!([]), "internal records removed");
    assert_eq!(get_session(&http, &api, &id).await["status"], "COMPLETED");
    site.shutdown().await;
}

/// Metrics across attempts: after a SIGKILL and a restart, `start_time` is still the first
/// attempt's, the attempts list shows both, and the rate is over running time only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_span_attempts_after_a_kill_and_resume() {
    let site = crate::resume_crash::product_site(150).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api) = serve_sled(dir.path());
    let http = reqwest::Client::new();
    let id = submit(&http, &api, json!({"config": slow_config(site.base_url())})).await;
    let first = wait_until(
        &http,
        &api,
        &id,
        Duration::from_secs(60),
        "a checkpoint",
        |s| s["records"].as_u64().unwrap_or(0) >= 5,
    )
    .await;
    server.kill9();
    // Off for a while, so that waiting would show in a duration but not in the running time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_server, api) = serve_sled(dir.path());
    let s = wait_until(
        &http,
        &api,
        &id,
        Duration::from_secs(120),
        "COMPLETED",
        |s| s["status"] == "COMPLETED",
    )
    .await;
    assert_eq!(
        s["metrics"]["start_time"], first["metrics"]["start_time"],
        "start_time is the first attempt's: {s}"
    );
    let attempts = s["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{s}");
    assert_eq!(attempts[0]["outcome"], "lease_expired", "{s}");
    assert_eq!(attempts[1]["outcome"], "completed", "{s}");
    let m = &s["metrics"];
    let (duration, running) = (
        m["duration_secs"].as_f64().unwrap_or(0.0),
        m["running_secs"].as_f64().unwrap_or(0.0),
    );
    assert!(
        running + 1.0 < duration,
        "the time killed is not running time: {m}"
    );
    let rate = m["processing_rate"].as_f64().unwrap_or(0.0);
    let expected = m["processed_elements"].as_f64().unwrap_or(0.0) / running;
    assert!((rate - expected).abs() < 0.05 * expected, "{m}");
    site.shutdown().await;
}
