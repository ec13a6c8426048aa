//! Crash tests on the real binary: SIGKILL `harvest serve` at random moments while sessions are
//! submitted and worked, restart it, and check that nothing acknowledged was lost and nothing
//! was duplicated. Also SIGTERM mid-crawl: the session is handed back without spending an attempt
//! and completes after a restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proc::Server;

/// Products on the fixture site; each session's crawl yields one record per product.
const PRODUCTS: usize = 30;

async fn shop() -> crate::sitegen::Site {
    let opts = crate::sitegen::SiteOptions {
        products: PRODUCTS,
        per_list: 10,
        specials: false,
        tree: 0,
    };
    crate::sitegen::serve(opts).await.expect("fixture site")
}

fn config(base: &str) -> String {
    format!(
        r#"
name = "crash"
start_urls = ["{base}/index.html"]
[http]
concurrency = 4
obey_robots_txt = false
[[follow]]
selector = "a.next"
[[follow]]
selector = "article.product a.title"
page = "product"
[pages.product]
fields.title = "h1"
fields.sku = {{ selector = "td.sku" }}
"#
    )
}

async fn submit(client: &reqwest::Client, server: &str, body: &Value) -> Option<String> {
    let resp = client
        .post(format!("{server}/v1/sessions"))
        .json(body)
        .send()
        .await
        .ok()?;
    if resp.status() != reqwest::StatusCode::CREATED {
        return None;
    }
    let v: Value = resp.json().await.ok()?;
    v.get("id").and_then(Value::as_str).map(str::to_string)
}

