//! Server-Sent Events: `GET /v1/sessions/{id}/events` and `GET /v1/events`.
//!
//! Each stream reads the process-wide broadcast channel ([`crate::event::EventBus`]); publishing
//! never waits for a reader. A reader that falls more than the channel's capacity behind gets a
//! final `lagged` event and its stream ends: a slow consumer is dropped, it never slows workers
//! (it may reconnect, and a session stream starts again from the current state).
//!
//! The SSE `event:` field is the kind (`created`, `started`, `progress`, `completed`, `failed`,
//! `cancelled`, `requeued`, `removed`), the `data:` field an [`EventView`] as JSON. `progress` is
//! sent at most twice a second per session: progress events that come sooner are dropped (the
//! next one, or the terminal event, carries the newer state).
//!
//! A session stream first sends the session's current state as the event of its status
//! (`created` for PENDING, `started` for RUNNING, `completed`/`failed`/`cancelled` when it has
//! ended), then what happens to it, and ends after its terminal (or `removed`) event. The
//! all-sessions stream sends events from the moment it connects and does not end.
//!
//! Every event carries an SSE `id:` (see [`crate::event`]; the first state of a session stream
//! has none). A client that reconnects with `Last-Event-ID` (browsers' `EventSource` does it by
//! itself) first gets the events it missed, then the live ones, none twice: the all-sessions
//! stream the events of its client after that id, a session stream that session's (instead of
//! its current state). With PostgreSQL they come from the store's event log, kept
//! `sessions.event_retention_secs` (1 h by default), with every process's events; with sled
//! from the process's memory (its last [`crate::event::RING_MAX`] events, lost on restart).
//! When events after the id are no longer kept, the stream starts with a `reset` event saying
//! so. A replay sends at most 10,000 events.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::sessions::{owned_session, path_id, scope_client};
use super::view::{EventView, EventsQuery};
use crate::event::{Event, EventKind, EventScope};
use crate::session::{SessionId, SessionKey, SessionStatus, Timestamp};

/// Progress events of one session are at least this far apart.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Sessions whose last progress time the all-sessions stream remembers; beyond this it forgets
/// them all (throttling is a courtesy, memory is a bound).
const THROTTLE_MAX: usize = 10_000;

fn is_final(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Completed | EventKind::Failed | EventKind::Cancelled | EventKind::Removed
    )
}

fn sse_event(e: &Event, now: Timestamp) -> SseEvent {
    let view = EventView::of(e, now);
    let data = serde_json::to_string(&view).unwrap_or_else(|_| "{}".to_string());
    let ev = SseEvent::default().event(e.kind.as_str()).data(data);
    if e.id > 0 {
        ev.id(e.id.to_string())
    } else {
        ev
    }
}

fn reset_event(after: u64) -> SseEvent {
    SseEvent::default().event("reset").data(
        serde_json::json!({
            "message": format!(
                "events after id {after} are no longer kept; some were missed: read the current \
                 state of the sessions you follow"
            )
        })
        .to_string(),
    )
}

/// Most events replayed after a `Last-Event-ID`.
const REPLAY_MAX: usize = 10_000;

/// The `Last-Event-ID` header, if any.
fn last_event_id(headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default().trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ApiError::invalid(format!(
            "Last-Event-ID {text:?} is not an event id of this server (a number from an `id:` field)"
        ))
    })
}

/// The events in `scope` after `after`, and whether some were no longer kept.
async fn replay(
    st: &AppState,
    after: u64,
    scope: &EventScope,
) -> Result<(VecDeque<Event>, bool), ApiError> {
    let mut out = VecDeque::new();
    let mut cursor = after;
    let mut complete = true;
    loop {
        let (page, whole) = st.harvest.events_since(cursor, 1000, scope).await?;
        if cursor == after {
            complete = whole;
        }
        let Some(last) = page.last() else { break };
        cursor = last.id;
        let n = page.len();
        out.extend(page);
        if n < 1000 || out.len() >= REPLAY_MAX {
            break;
        }
    }
    Ok((out, complete))
}

