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

/// Session ids are scoped to their tenant: two tenants submitting the same id both get 201 and
/// each sees its own session, records, events and listing; a 409 only within a tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_may_use_the_same_id_and_each_sees_its_own() {
    let s = start(TENANTS).await;
    let body = json!({"config": {"name": "x", "records": 3}, "session_id": "same"});
    let r = s.call(Method::POST, "/v1/sessions", A, Some(&body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let body = json!({"config": {"name": "x", "records": 5}, "session_id": "same"});
    let r = s.call(Method::POST, "/v1/sessions", B, Some(&body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["client"]["client_id"], "globex");
    assert_eq!(
        s.wait_terminal_in(Some("acme"), "same").await.records,
        3,
        "acme's"
    );
    assert_eq!(s.wait_terminal_in(Some("globex"), "same").await.records, 5);
    for (token, client, records) in [(A, "acme", 3), (B, "globex", 5)] {
        let r = s.call(Method::GET, "/v1/sessions/same", token, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["client"]["client_id"], client);
        let r = s
            .call(
                Method::GET,
                "/v1/sessions/same/records?format=jsonl",
                token,
                None,
            )
            .await;
        assert_eq!(r.text.lines().count(), records, "{client}: {}", r.text);
        let r = s.call(Method::GET, "/v1/sessions", token, None).await;
        let listed: Vec<(&str, &str)> = r.json["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["id"].as_str().unwrap(),
                    v["client"]["client_id"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(listed, vec![("same", client)]);
        let mut feed = SseReader::open(&s, "/v1/sessions/same/events", token).await;
        let first = feed.next(Duration::from_secs(30)).await.expect("an event");
        assert_eq!(first.data["client_id"], client, "{first:?}");
        assert_eq!(first.data["session"]["records"], records, "{first:?}");
        // Within a tenant the id is taken.
        let dup = json!({"config": {"name": "x"}, "session_id": "same"});
        s.call(Method::POST, "/v1/sessions", token, Some(&dup))
            .await
            .assert_error(409, "duplicate_session");
    }
    // Closing one tenant's session leaves the other's.
    let r = s.call(Method::DELETE, "/v1/sessions/same", A, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    s.call(Method::GET, "/v1/sessions/same", A, None)
        .await
        .assert_error(404, "not_found");
    let r = s.call(Method::GET, "/v1/sessions/same", B, None).await;
    assert_eq!(r.json["client"]["client_id"], "globex");
}

/// `[[clients]] max_pending` and `max_running` hold under a burst of 500 submissions from one
/// tenant (429 with `Retry-After` beyond max_pending; never more than max_running RUNNING), while
/// another tenant's sessions still start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_under_a_burst_and_other_tenants_still_start() {
    let s = start(
        r#"
[workers]
concurrency = 4
poll_interval_ms = 20
[[clients]]
id = "acme"
token = "acme-token-123"
max_running = 2
max_pending = 5
[[clients]]
id = "globex"
token = "globex-token-456"
"#,
    )
    .await;
    let running_of = |client: &'static str| {
        let store = s.harvest.store().clone();
        async move {
            store
                .session_list(harvest::store::SessionList {
                    client_id: Some(client.into()),
                    status: Some(harvest::SessionStatus::Running),
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .expect("list")
                .sessions
                .len()
        }
    };
    let (mut created, mut refused, mut max_seen) = (0, 0, 0);
    for i in 0..500 {
        let body =
            json!({"config": {"name": "x", "wait_gate": true}, "session_id": format!("a{i}")});
        let r = s.call(Method::POST, "/v1/sessions", A, Some(&body)).await;
        match r.status.as_u16() {
            201 => created += 1,
            429 => {
                assert_eq!(r.json["error"]["code"], "quota_exceeded", "{}", r.text);
                refused += 1;
            }
            other => panic!("submission {i}: {other} {}", r.text),
        }
        if i % 25 == 0 {
            max_seen = max_seen.max(running_of("acme").await);
        }
    }
    // Two may have started (max_running) and five wait (max_pending); a few more may have been
    // admitted while the first two were being claimed, never more than the two slots.
    assert!(
        (5..=7).contains(&created),
        "created {created}, refused {refused}"
    );
    assert_eq!(created + refused, 500);
    let r = s
        .http
        .post(format!("{}/v1/sessions", s.base))
        .bearer_auth("acme-token-123")
        .json(&json!({"config": {"name": "x"}, "session_id": "one-more"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some(), "Retry-After sent");
    // globex's sessions start although acme has a backlog and free worker slots are few.
    for i in 0..2 {
        let body =
            json!({"config": {"name": "x", "wait_gate": true}, "session_id": format!("g{i}")});
        let r = s.call(Method::POST, "/v1/sessions", B, Some(&body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        max_seen = max_seen.max(running_of("acme").await);
        if running_of("globex").await == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "globex's sessions did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running_of("acme").await, 2, "acme runs at its limit");
    assert!(
        max_seen <= 2,
        "acme had {max_seen} RUNNING, over max_running = 2"
    );
    s.gate.add_permits(1000);
}

/// A session stored before ids were scoped to tenants (in the single namespace) stays its
/// client's: found through the API by its owner, 404 for another tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stored_before_tenant_scoped_ids_stays_its_clients() {
    let s = start(TENANTS).await;
    let legacy = harvest::Session::pending(
        "legacy".parse().unwrap(),
        harvest::ClientContext::of("acme"),
        harvest::session::JobSpec {
            config: json!({"name": "x"}).into(),
            params: Default::default(),
            agent: None,
        },
        harvest::SessionOptions {
            run_at: Some(harvest::session::Timestamp(i64::MAX / 4)),
            ..Default::default()
        },
        harvest::session::Timestamp::now(),
    );
    assert_eq!(legacy.tenant, None);
    s.harvest
        .store()
        .session_insert(harvest::store::SessionInsert {
            session: legacy,
            single_agent: None,
        })
        .await
        .expect("insert");
    let r = s.call(Method::GET, "/v1/sessions/legacy", A, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["client"]["client_id"], "acme");
    s.call(Method::GET, "/v1/sessions/legacy", B, None)
        .await
        .assert_error(404, "not_found");
    // Its id stays taken for acme only.
    let body = json!({"config": {"name": "x"}, "session_id": "legacy"});
    s.call(Method::POST, "/v1/sessions", A, Some(&body))
        .await
        .assert_error(409, "duplicate_session");
    let r = s.call(Method::POST, "/v1/sessions", B, Some(&body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = s
        .call(Method::POST, "/v1/sessions/legacy/cancel", A, None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json["status"], "CANCELLED");
}
