//! The LISTEN side of `pending_wait` and `cancel_requests`: one dedicated connection per store,
//! outside the pool, that listens on [`PENDING_CHANNEL`] (waking local waiters on every
//! notification) and [`CANCEL_CHANNEL`] (relaying the ids of sessions to stop to this process's
//! workers).
//!
//! tokio-postgres delivers notifications through `Connection::poll_message`, so the connection
//! is driven here rather than by a plain `tokio::spawn(connection)`. When the connection drops
//! the task reconnects with a capped backoff; waiters are woken after each reconnect because a
//! notification sent while disconnected is lost (spurious wakeups are allowed, lost ones are not
//! worse than the caller's timeout).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::session::{SessionId, SessionKey};

/// The channel `session_insert`, requeue and reclaim notify, with the schema name as payload.
pub(crate) const PENDING_CHANNEL: &str = "harvest_pending";

/// The channel a cancel of a RUNNING session notifies, with `schema:session id` as payload.
pub(crate) const CANCEL_CHANNEL: &str = "harvest_cancel";

/// The channel the store notifies after a transition recorded events (see `events.rs`), with
/// the schema name as payload.
pub(crate) const EVENTS_CHANNEL: &str = "harvest_events";

/// First and largest pause between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Wakes every current waiter and leaves one permit for a caller that is between its empty
/// claim and its wait, so that caller does not sleep through the notification.
pub(crate) fn wake(notify: &Notify) {
    notify.notify_waiters();
    notify.notify_one();
}

