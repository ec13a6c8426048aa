//! Tests named after bugs a review found, each failing before its fix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use harvest::config::Config;
use harvest::job::{Job, JobContext, JobOutcome};
use harvest::service::{Harvest, HarvestError, SubmitRequest};
use harvest::session::{SessionId, SessionOptions, SessionStatus};
use harvest::store::CheckpointBatch;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::sync::Notify;

use crate::api_support::start;

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
const WAIT: Duration = Duration::from_secs(20);

/// Sessions whose config says `"old": true` wait for `old_gate`, then try to commit one record
/// and note whether it applied; others wait for `new_gate` and commit one record.
struct Gated {
    old_gate: Arc<Notify>,
    new_gate: Arc<Notify>,
    old_write_applied: Arc<AtomicBool>,
    old_done: Arc<Notify>,
}

#[async_trait]
impl Job for Gated {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let old = ctx.session.job.config.get("old").is_some();
        let gate = if old { &self.old_gate } else { &self.new_gate };
        gate.notified().await;
        let batch = CheckpointBatch {
            records: vec![json!({"from": if old { "old" } else { "new" }})],
            pages: 1,
            ..Default::default()
        };
        let applied = ctx.sink.commit(batch).await.is_ok();
        if old {
            self.old_write_applied.store(applied, Ordering::SeqCst);
            self.old_done.notify_one();
            return JobOutcome::Stopped(CheckpointBatch::default());
        }
        JobOutcome::Completed(CheckpointBatch::default())
    }
}

async fn wait_status(h: &Harvest, id: &SessionId, want: SessionStatus) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(s) = h.get(id).await.expect("get")
            && s.status == want
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A session closed while RUNNING and submitted again under the same id starts over at attempt
/// 1; its old attempt, still running in the same process, used to match the new lease (same
/// attempt number, same process owner) and write into the new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_and_resubmitted_session_is_not_written_by_its_old_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 2;
    cfg.workers.poll_interval_ms = 20;
    // Heartbeats far apart, so the old attempt has not noticed the close when it writes.
    cfg.workers.lease_secs = 600;
    let job = Gated {
        old_gate: Arc::new(Notify::new()),
        new_gate: Arc::new(Notify::new()),
        old_write_applied: Arc::new(AtomicBool::new(false)),
        old_done: Arc::new(Notify::new()),
    };
    let (old_gate, new_gate, applied, old_done) = (
        job.old_gate.clone(),
        job.new_gate.clone(),
        job.old_write_applied.clone(),
        job.old_done.clone(),
    );
    let h = Harvest::builder(cfg)
        .job(Arc::new(job))
        .open()
        .await
        .expect("open");
    h.start();
    let id = SessionId::parse("job-42").expect("id");
    h.submit(SubmitRequest::new(json!({"old": true})).session_id(id.clone()))
        .await
        .expect("submit old");
    wait_status(&h, &id, SessionStatus::Running).await;
    h.close(&id).await.expect("close").expect("was there");
    h.submit(SubmitRequest::new(json!({"new": true})).session_id(id.clone()))
        .await
        .expect("submit new");
    wait_status(&h, &id, SessionStatus::Running).await;
    // The old attempt tries its write before the new one commits.
    old_gate.notify_one();
    tokio::time::timeout(WAIT, old_done.notified())
        .await
        .expect("the old attempt tried its write");
    new_gate.notify_one();
    let done = h
        .handle(id.clone())
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    assert_eq!(done.status, SessionStatus::Completed);
    assert!(
        !applied.load(Ordering::SeqCst),
        "the old attempt's write applied"
    );
    let recs = h.records(&id, 0, 10).await.expect("records");
    let data: Vec<_> = recs.iter().map(|r| r.data.clone()).collect();
    assert_eq!(data, vec![json!({"from": "new"})]);
    h.shutdown(Duration::from_secs(1)).await.expect("shutdown");
}

/// A service on sled in `dir` that runs no session (no worker slots).
async fn without_workers(dir: &std::path::Path) -> Harvest {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 0;
    Harvest::builder(cfg)
        .job(Arc::new(harvest::job::NoopJob))
        .open()
        .await
        .expect("open")
}

