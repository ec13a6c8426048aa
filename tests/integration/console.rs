//! The web console, tested in headless Chromium against the real `harvest serve`: every page
//! driven the way a user would (clicks, typing, uploads, dialogs), with the API checked behind it.
//!
//! The browser tests need Debian's `chromium` and `chromium-driver`; without them they print
//! "skipped: ..." and pass, except under `HARVEST_CI=1` (`.ci/run`), where they fail.
//!
//! The screenshots in `docs/console/` are written by an ignored test:
//! `cargo test --test integration console_screenshots -- --ignored`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::browser::{self, Browser, ENTER};
use crate::proc::Server;

const WIDE: (u32, u32) = (1280, 800);
const NARROW: (u32, u32) = (390, 844);

/// The test shop (product pages only, no edge cases).
async fn shop(products: usize) -> crate::sitegen::Site {
    crate::sitegen::serve(crate::sitegen::SiteOptions {
        products,
        per_list: 10,
        specials: false,
        tree: 0,
    })
    .await
    .expect("fixture site")
}

/// `examples/catalog.toml` as shipped, pointed at `site` instead of 127.0.0.1:18080 and with the
/// politeness delay set to `delay_ms` (so a run lasts long enough to be watched or cancelled).
fn example_config(site: &crate::sitegen::Site, delay_ms: u64) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/catalog.toml");
    let text = std::fs::read_to_string(&path).expect("read examples/catalog.toml");
    assert!(text.contains("http://127.0.0.1:18080") && text.contains("delay_ms = 0"));
    text.replace("http://127.0.0.1:18080", site.base_url())
        .replace("delay_ms = 0", &format!("delay_ms = {delay_ms}"))
        .replace("obey_robots_txt = true", "obey_robots_txt = false")
}

/// A service config file with two tenants; sessions may fetch the loopback test sites.
const TENANTS: &str = r#"
[[clients]]
id = "acme"
token = "acme-secret-token"
[[clients]]
id = "globex"
token = "globex-secret-token"
[http_guard]
allow_networks = ["127.0.0.0/8"]
"#;

/// `harvest serve` on a fresh data dir, with `service_config` as its config file when given.
fn serve(dir: &Path, service_config: Option<&str>) -> Server {
    match service_config {
        Some(text) => {
            let path = dir.join("service.toml");
            std::fs::write(&path, text).expect("write service config");
            let data = dir.join("data");
            Server::start(
                &data,
                2,
                &[("HARVEST_CONFIG", path.to_str().expect("utf-8 path"))],
            )
        }
        None => Server::start(&dir.join("data"), 2, &[]),
    }
}

