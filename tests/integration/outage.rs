//! Many processes, one truth (issue 19), on the real binaries and the shared PostgreSQL:
//!
//! - `serve`'s event stream carries `started` and `completed` of sessions that a separate
//!   `harvest worker` runs, with SSE ids, and `Last-Event-ID` replays what a client missed;
//! - an outage while 40 sessions run (the link to the database cut for about 1.5 s): the
//!   API answers 503 `store_unavailable` with `Retry-After` meanwhile, and every session
//!   completes with its exact records within seconds of the link's return (not a 30 s lease
//!   later), without spending an attempt, each `completed` once on `serve`'s stream;
//! - a worker (and a `serve`) started while the database does not answer waits for it, `serve`
//!   says 503 on `/readyz` meanwhile, and the worker runs sessions once it answers.
//!
//! The outages are made by a TCP proxy in the test between the processes and 127.0.0.1:5432,
//! which drops every connection and refuses new ones while "cut": the shared server never
//! stops, so other tests using it are not disturbed. Skips without `HARVEST_TEST_DATABASE_URL`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use harvest::Harvest;
use harvest::config::{Config, StoreKind};
use harvest::session::{SessionId, SessionStatus};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proc::Server;
use crate::store_postgres::{SchemaGuard, database_url, unique_schema};

/// Pages of each session's chain, one record each.
pub(crate) const CHAIN: usize = 12;
/// How long the fixture site takes per page.
const PAGE_DELAY: Duration = Duration::from_millis(150);

