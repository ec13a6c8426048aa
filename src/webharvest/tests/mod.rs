//! Tests of the interpreter: each processor against fixture pages served on 127.0.0.1:0, with
//! the real fetcher, and the bad inputs (refused at parse time, or failing with the processor's
//! path).

mod errors;
mod processors;
mod scripts;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use super::{
    FetchHost, Host, HostSettings, Limits, RunError, RunOutput, VarValue, parse, run_program,
};
use crate::engine::config::HttpSettings;
use crate::job::StopSignal;

/// The fixture site; stops when dropped.
pub(super) struct Site {
    pub(super) base: String,
    _stop: oneshot::Sender<()>,
}

pub(super) const SHOP: &str = r#"<!doctype html><html><head><title>Shop</title></head><body>
<ul id="products">
 <li class="p"><a href="/item/1.html">Apple</a> <span class="price">£1.50</span></li>
 <li class="p"><a href="/item/2.html">Banana</a> <span class="price">£0.25</span></li>
 <li class="p"><a href="/item/3.html">Cherry &amp; Co</a> <span class="price">£3.00</span></li>
 <li class="p"><a href="/item/1.html">Apple again</a> <span class="price">£1.50</span></li>
</ul>
<p class="note">  Prices   include VAT </p>
<a class="next" href="/shop2.html">next</a>
</body></html>"#;

pub(super) async fn site() -> Site {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind the fixture site");
    let addr = listener.local_addr().expect("fixture address");
    let app = Router::new().fallback(handle);
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    Site {
        base: format!("http://{addr}"),
        _stop: tx,
    }
}

fn html(body: impl Into<String>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

async fn handle(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path();
    if let Some(n) = path
        .strip_prefix("/item/")
        .and_then(|r| r.strip_suffix(".html"))
    {
        return html(format!(
            "<html><body><h1>Item {n}</h1><p class=\"sku\">SKU-{n}</p></body></html>"
        ));
    }
    match path {
        "/shop.html" => html(SHOP),
        "/shop2.html" => html(
            "<html><body><ul><li class=\"p\"><a href=\"/item/9.html\">Fig</a></li></ul></body></html>",
        ),
        "/echo" => {
            let mut h: Vec<String> = headers
                .iter()
                .filter(|(k, _)| k.as_str().starts_with("x-") || *k == header::CONTENT_TYPE || *k == header::USER_AGENT || *k == header::AUTHORIZATION)
                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                .collect();
            h.sort();
            (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!(
                    "{method} {}\n{}\nbody={}",
                    uri.path_and_query().map_or("", |p| p.as_str()),
                    h.join("\n"),
                    String::from_utf8_lossy(&body)
                ),
            )
                .into_response()
        }
        "/cookie/set" => (
            [
                (header::SET_COOKIE, "session=abc123; Path=/"),
                (header::CONTENT_TYPE, "text/plain"),
            ],
            "set",
        )
            .into_response(),
        "/cookie/get" => (
            [(header::CONTENT_TYPE, "text/plain")],
            headers
                .get(header::COOKIE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string(),
        )
            .into_response(),
        "/json" => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"shop":{"name":"Fruit","items":[{"name":"Apple","price":1.5},{"name":"Banana","price":0.25}]}}"#,
        )
            .into_response(),
        "/latin1.html" => {
            let (bytes, _, _) = encoding_rs::WINDOWS_1252.encode(
                "<html><head><meta charset=\"iso-8859-1\"></head><body><p>Café</p></body></html>",
            );
            ([(header::CONTENT_TYPE, "text/html")], bytes.into_owned()).into_response()
        }
        "/redirect" => (StatusCode::FOUND, [(header::LOCATION, "/item/1.html")]).into_response(),
        "/post-redirect" => (StatusCode::SEE_OTHER, [(header::LOCATION, "/echo")]).into_response(),
        "/status/404" => (StatusCode::NOT_FOUND, "missing").into_response(),
        "/status/503" => (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response(),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            html("late")
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// What a test run left.
pub(super) struct Ran {
    pub(super) result: Result<RunOutput, RunError>,
    pub(super) host: Arc<FetchHost>,
    pub(super) dir: tempfile::TempDir,
}

impl Ran {
    pub(super) fn ok(&self) -> &RunOutput {
        match &self.result {
            Ok(o) => o,
            Err(e) => panic!("the run failed: {e}"),
        }
    }

    pub(super) fn err(&self) -> &RunError {
        match &self.result {
            Ok(o) => panic!("the run succeeded with {:?}", o.variables),
            Err(e) => e,
        }
    }

    pub(super) fn text(&self, name: &str) -> String {
        match self.ok().variables.get(name) {
            Some(VarValue::Text(s)) => s.clone(),
            other => panic!("{name} is {other:?}, not a text"),
        }
    }

    pub(super) fn list(&self, name: &str) -> Vec<String> {
        match self.ok().variables.get(name) {
            Some(VarValue::List(l)) => l.clone(),
            other => panic!("{name} is {other:?}, not a list"),
        }
    }
}

pub(super) fn host_settings(dir: &std::path::Path) -> HostSettings {
    HostSettings {
        http: HttpSettings {
            obey_robots_txt: false,
            retries: 0,
            timeout_ms: 5_000,
            ..HttpSettings::default()
        },
        guard: None,
        files_dir: Some(dir.join("session")),
        max_file_bytes: 1 << 20,
        max_read_bytes: 1 << 20,
    }
}

/// Runs `xml` with `base` (the fixture site) as a param, plus `params`.
pub(super) async fn run_in(
    site: &Site,
    xml: &str,
    params: &[(&str, &str)],
    limits: Limits,
    stop: StopSignal,
) -> Ran {
    let dir = tempfile::tempdir().expect("temp dir");
    let program = Arc::new(parse(xml).unwrap_or_else(|e| panic!("the config parses: {e}")));
    let host = Arc::new(FetchHost::new(host_settings(dir.path()), stop.clone()).expect("host"));
    let mut p: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    p.insert("base".into(), site.base.clone());
    let result = run_program(program, &p, host.clone() as Arc<dyn Host>, limits, stop).await;
    Ran { result, host, dir }
}

/// Runs `xml` (wrapped in `<config>`) against a fresh fixture site with default limits.
pub(super) async fn run(body: &str) -> Ran {
    let s = site().await;
    run_in(
        &s,
        &format!("<config>{body}</config>"),
        &[],
        Limits::default(),
        StopSignal::new(),
    )
    .await
}