/// The API beside the browser, to set things up and check what the console did.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(server: &Server, token: Option<&str>) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            base: server.url(""),
            token: token.map(str::to_string),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.expect("API answers");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn submit(&self, body: Value) -> String {
        let (status, v) = self
            .call(reqwest::Method::POST, "/v1/sessions", Some(&body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "submit: {v}");
        v["id"].as_str().expect("id").to_string()
    }

    async fn session(&self, id: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, &format!("/v1/sessions/{id}"), None)
            .await
    }

    /// Polls until the session has `status` (at most `secs`).
    async fn wait_status(&self, id: &str, status: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, v) = self.session(id).await;
            if v["status"] == status {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "session {id} not {status} within {secs} s: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The id of the session whose page the browser shows (waits for the address to be one).
async fn session_page_id(b: &Browser, not: &str) -> String {
    let v = b
        .wait_js(
            "a session page",
            "const m = location.hash.match(/^#\\/sessions\\/([^/?]+)$/); \
             const id = m ? decodeURIComponent(m[1]) : null; \
             return id && id !== arguments[0] && document.querySelector('#status .status') ? id : null",
            json!([not]),
            15,
        )
        .await;
    v.as_str().expect("id").to_string()
}

/// The status the session page shows.
async fn shown_status(b: &Browser) -> String {
    b.text("#status").await
}

async fn wait_shown_status(b: &Browser, status: &str, secs: u64) {
    b.wait_js(
        &format!("status {status}"),
        "const e = document.querySelector('#status'); return e && e.textContent.includes(arguments[0]) || null",
        json!([status]),
        secs,
    )
    .await;
}

/// The session ids of the rows of the sessions table.
async fn row_ids(b: &Browser) -> Value {
    b.js(
        "return [...document.querySelectorAll('tbody tr[data-id]')].map(r => r.dataset.id)",
        json!([]),
    )
    .await
}

fn number(text: &str) -> u64 {
    text.chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

/// Submit the example config from the Submit page (uploaded as a file, checked, with a param),
/// land on its page, watch it run with live counters to COMPLETED, page through its records
/// table and download them as CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_submit_example_watch_it_complete_read_records_and_download_csv() {
    const NAME: &str = "console_submit";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(60).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;

    b.goto(&server.url("/#/submit")).await;
    // A config with a wrong field: the error names it beside the text and selects its line.
    b.type_into(
        "#config",
        "name = \"bad\"\nstart_urls = [\"http://127.0.0.1:1/\"]\n\n[limits]\nmax_depth = \"deep\"\n",
    )
    .await;
    b.click("#validate").await;
    b.wait_text("Error in the config at limits.max_depth (line 5)", 10)
        .await;
    b.click("#config-errors button").await;
    let selected = b
        .js(
            "const t = document.querySelector('#config'); \
             return [document.activeElement === t, t.value.slice(t.selectionStart, t.selectionEnd), \
                     t.getAttribute('aria-invalid')]",
            json!([]),
        )
        .await;
    assert_eq!(selected, json!([true, "max_depth = \"deep\"", "true"]));
    assert_eq!(
        api.call(reqwest::Method::GET, "/v1/sessions", None).await.1["sessions"],
        json!([])
    );
    // 60 products + 6 list pages at 40 ms per page: a run of a few seconds, long enough to watch.
    let file = dir.path().join("catalog.toml");
    std::fs::write(&file, example_config(&site, 40)).expect("write config");
    b.type_into("#config-file", file.to_str().expect("utf-8"))
        .await;
    b.wait_js(
        "the uploaded file in the text area",
        "return document.querySelector('#config').value.includes('[pages.product]') || null",
        json!([]),
        10,
    )
    .await;
    b.click("#validate").await;
    b.wait_text("The config is valid.", 10).await;
    b.type_into("#params", "category = books").await;
    b.type_into("#o-metadata", r#"{"team": "shop"}"#).await;
    b.click("#submit").await;
    let id = session_page_id(&b, "").await;

    // Sample the page while it runs: the counters must move before the end.
    let mut samples: Vec<(String, u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = b
            .js(
                "const t = (s) => (document.querySelector(s) || {}).textContent || ''; \
                 return [t('#status'), t('#m-pages'), t('#m-records')]",
                json!([]),
            )
            .await;
        let status = v[0].as_str().unwrap_or_default().to_string();
        let sample = (
            status.clone(),
            number(v[1].as_str().unwrap_or("")),
            number(v[2].as_str().unwrap_or("")),
        );
        if samples.last() != Some(&sample) {
            samples.push(sample);
        }
        if status.contains("COMPLETED") {
            break;
        }
        if Instant::now() > deadline {
            b.fail(&format!("not COMPLETED within 60 s; saw {samples:?}"))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live: Vec<_> = samples
        .iter()
        .filter(|(s, pages, _)| s.contains("RUNNING") && *pages > 0)
        .collect();
    assert!(
        live.len() >= 2 && live.windows(2).any(|w| w[1].1 > w[0].1),
        "the page did not show the counters moving while RUNNING: {samples:?}"
    );
    let done = api.wait_status(&id, "COMPLETED", 10).await;
    assert_eq!(done["records"], 60, "{done}");
    assert_eq!(done["job"]["params"]["category"], "books", "{done}");
    assert_eq!(done["client"]["metadata"]["team"], "shop", "{done}");
    b.wait_js(
        "records counter 60",
        "return document.querySelector('#m-records').textContent === '60' || null",
        json!([]),
        10,
    )
    .await;

    // The records table: 25 rows a page, the example's fields as columns, paged.
    let table = b
        .wait_js(
            "the first records page",
            "const rows = document.querySelectorAll('table.records tbody tr'); \
             if (rows.length !== 25) return null; \
             return {head: [...document.querySelectorAll('table.records thead th')].map(e => e.textContent), \
                     first: [...rows[0].querySelectorAll('td')].map(e => e.textContent)}",
            json!([]),
            10,
        )
        .await;
    for col in ["title", "price", "sku", "image", "tags"] {
        assert!(
            table["head"]
                .as_array()
                .is_some_and(|h| h.contains(&json!(col))),
            "{table}"
        );
    }
    let title = table["head"]
        .as_array()
        .and_then(|h| h.iter().position(|c| c == "title"))
        .expect("a title column");
    assert!(
        table["first"][title]
            .as_str()
            .is_some_and(|t| t.starts_with("Product ")),
        "{table}"
    );
    b.click("#records-next").await;
    b.wait_text("Records 26–50 of 60", 10).await;

    // CSV: a header and one row per record.
    b.click("#download-csv").await;
    let csv = b.downloaded(&format!("{id}.csv"), 20).await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 61, "{csv}");
    assert!(
        lines[0].contains("title") && lines[0].contains("sku"),
        "{}",
        lines[0]
    );
    assert!(csv.contains("SKU-000001"), "{csv}");

    // The log and the options are there; the params are shown.
    assert!(b.text("#opt-h").await.contains("Options"));
    b.wait_text("category", 5).await;
    b.assert_clean_console().await;
    b.quit().await;
}

/// Cancel a slow session from its page and see it CANCELLED; close a finished one after the
/// confirmation (and keep it when the dialog is declined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_cancels_a_slow_session_and_closes_another() {
    const NAME: &str = "console_cancel_close";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;

    // 300 ms per page, 110 pages: half a minute unless cancelled.
    let slow = api
        .submit(json!({"config": example_config(&site, 300), "params": {"category": "toys"}}))
        .await;
    b.goto(&server.url(&format!("/#/sessions/{slow}"))).await;
    b.wait_js(
        "RUNNING with pages",
        "return document.querySelector('#status').textContent.includes('RUNNING') && \
         Number(document.querySelector('#m-pages').textContent) > 0 || null",
        json!([]),
        30,
    )
    .await;
    b.click("#cancel").await;
    wait_shown_status(&b, "CANCELLED", 20).await;
    let v = api.wait_status(&slow, "CANCELLED", 5).await;
    assert!(v["metrics"]["pages_processed"].as_u64() < Some(110), "{v}");
    assert!(shown_status(&b).await.contains("CANCELLED"));

    // Run again: a new session with the same config and params, on its own page.
    b.click("#run-again").await;
    let again = session_page_id(&b, &slow).await;
    let (_, old) = api.session(&slow).await;
    let (_, new) = api.session(&again).await;
    assert_eq!(
        new["job"]["config"], old["job"]["config"],
        "run again changed the config"
    );
    assert_eq!(
        new["job"]["params"], old["job"]["params"],
        "run again changed the params"
    );
    assert_eq!(new["job"]["params"]["category"], "toys", "{new}");
    wait_shown_status(&b, "RUNNING", 30).await;
    b.click("#cancel").await;
    wait_shown_status(&b, "CANCELLED", 20).await;

    // Close: declined first, then confirmed.
    let fast = api
        .submit(json!({"config": example_config(&site, 0)}))
        .await;
    api.wait_status(&fast, "COMPLETED", 30).await;
    b.goto(&server.url(&format!("/#/sessions/{fast}"))).await;
    wait_shown_status(&b, "COMPLETED", 10).await;
    b.click("#close").await;
    b.find("dialog[open]").await;
    b.keys("\u{E00C}").await; // Escape declines
    b.wait_js(
        "the dialog closed",
        "return !document.querySelector('dialog') || null",
        json!([]),
        5,
    )
    .await;
    assert_eq!(
        api.session(&fast).await.0,
        StatusCode::OK,
        "declined close removed the session"
    );
    b.click("#close").await;
    b.click("dialog[open] button.danger").await;
    b.wait_text("was closed", 10).await;
    assert_eq!(
        api.session(&fast).await.0,
        StatusCode::NOT_FOUND,
        "closed session still there"
    );
    b.assert_clean_console().await;
    b.quit().await;
}

/// The list: newest first, paged by cursor, filtered by status; several sessions selected and
/// cancelled at once; a session found by its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_lists_filters_pages_and_cancels_several_sessions() {
    const NAME: &str = "console_sessions";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    // 3 that ran, then 28 waiting an hour to start (PENDING until cancelled).
    let mut done = Vec::new();
    for i in 0..3 {
        done.push(
            api.submit(json!({
                "config": example_config(&site, 0),
                "session_id": format!("ran-{i}"),
                "client": {"client_id": "team-a"},
            }))
            .await,
        );
    }
    for id in &done {
        api.wait_status(id, "COMPLETED", 30).await;
    }
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut waiting = Vec::new();
    for i in 0..28 {
        waiting.push(
            api.submit(json!({
                "config": example_config(&site, 0),
                "session_id": format!("wait-{i:02}"),
                "options": {"run_at": later.to_rfc3339()},
            }))
            .await,
        );
    }
    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;
    b.goto(&server.url("/#/sessions")).await;
    b.wait_js(
        "a full first page",
        "return document.querySelectorAll('tbody tr[data-id]').length === 25 || null",
        json!([]),
        10,
    )
    .await;
    let first = row_ids(&b).await;
    assert_eq!(first[0], "wait-27", "newest first: {first}");
    b.click("#next-page").await;
    b.wait_js(
        "the second page",
        "return document.querySelectorAll('tbody tr[data-id]').length === 6 || null",
        json!([]),
        10,
    )
    .await;
    let second = row_ids(&b).await;
    assert_eq!(second[5], "ran-0", "oldest last: {second}");

    // Only COMPLETED ones.
    b.click("#f-status option[value=COMPLETED]").await;
    b.click(".filters button[type=submit]").await;
    b.wait_js(
        "3 COMPLETED rows",
        "return document.querySelectorAll('tbody tr[data-id]').length === 3 || null",
        json!([]),
        10,
    )
    .await;
    assert!(
        b.js("return location.hash", json!([]))
            .await
            .as_str()
            .unwrap_or("")
            .contains("status=COMPLETED")
    );
    assert_eq!(
        b.js(
            "return document.querySelector('tbody tr[data-id] .pick').disabled",
            json!([])
        )
        .await,
        true,
        "a finished session cannot be selected for cancel"
    );

    // By client: only team-a's three; then any status again.
    b.click("#f-status option[value='']").await;
    b.type_into("#f-client", "team-a").await;
    b.click(".filters button[type=submit]").await;
    b.wait_js(
        "team-a's 3 rows",
        "const r = [...document.querySelectorAll('tbody tr[data-id]')]; \
         return r.length === 3 && r.every(x => x.dataset.id.startsWith('ran-')) || null",
        json!([]),
        10,
    )
    .await;
    b.clear("#f-client").await;

    // PENDING: pick three and cancel them.
    b.click("#f-status option[value=PENDING]").await;
    b.click(".filters button[type=submit]").await;
    b.wait_js(
        "25 PENDING rows",
        "return document.querySelectorAll('tbody tr[data-id]').length === 25 || null",
        json!([]),
        10,
    )
    .await;
    for id in ["wait-27", "wait-20", "wait-13"] {
        b.click(&format!("tr[data-id='{id}'] .pick")).await;
    }
    assert_eq!(b.text("#cancel-selected").await, "Cancel selected (3)");
    b.click("#cancel-selected").await;
    b.click("dialog[open] button.danger").await;
    b.wait_text("Cancel sent to 3 sessions.", 10).await;
    for id in ["wait-27", "wait-20", "wait-13"] {
        api.wait_status(id, "CANCELLED", 5).await;
    }
    assert_eq!(api.session("wait-26").await.1["status"], "PENDING");

    // Find by id: the session's page.
    b.type_into("#f-id", &format!("ran-1{ENTER}")).await;
    let id = session_page_id(&b, "").await;
    assert_eq!(id, "ran-1");
    wait_shown_status(&b, "COMPLETED", 10).await;
    b.goto(&server.url("/#/sessions")).await;
    b.type_into("#f-id", &format!("no-such-session{ENTER}"))
        .await;
    b.wait_text("no session with id \"no-such-session\"", 10)
        .await;
    b.assert_clean_console().await;
    b.quit().await;
}

/// Agents: create one with a schedule (next run shown), run it now under a chosen session id,
/// see the run on its page and as the agent's last run, edit it, delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_creates_runs_edits_and_deletes_an_agent() {
    const NAME: &str = "console_agents";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(10).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;
    b.goto(&server.url("/#/agents")).await;
    b.wait_text("No agents yet", 10).await;
    b.click("#new-agent").await;
    b.type_into("#a-name", "shop").await;
    b.type_into("#a-config", &example_config(&site, 0)).await;
    b.type_into("#a-schedule", "0 0 3 * * *").await;
    b.click("#a-sessions option[value=single]").await;
    b.click("#save-agent").await;
    b.wait_text("Agent shop saved.", 10).await;
    let row = b
        .wait_js(
            "the agent's row with its last run looked up",
            "const r = document.querySelector('tr[data-agent=shop]'); \
             return r && r.textContent.includes('never') ? [...r.children].map(c => c.textContent) : null",
            json!([]),
            10,
        )
        .await;
    assert_eq!(row[1], "0 0 3 * * *", "{row}");
    assert!(
        row[2]
            .as_str()
            .is_some_and(|t| t.contains(" 03:00:00") || t.contains(":00:00")),
        "next run: {row}"
    );
    assert_eq!(row[4], "single", "{row}");

    // Run now, under a chosen id.
    b.click("tr[data-agent=shop] button.run").await;
    b.type_into("#run-session-id", "shop-run-1").await;
    b.click("#run-go").await;
    let id = session_page_id(&b, "").await;
    assert_eq!(id, "shop-run-1");
    wait_shown_status(&b, "COMPLETED", 30).await;
    let v = api.wait_status("shop-run-1", "COMPLETED", 5).await;
    assert_eq!(v["agent"], "shop", "{v}");
    assert_eq!(v["records"], 10, "{v}");

    // Its last run, back on the list; then edit (drop the schedule) and delete.
    b.click("a[data-nav=agents]").await;
    b.wait_js(
        "last run shop-run-1",
        "const r = document.querySelector('tr[data-agent=shop]'); return r && r.textContent.includes('shop-run-1') && r.textContent.includes('COMPLETED') || null",
        json!([]),
        10,
    )
    .await;
    b.click("tr[data-agent=shop] button.edit").await;
    b.clear("#a-schedule").await;
    b.type_into("#a-params", "category = garden").await;
    b.click("#save-agent").await;
    b.wait_text("Agent shop saved.", 10).await;
    let (_, agent) = api
        .call(reqwest::Method::GET, "/v1/agents/shop", None)
        .await;
    assert_eq!(agent["schedule"], Value::Null, "{agent}");
    assert_eq!(agent["next_run_at"], Value::Null, "{agent}");
    assert_eq!(agent["params"]["category"], "garden", "{agent}");
    assert_eq!(agent["sessions"], "single", "{agent}");
    b.click("tr[data-agent=shop] button.delete").await;
    b.click("dialog[open] button.danger").await;
    b.wait_text("Agent shop deleted.", 10).await;
    b.wait_text("No agents yet", 10).await;
    let (status, _) = api
        .call(reqwest::Method::GET, "/v1/agents/shop", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    b.assert_clean_console().await;
    b.quit().await;
}

/// With [[clients]], the console asks for a token, keeps it in the tab's session storage only,
/// sends it as the bearer token (requests, event streams, downloads), and the tenant sees only
/// its own sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_tenant_token_sees_only_its_sessions() {
    const NAME: &str = "console_tenant";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), Some(TENANTS));
    let acme = Api::new(&server, Some("acme-secret-token"));
    let globex = Api::new(&server, Some("globex-secret-token"));
    let mine = acme
        .submit(json!({"config": example_config(&site, 0), "session_id": "acme-1"}))
        .await;
    let theirs = globex
        .submit(json!({"config": example_config(&site, 0), "session_id": "globex-1"}))
        .await;
    acme.wait_status(&mine, "COMPLETED", 30).await;
    globex.wait_status(&theirs, "COMPLETED", 30).await;

    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;
    b.goto(&server.url("/#/sessions")).await;
    b.find("#token").await;
    b.type_into("#token", &format!("wrong-token{ENTER}")).await;
    b.wait_text("not one of the server's clients", 10).await;
    b.clear("#token").await;
    b.type_into("#token", &format!("acme-secret-token{ENTER}"))
        .await;
    // Back where it was going, with acme's sessions only.
    b.wait_js(
        "acme's session list",
        "return location.hash.startsWith('#/sessions') && document.querySelector('tr[data-id]') ? \
         [...document.querySelectorAll('tr[data-id]')].map(r => r.dataset.id) : null",
        json!([]),
        10,
    )
    .await;
    let rows = b
        .js(
            "return [...document.querySelectorAll('tr[data-id]')].map(r => r.dataset.id)",
            json!([]),
        )
        .await;
    assert_eq!(rows, json!(["acme-1"]), "acme sees only its sessions");
    let stored = b
        .js(
            "return {cookie: document.cookie, url: location.href, stored: sessionStorage.getItem('harvest.token')}",
            json!([]),
        )
        .await;
    assert_eq!(stored["cookie"], "", "{stored}");
    assert!(
        !stored["url"].as_str().unwrap_or("").contains("secret"),
        "{stored}"
    );
    assert_eq!(stored["stored"], "acme-secret-token", "{stored}");

    // Another tenant's session is not there at all.
    b.goto(&server.url("/#/sessions/globex-1")).await;
    b.wait_text("There is no session globex-1", 10).await;
    // Its own: live page (event stream with the token) and a CSV download with the token.
    b.goto(&server.url("/#/sessions/acme-1")).await;
    wait_shown_status(&b, "COMPLETED", 10).await;
    b.wait_text("Ended", 10).await;
    b.click("#download-csv").await;
    let csv = b.downloaded("acme-1.csv", 20).await;
    assert_eq!(csv.lines().count(), 6, "{csv}");
    // A client id is the token's: the Submit page does not ask for one.
    b.click("a[data-nav=submit]").await;
    b.find("#config").await;
    assert_eq!(
        b.js(
            "return document.querySelector('#o-client') === null",
            json!([])
        )
        .await,
        true
    );
    // Signing out forgets the token.
    b.click("#sign-out").await;
    b.find("#token").await;
    assert_eq!(
        b.js("return sessionStorage.getItem('harvest.token')", json!([]))
            .await,
        Value::Null
    );
    b.assert_clean_console().await;
    b.quit().await;
}

