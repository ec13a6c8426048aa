//! The HTTP API over real HTTP: every route of the README's API table (agents aside), its status codes and its
//! errors, in the `{"error": {"code", "message"}}` shape.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api_support::{CONFIG, record, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_json_config_answers_201_with_the_session_view() {
    let s = start(CONFIG).await;
    let body = json!({
        "config": {"name": "t", "records": 3},
        "params": {"category": "books", "page": 2},
        "client": {"client_id": "me", "metadata": {"team": "data", "n": 1}},
        "options": {"max_duration_secs": 60, "priority": 5},
        "session_id": "ry37456r"
    });
    let v = s.submit(body).await;
    assert_eq!(v["id"], "ry37456r");
    assert_eq!(v["status"], "PENDING");
    assert_eq!(
        v["client"],
        json!({"client_id": "me", "metadata": {"team": "data", "n": 1}})
    );
    assert_eq!(v["attempt"], 0);
    assert_eq!(v["options"]["max_duration_secs"], 60);
    assert_eq!(v["options"]["priority"], 5);
    assert_eq!(v["options"]["max_attempts"], 3, "service default filled in");
    for k in [
        "start_time",
        "end_time",
        "duration_secs",
        "pages_processed",
        "processed_elements",
        "processing_rate",
    ] {
        assert!(v["metrics"].get(k).is_some(), "metrics.{k} missing: {v}");
    }
    for k in [
        "http_requests",
        "http_errors",
        "bytes_received",
        "retries",
        "robots_blocked",
    ] {
        assert!(v["usage"].get(k).is_some(), "usage.{k} missing: {v}");
    }
    for k in [
        "error",
        "created_at",
        "updated_at",
        "run_at",
        "agent",
        "records",
    ] {
        assert!(v.get(k).is_some(), "{k} missing: {v}");
    }
    assert!(
        v.get("lease").is_none() && v.get("job").is_none(),
        "internals leak: {v}"
    );

    let done = s.wait_terminal("ry37456r").await;
    assert_eq!(done.job.params.get("page").map(String::as_str), Some("2"));
    let g = s.get("/v1/sessions/ry37456r").await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.json["status"], "COMPLETED");
    assert_eq!(g.json["records"], 3);
    assert_eq!(g.json["metrics"]["processed_elements"], 3);
    assert!(g.json["metrics"]["end_time"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_as_toml_text_is_accepted_and_bad_toml_is_400_naming_the_problem() {
    let s = start(CONFIG).await;
    let v = s
        .submit(json!({"config": "name = \"catalog\"\nrecords = 2\n[limits]\nmax_pages = 3\n"}))
        .await;
    let done = s.wait_terminal(v["id"].as_str().unwrap()).await;
    assert_eq!(done.job.config["limits"]["max_pages"], 3);
    assert_eq!(done.metrics.processed_elements, 2);

    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": "name = \"x\"\nrecords = [1,\n"}),
        )
        .await;
    r.assert_error(400, "invalid_config");
    let m = r.json["error"]["message"].as_str().unwrap();
    assert!(m.contains("TOML") && m.contains("line"), "{m}");

    // JSON given as text works too, and its errors are named as JSON.
    let r = s
        .post("/v1/sessions", &json!({"config": "{\"name\": 1"}))
        .await;
    r.assert_error(400, "invalid_config");

    // A config that parses but does not validate: the job's message names the field.
    let r = s
        .post("/v1/sessions", &json!({"config": {"records": 1}}))
        .await;
    r.assert_error(400, "invalid_config");
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("name"),
        "{}",
        r.text
    );
    let r = s
        .post("/v1/sessions", &json!({"config": "records = 1"}))
        .await;
    r.assert_error(400, "invalid_config");
    let r = s.post("/v1/sessions", &json!({"config": [1, 2]})).await;
    r.assert_error(400, "invalid_config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_answered_in_the_error_shape() {
    let s = start("[server]\nmax_body_bytes = 2048\n").await;
    let url = format!("{}/v1/sessions", s.base);
    // Not JSON.
    let r = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    crate::api_support::into_resp(r)
        .await
        .assert_error(400, "invalid_request");
    // Not declared JSON.
    let r = s
        .http
        .post(&url)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    crate::api_support::into_resp(r)
        .await
        .assert_error(415, "unsupported_media_type");
    // A field that does not exist, named.
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "confg": 1}),
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("confg"), "{}", r.text);
    // Options are checked with their path.
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "options": {"max_duration": 5}}),
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("max_duration"), "{}", r.text);
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "options": {"max_attempts": 0}}),
        )
        .await;
    r.assert_error(400, "invalid_request");
    // Over the bound (PostgreSQL's column would refuse it with a server error).
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "options": {"max_attempts": 4294967295u32}}),
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("at most 10000"), "{}", r.text);
    // An agent's options are checked when it is saved, not at its first run.
    let r = s
        .call(
            Method::PUT,
            "/v1/agents/bounded",
            None,
            Some(&json!({"config": {"name": "x"}, "options": {"max_attempts": 10001}})),
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("max_attempts"), "{}", r.text);
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "params": {"a": [1]}}),
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("params.a"), "{}", r.text);
    // Missing config.
    let r = s.post("/v1/sessions", &json!({"params": {}})).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("config"), "{}", r.text);
    // Over server.max_body_bytes.
    let big = json!({"config": {"name": "x", "pad": "y".repeat(4096)}});
    let r = s.post("/v1/sessions", &big).await;
    r.assert_error(413, "payload_too_large");
    // Unknown route and wrong method.
    s.get("/v1/nothing").await.assert_error(404, "not_found");
    s.get("/nothing").await.assert_error(404, "not_found");
    s.call(Method::PUT, "/v1/sessions", None, None)
        .await
        .assert_error(405, "method_not_allowed");
    s.call(Method::GET, "/v1/sessions/x/cancel", None, None)
        .await
        .assert_error(405, "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_duplicate_409_and_invalid_400() {
    let s = start(CONFIG).await;
    s.submit(json!({"config": {"name": "x"}, "session_id": "dup-1"}))
        .await;
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "session_id": "dup-1"}),
        )
        .await;
    r.assert_error(409, "duplicate_session");
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "session_id": "a/b"}),
        )
        .await;
    r.assert_error(400, "invalid_session_id");
    let r = s
        .post(
            "/v1/sessions",
            &json!({"config": {"name": "x"}, "session_id": "x".repeat(129)}),
        )
        .await;
    r.assert_error(400, "invalid_session_id");
    s.get("/v1/sessions/missing")
        .await
        .assert_error(404, "not_found");
    s.get("/v1/sessions/a..b")
        .await
        .assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_newest_first_with_cursor_and_filters() {
    // No workers: everything stays PENDING unless cancelled.
    let s = start("[workers]\nconcurrency = 0\n").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let client = if i % 2 == 0 { "even" } else { "odd" };
        let v = s
            .submit(json!({"config": {"name": "x"}, "client": {"client_id": client}, "session_id": format!("s{i}")}))
            .await;
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    s.post("/v1/sessions/s3/cancel", &json!({})).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/sessions?limit=3&cursor={}", urlencode(c)),
            None => "/v1/sessions?limit=3".to_string(),
        };
        let r = s.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for v in r.json["sessions"].as_array().unwrap() {
            seen.push(v["id"].as_str().unwrap().to_string());
        }
        cursor = r.json["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    let expected: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, expected, "newest first, each once");

    let r = s.get("/v1/sessions?client_id=odd").await;
    let odd: Vec<&str> = r.json["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(odd, vec!["s5", "s3", "s1"]);
    let r = s.get("/v1/sessions?status=CANCELLED").await;
    let c: Vec<&str> = r.json["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(c, vec!["s3"]);
    let r = s
        .get("/v1/sessions?status=pending&client_id=even&limit=2")
        .await;
    assert_eq!(r.json["sessions"].as_array().unwrap().len(), 2);
    assert!(r.json["next_cursor"].is_string());

    s.get("/v1/sessions?status=DONE")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions?limit=0")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions?limit=1001")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions?limit=x")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions?cursor=garbage")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions?colour=red")
        .await
        .assert_error(400, "invalid_request");
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_202_idempotent_and_409_for_another_terminal_status() {
    let s = start(CONFIG).await;
    // PENDING (run_at in the future keeps workers off it) → CANCELLED at once.
    let later = "2999-01-01T00:00:00Z";
    s.submit(json!({"config": {"name": "x"}, "session_id": "p", "options": {"run_at": later}}))
        .await;
    let r = s.post("/v1/sessions/p/cancel", &json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json["status"], "CANCELLED");
    let r = s
        .call(Method::POST, "/v1/sessions/p/cancel", None, None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "again: {}", r.text);
    assert_eq!(r.json["status"], "CANCELLED");

    // RUNNING → flagged, then the worker ends it CANCELLED.
    let mut events = s.harvest.subscribe();
    s.submit(json!({"config": {"name": "x", "wait_gate": true}, "session_id": "r"}))
        .await;
    wait_started(&mut events, "r").await;
    let r = s.post("/v1/sessions/r/cancel", &json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(
        r.json["status"] == "RUNNING" || r.json["status"] == "CANCELLED",
        "{}",
        r.text
    );
    assert_eq!(s.wait_terminal("r").await.status.as_str(), "CANCELLED");
    let r = s.post("/v1/sessions/r/cancel", &json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    // COMPLETED → 409.
    s.submit(json!({"config": {"name": "x"}, "session_id": "c"}))
        .await;
    s.wait_terminal("c").await;
    s.post("/v1/sessions/c/cancel", &json!({}))
        .await
        .assert_error(409, "conflict");
    // FAILED → 409.
    s.submit(json!({"config": {"name": "x", "fail": true}, "session_id": "f"}))
        .await;
    assert_eq!(s.wait_terminal("f").await.status.as_str(), "FAILED");
    let r = s.get("/v1/sessions/f").await;
    assert_eq!(r.json["error"]["kind"], "job_failed");
    s.post("/v1/sessions/f/cancel", &json!({}))
        .await
        .assert_error(409, "conflict");

    s.post("/v1/sessions/nope/cancel", &json!({}))
        .await
        .assert_error(404, "not_found");
}

pub async fn wait_started(
    events: &mut tokio::sync::broadcast::Receiver<harvest::event::Event>,
    id: &str,
) {
    let fut = async {
        loop {
            match events.recv().await {
                Ok(e)
                    if e.session_id.as_str() == id
                        && e.kind == harvest::event::EventKind::Started =>
                {
                    return;
                }
                Ok(_) => continue,
                Err(e) => panic!("event bus: {e}"),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), fut)
        .await
        .expect("session started within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_removes_the_session_and_its_records() {
    let s = start(CONFIG).await;
    s.submit(json!({"config": {"name": "x", "records": 5}, "session_id": "gone"}))
        .await;
    s.wait_terminal("gone").await;
    let r = s
        .call(Method::DELETE, "/v1/sessions/gone", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["id"], "gone");
    assert_eq!(r.json["status"], "COMPLETED");
    s.get("/v1/sessions/gone")
        .await
        .assert_error(404, "not_found");
    s.get("/v1/sessions/gone/records")
        .await
        .assert_error(404, "not_found");
    s.get("/v1/sessions/gone/log")
        .await
        .assert_error(404, "not_found");
    s.call(Method::DELETE, "/v1/sessions/gone", None, None)
        .await
        .assert_error(404, "not_found");
    // A PENDING one can be closed too.
    s.submit(json!({"config": {"name": "x"}, "session_id": "p", "options": {"run_at": "2999-01-01T00:00:00Z"}})).await;
    let r = s.call(Method::DELETE, "/v1/sessions/p", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["status"], "PENDING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_json_jsonl_and_csv_with_offset_and_limit() {
    let s = start(CONFIG).await;
    // 2500 records: the stream spans three store pages.
    s.submit(
        json!({"config": {"name": "x", "records": 2500, "per_checkpoint": 700}, "session_id": "r"}),
    )
    .await;
    s.wait_terminal("r").await;

    let r = s.get("/v1/sessions/r/records").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type.starts_with("application/json"),
        "{}",
        r.content_type
    );
    let all = r.json.as_array().expect("a JSON array");
    assert_eq!(all.len(), 2500);
    for (i, v) in all.iter().enumerate() {
        assert_eq!(v, &record(i as u64));
    }

    let r = s
        .get("/v1/sessions/r/records?format=jsonl&offset=10&limit=1500")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("application/x-ndjson"));
    let lines: Vec<&str> = r.text.lines().collect();
    assert_eq!(lines.len(), 1500);
    for (k, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(v, record(10 + k as u64));
    }

    let r = s.get("/v1/sessions/r/records?format=csv&offset=2498").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/csv"));
    let mut rd = csv::Reader::from_reader(r.text.as_bytes());
    let header: Vec<String> = rd.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(
        header.iter().cloned().collect::<BTreeSet<_>>(),
        ["i", "name", "tags", "nested", "note"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.expect("csv row")).collect();
    assert_eq!(rows.len(), 2);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(&rows[0][col("i")], "2498");
    assert_eq!(&rows[0][col("name")], "item 2498");
    assert_eq!(&rows[0][col("tags")], "[\"a\",\"b\"]");
    assert_eq!(&rows[0][col("nested")], "{\"x\":2498}");
    assert_eq!(&rows[0][col("note")], "");

    // Past the end: empty documents, not errors.
    let r = s.get("/v1/sessions/r/records?offset=5000").await;
    assert_eq!(r.json, json!([]));
    let r = s
        .get("/v1/sessions/r/records?offset=5000&format=jsonl")
        .await;
    assert_eq!(r.text, "");
    let r = s.get("/v1/sessions/r/records?limit=1").await;
    assert_eq!(r.json, json!([record(0)]));

    s.get("/v1/sessions/r/records?format=xml")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions/r/records?limit=0")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions/r/records?limit=10001")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions/r/records?offset=-1")
        .await
        .assert_error(400, "invalid_request");
    s.get("/v1/sessions/nope/records")
        .await
        .assert_error(404, "not_found");

    let r = s.get("/v1/sessions/r/log").await;
    assert_eq!(r.status, StatusCode::OK);
    let lines = r.json["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 4, "{}", r.text);
    assert_eq!(lines[0]["message"], "committed records 0..700");
    assert_eq!(lines[0]["level"], "info");
    let r = s.get("/v1/sessions/r/log?limit=1").await;
    assert_eq!(r.json["lines"].as_array().unwrap().len(), 1);
    s.get("/v1/sessions/r/log?limit=0")
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_routes_and_the_openapi_document_covers_every_route() {
    let s = start(CONFIG).await;
    let r = s.get("/healthz").await;
    assert_eq!(
        (r.status, r.json.clone()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let r = s.get("/readyz").await;
    assert_eq!(
        (r.status, r.json.clone()),
        (StatusCode::OK, json!({"status": "ready"}))
    );
    // This test server has no recorder installed.
    s.get("/metrics").await.assert_error(404, "not_found");

    let r = s.get("/v1/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = r.json["paths"].as_object().expect("paths in the spec");
    let routes = harvest::api::route_list();
    assert!(routes.len() >= 12, "{routes:?}");
    for (method, path) in &routes {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is served but missing from /v1/openapi.json"
        );
    }
    // And the spec documents nothing that is not served.
    let served: BTreeSet<(String, String)> = routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            assert!(
                served.contains(&(method.clone(), path.clone())),
                "{method} {path} documented but not served"
            );
        }
    }
}
