//! Tenant-scoped session ids and per-tenant quotas on the real binary (`harvest serve` with two
//! `[[clients]]`, crawling a fixture site on 127.0.0.1).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

const ACME: &str = "acme-token-1234";
const GLOBEX: &str = "globex-token-5678";

/// `harvest serve` with two tenants (acme with `acme_limits` added to its table), and `store`
/// (top-level settings: the store to use) at the top of its config file.
fn serve(dir: &std::path::Path, store: &str, acme_limits: &str) -> crate::proc::Server {
    let service = dir.join("service.toml");
    std::fs::write(
        &service,
        format!(
            "{store}\n[[clients]]\nid = \"acme\"\ntoken = \"{ACME}\"\n{acme_limits}\n\
             [[clients]]\nid = \"globex\"\ntoken = \"{GLOBEX}\"\n\
             [http_guard]\nallow_networks = [\"127.0.0.0/8\"]\n"
        ),
    )
    .expect("write config");
    crate::proc::Server::start(
        &dir.join("data"),
        2,
        &[("HARVEST_CONFIG", service.to_str().expect("utf-8"))],
    )
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, String) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    async fn json(&self, token: &str, path: &str) -> Value {
        let (status, text) = self.call(token, Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).expect("JSON")
    }

    /// Waits until the caller's session `id` is terminal; its view.
    async fn wait_terminal(&self, token: &str, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.json(token, &format!("/v1/sessions/{id}")).await;
            if ["COMPLETED", "FAILED", "CANCELLED"].contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} did not end: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The caller's sessions in `status`.
    async fn count(&self, token: &str, status: &str) -> usize {
        let v = self
            .json(token, &format!("/v1/sessions?status={status}&limit=1000"))
            .await;
        v["sessions"].as_array().expect("sessions").len()
    }
}

/// A crawl of `pages` URLs of `site` with a politeness delay, so that it runs for a while.
fn crawl(site: &crate::sitegen::Site, pages: usize, delay_ms: u64) -> Value {
    let urls: Vec<String> = (0..pages)
        .map(|i| site.url(&format!("/index.html?n={i}")))
        .collect();
    json!({"start_urls": urls, "start_page": "p",
           "http": {"obey_robots_txt": false, "delay_ms": delay_ms},
           "pages": {"p": {"fields": {"title": "h1"}}}})
}

