//! Tenants over HTTP: bearer tokens, forced client ids, and two clients that cannot see or touch
//! each other's sessions (404, as if they did not exist).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::api_support::{SseReader, start};

const TENANTS: &str = r#"
[workers]
concurrency = 2
[[clients]]
id = "acme"
token = "acme-token-123"
[[clients]]
id = "globex"
token = "globex-token-456"
"#;

const A: Option<&str> = Some("acme-token-123");
const B: Option<&str> = Some("globex-token-456");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_401_and_probes_stay_open() {
    let s = start(TENANTS).await;
    let body = json!({"config": {"name": "x"}});
    s.call(Method::POST, "/v1/sessions", None, Some(&body))
        .await
        .assert_error(401, "unauthorized");
    s.call(Method::GET, "/v1/sessions", Some("wrong-token-000"), None)
        .await
        .assert_error(401, "unauthorized");
    s.call(Method::GET, "/v1/sessions/x", Some("acme-token-12"), None)
        .await
        .assert_error(401, "unauthorized");
    let r = s
        .http
        .get(format!("{}/v1/sessions", s.base))
        .header("authorization", "Basic YWNtZTpwdw==")
        .send()
        .await
        .unwrap();
    crate::api_support::into_resp(r)
        .await
        .assert_error(401, "unauthorized");
    s.call(Method::GET, "/v1/events", None, None)
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(s.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(s.get("/readyz").await.status, StatusCode::OK);
    assert_eq!(s.get("/v1/openapi.json").await.status, StatusCode::OK);
    assert_eq!(
        s.call(Method::GET, "/v1/sessions", A, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_cannot_see_or_touch_each_others_sessions() {
    let s = start(TENANTS).await;
    // acme claims to be globex in the body: the token decides.
    let body = json!({"config": {"name": "x", "records": 3}, "client": {"client_id": "globex", "metadata": {"k": "v"}}, "session_id": "a1"});
    let r = s.call(Method::POST, "/v1/sessions", A, Some(&body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["client"]["client_id"], "acme");
    assert_eq!(r.json["client"]["metadata"]["k"], "v");
    let body = json!({"config": {"name": "x", "wait_gate": true}, "session_id": "b1"});
    let r = s.call(Method::POST, "/v1/sessions", B, Some(&body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["client"]["client_id"], "globex");
    s.wait_terminal("a1").await;

    // Same id from another tenant is still a duplicate: ids are global and never reused.
    let dup = json!({"config": {"name": "x"}, "session_id": "a1"});
    s.call(Method::POST, "/v1/sessions", B, Some(&dup))
        .await
        .assert_error(409, "duplicate_session");

    // globex sees nothing of acme's.
    for path in [
        "/v1/sessions/a1",
        "/v1/sessions/a1/records",
        "/v1/sessions/a1/log",
        "/v1/sessions/a1/events",
    ] {
        s.call(Method::GET, path, B, None)
            .await
            .assert_error(404, "not_found");
    }
    s.call(Method::POST, "/v1/sessions/a1/cancel", B, None)
        .await
        .assert_error(404, "not_found");
    s.call(Method::DELETE, "/v1/sessions/a1", B, None)
        .await
        .assert_error(404, "not_found");
    s.call(Method::GET, "/v1/sessions?client_id=acme", B, None)
        .await
        .assert_error(404, "not_found");
    s.call(Method::GET, "/v1/events?client_id=acme", B, None)
        .await
        .assert_error(404, "not_found");
    let r = s.call(Method::GET, "/v1/sessions", B, None).await;
    let ids: Vec<&str> = r.json["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["b1"]);
    let r = s
        .call(Method::GET, "/v1/sessions?client_id=globex", B, None)
        .await;
    assert_eq!(r.json["sessions"].as_array().unwrap().len(), 1);

    // acme's session is untouched, and acme cannot touch globex's.
    let r = s.call(Method::GET, "/v1/sessions/a1", A, None).await;
    assert_eq!(r.json["status"], "COMPLETED");
    let r = s
        .call(Method::GET, "/v1/sessions/a1/records?format=jsonl", A, None)
        .await;
    assert_eq!(r.text.lines().count(), 3);
    s.call(Method::POST, "/v1/sessions/b1/cancel", A, None)
        .await
        .assert_error(404, "not_found");
    s.call(Method::DELETE, "/v1/sessions/b1", A, None)
        .await
        .assert_error(404, "not_found");
    let r = s.call(Method::GET, "/v1/sessions", A, None).await;
    let ids: Vec<&str> = r.json["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a1"]);

    // The all-sessions stream of globex carries only globex's events.
    let mut feed = SseReader::open(&s, "/v1/events", B).await;
    let body = json!({"config": {"name": "x"}, "session_id": "a2"});
    assert_eq!(
        s.call(Method::POST, "/v1/sessions", A, Some(&body))
            .await
            .status,
        StatusCode::CREATED
    );
    let body = json!({"config": {"name": "x"}, "session_id": "b2"});
    assert_eq!(
        s.call(Method::POST, "/v1/sessions", B, Some(&body))
            .await
            .status,
        StatusCode::CREATED
    );
    let first = feed.next(Duration::from_secs(30)).await.expect("an event");
    assert_eq!(first.data["session_id"], "b2", "{:?}", first);
    assert_eq!(first.data["client_id"], "globex");

    // globex cancels its own running session.
    let r = s
        .call(Method::POST, "/v1/sessions/b1/cancel", B, None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(s.wait_terminal("b1").await.status.as_str(), "CANCELLED");
    for _ in 0..20 {
        let e = feed.next(Duration::from_secs(30)).await.expect("an event");
        assert_eq!(e.data["client_id"], "globex", "{:?}", e);
        if e.data["session_id"] == "b1" && e.event == "cancelled" {
            return;
        }
    }
    panic!("no cancelled event for b1 on globex's stream");
}
