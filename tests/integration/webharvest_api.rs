//! Web-Harvest XML configs through the real binary: submitted over HTTP (and by the CLI),
//! refused with a line and column when malformed, FAILED with the processor's path when they
//! fail, their variables served as the session's context, and a session surviving a SIGKILL of
//! the service with one final context.

use std::time::Duration;

use serde_json::{Value, json};

use crate::proc::Server;
use crate::seeds::{get_session, wait_until};

const CATALOG: &str = include_str!("../../examples/webharvest/catalog.xml");
const SHOP_21: &str = include_str!("../../examples/webharvest/shop-2.1.xml");

fn serve(dir: &std::path::Path) -> (Server, String) {
    let exports = dir.join("exports").to_string_lossy().into_owned();
    let server = Server::start(
        &dir.join("data"),
        2,
        &[
            ("HARVEST_CONFIG", "config.toml"),
            ("HARVEST_EXPORT_DIR", exports.as_str()),
        ],
    );
    let api = format!("http://{}", server.addr);
    (server, api)
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let resp = http.post(url).json(&body).send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn ended(http: &reqwest::Client, api: &str, id: &str) -> Value {
    wait_until(http, api, id, Duration::from_secs(120), "the end", |s| {
        matches!(
            s["status"].as_str(),
            Some("COMPLETED" | "FAILED" | "CANCELLED")
        )
    })
    .await
}

async fn context(http: &reqwest::Client, api: &str, id: &str) -> Value {
    let resp = http
        .get(format!("{api}/v1/sessions/{id}/context"))
        .send()
        .await
        .expect("GET context");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    resp.json().await.expect("JSON")
}

/// The examples run as sessions: COMPLETED, with their variables as the context, processors
/// counted as elements and requests as pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_complete_over_http_with_their_variables() {
    let site = crate::resume_crash::product_site(30).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, api) = serve(dir.path());
    let http = reqwest::Client::new();
    let base = site.base_url().to_string();
    let (status, s) = post(
        &http,
        format!("{api}/v1/sessions"),
        json!({"config": CATALOG, "params": {"base": base}, "session_id": "catalog"}),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let (status, s) = post(
        &http,
        format!("{api}/v1/sessions"),
        json!({"config": SHOP_21, "params": {"base": base}, "session_id": "shop"}),
    )
    .await;
    assert_eq!(status, 201, "{s}");

    let s = ended(&http, &api, "catalog").await;
    assert_eq!(s["status"], "COMPLETED", "{s}");
    assert_eq!(
        s["metrics"]["pages_processed"], 32,
        "2 list pages and 30 products: {s}"
    );
    assert!(
        s["metrics"]["processed_elements"].as_u64() > Some(300),
        "processors executed: {s}"
    );
    let ctx = context(&http, &api, "catalog").await;
    let titles: Vec<String> = (0..30).map(|i| format!("Product {i}")).collect();
    assert_eq!(ctx["variables"]["titles"], json!(titles), "{ctx}");
    assert_eq!(ctx["variables"]["productCount"], "30", "{ctx}");
    let one = http
        .get(format!("{api}/v1/sessions/catalog/context/productCount"))
        .send()
        .await
        .expect("GET variable")
        .json::<Value>()
        .await
        .expect("JSON");
    assert_eq!(one, json!({"name": "productCount", "value": "30"}));
    let csv = std::fs::read_to_string(dir.path().join("exports/_/catalog/catalog.csv"))
        .expect("the config's file, in the session's own directory");
    assert_eq!(csv.lines().count(), 31);

    let s = ended(&http, &api, "shop").await;
    assert_eq!(s["status"], "COMPLETED", "{s}");
    let ctx = context(&http, &api, "shop").await;
    assert_eq!(ctx["variables"]["cheapest"], "0.00", "{ctx}");
    site.shutdown().await;
}

