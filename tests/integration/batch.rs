//! The batch path (issue 16): `POST /v1/sessions/batch` answers per item, in order, with the
//! item's own error where it has one; `harvest submit` of several configs or a JSON-lines file
//! uses it; a SIGKILL during batch submits loses no acknowledged session, and of a batch whose
//! answer never came a prefix survives, each of its sessions whole.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api_support::{CONFIG, start};
use crate::proc::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_item_in_order() {
    let s = start(CONFIG).await;
    s.submit(json!({"config": {"name": "x"}, "session_id": "taken"}))
        .await;
    let later = json!({"run_at": "2999-01-01T00:00:00Z"});
    let body = json!({"items": [
        {"config": {"name": "a"}, "options": later},
        {"config": {"name": 7}},
        {"config": {"name": "b"}, "session_id": "taken"},
        {"config": {"name": "c"}, "session_id": "twice", "options": later},
        {"config": {"name": "d"}, "session_id": "twice"},
        {"agent": "nightly"},
        {"config": {"name": "e"}, "session_id": "batch"},
        {"config": "name = \"f\"\n", "session_id": "from-toml", "options": later},
    ]});
    let r = s.post("/v1/sessions/batch", &body).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    let results = r.json["items"].as_array().expect("items");
    let statuses: Vec<u64> = results
        .iter()
        .map(|i| i["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(
        statuses,
        [201, 400, 409, 201, 409, 400, 400, 201],
        "{}",
        r.text
    );
    assert_eq!(r.json["created"], 3);
    assert_eq!(r.json["failed"], 5);
    assert_eq!(results[1]["error"]["code"], "invalid_config");
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("name: must be a string")),
        "{}",
        results[1]
    );
    assert_eq!(results[2]["error"]["code"], "duplicate_session");
    assert!(
        results[5]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("agent")),
        "{}",
        results[5]
    );
    assert_eq!(results[6]["error"]["code"], "invalid_session_id");
    // Created items are stored and readable; the refused ones are not.
    let first = results[0]["id"].as_str().expect("id");
    for id in [first, "twice", "from-toml"] {
        let got = s.get(&format!("/v1/sessions/{id}")).await;
        assert_eq!(got.status.as_u16(), 200, "{id}: {}", got.text);
        assert_eq!(got.json["status"], "PENDING");
    }
    let twice = s.get("/v1/sessions/twice").await;
    assert_eq!(twice.json["job"]["config"]["name"], "c", "{}", twice.text);

    // Bounds: an empty batch and one over 1000 items are refused whole.
    s.post("/v1/sessions/batch", &json!({"items": []}))
        .await
        .assert_error(400, "invalid_request");
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({"config": {"name": "x"}}))
        .collect();
    let r = s.post("/v1/sessions/batch", &json!({"items": many})).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("1 to 1000"), "{}", r.text);
}

