//! The session state machine, written once.
//!
//! Every transition is a pure function from a session (and what happened) to the session after
//! it: which status, error, attempt, failure count, lease, times and cleanup time. The stores
//! decide nothing: each loads the session under its compare-and-set, applies the function that
//! names the transition and writes the result (PostgreSQL's claim, heartbeat, checkpoint and
//! finish stay single SQL statements for speed; the conformance suite checks that their results
//! equal these functions'). Nothing here does I/O or reads the clock.
//!
//! ```text
//! PENDING --claimed--> RUNNING --finished--> COMPLETED | FAILED | CANCELLED
//! PENDING --cancel--> CANCELLED            RUNNING --cancel--> (flag; the worker finishes it)
//! RUNNING --requeued / reclaimed--> PENDING (attempts left) | FAILED (none left)
//!                                   | CANCELLED (a cancel was asked meanwhile)
//! ```

use std::time::Duration;

use super::{
    ATTEMPTS_KEPT, AttemptOutcome, AttemptRecord, ErrorKind, Lease, Session, SessionError,
    SessionStatus, Timestamp, TokenUsage,
};

/// Every transition a session can make, for the conformance suite's coverage check: a new
/// variant fails to compile there until it has a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transition {
    /// A new PENDING session is stored.
    Insert,
    /// PENDING → RUNNING under a lease ([`Session::claimed`]).
    Claim,
    /// The lease is renewed ([`Session::heartbeat`]).
    Heartbeat,
    /// A checkpoint is committed ([`Session::checkpointed`]).
    Checkpoint,
    /// RUNNING → terminal with the last checkpoint ([`Session::finished`]).
    Finish,
    /// RUNNING is handed back ([`Session::requeued`]).
    Requeue,
    /// RUNNING whose lease expired is taken back ([`Session::reclaimed`]).
    Reclaim,
    /// A client cancels ([`Session::cancel`]).
    Cancel,
    /// A terminal session's records are removed, the session kept (`remove_after_export`).
    RecordsRemove,
    /// A session and all its data are removed now (close).
    Remove,
    /// Terminal sessions past their cleanup time are removed ([`Session::cleanup_due`]).
    Expire,
}

impl Transition {
    /// All transitions.
    pub const ALL: [Transition; 11] = [
        Transition::Insert,
        Transition::Claim,
        Transition::Heartbeat,
        Transition::Checkpoint,
        Transition::Finish,
        Transition::Requeue,
        Transition::Reclaim,
        Transition::Cancel,
        Transition::RecordsRemove,
        Transition::Remove,
        Transition::Expire,
    ];
}

/// What a checkpoint adds to a session's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Records committed.
    pub records: u64,
    /// Elements processed (records, for the scraper).
    pub elements: u64,
    /// Pages processed.
    pub pages: u64,
    /// Usage.
    pub usage: TokenUsage,
    /// Whether the checkpoint wrote anything (an empty one is not progress).
    pub nonempty: bool,
}

/// What a requeue or reclaim did to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// Back to PENDING.
    Requeued,
    /// Attempts exhausted: now FAILED.
    Failed,
    /// A client had asked to cancel the session while it ran: now CANCELLED instead of being
    /// run again.
    Cancelled,
    /// The precondition did not hold (not running with that attempt and owner, or lease not
    /// expired): nothing changed.
    NotApplied,
}

impl RequeueOutcome {
    /// The outcome a requeued or reclaimed session's new status means.
    pub fn of(status: SessionStatus) -> RequeueOutcome {
        match status {
            SessionStatus::Pending => RequeueOutcome::Requeued,
            SessionStatus::Cancelled => RequeueOutcome::Cancelled,
            SessionStatus::Failed => RequeueOutcome::Failed,
            SessionStatus::Running | SessionStatus::Completed => RequeueOutcome::NotApplied,
        }
    }
}

/// What a cancel decides.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelDecision {
    /// It was PENDING: this CANCELLED session replaces it.
    Cancel(Session),
    /// It is RUNNING: this session (flag set) replaces it; the worker ends it CANCELLED.
    Request(Session),
    /// It is RUNNING and the flag was already set: nothing to write.
    AlreadyRequested,
    /// It is terminal: nothing to write.
    AlreadyTerminal,
}

impl Session {
    /// Whether a worker holding (`attempt`, `owner`) still owns this session: the precondition
    /// of every compare-and-set a worker makes.
    pub fn is_held_by(&self, attempt: u32, owner: &str) -> bool {
        self.status == SessionStatus::Running
            && self.attempt == attempt
            && self.lease.as_ref().is_some_and(|l| l.owner == owner)
    }

