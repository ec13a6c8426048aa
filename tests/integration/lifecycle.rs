//! The session lifecycle with a controllable clock: maintenance jobs driven by
//! `Harvest::maintain_once` (lease reclaim racing a heartbeat, max_duration, timeout cleanup), cron
//! agents fired by hand, claim order, and agents and remove_after_export over HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use harvest::Harvest;
use harvest::clock::{Clock, ManualClock};
use harvest::config::Config;
use harvest::job::{Job, JobContext, JobOutcome};
use harvest::runtime::MAX_DURATION_BACKSTOP;
use harvest::service::SubmitRequest;
use harvest::session::{
    ClientContext, FrontierEntry, LogLine, SessionId, SessionOptions, SessionStatus, Timestamp,
};
use harvest::store::{
    AttemptRef, CheckpointBatch, HeartbeatOutcome, SessionClaim, SessionHeartbeat, SessionList,
};
use harvest::{AgentRun, AgentSpec};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tempfile::TempDir;

use crate::api_support::{CONFIG, start};

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// Commits records, frontier, seen URLs and log lines in one checkpoint, then completes: every
/// keyspace of a session gets keys.
struct EveryKeyJob;

#[async_trait]
impl Job for EveryKeyJob {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let batch = CheckpointBatch {
            records: (0..3).map(|i| json!({"i": i})).collect(),
            frontier_add: vec![FrontierEntry {
                url: "http://127.0.0.1:1/next".into(),
                depth: 1,
                page: None,
            }],
            seen_add: vec!["http://127.0.0.1:1/".into()],
            log: vec![LogLine {
                at: ctx.session.created_at,
                level: "info".into(),
                message: "one line".into(),
            }],
            pages: 1,
            ..Default::default()
        };
        if ctx.sink.commit(batch).await.is_err() {
            return JobOutcome::Stopped(CheckpointBatch::default());
        }
        JobOutcome::Completed(CheckpointBatch::default())
    }
}

/// A service on a fresh sled directory with a manual clock; workers are not started.
struct Fixture {
    harvest: Harvest,
    clock: ManualClock,
    dir: TempDir,
}

async fn fixture(tweak: impl FnOnce(&mut Config)) -> Fixture {
    let dir = TempDir::new().expect("temp dir");
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 2;
    cfg.workers.poll_interval_ms = 50;
    cfg.workers.retry_backoff_ms = 0;
    cfg.workers.lease_secs = 3;
    // The tests drive maintenance with `maintain_once`; the background loop only ticks at start.
    cfg.sessions.maintenance_interval_secs = 3600;
    tweak(&mut cfg);
    let clock = ManualClock::new(T0);
    let harvest = Harvest::builder(cfg)
        .job(Arc::new(EveryKeyJob))
        .clock(Arc::new(clock.clone()))
        .open()
        .await
        .expect("open harvest");
    Fixture {
        harvest,
        clock,
        dir,
    }
}

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid id")
}

fn submit_req(id: &str, options: SessionOptions) -> SubmitRequest {
    SubmitRequest::new(json!({"name": "t"}))
        .client(ClientContext::of("c1"))
        .options(options)
        .session_id(sid(id))
}

/// Claims up to `limit` due sessions as `owner` at the clock's time, with a 3 s lease.
async fn claim(f: &Fixture, owner: &str, limit: usize) -> Vec<harvest::Session> {
    f.harvest
        .store()
        .session_claim(SessionClaim {
            owner: owner.into(),
            limit,
            lease: Duration::from_secs(3),
            now: f.clock.now(),
        })
        .await
        .expect("claim")
}

fn aref(s: &harvest::Session) -> AttemptRef {
    AttemptRef {
        id: harvest::SessionKey::from(s.id.clone()),
        attempt: s.attempt,
        owner: s
            .lease
            .as_ref()
            .map(|l| l.owner.clone())
            .unwrap_or_default(),
    }
}