/// A page whose title is markup: the record, the metadata and the config show it as text.
async fn markup_site() -> (String, tokio::task::JoinHandle<()>) {
    let page = "<!doctype html><html><body>\
        <h1>&lt;script&gt;window.pwned = 1&lt;/script&gt;</h1>\
        <p class=\"x\">&lt;img src=x onerror=\"window.pwned = 2\"&gt;</p>\
        <a class=\"next\" href=\"/missing-page\">next</a></body></html>";
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), task)
}

/// Every value from a session is text: a record holding `<script>` shows those characters and
/// runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_a_record_holding_script_as_text() {
    const NAME: &str = "console_xss";
    if !browser::available(NAME) {
        return;
    }
    let (base, site) = markup_site().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    let config = format!(
        "name = \"<b>markup</b>\"\nstart_urls = [\"{base}/\"]\nstart_page = \"item\"\n\
         [http]\nobey_robots_txt = false\nretries = 0\n[[follow]]\nselector = \"a.next\"\n\
         [pages.item]\nfields.title = \"h1\"\nfields.img = \".x\"\n"
    );
    let id = api
        .submit(json!({
            "config": config,
            "client": {"metadata": {"note": "<img src=x onerror=\"window.pwned = 3\">"}},
        }))
        .await;
    api.wait_status(&id, "COMPLETED", 30).await;
    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;
    b.goto(&server.url(&format!("/#/sessions/{id}"))).await;
    wait_shown_status(&b, "COMPLETED", 10).await;
    let cells = b
        .wait_js(
            "the record row",
            "const r = document.querySelector('table.records tbody tr'); \
             return r ? [...r.querySelectorAll('td')].map(c => c.textContent) : null",
            json!([]),
            10,
        )
        .await;
    assert!(
        cells
            .as_array()
            .is_some_and(|c| c.contains(&json!("<script>window.pwned = 1</script>"))),
        "{cells}"
    );
    assert!(
        cells
            .as_array()
            .is_some_and(|c| c.contains(&json!("<img src=x onerror=\"window.pwned = 2\">"))),
        "{cells}"
    );
    b.wait_text("<img src=x onerror=\"window.pwned = 3\">", 5)
        .await;
    // The log: the page that answered 404, as a line of text.
    b.wait_js(
        "the 404 in the log",
        "return [...document.querySelectorAll('.log li .text')].some(l => l.textContent.includes('missing-page')) || null",
        json!([]),
        10,
    )
    .await;
    let dom = b
        .js(
            "return {pwned: window.pwned === undefined ? null : window.pwned, \
                     scripts: document.querySelectorAll('main script').length, \
                     imgs: document.querySelectorAll('main img').length, \
                     bold: document.querySelectorAll('main b').length}",
            json!([]),
        )
        .await;
    assert_eq!(
        dom,
        json!({"pwned": null, "scripts": 0, "imgs": 0, "bold": 0})
    );
    b.assert_clean_console().await;
    b.quit().await;
    site.abort();
}

