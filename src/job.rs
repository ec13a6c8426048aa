//! The seam between the durable core and the work a session does.
//!
//! A [`Job`] validates configs at submission and runs one attempt of a session. It never touches
//! the store: it hands its progress to a [`CheckpointSink`] (the worker's, which commits under the
//! lease; or `harvest run`'s, which prints records), reads what earlier checkpoints committed
//! (the crawl frontier and seen set, which can be far larger than memory) through the read-only
//! [`CrawlState`], and watches a [`StopSignal`] between steps.
//! The scraper engine is one `Job`; the queue benchmark's no-op job and the tests' jobs are
//! others.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::session::{Session, SessionError};
use crate::store::{CheckpointBatch, FrontierItem, ResumeState};

/// Why a checkpoint was not committed. Either way the attempt must stop and write nothing
/// else: another attempt (or nobody) owns the session now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The lease is gone: the session was reclaimed by another attempt, or closed.
    #[error("the lease on this session was lost; another attempt owns it or it was closed")]
    LeaseLost,
    /// The commit, or what must follow it, failed (e.g. the store is unavailable, or a local
    /// run's output was closed): the attempt is abandoned where it stands.
    #[error("the attempt was abandoned: {0}")]
    Abandoned(String),
}

/// Where a running job commits its progress. A job commits one batch at a time, each after the
/// previous one returned (the engine keeps at most one commit in flight): records are numbered,
/// and observers told, in commit order.
#[async_trait]
pub trait CheckpointSink: Send + Sync {
    /// Commits a batch atomically (durable on return).
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), CommitError>;
}

/// The committed crawl state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CrawlStateError {
    /// The store failed.
    #[error("cannot read the session's crawl state")]
    Store(#[from] crate::store::StoreError),
    /// The request was out of range (a bug in the caller).
    #[error("invalid crawl state request: {0}")]
    Invalid(String),
}

/// Why a job refuses a config (or its params) at submission; its message names the field and
/// what is wrong, e.g. `pages.product.fields.price.regex: unclosed group`. The job's own error
/// type is kept as the source.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigRejected(Box<dyn std::error::Error + Send + Sync>);

impl ConfigRejected {
    /// Wraps a job's own validation error (or a message).
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ConfigRejected {
        ConfigRejected(e.into())
    }
}

/// Read-only view of what a session's committed checkpoints hold: its frontier (in the order URLs
/// were added, with positions) and its seen set. Implemented by the worker over the store and by
/// `harvest run` over its own local state; a job never gets write access to either.
#[async_trait]
pub trait CrawlState: Send + Sync {
    /// Committed frontier entries after position `after_pos` (0: from the start), in position
    /// order, at most `limit` (1..=10000). Positions follow [`FrontierItem`]'s rules.
    async fn frontier_page(
        &self,
        after_pos: u64,
        limit: usize,
    ) -> Result<Vec<FrontierItem>, CrawlStateError>;

    /// For each URL (at most 10000), whether a committed checkpoint added it to the seen set.
    async fn seen_filter(&self, urls: Vec<String>) -> Result<Vec<bool>, CrawlStateError>;
}

/// Why a job is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// A client cancelled the session: end CANCELLED.
    Cancelled = 1,
    /// The attempt ran past `max_duration`: end FAILED (`max_duration_exceeded`).
    MaxDuration = 2,
    /// The process is shutting down: hand the session back without spending an attempt.
    Shutdown = 3,
    /// The lease was lost: stop, write nothing.
    LeaseLost = 4,
    /// The attempt is abandoned (its commits cannot be made or followed up): stop, write
    /// nothing.
    Abandoned = 5,
}

impl StopReason {
    /// Whether the job must stop without committing anything more.
    pub fn writes_nothing(self) -> bool {
        matches!(self, StopReason::LeaseLost | StopReason::Abandoned)
    }
}

/// A cooperative stop request with its reason. Cheap to clone; the first reason wins.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Arc<AtomicU8>,
}

impl StopSignal {
    /// A signal that has not fired.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Fires the signal (only the first reason is kept).
    pub fn stop(&self, reason: StopReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    /// Whether it fired.
    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The reason, once fired.
    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.load(Ordering::Acquire) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::MaxDuration),
            3 => Some(StopReason::Shutdown),
            4 => Some(StopReason::LeaseLost),
            5 => Some(StopReason::Abandoned),
            _ => None,
        }
    }

    /// Resolves when the signal fires.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }
}

/// Whether a failure is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Permanent: end FAILED now.
    Never,
    /// Retry with the worker's exponential backoff and jitter.
    Backoff,
    /// Retry not before this long.
    After(Duration),
}

/// How an attempt ended.
#[derive(Debug)]
pub enum JobOutcome {
    /// The work is done; commit this last batch with COMPLETED.
    Completed(CheckpointBatch),
    /// The job saw the stop signal and stopped between steps; the worker picks the status from the
    /// signal's reason. The batch holds what finished before it stopped.
    Stopped(CheckpointBatch),
    /// The attempt failed.
    Failed {
        /// What went wrong.
        error: SessionError,
        /// Whether to try again.
        retry: Retry,
        /// Progress made before the failure (committed with the requeue or the FAILED status).
        batch: CheckpointBatch,
    },
}

/// Everything one attempt gets.
pub struct JobContext {
    /// The session as claimed (attempt, options, job spec).
    pub session: Session,
    /// Where to resume: counts of the last checkpoint.
    pub resume: ResumeState,
    /// The committed frontier and seen set (read-only).
    pub state: Arc<dyn CrawlState>,
    /// Where to commit progress.
    pub sink: Arc<dyn CheckpointSink>,
    /// Checked between steps.
    pub stop: StopSignal,
}

/// A kind of work a session can do.
#[async_trait]
pub trait Job: Send + Sync + 'static {
    /// Checks a config (and params) at submission. The error names the field and what is wrong,
    /// e.g. `pages.product.fields.price.regex: unclosed group`.
    ///
    /// The verdict must depend on `config` and `params` only (no clock, file or setting that
    /// can change): a client's submission of a config and params that passed recently is not
    /// checked again (`service::validation::Passed`).
    fn validate(
        &self,
        config: &serde_json::Value,
        params: &BTreeMap<String, String>,
    ) -> Result<(), ConfigRejected>;

    /// Runs one attempt.
    async fn run(&self, ctx: JobContext) -> JobOutcome;
}

/// A job that does nothing and completes at once: the queue benchmark's work.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopJob;

#[async_trait]
impl Job for NoopJob {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), ConfigRejected> {
        Ok(())
    }

    async fn run(&self, _ctx: JobContext) -> JobOutcome {
        JobOutcome::Completed(CheckpointBatch::default())
    }
}
