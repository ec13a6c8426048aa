//! Messages a user reads, on the real binary: config errors that name the field once and say
//! what to write instead, why an attempt stopped after its session was deleted, and who holds a
//! data directory a second process cannot open.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::seeds::{serve_sled, slow_config, submit, wait_until};

async fn post(http: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().await.expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON"))
}

/// One field of an otherwise valid config, for error messages about it.
fn with_field(field: Value) -> Value {
    json!({"start_urls": ["http://127.0.0.1:1/"], "start_page": "p",
           "pages": {"p": {"fields": {"t": field}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_the_field_once_and_say_what_to_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, api) = serve_sled(dir.path());
    let http = reqwest::Client::new();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!("name = "),
            "invalid config: invalid TOML at line 1, column 8: ",
        ),
        (
            with_field(json!("a[[")),
            "invalid config: pages.p.fields.t.selector: \"a[[\" is not a valid CSS selector: an \
             attribute selector needs a name",
        ),
        (
            with_field(json!("//h1/text()")),
            "invalid config: pages.p.fields.t.selector: \"//h1/text()\" is not a CSS selector: it \
             looks like XPath; write `xpath = \"//h1/text()\"` instead of `selector`",
        ),
        (
            with_field(json!("h1::text")),
            "invalid config: pages.p.fields.t.selector: \"h1::text\" is not a CSS selector: \
             `::text` is Scrapy's",
        ),
        (
            with_field(json!({"selector": "h1", "regex": "a(["})),
            "invalid config: pages.p.fields.t.regex: invalid regex \"a([\": unclosed character \
             class (at character 3)",
        ),
        (
            with_field(json!({"xpath": "//h1["})),
            "invalid config: pages.p.fields.t.xpath: XPath expression \"//h1[\" does not compile",
        ),
        (json!([1]), "invalid config: `config` must be a JSON object"),
    ];
    for (config, want) in cases {
        for path in ["/v1/configs/validate", "/v1/sessions"] {
            let (status, body) =
                post(&http, format!("{api}{path}"), &json!({"config": config})).await;
            assert_eq!(status, 400, "{path} {config}: {body}");
            assert_eq!(body["error"]["code"], "invalid_config", "{body}");
            let m = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                m.starts_with(want),
                "{path} {config}:\n got  {m}\n want {want}…"
            );
            assert!(
                !m.contains("config: config") && !m.contains("report this"),
                "{m}"
            );
            assert!(!m.contains('\n'), "one line: {m}");
        }
    }
}