fn lagged_event(missed: u64) -> SseEvent {
    SseEvent::default().event("lagged").data(
        serde_json::json!({
            "message": format!(
                "this stream fell {missed} events behind and was dropped; reconnect to continue"
            )
        })
        .to_string(),
    )
}

/// Events of one session.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/events",
    tag = "events",
    params(
        ("id" = String, Path, description = "Session id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id: replay this session's events since, instead of its current state"),
    ),
    responses(
        (status = 200, description = "text/event-stream of EventView objects; ends after the session's terminal event",
            content((EventView = "text/event-stream"))),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's)", body = ErrorBody),
    )
)]
pub async fn session_events(
    State(st): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = path_id(&id)?;
    let resume = last_event_id(&headers)?;
    // Subscribe before reading the state, so nothing that happens in between is missed.
    let rx = st.harvest.subscribe();
    let snapshot = owned_session(&st, &caller, &id).await?;
    let key = snapshot.key();
    if let Some(after) = resume {
        let (backlog, complete) = replay(&st, after, &EventScope::Session(key.clone())).await?;
        let feed = SessionFeed {
            st,
            rx,
            id: key,
            first: None,
            reset: (!complete).then_some(after),
            last_id: backlog.back().map_or(after, |e| e.id),
            backlog,
            last: None,
            last_progress: None,
            done: false,
        };
        return Ok(Sse::new(feed.into_stream()).keep_alive(KeepAlive::default()));
    }
    let first = Event {
        id: 0,
        kind: match snapshot.status {
            SessionStatus::Pending => EventKind::Created,
            other => EventKind::for_status(other),
        },
        session_id: snapshot.id.clone(),
        tenant: snapshot.tenant.clone(),
        client_id: snapshot.client.client_id().to_string(),
        session: Some(Box::new(snapshot)),
    };
    let feed = SessionFeed {
        st,
        rx,
        id: key,
        first: Some(first),
        reset: None,
        backlog: VecDeque::new(),
        last_id: 0,
        last: None,
        last_progress: None,
        done: false,
    };
    Ok(Sse::new(feed.into_stream()).keep_alive(KeepAlive::default()))
}

struct SessionFeed {
    st: AppState,
    rx: broadcast::Receiver<Event>,
    id: SessionKey,
    first: Option<Event>,
    /// Resumed after this id, but events after it were no longer kept.
    reset: Option<u64>,
    /// Replayed events still to send.
    backlog: VecDeque<Event>,
    /// The id of the last event sent (live events up to it were replayed).
    last_id: u64,
    /// Status and update time of the last state sent, to skip events already covered by it.
    last: Option<(SessionStatus, Timestamp)>,
    last_progress: Option<Instant>,
    done: bool,
}

impl SessionFeed {
    fn into_stream(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        futures::stream::unfold(self, |mut f| async move {
            if f.done {
                return None;
            }
            let ev = f.next().await?;
            Some((Ok(ev), f))
        })
    }

