//! Fixtures for the HTTP API tests: a real server on 127.0.0.1:0 over a sled store in a temp
//! dir, a test job driven by its config, and small HTTP and SSE helpers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use harvest::config::Config;
use harvest::job::{Job, JobContext, JobOutcome, Retry};
use harvest::session::{LogLine, SessionError, SessionId, Timestamp};
use harvest::store::CheckpointBatch;
use harvest::store::sled::SledStore;
use harvest::{Harvest, Session};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::Semaphore;

/// A job whose behaviour is set by its config:
/// - `name` (string) is required: validation names it when missing;
/// - `wait_gate = true`: waits until the test opens the gate (or the session is stopped);
/// - `records = N`, `per_checkpoint = K`: commits N records in checkpoints of K;
/// - `fail = true`: fails for good.
pub struct TestJob {
    pub gate: Arc<Semaphore>,
}

pub fn record(i: u64) -> Value {
    json!({"i": i, "name": format!("item {i}"), "tags": ["a", "b"], "nested": {"x": i}, "note": null})
}

#[async_trait]
impl Job for TestJob {
    fn validate(
        &self,
        config: &Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        match config.get("name") {
            Some(Value::String(_)) => Ok(()),
            Some(_) => Err(harvest::job::ConfigRejected::new("name: must be a string")),
            None => Err(harvest::job::ConfigRejected::new(
                "name: missing; every config needs a name",
            )),
        }
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let cfg = &ctx.session.job.config;
        if cfg.get("wait_gate").and_then(Value::as_bool) == Some(true) {
            tokio::select! {
                permit = self.gate.acquire() => {
                    if let Ok(p) = permit { p.forget() }
                }
                _ = ctx.stop.stopped() => return JobOutcome::Stopped(CheckpointBatch::default()),
            }
        }
        if cfg.get("fail").and_then(Value::as_bool) == Some(true) {
            return JobOutcome::Failed {
                error: SessionError::new("job_failed", "asked to fail"),
                retry: Retry::Never,
                batch: CheckpointBatch::default(),
            };
        }
        let n = cfg.get("records").and_then(Value::as_u64).unwrap_or(0);
        let per = cfg
            .get("per_checkpoint")
            .and_then(Value::as_u64)
            .unwrap_or(500)
            .max(1);
        let mut i = ctx.resume.records;
        while i < n {
            if ctx.stop.is_stopped() {
                return JobOutcome::Stopped(CheckpointBatch::default());
            }
            let end = (i + per).min(n);
            let batch = CheckpointBatch {
                records: (i..end).map(record).collect(),
                pages: 1,
                log: vec![LogLine {
                    at: Timestamp::now(),
                    level: "info".into(),
                    message: format!("committed records {i}..{end}"),
                }],
                ..Default::default()
            };
            if ctx.sink.commit(batch).await.is_err() {
                return JobOutcome::Stopped(CheckpointBatch::default());
            }
            i = end;
        }
        JobOutcome::Completed(CheckpointBatch::default())
    }
}

/// A running server.
pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub harvest: Harvest,
    pub gate: Arc<Semaphore>,
    server: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A response: status, JSON body (Null when not JSON), raw text and content type.
pub struct Resp {
    pub status: StatusCode,
    pub json: Value,
    pub text: String,
    pub content_type: String,
}

impl Resp {
    /// Asserts an error answer in the API's shape with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(self.json["error"]["code"], code, "body: {}", self.text);
        assert!(
            self.json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {}",
            self.text
        );
    }
}