/// `harvest submit a.toml b.toml` and `harvest submit --jsonl FILE` go through the batch route
/// and print one line per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_many_configs_and_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &dir.path().join("data"),
        1,
        &[("HARVEST_CONFIG", "config.toml")],
    );
    let api = server.url("");
    let cfg = |name: &str| {
        format!(
            "name = \"{name}\"\nstart_urls = [\"http://127.0.0.1:9/\"]\n\
             [pages.start.fields]\ntitle = \"h1\"\n"
        )
    };
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, cfg("a")).expect("write");
    std::fs::write(&b, cfg("b")).expect("write");
    // Bounded: a CLI that hangs fails the test after 60 s (and is killed with it).
    let run = |args: Vec<String>| {
        let api = api.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
                .args(&args)
                .env("HARVEST_SERVER", api)
                .kill_on_drop(true)
                .output();
            tokio::time::timeout(Duration::from_secs(60), out)
                .await
                .map(|out| out.expect("run harvest"))
        }
    };
    let later = r#"{"run_at": "2999-01-01T00:00:00Z"}"#.to_string();
    let out = run(vec![
        "submit".into(),
        a.display().to_string(),
        b.display().to_string(),
        "--options".into(),
        later.clone(),
    ])
    .await
    .expect("harvest submit finished within 60 s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == 201 && l["id"].is_string())
    );

    let jsonl = dir.path().join("many.jsonl");
    let mut text = String::new();
    for i in 0..1200 {
        let body = json!({"config": {"name": "j", "start_urls": ["http://127.0.0.1:9/"],
            "pages": {"start": {"fields": {"t": "h1"}}}},
            "session_id": format!("j-{i}"), "options": {"run_at": "2999-01-01T00:00:00Z"}});
        text.push_str(&body.to_string());
        text.push('\n');
    }
    // One bad line among them: that item is refused, the others created; exit code 1.
    text.push_str(
        &json!({"config": {"name": "j", "start_urls": ["http://127.0.0.1:9/"],
            "pages": {"start": {"fields": {"t": "h1"}}}}, "session_id": "j-0"})
        .to_string(),
    );
    text.push('\n');
    std::fs::write(&jsonl, text).expect("write");
    let out = run(vec![
        "submit".into(),
        "--jsonl".into(),
        jsonl.display().to_string(),
    ])
    .await
    .expect("harvest submit finished within 60 s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("submitted 1200 sessions; 1 refused"),
        "{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 1201);
    assert_eq!(lines[1199]["id"], "j-1199");
    assert_eq!(lines[1200]["status"], 409, "{}", lines[1200]);
    let http = reqwest::Client::new();
    let got = http
        .get(server.url("/v1/sessions/j-1199"))
        .send()
        .await
        .expect("GET");
    assert_eq!(got.status(), 200);
}

/// SIGKILL while batches of 100 are being submitted: after a restart every acknowledged
/// session is there, and of the batch in flight a prefix (no gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_batch_submits_keeps_every_acknowledged_item() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let env = [("HARVEST_CONFIG", "config.toml")];
    let server = Server::start(&data, 1, &env);
    let url = server.url("/v1/sessions/batch");
    let http = reqwest::Client::new();
    const PER: usize = 100;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let submitter = tokio::spawn({
        let http = http.clone();
        async move {
            // Bounded: at most 400 batches or 60 s; the kill comes long before.
            let deadline = Instant::now() + Duration::from_secs(60);
            for b in 0..400 {
                if Instant::now() > deadline {
                    break;
                }
                let sessions: Vec<Value> = (0..PER)
                    .map(|i| {
                        json!({"config": {"name": "k", "start_urls": ["http://127.0.0.1:9/"],
                            "pages": {"start": {"fields": {"t": "h1"}}}},
                            "session_id": format!("k{b}-{i}"),
                            "options": {"run_at": "2999-01-01T00:00:00Z"}})
                    })
                    .collect();
                let r = http
                    .post(&url)
                    .json(&json!({"items": sessions}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        assert_eq!(v["created"], PER, "batch {b}: {v}");
                        if tx.send(b).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
    });
    // Let some batches be acknowledged, then kill without warning.
    let mut acked = Vec::new();
    while acked.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(b)) => acked.push(b),
            _ => panic!("batches were not acknowledged"),
        }
    }
    server.kill9();
    // Its per-batch assertions count: a panic there fails the test.
    submitter.await.expect("submitter");
    while let Ok(b) = rx.try_recv() {
        acked.push(b);
    }
    let server = Server::start(&data, 1, &env);
    let exists = |id: String| {
        let http = http.clone();
        let url = server.url(&format!("/v1/sessions/{id}"));
        async move { http.get(url).send().await.expect("GET").status().as_u16() == 200 }
    };
    let last = *acked.iter().max().expect("acked");
    for &b in &acked {
        for i in [0, PER / 2, PER - 1] {
            assert!(
                exists(format!("k{b}-{i}")).await,
                "acknowledged k{b}-{i} lost"
            );
        }
    }
    // The batch after the last acknowledged one was in flight: what of it survived is a prefix
    // (its items are applied in order, each session whole), never a gap.
    let b = last + 1;
    let mut present = Vec::with_capacity(PER);
    for i in 0..PER {
        present.push(exists(format!("k{b}-{i}")).await);
    }
    let kept = present.iter().take_while(|p| **p).count();
    assert!(
        present[kept..].iter().all(|p| !p),
        "batch {b} kept a gap: {present:?}"
    );
    assert!(
        !exists(format!("k{}-0", b + 1)).await,
        "a batch after the kill?"
    );
}

