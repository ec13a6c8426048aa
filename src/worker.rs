//! Workers: claim sessions under leases, run their job, commit what it hands back.
//!
//! One claimer task per process owns the claim loop. It never claims more sessions than it has
//! free slots (a [`Semaphore`] of `workers.concurrency` permits, each held for the life of one
//! attempt), and sleeps on [`Store::pending_wait`] (a submission wakes it; a slow poll is only a
//! safety net). Each attempt runs in its own task with a heartbeat that renews the lease and
//! relays a client's cancel; every write it makes is a compare-and-set on (status, attempt,
//! owner), so a worker whose lease was reclaimed learns it from a `false` and stops.
//!
//! The worker is the only writer of a running session: the job (the engine) never touches the
//! store; it hands checkpoints to the [`CheckpointSink`] the worker gives it and reads the
//! committed frontier and seen set through the read-only [`StoreCrawlState`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{SessionsConfig, WorkersConfig};
use crate::event::{EventBus, EventKind};
use crate::job::{
    CheckpointSink, CrawlState, CrawlStateError, Job, JobContext, JobOutcome, LeaseLost, Retry,
    StopReason, StopSignal,
};
use crate::session::{Session, SessionError, SessionId, SessionStatus, Timestamp};
use crate::sink::{ExportSpec, Sinks};
use crate::store::{
    AttemptRef, CheckpointBatch, CheckpointCommit, FrontierItem, FrontierPage, HeartbeatOutcome,
    RequeueOutcome, SeenFilter, SessionClaim, SessionFinish, SessionHeartbeat, SessionRequeue,
    Store,
};

/// What a worker pool needs.
#[derive(Clone)]
pub struct WorkerSettings {
    /// Where sessions live.
    pub store: Arc<dyn Store>,
    /// What sessions run.
    pub job: Arc<dyn Job>,
    /// Where to publish events.
    pub events: EventBus,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// `[workers]`.
    pub workers: WorkersConfig,
    /// `[sessions]`.
    pub sessions: SessionsConfig,
    /// Export sinks (run after checkpoints and before COMPLETED; see [`crate::sink`]).
    pub sinks: Arc<Sinks>,
}

/// The running workers of this process.
pub struct WorkerPool {
    stop_claiming: watch::Sender<bool>,
    claimer: tokio::task::JoinHandle<()>,
    running: Arc<Running>,
}

/// Attempts in flight, so shutdown can stop them.
#[derive(Default)]
struct Running {
    signals: std::sync::Mutex<Vec<(u64, StopSignal)>>,
    next: std::sync::atomic::AtomicU64,
    stopped: AtomicBool,
}

impl Running {
    fn add(&self, s: StopSignal) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, s));
        id
    }
    fn remove(&self, id: u64) {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| *i != id);
    }
    fn stop_all(&self, reason: StopReason) {
        for (_, s) in self
            .signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s.stop(reason);
        }
    }
}

/// An attempt's entry in [`Running`], removed when dropped.
struct Registered {
    running: Arc<Running>,
    id: u64,
}

impl Registered {
    fn new(running: Arc<Running>, signal: StopSignal) -> Registered {
        let id = running.add(signal);
        Registered { running, id }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.running.remove(self.id);
    }
}

/// Aborts a task when dropped: the job of an attempt must not outlive the attempt, even when
/// the attempt's own code panics.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A lease (and leadership) owner id unique to this process start: host, pid and a random
/// suffix.
pub fn process_owner() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &uuid[uuid.len() - 8..])
}

impl WorkerPool {
    /// Starts the claimer; sessions run as they are claimed.
    pub fn start(settings: WorkerSettings) -> WorkerPool {
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = Arc::new(Running::default());
        let claimer = tokio::spawn(claim_loop(Arc::new(settings), stop_rx, running.clone()));
        WorkerPool {
            stop_claiming: stop_tx,
            claimer,
            running,
        }
    }

    /// Whether shutdown has begun.
    pub fn is_stopped(&self) -> bool {
        self.running.stopped.load(Ordering::Acquire)
    }

    /// Stops claiming, waits up to `grace` for attempts to finish, then asks the rest to hand
    /// their sessions back (PENDING, no attempt spent) and waits for that.
    pub async fn shutdown(self, grace: Duration) {
        self.running.stopped.store(true, Ordering::Release);
        let _ = self.stop_claiming.send(true);
        let running = self.running.clone();
        let mut claimer = self.claimer;
        if tokio::time::timeout(grace, &mut claimer).await.is_err() {
            tracing::info!("shutdown grace period over; handing running sessions back");
            running.stop_all(StopReason::Shutdown);
            // A job that ignores its stop signal is aborted by its attempt's own watchdog
            // (STOP_GRACE), so this wait is bounded.
            let _ = claimer.await;
        }
    }
}

