//! The library API and the workers end to end on a real sled store: submit, run, events, cancel,
//! close, retries, attempts, max_duration, shutdown hand-back and recovery after a dead process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use harvest::config::Config;
use harvest::event::EventKind;
use harvest::job::{Job, JobContext, JobOutcome, Retry, StopReason};
use harvest::service::{Harvest, HarvestError, SubmitRequest};
use harvest::session::{SessionError, SessionId, SessionOptions, SessionStatus};
use harvest::store::{CancelOutcome, CheckpointBatch, SessionClaim, SessionList};
use serde_json::json;

/// A service on a fresh sled directory running `job`, with `tweak` applied to the config.
pub struct Fixture {
    pub harvest: Harvest,
    pub _dir: tempfile::TempDir,
}

pub async fn fixture(job: impl Job, tweak: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let harvest = open_at(dir.path(), Arc::new(job), tweak).await;
    Fixture { harvest, _dir: dir }
}

async fn open_at(
    dir: &std::path::Path,
    job: Arc<dyn Job>,
    tweak: impl FnOnce(&mut Config),
) -> Harvest {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 4;
    cfg.workers.poll_interval_ms = 50;
    cfg.workers.retry_backoff_ms = 10;
    cfg.workers.lease_secs = 3;
    tweak(&mut cfg);
    Harvest::builder(cfg)
        .job(job)
        .open()
        .await
        .expect("open harvest")
}

fn req() -> SubmitRequest {
    SubmitRequest::new(json!({"name": "test"}))
}

const WAIT: Duration = Duration::from_secs(20);

/// Commits `n` records in batches of `per_batch`, resuming after the records already committed.
pub struct RecordsJob {
    pub n: u64,
    pub per_batch: u64,
}

#[async_trait]
impl Job for RecordsJob {
    fn validate(
        &self,
        c: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        if c.get("bad").is_some() {
            Err(harvest::job::ConfigRejected::new(
                "bad: this key is refused by the test job",
            ))
        } else {
            Ok(())
        }
    }
    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let mut next = ctx.resume.records;
        while next < self.n {
            if ctx.stop.is_stopped() {
                return JobOutcome::Stopped(CheckpointBatch::default());
            }
            let end = (next + self.per_batch).min(self.n);
            let batch = CheckpointBatch {
                records: (next..end).map(|i| json!({"i": i})).collect(),
                pages: 1,
                ..CheckpointBatch::default()
            };
            if ctx.sink.commit(batch).await.is_err() {
                return JobOutcome::Stopped(CheckpointBatch::default());
            }
            next = end;
        }
        JobOutcome::Completed(CheckpointBatch::default())
    }
}

/// Waits for its stop signal, then stops with one record.
struct WaitForStop;

#[async_trait]
impl Job for WaitForStop {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, ctx: JobContext) -> JobOutcome {
        ctx.stop.stopped().await;
        JobOutcome::Stopped(CheckpointBatch {
            records: vec![json!({"stopped": true})],
            ..Default::default()
        })
    }
}

/// Fails (retryably) the first `fail` attempts, then completes.
struct Flaky {
    fail: u32,
    runs: Arc<AtomicU32>,
    retry: Retry,
}

#[async_trait]
impl Job for Flaky {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, _ctx: JobContext) -> JobOutcome {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        if n < self.fail {
            JobOutcome::Failed {
                error: SessionError::new("job_failed", format!("failure {n}")),
                retry: self.retry,
                batch: CheckpointBatch::default(),
            }
        } else {
            JobOutcome::Completed(CheckpointBatch {
                records: vec![json!({"ok": n})],
                ..Default::default()
            })
        }
    }
}

/// Ignores its stop signal entirely.
struct Stubborn;

#[async_trait]
impl Job for Stubborn {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, _ctx: JobContext) -> JobOutcome {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

/// Panics.
struct Panics;

#[async_trait]
impl Job for Panics {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, _ctx: JobContext) -> JobOutcome {
        panic!("poison input")
    }
}

