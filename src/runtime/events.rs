//! The event feed: when the store records events ([`Store::events_recorded`]), one task per
//! process reads the store's log in id order and delivers it to the process's event bus, so
//! every process's subscribers (SSE streams, the library's subscription) see every session's
//! events, whichever process made them, in order per session.
//!
//! It starts after the newest event at start (subscribers see events from then on; older ones
//! are read from the store by `Last-Event-ID` resume). While the process has no subscriber it
//! only follows the log's end, at most every [`END_EVERY`], instead of reading every event: a
//! worker process never has one, and reading rebuilt three sessions per session run. (Reading
//! the end at every wake-up was a third of the statements a PostgreSQL process sent while it
//! took submissions.) A subscriber that comes may therefore also get up to [`END_EVERY`] of the
//! events from before it came, never miss one after. It wakes on the store's signal and
//! polls at least every [`POLL`] (a notification lost in an outage costs at most that). After
//! a failed read it continues from the last id it delivered, so nothing is missed across an
//! outage. A gap in the ids (an event whose transaction has not committed yet) is waited for
//! up to [`GAP_GRACE`]: ids are taken when the transition writes its event, so a later id can
//! become visible first; after the grace the missing id is taken as rolled back and skipped.
//! A busy feed (its last read found more than one event) reads at most every [`READ_EVERY`] (a
//! full page excepted), so the commits of a busy process share reads.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::EventBus;
use crate::store::{EVENTS_PAGE_MAX, EventsAfter, Store};

/// Longest wait for a notification before reading anyway.
pub const POLL: Duration = Duration::from_secs(1);

/// How long a gap in the ids is waited for before it is skipped.
pub const GAP_GRACE: Duration = Duration::from_secs(3);

/// How often the feed reads events, at most, while it is busy (its last read found more than
/// one event). A busy process's commits each wake the feed, and one read per wake-up was a
/// quarter of the statements of a PostgreSQL process running the end-to-end bench; a read per
/// 5 ms takes the events of every commit meanwhile. (`bench queue`, end to end on PostgreSQL,
/// alternating with one read per wake-up: 1.01-1.10× the sessions per second, and a lower p99
/// latency.) A quiet feed reads at once: waiting always took a session's `started` event in an
/// idle queue from 4.0-4.6 ms after its submission to 6.0-6.2 ms (its `created` event had just
/// been read).
pub const READ_EVERY: Duration = Duration::from_millis(5);

/// How often a process with no subscriber reads the log's end, at most.
pub const END_EVERY: Duration = Duration::from_millis(200);

/// Pause after a failed read.
const RETRY: Duration = Duration::from_millis(500);

/// Reads the store's log into `bus` until `stop`.
pub async fn feed(store: Arc<dyn Store>, bus: EventBus, stop: CancellationToken) {
    const WHAT: &str = "reading session events";
    let mut last = loop {
        match store.events_last_id().await {
            Ok(id) => break id,
            Err(e) => {
                crate::store::outage::unavailable(WHAT, &e);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    // The first missing id and since when it is missed.
    let mut gap: Option<(u64, Instant)> = None;
    // When the log's end was last read with no subscriber.
    let mut end_read: Option<Instant> = None;
    // When events were last read.
    let mut read_at: Option<Instant> = None;
    // Whether the last read found more than one event.
    let mut busy = false;
    while !stop.is_cancelled() {
        if !bus.has_subscribers() {
            // Nobody in this process listens (a worker process, a server with no stream
            // open): keep up with the log's end instead of reading and rebuilding every event,
            // and not at every commit's wake-up: a subscriber that comes starts at most
            // END_EVERY behind. The end is read before the check, so an event committed after
            // a subscriber came is past it and delivered by the next read.
            if let Some(left) = end_read.and_then(|at| END_EVERY.checked_sub(at.elapsed()))
                && !left.is_zero()
            {
                // A commit's wake-up still ends the wait: a subscriber that came meanwhile
                // gets its events at once.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = store.events_wait(left) => {}
                }
                continue;
            }
            match store.events_last_id().await {
                Ok(id) if !bus.has_subscribers() => {
                    last = last.max(id);
                    gap = None;
                    end_read = Some(Instant::now());
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = store.events_wait(POLL) => {}
                    }
                    continue;
                }
                // A subscriber came meanwhile: read from where the feed was.
                Ok(_) => {}
                Err(e) => {
                    crate::store::outage::unavailable(WHAT, &e);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                    continue;
                }
            }
        }
        // While busy, at most one read per READ_EVERY: the events of the commits meanwhile
        // come in it.
        if let Some(at) = read_at
            && busy
            && at.elapsed() < READ_EVERY
        {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(at + READ_EVERY) => {}
            }
        }
        read_at = Some(Instant::now());
        let events = match store
            .events_after(EventsAfter {
                after: last,
                limit: 1000.min(EVENTS_PAGE_MAX),
                scope: crate::event::EventScope::All,
            })
            .await
        {
            Ok(events) => {
                crate::store::outage::answered(WHAT);
                events
            }
            Err(e) => {
                if e.is_unavailable() {
                    crate::store::outage::unavailable(WHAT, &e);
                } else {
                    tracing::error!(error = %e, "reading session events failed; retrying");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
                continue;
            }
        };
        let full = events.len() >= 1000;
        busy = events.len() > 1;
        let mut waiting = false;
        for e in events {
            if e.id > last + 1 {
                let now = Instant::now();
                match gap {
                    Some((missing, since))
                        if missing == last + 1 && now.duration_since(since) >= GAP_GRACE =>
                    {
                        tracing::debug!(
                            from = last + 1,
                            to = e.id - 1,
                            "event ids never committed; skipping them"
                        );
                    }
                    Some((missing, _)) if missing == last + 1 => {
                        waiting = true;
                        break;
                    }
                    _ => {
                        gap = Some((last + 1, now));
                        waiting = true;
                        break;
                    }
                }
            }
            gap = None;
            last = e.id;
            bus.feed(e);
        }
        if full && !waiting {
            // More are waiting: read them at once.
            read_at = None;
            continue;
        }
        let pause = if waiting {
            Duration::from_millis(50)
        } else {
            POLL
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = store.events_wait(pause) => {}
        }
    }
}