async fn get_session(client: &reqwest::Client, server: &str, id: &str) -> Option<Value> {
    let resp = client
        .get(format!("{server}/v1/sessions/{id}"))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

async fn records(client: &reqwest::Client, server: &str, id: &str) -> Vec<Value> {
    let url = format!("{server}/v1/sessions/{id}/records?format=json&limit=10000");
    let resp = client.get(url).send().await.expect("records request");
    assert!(
        resp.status().is_success(),
        "records of {id}: {}",
        resp.status()
    );
    let v: Value = resp.json().await.expect("records JSON");
    match v {
        Value::Array(items) => items,
        other => other
            .get("records")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

fn record_data(r: &Value) -> &Value {
    r.get("data").unwrap_or(r)
}

/// At least 20 SIGKILLs at random moments while sessions are submitted and worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let site = shop().await;
    // A politeness delay keeps each crawl running for a few hundred milliseconds, so kills land
    // in the middle of crawls and checkpoints, not only between sessions.
    let cfg = config(site.base_url()).replace("concurrency = 4", "concurrency = 2\ndelay_ms = 10");
    let dir = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let kills = 20;
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next_rand = move |n: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % n
    };
    let started = Instant::now();
    for round in 0..kills {
        let server = Server::start(dir.path(), 4, &[]);
        let base = server.url("");
        // Every session acknowledged before any earlier kill is still there.
        let so_far = acked.lock().expect("acked").clone();
        for id in &so_far {
            let s = get_session(&client, &base, id).await;
            assert!(
                s.is_some(),
                "round {round}: acknowledged session {id} is missing after restart"
            );
        }
        // Submit while the workers run, then kill at a random moment.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let submitter = {
            let (client, base, acked, stop) =
                (client.clone(), base.clone(), acked.clone(), stop.clone());
            // A session claimed just before a kill has made no progress, and such attempts count
            // against max_attempts (the poison-input rule, tested elsewhere); this test is about
            // loss and duplication, so it allows many.
            let body = json!({"config": cfg, "options": {"max_attempts": 1000}});
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match submit(&client, &base, &body).await {
                        Some(id) => acked.lock().expect("acked").push(id),
                        None => break, // the server died mid-request: not acknowledged
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(150 + next_rand(600))).await;
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(15), submitter).await;
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "crash rounds took over 5 minutes"
        );
    }

    // Let the last process finish everything, then check every session.
    let server = Server::start(dir.path(), 4, &[]);
    let base = server.url("");
    let ids = acked.lock().expect("acked").clone();
    assert!(
        ids.len() >= kills,
        "only {} sessions were acknowledged",
        ids.len()
    );
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an id was acknowledged twice");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut statuses: HashMap<String, String> = HashMap::new();
    for id in &ids {
        loop {
            let s = get_session(&client, &base, id)
                .await
                .unwrap_or_else(|| panic!("session {id} lost"));
            let status = s["status"].as_str().unwrap_or_default().to_string();
            if matches!(status.as_str(), "COMPLETED" | "FAILED" | "CANCELLED") {
                statuses.insert(id.clone(), status);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "session {id} still {status} after the final restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut attempts = 0;
    for id in &ids {
        let s = get_session(&client, &base, id).await.expect("session");
        attempts += s["attempt"].as_u64().unwrap_or(0);
    }
    eprintln!(
        "crash test: {} sessions acknowledged across {kills} SIGKILLs, {attempts} attempts in all",
        ids.len()
    );
    assert!(
        attempts > ids.len() as u64,
        "no session was ever interrupted: the kills missed the work"
    );
    for id in &ids {
        if statuses[id] != "COMPLETED" {
            let s = get_session(&client, &base, id).await;
            panic!("session {id} ended {}: {s:?}", statuses[id]);
        }
        let recs = records(&client, &base, id).await;
        let skus: Vec<String> = recs
            .iter()
            .map(|r| {
                record_data(r)["sku"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        let distinct: BTreeSet<&String> = skus.iter().collect();
        assert_eq!(
            recs.len(),
            PRODUCTS,
            "session {id}: {} records, want {PRODUCTS} (skus {skus:?})",
            recs.len()
        );
        assert_eq!(distinct.len(), PRODUCTS, "session {id}: duplicated records");
        let s = get_session(&client, &base, id).await.expect("session");
        assert_eq!(
            s["metrics"]["processed_elements"].as_u64(),
            Some(PRODUCTS as u64),
            "session {id}: {s}"
        );
    }
    server.kill9();
}

/// SIGTERM mid-crawl: the session goes back to PENDING with its attempt count unchanged, the
/// process exits 0, and the session completes after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_crawl_hands_the_session_back_and_it_completes_after_restart() {
    // A slow site keeps the crawl running when SIGTERM arrives.
    let site = shop().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let server = Server::start(dir.path(), 2, &[("HARVEST_SHUTDOWN_GRACE_SECS", "0")]);
    let base = server.url("");
    let mut cfg = config(site.base_url());
    cfg = cfg.replace("concurrency = 4", "concurrency = 1\ndelay_ms = 100");
    let id = submit(&client, &base, &json!({"config": cfg}))
        .await
        .expect("submitted");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = get_session(&client, &base, &id).await.expect("session");
        if s["status"] == "RUNNING" && s["metrics"]["processed_elements"].as_u64().unwrap_or(0) > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crawl did not start making progress: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exit = server
        .terminate(Duration::from_secs(30))
        .expect("exited after SIGTERM");
    assert!(exit.success(), "exit status {exit:?}");

    let server = Server::start(dir.path(), 0, &[]);
    let s = get_session(&client, &server.url(""), &id)
        .await
        .expect("session");
    assert_eq!(s["status"], "PENDING", "{s}");
    assert_eq!(
        s["attempt"].as_u64(),
        Some(1),
        "a hand-back keeps the attempt count: {s}"
    );
    server.kill9();

    let server = Server::start(dir.path(), 2, &[]);
    let base = server.url("");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = get_session(&client, &base, &id).await.expect("session");
        if s["status"] == "COMPLETED" {
            let recs = records(&client, &base, &id).await;
            assert_eq!(recs.len(), PRODUCTS);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not completed after restart: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
