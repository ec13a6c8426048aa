//! Crash-safe resume of one long crawl on the real binary (issue 8): `harvest serve` is SIGKILLed
//! five times while it crawls a 2,000-product site, and restarted each time. The session must end
//! COMPLETED with each product exactly once, having fetched at most 10% more product pages than a
//! clean crawl: each restart resumes from the last checkpoint, losing only the pages in flight
//! and the uncommitted ~100 ms of work.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proc::Server;

const PRODUCTS: usize = 2000;
const KILLS: usize = 5;

async fn site() -> crate::sitegen::Site {
    product_site(PRODUCTS).await
}

/// A generated shop of `products` products, 20 per list page.
pub(crate) async fn product_site(products: usize) -> crate::sitegen::Site {
    crate::sitegen::serve(crate::sitegen::SiteOptions {
        products,
        per_list: 20,
        specials: false,
        tree: 0,
    })
    .await
    .expect("fixture site")
}

/// The politeness delay paces the crawl at about 200 pages/s, so it lasts ~10 s: long enough to
/// kill it five times in the middle, and the work lost per kill (4 pages in flight plus ~100 ms
/// of uncommitted pages) stays well inside the 10% budget.
fn config(base: &str) -> String {
    paced_config("resume-crash", base)
}

/// The crawl of the resume tests: the list chain and the product pages (title and sku) of the
/// shop at `base`, 4 requests in flight 5 ms apart (~200 pages/s).
pub(crate) fn paced_config(name: &str, base: &str) -> String {
    format!(
        r#"
name = "{name}"
start_urls = ["{base}/index.html"]
[limits]
max_pages = 10000
max_depth = 200
[http]
concurrency = 4
per_host_concurrency = 4
delay_ms = 5
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

async fn session(client: &reqwest::Client, base: &str, id: &str) -> Option<Value> {
    let resp = client
        .get(format!("{base}/v1/sessions/{id}"))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// Polls (every 50 ms, up to `limit`) until the session satisfies `done`; returns it.
async fn wait_for(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some(s) = session(client, base, id).await {
            if done(&s) {
                return s;
            }
            last = s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("waited {limit:?} for {what}; the session was last {last}");
}

fn pages(s: &Value) -> u64 {
    s["metrics"]["pages_processed"].as_u64().unwrap_or(0)
}

/// Product pages a clean, uninterrupted crawl of the same site fetches (in process).
async fn clean_product_fetches(cfg: &str) -> u64 {
    let site = site().await;
    let text = cfg.replace("delay_ms = 5", "delay_ms = 0");
    let text = text.replace(&format!("{}/index.html", "BASE"), &site.url("/index.html"));
    let config = harvest::engine::parse_config_text(&text).expect("config parses");
    let summary = harvest::local::run_local(
        &config,
        &BTreeMap::new(),
        harvest::engine::EngineSettings::default(),
        Box::new(std::io::sink()),
        harvest::local::Progress::Silent,
        harvest::job::StopSignal::new(),
    )
    .await
    .expect("clean crawl");
    assert_eq!(summary.records, PRODUCTS as u64, "clean crawl: {summary}");
    site.hits_under("/product/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_mid_crawl_resumes_without_duplicates_or_much_refetching() {
    let clean = clean_product_fetches(&config("BASE")).await;
    assert_eq!(
        clean, PRODUCTS as u64,
        "a clean crawl fetches each product once"
    );

    let site = site().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let started = Instant::now();
    let server = Server::start(dir.path(), 1, &[]);
    let body = json!({
        "config": config(site.base_url()),
        "session_id": "long-crawl",
        "options": {"max_attempts": 10},
    });
    let resp = client
        .post(server.url("/v1/sessions"))
        .json(&body)
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED, "submit");
    let id = "long-crawl";
    let mut server = Some(server);
    // Kill after each further sixth of the crawl has been checkpointed.
    let step = (PRODUCTS as u64 + 100) / (KILLS as u64 + 1);
    for k in 1..=KILLS {
        let s = server.take().expect("a running server");
        let base = s.url("");
        let target = step * k as u64;
        let seen = wait_for(
            &client,
            &base,
            id,
            Duration::from_secs(60),
            &format!("{target} pages checkpointed before kill {k}"),
            |v| pages(v) >= target || v["status"] != "RUNNING" && v["status"] != "PENDING",
        )
        .await;
        assert_eq!(
            seen["status"], "RUNNING",
            "kill {k}: the crawl ended before it could be killed: {seen}"
        );
        s.kill9();
        let restarted = Server::start(dir.path(), 1, &[]);
        server = Some(restarted);
    }
    let s = server.take().expect("a running server");
    let base = s.url("");
    let done = wait_for(
        &client,
        &base,
        id,
        Duration::from_secs(120),
        "the session to end",
        |v| {
            matches!(
                v["status"].as_str(),
                Some("COMPLETED" | "FAILED" | "CANCELLED")
            )
        },
    )
    .await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(
        done["attempt"].as_u64().unwrap_or(0) > KILLS as u64,
        "each kill should have interrupted an attempt: {done}"
    );

    let mut skus: BTreeMap<String, u32> = BTreeMap::new();
    let mut offset = 0;
    // Bounded: at most PRODUCTS records in pages of 500, plus one empty page.
    for _ in 0..=(PRODUCTS / 500 + 1) {
        let url = format!("{base}/v1/sessions/{id}/records?format=json&offset={offset}&limit=500");
        let page: Value = client
            .get(url)
            .send()
            .await
            .expect("records")
            .json()
            .await
            .expect("records JSON");
        let items = match &page {
            Value::Array(items) => items.clone(),
            other => other["records"].as_array().cloned().unwrap_or_default(),
        };
        if items.is_empty() {
            break;
        }
        offset += items.len();
        for r in &items {
            let data = r.get("data").unwrap_or(r);
            let sku = data["sku"].as_str().unwrap_or_default().to_string();
            *skus.entry(sku).or_default() += 1;
        }
    }
    let dups: Vec<_> = skus.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicated records: {dups:?}");
    assert_eq!(skus.len(), PRODUCTS, "missing records");
    assert_eq!(
        done["metrics"]["processed_elements"].as_u64(),
        Some(PRODUCTS as u64)
    );

    let fetched = site.hits_under("/product/");
    eprintln!(
        "resume crash test: {KILLS} SIGKILLs, {fetched} product fetches (clean crawl: {clean}), \
         {} attempts, {:.1} s",
        done["attempt"],
        started.elapsed().as_secs_f64()
    );
    assert!(
        fetched * 10 <= clean * 11,
        "{fetched} product pages fetched across attempts; a clean crawl fetches {clean} (+10% max)"
    );
    s.kill9();
}