/// How long a job may take to notice its stop signal before its task is aborted.
const STOP_GRACE: Duration = Duration::from_secs(10);

async fn claim_loop(
    s: Arc<WorkerSettings>,
    mut stop: watch::Receiver<bool>,
    running: Arc<Running>,
) {
    let process = process_owner();
    let mut claims = 0u64;
    let slots = Arc::new(Semaphore::new(s.workers.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let poll = Duration::from_millis(s.workers.poll_interval_ms.max(10));
    loop {
        if *stop.borrow() {
            break;
        }
        // Wait for at least one free slot, then claim as many as are free, never more.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let free = 1 + slots.available_permits();
        let started = tokio::time::Instant::now();
        // A lease owner unique to this claim call, not just to the process: a session closed
        // while RUNNING and submitted again under the same id starts over at attempt 1, and
        // its old attempt (still running here until it notices) must not match the new
        // lease's (attempt, owner).
        claims += 1;
        let owner = format!("{process}/{claims}");
        let claimed = s
            .store
            .session_claim(SessionClaim {
                owner: owner.clone(),
                limit: free,
                lease: s.workers.lease(),
                now: s.clock.now(),
            })
            .await;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "claiming sessions failed; retrying");
                drop(first);
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        if claimed.is_empty() {
            drop(first);
            tokio::select! {
                _ = s.store.pending_wait(poll) => {}
                _ = stop.changed() => break,
            }
            // Reap finished attempts so the set does not grow.
            while tasks.try_join_next().is_some() {}
            continue;
        }
        crate::metrics::claim_latency(started.elapsed(), claimed.len());
        let mut first = Some(first);
        for session in claimed {
            let permit = match first.take() {
                Some(p) => p,
                // `free` permits were available a moment ago and only this loop takes them.
                None => match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => match slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                },
            };
            let s2 = s.clone();
            let owner = owner.clone();
            let running = running.clone();
            // Every log line of the attempt, the engine's included, carries the session id.
            let span =
                tracing::info_span!("session", session = %session.id, attempt = session.attempt);
            tasks.spawn(
                async move {
                    let signal = StopSignal::new();
                    // Unregisters even if the attempt panics.
                    let registered = Registered::new(running, signal.clone());
                    run_attempt(&s2, session, owner, signal).await;
                    drop(registered);
                    drop(permit);
                }
                .instrument(span),
            );
        }
        while tasks.try_join_next().is_some() {}
    }
    // Stop claiming; wait for attempts in flight (shutdown bounds this with its grace period).
    while tasks.join_next().await.is_some() {}
}

/// A session's committed frontier and seen set, read from the store: the [`CrawlState`] the
/// worker (and `harvest run --resume`) hands a job. Read-only by construction.
pub struct StoreCrawlState {
    store: Arc<dyn Store>,
    id: SessionId,
}

impl StoreCrawlState {
    /// The state of session `id` in `store`.
    pub fn new(store: Arc<dyn Store>, id: SessionId) -> StoreCrawlState {
        StoreCrawlState { store, id }
    }
}

#[async_trait]
impl CrawlState for StoreCrawlState {
    async fn frontier_page(
        &self,
        after_pos: u64,
        limit: usize,
    ) -> Result<Vec<FrontierItem>, CrawlStateError> {
        self.store
            .frontier_page(FrontierPage {
                id: self.id.clone(),
                after_pos,
                limit,
            })
            .await
            .map_err(|e| CrawlStateError(e.to_string()))
    }

    async fn seen_filter(&self, urls: Vec<String>) -> Result<Vec<bool>, CrawlStateError> {
        self.store
            .seen_filter(SeenFilter {
                id: self.id.clone(),
                urls,
            })
            .await
            .map_err(|e| CrawlStateError(e.to_string()))
    }
}

/// Commits checkpoints of one attempt under its lease.
struct LeaseSink {
    store: Arc<dyn Store>,
    attempt: AttemptRef,
    lease: Duration,
    clock: Arc<dyn Clock>,
    stop: StopSignal,
    events: EventBus,
    /// The session's table sink, copied after each committed checkpoint.
    table_sink: Option<(Arc<Sinks>, ExportSpec, Session)>,
}