/// Bad configs: malformed XML and unknown processors are refused at submission with where and
/// what; a processor that fails at run time ends the session FAILED with its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_or_fail_with_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, api) = serve(dir.path());
    let http = reqwest::Client::new();
    let submit = |config: &str| {
        let (http, url) = (http.clone(), format!("{api}/v1/sessions"));
        let body = json!({"config": config});
        async move { post(&http, url, body).await }
    };
    let (status, e) = submit("<config>\n  <var-def name=\"x\">\n</config>").await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_config");
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("line 3") && msg.contains("column"), "{msg}");
    let (status, e) = submit("<config><frobnicate/></config>").await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("frobnicate"),
        "{e}"
    );
    let (status, e) = submit("<config><script>String s = \"x\";</script></config>").await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("script"),
        "{e}"
    );

    let url = format!("http://127.0.0.1:{}/x", crate::seeds::closed_port());
    let (status, s) = submit(&format!(
        "<config>\n<loop item=\"u\"><list><var-def name=\"x\">{url}</var-def></list>\
         <body><http url=\"${{u}}\"/></body></loop>\n</config>"
    ))
    .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    let s = ended(&http, &api, &id).await;
    assert_eq!(s["status"], "FAILED", "{s}");
    let msg = s["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("config/loop/body/http"), "{msg}");
}

/// An XML session survives a SIGKILL of the service: taken back at restart, run again from
/// the start, and it ends with one final context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xml_session_survives_a_sigkill_with_one_final_context() {
    let site = crate::resume_crash::product_site(40).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api) = serve(dir.path());
    let http = reqwest::Client::new();
    // Visits every product page, 100 ms apart: about 4 s.
    let config = format!(
        r#"<config>
  <var-def name="titles">
    <loop item="i" index="n">
      <list><script>var r = []; for (var k = 0; k &lt; 40; k++) r.push(k); r</script></list>
      <body>
        <sleep milliseconds="100"/>
        <xpath expression="//h1/text()">
          <html-to-xml><http url="{}/product/${{i}}.html"/></html-to-xml>
        </xpath>
      </body>
    </loop>
  </var-def>
</config>"#,
        site.base_url()
    );
    let (status, s) = post(
        &http,
        format!("{api}/v1/sessions"),
        json!({"config": config, "session_id": "killed"}),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    wait_until(
        &http,
        &api,
        "killed",
        Duration::from_secs(60),
        "some requests",
        |s| s["metrics"]["pages_processed"].as_u64().unwrap_or(0) >= 5,
    )
    .await;
    server.kill9();
    let (_server, api) = serve(dir.path());
    let s = ended(&http, &api, "killed").await;
    assert_eq!(s["status"], "COMPLETED", "{s}");
    assert_eq!(s["attempts"].as_array().map(Vec::len), Some(2), "{s}");
    let ctx = context(&http, &api, "killed").await;
    let titles: Vec<String> = (0..40).map(|i| format!("Product {i}")).collect();
    assert_eq!(
        ctx["variables"]["titles"],
        json!(titles),
        "one final context: {ctx}"
    );
    assert_eq!(
        get_session(&http, &api, "killed").await["status"],
        "COMPLETED"
    );
    site.shutdown().await;
}

/// `harvest run scraper.xml` prints the variables; `harvest submit scraper.xml` submits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_and_submits_xml_configs() {
    let site = crate::resume_crash::product_site(10).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("shop.xml");
    std::fs::write(&file, SHOP_21).expect("config");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
        .arg("run")
        .arg(&file)
        .args(["-p", &format!("base={}", site.base_url())])
        .current_dir(dir.path())
        .env_remove("HARVEST_CONFIG")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("harvest run ended")
        .expect("harvest run ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["variables"]["cheapest"], "0.00", "{v}");

    let (_server, api) = serve(&dir.path().join("srv"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
        .arg("submit")
        .arg(&file)
        .args(["-p", &format!("base={}", site.base_url())])
        .args(["--wait", "--session-id", "cli-xml", "--server", &api])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("harvest submit ended")
        .expect("harvest submit ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
        .args(["context", "cli-xml", "cheapest", "--server", &api])
        .output()
        .await
        .expect("harvest context ran");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"0.00\"");
    site.shutdown().await;
}