/// On PostgreSQL the service writes concurrent single submissions together
/// (`Store::combines_inserts`). 200 at once, among them five pairs sharing an id, one whose
/// `max_attempts` does not fit the database's integer (refused before the statement) and one
/// whose agent name holds a NUL byte, which PostgreSQL's text refuses: the statement of its
/// batch fails, and the batch is written again item by item. Every other submission is
/// acknowledged and stored once, one of each pair is created and the other refused as a
/// duplicate, and only the two bad ones fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_submits_on_postgres_each_get_their_own_answer() {
    use harvest::service::{Harvest, HarvestError, SubmitRequest};
    use harvest::session::{SessionId, SessionOptions, SessionStatus};

    let Some((config, _guard)) = crate::store_postgres::postgres_config() else {
        return;
    };
    let h = Harvest::builder(config)
        .job(std::sync::Arc::new(harvest::job::NoopJob))
        .open()
        .await
        .expect("open");
    const N: usize = 200;
    const BAD: usize = 150;
    const NUL: usize = 120;
    let id_of = |i: usize| {
        if i < 10 {
            format!("pair-{}", i / 2)
        } else {
            format!("s-{i}")
        }
    };
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let h = h.clone();
        let id = SessionId::parse(&id_of(i)).expect("id");
        let options = SessionOptions {
            max_attempts: (i == BAD).then_some(u32::MAX),
            ..SessionOptions::default()
        };
        let mut req = SubmitRequest::new(json!({"name": "x"}))
            .session_id(id)
            .options(options);
        if i == NUL {
            req.agent = Some("bad\0agent".into());
        }
        tasks.push(tokio::spawn(async move { h.submit(req).await.map(|_| ()) }));
    }
    let mut answers = Vec::with_capacity(N);
    for t in tasks {
        answers.push(t.await.expect("join"));
    }
    for pair in 0..5 {
        let (a, b) = (&answers[2 * pair], &answers[2 * pair + 1]);
        assert!(
            a.is_ok() != b.is_ok(),
            "pair {pair}: exactly one is created: {a:?} {b:?}"
        );
        let refused = if a.is_ok() { b } else { a };
        assert!(
            matches!(refused, Err(HarvestError::Duplicate(_))),
            "pair {pair}: {refused:?}"
        );
    }
    for (i, a) in answers.iter().enumerate().skip(10) {
        if i == BAD {
            let e = a.as_ref().expect_err("max_attempts over i32 fails");
            assert!(e.to_string().contains("max_attempts"), "{e}");
        } else if i == NUL {
            let e = a.as_ref().expect_err("a NUL byte in a text column fails");
            assert!(!matches!(e, HarvestError::Duplicate(_)), "{e}");
        } else {
            assert!(a.is_ok(), "submission {i}: {a:?}");
        }
    }
    for i in (0..N).step_by(2).chain([BAD, NUL + 1]) {
        let id = SessionId::parse(&id_of(i)).expect("id");
        let got = h.get(id).await.expect("get");
        if i == BAD || i == NUL {
            assert!(got.is_none(), "the failed submission is not stored");
        } else {
            assert_eq!(got.map(|s| s.status), Some(SessionStatus::Pending), "{i}");
        }
    }
    let stored = h
        .list(harvest::store::SessionList {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .sessions
        .len();
    assert_eq!(stored, N - 5 - 2);
    h.shutdown(Duration::from_secs(1)).await.expect("shutdown");
}