#[async_trait]
impl CheckpointSink for LeaseSink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), LeaseLost> {
        if batch.is_empty() {
            return Ok(());
        }
        let records = batch.records.len() as u64;
        let pages = batch.pages;
        let usage = batch.usage;
        let res = self
            .store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: self.attempt.clone(),
                batch,
                lease: self.lease,
                now: self.clock.now(),
            })
            .await;
        match res {
            Ok(true) => {
                crate::metrics::progress(records, pages, &usage);
                if let Some((sinks, spec, session)) = &self.table_sink
                    && let Err(e) = sinks.export_rows(&*self.store, session, spec).await
                {
                    // The next checkpoint, or the export before COMPLETED, catches up.
                    tracing::warn!(session = %self.attempt.id, error = %e, "exporting rows after a checkpoint failed; will retry");
                }
                if self.events.has_subscribers()
                    && let Ok(Some(s)) = self.store.session_get(&self.attempt.id).await
                {
                    self.events.publish(EventKind::Progress, &s);
                }
                Ok(())
            }
            Ok(false) => {
                self.stop.stop(StopReason::LeaseLost);
                Err(LeaseLost)
            }
            Err(e) => {
                // The write may or may not have happened; the only safe course is to stop and let
                // the lease expire, so the next attempt resumes from the last known checkpoint.
                tracing::error!(session = %self.attempt.id, error = %e, "checkpoint commit failed; abandoning the attempt");
                self.stop.stop(StopReason::LeaseLost);
                Err(LeaseLost)
            }
        }
    }
}

fn backoff(s: &WorkerSettings, failures: u32) -> Duration {
    let base = s.workers.retry_backoff_ms.max(1) as f64;
    let max = (s.workers.retry_backoff_max_secs.max(1) * 1000) as f64;
    let exp = base * 2f64.powi(failures.min(30) as i32);
    // Full jitter in [50%, 100%] keeps retries of many sessions from arriving together.
    let jitter = 0.5 + rand::random::<f64>() * 0.5;
    Duration::from_millis((exp.min(max) * jitter) as u64)
}