async fn heartbeat(f: &Fixture, a: &AttemptRef) -> HeartbeatOutcome {
    f.harvest
        .store()
        .session_heartbeat_if_running(SessionHeartbeat {
            attempt: a.clone(),
            lease: Duration::from_secs(3),
            now: f.clock.now(),
        })
        .await
        .expect("heartbeat")
}

async fn status(f: &Fixture, id: &str) -> harvest::Session {
    f.harvest
        .get(&sid(id))
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("session {id} is missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_racing_a_late_heartbeat_has_exactly_one_winner() {
    let f = fixture(|_| {}).await;
    let (mut renewed, mut reclaimed) = (0, 0);
    for round in 0..20 {
        let id = format!("race-{round}");
        f.harvest
            .submit(submit_req(&id, SessionOptions::default()))
            .await
            .expect("submit");
        let s = claim(&f, "w", 1).await.remove(0);
        assert_eq!(s.id.as_str(), id);
        // The lease (3 s) has run out; the worker's heartbeat is late and races maintenance.
        f.clock.advance(Duration::from_secs(4));
        let a = aref(&s);
        let (h1, h2, a1, now) = (
            f.harvest.clone(),
            f.harvest.clone(),
            a.clone(),
            f.clock.now(),
        );
        let hb = tokio::spawn(async move {
            h1.store()
                .session_heartbeat_if_running(SessionHeartbeat {
                    attempt: a1,
                    lease: Duration::from_secs(3),
                    now,
                })
                .await
        });
        let report = tokio::spawn(async move { h2.maintain_once().await });
        let hb = hb.await.expect("heartbeat task").expect("heartbeat");
        let report = report
            .await
            .expect("maintenance task")
            .expect("maintenance");
        let now = status(&f, &id).await;
        match hb {
            HeartbeatOutcome::Renewed { .. } => {
                renewed += 1;
                assert_eq!(report.reclaimed, 0, "round {round}: both won");
                assert_eq!(now.status, SessionStatus::Running, "round {round}");
                assert_eq!(now.attempt, 1);
                assert!(
                    f.harvest
                        .store()
                        .session_finish_if_running(harvest::store::SessionFinish {
                            attempt: a.clone(),
                            status: SessionStatus::Completed,
                            error: None,
                            batch: CheckpointBatch::default(),
                            cleanup_after: Duration::from_secs(3600),
                            now: f.clock.now(),
                        })
                        .await
                        .unwrap()
                        .is_some(),
                    "round {round}: the renewed worker still owns the session"
                );
            }
            HeartbeatOutcome::Lost => {
                reclaimed += 1;
                assert_eq!(report.reclaimed, 1, "round {round}: nobody won");
                assert_eq!(now.status, SessionStatus::Pending, "round {round}");
                assert_eq!(now.lease, None);
                // The stale worker is fenced for good.
                assert_eq!(heartbeat(&f, &a).await, HeartbeatOutcome::Lost);
                f.harvest.close(&now.id).await.expect("close");
            }
        }
    }
    eprintln!("race: heartbeat won {renewed}, reclaim won {reclaimed}");
    assert_eq!(renewed + reclaimed, 20);
}

/// A dead worker's sessions come back in one pass however many it held: a worker with a full
/// local buffer (`workers.prefetch` and more) leaves thousands of expired leases at once, and
/// one page of 1,000 per tick made the rest wait a tick per thousand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pass_reclaims_more_expired_leases_than_a_page() {
    const N: usize = 2_500;
    let f = fixture(|_| {}).await;
    for chunk in 0..N.div_ceil(1000) {
        let reqs = (chunk * 1000..((chunk + 1) * 1000).min(N))
            .map(|i| submit_req(&format!("s{i}"), SessionOptions::default()))
            .collect();
        for r in f.harvest.submit_many(reqs).await.expect("submit") {
            r.expect("created");
        }
    }
    let mut claimed = 0;
    loop {
        let got = claim(&f, "dead-worker", 1000).await.len();
        if got == 0 {
            break;
        }
        claimed += got;
    }
    assert_eq!(claimed, N);
    f.clock.advance(Duration::from_secs(4));
    let report = f.harvest.maintain_once().await.expect("maintenance");
    assert_eq!(report.reclaimed, N, "every expired lease in one pass");
    let counts = f
        .harvest
        .store()
        .session_counts(f.clock.now())
        .await
        .expect("counts");
    assert_eq!(
        counts.by_status.get(&SessionStatus::Pending).copied(),
        Some(N as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_ends_an_attempt_that_never_finishes() {
    let f = fixture(|_| {}).await;
    let options = SessionOptions {
        max_duration_secs: Some(5),
        session_timeout_secs: Some(100),
        ..SessionOptions::default()
    };
    f.harvest
        .submit(submit_req("hung", options))
        .await
        .expect("submit");
    f.harvest
        .submit(submit_req("unlimited", SessionOptions::default()))
        .await
        .expect("submit");
    let claimed = claim(&f, "hung-worker", 2).await;
    assert_eq!(claimed.len(), 2);
    let mut events = f.harvest.subscribe();
    // The worker stays alive (its heartbeats keep the lease) but never ends the attempt.
    let backstop = Duration::from_secs(5) + MAX_DURATION_BACKSTOP;
    let mut elapsed = Duration::ZERO;
    while elapsed + Duration::from_secs(2) < backstop {
        f.clock.advance(Duration::from_secs(2));
        elapsed += Duration::from_secs(2);
        for s in &claimed {
            assert!(matches!(
                heartbeat(&f, &aref(s)).await,
                HeartbeatOutcome::Renewed { .. }
            ));
        }
        let report = f.harvest.maintain_once().await.expect("maintenance");
        assert_eq!(report.overdue, 0, "ended early, at {elapsed:?}");
        assert_eq!(report.reclaimed, 0);
    }
    f.clock.advance(backstop - elapsed);
    let report = f.harvest.maintain_once().await.expect("maintenance");
    assert_eq!(report.overdue, 1);
    let s = status(&f, "hung").await;
    assert_eq!(s.status, SessionStatus::Failed);
    assert_eq!(
        s.error.as_ref().map(|e| e.kind.as_str()),
        Some("max_duration_exceeded")
    );
    assert_eq!(
        s.cleanup_at,
        Some(f.clock.now().add(Duration::from_secs(100))),
        "cleaned up after its own session_timeout"
    );
    assert_eq!(status(&f, "unlimited").await.status, SessionStatus::Running);
    let hung = claimed.iter().find(|s| s.id.as_str() == "hung").unwrap();
    assert_eq!(
        heartbeat(&f, &aref(hung)).await,
        HeartbeatOutcome::Lost,
        "the hung worker learns it lost the session"
    );
    let e = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event")
        .expect("event");
    assert_eq!((e.session_id.as_str(), e.kind.as_str()), ("hung", "failed"));
}

/// The overdue check used to read only the newest 1,000 RUNNING sessions, so with more running
/// the oldest (the likeliest to be overdue) were never checked. It now walks them all, a page
/// per tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_check_reaches_every_running_session_over_successive_ticks() {
    let f = fixture(|_| {}).await;
    let n = 1_050;
    let overdue = SessionOptions {
        max_duration_secs: Some(1),
        ..SessionOptions::default()
    };
    // The oldest session is the overdue one; 1,049 newer ones have no limit.
    f.harvest
        .submit(submit_req("oldest", overdue))
        .await
        .expect("submit");
    for i in 1..n {
        f.harvest
            .submit(submit_req(&format!("s{i}"), SessionOptions::default()))
            .await
            .expect("submit");
    }
    let mut claimed = 0;
    while claimed < n {
        // A lease longer than the test, so that no reclaim gets there first.
        let got = f
            .harvest
            .store()
            .session_claim(SessionClaim {
                owner: "hung-worker".into(),
                limit: 500,
                lease: Duration::from_secs(3600),
                now: f.clock.now(),
            })
            .await
            .expect("claim")
            .len();
        assert!(got > 0, "claimed {claimed} of {n}");
        claimed += got;
    }
    f.clock
        .advance(Duration::from_secs(1) + MAX_DURATION_BACKSTOP + Duration::from_secs(1));
    let mut ended = 0;
    for _ in 0..2 {
        ended += f
            .harvest
            .maintain_once()
            .await
            .expect("maintenance")
            .overdue;
    }
    assert_eq!(ended, 1, "two ticks cover 1,050 RUNNING sessions");
    assert_eq!(status(&f, "oldest").await.status, SessionStatus::Failed);
}

/// Retries `f` while sled's file lock of a just-dropped store is still held (10 s deadline).
fn reopen_raw(dir: &std::path::Path) -> sled::Db {
    crate::store_sled::reopening(|| sled::open(dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_cleanup_leaves_no_key_of_the_session_in_any_tree() {
    let f = fixture(|_| {}).await;
    f.harvest
        .agent_put(
            "c1",
            "agent-x",
            AgentSpec {
                config: json!({"name": "t"}),
                options: SessionOptions {
                    session_timeout_secs: Some(10),
                    ..SessionOptions::default()
                },
                ..AgentSpec::default()
            },
        )
        .await
        .expect("agent");
    let gone = f
        .harvest
        .agent_run(
            "c1",
            "agent-x",
            AgentRun {
                session_id: Some(sid("lifecycle-gone")),
                ..AgentRun::default()
            },
        )
        .await
        .expect("run");
    let kept = f
        .harvest
        .submit(submit_req(
            "lifecycle-kept",
            SessionOptions {
                session_timeout_secs: Some(1000),
                ..SessionOptions::default()
            },
        ))
        .await
        .expect("submit");
    f.harvest.start();
    for h in [&gone, &kept] {
        let s = h
            .await_completion(Duration::from_secs(30))
            .await
            .expect("wait")
            .expect("terminal within 30 s");
        assert_eq!(s.status, SessionStatus::Completed);
        assert_eq!(s.metrics.processed_elements, 3);
    }
    f.clock.advance(Duration::from_secs(9));
    let report = f.harvest.maintain_once().await.expect("maintenance");
    assert_eq!(report.expired, 0, "not before its timeout");
    f.clock.advance(Duration::from_secs(2));
    let report = f.harvest.maintain_once().await.expect("maintenance");
    assert_eq!(report.expired, 1);
    assert!(f.harvest.get(gone.id()).await.unwrap().is_none());
    drop((gone, kept));
    let Fixture { harvest, dir, .. } = f;
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    drop(harvest);

    let db = reopen_raw(dir.path());
    let mut trees = db.tree_names();
    trees.sort();
    let mut kept_keys = 0;
    let mut total = 0;
    for name in trees {
        let tree = db.open_tree(&name).expect("tree");
        for kv in tree.iter() {
            let (k, v) = kv.expect("key");
            total += 1;
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            assert!(
                !has(&k, b"lifecycle-gone"),
                "tree {:?} keeps a key of the removed session: {}",
                String::from_utf8_lossy(&name),
                k.escape_ascii()
            );
            assert!(
                !has(&v, b"lifecycle-gone"),
                "tree {:?} keeps a value naming the removed session under {}",
                String::from_utf8_lossy(&name),
                k.escape_ascii()
            );
            kept_keys += usize::from(has(&k, b"lifecycle-kept"));
        }
    }
    assert!(
        kept_keys >= 8,
        "the scan sees the other session's keys ({kept_keys} of {total})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_skips_a_tick_while_the_previous_run_is_active() {
    let f = fixture(|_| {}).await;
    f.harvest
        .agent_put(
            "c1",
            "nightly",
            AgentSpec {
                config: json!({"name": "t"}),
                schedule: Some("0 0 3 * * *".into()),
                ..AgentSpec::default()
            },
        )
        .await
        .expect("agent");
    let runs = |h: Harvest| async move {
        h.list(SessionList {
            agent: Some("nightly".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list")
        .sessions
    };
    harvest::service::agents::fire(&f.harvest, "c1", "nightly").await;
    let first = runs(f.harvest.clone()).await;
    assert_eq!(first.len(), 1, "the first tick starts a run");
    assert_eq!(first[0].status, SessionStatus::Pending);
    harvest::service::agents::fire(&f.harvest, "c1", "nightly").await;
    assert_eq!(
        runs(f.harvest.clone()).await.len(),
        1,
        "skipped while PENDING"
    );
    let c = claim(&f, "w", 1).await;
    assert_eq!(c.len(), 1);
    harvest::service::agents::fire(&f.harvest, "c1", "nightly").await;
    assert_eq!(
        runs(f.harvest.clone()).await.len(),
        1,
        "skipped while RUNNING"
    );
    f.harvest.cancel(&first[0].id).await.expect("cancel");
    assert!(
        f.harvest
            .store()
            .session_finish_if_running(harvest::store::SessionFinish {
                attempt: aref(&c[0]),
                status: SessionStatus::Cancelled,
                error: None,
                batch: CheckpointBatch::default(),
                cleanup_after: Duration::from_secs(60),
                now: f.clock.now(),
            })
            .await
            .unwrap()
            .is_some()
    );
    harvest::service::agents::fire(&f.harvest, "c1", "nightly").await;
    let after = runs(f.harvest.clone()).await;
    assert_eq!(after.len(), 2, "a tick after the run ended starts one");
    // An agent that was deleted in the meantime fires nothing.
    assert!(f.harvest.agent_delete("c1", "nightly").await.unwrap());
    harvest::service::agents::fire(&f.harvest, "c1", "nightly").await;
    assert_eq!(runs(f.harvest.clone()).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_honour_priority_then_run_at() {
    let f = fixture(|_| {}).await;
    let at = |secs: u64| Some(T0.add(Duration::from_secs(secs)));
    let specs: [(&str, i32, Option<Timestamp>); 5] = [
        ("later", 0, at(10)),
        ("now-low", 0, None),
        ("soon-high", 5, at(5)),
        ("now-high", 10, None),
        ("now-low-2", 0, None),
    ];
    for (id, priority, run_at) in specs {
        let options = SessionOptions {
            priority,
            run_at,
            ..SessionOptions::default()
        };
        f.harvest
            .submit(submit_req(id, options))
            .await
            .expect("submit");
    }
    let ids =
        |v: Vec<harvest::Session>| v.into_iter().map(|s| s.id.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ids(claim(&f, "w", 10).await),
        ["now-high", "now-low", "now-low-2"],
        "due ones by priority, then submission order; the future ones wait"
    );
    f.clock.advance(Duration::from_secs(4));
    assert!(
        claim(&f, "w", 10).await.is_empty(),
        "nothing due before 5 s"
    );
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(ids(claim(&f, "w", 10).await), ["soon-high"]);
    f.clock.advance(Duration::from_secs(5));
    assert_eq!(ids(claim(&f, "w", 10).await), ["later"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_agent_refuses_a_second_run_and_removes_the_previous_runs_data() {
    let s = start(CONFIG).await;
    let body =
        json!({"config": {"name": "t", "wait_gate": true, "records": 3}, "sessions": "single"});
    let r = s
        .call(Method::PUT, "/v1/agents/solo", None, Some(&body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["sessions"], "single");
    let r = s
        .post("/v1/agents/solo/run", &json!({"session_id": "solo-1"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json["agent"], "solo");
    s.post("/v1/agents/solo/run", &json!({}))
        .await
        .assert_error(409, "conflict");
    let q = s.post("/v1/agents/solo/run", &json!({"queue": true})).await;
    q.assert_error(409, "conflict");
    assert!(
        q.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not supported")),
        "{}",
        q.text
    );
    s.gate.add_permits(1);
    let first = s.wait_terminal("solo-1").await;
    assert_eq!(first.status, SessionStatus::Completed);
    let recs = s.get("/v1/sessions/solo-1/records").await;
    assert_eq!(recs.json.as_array().map(Vec::len), Some(3));

    let r = s
        .post("/v1/agents/solo/run", &json!({"session_id": "solo-2"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    s.get("/v1/sessions/solo-1")
        .await
        .assert_error(404, "not_found");
    let recs = s.get("/v1/sessions/solo-1/records").await;
    recs.assert_error(404, "not_found");
    s.gate.add_permits(1);
    assert_eq!(
        s.wait_terminal("solo-2").await.status,
        SessionStatus::Completed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_agent_runs_concurrently_and_each_keeps_its_data() {
    let s = start(CONFIG).await;
    let body = json!({"config": "name = \"t\"\nwait_gate = true\nrecords = 2\n"});
    let r = s
        .call(Method::PUT, "/v1/agents/many", None, Some(&body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["sessions"], "multiple");
    for id in ["many-1", "many-2"] {
        let r = s
            .post("/v1/agents/many/run", &json!({"session_id": id}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    // Both are active at once: the gate holds them until both were claimed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = s.get("/v1/sessions?status=RUNNING").await;
        if l.json["sessions"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not both RUNNING: {}",
            l.text
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            s.harvest.subscribe().recv().await.ok()
        })
        .await;
    }
    s.gate.add_permits(2);
    for id in ["many-1", "many-2"] {
        assert_eq!(s.wait_terminal(id).await.status, SessionStatus::Completed);
    }
    let r = s
        .post("/v1/agents/many/run", &json!({"session_id": "many-3"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    for id in ["many-1", "many-2"] {
        let recs = s.get(&format!("/v1/sessions/{id}/records")).await;
        assert_eq!(
            recs.json.as_array().map(Vec::len),
            Some(2),
            "{id}: {}",
            recs.text
        );
    }
    s.gate.add_permits(1);
    s.wait_terminal("many-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_crud_and_tenant_isolation_over_http() {
    let s = start(
        "[workers]\nconcurrency = 2\n[[clients]]\nid = \"acme\"\ntoken = \"acme-token-123\"\n\
         [[clients]]\nid = \"globex\"\ntoken = \"globex-token-456\"\n",
    )
    .await;
    let (a, b) = (Some("acme-token-123"), Some("globex-token-456"));
    let body = json!({"config": {"name": "t"}, "params": {"k": 1}, "schedule": "0 */15 * * * *"});
    let r = s
        .call(Method::PUT, "/v1/agents/shared-name", a, Some(&body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["client_id"], "acme");
    assert_eq!(r.json["params"]["k"], "1");
    assert_eq!(r.json["schedule"], "0 */15 * * * *");
    // globex sees nothing of acme's agent.
    s.call(Method::GET, "/v1/agents/shared-name", b, None)
        .await
        .assert_error(404, "not_found");
    s.call(
        Method::POST,
        "/v1/agents/shared-name/run",
        b,
        Some(&json!({})),
    )
    .await
    .assert_error(404, "not_found");
    s.call(Method::DELETE, "/v1/agents/shared-name", b, None)
        .await
        .assert_error(404, "not_found");
    let l = s.call(Method::GET, "/v1/agents", b, None).await;
    assert_eq!(l.json["agents"], json!([]), "{}", l.text);
    s.call(Method::GET, "/v1/agents", None, None)
        .await
        .assert_error(401, "unauthorized");
    // acme's view.
    let l = s.call(Method::GET, "/v1/agents", a, None).await;
    assert_eq!(l.json["agents"][0]["name"], "shared-name", "{}", l.text);
    let run = s
        .call(
            Method::POST,
            "/v1/agents/shared-name/run",
            a,
            Some(&json!({"params": {"x": "y"}})),
        )
        .await;
    assert_eq!(run.status, StatusCode::CREATED, "{}", run.text);
    assert_eq!(run.json["client"]["client_id"], "acme");
    let id = run.json["id"].as_str().expect("id").to_string();
    s.call(Method::GET, &format!("/v1/sessions/{id}"), b, None)
        .await
        .assert_error(404, "not_found");
    // POST /v1/sessions also takes `{agent, ...}` (see the README's API table).
    let via_sessions = s
        .call(
            Method::POST,
            "/v1/sessions",
            a,
            Some(&json!({"agent": "shared-name", "session_id": "via-sessions"})),
        )
        .await;
    assert_eq!(
        via_sessions.status,
        StatusCode::CREATED,
        "{}",
        via_sessions.text
    );
    assert_eq!(via_sessions.json["id"], "via-sessions");
    assert_eq!(via_sessions.json["agent"], "shared-name");
    s.call(
        Method::POST,
        "/v1/sessions",
        b,
        Some(&json!({"agent": "shared-name"})),
    )
    .await
    .assert_error(404, "not_found");
    s.call(
        Method::POST,
        "/v1/sessions",
        a,
        Some(&json!({"agent": "shared-name", "config": {"name": "t"}})),
    )
    .await
    .assert_error(400, "invalid_request");
    s.call(Method::POST, "/v1/sessions", a, Some(&json!({})))
        .await
        .assert_error(400, "invalid_request");
    s.wait_terminal("via-sessions").await;
    // Validation.
    s.call(
        Method::PUT,
        "/v1/agents/bad",
        a,
        Some(&json!({"config": {"name": "t"}, "schedule": "* *"})),
    )
    .await
    .assert_error(400, "invalid_request");
    s.call(
        Method::PUT,
        "/v1/agents/bad",
        a,
        Some(&json!({"config": {"nope": 1}})),
    )
    .await
    .assert_error(400, "invalid_config");
    s.call(
        Method::PUT,
        "/v1/agents/bad",
        a,
        Some(&json!({"config": "= not toml"})),
    )
    .await
    .assert_error(400, "invalid_config");
    let r = s
        .call(Method::DELETE, "/v1/agents/shared-name", a, None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    s.call(Method::GET, "/v1/agents/shared-name", a, None)
        .await
        .assert_error(404, "not_found");
    s.wait_terminal(&id).await;
}

/// Waits (polling with a deadline) until the session's records answer `want` records.
async fn wait_records(s: &crate::api_support::TestServer, id: &str, want: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.get(&format!("/v1/sessions/{id}/records")).await;
        let n = r.json.as_array().map(Vec::len);
        if n == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: expected {want} records, have {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_after_export_removes_records_once_read_to_the_end_and_keeps_the_status() {
    let s = start(CONFIG).await;
    let opts = json!({"remove_after_export": true});
    for id in ["paged", "streamed"] {
        s.submit(json!({"config": {"name": "t", "records": 5}, "options": opts, "session_id": id}))
            .await;
    }
    s.submit(json!({"config": {"name": "t", "records": 5}, "session_id": "plain"}))
        .await;
    for id in ["paged", "streamed", "plain"] {
        assert_eq!(s.wait_terminal(id).await.status, SessionStatus::Completed);
    }
    // Paged: a page as long as asked is not the end.
    let r = s
        .get("/v1/sessions/paged/records?limit=2&format=jsonl")
        .await;
    assert_eq!(r.text.lines().count(), 2, "{}", r.text);
    let r = s.get("/v1/sessions/paged/records?offset=2&limit=3").await;
    assert_eq!(r.json.as_array().map(Vec::len), Some(3));
    let still = s.harvest.records(&sid("paged"), 0, 10).await.unwrap();
    assert_eq!(
        still.len(),
        5,
        "a page that filled its limit does not end the export"
    );
    let r = s.get("/v1/sessions/paged/records?offset=5&limit=3").await;
    assert_eq!(r.json, json!([]), "{}", r.text);
    wait_records(&s, "paged", 0).await;
    let v = s.get("/v1/sessions/paged").await;
    assert_eq!(v.status, StatusCode::OK, "the session stays: {}", v.text);
    assert_eq!(v.json["status"], "COMPLETED");
    // Streamed: one full read ends it.
    let r = s.get("/v1/sessions/streamed/records?format=csv").await;
    assert_eq!(r.text.lines().count(), 6, "{}", r.text);
    wait_records(&s, "streamed", 0).await;
    assert_eq!(
        s.get("/v1/sessions/streamed").await.json["status"],
        "COMPLETED"
    );
    // Without the option, reading everything keeps the records.
    let r = s.get("/v1/sessions/plain/records").await;
    assert_eq!(r.json.as_array().map(Vec::len), Some(5));
    let r = s.get("/v1/sessions/plain/records").await;
    assert_eq!(
        r.json.as_array().map(Vec::len),
        Some(5),
        "plain keeps its records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_after_export_waits_for_the_session_to_end() {
    let s = start(CONFIG).await;
    s.submit(json!({
        "config": {"name": "t", "wait_gate": true, "records": 2},
        "options": {"remove_after_export": true},
        "session_id": "active"
    }))
    .await;
    // Read everything there is while it is still active: not an export of the final data.
    let r = s.get("/v1/sessions/active/records").await;
    assert_eq!(r.json, json!([]), "{}", r.text);
    s.gate.add_permits(1);
    s.wait_terminal("active").await;
    let r = s.get("/v1/sessions/active/records?limit=1").await;
    assert_eq!(r.json.as_array().map(Vec::len), Some(1));
    assert_eq!(
        s.harvest
            .records(&sid("active"), 0, 10)
            .await
            .unwrap()
            .len(),
        2,
        "the records read while it ran do not count"
    );
}

async fn cli(server: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
        .args(args)
        .env("HARVEST_SERVER", server)
        .env_remove("HARVEST_TOKEN")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("harvest finished within 60 s")
        .expect("harvest ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_agents_put_list_get_run_wait_delete() {
    let s = start(CONFIG).await;
    let dir = TempDir::new().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "name = \"t\"\nrecords = 2\n").unwrap();
    let base = s.base.as_str();
    let path = cfg.to_str().unwrap();

    let (ok, out, err) = cli(
        base,
        &[
            "agents",
            "put",
            "nightly",
            path,
            "--single",
            "--schedule",
            "0 0 3 * * *",
            "-p",
            "k=v",
        ],
    )
    .await;
    assert!(ok, "put: {out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON agent");
    assert_eq!(
        (v["sessions"].as_str(), v["params"]["k"].as_str()),
        (Some("single"), Some("v"))
    );
    let (ok, out, err) = cli(base, &["agents", "list"]).await;
    assert!(ok, "list: {err}");
    assert_eq!(out.trim(), "nightly\tsingle\t0 0 3 * * *");
    let (ok, out, _) = cli(base, &["agents", "get", "nightly"]).await;
    assert!(ok && out.contains("\"schedule\": \"0 0 3 * * *\""), "{out}");
    let (ok, out, err) = cli(
        base,
        &[
            "agents",
            "run",
            "nightly",
            "--wait",
            "--session-id",
            "cli-run",
        ],
    )
    .await;
    assert!(ok, "run: {out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON session");
    assert_eq!(
        (v["status"].as_str(), v["records"].as_u64()),
        (Some("COMPLETED"), Some(2))
    );
    assert_eq!(v["agent"], "nightly");
    let (ok, _, err) = cli(base, &["agents", "get", "missing"]).await;
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = cli(base, &["agents", "delete", "nightly"]).await;
    assert!(ok, "delete: {err}");
    let (ok, out, _) = cli(base, &["agents", "list"]).await;
    assert!(ok && out.trim().is_empty(), "{out}");
}