    async fn next(&mut self) -> Option<SseEvent> {
        let clock = self.st.harvest.clock().clone();
        let now = move || clock.now();
        if let Some(first) = self.first.take() {
            self.remember(&first);
            if first
                .session
                .as_ref()
                .is_some_and(|s| s.status.is_terminal())
            {
                self.done = true;
            }
            return Some(sse_event(&first, now()));
        }
        if let Some(after) = self.reset.take() {
            return Some(reset_event(after));
        }
        if let Some(e) = self.backlog.pop_front() {
            self.remember(&e);
            if is_final(e.kind) {
                self.done = true;
            }
            return Some(sse_event(&e, now()));
        }
        loop {
            match self.rx.recv().await {
                Ok(e) if e.session_id != self.id.id || e.tenant != self.id.client => continue,
                Ok(e) if e.id > 0 && e.id <= self.last_id => continue,
                Ok(e) => {
                    if e.kind != EventKind::Removed
                        && let (Some(s), Some((status, at))) = (&e.session, self.last)
                        && s.status == status
                        && s.updated_at <= at
                    {
                        // Already covered by the state sent (the snapshot raced this event).
                        continue;
                    }
                    if e.kind == EventKind::Progress {
                        let t = Instant::now();
                        if self
                            .last_progress
                            .is_some_and(|p| t.duration_since(p) < PROGRESS_INTERVAL)
                        {
                            continue;
                        }
                        self.last_progress = Some(t);
                    }
                    self.remember(&e);
                    if is_final(e.kind) {
                        self.done = true;
                    }
                    return Some(sse_event(&e, now()));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.done = true;
                    return Some(lagged_event(n));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn remember(&mut self, e: &Event) {
        if let Some(s) = &e.session {
            self.last = Some((s.status, s.updated_at));
        }
    }
}

/// Events of all sessions (of one client).
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id: replay the events since, then the live ones"),
    ),
    responses(
        (status = 200, description = "text/event-stream of EventView objects, from now on",
            content((EventView = "text/event-stream"))),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "client_id names another client", body = ErrorBody),
    )
)]
pub async fn all_events(
    State(st): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let client = scope_client(&caller, q.client_id)?;
    let resume = last_event_id(&headers)?;
    // Subscribe before reading the backlog, so nothing in between is missed.
    let rx = st.harvest.subscribe();
    let (backlog, complete) = match resume {
        Some(after) => {
            let scope = client.clone().map_or(EventScope::All, EventScope::Client);
            replay(&st, after, &scope).await?
        }
        None => (VecDeque::new(), true),
    };
    let feed = AllFeed {
        rx,
        reset: resume.filter(|_| !complete),
        last_id: backlog.back().map_or(resume.unwrap_or(0), |e| e.id),
        backlog,
        st,
        client,
        last_progress: HashMap::new(),
        done: false,
    };
    let stream = futures::stream::unfold(feed, |mut f| async move {
        if f.done {
            return None;
        }
        let ev = f.next().await?;
        Some((Ok(ev), f))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

struct AllFeed {
    st: AppState,
    rx: broadcast::Receiver<Event>,
    client: Option<String>,
    /// Resumed after this id, but events after it were no longer kept.
    reset: Option<u64>,
    /// Replayed events still to send.
    backlog: VecDeque<Event>,
    /// The id of the last event sent (live events up to it were replayed).
    last_id: u64,
    last_progress: HashMap<SessionId, Instant>,
    done: bool,
}

impl AllFeed {
    async fn next(&mut self) -> Option<SseEvent> {
        if let Some(after) = self.reset.take() {
            return Some(reset_event(after));
        }
        if let Some(e) = self.backlog.pop_front() {
            return Some(sse_event(&e, self.st.harvest.clock().now()));
        }
        loop {
            match self.rx.recv().await {
                Ok(e) if e.id > 0 && e.id <= self.last_id => continue,
                Ok(e) => {
                    if self.client.as_ref().is_some_and(|c| *c != e.client_id) {
                        continue;
                    }
                    if e.kind == EventKind::Progress {
                        let t = Instant::now();
                        if self
                            .last_progress
                            .get(&e.session_id)
                            .is_some_and(|p| t.duration_since(*p) < PROGRESS_INTERVAL)
                        {
                            continue;
                        }
                        if self.last_progress.len() >= THROTTLE_MAX {
                            self.last_progress.clear();
                        }
                        self.last_progress.insert(e.session_id.clone(), t);
                    } else if is_final(e.kind) {
                        self.last_progress.remove(&e.session_id);
                    }
                    return Some(sse_event(&e, self.st.harvest.clock().now()));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.done = true;
                    return Some(lagged_event(n));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