/// Reads the server's log until a line contains `needle` (at most `limit`).
fn log_line(log: &std::sync::mpsc::Receiver<String>, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "no log line with {needle:?} within {limit:?}; saw:\n{}",
                seen.join("\n")
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_session_stops_its_attempt_as_closed() {
    let site = crate::sitegen::serve(crate::sitegen::SiteOptions {
        products: 200,
        per_list: 10,
        specials: false,
        tree: 0,
    })
    .await
    .expect("site");
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api) = serve_sled(dir.path());
    let http = reqwest::Client::new();
    let id = submit(&http, &api, json!({"config": slow_config(site.base_url())})).await;
    wait_until(&http, &api, &id, Duration::from_secs(30), "pages", |s| {
        s["metrics"]["pages_processed"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let r = http
        .delete(format!("{api}/v1/sessions/{id}"))
        .send()
        .await
        .expect("DELETE");
    assert!(r.status().is_success(), "{}", r.status());
    let line = log_line(&server._log, "attempt stopped", Duration::from_secs(15));
    assert!(line.contains("session closed (it was deleted)"), "{line}");
    assert!(line.contains(&id), "the line names the session: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_data_dir_is_told_who_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _api) = serve_sled(dir.path());
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
                .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
                .arg(&dir)
                .env("HARVEST_CONFIG", "config.toml")
                .env("HARVEST_LOG_FORMAT", "text")
                .output()
                .expect("run harvest")
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the second harvest exits at once")
        .expect("join");
    assert!(!out.status.success(), "it must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "is in use by another harvest (pid {}); stop that one",
        server.child.id()
    );
    assert!(err.contains(&want), "stderr: {err}");
    assert!(!err.contains("WouldBlock"), "stderr: {err}");
}

/// `GET /v1/stats` and `harvest stats` on the real binary with two tenants: each sees its own
/// sessions only, by status, and the ones that ended in the last hour with their records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_a_tenants_sessions_only() {
    let site = crate::resume_crash::product_site(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dir.path().join("service.toml");
    std::fs::write(
        &service,
        "[[clients]]\nid = \"acme\"\ntoken = \"acme-token-1234\"\n\
         [[clients]]\nid = \"globex\"\ntoken = \"globex-token-5678\"\n\
         [http_guard]\nallow_networks = [\"127.0.0.0/8\"]\n",
    )
    .expect("write config");
    let server = crate::proc::Server::start(
        &dir.path().join("data"),
        2,
        &[("HARVEST_CONFIG", service.to_str().expect("utf-8"))],
    );
    let api = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let call = |token: &'static str, method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{api}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.expect("request");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("JSON"))
        }
    };
    let crawl = json!({"start_urls": [site.url("/index.html")], "start_page": "p",
                       "http": {"obey_robots_txt": false},
                       "pages": {"p": {"fields": {"title": "h1"}}}});
    let later = json!({"run_at": "2999-01-01T00:00:00Z"});
    let mut ids = Vec::new();
    for (token, options) in [
        ("acme-token-1234", json!({})),
        ("acme-token-1234", json!({})),
        ("acme-token-1234", later.clone()),
        ("globex-token-5678", later),
    ] {
        let (status, v) = call(
            token,
            reqwest::Method::POST,
            "/v1/sessions",
            Some(json!({"config": crawl, "options": options})),
        )
        .await;
        assert_eq!(status, 201, "{v}");
        ids.push((token, v["id"].as_str().expect("id").to_string()));
    }
    for (token, id) in &ids[..2] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, s) = call(
                token,
                reqwest::Method::GET,
                &format!("/v1/sessions/{id}"),
                None,
            )
            .await;
            if s["status"] == "COMPLETED" {
                break;
            }
            assert!(Instant::now() < deadline, "{s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Answers may be up to a second old: wait until they show the completions.
    let deadline = Instant::now() + Duration::from_secs(10);
    let acme = loop {
        let (status, v) = call("acme-token-1234", reqwest::Method::GET, "/v1/stats", None).await;
        assert_eq!(status, 200, "{v}");
        if v["by_status"]["COMPLETED"] == 2 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        acme["by_status"],
        json!({"PENDING": 1, "RUNNING": 0, "COMPLETED": 2, "FAILED": 0, "CANCELLED": 0}),
        "{acme}"
    );
    assert_eq!(acme["clients"].as_array().map(Vec::len), Some(1), "{acme}");
    assert_eq!(acme["clients"][0]["client_id"], "acme");
    let minutes = |k: &str| -> Vec<u64> {
        acme["last_hour"][k]
            .as_array()
            .expect("array")
            .iter()
            .map(|n| n.as_u64().expect("count"))
            .collect()
    };
    assert_eq!(minutes("finished_per_minute").len(), 60);
    assert_eq!(
        minutes("finished_per_minute").iter().sum::<u64>(),
        2,
        "{acme}"
    );
    // Each crawl of the 3-product site extracts one record from its start page.
    assert_eq!(
        minutes("records_per_minute").iter().sum::<u64>(),
        2,
        "{acme}"
    );

    let (_, globex) = call("globex-token-5678", reqwest::Method::GET, "/v1/stats", None).await;
    assert_eq!(globex["by_status"]["PENDING"], 1, "{globex}");
    assert_eq!(globex["by_status"]["COMPLETED"], 0, "{globex}");
    assert_eq!(globex["clients"][0]["client_id"], "globex", "{globex}");
    let (status, _) = call("wrong-token-0000", reqwest::Method::GET, "/v1/stats", None).await;
    assert_eq!(status, 401);

    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
            .args(["stats", "--server", &api, "--token", "acme-token-1234"])
            .output()
            .expect("run harvest stats")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acme_row = text
        .lines()
        .find(|l| l.starts_with("acme"))
        .unwrap_or_else(|| panic!("no acme row: {text}"));
    let counts: Vec<&str> = acme_row.split_whitespace().skip(1).collect();
    assert_eq!(counts, ["1", "0", "2", "0", "0"], "{text}");
    assert!(
        text.contains("last hour: 2 sessions ended, 2 records"),
        "{text}"
    );
    assert!(!text.contains("globex"), "{text}");
}