    /// Whether a claim may take it at `now`: PENDING and due.
    pub fn is_claimable(&self, now: Timestamp) -> bool {
        self.status == SessionStatus::Pending && self.run_at <= now
    }

    /// PENDING → RUNNING: the next attempt, under a lease held by `owner` until `now + lease`.
    pub fn claimed(&self, owner: &str, lease: Duration, now: Timestamp) -> Session {
        let mut s = self.clone();
        s.status = SessionStatus::Running;
        s.attempt += 1;
        s.lease = Some(Lease {
            owner: owner.to_string(),
            expires_at: now.add(lease),
        });
        s.progress_this_attempt = false;
        s.metrics.start_time = s.metrics.start_time.or(Some(now));
        s.metrics.end_time = None;
        s.metrics.running_since = Some(now);
        if s.attempts.len() >= ATTEMPTS_KEPT {
            s.attempts.drain(..=s.attempts.len() - ATTEMPTS_KEPT);
        }
        s.attempts.push(AttemptRecord {
            attempt: s.attempt,
            started_at: now,
            ended_at: None,
            outcome: None,
        });
        s.updated_at = now;
        s
    }

    /// The attempt running now ended at `at` with `outcome`: its time counts as running time.
    fn end_attempt(&mut self, outcome: AttemptOutcome, at: Timestamp) {
        if let Some(since) = self.metrics.running_since.take() {
            self.metrics.running_ms += at.since(since).as_millis() as u64;
        }
        if let Some(a) = self.attempts.last_mut().filter(|a| a.ended_at.is_none()) {
            a.ended_at = Some(at);
            a.outcome = Some(outcome);
        }
    }

    /// The lease renewed until `now + lease` (not a change a client sees: `updated_at` stays).
    pub fn heartbeat(&self, lease: Duration, now: Timestamp) -> Session {
        let mut s = self.clone();
        if let Some(l) = &mut s.lease {
            l.expires_at = now.add(lease);
        }
        s
    }

    fn add_progress(&mut self, p: &Progress) {
        if !p.nonempty {
            return;
        }
        self.records += p.records;
        self.metrics.processed_elements += p.elements;
        self.metrics.pages_processed += p.pages;
        // `token_tracking = false`: no usage is kept for the session (the seed's
        // enableTokenTracking).
        if self.options.token_tracking {
            self.usage += p.usage;
        }
        self.checkpoints += 1;
        self.progress_this_attempt = true;
    }

    /// A checkpoint committed: counters added, the lease renewed until `now + lease`.
    pub fn checkpointed(&self, p: &Progress, lease: Duration, now: Timestamp) -> Session {
        let mut s = self.heartbeat(lease, now);
        s.add_progress(p);
        s.updated_at = now;
        s
    }

    /// RUNNING → `status` (terminal) with the last checkpoint's counters, removed
    /// `session_timeout` (else `default_timeout`) after `now`.
    pub fn finished(
        &self,
        status: SessionStatus,
        error: Option<SessionError>,
        p: &Progress,
        default_timeout: Duration,
        now: Timestamp,
    ) -> Session {
        let mut s = self.clone();
        s.add_progress(p);
        s.end_attempt(AttemptOutcome::ended(status), now);
        s.end(status, error, default_timeout, now);
        s
    }

    fn end(
        &mut self,
        status: SessionStatus,
        error: Option<SessionError>,
        default_timeout: Duration,
        now: Timestamp,
    ) {
        self.status = status;
        self.error = error;
        self.lease = None;
        self.cleanup_at = Some(now.add(self.cleanup_after(default_timeout)));
        self.metrics.end_time = Some(now);
        self.updated_at = now;
    }