/// Runs one claimed attempt to its end and records the outcome.
async fn run_attempt(s: &Arc<WorkerSettings>, session: Session, owner: String, stop: StopSignal) {
    let attempt = AttemptRef {
        id: session.id.clone(),
        attempt: session.attempt,
        owner,
    };
    let span = tracing::Span::current();
    s.events.publish_started(&session).await;
    tracing::debug!(parent: &span, "attempt started");

    // Frontier, seen set and records are only ever written by checkpoints: a session that has
    // committed none has nothing to resume, and skipping the read saves three queries per
    // session on PostgreSQL (measured with bench queue).
    let resume = if session.checkpoints == 0 {
        Ok(crate::store::ResumeState {
            metrics: session.metrics.clone(),
            usage: session.usage,
            ..Default::default()
        })
    } else {
        s.store.resume_load(&session.id).await
    };
    let resume = match resume {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(parent: &span, error = %e, "cannot load resume state; handing the session back");
            requeue(
                s,
                &attempt,
                &session,
                false,
                Some(SessionError::new("store_error", e.to_string())),
            )
            .await;
            return;
        }
    };

    let export = match ExportSpec::of(&session.job.config) {
        Ok(spec) => spec,
        Err(e) => {
            // Validated at submission; only a config stored by another version gets here.
            tracing::error!(parent: &span, error = %e, "the session's [export] is not valid; failing it");
            let now = s.clock.now();
            let cleanup_at = now
                .add(session.cleanup_after(Duration::from_secs(s.sessions.default_timeout_secs)));
            finish_session(
                s,
                SessionFinish {
                    attempt: attempt.clone(),
                    status: SessionStatus::Failed,
                    error: Some(SessionError::new("invalid_config", e)),
                    batch: CheckpointBatch::default(),
                    cleanup_at,
                    now,
                },
            )
            .await;
            return;
        }
    };
    let sink = Arc::new(LeaseSink {
        store: s.store.clone(),
        attempt: attempt.clone(),
        lease: s.workers.lease(),
        clock: s.clock.clone(),
        stop: stop.clone(),
        events: s.events.clone(),
        table_sink: export
            .postgres_table
            .is_some()
            .then(|| (s.sinks.clone(), export.clone(), session.clone())),
    });
    let ctx = JobContext {
        session: session.clone(),
        resume,
        state: Arc::new(StoreCrawlState::new(s.store.clone(), session.id.clone())),
        sink,
        stop: stop.clone(),
    };
    let job = s.job.clone();
    let mut job_task = tokio::spawn(async move { job.run(ctx).await }.instrument(span.clone()));
    let _abort_job = AbortOnDrop(job_task.abort_handle());

    let lease = s.workers.lease();
    let beat_every = (lease / 3).max(Duration::from_millis(200));
    // Bounded at submission; the clamp keeps a stored value from an older build from
    // overflowing `Instant` arithmetic below.
    let max_duration = session
        .options
        .max_duration_secs
        .map(|d| Duration::from_secs(d.min(crate::service::MAX_DURATION_SECS)));
    let started = tokio::time::Instant::now();
    let mut beat = tokio::time::interval_at(started + beat_every, beat_every);
    let mut stop_deadline: Option<tokio::time::Instant> = None;

    let outcome: Option<JobOutcome> = loop {
        let max_sleep = match (max_duration, stop_deadline) {
            (_, Some(d)) => d,
            (Some(m), None) => started + m,
            (None, None) => started + Duration::from_secs(365 * 86400),
        };
        tokio::select! {
            res = &mut job_task => {
                break match res {
                    Ok(o) => Some(o),
                    Err(e) if e.is_panic() => {
                        tracing::error!(parent: &span, "the job panicked");
                        Some(JobOutcome::Failed {
                            error: SessionError::new("job_panicked", "the job panicked; see the service log"),
                            retry: Retry::Backoff,
                            batch: CheckpointBatch::default(),
                        })
                    }
                    Err(_) => None,
                };
            }
            _ = beat.tick() => {
                let hb = s.store.session_heartbeat_if_running(SessionHeartbeat {
                    attempt: attempt.clone(), lease, now: s.clock.now(),
                }).await;
                match hb {
                    Ok(HeartbeatOutcome::Renewed { cancel_requested: true }) => stop.stop(StopReason::Cancelled),
                    Ok(HeartbeatOutcome::Renewed { .. }) => {}
                    Ok(HeartbeatOutcome::Lost) => stop.stop(StopReason::LeaseLost),
                    Err(e) => tracing::warn!(parent: &span, error = %e, "heartbeat failed; will retry"),
                }
                if stop.is_stopped() && stop_deadline.is_none() {
                    stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                }
            }
            _ = stop.stopped(), if stop_deadline.is_none() => {
                stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = tokio::time::sleep_until(max_sleep) => {
                if stop_deadline.is_some() {
                    // The job ignored its stop signal for STOP_GRACE: abort it.
                    tracing::warn!(parent: &span, "the job did not stop within {STOP_GRACE:?}; aborting it");
                    job_task.abort();
                    break Some(JobOutcome::Stopped(CheckpointBatch::default()));
                }
                stop.stop(StopReason::MaxDuration);
                stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
        }
    };
    let Some(outcome) = outcome else { return };

    let now = s.clock.now();
    let cleanup_at =
        now.add(session.cleanup_after(Duration::from_secs(s.sessions.default_timeout_secs)));
    let finish = |status: SessionStatus, error: Option<SessionError>, batch: CheckpointBatch| {
        SessionFinish {
            attempt: attempt.clone(),
            status,
            error,
            batch,
            cleanup_at,
            now,
        }
    };
    match outcome {
        JobOutcome::Completed(batch) if !export.is_empty() => {
            // Last checkpoint, then the sinks, then COMPLETED: a crash anywhere in between leaves
            // the session RUNNING; its next attempt has nothing left to crawl and runs the
            // (idempotent) sinks again, so a COMPLETED session has every sink written once.
            if !commit_batch(s, &attempt, batch).await {
                return;
            }
            if let Err(e) = s.sinks.export_all(&*s.store, &session, &export).await {
                tracing::warn!(parent: &span, error = %e, "export failed; retrying the session");
                let error = SessionError::new("export_failed", e.to_string());
                requeue_with(s, &attempt, &session, true, Some(error), Retry::Backoff).await;
                return;
            }
            finish_session(
                s,
                finish(SessionStatus::Completed, None, CheckpointBatch::default()),
            )
            .await;
        }
        JobOutcome::Completed(batch) => {
            finish_session(s, finish(SessionStatus::Completed, None, batch)).await;
        }
        JobOutcome::Stopped(batch) => match stop.reason() {
            Some(StopReason::Cancelled) => {
                finish_session(s, finish(SessionStatus::Cancelled, None, batch)).await
            }
            Some(StopReason::MaxDuration) => {
                let secs = max_duration.map(|d| d.as_secs()).unwrap_or(0);
                let err = SessionError::new(
                    "max_duration_exceeded",
                    format!("the attempt ran longer than max_duration_secs = {secs}"),
                );
                finish_session(s, finish(SessionStatus::Failed, Some(err), batch)).await
            }
            Some(StopReason::Shutdown) => {
                if commit_batch(s, &attempt, batch).await {
                    requeue(s, &attempt, &session, false, None).await;
                }
            }
            Some(StopReason::LeaseLost) => {
                tracing::info!(parent: &span, "lease lost; another attempt owns the session");
            }
            None => {
                // A job returned Stopped without being asked: treat as done with what it has.
                finish_session(s, finish(SessionStatus::Completed, None, batch)).await
            }
        },
        JobOutcome::Failed {
            error,
            retry,
            batch,
        } => {
            if !commit_batch(s, &attempt, batch).await {
                return;
            }
            match retry {
                Retry::Never => {
                    finish_session(
                        s,
                        finish(
                            SessionStatus::Failed,
                            Some(error),
                            CheckpointBatch::default(),
                        ),
                    )
                    .await
                }
                Retry::Backoff | Retry::After(_) => {
                    requeue_with(s, &attempt, &session, true, Some(error), retry).await
                }
            }
        }
    }
}

async fn commit_batch(s: &WorkerSettings, attempt: &AttemptRef, batch: CheckpointBatch) -> bool {
    if batch.is_empty() {
        return true;
    }
    let counts = crate::metrics::BatchCounts::of(&batch);
    let res = s
        .store
        .checkpoint_commit_if_running(CheckpointCommit {
            attempt: attempt.clone(),
            batch,
            lease: s.workers.lease(),
            now: s.clock.now(),
        })
        .await;
    match res {
        Ok(applied) => {
            if applied {
                counts.record();
            }
            applied
        }
        Err(e) => {
            tracing::error!(session = %attempt.id, error = %e, "final checkpoint failed");
            false
        }
    }
}

async fn finish_session(s: &WorkerSettings, p: SessionFinish) {
    let id = p.attempt.id.clone();
    let status = p.status;
    let counts = crate::metrics::BatchCounts::of(&p.batch);
    match s.store.session_finish_if_running(p).await {
        Ok(true) => {
            counts.record();
            if let Ok(Some(session)) = s.store.session_get(&id).await {
                crate::metrics::session_finished(&session);
                s.events.publish(EventKind::for_status(status), &session);
            }
        }
        Ok(false) => tracing::info!(session = %id, "finish not applied: the lease was lost"),
        Err(e) => tracing::error!(session = %id, error = %e, "finishing the session failed"),
    }
}

async fn requeue(
    s: &WorkerSettings,
    attempt: &AttemptRef,
    session: &Session,
    spend: bool,
    error: Option<SessionError>,
) {
    requeue_with(s, attempt, session, spend, error, Retry::Backoff).await
}

async fn requeue_with(
    s: &WorkerSettings,
    attempt: &AttemptRef,
    session: &Session,
    spend: bool,
    error: Option<SessionError>,
    retry: Retry,
) {
    let now = s.clock.now();
    let delay = match retry {
        _ if !spend => Duration::ZERO,
        Retry::After(d) => d,
        _ => backoff(s, session.failures),
    };
    let cleanup_at =
        now.add(session.cleanup_after(Duration::from_secs(s.sessions.default_timeout_secs)));
    let res = s
        .store
        .session_requeue_if_running(SessionRequeue {
            attempt: attempt.clone(),
            spend_attempt: spend,
            run_at: Timestamp(now.millis().saturating_add(delay.as_millis() as i64)),
            error,
            cleanup_at,
            now,
        })
        .await;
    let kind = match res {
        Ok(RequeueOutcome::Requeued) => EventKind::Requeued,
        Ok(RequeueOutcome::Failed) => EventKind::Failed,
        Ok(RequeueOutcome::Cancelled) => EventKind::Cancelled,
        Ok(RequeueOutcome::NotApplied) => return,
        Err(e) => {
            tracing::error!(session = %attempt.id, error = %e, "requeue failed; the lease will expire");
            return;
        }
    };
    if let Ok(Some(session)) = s.store.session_get(&attempt.id).await {
        if matches!(kind, EventKind::Failed | EventKind::Cancelled) {
            crate::metrics::session_finished(&session);
        }
        s.events.publish(kind, &session);
    }
}