/// The overview: counts by status, the running session with its counters moving, the last hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_overview_counts_and_follows_running_sessions() {
    const NAME: &str = "console_overview";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    let quick = api
        .submit(json!({"config": example_config(&site, 0)}))
        .await;
    api.wait_status(&quick, "COMPLETED", 30).await;
    let b = Browser::start(NAME, WIDE.0, WIDE.1).await;
    b.goto(&server.url("/")).await;
    b.wait_js(
        "COMPLETED counted",
        "const c = document.querySelector('.count[data-status=COMPLETED] .count-n'); return c && c.textContent === '1' || null",
        json!([]),
        10,
    )
    .await;
    b.wait_text("No session is running.", 10).await;
    b.wait_js(
        "the live stream",
        "return document.querySelector('.live').textContent.includes('Live') || null",
        json!([]),
        10,
    )
    .await;
    // Started after the page: it appears through the event stream, counters moving.
    let slow = api
        .submit(json!({"config": example_config(&site, 150)}))
        .await;
    const PAGES_OF: &str = "const pagesOf = (id) => { \
        const r = document.querySelector(`tr[data-id='${id}'] [data-field=pages]`); \
        return r ? Number(r.textContent.replace(/,/g, '')) : null; };";
    let first = b
        .wait_js(
            "the running session",
            &format!("{PAGES_OF} return pagesOf(arguments[0])"),
            json!([slow]),
            20,
        )
        .await
        .as_u64()
        .unwrap_or(0);
    b.wait_js(
        "its pages counter moving",
        &format!(
            "{PAGES_OF} const n = pagesOf(arguments[0]); return n !== null && n > {first} || null"
        ),
        json!([slow]),
        20,
    )
    .await;
    api.call(
        reqwest::Method::POST,
        &format!("/v1/sessions/{slow}/cancel"),
        None,
    )
    .await;
    b.wait_js(
        "the cancelled session leaves the running table and is counted",
        "const c = document.querySelector('.count[data-status=CANCELLED] .count-n'); \
         return !document.querySelector(`tr[data-id='${arguments[0]}']`) && c && c.textContent === '1' || null",
        json!([slow]),
        20,
    )
    .await;
    // The counts and the last hour come from /v1/stats: no note about counting from the list.
    b.wait_text("2 sessions in the last hour", 10).await;
    let note = b
        .wait_js(
            "the overview drawn",
            "return document.body.innerText.includes('has no /v1/stats') ? 'fallback' : 'stats'",
            json!([]),
            5,
        )
        .await;
    assert_eq!(note, json!("stats"));
    b.assert_clean_console().await;
    b.quit().await;
}