    /// RUNNING handed back by its worker. `spend`: the attempt counts against `max_attempts`
    /// (a failure does, a shutdown's hand-back does not). A cancel asked meanwhile ends it
    /// CANCELLED; a spent last attempt ends it FAILED (`error`, else `attempts_exhausted`);
    /// otherwise it is PENDING again, due at `run_at`, with `error` as the reason (none for a
    /// hand-back).
    pub fn requeued(
        &self,
        spend: bool,
        run_at: Timestamp,
        error: Option<SessionError>,
        default_timeout: Duration,
        now: Timestamp,
    ) -> (Session, RequeueOutcome) {
        let mut s = self.clone();
        if spend {
            s.failures += 1;
        }
        if s.cancel_requested {
            let error = s.error.take();
            s.end_attempt(AttemptOutcome::Cancelled, now);
            s.end(SessionStatus::Cancelled, error, default_timeout, now);
            return (s, RequeueOutcome::Cancelled);
        }
        if spend && s.failures >= s.max_attempts() {
            let error = error.unwrap_or_else(|| {
                SessionError::new(
                    ErrorKind::AttemptsExhausted,
                    format!(
                        "attempt {} failed and no attempts are left (max_attempts {})",
                        s.attempt,
                        s.max_attempts()
                    ),
                )
            });
            s.end_attempt(AttemptOutcome::Failed, now);
            s.end(SessionStatus::Failed, Some(error), default_timeout, now);
            return (s, RequeueOutcome::Failed);
        }
        let outcome = if spend {
            AttemptOutcome::Retried
        } else {
            AttemptOutcome::HandedBack
        };
        s.end_attempt(outcome, now);
        s.back_to_pending(run_at, error, now);
        (s, RequeueOutcome::Requeued)
    }

    fn back_to_pending(&mut self, run_at: Timestamp, error: Option<SessionError>, now: Timestamp) {
        self.status = SessionStatus::Pending;
        self.lease = None;
        self.run_at = run_at;
        self.error = error;
        self.cleanup_at = None;
        self.updated_at = now;
    }

    /// RUNNING whose lease expired (its worker died or was cut off), taken back at `now`; the
    /// attempt counts as ended at its last checkpoint (its running time stops there). An
    /// attempt that committed progress is free; one that did not counts against
    /// `max_attempts`. A cancel asked meanwhile ends it CANCELLED; no attempts left ends it
    /// FAILED (`attempts_exhausted`); otherwise PENDING, due `backoff` after `now`
    /// (`lease_expired`).
    pub fn reclaimed(
        &self,
        backoff: Duration,
        default_timeout: Duration,
        now: Timestamp,
    ) -> (Session, RequeueOutcome) {
        let mut s = self.clone();
        if !s.progress_this_attempt {
            s.failures += 1;
        }
        // Its worker is gone: it ran until its last sign of life, its last checkpoint (or its
        // start), not until the reclaim noticed.
        let last_alive = s
            .updated_at
            .max(s.metrics.running_since.unwrap_or(s.updated_at));
        if s.cancel_requested {
            let error = s.error.take();
            s.end_attempt(AttemptOutcome::Cancelled, last_alive);
            s.end(SessionStatus::Cancelled, error, default_timeout, now);
            return (s, RequeueOutcome::Cancelled);
        }
        if s.failures >= s.max_attempts() {
            let error = SessionError::new(
                ErrorKind::AttemptsExhausted,
                format!(
                    "attempt {} lost its lease (the worker stopped or was cut off) and no \
                     attempts are left (max_attempts {})",
                    s.attempt,
                    s.max_attempts()
                ),
            );
            s.end_attempt(AttemptOutcome::LeaseExpired, last_alive);
            s.end(SessionStatus::Failed, Some(error), default_timeout, now);
            return (s, RequeueOutcome::Failed);
        }
        s.end_attempt(AttemptOutcome::LeaseExpired, last_alive);
        let error = SessionError::new(
            ErrorKind::LeaseExpired,
            format!(
                "attempt {} lost its lease (the worker stopped or was cut off); retrying",
                s.attempt
            ),
        );
        s.back_to_pending(now.add(backoff), Some(error), now);
        (s, RequeueOutcome::Requeued)
    }

    /// A client cancels at `now`: PENDING ends CANCELLED (removed `session_timeout`, else
    /// `default_timeout`, later); RUNNING gets the flag its worker acts on.
    pub fn cancel(&self, default_timeout: Duration, now: Timestamp) -> CancelDecision {
        match self.status {
            SessionStatus::Pending => {
                let mut s = self.clone();
                let error = s.error.take();
                s.end(SessionStatus::Cancelled, error, default_timeout, now);
                CancelDecision::Cancel(s)
            }
            SessionStatus::Running if self.cancel_requested => CancelDecision::AlreadyRequested,
            SessionStatus::Running => {
                let mut s = self.clone();
                s.cancel_requested = true;
                s.updated_at = now;
                CancelDecision::Request(s)
            }
            _ => CancelDecision::AlreadyTerminal,
        }
    }