/// A `max_duration_secs` near u64::MAX overflowed the worker's and the scheduler's deadline
/// arithmetic (panics that stopped maintenance for everyone); it is refused at submission.
/// Likewise a `max_attempts` of u32::MAX and, from the library API, an agent name with a NUL
/// byte: sled stored both, and PostgreSQL refused them with a server error. Nothing is stored.
#[tokio::test]
async fn absurd_options_and_a_bad_agent_name_are_refused_at_submission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = without_workers(dir.path()).await;
    for (opts, what) in [
        (
            SessionOptions {
                max_duration_secs: Some(u64::MAX),
                ..Default::default()
            },
            "max_duration_secs",
        ),
        (
            SessionOptions {
                session_timeout_secs: Some(u64::MAX),
                ..Default::default()
            },
            "session_timeout_secs",
        ),
        (
            SessionOptions {
                max_attempts: Some(u32::MAX),
                ..Default::default()
            },
            "max_attempts",
        ),
    ] {
        let err = h
            .submit(SubmitRequest::new(json!({"name": "t"})).options(opts))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, HarvestError::Invalid(m) if m.contains(what)),
            "{err}"
        );
    }
    let mut req = SubmitRequest::new(json!({"name": "t"}));
    req.agent = Some("bad\0agent".into());
    let err = h.submit(req).await.unwrap_err();
    assert!(
        matches!(&err, HarvestError::Invalid(m) if m.contains("agent name")),
        "{err}"
    );
    let stored = h
        .list(harvest::store::SessionList {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(stored.sessions.is_empty(), "nothing stored");
}

/// An agent saved before `max_attempts` was bounded (written to the store directly here, as an
/// older harvest did) keeps running, at the bound, instead of having every run and cron tick
/// refused; a run's own `max_attempts` over the bound is still refused.
#[tokio::test]
async fn an_agent_saved_with_max_attempts_over_the_bound_still_runs() {
    use harvest::service::AgentRun;
    use harvest::session::OptionsPatch;
    use harvest::store::{Agent, AgentSessions};

    let dir = tempfile::tempdir().expect("tempdir");
    let h = without_workers(dir.path()).await;
    h.store()
        .agent_put(Agent {
            name: "old".into(),
            client_id: "c1".into(),
            config: json!({"name": "t"}),
            params: BTreeMap::new(),
            options: SessionOptions {
                max_attempts: Some(50_000),
                ..Default::default()
            },
            schedule: None,
            sessions: AgentSessions::Multiple,
            updated_at: h.clock().now(),
        })
        .await
        .expect("stored as an older harvest would");
    let run = h
        .agent_run("c1", "old", AgentRun::default())
        .await
        .expect("the saved agent still runs");
    let s = run.session().await.expect("session");
    assert_eq!(s.options.max_attempts, Some(SessionOptions::MAX_ATTEMPTS));
    let own = AgentRun {
        options: OptionsPatch {
            max_attempts: Some(Some(SessionOptions::MAX_ATTEMPTS + 1)),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = h.agent_run("c1", "old", own).await.unwrap_err();
    assert!(
        matches!(&err, HarvestError::Invalid(m) if m.contains("max_attempts")),
        "{err}"
    );
}

/// sled's single-agent index ignored the client: one tenant's active run blocked another
/// tenant's agent of the same name, and the 409 named the other tenant's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_agents_of_two_tenants_with_one_name_do_not_block_each_other() {
    let s = start(TENANTS).await;
    let agent = json!({"config": {"name": "x", "wait_gate": true}, "sessions": "single"});
    for t in [A, B] {
        let r = s
            .call(Method::PUT, "/v1/agents/daily", t, Some(&agent))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = s
        .call(
            Method::POST,
            "/v1/agents/daily/run",
            A,
            Some(&json!({"session_id": "acme-secret-run"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = s
        .call(Method::POST, "/v1/agents/daily/run", B, Some(&json!({})))
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "globex blocked by acme: {}",
        r.text
    );
    assert!(!r.text.contains("acme-secret-run"));
}

/// With remove_after_export, a read starting past the last record (an empty page) counted as
/// "read to the end" and deleted records nobody had read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_past_the_last_record_is_not_an_export() {
    let s = start("[workers]\nconcurrency = 2\n").await;
    let body = json!({"config": {"name": "x", "records": 10},
        "options": {"remove_after_export": true}, "session_id": "rae-1"});
    s.submit(body).await;
    let done = s.wait_terminal("rae-1").await;
    assert_eq!(done.status, SessionStatus::Completed);
    let r = s
        .get("/v1/sessions/rae-1/records?offset=1000000&format=jsonl")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = s.get("/v1/sessions/rae-1/records?format=json").await;
    assert_eq!(
        r.json.as_array().map(|a| a.len()),
        Some(10),
        "records lost: {}",
        r.text
    );
}

/// Cron runs have predictable ids; a tenant could submit one first and its owner's tick was then
/// skipped as "already ran". Ids starting with `_` are reserved and cron ids use them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_take_reserved_session_ids() {
    let s = start(TENANTS).await;
    let id = harvest::runtime::cron_session_id("acme", "daily", harvest::session::Timestamp(0))
        .expect("cron id");
    assert!(id.as_str().starts_with('_'), "{id}");
    let r = s
        .call(
            Method::POST,
            "/v1/sessions",
            B,
            Some(&json!({"config": {"name": "x"}, "session_id": id.as_str()})),
        )
        .await;
    r.assert_error(400, "invalid_session_id");
}