/// At 390 px wide: no page is wider than the screen, the navigation is reachable with Tab and
/// shows where the focus is, and Enter follows a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_is_usable_by_keyboard_at_390_px() {
    const NAME: &str = "console_narrow";
    if !browser::available(NAME) {
        return;
    }
    let site = shop(5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let api = Api::new(&server, None);
    let id = api
        .submit(json!({"config": example_config(&site, 0)}))
        .await;
    api.wait_status(&id, "COMPLETED", 30).await;
    let b = Browser::start(NAME, NARROW.0, NARROW.1).await;
    for (hash, ready) in [
        ("#/", ".count"),
        ("#/sessions", "tr[data-id]"),
        (&format!("#/sessions/{id}")[..], "table.records"),
        ("#/submit", "#config"),
        ("#/agents", "#new-agent"),
    ] {
        b.goto(&server.url(&format!("/{hash}"))).await;
        b.find(ready).await;
        let widths = b
            .js(
                "return [document.documentElement.scrollWidth, window.innerWidth]",
                json!([]),
            )
            .await;
        assert!(
            widths[0].as_u64() <= widths[1].as_u64() && widths[1] == 390,
            "{hash}: the page is wider than the screen: {widths}"
        );
    }
    // From the top of the page: Tab reaches "Submit" in the navigation with a visible focus ring.
    b.goto(&server.url("/#/agents")).await;
    b.find("#new-agent").await;
    b.js(
        "document.activeElement.blur(); window.scrollTo(0, 0)",
        json!([]),
    )
    .await;
    let mut reached = false;
    for _ in 0..8 {
        b.keys("\u{E004}").await; // Tab
        let f = b
            .js(
                "const e = document.activeElement; \
                 return [e.textContent, getComputedStyle(e).outlineStyle, getComputedStyle(e).outlineWidth]",
                json!([]),
            )
            .await;
        if f[0] == "Submit" {
            assert_ne!(f[1], "none", "no visible focus on the Submit link: {f}");
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the Submit link");
    b.keys(ENTER).await;
    b.find("#config").await;
    assert_eq!(b.js("return location.hash", json!([])).await, "#/submit");
    assert_eq!(
        b.js("return document.activeElement.tagName", json!([]))
            .await,
        "H1",
        "the new page's heading takes the focus"
    );
    b.assert_clean_console().await;
    b.quit().await;
}

/// The console's files: served at / and /console/, with the strict headers on every answer, and
/// revalidated by ETag. No browser needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_carry_strict_security_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), Some(TENANTS));
    let http = reqwest::Client::new();
    let mut paths = vec!["/".to_string()];
    paths.extend(
        harvest::api::console::files()
            .iter()
            .map(|f| format!("/console/{f}")),
    );
    for path in &paths {
        let resp = http.get(server.url(path)).send().await.expect("get");
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{path}: no token needed for the files"
        );
        let h = resp.headers();
        assert_eq!(
            h["content-security-policy"],
            harvest::api::console::CSP,
            "{path}"
        );
        assert!(harvest::api::console::CSP.contains("script-src 'self';"));
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        let ct = h["content-type"].to_str().unwrap_or_default().to_string();
        let want = if path == "/" {
            "text/html"
        } else if path.ends_with(".js") {
            "text/javascript"
        } else if path.ends_with(".css") {
            "text/css"
        } else {
            "image/svg+xml"
        };
        assert!(ct.starts_with(want), "{path}: {ct}");
        let etag = h["etag"].clone();
        let again = http
            .get(server.url(path))
            .header("if-none-match", etag)
            .send()
            .await
            .expect("get");
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(
            again.headers()["content-security-policy"],
            harvest::api::console::CSP
        );
    }
    let missing = http
        .get(server.url("/console/nope.js"))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()["content-security-policy"],
        harvest::api::console::CSP
    );
    // The data stays behind the token.
    let data = http
        .get(server.url("/v1/sessions"))
        .send()
        .await
        .expect("get");
    assert_eq!(data.status(), StatusCode::UNAUTHORIZED);
}

