//! One attempt of one claimed session: run its job, keep its lease, commit what it hands back,
//! and end it (finish, or hand it back) with one compare-and-set on (status, attempt, owner).
//!
//! The job never touches the store: it commits through this attempt's [`LeaseSink`] and reads
//! the committed frontier and seen set through [`StoreCrawlState`]. Every write here names the
//! attempt, so a worker whose lease was reclaimed learns it from a refused write and stops.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;

use super::finisher::Finisher;
use super::worker::{Registered, Slot, WorkerSettings};
use crate::job::{
    CheckpointSink, CommitError, CrawlState, CrawlStateError, JobContext, JobOutcome, Retry,
    StopReason, StopSignal,
};
use crate::metrics::BatchCounts;
use crate::session::{ErrorKind, Session, SessionError, SessionKey, SessionStatus, Timestamp};
use crate::sink::ExportSpec;
use crate::store::{
    AttemptRef, CheckpointBatch, CheckpointCommit, FrontierItem, FrontierPage, HeartbeatOutcome,
    ResumeState, SeenFilter, SessionFinish, SessionHeartbeat, SessionRequeue, Store,
};

/// How long a job may take to notice its stop signal before its task is aborted.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// First and largest pause between tries of a write the store did not answer.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How long, at most, a hand-back waits for a store that does not answer (after that the
/// lease has long expired and maintenance takes the session back).
const HAND_BACK_MAX: Duration = Duration::from_secs(600);

/// The next pause of a backoff that starts at [`RETRY_MIN`] and doubles up to [`RETRY_MAX`].
fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(RETRY_MAX)
}

/// A session's committed frontier and seen set, read from the store: the [`CrawlState`] an
/// attempt hands its job. Read-only by construction.
pub struct StoreCrawlState {
    store: Arc<dyn Store>,
    id: SessionKey,
}

impl StoreCrawlState {
    /// The state of session `id` in `store`.
    pub fn new(store: Arc<dyn Store>, id: SessionKey) -> StoreCrawlState {
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
            .map_err(CrawlStateError::from)
    }

    async fn seen_filter(&self, urls: Vec<String>) -> Result<Vec<bool>, CrawlStateError> {
        self.store
            .seen_filter(SeenFilter {
                id: self.id.clone(),
                urls,
            })
            .await
            .map_err(CrawlStateError::from)
    }
}

/// One claimed attempt and what it needs to end itself.
pub(crate) struct Attempt {
    s: Arc<WorkerSettings>,
    /// Ends the session together with other attempts' finishes.
    finisher: Finisher,
    session: Session,
    aref: AttemptRef,
    stop: StopSignal,
    /// The session's checkpoint count after this attempt's last commit known to have applied
    /// (tells whether a commit whose answer was lost applied).
    checkpoints: std::sync::atomic::AtomicU64,
    /// The attempt stopped because the store did not answer a write for too long: hand the
    /// session back as soon as it answers.
    store_gave_up: std::sync::atomic::AtomicBool,
    /// Its hold on the worker's capacity, traded for a finishing permit at its last write.
    slot: std::sync::Mutex<Slot>,
}

/// Releases an attempt's slot when dropped.
struct ReleaseSlot(Arc<Attempt>);

impl Drop for ReleaseSlot {
    fn drop(&mut self) {
        self.0.slot().release();
    }
}

/// Commits checkpoints of one attempt under its lease.
struct LeaseSink {
    attempt: Arc<Attempt>,
    /// The session's table sink, copied after each committed checkpoint.
    table_sink: Option<ExportSpec>,
}

#[async_trait]
impl CheckpointSink for LeaseSink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), CommitError> {
        if batch.is_empty() {
            return Ok(());
        }
        let a = &self.attempt;
        a.commit(batch).await?;
        if let Some(spec) = &self.table_sink {
            let sinks = a.s.effects.sinks();
            match sinks
                .export_rows_marked(&*a.s.store, &a.session, spec)
                .await
            {
                // The table is the only sink: what it has is exported for good, and with
                // remove_after_export the internal copy goes now, a checkpoint at a time.
                Ok(done)
                    if done.upto > 0
                        && a.session.options.remove_after_export
                        && spec.table_only() =>
                {
                    a.remove_records(Some(done.upto)).await;
                }
                Ok(_) => {}
                // The next checkpoint, or the export before COMPLETED, catches up.
                Err(e) => {
                    tracing::warn!(session = %a.aref.id, error = %e, "exporting rows after a checkpoint failed; will retry")
                }
            }
        }
        Ok(())
    }
}