async fn wait_status(h: &Harvest, id: &SessionId, want: SessionStatus) -> harvest::Session {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = h.get(id).await.expect("get").expect("session exists");
        if s.status == want {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {id} is {} after {WAIT:?}, wanted {want}",
            s.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn session_runs_to_completion_with_records_and_events_in_order() {
    let f = fixture(
        RecordsJob {
            n: 250,
            per_batch: 100,
        },
        |_| {},
    )
    .await;
    let mut events = f.harvest.subscribe();
    f.harvest.start();
    let handle = f.harvest.submit(req()).await.expect("submit");
    let done = handle
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("finished in time");
    assert_eq!(done.status, SessionStatus::Completed);
    assert_eq!(done.metrics.processed_elements, 250);
    assert_eq!(done.metrics.pages_processed, 3);
    assert_eq!(done.attempt, 1);
    assert!(done.metrics.end_time.is_some() && done.cleanup_at.is_some());

    let recs = f
        .harvest
        .records(handle.id(), 0, 1000)
        .await
        .expect("records");
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..250).collect::<Vec<_>>());
    assert!(
        recs.iter()
            .enumerate()
            .all(|(i, r)| r.data == json!({"i": i}))
    );

    // await_completion reads the store; the Completed event is published just after the commit.
    let mut kinds = Vec::new();
    while kinds.last() != Some(&EventKind::Completed) {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("events in time")
            .expect("event");
        if &e.session_id == handle.id() {
            kinds.push(e.kind);
        }
    }
    assert_eq!(kinds.first(), Some(&EventKind::Created), "{kinds:?}");
    assert_eq!(kinds.get(1), Some(&EventKind::Started), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&EventKind::Completed), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == EventKind::Progress).count(),
        3,
        "{kinds:?}"
    );
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn await_completion_returns_none_on_timeout() {
    let f = fixture(RecordsJob { n: 1, per_batch: 1 }, |c| {
        c.workers.concurrency = 0
    })
    .await;
    let h = f.harvest.submit(req()).await.expect("submit");
    let t = tokio::time::Instant::now();
    let res = h
        .await_completion(Duration::from_millis(300))
        .await
        .expect("await");
    assert!(res.is_none(), "a session with no workers cannot finish");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        h.session().await.expect("get").status,
        SessionStatus::Pending
    );
}

#[tokio::test]
async fn invalid_config_and_duplicate_id_are_refused() {
    let f = fixture(RecordsJob { n: 1, per_batch: 1 }, |c| {
        c.workers.concurrency = 0
    })
    .await;
    let err = f
        .harvest
        .submit(SubmitRequest::new(json!({"bad": 1})))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HarvestError::InvalidConfig(m) if m.to_string().contains("bad")),
        "{err}"
    );
    let err = f
        .harvest
        .submit(SubmitRequest::new(json!("not an object")))
        .await
        .unwrap_err();
    assert!(matches!(err, HarvestError::InvalidConfig(_)), "{err}");

    let id = SessionId::parse("ry37456r").expect("valid id");
    f.harvest
        .submit(req().session_id(id.clone()))
        .await
        .expect("first submit");
    let err = f
        .harvest
        .submit(req().session_id(id.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HarvestError::Duplicate(d) if *d == id),
        "{err}"
    );
    // The original is untouched.
    let s = f.harvest.get(&id).await.expect("get").expect("exists");
    assert_eq!(s.status, SessionStatus::Pending);
}

