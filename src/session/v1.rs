//! The layout sessions were stored in before schema version 2 (no record count of their own, no
//! attempts, metrics of the last attempt only), read by stores written then and converted on
//! the way in.

use serde::Deserialize;

use super::{
    AttemptOutcome, AttemptRecord, ClientContext, JobSpec, Lease, Session, SessionError, SessionId,
    SessionMetrics, SessionOptions, SessionStatus, Timestamp, TokenUsage,
};

/// A session as schema version 1 stored it.
#[derive(Deserialize)]
pub struct SessionV1 {
    id: SessionId,
    seq: u64,
    client: ClientContext,
    status: SessionStatus,
    job: JobSpec,
    options: SessionOptions,
    attempt: u32,
    failures: u32,
    progress_this_attempt: bool,
    lease: Option<Lease>,
    cancel_requested: bool,
    run_at: Timestamp,
    created_at: Timestamp,
    updated_at: Timestamp,
    cleanup_at: Option<Timestamp>,
    metrics: MetricsV1,
    usage: TokenUsage,
    error: Option<SessionError>,
    checkpoints: u64,
}

#[derive(Deserialize)]
struct MetricsV1 {
    /// The last attempt's start.
    start_time: Option<Timestamp>,
    end_time: Option<Timestamp>,
    pages_processed: u64,
    /// The records committed.
    processed_elements: u64,
}

impl From<SessionV1> for Session {
    /// What version 1 knew: the last attempt's times stand for the whole session (they are all
    /// it kept), and its records were its elements.
    fn from(v: SessionV1) -> Session {
        let m = v.metrics;
        let running = v.status == SessionStatus::Running;
        let last = m
            .start_time
            .filter(|_| v.attempt > 0)
            .map(|started_at| AttemptRecord {
                attempt: v.attempt,
                started_at,
                ended_at: m.end_time.filter(|_| v.status.is_terminal()),
                outcome: v
                    .status
                    .is_terminal()
                    .then(|| AttemptOutcome::ended(v.status)),
            });
        let running_ms = match (m.start_time, m.end_time) {
            (Some(s), Some(e)) if !running => e.since(s).as_millis() as u64,
            _ => 0,
        };
        Session {
            tenant: None,
            id: v.id,
            seq: v.seq,
            client: v.client,
            status: v.status,
            job: v.job,
            options: v.options,
            attempt: v.attempt,
            failures: v.failures,
            progress_this_attempt: v.progress_this_attempt,
            lease: v.lease,
            cancel_requested: v.cancel_requested,
            run_at: v.run_at,
            created_at: v.created_at,
            updated_at: v.updated_at,
            cleanup_at: v.cleanup_at,
            metrics: SessionMetrics {
                start_time: m.start_time,
                end_time: m.end_time,
                pages_processed: m.pages_processed,
                processed_elements: m.processed_elements,
                running_ms,
                running_since: m.start_time.filter(|_| running),
            },
            usage: v.usage,
            error: v.error,
            checkpoints: v.checkpoints,
            records: m.processed_elements,
            records_removed: 0,
            attempts: last.into_iter().collect(),
        }
    }
}