/// Two tenants submitting the same id both get 201 and each sees its own session, records,
/// events and listing; another tenant's id is a 404 once one of them closes theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_submitting_the_same_id_each_see_their_own() {
    let site = crate::resume_crash::product_site(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), "", "");
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
    };
    for (token, pages) in [(ACME, 2), (GLOBEX, 3)] {
        let body = json!({"config": crawl(&site, pages, 0), "session_id": "shared-id"});
        let (status, text) = api
            .call(token, Method::POST, "/v1/sessions", Some(&body))
            .await;
        assert_eq!(status, 201, "{text}");
    }
    for (token, client, pages) in [(ACME, "acme", 2), (GLOBEX, "globex", 3)] {
        let v = api.wait_terminal(token, "shared-id").await;
        assert_eq!(v["status"], "COMPLETED", "{v}");
        assert_eq!(v["client"]["client_id"], client);
        let (status, text) = api
            .call(
                token,
                Method::GET,
                "/v1/sessions/shared-id/records?format=jsonl",
                None,
            )
            .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(text.lines().count(), pages, "{client}'s records: {text}");
        let list = api.json(token, "/v1/sessions").await;
        let listed: Vec<(&str, &str)> = list["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap(),
                    s["client"]["client_id"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(listed, vec![("shared-id", client)]);
        // The session's event stream starts with its own (terminal) state.
        let resp = api
            .http
            .get(format!("{}/v1/sessions/shared-id/events", api.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("events");
        assert_eq!(resp.status().as_u16(), 200);
        let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
            .await
            .expect("a terminal session's stream ends")
            .expect("body");
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .expect("an event");
        let e: Value = serde_json::from_str(data.trim()).expect("event JSON");
        assert_eq!(e["client_id"], client, "{e}");
        assert_eq!(e["session_id"], "shared-id");
        // Within one tenant the id is taken.
        let body = json!({"config": crawl(&site, 1, 0), "session_id": "shared-id"});
        let (status, text) = api
            .call(token, Method::POST, "/v1/sessions", Some(&body))
            .await;
        assert_eq!(status, 409, "{text}");
    }
    let (status, _) = api
        .call(GLOBEX, Method::DELETE, "/v1/sessions/shared-id", None)
        .await;
    assert_eq!(status, 200);
    let (status, text) = api
        .call(GLOBEX, Method::GET, "/v1/sessions/shared-id", None)
        .await;
    assert_eq!(status, 404, "{text}");
    let v = api.json(ACME, "/v1/sessions/shared-id").await;
    assert_eq!(v["client"]["client_id"], "acme", "acme's is untouched");
}

/// A burst of 500 submissions from one tenant with `max_pending = 5` and `max_running = 1`:
/// 429 with `Retry-After` beyond max_pending, never more than one of its sessions RUNNING
/// (sampled), and the other tenant's session still starts while acme's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_a_burst_of_500_and_another_tenant_still_starts() {
    quota_burst("").await;
}

/// The same on PostgreSQL (skipped without `HARVEST_TEST_DATABASE_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_a_burst_of_500_on_postgres() {
    let Some(url) = crate::store_postgres::database_url() else {
        return;
    };
    let schema = crate::store_postgres::unique_schema();
    let _guard = crate::store_postgres::SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    quota_burst(&format!(
        "store = \"postgres\"\ndatabase_url = \"{url}\"\ndatabase_schema = \"{schema}\""
    ))
    .await;
}

async fn quota_burst(store: &str) {
    let site = crate::resume_crash::product_site(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), store, "max_running = 1\nmax_pending = 5");
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
    };
    // Each of acme's sessions fetches 20 pages 200 ms apart: ~4 s.
    let slow = json!({"config": crawl(&site, 20, 200)});
    let (mut created, mut refused, mut most_running) = (0, 0, 0);
    for i in 0..500 {
        let r = api
            .http
            .post(format!("{}/v1/sessions", api.base))
            .bearer_auth(ACME)
            .json(&slow)
            .send()
            .await
            .expect("submit");
        match r.status().as_u16() {
            201 => created += 1,
            429 => {
                assert!(
                    r.headers().get("retry-after").is_some(),
                    "Retry-After on a 429"
                );
                let v: Value = r.json().await.expect("JSON");
                assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
                refused += 1;
            }
            other => panic!("submission {i}: {other}"),
        }
        if i % 20 == 0 {
            most_running = most_running.max(api.count(ACME, "RUNNING").await);
        }
    }
    // 5 PENDING at most, plus the one RUNNING (and one more if a session ended meanwhile).
    assert!(
        (5..=8).contains(&created),
        "created {created}, refused {refused}"
    );
    assert_eq!(created + refused, 500);
    assert!(api.count(ACME, "PENDING").await <= 5);
    // globex's session starts although acme has a backlog and a worker slot is free for it.
    let body = json!({"config": crawl(&site, 1, 0), "session_id": "g1"});
    let (status, text) = api
        .call(GLOBEX, Method::POST, "/v1/sessions", Some(&body))
        .await;
    assert_eq!(status, 201, "{text}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        most_running = most_running.max(api.count(ACME, "RUNNING").await);
        let g = api.json(GLOBEX, "/v1/sessions/g1").await;
        if g["status"] == "COMPLETED" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "globex's session did not run: {g}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        api.count(ACME, "PENDING").await >= 1,
        "globex ran while acme still had sessions waiting"
    );
    assert!(
        most_running <= 1,
        "acme had {most_running} RUNNING, over max_running = 1"
    );
}
