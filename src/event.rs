//! Session events, fanned out to subscribers on a tokio broadcast channel.
//!
//! Publishing never blocks: a subscriber that falls more than the channel's capacity behind
//! loses the oldest events (it sees `Lagged`), so a slow consumer can never stall a worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::session::{Session, SessionId, SessionKey, SessionStatus};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Submitted and durable.
    Created,
    /// Claimed by a worker (each attempt).
    Started,
    /// A checkpoint was committed (throttled by consumers that show it).
    Progress,
    /// Ended COMPLETED.
    Completed,
    /// Ended FAILED.
    Failed,
    /// Ended CANCELLED.
    Cancelled,
    /// Handed back to PENDING (retry, reclaim or shutdown).
    Requeued,
    /// Removed (close, cleanup, or a single agent's new run).
    Removed,
}

impl EventKind {
    /// The event that a terminal status produces.
    pub fn for_status(status: SessionStatus) -> EventKind {
        match status {
            SessionStatus::Completed => EventKind::Completed,
            SessionStatus::Failed => EventKind::Failed,
            SessionStatus::Cancelled => EventKind::Cancelled,
            SessionStatus::Running => EventKind::Started,
            SessionStatus::Pending => EventKind::Requeued,
        }
    }

    /// Lower-case name (the SSE `event:` field).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Requeued => "requeued",
            EventKind::Removed => "removed",
        }
    }
}

/// One event about one session.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// Which session.
    pub session_id: SessionId,
    /// The tenant whose namespace holds the id (see [`SessionKey`]); not serialized.
    #[serde(skip)]
    pub tenant: Option<String>,
    /// Its owner.
    pub client_id: String,
    /// The session after the change (`None` for `removed` when it was already gone).
    pub session: Option<Box<Session>>,
}

impl Event {
    /// The session's key (tenant and id).
    pub fn key(&self) -> SessionKey {
        SessionKey {
            client: self.tenant.clone(),
            id: self.session_id.clone(),
        }
    }
}

/// The process-wide event channel.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    /// Sessions being submitted whose `created` event is not out yet. A worker can claim a
    /// session the moment it is stored, before the submitter publishes `created`; its `started`
    /// waits here so subscribers always see `created` first.
    creating: Arc<Mutex<HashMap<SessionKey, watch::Receiver<bool>>>>,
}

/// Held by a submitter between storing a session and publishing its `created` event.
pub struct CreatingGuard {
    bus: EventBus,
    id: SessionKey,
    done: watch::Sender<bool>,
}

impl CreatingGuard {
    /// Publishes `created` and releases whoever waits to publish `started`.
    pub fn created(self, session: &Session) {
        self.bus.publish(EventKind::Created, session);
    }
}

impl Drop for CreatingGuard {
    fn drop(&mut self) {
        self.bus
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let _ = self.done.send(true);
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(4096)
    }
}

impl EventBus {
    /// A bus whose subscribers may fall `capacity` events behind before losing the oldest.
    pub fn new(capacity: usize) -> EventBus {
        let (tx, _) = broadcast::channel(capacity.max(16));
        EventBus {
            tx,
            creating: Arc::default(),
        }
    }

    /// Publishes (never blocks; no subscribers is fine).
    pub fn publish(&self, kind: EventKind, session: &Session) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Event {
            kind,
            session_id: session.id.clone(),
            tenant: session.tenant.clone(),
            client_id: session.client.client_id().to_string(),
            session: Some(Box::new(session.clone())),
        });
    }

    /// Marks a session as being created (call before storing it).
    pub fn creating(&self, id: &SessionKey) -> CreatingGuard {
        let (done, rx) = watch::channel(false);
        self.creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), rx);
        CreatingGuard {
            bus: self.clone(),
            id: id.clone(),
            done,
        }
    }

    /// Publishes `started` once the session's `created` is out (waits at most a second: the
    /// submitter publishes right after its store call returns).
    pub async fn publish_started(&self, session: &Session) {
        let pending = self
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session.key())
            .cloned();
        if let Some(mut rx) = pending {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|done| *done)).await;
        }
        self.publish(EventKind::Started, session);
    }

    /// Whether anyone listens (lets publishers skip building events nobody reads).
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new subscription that sees events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