#[tokio::test]
async fn cancel_pending_then_running_and_idempotence() {
    let f = fixture(WaitForStop, |c| c.workers.lease_secs = 2).await;
    // PENDING (no workers yet): cancelled at once.
    let pending = f.harvest.submit(req()).await.expect("submit");
    let out = f.harvest.cancel(pending.id()).await.expect("cancel");
    assert!(matches!(out, CancelOutcome::Cancelled(_)), "{out:?}");
    let again = f.harvest.cancel(pending.id()).await.expect("cancel again");
    assert!(
        matches!(again, CancelOutcome::AlreadyTerminal(s) if s.status == SessionStatus::Cancelled)
    );

    // RUNNING: the flag is set; the heartbeat relays it; the job stops; the session ends CANCELLED
    // with what the job committed on its way out.
    f.harvest.start();
    let running = f.harvest.submit(req()).await.expect("submit");
    wait_status(&f.harvest, running.id(), SessionStatus::Running).await;
    let out = f.harvest.cancel(running.id()).await.expect("cancel");
    assert!(matches!(out, CancelOutcome::Requested(_)), "{out:?}");
    let s = running
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("ended");
    assert_eq!(s.status, SessionStatus::Cancelled);
    assert_eq!(s.metrics.processed_elements, 1);
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn close_removes_session_and_records() {
    let f = fixture(
        RecordsJob {
            n: 10,
            per_batch: 5,
        },
        |_| {},
    )
    .await;
    f.harvest.start();
    let h = f.harvest.submit(req()).await.expect("submit");
    h.await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    assert_eq!(
        f.harvest
            .records(h.id(), 0, 100)
            .await
            .expect("records")
            .len(),
        10
    );
    let removed = f.harvest.close(h.id()).await.expect("close");
    assert!(removed.is_some());
    assert!(f.harvest.get(h.id()).await.expect("get").is_none());
    assert!(
        f.harvest
            .records(h.id(), 0, 100)
            .await
            .expect("records")
            .is_empty()
    );
    assert!(
        f.harvest
            .close(h.id())
            .await
            .expect("close again")
            .is_none()
    );
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn retryable_failure_is_retried_then_completes() {
    let (s, runs) = run_flaky(2, Retry::Backoff, SessionOptions::default()).await;
    assert_eq!(s.status, SessionStatus::Completed, "{s:?}");
    assert_eq!(s.attempt, 3);
    assert_eq!(runs, 3);
}

#[tokio::test]
async fn attempts_exhausted_ends_failed_with_last_error() {
    let opts = SessionOptions {
        max_attempts: Some(2),
        ..SessionOptions::default()
    };
    let (s, runs) = run_flaky(100, Retry::Backoff, opts).await;
    assert_eq!(s.status, SessionStatus::Failed);
    assert_eq!(runs, 2);
    assert_eq!(
        s.error.as_ref().map(|e| e.message.as_str()),
        Some("failure 1")
    );

    // A permanent failure is not retried.
    let (s, runs) = run_flaky(100, Retry::Never, SessionOptions::default()).await;
    assert_eq!((s.status, runs), (SessionStatus::Failed, 1));
}

/// Runs one session of a [`Flaky`] job that fails `fail` times with `retry`; returns the ended
/// session and how many attempts ran.
async fn run_flaky(fail: u32, retry: Retry, options: SessionOptions) -> (harvest::Session, u32) {
    let runs = Arc::new(AtomicU32::new(0));
    let f = fixture(
        Flaky {
            fail,
            runs: runs.clone(),
            retry,
        },
        |_| {},
    )
    .await;
    f.harvest.start();
    let h = f
        .harvest
        .submit(req().options(options))
        .await
        .expect("submit");
    let s = h
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
    (s, runs.load(Ordering::SeqCst))
}

#[tokio::test]
async fn panicking_job_is_a_poison_input_that_ends_failed() {
    let f = fixture(Panics, |_| {}).await;
    f.harvest.start();
    let h = f.harvest.submit(req()).await.expect("submit");
    let s = h
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    assert_eq!(s.status, SessionStatus::Failed);
    assert_eq!(s.attempt, 3);
    assert_eq!(
        s.error.map(|e| e.kind.to_string()),
        Some("job_panicked".to_string())
    );
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn max_duration_ends_a_cooperative_session_failed() {
    let f = fixture(WaitForStop, |_| {}).await;
    f.harvest.start();
    let opts = SessionOptions {
        max_duration_secs: Some(1),
        ..SessionOptions::default()
    };
    let h = f.harvest.submit(req().options(opts)).await.expect("submit");
    let s = h
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    assert_eq!(s.status, SessionStatus::Failed);
    assert_eq!(
        s.error.as_ref().map(|e| e.kind.as_str()),
        Some("max_duration_exceeded")
    );
    // What the job handed back when it stopped is committed with the status.
    assert_eq!(s.metrics.processed_elements, 1);
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn max_duration_ends_a_session_that_never_stops() {
    let f = fixture(Stubborn, |_| {}).await;
    f.harvest.start();
    let opts = SessionOptions {
        max_duration_secs: Some(1),
        ..SessionOptions::default()
    };
    let h = f.harvest.submit(req().options(opts)).await.expect("submit");
    let s = h
        .await_completion(Duration::from_secs(30))
        .await
        .expect("await")
        .expect("done");
    assert_eq!(s.status, SessionStatus::Failed);
    assert_eq!(
        s.error.map(|e| e.kind.to_string()),
        Some("max_duration_exceeded".to_string())
    );
    f.harvest
        .shutdown(Duration::from_secs(1))
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn shutdown_hands_running_sessions_back_without_spending_an_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h1 = open_at(dir.path(), Arc::new(WaitForStop), |_| {}).await;
    h1.start();
    let id = h1.submit(req()).await.expect("submit").id().clone();
    wait_status(&h1, &id, SessionStatus::Running).await;
    h1.shutdown(Duration::from_millis(100))
        .await
        .expect("shutdown");
    drop(h1);

    let h2 = open_at(
        dir.path(),
        Arc::new(RecordsJob { n: 3, per_batch: 3 }),
        |_| {},
    )
    .await;
    let s = h2.get(&id).await.expect("get").expect("exists");
    assert_eq!(s.status, SessionStatus::Pending, "{s:?}");
    assert_eq!(s.failures, 0, "a graceful hand-back spends no attempt");
    // The record the job handed back on its way out was committed before the hand-back.
    assert_eq!(s.metrics.processed_elements, 1);
    h2.start();
    let done = h2
        .handle(id)
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    assert_eq!(done.status, SessionStatus::Completed);
    assert_eq!(done.metrics.processed_elements, 3);
    h2.shutdown(Duration::from_secs(1)).await.expect("shutdown");
}

#[tokio::test]
async fn sessions_left_running_by_a_dead_process_are_requeued_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id;
    {
        let h1 = open_at(dir.path(), Arc::new(WaitForStop), |c| {
            c.workers.concurrency = 0
        })
        .await;
        id = h1.submit(req()).await.expect("submit").id().clone();
        // A "process" claims it and dies without a word.
        let claimed = h1
            .store()
            .session_claim(SessionClaim {
                owner: "dead".into(),
                limit: 1,
                lease: Duration::from_secs(3600),
                now: harvest::session::Timestamp::now(),
            })
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        h1.store().close().await.expect("close store");
    }
    let h2 = open_at(
        dir.path(),
        Arc::new(RecordsJob { n: 2, per_batch: 2 }),
        |_| {},
    )
    .await;
    let s = h2.get(&id).await.expect("get").expect("exists");
    assert_eq!(
        s.status,
        SessionStatus::Pending,
        "recovered at open, not after the hour-long lease"
    );
    assert_eq!(
        s.failures, 1,
        "the dead attempt made no progress, so it counts"
    );
    h2.start();
    let done = h2
        .handle(id)
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("done");
    assert_eq!(done.status, SessionStatus::Completed);
    h2.shutdown(Duration::from_secs(1)).await.expect("shutdown");
}

#[tokio::test]
async fn list_is_newest_first_and_paginates() {
    let f = fixture(RecordsJob { n: 1, per_batch: 1 }, |c| {
        c.workers.concurrency = 0
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let client = harvest::ClientContext::of(if i % 2 == 0 { "even" } else { "odd" });
        ids.push(
            f.harvest
                .submit(req().client(client))
                .await
                .expect("submit")
                .id()
                .clone(),
        );
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = f
            .harvest
            .list(SessionList {
                limit: 3,
                cursor: cursor.clone(),
                ..SessionList::default()
            })
            .await
            .expect("list");
        seen.extend(page.sessions.into_iter().map(|s| s.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(seen.len() <= 7, "pagination does not end");
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let odd = f
        .harvest
        .list(SessionList {
            client_id: Some("odd".into()),
            limit: 10,
            ..SessionList::default()
        })
        .await
        .expect("list");
    assert_eq!(odd.sessions.len(), 3);
    assert!(odd.sessions.iter().all(|s| s.client.client_id() == "odd"));
    let err = f
        .harvest
        .list(SessionList {
            limit: 1001,
            ..SessionList::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, HarvestError::Invalid(_)));
}

#[tokio::test]
async fn stop_reason_first_wins() {
    let s = harvest::job::StopSignal::new();
    assert_eq!(s.reason(), None);
    s.stop(StopReason::Cancelled);
    s.stop(StopReason::Shutdown);
    assert_eq!(s.reason(), Some(StopReason::Cancelled));
    assert!(s.is_stopped());
}

/// Counts the configs it checks; refuses one with `bad` (as [`RecordsJob`] does).
struct CountsChecks(Arc<AtomicU32>);

#[async_trait]
impl Job for CountsChecks {
    fn validate(
        &self,
        c: &serde_json::Value,
        params: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        self.0.fetch_add(1, Ordering::SeqCst);
        RecordsJob { n: 0, per_batch: 1 }.validate(c, params)
    }
    async fn run(&self, _ctx: JobContext) -> JobOutcome {
        JobOutcome::Completed(CheckpointBatch::default())
    }
}

/// How many sessions the service has stored (up to a first page of 50).
async fn stored(h: &Harvest) -> usize {
    h.list(SessionList::default())
        .await
        .expect("list")
        .sessions
        .len()
}

/// A batch checks each config (with its params, per client) once, as single submissions do:
/// repeats within the batch and configs that passed before are not checked again; a refused
/// one is checked, and refused, every time; and the batch's passes spare later single
/// submissions their check.
#[tokio::test]
async fn a_batch_checks_each_passing_config_once_and_shares_passes_with_single_submissions() {
    let checks = Arc::new(AtomicU32::new(0));
    let f = fixture(CountsChecks(checks.clone()), |c| c.workers.concurrency = 0).await;
    let h = &f.harvest;
    let count = || checks.load(Ordering::SeqCst);
    h.submit(SubmitRequest::new(json!({"name": "before"})))
        .await
        .expect("submit");
    assert_eq!(count(), 1);
    let other = harvest::ClientContext::of("other");
    let batch = vec![
        SubmitRequest::new(json!({"name": "a"})),
        SubmitRequest::new(json!({"name": "a"})),
        SubmitRequest::new(json!({"name": "a"})).param("page", "2"),
        SubmitRequest::new(json!({"name": "a"})).param("page", "2"),
        SubmitRequest::new(json!({"name": "a"})).client(other.clone()),
        SubmitRequest::new(json!({"name": "a", "bad": 1})),
        SubmitRequest::new(json!({"name": "a", "bad": 1})),
        SubmitRequest::new(json!({"name": "before"})),
        SubmitRequest::new(json!({"name": "a"})),
    ];
    let results = h.submit_many(batch).await.expect("submit_many");
    let refused: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(refused, vec![5, 6], "{results:?}");
    for i in [5, 6] {
        assert!(
            matches!(results[i], Err(HarvestError::InvalidConfig(_))),
            "{:?}",
            results[i]
        );
    }
    // a, a with page 2, the other client's a, and the refused config twice.
    assert_eq!(
        count(),
        1 + 5,
        "one check per passing config, refusals every time"
    );
    h.submit(SubmitRequest::new(json!({"name": "a"})).param("page", "2"))
        .await
        .expect("submit after the batch");
    h.submit(SubmitRequest::new(json!({"name": "a"})).client(other))
        .await
        .expect("submit after the batch as the other client");
    assert_eq!(
        count(),
        6,
        "the batch's passes spare single submissions their check"
    );
    let again = h
        .submit_many(vec![SubmitRequest::new(json!({"name": "a", "bad": 1}))])
        .await
        .expect("submit_many");
    assert!(matches!(again[0], Err(HarvestError::InvalidConfig(_))));
    assert_eq!(
        count(),
        7,
        "a refused config is checked again in a later batch"
    );
    assert_eq!(
        stored(h).await,
        1 + 7 + 2,
        "every accepted submission stored"
    );
}

/// A client's config (with its params) that passed its check is not checked again; another
/// client's is; a refused one is checked, and refused, every time, and so is one too large to
/// remember.
#[tokio::test]
async fn a_config_that_passed_its_check_is_not_checked_again() {
    let checks = Arc::new(AtomicU32::new(0));
    let f = fixture(CountsChecks(checks.clone()), |c| c.workers.concurrency = 0).await;
    let h = &f.harvest;
    let count = || checks.load(Ordering::SeqCst);
    for _ in 0..3 {
        h.submit(SubmitRequest::new(json!({"name": "a"})))
            .await
            .expect("submit");
    }
    assert_eq!(count(), 1, "the same config three times: one check");
    h.submit(SubmitRequest::new(json!({"name": "a"})).param("page", "2"))
        .await
        .expect("submit with a param");
    assert_eq!(count(), 2, "other params: another check");
    h.submit(SubmitRequest::new(json!({"name": "a"})).client(harvest::ClientContext::of("other")))
        .await
        .expect("submit as another client");
    assert_eq!(count(), 3, "passes are remembered per client");
    for _ in 0..2 {
        let refused = h
            .submit(SubmitRequest::new(json!({"name": "a", "bad": 1})))
            .await;
        assert!(
            matches!(refused, Err(HarvestError::InvalidConfig(_))),
            "{refused:?}"
        );
    }
    assert_eq!(count(), 5, "a refused config is checked every time");
    let big = json!({"name": "x".repeat(harvest::service::validation::PASS_MAX_BYTES)});
    for _ in 0..2 {
        h.submit(SubmitRequest::new(big.clone()))
            .await
            .expect("submit a large config");
    }
    assert_eq!(
        count(),
        7,
        "a config too large to remember is checked every time"
    );
    assert_eq!(stored(h).await, 7, "every accepted submission stored");
}