/// `harvest serve` says where the console is.
#[test]
fn serve_logs_the_console_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), None);
    let want = format!("web console url=http://{}/", server.addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match server._log.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains(&want) => return,
            Ok(line) => seen.push(line),
            Err(_) => {}
        }
    }
    panic!("no {want:?} in the log:\n{}", seen.join("\n"));
}

/// Writes `docs/console/<page>-1280x800.png` and `-390x844.png` for every page. Run by hand:
/// `cargo test --test integration console_screenshots -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/console/*.png; run it by hand when the console changes"]
async fn console_screenshots() {
    const NAME: &str = "console_screenshots";
    if !browser::available(NAME) {
        return;
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console");
    std::fs::create_dir_all(&out).expect("docs/console");
    let site = shop(100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(dir.path(), Some(TENANTS));
    let api = Api::new(&server, Some("acme-secret-token"));
    // Some history: finished, failed, cancelled, waiting, and one running slowly.
    for i in 0..4 {
        let id = api
            .submit(json!({"config": example_config(&site, 0), "client": {"metadata": {"team": "catalog", "run": i}}}))
            .await;
        api.wait_status(&id, "COMPLETED", 30).await;
    }
    // Too slow for its one-second limit: FAILED.
    let failed = api
        .submit(json!({"config": example_config(&site, 400), "options": {"max_attempts": 1, "max_duration_secs": 1}}))
        .await;
    api.wait_status(&failed, "FAILED", 30).await;
    let cancelled = api
        .submit(json!({"config": example_config(&site, 0), "options": {"run_at": (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339()}}))
        .await;
    api.call(
        reqwest::Method::POST,
        &format!("/v1/sessions/{cancelled}/cancel"),
        None,
    )
    .await;
    api.submit(json!({"config": example_config(&site, 0), "options": {"run_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}}))
        .await;
    let (status, _) = api
        .call(
            reqwest::Method::PUT,
            "/v1/agents/nightly-catalog",
            Some(&json!({"config": example_config(&site, 0), "schedule": "0 0 3 * * *", "sessions": "single"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .call(
            reqwest::Method::PUT,
            "/v1/agents/catalog-adhoc",
            Some(&json!({"config": example_config(&site, 0)})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, run) = api
        .call(
            reqwest::Method::POST,
            "/v1/agents/nightly-catalog/run",
            Some(&json!({})),
        )
        .await;
    api.wait_status(run["id"].as_str().unwrap_or_default(), "COMPLETED", 30)
        .await;
    let slow = api
        .submit(json!({"config": example_config(&site, 400), "client": {"metadata": {"team": "catalog"}}}))
        .await;
    api.wait_status(&slow, "RUNNING", 30).await;

    for (w, h) in [WIDE, NARROW] {
        let b = Browser::start(NAME, w, h).await;
        let shot = |name: &str| out.join(format!("{name}-{w}x{h}.png"));
        b.goto(&server.url("/#/sessions")).await;
        b.find("#token").await;
        std::fs::write(shot("login"), b.screenshot().await).expect("write png");
        b.type_into("#token", &format!("acme-secret-token{ENTER}"))
            .await;
        b.find("tr[data-id]").await;
        b.goto(&server.url("/#/")).await;
        b.wait_js("the running session's row", "return document.querySelector('tr[data-id] [data-field=pages]') && document.querySelector('.chart') || null", json!([]), 20)
            .await;
        std::fs::write(shot("overview"), b.screenshot().await).expect("write png");
        b.goto(&server.url("/#/sessions")).await;
        b.find("tr[data-id]").await;
        std::fs::write(shot("sessions"), b.screenshot().await).expect("write png");
        b.goto(&server.url(&format!("/#/sessions/{slow}"))).await;
        b.wait_js("records shown", "return document.querySelector('table.records') && document.querySelector('.log li') || null", json!([]), 30)
            .await;
        std::fs::write(shot("session"), b.screenshot().await).expect("write png");
        b.goto(&server.url("/#/submit")).await;
        b.find("#config").await;
        b.type_into(
            "#config",
            &example_config(&site, 0).replace("max_depth = 20", "max_depth = \"deep\""),
        )
        .await;
        b.click("#validate").await;
        b.wait_text("Error in the config", 10).await;
        b.click("#config-errors button").await;
        b.js("window.scrollTo(0, 0)", json!([])).await;
        std::fs::write(shot("submit"), b.screenshot().await).expect("write png");
        b.goto(&server.url("/#/agents")).await;
        b.wait_js("last runs", "return document.querySelector('tr[data-agent=nightly-catalog]') && document.body.innerText.includes('never') || null", json!([]), 10)
            .await;
        std::fs::write(shot("agents"), b.screenshot().await).expect("write png");
        b.quit().await;
    }
    api.call(
        reqwest::Method::POST,
        &format!("/v1/sessions/{slow}/cancel"),
        None,
    )
    .await;
}

/// The API parts the console relies on that other clients may use too: a config checked without
/// submitting it, a session's job (for "run again"), sessions by agent, an agent's next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_api_additions_validate_job_agent_filter_and_next_run() {
    let s = crate::api_support::start(crate::api_support::CONFIG).await;
    let ok = s
        .post(
            "/v1/configs/validate",
            &json!({"config": "name = \"x\"\nrecords = 2\n", "params": {"a": 1}}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(ok.json["valid"], true);
    assert_eq!(ok.json["config"]["records"], 2);
    let bad = s
        .post("/v1/configs/validate", &json!({"config": {"records": 2}}))
        .await;
    bad.assert_error(400, "invalid_config");
    assert!(
        bad.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("name"),
        "{}",
        bad.text
    );
    let bad_toml = s
        .post("/v1/configs/validate", &json!({"config": "name = "}))
        .await;
    bad_toml.assert_error(400, "invalid_config");
    let listed = s.get("/v1/sessions").await;
    assert_eq!(
        listed.json["sessions"].as_array().map(Vec::len),
        Some(0),
        "validate stored nothing"
    );

    let made = s
        .submit(json!({"config": {"name": "j", "records": 1}, "params": {"p": "v"}}))
        .await;
    let id = made["id"].as_str().expect("id");
    assert!(
        made.get("job").is_none(),
        "the submit answer has no job: {made}"
    );
    let one = s.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(one.json["job"]["config"]["name"], "j", "{}", one.text);
    assert_eq!(one.json["job"]["params"]["p"], "v", "{}", one.text);
    let list = s.get("/v1/sessions").await;
    assert!(
        list.json["sessions"][0].get("job").is_none(),
        "lists carry no job: {}",
        list.text
    );

    let put = s
        .call(
            reqwest::Method::PUT,
            "/v1/agents/nightly",
            None,
            Some(&json!({"config": {"name": "n", "records": 1}, "schedule": "0 0 3 * * *"})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    let next = put.json["next_run_at"].as_str().expect("next_run_at");
    let next = chrono::DateTime::parse_from_rfc3339(next).expect("RFC 3339");
    assert_eq!(next.format("%H:%M:%S").to_string(), "03:00:00", "{next}");
    assert!(next > chrono::Utc::now() && next < chrono::Utc::now() + chrono::Duration::days(1));
    let run = s.post("/v1/agents/nightly/run", &json!({})).await;
    assert_eq!(run.status, StatusCode::CREATED, "{}", run.text);
    let runs = s.get("/v1/sessions?agent=nightly").await;
    let ids: Vec<&str> = runs.json["sessions"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        vec![run.json["id"].as_str().unwrap_or("?")],
        "{}",
        runs.text
    );
    let none = s.get("/v1/sessions?agent=other").await;
    assert_eq!(none.json["sessions"], json!([]), "{}", none.text);
}
