//! Batched completions: the attempts of one process end their sessions through one
//! [`Finisher`], which hands every finish waiting at that moment to the store as one
//! [`Store::session_finish_many`] (one flush on sled, one transaction on PostgreSQL).
//!
//! Nothing waits to fill a batch. A finish that arrives while the store is idle goes alone at
//! once; finishes that arrive while [`IN_FLIGHT`] batches are being written (on PostgreSQL,
//! while one is and for up to [`OVERLAP_AFTER`]) queue up and go together as the next batch.
//! So an idle queue pays no latency, and a busy one pays one durable commit per batch instead
//! of one per session. Each attempt still gets its own answer and keeps its own retries: a
//! finish is a compare-and-set on (status, attempt, owner), so batching changes when it is
//! written, never what.

use std::sync::Arc;

use super::batch::{BatchWrite, Batcher, Lanes, unanswered, write_batch};
use crate::session::Session;
use crate::store::{SessionFinish, Store, StoreResult};

/// Most finishes in one batch.
pub(crate) const FINISH_BATCH_MAX: usize = 256;

/// Batches being written at once. More than one lets the next batch be staged (sled) while
/// the previous one waits for its flush, and keeps finishes going while one batch waits on a
/// row lock another process holds (PostgreSQL): with one batch in flight, one such finish
/// stalled every finish of the process
/// (`prefetch::a_finishing_attempt_frees_its_slot_for_the_next_session`).
const IN_FLIGHT: usize = 2;

/// On a store that [`Store::batches_one_at_a_time`] (PostgreSQL), how long a batch waits for
/// the one being written before it goes beside it. A finish UPDATE there executes in about
/// 0.2 ms plus 50 µs per row (`pg_stat_statements`), and then commits; with the second lane
/// open at once, the end-to-end phase of `bench queue` wrote 6.7 finishes per UPDATE, at 85 µs
/// each. Waiting up to 10 ms (longer than an UPDATE of a few dozen rows and its commit take,
/// short beside a lock wait worth routing around) gave 1.07-1.34x the sessions per second end
/// to end in 8 alternating pairs (median 1.11x; 3.8-4.6k → 4.3-5.1k/s), as much as one lane
/// only did (3 ms: about 1.1x as well, 50 ms the same); the burn-down, whose 256-row
/// statements take about 13 ms, still opens both lanes.
const OVERLAP_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// Attempts that may wait for their finish without holding a worker slot
/// ([`Slot`](super::worker::Slot)): as many as the batches in flight can carry, so more would
/// not be written any sooner.
pub(crate) const FINISHING_MAX: usize = FINISH_BATCH_MAX * IN_FLIGHT;

/// Hands finishes to the store in batches. Cloned into every attempt; the batching task ends
/// when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Finisher(Batcher<SessionFinish, StoreResult<Option<Session>>>);

impl Finisher {
    /// Starts the batching task; the handle ends once every [`Finisher`] clone is dropped and
    /// the batches in flight are written (it then no longer holds the store).
    pub(crate) fn start(store: Arc<dyn Store>) -> (Finisher, tokio::task::JoinHandle<()>) {
        let lanes = if store.batches_one_at_a_time() {
            Lanes {
                max: IN_FLIGHT,
                overlap_after: OVERLAP_AFTER,
            }
        } else {
            Lanes::at_once(IN_FLIGHT)
        };
        let (batcher, task) = Batcher::start(FINISH_BATCH_MAX, lanes, move |batch| {
            let store = store.clone();
            async move { write_batch(&Finishes(&*store), batch).await }
        });
        (Finisher(batcher), task)
    }

    /// [`Store::session_finish_if_running`], written together with whatever other finishes
    /// are waiting.
    pub(crate) async fn finish(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        // No answer only if the batching task is gone, which it is not while a clone lives (it
        // ends when the last one is dropped); said as an outage, so the attempt retries.
        self.0.call(p).await.unwrap_or_else(|| {
            Err(unanswered(
                "finishes",
                "the finish was dropped before it was written",
            ))
        })
    }
}

/// A batch of finishes: an attempt whose finish got an outage retries it on its own, as after
/// a single finish ([`write_batch`]).
struct Finishes<'a>(&'a dyn Store);

#[async_trait::async_trait]
impl BatchWrite<SessionFinish, Option<Session>> for Finishes<'_> {
    const WHAT: &'static str = "finishes";

    async fn one(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        self.0.session_finish_if_running(p).await
    }

    async fn many(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        self.0.session_finish_many(items).await
    }
}
