//! Session events, fanned out to subscribers on a tokio broadcast channel.
//!
//! Publishing never blocks: a subscriber that falls more than the channel's capacity behind
//! loses the oldest events (it sees `Lagged`), so a slow consumer can never stall a worker.
//!
//! Every event has an id, increasing in the order events are delivered, for SSE `id:` fields
//! and `Last-Event-ID` resume. Where they come from depends on the store:
//!
//! - a store of one process (sled): the bus numbers the events the process publishes, starting
//!   from the start time in microseconds (so ids keep increasing across restarts), and keeps the
//!   last [`RING_MAX`] in memory for resume ([`EventBus::since`]);
//! - a store that records events itself (PostgreSQL, shared by many processes): the store writes
//!   each event with the transition that causes it, and the bus is [fed](EventBus::feed) from
//!   the store's log in id order by the runtime (so every process sees every session's events,
//!   in order per session); what the process itself would publish is dropped
//!   ([`EventBus::set_external`]). Resume reads the store's log.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Events a bus of one process keeps for `Last-Event-ID` resume.
pub const RING_MAX: usize = 4096;

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<EventKind, String> {
        Ok(match s {
            "created" => EventKind::Created,
            "started" => EventKind::Started,
            "progress" => EventKind::Progress,
            "completed" => EventKind::Completed,
            "failed" => EventKind::Failed,
            "cancelled" => EventKind::Cancelled,
            "requeued" => EventKind::Requeued,
            "removed" => EventKind::Removed,
            other => return Err(format!("unknown event kind {other:?}")),
        })
    }
}

/// One event about one session.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Position in the event log (see the module docs); 0 for a state that is not a logged
    /// event (the first message of a session stream).
    pub id: u64,
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

/// Which events a reader wants: a `Last-Event-ID` resume of one session's stream, or of one
/// client's, reads only those (the store filters them, so a resume does not read every
/// tenant's events to keep a few).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EventScope {
    /// Every event.
    #[default]
    All,
    /// The events of sessions owned by this client.
    Client(String),
    /// The events of this session.
    Session(SessionKey),
}

impl EventScope {
    /// Whether `e` is in the scope.
    pub fn matches(&self, e: &Event) -> bool {
        match self {
            EventScope::All => true,
            EventScope::Client(c) => *c == e.client_id,
            EventScope::Session(k) => k.id == e.session_id && k.client == e.tenant,
        }
    }
}

/// The process-wide event channel.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    /// The last events and the last id given (own numbering only).
    ring: Arc<Mutex<Ring>>,
    /// The store records events: `publish` drops, `feed` delivers.
    external: Arc<AtomicBool>,
    /// Sessions being submitted whose `created` event is not out yet. A worker can claim a
    /// session the moment it is stored, before the submitter publishes `created`; its `started`
    /// waits here so subscribers always see `created` first.
    creating: Arc<Mutex<HashMap<SessionKey, watch::Receiver<bool>>>>,
}

#[derive(Debug)]
struct Ring {
    last_id: u64,
    events: VecDeque<Event>,
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
        // Microseconds since the epoch: a restarted process continues above the ids it gave
        // before (unless it published a million events a second).
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        EventBus {
            tx,
            ring: Arc::new(Mutex::new(Ring {
                last_id: start,
                events: VecDeque::new(),
            })),
            external: Arc::default(),
            creating: Arc::default(),
        }
    }

    /// The store records every event (see the module docs): from now on `publish` drops what
    /// this process would publish, and only [`EventBus::feed`] delivers.
    pub fn set_external(&self) {
        self.external.store(true, Ordering::SeqCst);
    }

    /// Whether events come from the store (see [`EventBus::set_external`]).
    pub fn is_external(&self) -> bool {
        self.external.load(Ordering::SeqCst)
    }

    /// Publishes an event of this process (never blocks; no subscribers is fine). Dropped when
    /// the store records events.
    pub fn publish(&self, kind: EventKind, session: &Session) {
        if self.is_external() {
            return;
        }
        self.publish_owned(kind, session.clone());
    }

    /// [`EventBus::publish`] of a session the caller no longer needs: the event keeps it
    /// without a copy (every finish publishes one; the copy and its drop were about 2% of the
    /// instructions of a sled burn-down per session).
    pub fn publish_owned(&self, kind: EventKind, session: Session) {
        if self.is_external() {
            return;
        }
        // Built before the lock and the oldest event dropped after it: every worker's
        // transitions publish here, and the lock only numbers the event.
        let mut event = Event {
            id: 0,
            kind,
            session_id: session.id.clone(),
            tenant: session.tenant.clone(),
            client_id: session.client.client_id().to_string(),
            session: Some(Box::new(session)),
        };
        let _dropped = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.last_id += 1;
            event.id = ring.last_id;
            let dropped = if ring.events.len() >= RING_MAX {
                ring.events.pop_front()
            } else {
                None
            };
            // Sent under the lock, so subscribers see ids in increasing order; copied only for
            // a subscriber (the ring keeps the event for Last-Event-ID either way).
            if self.tx.receiver_count() > 0 {
                let _ = self.tx.send(event.clone());
            }
            ring.events.push_back(event);
            dropped
        };
    }

    /// Delivers an event read from the store's log (ids increasing).
    pub fn feed(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    /// This process's events in `scope` after `after`, oldest first, at most `limit` (own numbering only;
    /// empty when the store records events: read its log instead). `complete` is false when
    /// events after `after` were already dropped from the ring.
    pub fn since(&self, after: u64, limit: usize, scope: &EventScope) -> (Vec<Event>, bool) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let complete = ring
            .events
            .front()
            .is_none_or(|first| first.id <= after.saturating_add(1))
            || after >= ring.last_id;
        let out = ring
            .events
            .iter()
            .filter(|e| e.id > after && scope.matches(e))
            .take(limit)
            .cloned()
            .collect();
        (out, complete)
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
        if let Some(mut rx) = pending.filter(|_| !self.is_external()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{ClientContext, JobSpec, Timestamp};

    fn session(client: &str, tenant: Option<&str>, id: &str) -> Session {
        let mut s = Session::pending(
            SessionId::parse(id).expect("id"),
            ClientContext::of(client),
            JobSpec {
                config: serde_json::json!({}).into(),
                params: Default::default(),
                agent: None,
            },
            Default::default(),
            Timestamp(0),
        );
        s.tenant = tenant.map(str::to_string);
        s
    }

    /// A resume reads only its scope from the ring; a session's scope tells tenants' equal ids
    /// apart; the limit counts events in the scope.
    #[test]
    fn since_keeps_only_the_scope() {
        let bus = EventBus::default();
        let a = session("alice", Some("alice"), "same");
        let b = session("bob", Some("bob"), "same");
        let c = session("alice", Some("alice"), "other");
        for s in [&a, &b, &c, &a, &b] {
            bus.publish(EventKind::Created, s);
        }
        let first = bus.since(0, 10, &EventScope::All).0[0].id;
        let ids = |scope: EventScope, limit: usize| -> Vec<u64> {
            bus.since(first - 1, limit, &scope)
                .0
                .iter()
                .map(|e| e.id - first)
                .collect()
        };
        assert_eq!(ids(EventScope::All, 10), [0, 1, 2, 3, 4]);
        assert_eq!(ids(EventScope::Client("alice".into()), 10), [0, 2, 3]);
        assert_eq!(ids(EventScope::Session(b.key()), 10), [1, 4]);
        assert_eq!(ids(EventScope::Session(a.key()), 1), [0]);
        assert!(ids(EventScope::Client("carol".into()), 10).is_empty());
    }
}
