//! What follows a session's transition once the store has applied it, in one place: metrics,
//! the event subscribers see, the cleanup of exported rows, and the commit observer of a local
//! run. Every path that changes a session (workers, maintenance, cancel, close, agent runs,
//! startup recovery) calls these, so a transition cannot be counted in one path and forgotten in
//! another.

use std::sync::Arc;

use crate::event::{CreatingGuard, EventBus, EventKind};
use crate::session::{Session, SessionStatus};
use crate::sink::Sinks;
use crate::store::CheckpointBatch;

/// Told of every committed checkpoint of this process's attempts, in commit order, before the
/// job is told the commit succeeded (`harvest run` prints the records here, so that a record
/// reaches stdout only once it can never be produced again).
pub trait CommitObserver: Send + Sync {
    /// `session` is the session after the commit; `batch` what it committed (its records are
    /// numbered from `session.records - batch.records.len()`). An error
    /// abandons the attempt: it stops and writes nothing more.
    fn committed(&self, session: &Session, batch: &CheckpointBatch) -> Result<(), String>;
}

/// The effects of transitions: cheap to clone.
#[derive(Clone)]
pub struct Effects {
    events: EventBus,
    sinks: Arc<Sinks>,
    observer: Option<Arc<dyn CommitObserver>>,
}

impl Effects {
    /// Effects publishing on `events` and cleaning up through `sinks`.
    pub fn new(
        events: EventBus,
        sinks: Arc<Sinks>,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> Effects {
        Effects {
            events,
            sinks,
            observer,
        }
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The export sinks.
    pub fn sinks(&self) -> &Arc<Sinks> {
        &self.sinks
    }

    /// Whether a commit observer wants batches (so callers keep a copy of what they commit).
    pub fn observes_commits(&self) -> bool {
        self.observer.is_some()
    }

    /// A session was stored (submit): counted, and `created` published through the guard taken
    /// before the insert (so its `started` cannot overtake it).
    pub fn created(&self, session: &Session, guard: CreatingGuard) {
        crate::metrics::session_submitted(session.client.client_id());
        guard.created(session);
    }

    /// A worker claimed the session (an attempt starts).
    pub async fn started(&self, session: &Session) {
        self.events.publish_started(session).await;
    }

    /// A checkpoint committed `batch` (given when a copy was kept for the observer) with these
    /// deltas; `session` is the session after it.
    pub fn checkpointed(
        &self,
        session: &Session,
        counts: crate::metrics::BatchCounts,
        batch: Option<&CheckpointBatch>,
    ) -> Result<(), String> {
        counts.record();
        if let (Some(o), Some(b)) = (&self.observer, batch) {
            o.committed(session, b)?;
        }
        if session.status == SessionStatus::Running {
            self.events.publish(EventKind::Progress, session);
        }
        Ok(())
    }

    /// The session moved to a new status by anything but a claim: PENDING again (`requeued`)
    /// or terminal (counted as finished, with its event).
    pub fn transitioned(&self, session: Session) {
        match session.status {
            SessionStatus::Pending => self.events.publish_owned(EventKind::Requeued, session),
            SessionStatus::Running => {}
            status => {
                crate::metrics::session_finished(&session);
                self.events
                    .publish_owned(EventKind::for_status(status), session);
            }
        }
    }

    /// Sessions were removed (close, cleanup, a single agent's new run): counted, `removed`
    /// published, and their exported rows removed where `cleanup_external` asks.
    pub async fn removed(&self, sessions: &[Session]) {
        for s in sessions {
            crate::metrics::session_cleaned();
            self.events.publish(EventKind::Removed, s);
        }
        crate::sink::cleanup_removed(&self.sinks, sessions).await;
    }
}