impl Attempt {
    /// Runs one claimed attempt to its end and records the outcome. `stop` is its signal,
    /// registered (`registered`) since the claim, so a cancel that came while the session
    /// waited in the claimer's buffer stops it at once.
    pub(crate) async fn run(
        s: Arc<WorkerSettings>,
        finisher: Finisher,
        session: Session,
        owner: String,
        stop: StopSignal,
        registered: Registered,
        slot: Slot,
    ) {
        let attempt = Arc::new(Attempt {
            finisher,
            aref: AttemptRef {
                id: session.key(),
                attempt: session.attempt,
                owner,
            },
            s,
            checkpoints: session.checkpoints.into(),
            store_gave_up: false.into(),
            session,
            stop,
            slot: slot.into(),
        });
        // Released when this ends, even by a panic, not with the attempt: a job may keep a
        // clone of its sink (and so of the attempt).
        let _release = ReleaseSlot(attempt.clone());
        attempt.s.effects.started(&attempt.session).await;
        tracing::debug!("attempt started");
        attempt.run_job().await;
        drop(registered);
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        // Two permits and no invariant between them: a panic elsewhere leaves it usable.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `batch` under the lease (with its effects). A refused or failed commit stops the
    /// attempt. A store that does not answer is retried with backoff for up to half a lease
    /// (the lease was renewed at most a third of a lease ago, so it still holds): before each
    /// retry the session is read, and a commit that applied though its answer was lost is
    /// taken as done (its checkpoint count moved on), so a batch is never written twice.
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), CommitError> {
        use std::sync::atomic::Ordering;
        let counts = BatchCounts::of(&batch);
        let kept = self.s.effects.observes_commits().then(|| batch.clone());
        // A store shared over the network (not one process's own files) can be away for a
        // moment: only then is a copy of the batch kept for retries.
        let retryable = !self.s.store.exclusive();
        let mut batch = batch;
        let lease = self.s.workers.lease();
        let give_up_at = tokio::time::Instant::now() + lease / 2;
        let mut pause = RETRY_MIN;
        let mut tried = false;
        let res = loop {
            if tried {
                match self.s.store.session_get(&self.aref.id).await {
                    Ok(Some(now)) if self.holds(&now) => {
                        if now.checkpoints > self.checkpoints.load(Ordering::SeqCst) {
                            // The lost answer was a success.
                            break Ok(Some(now));
                        }
                    }
                    // Closed, ended or taken over meanwhile: the commit is refused either way.
                    Ok(_) => break Ok(None),
                    Err(e) if e.is_unavailable() => {
                        crate::store::outage::unavailable("checkpoint", &e);
                        if !self.wait_retry(&mut pause, give_up_at).await {
                            break Err(e);
                        }
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            tried = true;
            let res = self
                .s
                .store
                .checkpoint_commit_if_running(CheckpointCommit {
                    attempt: self.aref.clone(),
                    batch: if retryable {
                        batch.clone()
                    } else {
                        std::mem::take(&mut batch)
                    },
                    lease,
                    now: self.s.clock.now(),
                })
                .await;
            match res {
                Err(e) if e.is_unavailable() && retryable => {
                    crate::store::outage::unavailable("checkpoint", &e);
                    if !self.wait_retry(&mut pause, give_up_at).await {
                        break Err(e);
                    }
                }
                other => break other,
            }
        };
        match res {
            Ok(Some(after)) => {
                crate::store::outage::answered("checkpoint");
                self.checkpoints.store(after.checkpoints, Ordering::SeqCst);
                if let Err(e) = self.s.effects.checkpointed(&after, counts, kept.as_ref()) {
                    tracing::error!(session = %self.aref.id, error = %e, "a committed checkpoint could not be followed up; abandoning the attempt");
                    self.stop.stop(StopReason::Abandoned);
                    return Err(CommitError::Abandoned(e));
                }
                Ok(())
            }
            Ok(None) => {
                self.stop.stop(StopReason::LeaseLost);
                Err(CommitError::LeaseLost)
            }
            Err(e) if e.is_unavailable() && retryable => {
                // The lease is about to run out: stop, and hand the session back (not spending
                // an attempt) as soon as the store answers, instead of leaving it RUNNING until
                // its lease expires.
                tracing::warn!(session = %self.aref.id, error = %e, "attempt stopped: the store did not answer a checkpoint within half a lease; the session is handed back when it answers");
                self.store_gave_up.store(true, Ordering::SeqCst);
                self.stop.stop(StopReason::Abandoned);
                Err(CommitError::Abandoned(
                    "the session store did not answer".to_string(),
                ))
            }
            Err(e) => {
                // Not an outage (a refused or corrupt write): stop, write nothing more, and let
                // the lease expire, so the next attempt resumes from the last known checkpoint.
                tracing::error!(session = %self.aref.id, error = %e, "checkpoint commit failed; abandoning the attempt");
                self.stop.stop(StopReason::Abandoned);
                Err(CommitError::Abandoned(e.to_string()))
            }
        }
    }

    /// Whether `s` is still this attempt's: RUNNING with its attempt and lease owner.
    fn holds(&self, s: &Session) -> bool {
        s.status == SessionStatus::Running
            && s.attempt == self.aref.attempt
            && s.lease.as_ref().is_some_and(|l| l.owner == self.aref.owner)
    }

    /// Sleeps the next backoff pause; `false` (without sleeping) when it would end after
    /// `until`.
    async fn wait_retry(&self, pause: &mut Duration, until: tokio::time::Instant) -> bool {
        if tokio::time::Instant::now() + *pause > until {
            return false;
        }
        tokio::time::sleep(*pause).await;
        *pause = next_pause(*pause);
        true
    }

    /// Hands the session back to PENDING without spending an attempt once the store answers
    /// again: an attempt stopped by an outage must not leave it RUNNING until its lease expires.
    async fn hand_back_when_answering(&self) {
        self.requeue(false, None, Retry::Backoff).await;
    }

    /// Logs why the lease is gone: the session was closed (deleted, or ended by a cancel), or
    /// another attempt took it over.
    async fn say_why_lost(&self) {
        match self.s.store.session_get(&self.aref.id).await {
            Ok(None) => tracing::info!("attempt stopped: session closed (it was deleted)"),
            Ok(Some(s)) if s.status.is_terminal() && s.attempt == self.session.attempt => {
                tracing::info!(status = %s.status, "attempt stopped: session closed")
            }
            Ok(Some(s)) if s.status.is_terminal() => tracing::info!(
                status = %s.status,
                attempt = s.attempt,
                "attempt stopped: a later attempt ended the session"
            ),
            Ok(Some(s))
                if s.status == SessionStatus::Running && s.attempt != self.session.attempt =>
            {
                tracing::info!(
                    attempt = s.attempt,
                    "attempt stopped: this attempt's lease expired and attempt {} runs the session",
                    s.attempt
                )
            }
            Ok(Some(s)) if s.status == SessionStatus::Pending => tracing::info!(
                "attempt stopped: the session was taken back (this attempt's lease expired) and waits for its next attempt"
            ),
            Ok(Some(_)) => tracing::info!("attempt stopped: the lease was taken back"),
            Err(e) => tracing::info!(
                error = %e,
                "attempt stopped: the lease is no longer this attempt's (the store does not answer, so why is not known)"
            ),
        }
    }

    fn default_timeout(&self) -> Duration {
        self.s.default_timeout
    }

    async fn run_job(self: &Arc<Self>) {
        if self.stop.reason() == Some(StopReason::Cancelled) {
            // Cancelled while it waited in the claimer's buffer: nothing ran, nothing to keep.
            self.finish(SessionStatus::Cancelled, None, CheckpointBatch::default())
                .await;
            return;
        }
        // Frontier, seen set and records are only ever written by checkpoints: a session that
        // has committed none has nothing to resume, and skipping the read saves three queries
        // per session on PostgreSQL (measured with bench queue).
        let resume = if self.session.checkpoints == 0 {
            Ok(ResumeState {
                metrics: self.session.metrics.clone(),
                usage: self.session.usage,
                ..Default::default()
            })
        } else {
            self.s.store.resume_load(&self.aref.id).await
        };
        let resume = match resume {
            Ok(r) => r,
            Err(e) => {
                // A store that is away costs no attempt; anything else (a corrupt frontier) does,
                // so a session that can never resume ends FAILED instead of cycling.
                let spend = !e.is_unavailable();
                tracing::error!(error = %e, spend, "cannot load resume state; handing the session back");
                let error = SessionError::new(ErrorKind::StoreError, e.to_string());
                let retry = Retry::After(self.s.backoff(self.session.failures));
                self.requeue(spend, Some(error), retry).await;
                return;
            }
        };
        let export = match ExportSpec::of(&self.session.job.config) {
            Ok(spec) => spec,
            Err(e) => {
                // Validated at submission; only a config stored by another version gets here.
                tracing::error!(error = %e, "the session's [export] is not valid; failing it");
                let error = SessionError::new(ErrorKind::InvalidConfig, e);
                self.finish(
                    SessionStatus::Failed,
                    Some(error),
                    CheckpointBatch::default(),
                )
                .await;
                return;
            }
        };
        let sink = Arc::new(LeaseSink {
            attempt: self.clone(),
            table_sink: export.postgres_table.is_some().then(|| export.clone()),
        });
        let ctx = JobContext {
            session: self.session.clone(),
            resume,
            state: Arc::new(StoreCrawlState::new(
                self.s.store.clone(),
                self.aref.id.clone(),
            )),
            sink,
            stop: self.stop.clone(),
        };
        // The job runs inside this task, not a task of its own: it cannot outlive the attempt
        // (dropping its future is aborting it), a panic is caught here as one of a spawned task
        // would be, and a session pays one task spawn, not two (callgrind, `bench queue` on
        // sled: the second spawn, its join handle and the wake-up across tasks at the job's end
        // were about 3,900 instructions per session, a fifth of the attempt task's own). A job
        // that computes for long between awaits delays only its own heartbeats: the crawl
        // processes pages in tasks of their own.
        let job = self.s.job.clone();
        let run = std::panic::AssertUnwindSafe(job.run(ctx)).catch_unwind();
        let outcome = self.supervise(run).await;
        self.conclude(outcome, &export).await;
    }

    /// Waits for the job while renewing the lease, relaying a client's cancel and enforcing
    /// `max_duration`.
    async fn supervise(
        &self,
        job: impl Future<Output = std::thread::Result<JobOutcome>>,
    ) -> JobOutcome {
        let mut job = std::pin::pin!(job);
        let lease = self.s.workers.lease();
        let beat_every = (lease / 3).max(Duration::from_millis(200));
        let max_duration = self.session.options.max_duration();
        let started = tokio::time::Instant::now();
        let mut beat = tokio::time::interval_at(started + beat_every, beat_every);
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let stop = &self.stop;
        loop {
            let max_sleep = match (max_duration, stop_deadline) {
                (_, Some(d)) => d,
                (Some(m), None) => started + m,
                (None, None) => started + Duration::from_secs(365 * 86400),
            };
            tokio::select! {
                res = &mut job => {
                    return match res {
                        Ok(o) => o,
                        Err(_) => {
                            tracing::error!("the job panicked");
                            JobOutcome::Failed {
                                error: SessionError::new(ErrorKind::JobPanicked, "the job panicked; see the service log"),
                                retry: Retry::Backoff,
                                batch: CheckpointBatch::default(),
                            }
                        }
                    };
                }
                _ = beat.tick() => {
                    let hb = self.s.store.session_heartbeat_if_running(SessionHeartbeat {
                        attempt: self.aref.clone(), lease, now: self.s.clock.now(),
                    }).await;
                    if hb.is_ok() {
                        crate::store::outage::answered("heartbeat");
                    }
                    match hb {
                        Ok(HeartbeatOutcome::Renewed { cancel_requested: true }) => stop.stop(StopReason::Cancelled),
                        Ok(HeartbeatOutcome::Renewed { .. }) => {}
                        Ok(HeartbeatOutcome::Lost) => stop.stop(StopReason::LeaseLost),
                        Err(e) if e.is_unavailable() => crate::store::outage::unavailable("heartbeat", &e),
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
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
                        tracing::warn!("the job did not stop within {STOP_GRACE:?}; aborting it");
                        return JobOutcome::Stopped(CheckpointBatch::default());
                    }
                    stop.stop(StopReason::MaxDuration);
                    stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                }
            }
        }
    }

    /// Ends the attempt as its outcome says.
    async fn conclude(&self, outcome: JobOutcome, export: &ExportSpec) {
        match outcome {
            JobOutcome::Completed(batch) if !export.is_empty() => {
                // Last checkpoint, then the sinks, then COMPLETED: a crash anywhere in between
                // leaves the session RUNNING; its next attempt has nothing left to crawl and runs
                // the (idempotent) sinks again, so a COMPLETED session has every sink written
                // once.
                if !self.commit_last(batch).await {
                    return;
                }
                if let Err(e) = self
                    .s
                    .effects
                    .sinks()
                    .export_all(&*self.s.store, &self.session, export)
                    .await
                {
                    tracing::warn!(error = %e, "export failed; retrying the session");
                    let error = SessionError::new(ErrorKind::ExportFailed, e.to_string());
                    self.requeue(true, Some(error), Retry::Backoff).await;
                    return;
                }
                if self.session.options.remove_after_export {
                    // The removal after the finish can be long: it runs within the slots.
                    self.slot().pin();
                }
                self.finish(SessionStatus::Completed, None, CheckpointBatch::default())
                    .await;
                // Every external sink has the records: with remove_after_export, the internal
                // copy goes (the session itself stays until its timeout).
                if self.session.options.remove_after_export {
                    self.remove_records(None).await;
                }
            }
            JobOutcome::Completed(batch) => {
                self.finish(SessionStatus::Completed, None, batch).await;
            }
            JobOutcome::Stopped(batch) => match self.stop.reason() {
                Some(StopReason::Cancelled) => {
                    self.finish(SessionStatus::Cancelled, None, batch).await
                }
                Some(StopReason::MaxDuration) => {
                    let secs = self.session.options.max_duration_secs.unwrap_or(0);
                    let err = SessionError::new(
                        ErrorKind::MaxDurationExceeded,
                        format!("the attempt ran longer than max_duration_secs = {secs}"),
                    );
                    self.finish(SessionStatus::Failed, Some(err), batch).await
                }
                Some(StopReason::Shutdown) => {
                    if self.commit_last(batch).await {
                        self.requeue(false, None, Retry::Backoff).await;
                    }
                }
                Some(StopReason::LeaseLost) => self.say_why_lost().await,
                Some(StopReason::Abandoned)
                    if self.store_gave_up.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    self.hand_back_when_answering().await
                }
                Some(StopReason::Abandoned) => {
                    tracing::info!(
                        "attempt abandoned; the session is taken back when its lease expires"
                    );
                }
                None => {
                    // A job returned Stopped without being asked: treat as done with what it has.
                    self.finish(SessionStatus::Completed, None, batch).await
                }
            },
            JobOutcome::Failed {
                error,
                retry,
                batch,
            } => {
                if !self.commit_last(batch).await {
                    return;
                }
                match retry {
                    Retry::Never => {
                        self.finish(
                            SessionStatus::Failed,
                            Some(error),
                            CheckpointBatch::default(),
                        )
                        .await
                    }
                    Retry::Backoff | Retry::After(_) => {
                        self.requeue(true, Some(error), retry).await
                    }
                }
            }
        }
    }

    /// Removes records an external sink has (`below`; `None`: all, once COMPLETED).
    async fn remove_records(&self, below: Option<u64>) {
        let p = crate::store::RecordsRemove {
            id: self.aref.id.clone(),
            below,
        };
        match self.s.store.records_remove(p).await {
            Ok(Some(s)) => tracing::debug!(
                removed = s.records_removed,
                "records exported; removed (remove_after_export)"
            ),
            Ok(None) => {}
            // Kept: they go with the session at its cleanup.
            Err(e) => tracing::warn!(error = %e, "removing exported records failed"),
        }
    }

    /// Commits a last batch before the attempt ends otherwise; `false`: the attempt no longer
    /// holds the session (or the commit failed), so nothing more may be written.
    async fn commit_last(&self, batch: CheckpointBatch) -> bool {
        batch.is_empty() || self.commit(batch).await.is_ok()
    }

    /// Commits `batch` and the terminal `status` together.
    async fn finish(
        &self,
        status: SessionStatus,
        error: Option<SessionError>,
        batch: CheckpointBatch,
    ) {
        // Only this write is left: the next session may start while it waits for its commit.
        self.slot().job_done();
        let counts = BatchCounts::of(&batch);
        let kept = self.s.effects.observes_commits().then(|| batch.clone());
        // Kept for another try only where the store can be away (as in `commit`).
        let retryable = !self.s.store.exclusive();
        let (mut batch, mut error) = (batch, error);
        let lease = self.s.workers.lease();
        let give_up_at = tokio::time::Instant::now() + lease / 2;
        let mut pause = RETRY_MIN;
        let mut failed_once = false;
        let res = loop {
            let res = self
                .finisher
                .finish(SessionFinish {
                    attempt: self.aref.clone(),
                    status,
                    error: if retryable {
                        error.clone()
                    } else {
                        error.take()
                    },
                    batch: if retryable {
                        batch.clone()
                    } else {
                        std::mem::take(&mut batch)
                    },
                    cleanup_after: self.default_timeout(),
                    now: self.s.clock.now(),
                })
                .await;
            match res {
                Err(e) if e.is_unavailable() && !self.s.store.exclusive() => {
                    crate::store::outage::unavailable("finishing a session", &e);
                    failed_once = true;
                    if !self.wait_retry(&mut pause, give_up_at).await {
                        break Err(e);
                    }
                }
                // Refused after a try whose answer was lost: that try may have applied.
                Ok(None) if failed_once => match self.s.store.session_get(&self.aref.id).await {
                    Ok(Some(s)) if s.attempt == self.aref.attempt && s.status == status => {
                        break Ok(Some(s));
                    }
                    _ => break Ok(None),
                },
                other => break other,
            }
        };
        if res.is_ok() {
            crate::store::outage::answered("finishing a session");
        }
        match res {
            Ok(Some(done)) => {
                if let Err(e) = self.s.effects.checkpointed(&done, counts, kept.as_ref()) {
                    tracing::error!(error = %e, "the last checkpoint could not be followed up");
                }
                self.s.effects.transitioned(done);
            }
            Ok(None) => self.say_why_lost().await,
            Err(e) if e.is_unavailable() && !self.s.store.exclusive() => {
                tracing::warn!(error = %e, "finishing the session: the store did not answer within half a lease; the session is handed back when it answers");
                self.hand_back_when_answering().await;
            }
            Err(e) => tracing::error!(error = %e, "finishing the session failed"),
        }
    }

    /// Hands the session back: PENDING after a backoff (or at once when `spend` is false), or
    /// FAILED when it was its last attempt, CANCELLED when a cancel was asked meanwhile.
    async fn requeue(&self, spend: bool, error: Option<SessionError>, retry: Retry) {
        self.slot().job_done();
        let now = self.s.clock.now();
        let delay = match retry {
            Retry::After(d) => d,
            _ if !spend => Duration::ZERO,
            _ => self.s.backoff(self.session.failures),
        };
        let run_at = Timestamp(now.millis().saturating_add(delay.as_millis() as i64));
        // A store that does not answer is tried again with backoff (a requeue is a
        // compare-and-set: one that applied though its answer was lost is refused after).
        let until = tokio::time::Instant::now() + HAND_BACK_MAX;
        let mut pause = RETRY_MIN;
        let mut failed_once = false;
        loop {
            let now = self.s.clock.now();
            let res = self
                .s
                .store
                .session_requeue_if_running(SessionRequeue {
                    attempt: self.aref.clone(),
                    spend_attempt: spend,
                    run_at: if failed_once && !spend { now } else { run_at },
                    error: error.clone(),
                    cleanup_after: self.default_timeout(),
                    now,
                })
                .await;
            match res {
                Ok(None) if failed_once => {
                    // Applied by a try whose answer was lost, or taken back meanwhile.
                    self.say_why_lost().await;
                    return;
                }
                Ok(None) => return,
                Ok(Some(after)) => {
                    if failed_once {
                        crate::store::outage::answered("handing a session back");
                        tracing::info!(status = %after.status, "the session was handed back now that the store answers");
                    }
                    self.s.effects.transitioned(after);
                    return;
                }
                Err(e) if e.is_unavailable() && !self.s.store.exclusive() => {
                    crate::store::outage::unavailable("handing a session back", &e);
                    failed_once = true;
                    if !self.wait_retry(&mut pause, until).await {
                        tracing::warn!(error = %e, "the store did not answer for {HAND_BACK_MAX:?}; the session is taken back when its lease expires");
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "requeue failed; the lease will expire");
                    return;
                }
            }
        }
    }
}