/// Runs until `stop` is cancelled. `ready` is true while the LISTEN is in effect.
pub(crate) async fn run(
    config: tokio_postgres::Config,
    schema: String,
    notify: Arc<Notify>,
    events: Arc<Notify>,
    cancels: broadcast::Sender<SessionKey>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    while !stop.is_cancelled() {
        match listen_once(&config, &schema, &notify, &events, &cancels, &ready, &stop).await {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => crate::store::outage::unavailable("listening for notifications", &e),
        }
        ready.send_replace(false);
        // Jitter spreads the reconnects of many processes after a server restart.
        let jitter = Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life: connect, LISTEN, forward notifications until it ends.
async fn listen_once(
    config: &tokio_postgres::Config,
    schema: &str,
    notify: &Arc<Notify>,
    events: &Arc<Notify>,
    cancels: &broadcast::Sender<SessionKey>,
    ready: &watch::Sender<bool>,
    stop: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let cancels = cancels.clone();
    let (closed_tx, mut closed_rx) =
        tokio::sync::oneshot::channel::<Option<tokio_postgres::Error>>();
    let forward = Arc::clone(notify);
    let forward_events = Arc::clone(events);
    let schema_owned = schema.to_string();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let mut end = None;
        while let Some(message) = messages.next().await {
            match message {
                // Other schemas (tests, other deployments) share the channels; their
                // notifications are not ours.
                Ok(AsyncMessage::Notification(n)) if n.channel() == CANCEL_CHANNEL => {
                    let id = parse_cancel_payload(&schema_owned, n.payload());
                    if let Some(id) = id {
                        // No receiver is fine: no worker runs in this process.
                        let _ = cancels.send(id);
                    }
                }
                Ok(AsyncMessage::Notification(n))
                    if n.channel() == EVENTS_CHANNEL && n.payload() == schema_owned =>
                {
                    wake(&forward_events)
                }
                Ok(AsyncMessage::Notification(n)) if n.payload() == schema_owned => wake(&forward),
                Ok(_) => {}
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        let _ = closed_tx.send(end);
    });

    let result = async {
        client
            .batch_execute(&format!(
                "LISTEN {PENDING_CHANNEL}; LISTEN {CANCEL_CHANNEL}; LISTEN {EVENTS_CHANNEL}"
            ))
            .await?;
        ready.send_replace(true);
        crate::store::outage::answered("listening for notifications");
        // Anything submitted (or any event) while we were not listening would otherwise wait
        // for a timeout.
        wake(notify);
        wake(events);
        tokio::select! {
            () = stop.cancelled() => Ok(()),
            end = &mut closed_rx => match end {
                Ok(Some(e)) => Err(e),
                _ => Ok(()),
            },
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// What the announcer owes the other processes: a NOTIFY on [`PENDING_CHANNEL`] (a session
/// became claimable), on [`EVENTS_CHANNEL`] (a transition recorded events), or both.
#[derive(Debug, Default)]
pub(crate) struct Announcements {
    pending: AtomicBool,
    events: AtomicBool,
    signal: Notify,
}

impl Announcements {
    /// Asks for a NOTIFY on [`PENDING_CHANNEL`].
    pub(crate) fn pending(&self) {
        self.pending.store(true, Ordering::Release);
        self.signal.notify_one();
    }

    /// Asks for a NOTIFY on [`EVENTS_CHANNEL`].
    pub(crate) fn events(&self) {
        self.events.store(true, Ordering::Release);
        self.signal.notify_one();
    }
}

/// Least time from one NOTIFY statement to the next ([`announce`]). A request after a quiet
/// spell is sent at once; under load the requests of one gap share one statement.
pub(crate) const NOTIFY_GAP: Duration = Duration::from_millis(10);

/// Sends the NOTIFYs of `owed` after the commits that asked for them, coalescing bursts: every
/// request that arrives while one statement is in flight, or within [`NOTIFY_GAP`] of the last
/// one, is answered by one more statement when the gap is over; when both channels are owed
/// one statement notifies both (a process that takes submissions owes both after each; two
/// statements were a third of everything it sent).
///
/// The gap bounds this process's NOTIFYs to 100 a second. Without it a busy process sent one
/// per batch of commits (`bench queue`, PostgreSQL end-to-end phase: 1,336 NOTIFY statements
/// beside 4,300 others for 5,000 sessions), and each is a transaction PostgreSQL must commit and
/// deliver to every listening connection, this process's own listener included. A listener in
/// another process hears of a burst's later sessions at most one gap late; an isolated
/// submission is announced at once.
///
/// Not sent inside the writing transaction: a transaction that notifies takes a database-wide
/// lock at commit that serializes all such commits and defeats group commit (pgbench, 8
/// clients, this machine: 3,300 inserts/s plain, 500/s with `pg_notify` in each). Sent after
/// the commit the data is already visible when a listener wakes; a crash between commit and
/// NOTIFY costs other processes at most their poll interval.
///
/// A NOTIFY's transaction takes a transaction id, so its commit writes a WAL record and, by
/// default, waits for the WAL flush like a data commit does. Nothing here needs that: a
/// notification is delivered at commit, and one lost in a crash costs a poll interval. So the
/// statement commits asynchronously (`SET LOCAL synchronous_commit TO off`, in the same implicit
/// transaction: one simple-query message, one round trip, rolled back whole on an error).
pub(crate) async fn announce(
    pool: deadpool_postgres::Pool,
    schema: String,
    owed: Arc<Announcements>,
    stop: CancellationToken,
) {
    // The schema is validated (`[a-z0-9_]`); quoted as a literal all the same.
    let payload = format!("'{}'", schema.replace('\'', "''"));
    let notify = |channels: &[&str]| {
        let calls: Vec<String> = channels
            .iter()
            .map(|c| format!("pg_notify('{c}', {payload})"))
            .collect();
        format!(
            "SET LOCAL synchronous_commit TO off; SELECT {}",
            calls.join(", ")
        )
    };
    let notify_pending = notify(&[PENDING_CHANNEL]);
    let notify_events = notify(&[EVENTS_CHANNEL]);
    let notify_both = notify(&[PENDING_CHANNEL, EVENTS_CHANNEL]);
    // Bounded by `stop`; a request already made when the store stops is still sent (biased
    // select), so a process that submits and exits at once does not lose its NOTIFY.
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = owed.signal.notified() => {}
            () = stop.cancelled() => return,
        }
        if let Some(at) = last_sent {
            // What arrives meanwhile joins this statement. A stop ends the wait, not the send.
            tokio::select! {
                () = tokio::time::sleep_until(at + NOTIFY_GAP) => {}
                () = stop.cancelled() => {}
            }
        }
        let pending = owed.pending.swap(false, Ordering::AcqRel);
        let events = owed.events.swap(false, Ordering::AcqRel);
        let sql = match (pending, events) {
            (false, false) => continue,
            (true, false) => &notify_pending,
            (false, true) => &notify_events,
            (true, true) => &notify_both,
        };
        last_sent = Some(tokio::time::Instant::now());
        let sent = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client.batch_execute(sql).await.map_err(|e| e.to_string())
        }
        .await;
        match sent {
            Ok(_) => crate::store::outage::answered("NOTIFY to other processes"),
            Err(e) => crate::store::outage::unavailable("NOTIFY to other processes", &e),
        }
    }
}

/// The payload of a cancel notification: the schema, the tenant and the session id as a JSON
/// array (a tenant may hold any character, so no separator would do).
pub(super) fn cancel_payload(schema: &str, key: &SessionKey) -> String {
    serde_json::json!([schema, key.tenant(), key.id.as_str()]).to_string()
}

/// The session of a cancel notification for `schema`; `None` for another schema's, or for one
/// that is not a cancel payload.
fn parse_cancel_payload(schema: &str, payload: &str) -> Option<SessionKey> {
    let (s, tenant, id): (String, String, String) = serde_json::from_str(payload).ok()?;
    if s != schema {
        return None;
    }
    Some(SessionKey::new(Some(&tenant), SessionId::parse(&id).ok()?))
}