/// Starts a server with this service config (TOML) and the test job, workers running.
pub async fn start(config_toml: &str) -> TestServer {
    let dir = TempDir::new().expect("temp dir");
    let mut config = Config::from_toml(config_toml).expect("test config parses");
    config.data_dir = dir.path().to_path_buf();
    config.validate().expect("test config validates");
    let store = SledStore::open(dir.path()).expect("open sled store");
    let gate = Arc::new(Semaphore::new(0));
    let harvest = Harvest::builder(config)
        .store(Arc::new(store))
        .job(Arc::new(TestJob { gate: gate.clone() }))
        .open()
        .await
        .expect("open harvest");
    harvest.start();
    let app = harvest::api::router(harvest.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    TestServer {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client"),
        harvest,
        gate,
        server,
        _dir: dir,
    }
}

/// The default test config: 4 workers.
pub const CONFIG: &str = "[workers]\nconcurrency = 4\n";

impl TestServer {
    /// Sends a request (JSON body when given) with an optional bearer token.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(b).expect("JSON body"));
        }
        let resp = req.send().await.expect("request sent");
        into_resp(resp).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, None, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.call(Method::POST, path, None, Some(body)).await
    }

    /// Submits and asserts 201; returns the session JSON.
    pub async fn submit(&self, body: Value) -> Value {
        let r = self.post("/v1/sessions", &body).await;
        assert_eq!(r.status, StatusCode::CREATED, "submit: {}", r.text);
        r.json
    }

    /// Waits (on events, with a deadline) until the session is terminal.
    /// Waits for the one session with this id (in whichever tenant holds it; with two tenants
    /// holding it, use [`TestServer::wait_terminal_in`]).
    pub async fn wait_terminal(&self, id: &str) -> Session {
        let page = self
            .harvest
            .store()
            .session_list(harvest::store::SessionList {
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("list");
        let holders: Vec<Option<String>> = page
            .sessions
            .iter()
            .filter(|s| s.id.as_str() == id)
            .map(|s| s.tenant.clone())
            .collect();
        assert!(
            holders.len() <= 1,
            "session {id} is in several tenants: {holders:?}"
        );
        let tenant = holders.into_iter().next().flatten();
        self.wait_terminal_in(tenant.as_deref(), id).await
    }

    /// Waits for session `id` of tenant `client` (`None`: the single namespace).
    pub async fn wait_terminal_in(&self, client: Option<&str>, id: &str) -> Session {
        let id = SessionId::parse(id).expect("valid id");
        match self
            .harvest
            .handle(harvest::SessionKey::new(client, id.clone()))
            .await_completion(Duration::from_secs(30))
            .await
        {
            Ok(Some(s)) => s,
            other => panic!("session {id} did not end within 30 s: {other:?}"),
        }
    }
}

pub async fn into_resp(resp: reqwest::Response) -> Resp {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.expect("body read");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        json,
        text,
        content_type,
    }
}

/// One parsed Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    /// The `id:` field, if any.
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

/// Reads a text/event-stream response.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    /// Opens an event stream; panics unless it answers 200 text/event-stream.
    pub async fn open(server: &TestServer, path: &str, token: Option<&str>) -> SseReader {
        SseReader::open_after(server, path, token, None).await
    }

    /// Opens an event stream with `Last-Event-ID: last_id`.
    pub async fn open_after(
        server: &TestServer,
        path: &str,
        token: Option<&str>,
        last_id: Option<u64>,
    ) -> SseReader {
        let mut req = server.http.get(format!("{}{path}", server.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.expect("sse request sent");
        assert_eq!(resp.status(), StatusCode::OK, "sse {path}");
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
        SseReader {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event (comments and keep-alives skipped); `None` when the stream ended. Panics
    /// when nothing comes within `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> Option<Sse> {
        let fut = async {
            loop {
                if let Some(pos) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..pos + 2).collect();
                    let Some((id, event, data)) = parse_sse_block(&block) else {
                        continue;
                    };
                    return Some(Sse { id, event, data });
                }
                match self.stream.next().await {
                    Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                    Some(Err(e)) => panic!("event stream failed: {e}"),
                    None => return None,
                }
            }
        };
        tokio::time::timeout(deadline, fut)
            .await
            .expect("no event within the deadline")
    }

    /// Events until the stream ends (at most `max`).
    pub async fn collect(&mut self, max: usize, deadline: Duration) -> Vec<Sse> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.next(deadline).await {
                Some(e) => out.push(e),
                None => break,
            }
        }
        out
    }
}

/// One Server-Sent Events block (up to its blank line): its `id`, its `event` name (`message`
/// when unnamed) and its `data` as JSON; `None` for a block without data (a comment, a
/// keep-alive).
pub fn parse_sse_block(block: &str) -> Option<(Option<u64>, String, Value)> {
    let mut event = String::from("message");
    let mut data = String::new();
    let mut id = None;
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    if data.is_empty() {
        return None;
    }
    Some((
        id,
        event,
        serde_json::from_str(&data).expect("event data is JSON"),
    ))
}