    /// Whether cleanup removes it at `now`: terminal and past its cleanup time.
    pub fn cleanup_due(&self, now: Timestamp) -> bool {
        self.status.is_terminal() && self.cleanup_at.is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{ClientContext, JobSpec, SessionId, SessionOptions};

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(secs: i64) -> Timestamp {
        Timestamp(1_700_000_000_000 + secs * 1000)
    }

    fn pending(max_attempts: u32) -> Session {
        Session::pending(
            SessionId::parse("s").unwrap(),
            ClientContext::of("c"),
            JobSpec {
                config: serde_json::json!({}).into(),
                params: Default::default(),
                agent: None,
            },
            SessionOptions {
                max_attempts: Some(max_attempts),
                ..SessionOptions::default()
            },
            t(0),
        )
    }

    fn lease() -> Duration {
        Duration::from_secs(30)
    }

    #[test]
    fn claim_starts_an_attempt_under_a_lease() {
        let s = pending(3).claimed("w", lease(), t(1));
        assert_eq!(s.status, SessionStatus::Running);
        assert_eq!(s.attempt, 1);
        assert!(s.is_held_by(1, "w") && !s.is_held_by(1, "x") && !s.is_held_by(2, "w"));
        assert_eq!(s.lease.as_ref().map(|l| l.expires_at), Some(t(31)));
        assert_eq!(s.metrics.start_time, Some(t(1)));
    }

    #[test]
    fn reclaim_without_progress_spends_attempts_then_fails() {
        let mut s = pending(2).claimed("w", lease(), t(1));
        let (r, out) = s.reclaimed(Duration::from_secs(1), DAY, t(40));
        assert_eq!(out, RequeueOutcome::Requeued);
        assert_eq!(
            r.error.as_ref().map(|e| &e.kind),
            Some(&ErrorKind::LeaseExpired)
        );
        assert_eq!((r.failures, r.run_at, r.lease.clone()), (1, t(41), None));
        s = r.claimed("w2", lease(), t(50));
        let (r, out) = s.reclaimed(Duration::ZERO, DAY, t(90));
        assert_eq!(out, RequeueOutcome::Failed);
        assert_eq!(r.status, SessionStatus::Failed);
        assert_eq!(
            r.error.as_ref().map(|e| &e.kind),
            Some(&ErrorKind::AttemptsExhausted)
        );
        assert_eq!(r.cleanup_at, Some(t(90).add(DAY)));
    }

    #[test]
    fn reclaim_after_progress_is_free() {
        let p = Progress {
            records: 2,
            elements: 2,
            pages: 1,
            nonempty: true,
            ..Progress::default()
        };
        let s = pending(1)
            .claimed("w", lease(), t(1))
            .checkpointed(&p, lease(), t(2));
        let (r, out) = s.reclaimed(Duration::ZERO, DAY, t(40));
        assert_eq!((out, r.failures), (RequeueOutcome::Requeued, 0));
        assert_eq!((r.records, r.metrics.processed_elements), (2, 2));
    }

    #[test]
    fn metrics_span_attempts_and_rate_counts_running_time_only() {
        let p = Progress {
            records: 10,
            elements: 10,
            nonempty: true,
            ..Progress::default()
        };
        let s = pending(3)
            .claimed("w", lease(), t(10))
            .checkpointed(&p, lease(), t(15));
        // Ran 10 to 20, handed back (5 s queued), claimed again at 25, done at 30: 15 s of
        // running in a 20 s session.
        let (s, _) = s.requeued(false, t(25), None, DAY, t(20));
        let s =
            s.claimed("w", lease(), t(25))
                .finished(SessionStatus::Completed, None, &p, DAY, t(30));
        assert_eq!(
            s.metrics.start_time,
            Some(t(10)),
            "the first attempt's start"
        );
        assert_eq!(s.metrics.duration(t(99)), Duration::from_secs(20));
        assert_eq!(s.metrics.running_time(t(99)), Duration::from_secs(15));
        assert!((s.metrics.processing_rate(t(99)) - 20.0 / 15.0).abs() < 1e-9);
        let outcomes: Vec<_> = s.attempts.iter().map(|a| (a.attempt, a.outcome)).collect();
        assert_eq!(
            outcomes,
            [
                (1, Some(AttemptOutcome::HandedBack)),
                (2, Some(AttemptOutcome::Completed))
            ]
        );
    }

    #[test]
    fn a_reclaimed_attempt_ran_until_its_last_checkpoint() {
        let p = Progress {
            records: 1,
            elements: 1,
            nonempty: true,
            ..Progress::default()
        };
        let s = pending(3)
            .claimed("w", lease(), t(10))
            .checkpointed(&p, lease(), t(14));
        let (s, _) = s.reclaimed(Duration::ZERO, DAY, t(100));
        assert_eq!(s.metrics.running_time(t(200)), Duration::from_secs(4));
        assert_eq!(s.attempts[0].ended_at, Some(t(14)));
    }

    #[test]
    fn usage_is_not_kept_when_token_tracking_is_off() {
        let mut s = pending(3);
        s.options.token_tracking = false;
        let p = Progress {
            records: 1,
            elements: 1,
            usage: TokenUsage {
                http_requests: 5,
                ..TokenUsage::default()
            },
            nonempty: true,
            ..Progress::default()
        };
        let s = s
            .claimed("w", lease(), t(1))
            .checkpointed(&p, lease(), t(2));
        assert_eq!(s.usage, TokenUsage::default());
        assert_eq!(s.records, 1);
    }

    #[test]
    fn a_session_keeps_its_newest_attempts() {
        let mut s = pending(u32::MAX);
        for i in 0..(ATTEMPTS_KEPT as i64 + 5) {
            s = s
                .claimed("w", lease(), t(i * 2))
                .requeued(false, t(i * 2 + 1), None, DAY, t(i * 2 + 1))
                .0;
        }
        assert_eq!(s.attempts.len(), ATTEMPTS_KEPT);
        assert_eq!(s.attempts.last().map(|a| a.attempt), Some(s.attempt));
    }

    #[test]
    fn requeue_without_error_clears_it_and_exhaustion_names_itself() {
        let s = pending(2).claimed("w", lease(), t(1));
        let err = SessionError::new(ErrorKind::JobFailed, "boom");
        let (r, _) = s.requeued(true, t(5), Some(err), DAY, t(2));
        assert_eq!(r.error.as_ref().map(|e| e.message.as_str()), Some("boom"));
        let (r, out) = r
            .claimed("w", lease(), t(6))
            .requeued(false, t(7), None, DAY, t(7));
        assert_eq!((out, r.error.clone()), (RequeueOutcome::Requeued, None));
        let (r, out) = r
            .claimed("w", lease(), t(8))
            .requeued(true, t(9), None, DAY, t(9));
        assert_eq!(out, RequeueOutcome::Failed);
        assert_eq!(r.error.map(|e| e.kind), Some(ErrorKind::AttemptsExhausted));
    }

    #[test]
    fn a_cancel_outlives_the_attempt() {
        let s = pending(3).claimed("w", lease(), t(1));
        let CancelDecision::Request(s) = s.cancel(DAY, t(2)) else {
            panic!("a running session gets the flag");
        };
        assert_eq!(s.cancel(DAY, t(3)), CancelDecision::AlreadyRequested);
        let (r, out) = s.reclaimed(Duration::ZERO, DAY, t(40));
        assert_eq!(
            (out, r.status),
            (RequeueOutcome::Cancelled, SessionStatus::Cancelled)
        );
        let (r, out) = s.requeued(false, t(5), None, DAY, t(5));
        assert_eq!(
            (out, r.status),
            (RequeueOutcome::Cancelled, SessionStatus::Cancelled)
        );
        assert_eq!(r.cancel(DAY, t(6)), CancelDecision::AlreadyTerminal);
    }

    #[test]
    fn a_session_timeout_of_its_own_decides_cleanup() {
        let mut s = pending(3);
        s.options.session_timeout_secs = Some(60);
        let CancelDecision::Cancel(c) = s.cancel(DAY, t(10)) else {
            panic!("a pending session is cancelled at once");
        };
        assert_eq!(c.cleanup_at, Some(t(70)));
        assert!(!c.cleanup_due(t(69)) && c.cleanup_due(t(70)));
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in ErrorKind::KNOWN {
            assert_eq!(ErrorKind::from(k.as_str()), k);
        }
        assert_eq!(
            ErrorKind::from("new_kind"),
            ErrorKind::Other("new_kind".into())
        );
        let e = SessionError::new("job_failed", "x");
        let bin = bincode::serde::encode_to_vec(&e, bincode::config::standard()).unwrap();
        let (back, _): (SessionError, usize) =
            bincode::serde::decode_from_slice(&bin, bincode::config::standard()).unwrap();
        assert_eq!(back, e);
        assert_eq!(serde_json::to_value(&e).unwrap()["kind"], "job_failed");
    }
}