/// A TCP proxy to `target` that can be cut (every connection dropped, new ones closed at once)
/// and restored.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start(target: SocketAddr, cut: bool) -> Proxy {
        Proxy::start_on([127, 0, 0, 1].into(), target, cut).await
    }

    /// A proxy listening on `ip` (a port chosen by the OS).
    pub(crate) async fn start_on(ip: std::net::IpAddr, target: SocketAddr, cut: bool) -> Proxy {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(cut));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut list = k.lock().expect("conns");
                list.retain(|h| !h.is_finished());
                list.push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().expect("conns").drain(..) {
            h.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A site of chains: `/c/{n}` has one `div.rec` and, below [`CHAIN`], a link to `/c/{n+1}`;
/// each answer takes [`PAGE_DELAY`].
async fn slow_site() -> SocketAddr {
    slow_site_on([127, 0, 0, 1].into(), CHAIN).await
}

/// [`slow_site`] on `ip`, with chains of `chain` pages.
pub(crate) async fn slow_site_on(ip: std::net::IpAddr, chain: usize) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind site");
    let addr = listener.local_addr().expect("site addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&got);
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let n: Option<usize> = path.strip_prefix("/c/").and_then(|n| n.parse().ok());
                let (status, body) = match n {
                    Some(n) if n < chain => {
                        tokio::time::sleep(PAGE_DELAY).await;
                        let next = if n + 1 < chain {
                            format!("<a class=\"next\" href=\"/c/{}\">next</a>", n + 1)
                        } else {
                            String::new()
                        };
                        (
                            "200 OK",
                            format!(
                                "<html><body><div class=\"rec\"><span class=\"t\">page {n}</span></div>{next}</body></html>"
                            ),
                        )
                    }
                    _ => ("404 Not Found", "not here".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

pub(crate) fn chain_config(site: SocketAddr) -> Value {
    json!({
        "start_urls": [format!("http://{site}/c/0")],
        "start_page": "chain",
        "limits": {"max_depth": 100},
        "follow": [{"selector": "a.next", "page": "chain"}],
        "pages": {"chain": {"item": "div.rec", "fields": {"text": "span.t"}}},
    })
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub(crate) struct Ev {
    pub(crate) id: Option<u64>,
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// Reads an SSE response block by block.
pub(crate) struct Stream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Stream {
    pub(crate) async fn open(url: &str, last_event_id: Option<u64>) -> Stream {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.expect("sse request");
        assert_eq!(resp.status(), 200, "sse {url}");
        Stream {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event, `None` when none comes within `limit`.
    pub(crate) async fn next(&mut self, limit: Duration) -> Option<Ev> {
        let fut = async {
            loop {
                if let Some(pos) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..pos + 2).collect();
                    let Some((id, event, data)) = crate::api_support::parse_sse_block(&block)
                    else {
                        continue;
                    };
                    return Some(Ev { id, event, data });
                }
                match self.body.next().await {
                    Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(limit, fut).await.ok().flatten()
    }
}

pub(crate) fn session_of(e: &Ev) -> String {
    e.data["session_id"]
        .as_str()
        .or_else(|| e.data["id"].as_str())
        .unwrap_or_default()
        .to_string()
}

pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    _guard: SchemaGuard,
    pub(crate) schema: String,
    config: std::path::PathBuf,
    pub(crate) data: std::path::PathBuf,
    url: String,
}

/// A schema and a config file for the binaries, whose database is `db_url`.
fn setup(url: &str, db_url: &str) -> Setup {
    setup_with(url, db_url, 30)
}

/// [`setup`] with a lease of `lease_secs`.
pub(crate) fn setup_with(url: &str, db_url: &str, lease_secs: u64) -> Setup {
    let schema = unique_schema();
    let guard = SchemaGuard {
        url: url.to_string(),
        schema: schema.clone(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"postgres\"\ndatabase_url = \"{db_url}\"\ndatabase_wait_secs = 120\n\
             [workers]\nlease_secs = {lease_secs}\nretry_backoff_ms = 50\nshutdown_grace_secs = 2\n"
        ),
    )
    .expect("config");
    let data = dir.path().join("unused-sled");
    Setup {
        _dir: dir,
        _guard: guard,
        schema,
        config,
        data,
        url: url.to_string(),
    }
}

impl Setup {
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "HARVEST_CONFIG".into(),
                self.config.to_string_lossy().into(),
            ),
            ("HARVEST_DATABASE_SCHEMA".into(), self.schema.clone()),
            ("RUST_LOG".into(), "warn,harvest=info".into()),
        ]
    }

    pub(crate) async fn handle(&self) -> Harvest {
        Harvest::open(Config {
            store: StoreKind::Postgres,
            database_url: Some(self.url.clone()),
            database_schema: self.schema.clone(),
            ..Config::default()
        })
        .await
        .expect("open")
    }
}

pub(crate) fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(crate) async fn submit(http: &reqwest::Client, serve: &Server, config: &Value) -> String {
    let resp = http
        .post(serve.url("/v1/sessions"))
        .json(&json!({"config": config}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status(), 201, "submit");
    let body: Value = resp.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

pub(crate) fn pg_target(url: &str) -> SocketAddr {
    let cfg: tokio_postgres::Config = url.parse().expect("database url");
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub(crate) fn with_port(url: &str, port: u16) -> String {
    let target = pg_target(url);
    url.replacen(&format!(":{}", target.port()), &format!(":{port}"), 1)
}

/// `url` with its host and port replaced.
pub(crate) fn with_host_port(url: &str, host: &str, port: u16) -> String {
    let target = pg_target(url);
    let cfg: tokio_postgres::Config = url.parse().expect("database url");
    let old_host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    url.replacen(
        &format!("{old_host}:{}", target.port()),
        &format!("{host}:{port}"),
        1,
    )
}

/// Each session's records are the chain's pages, each exactly once.
async fn assert_exact_records(h: &Harvest, ids: &[String]) {
    assert_exact_chain(h, ids, CHAIN).await
}

/// Each session's records are the `chain` pages, each exactly once.
pub(crate) async fn assert_exact_chain(h: &Harvest, ids: &[String], chain: usize) {
    for id in ids {
        let id = SessionId::parse(id).expect("id");
        let records = h.records(&id, 0, 1000).await.expect("records");
        let texts: Vec<String> = records
            .iter()
            .map(|r| r.data["text"].as_str().unwrap_or_default().to_string())
            .collect();
        let want: Vec<String> = (0..chain).map(|n| format!("page {n}")).collect();
        assert_eq!(texts, want, "records of {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_streams_the_events_of_sessions_a_separate_worker_runs() {
    let Some(url) = database_url() else { return };
    let site = slow_site().await;
    let s = setup(&url, &url);
    let env = s.env();
    let serve = Server::start(&s.data, 0, &env_refs(&env));
    let _worker = Server::start_worker(&s.data, 8, &env_refs(&env));
    let mut stream = Stream::open(&serve.url("/v1/events"), None).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(submit(&http, &serve, &chain_config(site)).await);
    }
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen
        .values()
        .filter(|k| k.iter().any(|k| k == "completed"))
        .count()
        < ids.len()
    {
        assert!(Instant::now() < deadline, "events so far: {seen:?}");
        let Some(e) = stream.next(Duration::from_secs(30)).await else {
            panic!("the stream ended or went quiet; events so far: {seen:?}");
        };
        seen.entry(session_of(&e))
            .or_default()
            .push(e.event.clone());
        all.push(e);
    }
    let ids_in_stream: Vec<u64> = all
        .iter()
        .map(|e| e.id.expect("every event has an id"))
        .collect();
    assert!(
        ids_in_stream.windows(2).all(|w| w[0] < w[1]),
        "ids increase: {ids_in_stream:?}"
    );
    for id in &ids {
        let kinds: Vec<&str> = seen[id]
            .iter()
            .map(String::as_str)
            .filter(|k| *k != "progress")
            .collect();
        assert_eq!(kinds, ["created", "started", "completed"], "events of {id}");
    }
    // A client that lost the stream after the first `started` gets everything after it.
    let cut_at = all
        .iter()
        .position(|e| e.event == "started")
        .expect("a started event");
    // (Progress events are thinned out on a live stream, not in a replay: compared without.)
    let mut resumed = Stream::open(&serve.url("/v1/events"), all[cut_at].id).await;
    for want in all[cut_at + 1..].iter().filter(|e| e.event != "progress") {
        let got = loop {
            let e = resumed
                .next(Duration::from_secs(10))
                .await
                .expect("replayed event");
            if e.event != "progress" {
                break e;
            }
        };
        assert_eq!(
            (got.id, &got.event),
            (want.id, &want.event),
            "replay in order"
        );
    }
    // The session stream resumes too: only that session's events after the id.
    let first = &ids[0];
    let created = all
        .iter()
        .find(|e| e.event == "created" && session_of(e) == *first)
        .expect("created");
    let mut one = Stream::open(
        &serve.url(&format!("/v1/sessions/{first}/events")),
        created.id,
    )
    .await;
    let mut kinds = Vec::new();
    while let Some(e) = one.next(Duration::from_secs(10)).await {
        assert_eq!(session_of(&e), *first);
        if e.event != "progress" {
            kinds.push(e.event);
        }
    }
    assert_eq!(kinds, ["started", "completed"]);
}

/// The outage test. The link to the shared server is cut through the test's own proxy for
/// about 1.5 s; the server itself never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_during_40_sessions_stalls_nothing_for_a_lease() {
    let Some(url) = database_url() else { return };
    let site = slow_site().await;
    let proxy = Proxy::start(pg_target(&url), false).await;
    let s = setup(&url, &with_port(&url, proxy.addr.port()));
    let env = s.env();
    let h = s.handle().await;
    let serve = Server::start(&s.data, 0, &env_refs(&env));
    let _w1 = Server::start_worker(&s.data, 20, &env_refs(&env));
    let _w2 = Server::start_worker(&s.data, 20, &env_refs(&env));
    let mut stream = Stream::open(&serve.url("/v1/events"), None).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(submit(&http, &serve, &chain_config(site)).await);
    }
    // Cut once every session runs and has committed something.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut running = 0;
        for id in &ids {
            let s = h
                .get(&SessionId::parse(id).expect("id"))
                .await
                .expect("get")
                .expect("session exists");
            if s.status == SessionStatus::Running && s.records > 0 {
                running += 1;
            }
        }
        if running >= 30 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions did not start running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = http
        .get(serve.url("/v1/sessions"))
        .send()
        .await
        .expect("list during the outage");
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = resp.json().await.expect("json");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.restore();
    let back = Instant::now();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(retry_after.is_some(), "Retry-After");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains(&s.schema) && !message.contains("pool"),
        "no internals: {message}"
    );

    // Every session completes within seconds, with its exact records and no attempt spent.
    let mut completed: BTreeMap<String, usize> = BTreeMap::new();
    let limit = Duration::from_secs(20);
    while completed.len() < ids.len() {
        assert!(
            back.elapsed() < limit,
            "{} of {} completed {limit:?} after the link came back",
            completed.len(),
            ids.len()
        );
        if let Some(e) = stream.next(Duration::from_secs(1)).await
            && e.event == "completed"
        {
            *completed.entry(session_of(&e)).or_default() += 1;
        }
    }
    // A little longer: no session completes twice on the stream.
    while let Some(e) = stream.next(Duration::from_millis(1500)).await {
        if e.event == "completed" {
            *completed.entry(session_of(&e)).or_default() += 1;
        }
    }
    assert!(completed.values().all(|n| *n == 1), "{completed:?}");
    for id in &ids {
        let s = h
            .get(&SessionId::parse(id).expect("id"))
            .await
            .expect("get")
            .expect("session exists");
        assert_eq!(s.status, SessionStatus::Completed, "{id}");
        assert_eq!(s.failures, 0, "no attempt spent: {id}");
    }
    assert_exact_records(&h, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_the_database_runs_sessions_once_it_answers() {
    let Some(url) = database_url() else { return };
    let site = slow_site().await;
    let proxy = Proxy::start(pg_target(&url), true).await;
    let s = setup(&url, &with_port(&url, proxy.addr.port()));
    let env = s.env();
    let h = s.handle().await;
    // Both wait for a database that does not answer.
    let worker = Server::start_worker_unready(&s.data, 4, &env_refs(&env));
    let serve = Server::start_unready(&s.data, 0, &env_refs(&env));
    assert!(
        worker.wait_log(
            "store unavailable (opening the store)",
            Duration::from_secs(20)
        ),
        "the worker says it waits"
    );
    let http = reqwest::Client::new();
    let ready = http.get(serve.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 503);
    assert!(ready.headers().get("retry-after").is_some());
    let list = http
        .get(serve.url("/v1/sessions"))
        .send()
        .await
        .expect("list");
    assert_eq!(list.status(), 503);
    assert!(list.headers().get("retry-after").is_some());
    let alive = http
        .get(serve.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(alive.status(), 200);

    // Sessions submitted directly (the test's own connection) wait for the worker.
    let mut ids = Vec::new();
    for _ in 0..4 {
        let handle = h
            .submit(harvest::SubmitRequest::new(chain_config(site)))
            .await
            .expect("submit");
        ids.push(handle.id().to_string());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http.get(serve.url("/readyz")).send().await.expect("readyz");
        if ready.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "serve never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        let handle = h.handle(SessionId::parse(id).expect("id"));
        let s = handle
            .await_completion(Duration::from_secs(60))
            .await
            .expect("wait")
            .expect("completed in time");
        assert_eq!(s.status, SessionStatus::Completed);
    }
    assert_exact_records(&h, &ids).await;
    drop(worker);
}
